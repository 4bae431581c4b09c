"""Orbax checkpoints: periodic async saves, keep-latest-N, exact resume and restore onto any mesh.

This is the only module that imports Orbax. A checkpoint is one step directory under
`WORKDIR/checkpoints/` with four items:

    model      nnx.State of the PretrainModel: parameters and the dropout RNG stream (key, count)
    optimizer  nnx.State of the nnx.Optimizer: step count and AdamW moments
    cursor     JSON: input position of every process (see data.cursor_to_json) and the train step
    config     JSON: the full resolved Config, including the shards' `tokenizer` block

Saving model, optimizer, RNG and input position together is what makes a resumed run continue
exactly where the interrupted one stopped. Partly written step directories (a process killed
during a save) carry Orbax's temporary names and are never listed, so a restore always picks the
newest complete checkpoint.

Restoring works onto any mesh: the caller passes an abstract target (`abstract_state`) whose leaves
are `jax.ShapeDtypeStruct`s carrying the new mesh's shardings, and Orbax reads each array straight
into that layout.

For fine-tuning and prediction, `restore_pretrained(path, mesh, step=None)` returns the stored
Config and the pre-trained model state (parameters of encoder, pooler and heads), from any saved
step, sharded for any mesh:

    config, model_state = checkpoint.restore_pretrained("runs/base", mesh)
    encoder_params = model_state["encoder"]      # nnx.State, the same tree as BertEncoder's

`path` may be a workdir, its `checkpoints` directory, or one step directory inside it.
"""

import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

# Subdirectory of the workdir that the checkpoint manager owns.
CHECKPOINT_SUBDIR = "checkpoints"


def abstract_state(state) -> Any:
    """Return a restore target for `state`: ShapeDtypeStructs with the live arrays' shardings."""

    def to_abstract(leaf):
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
        return leaf

    return jax.tree_util.tree_map(to_abstract, state)


class Checkpointer:
    """Saves and restores training state in `directory` with an Orbax CheckpointManager.

    Every process must call `save`, `restore`, `wait` and `close` (Orbax coordinates the hosts).
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True):
        # Orbax rejects relative paths at the first save, so resolve here.
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """Return the newest complete step, or None when there is no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Return every complete step, oldest first."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Return whether the save policy saves at `step` (every `save_every` steps)."""
        return self._manager.should_save(step)

    def save(self, step: int, *, model_state, optimizer_state, cursor: dict, config: dict,
             force: bool = False) -> bool:
        """Start saving one checkpoint (async); return whether a save started.

        Without `force` the save policy decides; `force` saves anyway (last step, preemption).
        The device-to-host copy finishes before this returns, so the arrays may be donated afterwards.
        """
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model_state),
            optimizer=ocp.args.StandardSave(optimizer_state),
            cursor=ocp.args.JsonSave(cursor),
            config=ocp.args.JsonSave(config),
        )
        saved = self._manager.save(step, args=args, force=force)
        if saved:
            log.info("saving checkpoint for step %d in %s", step, self.directory)
        return saved

    def restore(self, step: int, *, model_target, optimizer_target) -> tuple[Any, Any, dict, dict]:
        """Restore step `step` onto the shardings of the targets; return (model, optimizer, cursor, config)."""
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(model_target),
            optimizer=ocp.args.StandardRestore(optimizer_target),
            cursor=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        restored = self._manager.restore(step, args=args)
        log.info("restored checkpoint of step %d from %s", step, self.directory)
        return restored["model"], restored["optimizer"], dict(restored["cursor"]), dict(restored["config"])

    def restore_model(self, step: int, *, model_target) -> Any:
        """Restore only the model item of step `step` (no optimizer state) onto the target's shardings."""
        restored = self._manager.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(model_target)))
        return restored["model"]

    def read_config(self, step: int | None = None) -> dict:
        """Return the resolved config stored with step `step` (default: the newest)."""
        step = self._require_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored["config"])

    def read_cursor(self, step: int | None = None) -> dict:
        """Return the input-position item stored with step `step` (default: the newest)."""
        step = self._require_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(cursor=ocp.args.JsonRestore()))
        return dict(restored["cursor"])

    def _require_step(self, step: int | None) -> int:
        available = self.all_steps()
        if not available:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}; train first or pass the "
                                    "workdir of a finished run")
        if step is None:
            return available[-1]
        if step not in available:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {available}")
        return step

    def wait(self) -> None:
        """Block until every pending async save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()


def resolve_checkpoint_path(path: str | os.PathLike) -> tuple[pathlib.Path, int | None]:
    """Map a workdir, a checkpoints directory or a step directory to (manager directory, step or None)."""
    path = pathlib.Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if (path / CHECKPOINT_SUBDIR).is_dir():
        return path / CHECKPOINT_SUBDIR, None
    if path.name.isdigit() and (path / "model").exists():
        return path.parent, int(path.name)
    return path, None


def restore_pretrained(path: str | os.PathLike, mesh, step: int | None = None):
    """Restore a pre-training checkpoint's model state onto `mesh`; return (Config, model nnx.State).

    The model is rebuilt from the stored config with parameters sharded by the project's logical
    rules for `mesh`, so the mesh may differ from the one the checkpoint was written on. The
    optimizer state is not read.
    """
    from flax import nnx

    from etbert_jax import config as config_lib
    from etbert_jax import heads, sharding

    directory, step_from_path = resolve_checkpoint_path(path)
    checkpointer = Checkpointer(directory, save_every=1, keep=1_000_000, async_save=False)
    try:
        step = checkpointer._require_step(step if step is not None else step_from_path)
        config = config_lib.config_from_dict(checkpointer.read_config(step))

        def build():
            return heads.PretrainModel(config.model, rngs=nnx.Rngs(config.train.seed))

        # The abstract model has shapes, dtypes and the new mesh's shardings, and allocates nothing.
        _, target = sharding.abstract_model(build, mesh)
        model_state = checkpointer.restore_model(step, model_target=target)
    finally:
        checkpointer.close()
    return config, model_state
