"""Pieces shared by the launchers: the `etbert pretrain` command line, flag checks and command runners.

A launcher describes every external command as an argument list and hands it to a `CommandRunner`.
`SubprocessRunner` runs the commands; `DryRunRunner` prints them with `shlex.join`, one per line,
and runs nothing. Tests pass their own runner to exercise a launcher's control flow (for example
the TPU preemption loop) without any cloud command being run.
"""

import argparse
import dataclasses
import logging
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

log = logging.getLogger(__name__)

# `section.field=value` or deeper (`model.hidden_size=768`); the trainer's config loader checks the
# key itself, so only the shape is checked here.
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+=")
# POSIX shell variable names.
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LaunchError(RuntimeError):
    """Error of a launch step that a retry cannot fix, such as a missing tool."""


@dataclasses.dataclass(frozen=True)
class TrainingArgs:
    """Arguments that every launcher passes to `etbert pretrain`, whatever the target machine."""

    # Preset name (`tiny`, `small`, `base`, `large`, `etbert_compat`) or path to a YAML file, as seen by the workers.
    config: str
    # Directory of pre-training shards with its manifest.json (a local path or gs:// URL).
    data: str
    # Run directory: checkpoints/, tensorboard/, metrics.jsonl and config.yaml are written there.
    workdir: str
    # Dotted `key=value` config overrides, passed through unchanged and in order.
    overrides: tuple[str, ...] = ()


def validate_overrides(overrides: Sequence[str]) -> tuple[str, ...]:
    """Return the overrides as a tuple, or raise ValueError naming the first malformed one."""
    for item in overrides:
        if not _OVERRIDE.match(item):
            raise ValueError(
                f"invalid config override {item!r}: expected a dotted key and a value such as "
                "train.steps=1000 or data.global_batch_size=512")
    return tuple(overrides)


def parse_env_assignments(items: Sequence[str]) -> dict[str, str]:
    """Turn `NAME=VALUE` strings into a dict, or raise ValueError naming the bad item."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise ValueError(f"invalid --env value {item!r}: expected NAME=VALUE with a shell variable name")
        env[name] = value
    return env


def pretrain_argv(training: TrainingArgs, *, resume: bool, executable: Sequence[str] = ("etbert",),
                  extra_flags: Sequence[str] = ()) -> list[str]:
    """Build the `etbert pretrain` argument list.

    `resume=True` adds `--resume`, as restarts after a failure do. Without it the trainer keeps its
    default, which is to resume when the workdir already contains a checkpoint. `extra_flags` are
    launcher-specific trainer flags such as the distributed ones. The overrides come last, as
    positional arguments.
    """
    argv = [*executable, "pretrain",
            "--config", training.config,
            "--data", training.data,
            "--workdir", training.workdir,
            *extra_flags]
    if resume:
        argv.append("--resume")
    argv.extend(training.overrides)
    return argv


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Add --config, --data, --workdir and the positional overrides that every launcher takes."""
    group = parser.add_argument_group("training (passed to `etbert pretrain`)")
    group.add_argument("--config", required=True,
                       help="preset name (tiny, small, base, large, etbert_compat) or YAML path as seen by the workers")
    group.add_argument("--data", required=True,
                       help="directory of pre-training shards (train-*.tfrecord and manifest.json)")
    group.add_argument("--workdir", required=True,
                       help="run directory for checkpoints, TensorBoard logs and metrics.jsonl")
    group.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="dotted config overrides passed through, e.g. train.steps=1000")


def training_args_from(args: argparse.Namespace) -> TrainingArgs:
    """Build TrainingArgs from parsed flags, checking the overrides."""
    return TrainingArgs(config=args.config, data=args.data, workdir=args.workdir,
                        overrides=validate_overrides(args.overrides))


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """Exit status of one external command and, when captured, its standard output."""

    returncode: int
    stdout: str = ""


class CommandRunner:
    """Interface through which launchers run external commands.

    `purpose` is a short tag such as "describe" or "train" that names the step. Runners may use
    it to choose a scripted result, and the real runner logs it.
    """

    def run(self, argv: Sequence[str], *, purpose: str, capture: bool = False) -> CommandResult:
        raise NotImplementedError

    def note(self, text: str) -> None:
        """Report a step of the plan that is not itself a command."""
        raise NotImplementedError


class SubprocessRunner(CommandRunner):
    """Run each command with `subprocess.run`, passing standard error (and, unless captured, output) through."""

    def run(self, argv: Sequence[str], *, purpose: str, capture: bool = False) -> CommandResult:
        log.info("%s: %s", purpose, shlex.join(argv))
        try:
            completed = subprocess.run(list(argv), stdout=subprocess.PIPE if capture else None,
                                       text=True, check=False)
        except FileNotFoundError:
            raise LaunchError(f"command {argv[0]!r} was not found on PATH; install it or fix PATH "
                              f"(step {purpose!r})") from None
        if completed.returncode != 0:
            log.warning("%s exited with status %d", purpose, completed.returncode)
        return CommandResult(completed.returncode, completed.stdout or "")

    def note(self, text: str) -> None:
        log.info("%s", text)


class DryRunRunner(CommandRunner):
    """Print each command with `shlex.join`, one per line, and run nothing.

    Notes are printed as shell comments (`# ...`), so the output stays a readable shell script.
    `results` maps a purpose to the results to pretend, in order, with the last one repeated: for
    example a failed describe and then a READY one, so that a dry run shows the path that creates a
    TPU VM. Other purposes pretend success with no output.
    """

    def __init__(self, out: TextIO | None = None,
                 results: Mapping[str, Sequence[CommandResult]] | None = None):
        self.out = out if out is not None else sys.stdout
        self.results = {purpose: list(queue) for purpose, queue in (results or {}).items()}
        self.commands: list[list[str]] = []

    def run(self, argv: Sequence[str], *, purpose: str, capture: bool = False) -> CommandResult:
        self.commands.append(list(argv))
        print(shlex.join(argv), file=self.out)
        queue = self.results.get(purpose)
        if not queue:
            return CommandResult(0)
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def note(self, text: str) -> None:
        for line in text.splitlines():
            print(f"# {line}", file=self.out)


def configure_logging() -> None:
    """Log launcher progress to standard error with a timestamp."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s launch: %(message)s")
