"""The fine-tuned classifier: build, restore, save and predict (shared by finetune, evaluate, predict).

A fine-tuned checkpoint has the pre-training layout (see checkpoint.py) with a `Classifier`
model item. Its config item is the resolved Config plus two keys, `labels` (class names in
label-index order) and `finetune_data` (level, sequence length, split policy and conversion
options of the data it was trained on), so evaluation and prediction need nothing else.

    model, config, labels, info = classifier.load_classifier("runs/ft")   # best/ when present
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from etbert_jax import config as config_lib
from etbert_jax import finetune_data

log = logging.getLogger(__name__)

# Subdirectory of a fine-tuning workdir holding the best checkpoint by validation macro-F1.
BEST_SUBDIR = "best"
# Keys that a fine-tuned checkpoint's config item carries besides the Config sections.
EXTRA_CONFIG_KEYS = ("labels", "finetune_data")
# Orbax cannot save an empty item, so best/ checkpoints carry this marker instead of optimizer state.
_NO_OPTIMIZER_STATE = {"optimizer_state_not_saved": np.zeros((), np.int32)}


def read_stored_config(init: str, step: int | None) -> tuple[config_lib.Config, int]:
    """Return the Config stored with a checkpoint (newest step, or `step`) and the chosen step."""
    from etbert_jax import checkpoint

    directory, step_from_path = checkpoint.resolve_checkpoint_path(init)
    checkpointer = checkpoint.Checkpointer(directory, save_every=1, keep=1_000_000, async_save=False)
    try:
        chosen = checkpointer._require_step(step if step is not None else step_from_path)
        values = checkpointer.read_config(chosen)
    finally:
        checkpointer.close()
    for key in EXTRA_CONFIG_KEYS:
        values.pop(key, None)
    return config_lib.config_from_dict(values), chosen


def trainable_filter(freeze_encoder: bool):
    """Return the nnx filter of the parameters that fine-tuning updates."""
    from flax import nnx

    if freeze_encoder:
        return nnx.All(nnx.Param, nnx.PathContains("output"))
    return nnx.Param


def build_classifier(config: config_lib.Config, num_labels: int, mesh, freeze_encoder: bool = False):
    """Create (Classifier, Optimizer), sharded on `mesh`; the optimizer covers the trainable parameters only."""
    from flax import nnx

    from etbert_jax import heads, optim, sharding

    tx = optim.make_optimizer(config.optim, config.train.steps)

    def build():
        model = heads.Classifier(config.model, num_labels, rngs=nnx.Rngs(config.train.seed))
        return model, nnx.Optimizer(model, tx, wrt=trainable_filter(freeze_encoder))

    return sharding.create_sharded_model(build, mesh)


def load_pretrained_encoder(model, init: str, mesh, step: int | None = None) -> None:
    """Copy the encoder and pooler of the pre-training checkpoint `init` into `model` (in place)."""
    from flax import nnx

    from etbert_jax import checkpoint

    # The MBM and SBP heads are restored too (restore_pretrained reads the whole model item) but
    # are dropped here.
    _, pretrained = checkpoint.restore_pretrained(init, mesh, step=step)
    for part in ("encoder", "pooler"):
        bad = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(pretrained[part])
               if jnp.issubdtype(leaf.dtype, jnp.floating) and not bool(jnp.isfinite(leaf).all())]
        if bad:
            more = f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""
            raise ValueError(f"the checkpoint {init} contains non-finite (NaN or infinite) weights in {part}{bad[0]}"
                             f"{more}: pre-training diverged before it was saved, so start from an earlier "
                             "checkpoint (pass its step folder to --init)")
    nnx.update(model.encoder, pretrained["encoder"])
    nnx.update(model.pooler, pretrained["pooler"])


def make_predict_fn(graphdef, state_shardings, batch_sharding):
    """Return the jitted `predict(model_state, batch) -> probabilities [B, classes]` (float32)."""
    from flax import nnx

    def predict(state, batch):
        model = nnx.merge(graphdef, state)
        logits = model(batch["input_ids"], batch["segment_ids"], deterministic=True)
        return jax.nn.softmax(logits, axis=-1)

    return jax.jit(predict, in_shardings=(state_shardings, batch_sharding), out_shardings=None)


def predict_batches(predict_fn, model_state, batches: Iterable[tuple[dict, dict]], batch_sharding,
                    ) -> Iterator[tuple[np.ndarray, dict]]:
    """Run `predict_fn` over (model batch, metadata) pairs; yield (probabilities of the real rows, metadata).

    Every process must pass the same number of batches, because the global batch is assembled
    from each process's rows. Padded rows (weight 0) are dropped from the output.
    """
    from jax.experimental import multihost_utils

    from etbert_jax import data

    for model_batch, metadata in batches:
        arrays = data.make_global_batch(model_batch, batch_sharding)
        probabilities = predict_fn(model_state, arrays)
        if jax.process_count() > 1:
            probabilities = multihost_utils.process_allgather(probabilities, tiled=True)
            weights = multihost_utils.process_allgather(arrays["weights"], tiled=True)
        else:
            weights = arrays["weights"]
        probabilities, weights = np.asarray(probabilities), np.asarray(weights)
        yield probabilities[weights > 0], metadata


def predict_split(predict_fn, model_state, source: finetune_data.FinetuneSource, split: str, local_batch: int,
                  batch_sharding) -> dict[str, Any]:
    """Predict every example of `split`; return labels, probabilities and example ids (process 0 order)."""
    # NOTE: with several processes only this process's labels and ids are collected, and the
    # probabilities kept are the first rows of the gathered batch. Scores are exact on one process.
    batches = finetune_data.eval_batches(source, split, local_batch_size=local_batch,
                                         process_index=jax.process_index(), process_count=jax.process_count())
    labels, probabilities, ids = [], [], []
    for probs, metadata in predict_batches(predict_fn, model_state, _same_count(batches, local_batch, source.seq_len),
                                           batch_sharding):
        probabilities.append(probs[: len(metadata["labels"])])
        labels.append(metadata["labels"])
        ids.extend(f"{s.decode()}|{e.decode()}|{p}" for s, e, p in
                   zip(metadata["source"], metadata["session"], metadata["packet_index"]))
    if not labels:
        return {"labels": np.zeros(0, np.int64), "probabilities": np.zeros((0, len(source.labels))), "ids": []}
    return {"labels": np.concatenate(labels).astype(np.int64), "probabilities": np.concatenate(probabilities),
            "ids": ids}


def _same_count(batches: Iterator, local_batch: int, seq_len: int) -> Iterator:
    """Pad this process's batch stream with empty batches until every process has the same count."""
    items = list(batches)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = multihost_utils.process_allgather(np.array([len(items)], np.int64))
        target = int(np.max(counts))
        empty = {"input_ids": np.zeros((0, seq_len), np.int32), "segment_ids": np.zeros((0, seq_len), np.int32),
                 "labels": np.zeros(0, np.int32)}
        while len(items) < target:
            items.append(finetune_data.pad_batch(empty, local_batch))
    yield from items


def classifier_config_item(config: config_lib.Config, labels: Sequence[str], data_info: dict) -> dict:
    """Return the config item of a fine-tuned checkpoint: the Config plus class names and data facts."""
    return dict(config_lib.config_to_dict(config), labels=list(labels), finetune_data=dict(data_info))


def save_classifier(checkpointer, step: int, model_state, config_item: dict) -> None:
    """Save a classifier's model state without optimizer state, as best/ stores it, for `load_classifier`."""
    checkpointer.save(step, model_state=model_state, optimizer_state=_NO_OPTIMIZER_STATE, cursor={"step": step},
                      config=config_item, force=True)


def load_classifier(checkpoint_dir: str, mesh=None, step: int | None = None):
    """Restore a fine-tuned classifier; return (model, Config, class names, checkpoint info dict).

    `checkpoint_dir` is a fine-tuning workdir (its best checkpoint is taken), its `best` or
    `checkpoints` directory, or one step directory. `mesh` defaults to all devices on the data axis.
    """
    from flax import nnx

    from etbert_jax import checkpoint, sharding

    path = pathlib.Path(checkpoint_dir)
    if (path / BEST_SUBDIR).is_dir():
        path = path / BEST_SUBDIR
    directory, step_from_path = checkpoint.resolve_checkpoint_path(path)
    checkpointer = checkpoint.Checkpointer(directory, save_every=1, keep=1_000_000, async_save=False)
    try:
        chosen = checkpointer._require_step(step if step is not None else step_from_path)
        values = checkpointer.read_config(chosen)
        labels = values.pop("labels", None)
        info = values.pop("finetune_data", {}) or {}
        if not labels:
            raise ValueError(f"the checkpoint in {directory} has no class labels; it is not a fine-tuned "
                             "classifier (pass the workdir of `etbert finetune`)")
        config = config_lib.config_from_dict(values)
        mesh = mesh if mesh is not None else sharding.make_mesh(config_lib.MeshConfig(data=-1))
        model = sharding.create_sharded_model(
            lambda: _classifier(config, len(labels)), mesh)
        restored = checkpointer.restore_model(chosen, model_target=checkpoint.abstract_state(nnx.state(model)))
        nnx.update(model, restored)
    finally:
        checkpointer.close()
    return model, config, list(labels), dict(info, step=chosen, checkpoint=str(directory))


def _classifier(config: config_lib.Config, num_labels: int):
    from flax import nnx

    from etbert_jax import heads

    return heads.Classifier(config.model, num_labels, rngs=nnx.Rngs(config.train.seed))
