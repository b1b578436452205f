"""The exact acceptance rule of speculative sampling, jit-compatible.

Leviathan et al. 2023 / Chen et al. 2023. The drafter proposed x_1..x_k,
drawn from q_1..q_k; one target pass gave p_1..p_{k+1}. Accept x_i with
probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection draw the
replacement from the residual norm(max(p_i - q_i, 0)); if all k pass, draw a
bonus token from p_{k+1}. Every row of the batch accepts its own number n of
drafts and emits n + 1 tokens. The emitted tokens are distributed exactly as
k+1 autoregressive draws from p. Greedy decoding is the T -> 0 limit: accept
while x_i is the argmax of p_i, then emit the argmax at the first mismatch.

Depends only on `sampling` (its argmax); p and q arrive already warped
(temperature / top-k / top-p applied to both by `sampling.warp`).
"""
import jax
import jax.numpy as jnp

from specdec_jax import sampling
from specdec_jax.sampling import argmax


def _leading_true(accepted):
  """Number of leading True values per row: [B, k] bool -> [B] int32."""
  return jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=-1), axis=-1)


def _offered(draft_tokens, limit):
  """[B, k] bool: draft i is offered to the target (i < limit[b]); all when
  limit is None. A row offering fewer drafts than the batch verifies (the
  dynamic policy, an abstaining ngram row) accepts at most its own."""
  B, k = draft_tokens.shape
  if limit is None:
    return jnp.ones((B, k), bool)
  return jnp.arange(k)[None, :] < limit[:, None]


def accept_greedy(draft_tokens, target_logits, limit=None):
  """draft_tokens [B, k], target_logits [B, k+1, V] -> (n [B], next_token [B]).

  n = how many drafts equal the target's argmax (at most limit [B], when
  given); next_token = the target's argmax right after them (the correction,
  or the bonus token when every offered draft passed).
  """
  best = argmax(target_logits)                                        # [B, k+1]
  n = _leading_true((draft_tokens == best[:, :-1]) & _offered(draft_tokens, limit))
  return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def accept_sampled(keys, draft_tokens, draft_probs, target_probs, limit=None,
                   num_uniforms=None):
  """The rejection sampler.

  keys [B] PRNG keys; draft_tokens [B, k]; draft_probs q [B, k, V] (the
  distributions the drafts were drawn from); target_probs p [B, k+1, V].
  limit [B] (optional): drafts offered per row; the first n = limit drafts
  that pass emit a bonus token from p_{n+1} (a draft not offered was never a
  proposal, so no residual applies). num_uniforms (static, >= k): draw that
  many uniforms and use the first k, so a row's acceptance does not depend on
  the verify length its batch chose.
  Returns (n [B] accepted drafts, next_token [B]).
  """
  B, k = draft_tokens.shape
  offered = _offered(draft_tokens, limit)
  u_key, r_key = jax.vmap(lambda key: jax.random.split(key))(keys).transpose(1, 0)
  u = jax.vmap(lambda key: jax.random.uniform(key, (num_uniforms or k,)))(u_key)[:, :k]   # [B, k]
  p_x = jnp.take_along_axis(target_probs[:, :k], draft_tokens[..., None], axis=-1)[..., 0]
  q_x = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0]
  # u < p/q, written without the division (q_x > 0 for a token drawn from q).
  n = _leading_true((u * q_x < p_x) & offered)                           # [B]

  # The distribution of the token emitted after the n accepted drafts: the
  # residual at a rejection (n < k), or p_{k+1} itself for the bonus token.
  p_n = jnp.take_along_axis(target_probs, n[:, None, None], axis=1)[:, 0]          # [B, V]
  q_pad = jnp.concatenate([draft_probs, jnp.zeros_like(draft_probs[:, :1])], axis=1)
  q_n = jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0]                 # [B, V]
  if limit is not None:
    # Every offered draft passed: the next token is a bonus draw from p.
    q_n = jnp.where((n < limit)[:, None], q_n, 0.0)
  residual = jnp.maximum(p_n - q_n, 0.0)
  mass = jnp.sum(residual, axis=-1, keepdims=True)
  # mass > 0 whenever a rejection happened (p(x) < q(x) there); the guard only
  # covers float round-off, where p and q agree and p is the right answer.
  residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_n)
  nxt = sampling.sample(r_key, residual)
  return n, nxt
