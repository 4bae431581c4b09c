"""Pre-training shards: captures -> BURSTs -> SBP pairs -> `train-SSSSS-of-NNNNN.tfrecord` + manifest.

    python -m pipelines.convert_pretrain INPUT... --output DIR [--num_shards 64] [Beam flags]
    etbert convert-pretrain data/sample-captures --output /tmp/pretrain \
        --direct_num_workers=2 --direct_running_mode=multi_processing

Pipeline:
    Create(capture units) -> ReadBurstsFn (one unit per call; a capture series is one unit)
      -> GroupByKey(pair bucket) -> PairBucketFn (SBP pairs, tokenized, serialized)
      -> Flatten with one marker per shard -> GroupByKey(shard) -> WriteShardsFn
    every stage's counts -> GroupByKey(one key) -> summary.json, read back by this launcher

The shard count is fixed (default 64, a multiple of 64 so that every host of a pod reads whole
files). Shards are written in digest order, so two runs on the same input give identical bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from etbert_jax.tokenizer import Vocab
from pipelines import inputs, manifest, options, splits, transforms

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 64


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a Beam flag must never be taken as an abbreviation of one of ours.
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="etbert convert-pretrain",
        description="Convert captures into pre-training TFRecord shards (MBM + SBP) with Apache Beam. "
                    "Flags not listed here go to Beam (--runner, --direct_num_workers, ...).")
    parser.add_argument("inputs", nargs="+", help="capture files, folders (searched recursively) or globs")
    parser.add_argument("--output", required=True, help="output folder (local or gs://...)")
    options.add_settings_flags(parser, DEFAULT_SHARDS)
    return parser


def capture_units(found: list[tuple[str, str]], series: bool) -> list[tuple[str, list[str], list[str]]]:
    """Return (unit name, paths, names) per capture unit; a series is one unit with its files in numeric order."""
    path_of = {name: path for path, name in found}
    units = []
    for group in splits.group_capture_series(path_of, enabled=series):
        units.append((group[0], [path_of[name] for name in group], list(group)))
    return units


def run(argv: list[str]) -> dict:
    """Run the job and return its manifest (also written to OUTPUT/manifest.json)."""
    args, beam_args = build_parser().parse_known_args(argv)
    settings = options.settings_from_args(args)
    vocab = Vocab.load(settings.vocab)
    output = args.output.rstrip("/")

    found = inputs.expand_inputs(args.inputs)
    units = capture_units(found, settings.series)
    pipeline_options = options.beam_options(beam_args, min(len(units), options.DEFAULT_DASK_PARTITIONS))
    log.info("converting %d capture files in %d units with %s; vocab %s (%d ids), header policy %s, "
             "%d shards -> %s", len(found), len(units), options.runner_name(beam_args) or "DirectRunner",
             vocab.kind, vocab.size, settings.header_policy, settings.num_shards, output)

    if not FileSystems.exists(output):
        FileSystems.mkdirs(output)
    job_temp = manifest.join_path(output, manifest.TEMP_FOLDER, uuid.uuid4().hex)
    summary_path = manifest.join_path(job_temp, manifest.SUMMARY_NAME)
    manifest.remove_stale_shards(output, "train", settings.num_shards)

    started = time.time()
    pipeline = beam.Pipeline(runner=options.make_runner(beam_args), options=pipeline_options)
    read = (pipeline
            | "CaptureUnits" >> beam.Create(units)
            | "ReadBursts" >> beam.ParDo(transforms.ReadBurstsFn(
                settings, transforms.unit_numbers(unit[0] for unit in units))))
    paired = (read
              | "Bursts" >> beam.FlatMap(transforms.only("burst"))
              | "GroupBuckets" >> beam.GroupByKey()
              | "Pair" >> beam.ParDo(transforms.PairBucketFn(settings)))
    markers = pipeline | "ShardMarkers" >> beam.Create(transforms.shard_markers(["train"], settings.num_shards))
    written = ((paired | "Examples" >> beam.FlatMap(transforms.only("example")), markers)
               | "WithMarkers" >> beam.Flatten()
               | "GroupShards" >> beam.GroupByKey()
               | "WriteShards" >> beam.ParDo(transforms.WriteShardsFn(output, settings.num_shards)))
    transforms.add_summary([read, paired, written], summary_path)
    result = manifest.run_to_completion(pipeline)
    elapsed = time.time() - started

    counts = manifest.read_json(summary_path)
    manifest.compare_counters(manifest.counter_totals(result), counts)
    manifest.check_accounting(counts)
    shards = sorted(counts.get("shards", []))
    if len(shards) != settings.num_shards:
        raise RuntimeError(f"expected {settings.num_shards} shards but the job wrote {len(shards)}; "
                           f"check the worker logs for failed WriteShards steps")
    counts.pop("examples_per_output", None)

    config = dataclasses.asdict(settings)
    config.update({"inputs": list(args.inputs), "output": output, "beam_args": beam_args})
    result_manifest = manifest.build_manifest(
        "pretrain", config, settings.tokenizer_block(vocab), settings.seq_len, counts, shards)
    manifest.write_json(manifest.join_path(output, "manifest.json"), result_manifest)
    manifest.remove_temp(output, job_temp)
    _print_summary(result_manifest, output, elapsed)
    return result_manifest


def _print_summary(result_manifest: dict, output: str, elapsed: float) -> None:
    counts = result_manifest["counts"]
    skipped = sum(counts.get("packets_skipped", {}).values())
    print(f"pre-training shards written to {output} in {elapsed:.1f} s", file=sys.stderr)
    print(f"  packets read {counts.get('packets_read', 0)}, used {counts.get('packets_used', 0)}, "
          f"skipped {skipped} {counts.get('packets_skipped', {})}", file=sys.stderr)
    print(f"  sessions {counts.get('sessions', 0)}, BURSTs {counts.get('bursts', 0)} "
          f"({counts.get('bursts_too_short', 0)} too short), examples {counts.get('examples', 0)} "
          f"(negatives {counts.get('negatives', 0)}, unavailable {counts.get('negatives_unavailable', 0)})",
          file=sys.stderr)
    print(f"  shards {len(result_manifest['shards'])}, dead letters {len(result_manifest['dead_letter'])}",
          file=sys.stderr)
    for item in result_manifest["dead_letter"]:
        print(f"    {item['file']}: {item['reason']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return options.run_command(run, argv, "convert-pretrain")


if __name__ == "__main__":
    sys.exit(main())
