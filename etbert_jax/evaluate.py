"""Evaluation reports for a fine-tuned classifier (`etbert evaluate`).

`write_report` is a pure reporting step: from true labels, predicted labels, class
probabilities and the context of the run it writes, into one directory,

- `metrics.json`: accuracy, macro and weighted F1, per-class precision/recall/F1/support,
  the split and header policies and a leakage warning when the split can leak;
- `confusion_matrix.json` and `confusion_matrix.png`: rows are true classes, columns are
  predicted classes;
- `split_manifest.json`: the split section of the shards' manifest that was evaluated;
- `report.md`: a human-readable summary that opens with the split and header policies;
- `predictions.jsonl` (optional): one row per example with its probabilities.

Every score comes from scikit-learn's metric functions. `evaluate_checkpoint` (the core of
`etbert evaluate`) restores a fine-tuned classifier, predicts one split of fine-tuning data on
one process and calls `write_report`.

NOTE: frozen-encoder probing and cross-dataset evaluation are not implemented yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from etbert_jax import logs

logger = logging.getLogger(__name__)

# Split policies written by the fine-tuning conversion, mapped to the leakage they allow.
# None means the policy keeps every capture file on one side of the split.
SPLIT_LEAKAGE = {
    "capture": None,
    "session": (
        "sessions of one capture file can sit on both sides of the split, so hosts, addresses, "
        "time windows and application state seen in training reappear in the test set. "
        "Scores can be higher than on unseen captures."
    ),
    "packet": (
        "packets of one session can sit on both sides of the split, so a model can match "
        "flow-constant bytes (addresses, ports, TCP sequence numbers, TLS session ids) "
        "between training and test examples instead of learning the traffic class. "
        "Scores are typically far higher than on unseen sessions or captures."
    ),
    "unknown": (
        "the data records no split policy, so leakage between the splits cannot be ruled out. "
        "Treat the scores as possibly inflated."
    ),
}

# Policy name used when the data records none (e.g. a TFDS dataset without split metadata).
UNKNOWN_SPLIT_POLICY = "unknown"

# Short notes on what each header policy leaves visible to the model.
HEADER_NOTES = {
    "etbert": (
        "the captured frame as ET-BERT reads it. Fine-tuning examples drop the first 38 bytes "
        "(Ethernet, option-less IPv4, ports), so TCP sequence numbers, options and all TLS bytes "
        "stay visible, and on non-Ethernet or IPv6 captures the cut lands on other fields."
    ),
    "raw": "the frame from the link-layer header on, so MAC and IP addresses and ports stay visible.",
    "strip-link": "the IP packet unchanged, so IP addresses and ports stay visible.",
    "anonymize": (
        "the IP packet with addresses, ports, IP identification, TTL, checksums and TCP "
        "timestamps zeroed and sequence numbers made relative. Payload bytes are kept."
    ),
}

# Resolution of the confusion-matrix PNG in dots per inch.
FIGURE_DPI = 100

# Largest class count for which the confusion-matrix PNG prints zero counts.
ZERO_CELL_LIMIT = 30


@dataclasses.dataclass(frozen=True)
class ReportContext:
    """Facts about an evaluation run that the scores cannot show."""

    # Split assignment used by the conversion: "capture", "session", "packet" or "unknown".
    split_policy: str
    # Header policy of the shards' tokenizer block, e.g. "etbert", "raw", "anonymize".
    header_policy: str
    # Example level of the shards: "packet" or "flow".
    level: str
    # Name of the evaluated split, e.g. "test".
    split_name: str = "test"
    # The `split` section of the shards' manifest.json, written out unchanged.
    split_manifest: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Directory of the evaluated checkpoint, or None when the predictions came from elsewhere.
    checkpoint: str | None = None
    # Training step of the evaluated checkpoint, or None when unknown.
    step: int | None = None


def leakage_warning(split_policy: str) -> str | None:
    """Return the leakage warning for a split policy, or None for a capture-level split."""
    if split_policy not in SPLIT_LEAKAGE:
        raise ValueError(
            f"unknown split policy {split_policy!r}; expected one of {sorted(SPLIT_LEAKAGE)}"
        )
    return SPLIT_LEAKAGE[split_policy]


def _check_inputs(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probabilities: np.ndarray | None,
    class_names: Sequence[str],
) -> None:
    num_classes = len(class_names)
    if num_classes == 0:
        raise ValueError("class_names is empty; pass the names from labels.json")
    if len(set(class_names)) != num_classes:
        raise ValueError(f"class_names contains duplicates: {list(class_names)}")
    if y_true.ndim != 1 or y_pred.shape != y_true.shape:
        raise ValueError(
            f"y_true and y_pred must be 1-D and of equal length, got shapes "
            f"{y_true.shape} and {y_pred.shape}"
        )
    if y_true.size == 0:
        raise ValueError("no examples to evaluate: y_true is empty")

    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(
                f"{name} contains label {int(bad[0])}, outside 0..{num_classes - 1} "
                f"for {num_classes} class names; check that labels.json matches the shards"
            )

    if probabilities is not None and probabilities.shape != (y_true.size, num_classes):
        raise ValueError(
            f"probabilities must have shape ({y_true.size}, {num_classes}), "
            f"got {probabilities.shape}"
        )


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Compute accuracy, F1 averages, per-class scores and the confusion matrix.

    Macro and weighted averages run over the classes that occur in `y_true` or `y_pred`
    (scikit-learn's default label set), so a class absent from the evaluated split does
    not pull the macro-F1 towards zero. Every class still gets a per-class row and a
    confusion-matrix row. Undefined precision or recall (no predictions or no examples
    of a class) counts as 0.
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    _check_inputs(y_true, y_pred, None, class_names)
    all_labels = list(range(len(class_names)))
    seen_labels = sorted(set(y_true.tolist()) | set(y_pred.tolist()))

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=all_labels, average=None, zero_division=0
    )
    matrix = skm.confusion_matrix(y_true, y_pred, labels=all_labels)
    predicted_counts = matrix.sum(axis=0)

    per_class = {}
    for label, name in enumerate(class_names):
        per_class[name] = {
            "label": label,
            "precision": float(precision[label]),
            "recall": float(recall[label]),
            "f1": float(f1[label]),
            "support": int(support[label]),
            "predicted": int(predicted_counts[label]),
        }

    def averaged(average: str) -> float:
        return float(
            skm.f1_score(y_true, y_pred, labels=seen_labels, average=average, zero_division=0)
        )

    macro_precision, macro_recall, _, _ = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=seen_labels, average="macro", zero_division=0
    )
    return {
        "num_examples": int(y_true.size),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": averaged("macro"),
        "weighted_f1": averaged("weighted"),
        "macro_precision": float(macro_precision),
        "macro_recall": float(macro_recall),
        "averaged_over": [class_names[label] for label in seen_labels],
        "classes_without_examples": [n for n in class_names if per_class[n]["support"] == 0],
        "classes_never_predicted": [n for n in class_names if per_class[n]["predicted"] == 0],
        "per_class": per_class,
        "confusion_matrix": matrix.astype(np.int64).tolist(),
    }


def confusion_figure_size(num_classes: int) -> tuple[float, float]:
    """Return the confusion-matrix figure size in inches, growing with the class count."""
    side = min(40.0, max(5.0, 2.5 + 0.45 * num_classes))
    return side + 1.0, side


def plot_confusion_matrix(
    matrix: np.ndarray, class_names: Sequence[str], title: str, path: pathlib.Path
) -> None:
    """Draw the confusion matrix with counts in the cells and save it as a PNG.

    Cell colours show each row normalized by its support (the recall of that class), so
    small classes stay visible next to large ones. The printed numbers are raw counts.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    num_classes = len(class_names)
    row_totals = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, row_totals, out=np.zeros(matrix.shape), where=row_totals > 0)
    font_size = max(4.0, min(10.0, 160.0 / num_classes))

    figure, axes = plt.subplots(figsize=confusion_figure_size(num_classes), dpi=FIGURE_DPI)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")

    axes.set_xticks(range(num_classes), labels=class_names, rotation=60, ha="right",
                    fontsize=font_size)
    axes.set_yticks(range(num_classes), labels=class_names, fontsize=font_size)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title, fontsize=10)

    # Past ZERO_CELL_LIMIT classes, empty cells stay blank: thousands of "0" labels are
    # unreadable and take most of the drawing time.
    show_zeros = num_classes <= ZERO_CELL_LIMIT
    for row in range(num_classes):
        for column in range(num_classes):
            if matrix[row, column] == 0 and not show_zeros:
                continue
            colour = "white" if shares[row, column] > 0.5 else "black"
            axes.text(column, row, str(int(matrix[row, column])), ha="center", va="center",
                      color=colour, fontsize=font_size)

    # tight_layout keeps the canvas size fixed, unlike savefig(bbox_inches="tight").
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=FIGURE_DPI)
    plt.close(figure)


def _write_json(path: pathlib.Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def _leakage_label(split_policy: str) -> str:
    if split_policy == UNKNOWN_SPLIT_POLICY:
        return "leakage not ruled out"
    if SPLIT_LEAKAGE[split_policy] is None:
        return "capture-level: every capture file is on one side of the split only"
    return "LEAKY"


def _render_report(metrics: dict[str, Any], context: ReportContext) -> str:
    warning = metrics["leakage_warning"]
    split_line = f"**Split policy: {context.split_policy}**"
    split_line += f" ({_leakage_label(context.split_policy)})"
    header_note = HEADER_NOTES.get(context.header_policy, "no description for this policy.")

    lines = [
        f"# Evaluation report: {context.split_name} split, {context.level} level",
        "",
        f"> {split_line}",
        f"> **Header policy: {context.header_policy}**: {header_note}",
    ]
    if warning is not None:
        lines += [">", f"> WARNING: {warning}"]
    manifest_warning = context.split_manifest.get("warning")
    if manifest_warning:
        lines += [">", f"> Conversion warning: {manifest_warning}"]

    lines += [
        "",
        f"- examples: {metrics['num_examples']}",
        f"- accuracy: {metrics['accuracy']:.4f}",
        f"- macro-F1: {metrics['macro_f1']:.4f} (over {len(metrics['averaged_over'])} classes)",
        f"- weighted F1: {metrics['weighted_f1']:.4f}",
        f"- checkpoint: {context.checkpoint or 'not recorded'}"
        + (f" (step {context.step})" if context.step is not None else ""),
        "",
        "| class | precision | recall | F1 | support | predicted |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} "
            f"| {row['support']} | {row['predicted']} |"
        )
    if metrics["classes_without_examples"]:
        lines += ["", "Classes with no examples in this split (left out of the averages): "
                  + ", ".join(metrics["classes_without_examples"])]
    lines += ["", "Confusion matrix: `confusion_matrix.png` (rows true, columns predicted).", ""]
    return "\n".join(lines)


def write_report(
    out_dir: str | pathlib.Path,
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    probabilities: np.ndarray | None,
    class_names: Sequence[str],
    context: ReportContext,
    example_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write metrics, confusion matrix, split manifest and report files; return the metrics.

    `probabilities` ([examples, classes]) and `example_ids` are optional; when either is
    given, `predictions.jsonl` is written too.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
    _check_inputs(y_true, y_pred, probabilities, class_names)
    if example_ids is not None and len(example_ids) != y_true.size:
        raise ValueError(
            f"example_ids has {len(example_ids)} entries but there are {y_true.size} examples"
        )
    warning = leakage_warning(context.split_policy)

    scores = compute_metrics(y_true, y_pred, class_names)
    matrix = np.asarray(scores.pop("confusion_matrix"), dtype=np.int64)
    metrics = {
        "split": context.split_name,
        "level": context.level,
        "split_policy": context.split_policy,
        "header_policy": context.header_policy,
        "leakage_warning": warning,
        "checkpoint": context.checkpoint,
        "step": context.step,
        **scores,
    }
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "confusion_matrix.json", {
        "labels": list(class_names),
        "rows": "true class",
        "columns": "predicted class",
        "matrix": matrix.tolist(),
    })
    _write_json(out / "split_manifest.json", context.split_manifest)

    leak_mark = "" if warning is None else f" ({_leakage_label(context.split_policy)})"
    title = (f"{context.split_name} ({context.level}), split policy: {context.split_policy}"
             f"{leak_mark}, header policy: {context.header_policy}")
    plot_confusion_matrix(matrix, class_names, title, out / "confusion_matrix.png")
    (out / "report.md").write_text(_render_report(metrics, context))

    if probabilities is not None or example_ids is not None:
        with open(out / "predictions.jsonl", "w") as stream:
            for index in range(y_true.size):
                row: dict[str, Any] = {
                    "true": class_names[y_true[index]],
                    "predicted": class_names[y_pred[index]],
                }
                if example_ids is not None:
                    row["id"] = example_ids[index]
                if probabilities is not None:
                    row["probabilities"] = [round(float(p), 6) for p in probabilities[index]]
                stream.write(json.dumps(row) + "\n")

    logger.info("evaluation of %d %s examples written to %s: accuracy %.4f, macro-F1 %.4f "
                "(split policy %s, header policy %s)", y_true.size, context.split_name, out,
                metrics["accuracy"], metrics["macro_f1"], context.split_policy,
                context.header_policy)
    if warning:
        logger.warning("split policy %r can leak: %s", context.split_policy, warning)
    return metrics


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    split: str = "test",
    out_dir: str | pathlib.Path | None = None,
    level: str | None = None,
    global_batch_size: int | None = None,
) -> dict[str, Any]:
    """Predict one split of fine-tuning data with a fine-tuned checkpoint and write its report.

    The classifier, its class names and its tokenizer block come from the checkpoint. The data
    must use the same classes and vocabulary. Returns the metrics written to `metrics.json`.
    """
    import jax
    from flax import nnx

    from etbert_jax import config as config_lib
    from etbert_jax import finetune, finetune_data, sharding

    # With a level given, bad data fails before the slower classifier restore.
    source = finetune_data.open_source(data, level) if level else None
    mesh = sharding.make_mesh(config_lib.MeshConfig(data=-1))
    model, config, class_names, info = finetune.load_classifier(checkpoint, mesh)
    level = level or config.finetune.level or "flow"
    if source is None:
        source = finetune_data.open_source(data, level)

    if tuple(class_names) != tuple(source.labels):
        raise ValueError(
            f"class mismatch: the checkpoint {checkpoint} was trained on {list(class_names)}, but "
            f"{source.description} has {list(source.labels)}; evaluate on data converted from the "
            "same class folders"
        )
    finetune.check_compatible(config.tokenizer, source.tokenizer, config.model, source.seq_len,
                              checkpoint, source.description)
    if source.num_examples.get(split, 0) == 0:
        raise ValueError(f"the {split} split of {source.description} has no {level}-level examples; "
                         f"choose another --split or convert more captures")

    # The batch is split over every device, so round it up to a multiple of the device count.
    devices = mesh.devices.size
    batch = global_batch_size or config.data.global_batch_size
    batch = -(-batch // devices) * devices
    local_batch = batch // jax.process_count()

    graphdef, state = nnx.split(model)
    state_shardings = jax.tree.map(lambda leaf: leaf.sharding, state)
    batch_sharding = sharding.batch_sharding(mesh)
    predict_fn = finetune.make_predict_fn(graphdef, state_shardings, batch_sharding)
    predicted = finetune.predict_split(predict_fn, state, source, split, local_batch, batch_sharding)

    probabilities = predicted["probabilities"]
    policy = source.split.get("policy") or UNKNOWN_SPLIT_POLICY
    context = ReportContext(
        split_policy=policy,
        header_policy=str(source.tokenizer.get("header_policy", "not recorded")),
        level=source.level,
        split_name=split,
        split_manifest=source.split,
        checkpoint=info.get("checkpoint", str(checkpoint)),
        step=info.get("step"),
    )
    # The default sits beside the checkpoint manager's directory (WORKDIR/best -> WORKDIR), never
    # inside an Orbax step directory.
    manager_dir = pathlib.Path(info.get("checkpoint", checkpoint))
    out = pathlib.Path(out_dir) if out_dir else manager_dir.parent / f"eval-{split}"
    return write_report(out, predicted["labels"], probabilities.argmax(axis=-1), probabilities,
                        class_names, context, example_ids=predicted["ids"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etbert evaluate",
        description="Write an evaluation report for a fine-tuned checkpoint on one split.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="fine-tuned checkpoint directory (written by `etbert finetune`)")
    parser.add_argument("--data", required=True,
                        help="output of `etbert convert-finetune`, a `tfds build` data directory, "
                             "or tfds:NAME")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"),
                        help="split to evaluate (default: test)")
    parser.add_argument("--out", default=None,
                        help="report directory (default: eval-SPLIT in the fine-tuning workdir)")
    parser.add_argument("--level", choices=("packet", "flow"), default=None,
                        help="example level (default: the level the checkpoint was fine-tuned on)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="examples per prediction batch over all devices "
                             "(default: the checkpoint's data.global_batch_size)")
    return parser


def main(argv: list[str]) -> int:
    """Run `etbert evaluate`; return 0 on success and 2 on invalid input."""
    args = build_parser().parse_args(argv)
    logs.configure("INFO")
    try:
        metrics = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, out_dir=args.out,
                                      level=args.level, global_batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as error:
        print(f"etbert evaluate: error: {error}", file=sys.stderr)
        return 2
    summary = {key: metrics[key] for key in ("split", "level", "split_policy", "header_policy",
                                             "num_examples", "accuracy", "macro_f1", "weighted_f1")}
    print(json.dumps(summary))
    if metrics["leakage_warning"]:
        print(f"warning: {metrics['leakage_warning']}", file=sys.stderr)
    return 0
