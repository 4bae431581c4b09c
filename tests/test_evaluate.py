"""Tests for etbert_jax.evaluate: scores against scikit-learn, the written files and the report."""

import json
import struct
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from etbert_jax import evaluate

CLASS_NAMES = ["aim", "email", "netflix", "skype", "youtube"]


def _random_predictions(seed: int, size: int, num_classes: int):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, size=size)
    # Mostly right, sometimes a random class, so the scores are neither 0 nor 1.
    y_pred = np.where(rng.random(size) < 0.6, y_true, rng.integers(0, num_classes, size=size))
    logits = rng.normal(size=(size, num_classes))
    logits[np.arange(size), y_pred] += 4.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, y_pred, probabilities


def _context(split_policy="capture", header_policy="anonymize"):
    return evaluate.ReportContext(
        split_policy=split_policy,
        header_policy=header_policy,
        level="flow",
        split_name="test",
        split_manifest={"policy": split_policy, "files": {"test": ["aim/a.pcap"]}},
        checkpoint="/tmp/ckpt",
        step=120,
    )


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "file does not start with the PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture()
def written_report(tmp_path):
    y_true, y_pred, probabilities = _random_predictions(seed=3, size=400, num_classes=5)
    metrics = evaluate.write_report(tmp_path, y_true, y_pred, probabilities, CLASS_NAMES,
                                    _context())
    return tmp_path, y_true, y_pred, metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    y_true, y_pred, _ = _random_predictions(seed, size=300, num_classes=5)
    metrics = evaluate.compute_metrics(y_true, y_pred, CLASS_NAMES)

    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert metrics["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert metrics["weighted_f1"] == pytest.approx(
        skm.f1_score(y_true, y_pred, average="weighted"))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred)
    for label, name in enumerate(CLASS_NAMES):
        row = metrics["per_class"][name]
        assert row["precision"] == pytest.approx(precision[label])
        assert row["recall"] == pytest.approx(recall[label])
        assert row["f1"] == pytest.approx(f1[label])
        assert row["support"] == support[label]


def test_confusion_matrix_totals(written_report):
    out, y_true, y_pred, _ = written_report
    saved = json.loads((out / "confusion_matrix.json").read_text())
    matrix = np.array(saved["matrix"])

    assert saved["labels"] == CLASS_NAMES
    assert matrix.shape == (5, 5)
    assert matrix.sum() == y_true.size
    assert matrix.sum(axis=1).tolist() == np.bincount(y_true, minlength=5).tolist()
    assert matrix.sum(axis=0).tolist() == np.bincount(y_pred, minlength=5).tolist()
    assert np.array_equal(matrix, skm.confusion_matrix(y_true, y_pred))


def test_macro_f1_from_confusion_matrix(written_report):
    out, _, _, _ = written_report
    matrix = np.array(json.loads((out / "confusion_matrix.json").read_text())["matrix"])
    saved = json.loads((out / "metrics.json").read_text())

    f1_scores = []
    for label in range(matrix.shape[0]):
        true_positive = matrix[label, label]
        precision = true_positive / matrix[:, label].sum()
        recall = true_positive / matrix[label, :].sum()
        f1_scores.append(2 * precision * recall / (precision + recall))
    assert saved["macro_f1"] == pytest.approx(np.mean(f1_scores), rel=1e-9)
    assert saved["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum(), rel=1e-9)
    assert saved["num_examples"] == matrix.sum()


def test_png_valid_with_expected_size(written_report):
    out, _, _, _ = written_report
    path = out / "confusion_matrix.png"
    width, height = _png_size(path)
    width_inches, height_inches = evaluate.confusion_figure_size(len(CLASS_NAMES))

    assert (width, height) == (round(width_inches * evaluate.FIGURE_DPI),
                               round(height_inches * evaluate.FIGURE_DPI))
    from matplotlib import image
    pixels = image.imread(path)
    assert pixels.shape[:2] == (height, width)
    # A blank canvas would be a single colour; the plot must have drawn something.
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 10


def test_report_states_policies(written_report):
    out, _, _, _ = written_report
    report = (out / "report.md").read_text()
    head = "\n".join(report.splitlines()[:5])

    assert "Split policy: capture" in head
    assert "Header policy: anonymize" in head
    assert "LEAKY" not in report
    for name in CLASS_NAMES:
        assert f"| {name} |" in report


@pytest.mark.parametrize("split_policy", ["session", "packet"])
def test_leaky_split_warns(tmp_path, split_policy):
    y_true, y_pred, probabilities = _random_predictions(seed=4, size=50, num_classes=5)
    metrics = evaluate.write_report(tmp_path, y_true, y_pred, probabilities, CLASS_NAMES,
                                    _context(split_policy=split_policy, header_policy="etbert"))
    report = (tmp_path / "report.md").read_text()
    head = "\n".join(report.splitlines()[:8])

    assert metrics["leakage_warning"] == evaluate.SPLIT_LEAKAGE[split_policy]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["leakage_warning"] == evaluate.SPLIT_LEAKAGE[split_policy]
    assert f"Split policy: {split_policy}** (LEAKY)" in head
    assert "WARNING:" in head
    assert "Header policy: etbert" in head


def test_capture_split_no_warning(written_report):
    out, _, _, metrics = written_report
    saved = json.loads((out / "metrics.json").read_text())

    assert metrics["leakage_warning"] is None
    assert saved["leakage_warning"] is None
    assert saved["split_policy"] == "capture"
    assert saved["header_policy"] == "anonymize"


def test_split_manifest_written(written_report):
    out, _, _, _ = written_report
    saved = json.loads((out / "split_manifest.json").read_text())
    assert saved == _context().split_manifest


def test_predictions_file(written_report):
    out, y_true, y_pred, _ = written_report
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    assert len(rows) == y_true.size
    assert [row["true"] for row in rows] == [CLASS_NAMES[i] for i in y_true]
    assert [row["predicted"] for row in rows] == [CLASS_NAMES[i] for i in y_pred]
    assert all(sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-4) for row in rows)


def test_absent_classes_zero_division(tmp_path):
    # "netflix" (2) is never predicted; "youtube" (4) has no examples and is never predicted.
    y_true = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    y_pred = np.array([0, 1, 1, 1, 0, 3, 3, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = evaluate.write_report(tmp_path, y_true, y_pred, None, CLASS_NAMES,
                                        _context())

    assert list(metrics["per_class"]) == CLASS_NAMES
    assert metrics["per_class"]["netflix"]["precision"] == 0.0
    assert metrics["per_class"]["netflix"]["f1"] == 0.0
    assert metrics["per_class"]["youtube"]["support"] == 0
    assert metrics["classes_without_examples"] == ["youtube"]
    assert metrics["classes_never_predicted"] == ["netflix", "youtube"]
    assert metrics["averaged_over"] == ["aim", "email", "netflix", "skype"]
    expected = skm.f1_score(y_true, y_pred, labels=[0, 1, 2, 3], average="macro",
                            zero_division=0)
    assert metrics["macro_f1"] == pytest.approx(expected)

    matrix = np.array(json.loads((tmp_path / "confusion_matrix.json").read_text())["matrix"])
    assert matrix.shape == (5, 5)
    assert matrix[4].sum() == 0
    report = (tmp_path / "report.md").read_text()
    for name in CLASS_NAMES:
        assert f"| {name} |" in report
    assert not (tmp_path / "predictions.jsonl").exists()


def test_label_out_of_range_rejected(tmp_path):
    with pytest.raises(ValueError, match="label 5"):
        evaluate.write_report(tmp_path, [0, 5], [0, 1], None, CLASS_NAMES, _context())


def test_probability_shape_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        evaluate.write_report(tmp_path, [0, 1], [0, 1], np.ones((2, 3)), CLASS_NAMES,
                              _context())


def test_unknown_split_policy_rejected(tmp_path):
    with pytest.raises(ValueError, match="'random'"):
        evaluate.write_report(tmp_path, [0, 1], [0, 1], None, CLASS_NAMES,
                              _context(split_policy="random"))


def test_many_classes_figure(tmp_path):
    names = [f"class-{i:03d}" for i in range(120)]
    y_true, y_pred, _ = _random_predictions(seed=5, size=600, num_classes=120)
    evaluate.write_report(tmp_path, y_true, y_pred, None, names, _context())
    width, height = _png_size(tmp_path / "confusion_matrix.png")
    width_inches, height_inches = evaluate.confusion_figure_size(len(names))

    assert height_inches < 0.45 * len(names), "figure size is not capped"
    assert (width, height) == (round(width_inches * evaluate.FIGURE_DPI),
                               round(height_inches * evaluate.FIGURE_DPI))
