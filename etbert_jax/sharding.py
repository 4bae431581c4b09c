"""Device mesh, the logical-axis rule table and every sharding helper the model and trainer use.

Parameters and activations are annotated with logical axis names (`embed`, `heads`, `vocab`, ...).
`LOGICAL_RULES` maps them onto the mesh axes `('data', 'fsdp', 'tensor')`, so a layout change is
one edit here, never in the model. Only this module names the mesh axes.

The mesh uses Auto (GSPMD) axes: the compiler propagates shardings from the annotated parameters,
the batch and the few activation constraints placed with `constrain`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from etbert_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes, or None for replicated). Weights first, then activations.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Hidden dimension of weights: sharded by FSDP, gathered before use.
    ("embed", "fsdp"),
    # Feed-forward inner dimension.
    ("mlp", "tensor"),
    # Attention heads.
    ("heads", "tensor"),
    # Features within one head.
    ("head_dim", None),
    # The query/key/value selector of the fused attention projection.
    ("qkv", None),
    # Vocabulary rows of the word embedding and the MBM decoder, and the logits' last axis.
    ("vocab", "tensor"),
    # Leading axis of the stacked (scanned) layer parameters.
    ("layers", None),
    # Small tables and outputs kept whole on every device.
    ("positions", None),
    ("segments", None),
    ("labels", None),
    ("norm", None),
    # Activations: batch over both data-parallel axes, everything else replicated.
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
)

ModelT = TypeVar("ModelT", bound=nnx.Module)


def make_mesh(mesh_config: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """Build a ('data', 'fsdp', 'tensor') mesh with Auto axes over `devices` (default: all devices).

    Raises ValueError when the configured sizes do not match the device count.
    """
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = mesh_config.resolve(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(names: tuple[str | None, ...] | list[str | None]) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through `LOGICAL_RULES`; None stays None.

    Raises KeyError for a name missing from the table, so a typo cannot silently replicate.
    """
    table = dict(LOGICAL_RULES)
    axes = []
    for name in names:
        if name is None:
            axes.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} is not in LOGICAL_RULES; known names: {', '.join(table)}")
        axes.append(table[name])
    return PartitionSpec(*axes)


def active_mesh() -> jax.sharding.AbstractMesh | None:
    """Return the mesh set with `jax.set_mesh`, or None when no mesh is active."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Constrain an activation's sharding by logical axis names; a no-op when no mesh is active."""
    if active_mesh() is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain got {len(names)} axis names {names} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def param(initializer: Callable[..., jax.Array], key: jax.Array, shape: tuple[int, ...],
          names: tuple[str | None, ...]) -> nnx.Param:
    """Create a float32 parameter annotated with logical axis names.

    Under an active mesh (inside `create_sharded_model`) the value is sharded as it is created.
    Without a mesh it stays an ordinary array on the default device.
    """
    if len(names) != len(shape):
        raise ValueError(f"parameter of shape {shape} got {len(names)} logical axis names {names}")
    value = initializer(key, shape, np.float32)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=active_mesh() is not None)


@contextlib.contextmanager
def rules_context() -> Iterator[None]:
    """Activate `LOGICAL_RULES` for Flax's logical-name resolution."""
    with nnx.logical_axis_rules(LOGICAL_RULES):
        yield


def create_sharded_model(build_fn: Callable[[], ModelT], mesh: Mesh) -> ModelT:
    """Call `build_fn` under a jitted constructor so every parameter is created already sharded.

    Initialisation runs inside one jitted function whose outputs carry the rules' shardings, so XLA
    generates each shard on its own device instead of building full copies first. The returned
    model's arrays carry NamedShardings on `mesh`.
    """
    with jax.set_mesh(mesh), rules_context():
        return nnx.jit(build_fn)()


def abstract_model(build_fn: Callable[[], ModelT], mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """Return the graph definition and an abstract state (shapes, dtypes, shardings) without allocating."""
    with jax.set_mesh(mesh), rules_context():
        return nnx.get_abstract_model(build_fn, mesh)


def logical_to_mesh_sharding(tree: Any, mesh: Mesh) -> Any:
    """Map an NNX state (or a module) to a matching tree of NamedShardings on `mesh`."""
    state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
    with rules_context():
        return nnx.get_named_sharding(state, mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Return the sharding of every batch array: leading axis split over ('data', 'fsdp'), rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def describe_shardings(state: Any) -> list[tuple[str, tuple[int, ...], str]]:
    """List (dotted path, shape, spec) for every array in a state or module, for logging and tests.

    Live arrays report their actual sharding. Abstract or unsharded leaves report the spec that the
    rules table gives their logical names, or "replicated" without annotations.
    """
    state = nnx.state(state) if isinstance(state, nnx.Module) else state
    with rules_context():
        specs = nnx.get_partition_spec(state)

    rows = []
    for (path, leaf), (_, spec) in zip(_flat(state), _flat(specs)):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            spec = sharding.spec
        text = str(spec) if spec is not None and len(spec) else "replicated"
        rows.append((path, tuple(leaf.shape), text))
    return rows


def _flat(tree: Any) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    rows = []
    for path, leaf in leaves:
        parts = [_key_text(key) for key in path]
        if parts and parts[-1] == "value":
            parts = parts[:-1]
        rows.append((".".join(parts), leaf))
    return rows


def _key_text(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)
