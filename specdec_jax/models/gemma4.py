"""The Gemma 4 text decoder in flax.linen, pure-functional, explicit KV cache.

    model = Gemma4(config)            # or model.build(config)
    logits, hidden, cache = model.apply({'params': params}, tokens, cache)

Same contract as the Gemma 3 `model.Transformer`: row b's T tokens sit at
positions `cache.lengths[b] + (0..T-1)` and are written at those cache slots,
so rollback is a length reset. What Gemma 4 adds, each feature as transformers
5.24 (`models/gemma4/modeling_gemma4.py`) defines it:

- Layer types: sliding (local) and full (global) layers have their own head
  dim and kv-head count (`global_head_dim`, `num_global_key_value_heads`),
  and their own RoPE: global layers rotate only the first
  `partial_rotary_factor` of their frequency pairs ("proportional" RoPE, the
  rest pass through unrotated).
- Queries and keys are RMS-normed (q_norm / k_norm), values are RMS-normed
  without a scale (v-norm); attention is unscaled (the norms set the scale).
- `attention_k_eq_v`: global layers have no v projection; values are the
  key projection, v-normed and unrotated.
- KV sharing: the last `num_kv_shared_layers` layers project only queries and
  read the keys / values of the last non-shared layer of their own type. They
  keep no cache: `KVCache` holds the first `first_shared` layers only, so its
  layer index is the model's. With `use_double_wide_mlp` their MLP is 2F wide.
- Per-layer embeddings (PLE): a second token table [V', L * P] plus a
  projection of the scaled embedding give each layer a P-vector that gates a
  small residual branch after the feed-forward block.
- MoE (`enable_moe_block`): a routed expert block beside the dense MLP, both
  reading the attention block's output (models/moe.py).
- `layer_scalar` multiplies the whole residual stream after each layer;
  RMSNorm scales multiply as stored (no `1 + w`); final logits are softcapped.

Weights: bf16 or float32 matrices through `model.linear` / `lm_head` (bf16 x
bf16 accumulated in float32); norms, RoPE, softmax in float32.

Dimension letters: B batch, T query length, S cache slots, D embed, F MLP
width, N query heads, K kv heads, H head dim, L layers, P PLE width, V vocab.
"""
import dataclasses
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from specdec_jax.config import ConfigMixin
from specdec_jax.model import (RMSNorm, attend, linear, lm_head, opaque_zero, rms_norm, settled,
                               take_rows, visible_slots)
from specdec_jax.models.moe import MoE


@dataclasses.dataclass(frozen=True)
class Gemma4Config(ConfigMixin):
  """Static Gemma 4 text config (hashable: it keys jit caches)."""
  vocab_size: int
  num_layers: int
  embed_dim: int                     # D
  hidden_dim: int                    # F, dense GeGLU width
  num_heads: int                     # N, on every layer
  is_global: Tuple[bool, ...]        # per layer: full attention (else sliding)
  head_dim: int                      # H of sliding layers
  num_kv_heads: int                  # K of sliding layers
  global_head_dim: int               # H of full-attention layers
  num_global_kv_heads: int           # K of full-attention layers
  sliding_window: int = 512
  rope_base_local: float = 10_000.0
  rope_base_global: float = 1_000_000.0
  rope_fraction_local: float = 1.0   # share of frequency pairs that rotate
  rope_fraction_global: float = 0.25
  rope_scale_local: float = 1.0      # positions divided by it (linear scaling)
  rope_scale_global: float = 1.0
  attention_k_eq_v: bool = False     # global layers: values = key projection
  num_kv_shared_layers: int = 0
  double_wide_mlp: bool = False      # KV-shared layers' MLP is 2F wide
  ple_dim: int = 0                   # P; 0 = no per-layer embeddings
  ple_vocab_size: int = 0            # V' of the per-layer table
  num_experts: int = 0               # 0 = no MoE block
  top_k_experts: int = 0
  moe_hidden_dim: int = 0            # each expert's GeGLU width
  final_logit_softcap: Optional[float] = None
  norm_eps: float = 1e-6
  max_context: int = 131_072
  dtype: str = 'float32'             # activations
  param_dtype: str = 'float32'       # weights
  bos_id: int = 2
  eos_id: int = 1
  pad_id: int = 0
  eos_ids: Tuple[int, ...] = ()      # every id that ends a generation; () = (eos_id,)

  def __post_init__(self):
    self._freeze_eos_ids()
    if len(self.is_global) != self.num_layers:
      raise ValueError(f'{len(self.is_global)} layer types for {self.num_layers} layers')
    if not 0 <= self.num_kv_shared_layers < self.num_layers:
      raise ValueError(f'num_kv_shared_layers={self.num_kv_shared_layers} must be below '
                       f'the {self.num_layers} layers')
    for kind in set(self.is_global[self.first_shared:]):
      if kind not in self.is_global[:self.first_shared]:
        raise ValueError(f'KV-shared {"full" if kind else "sliding"} layers have no '
                         'non-shared layer of their type to read from')
    for K in (self.num_kv_heads, self.num_global_kv_heads):
      if self.num_heads % K:
        raise ValueError(f'num_heads={self.num_heads} is not a multiple of {K} kv heads')

  @property
  def first_shared(self) -> int:
    """Layers from here on read another layer's keys / values."""
    return self.num_layers - self.num_kv_shared_layers

  def kv_source(self, layer: int) -> int:
    """The layer whose keys / values `layer` attends over (itself unless shared)."""
    if layer < self.first_shared:
      return layer
    own = [i for i in range(self.first_shared) if self.is_global[i] == self.is_global[layer]]
    return own[-1]

  def heads(self, layer: int) -> Tuple[int, int]:
    """(kv heads K, head dim H) of a layer."""
    if self.is_global[layer]:
      return self.num_global_kv_heads, self.global_head_dim
    return self.num_kv_heads, self.head_dim

  def k_eq_v(self, layer: int) -> bool:
    return self.attention_k_eq_v and self.is_global[layer]

  def mlp_dim(self, layer: int) -> int:
    wide = self.double_wide_mlp and layer >= self.first_shared
    return self.hidden_dim * (2 if wide else 1)

  @property
  def cache_heads(self) -> Tuple[Tuple[int, int], ...]:
    """(K, H) of each layer that keeps a cache: layers 0 .. first_shared - 1
    (`model.KVCache.init` sizes the cache from it)."""
    return tuple(self.heads(i) for i in range(self.first_shared))



def rope_frequencies(head_dim: int, base: float, fraction: float, scale: float):
  """Inverse frequencies [H/2] of (proportional) RoPE: the first
  int(fraction * H / 2) pairs rotate with the usual base^(-2i/H) spacing over
  the *whole* head dim, the remaining pairs get frequency 0 (pass through)."""
  pairs = int(fraction * head_dim // 2)
  inv = 1.0 / (base ** (jnp.arange(0, 2 * pairs, 2, dtype=jnp.float32) / head_dim))
  inv = jnp.concatenate([inv, jnp.zeros((head_dim // 2 - pairs,), jnp.float32)])
  return inv / scale


def apply_rope(x, positions, inv_freq):
  """Rotate-half RoPE with given frequencies. x [B, T, *, H]; positions [B, T]."""
  angle = positions.astype(jnp.float32)[..., None] * inv_freq                # [B, T, H/2]
  angle = angle[:, :, None, :]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def write_cache(cache, update, positions):
  """cache [B, K, S, H] with update [B, K, T, H] written at slots positions [B, T].

  In-bounds, unique, sorted indices let XLA update the loop-carried cache in
  place (as model.Attention does)."""
  B, K = update.shape[:2]
  rows = jnp.arange(B)[:, None, None]
  heads = jnp.arange(K)[None, :, None]
  return cache.at[rows, heads, positions[:, None, :]].set(
      update.astype(cache.dtype), mode='promise_in_bounds', unique_indices=True,
      indices_are_sorted=True)


def _dense_init(fan_in):
  return nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


class Attention(nn.Module):
  config: Gemma4Config
  layer: int
  # The assistant drafter's layers (models/gemma4_assistant.py): queries at
  # the pending token's position q read only the target's keys at positions
  # < q, all of them on full layers and q-1-W .. q-1 on sliding ones
  # (transformers' bidirectional window |q' - k'| <= W over the kv flipped).
  cross: bool = False

  @nn.compact
  def __call__(self, x, positions, cache_kv, shared_kv, cached: bool):
    """x [B, T, D] -> ([B, T, D], (keys, values) as later layers read them).

    Own-kv layers: `cache_kv` is this layer's cache (None when `cached` is
    False); the returned pair is the updated cache [B, K, S, H] or, without
    a cache, this call's keys / values [B, K, T, H]. KV-shared layers get
    their source layer's pair as `shared_kv` and project only queries.
    """
    cfg, i = self.config, self.layer
    N, D = cfg.num_heads, cfg.embed_dim
    K, H = cfg.heads(i)
    B, T, _ = x.shape
    pd = cfg.jnp_param_dtype
    own_kv = shared_kv is None
    # One fused projection: q, then k and v where this layer makes them.
    rows = N * H + (((1 if cfg.k_eq_v(i) else 2) * K * H) if own_kv else 0)
    w_qkv = self.param('qkv', _dense_init(D), (rows, D), pd)
    w_out = self.param('out', _dense_init(N * H), (D, N * H), pd)
    q_scale = self.param('q_norm', nn.initializers.ones, (H,), jnp.float32)
    if cfg.is_global[i]:
      inv_freq = rope_frequencies(H, cfg.rope_base_global, cfg.rope_fraction_global,
                                  cfg.rope_scale_global)
    else:
      inv_freq = rope_frequencies(H, cfg.rope_base_local, cfg.rope_fraction_local,
                                  cfg.rope_scale_local)

    qkv = linear(x, w_qkv)                                              # [B, T, rows]
    q = rms_norm(qkv[..., :N * H].reshape(B, T, N, H), q_scale, cfg.norm_eps)
    q = apply_rope(q, positions, inv_freq)
    if own_kv:
      k_scale = self.param('k_norm', nn.initializers.ones, (H,), jnp.float32)
      k_raw = qkv[..., N * H:(N + K) * H].reshape(B, T, K, H)
      v_raw = k_raw if cfg.k_eq_v(i) else qkv[..., (N + K) * H:].reshape(B, T, K, H)
      k = apply_rope(rms_norm(k_raw, k_scale, cfg.norm_eps), positions, inv_freq)
      v = rms_norm(v_raw, jnp.float32(1.0), cfg.norm_eps)               # v-norm: no scale
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)           # [B, K, T, H]
      if cached:
        k, v = write_cache(cache_kv[0], k, positions), write_cache(cache_kv[1], v, positions)
      kv = (k, v)
    else:
      kv = shared_kv
    window = None if cfg.is_global[i] else cfg.sliding_window
    if self.cross and window is not None:
      window += 2          # strictly below q and at most W + 1 back: k > q - (W + 2)
    if cached:
      keys, values, key_pos = visible_slots(kv[0], kv[1], positions, window)
    else:
      keys, values, key_pos = kv[0], kv[1], positions
    out = attend(q, keys, values, positions, key_pos, window, strict=self.cross)   # [B, T, N * H]
    return linear(out, w_out), kv


class MLP(nn.Module):
  config: Gemma4Config
  width: int

  @nn.compact
  def __call__(self, x):
    D, F, pd = self.config.embed_dim, self.width, self.config.jnp_param_dtype
    w_gate_up = self.param('gate_up', _dense_init(D), (2 * F, D), pd)   # [gate; up]
    w_down = self.param('down', _dense_init(F), (D, F), pd)
    gate, up = jnp.split(linear(x, w_gate_up), 2, axis=-1)
    return linear(jax.nn.gelu(gate, approximate=True) * up, w_down)


class Block(nn.Module):
  config: Gemma4Config
  layer: int
  cross: bool = False    # see Attention.cross

  @nn.compact
  def __call__(self, x, positions, ple, cache_kv, shared_kv, cached: bool):
    """x [B, T, D]; ple [B, T, P] (this layer's per-layer input) or None."""
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.norm_eps, name=name)
    h, kv = Attention(cfg, self.layer, self.cross, name='attn')(
        norm('pre_attn_norm')(x), positions, cache_kv, shared_kv, cached)
    # Every add of the residual stream reads `settled` operands, so a row
    # rounds alike in a plain step and a verify pass (model.settled).
    zero = opaque_zero(positions)
    x = settled(x, zero) + settled(norm('post_attn_norm')(h), zero)
    h = MLP(cfg, cfg.mlp_dim(self.layer), name='mlp')(norm('pre_ffw_norm')(x))
    if cfg.num_experts:
      # The experts read the same residual as the dense MLP (router included);
      # each branch has its own post-norm before they add.
      moe = MoE(cfg.embed_dim, cfg.num_experts, cfg.top_k_experts, cfg.moe_hidden_dim,
                cfg.norm_eps, cfg.jnp_param_dtype, name='moe')
      h = settled(norm('post_ffw_norm_1')(h), zero) + settled(norm('post_ffw_norm_2')(
          moe(x, norm('pre_ffw_norm_2')(x))), zero)
    x = x + settled(norm('post_ffw_norm')(h), zero)
    if cfg.ple_dim:
      pd = cfg.jnp_param_dtype
      w_gate = self.param('ple_gate', _dense_init(cfg.embed_dim), (cfg.ple_dim, cfg.embed_dim), pd)
      w_proj = self.param('ple_proj', _dense_init(cfg.ple_dim), (cfg.embed_dim, cfg.ple_dim), pd)
      g = jax.nn.gelu(linear(x, w_gate), approximate=True) * ple              # [B, T, P]
      x = x + settled(norm('post_ple_norm')(linear(g, w_proj)), zero)
    scalar = self.param('layer_scalar', nn.initializers.ones, (1,), jnp.float32)
    return x * scalar.astype(x.dtype), kv


class Gemma4(nn.Module):
  """Gemma 4 decoder. `__call__` returns (logits or None, hidden, cache)."""
  config: Gemma4Config

  def setup(self):
    cfg = self.config
    pd = cfg.jnp_param_dtype
    self.embedding = self.param(
        'embedding', _dense_init(cfg.embed_dim), (cfg.vocab_size, cfg.embed_dim), pd)  # [V, D]
    if cfg.ple_dim:
      LP = cfg.num_layers * cfg.ple_dim
      self.embedding_per_layer = self.param(
          'embedding_per_layer', _dense_init(cfg.ple_dim), (cfg.ple_vocab_size, LP), pd)
      self.per_layer_projection = self.param(
          'per_layer_projection', _dense_init(cfg.embed_dim), (LP, cfg.embed_dim), pd)
      self.per_layer_projection_norm = RMSNorm(cfg.norm_eps)
    self.blocks = [Block(cfg, i, name=f'layer_{i}') for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps)

  def embed(self, tokens):
    """Scaled token embedding, [B, T] -> [B, T, D]."""
    x = take_rows(self.embedding, tokens).astype(self.config.jnp_dtype)
    return x * jnp.asarray(math.sqrt(self.config.embed_dim), x.dtype)

  def per_layer_inputs(self, tokens, x):
    """PLE: each layer's P-vector [B, T, L, P] from the token's own row of the
    per-layer table (scaled by sqrt(P)) and a projection of the scaled
    embedding x (scaled by 1/sqrt(D), RMS-normed), averaged by 1/sqrt(2)."""
    cfg = self.config
    B, T = tokens.shape
    L, P = cfg.num_layers, cfg.ple_dim
    own = take_rows(self.embedding_per_layer, tokens).astype(x.dtype)
    own = own.reshape(B, T, L, P) * jnp.asarray(math.sqrt(P), x.dtype)
    proj = linear(x, self.per_layer_projection).reshape(B, T, L, P)
    proj = self.per_layer_projection_norm(proj * jnp.asarray(cfg.embed_dim ** -0.5, x.dtype))
    return (proj + own) * jnp.asarray(2 ** -0.5, x.dtype)

  def logits(self, hidden):
    """Tied LM head with the final softcap: [..., D] -> [..., V] float32."""
    logits = lm_head(hidden, self.embedding)
    cap = self.config.final_logit_softcap
    return logits if cap is None else jnp.tanh(logits / cap) * cap

  def __call__(self, tokens, cache=None, compute_logits: bool = True):
    """tokens [B, T] -> (logits [B, T, V] | None, hidden [B, T, D], cache).

    With a cache, row b's tokens take positions cache.lengths[b] + (0..T-1)
    and the returned cache has lengths + T; without one, positions 0..T-1.
    `hidden` is the final-normed last-layer state (the LM head's input).
    """
    cfg = self.config
    B, T = tokens.shape
    cached = cache is not None
    offset = cache.lengths if cached else jnp.zeros((B,), jnp.int32)
    positions = offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]   # [B, T]
    x = self.embed(tokens)
    ple = self.per_layer_inputs(tokens, x) if cfg.ple_dim else None      # [B, T, L, P]
    kvs = []          # per layer with its own keys / values: what readers see
    for i, block in enumerate(self.blocks):
      own = i < cfg.first_shared
      cache_kv = (cache.k[i], cache.v[i]) if cached and own else None
      shared_kv = None if own else kvs[cfg.kv_source(i)]
      x, kv = block(x, positions, None if ple is None else ple[:, :, i],
                    cache_kv, shared_kv, cached)
      if own:
        kvs.append(kv)
    hidden = self.final_norm(x)
    if cached:
      cache = cache.replace(k=tuple(k for k, _ in kvs), v=tuple(v for _, v in kvs),
                            lengths=cache.lengths + T).on_mesh()
    logits = self.logits(hidden) if compute_logits else None
    return logits, hidden, cache


def init_params(config: Gemma4Config, rng) -> dict:
  """Random parameters (tests), drawn in float32 and cast to `param_dtype`."""
  from specdec_jax.model import cast_params
  model = Gemma4(config.replace(param_dtype='float32'))
  params = jax.jit(model.init, static_argnames='compute_logits')(
      rng, jnp.zeros((1, 1), jnp.int32), compute_logits=True)['params']
  return cast_params(params, config.jnp_param_dtype)


def param_shapes(config: Gemma4Config) -> dict:
  """The params tree as ShapeDtypeStructs, without allocating anything."""
  model = Gemma4(config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
                        )['params']
