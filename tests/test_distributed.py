"""Tests of multi-process start-up: flag and environment handling, errors, a real two-process join."""

import argparse
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

from etbert_jax import distributed

REPO = pathlib.Path(__file__).resolve().parent.parent


def _args(*argv):
    parser = argparse.ArgumentParser()
    distributed.add_flags(parser)
    return parser.parse_args(list(argv))


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1111")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    options = distributed.options_from_args(_args("--coordinator", "localhost:2222", "--process-id", "1"))
    assert options.coordinator == "localhost:2222"
    assert options.num_processes == 4
    assert options.process_id == 1


def test_environment_only(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1111")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    options = distributed.options_from_args(_args())
    assert options == distributed.DistributedOptions("localhost:1111", 2, 0, auto=False)


def test_invalid_environment_value(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
        distributed.options_from_args(_args())


def test_incomplete_explicit_settings():
    with pytest.raises(ValueError, match="needs all of --coordinator, --num-processes and --process-id"):
        distributed.initialize(distributed.DistributedOptions(coordinator="localhost:1", num_processes=2))


def test_process_id_out_of_range():
    with pytest.raises(ValueError, match="process id 2 is outside"):
        distributed.initialize(distributed.DistributedOptions("localhost:1", 2, 2))


def test_single_process_logs_topology(caplog, monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level("INFO", logger="etbert_jax.distributed")
    distributed.initialize(distributed.options_from_args(_args()))
    assert "process 0 of 1: 8 local devices, 8 global devices" in caplog.text
    assert distributed.is_primary()


_JOIN_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from etbert_jax import distributed
    distributed.initialize(distributed.options_from_args(type("Args", (), {})()))
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(np.array([jax.process_index() + 10]))
    print("RESULT", jax.process_count(), jax.device_count(), sorted(int(v) for v in np.ravel(gathered)))
""")


@pytest.mark.multiprocess
def test_two_processes_join_from_environment():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    processes = []
    for index in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))
        processes.append(subprocess.Popen([sys.executable, "-c", _JOIN_SCRIPT, str(REPO)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=240)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
        assert "RESULT 2 4 [10, 11]" in output
