"""A PyTorch BERT in the layout of UER-py, which ET-BERT trains with: the reference for the step benchmark.

Module names follow UER's state dict (`embedding.*`, `encoder.transformer.{i}.self_attn.linear_layers`,
`final_linear`, `feed_forward.linear_1/2`, `layer_norm_1/2`, `target.mlm_linear_1/2`,
`target.nsp_linear_1/2`), and the computation is ET-BERT's pre-training model:

- word + learned position + segment embeddings, LayerNorm, dropout;
- post-LN layers: separate query/key/value projections, softmax attention over non-padding keys,
  output projection, dropout, residual, LayerNorm; erf-GELU feed-forward, dropout, residual, LayerNorm;
- an untied MLM head (dense, GELU, LayerNorm, decoder to the vocabulary) and the SBP head
  (dense + tanh on [CLS], then a 2-way dense layer);
- loss = MLM loss * `mlm_weight` + SBP loss (ET-BERT: MLM / 10 + SBP), then AdamW with weight decay
  on everything but biases and LayerNorm parameters, after global gradient-norm clipping.

Two departures from UER keep the work equal to etbert-jax's step. The MLM transform runs only on the
gathered masked positions, where UER applies `mlm_linear_1` to every position and gathers afterwards.
LayerNorm is `torch.nn.LayerNorm`, where UER divides by std + eps at the same cost.
With `attention="sdpa"` the attention uses `torch.nn.functional.scaled_dot_product_attention`;
`attention="explicit"` writes out UER's matmul-softmax-matmul, which is the only choice when attention
dropout is above 0 in UER's code.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional


@dataclasses.dataclass(frozen=True)
class TorchBertConfig:
    """Sizes and rates of the reference model; defaults are BERT-base with the bigram vocabulary."""

    # Rows of the word embedding and of the MLM decoder.
    vocab_size: int = 65_541
    # Width of the hidden states.
    hidden_size: int = 768
    # Number of transformer layers.
    num_layers: int = 12
    # Number of attention heads; must divide hidden_size.
    num_heads: int = 12
    # Inner width of the feed-forward block.
    intermediate_size: int = 3072
    # Rows of the learned position table.
    max_positions: int = 512
    # Rows of the segment table (0 padding, 1 segment A, 2 segment B).
    type_vocab_size: int = 3
    # Dropout on embeddings, attention output and feed-forward output, in [0, 1).
    dropout: float = 0.1
    # Dropout on attention probabilities, in [0, 1); above 0 needs attention="explicit".
    attention_dropout: float = 0.0
    # LayerNorm epsilon.
    layer_norm_eps: float = 1e-12
    # "sdpa" (fused scaled_dot_product_attention) or "explicit" (UER's matmul, softmax, matmul).
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}")
        if self.attention not in ("sdpa", "explicit"):
            raise ValueError(f"attention={self.attention!r} is not one of 'sdpa', 'explicit'")
        if self.attention == "sdpa" and self.attention_dropout > 0:
            raise ValueError("attention dropout above 0 needs attention='explicit', as in UER's code")


class Embedding(nn.Module):
    """Word, position and segment embeddings, summed, normalized and dropped out."""

    def __init__(self, config: TorchBertConfig):
        super().__init__()
        self.word_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)
        self.segment_embedding = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        summed = (self.word_embedding(input_ids) + self.position_embedding(positions)[None]
                  + self.segment_embedding(segment_ids))
        return self.dropout(self.layer_norm(summed))


class MultiHeadedAttention(nn.Module):
    """Self-attention with separate query, key and value projections, as UER lays it out."""

    def __init__(self, config: TorchBertConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.head_size = hidden // config.num_heads
        self.attention = config.attention
        self.linear_layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(3)])
        self.dropout = nn.Dropout(config.attention_dropout)
        self.final_linear = nn.Linear(hidden, hidden)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        """Attend over the sequence; `additive_mask` [B, 1, 1, S] is 0 at real keys, very negative at padding."""
        batch, length, width = hidden.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_size).transpose(1, 2)

        query, key, value = (heads(layer(hidden)) for layer in self.linear_layers)
        if self.attention == "sdpa":
            context = functional.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask)
        else:
            scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.head_size)
            probs = self.dropout(torch.softmax(scores + additive_mask, dim=-1))
            context = torch.matmul(probs, value)
        context = context.transpose(1, 2).contiguous().view(batch, length, width)
        return self.final_linear(context)


class PositionwiseFeedForward(nn.Module):
    """Dense -> erf GELU -> dense."""

    def __init__(self, config: TorchBertConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear_2(functional.gelu(self.linear_1(hidden)))


class TransformerLayer(nn.Module):
    """One post-LN layer: x = LN(x + attention(x)); x = LN(x + feed_forward(x))."""

    def __init__(self, config: TorchBertConfig):
        super().__init__()
        self.self_attn = MultiHeadedAttention(config)
        self.dropout_1 = nn.Dropout(config.dropout)
        self.layer_norm_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = PositionwiseFeedForward(config)
        self.dropout_2 = nn.Dropout(config.dropout)
        self.layer_norm_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.layer_norm_1(hidden + self.dropout_1(self.self_attn(hidden, additive_mask)))
        return self.layer_norm_2(hidden + self.dropout_2(self.feed_forward(hidden)))


class Encoder(nn.Module):
    """The stack of transformer layers."""

    def __init__(self, config: TorchBertConfig):
        super().__init__()
        self.transformer = nn.ModuleList([TransformerLayer(config) for _ in range(config.num_layers)])

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.transformer:
            hidden = layer(hidden, additive_mask)
        return hidden


class Target(nn.Module):
    """ET-BERT's pre-training target: untied MLM head on masked positions and the SBP head on [CLS]."""

    def __init__(self, config: TorchBertConfig):
        super().__init__()
        hidden = config.hidden_size
        self.mlm_linear_1 = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.mlm_linear_2 = nn.Linear(hidden, config.vocab_size)
        self.nsp_linear_1 = nn.Linear(hidden, hidden)
        self.nsp_linear_2 = nn.Linear(hidden, 2)

    def forward(self, memory: torch.Tensor, masked_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (MLM logits [B, M, V], SBP logits [B, 2])."""
        index = masked_positions.long()[:, :, None].expand(-1, -1, memory.shape[-1])
        gathered = torch.gather(memory, 1, index)
        mlm = self.layer_norm(functional.gelu(self.mlm_linear_1(gathered)))
        sbp = self.nsp_linear_2(torch.tanh(self.nsp_linear_1(memory[:, 0, :])))
        return self.mlm_linear_2(mlm), sbp


class BertPretrain(nn.Module):
    """Embedding + encoder + target, with UER's module names."""

    def __init__(self, config: TorchBertConfig):
        super().__init__()
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.target = Target(config)
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor,
                masked_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # 0 at real keys, -10000 at padding keys, as UER builds its mask.
        additive_mask = ((input_ids == 0).float() * -10000.0)[:, None, None, :]
        memory = self.encoder(self.embedding(input_ids, segment_ids), additive_mask)
        return self.target(memory, masked_positions)


def _init_weights(module: nn.Module) -> None:
    """Initialise weights from N(0, 0.02) and biases with 0, as UER does."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def make_optimizer(model: nn.Module, learning_rate: float = 1e-4, weight_decay: float = 0.01,
                   eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW with weight decay on weights and embeddings only (not on biases or LayerNorm parameters)."""
    decayed, plain = [], []
    for name, parameter in model.named_parameters():
        if name.endswith("bias") or "layer_norm" in name:
            plain.append(parameter)
        else:
            decayed.append(parameter)
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=eps)


def train_step(model: BertPretrain, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               mlm_weight: float = 0.1, clip_norm: float = 1.0,
               autocast_dtype: torch.dtype | None = None) -> float:
    """Run one pre-training step (forward, backward, clipping, AdamW update) and return the loss.

    `batch` contains input_ids, segment_ids, masked_positions, mbm_targets, mbm_weights and sbp_labels,
    laid out as etbert-jax's batches. With `autocast_dtype` the forward pass runs under CPU autocast.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        mlm_logits, sbp_logits = model(batch["input_ids"], batch["segment_ids"], batch["masked_positions"])

    weights = batch["mbm_weights"].float().reshape(-1)
    mlm_losses = functional.cross_entropy(mlm_logits.float().reshape(-1, mlm_logits.shape[-1]),
                                          batch["mbm_targets"].long().reshape(-1), reduction="none")
    mlm_loss = (mlm_losses * weights).sum() / weights.sum().clamp_min(1e-8)
    sbp_loss = functional.cross_entropy(sbp_logits.float(), batch["sbp_labels"].long())
    loss = mlm_weight * mlm_loss + sbp_loss

    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    return float(loss.detach())
