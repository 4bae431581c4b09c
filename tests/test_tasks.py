"""Tests for etbert_jax.tasks: pre-training and classification losses against numpy references."""

import jax.numpy as jnp
import numpy as np
import pytest

from etbert_jax import tasks


def numpy_cross_entropy(logits, labels):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def make_pretrain_inputs(seed=0):
    rng = np.random.default_rng(seed)
    mbm_logits = rng.normal(size=(4, 5, 11)).astype(np.float32)
    mbm_targets = rng.integers(0, 11, size=(4, 5)).astype(np.int32)
    mbm_weights = np.ones((4, 5), np.float32)
    mbm_weights[:, 3:] = 0.0
    mbm_weights[2] = 0.0
    sbp_logits = rng.normal(size=(4, 2)).astype(np.float32)
    sbp_labels = rng.integers(0, 2, size=4).astype(np.int32)
    return mbm_logits, mbm_targets, mbm_weights, sbp_logits, sbp_labels


def test_pretrain_loss_matches_numpy():
    mbm_logits, mbm_targets, mbm_weights, sbp_logits, sbp_labels = make_pretrain_inputs()
    loss, metrics = tasks.pretrain_loss(mbm_logits, mbm_targets, mbm_weights, sbp_logits, sbp_labels,
                                        mbm_weight=0.1, sbp_weight=1.0)

    mbm_losses = numpy_cross_entropy(mbm_logits, mbm_targets)
    expected_mbm = (mbm_losses * mbm_weights).sum() / mbm_weights.sum()
    expected_sbp = numpy_cross_entropy(sbp_logits, sbp_labels).mean()
    correct = (mbm_logits.argmax(-1) == mbm_targets).astype(np.float32)

    np.testing.assert_allclose(metrics["mbm_loss"], expected_mbm, rtol=1e-5)
    np.testing.assert_allclose(metrics["sbp_loss"], expected_sbp, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.1 * expected_mbm + expected_sbp, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], loss)
    np.testing.assert_allclose(metrics["mbm_accuracy"], (correct * mbm_weights).sum() / mbm_weights.sum())
    np.testing.assert_allclose(metrics["sbp_accuracy"], (sbp_logits.argmax(-1) == sbp_labels).mean())
    assert float(metrics["mbm_count"]) == mbm_weights.sum()


def test_zero_weight_slots_do_not_count():
    mbm_logits, mbm_targets, mbm_weights, sbp_logits, sbp_labels = make_pretrain_inputs()
    _, reference = tasks.pretrain_loss(mbm_logits, mbm_targets, mbm_weights, sbp_logits, sbp_labels,
                                       mbm_weight=0.1, sbp_weight=1.0)

    changed_logits = mbm_logits.copy()
    changed_logits[mbm_weights == 0] = 50.0
    changed_targets = np.where(mbm_weights == 0, 7, mbm_targets)
    _, changed = tasks.pretrain_loss(changed_logits, changed_targets, mbm_weights, sbp_logits, sbp_labels,
                                     mbm_weight=0.1, sbp_weight=1.0)
    for name in ("mbm_loss", "mbm_accuracy", "sbp_loss"):
        np.testing.assert_allclose(changed[name], reference[name], rtol=1e-6)


def test_no_masked_slots_gives_zero_mbm_loss():
    mbm_logits, mbm_targets, _, sbp_logits, sbp_labels = make_pretrain_inputs()
    loss, metrics = tasks.pretrain_loss(mbm_logits, mbm_targets, np.zeros((4, 5), np.float32), sbp_logits,
                                        sbp_labels, mbm_weight=0.1, sbp_weight=1.0)
    assert float(metrics["mbm_loss"]) == 0.0
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("mbm_weight, sbp_weight", [(1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_task_weights_combine_linearly(mbm_weight, sbp_weight):
    inputs = make_pretrain_inputs(seed=3)
    loss, metrics = tasks.pretrain_loss(*inputs, mbm_weight=mbm_weight, sbp_weight=sbp_weight)
    expected = mbm_weight * metrics["mbm_loss"] + sbp_weight * metrics["sbp_loss"]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_masked_vocab_rows_do_not_produce_nan():
    logits = np.full((1, 1, 8), -1e9, np.float32)
    logits[..., :5] = np.arange(5)
    loss, metrics = tasks.pretrain_loss(logits, np.array([[4]]), np.ones((1, 1), np.float32),
                                        np.zeros((1, 2), np.float32), np.array([0]), mbm_weight=1.0,
                                        sbp_weight=1.0)
    expected = numpy_cross_entropy(logits[..., :5], np.array([[4]]))[0, 0]
    np.testing.assert_allclose(metrics["mbm_loss"], expected, rtol=1e-5)
    assert np.isfinite(float(loss))


def test_classification_loss_matches_numpy():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
    loss, metrics = tasks.classification_loss(logits, labels)
    np.testing.assert_allclose(loss, numpy_cross_entropy(logits, labels).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(-1) == labels).mean())
    assert float(metrics["count"]) == 6


def test_classification_weights_and_class_weights():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 1, 0], np.int32)
    weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
    class_weights = np.array([2.0, 1.0, 0.5], np.float32)

    loss, metrics = tasks.classification_loss(logits, labels, jnp.asarray(weights), jnp.asarray(class_weights))
    effective = weights * class_weights[labels]
    expected = (numpy_cross_entropy(logits, labels) * effective).sum() / effective.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    correct = (logits.argmax(-1) == labels).astype(np.float32)
    np.testing.assert_allclose(metrics["accuracy"], (correct * weights).sum() / weights.sum())
    assert float(metrics["count"]) == 4


def test_top_hits_match_argmax_and_count_ties():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(3, 4, 50)).astype(np.float32)
    labels = rng.integers(0, 50, size=(3, 4)).astype(np.int32)
    labels[0, 0] = logits[0, 0].argmax()
    hits = np.asarray(tasks._top_hits(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_array_equal(hits, (logits.argmax(-1) == labels).astype(np.float32))

    # A label tied with an earlier maximum is a hit, where argmax would pick the earlier index.
    tied = np.zeros((1, 1, 5), np.float32)
    tied[0, 0, [1, 3]] = 2.0
    assert float(tasks._top_hits(jnp.asarray(tied), jnp.asarray([[3]]))[0, 0]) == 1.0
    assert float(tasks._top_hits(jnp.asarray(tied), jnp.asarray([[0]]))[0, 0]) == 0.0
