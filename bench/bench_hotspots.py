"""Two hot spots of the conversion core, each timed against a proposed replacement on the same input.

`bench_convert.py --profile` shows where the core spends its time. This script times the two largest
items against drop-in replacements written here and checks that each replacement returns exactly the
same output as the current code:

1. `records._varints` (packed int64 lists of every example) costs 50-80 us per call on 2 CPU cores,
   whatever the length, because it runs about 30 numpy operations. Token ids stay below 2**17 in both
   vocabularies, so a table of the 131,072 precomputed varints plus one `bytes.join` does the same
   work. Other values fall back to the current function.
2. `convert.pair_bucket` searches forward for a BURST of another session separately for every
   negative, which is quadratic when a bucket contains long runs of one session. One backward pass around
   the ring finds the next other-session BURST for every position at once, so the pairing is linear.

The replacements live only here; adopting them is up to the owners of `records.py` and `convert.py`.

Usage (from the repository root):
    .venv/bin/python bench/bench_hotspots.py --repeats 3
"""

from __future__ import annotations

import argparse
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
# Values below this bound are encoded from the table: every token id of both vocabularies (< 65,664),
# segment ids, labels and small packet indices.
VARINT_TABLE_LIMIT = 1 << 17


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


VARINT_TABLE = [_varint(value) for value in range(VARINT_TABLE_LIMIT)]


def varints_by_table(values: np.ndarray) -> bytes:
    """Encode an integer array as concatenated protobuf varints (proposed `records._varints`)."""
    array = np.asarray(values, dtype=np.int64).reshape(-1)
    if array.size == 0:
        return b""
    if array.min() >= 0 and array.max() < VARINT_TABLE_LIMIT:
        return b"".join([VARINT_TABLE[value] for value in array.tolist()])
    return records._varints(array)


def pair_bucket_linear(bursts: Iterable[convert.BurstHalves], bucket: int, settings: convert.ConvertSettings,
                       counts: Counter) -> list[tuple[convert.BurstHalves, bytes, int]]:
    """Build SBP pairs exactly as `convert.pair_bucket` does, in time linear in the bucket size."""
    ordered = sorted(bursts, key=lambda item: (convert.stable_hash(item.key), item.key))
    size = len(ordered)
    sessions = [item.session for item in ordered]

    # next_other[i] is the first position after i, going round the ring, whose session differs from
    # position i's. It is None when the whole bucket is one session. Two backward passes cover the wrap.
    next_other: list[int | None] = [None] * size
    for step in range(2 * size - 1, -1, -1):
        position = step % size
        following = (position + 1) % size
        if sessions[following] != sessions[position]:
            next_other[position] = following
        else:
            next_other[position] = next_other[following]

    rng = random.Random(f"{settings.seed}:pairs:{bucket}")
    pairs = []
    for position, burst in enumerate(ordered):
        if rng.random() >= settings.negative_ratio:
            pairs.append((burst, burst.b, 0))
            counts["positives"] += 1
            continue
        partner = next_other[position]
        if partner is None:
            pairs.append((burst, burst.b, 0))
            counts["positives"] += 1
            counts["negatives_unavailable"] += 1
        else:
            pairs.append((burst, ordered[partner].b, 1))
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
    mismatches = sum(records._varints(array) != varints_by_table(array) for array in arrays)
    if mismatches:
        raise SystemExit(f"varints_by_table differs from records._varints on {mismatches} arrays")

    current = _best_time(lambda: [records._varints(array) for array in arrays], repeats)
    proposed = _best_time(lambda: [varints_by_table(array) for array in arrays], repeats)
    print(f"varints: {len(arrays)} arrays (mean length {np.mean([len(a) for a in arrays]):.0f}), identical output")
    print(f"  records._varints {1e6 * current / len(arrays):8.1f} us/array; varints_by_table "
          f"{1e6 * proposed / len(arrays):8.1f} us/array; speed-up {current / proposed:.1f}x")


def compare_pairing(captures: list[pathlib.Path], repeats: int, bucket_size: int) -> None:
    """Time both pairing functions on mixed chunks of all BURSTs and on one bucket per capture.

    Mixed chunks resemble the pipeline's hash buckets over many captures. One bucket per capture is
    the worst case: a capture dominated by one session makes the current search quadratic.
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
            expected = convert.pair_bucket(chunk, bucket, settings, Counter())
            got = pair_bucket_linear(chunk, bucket, settings, Counter())
            if [(a.key, b, label) for a, b, label in expected] != [(a.key, b, label) for a, b, label in got]:
                raise SystemExit(f"pair_bucket_linear differs from convert.pair_bucket ({layout}, bucket {bucket})")

        current = _best_time(lambda: [convert.pair_bucket(c, i, settings, Counter()) for i, c in enumerate(chunks)],
                             repeats)
        proposed = _best_time(lambda: [pair_bucket_linear(c, i, settings, Counter()) for i, c in enumerate(chunks)],
                              repeats)
        print(f"pairing, {layout}: {len(every)} BURSTs in {len(chunks)} buckets, identical pairs")
        print(f"  convert.pair_bucket {current:7.3f} s; pair_bucket_linear {proposed:7.3f} s; "
              f"speed-up {current / proposed:.1f}x")


def main(argv: list[str] | None = None) -> int:
    """Run both comparisons and print their timings; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=pathlib.Path, default=DEFAULT_CAPTURES,
                        help="folder searched recursively for *.pcap and *.pcapng (default: data/sample-captures)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each function; best is kept (default: 3)")
    parser.add_argument("--bucket-size", type=int, default=4096, help="BURSTs per pairing chunk (default: 4096)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.bucket_size < 1:
        raise SystemExit(f"--repeats and --bucket-size must be >= 1, got {args.repeats} and {args.bucket_size}")
    logging.getLogger("etbert_jax").setLevel(logging.ERROR)

    captures = sorted(path for pattern in ("*.pcap", "*.pcapng") for path in args.captures.rglob(pattern))
    if not captures:
        raise SystemExit(f"no *.pcap or *.pcapng files under {args.captures}")
    compare_varints(captures, args.repeats)
    compare_pairing(captures, args.repeats, args.bucket_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
