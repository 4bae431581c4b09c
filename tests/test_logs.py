"""Tests of the shared console logging set-up."""

import subprocess
import sys

SCRIPT = """
import logging, sys
from etbert_jax import logs
logs.configure(sys.argv[1])
print(logging.getLevelName(logging.getLogger().level), logging.getLevelName(logging.getLogger("absl").level))
"""


def configured_levels(level: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", SCRIPT, level], capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_info_keeps_absl_at_warning():
    root, absl = configured_levels("info")
    assert root == "INFO"
    assert absl == "WARNING"


def test_stricter_level_applies_to_absl():
    root, absl = configured_levels("ERROR")
    assert root == "ERROR"
    assert absl == "ERROR"
