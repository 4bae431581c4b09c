"""Smoke runs of the benchmark scripts in bench/ with minimal sizes.

These check that each script runs end to end and prints its ratios. They assert no speed, because
benchmark numbers are only meaningful as ratios measured in one run on a quiet machine.
"""

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = REPO_ROOT / "bench"
# Tiny model sizes shared by the step benchmarks.
TINY_MODEL = ["--layers", "1", "--hidden", "32", "--heads", "2", "--ffn", "64", "--vocab", "300"]
# A classic pcap and a pcapng file, both small.
SMALL_PCAP = "tls13/zeek-tls13-psk.pcap"
SMALL_PCAPNG = "vpn-wireguard/ndpi-wireguard.pcap"


def _run(arguments: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Compile fast: these runs check that the scripts work, not how fast the code is.
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    # Always CPU, so that the accelerator script's refusal is what gets tested.
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable] + arguments, capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=timeout, check=False)


def _ratio(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match is not None, f"no line matching {pattern!r} in the output:\n{text}"
    return float(match.group(1))


def test_bench_convert_smoke(sample_captures, tmp_path):
    pytest.importorskip("scapy")
    captures = tmp_path / "captures"
    captures.mkdir()
    for relative in (SMALL_PCAP, SMALL_PCAPNG):
        shutil.copy(sample_captures / relative, captures / pathlib.Path(relative).name)
    result_path = tmp_path / "convert.json"

    done = _run([str(BENCH / "bench_convert.py"), "--captures", str(captures), "--min-packets", "50",
                 "--repeats", "1", "--rss-copies", "2", "--rss-capture", str(captures / "zeek-tls13-psk.pcap"),
                 "--profile", "3", "--json", str(result_path)])
    assert done.returncode == 0, done.stderr[-3000:]

    for ours in ("ours-pretrain", "ours-finetune"):
        for reference in ("dpkt-floor", "scapy-etbert"):
            assert _ratio(rf"{ours} / {reference}:\s+([0-9.]+)", done.stdout) > 0
    results = json.loads(result_path.read_text())
    counts = {name: row["packets"] for name, row in results["throughput"].items()}
    assert len(set(counts.values())) == 1, f"methods read different packet counts: {counts}"
    assert counts["dpkt-floor"] >= 50
    memory = results["memory"]
    assert memory["packets_nx"] == 2 * memory["packets_1x"]
    for kind in ("pretrain", "finetune"):
        assert memory[kind]["nx"]["packets"] == memory["packets_nx"]
        assert memory[kind]["peak_rss_ratio"] > 0
    assert len(results["profiles"]["ours-finetune"]) == 3


@pytest.mark.slow
def test_bench_train_step_smoke(tmp_path):
    pytest.importorskip("torch")
    result_path = tmp_path / "step.json"

    done = _run([str(BENCH / "bench_train_step.py"), "--seq-lens", "32", "--batch-sizes", "2", "--steps", "1",
                 "--warmup", "1", "--threads", "1", "--json", str(result_path)] + TINY_MODEL)
    assert done.returncode == 0, done.stderr[-3000:]

    assert _ratio(r"seq 32, batch 2, huge pages on for both:\s+([0-9.]+)", done.stdout) > 0
    assert _ratio(r"seq 32, batch 2, huge pages off for both:\s+([0-9.]+)", done.stdout) > 0
    assert _ratio(r"seq 32, batch 2, each at its faster setting:\s+([0-9.]+)", done.stdout) > 0
    rows = json.loads(result_path.read_text())
    assert sorted((row["framework"], row["malloc_hugepages"]) for row in rows) == [
        ("jax", "off"), ("jax", "on"), ("torch", "off"), ("torch", "on")]
    for row in rows:
        assert row["cpus"] == 1
        assert row["tokens_per_s"] > 0
        assert math.isfinite(row["last_loss"])
        # Each process ran with the malloc setting that its row reports.
        hugepages_on = "glibc.malloc.hugetlb=1" in row["glibc_tunables"].split(":")
        assert hugepages_on == (row["malloc_hugepages"] == "on")
    torch_row = next(row for row in rows if row["framework"] == "torch")
    assert torch_row["torch_threads"] == 1


def test_bench_gpu_mfu_refuses_cpu():
    done = _run([str(BENCH / "bench_gpu_mfu.py")], timeout=300)

    assert done.returncode == 2
    assert "no GPU or TPU found" in done.stderr
    assert "--allow-cpu" in done.stderr


@pytest.mark.slow
def test_bench_gpu_mfu_cpu_smoke(tmp_path):
    result_path = tmp_path / "mfu.json"

    done = _run([str(BENCH / "bench_gpu_mfu.py"), "--allow-cpu", "--preset", "tiny", "--seq-len", "32",
                 "--per-chip-batch", "2", "--steps", "1", "--warmup", "1", "--json", str(result_path)] + TINY_MODEL)
    assert done.returncode == 0, done.stderr[-3000:]

    assert "MFU:" in done.stdout
    result = json.loads(result_path.read_text())
    assert result["global_batch"] == 2 * result["chips"]
    assert result["tokens_per_s"] > 0
    assert result["flops_per_token"] > 0
