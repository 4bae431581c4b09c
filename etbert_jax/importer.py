"""Import ET-BERT's released PyTorch weights (UER-py format) as an etbert-jax checkpoint.

`etbert import-etbert pretrained_model.bin --vocab encryptd_vocab.txt --out DIR` reads the
state dict with `torch.load(..., weights_only=True)`, because the file is untrusted input and
a full unpickle could run code. It checks every tensor name and shape, maps each tensor onto
the NNX `PretrainModel` parameter tree and writes a checkpoint in the pre-training layout.
`etbert finetune --init DIR` restores it like any pre-trained run.

Name mapping (UER -> etbert-jax; torch Linear weights are [out, in] and get transposed):

    embedding.word_embedding.weight            encoder.embeddings.word.embedding (rows padded)
    embedding.position_embedding.weight        encoder.embeddings.position.embedding
    embedding.segment_embedding.weight         encoder.embeddings.segment.embedding
    embedding.layer_norm.{gamma,beta}          encoder.embeddings.norm.{scale,bias}
    encoder.transformer.<i>.self_attn.linear_layers.{0,1,2}   encoder.layers.attention.qkv_* [i, :, q/k/v]
    encoder.transformer.<i>.self_attn.final_linear            encoder.layers.attention.out_* [i]
    encoder.transformer.<i>.layer_norm_1       encoder.layers.attention_norm [i]
    encoder.transformer.<i>.feed_forward.linear_{1,2}         encoder.layers.mlp.{wi,wo} [i]
    encoder.transformer.<i>.layer_norm_2       encoder.layers.mlp_norm [i]
    target.mlm_linear_1                        mbm.transform
    target.layer_norm                          mbm.norm
    target.mlm_linear_2                        mbm.decoder (columns padded)
    target.nsp_linear_1                        pooler.dense (dense + tanh on [CLS])
    target.nsp_linear_2                        sbp

Hidden size, layer count, feed-forward size, position and segment rows and vocabulary size
come from tensor shapes. The head count cannot be read from shapes: it defaults to
hidden_size / 64 (12 for ET-BERT's 768) and can be set with `--heads`.

A missing tensor or a shape mismatch is an error naming the tensor. Tensors the model has no
place for are listed as unused in the log and in `import_report.json`.

torch is an optional dependency (`pip install etbert-jax[torch]`) imported only here, lazily.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import pathlib
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from etbert_jax import logs

logger = logging.getLogger(__name__)

# Head size used to guess the head count when `--heads` is not given (BERT's 768 / 12).
DEFAULT_HEAD_DIM = 64

# Header policy ET-BERT's fine-tuning data was made with; an imported model expects it.
ETBERT_HEADER_POLICY = "etbert"

_LAYER_KEY = re.compile(r"^encoder\.transformer\.(\d+)\.")


class WeightImportError(ValueError):
    """A state dict that cannot be imported: missing tensors, wrong shapes or a bad vocabulary."""


@dataclasses.dataclass(frozen=True)
class UerDimensions:
    """Model sizes read from the tensor shapes of a UER BERT state dict."""

    # Rows of the word embedding (the real vocabulary size).
    vocab_size: int
    # Width of the hidden states.
    hidden_size: int
    # Number of transformer layers.
    num_layers: int
    # Inner width of the feed-forward block.
    intermediate_size: int
    # Rows of the position table.
    max_positions: int
    # Rows of the segment table.
    type_vocab_size: int


@dataclasses.dataclass(frozen=True)
class ImportResult:
    """Outcome of an import: the checkpoint written and the tensors left out."""

    # Checkpoint directory (the workdir passed as `--out`).
    out_dir: pathlib.Path
    # Resolved config stored with the checkpoint, as plain dicts.
    config: dict[str, Any]
    # UER tensor names that were mapped onto a parameter.
    mapped: tuple[str, ...]
    # UER tensor names present in the file that the model has no place for.
    unused: tuple[str, ...]


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict of tensors safely and return float32 numpy arrays by name."""
    try:
        import torch
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "import-etbert needs PyTorch to read the .bin file: pip install 'etbert-jax[torch]' "
            "(CPU build torch==2.13.0)"
        ) from error

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ET-BERT weights not found: {path}; pass pretrained_model.bin")

    # weights_only=True restricts unpickling to tensors and plain containers, so a crafted
    # file cannot run code while loading.
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise WeightImportError(
            f"{path} is not a plain state dict of tensors and was not loaded (weights-only "
            f"unpickling rejected it): {str(error).splitlines()[0]}"
        ) from error
    if not isinstance(loaded, Mapping):
        raise WeightImportError(f"{path} contains a {type(loaded).__name__}, expected a state dict "
                           "(a mapping of tensor names to tensors)")

    tensors = {}
    for name, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise WeightImportError(f"entry {name!r} in {path} is a {type(value).__name__}, not a tensor")
        tensors[str(name)] = value.detach().to(torch.float32).numpy()
    return tensors


def infer_dimensions(tensors: Mapping[str, np.ndarray]) -> UerDimensions:
    """Read model sizes from the shapes of the embedding, first layer and layer names."""
    for name in ("embedding.word_embedding.weight", "embedding.position_embedding.weight",
                 "embedding.segment_embedding.weight",
                 "encoder.transformer.0.feed_forward.linear_1.weight"):
        if name not in tensors:
            hint = ""
            if any(key.startswith("module.") for key in tensors):
                hint = " (names start with 'module.': save model.module.state_dict() instead)"
            raise WeightImportError(f"missing tensor {name!r}; cannot infer the model size{hint}")

    vocab_size, hidden_size = tensors["embedding.word_embedding.weight"].shape
    layer_indices = {int(match.group(1)) for key in tensors if (match := _LAYER_KEY.match(key))}
    return UerDimensions(
        vocab_size=int(vocab_size),
        hidden_size=int(hidden_size),
        num_layers=max(layer_indices) + 1,
        intermediate_size=int(tensors["encoder.transformer.0.feed_forward.linear_1.weight"].shape[0]),
        max_positions=int(tensors["embedding.position_embedding.weight"].shape[0]),
        type_vocab_size=int(tensors["embedding.segment_embedding.weight"].shape[0]),
    )


def expected_shapes(dims: UerDimensions) -> dict[str, tuple[int, ...]]:
    """Return every tensor name a UER BERT with MLM and NSP targets has, with its shape."""
    hidden, inner = dims.hidden_size, dims.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embedding.word_embedding.weight": (dims.vocab_size, hidden),
        "embedding.position_embedding.weight": (dims.max_positions, hidden),
        "embedding.segment_embedding.weight": (dims.type_vocab_size, hidden),
        "embedding.layer_norm.gamma": (hidden,),
        "embedding.layer_norm.beta": (hidden,),
    }

    def linear(prefix: str, out_features: int, in_features: int) -> None:
        shapes[f"{prefix}.weight"] = (out_features, in_features)
        shapes[f"{prefix}.bias"] = (out_features,)

    def norm(prefix: str) -> None:
        shapes[f"{prefix}.gamma"] = (hidden,)
        shapes[f"{prefix}.beta"] = (hidden,)

    for index in range(dims.num_layers):
        layer = f"encoder.transformer.{index}"
        for projection in range(3):
            linear(f"{layer}.self_attn.linear_layers.{projection}", hidden, hidden)
        linear(f"{layer}.self_attn.final_linear", hidden, hidden)
        norm(f"{layer}.layer_norm_1")
        linear(f"{layer}.feed_forward.linear_1", inner, hidden)
        linear(f"{layer}.feed_forward.linear_2", hidden, inner)
        norm(f"{layer}.layer_norm_2")

    linear("target.mlm_linear_1", hidden, hidden)
    norm("target.layer_norm")
    linear("target.mlm_linear_2", dims.vocab_size, hidden)
    linear("target.nsp_linear_1", hidden, hidden)
    linear("target.nsp_linear_2", 2, hidden)
    return shapes


def check_tensors(tensors: Mapping[str, np.ndarray], dims: UerDimensions) -> list[str]:
    """Raise on missing tensors or shape mismatches; return the names of unused tensors."""
    expected = expected_shapes(dims)

    missing = [name for name in expected if name not in tensors]
    if missing:
        raise WeightImportError(
            f"state dict lacks {len(missing)} tensor(s) a UER BERT with MLM and NSP targets needs: "
            f"{', '.join(missing)}; the file may be a fine-tuned classifier or another architecture"
        )

    wrong = [f"{name}: file has {tuple(tensors[name].shape)}, expected {shape}"
             for name, shape in expected.items() if tuple(tensors[name].shape) != shape]
    if wrong:
        raise WeightImportError("tensor shape mismatch: " + "; ".join(wrong))

    return sorted(name for name in tensors if name not in expected)


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """Append zero rows along axis 0 up to `rows`."""
    padding = [(0, rows - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, padding)


def convert_tensors(
    tensors: Mapping[str, np.ndarray], dims: UerDimensions, num_heads: int, padded_vocab_size: int
) -> dict[str, np.ndarray]:
    """Map checked UER tensors onto flat `PretrainModel` parameter paths (dot-separated)."""
    hidden = dims.hidden_size
    head_dim = hidden // num_heads

    def weight_t(prefix: str) -> np.ndarray:
        return tensors[f"{prefix}.weight"].T

    def bias(prefix: str) -> np.ndarray:
        return tensors[f"{prefix}.bias"]

    params = {
        "encoder.embeddings.word.embedding":
            _pad_rows(tensors["embedding.word_embedding.weight"], padded_vocab_size),
        "encoder.embeddings.position.embedding": tensors["embedding.position_embedding.weight"],
        "encoder.embeddings.segment.embedding": tensors["embedding.segment_embedding.weight"],
        "encoder.embeddings.norm.scale": tensors["embedding.layer_norm.gamma"],
        "encoder.embeddings.norm.bias": tensors["embedding.layer_norm.beta"],
    }

    # Per-layer tensors, stacked on a leading layer axis as the model stores them.
    stacked: dict[str, list[np.ndarray]] = {}
    for index in range(dims.num_layers):
        layer = f"encoder.transformer.{index}"
        attention = f"{layer}.self_attn"
        projections = [f"{attention}.linear_layers.{j}" for j in range(3)]

        # UER splits each projection's output features head-major: [H] -> [heads, head_dim].
        qkv_kernel = np.stack([weight_t(p).reshape(hidden, num_heads, head_dim) for p in projections],
                              axis=1)
        qkv_bias = np.stack([bias(p).reshape(num_heads, head_dim) for p in projections], axis=0)
        out_kernel = weight_t(f"{attention}.final_linear").reshape(num_heads, head_dim, hidden)

        layer_params = {
            "encoder.layers.attention.qkv_kernel": qkv_kernel,
            "encoder.layers.attention.qkv_bias": qkv_bias,
            "encoder.layers.attention.out_kernel": out_kernel,
            "encoder.layers.attention.out_bias": bias(f"{attention}.final_linear"),
            "encoder.layers.attention_norm.scale": tensors[f"{layer}.layer_norm_1.gamma"],
            "encoder.layers.attention_norm.bias": tensors[f"{layer}.layer_norm_1.beta"],
            "encoder.layers.mlp.wi.kernel": weight_t(f"{layer}.feed_forward.linear_1"),
            "encoder.layers.mlp.wi.bias": bias(f"{layer}.feed_forward.linear_1"),
            "encoder.layers.mlp.wo.kernel": weight_t(f"{layer}.feed_forward.linear_2"),
            "encoder.layers.mlp.wo.bias": bias(f"{layer}.feed_forward.linear_2"),
            "encoder.layers.mlp_norm.scale": tensors[f"{layer}.layer_norm_2.gamma"],
            "encoder.layers.mlp_norm.bias": tensors[f"{layer}.layer_norm_2.beta"],
        }
        for path, value in layer_params.items():
            stacked.setdefault(path, []).append(value)
    params.update({path: np.stack(values, axis=0) for path, values in stacked.items()})

    decoder_kernel = _pad_rows(tensors["target.mlm_linear_2.weight"], padded_vocab_size).T
    params.update({
        "mbm.transform.kernel": weight_t("target.mlm_linear_1"),
        "mbm.transform.bias": bias("target.mlm_linear_1"),
        "mbm.norm.scale": tensors["target.layer_norm.gamma"],
        "mbm.norm.bias": tensors["target.layer_norm.beta"],
        "mbm.decoder.kernel": decoder_kernel,
        "mbm.decoder.bias": _pad_rows(bias("target.mlm_linear_2"), padded_vocab_size),
        "pooler.dense.kernel": weight_t("target.nsp_linear_1"),
        "pooler.dense.bias": bias("target.nsp_linear_1"),
        "sbp.kernel": weight_t("target.nsp_linear_2"),
        "sbp.bias": bias("target.nsp_linear_2"),
    })
    return {path: np.ascontiguousarray(value, dtype=np.float32) for path, value in params.items()}


def build_config(dims: UerDimensions, num_heads: int | None, tokenizer_block: dict[str, Any]):
    """Return the run Config for imported weights: the `etbert_compat` preset with the file's sizes.

    The compat preset fixes UER's LayerNorm (eps 1e-6 added to the std), the untied MBM head,
    dropout and attention dropout 0.1 and token-level masking.
    """
    from etbert_jax import config as config_lib

    if num_heads is None:
        if dims.hidden_size % DEFAULT_HEAD_DIM:
            raise WeightImportError(
                f"cannot guess the head count for hidden size {dims.hidden_size} (not a multiple of "
                f"{DEFAULT_HEAD_DIM}); pass --heads"
            )
        num_heads = dims.hidden_size // DEFAULT_HEAD_DIM
    if num_heads < 1 or dims.hidden_size % num_heads:
        raise WeightImportError(f"--heads {num_heads} does not divide the hidden size {dims.hidden_size}")

    preset = config_lib.load_config("etbert_compat")
    model = dataclasses.replace(
        preset.model,
        vocab_size=dims.vocab_size,
        hidden_size=dims.hidden_size,
        num_layers=dims.num_layers,
        num_heads=num_heads,
        intermediate_size=dims.intermediate_size,
        max_positions=dims.max_positions,
        type_vocab_size=dims.type_vocab_size,
        layer_norm="uer",
        layer_norm_eps=1e-6,
        tie_mlm_decoder=False,
        attention_dropout=0.1,
    )
    seq_len = min(preset.data.seq_len, dims.max_positions)
    data = dataclasses.replace(preset.data, seq_len=seq_len, max_predictions=None)
    return dataclasses.replace(preset, model=model, data=data, tokenizer=dict(tokenizer_block))


def fill_model(model, params: Mapping[str, np.ndarray]) -> None:
    """Overwrite every parameter of an NNX model with `params`; both sides must match exactly."""
    import jax.numpy as jnp
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    model_paths = {".".join(str(part) for part in path) for path, _ in flat}
    unfilled = sorted(model_paths - set(params))
    extra = sorted(set(params) - model_paths)
    if unfilled or extra:
        # Only a model change that this importer has not followed can cause this.
        raise WeightImportError(
            f"importer and model disagree: parameters without a source {unfilled}, "
            f"converted tensors without a parameter {extra}"
        )

    updated = []
    for path, variable in flat:
        key = ".".join(str(part) for part in path)
        value = params[key]
        if tuple(variable.shape) != value.shape:
            raise WeightImportError(
                f"converted {key} has shape {value.shape}, the model expects {tuple(variable.shape)}"
            )
        updated.append((path, variable.replace(jnp.asarray(value))))
    nnx.update(model, nnx.from_flat_state(updated))


def file_sha256(path: pathlib.Path) -> str:
    """Hash a file in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_etbert(
    weights_path: str | pathlib.Path,
    vocab_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    num_heads: int | None = None,
) -> ImportResult:
    """Convert ET-BERT's UER state dict and vocabulary into a checkpoint in `out_dir`.

    The checkpoint has the pre-training layout (`OUT/checkpoints/0/`) with the model item
    filled from the file, so `checkpoint.restore_pretrained(OUT, mesh)` returns it.
    """
    from flax import nnx

    from etbert_jax import checkpoint as checkpoint_lib
    from etbert_jax import config as config_lib
    from etbert_jax.heads import PretrainModel
    from etbert_jax.tokenizer import Vocab

    weights_path = pathlib.Path(weights_path)
    out = pathlib.Path(out_dir).absolute()
    if (out / checkpoint_lib.CHECKPOINT_SUBDIR).exists():
        raise FileExistsError(f"{out} already contains a checkpoint; choose an empty --out directory")

    tensors = load_state_dict(weights_path)
    dims = infer_dimensions(tensors)
    unused = check_tensors(tensors, dims)
    for name in unused:
        logger.warning("unused tensor %s %s: the model has no parameter for it",
                       name, tuple(tensors[name].shape))

    vocab = Vocab.from_file(vocab_path)
    if vocab.size != dims.vocab_size:
        raise WeightImportError(
            f"vocabulary {vocab_path} has {vocab.size} tokens but the word embedding has "
            f"{dims.vocab_size} rows; pass the vocab file the weights were trained with"
        )
    tokenizer_block = {**vocab.to_manifest(), "header_policy": ETBERT_HEADER_POLICY}
    config = build_config(dims, num_heads, tokenizer_block)

    params = convert_tensors(tensors, dims, config.model.num_heads, config.model.padded_vocab_size)
    del tensors
    model = PretrainModel(config.model, rngs=nnx.Rngs(config.train.seed))
    fill_model(model, params)
    del params

    config_dict = config_lib.config_to_dict(config)
    source = {"weights": str(weights_path.absolute()), "weights_sha256": file_sha256(weights_path)}
    # NOTE: Checkpointer.save needs an optimizer item and Orbax rejects an empty one, so a
    # one-element marker is saved in its place. Fine-tuning and prediction restore the model
    # item only and work, but `etbert pretrain` cannot resume from this checkpoint.
    optimizer_marker = {"imported_without_optimizer_state": np.zeros((), np.int32)}
    checkpointer = checkpoint_lib.Checkpointer(out / checkpoint_lib.CHECKPOINT_SUBDIR, save_every=1,
                                               keep=1, async_save=False)
    try:
        checkpointer.save(0, model_state=nnx.state(model), optimizer_state=optimizer_marker,
                          cursor={"step": 0, "imported_from": source}, config=config_dict, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()

    mapped = tuple(sorted(name for name in expected_shapes(dims)))
    report = {
        "source": source,
        "vocab": tokenizer_block,
        "dimensions": dataclasses.asdict(dims),
        "num_heads": config.model.num_heads,
        "mapped": list(mapped),
        "unused": list(unused),
    }
    (out / "import_report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("imported %d tensors (%d unused) from %s into %s: %d layers, hidden %d, %d heads, "
                "vocabulary %d (padded to %d)", len(mapped), len(unused), weights_path, out,
                dims.num_layers, dims.hidden_size, config.model.num_heads, dims.vocab_size,
                config.model.padded_vocab_size)
    return ImportResult(out_dir=out, config=config_dict, mapped=mapped, unused=tuple(unused))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="etbert import-etbert",
        description="Convert ET-BERT's PyTorch weights (UER format) into an etbert-jax checkpoint.",
    )
    parser.add_argument("weights", help="ET-BERT state dict, e.g. pretrained_model.bin")
    parser.add_argument("--vocab", required=True,
                        help="vocabulary file the weights were trained with, e.g. encryptd_vocab.txt")
    parser.add_argument("--out", required=True, help="output directory for the checkpoint (must be new)")
    parser.add_argument("--heads", type=int, default=None,
                        help=f"attention heads (default: hidden size / {DEFAULT_HEAD_DIM}, 12 for ET-BERT)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("INFO")
    result = import_etbert(args.weights, args.vocab, args.out, num_heads=args.heads)
    print(f"checkpoint written to {result.out_dir}; unused tensors: {len(result.unused)}")
    return 0
