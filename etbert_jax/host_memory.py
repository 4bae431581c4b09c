"""Huge pages for host memory: the glibc setting that makes CPU training steps faster.

XLA's CPU runtime allocates its large temporary buffers afresh on every step: the gradient of the
[65664, 768] word-embedding table alone is 200 MB. glibc serves such requests with new mappings.
Where the kernel gives transparent huge pages only on request ("madvise", as on the Debian host of
docs/benchmarks.md), every 4 KiB page of them faults on first touch. The glibc tunable
`glibc.malloc.hugetlb=1` (glibc 2.35 and later) requests transparent huge pages for those
mappings, which removes most of the faults. The `base` pre-training step ran 8-12 % faster with
it on a 2-core CPU host, while PyTorch's step moved by a few percent either way
(docs/benchmarks.md).

glibc reads tunables only when a process starts, so the setting belongs in the environment of the
command that starts training (`export GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). At start-up the
trainer logs `hint()` when the setting would help. Accelerator hosts probably gain little from it,
because their big buffers are in device memory.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping

# The environment variable glibc reads its tunables from, as name=value pairs joined by ":".
TUNABLES_VARIABLE = "GLIBC_TUNABLES"
# The tunable that turns on transparent huge pages for malloc's mappings.
HUGETLB_NAME = "glibc.malloc.hugetlb"
HUGETLB_ON = f"{HUGETLB_NAME}=1"
# The file in which Linux shows the transparent huge page mode, e.g. "always [madvise] never".
THP_MODE_FILE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: pathlib.Path = THP_MODE_FILE) -> str | None:
    """Return the kernel's transparent huge page mode ("always", "madvise", "never"), or None if unknown."""
    try:
        text = path.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _pairs(tunables: str) -> list[str]:
    return [pair for pair in tunables.split(":") if pair]


def _tunable_number(text: str) -> int | None:
    """Parse a tunable value as glibc does (decimal, 0x hex or 0 octal), or return None for a non-number."""
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16)
        if len(text) > 1 and text.startswith("0"):
            return int(text[1:], 8)
        return int(text, 10)
    except ValueError:
        return None


def hugetlb_enabled(environ: Mapping[str, str]) -> bool:
    """Return whether `environ` turns on transparent huge pages for malloc (glibc.malloc.hugetlb=1).

    As in glibc, the last entry of the tunable counts. The value 2, which requests reserved
    hugetlbfs pages instead, does not count.
    """
    value = None
    for pair in _pairs(environ.get(TUNABLES_VARIABLE, "")):
        name, _, text = pair.partition("=")
        if name == HUGETLB_NAME:
            value = _tunable_number(text)
    return value == 1


def with_hugetlb(environ: Mapping[str, str], enabled: bool) -> dict[str, str]:
    """Return a copy of `environ` whose GLIBC_TUNABLES turns malloc huge pages on or leaves them off.

    Other tunables are kept. With `enabled` False any hugetlb entry is removed.
    """
    env = dict(environ)
    pairs = [pair for pair in _pairs(env.get(TUNABLES_VARIABLE, "")) if pair.partition("=")[0] != HUGETLB_NAME]
    if enabled:
        pairs.append(HUGETLB_ON)
    if pairs:
        env[TUNABLES_VARIABLE] = ":".join(pairs)
    else:
        env.pop(TUNABLES_VARIABLE, None)
    return env


def hint(environ: Mapping[str, str] | None = None, mode: str | None = None) -> str | None:
    """Return a one-line suggestion to set the tunable when it would help this Linux host, else None.

    It helps when the kernel gives huge pages only on request ("madvise") and the tunable is not set.
    """
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or hugetlb_enabled(environ):
        return None
    mode = thp_mode() if mode is None else mode
    if mode != "madvise":
        return None
    return (f"CPU steps are about 10% faster with huge pages for malloc: start the run with "
            f"{TUNABLES_VARIABLE}={HUGETLB_ON} in the environment (see etbert_jax/host_memory.py)")
