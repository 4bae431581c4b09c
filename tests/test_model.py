"""Tests for etbert_jax.model: encoder shapes, padding mask, LayerNorm variants, layer modes, dropout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from etbert_jax import model as model_lib
from etbert_jax.config import ModelConfig

CONFIG = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_positions=64)


def make_batch(batch=3, length=16, real=10, seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(5, CONFIG.vocab_size, size=(batch, length)).astype(np.int32)
    input_ids[:, 0] = 2
    input_ids[:, real:] = 0
    segment_ids = np.where(input_ids != 0, 1, 0).astype(np.int32)
    segment_ids[:, real // 2:real] = 2
    return jnp.asarray(input_ids), jnp.asarray(segment_ids)


@nnx.jit(static_argnums=3)
def run(encoder, input_ids, segment_ids, deterministic=True, dropout_key=None):
    """Jitted encoder call: eager NNX calls re-trace the layer scan on every call."""
    return encoder(input_ids, segment_ids, deterministic=deterministic, dropout_key=dropout_key)


@pytest.fixture(scope="module")
def encoder():
    return model_lib.BertEncoder(CONFIG, rngs=nnx.Rngs(0))


def test_encoder_output_shape(encoder):
    input_ids, segment_ids = make_batch()
    hidden = run(encoder, input_ids, segment_ids)
    assert hidden.shape == (3, 16, 32)
    assert hidden.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(hidden)))


def test_parameters_stacked_on_layer_axis(encoder):
    assert encoder.layers.attention.qkv_kernel.shape == (2, 32, 3, 4, 8)
    assert encoder.layers.mlp.wi.kernel.shape == (2, 32, 64)
    assert encoder.embeddings.word.embedding.shape == (CONFIG.padded_vocab_size, 32)
    assert encoder.layers.attention.qkv_kernel.get_metadata()["out_sharding"] == (
        "layers", "embed", "qkv", "heads", "head_dim")


def test_extra_padding_keeps_real_outputs(encoder):
    input_ids, segment_ids = make_batch(length=16, real=10)
    longer_ids = jnp.pad(input_ids, ((0, 0), (0, 16)))
    longer_segments = jnp.pad(segment_ids, ((0, 0), (0, 16)))

    short = run(encoder, input_ids, segment_ids)
    long = run(encoder, longer_ids, longer_segments)
    np.testing.assert_allclose(short[:, :10], long[:, :10], atol=1e-5, rtol=1e-5)


def test_padding_segment_ids_ignored(encoder):
    input_ids, segment_ids = make_batch(real=10)
    changed_segments = segment_ids.at[:, 10:].set(2)

    reference = run(encoder, input_ids, segment_ids)
    changed = run(encoder, input_ids, changed_segments)
    np.testing.assert_allclose(reference[:, :10], changed[:, :10], atol=1e-5, rtol=1e-5)


def test_real_token_change_changes_output(encoder):
    input_ids, segment_ids = make_batch(real=10)
    changed_ids = input_ids.at[:, 5].set(7)
    reference = run(encoder, input_ids, segment_ids)
    changed = run(encoder, changed_ids, segment_ids)
    assert float(jnp.max(jnp.abs(reference[:, 0] - changed[:, 0]))) > 1e-4


def numpy_layer_norm(x, scale, bias, eps, kind):
    mean = x.mean(axis=-1, keepdims=True)
    if kind == "uer":
        std = x.std(axis=-1, ddof=1, keepdims=True)
        return scale * (x - mean) / (std + eps) + bias
    variance = x.var(axis=-1, keepdims=True)
    return scale * (x - mean) / np.sqrt(variance + eps) + bias


@pytest.mark.parametrize("kind", ["uer", "standard"])
def test_layer_norm_matches_numpy(kind):
    config = dataclasses.replace(CONFIG, layer_norm=kind, layer_norm_eps=1e-6)
    norm = model_lib.LayerNorm(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    scale = rng.normal(size=32).astype(np.float32)
    bias = rng.normal(size=32).astype(np.float32)
    norm.scale[...] = jnp.asarray(scale)
    norm.bias[...] = jnp.asarray(bias)
    x = (rng.normal(size=(4, 5, 32)) * 3 + 1).astype(np.float32)

    expected = numpy_layer_norm(x.astype(np.float64), scale, bias, 1e-6, kind)
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, atol=1e-5, rtol=1e-5)


def test_uer_and_standard_norms_differ():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32)).astype(np.float32))
    uer = model_lib.LayerNorm(dataclasses.replace(CONFIG, layer_norm="uer"), rngs=nnx.Rngs(0))(x)
    standard = model_lib.LayerNorm(CONFIG, rngs=nnx.Rngs(0))(x)
    # The unbiased std of 32 values is sqrt(32/31) times the biased one.
    np.testing.assert_allclose(standard / uer, np.sqrt(32 / 31), rtol=1e-4)


def test_unrolled_layers_match_scan(encoder):
    assert not CONFIG.scan_layers, "the default runs the layers unrolled"
    scanned = model_lib.BertEncoder(dataclasses.replace(CONFIG, scan_layers=True), rngs=nnx.Rngs(0))
    nnx.update(scanned, nnx.state(encoder, nnx.Param))
    input_ids, segment_ids = make_batch()
    np.testing.assert_allclose(run(scanned, input_ids, segment_ids),
                               run(encoder, input_ids, segment_ids), atol=1e-5, rtol=1e-5)


def test_gelu_matches_jax_nn_gelu():
    x = jnp.asarray(np.linspace(-12, 12, 4001, dtype=np.float32))
    np.testing.assert_allclose(model_lib.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6, rtol=0)
    np.testing.assert_allclose(jax.vmap(jax.grad(model_lib.gelu))(x),
                               jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=2e-6, rtol=0)


def test_dropout_mask_is_jax_random_bernoulli():
    x = jnp.ones((4, 16, 32), jnp.float32)
    key = jax.random.key(11)
    expected = jnp.where(jax.random.bernoulli(key, 0.9, x.shape), x / 0.9, 0.0)
    np.testing.assert_array_equal(np.asarray(model_lib.dropout(x, 0.1, key)), np.asarray(expected))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_keeps_gradients(scan_layers):
    base = dataclasses.replace(CONFIG, scan_layers=scan_layers)
    input_ids, segment_ids = make_batch()

    def gradients(config):
        encoder = model_lib.BertEncoder(config, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)

        def loss(params):
            module = nnx.merge(graphdef, params, rest)
            return jnp.mean(module(input_ids, segment_ids, deterministic=True) ** 2)

        return jax.jit(jax.grad(loss))(params)

    plain = gradients(base)
    remat = gradients(dataclasses.replace(base, remat=True))
    for left, right in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(left, right, atol=1e-6, rtol=1e-5)


def test_fused_and_manual_attention_agree():
    rng = np.random.default_rng(3)
    query, keys, values = (jnp.asarray(rng.normal(size=(2, 6, 4, 8)).astype(np.float32)) for _ in range(3))
    key_mask = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2])

    fused = jax.nn.dot_product_attention(query, keys, values, mask=key_mask[:, None, None, :])
    manual = model_lib._attention_with_dropout(query, keys, values, key_mask, 0.0, jax.random.key(0))
    np.testing.assert_allclose(fused, manual, atol=1e-5, rtol=1e-5)


def test_masked_attention_matches_fused_with_gradients():
    rng = np.random.default_rng(4)
    query, keys, values, d_context = (jnp.asarray(rng.normal(size=(3, 6, 4, 8)).astype(np.float32))
                                      for _ in range(4))
    # Full row, padded tail, and a sequence whose keys are all padding.
    key_mask = jnp.asarray([[True] * 6, [True] * 4 + [False] * 2, [False] * 6])

    def fused(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :])

    def masked(q, k, v):
        return model_lib.masked_softmax_attention(q, k, v, key_mask)

    fused_out, fused_vjp = jax.vjp(fused, query, keys, values)
    masked_out, masked_vjp = jax.jit(lambda q, k, v: jax.vjp(masked, q, k, v))(query, keys, values)
    np.testing.assert_allclose(masked_out, fused_out, atol=1e-5, rtol=1e-5)
    for name, left, right in zip(("query", "keys", "values"), masked_vjp(d_context), fused_vjp(d_context)):
        np.testing.assert_allclose(left, right, atol=1e-5, rtol=1e-5, err_msg=f"gradient of {name}")


def test_dropout_key_controls_randomness(encoder):
    input_ids, segment_ids = make_batch()
    key = jax.random.key(5)
    first = run(encoder, input_ids, segment_ids, False, key)
    again = run(encoder, input_ids, segment_ids, False, key)
    other = run(encoder, input_ids, segment_ids, False, jax.random.key(6))
    clean = run(encoder, input_ids, segment_ids)

    np.testing.assert_array_equal(first, again)
    assert float(jnp.max(jnp.abs(first - other))) > 1e-3
    assert float(jnp.max(jnp.abs(first - clean))) > 1e-3


def test_stored_dropout_stream_advances():
    encoder = model_lib.BertEncoder(CONFIG, rngs=nnx.Rngs(0, dropout=1))
    input_ids, segment_ids = make_batch()
    first = run(encoder, input_ids, segment_ids, False)
    second = run(encoder, input_ids, segment_ids, False)
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3


def test_bfloat16_compute_keeps_float32_params():
    config = dataclasses.replace(CONFIG, compute_dtype="bfloat16")
    encoder = model_lib.BertEncoder(config, rngs=nnx.Rngs(0))
    reference = model_lib.BertEncoder(CONFIG, rngs=nnx.Rngs(0))
    input_ids, segment_ids = make_batch()

    hidden = run(encoder, input_ids, segment_ids)
    assert hidden.dtype == jnp.bfloat16
    for leaf in jax.tree.leaves(nnx.state(encoder, nnx.Param)):
        assert leaf.dtype == jnp.float32
    expected = run(reference, input_ids, segment_ids)
    np.testing.assert_allclose(hidden[:, :10].astype(jnp.float32), expected[:, :10], atol=0.1)
