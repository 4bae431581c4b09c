"""Tests for etbert_jax.heads: pre-training outputs, vocabulary masking, tied decoder, classifier."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from etbert_jax import heads
from etbert_jax.config import ModelConfig

CONFIG = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                     max_positions=64)
BATCH, LENGTH, SLOTS = 3, 16, 4


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(5, CONFIG.vocab_size, size=(BATCH, LENGTH)).astype(np.int32)
    input_ids[:, 12:] = 0
    segment_ids = np.where(input_ids != 0, 1, 0).astype(np.int32)
    masked_positions = np.stack([rng.choice(np.arange(1, 12), SLOTS, replace=False) for _ in range(BATCH)])
    return jnp.asarray(input_ids), jnp.asarray(segment_ids), jnp.asarray(masked_positions.astype(np.int32))


@nnx.jit
def pretrain_outputs(model, input_ids, segment_ids, masked_positions):
    return model(input_ids, segment_ids, masked_positions, deterministic=True)


@pytest.fixture(scope="module")
def model():
    return heads.PretrainModel(CONFIG, rngs=nnx.Rngs(0))


def test_pretrain_output_shapes(model):
    mbm_logits, sbp_logits = pretrain_outputs(model, *make_batch())
    assert mbm_logits.shape == (BATCH, SLOTS, CONFIG.padded_vocab_size)
    assert sbp_logits.shape == (BATCH, 2)
    assert mbm_logits.dtype == jnp.float32
    assert sbp_logits.dtype == jnp.float32


def test_padded_vocab_logits_very_negative(model):
    mbm_logits, _ = pretrain_outputs(model, *make_batch())
    padded = mbm_logits[..., CONFIG.vocab_size:]
    real = mbm_logits[..., :CONFIG.vocab_size]
    assert padded.shape[-1] == CONFIG.padded_vocab_size - CONFIG.vocab_size
    assert float(jnp.max(padded)) <= heads.MASKED_LOGIT
    assert float(jnp.min(real)) > -1e4
    probabilities = jax.nn.softmax(mbm_logits, axis=-1)
    assert float(jnp.max(probabilities[..., CONFIG.vocab_size:])) == 0.0


def test_mbm_logits_follow_masked_positions(model):
    input_ids, segment_ids, masked_positions = make_batch()
    mbm_logits, _ = pretrain_outputs(model, input_ids, segment_ids, masked_positions)

    # Projecting every position and then gathering must give the same logits.
    every_position = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (BATCH, LENGTH))
    all_logits, _ = pretrain_outputs(model, input_ids, segment_ids, every_position)
    gathered = jnp.take_along_axis(all_logits, masked_positions[:, :, None], axis=1)
    np.testing.assert_allclose(mbm_logits, gathered, atol=1e-4, rtol=1e-4)


def test_sbp_logits_ignore_masked_positions(model):
    input_ids, segment_ids, masked_positions = make_batch()
    _, first = pretrain_outputs(model, input_ids, segment_ids, masked_positions)
    _, second = pretrain_outputs(model, input_ids, segment_ids, jnp.zeros_like(masked_positions))
    np.testing.assert_allclose(first, second, atol=1e-6)


def count_params(module):
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_untied_head_has_own_decoder(model):
    assert model.mbm.decoder.kernel.shape == (CONFIG.hidden_size, CONFIG.padded_vocab_size)
    assert model.mbm.decoder.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")


def test_tied_head_reuses_word_embedding(model):
    tied = heads.PretrainModel(dataclasses.replace(CONFIG, tie_mlm_decoder=True), rngs=nnx.Rngs(0))
    assert tied.mbm.decoder is None
    assert count_params(model) - count_params(tied) == CONFIG.hidden_size * CONFIG.padded_vocab_size

    input_ids, segment_ids, masked_positions = make_batch()
    before, _ = pretrain_outputs(tied, input_ids, segment_ids, masked_positions)
    # Changing an output-only row of the word table must change the tied decoder's logits for that id.
    # (A constant shift would cancel: the LayerNorm output of the head sums to zero.)
    shift = jnp.asarray(np.random.default_rng(1).normal(size=CONFIG.hidden_size).astype(np.float32))
    tied.encoder.embeddings.word.embedding[...] = tied.encoder.embeddings.word.embedding[...].at[4].add(shift)
    after, _ = pretrain_outputs(tied, input_ids, segment_ids, masked_positions)
    assert float(jnp.max(jnp.abs(after[..., 4] - before[..., 4]))) > 1e-3
    assert after.shape == (BATCH, SLOTS, CONFIG.padded_vocab_size)
    assert float(jnp.max(after[..., CONFIG.vocab_size:])) <= heads.MASKED_LOGIT


def test_classifier_outputs():
    classifier = heads.Classifier(CONFIG, num_labels=5, rngs=nnx.Rngs(0))
    input_ids, segment_ids, _ = make_batch()

    logits = nnx.jit(lambda module, i, s: module(i, s, deterministic=True))(classifier, input_ids, segment_ids)
    features = nnx.jit(lambda module, i, s: module.encode(i, s))(classifier, input_ids, segment_ids)
    assert logits.shape == (BATCH, 5)
    assert logits.dtype == jnp.float32
    assert features.shape == (BATCH, CONFIG.hidden_size)
    assert float(jnp.max(jnp.abs(features))) <= 1.0


def test_classifier_dropout_uses_key():
    classifier = heads.Classifier(CONFIG, num_labels=3, rngs=nnx.Rngs(0))
    input_ids, segment_ids, _ = make_batch()
    call = nnx.jit(lambda module, i, s, k: module(i, s, deterministic=False, dropout_key=k))

    first = call(classifier, input_ids, segment_ids, jax.random.key(1))
    again = call(classifier, input_ids, segment_ids, jax.random.key(1))
    other = call(classifier, input_ids, segment_ids, jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert float(jnp.max(jnp.abs(first - other))) > 1e-4


def test_classifier_rejects_one_label():
    with pytest.raises(ValueError, match="num_labels >= 2, got 1"):
        heads.Classifier(CONFIG, num_labels=1, rngs=nnx.Rngs(0))
