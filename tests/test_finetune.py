"""Fine-tuning on real shards from the Beam pipeline, starting from real orbax checkpoints."""

import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from etbert_jax import checkpoint, finetune, finetune_data, heads
from finetune_fixtures import CONVERT_FLAGS, TREE, make_tree, write_pretrain_checkpoint
from pipelines import convert_finetune

FAST = ["data.global_batch_size=8", "train.log_every=1"]


@pytest.fixture(scope="module")
def shards(sample_captures, tmp_path_factory) -> pathlib.Path:
    base = tmp_path_factory.mktemp("finetune-shards")
    tree = make_tree(sample_captures, base / "tree")
    output = base / "shards"
    convert_finetune.run([str(tree), "--output", str(output)] + CONVERT_FLAGS)
    return output


def encoder_arrays(state) -> dict[str, np.ndarray]:
    flat = nnx.to_flat_state(state)
    return {".".join(map(str, path)): np.asarray(variable.get_value()) for path, variable in flat
            if isinstance(variable, nnx.Param)}


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("pretrained")
    manifest = json.loads((shards / "manifest.json").read_text())
    write_pretrain_checkpoint(workdir, manifest["tokenizer"])
    return workdir


def run_finetune(shards, pretrained, workdir, overrides, level="packet"):
    source = finetune_data.open_source(str(shards), level)
    config = finetune.resolve_config("tiny", FAST + overrides, str(pretrained), source, str(workdir))
    return config, source, finetune.finetune(config, source)


def test_open_source_reads_manifest(shards):
    source = finetune_data.open_source(str(shards), "flow")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert source.labels == tuple(sorted(TREE))
    assert source.seq_len == 96
    assert source.split["policy"] == "capture"
    assert source.num_examples == manifest["counts"]["examples_per_split"]["flow"]
    counted = finetune_data.count_labels(source, "train")
    assert counted.sum() == source.num_examples["train"]


def test_encoder_restored_from_checkpoint(shards, pretrained):
    source = finetune_data.open_source(str(shards), "packet")
    config = finetune.resolve_config("tiny", FAST, str(pretrained), source, "/tmp/unused")
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4, 1), ("data", "fsdp", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model, _ = finetune.build_classifier(config, len(source.labels), mesh)
    finetune.load_pretrained_encoder(model, str(pretrained), mesh)

    reference = heads.PretrainModel(config.model, rngs=nnx.Rngs(0))
    expected = encoder_arrays(nnx.state(reference.encoder))
    restored = encoder_arrays(nnx.state(model.encoder))
    assert expected.keys() == restored.keys()
    for key in expected:
        np.testing.assert_array_equal(restored[key], expected[key], err_msg=key)
    np.testing.assert_array_equal(np.asarray(model.pooler.dense.kernel.get_value()),
                                  np.asarray(reference.pooler.dense.kernel.get_value()))


def test_nonfinite_pretrained_weights_rejected(shards, tmp_path):
    manifest = json.loads((shards / "manifest.json").read_text())
    write_pretrain_checkpoint(tmp_path, manifest["tokenizer"], nan_weight=True)
    source = finetune_data.open_source(str(shards), "packet")
    config = finetune.resolve_config("tiny", FAST, str(tmp_path), source, "/tmp/unused")
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8, 1, 1), ("data", "fsdp", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model, _ = finetune.build_classifier(config, len(source.labels), mesh)

    with pytest.raises(ValueError, match=r"non-finite \(NaN or infinite\) weights in encoder.*mlp.*wi.*kernel"):
        finetune.load_pretrained_encoder(model, str(tmp_path), mesh)


@pytest.mark.slow
def test_finetune_writes_consistent_report(shards, pretrained, tmp_path):
    # A learning rate of 1e-9 leaves the predictions unchanged, so the second validation is no
    # better than the first and patience 1 stops the run there.
    overrides = ["finetune.epochs=3", "finetune.early_stopping_patience=1", "optim.learning_rate=1e-9",
                 "finetune.class_weights=balanced"]
    config, source, result = run_finetune(shards, pretrained, tmp_path / "run", overrides)
    steps_per_epoch = source.num_examples["train"] // config.data.global_batch_size

    assert result.reason == "early_stopped"
    assert result.step == 2 * steps_per_epoch
    assert result.best_step == steps_per_epoch
    report = tmp_path / "run" / "eval"
    metrics = json.loads((report / "metrics.json").read_text())
    matrix = np.array(json.loads((report / "confusion_matrix.json").read_text())["matrix"])
    assert matrix.sum() == source.num_examples["test"]
    assert metrics["num_examples"] == source.num_examples["test"]
    assert metrics["split_policy"] == "capture"
    assert set(metrics["per_class"]) == set(TREE)
    assert (report / "report.md").is_file()
    assert (report / "confusion_matrix.png").stat().st_size > 0

    validation = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [row["step"] for row in validation] == [steps_per_epoch, 2 * steps_per_epoch]
    assert validation[1]["valid_macro_f1"] == validation[0]["valid_macro_f1"]
    assert result.best_macro_f1 == pytest.approx(validation[0]["valid_macro_f1"])

    model, loaded_config, labels, info = finetune.load_classifier(str(tmp_path / "run"))
    assert labels == list(source.labels)
    assert info["step"] == result.best_step
    assert loaded_config.tokenizer["vocab_sha256"] == source.tokenizer["vocab_sha256"]
    assert loaded_config.data.seq_len == source.seq_len

    # A second run in the same workdir resumes at the stopping point and trains no further.
    again = finetune.finetune(config, source)
    assert again.reason == "early_stopped"
    assert again.step == result.step
    assert again.best_step == result.best_step
    assert again.best_macro_f1 == result.best_macro_f1
    assert len((tmp_path / "run" / "validation.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_frozen_encoder_keeps_pretrained_weights(shards, pretrained, tmp_path):
    overrides = ["finetune.epochs=2", "finetune.freeze_encoder=true", "finetune.early_stopping_patience=null",
                 "optim.learning_rate=0.05"]
    _, _, result = run_finetune(shards, pretrained, tmp_path / "probe", overrides)
    model, config, _, _ = finetune.load_classifier(str(tmp_path / "probe" / checkpoint.CHECKPOINT_SUBDIR))

    reference = heads.PretrainModel(config.model, rngs=nnx.Rngs(0))
    expected = encoder_arrays(nnx.state(reference.encoder))
    trained = encoder_arrays(nnx.state(model.encoder))
    for key in expected:
        np.testing.assert_array_equal(trained[key], expected[key], err_msg=key)
    np.testing.assert_array_equal(np.asarray(model.pooler.dense.kernel.get_value()),
                                  np.asarray(reference.pooler.dense.kernel.get_value()))
    fresh = heads.Classifier(config.model, len(TREE), rngs=nnx.Rngs(config.train.seed))
    assert not np.array_equal(np.asarray(model.output.kernel.get_value()),
                              np.asarray(fresh.output.kernel.get_value()))
    assert result.step == config.train.steps


def test_vocab_mismatch_names_both_hashes(shards, tmp_path):
    tokenizer = dict(json.loads((shards / "manifest.json").read_text())["tokenizer"], vocab_sha256="0" * 64)
    write_pretrain_checkpoint(tmp_path / "other", tokenizer)
    source = finetune_data.open_source(str(shards), "flow")
    with pytest.raises(ValueError, match="vocabulary sha256 mismatch") as error:
        finetune.resolve_config("tiny", FAST, str(tmp_path / "other"), source, str(tmp_path / "run"))
    assert "0" * 64 in str(error.value)
    assert source.tokenizer["vocab_sha256"] in str(error.value)


def test_header_policy_mismatch_rejected(shards, tmp_path):
    tokenizer = dict(json.loads((shards / "manifest.json").read_text())["tokenizer"], header_policy="raw")
    write_pretrain_checkpoint(tmp_path / "raw", tokenizer)
    source = finetune_data.open_source(str(shards), "flow")
    with pytest.raises(ValueError, match="header policy mismatch.*'raw'.*'anonymize'"):
        finetune.resolve_config("tiny", FAST, str(tmp_path / "raw"), source, str(tmp_path / "run"))


def test_sequence_longer_than_positions_rejected(shards, tmp_path):
    tokenizer = json.loads((shards / "manifest.json").read_text())["tokenizer"]
    write_pretrain_checkpoint(tmp_path / "short", tokenizer, extra=["model.max_positions=64"])
    source = finetune_data.open_source(str(shards), "flow")
    with pytest.raises(ValueError, match="up to 96 tokens.*max_positions=64"):
        finetune.resolve_config("tiny", FAST, str(tmp_path / "short"), source, str(tmp_path / "run"))


def test_vocab_size_mismatch_rejected(shards, tmp_path):
    tokenizer = json.loads((shards / "manifest.json").read_text())["tokenizer"]
    write_pretrain_checkpoint(tmp_path / "wordpiece", tokenizer, extra=["model.vocab_size=60005"])
    source = finetune_data.open_source(str(shards), "flow")
    with pytest.raises(ValueError, match="model.vocab_size=60005.*vocab_size=65541"):
        finetune.resolve_config("tiny", FAST, str(tmp_path / "wordpiece"), source, str(tmp_path / "run"))


def test_shape_override_rejected(shards, pretrained, tmp_path):
    source = finetune_data.open_source(str(shards), "packet")
    with pytest.raises(ValueError, match="model.hidden_size is fixed by the checkpoint"):
        finetune.resolve_config("tiny", FAST + ["model.hidden_size=64"], str(pretrained), source, str(tmp_path))


def test_batch_larger_than_train_split_rejected(shards, pretrained, tmp_path):
    source = finetune_data.open_source(str(shards), "packet")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        finetune.resolve_config("tiny", ["data.global_batch_size=4096"], str(pretrained), source, str(tmp_path))


def test_balanced_class_weights():
    weights = finetune.balanced_class_weights(np.array([30, 10, 0, 20]))
    np.testing.assert_allclose(weights, [60 / (3 * 30), 60 / (3 * 10), 0.0, 60 / (3 * 20)], rtol=1e-6)
    # Weighted counts are equal for every present class.
    np.testing.assert_allclose(weights[[0, 1, 3]] * np.array([30, 10, 20]), 20.0, rtol=1e-6)
