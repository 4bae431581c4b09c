"""Tests for etbert_jax.config: presets, YAML round trips, overrides and validation errors."""

import dataclasses
import pathlib

import pytest

from etbert_jax import config as config_lib

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_preset_yaml_matches_builtin(name):
    from_yaml = config_lib.load_config(CONFIGS_DIR / f"{name}.yaml")
    builtin = config_lib.load_config(name)
    assert from_yaml == builtin


@pytest.mark.parametrize("name", sorted(config_lib.PRESETS))
def test_preset_yaml_opens_with_launch_comment(name):
    text = (CONFIGS_DIR / f"{name}.yaml").read_text()
    assert text.startswith("#")
    assert "etbert pretrain" in text


def test_base_preset_sizes():
    model = config_lib.load_config("base").model
    assert (model.num_layers, model.hidden_size, model.num_heads, model.intermediate_size) == (12, 768, 12, 3072)
    large = config_lib.load_config("large").model
    assert (large.num_layers, large.hidden_size, large.num_heads, large.intermediate_size) == (24, 1024, 16, 4096)


def test_etbert_compat_preset():
    model = config_lib.load_config("etbert_compat").model
    assert model.vocab_size == 60_005
    assert model.padded_vocab_size == 60_032
    assert model.layer_norm == "uer"
    assert model.layer_norm_eps == 1e-6
    assert model.tie_mlm_decoder is False
    assert model.attention_dropout == 0.1


def test_padded_vocab_size():
    assert config_lib.ModelConfig(vocab_size=65_541).padded_vocab_size == 65_664
    assert config_lib.ModelConfig(vocab_size=128).padded_vocab_size == 128
    assert config_lib.ModelConfig(vocab_size=129).padded_vocab_size == 256


def test_layer_norm_eps_default_per_kind():
    assert config_lib.ModelConfig(layer_norm="standard").layer_norm_eps == 1e-12
    assert config_lib.ModelConfig(layer_norm="uer").layer_norm_eps == 1e-6
    assert config_lib.ModelConfig(layer_norm="uer", layer_norm_eps=1e-5).layer_norm_eps == 1e-5


def test_overrides_convert_types():
    config = config_lib.load_config("tiny", [
        "data.seq_len=64",
        "model.dropout=0",
        "model.scan_layers=false",
        "data.num_epochs=none",
        "optim.warmup_steps=1_000",
        "model.compute_dtype=bfloat16",
        "tokenizer.vocab_size=65541",
    ])
    assert config.data.seq_len == 64
    assert isinstance(config.data.seq_len, int)
    assert config.model.dropout == 0.0
    assert isinstance(config.model.dropout, float)
    assert config.model.scan_layers is False
    assert config.data.num_epochs is None
    assert config.optim.warmup_steps == 1000
    assert config.model.compute_dtype == "bfloat16"
    assert config.tokenizer == {"vocab_size": 65541}


def test_max_predictions_follows_seq_len():
    assert config_lib.load_config("tiny").data.max_predictions == 24
    assert config_lib.load_config("tiny", ["data.seq_len=64"]).data.max_predictions == 16
    assert config_lib.load_config("tiny", ["data.max_predictions=30"]).data.max_predictions == 30


def test_unknown_override_key_names_valid_keys():
    with pytest.raises(ValueError, match=r"model\.hidden") as error:
        config_lib.load_config("tiny", ["model.hidden=32"])
    assert "hidden_size" in str(error.value)


def test_unknown_override_section():
    with pytest.raises(ValueError, match="unknown config section 'modle'"):
        config_lib.load_config("tiny", ["modle.hidden_size=32"])


@pytest.mark.parametrize("override, message", [
    ("data.seq_len", "expected section.field=value"),
    ("seq_len=3", "expected section.field"),
    ("data.seq_len=abc", r"invalid data.seq_len='abc': expected int"),
    ("model.scan_layers=maybe", "expected true or false"),
    ("model.layer_norm=rms", "expected one of standard, uer"),
    ("model.dropout=1.5", r"must be in \[0, 1\)"),
    ("data.masking=word", "expected one of span, token"),
    ("mesh.data=0", "must be >= 1"),
    ("optim.learning_rate=nan", r"invalid optim.learning_rate=nan: must be a finite number > 0"),
    ("optim.learning_rate=inf", r"invalid optim.learning_rate=inf: must be a finite number > 0"),
    ("optim.eps=0", r"invalid optim.eps=0.0: must be a finite number > 0"),
    ("optim.b2=1.0", r"invalid optim.b2=1.0: must be in \[0, 1\)"),
    ("optim.grad_clip_norm=nan", r"invalid optim.grad_clip_norm=nan: must be a finite number >= 0"),
    ("optim.weight_decay=-0.1", r"invalid optim.weight_decay=-0.1: must be a finite number >= 0"),
])
def test_invalid_override_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        config_lib.load_config("tiny", [override])


def test_heads_must_divide_hidden():
    with pytest.raises(ValueError, match="num_heads=3 does not divide model.hidden_size=64"):
        config_lib.load_config("tiny", ["model.num_heads=3"])


def test_unknown_preset_or_missing_file():
    with pytest.raises(ValueError, match="neither a preset"):
        config_lib.load_config("huge")


def test_yaml_round_trip(tmp_path):
    config = config_lib.load_config("etbert_compat", ["data.seq_len=256", "tokenizer.vocab_kind=wordpiece"])
    path = tmp_path / "run" / "config.yaml"
    config_lib.save_yaml(config, path)
    assert config_lib.load_config(path) == config


def test_dict_round_trip():
    config = config_lib.load_config("small")
    values = config_lib.config_to_dict(config)
    assert values["model"]["hidden_size"] == 512
    assert config_lib.config_from_dict(values) == config


def test_config_from_dict_rejects_unknown_field():
    with pytest.raises(ValueError, match=r"unknown key\(s\) train.stepz"):
        config_lib.config_from_dict({"train": {"stepz": 3}})


def test_yaml_extends_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("extends: tiny\nmodel:\n  num_layers: 3\n")
    config = config_lib.load_config(path, ["data.global_batch_size=8"])
    assert config.model.num_layers == 3
    assert config.model.hidden_size == 64
    assert config.data.global_batch_size == 8


def test_yaml_extends_loop_rejected(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(f"extends: {second}\n")
    second.write_text(f"extends: {first}\n")
    with pytest.raises(ValueError, match="extends' loop"):
        config_lib.load_config(first)


def test_configs_are_frozen():
    config = config_lib.load_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.hidden_size = 8


def test_mesh_resolve_fills_minus_one():
    assert config_lib.MeshConfig().resolve(8) == (8, 1, 1)
    assert config_lib.MeshConfig(data=2, fsdp=-1, tensor=2).resolve(8) == (2, 2, 2)
    assert config_lib.MeshConfig(data=1, fsdp=8, tensor=1).resolve(8) == (1, 8, 1)


def test_mesh_two_minus_one_rejected():
    with pytest.raises(ValueError, match="at most one"):
        config_lib.MeshConfig(data=-1, fsdp=-1)


def test_validate_mesh_larger_than_devices():
    config = config_lib.load_config("tiny", ["mesh.data=16"])
    with pytest.raises(ValueError, match="has 16 devices, larger than the 8 available"):
        config_lib.validate(config, num_devices=8)


def test_validate_mesh_not_dividing_devices():
    config = config_lib.load_config("tiny", ["mesh.tensor=3"])
    with pytest.raises(ValueError, match="needs a multiple of 3 devices, but 8 are available"):
        config_lib.validate(config, num_devices=8)


def test_validate_seq_longer_than_positions():
    config = config_lib.load_config("tiny", ["data.seq_len=1024"])
    with pytest.raises(ValueError, match="seq_len=1024 is longer than the position table model.max_positions=512"):
        config_lib.validate(config, num_devices=8)


def test_validate_batch_not_divisible_by_mesh():
    config = config_lib.load_config("tiny", ["data.global_batch_size=12"])
    with pytest.raises(ValueError, match=r"global_batch_size=12 .* data\*fsdp=8\*1=8"):
        config_lib.validate(config, num_devices=8)


def test_validate_batch_not_divisible_by_processes():
    config = config_lib.load_config("tiny", ["data.global_batch_size=6", "mesh.data=2", "mesh.tensor=4"])
    with pytest.raises(ValueError, match="global_batch_size=6 is not divisible by the process count 4"):
        config_lib.validate(config, num_devices=8, process_count=4)


def test_validate_tensor_must_divide_heads():
    config = config_lib.load_config("tiny", ["mesh.data=2", "mesh.tensor=4"])
    with pytest.raises(ValueError, match="num_heads=2 is not divisible by mesh.tensor=4"):
        config_lib.validate(config, num_devices=8)


def test_validate_vocab_must_match_manifest():
    config = config_lib.load_config("tiny", ["tokenizer.vocab_size=60005"])
    with pytest.raises(ValueError, match="set model.vocab_size=60005"):
        config_lib.validate(config, num_devices=8)


def test_validate_stale_max_predictions():
    config = config_lib.load_config("tiny")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, seq_len=512))
    with pytest.raises(ValueError, match="max_predictions=24 is below"):
        config_lib.validate(config, num_devices=8)


def test_validate_accepts_good_layouts():
    for overrides, expected in [
        ([], (8, 1, 1)),
        (["mesh.data=2", "mesh.fsdp=4"], (2, 4, 1)),
        (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], (2, 2, 2)),
    ]:
        config = config_lib.load_config("tiny", overrides)
        assert config_lib.validate(config, num_devices=8, process_count=2) == expected


def test_validate_fsdp_must_divide_hidden():
    config = config_lib.load_config("tiny", ["model.hidden_size=36", "model.num_heads=2", "mesh.data=1",
                                             "mesh.fsdp=8"])
    with pytest.raises(ValueError, match="hidden_size=36 is not divisible by mesh.fsdp=8"):
        config_lib.validate(config, num_devices=8)


def test_validate_grad_accum_must_divide_shard_batch():
    config = config_lib.load_config("tiny", ["optim.grad_accum_steps=3"])
    with pytest.raises(ValueError, match="grad_accum_steps=3 does not divide the 2 examples per batch shard"):
        config_lib.validate(config, num_devices=8)
