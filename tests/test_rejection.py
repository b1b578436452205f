"""The rejection sampler on hand-built distributions."""
import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import rejection

P = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
Q = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
CHI2_999 = {3: 16.27, 15: 37.70}      # chi-square 0.999 quantiles by degrees of freedom


def _run(p, q, k, n_samples, seed=0):
  """Drafts x_i ~ q, then the rule; returns (n, emitted tokens [N, k+1])."""
  keys = jax.random.split(jax.random.key(seed), 2 * n_samples)
  dkeys, akeys = keys[:n_samples], keys[n_samples:]
  V = p.shape[-1]
  drafts = jax.vmap(lambda key: jax.random.categorical(key, jnp.log(jnp.asarray(q)), shape=(k,)))(dkeys)
  qs = jnp.broadcast_to(jnp.asarray(q), (n_samples, k, V))
  ps = jnp.broadcast_to(jnp.asarray(p), (n_samples, k + 1, V))
  n, nxt = rejection.accept_sampled(akeys, drafts.astype(jnp.int32), qs, ps)
  emitted = jnp.where(jnp.arange(k + 1) < n[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), nxt[:, None])
  return np.asarray(n), np.asarray(emitted)


def _chi2(counts, probs):
  expected = counts.sum() * probs
  return float((((counts - expected) ** 2) / expected).sum())


def test_q_equal_p_accepts_everything():
  n, _ = _run(P, P, k=3, n_samples=2000)
  assert (n == 3).all()


def test_disjoint_supports_reject_at_the_first_position():
  p = np.array([0.5, 0.5, 0, 0], np.float32)
  q = np.array([0, 0, 0.5, 0.5], np.float32)
  n, emitted = _run(p, q, k=3, n_samples=2000)
  assert (n == 0).all()
  assert set(np.unique(emitted[:, 0])) <= {0, 1}            # drawn from the residual = p


def test_emitted_token_is_distributed_as_p():
  """First emitted token ~ p (chi-square, alpha = 1e-3, 40k draws)."""
  n, emitted = _run(P, Q, k=1, n_samples=40000)
  assert 0 < n.mean() < 1                                      # both branches exercised
  counts = np.bincount(emitted[:, 0], minlength=4)
  assert _chi2(counts, P) < CHI2_999[3]
  # Power check: the drafts alone (skipping the rule) are clearly rejected.
  wrong = np.bincount(np.asarray(jax.random.categorical(
      jax.random.key(1), jnp.log(jnp.asarray(Q)), shape=(40000,))), minlength=4)
  assert _chi2(wrong, P) > 100 * CHI2_999[3]


def test_two_emitted_tokens_are_independent_draws_from_p():
  """With a context-free p, the first two emitted tokens must be p x p, whether
  they come from one round (first draft accepted) or two (rejected at once)."""
  n1, first = _run(P, Q, k=2, n_samples=40000, seed=3)
  _, second = _run(P, Q, k=2, n_samples=40000, seed=4)
  t0 = first[:, 0]
  t1 = np.where(n1 >= 1, first[:, 1], second[:, 0])
  counts = np.bincount(t0 * 4 + t1, minlength=16)
  assert _chi2(counts, np.outer(P, P).ravel()) < CHI2_999[15]


def test_greedy_acceptance():
  logits = jnp.log(jnp.array([[[0.1, 0.9, 0], [0.8, 0.1, 0.1], [0, 0, 1.0]]]) + 1e-9)   # argmax 1, 0, 2
  n, nxt = rejection.accept_greedy(jnp.array([[1, 0]]), logits)
  assert int(n[0]) == 2 and int(nxt[0]) == 2                  # all accepted: bonus token
  n, nxt = rejection.accept_greedy(jnp.array([[1, 2]]), logits)
  assert int(n[0]) == 1 and int(nxt[0]) == 0                  # correction at position 2
  n, nxt = rejection.accept_greedy(jnp.array([[0, 0]]), logits)
  assert int(n[0]) == 0 and int(nxt[0]) == 1
