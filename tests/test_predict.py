"""Prediction on raw captures: the same tokens as the conversion, rows, top-k and unreadable files."""

import csv
import json
import pathlib

import jax
import numpy as np
import pytest

from etbert_jax import convert, predict
from etbert_jax.tokenizer import Vocab
from finetune_fixtures import CONVERT_FLAGS, TREE, make_tree, write_classifier_checkpoint
from pipelines import convert_finetune


@pytest.fixture(scope="module")
def manifest(sample_captures, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("predict-shards")
    tree = make_tree(sample_captures, base / "tree")
    convert_finetune.run([str(tree), "--output", str(base / "shards")] + CONVERT_FLAGS)
    return json.loads((base / "shards" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def flow_checkpoint(manifest, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("flow-model")
    model, config = write_classifier_checkpoint(workdir, manifest, "flow")
    return workdir, model, config


def capture(sample_captures: pathlib.Path, label: str, index: int = 0) -> pathlib.Path:
    return sample_captures / label / TREE[label][index]


def test_iso_utc_keeps_microseconds():
    assert predict.iso_utc(1_398_558_136_187_348_123) == "2014-04-27T00:22:16.187348Z"
    assert predict.iso_utc(0) == "1970-01-01T00:00:00.000000Z"


def test_settings_come_from_checkpoint(flow_checkpoint, manifest):
    workdir, _, _ = flow_checkpoint
    loaded = predict.Classifier(str(workdir), batch_size=8)
    settings = predict.convert_settings(loaded.config, loaded.info)
    assert settings.tokens_per_packet == 24
    assert settings.flow_seq_len == 96
    assert settings.max_packets_per_session == 6
    assert settings.header_policy == manifest["tokenizer"]["header_policy"]
    assert settings.idle_timeout_s == manifest["config"]["idle_timeout_s"]


def test_flow_tokens_match_conversion(flow_checkpoint, sample_captures):
    workdir, _, _ = flow_checkpoint
    loaded = predict.Classifier(str(workdir), batch_size=8)
    settings = predict.convert_settings(loaded.config, loaded.info)
    vocab = Vocab.from_manifest(loaded.config.tokenizer)
    path = capture(sample_captures, "tls12", 1)

    rows = list(predict.iter_pending(str(path), path.name, "flow", settings, vocab, convert.SkipCounter()))
    examples = list(convert.iter_flow_examples([str(path)], settings, vocab))
    assert len(rows) == len(examples) > 0
    for row, example in zip(rows, examples):
        np.testing.assert_array_equal(row.input_ids, example.input_ids)
        assert f"{row.fields['protocol']} {row.fields['client']}>{row.fields['server']}" == example.session
        assert row.fields["first_ts_ns"] <= row.fields["last_ts_ns"]


@pytest.mark.slow
def test_rows_match_direct_model_call(flow_checkpoint, sample_captures, tmp_path):
    workdir, model, config = flow_checkpoint
    path = capture(sample_captures, "ssh", 1)
    out = tmp_path / "rows.jsonl"
    assert predict.main(["--checkpoint", str(workdir), str(path), "--out", str(out), "--top-k", "2",
                         "--batch-size", "8"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    loaded = predict.Classifier(str(workdir), batch_size=8)
    settings = predict.convert_settings(loaded.config, loaded.info)
    vocab = Vocab.from_manifest(config.tokenizer)
    pending = list(predict.iter_pending(str(path), path.name, "flow", settings, vocab, convert.SkipCounter()))
    assert len(rows) == len(pending) > 0

    labels = sorted(TREE)
    for row, item in zip(rows, pending):
        ids = np.zeros((1, config.data.seq_len), np.int32)
        ids[0, : len(item.input_ids)] = item.input_ids
        logits = model(jax.numpy.asarray(ids), jax.numpy.asarray((ids != 0).astype(np.int32)), deterministic=True)
        expected = np.asarray(jax.nn.softmax(logits, axis=-1))[0]
        assert row["label"] == labels[int(expected.argmax())]
        assert row["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
        assert len(row["top_k"]) == 2
        assert row["top_k"][0]["probability"] >= row["top_k"][1]["probability"]
        assert row["top_k"][0]["label"] == row["label"]
        assert row["first_ts"] == predict.iso_utc(row["first_ts_ns"])
        assert row["packets"] >= 1
        assert row["packet_index"] == -1
        assert list(row) == list(predict.COLUMNS)


def test_unreadable_files_are_skipped(flow_checkpoint, sample_captures, tmp_path, capsys):
    workdir, _, _ = flow_checkpoint
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"this is not a capture file at all")
    good = capture(sample_captures, "quic", 2)
    out = tmp_path / "rows.csv"

    code = predict.main(["--checkpoint", str(workdir), str(garbage), str(good), str(tmp_path / "missing.pcap"),
                         "--out", str(out)])
    assert code == 0
    error = capsys.readouterr().err
    assert "garbage.pcap" in error
    assert "missing.pcap" in error
    assert "from 1 of 3 files" in error
    with out.open() as stream:
        rows = list(csv.DictReader(stream))
    assert rows
    assert {row["capture"] for row in rows} == {good.name}
    assert all(len(row["top_k"].split(";")) == 3 for row in rows)


def test_no_readable_file_exits_with_1(flow_checkpoint, tmp_path):
    workdir, _, _ = flow_checkpoint
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"\x00" * 64)
    assert predict.main(["--checkpoint", str(workdir), str(garbage), "--out", str(tmp_path / "rows.csv")]) == 1


def test_level_mismatch_rejected(flow_checkpoint, sample_captures, tmp_path, capsys):
    workdir, _, _ = flow_checkpoint
    code = predict.main(["--checkpoint", str(workdir), str(capture(sample_captures, "ssh")), "--level", "packet",
                         "--out", str(tmp_path / "rows.csv")])
    assert code == 2
    assert "fine-tuned on flow-level examples" in capsys.readouterr().err


@pytest.mark.slow
def test_packet_level_rows(manifest, sample_captures, tmp_path):
    write_classifier_checkpoint(tmp_path / "packet-model", manifest, "packet")
    path = capture(sample_captures, "tls12", 2)
    out = tmp_path / "rows.jsonl"
    assert predict.main(["--checkpoint", str(tmp_path / "packet-model"), str(path), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    loaded = predict.Classifier(str(tmp_path / "packet-model"), batch_size=8)
    settings = predict.convert_settings(loaded.config, loaded.info)
    examples = list(convert.iter_packet_examples([str(path)], settings, Vocab.from_manifest(loaded.config.tokenizer)))
    assert len(rows) == len(examples) > 0
    assert [row["packet_index"] for row in rows] == [example.packet_index for example in examples]
    assert all(row["packets"] == 1 and row["first_ts_ns"] == row["last_ts_ns"] for row in rows)
