"""etbert-jax: ET-BERT for encrypted network traffic in JAX/Flax."""

__version__ = "0.1.0"
