"""Deliberately broken samplers and drafters: the tests' power checks.

Each is the real code with one realistic bug. An exactness test must reject
every variant aimed at it, or it could not catch that bug in the real code.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from specdec_jax import drafters, sampling
from specdec_jax.drafter_models import HeadsNet


BUGS = ('residual_not_renormalised', 'bonus_from_p_k', 'residual_from_p_next',
        'residual_with_q_next', 'keys_reused_across_rounds')
# Bugs only a row offering fewer drafts than its batch verifies can show
# (the dynamic draft-length policy): after every offered draft passed, the
# next token comes from the residual against the first unoffered draft's q
# instead of a bonus draw from p.
LIMIT_BUGS = ('unoffered_draft_residual',)


def accept_sampled_with(bug: str):
  """`rejection.accept_sampled` with one bug:

  - 'residual_not_renormalised': the replacement is drawn by inverse CDF
    from max(p_n - q_n, 0) as it is; the missing mass lands on the last
    vocabulary token (often outside the top-k / top-p support).
  - 'bonus_from_p_k': after k accepted drafts the bonus token comes from p_k
    instead of p_{k+1}.
  - 'residual_from_p_next': the replacement at a rejection of x_n uses
    p_{n+1} (an off-by-one in picking p_n), the bonus is right.
  - 'residual_with_q_next': the residual at a rejection of x_n subtracts
    q_{n+1} (an off-by-one in picking q_n).
  - 'keys_reused_across_rounds': the acceptance keys ignore the position
    (one key per row for every round).
  """
  assert bug in BUGS + LIMIT_BUGS, bug

  def accept(keys, draft_tokens, draft_probs, target_probs, limit=None, num_uniforms=None):
    B, k = draft_tokens.shape
    if bug == 'keys_reused_across_rounds':
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1234), i))(jnp.arange(B))
    u_key, r_key = jax.vmap(lambda key: jax.random.split(key))(keys).transpose(1, 0)
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(u_key)
    p_x = jnp.take_along_axis(target_probs[:, :k], draft_tokens[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0]
    n = jnp.sum(jnp.cumprod((u * q_x < p_x).astype(jnp.int32), axis=-1), axis=-1)
    if limit is not None:
      n = jnp.minimum(n, limit)
      if bug != 'unoffered_draft_residual':   # all offered passed: a bonus from p
        draft_probs = jnp.where((jnp.arange(k)[None, :] < limit[:, None])[..., None],
                                draft_probs, 0.0)
    p_at = n
    if bug == 'bonus_from_p_k':
      p_at = jnp.where(n == k, k - 1, n)
    if bug == 'residual_from_p_next':
      p_at = jnp.where(n < k, n + 1, n)
    p_n = jnp.take_along_axis(target_probs, p_at[:, None, None], axis=1)[:, 0]
    q_pad = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
    q_at = jnp.minimum(n + 1, k) if bug == 'residual_with_q_next' else n
    q_n = jnp.take_along_axis(q_pad, q_at[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_n - q_n, 0.0)
    if bug == 'residual_not_renormalised':
      v = jax.vmap(jax.random.uniform)(r_key)                                  # [B]
      below = jnp.cumsum(residual, axis=-1) <= v[:, None]
      nxt = jnp.minimum(jnp.sum(below, axis=-1), residual.shape[-1] - 1)
      return n, nxt.astype(jnp.int32)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_n)
    nxt = jax.vmap(jax.random.categorical)(r_key, jnp.log(residual)).astype(jnp.int32)
    return n, nxt

  return accept


@dataclasses.dataclass(frozen=True)
class BrokenDrafter:
  """A drafter whose q is not the distribution its drafts were drawn from.

  - 'drafted_without_warp' (draft_model): drafts are drawn from the raw
    logits (temperature, top-k, top-p ignored), q is the warped distribution.
  - 'q_of_previous_step' (mtp, or any sequential drafter): q_i is the
    distribution of step i - 1 (q_1 is right), an off-by-one when
    collecting the scan's outputs.
  - 'keys_shared_by_heads' (heads): every head draws with the row's key
    instead of its own, so the k drafts are not independent given the state.
  - 'model_q_for_lookup_rows' (mtp+lookup): every row reports the trained
    drafter's q, also the rows whose drafts came from prompt lookup.
  - 'unsure_by_drawn_token' (mtp+lookup with lookup_unsure): a row goes to
    its shorter match where the probability of the token the model drew is
    below the threshold, instead of the peak of its distribution: the choice
    then depends on the draw, and the model's offered drafts are no longer
    distributed as its q.
  - 'sampled_min_of_drawn_token' (mtp+lookup with sampled_min): a sampled
    row drafts by lookup where the model's q of the token it drew (not of
    lookup's first token) reaches the bar: the choice depends on the draw.
  """
  base: Any
  bug: str

  @property
  def draft_len(self):
    return self.base.draft_len

  def init_state(self, params, batch, cache_size):
    return self.base.init_state(params, batch, cache_size)

  def commit(self, state, lengths):
    return self.base.commit(state, lengths)

  def draft(self, params, state, tokens, lengths, keys, batch, greedy, target=None):
    if self.bug == 'drafted_without_warp':
      return self._draft_model_without_warp(params, state, tokens, lengths, keys, batch)
    if self.bug == 'keys_shared_by_heads':
      return self._heads_one_key(params, state, tokens, lengths, keys, batch, greedy, target)
    if self.bug == 'model_q_for_lookup_rows':
      d, _, state = self.base.draft(params, state, tokens, lengths, keys, batch, greedy, target)
      _, q, _ = self.base.model.draft(params, state, tokens, lengths, keys, batch, greedy, target)
      return d, q, state
    if self.bug == 'sampled_min_of_drawn_token':
      return self._sampled_min_of_drawn_token(params, state, tokens, lengths, keys, batch,
                                              greedy, target)
    if self.bug == 'unsure_by_drawn_token':
      return self._unsure_by_drawn_token(params, state, tokens, lengths, keys, batch, greedy,
                                         target)
    assert self.bug == 'q_of_previous_step', self.bug
    d, q, state = self.base.draft(params, state, tokens, lengths, keys, batch, greedy, target)
    return d, jnp.concatenate([q[:, :1], q[:, :-1]], axis=1), state

  def _unsure_by_drawn_token(self, params, state, tokens, lengths, keys, batch, greedy, target):
    base = self.base                                     # a LookupDrafter with `short`
    m_drafts, m_q, _ = base.model.draft(params, state, tokens, lengths, keys, batch, greedy,
                                        target)
    start = base.lookup._match(tokens, lengths)
    s_start = base.short._match(tokens, lengths)
    drawn_q = jnp.take_along_axis(m_q[:, 0], m_drafts[:, :1], axis=1)[:, 0]
    start = jnp.where(start >= 0, start, jnp.where(drawn_q < base.unsure, s_start, -1))
    use = start >= 0
    l_drafts, l_q, _ = base.lookup.proposal(start, tokens, lengths, greedy)
    pick = lambda a, b: jnp.where(use.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    return pick(l_drafts, m_drafts), pick(l_q, m_q), state

  def _sampled_min_of_drawn_token(self, params, state, tokens, lengths, keys, batch, greedy,
                                  target):
    base = self.base                                     # a LookupDrafter with sampled_min
    m_drafts, m_q, _ = base.model.draft(params, state, tokens, lengths, keys, batch, greedy,
                                        target)
    start = base.lookup._match(tokens, lengths)
    drawn_q = jnp.take_along_axis(m_q[:, 0], m_drafts[:, :1], axis=1)[:, 0]
    use = (start >= 0) & (drawn_q >= base.sampled_min)
    l_drafts, l_q, _ = base.lookup.proposal(start, tokens, lengths, greedy)
    pick = lambda a, b: jnp.where(use.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
    return pick(l_drafts, m_drafts), pick(l_q, m_q), state

  def _draft_model_without_warp(self, params, state, tokens, lengths, keys, batch):
    # DraftModelDrafter.draft (sampled) with one change: the draw's logits.
    base = self.base

    def step(carry, i):
      cache, tok = carry
      logits, _, cache = base._apply(params, tok[:, None], cache)
      probs = sampling.warp(logits[:, 0], batch.temperature, batch.top_k, batch.top_p)
      step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
      nxt = jax.vmap(jax.random.categorical)(step_keys, logits[:, 0]).astype(jnp.int32)
      return (cache, nxt), (nxt, probs)

    (cache, last), (drafts, q) = jax.lax.scan(
        step, (state, drafters._pending(tokens, lengths)), jnp.arange(base.draft_len))
    _, _, cache = base._apply(params, last[:, None], cache, compute_logits=False)
    return drafts.T, q.transpose(1, 0, 2), cache

  def _heads_one_key(self, params, state, tokens, lengths, keys, batch, greedy, target):
    # HeadsDrafter.draft with one change: it folds the head index into each
    # row's key; here all k heads draw with the row's key itself.
    base, k = self.base, self.draft_len
    sub, embed = base._inputs(params, target)
    logits = HeadsNet(base.config).apply({'params': params['net']},
                                         embed(drafters._pending(tokens, lengths)),
                                         target.hidden[:, None], sub)[:, 0, :k]
    B = logits.shape[0]
    rep = lambda x: jnp.repeat(x, k)
    flat = batch.replace(temperature=rep(batch.temperature), top_k=rep(batch.top_k),
                         top_p=rep(batch.top_p))
    nxt, probs, _ = drafters._pick(logits.reshape(B * k, -1), params['vocab'], jnp.repeat(keys, k),
                                flat, greedy, base.config.target.vocab_size)
    return nxt.reshape(B, k), probs.reshape(B, k, -1), state


@dataclasses.dataclass(frozen=True)
class DrawnTokenConfidence:
  """A drafter whose confidence is the drawn token's own probability q_i(x_i)
  instead of the peak of q_i: the dynamic policy then offers x_i depending on
  its value, so the offered drafts no longer follow q_i (sampling only)."""
  base: object

  @property
  def draft_len(self):
    return self.base.draft_len

  def with_draft_len(self, k):
    return DrawnTokenConfidence(drafters.with_draft_len(self.base, k))

  def init_state(self, params, batch, cache_size):
    return self.base.init_state(params, batch, cache_size)

  def commit(self, state, lengths):
    return self.base.commit(state, lengths)

  def catch_up(self, params, state, tokens, lengths):
    return self.base.catch_up(params, state, tokens, lengths)

  def draft(self, *args):
    return self.draft_scored(*args)[:3]

  def draft_scored(self, *args):
    d, q, state, _ = self.base.draft_scored(*args)
    return d, q, state, jnp.take_along_axis(q, d[..., None], axis=-1)[..., 0]

