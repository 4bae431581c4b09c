"""Tests of the optimizer: weight-decay mask, schedule values, non-finite step handling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from etbert_jax import heads, optim
from etbert_jax.config import ModelConfig, OptimConfig

TINY = ModelConfig(vocab_size=300, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                   max_positions=32, dropout=0.0, attention_dropout=0.0)


def _flat_mask(params):
    mask = optim.decay_mask(params)
    return {".".join(str(getattr(k, "key", k)) for k in path): value
            for path, value in jax.tree_util.tree_flatten_with_path(mask)[0]}


def _param_name(path):
    return [part for part in path.split(".") if part and part != "value"]


def test_decay_mask_on_pretrain_model():
    model = heads.PretrainModel(TINY, rngs=nnx.Rngs(0))
    mask = _flat_mask(nnx.state(model, nnx.Param))
    assert len(mask) > 20

    for path, decayed in mask.items():
        names = _param_name(path)
        is_weight = names[-1].endswith("kernel") or names[-1] == "embedding"
        assert decayed == is_weight, f"{path}: decayed={decayed}"
    decayed_paths = [".".join(_param_name(p)) for p, value in mask.items() if value]
    assert "encoder.embeddings.word.embedding" in decayed_paths
    assert "mbm.decoder.kernel" in decayed_paths
    excluded_paths = [".".join(_param_name(p)) for p, value in mask.items() if not value]
    assert "encoder.layers.attention_norm.scale" in excluded_paths
    assert "encoder.layers.mlp.wi.bias" in excluded_paths


def test_weight_decay_changes_only_masked_params():
    params = {"dense": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "norm": {"scale": jnp.ones(3)}}
    config = OptimConfig(learning_rate=0.1, warmup_steps=0, weight_decay=0.5, grad_clip_norm=0.0)
    tx = optim.make_optimizer(config, total_steps=10)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_values(schedule):
    config = OptimConfig(learning_rate=1e-3, warmup_steps=10, schedule=schedule, end_lr_fraction=0.1)
    lr = optim.make_schedule(config, total_steps=110)
    assert float(lr(0)) == pytest.approx(0.0)
    assert float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(110)) == pytest.approx(1e-4)
    middle = 1e-4 + (1e-3 - 1e-4) * 0.5
    assert float(lr(60)) == pytest.approx(middle, rel=1e-4)
    values = [float(lr(step)) for step in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_fraction():
    config = OptimConfig(learning_rate=1.0, warmup_fraction=0.25)
    assert optim.warmup_steps(config, 200) == 50
    assert float(optim.make_schedule(config, 200)(25)) == pytest.approx(0.5)


def test_clipping_changes_adam_moments():
    params = {"w": jnp.zeros(2)}
    grads = [{"w": jnp.array([300.0, 400.0])}, {"w": jnp.array([0.3, -0.4])}]
    second_updates = {}
    for clip in (0.0, 1.0):
        config = OptimConfig(learning_rate=1.0, warmup_steps=0, weight_decay=0.0, grad_clip_norm=clip)
        tx = optim.make_optimizer(config, total_steps=10)
        state = tx.init(params)
        for grad in grads:
            updates, state = tx.update(grad, state, params)
        second_updates[clip] = np.asarray(updates["w"])
    # Without clipping the huge first gradient dominates both moments; with clipping it does not.
    assert not np.allclose(second_updates[0.0], second_updates[1.0], rtol=1e-2)
    assert np.isfinite(second_updates[1.0]).all()


def _adamw_steps(tx, grads_list, params):
    state = tx.init(params)
    for grads in grads_list:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def test_matches_plain_optax_clip_and_adamw():
    config = OptimConfig(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, grad_clip_norm=1.0)
    rng = np.random.default_rng(4)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=3), jnp.float32)}}
    grads_list = [jax.tree.map(lambda p, scale=scale: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32),
                               params) for scale in (0.1, 5.0, 0.3, 20.0)]
    reference = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                            optax.adamw(optim.make_schedule(config, 10), b1=config.b1, b2=config.b2, eps=config.eps,
                                        weight_decay=config.weight_decay, mask=optim.decay_mask))

    ours, _ = _adamw_steps(optim.make_optimizer(config, 10), grads_list, params)
    expected, _ = _adamw_steps(reference, grads_list, params)
    for left, right in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
        np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", ["nan_gradient", "inf_gradient", "finite_flag"])
def test_skipped_update_changes_nothing(bad):
    config = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1)
    tx = optim.make_optimizer(config, 10)
    params = {"w": jnp.linspace(-1.0, 1.0, 6, dtype=jnp.float32), "bias": jnp.ones(2, jnp.float32)}
    params, state = _adamw_steps(tx, [jax.tree.map(lambda p: p * 0.3 + 0.1, params)], params)
    before = [np.array(leaf) for leaf in jax.tree.leaves(state)]

    grads = jax.tree.map(lambda p: p * 0.5, params)
    finite = True
    if bad == "nan_gradient":
        grads["w"] = grads["w"].at[2].set(jnp.nan)
    elif bad == "inf_gradient":
        grads["bias"] = grads["bias"].at[0].set(jnp.inf)
    else:
        finite = jnp.asarray(False)
    updates, new_state = jax.jit(lambda g, s, p: tx.update(g, s, p, finite=finite))(grads, state, params)

    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)
    for old, new in zip(before, jax.tree.leaves(new_state), strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))

    # The next good step continues as if the skipped one had never happened.
    good = jax.tree.map(lambda p: p * 0.2, params)
    after_skip = tx.update(good, new_state, params)
    direct = tx.update(good, state, params)
    for left, right in zip(jax.tree.leaves(after_skip), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


def _tiny_batch(rng, batch=8, seq_len=16, predictions=4):
    ids = rng.integers(5, TINY.vocab_size, (batch, seq_len)).astype(np.int32)
    ids[:, 0], ids[:, 7], ids[:, -1] = 2, 1, 1
    segments = np.where(np.arange(seq_len) <= 7, 1, 2).astype(np.int32)
    return {
        "input_ids": ids,
        "segment_ids": np.broadcast_to(segments, ids.shape).copy(),
        "masked_positions": np.tile(np.arange(1, predictions + 1, dtype=np.int32), (batch, 1)),
        "mbm_targets": ids[:, 1:predictions + 1].copy(),
        "mbm_weights": np.ones((batch, predictions), np.float32),
        "sbp_labels": rng.integers(0, 2, batch).astype(np.int32),
    }


def _to_numpy(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.array(jax.random.key_data(leaf))
    # A copy, because the step donates the state and may reuse its buffers.
    return np.array(leaf)


def _sharded_train_step(config):
    """Build a tiny PretrainModel, its optimizer and train step, sharded on `config.mesh`.

    Return (mesh, graphdef, state, step function).
    """
    from etbert_jax import sharding, train

    mesh = sharding.make_mesh(config.mesh)
    tx = optim.make_optimizer(config.optim, 10)

    def build():
        model = heads.PretrainModel(config.model, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, state = nnx.split(sharding.create_sharded_model(build, mesh))
    step_fn = train.make_train_step(graphdef, jax.tree.map(lambda leaf: leaf.sharding, state),
                                    sharding.batch_sharding(mesh), config, optim.make_schedule(config.optim, 10))
    return mesh, graphdef, state, step_fn


def test_nonfinite_step_is_skipped():
    from etbert_jax import config as config_lib

    config = config_lib.Config(model=TINY, mesh=config_lib.MeshConfig(data=-1),
                               optim=OptimConfig(learning_rate=1e-2, warmup_steps=0))
    mesh, graphdef, state, step_fn = _sharded_train_step(config)
    before = jax.tree.map(_to_numpy, state)

    bad = _tiny_batch(np.random.default_rng(0))
    bad["mbm_weights"][0, 0] = np.nan
    with jax.set_mesh(mesh):
        state, metrics = step_fn(state, bad, jnp.asarray(0, jnp.int32))
    assert not bool(metrics["finite"])
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(_to_numpy, state))):
        np.testing.assert_array_equal(old, new)

    with jax.set_mesh(mesh):
        state, metrics = step_fn(state, _tiny_batch(np.random.default_rng(1)), jnp.asarray(1, jnp.int32))
    assert bool(metrics["finite"])
    after = nnx.merge(graphdef, state)[1]
    assert int(after.step[...]) == 1


@pytest.mark.slow
def test_grad_accumulation_matches_full_batch():
    from etbert_jax import config as config_lib

    batch = _tiny_batch(np.random.default_rng(2), batch=16)
    results = {}
    for accum in (1, 2):
        config = config_lib.Config(model=TINY, mesh=config_lib.MeshConfig(data=-1),
                                   optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, grad_accum_steps=accum))
        mesh, graphdef, state, step_fn = _sharded_train_step(config)
        with jax.set_mesh(mesh):
            state, metrics = step_fn(state, batch, jnp.asarray(0, jnp.int32))
        results[accum] = (float(metrics["loss"]), float(metrics["grad_norm"]),
                          np.array(nnx.merge(graphdef, state)[0].mbm.transform.kernel[...]))

    assert results[2][0] == pytest.approx(results[1][0], rel=1e-5)
    assert results[2][1] == pytest.approx(results[1][1], rel=1e-4)
    np.testing.assert_allclose(results[2][2], results[1][2], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
    import dataclasses

    from etbert_jax import config as config_lib

    model_config = dataclasses.replace(TINY, compute_dtype="bfloat16")
    config = config_lib.Config(model=model_config, mesh=config_lib.MeshConfig(data=1, fsdp=8),
                               optim=OptimConfig(learning_rate=1e-2, warmup_steps=0))
    mesh, graphdef, state, step_fn = _sharded_train_step(config)
    with jax.set_mesh(mesh):
        for step in range(2):
            state, metrics = step_fn(state, _tiny_batch(np.random.default_rng(step)), jnp.asarray(step, jnp.int32))
    assert bool(metrics["finite"])
    assert metrics["loss"].dtype == jnp.float32
    model, optimizer = nnx.merge(graphdef, state)
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert leaf.dtype == jnp.float32
    assert int(optimizer.step[...]) == 2


@pytest.mark.slow
def test_scanned_and_unrolled_layers_train_alike():
    import dataclasses

    from etbert_jax import config as config_lib

    batch = _tiny_batch(np.random.default_rng(5))
    results = {}
    for scan_layers in (False, True):
        model_config = dataclasses.replace(TINY, scan_layers=scan_layers, dropout=0.1)
        config = config_lib.Config(model=model_config, mesh=config_lib.MeshConfig(data=-1),
                                   optim=OptimConfig(learning_rate=1e-2, warmup_steps=0))
        mesh, graphdef, state, step_fn = _sharded_train_step(config)
        with jax.set_mesh(mesh):
            for step in range(2):
                state, metrics = step_fn(state, batch, jnp.asarray(step, jnp.int32))
        results[scan_layers] = (float(metrics["loss"]),
                                np.array(nnx.merge(graphdef, state)[0].encoder.layers.mlp.wi.kernel[...]))

    # Same parameters, same dropout masks (one key per layer either way), same updates.
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-4, atol=1e-6)
