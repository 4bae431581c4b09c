"""A small PyTorch BERT that computes what UER-py's BERT computes, for importer parity tests.

ET-BERT trains and ships its weights with a vendored copy of UER-py. This module rebuilds
that model's forward pass and, more importantly, its state-dict names, so a test can create
a tiny random "ET-BERT" checkpoint with `torch.save` and check that the imported JAX model
produces the same numbers:

- embeddings: word + position + segment, then UER's LayerNorm, then dropout;
- post-LN transformer layers: self-attention (`linear_layers.0/1/2` = query/key/value,
  `final_linear`), residual, `layer_norm_1`, feed-forward `linear_1` -> erf GELU ->
  `linear_2`, residual, `layer_norm_2`;
- attention mask from segment ids: keys with segment 0 (padding) get -10000 added to
  their scores, as UER's "fully visible" mask does;
- MLM target: `mlm_linear_1` -> GELU -> `layer_norm` -> `mlm_linear_2` (untied);
- NSP target (ET-BERT's SBP): `nsp_linear_1` -> tanh -> `nsp_linear_2` on position 0.

UER's LayerNorm is gamma * (x - mean) / (std + eps) + beta with the unbiased standard
deviation and eps added to the std, and its parameters are named `gamma` and `beta`.
Only the forward pass in eval mode is meant to be compared; training code is left out.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class UerConfig:
    """Sizes of the reference model."""

    # Rows of the word embedding and the MLM output layer.
    vocab_size: int = 300
    # Width of hidden states.
    hidden_size: int = 64
    # Number of transformer layers.
    num_layers: int = 2
    # Attention heads; must divide hidden_size.
    num_heads: int = 4
    # Inner width of the feed-forward block.
    intermediate_size: int = 128
    # Rows of the position table.
    max_positions: int = 64
    # Rows of the segment table (0 padding, 1 segment A, 2 segment B).
    type_vocab_size: int = 3
    # Dropout rate used in training mode; eval mode disables it.
    dropout: float = 0.1
    # LayerNorm epsilon, added to the standard deviation.
    layer_norm_eps: float = 1e-6


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Erf-based GELU, as UER defines it."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class UerLayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(hidden_size))
        self.beta = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)  # unbiased (divides by n - 1), as in UER
        return self.gamma * (x - mean) / (std + self.eps) + self.beta


class Embedding(nn.Module):
    def __init__(self, config: UerConfig) -> None:
        super().__init__()
        self.word_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_positions, config.hidden_size)
        self.segment_embedding = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.layer_norm = UerLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        summed = (self.word_embedding(ids) + self.position_embedding(positions)
                  + self.segment_embedding(segments))
        return self.dropout(self.layer_norm(summed))


class MultiHeadedAttention(nn.Module):
    def __init__(self, config: UerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.linear_layers = nn.ModuleList(
            [nn.Linear(config.hidden_size, config.hidden_size) for _ in range(3)]
        )
        self.dropout = nn.Dropout(config.dropout)
        self.final_linear = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query, key, value = (split_heads(layer(hidden)) for layer in self.linear_layers)
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores + mask
        probabilities = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(probabilities, value).transpose(1, 2).reshape(batch, length, width)
        return self.final_linear(context)


class FeedForward(nn.Module):
    def __init__(self, config: UerConfig) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear_2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(gelu(self.linear_1(x)))


class TransformerLayer(nn.Module):
    def __init__(self, config: UerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadedAttention(config)
        self.dropout_1 = nn.Dropout(config.dropout)
        self.layer_norm_1 = UerLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.feed_forward = FeedForward(config)
        self.dropout_2 = nn.Dropout(config.dropout)
        self.layer_norm_2 = UerLayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.dropout_1(self.self_attn(hidden, mask))
        inter = self.layer_norm_1(attended + hidden)
        output = self.dropout_2(self.feed_forward(inter))
        return self.layer_norm_2(output + inter)


class Encoder(nn.Module):
    def __init__(self, config: UerConfig) -> None:
        super().__init__()
        self.transformer = nn.ModuleList([TransformerLayer(config) for _ in range(config.num_layers)])

    def forward(self, hidden: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        length = segments.shape[1]
        visible = (segments > 0).unsqueeze(1).repeat(1, length, 1).unsqueeze(1).float()
        mask = (1.0 - visible) * -10000.0
        for layer in self.transformer:
            hidden = layer(hidden, mask)
        return hidden


class Target(nn.Module):
    def __init__(self, config: UerConfig) -> None:
        super().__init__()
        self.mlm_linear_1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = UerLayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlm_linear_2 = nn.Linear(config.hidden_size, config.vocab_size)
        self.nsp_linear_1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.nsp_linear_2 = nn.Linear(config.hidden_size, 2)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mlm = self.mlm_linear_2(self.layer_norm(gelu(self.mlm_linear_1(hidden))))
        nsp = self.nsp_linear_2(torch.tanh(self.nsp_linear_1(hidden[:, 0, :])))
        return mlm, nsp


class UerBert(nn.Module):
    """UER's BERT with the MLM and NSP targets; state-dict keys match ET-BERT's release."""

    def __init__(self, config: UerConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.target = Target(config)

    def forward(
        self, ids: torch.Tensor, segments: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return encoder output [B, S, H], MLM logits [B, S, V] and NSP logits [B, 2]."""
        hidden = self.encoder(self.embedding(ids, segments), segments)
        mlm, nsp = self.target(hidden)
        return hidden, mlm, nsp


def randomize(model: UerBert, seed: int) -> None:
    """Fill every parameter with seeded random values.

    Weights get N(0, 0.02) like UER's initialiser. LayerNorm gammas, betas and biases get
    visibly non-default values too, so a parity test notices any of them being dropped,
    swapped or transposed.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("gamma"):
                parameter.copy_(1.0 + 0.1 * noise)
            elif name.endswith(("beta", "bias")):
                parameter.copy_(0.1 * noise)
            else:
                parameter.copy_(0.02 * noise)


def build_reference(config: UerConfig, seed: int = 0) -> UerBert:
    """Create a randomized reference model in eval mode."""
    model = UerBert(config)
    randomize(model, seed)
    return model.eval()
