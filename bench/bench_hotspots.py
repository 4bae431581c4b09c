"""Two former hot spots of the conversion core, each timed against the code it replaced.

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
