"""Pre-train on a Cloud TPU VM slice with `gcloud`, restarting from the latest checkpoint after preemption.

    python -m launch.tpu_vm --name etbert-v5p --zone us-east5-a --project my-project \\
        --accelerator-type v5p-32 --spot --config base \\
        --data gs://my-bucket/shards --workdir gs://my-bucket/runs/base-512 \\
        data.global_batch_size=512 train.steps=100000

Steps, each one `gcloud compute tpus tpu-vm` command (add `--dry-run` to print them):

1. `describe` the TPU VM. A READY one is reused. A missing one is created, and one in any other
   state (PREEMPTED, TERMINATED, ...) is deleted and created again.
2. Install the project on every worker (`--worker=all`): a tarball of this checkout copied with
   `scp`, or a `git clone` of `--repo-url` at `--ref`. Then a virtual environment with the pinned
   requirements, `jax[tpu]` and the project itself.
3. Start the same `etbert pretrain ... --auto-distributed` command on every worker, detached from
   the ssh session, with its output in `~/etbert-run/pretrain-attempt-N.log` on each worker.
4. Stream worker 0's log until its training process exits, then take worker 0's exit status.
5. On failure, check the VM: if it is no longer READY (preempted), recreate it, reinstall and
   start again with `--resume`. If it is READY and training still runs, only the log stream was
   lost, so it reattaches. Otherwise it stops what is left of the run and starts again with
   `--resume`. At most `--max-restarts` restarts.

Checkpoints, TensorBoard logs and metrics.jsonl go to `--workdir`, which must be a gs:// path on
multi-host slices because every worker writes its shards of each checkpoint there.

Training runs detached on the workers, so stopping this launcher (Ctrl-C) leaves it running. A
later launch with the same `--name` stops that run (SIGTERM, so the trainer saves a checkpoint)
and starts again, which resumes from the checkpoint.
"""

import argparse
import dataclasses
import logging
import pathlib
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping

from launch import common

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Worker-side layout, relative to the ssh user's home directory.
REMOTE_CODE = "$HOME/etbert-jax"
REMOTE_VENV = "$HOME/etbert-venv"
REMOTE_RUN = "$HOME/etbert-run"
REMOTE_TARBALL = "etbert-jax-src.tar.gz"

# jax[tpu] must match the CPU jax pinned in requirements.txt.
JAX_TPU_REQUIREMENT = "jax[tpu]==0.10.2"

# Exit status that the log stream reports when the training process ended without writing one,
# which happens when it was killed (SIGKILL, VM shutdown).
EXIT_STATUS_MISSING = 70

# How often one attempt may reattach to worker 0's log after the ssh connection drops.
MAX_REATTACH = 5

# TPU software version per accelerator family, from Google's "TPU software versions" page
# (cloud.google.com/tpu/docs/runtimes, 2026): the recommended base images for JAX.
DEFAULT_RUNTIME = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}

_ACCELERATOR = re.compile(r"^(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)$")

# Paths of the checkout that workers do not need (environments, caches, run outputs).
_TAR_EXCLUDES = (".git", ".venv", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info",
                 "./runs", "./demo-output", "./build", "./dist")


@dataclasses.dataclass(frozen=True)
class SliceShape:
    """Chip and host counts of a TPU slice."""

    # TPU chips in the slice.
    chips: int
    # TPU VM workers (hosts), one `etbert pretrain` process each.
    hosts: int


def slice_shape(accelerator_type: str) -> SliceShape:
    """Return the chips and hosts of an accelerator type such as v4-64, v5p-32 or v5litepod-16.

    For v2, v3, v4 and v5p the number counts TensorCores (two per chip) and a host has four chips.
    For v5e (v5litepod) and v6e the number counts chips and a host has eight, as the v5p, v5e and
    v6e pages of Google's TPU documentation list them.
    NOTE: the host count feeds only the start-up log line and the shared-path check of multi-host
    slices; `--worker=all` reaches every worker whatever their number.
    """
    match = _ACCELERATOR.match(accelerator_type)
    if match is None:
        raise ValueError(f"unknown TPU accelerator type {accelerator_type!r}: expected a family "
                         f"({', '.join(DEFAULT_RUNTIME)}) and a size, such as v4-64 or v5p-32")
    family, size = match.group(1), int(match.group(2))
    if family in ("v5litepod", "v6e"):
        chips, chips_per_host = size, 8
    else:
        chips, chips_per_host = size // 2, 4
    if chips < 1:
        raise ValueError(f"accelerator type {accelerator_type!r} has no whole chip")
    return SliceShape(chips=chips, hosts=max(1, chips // chips_per_host))


def default_runtime_version(accelerator_type: str) -> str:
    """Return the recommended TPU software version for the accelerator's family."""
    slice_shape(accelerator_type)
    return DEFAULT_RUNTIME[accelerator_type.split("-")[0]]


@dataclasses.dataclass(frozen=True)
class TpuVmOptions:
    """Everything the TPU VM launcher needs; built from the command line by `options_from_args`."""

    # TPU VM name.
    name: str
    # Compute zone, such as us-east5-a.
    zone: str
    # Google Cloud project; None uses gcloud's configured project.
    project: str | None
    # Accelerator type, such as v4-64 or v5p-32.
    accelerator_type: str
    # TPU software version of the VM image.
    runtime_version: str
    # "on-demand", "spot" or "preemptible".
    provisioning: str
    # Flags and overrides for `etbert pretrain`.
    training: common.TrainingArgs
    # Restarts after a failure or preemption before giving up (0 disables restarts).
    max_restarts: int = 3
    # Seconds to wait before each restart.
    restart_delay_s: float = 60.0
    # Extra environment variables for the training processes.
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Git URL to clone on the workers; None copies this checkout instead.
    repo_url: str | None = None
    # Branch, tag or commit to check out after cloning `repo_url`.
    repo_ref: str = "main"
    # Python interpreter on the workers; the project needs Python 3.11.
    python: str = "python3.11"
    # Local checkout that is packed and copied when `repo_url` is None.
    local_repo: pathlib.Path = REPO_ROOT
    # Local path of that tarball.
    tarball: pathlib.Path = pathlib.Path(tempfile.gettempdir()) / REMOTE_TARBALL


def _join_script(lines: list[str]) -> str:
    """Join bash lines into one line, so that every printed command fits on one line."""
    script = ""
    for line in lines:
        if script:
            script += " " if script.endswith(("&", "then", "do", "{")) else "; "
        script += line
    return script


class TpuVmLauncher:
    """Run the steps in the module docstring through a `CommandRunner`.

    `sleep` waits between restarts; tests and dry runs pass a function that returns at once.
    """

    def __init__(self, options: TpuVmOptions, runner: common.CommandRunner,
                 sleep: Callable[[float], None] = time.sleep):
        self.options = options
        self.runner = runner
        self.sleep = sleep

    # ---- gcloud commands -------------------------------------------------------------------

    def gcloud(self, verb: str, *args: str) -> list[str]:
        """Build `gcloud compute tpus tpu-vm VERB ...` with the zone and, if set, the project."""
        argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={self.options.zone}"]
        if self.options.project:
            argv.append(f"--project={self.options.project}")
        return argv

    def describe_command(self) -> list[str]:
        return self.gcloud("describe", self.options.name, "--format=value(state)")

    def create_command(self) -> list[str]:
        argv = self.gcloud("create", self.options.name,
                           f"--accelerator-type={self.options.accelerator_type}",
                           f"--version={self.options.runtime_version}")
        if self.options.provisioning == "spot":
            argv.append("--spot")
        elif self.options.provisioning == "preemptible":
            argv.append("--preemptible")
        return argv

    def delete_command(self) -> list[str]:
        return self.gcloud("delete", self.options.name, "--quiet")

    def pack_command(self) -> list[str]:
        excludes = [f"--exclude={pattern}" for pattern in _TAR_EXCLUDES]
        return ["tar", "-czf", str(self.options.tarball), *excludes, "-C", str(self.options.local_repo), "."]

    def copy_command(self) -> list[str]:
        return self.gcloud("scp", str(self.options.tarball), f"{self.options.name}:{REMOTE_TARBALL}",
                           "--worker=all")

    def ssh_command(self, worker: str, script: list[str]) -> list[str]:
        """Build `gcloud ... ssh NAME --worker=WORKER --command SCRIPT`.

        The script runs in the login shell of the ssh user, which is bash on Google's TPU VM images.
        """
        return self.gcloud("ssh", self.options.name, f"--worker={worker}", "--command", _join_script(script))

    # ---- worker-side scripts ---------------------------------------------------------------

    def install_script(self) -> list[str]:
        """Return the bash lines that installs the project and its environment on a worker."""
        python = shlex.quote(self.options.python)
        if self.options.repo_url is None:
            fetch = [f'rm -rf "{REMOTE_CODE}"', f'mkdir -p "{REMOTE_CODE}"',
                     f'tar -xzf "$HOME/{REMOTE_TARBALL}" -C "{REMOTE_CODE}"']
        else:
            fetch = [f'rm -rf "{REMOTE_CODE}"',
                     f'git clone --quiet {shlex.quote(self.options.repo_url)} "{REMOTE_CODE}"',
                     f'git -C "{REMOTE_CODE}" checkout --quiet {shlex.quote(self.options.repo_ref)}']
        pip = f'"{REMOTE_VENV}/bin/pip" install --quiet'
        lines = [
            "set -euo pipefail",
            # NOTE: the Ubuntu 22.04 TPU images ship Python 3.10, so python3.11 comes from apt;
            # this path has not been run on a real TPU VM.
            f"command -v {python} >/dev/null || {{ sudo apt-get update -q && "
            f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q {python} {python}-venv; }}",
            *fetch,
            f'rm -rf "{REMOTE_VENV}"',
            f'{python} -m venv "{REMOTE_VENV}"',
            f'{pip} --upgrade pip',
            f'{pip} -r "{REMOTE_CODE}/requirements.txt"',
            f'{pip} {shlex.quote(JAX_TPU_REQUIREMENT)}',
            f'{pip} --no-deps -e "{REMOTE_CODE}"',
        ]
        return lines

    def training_argv(self, resume: bool) -> list[str]:
        """Return the `etbert pretrain` command that every worker runs.

        `--auto-distributed` makes the trainer call `jax.distributed.initialize()` without
        arguments, which reads the slice layout from the TPU VM metadata.
        """
        return common.pretrain_argv(self.options.training, resume=resume, extra_flags=["--auto-distributed"])

    def log_path(self, attempt: int) -> str:
        return f"{REMOTE_RUN}/pretrain-attempt-{attempt}.log"

    def start_script(self, attempt: int, resume: bool) -> list[str]:
        """Return the bash lines that starts training detached from ssh, in its own process group.

        The process id goes to ~/etbert-run/pid and the exit status to ~/etbert-run/exit_code, so
        that later ssh sessions can follow, check and stop the run.
        """
        inner = [f'export PATH="{REMOTE_VENV}/bin:$PATH"']
        inner += [f"export {name}={shlex.quote(value)}" for name, value in sorted(self.options.env.items())]
        inner += [shlex.join(self.training_argv(resume)),
                  f'echo $? > "{REMOTE_RUN}/exit_code"']
        lines = [
            "set -eu",
            f'mkdir -p "{REMOTE_RUN}"',
            f'cd "{REMOTE_CODE}"',
            f'rm -f "{REMOTE_RUN}/exit_code"',
            f'setsid bash -c {shlex.quote(_join_script(inner))} > "{self.log_path(attempt)}" 2>&1 < /dev/null &',
            f'echo $! > "{REMOTE_RUN}/pid"',
        ]
        return lines

    def stream_script(self, attempt: int) -> list[str]:
        """Return the bash lines that follow one worker's log until training exits, then exit with its status."""
        return [
            f'tail -n +1 -F --pid="$(cat "{REMOTE_RUN}/pid")" "{self.log_path(attempt)}"',
            f'if [ -f "{REMOTE_RUN}/exit_code" ]; then exit "$(cat "{REMOTE_RUN}/exit_code")"; fi',
            f"exit {EXIT_STATUS_MISSING}",
        ]

    def running_script(self) -> list[str]:
        """Return the bash line that exits 0 when the training process is still alive."""
        return [f'kill -0 "$(cat "{REMOTE_RUN}/pid")" 2>/dev/null']

    def stop_script(self) -> list[str]:
        """Return the bash lines that stop a previous run: SIGTERM (the trainer saves), then SIGKILL after 120 s."""
        return [
            f'pid="$(cat "{REMOTE_RUN}/pid" 2>/dev/null || true)"',
            'if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then',
            '  kill -TERM -- "-$pid" 2>/dev/null || true',
            '  for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done',
            '  kill -KILL -- "-$pid" 2>/dev/null || true',
            "fi",
            "true",
        ]

    # ---- the launch loop -------------------------------------------------------------------

    def describe_state(self) -> str | None:
        """Return the TPU VM state (READY, PREEMPTED, ...) or None when describe fails (no such VM)."""
        result = self.runner.run(self.describe_command(), purpose="describe", capture=True)
        if result.returncode != 0:
            return None
        return result.stdout.strip() or "UNKNOWN"

    def install(self) -> str | None:
        """Install the project on every worker; return a failure message or None."""
        if self.options.repo_url is None:
            if self.runner.run(self.pack_command(), purpose="pack").returncode != 0:
                return f"packing {self.options.local_repo} into {self.options.tarball} failed"
            if self.runner.run(self.copy_command(), purpose="copy").returncode != 0:
                return "copying the project to the workers failed"
        if self.runner.run(self.ssh_command("all", self.install_script()), purpose="install").returncode != 0:
            return "installing the project on the workers failed"
        return None

    def prepare(self, first: bool) -> str | None:
        """Make the TPU VM READY with the project installed; return a failure message or None.

        A reused VM is reinstalled only on the first attempt, because restarts keep the code that
        the run started with.
        """
        name = self.options.name
        state = self.describe_state()
        if state == "READY":
            self.runner.note(f"TPU VM {name} is READY: reusing it and stopping any earlier run on it")
            if self.runner.run(self.ssh_command("all", self.stop_script()), purpose="stop").returncode != 0:
                return "stopping the earlier run failed"
            return self.install() if first else None

        if state is None:
            self.runner.note(f"describe found no TPU VM named {name}: creating it")
        else:
            log.warning("TPU VM %s is %s, not READY: deleting and creating it again", name, state)
            if self.runner.run(self.delete_command(), purpose="delete").returncode != 0:
                return f"deleting TPU VM {name} (state {state}) failed"
        if self.runner.run(self.create_command(), purpose="create").returncode != 0:
            return f"creating TPU VM {name} ({self.options.accelerator_type}) failed"
        return self.install()

    def train(self, attempt: int, resume: bool) -> int:
        """Start training on all workers, follow worker 0 and return worker 0's exit status."""
        start = self.ssh_command("all", self.start_script(attempt, resume))
        status = self.runner.run(start, purpose="train").returncode
        if status != 0:
            return status

        for _ in range(MAX_REATTACH + 1):
            status = self.runner.run(self.ssh_command("0", self.stream_script(attempt)), purpose="stream").returncode
            state = self.describe_state()
            if status == 0:
                if state == "READY":
                    return 0
                # The trainer saves a checkpoint and exits with 0 on SIGTERM, which is also what a
                # preemption sends, so a 0 from a VM that is gone counts as a preemption.
                # NOTE: a SIGTERM on a VM that stays READY still reads as a finished run.
                log.warning("worker 0 exited with 0 but TPU VM %s is %s: treating it as preempted",
                            self.options.name, state)
                return EXIT_STATUS_MISSING
            if state != "READY":
                return status
            running = self.runner.run(self.ssh_command("0", self.running_script()), purpose="check")
            if running.returncode != 0:
                return status
            log.warning("lost worker 0's log stream (status %d) while training continues; reattaching", status)
        return status

    def launch(self) -> int:
        """Run the whole launch with bounded restarts; return 0 when training finished."""
        options = self.options
        shape = slice_shape(options.accelerator_type)
        hosts = f"{shape.hosts} host" + ("s" if shape.hosts != 1 else "")
        self.runner.note(f"{options.accelerator_type}: {shape.chips} chips, {hosts}, "
                         f"software version {options.runtime_version}, {options.provisioning}")

        attempt, restarts, resume = 0, 0, False
        while True:
            attempt += 1
            failure = self.prepare(first=attempt == 1)
            status = 1
            if failure is None:
                status = self.train(attempt, resume)
                if status == 0:
                    log.info("training finished on %s after %d restarts", options.name, restarts)
                    return 0
                failure = f"training attempt {attempt} ended with status {status}"

            if restarts >= options.max_restarts:
                log.error("%s; giving up after %d restarts (--max-restarts %d)",
                          failure, restarts, options.max_restarts)
                return status or 1
            restarts += 1
            resume = True
            log.warning("%s; restart %d of %d in %.0f s, resuming from the latest checkpoint in %s",
                        failure, restarts, options.max_restarts, options.restart_delay_s,
                        options.training.workdir)
            self.sleep(options.restart_delay_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.tpu_vm",
        description="Pre-train on a Cloud TPU VM slice; restarts with --resume after preemption.")
    tpu = parser.add_argument_group("TPU VM")
    tpu.add_argument("--name", required=True, help="TPU VM name (created when missing)")
    tpu.add_argument("--zone", required=True, help="compute zone, e.g. us-east5-a")
    tpu.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's configured one)")
    tpu.add_argument("--accelerator-type", required=True, help="slice type, e.g. v4-64, v5p-32, v5litepod-16")
    tpu.add_argument("--runtime-version", default=None,
                     help="TPU software version (default: Google's recommended image for the family)")
    capacity = tpu.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="create a Spot TPU VM")
    capacity.add_argument("--preemptible", action="store_true", help="create a preemptible TPU VM")
    tpu.add_argument("--max-restarts", type=int, default=3,
                     help="restarts after a failure or preemption before giving up (default: 3)")
    tpu.add_argument("--restart-delay", type=float, default=60.0,
                     help="seconds to wait before each restart (default: 60)")

    code = parser.add_argument_group("code on the workers")
    code.add_argument("--repo-url", default=None,
                      help="git URL to clone on every worker (default: copy this checkout with scp)")
    code.add_argument("--ref", default="main", help="branch, tag or commit of --repo-url (default: main)")
    code.add_argument("--python", default="python3.11", help="Python 3.11 interpreter on the workers")
    code.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                      help="environment variable for the training processes (repeatable)")

    code.add_argument("--allow-local-paths", action="store_true",
                      help="accept --data and --workdir paths that are not gs:// on multi-host slices "
                           "(for a shared mount such as Cloud Storage FUSE on every worker)")

    common.add_training_flags(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    return parser


def options_from_args(args: argparse.Namespace) -> TpuVmOptions:
    """Check the parsed flags and build TpuVmOptions; raise ValueError naming a bad value."""
    shape = slice_shape(args.accelerator_type)
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    if shape.hosts > 1 and not args.allow_local_paths:
        for flag, value in (("--workdir", args.workdir), ("--data", args.data)):
            if not value.startswith("gs://"):
                raise ValueError(f"{flag} {value!r} is not a gs:// path, but {args.accelerator_type} has "
                                 f"{shape.hosts} workers that must all read and write the same files; "
                                 "use a Cloud Storage path such as gs://BUCKET/..., or pass "
                                 "--allow-local-paths if the path is a shared mount on every worker")
    provisioning = "on-demand"
    if args.spot:
        provisioning = "spot"
    elif args.preemptible:
        provisioning = "preemptible"
    return TpuVmOptions(
        name=args.name, zone=args.zone, project=args.project, accelerator_type=args.accelerator_type,
        runtime_version=args.runtime_version or default_runtime_version(args.accelerator_type),
        provisioning=provisioning, training=common.training_args_from(args),
        max_restarts=args.max_restarts, restart_delay_s=args.restart_delay,
        env=common.parse_env_assignments(args.env), repo_url=args.repo_url, repo_ref=args.ref,
        python=args.python)


def main(argv: list[str] | None = None, runner: common.CommandRunner | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    if args.dry_run:
        # A failed describe shows the full path (create, copy, install, train, stream); the VM is
        # READY afterwards, so the run ends after one attempt.
        runner = common.DryRunRunner(results={"describe": [common.CommandResult(1),
                                                            common.CommandResult(0, "READY")]})
        launcher = TpuVmLauncher(options, runner, sleep=lambda seconds: None)
        launcher.launch()
        runner.note("after a failure or preemption, each restart starts training with --resume:")
        runner.note(shlex.join(launcher.ssh_command("all", launcher.start_script(2, resume=True))))
        return 0

    common.configure_logging()
    launcher = TpuVmLauncher(options, runner or common.SubprocessRunner())
    try:
        return launcher.launch()
    except common.LaunchError as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
