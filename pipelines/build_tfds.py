"""Prepare the `etbert_traffic` TFDS dataset from a labeled capture tree (the builder's command line).

    python -m pipelines.build_tfds ROOT --data_dir DATA_DIR [--level packet|flow|both]
        [--split auto|capture|session|packet] [conversion flags of convert-finetune] [Beam flags]

The builder itself is in pipelines/tfds_builder.py, and this module only parses flags and runs it.
The split exists because TFDS cannot locate a builder class defined in a module run as `__main__`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import tensorflow_datasets as tfds

from etbert_jax import convert
from pipelines.tfds_builder import DATASET_NAME, EtbertTraffic


def build(root: str, data_dir: str, level: str, split: str, settings: convert.ConvertSettings,
          beam_args: list[str]) -> tfds.core.DatasetBuilder:
    """Prepare `etbert_traffic/<level>` from `root` in `data_dir` with Beam; return the builder."""
    from pipelines import options

    builder = EtbertTraffic(config=level, data_dir=data_dir, root=root, split_policy=split,
                            settings=dataclasses.asdict(settings))
    download_config = tfds.download.DownloadConfig(manual_dir=root,
                                                   beam_options=options.beam_options(beam_args),
                                                   beam_runner=options.make_runner(beam_args))
    builder.download_and_prepare(download_config=download_config)
    return builder


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of `python -m pipelines.tfds_builder`."""
    from pipelines import options, splits

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.build_tfds",
        description="Prepare the etbert_traffic TFDS dataset from a labeled capture tree with Apache Beam. "
                    "Flags not listed here go to Beam.")
    parser.add_argument("root", help="folder with one subfolder of captures per class")
    parser.add_argument("--data_dir", "--data-dir", dest="data_dir", required=True,
                        help="TFDS data directory to write to")
    parser.add_argument("--level", choices=("packet", "flow", "both"), default="both",
                        help="config(s) to build (default: both)")
    parser.add_argument("--split", default="auto", choices=splits.SPLIT_POLICIES,
                        help="split policy, as in `etbert convert-finetune` (default: auto)")
    options.add_settings_flags(parser, default_shards=1)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the requested configs; return 0."""
    from pipelines import options

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, beam_args = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    settings = options.settings_from_args(args)
    levels = ("packet", "flow") if args.level == "both" else (args.level,)
    for level in levels:
        builder = build(args.root, args.data_dir, level, args.split, settings, beam_args)
        counts = {name: info.num_examples for name, info in builder.info.splits.items()}
        print(f"{DATASET_NAME}/{level} written to {builder.data_dir}: {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
