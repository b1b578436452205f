"""Logit warping (temperature, top-k, top-p) against a sort-based numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import sampling


def reference(logits, t, k, p):
  """HF's order and semantics, by sorting: temperature, top-k, then top-p."""
  if t == 0:
    out = np.zeros_like(logits)
    out[np.argmax(logits)] = 1
    return out
  z = logits / t
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind='stable')
  keep = np.ones_like(probs, bool)
  if k > 0:
    keep[order[k:]] = False
  probs = np.where(keep, probs, 0)
  probs /= probs.sum()
  if p < 1:
    before = np.cumsum(probs[order]) - probs[order]     # mass strictly above each token
    drop = order[before >= p]
    probs[drop] = 0
    probs /= probs.sum()
  return probs


@pytest.mark.parametrize('t,k,p', [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.0, 0, 1.0), (1.0, 5, 1.0),
                                   (1.0, 0, 0.9), (0.7, 10, 0.8), (1.3, 1, 0.5), (1.0, 0, 0.05)])
def test_warp_matches_sort_reference(t, k, p):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 257)).astype(np.float32) * 3   # no ties
  ours = sampling.warp(jnp.asarray(logits), jnp.full(3, t), jnp.full(3, k, jnp.int32), jnp.full(3, p))
  for row in range(3):
    np.testing.assert_allclose(ours[row], reference(logits[row], t, k, p), atol=1e-6)


def test_warp_rows_have_independent_settings():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 100)).astype(np.float32)
  settings = [(0.0, 0, 1.0), (1.0, 3, 1.0), (0.5, 0, 0.6), (1.0, 0, 1.0)]
  t, k, p = (jnp.array(v) for v in zip(*settings))
  ours = sampling.warp(jnp.asarray(logits), t, k.astype(jnp.int32), p)
  for row, s in enumerate(settings):
    np.testing.assert_allclose(ours[row], reference(logits[row], *s), atol=1e-6)


def test_sample_follows_the_distribution():
  """Chi-square goodness of fit, 20k draws over 6 outcomes (alpha = 1e-3)."""
  probs = jnp.array([[0.05, 0.1, 0.15, 0.2, 0.0, 0.5]])
  keys = jax.random.split(jax.random.key(0), 20000)
  draws = jax.vmap(lambda k: sampling.sample(k[None], probs)[0])(keys)
  counts = np.bincount(np.asarray(draws), minlength=6)
  assert counts[4] == 0                                    # zero mass is never drawn
  expected = 20000 * np.asarray(probs[0])
  nz = expected > 0
  chi2 = (((counts - expected)[nz]) ** 2 / expected[nz]).sum()
  assert chi2 < 18.47, chi2                                 # chi2(4 dof) 0.999 quantile


def test_inverse_cdf_across_blocks():
  """The two-level draw over 2,000 ids (blocks of 512, the last partial):
  unnormalised weights with a whole zero block and zeros at block edges; the
  ends of u land on the first and last positive ids, a one-hot row on its id,
  and 100k draws fit the weights (chi-square, bins with expected < 5 pooled)."""
  from tests.scipy_free_chi2 import chi2_quantile_999
  rng = np.random.default_rng(0)
  w = rng.gamma(0.3, size=2000).astype(np.float32) * 7.0
  w[512:1024] = 0.0                               # a whole block
  w[:3] = 0.0
  w[1535:1537] = 0.0                              # across a block edge
  w[-5:] = 0.0
  pos = np.flatnonzero(w)
  ends = sampling.inverse_cdf(jnp.asarray(np.stack([w, w])), jnp.array([0.0, np.nextafter(1, 0)]))
  assert ends.tolist() == [pos[0], pos[-1]]
  one_hot = np.zeros((3, 2000), np.float32)
  one_hot[:, 1300] = 1.0
  assert sampling.inverse_cdf(jnp.asarray(one_hot), jnp.array([0.0, 0.5, 0.999])).tolist() == [1300] * 3
  n = 100_000
  draws = np.asarray(sampling.inverse_cdf(jnp.broadcast_to(jnp.asarray(w), (n, 2000)),
                                          jax.random.uniform(jax.random.key(1), (n,))))
  counts = np.bincount(draws, minlength=2000)
  assert counts[w == 0].sum() == 0
  expected = n * w.astype(np.float64) / w.sum()
  big = expected >= 5
  obs = np.append(counts[big], counts[~big & (w > 0)].sum())
  exp = np.append(expected[big], expected[~big & (w > 0)].sum())
  chi2 = ((obs - exp) ** 2 / exp).sum()
  assert chi2 < chi2_quantile_999(len(obs) - 1), (chi2, len(obs) - 1)


def test_argmax_is_jnp_argmax_first_index_on_ties():
  x = jax.random.normal(jax.random.key(0), (3, 7, 1000))
  x = x.at[:, :, 500].set(x.max() + 1).at[:, :, 700].set(x.max() + 1)   # tie: 500 wins
  x = x.at[1, 2].set(jax.random.normal(jax.random.key(1), (1000,)))     # no tie in one row
  got = sampling.argmax(x)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
  assert int(got[0, 0]) == 500
