"""etbert-jax: ET-BERT for encrypted network traffic in JAX/Flax."""

from etbert_jax.xla_flags import apply_default_xla_flags

__version__ = "0.1.0"

# Before any JAX computation: XLA reads XLA_FLAGS once, when its backend starts.
apply_default_xla_flags()
