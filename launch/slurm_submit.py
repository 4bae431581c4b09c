"""Render `launch/slurm_gpu.sbatch` for one run and submit it with `sbatch`.

    python -m launch.slurm_submit --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
        --config base --data /shared/etbert/shards --workdir /shared/etbert/runs/base \\
        data.global_batch_size=512 train.steps=100000

The rendered script requests `--nodes` nodes with `--gpus-per-node` GPUs and as many tasks per
node (one JAX process per GPU), and runs `srun etbert pretrain ...` with the given flags and
overrides. It is written to `--script-out` (default: WORKDIR/slurm-pretrain.sbatch), so the run
directory keeps the exact script it ran with, and SLURM's output goes to WORKDIR/slurm-<jobid>.out.
`--dry-run` prints the sbatch command and the rendered script, and writes and submits nothing.
"""

import argparse
import dataclasses
import logging
import pathlib
import re
import shlex
import sys
from collections.abc import Mapping

from launch import common

log = logging.getLogger(__name__)

TEMPLATE = pathlib.Path(__file__).resolve().parent / "slurm_gpu.sbatch"

_DIRECTIVE = re.compile(r"^#SBATCH --([a-z-]+)(=.*)?$")
_SETTINGS = re.compile(r"^# >>> settings\n.*?^# <<< settings\n", re.MULTILINE | re.DOTALL)
# SLURM time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """Settings of one SLURM pre-training job."""

    # Flags and overrides for `etbert pretrain`; data and workdir on a filesystem all nodes share.
    training: common.TrainingArgs
    # Nodes in the job.
    nodes: int = 2
    # GPUs per node; also the number of tasks (JAX processes) per node.
    gpus_per_node: int = 8
    # CPU cores per task, for the input pipeline.
    cpus_per_task: int = 8
    # Partition; None uses the cluster's default.
    partition: str | None = None
    # Account to charge; None uses the user's default.
    account: str | None = None
    # Wall-clock limit in a SLURM time format, such as 24:00:00 or 2-00:00:00.
    time: str = "24:00:00"
    # Job name shown by squeue.
    job_name: str = "etbert-pretrain"
    # Command that starts etbert on the nodes, such as /shared/venv/bin/etbert.
    etbert: str = "etbert"
    # Extra environment variables exported before srun.
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Where the rendered script is written; None means WORKDIR/slurm-pretrain.sbatch.
    script_out: pathlib.Path | None = None

    def script_path(self) -> pathlib.Path:
        return self.script_out or pathlib.Path(self.training.workdir) / "slurm-pretrain.sbatch"


def directives(options: SlurmOptions) -> dict[str, str | None]:
    """Return the #SBATCH options that the rendered script sets, in template order where present."""
    values: dict[str, str | None] = {
        "job-name": options.job_name,
        "nodes": str(options.nodes),
        "ntasks-per-node": str(options.gpus_per_node),
        "gpus-per-node": str(options.gpus_per_node),
        "cpus-per-task": str(options.cpus_per_task),
        "time": options.time,
        "output": str(pathlib.Path(options.training.workdir) / "slurm-%j.out"),
    }
    if options.partition:
        values["partition"] = options.partition
    if options.account:
        values["account"] = options.account
    return values


def settings_block(options: SlurmOptions) -> str:
    """Return the settings block with every value fixed and shell-quoted."""
    training = options.training
    lines = [
        "# >>> settings (written by python -m launch.slurm_submit)",
        f"ETBERT_CONFIG={shlex.quote(training.config)}",
        f"ETBERT_DATA={shlex.quote(training.data)}",
        f"ETBERT_WORKDIR={shlex.quote(training.workdir)}",
        "ETBERT_OVERRIDE_LIST=(" + " ".join(shlex.quote(item) for item in training.overrides) + ")",
        f"ETBERT_BIN={shlex.quote(options.etbert)}",
        *(f"export {name}={shlex.quote(value)}" for name, value in sorted(options.env.items())),
        "# <<< settings",
    ]
    return "\n".join(lines) + "\n"


def render_script(options: SlurmOptions, template: str | None = None) -> str:
    """Fill the template's #SBATCH lines and settings block for this run."""
    template = TEMPLATE.read_text() if template is None else template
    requested = directives(options)

    # Replace the template's directives that this run sets, and add the others after its last directive.
    lines = template.splitlines()
    seen: set[str] = set()
    last_directive = -1
    for index, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if match is None:
            continue
        last_directive = index
        key = match.group(1)
        if key in requested:
            lines[index] = f"#SBATCH --{key}={requested[key]}"
            seen.add(key)
    if last_directive < 0:
        raise ValueError(f"template {TEMPLATE} has no #SBATCH lines")
    extra = [f"#SBATCH --{key}={value}" for key, value in requested.items() if key not in seen]
    lines[last_directive + 1:last_directive + 1] = extra
    script = "\n".join(lines) + "\n"

    script, count = _SETTINGS.subn(lambda _: settings_block(options), script)
    if count != 1:
        raise ValueError(f"template {TEMPLATE} must contain one '# >>> settings' ... '# <<< settings' block")
    return script


def sbatch_argv(script_path: pathlib.Path) -> list[str]:
    return ["sbatch", str(script_path)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm_submit",
                                     description="Submit etbert pretrain to SLURM, one task per GPU.")
    slurm = parser.add_argument_group("SLURM job")
    slurm.add_argument("--nodes", type=int, default=2, help="nodes in the job (default: 2)")
    slurm.add_argument("--gpus-per-node", type=int, default=8,
                       help="GPUs per node, also tasks per node (default: 8)")
    slurm.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (default: 8)")
    slurm.add_argument("--partition", default=None, help="partition (default: the cluster's default)")
    slurm.add_argument("--account", default=None, help="account to charge (default: yours)")
    slurm.add_argument("--time", default="24:00:00", help="wall-clock limit, e.g. 24:00:00 or 2-00:00:00")
    slurm.add_argument("--job-name", default="etbert-pretrain", help="job name (default: etbert-pretrain)")
    slurm.add_argument("--etbert", default="etbert",
                       help="etbert command on the nodes, e.g. /shared/venv/bin/etbert (default: etbert)")
    slurm.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                       help="environment variable exported before srun (repeatable)")
    slurm.add_argument("--script-out", type=pathlib.Path, default=None,
                       help="path of the rendered script (default: WORKDIR/slurm-pretrain.sbatch)")
    common.add_training_flags(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the sbatch command and the rendered script; write and submit nothing")
    return parser


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    """Build SlurmOptions from parsed flags; raise ValueError naming a bad value."""
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node),
                        ("--cpus-per-task", args.cpus_per_task)):
        if value < 1:
            raise ValueError(f"{flag} must be 1 or more, got {value}")
    if not _TIME.match(args.time):
        raise ValueError(f"--time {args.time!r} is not a SLURM time such as 24:00:00 or 2-00:00:00")
    return SlurmOptions(training=common.training_args_from(args), nodes=args.nodes,
                        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                        partition=args.partition, account=args.account, time=args.time,
                        job_name=args.job_name, etbert=args.etbert,
                        env=common.parse_env_assignments(args.env), script_out=args.script_out)


def main(argv: list[str] | None = None, runner: common.CommandRunner | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as error:
        parser.error(str(error))

    script = render_script(options)
    path = options.script_path()
    if args.dry_run:
        runner = common.DryRunRunner()
        runner.run(sbatch_argv(path), purpose="submit")
        runner.note(f"---- {path} ----")
        print(script, end="")
        return 0

    common.configure_logging()
    path.parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(options.training.workdir).mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    log.info("wrote %s: %d nodes x %d GPUs, %d tasks", path, options.nodes, options.gpus_per_node,
             options.nodes * options.gpus_per_node)
    runner = runner or common.SubprocessRunner()
    try:
        return runner.run(sbatch_argv(path), purpose="submit").returncode
    except common.LaunchError as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
