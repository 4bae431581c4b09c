"""Tests of orbax checkpoints: round trip, restore on another mesh, keep-latest-N, pre-trained restore."""

import jax
import numpy as np
import pytest
from flax import nnx

from etbert_jax import checkpoint, heads, optim, sharding
from etbert_jax import config as config_lib

MODEL = config_lib.ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                               max_positions=32)


def _config(data, fsdp, tensor):
    return config_lib.Config(model=MODEL, mesh=config_lib.MeshConfig(data=data, fsdp=fsdp, tensor=tensor),
                             tokenizer={"vocab_size": 300, "vocab_kind": "bigram"})


def _build(config, mesh, seed):
    tx = optim.make_optimizer(config.optim, 10)

    def build():
        model = heads.PretrainModel(config.model, rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return sharding.create_sharded_model(build, mesh)


def _numpy(tree):
    def convert(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.array(leaf)

    return jax.tree.map(convert, tree)


def _assert_trees_equal(expected, actual):
    flat_expected = jax.tree_util.tree_flatten_with_path(expected)[0]
    flat_actual = jax.tree_util.tree_flatten_with_path(actual)[0]
    assert [p for p, _ in flat_expected] == [p for p, _ in flat_actual]
    for (path, a), (_, b) in zip(flat_expected, flat_actual):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def _save(tmp_path, config, mesh_shape=(4, 2, 1), steps=(1,), keep=3):
    mesh = sharding.make_mesh(config_lib.MeshConfig(*mesh_shape))
    model, optimizer = _build(config, mesh, seed=0)
    saver = checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=1, keep=keep)
    for step in steps:
        saver.save(step, model_state=nnx.state(model), optimizer_state=nnx.state(optimizer),
                   cursor={"seed": 0, "process_count": 1, "positions": [[0, step]], "step": step},
                   config=config_lib.config_to_dict(config))
    saver.close()
    return model, optimizer


@pytest.mark.slow
@pytest.mark.parametrize("restore_mesh", [(2, 4, 1), (2, 2, 2)])
def test_restore_on_other_mesh(tmp_path, restore_mesh):
    config = _config(4, 2, 1)
    model, optimizer = _save(tmp_path, config)
    expected_model, expected_optimizer = _numpy(nnx.state(model)), _numpy(nnx.state(optimizer))

    new_mesh = sharding.make_mesh(config_lib.MeshConfig(*restore_mesh))
    target_model, target_optimizer = _build(config, new_mesh, seed=1)
    loader = checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=1, keep=3)
    model_state, optimizer_state, cursor, stored_config = loader.restore(
        1, model_target=checkpoint.abstract_state(nnx.state(target_model)),
        optimizer_target=checkpoint.abstract_state(nnx.state(target_optimizer)))
    loader.close()

    _assert_trees_equal(expected_model, _numpy(model_state))
    _assert_trees_equal(expected_optimizer, _numpy(optimizer_state))
    assert cursor["positions"] == [[0, 1]]
    assert stored_config["tokenizer"]["vocab_size"] == 300
    assert config_lib.config_from_dict(stored_config) == config

    # Restored arrays carry the new mesh's shardings.
    target_sharding = target_model.mbm.decoder.kernel[...].sharding
    nnx.update(target_model, model_state)
    decoder = target_model.mbm.decoder.kernel[...]
    assert decoder.sharding.mesh.shape == dict(zip(("data", "fsdp", "tensor"), restore_mesh))
    assert decoder.sharding.is_equivalent_to(target_sharding, decoder.ndim)


def test_keep_latest_and_read_config(tmp_path):
    config = _config(-1, 1, 1)
    _save(tmp_path, config, mesh_shape=(8, 1, 1), steps=(1, 2, 3, 4), keep=2)
    reader = checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=1, keep=2)
    assert reader.all_steps() == [3, 4]
    assert reader.latest_step() == 4
    assert reader.read_config()["model"]["hidden_size"] == 32
    assert reader.read_cursor(3)["positions"] == [[0, 3]]
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 1"):
        reader.read_config(1)
    reader.close()


def test_unfinished_checkpoint_is_ignored(tmp_path):
    config = _config(-1, 1, 1)
    _save(tmp_path, config, mesh_shape=(8, 1, 1), steps=(1,))
    # What a process killed during a save leaves behind: a step directory under a temporary name.
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234").mkdir()
    reader = checkpoint.Checkpointer(tmp_path / "checkpoints", save_every=1, keep=3)
    assert reader.latest_step() == 1
    reader.close()


def test_resolve_checkpoint_path(tmp_path):
    _save(tmp_path, _config(-1, 1, 1), mesh_shape=(8, 1, 1), steps=(1, 2))
    manager_dir = tmp_path / "checkpoints"
    assert checkpoint.resolve_checkpoint_path(tmp_path) == (manager_dir, None)
    assert checkpoint.resolve_checkpoint_path(manager_dir) == (manager_dir, None)
    assert checkpoint.resolve_checkpoint_path(manager_dir / "1") == (manager_dir, 1)


def test_restore_pretrained(tmp_path):
    config = _config(4, 2, 1)
    model, _ = _save(tmp_path, config, steps=(1,))
    expected = _numpy(nnx.state(model))

    mesh = sharding.make_mesh(config_lib.MeshConfig(2, 1, 4))
    restored_config, state = checkpoint.restore_pretrained(tmp_path / "checkpoints" / "1", mesh)
    assert restored_config.model == MODEL
    assert restored_config.tokenizer["vocab_kind"] == "bigram"
    _assert_trees_equal(expected, _numpy(state))
    assert "encoder" in state
    assert state["encoder"]["embeddings"]["word"]["embedding"][...].sharding.mesh.shape["tensor"] == 4


def test_restore_pretrained_errors(tmp_path):
    mesh = sharding.make_mesh(config_lib.MeshConfig(-1, 1, 1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.restore_pretrained(tmp_path / "missing", mesh)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.restore_pretrained(tmp_path / "empty", mesh)
