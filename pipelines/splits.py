"""Leakage-safe train/valid/test assignment and cross-split deduplication (pure functions, no Beam).

Split policies, from safest to leakiest:

- `capture`: every capture file (or capture series) goes to one split, chosen per class from the
  sorted file list with a seeded shuffle, 80/10/10 with at least one unit in valid and one in test.
  Needs at least 3 capture units per class.
- `session`: every session goes to one split, chosen the same way among the sessions of a class.
  Sessions of one capture share hosts, keys and timing, so this still leaks, and the manifest
  carries a warning.
- `packet`: every example is assigned on its own, as ET-BERT's per-sample StratifiedShuffleSplit
  does. Packets of one session land on both sides, so scores are inflated. Compatibility only.
- `auto` (default): `capture` when every class has at least 3 capture units, else `session`.

A capture series is a set of files in one folder whose names differ only in a trailing number.
Examples: `capture_00001.pcap` and `capture_00002.pcap`, editcap's `out_00001_20240101120000.pcap`,
tcpdump -C's `dump.pcap` and `dump.pcap1`. Its files are read in numeric order as one stream and never split apart.

Deduplication: among examples with equal final token ids, only those in the earliest split
(train < valid < test) are kept, so no valid or test example repeats one the model trained on.
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath
import random
import re
from collections.abc import Iterable, Sequence

SPLITS = ("train", "valid", "test")
SPLIT_POLICIES = ("auto", "capture", "session", "packet")
# Train/valid/test fractions of every class.
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
# Minimum capture units per class for a capture-level split: one each for train, valid and test.
MIN_UNITS_FOR_CAPTURE_SPLIT = 3

SESSION_SPLIT_WARNING = (
    "split by session: sessions from one capture file share hosts, keys and timing, so valid and test "
    "scores can still be optimistic; use at least 3 capture files per class for a capture-level split")
PACKET_SPLIT_WARNING = (
    "split by packet (ET-BERT compatibility): packets of one session are spread over train, valid and "
    "test, so flow-constant header fields leak and scores are inflated; do not report these as results")

# editcap -c/-i output: prefix_NNNNN_YYYYMMDDHHMMSS.ext
_EDITCAP = re.compile(r"^(?P<stem>.+_)(?P<number>\d{5})_\d{14}(?P<ext>(\.[A-Za-z0-9]+)*)$")
# name_00001.pcap, name-2.pcapng.gz, name.3.cap: a number after a separator, before the extensions.
_NUMBERED = re.compile(r"^(?P<stem>.*[._-])(?P<number>\d+)(?P<ext>(\.[A-Za-z][A-Za-z0-9]*)+)$")
# tcpdump -C/-W output: dump.pcap1, dump.pcap2 (the number follows the extension). The first file,
# dump.pcap, has no number; `group_capture_series` puts it first in the series.
_TCPDUMP = re.compile(r"^(?P<stem>.+\.(pcap|pcapng|cap|dmp))(?P<number>\d+)(?P<ext>(\.gz)?)$")


@dataclasses.dataclass(frozen=True)
class CaptureUnit:
    """A capture file, or a capture series read as one stream, with its class."""

    # Class name (the top-level folder under the input root), or "" for unlabeled input.
    label: str
    # File paths in reading order; series members are sorted by their trailing number.
    paths: tuple[str, ...]

    @property
    def key(self) -> str:
        """Stable identifier of the unit: its first path."""
        return self.paths[0]


def series_name(path: str) -> tuple[str, int] | None:
    """Return (series id, number) when the file name ends in a series number, else None."""
    folder, name = posixpath.split(path)
    for pattern in (_EDITCAP, _NUMBERED, _TCPDUMP):
        match = pattern.match(name)
        if match is not None:
            series = f"{folder}/{match.group('stem')}#{match.group('ext')}"
            return series, int(match.group("number"))
    return None


def _tcpdump_first_file_series(path: str) -> str:
    """Return the series id that tcpdump's numbered files would have if `path` were their first file."""
    base, ext = (path[:-3], ".gz") if path.endswith(".gz") else (path, "")
    return f"{base}#{ext}"


def group_capture_series(paths: Iterable[str], enabled: bool = True) -> list[tuple[str, ...]]:
    """Group paths into capture series; files without a series partner stay alone.

    Groups are sorted by their first path, members by their number, so the result does not
    depend on the listing order. With `enabled=False` every file is its own group.
    """
    unique = sorted(set(paths))
    if not enabled:
        return [(path,) for path in unique]

    by_series: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for path in unique:
        named = series_name(path)
        if named is not None:
            by_series[named[0]].append((named[1], path))

    # A series of one file is no series, and tcpdump's un-numbered first file joins its series.
    grouped = {series: members for series, members in by_series.items() if len(members) > 1}
    in_series = {path for members in grouped.values() for _, path in members}
    groups = []
    for path in unique:
        if path in in_series:
            continue
        first_of = grouped.get(_tcpdump_first_file_series(path))
        if first_of is not None:
            first_of.append((-1, path))
            in_series.add(path)
        else:
            groups.append((path,))

    for members in grouped.values():
        members.sort()
        groups.append(tuple(path for _, path in members))
    return sorted(groups)


def split_counts(n: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[int, int, int]:
    """Return (train, valid, test) sizes for n units.

    With n >= 3, valid and test get at least one unit each and train keeps at least one. With fewer
    units, everything goes to train except that n == 2 puts one unit in test.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    if n <= 0:
        return 0, 0, 0
    if n == 1:
        return 1, 0, 0
    if n == 2:
        return 1, 0, 1
    valid = max(1, round(n * fractions[1]))
    test = max(1, round(n * fractions[2]))
    while valid + test > n - 1:
        if valid >= test and valid > 1:
            valid -= 1
        elif test > 1:
            test -= 1
        else:
            break
    return n - valid - test, valid, test


def assign_splits(keys: Iterable[str], seed: int, salt: str,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """Assign each key to a split: sort, shuffle with a RNG seeded by (seed, salt), cut 80/10/10.

    `salt` is usually the class name, so that each class is shuffled independently. The result
    depends only on the set of keys, the seed and the salt.
    """
    ordered = sorted(set(keys))
    rng = random.Random(f"{seed}:{salt}")
    rng.shuffle(ordered)
    train, valid, _ = split_counts(len(ordered), fractions)
    assignment = {}
    for position, key in enumerate(ordered):
        if position < train:
            assignment[key] = "train"
        elif position < train + valid:
            assignment[key] = "valid"
        else:
            assignment[key] = "test"
    return assignment


def choose_policy(requested: str, units_per_class: dict[str, int]) -> tuple[str, str | None]:
    """Resolve the split policy and return (policy, warning or None).

    Raises ValueError when `capture` is requested but some class has fewer than 3 capture units.
    """
    if requested not in SPLIT_POLICIES:
        raise ValueError(f"unknown split policy {requested!r}; expected one of {', '.join(SPLIT_POLICIES)}")
    too_few = sorted(name for name, n in units_per_class.items() if n < MIN_UNITS_FOR_CAPTURE_SPLIT)

    if requested == "capture" and too_few:
        raise ValueError(f"--split capture needs at least {MIN_UNITS_FOR_CAPTURE_SPLIT} capture files per "
                         f"class, but these classes have fewer: {too_few}; add captures or use --split session")
    if requested == "auto":
        if not too_few:
            return "capture", None
        return "session", f"{SESSION_SPLIT_WARNING} (classes with fewer than " \
                          f"{MIN_UNITS_FOR_CAPTURE_SPLIT} capture files: {too_few})"
    if requested == "session":
        return "session", SESSION_SPLIT_WARNING
    if requested == "packet":
        return "packet", PACKET_SPLIT_WARNING
    return "capture", None


def assign_capture_splits(units: Iterable[CaptureUnit], seed: int,
                          fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """Return unit key -> split, assigned per class among that class's capture units."""
    keys_by_class: dict[str, list[str]] = collections.defaultdict(list)
    for unit in units:
        keys_by_class[unit.label].append(unit.key)
    assignment = {}
    for label, keys in keys_by_class.items():
        assignment.update(assign_splits(keys, seed, salt=f"capture:{label}", fractions=fractions))
    return assignment


def files_per_split(units: Iterable[CaptureUnit], assignment: dict[str, str]) -> dict[str, list[str]]:
    """Return split -> sorted file paths, for the manifest."""
    result: dict[str, list[str]] = {split: [] for split in SPLITS}
    for unit in units:
        result[assignment[unit.key]].extend(unit.paths)
    return {split: sorted(paths) for split, paths in result.items()}


def resolve_duplicates(splits_of_copies: Sequence[str]) -> list[bool]:
    """Return, for each copy of one token sequence, whether it is kept.

    Copies in the earliest split present are kept (several copies inside one split stay); copies
    in later splits are removed.
    """
    unknown = [s for s in splits_of_copies if s not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split names {unknown}; expected {SPLITS}")
    first = min(SPLITS.index(s) for s in splits_of_copies)
    return [SPLITS.index(s) == first for s in splits_of_copies]
