"""One process of the multi-process pre-training test (started by tests/test_multiprocess.py).

With --num-processes 2 the process joins a localhost coordinator, then:
1. runs the real trainer (`train.train`) for two steps, each process reading its own shard
   files, and saves a checkpoint with both processes' input positions;
2. trains on one fixed global batch for three steps, saves an orbax checkpoint, restores it into
   fresh arrays and trains one more step, writing the four losses to --out.
With --num-processes 1 only part 2 runs, as the single-process reference.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from etbert_jax import distributed  # noqa: E402  (must run before any other JAX import)

# Batch over data x fsdp = 2 x 4, with parameters and optimizer state sharded over fsdp (across processes).
MESH = ("mesh.data=2", "mesh.fsdp=4")


def _fixed_global_batch(shards: str, config) -> dict[str, np.ndarray]:
    """The first global_batch_size examples of the shards in file order, padded and masked with seed 0."""
    import tensorflow as tf

    from etbert_jax import data

    files = data.list_shards(shards)
    size, seq_len = config.data.global_batch_size, config.data.seq_len
    ids = np.zeros((size, seq_len), np.int32)
    segments = np.zeros((size, seq_len), np.int32)
    labels = np.zeros(size, np.int32)
    for row, serialized in enumerate(tf.data.TFRecordDataset(files).take(size).as_numpy_iterator()):
        feature = tf.train.Example.FromString(serialized).features.feature
        values = feature["input_ids"].int64_list.value
        ids[row, :len(values)] = values
        segments[row, :len(values)] = feature["segment_ids"].int64_list.value
        labels[row] = feature["sbp_label"].int64_list.value[0]
    spec = data.MaskingSpec(mask_prob=config.data.mask_prob, masking=config.data.masking,
                            max_span=config.data.max_span, max_predictions=config.data.max_predictions,
                            vocab_size=config.model.vocab_size)
    masked = data.mask_tokens(ids, spec, np.random.default_rng(0))
    return {"input_ids": masked["input_ids"], "segment_ids": segments,
            "masked_positions": masked["masked_positions"], "mbm_targets": masked["mbm_targets"],
            "mbm_weights": masked["mbm_weights"], "sbp_labels": labels}


def _local_rows(global_batch: dict, sharding) -> dict:
    """This process's rows of the global batch, as make_array_from_process_local_data expects them."""
    import jax

    shape = global_batch["input_ids"].shape
    index_map = sharding.addressable_devices_indices_map(shape)
    starts = [index[0].start or 0 for index in index_map.values()]
    stops = [index[0].stop or shape[0] for index in index_map.values()]
    rows = slice(min(starts), max(stops))
    assert (max(stops) - min(starts)) * jax.process_count() == shape[0], "rows of a process are not contiguous"
    return {key: value[rows] for key, value in global_batch.items()}


def _fixed_batch_losses(args) -> list[float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from etbert_jax import checkpoint, data, heads, optim, sharding, train

    config = train.resolve_config("tiny", ["train.steps=10", *MESH], args.shards, args.workdir)
    mesh = sharding.make_mesh(config.mesh)
    tx = optim.make_optimizer(config.optim, config.train.steps)

    def build():
        model = heads.PretrainModel(config.model, rngs=nnx.Rngs(config.train.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, state = nnx.split(sharding.create_sharded_model(build, mesh))
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = train.make_train_step(graphdef, state_shardings, batch_sharding, config,
                                    optim.make_schedule(config.optim, config.train.steps))
    batch = data.make_global_batch(_local_rows(_fixed_global_batch(args.shards, config), batch_sharding),
                                   batch_sharding)

    losses = []
    with jax.set_mesh(mesh), sharding.rules_context():
        for step in range(3):
            state, metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
            losses.append(float(metrics["loss"]))

        saver = checkpoint.Checkpointer(pathlib.Path(args.workdir) / "fixed-batch", save_every=1, keep=2)
        saver.save(3, model_state=state[0], optimizer_state=state[1], cursor={"step": 3}, config={}, force=True)
        saver.wait()
        model, optimizer = sharding.create_sharded_model(build, mesh)
        model_state, optimizer_state, _, _ = saver.restore(
            3, model_target=checkpoint.abstract_state(nnx.state(model)),
            optimizer_target=checkpoint.abstract_state(nnx.state(optimizer)))
        saver.close()
        nnx.update(model, model_state)
        nnx.update(optimizer, optimizer_state)
        _, fresh = nnx.split((model, optimizer))

        state, metrics = step_fn(fresh, batch, jnp.asarray(3, jnp.int32))
        losses.append(float(metrics["loss"]))
    return losses


def _run_trainer(args) -> None:
    from etbert_jax import train

    workdir = str(pathlib.Path(args.workdir) / "trainer")
    overrides = ["train.steps=2", "train.checkpoint_every=2", "train.log_every=1", *MESH]
    result = train.train(train.resolve_config("tiny", overrides, args.shards, workdir))
    assert result.step == 2, result
    assert result.reason == "completed", result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    distributed.add_flags(parser)
    args = parser.parse_args()
    if args.num_processes and args.num_processes > 1:
        distributed.initialize(distributed.options_from_args(args))

    import jax

    if jax.process_count() > 1:
        _run_trainer(args)
    losses = _fixed_batch_losses(args)
    if jax.process_index() == 0:
        pathlib.Path(args.out).write_text(json.dumps({
            "losses": losses, "process_count": jax.process_count(), "device_count": jax.device_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
