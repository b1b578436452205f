"""Networks of the trained drafters: Gemma-4-style MTP and parallel heads.

Both read the target's final-normed hidden state `h` at the last accepted
position and the scaled target embedding of the token after it (the pending
token), and both predict over a *reduced vocabulary*: a fixed, frequency-ranked
subset of `draft_vocab_size` target token ids whose rows of the target's tied
embedding form the output head. On this CPU the full 262k-row head costs about
half a target step, which would eat most of the speculative gain; a 4-8k-row
head costs ~1-2% of it. Tokens outside the subset get q = 0, which keeps the
rejection sampler exact (it only needs q to be the distribution drafts were
drawn from).

  MTPNet (Gemma 4 "assistant" style):
      x = pre_projection(concat[embed(token), h])          2D -> d
      x = decoder layers whose attention projects queries only and reads the
          *target's* KV cache (the last target layer of each attention type)
      h' = post_projection(norm(x))                        d -> D
      logits = E_subset @ h'
  `h'` is the recurrent state of the next draft step; every step sits at the
  position of the pending token, so it attends to exactly the context the
  target has cached. No drafter cache, nothing to roll back.

  HeadsNet (Medusa / blockwise parallel decoding / Gloeckle et al.):
      u = pre_projection(concat[embed(token), h])          2D -> D
      h_i = norm_i(u + MLP_i(norm(u)))  for i = 1..n       (one batched einsum)
      logits_i = E_subset @ h_i        head i predicts the token i+1 after
                                        the pending one.

Dimension letters as in model.py; d is the drafter width, n the head count,
R the reduced vocabulary.
"""
import dataclasses
import math
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from specdec_jax.config import ModelConfig
from specdec_jax.model import (RMSNorm, apply_rope, attend, cast_params, linear, lm_head,
                               rms_norm, visible_slots)

KINDS = ('mtp', 'heads')


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
  """Static shape of a trained drafter; hashable (it sits in the jit key)."""
  kind: str                      # 'mtp' | 'heads'
  target: ModelConfig            # the target it drafts for (shares its embedding)
  draft_vocab_size: int = 4096   # R: rows of the reduced output head
  width: int = 512               # d: MTP layer width (heads use the target's D)
  hidden_dim: int = 1024         # GeGLU width of each MTP layer / head MLP
  num_layers: int = 1            # MTP decoder layers (Gemma 4 uses ~4)
  num_heads: int = 4             # MTP query heads, a multiple of target kv heads
  num_draft_heads: int = 4       # heads: parallel heads = the largest draft_len

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'unknown trained drafter kind {self.kind!r} (one of {KINDS})')
    if self.num_heads % self.target.num_kv_heads:
      raise ValueError(f'drafter num_heads={self.num_heads} is not a multiple of the '
                       f"target's kv heads ({self.target.num_kv_heads})")
    if not 1 <= self.draft_vocab_size <= self.target.vocab_size:
      raise ValueError(f'draft_vocab_size={self.draft_vocab_size} outside '
                       f'1..{self.target.vocab_size}')

  @property
  def kv_layers(self) -> Tuple[int, ...]:
    """Target layer whose KV cache each MTP layer reads.

    The last layer is paired with the target's last global layer, earlier
    ones with its last local layer (Gemma 4: the last layer of each type).
    """
    g = self.target.is_global
    last_global = max((i for i, x in enumerate(g) if x), default=len(g) - 1)
    last_local = max((i for i, x in enumerate(g) if not x), default=last_global)
    return tuple(last_global if i == self.num_layers - 1 else last_local
                 for i in range(self.num_layers))

  @property
  def max_draft_len(self) -> int:
    return self.num_draft_heads if self.kind == 'heads' else 1 << 30

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['target'] = dataclasses.asdict(self.target)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> 'DrafterConfig':
    d = dict(d)
    d['target'] = ModelConfig(**d['target'])
    return cls(**d)


def _dense(fan_in):
  return nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


class DraftAttention(nn.Module):
  """Query-only attention over one target layer's KV cache [B, K, S, H].

  Key slot s holds position s. A query at position p sees keys s < p (the
  target has cached positions 0..p-1 when p is the pending token's position),
  and s > p - window when the source layer is local, as the target's would.
  """
  cfg: DrafterConfig
  source_layer: int

  @nn.compact
  def __call__(self, x, q_pos, kv):
    t = self.cfg.target
    N, K, H = self.cfg.num_heads, t.num_kv_heads, t.head_dim
    B, T, d = x.shape
    is_global = t.is_global[self.source_layer]
    w_q = self.param('q', _dense(d), (N * H, d), t.jnp_param_dtype)
    w_out = self.param('out', _dense(N * H), (d, N * H), t.jnp_param_dtype)
    q_scale = self.param('q_norm', nn.initializers.ones, (H,), jnp.float32)
    q = rms_norm(linear(x, w_q).reshape(B, T, N, H), q_scale, t.norm_eps)
    base, rscale = ((t.rope_base_global, t.rope_scale_global) if is_global
                    else (t.rope_base_local, 1.0))
    q = apply_rope(q, q_pos, base, rscale)
    keys, values = kv                                             # [B, K, S, H]
    window = None if is_global else t.sliding_window
    keys, values, k_pos = visible_slots(keys, values, q_pos, window)
    q = q * jnp.asarray(t.query_pre_attn_scalar ** -0.5, q.dtype)
    out = attend(q, keys, values, q_pos, k_pos, window, strict=True)
    return linear(out, w_out)


class GeGLU(nn.Module):
  hidden_dim: int
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    D, F = x.shape[-1], self.hidden_dim
    w_gate_up = self.param('gate_up', _dense(D), (2 * F, D), self.param_dtype)
    w_down = self.param('down', _dense(F), (D, F), self.param_dtype)
    gate, up = jnp.split(linear(x, w_gate_up), 2, axis=-1)
    return linear(jax.nn.gelu(gate, approximate=True) * up, w_down)


class MTPNet(nn.Module):
  cfg: DrafterConfig

  @nn.compact
  def __call__(self, emb, h, q_pos, kvs, embed_sub):
    """emb, h [B, T, D]; q_pos [B, T]; kvs: one (k, v) per layer;
    embed_sub [R, D] -> (h' [B, T, D], logits [B, T, R] float32)."""
    cfg, t = self.cfg, self.cfg.target
    pd, eps = t.jnp_param_dtype, t.norm_eps
    D, d = t.embed_dim, cfg.width
    w_pre = self.param('pre_projection', _dense(2 * D), (d, 2 * D), pd)
    x = linear(jnp.concatenate([emb, h], axis=-1), w_pre)
    for i, src in enumerate(cfg.kv_layers):
      norm = lambda name: RMSNorm(eps, name=f'layer_{i}_{name}')
      a = DraftAttention(cfg, src, name=f'layer_{i}_attn')(norm('pre_attn_norm')(x), q_pos, kvs[i])
      x = x + norm('post_attn_norm')(a)
      m = GeGLU(cfg.hidden_dim, pd, name=f'layer_{i}_mlp')(norm('pre_ffw_norm')(x))
      x = x + norm('post_ffw_norm')(m)
    x = RMSNorm(eps, name='final_norm')(x)
    w_post = self.param('post_projection', _dense(d), (D, d), pd)
    h_new = linear(x, w_post)
    return h_new, lm_head(h_new, embed_sub)


class HeadsNet(nn.Module):
  cfg: DrafterConfig

  @nn.compact
  def __call__(self, emb, h, embed_sub):
    """emb, h [B, T, D] -> logits [B, T, n, R] float32 (head i: i+1 tokens ahead)."""
    cfg, t = self.cfg, self.cfg.target
    pd, eps = t.jnp_param_dtype, t.norm_eps
    D, F, n = t.embed_dim, cfg.hidden_dim, cfg.num_draft_heads
    w_pre = self.param('pre_projection', _dense(2 * D), (D, 2 * D), pd)
    u = linear(jnp.concatenate([emb, h], axis=-1), w_pre)                 # [B, T, D]
    in_scale = self.param('in_norm', nn.initializers.ones, (n, D), jnp.float32)
    out_scale = self.param('out_norm', nn.initializers.ones, (n, D), jnp.float32)
    w_gate_up = self.param('gate_up', _dense(D), (n, 2 * F, D), pd)
    w_down = self.param('down', _dense(F), (n, D, F), pd)
    ones = jnp.ones((D,), jnp.float32)
    z = (rms_norm(u[:, :, None, :], ones, eps) * in_scale).astype(u.dtype)  # [B, T, n, D]
    gu = _per_head(z, w_gate_up)
    gate, up = jnp.split(gu, 2, axis=-1)
    m = _per_head(jax.nn.gelu(gate, approximate=True) * up, w_down)
    hs = (rms_norm(u[:, :, None, :] + m, ones, eps) * out_scale).astype(u.dtype)
    return lm_head(hs, embed_sub)                                        # [B, T, n, R]


def _per_head(x, w):
  """x [B, T, n, I] times per-head weights w [n, O, I] -> [B, T, n, O]; bf16
  weights multiply in bf16 and accumulate in float32, as model.matmul does."""
  if w.dtype == jnp.float32:
    return jnp.einsum('nOI,BTnI->BTnO', w.astype(x.dtype), x)
  out = jnp.einsum('nOI,BTnI->BTnO', w, x.astype(w.dtype), preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


def make_net(cfg: DrafterConfig) -> nn.Module:
  return MTPNet(cfg) if cfg.kind == 'mtp' else HeadsNet(cfg)


def init_net_params(cfg: DrafterConfig, rng) -> dict:
  """Random network parameters (the reduced vocabulary is chosen separately),
  drawn in float32 and cast to the target's `param_dtype`, as model.init_params."""
  pd = cfg.target.jnp_param_dtype
  cfg = dataclasses.replace(cfg, target=cfg.target.replace(param_dtype='float32'))
  return cast_params(_init_net_params(cfg, rng), pd)


def _init_net_params(cfg: DrafterConfig, rng) -> dict:
  t = cfg.target
  B, T, D = 1, 2, t.embed_dim
  emb = jnp.zeros((B, T, D), t.jnp_dtype)
  sub = jnp.zeros((cfg.draft_vocab_size, D), t.jnp_dtype)
  if cfg.kind == 'heads':
    return jax.jit(HeadsNet(cfg).init)(rng, emb, emb, sub)['params']
  kv = jnp.zeros((B, t.num_kv_heads, T, t.head_dim), t.jnp_dtype)
  q_pos = jnp.zeros((B, T), jnp.int32)
  kvs = tuple((kv, kv) for _ in cfg.kv_layers)
  return jax.jit(MTPNet(cfg).init)(rng, emb, emb, q_pos, kvs, sub)['params']


def init_drafter_params(cfg: DrafterConfig, rng, vocab) -> dict:
  """{'net': random network params, 'vocab': the reduced vocabulary [R] int32}.

  `vocab` lists R distinct target token ids (training picks the most frequent).
  """
  vocab = jnp.asarray(vocab, jnp.int32)
  if vocab.shape != (cfg.draft_vocab_size,):
    raise ValueError(f'vocab has shape {vocab.shape}, expected ({cfg.draft_vocab_size},)')
  return {'net': init_net_params(cfg, rng), 'vocab': vocab}
