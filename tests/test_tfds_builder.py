"""The TFDS builder against the Beam conversion job on the same labeled tree and settings."""

import collections
import json
import pathlib

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from etbert_jax import convert, finetune_data, records
from finetune_fixtures import CONVERT_FLAGS, TREE, make_tree
from pipelines import build_tfds, convert_finetune, tfds_builder

SETTINGS = convert.ConvertSettings(tokens_per_packet=24, flow_seq_len=96, packet_seq_len=32,
                                   max_packets_per_session=6)


@pytest.fixture(scope="module")
def built(sample_captures, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("tfds")
    tree = make_tree(sample_captures, base / "tree")
    manifest = convert_finetune.run([str(tree), "--output", str(base / "shards")] + CONVERT_FLAGS)
    builders = {level: build_tfds.build(str(tree), str(base / "data"), level, "auto", SETTINGS, [])
                for level in ("packet", "flow")}
    return {"base": base, "manifest": manifest, "builders": builders}


def shard_ids(shards: pathlib.Path, names: list[str]) -> collections.Counter:
    found = collections.Counter()
    for name in names:
        with open(shards / name, "rb") as stream:
            for data in records.read_tfrecords(stream):
                example = tf.train.Example.FromString(data)
                found[tuple(example.features.feature["input_ids"].int64_list.value)] += 1
    return found


@pytest.mark.slow
@pytest.mark.parametrize("level", ["packet", "flow"])
def test_splits_match_conversion(built, level):
    manifest = built["manifest"]
    builder = tfds.builder_from_directory(str(built["builders"][level].data_dir))
    expected = manifest["counts"]["examples_per_split"][level]
    assert {name: info.num_examples for name, info in builder.info.splits.items()} == expected

    for split in ("train", "valid", "test"):
        loaded = collections.Counter(tuple(example["input_ids"].tolist())
                                     for example in tfds.as_numpy(builder.as_dataset(split=split)))
        assert loaded == shard_ids(built["base"] / "shards", manifest["shards"][level][split]), split


def test_features_and_metadata(built):
    manifest = built["manifest"]
    builder = tfds.builder_from_directory(str(built["builders"]["flow"].data_dir))
    features = builder.info.features
    assert set(features.keys()) == {"input_ids", "label", "source", "session", "packet_index"}
    assert list(features["label"].names) == sorted(TREE)
    assert builder.info.supervised_keys == ("input_ids", "label")

    metadata = builder.info.metadata
    assert metadata["level"] == "flow"
    assert metadata["seq_len"] == manifest["seq_len"]["flow"]
    assert metadata["tokenizer"] == manifest["tokenizer"]
    assert metadata["split"]["policy"] == manifest["split"]["policy"]
    assert metadata["split"]["files_per_split"] == manifest["split"]["files_per_split"]
    assert metadata["labels"] == manifest["labels"]

    example = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))
    assert example["input_ids"][0] == 2  # [CLS]
    assert example["packet_index"] == -1
    assert len(example["input_ids"]) <= manifest["seq_len"]["flow"]


def test_finetune_source_reads_tfds(built, monkeypatch):
    from_shards = finetune_data.open_source(str(built["base"] / "shards"), "packet")
    from_dir = finetune_data.open_source(str(built["base"] / "data"), "packet")
    assert from_dir.num_examples == from_shards.num_examples
    assert from_dir.labels == from_shards.labels
    assert from_dir.seq_len == from_shards.seq_len
    assert from_dir.tokenizer == from_shards.tokenizer
    assert from_dir.split["policy"] == from_shards.split["policy"]

    batches = list(finetune_data.eval_batches(from_dir, "valid", local_batch_size=8))
    assert sum(int(batch["weights"].sum()) for batch, _ in batches) == from_dir.num_examples["valid"]
    assert all(batch["input_ids"].shape == (8, from_dir.seq_len) for batch, _ in batches)

    train = next(finetune_data.train_batches(from_dir, local_batch_size=4, shuffle_buffer=16, seed=0))
    assert train["input_ids"].shape == (4, from_dir.seq_len)
    assert set(train["labels"].tolist()) <= set(range(len(from_dir.labels)))
    assert (train["segment_ids"] == (train["input_ids"] != 0)).all()

    monkeypatch.setenv("TFDS_DATA_DIR", str(built["base"] / "data"))
    by_name = finetune_data.open_source(f"tfds:{tfds_builder.DATASET_NAME}", "flow")
    assert by_name.num_examples == built["manifest"]["counts"]["examples_per_split"]["flow"]


def test_wrong_level_directory_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither manifest.json"):
        finetune_data.open_source(str(tmp_path), "flow")


def test_missing_data_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor tfds:NAME"):
        finetune_data.open_source(str(tmp_path / "absent"), "flow")


def test_builder_configs_per_level():
    names = [config.name for config in tfds_builder.EtbertTraffic.BUILDER_CONFIGS]
    assert names == ["packet", "flow"]
    assert json.dumps(tfds_builder.EtbertTraffic.VERSION.tuple) == "[1, 0, 0]"
