"""Task models on top of `BertEncoder`: pre-training (MBM + SBP) and sequence classification.

Parameter tree of `PretrainModel` (besides `encoder.*`, documented in model.py):

    pooler.dense.{kernel,bias}          [H, H], [H]     ET-BERT `target.nsp_linear_1`
    mbm.transform.{kernel,bias}         [H, H], [H]     ET-BERT `target.mlm_linear_1`
    mbm.norm.{scale,bias}               [H]             ET-BERT `target.layer_norm`
    mbm.decoder.{kernel,bias}           [H, V], [V]     ET-BERT `target.mlm_linear_2` (untied head)
    mbm.decoder_bias                    [V]             only with tie_mlm_decoder (decoder is the word table)
    sbp.{kernel,bias}                   [H, 2], [2]     ET-BERT `target.nsp_linear_2`

Parameter tree of `Classifier`: `encoder.*`, `pooler.dense.*` (ET-BERT `output_layer_1`) and
`output.{kernel,bias}` [H, num_labels] (ET-BERT `output_layer_2`).

V is the padded vocabulary size. Logits of the padding rows (ids >= vocab_size) are set to
`MASKED_LOGIT`, so they never win an argmax and carry no probability mass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from etbert_jax import sharding
from etbert_jax.config import ModelConfig
from etbert_jax.model import BertEncoder, Dense, Embedding, LayerNorm, Pooler, dropout, gelu

# Logit given to the padded vocabulary rows: far below any real logit, but finite in float32 and
# bfloat16 so that softmax and cross-entropy stay NaN-free.
MASKED_LOGIT = -1e9


class MbmHead(nnx.Module):
    """Masked BURST Modeling head: dense + GELU + LayerNorm, then a decoder to the padded vocabulary."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        hidden = config.hidden_size
        self.config = config
        self.transform = Dense(hidden, hidden, ("embed", None), config, rngs=rngs, bias_name="norm")
        self.norm = LayerNorm(config, rngs=rngs)
        if config.tie_mlm_decoder:
            self.decoder = None
            self.decoder_bias = sharding.param(nnx.initializers.zeros, rngs.params(),
                                               (config.padded_vocab_size,), ("vocab",))
        else:
            self.decoder = Dense(hidden, config.padded_vocab_size, ("embed", "vocab"), config, rngs=rngs)

    def __call__(self, hidden: jax.Array, word_embedding: Embedding) -> jax.Array:
        """Map gathered hidden states [B, M, H] to float32 logits [B, M, V]."""
        x = self.norm(gelu(self.transform(hidden)))

        if self.decoder is None:
            logits = word_embedding.attend(x) + self.decoder_bias[...].astype(x.dtype)
        else:
            logits = self.decoder(x)
        logits = sharding.constrain(logits.astype(jnp.float32), "batch", "length", "vocab")

        real_rows = jnp.arange(self.config.padded_vocab_size) < self.config.vocab_size
        return jnp.where(real_rows, logits, MASKED_LOGIT)


class PretrainModel(nnx.Module):
    """Encoder + pooler + MBM head + SBP head for ET-BERT pre-training."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = Pooler(config, rngs=rngs)
        self.mbm = MbmHead(config, rngs=rngs)
        self.sbp = Dense(config.hidden_size, 2, ("embed", "labels"), config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, masked_positions: jax.Array, *,
                 deterministic: bool, dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Return (mbm_logits [B, M, V], sbp_logits [B, 2]), both float32.

        The vocabulary projection runs only on the M gathered positions of `masked_positions`
        [B, M]; slots that are padding (weight 0 in the batch) still produce logits.
        """
        hidden = self.encoder(input_ids, segment_ids, deterministic=deterministic, dropout_key=dropout_key)

        gathered = jnp.take_along_axis(hidden, masked_positions[:, :, None].astype(jnp.int32), axis=1)
        gathered = sharding.constrain(gathered, "batch", "length", "act_embed")
        mbm_logits = self.mbm(gathered, self.encoder.embeddings.word)

        sbp_logits = self.sbp(self.pooler(hidden)).astype(jnp.float32)
        return mbm_logits, sbp_logits


class Classifier(nnx.Module):
    """Encoder + pooler + dropout + output layer: (input_ids, segment_ids) -> logits [B, num_labels]."""

    def __init__(self, config: ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
        if num_labels < 2:
            raise ValueError(f"Classifier needs num_labels >= 2, got {num_labels}")
        self.config = config
        self.encoder = BertEncoder(config, rngs=rngs)
        self.pooler = Pooler(config, rngs=rngs)
        self.output = Dense(config.hidden_size, num_labels, ("embed", "labels"), config, rngs=rngs)

    def encode(self, input_ids: jax.Array, segment_ids: jax.Array, *, deterministic: bool = True,
               dropout_key: jax.Array | None = None) -> jax.Array:
        """Return the pooled [CLS] features [B, H] (for frozen-encoder probes and embeddings)."""
        hidden = self.encoder(input_ids, segment_ids, deterministic=deterministic, dropout_key=dropout_key)
        return self.pooler(hidden)

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array, *, deterministic: bool,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Return float32 class logits [B, num_labels]."""
        encoder_key, head_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        pooled = self.encode(input_ids, segment_ids, deterministic=deterministic, dropout_key=encoder_key)

        if not deterministic and head_key is None:
            head_key = self.encoder.dropout_rngs.dropout()
        if deterministic:
            head_key = None
        pooled = dropout(pooled, self.config.dropout, head_key)
        return self.output(pooled).astype(jnp.float32)
