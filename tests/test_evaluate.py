"""Tests for etbert_jax.evaluate: scores against scikit-learn, the written files and the report."""

import dataclasses
import json
import shutil
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
    # A blank canvas has one colour, so many distinct colours show that the plot was drawn.
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


@pytest.mark.parametrize("split_policy", ["session", "packet", "unknown"])
def test_leaky_split_warns(tmp_path, split_policy):
    y_true, y_pred, probabilities = _random_predictions(seed=4, size=50, num_classes=5)
    metrics = evaluate.write_report(tmp_path, y_true, y_pred, probabilities, CLASS_NAMES,
                                    _context(split_policy=split_policy, header_policy="etbert"))
    report = (tmp_path / "report.md").read_text()
    head = "\n".join(report.splitlines()[:8])

    assert metrics["leakage_warning"] == evaluate.SPLIT_LEAKAGE[split_policy]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["leakage_warning"] == evaluate.SPLIT_LEAKAGE[split_policy]
    label = "leakage not ruled out" if split_policy == "unknown" else "LEAKY"
    assert f"Split policy: {split_policy}** ({label})" in head
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


# ---- etbert evaluate on a real checkpoint and real shards -------------------------------------

EVAL_TOKENIZER = {"vocab_kind": "wordpiece", "vocab_size": 300, "vocab_sha256": "0" * 64,
                  "header_policy": "anonymize"}
EVAL_CLASSES = ["chat", "mail", "video"]


def _write_finetune_shards(root, num_examples):
    """Write flow-level fine-tuning shards and the manifest that `etbert convert-finetune` produces."""
    from etbert_jax import records

    rng = np.random.default_rng(11)
    counts, shards, written = {}, {}, {}
    for split, size in (("train", 4), ("valid", 4), ("test", num_examples)):
        rows = []
        for index in range(size):
            length = int(rng.integers(4, 20))
            ids = np.concatenate([[2], rng.integers(5, 300, size=length - 1)])
            label = int(rng.integers(0, len(EVAL_CLASSES)))
            rows.append((ids, label, f"{EVAL_CLASSES[label]}/capture-{index}.pcap"))
        name = f"flow/{split}-00000-of-00001.tfrecord"
        (root / "flow").mkdir(parents=True, exist_ok=True)
        with open(root / name, "wb") as stream:
            records.write_tfrecords(stream, (records.finetune_example(ids, label, source, "tcp a:1>b:2", -1)
                                             for ids, label, source in rows))
        counts[split] = size
        shards[split] = [name]
        written[split] = rows

    manifest = {
        "kind": "finetune",
        "tokenizer": EVAL_TOKENIZER,
        "seq_len": {"packet": 32, "flow": 32},
        "counts": {"examples_per_split": {"flow": counts}},
        "shards": {"flow": shards},
        "split": {"policy": "session", "warning": "sessions of one capture can share hosts"},
        "labels": {name: index for index, name in enumerate(EVAL_CLASSES)},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return written


def _save_classifier(workdir):
    """Save a randomly initialized classifier the way fine-tuning saves its best checkpoint."""
    from flax import nnx

    from etbert_jax import checkpoint, config as config_lib, heads, sharding

    config = config_lib.load_config("tiny", ["model.vocab_size=300", "model.max_positions=32",
                                             "finetune.level=flow", "data.global_batch_size=8"])
    config = dataclasses.replace(config, tokenizer=dict(EVAL_TOKENIZER))
    mesh = sharding.make_mesh(config_lib.MeshConfig(data=-1))
    model = sharding.create_sharded_model(
        lambda: heads.Classifier(config.model, len(EVAL_CLASSES), rngs=nnx.Rngs(3)), mesh)
    checkpointer = checkpoint.Checkpointer(workdir / "best", save_every=1, keep=1, async_save=False)
    try:
        checkpointer.save(7, model_state=nnx.state(model),
                          optimizer_state={"optimizer_state_not_saved": np.zeros((), np.int32)},
                          cursor={"step": 7},
                          config=dict(config_lib.config_to_dict(config), labels=EVAL_CLASSES),
                          force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return model


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate-run")
    written = _write_finetune_shards(root / "shards", num_examples=13)
    model = _save_classifier(root / "run")
    return root, written, model


@pytest.mark.slow
def test_evaluate_command_on_checkpoint(saved_run):
    import jax.numpy as jnp

    from etbert_jax import main as cli

    root, written, model = saved_run
    data_dir, workdir = root / "shards", root / "run"
    # Without --out the report goes to eval-test in the workdir, beside best/.
    out = workdir / "eval-test"

    status = cli.main(["evaluate", "--checkpoint", str(workdir), "--data", str(data_dir)])
    saved = json.loads((out / "metrics.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    assert status == 0
    test_rows = written["test"]
    assert saved["num_examples"] == len(test_rows)
    assert saved["split_policy"] == "session"
    assert saved["leakage_warning"] == evaluate.SPLIT_LEAKAGE["session"]
    assert saved["header_policy"] == "anonymize"
    assert saved["step"] == 7
    supports = [saved["per_class"][name]["support"] for name in EVAL_CLASSES]
    assert supports == np.bincount([label for _, label, _ in test_rows], minlength=3).tolist()

    # The report's predictions must equal a direct forward pass of the saved classifier.
    ids = np.zeros((len(test_rows), 32), np.int32)
    for row, (tokens, _, _) in enumerate(test_rows):
        ids[row, :len(tokens)] = tokens
    logits = model(jnp.asarray(ids), jnp.asarray((ids != 0).astype(np.int32)), deterministic=True)
    expected = np.asarray(logits).argmax(axis=1)
    assert [row["predicted"] for row in rows] == [EVAL_CLASSES[i] for i in expected]
    assert [row["true"] for row in rows] == [EVAL_CLASSES[label] for _, label, _ in test_rows]
    assert rows[0]["id"].startswith(test_rows[0][2])


def test_evaluate_rejects_other_classes(saved_run, tmp_path):
    root, _, _ = saved_run
    data_dir = tmp_path / "shards"
    shutil.copytree(root / "shards", data_dir)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["labels"] = {"chat": 0, "mail": 1, "voip": 2}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ValueError, match="class mismatch"):
        evaluate.evaluate_checkpoint(str(root / "run"), str(data_dir))


def test_evaluate_command_missing_data(saved_run, tmp_path, capsys):
    from etbert_jax import main as cli

    root, _, _ = saved_run
    status = cli.main(["evaluate", "--checkpoint", str(root / "run"), "--level", "flow", "--data",
                       str(tmp_path / "no-such-shards")])

    assert status == 2
    assert "no-such-shards" in capsys.readouterr().err
