"""Fine-tuning shards: a labeled capture tree -> packet- and flow-level examples, split without leakage.

    python -m pipelines.convert_finetune ROOT --output DIR [--split auto|capture|session|packet] [--tsv]
    etbert convert-finetune data/sample-captures --output /tmp/finetune \
        --direct_num_workers=2 --direct_running_mode=multi_processing

ROOT contains one folder per class (`ROOT/<class>/**/*.pcap`); class ids follow the sorted folder
names and are written to `DIR/labels.json`. Output: `DIR/<level>/<split>-SSSSS-of-NNNNN.tfrecord` for
level `packet` and `flow` and split `train`, `valid`, `test`, plus `DIR/manifest.json`, and with
`--tsv` also ET-BERT's `DIR/tsv/<level>/<split>.tsv` (`label<TAB>text_a`).

Pipeline:
    Create(capture units with label, and split for --split capture) -> ReadFinetuneFn
      -> [session/packet split: distinct units per class -> GroupByKey(class) -> seeded assignment,
          joined back to the examples with GroupByKey(unit)]
      -> GroupByKey((level, token-id digest)) -> deduplicate (keep the earliest split's copies)
      -> serialize -> GroupByKey((level/split, shard)) -> WriteShardsFn  [and TSV files]
    every stage's counts -> GroupByKey(one key) -> summary.json, read back by this launcher

Splits are by capture file when every class has at least 3 capture units (a capture series counts
as one), else by session with a warning in the manifest. `--split packet` reproduces ET-BERT's
per-sample split and is flagged as leaking.
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

from etbert_jax import convert
from etbert_jax.tokenizer import Vocab
from pipelines import inputs, manifest, options, splits, transforms

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 8


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a Beam flag must never be taken as an abbreviation of one of ours.
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="etbert convert-finetune",
        description="Convert a labeled capture tree (ROOT/<class>/...) into fine-tuning TFRecord shards with "
                    "Apache Beam. Flags not listed here go to Beam (--runner, --direct_num_workers, ...).")
    parser.add_argument("root", help="folder with one subfolder of captures per class")
    parser.add_argument("--output", required=True, help="output folder (local or gs://...)")
    parser.add_argument("--split", default="auto", choices=splits.SPLIT_POLICIES,
                        help="auto (default): by capture file when every class has >= 3, else by session; "
                             "packet: ET-BERT's per-sample split (leaks, compatibility only)")
    parser.add_argument("--tsv", action="store_true",
                        help="also write ET-BERT's TSV files (label<TAB>space-separated hex bigrams)")
    options.add_settings_flags(parser, DEFAULT_SHARDS)
    return parser


def capture_units(tree: dict[str, list[tuple[str, str]]], series: bool) -> tuple[list[splits.CaptureUnit], dict]:
    """Return the capture units of every class and a name -> path map."""
    path_of = {}
    units = []
    for label, files in sorted(tree.items()):
        for path, name in files:
            path_of[name] = path
        for group in splits.group_capture_series([name for _, name in files], enabled=series):
            units.append(splits.CaptureUnit(label=label, paths=group))
    return units, path_of


@dataclasses.dataclass(frozen=True)
class Plan:
    """The inputs of a fine-tuning job: classes, capture units and the resolved split policy."""

    # Class name -> label id (sorted class folder names).
    labels: dict[str, int]
    # Capture units of every class; a capture series is one unit.
    units: list[splits.CaptureUnit]
    # File name relative to the root -> path to read.
    path_of: dict[str, str]
    # Class name -> number of capture units.
    units_per_class: dict[str, int]
    # "capture", "session" or "packet" (never "auto").
    policy: str
    # Leakage warning for the manifest, or None.
    warning: str | None
    # Unit key -> split for the capture policy; empty for the others.
    capture_assignment: dict[str, str]

    @property
    def elements(self) -> list[tuple]:
        """Return the `ReadFinetuneFn` inputs: (unit, paths, names, label id, split or None)."""
        return [(unit.key, [self.path_of[name] for name in unit.paths], list(unit.paths), self.labels[unit.label],
                 self.capture_assignment.get(unit.key)) for unit in self.units]


def plan(root: str, requested_split: str, settings: convert.ConvertSettings) -> Plan:
    """List the labeled tree, group capture series, choose the split policy and assign captures."""
    tree = inputs.list_labeled_tree(root)
    labels = {name: index for index, name in enumerate(sorted(tree))}
    units, path_of = capture_units(tree, settings.series)
    # NOTE: files are counted before they are read, so an unreadable capture (a dead letter later)
    # still counts toward the three captures per class that the split by capture needs.
    units_per_class = {label: sum(1 for unit in units if unit.label == label) for label in labels}
    policy, warning = splits.choose_policy(requested_split, units_per_class)
    if warning:
        log.warning("%s", warning)
    capture_assignment = splits.assign_capture_splits(units, settings.seed) if policy == "capture" else {}
    return Plan(labels, units, path_of, units_per_class, policy, warning, capture_assignment)


def _keyed_by_unit(policy: str):
    def key(item):
        label, _, example = item
        return transforms.split_unit(policy, label, example), item
    return key


def assign_splits(items, policy: str, seed: int):
    """Attach a split to (label, None, example) items by session or by example (Beam sub-graph)."""
    keyed = items | "KeyByUnit" >> beam.Map(_keyed_by_unit(policy))
    assignment = (keyed
                  | "UnitOnly" >> beam.Map(lambda kv: (kv[0], None))
                  | "DistinctUnits" >> beam.GroupByKey()
                  | "GroupUnit" >> beam.Map(lambda kv: kv[0])
                  | "UnitsPerGroup" >> beam.GroupByKey()
                  | "AssignUnits" >> beam.FlatMap(transforms.assign_group_fn(seed)))
    tagged_items = keyed | "TagItems" >> beam.Map(lambda kv: (kv[0][1], ("item", kv[1])))
    return ((assignment, tagged_items)
            | "JoinSplits" >> beam.Flatten()
            | "GroupByUnit" >> beam.GroupByKey()
            | "AttachSplit" >> beam.FlatMap(transforms.attach_split))


def build_pipeline(pipeline, elements: list, policy: str, settings: convert.ConvertSettings, output: str,
                   with_tsv: bool, summary_path: str) -> None:
    """Add the job's steps to `pipeline`: read, split, deduplicate, write shards (and TSV), summarize."""
    prefixes = [f"{level}/{split}" for level in convert.LEVELS for split in splits.SPLITS]
    read = (pipeline
            | "CaptureUnits" >> beam.Create(elements)
            | "ReadExamples" >> beam.ParDo(transforms.ReadFinetuneFn(
                settings, with_tsv, transforms.unit_numbers(element[0] for element in elements))))
    items = read | "Examples" >> beam.FlatMap(transforms.only("example"))
    assigned = items if policy == "capture" else assign_splits(items, policy, settings.seed)

    session_stats = (assigned
                     | "SessionSplit" >> beam.Map(lambda item: (item[2].session_uid, item[1]))
                     | "GroupSessions" >> beam.GroupByKey()
                     | "CountSessions" >> beam.FlatMap(transforms.count_session_splits))
    deduplicated = (assigned
                    | "KeyByContent" >> beam.Map(lambda item: ((item[2].level, convert.content_digest(
                        item[2].input_ids)), item))
                    | "GroupCopies" >> beam.GroupByKey()
                    | "Deduplicate" >> beam.FlatMap(transforms.deduplicate))
    kept = deduplicated | "Kept" >> beam.FlatMap(transforms.only("example"))

    markers = pipeline | "ShardMarkers" >> beam.Create(transforms.shard_markers(prefixes, settings.num_shards))
    written = ((kept | "Serialize" >> beam.ParDo(transforms.SerializeFinetuneFn(settings.num_shards)), markers)
               | "WithMarkers" >> beam.Flatten()
               | "GroupShards" >> beam.GroupByKey()
               | "WriteShards" >> beam.ParDo(transforms.WriteShardsFn(output, settings.num_shards)))
    stat_parts = [read, session_stats, deduplicated, written]

    if with_tsv:
        tsv_markers = pipeline | "TsvMarkers" >> beam.Create(
            [((level, split), None) for level in convert.LEVELS for split in splits.SPLITS])
        stat_parts.append((kept | "TsvRows" >> beam.Map(transforms.tsv_row), tsv_markers)
                          | "TsvWithMarkers" >> beam.Flatten()
                          | "GroupTsv" >> beam.GroupByKey()
                          | "WriteTsv" >> beam.FlatMap(transforms.write_tsv_fn(output)))
    transforms.add_summary(stat_parts, summary_path)


def split_summary(counts: dict, requested: str, job: Plan, seed: int) -> dict:
    """Return the manifest's split section, moving the split counts out of `counts`."""
    removed = counts.pop("duplicates_removed", {})
    sessions_found = counts.pop("sessions_per_split", {})
    files = splits.files_per_split(job.units, job.capture_assignment) if job.policy == "capture" else None
    return {
        "policy": job.policy,
        "requested": requested,
        "warning": job.warning,
        "seed": seed,
        "fractions": list(splits.DEFAULT_FRACTIONS),
        "units_per_class": job.units_per_class,
        "files_per_split": files,
        "sessions_per_split": {split: sessions_found.get(split, 0) for split in splits.SPLITS},
        "sessions_in_several_splits": counts.pop("sessions_in_several_splits", 0),
        "duplicates_removed": {level: {split: removed.get(level, {}).get(split, 0) for split in splits.SPLITS}
                               for level in convert.LEVELS},
    }


def run(argv: list[str]) -> dict:
    """Run the job and return its manifest (also written to OUTPUT/manifest.json)."""
    args, beam_args = build_parser().parse_known_args(argv)
    settings = options.settings_from_args(args)
    vocab = Vocab.load(settings.vocab)
    output = args.output.rstrip("/")

    # ---- inputs, labels and the split policy --------------------------------------------------
    job = plan(args.root, args.split, settings)
    pipeline_options = options.beam_options(beam_args, min(len(job.units), options.DEFAULT_DASK_PARTITIONS))
    log.info("converting %d capture files of %d classes (%d units), split by %s; vocab %s (%d ids), header "
             "policy %s, %d shards per level and split -> %s", len(job.path_of), len(job.labels), len(job.units),
             job.policy, vocab.kind, vocab.size, settings.header_policy, settings.num_shards, output)

    if not FileSystems.exists(output):
        FileSystems.mkdirs(output)
    manifest.write_json(manifest.join_path(output, "labels.json"), job.labels)
    job_temp = manifest.join_path(output, manifest.TEMP_FOLDER, uuid.uuid4().hex)
    summary_path = manifest.join_path(job_temp, manifest.SUMMARY_NAME)
    prefixes = [f"{level}/{split}" for level in convert.LEVELS for split in splits.SPLITS]
    for prefix in prefixes:
        manifest.remove_stale_shards(output, prefix, settings.num_shards)

    # ---- the pipeline --------------------------------------------------------------------------
    started = time.time()
    pipeline = beam.Pipeline(runner=options.make_runner(beam_args), options=pipeline_options)
    build_pipeline(pipeline, job.elements, job.policy, settings, output, args.tsv, summary_path)
    result = manifest.run_to_completion(pipeline)
    elapsed = time.time() - started

    # ---- manifest ------------------------------------------------------------------------------
    counts = manifest.read_json(summary_path)
    manifest.compare_counters(manifest.counter_totals(result), counts)
    manifest.check_accounting(counts)
    shards = {level: {split: [] for split in splits.SPLITS} for level in convert.LEVELS}
    for name in sorted(counts.get("shards", [])):
        level, rest = name.split("/", 1)
        shards[level][rest.split("-", 1)[0]].append(name)
    expected = len(prefixes) * settings.num_shards
    if len(counts.get("shards", [])) != expected:
        raise RuntimeError(f"expected {expected} shards but the job wrote {len(counts.get('shards', []))}; "
                           "check the worker logs for failed WriteShards steps")

    per_output = counts.pop("examples_per_output", {})
    counts["examples_per_split"] = {
        level: {split: per_output.get(f"{level}/{split}", 0) for split in splits.SPLITS} for level in convert.LEVELS}
    split_section = split_summary(counts, args.split, job, settings.seed)
    config = dataclasses.asdict(settings)
    config.update({"root": args.root, "output": output, "split": args.split, "tsv": args.tsv,
                   "beam_args": beam_args})
    result_manifest = manifest.build_manifest(
        "finetune", config, settings.tokenizer_block(vocab),
        {"packet": settings.packet_seq_len, "flow": settings.flow_seq_len}, counts, shards, split_section)
    result_manifest["labels"] = job.labels
    manifest.write_json(manifest.join_path(output, "manifest.json"), result_manifest)
    manifest.remove_temp(output, job_temp)
    _print_summary(result_manifest, output, elapsed)
    return result_manifest


def _print_summary(result_manifest: dict, output: str, elapsed: float) -> None:
    counts = result_manifest["counts"]
    split = result_manifest["split"]
    print(f"fine-tuning shards written to {output} in {elapsed:.1f} s (split by {split['policy']})", file=sys.stderr)
    print(f"  packets read {counts.get('packets_read', 0)}, used {counts.get('packets_used', 0)}, skipped "
          f"{sum(counts.get('packets_skipped', {}).values())} {counts.get('packets_skipped', {})}", file=sys.stderr)
    print(f"  sessions {counts.get('sessions', 0)}, examples {counts.get('examples', 0)}", file=sys.stderr)
    for level, per_split in counts["examples_per_split"].items():
        print(f"  {level:6s} examples {per_split}, duplicates removed {split['duplicates_removed'][level]}",
              file=sys.stderr)
    if split["warning"]:
        print(f"  WARNING: {split['warning']}", file=sys.stderr)
    print(f"  dead letters {len(result_manifest['dead_letter'])}", file=sys.stderr)
    for item in result_manifest["dead_letter"]:
        print(f"    {item['file']}: {item['reason']}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return options.run_command(run, argv, "convert-finetune")


if __name__ == "__main__":
    sys.exit(main())
