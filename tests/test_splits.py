"""Tests for pipelines.splits: series grouping, split assignment, policy choice, deduplication."""

import collections

import pytest

from pipelines import splits
from pipelines.splits import CaptureUnit


def test_series_grouping_numeric_order():
    paths = ["a/capture_00010.pcap", "a/capture_00002.pcap", "a/capture_00001.pcap", "a/other.pcap",
             "b/capture_00003.pcap"]
    groups = splits.group_capture_series(paths)
    assert ("a/capture_00001.pcap", "a/capture_00002.pcap", "a/capture_00010.pcap") in groups
    assert ("a/other.pcap",) in groups
    # A lone numbered file in another folder is no series.
    assert ("b/capture_00003.pcap",) in groups
    assert sum(len(g) for g in groups) == len(paths)


def test_series_editcap_and_tcpdump_names():
    paths = ["x/out_00001_20240101120500.pcap", "x/out_00000_20240101120000.pcap",
             "y/dump.pcap", "y/dump.pcap2", "y/dump.pcap1"]
    groups = splits.group_capture_series(paths)
    assert ("x/out_00000_20240101120000.pcap", "x/out_00001_20240101120500.pcap") in groups
    assert ("y/dump.pcap", "y/dump.pcap1", "y/dump.pcap2") in groups
    assert len(groups) == 2


def test_series_ignores_hash_like_names(sample_captures):
    paths = sorted(str(p.relative_to(sample_captures)) for p in sample_captures.rglob("*.pcap*"))
    groups = splits.group_capture_series(paths)
    assert len(groups) == len(paths)


def test_series_disabled():
    paths = ["a/c_1.pcap", "a/c_2.pcap"]
    assert splits.group_capture_series(paths, enabled=False) == [("a/c_1.pcap",), ("a/c_2.pcap",)]
    assert splits.group_capture_series(paths) == [("a/c_1.pcap", "a/c_2.pcap")]


@pytest.mark.parametrize("n,expected", [(0, (0, 0, 0)), (1, (1, 0, 0)), (2, (1, 0, 1)), (3, (1, 1, 1)),
                                        (10, (8, 1, 1)), (25, (21, 2, 2)), (100, (80, 10, 10))])
def test_split_counts(n, expected):
    assert splits.split_counts(n) == expected


def test_split_counts_rejects_bad_fractions():
    with pytest.raises(ValueError, match="fractions"):
        splits.split_counts(10, (0.5, 0.5, 0.5))


def test_assign_splits_deterministic_and_complete():
    keys = [f"k{i}" for i in range(37)]
    first = splits.assign_splits(keys, seed=3, salt="cls")
    again = splits.assign_splits(list(reversed(keys)), seed=3, salt="cls")
    assert first == again
    assert set(first) == set(keys)
    counts = collections.Counter(first.values())
    assert counts == {"train": 29, "valid": 4, "test": 4}
    other_seed = splits.assign_splits(keys, seed=4, salt="cls")
    assert other_seed != first


def test_capture_split_per_class():
    units = [CaptureUnit(label, (f"{label}/f{i}.pcap",)) for label in ("a", "b") for i in range(5)]
    assignment = splits.assign_capture_splits(units, seed=0)
    for label in ("a", "b"):
        per_class = collections.Counter(assignment[u.key] for u in units if u.label == label)
        assert per_class["valid"] >= 1
        assert per_class["test"] >= 1
        assert per_class["train"] >= 1
    files = splits.files_per_split(units, assignment)
    assert sorted(sum(files.values(), [])) == sorted(p for u in units for p in u.paths)
    assert not set(files["train"]) & set(files["test"])


def test_series_stays_on_one_side():
    units = [CaptureUnit("a", ("a/s_1.pcap", "a/s_2.pcap", "a/s_3.pcap")),
             CaptureUnit("a", ("a/x.pcap",)), CaptureUnit("a", ("a/y.pcap",))]
    assignment = splits.assign_capture_splits(units, seed=1)
    files = splits.files_per_split(units, assignment)
    sides = [name for name, paths in files.items() if "a/s_2.pcap" in paths]
    assert len(sides) == 1
    assert {"a/s_1.pcap", "a/s_3.pcap"} <= set(files[sides[0]])


def test_choose_policy():
    assert splits.choose_policy("auto", {"a": 3, "b": 5}) == ("capture", None)
    policy, warning = splits.choose_policy("auto", {"a": 2, "b": 5})
    assert policy == "session"
    assert "'a'" in warning
    assert splits.choose_policy("session", {"a": 9})[0] == "session"
    assert "inflated" in splits.choose_policy("packet", {"a": 9})[1]
    with pytest.raises(ValueError, match="--split session"):
        splits.choose_policy("capture", {"a": 1})
    with pytest.raises(ValueError, match="unknown split policy"):
        splits.choose_policy("flow", {"a": 5})


def test_resolve_duplicates():
    assert splits.resolve_duplicates(["test", "train", "valid"]) == [False, True, False]
    assert splits.resolve_duplicates(["test", "valid"]) == [False, True]
    assert splits.resolve_duplicates(["train", "train"]) == [True, True]
    assert splits.resolve_duplicates(["test"]) == [True]
    with pytest.raises(ValueError, match="unknown split"):
        splits.resolve_duplicates(["dev"])
