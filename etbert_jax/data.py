"""Pre-training input: per-host TFRecord reading, dynamic BURST masking and global batches.

Each process reads a disjoint subset of the shard files (`files[i::process_count]`), so the file
count must divide by the process count. Per epoch, a process shuffles its file order and its
examples with seeds derived from (seed, epoch, process index), pads every example to `seq_len`
and batches with `drop_remainder`, so every batch has the same fixed shapes:

    input_ids        int32   [B, S]   masked copy of [CLS] A [SEP] B [SEP], 0-padded
    segment_ids      int32   [B, S]   1 for [CLS] A [SEP], 2 for B [SEP], 0 for padding
    masked_positions int32   [B, M]   positions chosen for Masked BURST Modeling, 0-padded
    mbm_targets      int32   [B, M]   original ids at those positions (0 in padded slots)
    mbm_weights      float32 [B, M]   1.0 for real masked slots, 0.0 for padded slots
    sbp_labels       int32   [B]      0 same-origin BURST halves, 1 B from another BURST

Masking runs on the host in numpy after tf.data, with a generator seeded from
(seed, global step, process index). A mask therefore depends only on the example and the step,
so a resumed run reproduces the masks of an uninterrupted run, and every epoch sees fresh masks
(ET-BERT instead fixed its masks offline, five copies per example).

Masking modes:
- "span" (default): runs of consecutive tokens are masked. Bigram tokens overlap by one byte, so
  when a single token is masked both of its bytes are still visible in its neighbours and the
  prediction reduces to copying. A run of k masked tokens hides k - 1 bytes completely.
- "token": BERT's independent choice of positions, as ET-BERT does it.
In both modes `mask_prob` of the eligible positions (not special tokens, not padding) are chosen,
at most `max_predictions` per sequence; of the chosen positions 80 % become [MASK], 10 % a random
non-special token id and 10 % keep their token.

The input position (`InputCursor`: epoch and batches consumed in it) is saved in every
checkpoint. On resume each process rebuilds the epoch's dataset and skips the consumed batches,
so it continues with the next unseen batch.
"""

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

from etbert_jax import records

log = logging.getLogger(__name__)

# Special token ids shared by the bigram and the ET-BERT vocabularies: [PAD] [SEP] [CLS] [UNK] [MASK].
DEFAULT_SPECIAL_IDS = {"[PAD]": 0, "[SEP]": 1, "[CLS]": 2, "[UNK]": 3, "[MASK]": 4}

MANIFEST_NAME = "manifest.json"


@dataclasses.dataclass(frozen=True)
class MaskingSpec:
    """Parameters of dynamic Masked BURST Modeling."""

    # Fraction of eligible positions chosen per sequence, in (0, 1).
    mask_prob: float
    # "span" (runs of consecutive tokens) or "token" (independent positions).
    masking: str
    # Maximum span length in tokens for "span" masking. Span lengths are uniform in
    # [min(2, max_span), max_span].
    max_span: int
    # Static number of masked slots per sequence (M); extra choices are dropped.
    max_predictions: int
    # Vocabulary size; random replacements are drawn from the non-special ids below it.
    vocab_size: int
    # Special token ids; none of them is ever chosen or used as a replacement.
    special_ids: tuple[int, ...] = tuple(DEFAULT_SPECIAL_IDS.values())
    # Id written at chosen positions 80 % of the time.
    mask_id: int = DEFAULT_SPECIAL_IDS["[MASK]"]
    # Padding id; padding is never chosen.
    pad_id: int = DEFAULT_SPECIAL_IDS["[PAD]"]

    def __post_init__(self):
        if self.masking not in ("span", "token"):
            raise ValueError(f"masking must be 'span' or 'token', got {self.masking!r}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.max_span < 1:
            raise ValueError(f"max_span must be at least 1, got {self.max_span}")
        if self.max_predictions < 1:
            raise ValueError(f"max_predictions must be at least 1, got {self.max_predictions}")
        if self.vocab_size <= max(self.special_ids) + 1:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no non-special ids to draw replacements from")


@dataclasses.dataclass(frozen=True)
class InputCursor:
    """Read position of one process: the epoch and how many of its batches were consumed."""

    # 0-based epoch number.
    epoch: int = 0
    # Batches of that epoch already handed to the trainer.
    batches: int = 0


def _rng_for(seed: int, step: int, process_index: int) -> np.random.Generator:
    # The last entry tags the masking stream, so other uses of (seed, step, process) draw other numbers.
    return np.random.default_rng([seed & 0xFFFFFFFF, step, process_index, 0x4D424D])


def _derived_seed(*parts: int) -> int:
    # tf.data seeds are int64; SeedSequence mixes the parts so nearby epochs get unrelated orders.
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _choose_token_positions(eligible: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Give each eligible position a random score and keep the `counts[row]` lowest scores per row.
    scores = rng.random(eligible.shape)
    scores[~eligible] = np.inf
    ranks = np.argsort(np.argsort(scores, axis=1), axis=1)
    return ranks < counts[:, None]


def _choose_span_positions(eligible: np.ndarray, counts: np.ndarray, max_span: int,
                           rng: np.random.Generator) -> np.ndarray:
    chosen = np.zeros_like(eligible)
    seq_len = eligible.shape[1]
    min_span = min(2, max_span)
    for row in range(eligible.shape[0]):
        candidates = np.flatnonzero(eligible[row])
        target = int(counts[row])
        picked = 0
        attempts = 0
        # Spans that overlap chosen positions add fewer tokens, so the attempts are bounded.
        while picked < target and attempts < 20 * max(target, 1):
            attempts += 1
            start = int(candidates[rng.integers(len(candidates))])
            length = int(rng.integers(min_span, max_span + 1))
            end = min(start + length, seq_len)

            # A span stops at the first special token or padding, so it never crosses [SEP].
            window = eligible[row, start:end]
            if not window.all():
                end = start + int(np.argmin(window))
            span = np.arange(start, end)
            span = span[~chosen[row, span]][: target - picked]
            chosen[row, span] = True
            picked += len(span)
    return chosen


def mask_tokens(input_ids: np.ndarray, spec: MaskingSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Choose and corrupt MBM positions of a batch [B, S]; return the masked ids and the target arrays."""
    input_ids = np.asarray(input_ids, dtype=np.int32)
    batch, _ = input_ids.shape
    eligible = ~np.isin(input_ids, np.asarray(spec.special_ids + (spec.pad_id,), dtype=np.int32))

    # How many positions each sequence gets: mask_prob of its eligible ones, at least one, at most M.
    num_eligible = eligible.sum(axis=1)
    counts = np.minimum(np.maximum(np.rint(num_eligible * spec.mask_prob).astype(np.int64), 1), num_eligible)
    counts = np.minimum(counts, spec.max_predictions)
    if spec.masking == "span":
        chosen = _choose_span_positions(eligible, counts, spec.max_span, rng)
    else:
        chosen = _choose_token_positions(eligible, counts, rng)

    # Gather the chosen positions into M static slots, in position order, padding with 0.
    masked_positions = np.zeros((batch, spec.max_predictions), dtype=np.int32)
    mbm_weights = np.zeros((batch, spec.max_predictions), dtype=np.float32)
    order = np.argsort(~chosen, axis=1, kind="stable")[:, : spec.max_predictions]
    valid = np.take_along_axis(chosen, order, axis=1)
    masked_positions[:, : order.shape[1]] = np.where(valid, order, 0)
    mbm_weights[:, : order.shape[1]] = valid
    mbm_targets = np.where(mbm_weights > 0, np.take_along_axis(input_ids, masked_positions, axis=1), 0)

    # 80 % [MASK], 10 % random non-special id, 10 % unchanged, decided per chosen position.
    action = rng.random(chosen.shape)
    first_regular = max(spec.special_ids) + 1
    random_ids = rng.integers(first_regular, spec.vocab_size, size=chosen.shape, dtype=np.int32)
    masked_ids = input_ids.copy()
    masked_ids = np.where(chosen & (action < 0.8), spec.mask_id, masked_ids)
    masked_ids = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked_ids)
    return {
        "input_ids": masked_ids.astype(np.int32),
        "masked_positions": masked_positions,
        "mbm_targets": mbm_targets.astype(np.int32),
        "mbm_weights": mbm_weights,
    }


def read_manifest(shards_dir: str | os.PathLike) -> dict:
    """Read `manifest.json` beside pre-training shards, with clear errors for a missing or wrong directory."""
    path = pathlib.Path(shards_dir) / MANIFEST_NAME
    if not pathlib.Path(shards_dir).is_dir():
        raise FileNotFoundError(f"shard directory {shards_dir} does not exist; run `etbert convert-pretrain` "
                                "first or pass the directory that holds manifest.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the shard directory must contain the manifest.json that "
                                "`etbert convert-pretrain` writes beside the shards")
    manifest = json.loads(path.read_text())
    if manifest.get("kind", "pretrain") != "pretrain":
        raise ValueError(f"{path} describes {manifest.get('kind')!r} shards; pre-training needs the output "
                         "of `etbert convert-pretrain`")
    return manifest


def list_shards(shards_dir: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """Return the absolute shard paths listed in the manifest, checking that each exists."""
    manifest = read_manifest(shards_dir) if manifest is None else manifest
    names = manifest.get("shards") or []
    if not names:
        raise ValueError(f"the manifest in {shards_dir} lists no shards; the conversion produced no "
                         "pre-training examples (check its counts and dead_letter entries)")
    paths = [str(pathlib.Path(shards_dir).resolve() / name) for name in sorted(names)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard files listed in the manifest are missing, e.g. {missing[0]}")
    return paths


def files_for_process(files: Sequence[str], process_index: int, process_count: int) -> list[str]:
    """Return this process's disjoint share `files[process_index::process_count]`."""
    if len(files) % process_count != 0:
        raise ValueError(f"{len(files)} shard files cannot be split evenly over {process_count} processes; "
                         f"re-run the conversion with a shard count that is a multiple of {process_count}")
    return list(files[process_index::process_count])


def _epoch_dataset(files: Sequence[str], seq_len: int, batch_size: int, shuffle_buffer: int, seed: int,
                   epoch: int, process_index: int):
    import tensorflow as tf

    # File order and example order are both seeded, and interleave is deterministic, so the
    # batch sequence of an epoch is a function of (files, seed, epoch, process index).
    order = np.random.default_rng(_derived_seed(seed, epoch, process_index, 1)).permutation(len(files))
    dataset = tf.data.Dataset.from_tensor_slices([files[i] for i in order])
    dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 4), block_length=1,
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, seed=_derived_seed(seed, epoch, process_index, 2),
                                  reshuffle_each_iteration=False)

    features = records.pretrain_feature_spec()

    def parse(serialized):
        example = tf.io.parse_single_example(serialized, features)
        # Records are at most seq_len long; the slice only guards against a mismatched manifest.
        input_ids = tf.cast(tf.sparse.to_dense(example["input_ids"]), tf.int32)[:seq_len]
        segment_ids = tf.cast(tf.sparse.to_dense(example["segment_ids"]), tf.int32)[:seq_len]
        return {"input_ids": input_ids, "segment_ids": segment_ids,
                "sbp_labels": tf.cast(example["sbp_label"], tf.int32)}

    dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.padded_batch(batch_size, padded_shapes={"input_ids": [seq_len], "segment_ids": [seq_len],
                                                              "sbp_labels": []},
                                   drop_remainder=True)
    return dataset


def hide_accelerators_from_tensorflow() -> None:
    """Keep TensorFlow off GPUs and TPUs, so tf.data never takes accelerator memory from JAX."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError) as error:
        # Raised when TensorFlow has already initialized its devices, or has no TPU device type.
        log.debug("could not hide accelerators from TensorFlow: %s", error)


class PretrainInput:
    """Iterator over this process's fixed-shape, masked pre-training batches."""

    def __init__(self, files: Sequence[str], *, seq_len: int, local_batch_size: int, shuffle_buffer: int,
                 seed: int, masking: MaskingSpec, process_index: int = 0, process_count: int = 1,
                 num_epochs: int | None = None, cursor: InputCursor = InputCursor()):
        hide_accelerators_from_tensorflow()
        self.files = files_for_process(files, process_index, process_count)
        self.seq_len = seq_len
        self.local_batch_size = local_batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.masking = masking
        self.process_index = process_index
        self.num_epochs = num_epochs
        self.cursor = cursor
        self._iterator: Iterator | None = None

    def _open_epoch(self) -> None:
        dataset = _epoch_dataset(self.files, self.seq_len, self.local_batch_size, self.shuffle_buffer,
                                 self.seed, self.cursor.epoch, self.process_index)
        if self.cursor.batches:
            log.info("process %d: skipping %d consumed batches of epoch %d", self.process_index,
                     self.cursor.batches, self.cursor.epoch)
            dataset = dataset.skip(self.cursor.batches)
        self._iterator = dataset.prefetch(2).as_numpy_iterator()
        self._epoch_yielded = self.cursor.batches

    def next_batch(self, step: int) -> dict[str, np.ndarray]:
        """Return the next local batch, masked for global step `step`; StopIteration after the last epoch."""
        while True:
            if self.num_epochs is not None and self.cursor.epoch >= self.num_epochs:
                raise StopIteration(f"all {self.num_epochs} epochs consumed")
            if self._iterator is None:
                self._open_epoch()
            try:
                raw = next(self._iterator)
                break
            except StopIteration:
                if self._epoch_yielded == 0:
                    raise ValueError(
                        f"process {self.process_index}: its {len(self.files)} shard files hold fewer than "
                        f"one local batch ({self.local_batch_size} examples); use a smaller "
                        "data.global_batch_size or convert more captures") from None
                log.info("process %d: finished epoch %d after %d batches", self.process_index,
                         self.cursor.epoch, self._epoch_yielded)
                self.cursor = InputCursor(epoch=self.cursor.epoch + 1, batches=0)
                self._iterator = None

        self.cursor = InputCursor(epoch=self.cursor.epoch, batches=self.cursor.batches + 1)
        self._epoch_yielded += 1
        masked = mask_tokens(raw["input_ids"], self.masking, _rng_for(self.seed, step, self.process_index))
        return {
            "input_ids": masked["input_ids"],
            "segment_ids": raw["segment_ids"].astype(np.int32),
            "masked_positions": masked["masked_positions"],
            "mbm_targets": masked["mbm_targets"],
            "mbm_weights": masked["mbm_weights"],
            "sbp_labels": raw["sbp_labels"].astype(np.int32),
        }


def make_global_batch(local_batch: dict[str, np.ndarray], sharding) -> dict:
    """Assemble each process's local rows into global jax.Arrays sharded along the batch axis."""
    import jax

    return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local_batch.items()}


def cursor_to_json(cursors: Sequence[InputCursor], seed: int) -> dict:
    """Encode every process's cursor (index = process index) as the checkpoint's JSON item."""
    return {"seed": seed, "process_count": len(cursors),
            "positions": [[c.epoch, c.batches] for c in cursors]}


def cursor_from_json(item: dict, process_index: int, process_count: int) -> InputCursor:
    """Return this process's cursor from a checkpoint's JSON item.

    With a different process count the file assignment changes, so exact continuation is not
    possible: every process restarts at the beginning of the earliest saved epoch.
    """
    positions = item["positions"]
    if item["process_count"] == process_count:
        epoch, batches = positions[process_index]
        return InputCursor(epoch=int(epoch), batches=int(batches))
    # NOTE: after a change of process count the examples of the interrupted epoch are seen again.
    epoch = min(int(p[0]) for p in positions)
    log.warning("checkpoint was written by %d processes, this run has %d: the input restarts at the "
                "beginning of epoch %d instead of the exact position", item["process_count"], process_count, epoch)
    return InputCursor(epoch=epoch, batches=0)
