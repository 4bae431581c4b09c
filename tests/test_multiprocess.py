"""Two local JAX processes (4 CPU devices each, gloo, localhost coordinator) against one process with 8."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from etbert_jax import checkpoint
from pretrain_shards import convert_sample_shards

REPO = pathlib.Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "multiprocess_worker.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _start(shards, workdir, out, devices, distributed_flags=()):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, str(WORKER), "--shards", str(shards), "--workdir", str(workdir), "--out", str(out),
               *distributed_flags]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(processes, timeout):
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, f"worker failed with code {process.returncode}:\n{output[-4000:]}"
    return outputs


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one(sample_captures, tmp_path):
    # Two shard files per process, so each process reads whole files of its own.
    shards = convert_sample_shards(sample_captures, tmp_path / "shards", seq_len=64, num_shards=4)
    port = _free_port()
    pair = [
        _start(shards, tmp_path / "multi", tmp_path / "multi.json", devices=4, distributed_flags=(
            "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(index)))
        for index in range(2)
    ]
    single = _start(shards, tmp_path / "single", tmp_path / "single.json", devices=8)
    _finish(pair + [single], timeout=850)

    multi = json.loads((tmp_path / "multi.json").read_text())
    reference = json.loads((tmp_path / "single.json").read_text())
    assert multi["process_count"] == 2
    assert multi["device_count"] == 8
    assert reference["process_count"] == 1
    assert len(multi["losses"]) == 4
    # Three steps, an orbax save and restore across both processes, then a fourth step.
    np.testing.assert_allclose(multi["losses"], reference["losses"], rtol=1e-5)
    assert multi["losses"][-1] < multi["losses"][0]

    # The real trainer ran in both processes and saved both input positions at step 2.
    checkpoints = tmp_path / "multi" / "trainer" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2"]
    records = [json.loads(line) for line in (tmp_path / "multi" / "trainer" / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2]
    reader = checkpoint.Checkpointer(checkpoints, save_every=1, keep=1)
    cursor = reader.read_cursor(2)
    reader.close()
    assert cursor["process_count"] == 2
    assert cursor["positions"] == [[0, 2], [0, 2]]
