"""Run output: TensorBoard scalars, a JSONL log, console progress lines and throughput/MFU.

Only process 0 writes files; the other processes log to the console only. Each logged step
produces one JSON object in `WORKDIR/metrics.jsonl` with the keys in `JSONL_KEYS`, the same
values as TensorBoard scalars in `WORKDIR/tensorboard/`, and one console line.

Throughput counts padded tokens (global batch x seq_len), because that is what the devices
compute. MFU is model FLOPs per second divided by the peak of all devices, from flops.py. For a
device kind without a known peak no MFU is logged, and the JSONL value is null.
"""

import json
import logging
import math
import os
import pathlib
import time

from etbert_jax import flops

log = logging.getLogger(__name__)

# Keys of every JSONL record, in order.
JSONL_KEYS = ("step", "loss", "mbm_loss", "sbp_loss", "mbm_accuracy", "sbp_accuracy", "learning_rate",
              "grad_norm", "tokens_per_s", "step_time_s", "mfu")


class StepTimer:
    """Average wall time per step between log points, leaving out the steps that compiled.

    Call `start(step)` once the compiled step has finished (its result fetched), then
    `lap(step)` at each log point after blocking on that step's metrics.
    """

    def __init__(self):
        self._last_time: float | None = None
        self._last_step: int | None = None

    def start(self, step: int) -> None:
        """Begin timing after `step`, excluding everything before (compilation, restore)."""
        self._last_time = time.perf_counter()
        self._last_step = step

    def pause(self) -> None:
        """Drop the current interval (e.g. around a blocking checkpoint wait); `start` resumes."""
        self._last_time = None

    def lap(self, step: int) -> float | None:
        """Return seconds per step since the previous lap or start, or None when not timing."""
        now = time.perf_counter()
        if self._last_time is None or step <= self._last_step:
            self._last_time, self._last_step = now, step
            return None
        seconds = (now - self._last_time) / (step - self._last_step)
        self._last_time, self._last_step = now, step
        return seconds


class MetricsWriter:
    """Writes per-step metrics to TensorBoard and JSONL on process 0, and a console line everywhere."""

    def __init__(self, workdir: str | os.PathLike, *, is_primary: bool, tokens_per_step: int,
                 flops_per_token: float, num_devices: int, device_kind: str, total_steps: int):
        self.workdir = pathlib.Path(workdir)
        self.is_primary = is_primary
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.device_kind = device_kind
        self.total_steps = total_steps
        self._jsonl = None
        self._writer = None
        if is_primary:
            import tensorflow as tf

            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = (self.workdir / "metrics.jsonl").open("a")
            self._writer = tf.summary.create_file_writer(str(self.workdir / "tensorboard"))

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Return model FLOPs utilization for a token rate, or None without a known peak."""
        if tokens_per_s is None:
            return None
        return flops.mfu(self.flops_per_token, tokens_per_s, self.num_devices, self.device_kind)

    def write_text(self, name: str, text: str) -> None:
        """Store a text entry in TensorBoard (process 0), e.g. the resolved config."""
        if self._writer is None:
            return
        import tensorflow as tf

        with self._writer.as_default():
            tf.summary.text(name, text, step=0)
        self._writer.flush()

    def write(self, step: int, values: dict[str, float], step_time_s: float | None) -> dict:
        """Record one logged step; return the JSONL record."""
        tokens_per_s = self.tokens_per_step / step_time_s if step_time_s else None
        record = {"step": int(step)}
        for key in JSONL_KEYS[1:8]:
            value = values.get(key)
            record[key] = None if value is None else float(value)
        record["tokens_per_s"] = tokens_per_s
        record["step_time_s"] = step_time_s
        record["mfu"] = self.mfu(tokens_per_s)

        log.info(_progress_line(record, self.total_steps))
        if not self.is_primary:
            return record

        # JSON has no NaN or infinity, so non-finite values are written as null.
        clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                 for key, value in record.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()

        import tensorflow as tf

        with self._writer.as_default():
            for key, value in clean.items():
                if key != "step" and value is not None:
                    tf.summary.scalar(key, value, step=int(step))
        self._writer.flush()
        return record

    def close(self) -> None:
        """Flush and close the files."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _progress_line(record: dict, total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("mbm_loss", "mbm", ".4f"), ("sbp_loss", "sbp", ".4f"),
                            ("mbm_accuracy", "mbm_acc", ".3f"), ("sbp_accuracy", "sbp_acc", ".3f"),
                            ("learning_rate", "lr", ".3g"), ("grad_norm", "gnorm", ".3g"),
                            ("tokens_per_s", "tok/s", ",.0f"), ("step_time_s", "s/step", ".3f")):
        value = record.get(key)
        if value is not None:
            parts.append(f"{label} {value:{fmt}}")
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    return " | ".join(parts)


def describe_batch_arithmetic(*, global_batch: int, process_count: int, batch_shards: int, num_devices: int,
                              seq_len: int, grad_accum_steps: int, total_steps: int) -> list[str]:
    """Return log lines spelling out global batch -> per host -> per device, tokens per step and in total."""
    per_host = global_batch // process_count
    per_device = global_batch / batch_shards
    tokens_per_step = global_batch * seq_len
    lines = [
        f"global batch {global_batch} sequences = {process_count} processes x {per_host} per process",
        f"batch split over {batch_shards} data-parallel shards ({num_devices} devices): "
        f"{per_device:g} sequences per shard",
        f"{grad_accum_steps} micro-batches per step: {per_device / grad_accum_steps:g} sequences per shard "
        "per micro-batch",
        f"tokens per step {tokens_per_step:,} (global batch x seq_len {seq_len}, padding included)",
        f"total {total_steps:,} steps = {total_steps * global_batch:,} sequences = "
        f"{total_steps * tokens_per_step:,} tokens",
    ]
    return lines
