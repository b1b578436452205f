"""The Gemma 3 decoder in flax.linen, pure-functional, with an explicit KV cache.

    model = Transformer(config)
    logits, hidden, cache = model.apply(params, tokens, cache)

`tokens` is [B, T]: the prompt for prefill, 1 token for autoregressive decode,
k+1 tokens to verify a draft. Row b writes its T keys/values at cache slots
`cache.lengths[b] .. cache.lengths[b] + T - 1`, and the token in slot s sits at
position s (RoPE and masks use that). Rolling a row back after a rejection is
therefore just `cache.replace(lengths=...)`: stale slots are past every later
query's causal horizon and get overwritten before anything reads them.

Dimension letters: B batch, T query length, S cache slots, D embed, F GeGLU
width, N query heads, K kv heads, G = N // K heads per kv head, H head dim,
V vocabulary.
"""
import functools
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from specdec_jax.config import ModelConfig


@struct.dataclass
class KVCache:
  k: Tuple[jax.Array, ...]   # num_layers x [B, K, S, H]
  v: Tuple[jax.Array, ...]   # num_layers x [B, K, S, H]
  lengths: jax.Array         # [B] int32: slots filled; the next write slot

  @classmethod
  def init(cls, config: ModelConfig, batch: int, size: int) -> 'KVCache':
    if not isinstance(config, ModelConfig):
      # Gemma 4 (models/gemma4.py): kv heads and head dim differ by layer
      # type, and KV-shared layers (the last ones) keep no cache.
      shapes = [(batch, K, size, H) for K, H in config.cache_heads]
      zeros = lambda: tuple(jnp.zeros(s, config.jnp_dtype) for s in shapes)
      return cls(k=zeros(), v=zeros(), lengths=jnp.zeros((batch,), jnp.int32)).on_mesh()
    shape = (batch, config.num_kv_heads, size, config.head_dim)
    zeros = lambda: tuple(jnp.zeros(shape, config.jnp_dtype)
                          for _ in range(config.num_layers))
    return cls(k=zeros(), v=zeros(), lengths=jnp.zeros((batch,), jnp.int32)).on_mesh()

  @property
  def size(self) -> int:
    return self.k[0].shape[2]

  def on_mesh(self) -> 'KVCache':
    """Traced under `jax.set_mesh` of a ('data', 'model') mesh (parallel.py's
    mesh runner): every layer's keys / values constrained to `cache_spec`, so
    the decode loop carries them split over rows and KV heads (XLA's own
    propagation split some by head dim). Elsewhere the cache as it is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != {'data', 'model'}:
      return self
    put = lambda a: jax.lax.with_sharding_constraint(a, cache_spec(a.shape[1], mesh.shape))
    return self.replace(k=tuple(map(put, self.k)), v=tuple(map(put, self.v)),
                        lengths=jax.lax.with_sharding_constraint(self.lengths, P('data')))


def cache_spec(num_kv_heads: int, mesh_shape) -> P:
  """How a cache leaf [B, K, S, H] lies on a ('data', 'model') mesh: rows
  over 'data', KV heads over 'model' when they divide (each device attends
  with its own heads; slot == position and the per-row lengths unchanged)."""
  model = mesh_shape['model']
  return P('data', 'model' if model > 1 and num_kv_heads % model == 0 else None)


def row_sum(x):
  """Sum over the last axis, keepdims, in a fixed order: zero-padded to a
  power of two, then halved pairwise (x[:n/2] + x[n/2:]) until one is left.

  A reduction's rounding must not depend on how many rows are reduced
  together. XLA:CPU vectorises `jnp.sum` / `jnp.mean` differently for 1 and
  for 2+ rows, so an RMSNorm over one token (a plain decode step) and the
  same token among k + 1 (a verify pass) differed in the last bit; with bf16
  weights such a bit flips the bf16 rounding of some activation and moves
  logits by ~0.05, enough to flip near-ties, and greedy speculative decoding
  then left plain greedy decoding (tests/test_gemma_speculative.py,
  test_gemma_bf16_greedy_speculative_equals_autoregressive).
  Elementwise adds have exactly one order, so each row's sum is the same
  whatever the other rows are.
  """
  n = x.shape[-1]
  size = 1 << max(0, (n - 1).bit_length())
  if size != n:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - n)])
  while size > 1:
    size //= 2
    x = x[..., :size] + x[..., size:]
  return x


def settled(x, zero):
  """x, rounded to float32 before its consumer sees it. `zero`: an int32
  scalar that is 0 at run time but not known to be 0 when compiling.

  XLA:CPU lets LLVM contract a multiply feeding an add into one fused
  multiply-add (its target options always allow FMA fusion), and whether it
  does depends on how the surrounding ops were fused, which depends on the
  shapes. A norm's last multiply feeding the residual add was contracted in a
  verify pass over 2+ tokens but not in a plain step over one (or the other
  way round), so the residual stream differed in the last bit; with bf16
  weights that bit flips the bf16 rounding of some activation downstream and
  moves logits by ~0.05. Passing the product's bits through an xor with an
  opaque zero leaves the value alone but hides the multiply from the add
  (`lax.optimization_barrier` does not: XLA:CPU removes it before fusion).
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) ^ zero
  return jax.lax.bitcast_convert_type(bits, x.dtype)


def row_max(x):
  """Max over the last axis, keepdims, by the same pairwise halving as
  `row_sum`. The max itself is exact either way, but `exp(x - jnp.max(x))`
  fused with a reduction rounded exp differently for 4 and for 8 query rows
  (55 of 2048 probabilities differed in the last bit); with only elementwise
  ops in the fusion every row is computed alike."""
  n = x.shape[-1]
  size = 1 << max(0, (n - 1).bit_length())
  if size != n:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - n)], constant_values=-jnp.inf)
  while size > 1:
    size //= 2
    x = jnp.maximum(x[..., :size], x[..., size:])
  return x


def row_softmax(x):
  """Softmax over the last axis that rounds each row the same whatever the
  other rows (`row_max`, `row_sum`)."""
  e = jnp.exp(x - row_max(x))
  return e / row_sum(e)


def opaque_zero(positions):
  """0 as an int32 scalar the compiler cannot fold (positions are >= 0)."""
  return jnp.minimum(jnp.min(positions), 0).astype(jnp.int32)


def rms_norm(x, scale, eps):
  """x * rsqrt(mean(x^2) + eps) * scale, in float32 (the mean by `row_sum`).

  `scale` is the full multiplier (Gemma's `1 + w`, as the GGUF stores it).
  """
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(row_sum(x32 * x32) / x32.shape[-1] + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x, positions, base, scale=1.0):
  """Rotary embedding, rotate-half layout. x: [B, T, *, H]; positions: [B, T]."""
  h = x.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
  angle = positions.astype(jnp.float32)[..., None] / scale * inv_freq       # [B, T, H/2]
  angle = angle[:, :, None, :]                                              # [B, T, 1, H/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _pad_rows() -> bool:
  """XLA:CPU multiplies a single row by bf16 weights 7-10x slower than two
  rows (the LM head: ~450 vs ~25-50 ms here; DESIGN.md section 6 on Intel):
  on CPU one-row products run as two."""
  return jax.default_backend() == 'cpu'


def matmul(xr, w):
  """xr [R, I] times a weight stored [O, I] (GGUF / PyTorch layout) -> [R, O].

  Float32 weights with float32 activations: computed as w @ x^T, the weight
  the big left operand and the few rows of x the small right one (at the k+1
  rows of a verify pass XLA:CPU's x @ w packed the whole weight on every
  call: gate_up at 5 rows took 1.5-1.8 ms against the ~0.5 ms it takes to
  read its 10.5 MB).

  Reduced-precision weights (bfloat16): both operands in bf16, products
  accumulated in float32 (`preferred_element_type`), the result cast back to
  the activation dtype. The LM head on this CPU (AMD EPYC with AVX512_BF16),
  forms timed in turn: 1 / 2 / 5 / 9 rows float32 25 / 47 / 57 / 68 ms, bf16
  23 / 23 / 28 / 32 ms; both operand orders alike (python -m
  experiments.bench_ar prints `lm_head_ms_by_rows`).
  """
  if w.dtype == jnp.float32:
    return jnp.einsum('OI,RI->OR', w.astype(xr.dtype), xr).T                # [R, O]
  R = xr.shape[0]
  xw = xr.astype(w.dtype)
  if R == 1 and _pad_rows():
    xw = jnp.concatenate([xw, xw])
  out = jnp.einsum('RI,OI->RO', xw, w, preferred_element_type=jnp.float32)  # [R', O]
  return out[:R].astype(xr.dtype)


def linear(x, w):
  """x [..., I] times a weight stored [O, I] -> [..., O] (see `matmul`)."""
  lead = x.shape[:-1]
  return matmul(x.reshape(-1, x.shape[-1]), w).reshape(*lead, w.shape[0])


def take_rows(table, ids):
  """jnp.take(table, ids, axis=0), gathering a bf16 table as 16-bit integers:
  XLA:CPU gathers bf16 in float32, and in a decode loop it then cast the
  whole loop-invariant table once per call (670 MB written for Gemma 3 270M's
  embedding) before taking a few rows. As integers it still copies the
  table's bits once per call (335 MB; the bitcast is hoisted out of the loop
  as a fusion), half the bytes and no float32 arithmetic. Same bits, same
  gradient (tests/test_model.py)."""
  if table.dtype != jnp.bfloat16:
    return jnp.take(table, ids, axis=0)
  return _take_bf16_rows(table, ids)


@jax.custom_jvp
def _take_bf16_rows(table, ids):
  bits = jnp.take(jax.lax.bitcast_convert_type(table, jnp.uint16), ids, axis=0)
  return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


@_take_bf16_rows.defjvp
def _take_bf16_rows_jvp(primals, tangents):
  (table, ids), (d_table, _) = primals, tangents
  return _take_bf16_rows(table, ids), jnp.take(d_table, ids, axis=0)


def lm_head(hidden, embedding):
  """hidden [..., D] @ embedding[V, D]^T -> logits [..., V] float32.

  The tied head is the largest product of a step (V = 262,144 rows); it runs
  through `matmul` like every layer, so bf16 embeddings take the bf16 path.
  """
  lead = hidden.shape[:-1]
  h = hidden.reshape(-1, hidden.shape[-1])
  return matmul(h, embedding).reshape(*lead, embedding.shape[0]).astype(jnp.float32)


# Slots a local layer's cut reads beyond its window (see visible_slots).
SPAN_PAD = 64
# attend: a pass over this many query tokens or more (prefill buckets, drafter
# training windows) multiplies probabilities by values with one dot; shorter
# passes (a decode step, a verify pass over k + 1 < 64 tokens) sum over slots,
# which rounds a row alike at any row count (see attend).
DOT_PRODUCT_MIN_TOKENS = 64


def visible_slots(keys, values, q_pos, window: Optional[int]):
  """The cache slots the queries of each row can see, and their positions.

  keys, values [B, K, S, H]; q_pos [B, T] (consecutive per row). A local
  layer (`window` set) reads only the window + T - 1 slots its queries can
  reach, cut per row out of the cache (clamped inside it, so the cut may
  start earlier; the mask still applies by position): its cost then does
  not grow with the cache. Otherwise every slot. Returns (keys, values)
  [B, K, S', H] and key positions [B, S'].

  The cut is window + SPAN_PAD slots for any T <= SPAN_PAD + 1, not
  window + T - 1, so a plain step (T = 1) and a verify pass (T = k + 1)
  attend over the same slots and a query's output is bitwise the same in
  both (with window + T - 1, Gemma 3 270M at cache 2048, bf16 weights: the
  logits of one token alone and among 2..9 differed by up to 0.09, enough
  to flip near-ties; README, "bf16 and greedy identity").
  """
  B, S, T = keys.shape[0], keys.shape[2], q_pos.shape[1]
  span = window + SPAN_PAD * max(1, -(-(T - 1) // SPAN_PAD)) if window else S
  if span >= S:
    return keys, values, jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  start = jnp.clip(q_pos[:, 0] - window + 1, 0, S - span)
  cut = jax.vmap(lambda c, s0: jax.lax.dynamic_slice_in_dim(c, s0, span, axis=1))
  key_pos = start[:, None] + jnp.arange(span, dtype=jnp.int32)[None, :]
  return cut(keys, start), cut(values, start), key_pos


def attend(q, keys, values, q_pos, key_pos, window: Optional[int], strict: bool = False,
           mask=None, chain_order=None):
  """Masked softmax attention, grouped-query, in float32.

  q [B, T, N, H] (scaled, rotated); keys, values [B, K, S, H]; q_pos [B, T];
  key_pos [B, S]. Key j is visible to the query at position p iff j <= p
  (j < p when `strict`) and, with a window, j > p - window. Returns
  [B, T, N * H]; a query that sees no key reads zeros. `mask` [B, T, S]
  (optional) replaces that rule: the tree verify pass's visibility;
  `chain_order` (its `tree_chain_order`) computes each node over its
  chain's key layout.

  The scores are one `lax.dot_general` batched over (B, K) with the G * T
  query rows of each kv head stacked: XLA:CPU runs that form 2-5x faster than
  the five-letter einsums over [B, K, G, T, S] at batch 8 x 2048 slots (one
  layer 6.5-19 ms -> 3.3-4 ms over runs; `python -m experiments.bench_ar`
  prints both forms). The value product is a sum over slots (see below) in
  a pass over fewer than DOT_PRODUCT_MIN_TOKENS queries, and one dot in a
  longer one (a prefill bucket, a drafter training window), where the sum
  cost 5x per drafter training step (16 vs 3 s for 8 x 256 tokens, Zen 3).
  """
  B, T, N, H = q.shape
  K = keys.shape[1]
  G = N // K
  rows = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
  scores = jax.lax.dot_general(rows, keys.astype(rows.dtype),
                               (((3,), (3,)), ((0, 1), (0, 1))))           # [B, K, TG, S]
  scores = scores.astype(jnp.float32)
  if mask is not None:
    mask = jnp.repeat(mask, G, axis=1)                                      # [B, TG, S]
  else:
    row_pos = jnp.repeat(q_pos, G, axis=1)[:, :, None]                      # [B, TG, 1]
    k_pos = key_pos[:, None, :]                                             # [B, 1, S]
    mask = (k_pos < row_pos) if strict else (k_pos <= row_pos)
    if window is not None:
      mask &= k_pos > row_pos - window
  scores = jnp.where(mask[:, None], scores, jnp.finfo(jnp.float32).min)
  if chain_order is None:
    probs = row_softmax(scores)
    v = values[:, :, None].astype(jnp.float32)                              # [B, K, 1, S, H]
  else:
    # A tree node is computed over its chain's key layout: its weights and
    # the values moved into the columns its chain holds them in (its
    # ancestors at consecutive columns from the tree's first, deeper tree
    # columns empty), so that the denominator's pairwise sum and the value
    # sum below see exactly the chain's operands in the chain's order.
    col0, cols, valid = chain_order              # [B]; [B, T, T] ancestor columns, valid
    put = jax.vmap(lambda x, blk, c: jax.lax.dynamic_update_slice_in_dim(x, blk, c, axis=2))
    e = jnp.exp(scores - row_max(scores))                                   # [B, K, TG, S]
    gcols = jnp.broadcast_to(jnp.repeat(cols, G, axis=1)[:, None], (B, K, T * G, T))
    e_blk = jnp.where(jnp.repeat(valid, G, axis=1)[:, None],
                      jnp.take_along_axis(e, gcols, axis=-1), 0.)           # [B, K, TG, T]
    e = put(e, e_blk, col0)
    probs = e / row_sum(e)
    v_blk = jnp.take_along_axis(values, jnp.broadcast_to(cols.reshape(B, 1, T * T, 1),
                                                         (B, K, T * T, 1)), axis=2)
    v_blk = jnp.where(valid[:, None, :, :, None], v_blk.reshape(B, K, T, T, H), 0)
    S = values.shape[2]
    v = jnp.broadcast_to(values[:, :, None], (B, K, T, S, H))
    v = put(v, v_blk.astype(v.dtype), col0)
    v = v[:, :, :, None].astype(jnp.float32)                                # [B, K, T, 1, S, H]
  if strict:   # a query at position 0 sees nothing: zero its uniform weights
    probs = probs * jnp.any(mask, -1)[:, None, :, None]
  if chain_order is not None:
    probs = probs.reshape(B, K, T, G, -1)
  # The probabilities x values product as a sum over the slot axis, not a
  # dot. A dot over all T * G rows picked its kernel by row count, machine by
  # machine (row 0 of 12+ rows differed from 4 rows on a Zen 3 EPYC, probs
  # on the left at 36 rows on a Zen 4); the sum over slots rounded a row
  # alike at 1-16 tokens and batch 1-16 on the Zen 3 and was no slower at
  # Gemma 3 270M's shapes (tools/row_invariance_probe.py checks a machine).
  # Its order over slots is not one slot after another (1024 slots of
  # 64-wide heads are added in blocks of 512), hence the tree's chain layout
  # above.
  if chain_order is None and T >= DOT_PRODUCT_MIN_TOKENS:
    # A long block of queries (a prefill bucket, a training window) is not
    # a verify pass: no other pass has to round its rows alike, and the sum
    # over slots would be a [TG, S, H] elementwise product (materialised
    # under autodiff: 2 GB per drafter training step of 8 x 256 tokens).
    out = jax.lax.dot_general(probs, v[:, :, 0], (((3,), (2,)), ((0, 1), (0, 1))))
  else:
    out = jnp.sum(probs[..., None] * v, axis=-2)                  # [B, K, TG or T, (G,) H]
  out = out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4)                 # [B, T, K, G, H]
  return out.reshape(B, T, N * H).astype(q.dtype)


def tree_visibility(q_pos, key_slot, first_slot, depths, ancestors, window: Optional[int]):
  """Which keys each tree node sees: [B, T, S'] bool.

  The T nodes of a tree verify pass sit in slots first_slot[b] + (0..T-1) but
  at positions first_slot[b] + depths (siblings share a position). Node i
  sees every cached slot before first_slot (slot == position there) and the
  tree slots of its ancestors (itself included, ancestors [B, T, T] bool),
  all within the window by position, exactly what a chain of its
  root-to-node path would see. q_pos [B, T]; key_slot [B, S'] slot indices
  (visible_slots); depths [B, T] (each row may have its own tree).
  """
  B, T = depths.shape
  node = key_slot - first_slot[:, None]                                     # [B, S']
  before = node < 0                                                         # cached slots
  in_tree = ~before & (node < T)
  node = jnp.clip(node, 0, T - 1)
  k_pos = jnp.where(in_tree, first_slot[:, None] + jnp.take_along_axis(depths, node, axis=1),
                    key_slot)                                               # [B, S']
  anc = jnp.take_along_axis(ancestors, jnp.broadcast_to(node[:, None, :], (B, T, node.shape[1])),
                            axis=2)                                         # [B, T, S']
  vis = jnp.where(in_tree[:, None, :], anc, before[:, None, :])
  vis &= k_pos[:, None, :] <= q_pos[:, :, None]
  if window is not None:
    vis &= k_pos[:, None, :] > q_pos[:, :, None] - window
  return vis


def tree_chain_order(key_slot, first_slot, depths, ancestors):
  """Where a tree node's chain holds its ancestors among the key columns:
  (col0 [B] the tree's first column, cols [B, T, T] int32, valid [B, T, T]).
  A chain of node i's path holds its depth-n ancestor in column col0 + n,
  which the tree holds in column cols[b, i, n]; valid marks n <= depth(i)
  (deeper columns are empty in node i's chain). key_slot [B, S'] holds
  consecutive slot indices (visible_slots)."""
  B, T = depths.shape
  col0 = (first_slot - key_slot[:, 0]).astype(jnp.int32)
  hit = ancestors[:, :, None, :] & (depths[:, None, None, :] ==
                                    jnp.arange(T, dtype=jnp.int32)[None, None, :, None])
  at_depth = jnp.argmax(hit, axis=-1).astype(jnp.int32)                      # [B, T, T]
  valid = jnp.arange(T, dtype=jnp.int32)[None, None, :] <= depths[:, :, None]
  return col0, col0[:, None, None] + at_depth, valid


class RMSNorm(nn.Module):
  """Norm scales stay float32 whatever the weights' dtype (see `cast_params`)."""
  eps: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps)


def _dense_init(fan_in):
  return nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


class Attention(nn.Module):
  config: ModelConfig
  is_global: bool

  @nn.compact
  def __call__(self, x, positions, cache_kv: Optional[Tuple[jax.Array, jax.Array]],
               tree=None):
    cfg = self.config
    N, K, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
    B, T, _ = x.shape
    pd = cfg.jnp_param_dtype
    # One fused projection for q, k, v: a single GEMV per layer when decoding.
    w_qkv = self.param('qkv', _dense_init(D), ((N + 2 * K) * H, D), pd)
    w_out = self.param('out', _dense_init(N * H), (D, N * H), pd)
    q_scale = self.param('q_norm', nn.initializers.ones, (H,), jnp.float32)
    k_scale = self.param('k_norm', nn.initializers.ones, (H,), jnp.float32)

    qkv = linear(x, w_qkv)
    q, k, v = jnp.split(qkv, [N * H, (N + K) * H], axis=-1)
    q = rms_norm(q.reshape(B, T, N, H), q_scale, cfg.norm_eps)
    k = rms_norm(k.reshape(B, T, K, H), k_scale, cfg.norm_eps)
    v = v.reshape(B, T, K, H)
    if self.is_global:
      base, rscale = cfg.rope_base_global, cfg.rope_scale_global
    else:
      base, rscale = cfg.rope_base_local, 1.0
    q = apply_rope(q, positions, base, rscale)
    k = apply_rope(k, positions, base, rscale)

    k = k.transpose(0, 2, 1, 3)                                  # [B, K, T, H]
    v = v.transpose(0, 2, 1, 3)
    window = None if self.is_global else cfg.sliding_window
    if cache_kv is None:
      keys, values, key_pos = k, v, positions
      new_kv = None
    else:
      # Row b writes slots positions[b]; a scatter with in-bounds, unique,
      # sorted indices updates the loop-carried cache in place (a vmapped
      # dynamic_update_slice became a full-cache select pass per layer).
      rows = jnp.arange(B)[:, None, None]
      heads = jnp.arange(K)[None, :, None]
      # A tree's nodes take consecutive slots whatever their positions.
      slot_ids = positions if tree is None else (
          positions[:, :1] - tree[0][:, :1] + jnp.arange(T, dtype=jnp.int32)[None])
      slots = slot_ids[:, None, :]
      write = lambda c, u: c.at[rows, heads, slots].set(
          u.astype(c.dtype), mode='promise_in_bounds', unique_indices=True,
          indices_are_sorted=True)
      keys = write(cache_kv[0], k)                               # [B, K, S, H]
      values = write(cache_kv[1], v)
      new_kv = (keys, values)
      keys, values, key_pos = visible_slots(keys, values, positions, window)
    q = q * jnp.asarray(cfg.query_pre_attn_scalar ** -0.5, q.dtype)
    mask = order = None
    if tree is not None:   # key_pos holds slot indices: visible_slots cut by slot
      mask = tree_visibility(positions, key_pos, slot_ids[:, 0], tree[0], tree[1], window)
      order = tree_chain_order(key_pos, slot_ids[:, 0], tree[0], tree[1])
    out = attend(q, keys, values, positions, key_pos, window, mask=mask, chain_order=order)
    return linear(out, w_out), new_kv


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    D, F = self.config.embed_dim, self.config.hidden_dim
    pd = self.config.jnp_param_dtype
    w_gate_up = self.param('gate_up', _dense_init(D), (2 * F, D), pd)  # [gate; up]
    w_down = self.param('down', _dense_init(F), (D, F), pd)
    gate, up = jnp.split(linear(x, w_gate_up), 2, axis=-1)
    h = jax.nn.gelu(gate, approximate=True) * up
    return linear(h, w_down)


class Block(nn.Module):
  config: ModelConfig
  is_global: bool

  @nn.compact
  def __call__(self, x, positions, cache_kv, tree=None):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.norm_eps, name=name)
    h, new_kv = Attention(cfg, self.is_global, name='attn')(
        norm('pre_attn_norm')(x), positions, cache_kv, tree)
    zero = opaque_zero(positions)
    x = settled(x, zero) + settled(norm('post_attn_norm')(h), zero)
    h = MLP(cfg, name='mlp')(norm('pre_ffw_norm')(x))
    x = x + settled(norm('post_ffw_norm')(h), zero)
    return x, new_kv


class Transformer(nn.Module):
  """Gemma 3 decoder. `__call__` returns (logits or None, hidden, cache)."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        'embedding', nn.initializers.normal(stddev=1.0 / math.sqrt(cfg.embed_dim)),
        (cfg.vocab_size, cfg.embed_dim), cfg.jnp_param_dtype)             # [V, D]
    self.blocks = [Block(cfg, g, name=f'layer_{i}') for i, g in enumerate(cfg.is_global)]
    self.final_norm = RMSNorm(cfg.norm_eps)

  def embed(self, tokens):
    """Scaled token embedding, [B, T] -> [B, T, D]."""
    x = take_rows(self.embedding, tokens).astype(self.config.jnp_dtype)
    return x * jnp.asarray(math.sqrt(self.config.embed_dim), self.config.jnp_dtype)

  def logits(self, hidden):
    """Tied LM head: [..., D] (final-normed hidden) -> [..., V] float32."""
    return lm_head(hidden, self.embedding)

  def __call__(self, tokens, cache: Optional[KVCache] = None, compute_logits: bool = True,
               tree=None):
    """tokens [B, T] -> (logits [B, T, V] | None, hidden [B, T, D], cache).

    With a cache, row b's tokens take positions cache.lengths[b] + (0..T-1) and
    the returned cache has lengths + T. Without one (training, the full
    forward in tests) positions are 0..T-1 and attention is causal over T.
    `hidden` is the final-normed last-layer state: the LM head's input.
    `tree` (with a cache; tree.py): (depths [T] int32, ancestors [T, T] bool)
    of a token tree, or [B, T] / [B, T, T] for one tree per row, node 0 the
    root at depth 0: the nodes still take slots
    lengths + (0..T-1), but positions lengths + depths, and each sees the
    cache and its ancestors only (`tree_visibility`).
    """
    B, T = tokens.shape
    offset = jnp.zeros((B,), jnp.int32) if cache is None else cache.lengths
    if tree is None:
      positions = offset[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    else:
      if cache is None:
        raise ValueError('a tree verify pass needs a cache')
      depths, ancestors = jnp.asarray(tree[0], jnp.int32), jnp.asarray(tree[1], bool)
      tree = (jnp.broadcast_to(depths, (B, T)), jnp.broadcast_to(ancestors, (B, T, T)))
      positions = offset[:, None] + tree[0]                                # [B, T]
    x = self.embed(tokens)
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, new_kv = block(x, positions, kv) if tree is None else block(x, positions, kv, tree)
      if new_kv is not None:
        new_k.append(new_kv[0])
        new_v.append(new_kv[1])
    hidden = self.final_norm(x)
    if cache is not None:
      cache = KVCache(k=tuple(new_k), v=tuple(new_v), lengths=cache.lengths + T).on_mesh()
    logits = self.logits(hidden) if compute_logits else None
    return logits, hidden, cache


def build(config) -> nn.Module:
  """The Flax module of a target config: the Gemma 3 `Transformer` for a
  `ModelConfig`, `models.gemma4.Gemma4` for a `Gemma4Config`."""
  if isinstance(config, ModelConfig):
    return Transformer(config)
  from specdec_jax.models import gemma4   # imports this module: import here
  if isinstance(config, gemma4.Gemma4Config):
    return gemma4.Gemma4(config)
  raise TypeError(f'no model for a {type(config).__name__}')


def is_matrix(path: str, leaf) -> bool:
  """True for the weights that matmuls read (they take `param_dtype`); norm
  scales and integer tables stay as they are. `path` is '/'-joined names."""
  return (jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2
          and 'norm' not in path.rsplit('/', 1)[-1])


def cast_params(params, param_dtype):
  """Matrices to `param_dtype`, norm scales to float32 (numpy or jax leaves)."""
  def cast(path, leaf):
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    if is_matrix(name, leaf):
      return leaf.astype(param_dtype)
    return leaf.astype(jnp.float32) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
  return jax.tree_util.tree_map_with_path(cast, params)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng) -> dict:
  """Random parameters (for tests and from-scratch training), drawn in float32
  and cast to the config's `param_dtype`: the same seed gives the same model
  at every weight precision, up to rounding."""
  model = Transformer(config.replace(param_dtype='float32'))
  tokens = jnp.zeros((1, 1), jnp.int32)
  return cast_params(model.init(rng, tokens, compute_logits=True)['params'],
                     config.jnp_param_dtype)


def param_shapes(config: ModelConfig) -> dict:
  """The params tree as ShapeDtypeStructs, without allocating anything."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
