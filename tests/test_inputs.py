"""Tests for pipelines.inputs: expanding files, folders and globs; listing a labeled tree."""

import pytest

from pipelines import inputs


@pytest.fixture()
def tree(tmp_path):
    for name in ("a/one.pcap", "a/sub/two.pcapng", "a/three.pcap.gz", "a/dump.pcap1", "b/x.cap",
                 "b/README.md", "b/.hidden.pcap", "top.pcap", "c/notes.txt"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return tmp_path


def test_folder_lists_capture_names(tree):
    found = inputs.list_folder(str(tree / "a"))
    names = [path.rsplit("/", 1)[-1] for path in found]
    assert sorted(names) == ["dump.pcap1", "one.pcap", "three.pcap.gz", "two.pcapng"]


def test_expand_folder_names_relative(tree):
    found = dict(inputs.expand_inputs([str(tree)]))
    assert sorted(found.values()) == ["a/dump.pcap1", "a/one.pcap", "a/sub/two.pcapng", "a/three.pcap.gz",
                                      "b/x.cap", "top.pcap"]


def test_expand_file_and_glob(tree):
    explicit = inputs.expand_inputs([str(tree / "b" / "README.md")])
    assert [name for _, name in explicit] == ["README.md"]
    globbed = inputs.expand_inputs([str(tree / "a" / "**" / "*.pcap*")])
    assert sorted(name for _, name in globbed) == ["dump.pcap1", "one.pcap", "sub/two.pcapng", "three.pcap.gz"]


def test_expand_name_collision_uses_full_path(tree):
    found = inputs.expand_inputs([str(tree / "a" / "one.pcap"), str(tree / "top.pcap"), str(tree / "a")])
    names = [name for _, name in found]
    assert len(names) == len(set(names))
    assert str(tree / "a" / "one.pcap") in names


def test_expand_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no capture"):
        inputs.expand_inputs([str(tmp_path / "nothing-*.pcap")])


def test_labeled_tree(tree):
    listed = inputs.list_labeled_tree(str(tree))
    assert sorted(listed) == ["a", "b"]
    assert sorted(name for _, name in listed["a"]) == ["a/dump.pcap1", "a/one.pcap", "a/sub/two.pcapng",
                                                       "a/three.pcap.gz"]
    assert [name for _, name in listed["b"]] == ["b/x.cap"]


def test_labeled_tree_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        inputs.list_labeled_tree(str(tmp_path / "missing"))
    (tmp_path / "empty-class").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folder"):
        inputs.list_labeled_tree(str(tmp_path))
