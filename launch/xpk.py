"""Submit pre-training to a GKE cluster with TPU node pools through `xpk workload create`.

    python -m launch.xpk --cluster my-cluster --workload etbert-base --tpu-type v5p-128 \\
        --num-slices 2 --project my-project --zone us-east5-a \\
        --docker-image us-docker.pkg.dev/my-project/etbert/etbert-jax:latest --max-restarts 5 \\
        --config base --data gs://my-bucket/shards --workdir gs://my-bucket/runs/base \\
        data.global_batch_size=2048

xpk runs the same command in a container on every host of every slice, sets the TPU and
multi-slice environment variables, and restarts the whole JobSet after a system failure such as a
preemption, up to `--max-restarts` times. With `--restart-on-user-code-failure` it also restarts
when the trainer exits with a non-zero status. The trainer resumes from the latest checkpoint in
`--workdir` by default, so a restarted JobSet continues the run without a `--resume` flag.

Images: `--docker-image` is used as it is and must contain the installed project (the command is
then `etbert pretrain ...`). `--base-docker-image` lets xpk copy `--script-dir` (this checkout by
default) into the base image, and the command first installs the project with pip.

NOTE: the xpk flags follow xpk's `workload create` parser (AI-Hypercomputer/xpk,
src/xpk/parser/workload.py); this launcher has not been run against a live GKE cluster.
"""

import argparse
import dataclasses
import logging
import pathlib
import shlex
import sys

from launch import common

log = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Installs the project inside a base image that lacks it, from the copied script directory.
BASE_IMAGE_SETUP = ("pip install --quiet -r requirements.txt 'jax[tpu]==0.10.2' && "
                    "pip install --quiet --no-deps -e .")


@dataclasses.dataclass(frozen=True)
class XpkOptions:
    """Settings of one `xpk workload create` call."""

    # GKE cluster created with `xpk cluster create`.
    cluster: str
    # Workload (JobSet) name: lowercase letters, digits and hyphens.
    workload: str
    # TPU type per slice, such as v5p-128 (exclusive with device_type).
    tpu_type: str | None
    # Other xpk device type, such as h100-80gb-8 (exclusive with tpu_type).
    device_type: str | None
    # Number of slices (TPU) in the workload.
    num_slices: int
    # Flags and overrides for `etbert pretrain`.
    training: common.TrainingArgs
    # Image that already contains the project; None uses base_docker_image.
    docker_image: str | None = None
    # Image that xpk extends with script_dir; used when docker_image is None.
    base_docker_image: str = "python:3.11"
    # Directory that xpk copies into the base image.
    script_dir: pathlib.Path = REPO_ROOT
    # Google Cloud project and zone; None uses xpk's and gcloud's defaults.
    project: str | None = None
    zone: str | None = None
    # JobSet restarts after a failure before giving up.
    max_restarts: int = 3
    # Kueue priority: very-low, low, medium, high or very-high.
    priority: str = "medium"
    # Run on Spot capacity.
    spot: bool = False
    # Also restart the JobSet when the trainer exits non-zero (xpk restarts only on system failures by default).
    restart_on_user_code_failure: bool = False
    # Extra environment variables for the containers.
    env: tuple[tuple[str, str], ...] = ()


def training_command(options: XpkOptions) -> str:
    """Return the shell command that xpk runs in every container."""
    argv = common.pretrain_argv(options.training, resume=False, extra_flags=["--auto-distributed"])
    command = shlex.join(argv)
    if options.docker_image is None:
        command = f"{BASE_IMAGE_SETUP} && {command}"
    return command


def xpk_argv(options: XpkOptions) -> list[str]:
    """Build the `xpk workload create` argument list."""
    argv = ["xpk", "workload", "create", f"--cluster={options.cluster}", f"--workload={options.workload}"]
    if options.tpu_type is not None:
        argv.append(f"--tpu-type={options.tpu_type}")
    else:
        argv.append(f"--device-type={options.device_type}")
    argv.append(f"--num-slices={options.num_slices}")
    if options.project:
        argv.append(f"--project={options.project}")
    if options.zone:
        argv.append(f"--zone={options.zone}")
    if options.docker_image is not None:
        argv.append(f"--docker-image={options.docker_image}")
    else:
        argv += [f"--base-docker-image={options.base_docker_image}", f"--script-dir={options.script_dir}"]
    argv += [f"--max-restarts={options.max_restarts}", f"--priority={options.priority}"]
    if options.spot:
        argv.append("--spot")
    if options.restart_on_user_code_failure:
        argv.append("--restart-on-user-code-failure")
    for name, value in options.env:
        argv.append(f"--env={name}={value}")
    argv += ["--command", training_command(options)]
    return argv


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.xpk",
                                     description="Submit etbert pretrain to GKE with xpk workload create.")
    gke = parser.add_argument_group("GKE workload")
    gke.add_argument("--cluster", required=True, help="xpk cluster name")
    gke.add_argument("--workload", required=True, help="workload name (lowercase letters, digits, hyphens)")
    device = gke.add_mutually_exclusive_group(required=True)
    device.add_argument("--tpu-type", default=None, help="TPU type per slice, e.g. v5p-128 or v5litepod-256")
    device.add_argument("--device-type", default=None, help="other xpk device type, e.g. h100-80gb-8")
    gke.add_argument("--num-slices", type=int, default=1, help="number of slices (default: 1)")
    gke.add_argument("--project", default=None, help="Google Cloud project")
    gke.add_argument("--zone", default=None, help="zone of the cluster")
    image = gke.add_mutually_exclusive_group()
    image.add_argument("--docker-image", default=None, help="image with the project installed, used as it is")
    image.add_argument("--base-docker-image", default="python:3.11",
                       help="base image that xpk extends with --script-dir (default: python:3.11)")
    gke.add_argument("--script-dir", type=pathlib.Path, default=REPO_ROOT,
                     help="directory copied into the base image (default: this checkout)")
    gke.add_argument("--max-restarts", type=int, default=3,
                     help="JobSet restarts after a failure such as a preemption (default: 3)")
    gke.add_argument("--priority", default="medium", choices=["very-low", "low", "medium", "high", "very-high"],
                     help="Kueue priority (default: medium)")
    gke.add_argument("--spot", action="store_true", help="run on Spot capacity")
    gke.add_argument("--restart-on-user-code-failure", action="store_true",
                     help="also restart when the trainer exits non-zero (xpk restarts only after "
                          "system failures such as preemption by default)")
    gke.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="environment variable for the containers (repeatable)")
    gke.add_argument("--allow-local-paths", action="store_true",
                     help="accept --data and --workdir paths that are not gs:// (a volume mounted in every container)")
    common.add_training_flags(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the xpk command and run nothing")
    return parser


def options_from_args(args: argparse.Namespace) -> XpkOptions:
    """Build XpkOptions from parsed flags; raise ValueError naming a bad value."""
    if args.num_slices < 1:
        raise ValueError(f"--num-slices must be 1 or more, got {args.num_slices}")
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts must be 0 or more, got {args.max_restarts}")
    for flag, value in (("--workdir", args.workdir), ("--data", args.data)):
        if not value.startswith("gs://") and not args.allow_local_paths:
            raise ValueError(f"{flag} {value!r} is not a gs:// path; containers on GKE share no local "
                             "disk, so use a Cloud Storage path such as gs://BUCKET/..., or pass "
                             "--allow-local-paths if the path is a volume mounted in every container")
    env = common.parse_env_assignments(args.env)
    return XpkOptions(cluster=args.cluster, workload=args.workload, tpu_type=args.tpu_type,
                      device_type=args.device_type, num_slices=args.num_slices,
                      training=common.training_args_from(args), docker_image=args.docker_image,
                      base_docker_image=args.base_docker_image, script_dir=args.script_dir,
                      project=args.project, zone=args.zone, max_restarts=args.max_restarts,
                      priority=args.priority, spot=args.spot,
                      restart_on_user_code_failure=args.restart_on_user_code_failure,
                      env=tuple(env.items()))


def main(argv: list[str] | None = None, runner: common.CommandRunner | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = options_from_args(args)
    except ValueError as error:
        parser.error(str(error))

    if args.dry_run:
        runner = common.DryRunRunner()
    else:
        common.configure_logging()
        runner = runner or common.SubprocessRunner()
    try:
        return runner.run(xpk_argv(options), purpose="submit").returncode
    except common.LaunchError as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
