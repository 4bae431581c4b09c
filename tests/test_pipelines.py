"""End-to-end tests of the Beam conversion jobs on the DirectRunner in multi-processing mode.

Shards are read back with tf.data and checked against the manifest: counts, shapes, id ranges,
labels, leakage-free splits, cross-split duplicates, packet accounting, dead letters, TSV output and
byte-identical reruns.
"""

import gzip
import json
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

from etbert_jax import main as cli
from etbert_jax import records
from pipelines import convert_finetune, convert_pretrain

pytestmark = pytest.mark.slow

BEAM_FLAGS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
CLASSES = {
    "tls13": ["arkime-curl-tls13.pcap", "zeek-tls13-ech.pcap", "zeek-tls13-psk.pcap", "zeek-tls13-hrr.pcap"],
    "ssh": ["scapy-ssh-ed25519.pcap", "tcpdump-ssh.pcap", "zeek-ssh-reverse.pcap", "zeek-ssh1-ssh2-fingerprints.pcap"],
    "quic": ["zeek-quic-doq.pcap", "zeek-quicv2-http3.pcap", "zeek-quic-chromium115-cirrus.pcap",
             "tcpdump-quic-retry.pcap"],
}
DEAD_LETTERS = {"ssh/empty.pcap", "ssh/page.pcap", "ssh/short.pcap", "ssh/notes.pcap.gz"}


def copy_capture(source: pathlib.Path, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())


@pytest.fixture(scope="module")
def capture_tree(tmp_path_factory, sample_captures):
    """A labeled tree of 3 small classes, a gzip capture, a capture series and 4 files that are not captures."""
    root = tmp_path_factory.mktemp("tree")
    for label, names in CLASSES.items():
        for name in names:
            copy_capture(sample_captures / label / name, root / label / name)
    # Two files of one series: read as one stream and kept on one side of the split.
    copy_capture(sample_captures / "tls13" / "zeek-tls13-wolfssl.pcap", root / "tls13" / "series_00001.pcap")
    copy_capture(sample_captures / "tls13" / "zeek-tls13-chrome-x25519-kyber.pcap",
                 root / "tls13" / "series_00002.pcap")

    # A gzip-compressed capture is read transparently.
    plain = root / "quic" / "tcpdump-quic-retry.pcap"
    (root / "quic" / "tcpdump-quic-retry.pcap.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()

    (root / "ssh" / "empty.pcap").write_bytes(b"")
    (root / "ssh" / "page.pcap").write_text("<!DOCTYPE html><html><body>Not Found</body></html>\n")
    (root / "ssh" / "short.pcap").write_bytes(b"\xd4\xc3\xb2\xa1\x02\x00\x04\x00\x00\x00")
    (root / "ssh" / "notes.pcap.gz").write_bytes(gzip.compress(b"just some text, not a capture\n" * 20))
    return root


def read_records(paths, spec):
    """Parse TFRecord files with tf.data into a list of dicts of numpy values."""
    dataset = tf.data.TFRecordDataset([str(p) for p in paths])
    examples = []
    for serialized in dataset:
        parsed = tf.io.parse_single_example(serialized, spec)
        example = {}
        for key, value in parsed.items():
            if isinstance(value, tf.SparseTensor):
                value = tf.sparse.to_dense(value)
            example[key] = value.numpy()
        examples.append(example)
    return examples


def shard_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.tfrecord"))}


def assert_no_temp_left(output: pathlib.Path) -> None:
    assert not list(output.glob("beam-temp-*"))
    assert not (output / ".etbert-tmp").exists()
    assert not list(output.rglob("*.incomplete"))


# ---- pre-training ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrain_run(capture_tree, tmp_path_factory):
    output = tmp_path_factory.mktemp("pretrain")
    result = convert_pretrain.run([str(capture_tree), "--output", str(output), "--num_shards", "4",
                                   "--pair_buckets", "4"] + BEAM_FLAGS)
    return output, result


def test_pretrain_manifest_and_shards(pretrain_run):
    output, result = pretrain_run
    on_disk = json.loads((output / "manifest.json").read_text())
    assert on_disk["kind"] == "pretrain"
    assert on_disk["counts"] == result["counts"]
    assert on_disk["shards"] == [f"train-{i:05d}-of-00004.tfrecord" for i in range(4)]
    assert sorted(p.name for p in output.glob("*.tfrecord")) == on_disk["shards"]
    assert on_disk["tokenizer"]["vocab_kind"] == "bigram"
    assert on_disk["tokenizer"]["header_policy"] == "anonymize"
    assert on_disk["seq_len"] == 128
    assert_no_temp_left(output)


def test_pretrain_examples_read_back(pretrain_run):
    output, result = pretrain_run
    examples = read_records(sorted(output.glob("train-*.tfrecord")), records.pretrain_feature_spec())
    counts = result["counts"]
    assert len(examples) == counts["examples"]
    assert counts["examples"] == counts["positives"] + counts["negatives"]
    assert counts["bursts"] == counts["examples"] + counts.get("bursts_too_short", 0)
    labels = {int(e["sbp_label"]) for e in examples}
    assert labels == {0, 1}

    for example in examples:
        input_ids, segment_ids = example["input_ids"], example["segment_ids"]
        assert len(input_ids) == len(segment_ids)
        assert 5 <= len(input_ids) <= 128
        assert input_ids[0] == 2
        assert input_ids[-1] == 1
        assert input_ids.min() >= 0
        assert input_ids.max() < 65541
        boundary = int(np.sum(segment_ids == 1))
        assert segment_ids.tolist() == [1] * boundary + [2] * (len(segment_ids) - boundary)
        assert input_ids[boundary - 1] == 1
        assert np.sum(input_ids == 1) >= 2


def test_pretrain_accounting_and_dead_letters(pretrain_run):
    _, result = pretrain_run
    counts = result["counts"]
    assert counts["packets_read"] == counts["packets_used"] + sum(counts["packets_skipped"].values())
    assert counts["packets_read"] > 0
    dead = {item["file"] for item in result["dead_letter"]}
    assert dead == DEAD_LETTERS
    assert all(item["reason"] for item in result["dead_letter"])


def test_pretrain_rerun_is_byte_identical(pretrain_run, capture_tree, tmp_path):
    output, _ = pretrain_run
    again = tmp_path / "again"
    # The second run goes through the `etbert` command line.
    code = cli.main(["convert-pretrain", str(capture_tree), "--output", str(again), "--num_shards", "4",
                     "--pair_buckets", "4"] + BEAM_FLAGS)
    assert code == 0
    first, second = shard_bytes(output), shard_bytes(again)
    assert list(first) == list(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs on the same input"


def test_pretrain_etbert_vocab_and_policy(sample_captures, etbert_vocab_path, tmp_path):
    output = tmp_path / "etbert"
    inputs = [str(sample_captures / "tls13" / name) for name in ("arkime-curl-tls13.pcap", "zeek-tls13-psk.pcap")]
    result = convert_pretrain.run(inputs + ["--output", str(output), "--num_shards", "2", "--header_policy",
                                            "etbert", "--vocab", str(etbert_vocab_path)] + BEAM_FLAGS)
    assert result["tokenizer"]["vocab_kind"] == "wordpiece"
    assert result["tokenizer"]["vocab_size"] == 60005
    assert result["tokenizer"]["header_policy"] == "etbert"
    examples = read_records(sorted(output.glob("train-*.tfrecord")), records.pretrain_feature_spec())
    assert len(examples) == result["counts"]["examples"] > 0
    assert max(int(e["input_ids"].max()) for e in examples) < 60005
    assert all(e["input_ids"][0] == 2 for e in examples)


# ---- fine-tuning -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finetune_run(capture_tree, tmp_path_factory):
    output = tmp_path_factory.mktemp("finetune")
    result = convert_finetune.run([str(capture_tree), "--output", str(output), "--num_shards", "2", "--tsv"]
                                  + BEAM_FLAGS)
    return output, result


def finetune_examples(output: pathlib.Path, level: str, split: str):
    return read_records(sorted((output / level).glob(f"{split}-*.tfrecord")), records.finetune_feature_spec())


def test_finetune_labels_and_manifest(finetune_run):
    output, result = finetune_run
    labels = json.loads((output / "labels.json").read_text())
    assert labels == {"quic": 0, "ssh": 1, "tls13": 2}
    on_disk = json.loads((output / "manifest.json").read_text())
    assert on_disk["kind"] == "finetune"
    assert on_disk["seq_len"] == {"packet": 128, "flow": 512}
    assert on_disk["split"]["policy"] == "capture"
    assert on_disk["split"]["warning"] is None
    for level in ("packet", "flow"):
        for split in ("train", "valid", "test"):
            names = on_disk["shards"][level][split]
            assert names == [f"{level}/{split}-{i:05d}-of-00002.tfrecord" for i in range(2)]
            assert all((output / name).is_file() for name in names)
    assert_no_temp_left(output)


def test_finetune_examples_match_manifest(finetune_run):
    output, result = finetune_run
    labels = json.loads((output / "labels.json").read_text())
    counts = result["counts"]
    total = 0
    for level, max_len in (("packet", 128), ("flow", 512)):
        for split in ("train", "valid", "test"):
            examples = finetune_examples(output, level, split)
            assert len(examples) == counts["examples_per_split"][level][split]
            total += len(examples)
            for example in examples:
                source = example["source"].decode()
                assert example["label"] == labels[source.split("/")[0]]
                assert 2 <= len(example["input_ids"]) <= max_len
                assert example["input_ids"][0] == 2
                assert example["input_ids"].max() < 65541
                assert example["segment_ids"].tolist() == [1] * len(example["input_ids"])
                if level == "flow":
                    assert example["packet_index"] == -1
                else:
                    assert example["packet_index"] >= 0
    assert total == counts["examples"]
    assert counts["examples_per_split"]["flow"]["train"] > 0
    assert counts["examples_per_split"]["packet"]["test"] > 0


def test_finetune_splits_disjoint(finetune_run):
    output, result = finetune_run
    files = result["split"]["files_per_split"]
    assert not set(files["train"]) & set(files["valid"])
    assert not set(files["train"]) & set(files["test"])
    assert not set(files["valid"]) & set(files["test"])
    all_files = set(files["train"]) | set(files["valid"]) | set(files["test"])
    assert "quic/tcpdump-quic-retry.pcap.gz" in all_files
    series_sides = [split for split, names in files.items() if "tls13/series_00001.pcap" in names]
    assert len(series_sides) == 1
    assert "tls13/series_00002.pcap" in files[series_sides[0]]

    for level in ("packet", "flow"):
        sources, sessions = {}, {}
        for split in ("train", "valid", "test"):
            examples = finetune_examples(output, level, split)
            sources[split] = {e["source"].decode() for e in examples}
            if "quic/tcpdump-quic-retry.pcap.gz" in files[split]:
                assert "quic/tcpdump-quic-retry.pcap.gz" in sources[split]
            sessions[split] = {(e["source"].decode(), e["session"].decode()) for e in examples}
            assert sources[split] <= set(files[split])
        for first, second in (("train", "valid"), ("train", "test"), ("valid", "test")):
            assert not sources[first] & sources[second]
            assert not sessions[first] & sessions[second]
    assert result["split"]["sessions_in_several_splits"] == 0


def test_finetune_no_cross_split_duplicates(finetune_run):
    output, result = finetune_run
    for level in ("packet", "flow"):
        seen = {split: {tuple(e["input_ids"].tolist()) for e in finetune_examples(output, level, split)}
                for split in ("train", "valid", "test")}
        assert not seen["train"] & seen["valid"]
        assert not seen["train"] & seen["test"]
        assert not seen["valid"] & seen["test"]
    removed = result["split"]["duplicates_removed"]
    assert set(removed) == {"packet", "flow"}
    assert removed["packet"]["train"] == 0


def test_finetune_accounting_and_dead_letters(finetune_run):
    _, result = finetune_run
    counts = result["counts"]
    assert counts["packets_read"] == counts["packets_used"] + sum(counts["packets_skipped"].values())
    assert {item["file"] for item in result["dead_letter"]} == DEAD_LETTERS


def test_finetune_tsv(finetune_run):
    output, result = finetune_run
    for level in ("packet", "flow"):
        for split in ("train", "valid", "test"):
            lines = (output / "tsv" / level / f"{split}.tsv").read_text().splitlines()
            assert lines[0] == "label\ttext_a"
            assert len(lines) - 1 == result["counts"]["examples_per_split"][level][split]
            for line in lines[1:4]:
                label, text = line.split("\t")
                assert int(label) in (0, 1, 2)
                assert all(len(word) == 4 and int(word, 16) >= 0 for word in text.split())


def test_finetune_rerun_is_byte_identical(finetune_run, capture_tree, tmp_path):
    output, _ = finetune_run
    again = tmp_path / "again"
    convert_finetune.run([str(capture_tree), "--output", str(again), "--num_shards", "2"] + BEAM_FLAGS)
    first, second = shard_bytes(output), shard_bytes(again)
    assert list(first) == list(second)
    for name in first:
        assert first[name] == second[name], f"{name} differs between two runs on the same input"


def test_finetune_session_fallback_and_packet_split(sample_captures, tmp_path):
    root = tmp_path / "few"
    for name in CLASSES["tls13"][:2]:
        copy_capture(sample_captures / "tls13" / name, root / "tls13" / name)
    for name in ("ndpi-ssh.pcap", "zeek-ssh-guess-bruteforce.pcap"):
        copy_capture(sample_captures / "ssh" / name, root / "ssh" / name)

    result = convert_finetune.run([str(root), "--output", str(tmp_path / "session"), "--num_shards", "1"]
                                  + BEAM_FLAGS)
    split = result["split"]
    assert split["policy"] == "session"
    assert "session" in split["warning"]
    assert split["files_per_split"] is None
    assert split["sessions_in_several_splits"] == 0
    assert sum(split["sessions_per_split"].values()) == result["counts"]["sessions"]
    assert split["sessions_per_split"]["test"] > 0
    sessions = {}
    for name in ("train", "valid", "test"):
        examples = finetune_examples(tmp_path / "session", "packet", name)
        sessions[name] = {(e["source"], e["session"]) for e in examples}
    assert not sessions["train"] & sessions["test"]
    assert not sessions["train"] & sessions["valid"]

    packet = convert_finetune.run([str(root), "--output", str(tmp_path / "packet"), "--num_shards", "1",
                                   "--split", "packet"] + BEAM_FLAGS)
    assert packet["split"]["policy"] == "packet"
    assert "inflated" in packet["split"]["warning"]
    assert packet["split"]["sessions_in_several_splits"] > 0


def test_finetune_capture_split_needs_three_files(sample_captures, tmp_path):
    root = tmp_path / "two"
    copy_capture(sample_captures / "ssh" / "tcpdump-ssh.pcap", root / "ssh" / "a.pcap")
    with pytest.raises(ValueError, match="--split session"):
        convert_finetune.run([str(root), "--output", str(tmp_path / "out"), "--split", "capture"])
    shutil.rmtree(root)


def test_missing_inputs_exit_code_2(tmp_path, capsys):
    empty = tmp_path / "empty.pcap"
    empty.mkdir()

    assert convert_pretrain.main([str(empty), "--output", str(tmp_path / "out")]) == 2
    assert "etbert convert-pretrain: error: input" in capsys.readouterr().err
    assert convert_finetune.main([str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "etbert convert-finetune: error:" in capsys.readouterr().err
