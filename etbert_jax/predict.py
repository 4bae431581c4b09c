"""Classify the sessions or packets of raw captures with a fine-tuned checkpoint (`etbert predict`).

    etbert predict --checkpoint runs/ft capture.pcap [more captures or folders]
        [--out predictions.csv|predictions.jsonl] [--level flow|packet] [--top-k 3] [--batch-size 64]

Captures go through the capture layer and the tokenizer exactly as in `etbert convert-finetune`.
The header policy, vocabulary, tokens per packet, packets per flow, sequence length and session
timeouts come from the checkpoint, which stored them from the shards it was trained on.
Each capture file is read as its own stream (a capture series is not joined).

Each session (flow level) or packet (packet level) gives one row with the columns of `COLUMNS`:
- capture name, protocol, client and server `address:port` (the client opened the session, by
  the rules of docs/capture-rules.md);
- first and last timestamp as ISO-8601 UTC and as integer nanoseconds;
- packet count (the session's packets, or 1 at packet level) and packet index in the session
  (-1 at flow level);
- predicted label, its probability, and the `--top-k` labels with their probabilities. CSV writes
  that list as `label:probability` pairs separated by `;`.

A file that cannot be read is reported on stderr, listed in the closing summary and skipped;
the run goes on. The exit code is 0 when at least one file was read, and 1 when none was.

NOTE: prediction runs in one process; multi-host prediction is not implemented.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import numpy as np

from etbert_jax import logs

log = logging.getLogger(__name__)

COLUMNS = ("capture", "protocol", "client", "server", "first_ts", "first_ts_ns", "last_ts", "last_ts_ns",
           "packets", "packet_index", "label", "probability", "top_k")
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
# Seconds between progress lines.
PROGRESS_INTERVAL_S = 10.0


@dataclasses.dataclass(frozen=True)
class PendingRow:
    """One example waiting for its batch, with the row fields known before classification."""

    # Token ids, [CLS] first (int64).
    input_ids: np.ndarray
    # Row fields other than the prediction.
    fields: dict[str, Any]


def iso_utc(ts_ns: int) -> str:
    """Format integer nanoseconds since the epoch as ISO-8601 UTC with microseconds."""
    # Integer arithmetic from the epoch keeps every microsecond, which float timestamps would round.
    moment = EPOCH + datetime.timedelta(microseconds=ts_ns // 1_000)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def convert_settings(config, info: dict):
    """Build the ConvertSettings the checkpoint's shards were made with (tokenizer block + conversion options)."""
    from etbert_jax.convert import ConvertSettings

    tokenizer = config.tokenizer
    stored = dict(info.get("conversion") or {})
    names = {field.name for field in dataclasses.fields(ConvertSettings)}
    values = {key: value for key, value in stored.items() if key in names}
    for key in ("header_policy", "bytes_per_packet", "tokens_per_packet", "packets_per_flow"):
        if key in tokenizer:
            values[key] = tokenizer[key]
    values["vocab"] = tokenizer.get("vocab_path") or None
    level = info.get("level") or config.finetune.level
    values["packet_seq_len" if level == "packet" else "flow_seq_len"] = config.data.seq_len
    return ConvertSettings(**values)


def split_session_name(name: str) -> tuple[str, str, str]:
    """Split "proto client>server" into (proto, client, server)."""
    proto, _, endpoints = name.partition(" ")
    client, _, server = endpoints.partition(">")
    return proto, client, server


def iter_pending(path: str, name: str, level: str, settings, vocab, stats) -> Iterator[PendingRow]:
    """Yield the examples of one capture file with their row fields, in capture order."""
    from etbert_jax import convert
    from etbert_jax.capture import PacketBytes, SessionEnd, iter_sessions

    # NOTE: these arguments repeat those of convert.iter_finetune_examples, which does not expose
    # session timestamps; both must change together.
    packet_bytes = settings.finetune_offset + settings.tokens_per_packet + 1
    events = iter_sessions(
        [path], settings.session_options, settings.header_policy, stats=stats, names=[name], keep_bytes_burst=0,
        keep_packets_flow=settings.packets_per_flow if level == "flow" else 0, keep_bytes_flow=packet_bytes,
        emit_packets=level == "packet", keep_bytes_packet=packet_bytes,
        max_packets_per_session=settings.max_packets_per_session)

    for event in events:
        if level == "packet" and isinstance(event, PacketBytes):
            ids = convert.packet_input_ids(event.data, vocab, settings)
            proto, client, server = split_session_name(event.session_name)
            fields = {"capture": name, "protocol": proto, "client": client, "server": server,
                      "first_ts_ns": event.ts_ns, "last_ts_ns": event.ts_ns, "packets": 1,
                      "packet_index": event.number}
        elif level == "flow" and isinstance(event, SessionEnd):
            session = event.session
            ids = convert.flow_input_ids(session.first_packets, vocab, settings)
            fields = {"capture": name, "protocol": session.proto_name, "client": session.client_str,
                      "server": session.server_str, "first_ts_ns": session.first_ts_ns,
                      "last_ts_ns": session.last_ts_ns, "packets": session.total_packets, "packet_index": -1}
        else:
            continue
        # Examples without a single token are skipped, as the conversion skips them.
        if len(ids) < 2:
            continue
        yield PendingRow(ids, fields)


class RowWriter:
    """Writes prediction rows as CSV or JSONL."""

    def __init__(self, stream: TextIO, kind: str):
        self.stream = stream
        self.kind = kind
        self.rows = 0
        self._csv = None
        if kind == "csv":
            self._csv = csv.DictWriter(stream, fieldnames=COLUMNS)
            self._csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self._csv is not None:
            flat = dict(row, top_k=";".join(f"{item['label']}:{item['probability']:.6f}" for item in row["top_k"]),
                        probability=f"{row['probability']:.6f}")
            self._csv.writerow(flat)
        else:
            self.stream.write(json.dumps(row) + "\n")
        self.rows += 1


class Classifier:
    """A loaded fine-tuned model with a jitted batch predictor."""

    def __init__(self, checkpoint_dir: str, batch_size: int):
        import jax
        from flax import nnx

        from etbert_jax import classifier, sharding
        from etbert_jax import config as config_lib

        self.mesh = sharding.make_mesh(config_lib.MeshConfig(data=-1))
        self.model, self.config, self.labels, self.info = classifier.load_classifier(checkpoint_dir, self.mesh)
        devices = jax.device_count()
        # The batch is split over every device, so it is rounded up to a multiple of the device count.
        self.batch_size = -(-batch_size // devices) * devices
        self.seq_len = self.config.data.seq_len
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        graphdef, self.state = nnx.split(self.model)
        shardings = jax.tree.map(lambda leaf: leaf.sharding, self.state)
        self._predict = classifier.make_predict_fn(graphdef, shardings, self.batch_sharding)

    def probabilities(self, rows: Sequence[PendingRow]) -> np.ndarray:
        """Return class probabilities [len(rows), classes] for at most `batch_size` rows."""
        import jax

        from etbert_jax import data, sharding

        batch = {"input_ids": np.zeros((self.batch_size, self.seq_len), np.int32)}
        for index, row in enumerate(rows):
            ids = row.input_ids[: self.seq_len]
            batch["input_ids"][index, : len(ids)] = ids
        batch["segment_ids"] = (batch["input_ids"] != 0).astype(np.int32)
        with jax.set_mesh(self.mesh), sharding.rules_context():
            arrays = data.make_global_batch(batch, self.batch_sharding)
            probabilities = self._predict(self.state, arrays)
        return np.asarray(probabilities)[: len(rows)]


def finish_rows(rows: Sequence[PendingRow], probabilities: np.ndarray, labels: Sequence[str],
                top_k: int) -> Iterator[dict[str, Any]]:
    """Attach the predicted label, its probability and the top-k list to each row."""
    for row, probs in zip(rows, probabilities):
        order = np.argsort(-probs, kind="stable")[:top_k]
        fields = dict(row.fields)
        fields["first_ts"] = iso_utc(fields["first_ts_ns"])
        fields["last_ts"] = iso_utc(fields["last_ts_ns"])
        fields["label"] = labels[int(order[0])]
        fields["probability"] = float(probs[order[0]])
        fields["top_k"] = [{"label": labels[int(i)], "probability": float(probs[i])} for i in order]
        yield {column: fields[column] for column in COLUMNS}


def predict_captures(checkpoint_dir: str, inputs: Sequence[str], writer: RowWriter, level: str | None = None,
                     top_k: int = 3, batch_size: int = 64) -> dict[str, Any]:
    """Classify every session (or packet) of `inputs` and write rows; return the run summary."""
    from etbert_jax.capture import SkipCounter
    from etbert_jax.tokenizer import Vocab
    from pipelines.inputs import expand_inputs

    classifier = Classifier(checkpoint_dir, batch_size)
    trained_level = classifier.info.get("level") or classifier.config.finetune.level
    level = level or trained_level
    if level != trained_level:
        raise ValueError(f"--level {level} does not match the checkpoint, which was fine-tuned on {trained_level}-"
                         f"level examples; drop --level or use a {level}-level checkpoint")
    if top_k < 1:
        raise ValueError(f"invalid --top-k {top_k}: must be >= 1")
    top_k = min(top_k, len(classifier.labels))
    settings = convert_settings(classifier.config, classifier.info)
    vocab = Vocab.from_manifest(classifier.config.tokenizer)
    log.info("%s-level prediction with %s: %d classes, header policy %s, %d tokens per packet, batch %d",
             level, checkpoint_dir, len(classifier.labels), settings.header_policy, settings.tokens_per_packet,
             classifier.batch_size)

    files, failed = [], []
    missing_inputs = 0
    for item in inputs:
        try:
            files.extend(expand_inputs([item]))
        except FileNotFoundError as error:
            missing_inputs += 1
            failed.append({"file": item, "reason": str(error)})
            print(f"etbert predict: skipping {item}: {error}", file=sys.stderr)

    stats = SkipCounter()
    pending: list[PendingRow] = []
    read, started, last_progress = 0, time.monotonic(), time.monotonic()

    def flush() -> None:
        if pending:
            for row in finish_rows(pending, classifier.probabilities(pending), classifier.labels, top_k):
                writer.write(row)
            pending.clear()

    for number, (path, name) in enumerate(files, start=1):
        try:
            for row in iter_pending(path, name, level, settings, vocab, stats):
                pending.append(row)
                if len(pending) == classifier.batch_size:
                    flush()
            read += 1
        except Exception as error:  # untrusted input: any failure skips the file, the run goes on
            failed.append({"file": name, "reason": f"{type(error).__name__}: {error}"})
            print(f"etbert predict: skipping {name}: {type(error).__name__}: {error}", file=sys.stderr)
        if time.monotonic() - last_progress >= PROGRESS_INTERVAL_S:
            last_progress = time.monotonic()
            log.info("%d/%d files, %d rows written, %.1f s", number, len(files), writer.rows + len(pending),
                     last_progress - started)
    flush()

    return {"files": len(files) + missing_inputs,
            "files_read": read, "unreadable": failed, "rows": writer.rows, "level": level,
            "packets": stats.as_dict(), "seconds": round(time.monotonic() - started, 3)}


def _print_summary(summary: dict[str, Any]) -> None:
    packets = summary["packets"]
    print(f"etbert predict: {summary['rows']} {summary['level']} rows from {summary['files_read']} of "
          f"{summary['files']} files in {summary['seconds']:.1f} s; packets read {packets.get('packets_read', 0)}, "
          f"skipped {packets.get('packets_skipped', {})}", file=sys.stderr)
    for item in summary["unreadable"]:
        print(f"  unreadable: {item['file']}: {item['reason']}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """Build the `etbert predict` argument parser."""
    parser = argparse.ArgumentParser(
        prog="etbert predict", description="Classify the sessions or packets of captures with a fine-tuned model.")
    parser.add_argument("--checkpoint", required=True, help="workdir of `etbert finetune` (its best checkpoint)")
    parser.add_argument("inputs", nargs="+", help="capture files (.pcap, .pcapng, gzip) or folders of captures")
    parser.add_argument("--out", default=None,
                        help="output file ending in .csv or .jsonl (default: CSV on stdout)")
    parser.add_argument("--level", choices=("flow", "packet"), default=None,
                        help="example level; must match the checkpoint (default: the checkpoint's)")
    parser.add_argument("--top-k", type=int, default=3, help="labels listed per row with their probabilities")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="examples per model call, rounded up to a multiple of the device count")
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default: INFO)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `etbert predict`; return 0 when at least one file was read, 1 when none was, 2 on bad input."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logs.configure(args.log_level)
    kind = "jsonl" if args.out and args.out.endswith(".jsonl") else "csv"
    if args.out and not args.out.endswith((".csv", ".jsonl")):
        print(f"etbert predict: error: --out {args.out} must end in .csv or .jsonl", file=sys.stderr)
        return 2
    stream = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        summary = predict_captures(args.checkpoint, args.inputs, RowWriter(stream, kind), level=args.level,
                                   top_k=args.top_k, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as error:
        print(f"etbert predict: error: {error}", file=sys.stderr)
        return 2
    finally:
        if args.out:
            stream.close()
    _print_summary(summary)
    return 0 if summary["files_read"] else 1


if __name__ == "__main__":
    sys.exit(main())
