"""Small pre-training shards built from the bundled sample captures, for the trainer's tests.

The examples follow the pre-training record format (`[CLS] A [SEP] B [SEP]`, segments 1/2,
`sbp_label` 0 for two halves of one BURST, 1 when B comes from another one) and are serialized
with `etbert_jax.records`, the writer the conversion pipeline uses. The BURSTs here are simpler
than the pipeline's: runs of consecutive packets of one capture, read with dpkt, each packet
contributing its first 64 bytes. That is enough for input, checkpoint and loss tests without
depending on the conversion pipeline.
"""

import json
import pathlib

import dpkt
import numpy as np

from etbert_jax import records
from etbert_jax.tokenizer import Vocab

# Classes used for test shards; the malware captures are left out because these tests do not need them.
CLASSES = ("tls12", "tls13", "ssh", "quic", "vpn-openvpn", "vpn-wireguard")


def _packets(path: pathlib.Path, limit: int) -> list[bytes]:
    with path.open("rb") as handle:
        magic = handle.read(4)
        handle.seek(0)
        reader = dpkt.pcapng.Reader(handle) if magic == b"\x0a\x0d\x0d\x0a" else dpkt.pcap.Reader(handle)
        packets = []
        for _, frame in reader:
            if len(frame) >= 16:
                packets.append(bytes(frame[:64]))
            if len(packets) >= limit:
                break
    return packets


def build_examples(captures_dir: pathlib.Path, *, seq_len: int, count: int, seed: int = 0) -> list[bytes]:
    """Return `count` serialized pre-training examples built from the sample captures."""
    vocab = Vocab.default()
    bursts = []
    for path in sorted(p for c in CLASSES for p in (captures_dir / c).iterdir() if p.suffix in (".pcap", ".pcapng")):
        packets = _packets(path, limit=60)
        for start in range(0, len(packets) - 1, 2):
            bursts.append(b"".join(packets[start:start + 2]))

    rng = np.random.default_rng(seed)
    half_tokens = (seq_len - 3) // 2
    examples = []
    while len(examples) < count:
        index = int(rng.integers(len(bursts)))
        burst = bursts[index]
        middle = len(burst) // 2
        first = vocab.encode(burst[:middle], max_tokens=half_tokens)
        label = int(rng.random() < 0.5)
        if label:
            other = bursts[int(rng.integers(len(bursts)))]
            second = vocab.encode(other[len(other) // 2:], max_tokens=half_tokens)
        else:
            second = vocab.encode(burst[middle:], max_tokens=half_tokens)
        input_ids = np.concatenate([[vocab.cls_id], first, [vocab.sep_id], second, [vocab.sep_id]])
        segment_ids = np.concatenate([np.ones(len(first) + 2, np.int64), np.full(len(second) + 1, 2, np.int64)])
        examples.append(records.pretrain_example(input_ids.astype(np.int64), segment_ids, label))
    return examples


def write_shards(out_dir: pathlib.Path, examples: list[bytes], *, num_shards: int, seq_len: int) -> dict:
    """Write `examples` round-robin into `train-SSSSS-of-NNNNN.tfrecord` files plus manifest.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"train-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    for shard, name in enumerate(names):
        with (out_dir / name).open("wb") as handle:
            records.write_tfrecords(handle, examples[shard::num_shards])
    manifest = {
        "kind": "pretrain",
        "tokenizer": Vocab.default().to_manifest() | {"header_policy": "raw", "bytes_per_packet": 64},
        "seq_len": seq_len,
        "counts": {"examples": len(examples)},
        "shards": names,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def make_shards(captures_dir: pathlib.Path, out_dir: pathlib.Path, *, num_shards: int = 4, count: int = 256,
                seq_len: int = 128, seed: int = 0) -> pathlib.Path:
    """Build and write a small shard directory; return it."""
    examples = build_examples(captures_dir, seq_len=seq_len, count=count, seed=seed)
    write_shards(out_dir, examples, num_shards=num_shards, seq_len=seq_len)
    return out_dir


def convert_sample_shards(captures_dir: pathlib.Path, out_dir: pathlib.Path, *, classes=("tls12", "ssh"),
                          seq_len: int = 64, num_shards: int = 4) -> pathlib.Path:
    """Run `etbert convert-pretrain` (Beam DirectRunner) on some sample classes; return the shard directory."""
    import os
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "etbert_jax.main", "convert-pretrain",
               *[str(captures_dir / name) for name in classes], "--output", str(out_dir),
               "--num_shards", str(num_shards), "--seq_len", str(seq_len)]
    env = dict(os.environ, PYTHONPATH=str(repo))
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"convert-pretrain failed with exit code {result.returncode}:\n{result.stderr[-3000:]}")
    return out_dir
