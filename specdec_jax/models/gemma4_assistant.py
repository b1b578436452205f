"""Gemma 4's "assistant" MTP drafter network (transformers' gemma4_assistant).

One draft step, as Gemma4AssistantForCausalLM computes it:

    x  = pre_projection(concat[target_embed(token) * sqrt(D_t), h])   2 D_t -> d
    x  = Gemma 4 decoder layers whose attention projects queries only and
         reads the target's keys / values of the last non-shared target
         layer of its own type (no cache of its own, nothing to roll back)
    y  = final_norm(x)
    h' = post_projection(y)                                          d -> D_t
    logits = y @ E_a^T  (its own tied embedding E_a [V, d]), or the centroid
             head: the top `centroid_top_k` of `num_centroids` centroid scores
             pick clusters of V / num_centroids token ids (`token_ordering`),
             and only those tokens get logits (-inf elsewhere: q = 0 there).

Every step of a round queries at the pending token's position q (the one the
target has not cached yet) and sees the target's keys at positions < q; `h`
starts as the target's final-normed hidden state at q - 1 (the state that
predicted the pending token) and is the assistant's own h' afterwards, and
`token` is the pending token, then each drafted one. This is transformers'
first round after a prefill; its later rounds hand the assistant a KV that
may still hold a rejected draft at q (tests/test_gemma4_assistant.py),
which is not taken here: the reference is the assistant called on the exact
prefix. No final softcap (the assistant's forward has none).
"""
import dataclasses
import math
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from specdec_jax.model import RMSNorm, linear, lm_head, take_rows
from specdec_jax.models.gemma4 import Block, Gemma4Config


@dataclasses.dataclass(frozen=True)
class AssistantConfig:
  body: Gemma4Config        # the assistant's own layers (d = body.embed_dim)
  target: Gemma4Config      # the target it drafts for
  num_centroids: int = 0    # 0 = the full head
  centroid_top_k: int = 0

  def __post_init__(self):
    for i, g in enumerate(self.body.is_global):
      if self.body.heads(i) != self.target.heads(self.target_layers[i]):
        raise ValueError(f'assistant layer {i} has (kv heads, head dim) '
                         f'{self.body.heads(i)} but the target layer it reads has '
                         f'{self.target.heads(self.target_layers[i])}')
    if self.num_centroids and self.body.vocab_size % self.num_centroids:
      raise ValueError(f'num_centroids={self.num_centroids} does not divide the '
                       f'vocabulary ({self.body.vocab_size})')

  @property
  def target_layers(self) -> Tuple[int, ...]:
    """The target layer (= its KVCache index) each assistant layer reads: the
    last non-shared target layer of the same attention type."""
    t = self.target
    last = {}
    for j in range(t.first_shared):
      last[t.is_global[j]] = j
    if set(self.body.is_global) - set(last):
      raise ValueError('the assistant has a layer type the target does not cache')
    return tuple(last[g] for g in self.body.is_global)

  def replace(self, **kw) -> 'AssistantConfig':
    return dataclasses.replace(self, **kw)


def _dense_init(fan_in):
  return nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


class Gemma4Assistant(nn.Module):
  config: AssistantConfig

  def setup(self):
    cfg = self.config
    b, D_t = cfg.body, cfg.target.embed_dim
    pd = b.jnp_param_dtype
    self.embedding = self.param('embedding', _dense_init(b.embed_dim),
                                (b.vocab_size, b.embed_dim), pd)            # [V, d]
    self.pre_projection = self.param('pre_projection', _dense_init(2 * D_t),
                                     (b.embed_dim, 2 * D_t), pd)
    self.post_projection = self.param('post_projection', _dense_init(b.embed_dim),
                                      (D_t, b.embed_dim), pd)
    self.blocks = [Block(b, i, cross=True, name=f'layer_{i}') for i in range(b.num_layers)]
    self.final_norm = RMSNorm(b.norm_eps)
    if cfg.num_centroids:
      self.centroids = self.param('centroids', _dense_init(b.embed_dim),
                                  (cfg.num_centroids, b.embed_dim), pd)     # [C, d]
      # A permutation of the vocabulary: cluster c owns the ids in row c of
      # token_ordering.reshape(C, V / C).
      self.token_ordering = self.param(
          'token_ordering', lambda _, shape: jnp.arange(shape[0], dtype=jnp.int32),
          (b.vocab_size,))

  def logits(self, y):
    """y [B, T, d] (final-normed) -> logits [B, T, V] float32."""
    cfg = self.config
    if not cfg.num_centroids:
      return lm_head(y, self.embedding)
    B, T, d = y.shape
    V, C = cfg.body.vocab_size, cfg.num_centroids
    scores = linear(y, self.centroids).astype(jnp.float32)                 # [B, T, C]
    _, top = jax.lax.top_k(scores, cfg.centroid_top_k)                     # [B, T, c]
    clusters = self.token_ordering.astype(jnp.int32).reshape(C, V // C)
    ids = clusters[top].reshape(B, T, -1)                                  # [B, T, c * V/C]
    rows = take_rows(self.embedding, ids)                                  # [B, T, M, d]
    sel = jnp.einsum('btd,btmd->btm', y.astype(rows.dtype), rows,
                     preferred_element_type=jnp.float32)
    full = jnp.full((B, T, V), -jnp.inf, jnp.float32)
    bi, ti = jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None]
    return full.at[bi, ti, ids].set(sel)

  def __call__(self, token_embed, h, q_pos, kvs):
    """One draft step.

    token_embed [B, 1, D_t]: the target's scaled embedding of the token;
    h [B, 1, D_t]; q_pos [B, 1] the pending token's position; kvs: per
    assistant layer the target's (keys, values) [B, K, S, H] (its cache).
    Returns (h' [B, 1, D_t], logits [B, 1, V] float32).
    """
    x = linear(jnp.concatenate([token_embed, h.astype(token_embed.dtype)], axis=-1),
               self.pre_projection)
    for blk, kv in zip(self.blocks, kvs):
      x, _ = blk(x, q_pos, None, None, kv, True)
    y = self.final_norm(x)
    return linear(y, self.post_projection), self.logits(y)


def init_params(config: AssistantConfig, rng) -> dict:
  """Random parameters (tests), float32 then cast to the body's param_dtype."""
  from specdec_jax.model import KVCache, cast_params
  cfg = config.replace(body=config.body.replace(param_dtype='float32'))
  cache = KVCache.init(cfg.target, 1, 2)
  kvs = tuple((cache.k[l], cache.v[l]) for l in cfg.target_layers)
  D_t = cfg.target.embed_dim
  x = jnp.zeros((1, 1, D_t))
  params = Gemma4Assistant(cfg).init(rng, x, x, jnp.ones((1, 1), jnp.int32), kvs)['params']
  return cast_params(params, config.body.jnp_param_dtype)
