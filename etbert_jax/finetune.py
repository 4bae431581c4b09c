"""Fine-tune a traffic classifier from a pre-training checkpoint (`etbert finetune`).

    etbert finetune --init runs/pretrain --data shards/finetune --workdir runs/ft [--level flow]
        [--step N] [--config PRESET_OR_YAML] [section.key=value ...]

`--init` is a pre-training workdir, its checkpoints directory, one step directory, or the output
of `etbert import-etbert`. The encoder and the pooler are restored from its newest step (or from
`--step N`) onto the current mesh, and its MBM and SBP heads are not read. A new output layer
on the pooled [CLS] vector classifies into the classes of the data. Without `--init` the model
starts from random weights (a baseline).

The model sizes, the vocabulary and the header policy come from the checkpoint's stored config,
the level's sequence length from the data. A mismatch between the two (vocabulary sha256 or size,
header policy, sequence length beyond the position table) stops the job before anything compiles,
with a message naming both values. Optimizer, batch and fine-tuning settings come from `--config`
(default: the `tiny` preset's values) and the overrides, e.g. `finetune.freeze_encoder=true`.

One run, in order:
1. configuration and checks; class weights when `finetune.class_weights=balanced`;
2. mesh, classifier born sharded, encoder and pooler restored from `--init`;
3. resume from WORKDIR/checkpoints when a checkpoint exists;
4. the loop: jitted train step (state donated) and metrics every `train.log_every` steps. The
   validation macro-F1 is computed every `finetune.eval_every` steps (0: once per epoch). The
   best model so far is kept in WORKDIR/best, and the run stops early after
   `finetune.early_stopping_patience` validations without improvement;
5. the best model is evaluated on the test split and the report is written to WORKDIR/eval/.

With `finetune.freeze_encoder=true` (a linear probe) only the output layer is differentiated and
updated; encoder and pooler parameters stay bit-for-bit equal to the restored ones.

`load_classifier(checkpoint)` and `predict_batches(...)` (from classifier.py, re-exported here)
serve evaluation and prediction.

NOTE: unlike `etbert pretrain`, fine-tuning does not catch SIGTERM; a preempted run resumes from
its last validation checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from etbert_jax import config as config_lib
from etbert_jax import logs
from etbert_jax import distributed
from etbert_jax import finetune_data
# load_classifier and predict_batches are re-exported for `etbert evaluate` and notebooks.
from etbert_jax.classifier import (BEST_SUBDIR, build_classifier, classifier_config_item,  # noqa: F401
                                   load_classifier, load_pretrained_encoder, make_predict_fn, predict_batches,
                                   predict_split, read_stored_config, save_classifier, trainable_filter)

log = logging.getLogger(__name__)

# Subdirectory of the workdir receiving the test report.
EVAL_SUBDIR = "eval"
# Model fields that must equal the checkpoint's, because they fix parameter shapes.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions",
                "type_vocab_size", "tie_mlm_decoder")


@dataclasses.dataclass
class FinetuneResult:
    """Outcome of `finetune`."""

    # Optimizer steps completed, counting those of a resumed run.
    step: int
    # "completed" or "early_stopped".
    reason: str
    # Step of the checkpoint kept as best, or None when no validation ran.
    best_step: int | None
    # Validation macro-F1 of that checkpoint.
    best_macro_f1: float | None
    # Test metrics as written to WORKDIR/eval/metrics.json, or {} when the test split is empty.
    test_metrics: dict


# ---- configuration -------------------------------------------------------------------------

def check_compatible(init_tokenizer: dict, data_tokenizer: dict, model: config_lib.ModelConfig, seq_len: int,
                     init: str, data: str) -> None:
    """Raise ValueError when the data's tokenizer or sequence length does not fit the checkpoint's model."""
    for key, what in (("vocab_sha256", "vocabulary sha256"), ("header_policy", "header policy"),
                      ("vocab_kind", "vocabulary kind")):
        stored, found = init_tokenizer.get(key), data_tokenizer.get(key)
        if stored is not None and found is not None and stored != found:
            raise ValueError(f"{what} mismatch: the checkpoint {init} was trained with {key}={stored!r}, but the "
                             f"data {data} has {key}={found!r}; convert the captures again with the checkpoint's "
                             "settings (vocab file and --header-policy)")
    data_vocab = data_tokenizer.get("vocab_size")
    if data_vocab is not None and int(data_vocab) != model.vocab_size:
        raise ValueError(f"vocabulary size mismatch: the checkpoint {init} has model.vocab_size={model.vocab_size}, "
                         f"but the data {data} was tokenized with vocab_size={data_vocab}; use the checkpoint's vocab")
    if seq_len > model.max_positions:
        raise ValueError(f"sequence length mismatch: the data {data} has examples of up to {seq_len} tokens, but the "
                         f"checkpoint {init} has model.max_positions={model.max_positions}; convert with a shorter "
                         "--flow-seq-len/--packet-seq-len or use a model with more positions")


def resolve_config(config_source: str, overrides: list[str], init: str | None, source: finetune_data.FinetuneSource,
                   workdir: str, init_step: int | None = None) -> config_lib.Config:
    """Combine --config, overrides, the checkpoint's model and tokenizer, and the data's facts; check them."""
    requested = config_lib.load_config(config_source, overrides)
    tokenizer = dict(source.tokenizer)
    model = requested.model
    if init:
        stored, _ = read_stored_config(init, init_step)
        # Shape fields come from the checkpoint; other model fields (dropout, dtype) may be overridden.
        overridden = {item.split("=", 1)[0].split(".", 1)[1] for item in overrides if item.startswith("model.")}
        bad = sorted(overridden & set(SHAPE_FIELDS))
        if bad:
            raise ValueError(f"model.{bad[0]} is fixed by the checkpoint {init} "
                             f"({getattr(stored.model, bad[0])}); drop the override")
        model = dataclasses.replace(stored.model, **{key: getattr(requested.model, key) for key in overridden})
        check_compatible(stored.tokenizer, source.tokenizer, model, source.seq_len, init, source.description)
        tokenizer = {**stored.tokenizer, **source.tokenizer}
    else:
        vocab_size = int(source.tokenizer.get("vocab_size", model.vocab_size))
        model = dataclasses.replace(model, vocab_size=vocab_size)
        check_compatible({}, source.tokenizer, model, source.seq_len, "(random init)", source.description)

    global_batch = requested.data.global_batch_size
    steps_per_epoch = source.num_examples["train"] // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"the train split of {source.description} has {source.num_examples['train']} {source.level}"
                         f"-level examples, fewer than one global batch ({global_batch}); lower "
                         "data.global_batch_size or convert more captures")
    finetune = dataclasses.replace(requested.finetune, init=init or "", level=source.level,
                                   num_labels=len(source.labels))
    if requested.finetune.num_labels not in (None, len(source.labels)):
        raise ValueError(f"finetune.num_labels={requested.finetune.num_labels} but the data has "
                         f"{len(source.labels)} classes {list(source.labels)}; drop the setting")
    data_config = dataclasses.replace(requested.data, shards=source.description, seq_len=source.seq_len,
                                      max_predictions=None)
    train_config = dataclasses.replace(requested.train, workdir=workdir,
                                       steps=steps_per_epoch * requested.finetune.epochs)
    return dataclasses.replace(requested, model=model, data=data_config, train=train_config, finetune=finetune,
                               tokenizer=tokenizer)


def balanced_class_weights(counts: np.ndarray) -> np.ndarray:
    """Return n / (classes * n_c) per class (scikit-learn's "balanced"); absent classes get weight 0."""
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


# ---- train step ----------------------------------------------------------------------------

def make_train_step(graphdef, state_shardings, batch_sharding, config: config_lib.Config,
                    class_weights: np.ndarray | None):
    """Return the jitted `step(state, batch, step_number) -> (state, metrics)`; the state is donated."""
    from flax import nnx

    from etbert_jax import optim, tasks

    base_key = jax.random.key(config.train.seed)
    weights = None if class_weights is None else jnp.asarray(class_weights, jnp.float32)
    schedule = optim.make_schedule(config.optim, config.train.steps)
    trainable = trainable_filter(config.finetune.freeze_encoder)

    def loss_fn(model, batch, key):
        logits = model(batch["input_ids"], batch["segment_ids"], deterministic=False, dropout_key=key)
        return tasks.classification_loss(logits, batch["labels"], batch["weights"], weights)

    def step_fn(state, batch, step_number):
        model, optimizer = nnx.merge(graphdef, state)
        key = jax.random.fold_in(base_key, step_number)
        # Only the trainable parameters are differentiated, so a frozen encoder costs no gradient.
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable), has_aux=True)
        (_, metrics), grads = grad_fn(model, batch, key)
        learning_rate = schedule(optimizer.step[...])
        # A step with a non-finite loss or gradient leaves every parameter as it was.
        grad_norm, finite = optim.apply_gradients(optimizer, model, grads, metrics["loss"])
        new_state = nnx.state((model, optimizer))
        return new_state, dict(metrics, grad_norm=grad_norm, learning_rate=learning_rate, finite=finite)

    return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, None),
                   out_shardings=(state_shardings, None), donate_argnums=0)


# ---- the run -------------------------------------------------------------------------------

def _finetune_data_item(source: finetune_data.FinetuneSource) -> dict:
    return {"level": source.level, "seq_len": source.seq_len, "data": source.description,
            "split_policy": source.split.get("policy"), "num_examples": dict(source.num_examples),
            "conversion": dict(source.conversion)}


def _validation_record(step: int, scores: dict | None, train_values: dict) -> dict:
    record = {"step": step, "train_loss": train_values.get("loss"), "train_accuracy": train_values.get("accuracy")}
    if scores is not None:
        record.update({"valid_examples": scores["num_examples"], "valid_accuracy": scores["accuracy"],
                       "valid_macro_f1": scores["macro_f1"]})
    return record


class _ValidationLog:
    """Process 0's validation.jsonl and TensorBoard scalars under tensorboard/valid."""

    def __init__(self, workdir: pathlib.Path, is_primary: bool):
        self._stream = None
        self._writer = None
        if is_primary:
            import tensorflow as tf

            self._stream = (workdir / "validation.jsonl").open("a")
            self._writer = tf.summary.create_file_writer(str(workdir / "tensorboard" / "valid"))

    def write(self, record: dict) -> None:
        if self._stream is None:
            return
        import tensorflow as tf

        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()
        with self._writer.as_default():
            for key, value in record.items():
                if key != "step" and value is not None:
                    tf.summary.scalar(key, value, step=record["step"])
        self._writer.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._writer.close()


def finetune(config: config_lib.Config, source: finetune_data.FinetuneSource,
             init_step: int | None = None) -> FinetuneResult:
    """Fine-tune as `config` describes (see `resolve_config`); write checkpoints and the test report."""
    from flax import nnx

    from etbert_jax import checkpoint, data, evaluate, flops, sharding
    from etbert_jax import metrics as metrics_lib
    from etbert_jax import train as train_lib

    # Phase 1: checks, class weights, the resolved config on disk.
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    settings = config.finetune
    workdir = pathlib.Path(config.train.workdir).absolute()
    is_primary = distributed.is_primary()
    global_batch = config.data.global_batch_size
    local_batch = global_batch // jax.process_count()
    total_steps = config.train.steps
    steps_per_epoch = total_steps // settings.epochs
    eval_every = settings.eval_every or steps_per_epoch
    labels = list(source.labels)

    class_weights = None
    if settings.class_weights == "balanced":
        counts = finetune_data.count_labels(source, "train")
        class_weights = balanced_class_weights(counts)
        log.info("balanced class weights: %s",
                 ", ".join(f"{name} {weight:.3g} ({count} examples)"
                           for name, weight, count in zip(labels, class_weights, counts)))
    config_item = classifier_config_item(config, labels, _finetune_data_item(source))
    if is_primary:
        config_lib.save_yaml(config, workdir / "config.yaml")
        (workdir / "labels.json").write_text(json.dumps({name: i for i, name in enumerate(labels)}, indent=2) + "\n")
    log.info("fine-tuning on %s: %s level, %d classes, %d train / %d valid / %d test examples, split policy %s; "
             "%d epochs x %d steps, validation every %d steps%s", source.description, source.level, len(labels),
             source.num_examples["train"], source.num_examples["valid"], source.num_examples["test"],
             source.split.get("policy"), settings.epochs, steps_per_epoch, eval_every,
             ", encoder frozen (linear probe)" if settings.freeze_encoder else "")

    # Phase 2: mesh, classifier and the pre-trained encoder.
    mesh = sharding.make_mesh(config.mesh)
    model, optimizer = build_classifier(config, len(labels), mesh, settings.freeze_encoder)
    if settings.init:
        load_pretrained_encoder(model, settings.init, mesh, init_step)
        log.info("encoder and pooler restored from %s", settings.init)
    else:
        log.warning("no --init given: the encoder starts from random weights")
    if is_primary:
        train_lib._log_startup(config, mesh, model, global_batch, mesh_shape[0] * mesh_shape[1])

    # Phase 3: resume.
    latest_checkpoints = checkpoint.Checkpointer(workdir / checkpoint.CHECKPOINT_SUBDIR, save_every=eval_every,
                                                 keep=2)
    best_checkpoints = checkpoint.Checkpointer(workdir / BEST_SUBDIR, save_every=1, keep=1)
    progress = {"step": 0, "best_step": None, "best_macro_f1": None, "evals_since_best": 0, "stopped": False}
    latest = latest_checkpoints.latest_step() if config.train.resume else None
    if latest is not None:
        stored = latest_checkpoints.read_config(latest)
        if stored.get("labels") != labels:
            raise ValueError(f"the checkpoint in {latest_checkpoints.directory} was trained on classes "
                             f"{stored.get('labels')}, not {labels}; use another --workdir")
        model_state, optimizer_state, progress, _ = latest_checkpoints.restore(
            latest, model_target=checkpoint.abstract_state(nnx.state(model)),
            optimizer_target=checkpoint.abstract_state(nnx.state(optimizer)))
        nnx.update(model, model_state)
        nnx.update(optimizer, optimizer_state)
        log.info("resuming at step %d (best validation macro-F1 %s at step %s)", progress["step"],
                 progress["best_macro_f1"], progress["best_step"])

    # Phase 4: the loop.
    model_graphdef = nnx.graphdef(model)
    graphdef, state = nnx.split((model, optimizer))
    del model, optimizer
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = make_train_step(graphdef, state_shardings, batch_sharding, config, class_weights)
    predict_fn = make_predict_fn(model_graphdef, state_shardings[0], batch_sharding)

    step = int(progress["step"])
    stream = finetune_data.train_batches(
        source, local_batch_size=local_batch, shuffle_buffer=config.data.shuffle_buffer, seed=config.data.seed,
        skip_batches=step, process_index=jax.process_index(), process_count=jax.process_count())
    writer = metrics_lib.MetricsWriter(
        workdir, is_primary=is_primary, tokens_per_step=global_batch * source.seq_len,
        flops_per_token=flops.training_flops_per_token(config.model, source.seq_len, 0.0),
        num_devices=jax.device_count(), device_kind=jax.devices()[0].device_kind, total_steps=total_steps)
    validation_log = _ValidationLog(workdir, is_primary)
    timer = metrics_lib.StepTimer()
    reason = "early_stopped" if progress["stopped"] else "completed"
    train_values: dict = {}
    consecutive_nonfinite = 0
    start_step = step

    def validate_and_save(step_done: int) -> None:
        nonlocal progress
        result = predict_split(predict_fn, state[0], source, "valid", local_batch, batch_sharding)
        scores = None
        if len(result["labels"]):
            scores = evaluate.compute_metrics(result["labels"], result["probabilities"].argmax(axis=1), labels)
        record = _validation_record(step_done, scores, train_values)
        validation_log.write(record)
        log.info("step %d: validation macro-F1 %s, accuracy %s on %s examples", step_done,
                 record.get("valid_macro_f1"), record.get("valid_accuracy"), record.get("valid_examples", 0))

        best = progress["best_macro_f1"]
        # Without validation examples every evaluation counts as the best, so the last model is kept.
        improved = scores is None or best is None or scores["macro_f1"] > best
        if improved:
            progress = dict(progress, best_step=step_done, evals_since_best=0,
                            best_macro_f1=None if scores is None else scores["macro_f1"])
            save_classifier(best_checkpoints, step_done, state[0], config_item)
        else:
            progress = dict(progress, evals_since_best=progress["evals_since_best"] + 1)
        patience = settings.early_stopping_patience
        if patience is not None and progress["evals_since_best"] >= patience:
            progress["stopped"] = True
            log.info("stopping early at step %d: no better validation macro-F1 than %.4f (step %d) in %d "
                     "validations", step_done, progress["best_macro_f1"], progress["best_step"], patience)
        progress["step"] = step_done
        latest_checkpoints.save(step_done, model_state=state[0], optimizer_state=state[1], cursor=progress,
                                config=config_item, force=True)

    try:
        with jax.set_mesh(mesh), sharding.rules_context():
            while step < total_steps and not progress["stopped"]:
                batch = data.make_global_batch(next(stream), batch_sharding)
                state, step_metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
                step += 1
                if step == start_step + 1:
                    jax.block_until_ready(step_metrics["loss"])
                    timer.start(step)

                if not bool(jax.device_get(step_metrics["finite"])):
                    consecutive_nonfinite += 1
                    log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step,
                                consecutive_nonfinite)
                    if consecutive_nonfinite >= config.train.max_consecutive_nonfinite:
                        raise train_lib.NonFiniteError(
                            f"{consecutive_nonfinite} consecutive steps (up to step {step}) had a non-finite loss "
                            "or gradient norm; lower optim.learning_rate or check the data")
                else:
                    consecutive_nonfinite = 0

                if step % config.train.log_every == 0 or step == total_steps:
                    train_values = {key: float(value) for key, value in jax.device_get(step_metrics).items()}
                    writer.write(step, train_values, timer.lap(step))
                if step % eval_every == 0 or step == total_steps:
                    train_values = {key: float(value) for key, value in jax.device_get(step_metrics).items()}
                    validate_and_save(step)
                    timer.pause()
            if progress["stopped"] and step < total_steps:
                reason = "early_stopped"

            # Phase 5: the best model on the test split.
            latest_checkpoints.wait()
            best_checkpoints.wait()
            model_state = state[0]
            best_step = best_checkpoints.latest_step()
            if best_step is not None:
                model_state = best_checkpoints.restore_model(
                    best_step, model_target=checkpoint.abstract_state(state[0]))
            test = predict_split(predict_fn, model_state, source, "test", local_batch, batch_sharding)
    finally:
        latest_checkpoints.close()
        best_checkpoints.close()
        writer.close()
        validation_log.close()

    test_metrics: dict = {}
    if not len(test["labels"]):
        log.warning("the test split of %s is empty: no report written", source.description)
    elif is_primary:
        context = evaluate.ReportContext(
            split_policy=source.split.get("policy") or evaluate.UNKNOWN_SPLIT_POLICY,
            header_policy=str(config.tokenizer.get("header_policy", "not recorded")), level=source.level,
            split_name="test", split_manifest=source.split, checkpoint=str(workdir / BEST_SUBDIR),
            step=best_step)
        test_metrics = evaluate.write_report(workdir / EVAL_SUBDIR, test["labels"],
                                             test["probabilities"].argmax(axis=1), test["probabilities"], labels,
                                             context, example_ids=test["ids"])
    return FinetuneResult(step=step, reason=reason, best_step=progress["best_step"],
                          best_macro_f1=progress["best_macro_f1"], test_metrics=test_metrics)


# ---- command line --------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Build the `etbert finetune` argument parser."""
    parser = argparse.ArgumentParser(
        prog="etbert finetune",
        description="Fine-tune a classifier from a pre-training or imported checkpoint on fine-tuning shards.")
    parser.add_argument("--init", default=None,
                        help="pre-training workdir, checkpoint directory or `etbert import-etbert` output "
                             "(default: random initialisation)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of --init (default: newest)")
    parser.add_argument("--data", required=True,
                        help="output of `etbert convert-finetune`, a `tfds build` data directory, or tfds:NAME")
    parser.add_argument("--workdir", required=True,
                        help="output directory: checkpoints/, best/, eval/, metrics.jsonl, validation.jsonl")
    parser.add_argument("--level", choices=("packet", "flow"), default=None,
                        help="example level (default: finetune.level from the config, else flow)")
    parser.add_argument("--config", default="tiny",
                        help="preset or YAML for optimizer, batch and fine-tuning settings (default: tiny); "
                             "model sizes come from --init")
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default: INFO)")
    distributed.add_flags(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, e.g. finetune.epochs=5 finetune.freeze_encoder=true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `etbert finetune`; return 0 on success, 1 on a training failure, 2 on bad input."""
    from etbert_jax.train import NonFiniteError

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure(args.log_level)
    try:
        distributed.initialize(distributed.options_from_args(args))
        level = args.level or config_lib.load_config(args.config, args.overrides).finetune.level or "flow"
        source = finetune_data.open_source(args.data, level)
        config = resolve_config(args.config, args.overrides, args.init, source, args.workdir, args.step)
        result = finetune(config, source, init_step=args.step)
    except (ValueError, FileNotFoundError) as error:
        print(f"etbert finetune: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        print(f"etbert finetune: error: {error}", file=sys.stderr)
        return 1
    summary = {"step": result.step, "reason": result.reason, "best_step": result.best_step,
               "best_valid_macro_f1": result.best_macro_f1,
               "test_macro_f1": result.test_metrics.get("macro_f1")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
