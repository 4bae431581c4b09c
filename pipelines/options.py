"""Command-line flags of the conversion jobs and the Beam `PipelineOptions` built from the rest.

Our own flags (inputs, output, tokenizer, header policy, shard counts, ...) are parsed with argparse
`parse_known_args`. Every other flag goes unchanged to Beam's `PipelineOptions`, so any runner flag
works: `--runner`, `--direct_num_workers`, `--direct_running_mode`, Dataflow's
`--project/--region/--temp_location`, `--flink_master`, `--dask_client_address`, ...

Code reaches the workers as follows:
- DirectRunner and DaskRunner workers are local processes, or Dask workers where etbert-jax is
  installed. The repository root is prepended to PYTHONPATH, so local worker processes import
  `etbert_jax` and `pipelines` without an install.
- Every other runner (Dataflow, Flink, Spark) gets `--setup_file` pointing at the repository's
  setup.py unless the command line sets `--setup_file`, `--requirements_file` or
  `--sdk_container_image` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
from collections.abc import Callable

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineRunner

from etbert_jax.capture.options import HEADER_POLICIES
from etbert_jax.convert import ConvertSettings

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SETUP_FILE = REPO_ROOT / "setup.py"
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"
# Dask bag partitions per Create step unless --dask_npartitions or --dask_partition_size is given.
DEFAULT_DASK_PARTITIONS = 16
# Runners whose workers run in local processes or on machines set up by the user.
_LOCAL_RUNNERS = ("DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner", "DaskRunner", "")


def add_settings_flags(parser: argparse.ArgumentParser, default_shards: int) -> None:
    """Add the flags that fill `ConvertSettings` (shared by both jobs)."""
    defaults = ConvertSettings()
    group = parser.add_argument_group("tokenization")
    group.add_argument("--header_policy", "--header-policy", dest="header_policy",
                       default=defaults.header_policy, choices=HEADER_POLICIES,
                       help="which packet bytes become tokens; 'etbert' reproduces ET-BERT exactly "
                            "(raw 64-byte frames in BURSTs, frames minus 38 bytes for fine-tuning)")
    group.add_argument("--vocab", default=None,
                       help="ET-BERT vocabulary file (WordPiece); default: the built-in 65,541-id bigram vocab")
    group.add_argument("--bytes_per_packet", "--bytes-per-packet", dest="bytes_per_packet", type=int,
                       default=defaults.bytes_per_packet, help="bytes each packet contributes to a BURST")
    group.add_argument("--tokens_per_packet", "--tokens-per-packet", dest="tokens_per_packet", type=int,
                       default=defaults.tokens_per_packet, help="bigram tokens kept per packet (fine-tuning)")
    group.add_argument("--packets_per_flow", "--packets-per-flow", dest="packets_per_flow", type=int,
                       default=defaults.packets_per_flow, help="first packets of a session in a flow example")
    group.add_argument("--seq_len", "--seq-len", dest="seq_len", type=int, default=defaults.seq_len,
                       help="max tokens of a pre-training example, [CLS] and both [SEP] included")
    group.add_argument("--packet_seq_len", "--packet-seq-len", dest="packet_seq_len", type=int,
                       default=defaults.packet_seq_len, help="max tokens of a packet-level example")
    group.add_argument("--flow_seq_len", "--flow-seq-len", dest="flow_seq_len", type=int,
                       default=defaults.flow_seq_len, help="max tokens of a flow-level example")
    group.add_argument("--max_packets_per_session", "--max-packets-per-session",
                       dest="max_packets_per_session", type=int, default=defaults.max_packets_per_session,
                       help="cap on packet-level examples per session (default: no cap)")
    group.add_argument("--negative_ratio", "--negative-ratio", dest="negative_ratio", type=float,
                       default=defaults.negative_ratio,
                       help="fraction of BURSTs paired with a B half from another session (SBP label 1)")
    group.add_argument("--pair_buckets", "--pair-buckets", dest="pair_buckets", type=int,
                       default=defaults.pair_buckets,
                       help="groups BURSTs are hashed into for negative pairing; each group is held in "
                            "one worker's memory")
    group.add_argument("--seed", type=int, default=defaults.seed, help="seed of pairing and split shuffles")

    group = parser.add_argument_group("sessions")
    group.add_argument("--idle_timeout_s", "--idle-timeout", dest="idle_timeout_s", type=float,
                       default=defaults.idle_timeout_s, help="seconds without packets that end a session (0: off)")
    group.add_argument("--active_timeout_s", "--active-timeout", dest="active_timeout_s", type=float,
                       default=defaults.active_timeout_s, help="max session duration in seconds (0: off)")
    group.add_argument("--no_fin_rst_split", "--no-fin-rst-split", dest="split_on_fin_rst",
                       action="store_false", help="do not end TCP sessions at FIN/RST")

    group = parser.add_argument_group("output")
    group.add_argument("--num_shards", "--num-shards", dest="num_shards", type=int, default=default_shards,
                       help="TFRecord files per output (use a multiple of the number of hosts that read them)")
    group.add_argument("--no_series", "--no-series", dest="series", action="store_false",
                       help="read files with trailing numbers (capture_00001.pcap, ...) as separate captures")


def settings_from_args(args: argparse.Namespace) -> ConvertSettings:
    """Build `ConvertSettings` from parsed flags."""
    names = {field.name for field in dataclasses.fields(ConvertSettings)}
    return ConvertSettings(**{name: value for name, value in vars(args).items() if name in names})


def runner_name(beam_args: list[str]) -> str:
    """Return the runner named in the Beam flags ('' when none is given, which means DirectRunner)."""
    for index, arg in enumerate(beam_args):
        if arg.startswith("--runner="):
            return arg.split("=", 1)[1].rsplit(".", 1)[-1]
        if arg == "--runner" and index + 1 < len(beam_args):
            return beam_args[index + 1].rsplit(".", 1)[-1]
    return ""


def beam_options(beam_args: list[str], dask_partitions: int = DEFAULT_DASK_PARTITIONS) -> PipelineOptions:
    """Build `PipelineOptions` from the flags argparse left over, adding what workers need.

    `dask_partitions` is the Dask bag partition count used when the command line sets none.
    """
    args = list(beam_args)
    runner = runner_name(args)

    # Beam finds the Dask runner only by its module path.
    args = [DASK_RUNNER if arg == "DaskRunner" else arg.replace("=DaskRunner", "=" + DASK_RUNNER)
            for arg in args]
    if runner == "DaskRunner" and not any(a.startswith(("--dask_npartitions", "--dask_partition_size"))
                                          for a in args):
        # Beam's default puts up to 128 elements in one partition, which would read every capture in
        # one task. One partition per element is no better: each GroupByKey then shuffles between
        # hundreds of tiny partitions (3-4x slower on the test captures).
        args.append(f"--dask_npartitions={max(1, dask_partitions)}")

    # NOTE: the --setup_file path is exercised only by building the sdist locally; no Dataflow, Flink
    # or Spark job has been run with it.
    if runner not in _LOCAL_RUNNERS:
        shipped = ("--setup_file", "--requirements_file", "--sdk_container_image")
        if not any(a.startswith(shipped) for a in args):
            args.append(f"--setup_file={SETUP_FILE}")

    _ensure_importable()
    return PipelineOptions(args)


def make_runner(beam_args: list[str]) -> PipelineRunner | None:
    """Return the runner object to pass to `beam.Pipeline`, or None to let Beam pick it by name.

    Beam 2.77's DirectRunner first tries its Prism runner, which downloads a binary from the
    internet when none is cached, and only then falls back to the FnApiRunner. For `DirectRunner`
    (or no runner flag) we start the FnApiRunner directly: it is what the fallback would run, it
    honours `--direct_num_workers` and `--direct_running_mode`, and it needs no download.
    """
    if runner_name(beam_args) not in ("", "DirectRunner", "SwitchingDirectRunner"):
        return None

    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(PipelineOptions(beam_args).get_all_options())
    provision = fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return fn_runner.FnApiRunner(provision_info=provision)


def configure_logging() -> None:
    """Log our progress at INFO and Beam's own messages at WARNING.

    Beam's runner logs every stage at INFO, which would bury the job's progress lines. Set
    ETBERT_BEAM_LOG_LEVEL=INFO to see them. NOTE: worker processes of the multi-processing
    DirectRunner configure their own logging and still print Beam's INFO lines.
    """
    # force=True: importing Beam already installed a root handler, which would make this a no-op.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("apache_beam").setLevel(os.environ.get("ETBERT_BEAM_LOG_LEVEL", "WARNING"))


def _ensure_importable() -> None:
    """Prepend the repository root to PYTHONPATH, so that local worker processes find our packages."""
    current = os.environ.get("PYTHONPATH", "")
    parts = [p for p in current.split(os.pathsep) if p]
    if str(REPO_ROOT) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + parts)


def run_command(run: Callable[[list[str]], object], argv: list[str] | None, command: str) -> int:
    """Run a conversion job's `run(argv)` as `etbert COMMAND`; return its exit code.

    An input path that does not exist or contains no capture gives a one-line error and exit code 2.
    """
    configure_logging()
    try:
        run(sys.argv[1:] if argv is None else argv)
    except FileNotFoundError as error:
        print(f"etbert {command}: error: {error}", file=sys.stderr)
        return 2
    return 0
