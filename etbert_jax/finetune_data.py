"""Fine-tuning input: labeled examples from `etbert convert-finetune` shards or from a TFDS dataset.

`open_source(data, level)` accepts

- a shards directory (`DIR/manifest.json` of kind "finetune", `DIR/<level>/<split>-*.tfrecord`);
- `tfds:NAME` or `tfds:NAME/CONFIG`, loaded with `tfds.builder` from the default TFDS data
  directory (or `$TFDS_DATA_DIR`); the config defaults to the level;
- a directory written by `tfds build`: one that contains `dataset_info.json`, or a parent of such
  directories, of which the one whose config matches the level is read.

Both kinds of source give the same element dicts, so training never sees which one it reads:

    input_ids     int32 [seq_len]  [CLS] + tokens, 0-padded
    segment_ids   int32 [seq_len]  1 on tokens, 0 on padding
    labels        int32 []         index into the class names
    source, session (bytes) and packet_index (int64) for reports

The manifest facts that fine-tuning checks (tokenizer block, sequence length per level, split
policy) come from `manifest.json` beside shards and from the TFDS dataset's metadata, which the
builder in `pipelines/tfds_builder.py` fills with the same manifest.

Each process reads a disjoint share: shard files `files[i::n]`, or `tfds.even_splits` of a split.
Training streams repeat without end and the trainer counts steps per epoch from the split size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from etbert_jax import records

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.json"
SPLITS = ("train", "valid", "test")
TFDS_PREFIX = "tfds:"
# Name under which pipelines/tfds_builder.py registers its builder.
TFDS_DATASET_NAME = "etbert_traffic"


@dataclasses.dataclass(frozen=True)
class FinetuneSource:
    """A labeled fine-tuning dataset at one level, from shards or TFDS."""

    # The data argument as given, for messages.
    description: str
    # "packet" or "flow".
    level: str
    # Class names in label-index order.
    labels: tuple[str, ...]
    # The shards' tokenizer block (vocab kind, size and sha256, header policy, bytes and tokens per packet).
    tokenizer: dict[str, Any]
    # Maximum example length at this level, [CLS] included.
    seq_len: int
    # The manifest's `split` section (policy, warning, files per split, ...).
    split: dict[str, Any]
    # Examples per split name.
    num_examples: dict[str, int]
    # Conversion options of the manifest (session timeouts, packet caps, ...), for prediction.
    conversion: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Shard files per split (shards) or None (TFDS).
    files: dict[str, list[str]] | None = None
    # Directory of the prepared TFDS dataset (TFDS) or None (shards).
    tfds_dir: str | None = None


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text())


def _labels_in_order(mapping: dict[str, int]) -> tuple[str, ...]:
    ordered = sorted(mapping.items(), key=lambda item: item[1])
    if [index for _, index in ordered] != list(range(len(ordered))):
        raise ValueError(f"label indexes {sorted(mapping.values())} are not 0..{len(ordered) - 1}; "
                         "re-run the conversion to write a consistent labels.json")
    return tuple(name for name, _ in ordered)


def open_source(data: str, level: str) -> FinetuneSource:
    """Describe the fine-tuning dataset `data` at `level`; raise FileNotFoundError or ValueError naming the fix."""
    if level not in ("packet", "flow"):
        raise ValueError(f"invalid level {level!r}: expected packet or flow")
    if data.startswith(TFDS_PREFIX):
        return _open_tfds_name(data[len(TFDS_PREFIX):], level, data)
    path = pathlib.Path(data)
    if not path.is_dir():
        raise FileNotFoundError(f"fine-tuning data {data} is neither a directory nor tfds:NAME; pass the output "
                                "folder of `etbert convert-finetune`, a `tfds build` data directory or tfds:NAME")
    if (path / MANIFEST_NAME).is_file():
        return _open_shards(path, level)
    return _open_tfds_dir(path, level, data)


def _open_shards(path: pathlib.Path, level: str) -> FinetuneSource:
    manifest = _read_json(path / MANIFEST_NAME)
    if manifest.get("kind") != "finetune":
        raise ValueError(f"{path / MANIFEST_NAME} describes {manifest.get('kind')!r} shards; fine-tuning needs "
                         "the output of `etbert convert-finetune`")
    labels_path = path / LABELS_NAME
    mapping = manifest.get("labels") or (_read_json(labels_path) if labels_path.is_file() else None)
    if not mapping:
        raise FileNotFoundError(f"no labels in {path / MANIFEST_NAME} and no {labels_path}; re-run the conversion")

    shards = (manifest.get("shards") or {}).get(level)
    if shards is None:
        raise ValueError(f"the manifest in {path} has no {level}-level shards (levels: "
                         f"{sorted((manifest.get('shards') or {}).keys())})")
    files = {}
    for split in SPLITS:
        names = sorted(shards.get(split, []))
        files[split] = [str(path.resolve() / name) for name in names]
        missing = [name for name in files[split] if not os.path.isfile(name)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard files listed in {path / MANIFEST_NAME} are missing, "
                                    f"e.g. {missing[0]}")

    per_split = (manifest.get("counts") or {}).get("examples_per_split", {}).get(level, {})
    return FinetuneSource(
        description=str(path), level=level, labels=_labels_in_order(mapping),
        tokenizer=dict(manifest.get("tokenizer") or {}), seq_len=int(manifest["seq_len"][level]),
        split=dict(manifest.get("split") or {}), num_examples={s: int(per_split.get(s, 0)) for s in SPLITS},
        conversion=dict(manifest.get("config") or {}), files=files)


def _open_tfds_name(name: str, level: str, description: str) -> FinetuneSource:
    import tensorflow_datasets as tfds

    # Importing the module registers the builder under TFDS_DATASET_NAME.
    from pipelines import tfds_builder  # noqa: F401

    if "/" not in name.split(":")[0]:
        name = f"{name}/{level}"
    try:
        # $TFDS_DATA_DIR is read here, at call time; tfds itself reads it once, at import.
        builder = tfds.builder(name, data_dir=os.environ.get("TFDS_DATA_DIR") or None)
    except Exception as error:  # tfds raises several types for unknown names and configs
        raise ValueError(f"TFDS dataset {name!r} could not be loaded ({error}); build it first with "
                         f"`tfds build pipelines/tfds_builder.py --manual_dir ROOT`") from error
    return _from_builder(builder, level, description)


def _open_tfds_dir(path: pathlib.Path, level: str, description: str) -> FinetuneSource:
    import tensorflow_datasets as tfds

    candidates = sorted(found.parent for found in path.rglob("dataset_info.json"))
    if not candidates:
        raise FileNotFoundError(f"{path} contains neither manifest.json (shards) nor dataset_info.json (TFDS); pass "
                                "the output folder of `etbert convert-finetune` or a `tfds build` data directory")
    matching = [found for found in candidates if _dataset_level(found) == level]
    if not matching:
        raise ValueError(f"no {level}-level TFDS dataset under {path}; found levels "
                         f"{sorted({_dataset_level(found) for found in candidates})}")
    # Several versions: the last in sorted order is the newest.
    return _from_builder(tfds.builder_from_directory(str(matching[-1])), level, description)


def _dataset_level(directory: pathlib.Path) -> str | None:
    metadata_path = directory / "metadata.json"
    if metadata_path.is_file():
        return _read_json(metadata_path).get("level")
    return None


def _from_builder(builder, level: str, description: str) -> FinetuneSource:
    metadata = dict(builder.info.metadata or {})
    if metadata.get("level") != level:
        raise ValueError(f"TFDS dataset {description} contains {metadata.get('level')!r}-level examples, but level "
                         f"{level!r} was requested; pass the matching config or --level")
    labels = tuple(builder.info.features["label"].names)
    counts = {split: int(builder.info.splits[split].num_examples) if split in builder.info.splits else 0
              for split in SPLITS}
    return FinetuneSource(
        description=description, level=level, labels=labels, tokenizer=dict(metadata.get("tokenizer") or {}),
        seq_len=int(metadata["seq_len"]), split=dict(metadata.get("split") or {}), num_examples=counts,
        conversion=dict(metadata.get("config") or {}), tfds_dir=str(builder.data_dir))


# ---- tf.data --------------------------------------------------------------------------------

def _raw_dataset(source: FinetuneSource, split: str, process_index: int, process_count: int):
    """Unpadded examples of this process's share of `split` (tf.data, deterministic order)."""
    import tensorflow as tf

    if source.files is not None:
        files = source.files[split][process_index::process_count]
        if not files:
            return None
        dataset = tf.data.TFRecordDataset(files)
        spec = records.finetune_feature_spec()

        def parse(serialized):
            example = tf.io.parse_single_example(serialized, spec)
            return {"input_ids": tf.sparse.to_dense(example["input_ids"]), "label": example["label"],
                    "source": example["source"], "session": example["session"],
                    "packet_index": example["packet_index"]}

        return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(source.tfds_dir)
    share = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    dataset = builder.as_dataset(split=share, shuffle_files=False)

    def rename(example):
        return {"input_ids": tf.cast(example["input_ids"], tf.int64), "label": example["label"],
                "source": example["source"], "session": example["session"],
                "packet_index": example["packet_index"]}

    return dataset.map(rename, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _pad_fn(seq_len: int):
    import tensorflow as tf

    def pad(example):
        ids = tf.cast(example["input_ids"], tf.int32)[:seq_len]
        ids = tf.pad(ids, [[0, seq_len - tf.shape(ids)[0]]])
        ids = tf.ensure_shape(ids, [seq_len])
        return {"input_ids": ids, "segment_ids": tf.cast(ids != 0, tf.int32),
                "labels": tf.cast(example["label"], tf.int32), "source": example["source"],
                "session": example["session"], "packet_index": example["packet_index"]}

    return pad


def train_batches(source: FinetuneSource, *, local_batch_size: int, shuffle_buffer: int, seed: int,
                  skip_batches: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Yield this process's shuffled training batches without end, skipping the first `skip_batches`.

    The order is a function of (seed, process index), so a resumed run that skips the batches
    it already consumed continues with the batches an uninterrupted run would have seen.
    """
    dataset = _raw_dataset(source, "train", process_index, process_count)
    if dataset is None:
        raise ValueError(f"process {process_index} has no training shard files in {source.description}; re-run "
                         f"the conversion with a shard count that is a multiple of {process_count}")
    dataset = dataset.map(_pad_fn(source.seq_len))
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed + 7919 * process_index, reshuffle_each_iteration=True)
    dataset = dataset.repeat().batch(local_batch_size, drop_remainder=True)
    if skip_batches:
        dataset = dataset.skip(skip_batches)
    for batch in dataset.prefetch(2).as_numpy_iterator():
        yield {"input_ids": batch["input_ids"], "segment_ids": batch["segment_ids"], "labels": batch["labels"],
               "weights": np.ones(local_batch_size, np.float32)}


def eval_batches(source: FinetuneSource, split: str, *, local_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Yield (model batch, metadata) for every example of this process's share of `split`, in order.

    The last batch is padded to `local_batch_size` with weight-0 rows; metadata (labels, source,
    session, packet_index) covers only the real rows.
    """
    dataset = _raw_dataset(source, split, process_index, process_count)
    if dataset is None:
        return
    dataset = dataset.map(_pad_fn(source.seq_len)).batch(local_batch_size)
    for batch in dataset.prefetch(2).as_numpy_iterator():
        yield pad_batch(batch, local_batch_size)


def pad_batch(batch: dict[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pad a (possibly short) batch to `size` rows with weight 0; return (model batch, real-row metadata)."""
    real = len(batch["labels"])
    if real > size:
        raise ValueError(f"batch of {real} rows is larger than the batch size {size}")
    seq_len = batch["input_ids"].shape[1]
    model_batch = {
        "input_ids": np.zeros((size, seq_len), np.int32),
        "segment_ids": np.zeros((size, seq_len), np.int32),
        "labels": np.zeros(size, np.int32),
        "weights": np.zeros(size, np.float32),
    }
    model_batch["input_ids"][:real] = batch["input_ids"]
    model_batch["segment_ids"][:real] = batch["segment_ids"]
    model_batch["labels"][:real] = batch["labels"]
    model_batch["weights"][:real] = 1.0
    metadata = {key: batch[key] for key in ("labels", "source", "session", "packet_index") if key in batch}
    return model_batch, metadata


def count_labels(source: FinetuneSource, split: str, process_count: int = 1) -> np.ndarray:
    """Count the examples of each class in `split` (one pass over its labels, every process share)."""
    counts = np.zeros(len(source.labels), np.int64)
    for index in range(process_count):
        dataset = _raw_dataset(source, split, index, process_count)
        if dataset is None:
            continue
        for labels in dataset.map(lambda example: example["label"]).batch(4096).as_numpy_iterator():
            counts += np.bincount(labels, minlength=len(source.labels))[: len(source.labels)]
    return counts
