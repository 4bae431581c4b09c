"""Helpers shared by the fine-tuning, prediction and TFDS tests: a small labeled tree and checkpoints."""

import dataclasses
import pathlib

import numpy as np
from flax import nnx

from etbert_jax import checkpoint, classifier, heads
from etbert_jax import config as config_lib

# Three classes with three captures each, so the conversion splits by capture file.
TREE = {
    "tls12": ["arkime-openssl-tls1_2.pcap", "zeek-tls12-dhe.pcap", "zeek-tls12-ecdhe.pcap"],
    "ssh": ["scapy-ssh-ed25519.pcap", "tcpdump-ssh.pcap", "zeek-ssh-kex-curve25519.pcap"],
    "quic": ["tcpdump-quic-handshake-null.pcap", "zeek-quic-chromium115-cirrus.pcap", "zeek-quicv2-http3.pcap"],
}
# Conversion flags that keep the examples short: flow examples of up to 96 tokens, packets of 32.
CONVERT_FLAGS = ["--tokens_per_packet", "24", "--flow_seq_len", "96", "--packet_seq_len", "32",
                 "--max_packets_per_session", "6", "--num_shards", "2"]
TINY_MODEL = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"]


def make_tree(sample_captures: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """Link the TREE captures into `root/<class>/`."""
    for label, names in TREE.items():
        (root / label).mkdir(parents=True)
        for name in names:
            (root / label / name).symlink_to(sample_captures / label / name)
    return root


def write_pretrain_checkpoint(workdir: pathlib.Path, tokenizer: dict, step: int = 3,
                              extra: list[str] | None = None, nan_weight: bool = False) -> config_lib.Config:
    """Save a randomly initialised tiny PretrainModel (seed 0) as a pre-training checkpoint.

    With `nan_weight`, one entry of the encoder's first FFN kernel is NaN, as after a diverged run.
    """
    config = config_lib.load_config("tiny", TINY_MODEL + (extra or []))
    config = dataclasses.replace(config, tokenizer=dict(tokenizer))
    model = heads.PretrainModel(config.model, rngs=nnx.Rngs(0))
    if nan_weight:
        kernel = model.encoder.layers.mlp.wi.kernel
        kernel[...] = kernel[...].at[0, 0, 0].set(np.nan)
    writer = checkpoint.Checkpointer(workdir / checkpoint.CHECKPOINT_SUBDIR, save_every=1, keep=1, async_save=False)
    try:
        writer.save(step, model_state=nnx.state(model), optimizer_state={"marker": np.zeros((), np.int32)},
                    cursor={"step": step}, config=config_lib.config_to_dict(config), force=True)
        writer.wait()
    finally:
        writer.close()
    return config


def write_classifier_checkpoint(workdir: pathlib.Path, manifest: dict, level: str, seed: int = 0):
    """Save a randomly initialised tiny Classifier as a fine-tuned checkpoint of `level`; return (model, config)."""
    labels = sorted(manifest["labels"], key=manifest["labels"].get)
    config = config_lib.load_config("tiny", TINY_MODEL + [f"data.seq_len={manifest['seq_len'][level]}",
                                                          f"finetune.level={level}", f"train.seed={seed}"])
    config = dataclasses.replace(config, tokenizer=dict(manifest["tokenizer"]))
    model = heads.Classifier(config.model, len(labels), rngs=nnx.Rngs(seed))
    info = {"level": level, "seq_len": manifest["seq_len"][level], "split_policy": manifest["split"]["policy"],
            "conversion": manifest["config"]}
    writer = checkpoint.Checkpointer(workdir / classifier.BEST_SUBDIR, save_every=1, keep=1, async_save=False)
    try:
        classifier.save_classifier(writer, 5, nnx.state(model), classifier.classifier_config_item(config, labels, info))
        writer.wait()
    finally:
        writer.close()
    return model, config
