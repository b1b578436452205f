"""Static model configuration: one frozen, hashable dataclass for every size.

The same `ModelConfig` describes Gemma 3 270M (loaded from the GGUF), other
Gemma 3 sizes, and the tiny random models the tests use. It is hashable so it
can sit inside the static objects that `jax.jit` keys its cache on. Gemma 4's
config (models/gemma4.py) shares `ConfigMixin` with it.
"""
import dataclasses
from typing import Tuple

import jax.numpy as jnp


class ConfigMixin:
  """What every model config has: dtype names (`dtype`, `param_dtype`) as
  jnp dtypes, `replace`, and the ids that end a generation (`eos_id`, or
  `eos_ids` when a checkpoint lists several, e.g. <eos> and <end_of_turn>)."""

  def _freeze_eos_ids(self):
    # Lists (JSON, HF configs) become a tuple: the config stays hashable.
    object.__setattr__(self, 'eos_ids', tuple(int(i) for i in self.eos_ids))

  @property
  def stop_ids(self) -> Tuple[int, ...]:
    return self.eos_ids or (self.eos_id,)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


def is_eos(tokens, config):
  """tokens (any shape) == any of the config's stop ids, elementwise."""
  ids = config.stop_ids
  out = tokens == ids[0]
  for i in ids[1:]:
    out = out | (tokens == i)
  return out


@dataclasses.dataclass(frozen=True)
class ModelConfig(ConfigMixin):
  vocab_size: int
  num_layers: int
  embed_dim: int            # D
  hidden_dim: int           # F, GeGLU width
  num_heads: int            # N, query heads
  num_kv_heads: int         # K, key/value heads (MQA when 1)
  head_dim: int             # H
  query_pre_attn_scalar: float  # queries are scaled by its -1/2 power
  sliding_window: int = 512
  # Layer i is global (full attention) iff (i + 1) % sliding_window_pattern == 0.
  sliding_window_pattern: int = 6
  rope_base_global: float = 1_000_000.0
  rope_base_local: float = 10_000.0
  rope_scale_global: float = 1.0   # linear position scaling (Gemma 3 4B+ use 8)
  norm_eps: float = 1e-6
  max_context: int = 32768
  dtype: str = 'float32'         # activations
  param_dtype: str = 'float32'   # weights
  bos_id: int = 2
  eos_id: int = 1
  pad_id: int = 0
  eos_ids: Tuple[int, ...] = ()  # every id that ends a generation; () = (eos_id,)

  def __post_init__(self):
    self._freeze_eos_ids()
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')

  @property
  def is_global(self) -> Tuple[bool, ...]:
    p = self.sliding_window_pattern
    return tuple((i + 1) % p == 0 for i in range(self.num_layers))



def gemma3_270m(**overrides) -> ModelConfig:
  """Gemma 3 270M; the GGUF fills the same numbers (checked on load)."""
  cfg = ModelConfig(vocab_size=262_144, num_layers=18, embed_dim=640,
                    hidden_dim=2048, num_heads=4, num_kv_heads=1, head_dim=256,
                    query_pre_attn_scalar=256.0)
  return cfg.replace(**overrides)


def tiny(vocab_size=64, num_layers=3, **overrides) -> ModelConfig:
  """A tiny random Gemma-architecture model for tests (seconds on CPU).

  Three layers with pattern 3 and window 4 exercise both local and global
  attention on short sequences.
  """
  cfg = ModelConfig(vocab_size=vocab_size, num_layers=num_layers, embed_dim=32,
                    hidden_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                    query_pre_attn_scalar=16.0, sliding_window=4,
                    sliding_window_pattern=3, max_context=512)
  return cfg.replace(**overrides)
