"""Analytic training FLOPs per token, peak FLOP/s by device kind, and model FLOPs utilisation.

Training FLOPs per token of the encoder with an MBM decoder on a fraction p of the positions:

    6 * N_dense + 12 * L * s * d + 6 * p * d * (V + d)

N_dense = L * (4 d^2 + 2 d f) counts the weight matmuls of the layers (forward 2 FLOPs per
multiply-add, backward twice that, hence 6). 12 * L * s * d counts the two attention matmuls
(QK^T and PV, 2 * s * d FLOPs each per token in the forward pass) over forward and backward.
A bidirectional encoder gets no causal halving. The last term is the MBM transform (d x d) and
decoder (d x V) on the gathered positions. Embedding lookups, LayerNorms, softmax, the pooler and
the SBP head are not counted (by our estimate under 0.1 % for BERT-base). Rematerialisation is not counted either: MFU counts
model FLOPs, not hardware FLOPs.
"""

from __future__ import annotations

from etbert_jax.config import ModelConfig

# Peak dense bfloat16 FLOP/s per device, from vendor data sheets (A100: 312 TFLOP/s;
# H100/H200 SXM: 989 TFLOP/s and H100 PCIe: 756 TFLOP/s without sparsity; TPU v4 275, v5e 197, v5p 459, v6e 918).
# Matched against `jax.Device.device_kind` by substring, most specific first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("tpu v4", 275e12),
    ("h200", 989e12),
    # NOTE: the PCIe H100 peaks at 756 TFLOP/s; other H100 variants (NVL) fall through to the SXM figure.
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("a100", 312e12),
)


def dense_params(config: ModelConfig) -> int:
    """Weights of the layer matmuls, L * (4 d^2 + 2 d f), excluding biases, norms and embeddings."""
    d, f = config.hidden_size, config.intermediate_size
    return config.num_layers * (4 * d * d + 2 * d * f)


def training_flops_per_token(config: ModelConfig, seq_len: int, mbm_fraction: float = 0.15,
                             vocab_size: int | None = None) -> float:
    """Training FLOPs per input token (forward + backward) at sequence length `seq_len`.

    `mbm_fraction` is p, the fraction of positions fed to the MBM decoder: 0.15 when masked
    positions are gathered, 1.0 when logits are computed everywhere. `vocab_size` defaults to the
    real vocabulary size; pass `config.padded_vocab_size` to count the padded rows too.
    """
    d, layers = config.hidden_size, config.num_layers
    vocab = config.vocab_size if vocab_size is None else vocab_size
    dense = 6 * dense_params(config)
    attention = 12 * layers * seq_len * d
    head = 6 * mbm_fraction * d * (vocab + d)
    return float(dense + attention + head)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None for a kind not in the table (no guess)."""
    kind = device_kind.lower()
    for marker, peak in PEAK_BF16_FLOPS:
        if marker in kind:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_second: float, num_devices: int, device_kind: str) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s / (peak per device * devices); None for unknown kinds."""
    peak = peak_flops_per_device(device_kind)
    if peak is None or num_devices <= 0:
        return None
    return flops_per_token * tokens_per_second / (peak * num_devices)
