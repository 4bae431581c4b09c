"""Test set-up shared by every test file.

Eight fake CPU devices are requested before anything imports JAX, so that data-parallel,
FSDP and tensor-parallel meshes can be exercised without accelerators.
"""

import os
import pathlib
import shutil

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
SHARED_PCAPS = SHARED / "data" / "pcaps"
HARD_CASES = SHARED / "data" / "hard-cases"
ETBERT_VOCAB = SHARED / "data" / "etbert" / "encryptd_vocab.txt"
SAMPLE_CAPTURES = REPO_ROOT / "data" / "sample-captures"


@pytest.fixture(scope="session")
def shared_pcaps() -> pathlib.Path:
    if not SHARED_PCAPS.is_dir():
        pytest.skip(f"shared capture corpus not found at {SHARED_PCAPS}")
    return SHARED_PCAPS


@pytest.fixture(scope="session")
def hard_cases() -> pathlib.Path:
    if not HARD_CASES.is_dir():
        pytest.skip(f"hard cases not found at {HARD_CASES}")
    return HARD_CASES


@pytest.fixture(scope="session")
def etbert_vocab_path() -> pathlib.Path:
    if not ETBERT_VOCAB.is_file():
        pytest.skip(f"ET-BERT vocab not found at {ETBERT_VOCAB}")
    return ETBERT_VOCAB


@pytest.fixture(scope="session")
def sample_captures() -> pathlib.Path:
    return SAMPLE_CAPTURES


@pytest.fixture(scope="session")
def tshark_path() -> str:
    path = shutil.which("tshark")
    if path is None:
        pytest.skip("tshark is not installed; the session-count oracle test did not run")
    return path
