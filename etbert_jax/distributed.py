"""Multi-process JAX start-up: `jax.distributed.initialize` for pods, clusters and local tests.

`initialize()` must run before any other JAX call, because the first backend call fixes the
device set of the process. Three ways to start:

- TPU VMs and SLURM: JAX detects the cluster from its environment, so `initialize` is called with
  no arguments (one identical command on every host, or one `srun` task per GPU or node).
- Explicit: coordinator address, process count and process id from the `--coordinator`,
  `--num-processes` and `--process-id` flags, or from the `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` environment variables (flags win).
- Nothing set: a single process; `jax.distributed` is not started.

On CPU, cross-process collectives go through gloo, which is how the multi-process tests run
two local processes against a `localhost` coordinator.
"""

import argparse
import dataclasses
import logging
import os

import jax

log = logging.getLogger(__name__)

# Environment variables that JAX's own cluster detection understands (TPU VMs, SLURM).
_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "TPU_WORKER_ID", "MEGASCALE_COORDINATOR_ADDRESS")
_SLURM_ENV_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """Settings for joining this process to a multi-process JAX run."""

    # host:port of the coordinator (process 0); None means auto-detect or single process.
    coordinator: str | None = None
    # Total number of processes in the run; None means auto-detect or single process.
    num_processes: int | None = None
    # Index of this process in [0, num_processes); None means auto-detect or single process.
    process_id: int | None = None
    # Call `jax.distributed.initialize()` without arguments even without TPU/SLURM variables.
    auto: bool = False


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add the distributed flags shared by every JAX subcommand."""
    group = parser.add_argument_group("distributed")
    group.add_argument("--coordinator", default=None,
                       help="host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, or auto-detect)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="number of processes in the run (default: $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None,
                       help="index of this process, 0-based (default: $JAX_PROCESS_ID)")
    group.add_argument("--auto-distributed", action="store_true",
                       help="call jax.distributed.initialize() with no arguments (cluster auto-detection)")


def options_from_args(args: argparse.Namespace) -> DistributedOptions:
    """Merge the distributed flags with the JAX_* environment variables (flags win)."""

    def env_int(name: str) -> int | None:
        value = os.environ.get(name)
        if value is None or value == "":
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

    coordinator = getattr(args, "coordinator", None) or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = getattr(args, "num_processes", None)
    if num_processes is None:
        num_processes = env_int("JAX_NUM_PROCESSES")
    process_id = getattr(args, "process_id", None)
    if process_id is None:
        process_id = env_int("JAX_PROCESS_ID")
    return DistributedOptions(coordinator=coordinator, num_processes=num_processes,
                              process_id=process_id, auto=bool(getattr(args, "auto_distributed", False)))


def _cluster_detected() -> str | None:
    if any(name in os.environ for name in _TPU_ENV_VARS):
        return "TPU VM"
    if all(name in os.environ for name in _SLURM_ENV_VARS) and int(os.environ["SLURM_NTASKS"]) > 1:
        return "SLURM"
    return None


def _use_gloo_on_cpu() -> None:
    # The option only configures the CPU backend's cross-process collectives, so it is set on every
    # platform: GPU and TPU runs are unaffected, and CPU runs get working collectives even when
    # JAX_PLATFORMS is unset. It must be set before the backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(options: DistributedOptions) -> None:
    """Start `jax.distributed` as the options or the cluster environment request, then log the devices.

    Raises ValueError when the explicit settings are incomplete or out of range.
    """
    explicit = (options.coordinator, options.num_processes, options.process_id)
    if any(value is not None for value in explicit):
        if any(value is None for value in explicit):
            raise ValueError(
                "explicit multi-process start needs all of --coordinator, --num-processes and "
                f"--process-id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); "
                f"got coordinator={options.coordinator!r}, num_processes={options.num_processes!r}, "
                f"process_id={options.process_id!r}")
        if options.num_processes < 1 or not 0 <= options.process_id < options.num_processes:
            raise ValueError(f"process id {options.process_id} is outside [0, {options.num_processes}); "
                             "process ids run from 0 to num_processes - 1")
        _use_gloo_on_cpu()
        if options.num_processes > 1:
            jax.distributed.initialize(coordinator_address=options.coordinator,
                                       num_processes=options.num_processes,
                                       process_id=options.process_id)
    elif options.auto or _cluster_detected():
        log.info("initializing jax.distributed with cluster auto-detection (%s)", _cluster_detected() or "forced")
        _use_gloo_on_cpu()
        jax.distributed.initialize()

    log_topology()


def log_topology() -> None:
    """Log process index and count, local and global device counts and the device kind."""
    devices = jax.devices()
    log.info("process %d of %d: %d local devices, %d global devices, device kind %s, platform %s",
             jax.process_index(), jax.process_count(), jax.local_device_count(), len(devices),
             devices[0].device_kind, devices[0].platform)


def is_primary() -> bool:
    """Return whether this is process 0, the one that writes logs, TensorBoard and config files."""
    return jax.process_index() == 0
