"""Exact resume after SIGKILL and a clean checkpoint on SIGTERM, with the trainer run as a subprocess."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from etbert_jax import checkpoint, sharding
from etbert_jax.config import MeshConfig
from pretrain_shards import convert_sample_shards

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 12


@pytest.fixture(scope="module")
def shards(sample_captures, tmp_path_factory):
    return convert_sample_shards(sample_captures, tmp_path_factory.mktemp("shards"), seq_len=64, num_shards=4)


def _command(shards, workdir, *overrides):
    return [sys.executable, "-m", "etbert_jax.main", "pretrain", "--config", "tiny", "--data", str(shards),
            "--workdir", str(workdir), "train.log_every=1", "data.shuffle_buffer=64", *overrides]


def _env():
    # Two CPU devices keep the subprocesses light; the mesh is data=2.
    return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_force_host_platform_device_count=2")


def _wait_for(predicate, process, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"trainer exited with code {process.returncode} before {what}:\n{output[-3000:]}")
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _complete_steps(workdir):
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _final_params(workdir):
    mesh = sharding.make_mesh(MeshConfig(data=-1))
    _, state = checkpoint.restore_pretrained(workdir, mesh, step=STEPS)

    def to_numpy(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        return np.array(leaf)

    return jax.tree_util.tree_flatten_with_path(jax.tree.map(to_numpy, state))[0]


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(shards, tmp_path):
    overrides = (f"train.steps={STEPS}", "train.checkpoint_every=3")
    # The uninterrupted run goes on in parallel with the one that gets killed.
    straight = subprocess.Popen(_command(shards, tmp_path / "straight", *overrides), env=_env(), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(_command(shards, interrupted, *overrides), env=_env(), cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: _complete_steps(interrupted), process, timeout=600, what="the first checkpoint")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        straight_output, _ = straight.communicate(timeout=900)
    finally:
        for child in (straight, process):
            if child.poll() is None:
                child.kill()
                child.wait()
    assert straight.returncode == 0, straight_output[-3000:]
    killed_at = _complete_steps(interrupted)
    assert killed_at, "no checkpoint was written before the kill"
    assert killed_at[-1] < STEPS, f"the run was not interrupted mid-training: {killed_at}"

    resumed = subprocess.run(_command(shards, interrupted, *overrides), env=_env(), cwd=REPO,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {killed_at[-1]}" in resumed.stderr

    expected, actual = _final_params(tmp_path / "straight"), _final_params(interrupted)
    assert [path for path, _ in expected] == [path for path, _ in actual]
    for (path, a), (_, b) in zip(expected, actual):
        np.testing.assert_array_equal(a, b, err_msg=f"parameter {jax.tree_util.keystr(path)} differs")

    # The logged losses of the steps after the restart match the uninterrupted run too.
    straight_log = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").open())}
    resumed_log = [json.loads(line) for line in (interrupted / "metrics.jsonl").open()]
    for record in resumed_log[-(STEPS - killed_at[-1]):]:
        assert record["loss"] == straight_log[record["step"]]


@pytest.mark.slow
def test_sigterm_saves_and_exits(shards, tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(_command(shards, workdir, "train.steps=100000", "train.checkpoint_every=100000"),
                               env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = workdir / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 2, process, timeout=600,
              what="two logged steps")
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM received: saving a checkpoint" in output

    steps = _complete_steps(workdir)
    assert len(steps) == 1
    assert 2 <= steps[0] < 100000
    assert f"pre-training stopped at step {steps[0]} (preempted)" in output
