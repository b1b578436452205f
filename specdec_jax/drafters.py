"""Drafters: propose k tokens per round, with the distributions they drew them from.

Every drafter is a frozen, hashable dataclass (static under jit) with:

  init_state(params, batch, cache_size) -> state
      after the target's prefill; `batch` holds the prompts.
  draft(params, state, tokens, lengths, keys, batch, greedy)
      -> (draft_tokens [B, k] int32, draft_probs [B, k, V] | None, state)
      tokens [B, S] is the sequence so far; row b holds lengths[b] tokens and
      the last is pending (not yet in any cache). In greedy mode probs may be
      None. Otherwise they must be exactly the (warped) distributions the
      tokens were sampled from: the rejection sampler's exactness needs it.
  commit(state, lengths) -> state
      after acceptance: rows now hold `lengths` tokens.

Kinds here: `NgramDrafter` (prompt lookup, no parameters) and
`DraftModelDrafter` (an independent small Gemma-architecture LM with its own
KV cache). Drafting runs under `lax.scan` where it is sequential.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from specdec_jax import sampling
from specdec_jax.config import ModelConfig
from specdec_jax.model import KVCache, Transformer


def _pending(tokens, lengths):
  return jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class NgramDrafter:
  """Prompt lookup: find the most recent earlier occurrence of the context's
  last n tokens (longest n first, from max_ngram down to min_ngram) and
  propose the k tokens that followed it. Deterministic, so q is one-hot.
  With no match it proposes the last token repeated (a cheap, usually wrong
  guess: the round still emits one token).
  """
  draft_len: int
  vocab_size: int
  max_ngram: int = 3
  min_ngram: int = 1

  def init_state(self, params, batch, cache_size):
    return ()

  def commit(self, state, lengths):
    return state

  def propose(self, tokens, lengths):
    """tokens [B, S], lengths [B] -> draft tokens [B, k]."""
    B, S = tokens.shape
    k, m = self.draft_len, self.max_ngram
    starts = jnp.arange(S)                                              # candidate j
    # suffix[b, i] = tokens[b, L - m + i]: the last m tokens (clamped at 0).
    suffix = jnp.take_along_axis(
        tokens, jnp.clip(lengths[:, None] - m + jnp.arange(m), 0, S - 1), axis=1)   # [B, m]
    # For each n, match[b, j] says tokens[b, j : j + n] equals the last n
    # tokens of the context (suffix[b, m - n:]).
    best_start = jnp.full((B,), -1, jnp.int32)
    for n in range(self.min_ngram, m + 1):
      match = jnp.ones((B, S), bool)
      for i in range(n):
        shifted = jnp.roll(tokens, -i, axis=1)                          # tokens[j + i]
        match &= shifted == suffix[:, m - n + i][:, None]
      # The match must end before the suffix starts being the suffix itself:
      # j + n <= L - 1, so the proposal tokens[j + n ...] already exist, and
      # the n-gram itself must not reach before 0 in the suffix (L >= n).
      valid = (starts[None, :] + n <= lengths[:, None] - 1) & (lengths[:, None] >= n)
      cand = jnp.max(jnp.where(match & valid, starts[None, :], -1), axis=1)   # most recent
      found = cand >= 0
      # Longer n-grams win: later iterations (larger n) overwrite.
      best_start = jnp.where(found, cand + n, best_start)
    idx = best_start[:, None] + jnp.arange(k)[None, :]                  # [B, k]
    # Past the known context (idx >= L) repeat the last known token.
    idx = jnp.where((best_start[:, None] >= 0) & (idx < lengths[:, None]), idx,
                    lengths[:, None] - 1)
    return jnp.take_along_axis(tokens, idx, axis=1).astype(jnp.int32)

  def draft(self, params, state, tokens, lengths, keys, batch, greedy):
    drafts = self.propose(tokens, lengths)
    probs = None if greedy else jax.nn.one_hot(drafts, self.vocab_size, dtype=jnp.float32)
    return drafts, probs, state


@dataclasses.dataclass(frozen=True)
class DraftModelDrafter:
  """An independent causal LM (same vocabulary) with its own KV cache.

  Its cache keeps the target's invariant: it holds lengths - 1 tokens. A draft
  feeds the pending token and then each drafted token (k steps under
  lax.scan), then feeds x_k body-only, so that after any acceptance count
  0..k the cache covers what the next round needs.
  """
  config: ModelConfig
  draft_len: int

  def _apply(self, params, tokens, cache, compute_logits=True):
    return Transformer(self.config).apply({'params': params}, tokens, cache,
                                          compute_logits=compute_logits)

  def init_state(self, params, batch, cache_size):
    cache = KVCache.init(self.config, batch.prompts.shape[0], cache_size)
    _, _, cache = self._apply(params, batch.prompts, cache, compute_logits=False)
    return cache.replace(lengths=batch.prompt_lengths - 1)

  def commit(self, state, lengths):
    return state.replace(lengths=lengths - 1)

  def draft(self, params, state, tokens, lengths, keys, batch, greedy):
    def step(carry, i):
      cache, tok = carry
      logits, _, cache = self._apply(params, tok[:, None], cache)
      logits = logits[:, 0]
      if greedy:
        nxt, probs = sampling.greedy(logits), None
      else:
        probs = sampling.warp(logits, batch.temperature, batch.top_k, batch.top_p)
        nxt = sampling.sample(jax.vmap(jax.random.fold_in, (0, None))(keys, i), probs)
      return (cache, nxt), (nxt, probs)

    (cache, last), (drafts, probs) = jax.lax.scan(
        step, (state, _pending(tokens, lengths)), jnp.arange(self.draft_len))
    _, _, cache = self._apply(params, last[:, None], cache, compute_logits=False)
    drafts = drafts.T                                                    # [B, k]
    probs = None if greedy else probs.transpose(1, 0, 2)                # [B, k, V]
    return drafts, probs, cache


def make_drafter(kind: str, *, draft_len: int, target_config: ModelConfig,
                 drafter_config: Optional[ModelConfig] = None, max_ngram: int = 3):
  if kind == 'ngram':
    return NgramDrafter(draft_len, target_config.vocab_size, max_ngram=max_ngram)
  if kind == 'draft_model':
    if drafter_config.vocab_size != target_config.vocab_size:
      raise ValueError(f'the drafter vocabulary ({drafter_config.vocab_size}) differs '
                       f"from the target's ({target_config.vocab_size})")
    return DraftModelDrafter(drafter_config, draft_len)
  raise ValueError(f'unknown drafter {kind!r}')
