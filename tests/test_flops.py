"""Tests for etbert_jax.flops: the analytic FLOP model, the peak table and MFU."""

import pytest

from etbert_jax import flops
from etbert_jax.config import load_config

ETBERT_BASE = load_config("etbert_compat").model


def test_dense_params_of_bert_base():
    assert flops.dense_params(ETBERT_BASE) == 84_934_656


@pytest.mark.parametrize("seq_len, fraction, expected_gflop", [
    (128, 0.15, 0.566),
    (512, 0.15, 0.608),
    (128, 1.0, 0.80),
    (512, 1.0, 0.85),
])
def test_flops_per_token_table(seq_len, fraction, expected_gflop):
    value = flops.training_flops_per_token(ETBERT_BASE, seq_len, fraction) / 1e9
    decimals = 3 if fraction < 1 else 2
    assert round(value, decimals) == expected_gflop


def test_gathering_saves_head_flops():
    gathered = flops.training_flops_per_token(ETBERT_BASE, 512, 0.15)
    everywhere = flops.training_flops_per_token(ETBERT_BASE, 512, 1.0)
    assert everywhere / gathered == pytest.approx(1.39, abs=0.01)


def test_padded_vocab_counts_more():
    real = flops.training_flops_per_token(ETBERT_BASE, 128)
    padded = flops.training_flops_per_token(ETBERT_BASE, 128, vocab_size=ETBERT_BASE.padded_vocab_size)
    assert padded - real == pytest.approx(6 * 0.15 * 768 * 27)


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12),
])
def test_peak_flops_table(kind, peak):
    assert flops.peak_flops_per_device(kind) == peak


@pytest.mark.parametrize("kind", ["cpu", "TFRT_CPU_0", "NVIDIA GeForce RTX 4090", ""])
def test_unknown_device_has_no_peak(kind):
    assert flops.peak_flops_per_device(kind) is None


def test_mfu_arithmetic():
    # 0.608 GFLOP/token at 452k tokens/s on one TPU v4 is 100 % of its 275 TFLOP/s peak.
    per_token = flops.training_flops_per_token(ETBERT_BASE, 512)
    tokens_per_second = 275e12 / per_token
    assert flops.mfu(per_token, tokens_per_second, 1, "TPU v4") == pytest.approx(1.0)
    assert flops.mfu(per_token, tokens_per_second, 4, "TPU v4") == pytest.approx(0.25)
    assert flops.mfu(per_token, tokens_per_second, 1, "cpu") is None
