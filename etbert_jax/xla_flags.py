"""Default XLA flags that etbert-jax adds to XLA_FLAGS before JAX starts its CPU backend.

`import etbert_jax` calls `apply_default_xla_flags()`, so every entry point (the `etbert` command,
tests, benchmarks, notebooks) gets them, provided the package is imported before JAX runs its first
computation: XLA reads XLA_FLAGS once, when the backend starts. A flag is added only when XLA_FLAGS
does not name it already, so a user overrides a default by setting that flag to any value, e.g.
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,reduce`
restores XLA's own default for the first flag below.

The flags change only how XLA's CPU backend runs a computation, not what it computes.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

# jaxlib version whose XLA accepts every flag below. An unknown flag in XLA_FLAGS aborts the
# process, so other versions get no defaults.
# NOTE: only jaxlib 0.10.2 (the pinned version) has been checked; a newer jaxlib runs without them.
VERIFIED_JAXLIB_VERSION = "0.10.2"

# (flag name, value). jaxlib 0.10.2 hands reductions to YNNPACK by default. On an AVX-512 CPU with
# 2 cores, YNNPACK took 168 ms to sum a float32 [2, 80, 65664] array over its leading axes (the MLM
# decoder's bias gradient), and XLA's own reduction took 14 ms. Every bias and LayerNorm gradient is
# such a sum. Removing "reduce" from the YNNPACK fusion types keeps YNNPACK for dot products.
DEFAULT_FLAGS: tuple[tuple[str, str], ...] = (
    ("xla_cpu_experimental_ynn_fusion_type", "-reduce"),
)


def _installed_jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def merge_default_flags(existing: str | None) -> str:
    """Return `existing` XLA_FLAGS with each default flag appended unless `existing` names it."""
    flags = (existing or "").split()
    for name, value in DEFAULT_FLAGS:
        named = re.compile(rf"^--{re.escape(name)}(=|$)")
        if not any(named.match(flag) for flag in flags):
            flags.append(f"--{name}={value}")
    return " ".join(flags)


def apply_default_xla_flags(environ: dict[str, str] | None = None) -> None:
    """Add the default flags to XLA_FLAGS in `environ` (os.environ by default) for the verified jaxlib."""
    environ = os.environ if environ is None else environ
    if _installed_jaxlib_version() != VERIFIED_JAXLIB_VERSION:
        return
    environ["XLA_FLAGS"] = merge_default_flags(environ.get("XLA_FLAGS"))
