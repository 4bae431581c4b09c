"""Tests of prng.bernoulli: the same masks as jax.random.bernoulli, and the fallbacks."""

import jax
import numpy as np
import pytest

from etbert_jax import prng


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 17, 33), (4, 64, 96)])
@pytest.mark.parametrize("p", [0.9, 0.5, 1 / 3, 1 - 1e-7, 1e-7])
def test_matches_jax_random_bernoulli(shape, p):
    for key in (jax.random.key(0), jax.random.fold_in(jax.random.key(12345), 3),
                jax.random.split(jax.random.key(7), 4)[2]):
        ours = jax.jit(lambda k: prng.bernoulli(k, p, shape))(key)
        reference = jax.random.bernoulli(key, p, shape)
        assert ours.dtype == reference.dtype
        assert ours.shape == reference.shape
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_edge_probabilities():
    key = jax.random.key(1)
    assert bool(prng.bernoulli(key, 1.0, (1000,)).all())
    assert not bool(prng.bernoulli(key, 0.0, (1000,)).any())
    np.testing.assert_array_equal(np.asarray(prng.bernoulli(key, 1.0, (50,))),
                                  np.asarray(jax.random.bernoulli(key, 1.0, (50,))))


def test_keep_rate_is_close_to_p():
    mask = np.asarray(prng.bernoulli(jax.random.key(3), 0.9, (256, 1024)))
    # 262,144 draws: the standard error of the mean is 0.0006.
    assert abs(mask.mean() - 0.9) < 0.003


def test_threefry_hash_matches_the_published_test_vector():
    # Random123's known-answer vector for Threefry-2x32 (20 rounds) with key and counter 0.
    high, low = prng.threefry2x32(np.uint32(0), np.uint32(0), np.zeros(1, np.uint32), np.zeros(1, np.uint32))
    assert (int(high[0]), int(low[0])) == (0x6B200159, 0x99BA4EFE)


def test_other_keys_fall_back_to_jax_random():
    rbg = jax.random.key(0, impl="rbg")
    np.testing.assert_array_equal(np.asarray(prng.bernoulli(rbg, 0.7, (64,))),
                                  np.asarray(jax.random.bernoulli(rbg, 0.7, (64,))))
    raw = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(np.asarray(prng.bernoulli(raw, 0.7, (64,))),
                                  np.asarray(jax.random.bernoulli(raw, 0.7, (64,))))


def test_unusual_arguments_fall_back_to_jax_random():
    key = jax.random.key(2)
    for p in (float("nan"), float("inf"), np.float32(0.25), jax.numpy.full((64,), 0.25)):
        np.testing.assert_array_equal(np.asarray(prng.bernoulli(key, p, (64,))),
                                      np.asarray(jax.random.bernoulli(key, p, (64,))))
    keys = jax.random.split(key, 4)
    np.testing.assert_array_equal(np.asarray(jax.vmap(lambda k: prng.bernoulli(k, 0.5, (8,)))(keys)),
                                  np.asarray(jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (8,)))(keys)))
    with pytest.raises(ValueError, match="accepts a single key"):
        prng.bernoulli(keys, 0.5, (4, 8))
