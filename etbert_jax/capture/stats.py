"""Packet accounting for the capture layer: packets read, used and skipped by reason.

`SkipCounter` keeps exact counts and logs rate-limited warnings. Counting follows one rule, so that
`packets_read == packets_used + sum(packets_skipped.values())` is true once every record is handled:

- the reader calls `count_read()` once for every record it meets, complete or damaged;
- the consumer of a record then calls exactly one of `count_used()` or `count_skipped(...)`.

The reader also calls `count_skipped(...)` itself for damaged records that it never passes on.

Warnings are limited per (file, reason) to the first `warn_limit` occurrences. `finish_file(name)` logs
one summary line for each reason whose warnings were held back. The counts themselves are never limited.
Counters merge with `merge()` or `+`, so per-file counters can be summed by a pipeline.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger(__name__)

# Warnings logged per (file, reason) before further ones are only counted.
DEFAULT_WARN_LIMIT = 5


class SkipCounter:
    """Exact counts of packets read, used and skipped by reason, with rate-limited warnings."""

    def __init__(self, warn_limit: int = DEFAULT_WARN_LIMIT) -> None:
        # Warnings logged per (file, reason); later occurrences are counted and summarised.
        self.warn_limit = warn_limit
        self.packets_read = 0
        self.packets_used = 0
        self.packets_skipped: Counter[str] = Counter()
        # Occurrences per (file, reason), used only to rate-limit warnings.
        self._seen: Counter[tuple[str, str]] = Counter()

    def count_read(self, n: int = 1) -> None:
        self.packets_read += n

    def count_used(self, n: int = 1) -> None:
        self.packets_used += n

    def count_skipped(self, reason: str, file: str, where: str, detail: str = "") -> None:
        """Count one skipped packet and log a warning naming the file and position.

        `where` locates the packet, e.g. "packet 12" or "byte offset 2962"; `detail` adds the bad value.
        """
        self.packets_skipped[reason] += 1
        key = (file, reason)
        self._seen[key] += 1
        if self._seen[key] <= self.warn_limit:
            suffix = f": {detail}" if detail else ""
            logger.warning("%s: %s skipped (%s)%s", file, where, reason, suffix)

    def finish_file(self, file: str) -> None:
        """Log one summary line per reason whose warnings were held back for `file`."""
        for (name, reason), n in sorted(self._seen.items()):
            if name == file and n > self.warn_limit:
                logger.warning(
                    "%s: %d more packets skipped (%s) without a warning line each",
                    file, n - self.warn_limit, reason,
                )
        for key in [k for k in self._seen if k[0] == file]:
            del self._seen[key]

    @property
    def total_skipped(self) -> int:
        return sum(self.packets_skipped.values())

    def is_balanced(self) -> bool:
        """Return whether every record read has been counted as used or skipped."""
        return self.packets_read == self.packets_used + self.total_skipped

    def merge(self, other: SkipCounter) -> SkipCounter:
        """Add `other`'s counts into this counter in place and return it."""
        self.packets_read += other.packets_read
        self.packets_used += other.packets_used
        self.packets_skipped.update(other.packets_skipped)
        return self

    def __add__(self, other: SkipCounter) -> SkipCounter:
        total = SkipCounter(self.warn_limit)
        total.merge(self)
        total.merge(other)
        return total

    def as_dict(self) -> dict:
        """Return the counts in the manifest's layout."""
        return {
            "packets_read": self.packets_read,
            "packets_used": self.packets_used,
            "packets_skipped": dict(sorted(self.packets_skipped.items())),
        }

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
