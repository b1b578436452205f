"""specdec_jax: exact speculative decoding with MTP drafters in JAX/Flax."""
