"""Build etbert-jax's real pre-training step on a synthetic batch and time it (shared by the step benchmarks).

The step is `train.make_train_step` over `heads.PretrainModel` and `optim.make_optimizer`, created
sharded on a ('data', 'fsdp', 'tensor') mesh exactly as `train.train` does, so the benchmarks time the
code that pre-training runs. Only the input differs: one random batch, built once, with every token
real (no padding), `max_predictions` masked slots per sequence and random SBP labels.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from etbert_jax import config as config_lib
from etbert_jax import data, heads, optim, sharding, train

log = logging.getLogger(__name__)

# First id of ordinary tokens; ids 0-4 are [PAD] [SEP] [CLS] [UNK] [MASK] in both vocabularies.
FIRST_ORDINARY_ID = 5


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """Wall-clock timing of a jitted train step, compilation excluded."""

    # Seconds of the first call, which includes tracing and compilation.
    first_step_s: float
    # Seconds of each timed step after the warm-up steps.
    step_s: tuple[float, ...]
    # Tokens per step (global batch x sequence length; all real).
    tokens_per_step: int
    # Loss of the last timed step (a finite value shows the step computed something real).
    last_loss: float

    @property
    def median_step_s(self) -> float:
        """Median seconds per timed step."""
        return float(np.median(self.step_s))

    @property
    def tokens_per_s(self) -> float:
        """Tokens per second at the median step time."""
        return self.tokens_per_step / self.median_step_s


def synthetic_batch(config: config_lib.Config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Return a random pre-training batch in the layout `data.PretrainInput.next_batch` produces."""
    rng = np.random.default_rng(seed)
    seq_len, slots = config.data.seq_len, config.data.max_predictions
    if slots > seq_len:
        raise ValueError(f"data.max_predictions={slots} exceeds data.seq_len={seq_len}; lower max_predictions")
    input_ids = rng.integers(FIRST_ORDINARY_ID, config.model.vocab_size, size=(batch_size, seq_len), dtype=np.int32)
    half = seq_len // 2
    segment_ids = np.concatenate([np.ones((batch_size, half), np.int32),
                                  np.full((batch_size, seq_len - half), 2, np.int32)], axis=1)
    # Distinct positions per row, never position 0 ([CLS]).
    masked_positions = np.stack([np.sort(rng.choice(np.arange(1, seq_len), size=slots, replace=False))
                                 for _ in range(batch_size)]).astype(np.int32)
    return {
        "input_ids": input_ids,
        "segment_ids": segment_ids,
        "masked_positions": masked_positions,
        "mbm_targets": np.take_along_axis(input_ids, masked_positions, axis=1),
        "mbm_weights": np.ones((batch_size, slots), np.float32),
        "sbp_labels": rng.integers(0, 2, size=(batch_size,), dtype=np.int32),
    }


def time_train_step(config: config_lib.Config, batch: dict[str, np.ndarray], warmup_steps: int,
                    timed_steps: int) -> StepTiming:
    """Create model, optimizer and jitted step as `train.train` does, then time `timed_steps` steps.

    The first call compiles; it and `warmup_steps - 1` further steps are not timed. Each timed step
    blocks until its loss is ready, so asynchronous dispatch cannot hide work.
    """
    from flax import nnx

    if warmup_steps < 1 or timed_steps < 1:
        raise ValueError(f"warmup_steps and timed_steps must be >= 1, got {warmup_steps} and {timed_steps}")
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(config.mesh)
    total_steps = warmup_steps + timed_steps
    schedule = optim.make_schedule(config.optim, total_steps)
    tx = optim.make_optimizer(config.optim, total_steps)

    def build():
        model = heads.PretrainModel(config.model, rngs=nnx.Rngs(config.train.seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = sharding.create_sharded_model(build, mesh)
    graphdef, state = nnx.split((model, optimizer))
    del model, optimizer
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = train.make_train_step(graphdef, state_shardings, batch_sharding, config, schedule)
    tokens_per_step = int(batch["input_ids"].size)

    with jax.set_mesh(mesh), sharding.rules_context():
        global_batch = data.make_global_batch(batch, batch_sharding)
        times = []
        loss = float("nan")
        for step in range(total_steps):
            start = time.perf_counter()
            state, metrics = step_fn(state, global_batch, jnp.asarray(step, jnp.int32))
            loss = float(jax.block_until_ready(metrics["loss"]))
            times.append(time.perf_counter() - start)
            log.info("step %d: %.3f s, loss %.4f", step, times[-1], loss)

    return StepTiming(first_step_s=times[0], step_s=tuple(times[warmup_steps:]), tokens_per_step=tokens_per_step,
                      last_loss=loss)


def model_overrides(layers: int | None, hidden: int | None, heads_: int | None, ffn: int | None,
                    vocab: int | None) -> list[str]:
    """Return `model.*` overrides for the size flags that are set (for tiny smoke runs)."""
    pairs = (("num_layers", layers), ("hidden_size", hidden), ("num_heads", heads_),
             ("intermediate_size", ffn), ("vocab_size", vocab))
    return [f"model.{name}={value}" for name, value in pairs if value is not None]
