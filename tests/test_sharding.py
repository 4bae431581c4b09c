"""Tests for etbert_jax.sharding on 8 fake CPU devices.

The equivalence tests run one loss-and-gradient step of the pre-training model on the same batch
under data-parallel, FSDP and tensor-parallel meshes and compare each with a run without a mesh.
The golden test compares every parameter's PartitionSpec per mesh with tests/golden/; regenerate
that file with `ETBERT_UPDATE_GOLDEN=1 pytest tests/test_sharding.py -k golden` and review the diff.
"""

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from etbert_jax import heads, sharding, tasks
from etbert_jax.config import MeshConfig, ModelConfig

GOLDEN_PATH = pathlib.Path(__file__).resolve().parent / "golden" / "sharding_specs.json"

# Four heads and a 1,000-token vocabulary (padded to 1,024) divide every tensor size used below.
CONFIG = ModelConfig(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_positions=64, attention_dropout=0.1)
BATCH, LENGTH, SLOTS = 8, 16, 4

MESHES = {
    "data_8": MeshConfig(data=8, fsdp=1, tensor=1),
    "fsdp_2x4": MeshConfig(data=2, fsdp=4, tensor=1),
    "fsdp_1x8": MeshConfig(data=1, fsdp=8, tensor=1),
    "mixed_2x2x2": MeshConfig(data=2, fsdp=2, tensor=2),
    "tensor_1x2x4": MeshConfig(data=1, fsdp=2, tensor=4),
}


# Meshes on which the equivalence test also compares a step with dropout (tensor-sharded masks).
DROPOUT_MESHES = ("mixed_2x2x2", "tensor_1x2x4")


def build_model(config=CONFIG):
    return heads.PretrainModel(config, rngs=nnx.Rngs(0))


@functools.cache
def plain_model():
    return build_model()


@functools.cache
def placed_model(mesh_name):
    """Copy the unsharded model's parameters onto a mesh with the rules' shardings (no compile)."""
    mesh = sharding.make_mesh(MESHES[mesh_name])
    graphdef, state = nnx.split(plain_model())
    placed = jax.device_put(state, sharding.logical_to_mesh_sharding(state, mesh))
    return mesh, nnx.merge(graphdef, placed)


@functools.cache
def created_model(mesh_name):
    """Create the model with the jitted sharded constructor, once per mesh (it takes seconds to compile)."""
    mesh = sharding.make_mesh(MESHES[mesh_name])
    return mesh, sharding.create_sharded_model(build_model, mesh)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(5, CONFIG.vocab_size, size=(BATCH, LENGTH)).astype(np.int32)
    input_ids[:, 12:] = 0
    segment_ids = np.where(input_ids != 0, 1, 0).astype(np.int32)
    masked_positions = np.stack([rng.choice(np.arange(1, 12), SLOTS, replace=False) for _ in range(BATCH)])
    mbm_weights = np.ones((BATCH, SLOTS), np.float32)
    mbm_weights[:, -1] = 0.0
    return {
        "input_ids": input_ids,
        "segment_ids": segment_ids,
        "masked_positions": masked_positions.astype(np.int32),
        "mbm_targets": rng.integers(5, CONFIG.vocab_size, size=(BATCH, SLOTS)).astype(np.int32),
        "mbm_weights": mbm_weights,
        "sbp_labels": rng.integers(0, 2, size=BATCH).astype(np.int32),
    }


def loss_and_grads(model, batch, dropout_key):
    """Jit one pre-training loss and gradient evaluation, the way a train step would."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch, key):
        module = nnx.merge(graphdef, params, rest)
        mbm_logits, sbp_logits = module(batch["input_ids"], batch["segment_ids"], batch["masked_positions"],
                                        deterministic=key is None, dropout_key=key)
        loss, _ = tasks.pretrain_loss(mbm_logits, batch["mbm_targets"], batch["mbm_weights"], sbp_logits,
                                      batch["sbp_labels"], mbm_weight=0.1, sbp_weight=1.0)
        return loss

    return jax.jit(jax.value_and_grad(loss_fn))(params, batch, dropout_key)


@pytest.fixture(scope="module")
def reference():
    """Loss and gradients without any mesh, deterministic and with a fixed dropout key."""
    model = plain_model()
    batch = {name: jnp.asarray(value) for name, value in make_batch().items()}
    return {
        "deterministic": loss_and_grads(model, batch, None),
        "dropout": loss_and_grads(model, batch, jax.random.key(7)),
    }


def assert_same_loss_and_grads(actual, expected):
    actual_loss, actual_grads = actual
    expected_loss, expected_grads = expected
    np.testing.assert_allclose(actual_loss, expected_loss, rtol=1e-5, atol=1e-6)

    actual_flat = dict(sharding._flat(actual_grads))
    expected_flat = dict(sharding._flat(expected_grads))
    assert actual_flat.keys() == expected_flat.keys()
    for path, value in expected_flat.items():
        np.testing.assert_allclose(np.asarray(actual_flat[path]), np.asarray(value), rtol=2e-4, atol=2e-6,
                                   err_msg=f"gradient of {path}")


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_step_matches_single_device(mesh_name, reference):
    mesh, model = placed_model(mesh_name)
    batch = jax.device_put(make_batch(), sharding.batch_sharding(mesh))

    with jax.set_mesh(mesh):
        deterministic = loss_and_grads(model, batch, None)
    assert_same_loss_and_grads(deterministic, reference["deterministic"])

    if mesh_name in DROPOUT_MESHES:
        with jax.set_mesh(mesh):
            with_dropout = loss_and_grads(model, batch, jax.random.key(7))
        assert_same_loss_and_grads(with_dropout, reference["dropout"])


def spec_table(mesh_name):
    """Map each parameter path to its PartitionSpec and per-device shard shape on one mesh."""
    mesh = sharding.make_mesh(MESHES[mesh_name])
    _, abstract_state = sharding.abstract_model(build_model, mesh)
    params = nnx.state(abstract_state, nnx.Param)
    shapes = {path: leaf.sharding.shard_shape(leaf.shape) for path, leaf in sharding._flat(params)}
    return {path: f"{spec} shard {list(shapes[path])}" for path, _, spec in sharding.describe_shardings(params)}


def test_golden_partition_specs():
    actual = {name: spec_table(name) for name in sorted(MESHES)}
    if os.environ.get("ETBERT_UPDATE_GOLDEN"):
        GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN_PATH.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN_PATH.read_text())

    assert sorted(golden) == sorted(actual)
    for mesh_name, specs in golden.items():
        assert sorted(actual[mesh_name]) == sorted(specs), f"parameter paths differ on mesh {mesh_name}"
        for path, spec in specs.items():
            assert actual[mesh_name][path] == spec, f"{mesh_name}: {path}"


def test_sharded_parameters_are_split():
    _, model = created_model("mixed_2x2x2")

    table = model.encoder.embeddings.word.embedding[...]
    assert isinstance(table.sharding, NamedSharding)
    assert table.sharding.spec == PartitionSpec("tensor", "fsdp")
    # Each device stores a quarter of the table: vocab split by tensor=2, hidden by fsdp=2.
    shard_shapes = {shard.data.shape for shard in table.addressable_shards}
    assert shard_shapes == {(CONFIG.padded_vocab_size // 2, CONFIG.hidden_size // 2)}

    qkv = model.encoder.layers.attention.qkv_kernel[...]
    assert tuple(qkv.sharding.spec)[:4] == (None, "fsdp", None, "tensor")


def test_create_sharded_model_matches_plain_init():
    _, model = created_model("mixed_2x2x2")
    sharded = nnx.state(model, nnx.Param)
    plain = nnx.state(plain_model(), nnx.Param)
    for (path, left), (_, right) in zip(sharding._flat(sharded), sharding._flat(plain)):
        np.testing.assert_allclose(np.asarray(left), np.asarray(right), rtol=1e-6, err_msg=path)


def test_constrain_is_noop_without_mesh():
    x = jnp.ones((4, 3, 2))
    assert sharding.constrain(x, "batch", "length", "act_embed") is x


def test_constrain_applies_under_mesh():
    mesh = sharding.make_mesh(MESHES["fsdp_2x4"])

    @jax.jit
    def constrained(x):
        return sharding.constrain(x * 2, "batch", "length", "act_embed")

    with jax.set_mesh(mesh):
        out = constrained(jnp.ones((8, 3, 2)))
    assert out.sharding.spec[0] == ("data", "fsdp")


def test_constrain_rank_mismatch():
    mesh = sharding.make_mesh(MESHES["data_8"])
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="2 axis names"):
        jax.jit(lambda x: sharding.constrain(x, "batch", "length"))(jnp.ones((8, 2, 2)))


def test_logical_rules_table():
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == PartitionSpec(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("vocab", "embed")) == PartitionSpec("tensor", "fsdp")
    assert sharding.logical_to_spec(("layers", None, "mlp")) == PartitionSpec(None, None, "tensor")
    with pytest.raises(KeyError, match="'embedding' is not in LOGICAL_RULES"):
        sharding.logical_to_spec(("embedding",))


def test_make_mesh_axes_and_types():
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == (2, 2, 2)
    assert all(axis_type == AxisType.Auto for axis_type in mesh.axis_types)


def test_make_mesh_on_device_subset():
    mesh = sharding.make_mesh(MeshConfig(data=-1), devices=jax.devices()[:4])
    assert mesh.devices.size == 4


def test_make_mesh_too_large():
    with pytest.raises(ValueError, match="larger than the 8 available"):
        sharding.make_mesh(MeshConfig(data=4, fsdp=4))


def test_batch_sharding_spec():
    mesh = sharding.make_mesh(MESHES["fsdp_2x4"])
    batch = jax.device_put(make_batch(), sharding.batch_sharding(mesh))
    assert batch["input_ids"].sharding.spec == PartitionSpec(("data", "fsdp"))
    assert {shard.data.shape for shard in batch["input_ids"].addressable_shards} == {(1, LENGTH)}


def test_logical_to_mesh_sharding_of_abstract_model():
    mesh = sharding.make_mesh(MESHES["mixed_2x2x2"])
    _, abstract_state = sharding.abstract_model(build_model, mesh)
    shardings = sharding.logical_to_mesh_sharding(abstract_state, mesh)
    flat = dict(sharding._flat(shardings))
    assert flat["mbm.decoder.kernel"].spec == PartitionSpec("fsdp", "tensor")
    assert flat["encoder.layers.mlp.wi.kernel"].spec == PartitionSpec(None, "fsdp", "tensor")


def test_describe_shardings_rows():
    rows = sharding.describe_shardings(nnx.state(plain_model(), nnx.Param))
    by_path = {path: (shape, spec) for path, shape, spec in rows}
    assert by_path["encoder.embeddings.word.embedding"] == ((1024, 32), "P('tensor', 'fsdp')")
    assert by_path["encoder.embeddings.norm.scale"][0] == (32,)
