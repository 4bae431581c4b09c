"""Beam DoFns of the conversion jobs: thin wrappers over `etbert_jax.convert` and `pipelines.splits`.

Every DoFn yields tagged tuples `(tag, value)` on one output: `("stats", counts)` for the job summary
and a stage-specific tag (`"burst"`, `"example"`, ...) for data. `only(tag)` selects one kind. The
pipelines use nothing beyond Create, ParDo, GroupByKey and Flatten, because those are the transforms
every runner supports, the DaskRunner included. They also avoid tagged outputs and side inputs.

Shards are written by `WriteShardsFn` instead of `WriteToTFRecord`. Each example gets a digest of its
origin and content, the digest picks its shard, and each shard is written sorted by digest. The output
is thus a deterministic function of the input and the settings, so a rerun gives byte-identical
shards, which Beam's sink does not promise because it keeps no order.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import Metrics

from etbert_jax import convert, records
from etbert_jax.capture import CaptureFormatError, SkipCounter
from etbert_jax.tokenizer import Vocab
from pipelines import manifest, splits

log = logging.getLogger(__name__)


def only(tag: str):
    """Return a FlatMap function that keeps the values of elements tagged `tag`."""
    def select(element):
        if element[0] == tag:
            yield element[1]
    return select


def shard_of(digest: str, num_shards: int) -> int:
    """Return the shard index an example digest maps to."""
    return int(digest[:16], 16) % num_shards


def example_digest(origin: str, data: bytes) -> str:
    """Return the sort key of an example: a digest of where it came from and its bytes."""
    return hashlib.sha256(origin.encode("utf-8") + b"\0" + data).hexdigest()


@contextlib.contextmanager
def local_paths(paths: Sequence[str]) -> Iterator[list[str]]:
    """Yield local paths for `paths`, copying remote files (gs://, s3://, ...) to a temp folder first."""
    if not any("://" in path for path in paths):
        yield list(paths)
        return
    folder = tempfile.mkdtemp(prefix="etbert-capture-")
    try:
        local = []
        for number, path in enumerate(paths):
            if "://" not in path:
                local.append(path)
                continue
            target = os.path.join(folder, f"{number:05d}-{os.path.basename(path)}")
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as source, \
                    open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)
            local.append(target)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class _ReadUnitFn(beam.DoFn):
    """Shared reading logic: dead letters, accounting after unexpected errors, counters."""

    def __init__(self, settings: convert.ConvertSettings, unit_numbers: dict[str, int] | None = None) -> None:
        self.settings = settings
        # Unit name -> 1-based number in the job, for progress lines such as "[12/58]"; optional.
        self.unit_numbers = unit_numbers or {}

    def _summary(self, unit: str, paths: Sequence[str], stats: SkipCounter, counts: Counter,
                 dead: list[dict], failed: BaseException | None) -> dict:
        if failed is not None:
            # Packets read before the error were neither used nor skipped: count them, keep the equation.
            gap = stats.packets_read - stats.packets_used - stats.total_skipped
            if gap > 0:
                stats.packets_skipped["aborted_by_error"] += gap
            dead.append({"file": unit, "reason": f"{type(failed).__name__}: {failed}"})
        summary = stats.as_dict()
        summary.update(counts)
        summary["files"] = len(paths)
        summary["dead_letter"] = dead
        _count(summary)
        progress = f"[{self.unit_numbers.get(unit, '?')}/{len(self.unit_numbers) or '?'}] "
        log.info("%sread %s: %d packets, %d used, %d sessions", progress, unit, stats.packets_read,
                 stats.packets_used, counts.get("sessions", 0))
        return summary


def unit_numbers(unit_names) -> dict[str, int]:
    """Return unit name -> 1-based number, for the progress lines of the reading DoFns."""
    return {name: number for number, name in enumerate(unit_names, start=1)}


def _count(summary: dict) -> None:
    """Add a unit's counts to the Beam counters."""
    for name in ("packets_read", "packets_used", "sessions", "bursts", "files"):
        if summary.get(name):
            Metrics.counter(manifest.COUNTER_NAMESPACE, name).inc(summary[name])
    for reason, number in summary.get("packets_skipped", {}).items():
        Metrics.counter(manifest.COUNTER_NAMESPACE, f"packets_skipped_{reason}").inc(number)
    if summary.get("dead_letter"):
        Metrics.counter(manifest.COUNTER_NAMESPACE, "dead_letter").inc(len(summary["dead_letter"]))


def _dead_letter_handler(dead: list[dict]):
    def on_format_error(name: str, error: CaptureFormatError) -> None:
        log.warning("dead letter: %s is not a readable capture (%s)", name, error.reason)
        dead.append({"file": name, "reason": error.reason})
    return on_format_error


# ---- pre-training -----------------------------------------------------------------------------

class ReadBurstsFn(_ReadUnitFn):
    """(unit, paths, names) -> ("burst", (bucket, BurstHalves))..., ("stats", counts)."""

    def process(self, unit_element):
        unit, paths, names = unit_element
        stats, counts, dead = SkipCounter(), Counter(), []
        failed = None
        try:
            with local_paths(paths) as local:
                halves_iter = convert.iter_burst_halves(local, names, unit, self.settings, stats, counts,
                                                        _dead_letter_handler(dead))
                for halves in halves_iter:
                    bucket = halves.bucket(self.settings.pair_buckets)
                    yield "burst", (bucket, halves)
        except Exception as err:  # a damaged capture must not stop the job: it becomes a dead letter
            log.exception("reading %s failed; its remaining packets are counted as aborted_by_error", unit)
            failed = err
        yield "stats", self._summary(unit, paths, stats, counts, dead, failed)


class PairBucketFn(beam.DoFn):
    """(bucket, [BurstHalves]) -> ("example", ((prefix, shard), (digest, bytes)))..., ("stats", counts)."""

    def __init__(self, settings: convert.ConvertSettings) -> None:
        self.settings = settings
        self.vocab = None

    def setup(self) -> None:
        self.vocab = Vocab.load(self.settings.vocab)

    def process(self, element):
        bucket, bursts = element
        counts: Counter = Counter()
        pairs = convert.pair_bucket(bursts, bucket, self.settings, counts)
        for (burst, _, _), data in zip(pairs, convert.pretrain_examples_bytes(pairs, self.vocab, self.settings)):
            digest = example_digest(burst.key, data)
            yield "example", (("train", shard_of(digest, self.settings.num_shards)), (digest, data))
        yield "stats", dict(counts)


# ---- fine-tuning ------------------------------------------------------------------------------

class ReadFinetuneFn(_ReadUnitFn):
    """(unit, paths, names, label, split or None) -> ("example", (label, split, example))..., stats."""

    def __init__(self, settings: convert.ConvertSettings, with_text: bool,
                 unit_numbers: dict[str, int] | None = None) -> None:
        super().__init__(settings, unit_numbers)
        self.with_text = with_text
        self.vocab = None

    def setup(self) -> None:
        self.vocab = Vocab.load(self.settings.vocab)

    def process(self, unit_element):
        unit, paths, names, label, split = unit_element
        stats, counts, dead = SkipCounter(), Counter(), []
        failed = None
        try:
            with local_paths(paths) as local:
                examples = convert.iter_finetune_examples(
                    local, self.settings, self.vocab, names=names, unit=unit, stats=stats, counts=counts,
                    with_text=self.with_text, on_format_error=_dead_letter_handler(dead))
                for example in examples:
                    yield "example", (label, split, example)
        except Exception as err:  # a damaged capture must not stop the job: it becomes a dead letter
            log.exception("reading %s failed; its remaining packets are counted as aborted_by_error", unit)
            failed = err
        yield "stats", self._summary(unit, paths, stats, counts, dead, failed)


def split_unit(policy: str, label: int, example: convert.FinetuneExample) -> tuple[str, str]:
    """Return (group, unit) for split assignment: sessions per class, or examples per level and class."""
    if policy == "session":
        return f"class:{label}", example.session_uid
    return f"class:{label}:{example.level}", example.uid


def assign_group_fn(seed: int):
    """Return a FlatMap function: (group, [unit, ...]) -> (unit, ("split", split))..."""
    def assign(element):
        group, units = element
        for unit, split in sorted(splits.assign_splits(units, seed, salt=group).items()):
            yield unit, ("split", split)
    return assign


def attach_split(element):
    """(unit, [("split", s), ("item", (label, None, example)), ...]) -> (label, s, example)..."""
    _, tagged = element
    split = next(value for tag, value in tagged if tag == "split")
    for tag, value in tagged:
        if tag == "item":
            label, _, example = value
            yield label, split, example


def count_session_splits(element):
    """(session uid, [split, ...]) -> ("stats", sessions per split)."""
    _, found = element
    distinct = sorted(set(found))
    counts = {"sessions_per_split": {split: 1 for split in distinct}}
    if len(distinct) > 1:
        counts["sessions_in_several_splits"] = 1
    yield "stats", counts


def deduplicate(element):
    """((level, digest), [(label, split, example), ...]) -> kept items, then ("stats", removed counts)."""
    (level, _), copies = element
    copies = sorted(copies, key=lambda item: (splits.SPLITS.index(item[1]), item[2].uid))
    keep = splits.resolve_duplicates([split for _, split, _ in copies])
    removed: Counter = Counter()
    for kept, item in zip(keep, copies):
        if kept:
            yield "example", item
        else:
            removed[item[1]] += 1
    if removed:
        yield "stats", {"duplicates_removed": {level: dict(removed)}}


class SerializeFinetuneFn(beam.DoFn):
    """(label, split, example) -> ((level/split, shard), (digest, bytes))."""

    def __init__(self, num_shards: int) -> None:
        self.num_shards = num_shards

    def process(self, item):
        label, split, example = item
        data = convert.finetune_example_bytes(example, label)
        digest = example_digest(example.uid, data)
        yield (f"{example.level}/{split}", shard_of(digest, self.num_shards)), (digest, data)


# ---- writing ----------------------------------------------------------------------------------

def shard_markers(prefixes: Sequence[str], num_shards: int) -> list:
    """Return one empty marker per shard, so that shards without examples are written too."""
    return [((prefix, shard), None) for prefix in prefixes for shard in range(num_shards)]


class WriteShardsFn(beam.DoFn):
    """((prefix, shard), [(digest, bytes) or None, ...]) -> writes one TFRecord file, yields stats."""

    def __init__(self, output: str, num_shards: int) -> None:
        self.output = output
        self.num_shards = num_shards

    def process(self, element):
        (prefix, shard), items = element
        examples = sorted(item for item in items if item is not None)
        name = manifest.shard_name(prefix, shard, self.num_shards)
        path = manifest.join_path(self.output, *name.split("/"))
        temp_path = path + ".incomplete"

        # Write under a temporary name and rename, so a retried bundle never leaves half a shard.
        with FileSystems.create(temp_path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            written = records.write_tfrecords(handle, (data for _, data in examples))
        FileSystems.rename([temp_path], [path])

        Metrics.counter(manifest.COUNTER_NAMESPACE, "examples").inc(written)
        yield "stats", {"examples": written, "examples_per_output": {prefix: written}, "shards": [name]}


def write_tsv_fn(output: str):
    """Return a FlatMap function writing ET-BERT's `label<TAB>text_a` file of one level and split."""
    def write(element):
        (level, split), rows = element
        rows = sorted(row for row in rows if row is not None)
        path = manifest.join_path(output, "tsv", level, f"{split}.tsv")
        lines = ["label\ttext_a"] + [f"{label}\t{text}" for _, label, text in rows]
        with FileSystems.create(path, mime_type="text/tab-separated-values") as handle:
            handle.write(("\n".join(lines) + "\n").encode("ascii"))
        yield "stats", {"tsv_rows": {f"{level}/{split}": len(rows)}}
    return write


def tsv_row(item):
    """(label, split, example) -> ((level, split), (uid, label, text))."""
    label, split, example = item
    return (example.level, split), (example.uid, label, example.text)


def write_summary_fn(path: str):
    """Return a FlatMap function that merges every count dictionary and writes the summary file."""
    def write(element):
        _, parts = element
        total = manifest.merge_all(parts)
        manifest.write_json(path, total)
        yield path
    return write


def add_summary(stat_parts: Sequence, summary_path: str) -> None:
    """Merge the "stats" elements of `stat_parts` into one summary file at `summary_path`.

    Apply this last: the DaskRunner computes only the final step of a pipeline and what it depends on.
    """
    (tuple(stat_parts)
     | "AllStats" >> beam.Flatten()
     | "Stats" >> beam.FlatMap(only("stats"))
     | "OneKey" >> beam.Map(lambda counts: (0, counts))
     | "GroupStats" >> beam.GroupByKey()
     | "WriteSummary" >> beam.FlatMap(write_summary_fn(summary_path)))
