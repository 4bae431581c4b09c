"""Typed run configuration: model, mesh, data, optimizer, training and fine-tuning settings.

Every setting has one default here. A run starts from a named preset (`tiny`, `small`, `base`,
`large`, `etbert_compat`) or from a YAML file, and dotted `section.field=value` overrides come last:

    config = load_config("base", ["data.global_batch_size=256", "mesh.fsdp=4"])

A YAML file contains sections named like the `Config` fields. It may start from a preset or from
another YAML file with a top-level `extends: NAME_OR_PATH` key; without it, it starts from these
defaults. The files in `configs/` spell out each preset in full.

`validate(config, num_devices, process_count)` checks everything that can be checked before any
compilation: mesh sizes against the device count, batch divisibility, sequence length against
the position table, heads against the hidden size.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from typing import Any

import yaml

# Embedding rows are padded to a multiple of this, so vocabulary matmuls tile well and the
# vocabulary axis divides common tensor-parallel sizes.
VOCAB_PAD_MULTIPLE = 128

# Vocabulary size of the default bigram vocabulary: 5 special tokens + 256 * 256 byte pairs.
BIGRAM_VOCAB_SIZE = 65_541

# Vocabulary size of ET-BERT's released `encryptd_vocab.txt`.
ETBERT_VOCAB_SIZE = 60_005

LAYER_NORM_KINDS = ("standard", "uer")
COMPUTE_DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")
MASKING_KINDS = ("span", "token")
SCHEDULES = ("linear", "cosine")
FINETUNE_LEVELS = ("packet", "flow")
CLASS_WEIGHT_KINDS = ("none", "balanced")

# Default LayerNorm epsilon per kind: 1e-12 is BERT's, 1e-6 is UER's (ET-BERT's code base).
DEFAULT_LAYER_NORM_EPS = {"standard": 1e-12, "uer": 1e-6}


def _check_choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"invalid {section}.{name}={value!r}: expected one of {', '.join(choices)}")


def _check_positive(section: str, name: str, value: int | float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"invalid {section}.{name}={value!r}: must be a finite number > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """BERT encoder and head sizes."""

    # Real vocabulary size, from the shards' manifest: 65,541 (bigram) or 60,005 (ET-BERT WordPiece).
    vocab_size: int = BIGRAM_VOCAB_SIZE
    # Width of the hidden states (d).
    hidden_size: int = 768
    # Number of transformer layers (L).
    num_layers: int = 12
    # Number of attention heads; must divide hidden_size.
    num_heads: int = 12
    # Inner width of the feed-forward block.
    intermediate_size: int = 3072
    # Rows of the learned position table, the maximum sequence length.
    max_positions: int = 512
    # Rows of the segment table: 0 padding, 1 segment A, 2 segment B.
    type_vocab_size: int = 3
    # Dropout rate on embeddings, attention output and feed-forward output, in [0, 1).
    dropout: float = 0.1
    # Dropout rate on attention probabilities, in [0, 1). 0.0 enables the attention kernel chosen by
    # attention_implementation (cuDNN flash attention on GPU with "cudnn"); 0.1 matches ET-BERT.
    attention_dropout: float = 0.1
    # Attention kernel when attention dropout is off or in evaluation: "xla" (model.py's
    # masked_softmax_attention, compiled by XLA on every backend) or "cudnn" (cuDNN flash attention
    # through jax.nn.dot_product_attention, for NVIDIA GPUs with bfloat16 compute).
    attention_implementation: str = "xla"
    # "standard": (x - mean) / sqrt(var + eps). "uer": (x - mean) / (unbiased std + eps), as ET-BERT.
    layer_norm: str = "standard"
    # LayerNorm epsilon; None picks 1e-12 for "standard" and 1e-6 for "uer" at construction.
    layer_norm_eps: float | None = None
    # Share the MBM decoder with the word embedding table (ET-BERT's released head is untied).
    tie_mlm_decoder: bool = False
    # Dtype of activations and matmuls; parameters always stay float32.
    compute_dtype: str = "float32"
    # Run the layers with nnx.scan (one compiled layer body: faster compiles, the choice for deep
    # models on pods) instead of a Python loop. The parameters are stacked on a leading "layers"
    # axis either way. Unrolled, the `base` step ran about 9 % faster on CPU (docs/benchmarks.md).
    scan_layers: bool = False
    # Recompute each layer's activations in the backward pass (saves memory, costs ~1/3 more FLOPs).
    remat: bool = False
    # Standard deviation of the normal initialiser of weights and embeddings (ET-BERT uses 0.02).
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        _check_choice("model", "layer_norm", self.layer_norm, LAYER_NORM_KINDS)
        _check_choice("model", "compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        _check_choice("model", "attention_implementation", self.attention_implementation,
                      ATTENTION_IMPLEMENTATIONS)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_positions", "type_vocab_size"):
            _check_positive("model", name, getattr(self, name))
        for name in ("dropout", "attention_dropout"):
            rate = getattr(self, name)
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"invalid model.{name}={rate!r}: must be in [0, 1)")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}: "
                "choose a head count that divides the hidden size"
            )
        if self.layer_norm_eps is None:
            object.__setattr__(self, "layer_norm_eps", DEFAULT_LAYER_NORM_EPS[self.layer_norm])

    @property
    def padded_vocab_size(self) -> int:
        """Embedding and decoder rows: vocab_size rounded up to a multiple of 128."""
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    @property
    def head_dim(self) -> int:
        """Features per attention head."""
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over the axes ('data', 'fsdp', 'tensor'); at most one size may be -1."""

    # Pure data-parallel replicas; -1 takes the devices left over by the other axes.
    data: int = -1
    # Data-parallel replicas that also shard parameters and optimizer state (ZeRO-3 style).
    fsdp: int = 1
    # Tensor-parallel width: shards heads, feed-forward and vocabulary dims.
    tensor: int = 1

    def __post_init__(self) -> None:
        sizes = self.as_tuple()
        if sizes.count(-1) > 1:
            raise ValueError(f"invalid mesh {sizes}: at most one of data, fsdp, tensor may be -1")
        for name, size in zip(("data", "fsdp", "tensor"), sizes):
            if size != -1 and size < 1:
                raise ValueError(f"invalid mesh.{name}={size}: must be >= 1, or -1 to fill from the device count")

    def as_tuple(self) -> tuple[int, int, int]:
        """Sizes as configured, in axis order (data, fsdp, tensor)."""
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        """Compute concrete axis sizes for `num_devices` devices, filling a -1 axis.

        Raises ValueError when the mesh does not fit or does not use every device.
        """
        sizes = list(self.as_tuple())
        fixed = math.prod(size for size in sizes if size != -1)
        if -1 in sizes:
            if fixed > num_devices or num_devices % fixed:
                raise ValueError(
                    f"mesh {self.as_tuple()} needs a multiple of {fixed} devices, but {num_devices} are "
                    "available: change mesh.data/fsdp/tensor so their product divides the device count"
                )
            sizes[sizes.index(-1)] = num_devices // fixed
        elif fixed != num_devices:
            larger = "larger than" if fixed > num_devices else "smaller than"
            raise ValueError(
                f"mesh {self.as_tuple()} has {fixed} devices, {larger} the {num_devices} available: "
                "make data*fsdp*tensor equal the device count, or set one axis to -1"
            )
        return (sizes[0], sizes[1], sizes[2])


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline and MBM masking."""

    # Directory holding the TFRecord shards and their manifest.json.
    shards: str = ""
    # Tokens per example after padding; at most model.max_positions.
    seq_len: int = 128
    # Examples per optimizer step over all processes (before gradient accumulation splits it).
    global_batch_size: int = 32
    # Examples held by each process's shuffle buffer.
    shuffle_buffer: int = 10_000
    # Seed of shuffling and masking; masks are a function of (seed, step, process).
    seed: int = 0
    # Fraction of maskable (non-special, non-padding) tokens chosen for MBM, in (0, 1).
    mask_prob: float = 0.15
    # "span" masks runs of consecutive tokens, so an overlapping bigram's bytes are not visible in its
    # neighbours. "token" masks tokens independently, as BERT and ET-BERT do.
    masking: str = "span"
    # Span masking draws span lengths from 2..max_span tokens: a one-token span hides no bytes,
    # because its neighbours show both.
    max_span: int = 3
    # Static number of masked slots per sequence (M); None picks ceil(seq_len * mask_prob) rounded up
    # to a multiple of 8. Unused slots have weight 0.
    max_predictions: int | None = None
    # Passes over the shards; None repeats until train.steps is reached.
    num_epochs: int | None = None

    def __post_init__(self) -> None:
        _check_choice("data", "masking", self.masking, MASKING_KINDS)
        for name in ("seq_len", "global_batch_size", "shuffle_buffer", "max_span"):
            _check_positive("data", name, getattr(self, name))
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"invalid data.mask_prob={self.mask_prob!r}: must be in (0, 1)")
        if self.num_epochs is not None:
            _check_positive("data", "num_epochs", self.num_epochs)
        if self.max_predictions is None:
            object.__setattr__(self, "max_predictions", default_max_predictions(self.seq_len, self.mask_prob))
        _check_positive("data", "max_predictions", self.max_predictions)


def default_max_predictions(seq_len: int, mask_prob: float) -> int:
    """Return ceil(seq_len * mask_prob) rounded up to a multiple of 8 (20 -> 24 at 128 tokens)."""
    return math.ceil(math.ceil(seq_len * mask_prob) / 8) * 8


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    # Peak learning rate, reached at the end of warm-up.
    learning_rate: float = 1e-4
    # Linear warm-up length in steps; None uses warmup_fraction of the total steps.
    warmup_steps: int | None = None
    # Warm-up length as a fraction of the total steps, in [0, 1); used when warmup_steps is None.
    warmup_fraction: float = 0.1
    # Decay after warm-up: "linear" or "cosine".
    schedule: str = "linear"
    # Final learning rate as a fraction of learning_rate, in [0, 1].
    end_lr_fraction: float = 0.0
    # Decoupled weight decay; biases and LayerNorm parameters are excluded by optim.py.
    weight_decay: float = 0.01
    # Adam first-moment decay.
    b1: float = 0.9
    # Adam second-moment decay.
    b2: float = 0.999
    # Adam denominator epsilon.
    eps: float = 1e-6
    # Global gradient-norm clip; 0 disables clipping.
    grad_clip_norm: float = 1.0
    # Micro-batches per optimizer step; must divide the examples per batch shard,
    # global_batch_size / (mesh.data * mesh.fsdp).
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        _check_choice("optim", "schedule", self.schedule, SCHEDULES)
        _check_positive("optim", "learning_rate", self.learning_rate)
        _check_positive("optim", "eps", self.eps)
        _check_positive("optim", "grad_accum_steps", self.grad_accum_steps)
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"invalid optim.{name}={getattr(self, name)!r}: must be in [0, 1)")
        for name in ("weight_decay", "grad_clip_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"invalid optim.{name}={getattr(self, name)!r}: must be a finite number >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"invalid optim.warmup_fraction={self.warmup_fraction!r}: must be in [0, 1)")
        if not 0.0 <= self.end_lr_fraction <= 1.0:
            raise ValueError(f"invalid optim.end_lr_fraction={self.end_lr_fraction!r}: must be in [0, 1]")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"invalid optim.warmup_steps={self.warmup_steps!r}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Pre-training loop, logging and checkpoints."""

    # Total optimizer steps.
    steps: int = 10_000
    # Seed of parameter initialisation and dropout.
    seed: int = 0
    # Steps between metric logs.
    log_every: int = 50
    # Steps between checkpoints; the last step is always saved.
    checkpoint_every: int = 1000
    # Most recent checkpoints kept on disk.
    keep_checkpoints: int = 3
    # Weight of the MBM loss; ET-BERT optimises mbm_loss / 10 + sbp_loss.
    mbm_weight: float = 0.1
    # Weight of the SBP loss.
    sbp_weight: float = 1.0
    # Consecutive steps with a non-finite loss or gradient tolerated before training stops.
    max_consecutive_nonfinite: int = 5
    # Output directory for checkpoints, logs and the resolved config.
    workdir: str = ""
    # Continue from the newest checkpoint in workdir when one exists.
    resume: bool = True
    # First step of a profiler trace; None records no trace.
    profile_start_step: int | None = None
    # Steps recorded in the profiler trace.
    profile_num_steps: int = 5

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "max_consecutive_nonfinite",
                     "profile_num_steps"):
            _check_positive("train", name, getattr(self, name))
        for name in ("mbm_weight", "sbp_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"invalid train.{name}={getattr(self, name)!r}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Classification fine-tuning; batch, optimizer and mesh come from the other sections."""

    # Checkpoint directory to start from (pre-trained or imported); empty starts from random weights.
    init: str = ""
    # "packet" or "flow" shards; None takes the only level present in the manifest.
    level: str | None = None
    # Number of classes; None takes the count from the shards' labels.json.
    num_labels: int | None = None
    # Train only the classifier on a frozen encoder (a linear probe).
    freeze_encoder: bool = False
    # Passes over the training split.
    epochs: int = 10
    # Evaluations without a better validation macro-F1 before stopping; None never stops early.
    early_stopping_patience: int | None = 3
    # "none" or "balanced" (inverse class frequency) loss weights.
    class_weights: str = "none"
    # Steps between validation runs; 0 validates once per epoch.
    eval_every: int = 0

    def __post_init__(self) -> None:
        if self.level is not None:
            _check_choice("finetune", "level", self.level, FINETUNE_LEVELS)
        _check_choice("finetune", "class_weights", self.class_weights, CLASS_WEIGHT_KINDS)
        _check_positive("finetune", "epochs", self.epochs)
        if self.num_labels is not None and self.num_labels < 2:
            raise ValueError(f"invalid finetune.num_labels={self.num_labels!r}: must be >= 2")
        if self.eval_every < 0:
            raise ValueError(f"invalid finetune.eval_every={self.eval_every!r}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: one section per concern."""

    # Encoder and head sizes.
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    # Device mesh shape.
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # Input pipeline and masking.
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # Optimizer and schedule.
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    # Pre-training loop.
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    # Fine-tuning.
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    # The `tokenizer` block of the shards' manifest, copied in at run time so checkpoints carry it.
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "finetune": FinetuneConfig,
}

# Presets as overrides of the defaults above. configs/<name>.yaml spells out the same values
# (tests/test_config.py checks that they agree).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # CPU tests and demos: a 2-layer, 64-wide encoder. It keeps ET-BERT's 512 positions, so a
    # tiny pre-training checkpoint can be fine-tuned on flow-level examples (up to 512 tokens).
    "tiny": {
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128,
                  "max_positions": 512},
        "data": {"seq_len": 128, "global_batch_size": 16, "shuffle_buffer": 1000},
        "optim": {"learning_rate": 1e-3},
        "train": {"steps": 200, "log_every": 10, "checkpoint_every": 100},
    },
    # One GPU or a small TPU slice: BERT-small-like (4 layers, 512 wide).
    "small": {
        "model": {"hidden_size": 512, "num_layers": 4, "num_heads": 8, "intermediate_size": 2048},
        "data": {"seq_len": 128, "global_batch_size": 256},
        "optim": {"learning_rate": 5e-4},
        "train": {"steps": 100_000},
    },
    # ET-BERT's size (BERT-base) with the bigram vocabulary and fused attention.
    "base": {
        "model": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
                  "attention_dropout": 0.0, "compute_dtype": "bfloat16"},
        "data": {"seq_len": 128, "global_batch_size": 256},
        "optim": {"learning_rate": 2e-4},
        "train": {"steps": 500_000},
    },
    # BERT-large sizes.
    "large": {
        "model": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096,
                  "attention_dropout": 0.0, "compute_dtype": "bfloat16", "remat": True, "scan_layers": True},
        "data": {"seq_len": 512, "global_batch_size": 512},
        "optim": {"learning_rate": 1e-4},
        "train": {"steps": 500_000},
    },
    # ET-BERT's architecture exactly, for imported weights: UER LayerNorm, untied head, 60,005 rows.
    "etbert_compat": {
        "model": {"vocab_size": ETBERT_VOCAB_SIZE, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
                  "intermediate_size": 3072, "dropout": 0.1, "attention_dropout": 0.1, "layer_norm": "uer",
                  "layer_norm_eps": 1e-6, "tie_mlm_decoder": False},
        "data": {"seq_len": 128, "global_batch_size": 256, "masking": "token"},
        "optim": {"learning_rate": 2e-5},
        "train": {"steps": 500_000},
    },
}

# Directory of the YAML preset files in a source checkout.
CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def config_to_dict(config: Config) -> dict[str, Any]:
    """Convert a config to nested plain dicts (YAML- and JSON-safe)."""
    return dataclasses.asdict(config)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a config from nested dicts; unknown sections or fields raise ValueError."""
    values = dict(values)
    tokenizer = values.pop("tokenizer", None) or {}
    if not isinstance(tokenizer, dict):
        raise ValueError(f"invalid tokenizer block {tokenizer!r}: expected a mapping")

    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(
            f"unknown config section(s) {', '.join(unknown)}: valid sections are "
            f"{', '.join(list(SECTIONS) + ['tokenizer'])}"
        )

    sections = {}
    for name, cls in SECTIONS.items():
        fields = values.get(name) or {}
        if not isinstance(fields, dict):
            raise ValueError(f"invalid config section {name!r}: expected a mapping, got {fields!r}")
        valid = {field.name for field in dataclasses.fields(cls)}
        bad = sorted(set(fields) - valid)
        if bad:
            raise ValueError(
                f"unknown key(s) {', '.join(f'{name}.{key}' for key in bad)}: valid keys in {name!r} are "
                f"{', '.join(sorted(valid))}"
            )
        hints = typing.get_type_hints(cls)
        converted = {key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in fields.items()}
        sections[name] = cls(**converted)
    return Config(**sections, tokenizer=dict(tokenizer))


def save_yaml(config: Config, path: str | pathlib.Path) -> None:
    """Write the resolved config as YAML; `load_config(path)` reads it back unchanged."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        yaml.safe_dump(config_to_dict(config), handle, sort_keys=False)


def load_config(preset_or_path: str | pathlib.Path = "tiny", overrides: list[str] | None = None) -> Config:
    """Load a preset name or a YAML file, then apply dotted `section.field=value` overrides."""
    values = _load_values(str(preset_or_path), seen=())
    for override in overrides or []:
        _apply_override(values, override)
    return config_from_dict(values)


def _load_values(source: str, seen: tuple[str, ...]) -> dict[str, Any]:
    """Return nested override dicts for a preset or YAML file, following `extends:` chains."""
    if source in seen:
        raise ValueError(f"config 'extends' loop: {' -> '.join(seen + (source,))}")

    if source in PRESETS:
        return _deep_merge({}, PRESETS[source])

    path = pathlib.Path(source)
    if not path.is_file():
        raise ValueError(
            f"config {source!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file"
        )
    with path.open() as handle:
        loaded = yaml.safe_load(handle) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must contain a mapping of sections, got {type(loaded).__name__}")

    parent = loaded.pop("extends", None)
    base = _load_values(str(parent), seen + (source,)) if parent is not None else {}
    return _deep_merge(base, loaded)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        elif isinstance(value, dict):
            merged[key] = _deep_merge({}, value)
        else:
            merged[key] = value
    return merged


def _apply_override(values: dict[str, Any], override: str) -> None:
    """Apply one `section.field=value` string to nested dicts; the value stays a string here."""
    if "=" not in override:
        raise ValueError(f"invalid override {override!r}: expected section.field=value, e.g. data.seq_len=256")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"invalid override key {key!r}: expected section.field, e.g. model.num_layers")
    section, field = parts

    if section == "tokenizer":
        values.setdefault("tokenizer", {})[field] = yaml.safe_load(raw)
        return
    if section not in SECTIONS:
        raise ValueError(
            f"unknown config section {section!r} in override {override!r}: valid sections are "
            f"{', '.join(list(SECTIONS) + ['tokenizer'])}"
        )
    valid = {item.name for item in dataclasses.fields(SECTIONS[section])}
    if field not in valid:
        raise ValueError(f"unknown key {key!r}: valid keys in {section!r} are {', '.join(sorted(valid))}")
    values.setdefault(section, {})[field] = raw


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML value or an override string to the field's declared type."""
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) and type(None) in args
    target = next((arg for arg in args if arg is not type(None)), annotation) if optional else annotation

    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", "~", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ValueError(f"invalid {key}=None: this field needs a {target.__name__}")

    try:
        if target is bool:
            return _to_bool(value)
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("not an integer")
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if target is float:
            return float(value)
        if target is str:
            return str(value)
    except ValueError as error:
        raise ValueError(f"invalid {key}={value!r}: expected {target.__name__} ({error})") from None
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError("expected true or false")


def validate(config: Config, num_devices: int, process_count: int = 1) -> tuple[int, int, int]:
    """Check the config against the machine before anything compiles; return the resolved mesh shape.

    Raises ValueError naming the values that conflict and how to fix them.
    """
    mesh_shape = config.mesh.resolve(num_devices)
    data, fsdp, _ = mesh_shape
    batch_shards = data * fsdp
    batch = config.data.global_batch_size

    if num_devices % process_count:
        raise ValueError(f"{num_devices} devices cannot be split evenly over {process_count} processes")
    if batch % batch_shards:
        raise ValueError(
            f"data.global_batch_size={batch} is not divisible by the batch-sharding mesh size "
            f"data*fsdp={data}*{fsdp}={batch_shards}: use a multiple of {batch_shards}"
        )
    if batch % process_count:
        raise ValueError(
            f"data.global_batch_size={batch} is not divisible by the process count {process_count}: "
            f"use a multiple of {process_count}"
        )
    per_shard = batch // batch_shards
    accum = config.optim.grad_accum_steps
    if per_shard % accum:
        raise ValueError(
            f"optim.grad_accum_steps={accum} does not divide the {per_shard} examples per batch shard "
            f"(global batch {batch} / data*fsdp {batch_shards})"
        )

    model = config.model
    _, fsdp_size, tensor = mesh_shape
    for name, size in (("model.num_heads", model.num_heads), ("model.intermediate_size", model.intermediate_size),
                       ("padded vocabulary size", model.padded_vocab_size)):
        if size % tensor:
            raise ValueError(
                f"{name}={size} is not divisible by mesh.tensor={tensor}: choose a tensor size that divides it"
            )
    if model.hidden_size % fsdp_size:
        raise ValueError(
            f"model.hidden_size={model.hidden_size} is not divisible by mesh.fsdp={fsdp_size}: "
            "choose an fsdp size that divides the hidden size"
        )

    if config.data.seq_len > config.model.max_positions:
        raise ValueError(
            f"data.seq_len={config.data.seq_len} is longer than the position table "
            f"model.max_positions={config.model.max_positions}: shorten the sequences or enlarge the table"
        )
    needed = math.ceil(config.data.seq_len * config.data.mask_prob)
    if config.data.max_predictions < needed:
        raise ValueError(
            f"data.max_predictions={config.data.max_predictions} is below ceil(seq_len * mask_prob) = {needed} "
            f"for seq_len={config.data.seq_len}: raise it or leave it unset (null) to derive it"
        )
    if config.data.max_predictions > config.data.seq_len:
        raise ValueError(
            f"data.max_predictions={config.data.max_predictions} exceeds data.seq_len={config.data.seq_len}"
        )

    vocab_size = config.tokenizer.get("vocab_size")
    if vocab_size is not None and vocab_size != config.model.vocab_size:
        raise ValueError(
            f"model.vocab_size={config.model.vocab_size} does not match the shards' vocabulary size "
            f"{vocab_size}: set model.vocab_size={vocab_size}"
        )
    return mesh_shape
