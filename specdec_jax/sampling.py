"""Logit warping and sampling: temperature, top-k, top-p, as arrays under jit.

Depends on nothing else in specdec_jax. `warp` returns the exact distribution
a token is drawn from; the rejection sampler applies the same `warp` to the
target's and the drafter's logits, as exactness requires.

Every knob is a per-row array ([B]), so a sweep over temperature, top-k or
top-p never recompiles. Top-k and top-p need no sort (XLA:CPU sorts 262k
floats slowly): each finds its cut-off by bisection on the float32 bit pattern
(non-negative floats order like their int32 bits), 31 masked reductions that
land on the exact threshold. Rows with top_k = 0 / top_p = 1 are unaffected,
and when no row uses a filter it is skipped entirely (`lax.cond`).
"""
import jax
import jax.numpy as jnp

_BITS_HI = 0x7F800001   # one past +inf's bit pattern


def _largest_threshold(probs, weights, target):
  """Largest t (as float32 bits) with sum(weights[probs >= t]) >= target, per row.

  probs, weights: [B, V] (probs >= 0); target: [B]. t = 0 (keep all) when
  even the whole row falls short (e.g. top_p = 1 with rounding).
  """
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)                  # [B, V]
  lo = jnp.zeros(probs.shape[:-1], jnp.int32)
  hi = jnp.full(probs.shape[:-1], _BITS_HI, jnp.int32)

  def body(_, carry):
    lo, hi = carry
    mid = lo + (hi - lo) // 2
    mass = jnp.sum(jnp.where(bits >= mid[:, None], weights, 0), axis=-1)
    ok = mass >= target
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
  return jax.lax.bitcast_convert_type(lo, jnp.float32)                   # [B]


def _renormalize(probs, keep):
  probs = jnp.where(keep, probs, 0.0)
  return probs / jnp.sum(probs, axis=-1, keepdims=True)


def warp(logits, temperature, top_k, top_p):
  """The sampling distribution: probs [B, V] float32 from logits [B, V].

  temperature [B] (0 = greedy: one-hot argmax), top_k [B] int (0 = off),
  top_p [B] in (0, 1] (1 = off). Order as in HF: temperature, top-k, top-p
  (on the renormalized top-k distribution).
  """
  logits = logits.astype(jnp.float32)
  greedy = temperature <= 0
  t = jnp.where(greedy, 1.0, temperature)[:, None]
  probs = jax.nn.softmax(logits / t, axis=-1)

  def apply_top_k(probs):
    k = jnp.where(top_k > 0, top_k, probs.shape[-1]).astype(jnp.float32)
    cut = _largest_threshold(probs, jnp.ones_like(probs), k)
    return _renormalize(probs, probs >= cut[:, None])

  def apply_top_p(probs):
    cut = _largest_threshold(probs, probs, jnp.where(top_p < 1, top_p, 2.0))
    return _renormalize(probs, probs >= cut[:, None])

  probs = jax.lax.cond(jnp.any(top_k > 0), apply_top_k, lambda p: p, probs)
  probs = jax.lax.cond(jnp.any(top_p < 1), apply_top_p, lambda p: p, probs)
  one_hot = jax.nn.one_hot(argmax(logits), logits.shape[-1])
  return jnp.where(greedy[:, None], one_hot, probs)


def sample(keys, probs):
  """One token per row from probs [B, V] (non-negative; each row's total is
  its normaliser) with per-row PRNG keys [B], by the Gumbel trick.

  Not `inverse_cdf`, though that is 20-45x cheaper over 262k ids
  (experiments/bench_sampler.py): a running sum carries every earlier id's
  rounding, so logits that differ in the last bits (a model-sharded mesh
  against one device) move its boundaries and flip tokens far more often
  than they flip a Gumbel argmax (tests/test_long_jobs.py's two-process mesh
  saw 1 of 144 sampled tokens differ). Sampled runs stay reproducible across
  layouts with this one.
  """
  logp = jnp.log(probs)   # -inf outside the support: never drawn
  return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


def inverse_cdf(weights, u, block: int = 512):
  """[B] int32: the index i with C(i-1) <= u * total < C(i), C the running
  sum of `weights` [B, V] (>= 0, a positive total), u [B] in [0, 1): an exact
  draw from weights / total with one uniform per row.

  Two levels (blocks of `block` ids, then the ids inside the chosen block),
  so only a [B, V/block] and a [B, block] running sum exist: 0.91 ms for 8
  rows of 262k ids on this AMD EPYC, where `sample` (the Gumbel trick, a
  random number and a log per id) takes 41 ms, 0.33 vs 6.6 ms for one row
  (python -m experiments.bench_sampler).
  Float rounding never picks a zero weight: the pick is clipped to the last
  positive block and id.
  """
  B, V = weights.shape
  nb = -(-V // block)
  w = jnp.pad(weights.astype(jnp.float32), ((0, 0), (0, nb * block - V))).reshape(B, nb, block)
  sums = jnp.sum(w, -1)                                                     # [B, nb]
  c = jnp.cumsum(sums, -1)
  x = u * c[:, -1]
  last = lambda q: q.shape[-1] - 1 - jnp.argmax((q > 0)[:, ::-1], -1)       # last positive
  b = jnp.minimum(jnp.sum(c <= x[:, None], -1), last(sums))
  r = x - jnp.where(b > 0, jnp.take_along_axis(c, jnp.maximum(b - 1, 0)[:, None], 1)[:, 0], 0)
  within = jnp.take_along_axis(w, b[:, None, None], 1)[:, 0]                # [B, block]
  j = jnp.minimum(jnp.sum(jnp.cumsum(within, -1) <= r[:, None], -1), last(within))
  return (b * block + j).astype(jnp.int32)


def argmax(x):
  """jnp.argmax over the last axis (the first index of the maximum), int32.

  Written as two plain reductions, a max and then a min over the indices that
  attain it: XLA:CPU vectorizes both, but not the (value, index) pair
  reduction of jnp.argmax. Over 262k logits: 1.4 -> 0.4 ms for one row, 3.8 ->
  1.5 ms for the 5 rows of a k = 4 verify (python -m experiments.bench_ar
  prints both). A NaN row gives the last index rather than the NaN's.
  """
  top = jnp.max(x, axis=-1, keepdims=True)
  idx = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == top, idx, x.shape[-1] - 1), axis=-1)
  return first.astype(jnp.int32)


def greedy(logits):
  return argmax(logits)
