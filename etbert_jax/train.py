"""ET-BERT pre-training (Masked BURST Modeling + Same-origin BURST Prediction) over a device mesh.

`etbert pretrain --config PRESET_OR_YAML --data SHARDS_DIR --workdir DIR [key=value ...]` runs
`main(argv)`; tests and notebooks call `resolve_config` and `train` directly. One run goes
through these phases, in this order:

1. distributed start-up (before any other JAX call), config resolution against the shards'
   manifest (vocab_size, seq_len and the tokenizer block come from it), validation against
   the device and process counts, and the checkpoint checks (--no-resume, model shape), all
   before anything compiles;
2. mesh, model and optimizer created with parameters born sharded;
3. restore of the newest checkpoint in WORKDIR/checkpoints when one exists and resuming is on:
   parameters, optimizer state, step and input position;
4. the loop: per-host input -> global batch -> jitted train step, metrics every
   `train.log_every` steps, checkpoints every `train.checkpoint_every` steps and at the end.

The train step is `jax.jit` of a pure function of the (model, optimizer) state with explicit
input and output shardings and the state donated. A step whose loss or gradient norm is not
finite leaves parameters and optimizer state unchanged. After `train.max_consecutive_nonfinite`
such steps in a row the run stops with `NonFiniteError`.

Dropout keys are `fold_in(key(train.seed), step)` and masks depend on (data.seed, step,
process), so a run resumed from a checkpoint computes exactly what an uninterrupted run would.

On SIGTERM (preemption) the loop saves a checkpoint at the next step boundary and returns. With
several processes the SIGTERM flags are compared at log steps only (see the NOTE in the loop).
"""

import argparse
import dataclasses
import logging
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from etbert_jax import config as config_lib
from etbert_jax import logs
from etbert_jax import data, distributed

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient norm."""


@dataclasses.dataclass
class TrainResult:
    """Outcome of `train`."""

    # Optimizer steps completed, counting those of earlier runs resumed from.
    step: int
    # "completed", "preempted" (SIGTERM) or "data_exhausted" (data.num_epochs reached).
    reason: str
    # Metrics of the last logged step (the JSONL record), or {} when nothing was logged.
    last_metrics: dict


# ---- configuration -------------------------------------------------------------------------

def resolve_config(config_source: str, overrides: list[str], shards: str, workdir: str,
                   resume: bool | None = None) -> config_lib.Config:
    """Load a preset or YAML file with overrides, then take vocab_size, seq_len and tokenizer from the shards.

    A config that sets model.vocab_size or data.seq_len to a value other than the default and other
    than the manifest's raises ValueError, because training on it would not match the shards.
    """
    manifest = data.read_manifest(shards)
    tokenizer = manifest.get("tokenizer") or {}
    if "vocab_size" not in tokenizer or "seq_len" not in manifest:
        raise ValueError(f"the manifest in {shards} lacks tokenizer.vocab_size or seq_len; "
                         "re-run `etbert convert-pretrain` to write a complete manifest")
    vocab_size, seq_len = int(tokenizer["vocab_size"]), int(manifest["seq_len"])

    requested = config_lib.load_config(config_source, overrides)
    defaults = config_lib.Config()
    for name, value, default, shard_value in (
            ("model.vocab_size", requested.model.vocab_size, defaults.model.vocab_size, vocab_size),
            ("data.seq_len", requested.data.seq_len, defaults.data.seq_len, seq_len)):
        if value != default and value != shard_value:
            raise ValueError(f"{name}={value} contradicts the shards in {shards}, which have {name.split('.')[1]} "
                             f"{shard_value}: drop the setting or set {name}={shard_value}")

    extra = [f"model.vocab_size={vocab_size}", f"data.seq_len={seq_len}", f"data.shards={shards}",
             f"train.workdir={workdir}"]
    if resume is not None:
        extra.append(f"train.resume={resume}")
    config = config_lib.load_config(config_source, list(overrides) + extra)
    return dataclasses.replace(config, tokenizer=dict(tokenizer))


# ---- train step ----------------------------------------------------------------------------

def _split_micro(batch: dict, accum: int, index: int) -> dict:
    # Rows r*accum + index form micro-batch `index`, so every device keeps its own rows.
    return {key: value.reshape((value.shape[0] // accum, accum) + value.shape[1:])[:, index]
            for key, value in batch.items()}


def make_train_step(graphdef, state_shardings, batch_sharding, config: config_lib.Config, schedule):
    """Return the jitted `step(state, batch, step_number) -> (state, metrics)` with the state donated."""
    from flax import nnx

    from etbert_jax import optim, tasks

    accum = config.optim.grad_accum_steps
    base_key = jax.random.key(config.train.seed)

    def loss_fn(model, batch, key):
        mbm_logits, sbp_logits = model(batch["input_ids"], batch["segment_ids"], batch["masked_positions"],
                                       deterministic=False, dropout_key=key)
        return tasks.pretrain_loss(mbm_logits, batch["mbm_targets"], batch["mbm_weights"], sbp_logits,
                                   batch["sbp_labels"], mbm_weight=config.train.mbm_weight,
                                   sbp_weight=config.train.sbp_weight)

    def step_fn(state, batch, step_number):
        model, optimizer = nnx.merge(graphdef, state)
        key = jax.random.fold_in(base_key, step_number)
        grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)

        # Gradient accumulation: average the gradients and metrics of `accum` micro-batches.
        # NOTE: the MBM loss is averaged per micro-batch, so micro-batches with fewer masked slots
        # weigh slightly more than in a single pass over the whole batch.
        grads, metrics = None, None
        for index in range(accum):
            micro = batch if accum == 1 else _split_micro(batch, accum, index)
            (_, micro_metrics), micro_grads = grad_fn(model, micro, jax.random.fold_in(key, index))
            grads = micro_grads if grads is None else jax.tree.map(jnp.add, grads, micro_grads)
            metrics = micro_metrics if metrics is None else jax.tree.map(jnp.add, metrics, micro_metrics)
        if accum > 1:
            grads = jax.tree.map(lambda g: g / accum, grads)
            metrics = jax.tree.map(lambda m: m / accum, metrics)

        learning_rate = schedule(optimizer.step[...])
        grad_norm, finite = optim.apply_gradients(optimizer, model, grads, metrics["loss"])
        new_state = nnx.state((model, optimizer))
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=learning_rate, finite=finite,
                       real_tokens=jnp.sum(batch["segment_ids"] > 0))
        return new_state, metrics

    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, None),
                   out_shardings=(state_shardings, None), donate_argnums=0)


# ---- helpers -------------------------------------------------------------------------------

class _PreemptionFlag:
    """Set by SIGTERM; the loop saves and stops at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:
            # signal.signal works only in the main thread; elsewhere preemption is not handled.
            log.warning("not in the main thread: SIGTERM will not trigger a checkpoint")

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag], dtype=np.int32))))


def _gather_cursor(cursor: data.InputCursor, seed: int) -> dict:
    """Collect every process's input position into the checkpoint's cursor item."""
    local = np.array([cursor.epoch, cursor.batches], dtype=np.int64)
    if jax.process_count() == 1:
        rows = local[None]
    else:
        from jax.experimental import multihost_utils

        rows = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2)
    return data.cursor_to_json([data.InputCursor(int(e), int(b)) for e, b in rows], seed)


def _log_startup(config, mesh, model, global_batch: int, batch_shards: int) -> None:
    from etbert_jax import host_memory
    from etbert_jax import metrics as metrics_lib
    from etbert_jax import sharding

    from flax import nnx

    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].device_kind)
    rows = sharding.describe_shardings(nnx.state(model, nnx.Param))
    total = sum(int(np.prod(shape)) for _, shape, _ in rows)
    log.info("model: %s parameters in %d arrays", f"{total:,}", len(rows))
    for path, shape, spec in rows:
        log.info("  %-48s %-22s %s", path, str(shape), spec)
    for line in metrics_lib.describe_batch_arithmetic(
            global_batch=global_batch, process_count=jax.process_count(), batch_shards=batch_shards,
            num_devices=jax.device_count(), seq_len=config.data.seq_len,
            grad_accum_steps=config.optim.grad_accum_steps, total_steps=config.train.steps):
        log.info(line)

    hint = host_memory.hint() if jax.default_backend() == "cpu" else None
    if hint is not None:
        log.info(hint)


def _check_same_model(stored: dict, config: config_lib.Config, directory) -> None:
    stored_model = stored.get("model", {})
    current = config_lib.config_to_dict(config)["model"]
    shape_keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions",
                  "type_vocab_size", "tie_mlm_decoder")
    changed = [f"{key}: {stored_model.get(key)} -> {current[key]}" for key in shape_keys
               if stored_model.get(key) != current[key]]
    if changed:
        raise ValueError(f"the checkpoint in {directory} was written for a different model ({'; '.join(changed)}); "
                         "use another --workdir or pass --no-resume with an empty workdir")


def _checkpoint_to_resume(checkpointer, config: config_lib.Config) -> int | None:
    """Return the step to resume from, or None to start fresh; check the stored model shape first."""
    latest = checkpointer.latest_step()
    if latest is None:
        return None
    if not config.train.resume:
        # Old and new checkpoints in one directory would make a later resume pick the wrong run.
        raise ValueError(f"--no-resume was given but {checkpointer.directory} already contains checkpoints up to step "
                         f"{latest}: pass a new --workdir, or delete that directory to start over")
    _check_same_model(checkpointer.read_config(latest), config, checkpointer.directory)
    if "positions" not in checkpointer.read_cursor(latest):
        # `etbert import-etbert` writes such checkpoints: weights only, no optimizer state or input position.
        raise ValueError(f"the checkpoint of step {latest} in {checkpointer.directory} has no input position, so "
                         "pre-training cannot resume from it (imported weights are for fine-tuning): "
                         "pass a new --workdir")
    return latest


def _restore(checkpointer, step: int, model, optimizer) -> data.InputCursor:
    """Restore checkpoint `step` into `model` and `optimizer` in place; return this process's input cursor."""
    from flax import nnx

    from etbert_jax import checkpoint

    model_state, optimizer_state, cursor_item, _ = checkpointer.restore(
        step, model_target=checkpoint.abstract_state(nnx.state(model)),
        optimizer_target=checkpoint.abstract_state(nnx.state(optimizer)))
    nnx.update(model, model_state)
    nnx.update(optimizer, optimizer_state)
    cursor = data.cursor_from_json(cursor_item, jax.process_index(), jax.process_count())
    log.info("resuming at step %d, input epoch %d after %d batches", step, cursor.epoch, cursor.batches)
    return cursor


# ---- the run -------------------------------------------------------------------------------

def train(config: config_lib.Config) -> TrainResult:
    """Pre-train as `config` describes; `distributed.initialize` must have run in multi-process jobs."""
    from flax import nnx

    from etbert_jax import checkpoint, flops, heads, optim, sharding
    from etbert_jax import metrics as metrics_lib

    # Phase 1: everything that can fail on a bad config fails here, before compilation.
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    files = data.list_shards(config.data.shards)
    data.files_for_process(files, jax.process_index(), jax.process_count())
    if not config.train.workdir:
        raise ValueError("train.workdir is empty: pass --workdir DIR")
    workdir = config.train.workdir
    checkpointer = checkpoint.Checkpointer(f"{workdir}/{checkpoint.CHECKPOINT_SUBDIR}",
                                           save_every=config.train.checkpoint_every,
                                           keep=config.train.keep_checkpoints)
    try:
        resume_step = _checkpoint_to_resume(checkpointer, config)
    except BaseException:
        checkpointer.close()
        raise
    is_primary = distributed.is_primary()
    if is_primary:
        config_lib.save_yaml(config, f"{workdir}/config.yaml")

    # Phase 2: mesh, model and optimizer, created sharded.
    mesh = sharding.make_mesh(config.mesh)
    global_batch = config.data.global_batch_size
    batch_shards = mesh_shape[0] * mesh_shape[1]
    schedule = optim.make_schedule(config.optim, config.train.steps)
    tx = optim.make_optimizer(config.optim, config.train.steps)

    def build():
        model = heads.PretrainModel(config.model, rngs=nnx.Rngs(config.train.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = sharding.create_sharded_model(build, mesh)
    if is_primary:
        _log_startup(config, mesh, model, global_batch, batch_shards)

    # Phase 3: resume from the newest complete checkpoint.
    start_step, cursor = 0, data.InputCursor()
    if resume_step is not None:
        try:
            cursor = _restore(checkpointer, resume_step, model, optimizer)
        except BaseException:
            checkpointer.close()
            raise
        start_step = resume_step

    # Phase 4: the loop.
    graphdef, state = nnx.split((model, optimizer))
    del model, optimizer
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = make_train_step(graphdef, state_shardings, batch_sharding, config, schedule)

    masking = data.MaskingSpec(
        mask_prob=config.data.mask_prob, masking=config.data.masking, max_span=config.data.max_span,
        max_predictions=config.data.max_predictions, vocab_size=config.model.vocab_size,
        special_ids=tuple(sorted((config.tokenizer.get("special_ids") or data.DEFAULT_SPECIAL_IDS).values())),
        mask_id=(config.tokenizer.get("special_ids") or data.DEFAULT_SPECIAL_IDS)["[MASK]"])
    source = data.PretrainInput(files, seq_len=config.data.seq_len,
                                local_batch_size=global_batch // jax.process_count(),
                                shuffle_buffer=config.data.shuffle_buffer, seed=config.data.seed, masking=masking,
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                num_epochs=config.data.num_epochs, cursor=cursor)
    writer = metrics_lib.MetricsWriter(
        workdir, is_primary=is_primary, tokens_per_step=global_batch * config.data.seq_len,
        flops_per_token=flops.training_flops_per_token(config.model, config.data.seq_len, config.data.mask_prob),
        num_devices=jax.device_count(), device_kind=jax.devices()[0].device_kind, total_steps=config.train.steps)
    if is_primary:
        writer.write_text("config", "```\n" + json_dump(config_lib.config_to_dict(config)) + "\n```")

    preemption = _PreemptionFlag()
    preemption.install()
    timer = metrics_lib.StepTimer()
    config_item = config_lib.config_to_dict(config)
    reason, last_record, consecutive_nonfinite = "completed", {}, 0
    pending: tuple[int, Any] | None = None
    step = start_step
    profiling = False

    saved_steps = set(checkpointer.all_steps())

    def save(step_done: int, force: bool) -> None:
        if step_done in saved_steps:
            return
        # While steps are being skipped the state does not change, and a periodic save would only
        # push an older checkpoint out of the keep-latest-N window.
        if consecutive_nonfinite > 0 and not force:
            return
        if force or checkpointer.should_save(step_done):
            saved_steps.add(step_done)
            checkpointer.save(step_done, model_state=state[0], optimizer_state=state[1],
                              cursor=_gather_cursor(source.cursor, config.data.seed) | {"step": step_done},
                              config=config_item, force=force)

    def check_finite(step_done: int, step_metrics) -> int:
        # Reading one flag of the previous step overlaps with the step just dispatched.
        if bool(jax.device_get(step_metrics["finite"])):
            return 0
        count = consecutive_nonfinite + 1
        log.warning("step %d: loss %s, gradient norm %s are not all finite; update skipped (%d in a row)",
                    step_done, float(jax.device_get(step_metrics["loss"])),
                    float(jax.device_get(step_metrics["grad_norm"])), count)
        if count >= config.train.max_consecutive_nonfinite:
            kept_steps = sorted(checkpointer.all_steps())
            raise NonFiniteError(
                f"{count} consecutive steps (up to step {step_done}) had a non-finite loss or gradient norm; "
                f"stopping. Lower optim.learning_rate or check the data. {checkpointer.directory} keeps the "
                f"checkpoints of steps {kept_steps}, and a rerun resumes from the newest of them, so remove the "
                "step folders after the last good one first")
        return count

    try:
        with jax.set_mesh(mesh), sharding.rules_context():
            while step < config.train.steps:
                if config.train.profile_start_step is not None and step == config.train.profile_start_step:
                    jax.profiler.start_trace(f"{workdir}/profile")
                    profiling = True
                try:
                    local_batch = source.next_batch(step)
                except StopIteration:
                    # NOTE: with several processes, data.num_epochs needs the same number of batches
                    # per epoch on every process. A process that stops early leaves the others
                    # waiting in collectives, so bound multi-host runs with train.steps instead.
                    reason = "data_exhausted"
                    log.info("stopping at step %d: all %s epochs consumed", step, config.data.num_epochs)
                    break
                batch = data.make_global_batch(local_batch, batch_sharding)
                state, step_metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
                step += 1

                if pending is not None:
                    consecutive_nonfinite = check_finite(*pending)
                pending = (step, step_metrics)

                if step == start_step + 1:
                    # The first step compiled: time from its end, not from the start.
                    jax.block_until_ready(step_metrics["loss"])
                    timer.start(step)
                if profiling and step >= config.train.profile_start_step + config.train.profile_num_steps:
                    jax.block_until_ready(step_metrics["loss"])
                    jax.profiler.stop_trace()
                    profiling = False

                if step % config.train.log_every == 0 or step == config.train.steps:
                    values = {key: float(value) for key, value in jax.device_get(step_metrics).items()}
                    last_record = writer.write(step, values, timer.lap(step))

                # NOTE: with several processes the SIGTERM flags are compared only at log points,
                # because the comparison is a blocking collective. A single process checks every step.
                if jax.process_count() == 1 or step % config.train.log_every == 0:
                    if _any_process(preemption.requested):
                        log.warning("SIGTERM received: saving a checkpoint at step %d and stopping", step)
                        save(step, force=True)
                        reason = "preempted"
                        break
                save(step, force=step == config.train.steps)

            if reason == "data_exhausted" and step > start_step:
                save(step, force=True)
            if pending is not None:
                consecutive_nonfinite = check_finite(*pending)
    finally:
        if profiling:
            jax.profiler.stop_trace()
        preemption.uninstall()
        checkpointer.close()
        writer.close()
    return TrainResult(step=step, reason=reason, last_metrics=last_record)


def json_dump(value: Any) -> str:
    """Format a JSON-safe value with indentation (for the config text in TensorBoard)."""
    import json

    return json.dumps(value, indent=2, default=str)


# ---- command line --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Build the `etbert pretrain` argument parser."""
    parser = argparse.ArgumentParser(
        prog="etbert pretrain",
        description="Pre-train ET-BERT (MBM + SBP) on shards from `etbert convert-pretrain`.")
    parser.add_argument("--config", default="tiny",
                        help="preset name (tiny, small, base, large, etbert_compat) or YAML file (default: tiny)")
    parser.add_argument("--data", required=True, help="directory with the train-*.tfrecord shards and manifest.json")
    parser.add_argument("--workdir", required=True,
                        help="output directory: checkpoints/, metrics.jsonl, tensorboard/, config.yaml")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                        help="continue from the newest checkpoint in --workdir (default: yes when one exists)")
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default: INFO)")
    distributed.add_flags(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. train.steps=200 data.global_batch_size=64")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `etbert pretrain`; return the exit code (0 done or preempted, 1 training failure, 2 bad input)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure(args.log_level)
    try:
        distributed.initialize(distributed.options_from_args(args))
    except ValueError as error:
        print(f"etbert pretrain: error: {error}", file=sys.stderr)
        return 2
    # The process index is known only now, so the log prefix is set after start-up.
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s p{jax.process_index()} %(levelname)s %(name)s: %(message)s"))

    try:
        config = resolve_config(args.config, args.overrides, args.data, args.workdir, args.resume)
        result = train(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"etbert pretrain: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        print(f"etbert pretrain: error: {error}", file=sys.stderr)
        return 1
    log.info("pre-training stopped at step %d (%s)", result.step, result.reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
