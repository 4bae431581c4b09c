"""Tests of run output: step timing, JSONL and TensorBoard records, MFU, batch arithmetic lines."""

import json
import math
import time

import pytest

from etbert_jax import flops, metrics

VALUES = {"loss": 1.5, "mbm_loss": 10.0, "sbp_loss": 0.5, "mbm_accuracy": 0.1, "sbp_accuracy": 0.6,
          "learning_rate": 1e-3, "grad_norm": 2.0, "finite": 1.0}


def _writer(tmp_path, is_primary=True, device_kind="cpu", num_devices=8):
    return metrics.MetricsWriter(tmp_path, is_primary=is_primary, tokens_per_step=2048, flops_per_token=1e9,
                                 num_devices=num_devices, device_kind=device_kind, total_steps=100)


def test_step_timer_skips_compile_interval():
    timer = metrics.StepTimer()
    assert timer.lap(3) is None
    timer.start(1)
    time.sleep(0.05)
    seconds = timer.lap(5)
    assert 0.05 / 4 <= seconds < 0.05
    assert timer.lap(5) is None


def test_jsonl_record_keys_and_values(tmp_path):
    writer = _writer(tmp_path)
    record = writer.write(10, VALUES, step_time_s=0.5)
    writer.write(20, VALUES | {"loss": math.nan}, step_time_s=None)
    writer.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert list(lines[0]) == list(metrics.JSONL_KEYS)
    assert lines[0]["step"] == 10
    assert lines[0]["tokens_per_s"] == pytest.approx(4096.0)
    assert lines[0]["mbm_loss"] == 10.0
    # CPU has no known peak, so no MFU is claimed.
    assert lines[0]["mfu"] is None
    assert record["mfu"] is None
    # NaN is not valid JSON: it is written as null.
    assert lines[1]["loss"] is None
    assert lines[1]["tokens_per_s"] is None


def test_mfu_for_known_device(tmp_path):
    writer = _writer(tmp_path, device_kind="TPU v4", num_devices=4)
    record = writer.write(10, VALUES, step_time_s=0.5)
    writer.close()
    expected = flops.mfu(1e9, 4096.0, 4, "TPU v4")
    assert expected is not None
    assert record["mfu"] == pytest.approx(expected)


def test_tensorboard_scalars_written(tmp_path):
    import tensorflow as tf

    writer = _writer(tmp_path)
    writer.write_text("config", "model: tiny")
    writer.write(10, VALUES, step_time_s=0.5)
    writer.close()

    tags = set()
    for path in (tmp_path / "tensorboard").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    assert {"loss", "mbm_loss", "sbp_accuracy", "learning_rate", "tokens_per_s", "config"} <= tags
    assert "mfu" not in tags


def test_non_primary_writes_no_files(tmp_path):
    writer = _writer(tmp_path / "other", is_primary=False)
    writer.write(10, VALUES, step_time_s=0.5)
    writer.close()
    assert not (tmp_path / "other").exists()


def test_batch_arithmetic_lines():
    lines = metrics.describe_batch_arithmetic(global_batch=256, process_count=4, batch_shards=32, num_devices=32,
                                              seq_len=512, grad_accum_steps=2, total_steps=1000)
    text = "\n".join(lines)
    assert "4 processes x 64 per process" in text
    assert "8 sequences per shard" in text
    assert "4 sequences per shard per micro-batch" in text
    assert "tokens per step 131,072" in text
    assert "256,000 sequences" in text
    assert "131,072,000 tokens" in text
