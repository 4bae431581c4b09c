"""Tests for pipelines.transforms outside Beam: tagging, split joins, deduplication, accounting."""

from collections import Counter

import numpy as np

from etbert_jax import records
from etbert_jax.capture import SkipCounter
from etbert_jax.convert import ConvertSettings, FinetuneExample
from pipelines import transforms


def example(level="packet", session_uid="u#1", packet_index=0, ids=(2, 10, 11)):
    return FinetuneExample(level=level, source="c/a.pcap", session="tcp a:1>b:2", session_uid=session_uid,
                           packet_index=packet_index, input_ids=np.array(ids, dtype=np.int64))


def test_only_selects_tag():
    select = transforms.only("burst")
    assert list(select(("burst", 1))) == [1]
    assert list(select(("stats", {}))) == []


def test_shard_of_spreads_and_is_stable():
    digests = [transforms.example_digest(f"origin{i}", b"data") for i in range(400)]
    shards = Counter(transforms.shard_of(d, 4) for d in digests)
    assert set(shards) == {0, 1, 2, 3}
    assert min(shards.values()) > 60
    assert transforms.example_digest("a", b"x") == transforms.example_digest("a", b"x")
    assert transforms.example_digest("a", b"x") != transforms.example_digest("b", b"x")


def test_split_unit_by_policy():
    item = example(level="flow", packet_index=-1)
    assert transforms.split_unit("session", 3, item) == ("class:3", "u#1")
    assert transforms.split_unit("packet", 3, item) == ("class:3:flow", item.uid)


def test_assign_and_attach_split():
    assigned = dict(transforms.assign_group_fn(0)(("class:0", ["s1", "s2", "s3"])))
    assert sorted(tag for tag, _ in assigned.values()) == ["split"] * 3
    assert sorted(split for _, split in assigned.values()) == ["test", "train", "valid"]

    item = example()
    joined = list(transforms.attach_split(("u#1", [("item", (0, None, item)), ("split", "valid")])))
    assert joined == [(0, "valid", item)]


def test_deduplicate_keeps_earliest_split():
    copies = [(0, "test", example(packet_index=1)), (0, "train", example(packet_index=2)),
              (0, "valid", example(packet_index=3)), (0, "train", example(packet_index=4))]
    out = list(transforms.deduplicate((("packet", "digest"), copies)))
    kept = [value for tag, value in out if tag == "example"]
    stats = [value for tag, value in out if tag == "stats"]
    assert sorted(item[2].packet_index for item in kept) == [2, 4]
    assert stats == [{"duplicates_removed": {"packet": {"valid": 1, "test": 1}}}]


def test_count_session_splits():
    assert list(transforms.count_session_splits(("s", ["train", "train"]))) == [
        ("stats", {"sessions_per_split": {"train": 1}})]
    several = list(transforms.count_session_splits(("s", ["train", "test"])))
    assert several[0][1]["sessions_in_several_splits"] == 1


def test_summary_counts_aborted_packets():
    reader = transforms._ReadUnitFn(ConvertSettings())
    stats = SkipCounter()
    stats.count_read(10)
    stats.count_used(6)
    summary = reader._summary("c/a.pcap", ["/x/c/a.pcap"], stats, Counter(sessions=2), [], ValueError("boom"))
    assert summary["packets_skipped"] == {"aborted_by_error": 4}
    assert summary["packets_read"] == summary["packets_used"] + 4
    assert summary["dead_letter"] == [{"file": "c/a.pcap", "reason": "ValueError: boom"}]
    assert summary["sessions"] == 2


def test_write_shards_and_tsv(tmp_path):
    writer = transforms.WriteShardsFn(str(tmp_path), 2)
    items = [("b" * 64, b"second"), None, ("a" * 64, b"first")]
    out = list(writer.process((("flow/train", 1), items)))
    assert out == [("stats", {"examples": 2, "examples_per_output": {"flow/train": 2},
                              "shards": ["flow/train-00001-of-00002.tfrecord"]})]
    with open(tmp_path / "flow" / "train-00001-of-00002.tfrecord", "rb") as handle:
        assert list(records.read_tfrecords(handle)) == [b"first", b"second"]

    write_tsv = transforms.write_tsv_fn(str(tmp_path))
    rows = [("u2", 1, "0102 0203"), None, ("u1", 0, "aabb")]
    assert list(write_tsv((("packet", "test"), rows))) == [("stats", {"tsv_rows": {"packet/test": 2}})]
    assert (tmp_path / "tsv" / "packet" / "test.tsv").read_text() == "label\ttext_a\n0\taabb\n1\t0102 0203\n"
