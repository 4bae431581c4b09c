"""Hot spots of the conversion core, each timed against the code it replaced or is meant to replace.

`bench_convert.py --profile` showed where the core spent its time. `records.py` and `convert.py` have
since adopted the two replacements first written here. This script times each against the previous
code on the same input and checks that both return exactly the same output:

1. `records._varints` (packed int64 lists of every example) used to run about 30 numpy operations per
   array whatever its length (`records._varints_numpy`, still the fallback). Token ids stay below
   2**17 in both vocabularies, so it now joins varints from a table of the 131,072 precomputed ones.
2. `convert.pair_bucket` used to search forward for a BURST of another session separately for every
   negative (`pair_bucket_quadratic` below), which is quadratic when a bucket contains long runs of
   one session. It now finds the next other-session BURST for every position in one backward pass
   around the ring, so the pairing is linear.

A third comparison times a replacement that the conversion core has not adopted yet:

3. `records.finetune_examples` and `records.pretrain_examples` serialize a whole batch of padded id
   arrays in one numba kernel call. They are timed against `records.finetune_example` and
   `records.pretrain_example`, called once per example, on the examples of the captures (padded into
   batches before timing starts) and on synthetic batches of 128 ids drawn from the default vocabulary.

Usage (from the repository root):
    .venv/bin/python bench/bench_hotspots.py --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from etbert_jax import convert, records  # noqa: E402
from etbert_jax.capture import SkipCounter  # noqa: E402
from etbert_jax.tokenizer import Vocab  # noqa: E402

DEFAULT_CAPTURES = REPO_ROOT / "data" / "sample-captures"


def pair_bucket_quadratic(bursts: Iterable[convert.BurstHalves], bucket: int, settings: convert.ConvertSettings,
                          counts: Counter) -> list[tuple[convert.BurstHalves, bytes, int]]:
    """Build SBP pairs as `convert.pair_bucket` did before: one forward search per negative."""
    ordered = sorted(bursts, key=lambda item: (convert.stable_hash(item.key), item.key))
    rng = random.Random(f"{settings.seed}:pairs:{bucket}")
    pairs = []
    for position, burst in enumerate(ordered):
        if rng.random() >= settings.negative_ratio:
            pairs.append((burst, burst.b, 0))
            counts["positives"] += 1
            continue
        partner = None
        for step in range(1, len(ordered)):
            candidate = ordered[(position + step) % len(ordered)]
            if candidate.session != burst.session:
                partner = candidate
                break
        if partner is None:
            pairs.append((burst, burst.b, 0))
            counts["positives"] += 1
            counts["negatives_unavailable"] += 1
        else:
            pairs.append((burst, partner.b, 1))
            counts["negatives"] += 1
    return pairs


def _best_time(function: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def compare_varints(captures: list[pathlib.Path], repeats: int) -> None:
    """Time both varint encoders on the input ids of every fine-tuning example of the captures."""
    settings, vocab = convert.ConvertSettings(), Vocab.default()
    arrays = []
    for path in captures:
        for example in convert.iter_finetune_examples([str(path)], settings, vocab, stats=SkipCounter()):
            arrays.extend([example.input_ids, np.ones(len(example.input_ids), np.int64)])
    mismatches = sum(records._varints_numpy(array) != records._varints(array) for array in arrays)
    if mismatches:
        raise SystemExit(f"records._varints differs from records._varints_numpy on {mismatches} arrays")

    previous = _best_time(lambda: [records._varints_numpy(array) for array in arrays], repeats)
    current = _best_time(lambda: [records._varints(array) for array in arrays], repeats)
    print(f"varints: {len(arrays)} arrays (mean length {np.mean([len(a) for a in arrays]):.0f}), identical output")
    print(f"  records._varints_numpy (previous) {1e6 * previous / len(arrays):8.1f} us/array; records._varints "
          f"{1e6 * current / len(arrays):8.1f} us/array; speed-up {previous / current:.1f}x")


def compare_pairing(captures: list[pathlib.Path], repeats: int, bucket_size: int) -> None:
    """Time both pairing functions on mixed chunks of all BURSTs and on one bucket per capture.

    Mixed chunks resemble the pipeline's hash buckets over many captures. One bucket per capture is
    the worst case: a capture dominated by one session makes the previous search quadratic.
    """
    settings = convert.ConvertSettings()
    per_capture = []
    for path in captures:
        name = str(path)
        per_capture.append(list(convert.iter_burst_halves([name], [name], name, settings, SkipCounter(), Counter())))
    every = [item for group in per_capture for item in group]
    layouts = {
        f"mixed chunks of up to {bucket_size}": [every[i:i + bucket_size] for i in range(0, len(every), bucket_size)],
        "one bucket per capture": [group for group in per_capture if group],
    }

    for layout, chunks in layouts.items():
        for bucket, chunk in enumerate(chunks):
            expected = pair_bucket_quadratic(chunk, bucket, settings, Counter())
            got = convert.pair_bucket(chunk, bucket, settings, Counter())
            if [(a.key, b, label) for a, b, label in expected] != [(a.key, b, label) for a, b, label in got]:
                raise SystemExit(f"convert.pair_bucket differs from pair_bucket_quadratic ({layout}, bucket {bucket})")

        previous = _best_time(lambda: [pair_bucket_quadratic(c, i, settings, Counter()) for i, c in enumerate(chunks)],
                              repeats)
        current = _best_time(lambda: [convert.pair_bucket(c, i, settings, Counter()) for i, c in enumerate(chunks)],
                             repeats)
        print(f"pairing, {layout}: {len(every)} BURSTs in {len(chunks)} buckets, identical pairs")
        print(f"  pair_bucket_quadratic (previous) {previous:7.3f} s; convert.pair_bucket {current:7.3f} s; "
              f"speed-up {previous / current:.1f}x")


@dataclasses.dataclass(frozen=True)
class FinetuneBatch:
    """Arguments of one `records.finetune_examples` call."""

    # (examples, max_len) int64 token ids, zero after each row's length.
    input_ids: np.ndarray
    # Number of valid ids per row.
    lengths: np.ndarray
    # One label per example.
    labels: np.ndarray
    # Capture name of each example.
    sources: list[str]
    # Printable session of each example.
    sessions: list[str]
    # Packet position in its session; -1 for flow-level examples.
    packet_indices: np.ndarray

    def encode(self) -> list[bytes]:
        """Serialize the batch with the batched encoder."""
        return records.finetune_examples(self.input_ids, self.lengths, self.labels, self.sources, self.sessions,
                                         self.packet_indices)

    def encode_per_example(self) -> list[bytes]:
        """Serialize the batch with one `records.finetune_example` call per example."""
        return [records.finetune_example(self.input_ids[row, :length], self.labels[row], self.sources[row],
                                         self.sessions[row], self.packet_indices[row])
                for row, length in enumerate(self.lengths.tolist())]


@dataclasses.dataclass(frozen=True)
class PretrainBatch:
    """Arguments of one `records.pretrain_examples` call."""

    # (examples, max_len) int64 token ids, zero after each row's length.
    input_ids: np.ndarray
    # Number of valid ids (and segment ids) per row.
    lengths: np.ndarray
    # (examples, max_len) int64 segment ids, zero after each row's length.
    segment_ids: np.ndarray
    # One SBP label per example.
    sbp_labels: np.ndarray

    def encode(self) -> list[bytes]:
        """Serialize the batch with the batched encoder."""
        return records.pretrain_examples(self.input_ids, self.lengths, self.segment_ids, self.sbp_labels)

    def encode_per_example(self) -> list[bytes]:
        """Serialize the batch with one `records.pretrain_example` call per example."""
        return [records.pretrain_example(self.input_ids[row, :length], self.segment_ids[row, :length],
                                         self.sbp_labels[row])
                for row, length in enumerate(self.lengths.tolist())]


def pad_rows(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Return `rows` as one zero-padded (len(rows), max_len) int64 array and their lengths."""
    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    padded = np.zeros((len(rows), int(lengths.max(initial=0))), dtype=np.int64)
    for index, row in enumerate(rows):
        padded[index, :len(row)] = row
    return padded, lengths


def capture_finetune_batches(captures: list[pathlib.Path], batch_size: int) -> list[FinetuneBatch]:
    """Return the fine-tuning examples of the captures as batches of up to `batch_size` examples."""
    settings, vocab = convert.ConvertSettings(), Vocab.default()
    examples = [example for path in captures
                for example in convert.iter_finetune_examples([str(path)], settings, vocab, stats=SkipCounter())]
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        input_ids, lengths = pad_rows([example.input_ids for example in chunk])
        batches.append(FinetuneBatch(
            input_ids, lengths, labels=np.arange(start, start + len(chunk)) % 7,
            sources=[example.source for example in chunk], sessions=[example.session for example in chunk],
            packet_indices=np.array([example.packet_index for example in chunk], dtype=np.int64)))
    return batches


def capture_pretrain_batches(captures: list[pathlib.Path], batch_size: int) -> list[PretrainBatch]:
    """Return the SBP pairs of the captures (one pairing bucket per capture) as batches of examples."""
    settings, vocab = convert.ConvertSettings(), Vocab.default()
    instances, labels = [], []
    for bucket, path in enumerate(captures):
        name = str(path)
        halves = list(convert.iter_burst_halves([name], [name], name, settings, SkipCounter(), Counter()))
        for burst, b_half, label in convert.pair_bucket(halves, bucket, settings, Counter()):
            instances.append(convert.pretrain_instance(vocab.encode(burst.a), vocab.encode(b_half), vocab,
                                                       settings.seq_len))
            labels.append(label)

    batches = []
    for start in range(0, len(instances), batch_size):
        chunk = instances[start:start + batch_size]
        input_ids, lengths = pad_rows([input_ids for input_ids, _ in chunk])
        segment_ids, _ = pad_rows([segment_ids for _, segment_ids in chunk])
        batches.append(PretrainBatch(input_ids, lengths, segment_ids,
                                     np.array(labels[start:start + len(chunk)], dtype=np.int64)))
    return batches


def synthetic_batches(batch_size: int, seed: int = 0) -> tuple[list[FinetuneBatch], list[PretrainBatch]]:
    """Return one batch of each kind: 128 ids per row drawn from 0 .. 65540 (1-3 varint bytes each)."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, 65541, size=(batch_size, 128))
    lengths = np.full(batch_size, 128, dtype=np.int64)
    finetune = FinetuneBatch(input_ids, lengths, labels=rng.integers(0, 7, size=batch_size),
                             sources=["tls/capture-0001.pcap"] * batch_size,
                             sessions=[f"tcp 10.0.0.1:{40000 + row}>93.184.216.34:443" for row in range(batch_size)],
                             packet_indices=rng.integers(-1, 5, size=batch_size))
    segment_ids = np.where(np.arange(128) < 64, 1, 2) * np.ones((batch_size, 1), dtype=np.int64)
    pretrain = PretrainBatch(input_ids, lengths, segment_ids, rng.integers(0, 2, size=batch_size))
    return [finetune], [pretrain]


def compare_batch_encoders(name: str, batches: list[FinetuneBatch] | list[PretrainBatch], repeats: int) -> None:
    """Check that both encoders return the same bytes, then print their time per example."""
    count = sum(len(batch.lengths) for batch in batches)
    for index, batch in enumerate(batches):
        if batch.encode() != batch.encode_per_example():
            raise SystemExit(f"{name}: batched and per-example bytes differ in batch {index}")

    previous = _best_time(lambda: [batch.encode_per_example() for batch in batches], repeats)
    current = _best_time(lambda: [batch.encode() for batch in batches], repeats)
    mean_length = np.mean(np.concatenate([batch.lengths for batch in batches]))
    print(f"{name}: {count} examples in {len(batches)} batches (mean length {mean_length:.0f}), identical output")
    print(f"  one call per example (previous) {1e6 * previous / count:6.2f} us/example; batched "
          f"{1e6 * current / count:6.2f} us/example; speed-up {previous / current:.1f}x")


def compare_batched_records(captures: list[pathlib.Path], repeats: int, batch_size: int) -> None:
    """Time the batched record encoders against the per-example ones, on capture and synthetic batches."""
    finetune, pretrain = synthetic_batches(batch_size)
    # The first call compiles the numba kernels or loads them from the cache; keep it out of the timings.
    finetune[0].encode()
    pretrain[0].encode()

    compare_batch_encoders(f"records.finetune_examples, synthetic {batch_size} x 128 ids", finetune, repeats)
    compare_batch_encoders(f"records.pretrain_examples, synthetic {batch_size} x 128 ids", pretrain, repeats)
    compare_batch_encoders("records.finetune_examples, captures", capture_finetune_batches(captures, batch_size),
                           repeats)
    compare_batch_encoders("records.pretrain_examples, captures", capture_pretrain_batches(captures, batch_size),
                           repeats)


def main(argv: list[str] | None = None) -> int:
    """Run the three comparisons and print their timings; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=pathlib.Path, default=DEFAULT_CAPTURES,
                        help="folder searched recursively for *.pcap and *.pcapng (default: data/sample-captures)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each function; best is kept (default: 3)")
    parser.add_argument("--bucket-size", type=int, default=4096, help="BURSTs per pairing chunk (default: 4096)")
    parser.add_argument("--batch-size", type=int, default=1024,
                        help="examples per call of the batched record encoders (default: 1024)")
    args = parser.parse_args(argv)
    if min(args.repeats, args.bucket_size, args.batch_size) < 1:
        raise SystemExit(f"--repeats, --bucket-size and --batch-size must be >= 1, got {args.repeats}, "
                         f"{args.bucket_size} and {args.batch_size}")
    logging.getLogger("etbert_jax").setLevel(logging.ERROR)

    captures = sorted(path for pattern in ("*.pcap", "*.pcapng") for path in args.captures.rglob(pattern))
    if not captures:
        raise SystemExit(f"no *.pcap or *.pcapng files under {args.captures}")
    compare_varints(captures, args.repeats)
    compare_pairing(captures, args.repeats, args.bucket_size)
    compare_batched_records(captures, args.repeats, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
