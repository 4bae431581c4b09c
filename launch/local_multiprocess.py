"""Run `etbert pretrain` as N local processes that form one multi-process JAX job on CPU.

    python -m launch.local_multiprocess --num-processes 2 --devices-per-process 4 \\
        --config tiny --data runs/shards --workdir runs/local-2x4 train.steps=50

This simulates a pod on one machine: process i gets `--coordinator localhost:PORT
--num-processes N --process-id i`, `XLA_FLAGS=--xla_force_host_platform_device_count=K`,
`JAX_PLATFORMS=cpu` and gloo CPU collectives, so the job has N x K devices spread over N
processes, as a slice of N TPU hosts has. The coordinator port is a free localhost port unless `--port`
is given.

Process 0's output is streamed with a `[process 0]` prefix. The other processes write to
`<log dir>/process-<i>.log` (appended to, one header line per run), whose last lines are printed
when that process fails. When one
process fails, the others are stopped (SIGTERM, then SIGKILL after `--grace`) and the launcher
exits with the failed process's status. A SIGTERM to the launcher is passed on to every process.
"""

import argparse
import dataclasses
import logging
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, TextIO

from launch import common

log = logging.getLogger(__name__)

# Exit status when --timeout expires, as coreutils `timeout` uses.
EXIT_TIMEOUT = 124
# Lines of a failed process's log printed to the console.
FAILED_LOG_TAIL_LINES = 30

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


@dataclasses.dataclass(frozen=True)
class LocalOptions:
    """Settings of a local multi-process run."""

    # Flags and overrides for `etbert pretrain`.
    training: common.TrainingArgs
    # Number of JAX processes (simulated hosts), 1 or more.
    num_processes: int = 2
    # Fake CPU devices per process (XLA_FLAGS device count), 1 or more.
    devices_per_process: int = 4
    # Coordinator port on localhost; None picks a free one.
    port: int | None = None
    # Command that starts the `etbert` entry point; the subcommand and flags follow it.
    executable: tuple[str, ...] = (sys.executable, "-m", "etbert_jax.main")
    # Pass `--resume` to the trainer (by default it resumes when the workdir has a checkpoint).
    resume: bool = False
    # Extra environment variables for every process.
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Directory for the logs of processes 1..N-1; None means <workdir>/logs.
    log_dir: pathlib.Path | None = None
    # Seconds between SIGTERM and SIGKILL when stopping processes.
    grace_s: float = 10.0
    # Seconds after which the whole run is stopped; None waits without limit.
    timeout_s: float | None = None


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """One process to start: its arguments and the variables added to the launcher's environment."""

    argv: list[str]
    env: dict[str, str]

    def shell_command(self) -> str:
        """Return the process as one shell line: `env NAME=VALUE ... ARGV`."""
        assignments = [f"{name}={value}" for name, value in self.env.items()]
        return shlex.join(["env", *assignments, *self.argv])


def free_port() -> int:
    """Return a TCP port on localhost that is free now.

    NOTE: another program may take the port before the coordinator starts. The run then fails at
    start-up, and can be repeated or given a fixed `--port`.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def merge_xla_flags(existing: str | None, devices: int) -> str:
    """Replace any device-count flag in XLA_FLAGS with ours and keep the other flags."""
    other_flags = _DEVICE_COUNT_FLAG.sub("", existing or "").split()
    return " ".join([*other_flags, f"--xla_force_host_platform_device_count={devices}"])


def build_process_specs(options: LocalOptions, port: int,
                        base_env: Mapping[str, str] | None = None) -> list[ProcessSpec]:
    """Build the command and environment of each process, process ids 0..N-1 in order."""
    if options.num_processes < 1:
        raise ValueError(f"--num-processes must be 1 or more, got {options.num_processes}")
    if options.devices_per_process < 1:
        raise ValueError(f"--devices-per-process must be 1 or more, got {options.devices_per_process}")
    base_env = os.environ if base_env is None else base_env

    env = {
        "XLA_FLAGS": merge_xla_flags(base_env.get("XLA_FLAGS"), options.devices_per_process),
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        **options.env,
    }
    specs = []
    for process_id in range(options.num_processes):
        distributed = ["--coordinator", f"localhost:{port}",
                       "--num-processes", str(options.num_processes),
                       "--process-id", str(process_id)]
        argv = common.pretrain_argv(options.training, resume=options.resume,
                                    executable=options.executable, extra_flags=distributed)
        specs.append(ProcessSpec(argv=argv, env=dict(env)))
    return specs


def _pump(stream: IO[str], out: TextIO, prefix: str) -> None:
    for line in stream:
        out.write(prefix + line)
        out.flush()


def _stop(processes: Sequence[subprocess.Popen], grace_s: float) -> None:
    """Send SIGTERM to every running process group, then SIGKILL to those still alive after `grace_s`."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d ignored SIGTERM for %.0f s; sending SIGKILL", process.pid, grace_s)
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def _exit_status(returncode: int) -> int:
    # Popen reports death by signal N as -N; shells report it as 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def _print_log_tail(path: pathlib.Path, out: TextIO) -> None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as error:
        out.write(f"(could not read {path}: {error})\n")
        return
    out.write(f"---- last {min(len(lines), FAILED_LOG_TAIL_LINES)} lines of {path} ----\n")
    for line in lines[-FAILED_LOG_TAIL_LINES:]:
        out.write(line + "\n")
    out.flush()


class _Terminated(Exception):
    """Raised in the launcher when it receives SIGTERM."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def run_processes(specs: Sequence[ProcessSpec], log_dir: pathlib.Path, *, grace_s: float = 10.0,
                  timeout_s: float | None = None, out: TextIO | None = None, poll_s: float = 0.2) -> int:
    """Start all processes, stream process 0, stop the rest when one fails; return the run's exit status.

    The status is 0 when every process exits with 0, the status of the first process that failed
    otherwise, and 124 when `timeout_s` expired first. A SIGTERM to the launcher (from the main
    thread) is passed on to the processes, so that the trainer saves a checkpoint, and the launcher
    returns 143.
    """
    out = out if out is not None else sys.stdout
    log_dir.mkdir(parents=True, exist_ok=True)
    processes: list[subprocess.Popen] = []
    log_files: list[IO[str]] = []
    pump: threading.Thread | None = None
    failed: tuple[int, int] | None = None
    timed_out = terminated = False
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)

    try:
        # Each process gets its own session (and process group), so that stopping one also stops
        # any children it started, and a Ctrl-C in the terminal reaches only this launcher.
        for process_id, spec in enumerate(specs):
            env = {**os.environ, **spec.env}
            if process_id == 0:
                process = subprocess.Popen(spec.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                           start_new_session=True)
                pump = threading.Thread(target=_pump, args=(process.stdout, out, "[process 0] "), daemon=True)
                pump.start()
            else:
                # Appending keeps the logs of earlier runs in the same workdir, such as the run
                # that a resumed run continues.
                log_file = open(log_dir / f"process-{process_id}.log", "a")
                log_file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(spec.argv)}\n")
                log_file.flush()
                log_files.append(log_file)
                process = subprocess.Popen(spec.argv, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
            processes.append(process)
            log.info("started process %d (pid %d)", process_id, process.pid)

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            statuses = [process.poll() for process in processes]
            failures = [(i, status) for i, status in enumerate(statuses) if status not in (None, 0)]
            if failures:
                failed = failures[0]
                log.error("process %d exited with status %d; stopping the other processes",
                          failed[0], _exit_status(failed[1]))
                break
            if all(status is not None for status in statuses):
                break
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                log.error("the run did not finish within %.0f s (--timeout); stopping all processes", timeout_s)
                break
            time.sleep(poll_s)
    except _Terminated:
        terminated = True
        log.warning("SIGTERM received: stopping all processes")
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        _stop(processes, grace_s)
        if pump is not None:
            pump.join(timeout=grace_s)
        for log_file in log_files:
            log_file.close()

    if terminated:
        return 128 + signal.SIGTERM
    if timed_out:
        return EXIT_TIMEOUT
    if failed is not None:
        process_id, status = failed
        if process_id > 0:
            _print_log_tail(log_dir / f"process-{process_id}.log", out)
        return _exit_status(status)
    log.info("all %d processes finished", len(processes))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local_multiprocess",
        description="Run etbert pretrain as N local JAX processes with a localhost coordinator (CPU).")
    local = parser.add_argument_group("processes")
    local.add_argument("--num-processes", type=int, default=2, help="number of JAX processes (default: 2)")
    local.add_argument("--devices-per-process", type=int, default=4,
                       help="fake CPU devices per process (default: 4)")
    local.add_argument("--port", type=int, default=None, help="coordinator port on localhost (default: a free one)")
    local.add_argument("--etbert", default=None,
                       help="command that starts etbert, split like a shell line "
                            "(default: this Python with -m etbert_jax.main)")
    local.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                       help="environment variable for every process (repeatable)")
    local.add_argument("--log-dir", type=pathlib.Path, default=None,
                       help="directory for the logs of processes 1..N-1 (default: WORKDIR/logs)")
    local.add_argument("--grace", type=float, default=10.0,
                       help="seconds between SIGTERM and SIGKILL when stopping processes (default: 10)")
    local.add_argument("--timeout", type=float, default=None,
                       help="stop every process after this many seconds and exit with 124 (default: none)")
    local.add_argument("--resume", action="store_true", help="pass --resume to the trainer")
    common.add_training_flags(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    return parser


def options_from_args(args: argparse.Namespace) -> LocalOptions:
    """Build LocalOptions from parsed flags; raise ValueError naming a bad value."""
    executable = tuple(shlex.split(args.etbert)) if args.etbert else LocalOptions.executable
    if not executable:
        raise ValueError("--etbert is empty; give the command that starts etbert, e.g. 'etbert'")
    return LocalOptions(training=common.training_args_from(args), num_processes=args.num_processes,
                        devices_per_process=args.devices_per_process, port=args.port,
                        executable=executable, resume=args.resume,
                        env=common.parse_env_assignments(args.env), log_dir=args.log_dir,
                        grace_s=args.grace, timeout_s=args.timeout)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
        port = options.port if options.port is not None else free_port()
        specs = build_process_specs(options, port)
    except ValueError as error:
        parser.error(str(error))

    if args.dry_run:
        for spec in specs:
            print(spec.shell_command())
        return 0

    common.configure_logging()
    log_dir = options.log_dir or pathlib.Path(options.training.workdir) / "logs"
    log.info("%d processes x %d CPU devices, coordinator localhost:%d, logs of processes 1..%d in %s",
             options.num_processes, options.devices_per_process, port, options.num_processes - 1, log_dir)
    return run_processes(specs, log_dir, grace_s=options.grace_s, timeout_s=options.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
