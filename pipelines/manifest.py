"""The job summary and `manifest.json`: counts, accounting check, Beam counters, temp cleanup.

Beam counters are not reported by every runner (the DaskRunner raises NotImplementedError on
`metrics()`), so the pipelines also carry their counts as ordinary elements. Every stage emits
small count dictionaries, one last step merges them and writes `summary.json` into the job's
temp folder, and the launcher reads that file back. Counter totals, when a runner has them, are
only logged next to it.

Count dictionaries merge by adding numbers, merging nested dictionaries and concatenating lists.
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import posixpath
import shutil
from collections.abc import Mapping

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter

import etbert_jax

log = logging.getLogger(__name__)

# Namespace of our Beam counters.
COUNTER_NAMESPACE = "etbert"
# Folder under the output directory for a job's temporary files.
TEMP_FOLDER = ".etbert-tmp"
SUMMARY_NAME = "summary.json"


def merge_counts(first: Mapping, second: Mapping) -> dict:
    """Return the sum of two count dictionaries (numbers add, dicts merge, lists concatenate)."""
    merged = dict(first)
    for key, value in second.items():
        if key not in merged:
            merged[key] = value
        elif isinstance(value, Mapping):
            merged[key] = merge_counts(merged[key], value)
        elif isinstance(value, list):
            merged[key] = list(merged[key]) + value
        else:
            merged[key] = merged[key] + value
    return merged


def merge_all(parts) -> dict:
    """Merge an iterable of count dictionaries."""
    total: dict = {}
    for part in parts:
        total = merge_counts(total, part)
    return total


def join_path(*parts: str) -> str:
    """Join path parts with Beam's filesystem rules (works for local paths and gs://, s3://...)."""
    return FileSystems.join(*parts) if len(parts) > 1 else parts[0]


def write_json(path: str, value) -> None:
    """Write `value` as indented JSON to a local or remote path."""
    data = json.dumps(value, indent=2, sort_keys=True).encode("utf-8")
    with FileSystems.create(path, mime_type="application/json") as handle:
        handle.write(data)


def read_json(path: str):
    """Read JSON from a local or remote path."""
    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def check_accounting(counts: Mapping) -> None:
    """Raise RuntimeError unless packets_read == packets_used + sum(packets_skipped)."""
    read = counts.get("packets_read", 0)
    used = counts.get("packets_used", 0)
    skipped = sum(counts.get("packets_skipped", {}).values())
    if read != used + skipped:
        raise RuntimeError(f"packet accounting failed: packets_read={read} but packets_used={used} + "
                           f"skipped={skipped} = {used + skipped}; some packets were neither used nor counted "
                           "as skipped, which is a bug in the capture layer or the pipeline")


def counter_totals(result) -> dict[str, int] | None:
    """Return our Beam counter totals from a pipeline result, or None when the runner has none."""
    try:
        query = result.metrics().query(MetricsFilter().with_namespace(COUNTER_NAMESPACE))
    except (NotImplementedError, AttributeError, ValueError) as err:
        log.info("runner reports no Beam counters (%s); using the job summary only", type(err).__name__)
        return None
    totals = {}
    for counter in query.get("counters", []):
        value = counter.committed if counter.committed is not None else counter.attempted
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + int(value or 0)
    return totals


def compare_counters(totals: Mapping[str, int] | None, counts: Mapping) -> None:
    """Log Beam counter totals next to the summary counts and warn where they differ."""
    if not totals:
        return
    for name in ("packets_read", "packets_used", "sessions", "bursts", "examples"):
        if name in totals and name in counts and totals[name] != counts[name]:
            log.warning("Beam counter %s=%d differs from the job summary's %d; the manifest uses the summary, "
                        "which does not depend on the runner's metrics support", name, totals[name], counts[name])


def remove_temp(output: str, job_temp: str | None = None) -> None:
    """Delete the job's temp folder and any `beam-temp-*` folders a Beam file sink left in `output`."""
    if "://" in output:
        # Object stores have no folders: delete the objects under each beam-temp-* prefix.
        try:
            leftovers = [m.path for m in FileSystems.match([join_path(output, "beam-temp-*/**")])[0].metadata_list]
        except Exception as err:  # a pattern that matches nothing raises a filesystem-specific error
            log.debug("no beam-temp objects matched in %s: %s", output, err)
            leftovers = []
        if leftovers:
            FileSystems.delete(leftovers)
            log.info("removed %d beam-temp objects from %s", len(leftovers), output)
    else:
        for folder in sorted(glob.glob(os.path.join(output, "beam-temp-*"))):
            shutil.rmtree(folder) if os.path.isdir(folder) else os.remove(folder)
            log.info("removed temp folder %s", folder)

    if job_temp is not None and FileSystems.exists(job_temp):
        # Beam's local filesystem deletes folders recursively; object stores delete by prefix.
        FileSystems.delete([job_temp])

    temp_root = join_path(output, TEMP_FOLDER)
    if "://" not in output and os.path.isdir(temp_root) and not os.listdir(temp_root):
        os.rmdir(temp_root)


def remove_stale_shards(output: str, prefix: str, num_shards: int) -> None:
    """Delete shards of an earlier run with another shard count, so the folder never mixes two runs."""
    pattern = join_path(output, f"{prefix}-?????-of-?????.tfrecord")
    keep_suffix = f"-of-{num_shards:05d}.tfrecord"
    try:
        stale = [m.path for m in FileSystems.match([pattern])[0].metadata_list if not m.path.endswith(keep_suffix)]
    except Exception as err:  # nothing matched: a new folder
        log.debug("no earlier shards in %s: %s", output, err)
        return
    if stale:
        log.warning("removing %d shards of an earlier run with a different shard count from %s", len(stale), output)
        FileSystems.delete(stale)


def close_dask_client(result) -> None:
    """Close the Dask client the DaskRunner opened, so it does not try to reconnect after the run."""
    client = getattr(result, "client", None)
    if client is not None and hasattr(client, "close"):
        client.close()


def run_to_completion(pipeline):
    """Run a pipeline, wait for it, close a Dask client it opened, and return the result."""
    result = pipeline.run()
    result.wait_until_finish()
    close_dask_client(result)
    return result


def build_manifest(kind: str, config: dict, tokenizer: dict, seq_len, counts: dict, shards,
                   split: dict | None = None) -> dict:
    """Assemble the manifest in the layout docs/architecture.md fixes."""
    counts = dict(counts)
    dead_letter = sorted(counts.pop("dead_letter", []), key=lambda item: (item["file"], item["reason"]))
    counts.pop("shards", None)
    manifest = {
        "kind": kind,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "etbert_jax_version": etbert_jax.__version__,
        "config": config,
        "tokenizer": tokenizer,
        "seq_len": seq_len,
        "counts": counts,
        "dead_letter": dead_letter,
        "shards": shards,
    }
    if split is not None:
        manifest["split"] = split
    return manifest


def shard_name(prefix: str, index: int, total: int) -> str:
    """Return `<prefix>-SSSSS-of-NNNNN.tfrecord`."""
    return f"{prefix}-{index:05d}-of-{total:05d}.tfrecord"


def relative_to(path: str, root: str) -> str:
    """Return `path` relative to `root` with '/' separators (both local or both remote)."""
    root = root.rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else posixpath.basename(path)
