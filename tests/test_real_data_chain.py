"""The whole chain on bundled captures: convert -> pre-train -> fine-tune -> evaluate -> predict.

Four classes with four small captures each, split by capture file. Pre-training reads only the
captures of the fine-tuning train split, so no evaluated capture is seen in any training stage.
Prediction runs on the test-split captures.
"""

import json
import pathlib

import numpy as np
import pytest

from etbert_jax import main as cli

CHAIN_TREE = {
    "ssh": ["scapy-ssh-ed25519.pcap", "tcpdump-ssh.pcap", "zeek-ssh-kex-curve25519.pcap", "zeek-ssh-reverse.pcap"],
    "tls12": ["arkime-openssl-tls1_2.pcap", "zeek-tls12-dhe.pcap", "zeek-tls12-ecdhe.pcap",
              "zeek-tls12-chrome34-google.pcap"],
    "tls13": ["arkime-curl-tls13.pcap", "zeek-tls13-ech.pcap", "zeek-tls13-hrr.pcap",
              "zeek-tls13-chrome-x25519-kyber.pcap"],
    "vpn-wireguard": ["corelight-tailscale-linux.pcap", "corelight-wireguard.pcap", "ndpi-wireguard.pcap"],
}
MODEL = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"]
CONVERT = ["--tokens_per_packet", "24", "--flow_seq_len", "112", "--num_shards", "1"]


def f1_from_matrix(matrix: np.ndarray) -> float:
    """Macro-F1 over the classes that occur as true or predicted labels, from a confusion matrix."""
    scores = []
    for index in range(len(matrix)):
        true_positive = matrix[index, index]
        support, predicted = matrix[index].sum(), matrix[:, index].sum()
        if support == 0 and predicted == 0:
            continue
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return float(np.mean(scores))


@pytest.mark.slow
def test_capture_split_chain(sample_captures, tmp_path):
    tree = tmp_path / "tree"
    for label, names in CHAIN_TREE.items():
        (tree / label).mkdir(parents=True)
        for name in names:
            (tree / label / name).symlink_to(sample_captures / label / name)

    # Fine-tuning shards first: their split decides which captures pre-training may read.
    assert cli.main(["convert-finetune", str(tree), "--output", str(tmp_path / "ft"), "--split", "capture"]
                    + CONVERT) == 0
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    files = manifest["split"]["files_per_split"]
    assert manifest["split"]["policy"] == "capture"
    assert not set(files["train"]) & set(files["test"])

    train_captures = [str(tree / name) for name in files["train"]]
    assert cli.main(["convert-pretrain", *train_captures, "--output", str(tmp_path / "pt"), "--num_shards", "1"]) == 0
    assert cli.main(["pretrain", "--data", str(tmp_path / "pt"), "--workdir", str(tmp_path / "pretrain"),
                     *MODEL, "train.steps=3", "train.log_every=1", "train.checkpoint_every=3",
                     "data.global_batch_size=8"]) == 0

    assert cli.main(["finetune", "--init", str(tmp_path / "pretrain"), "--data", str(tmp_path / "ft"),
                     "--workdir", str(tmp_path / "finetune"), "--level", "flow", "finetune.epochs=2",
                     "data.global_batch_size=8", "train.log_every=1"]) == 0

    # The report is complete and consistent with the shards.
    report = tmp_path / "finetune" / "eval"
    metrics = json.loads((report / "metrics.json").read_text())
    confusion = json.loads((report / "confusion_matrix.json").read_text())
    matrix = np.array(confusion["matrix"])
    test_size = manifest["counts"]["examples_per_split"]["flow"]["test"]
    assert matrix.sum() == test_size
    assert metrics["num_examples"] == test_size
    assert metrics["macro_f1"] == pytest.approx(f1_from_matrix(matrix), abs=1e-9)
    assert confusion["labels"] == sorted(CHAIN_TREE)
    assert set(metrics["per_class"]) == set(CHAIN_TREE)
    assert metrics["split_policy"] == "capture"
    assert metrics["leakage_warning"] is None
    assert "Split policy: capture" in (report / "report.md").read_text()
    assert (report / "confusion_matrix.png").stat().st_size > 0
    assert len((report / "predictions.jsonl").read_text().splitlines()) == test_size

    # `etbert evaluate` on the same split reproduces the report of the fine-tuning run.
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "finetune"), "--data", str(tmp_path / "ft"),
                     "--out", str(tmp_path / "evaluate")]) == 0
    evaluated = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())
    assert evaluated["num_examples"] == test_size
    assert evaluated["macro_f1"] == pytest.approx(metrics["macro_f1"], abs=1e-9)
    assert evaluated["step"] == metrics["step"]

    # Prediction on the captures no training stage has read.
    test_captures = [str(tree / name) for name in files["test"]]
    rows_path = tmp_path / "predictions.jsonl"
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "finetune"), *test_captures,
                     "--out", str(rows_path)]) == 0
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert {row["capture"] for row in rows} == {pathlib.Path(name).name for name in files["test"]}
    assert all(row["label"] in CHAIN_TREE for row in rows)
    assert all(0.0 < row["probability"] <= 1.0 for row in rows)
    # The shards drop test examples that duplicate training ones; prediction keeps every session.
    assert len(rows) >= test_size
