"""Tests of the launchers in launch/.

Cloud launchers run only in dry-run mode or with a scripted in-process command runner, so no
gcloud, xpk or sbatch command is executed. A fixture fails any test that tries.

The local multi-process launcher starts real local processes. Small stand-in programs check its
process handling and that its environment gives one working multi-process JAX job. A real
`etbert pretrain` run checks the whole path once the trainer exists.
"""

import importlib.util
import io
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# launch/ is not an installed package: it runs as `python -m launch.NAME` from the repository root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from launch import common, local_multiprocess, slurm_submit, tpu_vm, xpk  # noqa: E402

TRAINING_FLAGS = ["--config", "base", "--data", "gs://bucket/shards", "--workdir", "gs://bucket/runs/base"]
OVERRIDES = ["data.global_batch_size=512", "train.steps=1000"]
# Resolved before any test empties PATH.
BASH = shutil.which("bash")


@pytest.fixture
def no_external_commands(monkeypatch, tmp_path):
    """Fail the test if a launcher tries to run gcloud, xpk, sbatch or any other external command.

    The launchers run external commands only through `SubprocessRunner`, which is made to raise,
    and PATH is emptied so that no cloud tool could be found even by a direct call.
    """

    def reject_command(self, argv, *, purpose, capture=False):
        raise AssertionError(f"a launcher tried to run {purpose!r}: {argv}")

    monkeypatch.setattr(common.SubprocessRunner, "run", reject_command)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def command_lines(output: str) -> list[list[str]]:
    """Split dry-run output into commands, skipping `#` comment lines."""
    return [shlex.split(line) for line in output.splitlines() if line.strip() and not line.startswith("#")]


def flag_value(argv: list[str], flag: str) -> str:
    """Return the value of `--flag=value` or `--flag value` in an argument list."""
    for index, token in enumerate(argv):
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
        if token == flag:
            return argv[index + 1]
    raise AssertionError(f"{flag} not found in {argv}")


def bash_syntax_ok(script: str) -> None:
    result = subprocess.run([BASH, "-n", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, f"bash syntax error: {result.stderr}\n{script}"


def pretrain_argv_in(script: str) -> list[str]:
    """Find the `etbert pretrain ...` command inside a worker script and return it split."""
    for token in shlex.split(script):
        for piece in token.split("; "):
            if piece.startswith("etbert pretrain"):
                return shlex.split(piece)
    raise AssertionError(f"no etbert pretrain command in {script!r}")


# ---- common ----------------------------------------------------------------------------------

def test_overrides_reject_malformed():
    assert common.validate_overrides(OVERRIDES) == tuple(OVERRIDES)
    for bad in ["steps=10", "train.steps", "--train.steps=1", "1train.steps=2"]:
        with pytest.raises(ValueError, match="invalid config override"):
            common.validate_overrides([bad])


def test_env_assignments_parse():
    assert common.parse_env_assignments(["A=1", "B_2=x=y", "EMPTY="]) == {"A": "1", "B_2": "x=y", "EMPTY": ""}
    for bad in ["NOVALUE", "1A=2", "A-B=3"]:
        with pytest.raises(ValueError, match="invalid --env"):
            common.parse_env_assignments([bad])


def test_pretrain_argv_order():
    training = common.TrainingArgs("tiny", "/d", "/w", tuple(OVERRIDES))
    argv = common.pretrain_argv(training, resume=True, extra_flags=["--auto-distributed"])
    assert argv == ["etbert", "pretrain", "--config", "tiny", "--data", "/d", "--workdir", "/w",
                    "--auto-distributed", "--resume", *OVERRIDES]
    assert "--resume" not in common.pretrain_argv(training, resume=False)


# ---- TPU VM ----------------------------------------------------------------------------------

@pytest.mark.parametrize("accelerator, chips, hosts, runtime", [
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"),
    ("v4-64", 32, 8, "tpu-ubuntu2204-base"),
    ("v5p-32", 16, 4, "v2-alpha-tpuv5"),
    ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-4", 4, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", 16, 2, "v2-alpha-tpuv5-lite"),
    ("v6e-256", 256, 32, "v2-alpha-tpuv6e"),
])
def test_tpu_slice_shape(accelerator, chips, hosts, runtime):
    shape = tpu_vm.slice_shape(accelerator)
    assert shape.chips == chips
    assert shape.hosts == hosts
    assert tpu_vm.default_runtime_version(accelerator) == runtime


def test_tpu_unknown_accelerator_rejected():
    with pytest.raises(ValueError, match="unknown TPU accelerator type 'v9x-8'"):
        tpu_vm.slice_shape("v9x-8")


def run_tpu_dry_run(capsys, extra: list[str]) -> tuple[list[list[str]], str]:
    argv = ["--name", "etbert-pod", "--zone", "us-east5-a", "--project", "my-project",
            "--accelerator-type", "v5p-32", *TRAINING_FLAGS, *extra, *OVERRIDES, "--dry-run"]
    assert tpu_vm.main(argv) == 0
    output = capsys.readouterr().out
    return command_lines(output), output


def test_tpu_dry_run_commands(capsys, no_external_commands):
    commands, output = run_tpu_dry_run(capsys, ["--spot", "--env", "LIBTPU_INIT_ARGS=--flag=1"])
    verbs = [argv[4] if argv[0] == "gcloud" else argv[0] for argv in commands]
    assert verbs == ["describe", "create", "tar", "scp", "ssh", "ssh", "ssh", "describe"]

    gcloud = [argv for argv in commands if argv[0] == "gcloud"]
    for argv in gcloud:
        assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
        if argv[4] != "scp":
            assert argv[5] == "etbert-pod"
        assert flag_value(argv, "--zone") == "us-east5-a"
        assert flag_value(argv, "--project") == "my-project"

    create = commands[1]
    assert flag_value(create, "--accelerator-type") == "v5p-32"
    assert flag_value(create, "--version") == "v2-alpha-tpuv5"
    assert "--spot" in create

    scp = commands[3]
    assert scp[6] == "etbert-pod:etbert-jax-src.tar.gz"
    assert flag_value(scp, "--worker") == "all"

    install, start, stream = commands[4], commands[5], commands[6]
    assert flag_value(install, "--worker") == "all"
    assert "jax[tpu]==0.10.2" in flag_value(install, "--command")
    assert flag_value(start, "--worker") == "all"
    assert flag_value(stream, "--worker") == "0"
    assert "pretrain-attempt-1.log" in flag_value(start, "--command")
    assert "pretrain-attempt-1.log" in flag_value(stream, "--command")
    for argv in (install, start, stream):
        bash_syntax_ok(flag_value(argv, "--command"))

    training = pretrain_argv_in(flag_value(start, "--command"))
    assert training == ["etbert", "pretrain", *TRAINING_FLAGS, "--auto-distributed", *OVERRIDES]
    assert "export LIBTPU_INIT_ARGS=--flag=1" in flag_value(start, "--command")

    # The restart command is shown as a comment, with --resume.
    resume_line = [line for line in output.splitlines() if line.startswith("# gcloud")]
    assert len(resume_line) == 1
    resumed = pretrain_argv_in(flag_value(shlex.split(resume_line[0][2:]), "--command"))
    assert resumed == ["etbert", "pretrain", *TRAINING_FLAGS, "--auto-distributed", "--resume", *OVERRIDES]


def test_tpu_dry_run_git_clone(capsys, no_external_commands):
    commands, _ = run_tpu_dry_run(capsys, ["--preemptible", "--repo-url", "https://example.org/etbert-jax.git",
                                           "--ref", "v0.1.0", "--runtime-version", "custom-image"])
    verbs = [argv[4] if argv[0] == "gcloud" else argv[0] for argv in commands]
    assert verbs == ["describe", "create", "ssh", "ssh", "ssh", "describe"]
    assert "--preemptible" in commands[1]
    assert flag_value(commands[1], "--version") == "custom-image"
    install = flag_value(commands[2], "--command")
    assert "git clone --quiet https://example.org/etbert-jax.git" in install
    assert "checkout --quiet v0.1.0" in install
    bash_syntax_ok(install)


def test_tpu_multihost_needs_gcs_paths(capsys, no_external_commands):
    argv = ["--name", "n", "--zone", "z", "--accelerator-type", "v4-64", "--config", "base",
            "--data", "/local/shards", "--workdir", "gs://b/run", "--dry-run"]
    with pytest.raises(SystemExit) as exit_info:
        tpu_vm.main(argv)
    assert exit_info.value.code == 2
    assert "--data '/local/shards' is not a gs:// path" in capsys.readouterr().err

    assert tpu_vm.main([*argv, "--allow-local-paths"]) == 0
    start = [command for command in command_lines(capsys.readouterr().out) if "setsid" in " ".join(command)]
    assert "--data /local/shards" in flag_value(start[0], "--command")


class ScriptedRunner(common.CommandRunner):
    """Return scripted results per purpose, in order, and record every call; run nothing."""

    def __init__(self, results: dict[str, list[common.CommandResult]]):
        self.results = {purpose: list(queue) for purpose, queue in results.items()}
        self.calls: list[tuple[str, list[str]]] = []

    def run(self, argv, *, purpose, capture=False):
        self.calls.append((purpose, list(argv)))
        queue = self.results.get(purpose)
        return queue.pop(0) if queue else common.CommandResult(0)

    def note(self, text):
        pass

    def purposes(self) -> list[str]:
        return [purpose for purpose, _ in self.calls]

    def commands(self, purpose: str) -> list[list[str]]:
        return [argv for called, argv in self.calls if called == purpose]


def tpu_options(max_restarts: int = 3) -> tpu_vm.TpuVmOptions:
    return tpu_vm.TpuVmOptions(
        name="etbert-pod", zone="us-east5-a", project="my-project", accelerator_type="v4-32",
        runtime_version="tpu-ubuntu2204-base", provisioning="spot",
        training=common.TrainingArgs("base", "gs://b/shards", "gs://b/run", ("train.steps=10",)),
        max_restarts=max_restarts, restart_delay_s=30.0)


def test_tpu_preemption_recreates_and_resumes(no_external_commands):
    Result = common.CommandResult
    runner = ScriptedRunner({
        # First attempt: no VM yet; after the lost stream the VM is PREEMPTED; then it is recreated.
        "describe": [Result(1), Result(0, "PREEMPTED\n"), Result(0, "PREEMPTED\n"), Result(0, "READY\n")],
        "stream": [Result(255), Result(0)],
    })
    sleeps = []
    status = tpu_vm.TpuVmLauncher(tpu_options(), runner, sleep=sleeps.append).launch()

    assert status == 0
    assert runner.purposes() == [
        "describe", "create", "pack", "copy", "install", "train", "stream", "describe",
        "describe", "delete", "create", "pack", "copy", "install", "train", "stream", "describe"]
    assert sleeps == [30.0]

    first, second = (flag_value(argv, "--command") for argv in runner.commands("train"))
    assert "--resume" not in pretrain_argv_in(first)
    assert pretrain_argv_in(second) == ["etbert", "pretrain", "--config", "base", "--data", "gs://b/shards",
                                        "--workdir", "gs://b/run", "--auto-distributed", "--resume",
                                        "train.steps=10"]
    assert "pretrain-attempt-2.log" in second
    assert "pretrain-attempt-2.log" in flag_value(runner.commands("stream")[1], "--command")


def test_tpu_restarts_are_bounded(no_external_commands):
    Result = common.CommandResult
    runner = ScriptedRunner({
        "describe": [Result(0, "READY")] * 10,
        "stream": [Result(3)] * 10,
        "check": [Result(1)] * 10,
    })
    sleeps = []
    status = tpu_vm.TpuVmLauncher(tpu_options(max_restarts=2), runner, sleep=sleeps.append).launch()

    assert status == 3
    assert len(runner.commands("train")) == 3
    assert len(sleeps) == 2
    # A READY VM is reused: earlier runs are stopped before each attempt, nothing is recreated,
    # and the code is installed only once.
    assert runner.purposes().count("stop") == 3
    assert runner.purposes().count("install") == 1
    assert "create" not in runner.purposes()
    assert "delete" not in runner.purposes()
    resumes = ["--resume" in pretrain_argv_in(flag_value(argv, "--command")) for argv in runner.commands("train")]
    assert resumes == [False, True, True]


def test_tpu_lost_stream_reattaches(no_external_commands):
    Result = common.CommandResult
    runner = ScriptedRunner({
        "describe": [Result(0, "READY")] * 3,
        "stream": [Result(255), Result(0)],
        "check": [Result(0)],
    })
    sleeps = []
    status = tpu_vm.TpuVmLauncher(tpu_options(), runner, sleep=sleeps.append).launch()

    assert status == 0
    assert runner.purposes() == ["describe", "stop", "pack", "copy", "install", "train",
                                 "stream", "describe", "check", "stream", "describe"]
    assert sleeps == []
    check = runner.commands("check")[0]
    assert flag_value(check, "--worker") == "0"


def test_tpu_clean_exit_on_lost_vm_resumes(no_external_commands):
    Result = common.CommandResult
    # Worker 0 exits with 0 after SIGTERM, but the VM is gone: that is a preemption, not the end.
    runner = ScriptedRunner({
        "describe": [Result(0, "READY"), Result(1), Result(1), Result(0, "READY")],
        "stream": [Result(0), Result(0)],
    })
    status = tpu_vm.TpuVmLauncher(tpu_options(), runner, sleep=lambda seconds: None).launch()

    assert status == 0
    assert runner.purposes().count("create") == 1
    resumes = ["--resume" in pretrain_argv_in(flag_value(argv, "--command")) for argv in runner.commands("train")]
    assert resumes == [False, True]


def test_tpu_create_failure_counts_as_restart(no_external_commands):
    Result = common.CommandResult
    runner = ScriptedRunner({"describe": [Result(1)] * 5, "create": [Result(1)] * 5})
    status = tpu_vm.TpuVmLauncher(tpu_options(max_restarts=1), runner, sleep=lambda seconds: None).launch()
    assert status == 1
    assert runner.purposes() == ["describe", "create", "describe", "create"]


# ---- GKE through xpk -------------------------------------------------------------------------

def test_xpk_dry_run_command(capsys, no_external_commands):
    argv = ["--cluster", "tpu-cluster", "--workload", "etbert-base", "--tpu-type", "v5p-128",
            "--num-slices", "2", "--project", "my-project", "--zone", "us-east5-a",
            "--docker-image", "us-docker.pkg.dev/p/etbert:1", "--max-restarts", "5", "--spot",
            "--restart-on-user-code-failure",
            "--env", "XLA_FLAGS=--xla_dump_to=/tmp", *TRAINING_FLAGS, *OVERRIDES, "--dry-run"]
    assert xpk.main(argv) == 0
    commands = command_lines(capsys.readouterr().out)
    assert len(commands) == 1
    command = commands[0]
    assert command[:3] == ["xpk", "workload", "create"]
    assert flag_value(command, "--cluster") == "tpu-cluster"
    assert flag_value(command, "--workload") == "etbert-base"
    assert flag_value(command, "--tpu-type") == "v5p-128"
    assert flag_value(command, "--num-slices") == "2"
    assert flag_value(command, "--project") == "my-project"
    assert flag_value(command, "--zone") == "us-east5-a"
    assert flag_value(command, "--docker-image") == "us-docker.pkg.dev/p/etbert:1"
    assert flag_value(command, "--max-restarts") == "5"
    assert flag_value(command, "--env") == "XLA_FLAGS=--xla_dump_to=/tmp"
    assert "--spot" in command
    assert "--restart-on-user-code-failure" in command
    assert not any(token.startswith("--base-docker-image") for token in command)
    assert shlex.split(flag_value(command, "--command")) == [
        "etbert", "pretrain", *TRAINING_FLAGS, "--auto-distributed", *OVERRIDES]


def test_xpk_base_image_installs_project(capsys, no_external_commands):
    argv = ["--cluster", "c", "--workload", "w", "--device-type", "h100-80gb-8",
            "--script-dir", "/src/etbert-jax", *TRAINING_FLAGS, "--dry-run"]
    assert xpk.main(argv) == 0
    command = command_lines(capsys.readouterr().out)[0]
    assert flag_value(command, "--device-type") == "h100-80gb-8"
    assert flag_value(command, "--base-docker-image") == "python:3.11"
    assert flag_value(command, "--script-dir") == "/src/etbert-jax"
    assert "--restart-on-user-code-failure" not in command
    shell = flag_value(command, "--command")
    setup, _, training = shell.rpartition(" && ")
    assert "pip install --quiet --no-deps -e ." in setup
    assert shlex.split(training) == ["etbert", "pretrain", *TRAINING_FLAGS, "--auto-distributed"]
    bash_syntax_ok(shell)


def test_xpk_rejects_local_paths(capsys):
    argv = ["--cluster", "c", "--workload", "w", "--tpu-type", "v5p-8", "--config", "base",
            "--data", "gs://b/s", "--workdir", "/tmp/run", "--dry-run"]
    with pytest.raises(SystemExit):
        xpk.main(argv)
    assert "--workdir '/tmp/run' is not a gs:// path" in capsys.readouterr().err


# ---- SLURM -----------------------------------------------------------------------------------

def slurm_dry_run(capsys, extra: list[str]) -> tuple[list[str], str]:
    assert slurm_submit.main([*extra, "--dry-run"]) == 0
    output = capsys.readouterr().out
    first, marker, script = output.split("\n", 2)
    assert marker.startswith("# ---- ")
    return shlex.split(first), script


def test_slurm_dry_run_script(capsys, tmp_path, no_external_commands):
    workdir = tmp_path / "run"
    sbatch, script = slurm_dry_run(capsys, [
        "--nodes", "4", "--gpus-per-node", "8", "--partition", "h100", "--time", "2-00:00:00",
        "--account", "proj42", "--config", "base", "--data", "/shared/shards", "--workdir", str(workdir),
        *OVERRIDES])
    assert sbatch == ["sbatch", str(workdir / "slurm-pretrain.sbatch")]
    assert not workdir.exists()

    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=h100",
                     "--time=2-00:00:00", "--account=proj42", f"--output={workdir}/slurm-%j.out"]:
        assert f"#SBATCH {expected}" in directives
    keys = [line.split("=")[0] for line in directives]
    assert len(keys) == len(set(keys)), f"repeated #SBATCH options: {directives}"
    assert "--gpus-per-task" not in script
    assert "srun --kill-on-bad-exit=1" in script
    bash_syntax_ok(script)


def fake_srun_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """Make a directory with an `srun` that prints its arguments as JSON instead of starting tasks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f"#!{sys.executable}\nimport json, sys\nprint('SRUN ' + json.dumps(sys.argv[1:]))\n")
    srun.chmod(0o755)
    return bin_dir


def run_batch_script(script: pathlib.Path, bin_dir: pathlib.Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "123"}
    return subprocess.run([BASH, str(script)], env=full_env, capture_output=True, text=True, timeout=30)


def srun_argv(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("SRUN ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][5:])


def test_slurm_rendered_script_runs_srun(capsys, tmp_path):
    workdir = tmp_path / "run"
    overrides = [*OVERRIDES, "train.run_name=two words"]
    slurm_submit.main(["--config", "base", "--data", "/shared/shards", "--workdir", str(workdir),
                       "--etbert", "/opt/venv/bin/etbert", "--env", "NCCL_DEBUG=WARN", *overrides, "--dry-run"])
    script = capsys.readouterr().out.split("\n", 2)[2]
    path = tmp_path / "rendered.sbatch"
    path.write_text(script)

    result = run_batch_script(path, fake_srun_dir(tmp_path), {})
    assert result.returncode == 0, result.stderr
    assert srun_argv(result.stdout) == [
        "--kill-on-bad-exit=1", "/opt/venv/bin/etbert", "pretrain", "--config", "base",
        "--data", "/shared/shards", "--workdir", str(workdir), "--auto-distributed", *overrides]
    assert workdir.is_dir()


def test_slurm_template_reads_environment(tmp_path):
    bin_dir = fake_srun_dir(tmp_path)
    workdir = tmp_path / "run"
    env = {"ETBERT_CONFIG": "small", "ETBERT_DATA": "/d", "ETBERT_WORKDIR": str(workdir),
           "ETBERT_OVERRIDES": "train.steps=5 data.global_batch_size=64"}
    result = run_batch_script(slurm_submit.TEMPLATE, bin_dir, env)
    assert result.returncode == 0, result.stderr
    assert srun_argv(result.stdout)[1:] == [
        "etbert", "pretrain", "--config", "small", "--data", "/d", "--workdir", str(workdir),
        "--auto-distributed", "train.steps=5", "data.global_batch_size=64"]

    missing = run_batch_script(slurm_submit.TEMPLATE, bin_dir, {"ETBERT_DATA": "/d", "ETBERT_WORKDIR": "/w"})
    assert missing.returncode != 0
    assert "set ETBERT_CONFIG" in missing.stderr


def test_slurm_submit_writes_and_submits(tmp_path):
    runner = ScriptedRunner({"submit": [common.CommandResult(0)]})
    workdir = tmp_path / "run"
    status = slurm_submit.main(["--nodes", "2", "--config", "base", "--data", "/d", "--workdir", str(workdir)],
                               runner=runner)
    assert status == 0
    script_path = workdir / "slurm-pretrain.sbatch"
    assert runner.commands("submit") == [["sbatch", str(script_path)]]
    assert "#SBATCH --nodes=2" in script_path.read_text()


def test_slurm_rejects_bad_time(capsys):
    with pytest.raises(SystemExit):
        slurm_submit.main(["--time", "tomorrow", "--config", "b", "--data", "/d", "--workdir", "/w", "--dry-run"])
    assert "--time 'tomorrow' is not a SLURM time" in capsys.readouterr().err


# ---- local multi-process ---------------------------------------------------------------------

def test_local_dry_run_commands(capsys, monkeypatch, no_external_commands):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false")
    argv = ["--num-processes", "3", "--devices-per-process", "2", "--port", "23456",
            "--config", "tiny", "--data", "/d", "--workdir", "/w", "--resume", *OVERRIDES, "--dry-run"]
    assert local_multiprocess.main(argv) == 0
    commands = command_lines(capsys.readouterr().out)
    assert len(commands) == 3
    for process_id, command in enumerate(commands):
        assert command[0] == "env"
        assert ("XLA_FLAGS=--xla_cpu_enable_fast_math=false "
                "--xla_force_host_platform_device_count=2") in command
        assert "JAX_PLATFORMS=cpu" in command
        assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in command
        start = command.index("pretrain")
        assert command[start - 2:start] == ["-m", "etbert_jax.main"]
        assert command[start:] == ["pretrain", "--config", "tiny", "--data", "/d", "--workdir", "/w",
                                   "--coordinator", "localhost:23456", "--num-processes", "3",
                                   "--process-id", str(process_id), "--resume", *OVERRIDES]


def test_local_free_port_bindable():
    import socket

    port = local_multiprocess.free_port()
    with socket.socket() as sock:
        sock.bind(("localhost", port))


# A stand-in for `etbert` that joins the multi-process JAX job the launcher sets up, then writes its
# device counts and the result of a cross-process gather. It parses the flags of `etbert pretrain`.
JAX_STAND_IN = """
import argparse, json, pathlib, sys
assert sys.argv[1] == "pretrain", sys.argv
parser = argparse.ArgumentParser()
for flag in ("--config", "--data", "--workdir", "--coordinator"):
    parser.add_argument(flag)
parser.add_argument("--num-processes", type=int)
parser.add_argument("--process-id", type=int)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args(sys.argv[2:])

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                           process_id=args.process_id)
values = multihost_utils.process_allgather(jnp.array([100 * args.process_id + jax.local_device_count()]))
report = {"process_index": jax.process_index(), "process_count": jax.process_count(),
          "local_devices": jax.local_device_count(), "global_devices": jax.device_count(),
          "gathered": [int(v) for v in values.reshape(-1)], "overrides": args.overrides}
print("REPORT " + json.dumps(report), flush=True)
pathlib.Path(args.workdir, f"report-{args.process_id}.json").write_text(json.dumps(report))
"""


def local_specs(tmp_path, program: str, num_processes: int, devices: int = 1,
                overrides: tuple[str, ...] = ()) -> list[local_multiprocess.ProcessSpec]:
    script = tmp_path / "stand_in.py"
    script.write_text(program)
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    options = local_multiprocess.LocalOptions(
        training=common.TrainingArgs("tiny", str(tmp_path / "shards"), str(workdir), overrides),
        num_processes=num_processes, devices_per_process=devices, executable=(sys.executable, str(script)))
    return local_multiprocess.build_process_specs(options, local_multiprocess.free_port())


@pytest.mark.multiprocess
def test_local_processes_form_one_jax_job(tmp_path):
    specs = local_specs(tmp_path, JAX_STAND_IN, num_processes=2, devices=4, overrides=("train.steps=3",))
    out = io.StringIO()
    status = local_multiprocess.run_processes(specs, tmp_path / "logs", timeout_s=120, out=out)

    assert status == 0, out.getvalue() + (tmp_path / "logs" / "process-1.log").read_text()
    reports = [json.loads((tmp_path / "work" / f"report-{i}.json").read_text()) for i in range(2)]
    for process_id, report in enumerate(reports):
        assert report["process_index"] == process_id
        assert report["process_count"] == 2
        assert report["local_devices"] == 4
        assert report["global_devices"] == 8
        assert report["gathered"] == [4, 104]
        assert report["overrides"] == ["train.steps=3"]
    # Process 0 is streamed with a prefix; process 1 goes to its log file.
    assert "[process 0] REPORT " in out.getvalue()
    assert "REPORT " in (tmp_path / "logs" / "process-1.log").read_text()
    assert "[process 1]" not in out.getvalue()


# Process 1 fails at once; process 0 ignores SIGTERM and would sleep for a minute.
FAILING_STAND_IN = """
import os, pathlib, signal, sys, time
process_id = int(sys.argv[sys.argv.index("--process-id") + 1])
workdir = sys.argv[sys.argv.index("--workdir") + 1]
pathlib.Path(workdir, f"pid-{process_id}").write_text(str(os.getpid()))
if process_id == 1:
    print("stand-in failure on process 1", flush=True)
    sys.exit(3)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("process 0 waiting", flush=True)
time.sleep(60)
"""


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_local_failure_stops_other_processes(tmp_path):
    specs = local_specs(tmp_path, FAILING_STAND_IN, num_processes=2)
    out = io.StringIO()
    started = time.monotonic()
    status = local_multiprocess.run_processes(specs, tmp_path / "logs", grace_s=1.0, out=out)
    elapsed = time.monotonic() - started

    assert status == 3
    assert elapsed < 30, f"the launcher waited {elapsed:.0f} s instead of stopping process 0"
    pid0 = int((tmp_path / "work" / "pid-0").read_text())
    assert not process_alive(pid0)
    assert "stand-in failure on process 1" in out.getvalue()
    assert "[process 0] process 0 waiting" in out.getvalue()


def test_local_timeout_stops_all(tmp_path):
    program = "import time\ntime.sleep(60)\n"
    specs = local_specs(tmp_path, program, num_processes=2)
    started = time.monotonic()
    status = local_multiprocess.run_processes(specs, tmp_path / "logs", grace_s=1.0, timeout_s=1.0,
                                              out=io.StringIO())
    assert status == local_multiprocess.EXIT_TIMEOUT
    assert time.monotonic() - started < 30


def test_local_signal_exit_status(tmp_path):
    program = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    specs = local_specs(tmp_path, program, num_processes=1)
    status = local_multiprocess.run_processes(specs, tmp_path / "logs", out=io.StringIO())
    assert status == 128 + 9


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def small_pretrain_shards(tmp_path_factory, sample_captures) -> pathlib.Path:
    """Two pre-training shards converted from a few bundled captures by `etbert convert-pretrain`."""
    if not module_available("pipelines.convert_pretrain"):
        pytest.skip("pipelines/convert_pretrain.py is not importable yet, so no shards can be made")
    output = tmp_path_factory.mktemp("launch-shards")
    command = [sys.executable, "-m", "etbert_jax.main", "convert-pretrain",
               str(sample_captures / "tls12"), str(sample_captures / "ssh"),
               "--output", str(output), "--num_shards", "2"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return output


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_launcher_runs_etbert_pretrain(small_pretrain_shards, tmp_path, capsys, monkeypatch):
    if not module_available("etbert_jax.train"):
        pytest.skip("etbert_jax/train.py is not importable yet, so `etbert pretrain` cannot run")
    # The default executable is `python -m etbert_jax.main`, found from the repository root.
    monkeypatch.chdir(REPO_ROOT)
    workdir = tmp_path / "run"
    status = local_multiprocess.main([
        "--num-processes", "2", "--devices-per-process", "2", "--timeout", "600",
        "--config", "tiny", "--data", str(small_pretrain_shards), "--workdir", str(workdir),
        "train.steps=2", "train.log_every=1", "train.checkpoint_every=2"])
    output = capsys.readouterr().out
    process_1_log = (workdir / "logs" / "process-1.log").read_text()

    assert status == 0, output[-4000:] + process_1_log[-4000:]
    assert "[process 0] " in output
    assert "process 1 of 2: 2 local devices, 4 global devices" in process_1_log
    assert (workdir / "checkpoints" / "2").is_dir()
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


# Every process records its pid and then sleeps; SIGTERM ends it.
SLEEPING_STAND_IN = """
import os, pathlib, sys, time
process_id = int(sys.argv[sys.argv.index("--process-id") + 1])
workdir = sys.argv[sys.argv.index("--workdir") + 1]
pathlib.Path(workdir, f"pid-{process_id}").write_text(str(os.getpid()))
time.sleep(60)
"""


def test_local_sigterm_stops_processes(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(SLEEPING_STAND_IN)
    workdir = tmp_path / "work"
    workdir.mkdir()
    command = [sys.executable, "-m", "launch.local_multiprocess", "--num-processes", "2",
               "--etbert", shlex.join([sys.executable, str(script)]), "--grace", "5",
               "--config", "tiny", "--data", str(tmp_path), "--workdir", str(workdir)]
    launcher = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid_files = [workdir / f"pid-{i}" for i in range(2)]
        deadline = time.monotonic() + 60
        while not all(path.exists() and path.read_text() for path in pid_files):
            assert time.monotonic() < deadline, "the processes did not start within 60 s"
            assert launcher.poll() is None, launcher.stdout.read()
            time.sleep(0.1)
        launcher.terminate()
        output, _ = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()

    assert launcher.returncode == 128 + 15, output
    assert "SIGTERM received" in output
    for path in pid_files:
        assert not process_alive(int(path.read_text()))
