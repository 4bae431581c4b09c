"""Tests of the glibc malloc huge-page setting: parsing, environment edits, the start-up hint."""

import os
import subprocess
import sys

from etbert_jax import host_memory


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(path) == "madvise"

    path.write_text("[always] madvise never\n")
    assert host_memory.thp_mode(path) == "always"

    path.write_text("garbage\n")
    assert host_memory.thp_mode(path) is None
    assert host_memory.thp_mode(tmp_path / "missing") is None


def test_hugetlb_enabled():
    assert host_memory.hugetlb_enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert host_memory.hugetlb_enabled({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0x1"})
    assert host_memory.hugetlb_enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=01"})
    assert host_memory.hugetlb_enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.hugetlb=1"})
    assert not host_memory.hugetlb_enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.hugetlb=0"})
    assert not host_memory.hugetlb_enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    for value in ("00", "0x0", "-1", "abc", "2", ""):
        assert not host_memory.hugetlb_enabled({"GLIBC_TUNABLES": f"glibc.malloc.hugetlb={value}"}), value
    assert not host_memory.hugetlb_enabled({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert not host_memory.hugetlb_enabled({})


def test_with_hugetlb_keeps_other_tunables():
    base = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}

    on = host_memory.with_hugetlb(base, True)
    assert on["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert on["PATH"] == "/bin"
    assert base["GLIBC_TUNABLES"].endswith("hugetlb=0"), "the input mapping must not change"

    off = host_memory.with_hugetlb(on, False)
    assert off["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
    assert "GLIBC_TUNABLES" not in host_memory.with_hugetlb({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, False)
    assert host_memory.with_hugetlb({}, True)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_hint_only_where_it_helps():
    if not sys.platform.startswith("linux"):
        assert host_memory.hint({}, mode="madvise") is None
        return
    hint = host_memory.hint({}, mode="madvise")
    assert hint is not None and "GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in hint
    assert host_memory.hint({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, mode="madvise") is None
    assert host_memory.hint({}, mode="always") is None
    assert host_memory.hint({}, mode="never") is None


def test_glibc_accepts_the_tunable():
    # A process started with the tunable runs normally (glibc ignores tunables it does not know,
    # so this guards against a typo that would break start-up, not against a silent no-op).
    env = host_memory.with_hugetlb(os.environ, True)
    done = subprocess.run([sys.executable, "-c", "import os; print(os.environ['GLIBC_TUNABLES'])"],
                          capture_output=True, text=True, env=env, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "glibc.malloc.hugetlb=1" in done.stdout
