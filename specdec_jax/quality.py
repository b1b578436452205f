"""Output quality checks for generated text: is it still the target's output?

Speculative decoding must not change what the target generates. Two checks
that need only the target:

* **Log-likelihood.** `score` runs the target over prompt + completion once
  (teacher forcing) and returns the raw (temperature 1) log-probability of
  every completion token; a sweep reports its mean next to AR's.

* **Randomised probability integral transform (PIT).** For a token x drawn
  from a discrete distribution p (the warped one: temperature, top-k, top-p,
  exactly what the sampler used), u = P(X < x) + V * p(x) with V ~ U(0, 1)
  is exactly U(0, 1). Each generated token is drawn from p given its prefix,
  so the u of a whole generation are i.i.d. U(0, 1) when, and only when, the
  sampler is exact (the chain rule makes the conditional law of every u
  uniform whatever came before). `pit_p_value` bins the u and returns a
  chi-square goodness-of-fit p-value: a per-token test of the exact claim,
  no reference samples needed, and AR's own p-value is its calibration.
  Order the vocabulary any fixed way (ids here). Greedy tokens have a
  one-hot p and no information in u; for greedy runs compare tokens.
"""
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from specdec_jax import sampling
from specdec_jax.config import ModelConfig
from specdec_jax.model import build


@functools.partial(jax.jit, static_argnames=('config', 'new'))
def score(config: ModelConfig, params, tokens, starts, ends, u, temperature, top_k, top_p,
          *, new: int):
  """Teacher-forced scores of the completions in `tokens`.

  tokens [B, L] int32: prompt then completion (EOS included if generated),
  right-padded; the completion of row b is tokens[b, starts[b]:ends[b]]
  (starts >= 1, ends - starts <= new). u [B, new]: uniform draws for the
  PIT. temperature / top_k / top_p [B]: what the row was sampled with.
  Returns (logp [B, new], pit [B, new], mask [B, new]); entries past a
  row's completion are masked out.
  """
  model = build(config)          # Gemma 3 or Gemma 4 (its logits include the softcap)
  B, L = tokens.shape
  _, hidden, _ = model.apply({'params': params}, tokens, None, compute_logits=False)
  # hidden at position t predicts the token at t + 1: only the completion's
  # `new` positions go through the LM head.
  pos = starts[:, None] - 1 + jnp.arange(new)                              # [B, new]
  mask = pos + 1 < ends[:, None]
  pos = jnp.clip(pos, 0, L - 2)
  h = jnp.take_along_axis(hidden, pos[..., None], axis=1)                  # [B, new, D]
  logits = model.apply({'params': params}, h, method=type(model).logits)   # [B, new, V]
  x = jnp.take_along_axis(tokens, pos + 1, axis=1)                         # [B, new]
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), x[..., None], axis=-1)[..., 0]
  V = logits.shape[-1]
  rep = lambda a: jnp.repeat(a, new)
  probs = sampling.warp(logits.reshape(B * new, V), rep(temperature), rep(top_k),
                        rep(top_p)).reshape(B, new, V)
  p_x = jnp.take_along_axis(probs, x[..., None], axis=-1)[..., 0]
  below = jnp.sum(jnp.where(jnp.arange(V) < x[..., None], probs, 0.0), axis=-1)
  pit = jnp.clip(below + u * p_x, 0.0, 1.0)
  return jnp.where(mask, logp, 0.0), jnp.where(mask, pit, 0.0), mask


class Scorer:
  """Scores (prompt_ids, completion_ids) pairs in fixed-size chunks: one
  compiled shape for a whole sweep (rows of one length bucket)."""

  def __init__(self, config: ModelConfig, params, *, length: int, new: int, chunk: int = 4,
               seed: int = 0):
    self.config, self.params = config, params
    self.length, self.new, self.chunk = length, new, chunk
    self.seed = seed
    self.cache = {}             # a completion seen before (greedy reruns) is not rescored

  def __call__(self, prompts, completions, *, temperature, top_k=0, top_p=1.0):
    """-> list of (logp list, pit list) per row (completion tokens only)."""
    keys = [(tuple(p), tuple(c), temperature, top_k, top_p) for p, c in zip(prompts, completions)]
    todo = list(dict.fromkeys(k for k in keys if k not in self.cache))
    for key, got in zip(todo, self._score([k[0] for k in todo], [k[1] for k in todo],
                                          temperature, top_k, top_p,
                                          [self._uniforms(k) for k in todo])):
      self.cache[key] = got
    return [self.cache[k] for k in keys]

  def _uniforms(self, key):
    """The PIT's randomization for one row: a function of the row and the
    seed, not of what was scored before (a resumed sweep scores fewer rows)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.random.default_rng([self.seed, int.from_bytes(digest[:8], 'little')]).random(
        self.new, dtype=np.float32)

  def _score(self, prompts, completions, temperature, top_k, top_p, uniforms):
    out = []
    for s in range(0, len(prompts), self.chunk):
      ps, cs = prompts[s:s + self.chunk], completions[s:s + self.chunk]
      n = len(ps)
      tokens = np.zeros((self.chunk, self.length), np.int32)
      starts = np.ones((self.chunk,), np.int32)
      ends = np.ones((self.chunk,), np.int32)
      for i in range(self.chunk):
        p, c = (ps[i], cs[i]) if i < n else (ps[0], cs[0])
        if len(p) + len(c) > self.length or len(c) > self.new:
          raise ValueError(f'row of {len(p)} + {len(c)} tokens does not fit the scorer '
                           f'({self.length}, {self.new} new)')
        tokens[i, :len(p) + len(c)] = list(p) + list(c)
        starts[i], ends[i] = len(p), len(p) + len(c)
      u = np.stack([uniforms[s + i] if i < n else uniforms[s] for i in range(self.chunk)])
      full = lambda v, dt: np.full((self.chunk,), v, dt)
      logp, pit, mask = jax.device_get(score(
          self.config, self.params, tokens, starts, ends, u, full(temperature, np.float32),
          full(top_k, np.int32), full(top_p, np.float32), new=self.new))
      for i in range(n):
        m = mask[i]
        out.append((logp[i][m].tolist(), pit[i][m].tolist()))
    return out


def pit_p_value(pit, bins: int = 0):
  """Chi-square p-value that `pit` values are U(0, 1); None for < 10 values.

  bins = 0 picks n // 8 bins, between 2 and 10 (>= 8 expected per bin).
  """
  pit = np.asarray(pit, np.float64)
  if pit.size < 10:
    return None
  bins = bins or int(np.clip(pit.size // 8, 2, 10))
  counts = np.histogram(np.clip(pit, 0, 1), bins=bins, range=(0.0, 1.0))[0]
  return float(stats.chisquare(counts).pvalue)
