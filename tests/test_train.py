"""Tests of the pre-training loop and the `etbert pretrain` command line, in process, on 8 CPU devices."""

import json

import pytest

from etbert_jax import train
from pretrain_shards import convert_sample_shards


@pytest.fixture(scope="module")
def shards(sample_captures, tmp_path_factory):
    return convert_sample_shards(sample_captures, tmp_path_factory.mktemp("shards"), seq_len=64, num_shards=4)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_loss_decreases_on_real_shards(shards, tmp_path):
    # FSDP over the 8 CPU devices shares the optimizer work, which keeps the test fast on CPUs.
    config = train.resolve_config("tiny", ["train.steps=30", "train.log_every=5", "train.checkpoint_every=15",
                                           "optim.warmup_steps=3", "optim.learning_rate=2e-3", "mesh.data=1",
                                           "mesh.fsdp=8"], str(shards), str(tmp_path))
    result = train.train(config)
    assert result.reason == "completed"
    assert result.step == 30

    records = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(5, 31, 5))
    assert set(records[0]) == {"step", "loss", "mbm_loss", "sbp_loss", "mbm_accuracy", "sbp_accuracy",
                               "learning_rate", "grad_norm", "tokens_per_s", "step_time_s", "mfu"}
    assert records[-1]["mbm_loss"] < records[0]["mbm_loss"] - 0.5
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["tokens_per_s"] > 0
    # CPU devices have no entry in the peak FLOP/s table, so no MFU is claimed.
    assert records[-1]["mfu"] is None

    assert (tmp_path / "config.yaml").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["15", "30"]


def test_config_takes_vocab_and_seq_len_from_manifest(shards, tmp_path):
    config = train.resolve_config("tiny", [], str(shards), str(tmp_path))
    assert config.model.vocab_size == 65_541
    assert config.data.seq_len == 64
    assert config.data.max_predictions == 16
    assert config.tokenizer["vocab_kind"] == "bigram"
    assert config.train.workdir == str(tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["mesh.data=16"], "16 devices, larger than the 8 available"),
    (["data.seq_len=256"], "data.seq_len=256 contradicts the shards"),
    (["model.vocab_size=60005"], "model.vocab_size=60005 contradicts the shards"),
    (["model.max_positions=32"], "longer than the position table"),
    (["data.global_batch_size=12"], "not divisible by the batch-sharding mesh size"),
    (["train.stepz=3"], "unknown key 'train.stepz'"),
])
def test_bad_config_fails_before_compiling(shards, tmp_path, capsys, overrides, message):
    code = train.main(["--data", str(shards), "--workdir", str(tmp_path), *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_missing_or_empty_shards(tmp_path, capsys):
    assert train.main(["--data", str(tmp_path / "none"), "--workdir", str(tmp_path / "w")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert train.main(["--data", str(tmp_path / "empty"), "--workdir", str(tmp_path / "w")]) == 2
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_nonfinite_steps_stop_the_run(shards, tmp_path):
    # A huge learning rate makes the parameters overflow after the first update, so steps 2 and 3
    # are skipped. The finiteness of a step is read one step later, so step 2 is still saved.
    config = train.resolve_config("tiny", ["train.steps=20", "train.log_every=1", "optim.learning_rate=1e30",
                                           "mesh.data=1", "mesh.fsdp=8",
                                           "optim.warmup_steps=0", "optim.grad_clip_norm=0",
                                           "train.checkpoint_every=1", "train.keep_checkpoints=10",
                                           "train.max_consecutive_nonfinite=2"], str(shards), str(tmp_path))
    with pytest.raises(train.NonFiniteError, match="2 consecutive steps") as raised:
        train.train(config)

    assert "keeps the checkpoints of steps [1, 2]" in str(raised.value)
    saved = sorted(int(path.name) for path in (tmp_path / "checkpoints").iterdir() if path.name.isdigit())
    assert saved == [1, 2]


def _fake_checkpoint(workdir, hidden_size):
    import jax.numpy as jnp

    from etbert_jax import checkpoint
    from etbert_jax import config as config_lib

    stored = config_lib.load_config("tiny", [f"model.hidden_size={hidden_size}"])
    saver = checkpoint.Checkpointer(workdir / "checkpoints", save_every=1, keep=1)
    saver.save(5, model_state={"w": jnp.zeros(2)}, optimizer_state={"m": jnp.zeros(2)}, cursor={},
               config=config_lib.config_to_dict(stored), force=True)
    saver.close()


def test_no_resume_with_checkpoints_fails(shards, tmp_path, capsys):
    _fake_checkpoint(tmp_path, hidden_size=64)
    code = train.main(["--data", str(shards), "--workdir", str(tmp_path), "--no-resume"])
    assert code == 2
    assert "--no-resume was given" in capsys.readouterr().err


def test_resume_of_other_model_fails(shards, tmp_path, capsys):
    _fake_checkpoint(tmp_path, hidden_size=32)
    code = train.main(["--data", str(shards), "--workdir", str(tmp_path)])
    assert code == 2
    assert "hidden_size: 32 -> 64" in capsys.readouterr().err


def test_resume_without_input_position_fails(shards, tmp_path, capsys):
    _fake_checkpoint(tmp_path, hidden_size=64)
    code = train.main(["--data", str(shards), "--workdir", str(tmp_path)])
    assert code == 2
    assert "has no input position" in capsys.readouterr().err
