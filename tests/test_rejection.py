"""The rejection sampler on hand-built distributions.

The target and the drafter are context-free but position-dependent: the
token at absolute position t is drawn from P_POS[t] (drafted from Q_POS[t]),
every row different, so taking p or q from the wrong position (p_n, q_n, or
p_{k+1} for the bonus token) changes what is emitted. Exact decoding emits
independent tokens, token t ~ P_POS[t]. Each test also runs the rule with a
deliberate bug (tests/negative_controls.py) and must reject it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import rejection
import negative_controls

P = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
Q = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
P_POS = np.array([[0.1, 0.2, 0.3, 0.4],
                  [0.5, 0.1, 0.1, 0.3],
                  [0.2, 0.5, 0.2, 0.1],
                  [0.3, 0.05, 0.6, 0.05],
                  [0.25, 0.25, 0.25, 0.25]], np.float32)
Q_POS = np.array([[0.4, 0.3, 0.2, 0.1],
                  [0.1, 0.2, 0.6, 0.1],
                  [0.1, 0.1, 0.3, 0.5],
                  [0.6, 0.2, 0.1, 0.1]], np.float32)
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


def _decode(n_tokens, k, n_samples, seed, accept=rejection.accept_sampled):
  """Speculative decoding of the position-dependent target, every row until it
  holds n_tokens: a round at position s drafts x_i ~ Q_POS[s + i] and verifies
  with p = P_POS[s : s + k + 1]. Returns (tokens [N, n_tokens], n of round 1)."""
  tokens = np.zeros((n_samples, n_tokens + k), np.int32)
  length = np.zeros(n_samples, np.int32)
  first_n = None
  key = jax.random.key(seed)
  while (length < n_tokens).any():
    key, dkey, akey = jax.random.split(key, 3)
    active = length < n_tokens            # finished rows idle at valid positions
    at = np.minimum(length, n_tokens - 1)[:, None] + np.arange(k + 1)   # [N, k+1]
    ps, qs = P_POS[at], Q_POS[at[:, :k]]
    drafts = jax.vmap(lambda key, q: jax.random.categorical(key, jnp.log(q), axis=-1))(
        jax.random.split(dkey, n_samples), jnp.asarray(qs)).astype(jnp.int32)
    n, nxt = accept(jax.random.split(akey, n_samples), drafts, jnp.asarray(qs), jnp.asarray(ps))
    n, drafts, nxt = np.asarray(n), np.asarray(drafts), np.asarray(nxt)
    emitted = np.where(np.arange(k + 1) < n[:, None], np.pad(drafts, ((0, 0), (0, 1))),
                       nxt[:, None])
    for j in range(k + 1):                # x_1..x_n, then the replacement / bonus
      write = active & (j <= n)
      tokens[write, at[write, j]] = emitted[write, j]
    length = np.where(active, length + n + 1, length)
    first_n = n if first_n is None else first_n
  return tokens[:, :n_tokens], first_n


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


def _first_and_bonus(accept):
  """One round with k = 1 (40k rows): chi-square / 0.999 quantile of the
  first emitted token against P_POS[0], and of the bonus token (rows that
  accepted the draft) against P_POS[1]."""
  tokens, n = _decode(2, 1, 40000, seed=0, accept=accept)
  first = np.bincount(tokens[:, 0], minlength=4)
  bonus = np.bincount(tokens[n == 1, 1], minlength=4)
  return (_chi2(first, P_POS[0]) / CHI2_999[3], _chi2(bonus, P_POS[1]) / CHI2_999[3],
          n.mean())


def test_emitted_token_is_distributed_as_p():
  """First emitted token ~ p_1 and the bonus token ~ p_2 (chi-square, alpha =
  1e-3, 40k rows). Power: the drafts alone (skipping the rule) are clearly
  rejected, and so is the rule with p_n, q_n or the bonus position off by one
  or the residual not renormalised."""
  first, bonus, accepted = _first_and_bonus(rejection.accept_sampled)
  assert 0.2 < accepted < 0.8                                  # both branches exercised
  assert first < 1 and bonus < 1, (first, bonus)
  wrong = np.bincount(np.asarray(jax.random.categorical(
      jax.random.key(1), jnp.log(jnp.asarray(Q_POS[0])), shape=(40000,))), minlength=4)
  assert _chi2(wrong, P_POS[0]) > 100 * CHI2_999[3]
  for bug, caught_by in [('residual_from_p_next', 0), ('residual_with_q_next', 0),
                         ('residual_not_renormalised', 0), ('bonus_from_p_k', 1)]:
    ratios = _first_and_bonus(negative_controls.accept_sampled_with(bug))
    assert ratios[caught_by] > 1, (bug, ratios)


def _pair(accept, seed):
  """Two tokens with k = 2 (40k rows): chi-square / quantile of (t0, t1)
  against P_POS[0] x P_POS[1], and the rows whose second token came from a
  second round (the first rejected its first draft)."""
  tokens, n1 = _decode(2, 2, 40000, seed=seed, accept=accept)
  counts = np.bincount(tokens[:, 0] * 4 + tokens[:, 1], minlength=16)
  return _chi2(counts, np.outer(P_POS[0], P_POS[1]).ravel()) / CHI2_999[15], (n1 == 0).mean()


def test_two_emitted_tokens_are_independent_draws_from_p():
  """The first two emitted tokens must be p_1 x p_2, whether they come from
  one round (first draft accepted) or two (rejected at once). Power: reusing
  a round's acceptance keys in the next round, and each off-by-one above,
  must be rejected."""
  ratio, across = _pair(rejection.accept_sampled, seed=3)
  assert ratio < 1, ratio
  assert 0.2 < across < 0.8, across                    # both one- and two-round pairs
  for bug in negative_controls.BUGS:
    if bug != 'bonus_from_p_k':                        # k = 2: no bonus within two tokens
      broken, _ = _pair(negative_controls.accept_sampled_with(bug), seed=3)
      assert broken > 1, (bug, broken)


def test_greedy_acceptance():
  logits = jnp.log(jnp.array([[[0.1, 0.9, 0], [0.8, 0.1, 0.1], [0, 0, 1.0]]]) + 1e-9)   # argmax 1, 0, 2
  n, nxt = rejection.accept_greedy(jnp.array([[1, 0]]), logits)
  assert int(n[0]) == 2 and int(nxt[0]) == 2                  # all accepted: bonus token
  n, nxt = rejection.accept_greedy(jnp.array([[1, 2]]), logits)
  assert int(n[0]) == 1 and int(nxt[0]) == 0                  # correction at position 2
  n, nxt = rejection.accept_greedy(jnp.array([[0, 0]]), logits)
  assert int(n[0]) == 0 and int(nxt[0]) == 1
