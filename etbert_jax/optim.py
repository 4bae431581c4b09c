"""Optimizer: AdamW with a decay mask, warm-up then linear or cosine decay, and gradient clipping.

Weight decay is applied for real (ET-BERT's code names its parameter groups with a key its AdamW
ignores, so it trained with no decay). Decay covers kernels and embedding tables; biases and
LayerNorm parameters are excluded, as in BERT. The mask works on parameter paths, not on array
ranks, because scanned layers add a leading "layers" axis that turns biases into 2-D arrays.

Non-finite steps are handled in the train step (train.py), which keeps the parameters and the
optimizer state of a step whose loss or gradient norm is not finite.
"""

import logging

import jax
import optax

from etbert_jax.config import OptimConfig

log = logging.getLogger(__name__)

# Last path entries of parameters excluded from weight decay: biases (`bias`, `decoder_bias`) and
# LayerNorm gains. Any parameter under a module whose name contains "norm" is excluded as well.
_NO_DECAY_NAMES = ("bias", "scale", "gamma", "beta")


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                names.append(str(getattr(entry, attribute)).lower())
                break
        else:
            names.append(str(entry).lower())
    return [name for name in names if name not in ("value", "raw_value")]


def is_decayed(path) -> bool:
    """Return whether the parameter at a pytree path gets weight decay (kernels and embeddings do)."""
    names = _path_names(path)
    if not names:
        return True
    last = names[-1]
    if last in _NO_DECAY_NAMES or last.endswith("_bias"):
        return False
    return not any("norm" in name for name in names)


def decay_mask(params):
    """Return a pytree of bools matching `params`: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed(path), params)


def warmup_steps(config: OptimConfig, total_steps: int) -> int:
    """Return the warm-up length in steps: `warmup_steps`, or `warmup_fraction` of the total."""
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return int(round(config.warmup_fraction * total_steps))


def make_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """Build the learning-rate schedule: linear warm-up from 0, then linear or cosine decay to end_lr."""
    warmup = warmup_steps(config, total_steps)
    peak = config.learning_rate
    end = peak * config.end_lr_fraction
    decay_steps = max(total_steps - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=config.end_lr_fraction)
    else:
        decay = optax.linear_schedule(peak, end, decay_steps)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Build the optax chain: optional global-norm clipping, then AdamW with the decay mask."""
    schedule = make_schedule(config, total_steps)
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
