"""Drafters: propose k tokens per round, with the distributions they drew them from.

Every drafter is a frozen, hashable dataclass (static under jit) with:

  init_state(params, batch, cache_size) -> state
      after the target's prefill; `batch` holds the prompts.
  draft(params, state, tokens, lengths, keys, batch, greedy, target)
      -> (draft_tokens [B, k] int32, draft_probs [B, k, V] | None, state)
      tokens [B, S] is the sequence so far; row b holds lengths[b] tokens and
      the last is pending (not yet in any cache). `target` is a TargetView:
      the target's embedding, its KV cache and its hidden state at the last
      accepted position (what target-conditioned drafters read). In greedy
      mode probs may be None. Otherwise they must be exactly the (warped)
      distributions the tokens were sampled from: the rejection sampler's
      exactness needs it.
  commit(state, lengths) -> state
      after acceptance: rows now hold `lengths` tokens.

Optionally, `draft_scored(...)` (same arguments as `draft`) returns
(drafts, probs, state, confidence [B, k] float32): how sure the drafter is
at each step, a function of what it knew *before* drawing that token (the
peak of q_i; 1 / 0 for ngram's found / made-up tokens), which the dynamic
draft-length policy (policy.py) reads; a drafter without it counts as
confident. A drafter with state that an autoregressive step invalidates gives
`catch_up(params, state, tokens, lengths)`, run instead of a draft when the
round is a plain step (DraftModelDrafter feeds its cache the pending token).

Optionally, `has_draft(tokens, lengths) -> [B] bool`: a drafter that can
abstain says per row whether it has a proposal worth a verify pass. A round
in which every unfinished row abstains is a plain autoregressive step (one
target call on one token: ~1 decode step instead of a verify pass over k+1);
in a mixed round the abstaining rows accept nothing and draw their token as an
autoregressive step would. The decision must depend only on the sequence so
far (never on the drafted tokens' values), which keeps sampling exact, and
such a drafter must keep no state that an autoregressive step invalidates.

Kinds here: `NgramDrafter` (prompt lookup, no parameters),
`DraftModelDrafter` (an independent small Gemma-architecture LM with its own
KV cache), and the trained target-conditioned kinds `MTPDrafter` (Gemma 4
style, recurrent, reads the target's KV cache) and `HeadsDrafter` (k parallel
heads); their networks live in drafter_models.py. `LookupDrafter`
(`with_lookup`) puts prompt lookup in front of a stateless trained drafter:
per row, lookup's proposal where the context's last n tokens occurred
earlier, the trained drafter's elsewhere. Drafting runs under
`lax.scan` where it is sequential, fully unrolled (k is small): as a loop,
XLA:CPU copied the closed-over target embedding (335 MB in bf16 for Gemma 3
270M) on every draft, and an MTP draft of 2-4 tokens cost ~360 ms instead of
5-7 ms (measured with draft_part on this CPU, commit message has the probe).
"""
import dataclasses
import math
from typing import Optional
import jax
import jax.numpy as jnp
from flax import struct

from specdec_jax import sampling
from specdec_jax.config import ModelConfig
from specdec_jax.drafter_models import DrafterConfig, HeadsNet, MTPNet
from specdec_jax.model import KVCache, build, take_rows


@struct.dataclass
class TargetView:
  """What a target-conditioned drafter may read at the start of a round."""
  embedding: jax.Array   # [V, D] the target's tied embedding table
  cache: KVCache         # the target's cache: positions 0 .. lengths - 2
  hidden: jax.Array      # [B, D] final-normed hidden at position lengths - 2
                         # (the state that predicted the pending token)


def _pending(tokens, lengths):
  return jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]


@dataclasses.dataclass(frozen=True)
class NgramDrafter:
  """Prompt lookup: find the most recent earlier occurrence of the context's
  last n tokens (longest n first, from max_ngram down to min_ngram) and
  propose the k tokens that followed it. Deterministic, so q is one-hot.
  With no match of at least min_ngram tokens it abstains (`has_draft`): a
  verify pass over guesses would cost more than the autoregressive step it
  replaces. In a batch where other rows do verify, its draft is the last
  token repeated, and the round treats the row as abstaining.
  """
  draft_len: int
  vocab_size: int
  max_ngram: int = 3
  min_ngram: int = 1

  def init_state(self, params, batch, cache_size):
    return ()

  def commit(self, state, lengths):
    return state

  def _match(self, tokens, lengths):
    """[B] int32: where the proposal starts in `tokens` (-1: no match)."""
    B, S = tokens.shape
    m = self.max_ngram
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
    return best_start

  def has_draft(self, tokens, lengths):
    return self._match(tokens, lengths) >= 0

  def propose(self, tokens, lengths):
    """tokens [B, S], lengths [B] -> draft tokens [B, k]."""
    return self.draft_scored(None, (), tokens, lengths, None, None, True)[0]

  def draft(self, params, state, tokens, lengths, keys, batch, greedy, target=None):
    return self.draft_scored(params, state, tokens, lengths, keys, batch, greedy, target)[:3]

  def draft_scored(self, params, state, tokens, lengths, keys, batch, greedy, target=None):
    drafts, probs, conf = self.proposal(self._match(tokens, lengths), tokens, lengths, greedy)
    return drafts, probs, state, conf

  def proposal(self, best_start, tokens, lengths, greedy):
    """(drafts [B, k], q [B, k, V] or None, confidence [B, k]) from `_match`'s
    starts."""
    idx = best_start[:, None] + jnp.arange(self.draft_len)[None, :]    # [B, k]
    # Past the known context (idx >= L) the proposal is made up: the last
    # known token repeated, with confidence 0.
    found = (best_start[:, None] >= 0) & (idx < lengths[:, None])
    idx = jnp.where(found, idx, lengths[:, None] - 1)
    drafts = jnp.take_along_axis(tokens, idx, axis=1).astype(jnp.int32)
    probs = None if greedy else jax.nn.one_hot(drafts, self.vocab_size, dtype=jnp.float32)
    return drafts, probs, found.astype(jnp.float32)


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
    return build(self.config).apply({'params': params}, tokens, cache,
                                          compute_logits=compute_logits)

  def init_state(self, params, batch, cache_size):
    cache = KVCache.init(self.config, batch.prompts.shape[0], cache_size)
    _, _, cache = self._apply(params, batch.prompts, cache, compute_logits=False)
    return cache.replace(lengths=batch.prompt_lengths - 1)

  def commit(self, state, lengths):
    return state.replace(lengths=lengths - 1)

  def catch_up(self, params, state, tokens, lengths):
    """A plain target step consumed the pending token: feed it to our cache too."""
    _, _, cache = self._apply(params, _pending(tokens, lengths)[:, None], state,
                              compute_logits=False)
    return cache

  def draft(self, params, state, tokens, lengths, keys, batch, greedy, target=None):
    return self.draft_scored(params, state, tokens, lengths, keys, batch, greedy, target)[:3]

  def draft_scored(self, params, state, tokens, lengths, keys, batch, greedy, target=None):
    def step(carry, i):
      cache, tok = carry
      logits, _, cache = self._apply(params, tok[:, None], cache)
      step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
      nxt, probs, conf = _draw(logits[:, 0], step_keys, batch, greedy)
      return (cache, nxt), (nxt, probs, conf)

    (cache, last), (drafts, probs, conf) = jax.lax.scan(
        step, (state, _pending(tokens, lengths)), jnp.arange(self.draft_len), unroll=True)
    _, _, cache = self._apply(params, last[:, None], cache, compute_logits=False)
    drafts = drafts.T                                                    # [B, k]
    probs = None if greedy else probs.transpose(1, 0, 2)                # [B, k, V]
    return drafts, probs, cache, conf.T


def _draw(logits, keys, batch, greedy):
  """One draft token per row from logits [B, V'] -> (ids [B], probs [B, V'] or
  None when greedy, confidence [B]).

  The confidence is the peak of the distribution the token is drawn from
  (greedy: of the plain softmax, whose peak is the drafted token), never the
  drawn token's own probability: whether a draft is offered to the target
  may depend on q but not on the token drawn from it, or the offered drafts
  are no longer distributed as q and the rejection sampler stops being exact
  (tests/test_policy.py's power check shows the difference).
  """
  if greedy:
    idx = sampling.greedy(logits)
    conf = jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
    return idx, None, conf
  probs = sampling.warp(logits, batch.temperature, batch.top_k, batch.top_p)
  idx = sampling.sample(keys, probs)
  return idx, probs, jnp.max(probs, axis=-1)


def _pick(logits, vocab, keys, batch, greedy, vocab_size):
  """Draws from reduced-vocabulary logits [B, R]; returns target ids [B], the
  full-vocabulary draft distribution [B, V] (zero outside the subset; None
  when greedy) and the confidence [B]."""
  idx, probs, conf = _draw(logits, keys, batch, greedy)
  if greedy:
    return vocab[idx], None, conf
  full = jnp.zeros((logits.shape[0], vocab_size), jnp.float32)
  full = full.at[:, vocab].set(probs, unique_indices=True)
  return vocab[idx], full, conf


class Stateless:
  """init_state / commit / draft of a drafter with no state of its own, whose
  `draft_scored` does the work."""

  def init_state(self, params, batch, cache_size):
    return ()

  def commit(self, state, lengths):
    return state

  def draft(self, params, state, tokens, lengths, keys, batch, greedy, target):
    return self.draft_scored(params, state, tokens, lengths, keys, batch, greedy, target)[:3]


class _Trained(Stateless):
  """Shared parts of the trained drafters: params = {'net': ..., 'vocab': [R]}."""

  def _inputs(self, params, target):
    t = self.config.target
    E = target.embedding
    # The head's rows stay in the target's weight dtype: gathered, not converted
    # (bf16 rows multiply as every bf16 weight does, model.matmul).
    sub = take_rows(E, params['vocab'])                                   # [R, D]
    scale = jnp.asarray(math.sqrt(t.embed_dim), t.jnp_dtype)
    embed = lambda tok: (take_rows(E, tok).astype(t.jnp_dtype) * scale)[:, None, :]
    return sub, embed


@dataclasses.dataclass(frozen=True)
class MTPDrafter(_Trained):
  """Gemma-4-style multi-token-prediction drafter (see drafter_models.MTPNet)."""
  config: DrafterConfig
  draft_len: int

  def draft_scored(self, params, state, tokens, lengths, keys, batch, greedy, target):
    cfg = self.config
    sub, embed = self._inputs(params, target)
    q_pos = (lengths - 1)[:, None]                                       # the pending token
    kvs = tuple((target.cache.k[l], target.cache.v[l]) for l in cfg.kv_layers)
    net = MTPNet(cfg)

    def step(carry, i):
      h, tok = carry
      h, logits = net.apply({'params': params['net']}, embed(tok), h[:, None], q_pos, kvs, sub)
      step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
      nxt, probs, conf = _pick(logits[:, 0], params['vocab'], step_keys, batch, greedy,
                               cfg.target.vocab_size)
      return (h[:, 0], nxt), (nxt, probs, conf)

    _, (drafts, probs, conf) = jax.lax.scan(
        step, (target.hidden, _pending(tokens, lengths)), jnp.arange(self.draft_len),
        unroll=True)
    return drafts.T, (None if greedy else probs.transpose(1, 0, 2)), state, conf.T


@dataclasses.dataclass(frozen=True)
class HeadsDrafter(_Trained):
  """k parallel heads on one target hidden state (see drafter_models.HeadsNet)."""
  config: DrafterConfig
  draft_len: int

  def draft_scored(self, params, state, tokens, lengths, keys, batch, greedy, target):
    cfg, k = self.config, self.draft_len
    sub, embed = self._inputs(params, target)
    logits = HeadsNet(cfg).apply({'params': params['net']}, embed(_pending(tokens, lengths)),
                                 target.hidden[:, None], sub)[:, 0, :k]  # [B, k, R]
    B = logits.shape[0]
    # Each head's draw is independent of the others, so q_i is exactly the
    # distribution token i was drawn from whatever was drawn before it.
    step_keys = jax.vmap(lambda key: jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(k)))(keys).reshape(-1)
    rep = lambda x: jnp.repeat(x, k)
    flat_batch = batch.replace(temperature=rep(batch.temperature), top_k=rep(batch.top_k),
                               top_p=rep(batch.top_p))
    nxt, probs, conf = _pick(logits.reshape(B * k, -1), params['vocab'], step_keys, flat_batch,
                             greedy, cfg.target.vocab_size)
    return (nxt.reshape(B, k),
            None if greedy else probs.reshape(B, k, -1), state, conf.reshape(B, k))


@dataclasses.dataclass(frozen=True)
class LookupDrafter(Stateless):
  """Prompt lookup first, a trained drafter for the rest: a row whose last
  `lookup.min_ngram`+ tokens occurred earlier in its sequence drafts what
  followed them (NgramDrafter), every other row takes `model`'s draft
  (an MTP / heads drafter or a Gemma 4 assistant: stateless, so a round that
  drafts from lookup leaves nothing for it to catch up). The choice is made
  per row from the sequence so far, never from a drafted token, and each
  row's q is the one its tokens were drawn from (lookup's one-hot or the
  model's warped distribution), so greedy and sampled outputs stay the
  target's exactly. When every row has a match, the model is not run.

  With `unsure` > 0 (and lookup >= 2) a row without such a match also
  drafts by lookup from a shorter one (1 .. lookup - 1 tokens; `short`)
  where the model's first-position confidence -- the peak of its first
  draft distribution, a function of the context alone -- is below `unsure`:
  short matches where the model is unsure, the model where it is sure.

  Sampling, a lookup draft is a one-hot q: its first token is accepted with
  the target's probability of it, where the model's own draft is accepted
  with sum(min(p, q)). With `sampled_min` > 0 a sampled row (temperature >
  0) drafts by lookup only where the model's q at position 1 gives lookup's
  first token at least `sampled_min` (a function of the context alone, so
  the offered drafts stay distributed as the chosen q); greedy rows keep the
  rule above. The model then runs every sampled round.
  """
  lookup: NgramDrafter
  model: object
  short: Optional[NgramDrafter] = None
  unsure: float = 0.0
  sampled_min: float = 0.0

  @property
  def draft_len(self):
    return self.model.draft_len

  def with_draft_len(self, k: int):
    return dataclasses.replace(
        self, lookup=dataclasses.replace(self.lookup, draft_len=k),
        model=with_draft_len(self.model, k),
        short=self.short and dataclasses.replace(self.short, draft_len=k))

  def draft_scored(self, params, state, tokens, lengths, keys, batch, greedy, target):
    start = self.lookup._match(tokens, lengths)                          # [B], -1: none
    found = start >= 0
    # One lookup proposal per round, built in the branch that uses it.
    lookup_only = lambda _: self.lookup.proposal(start, tokens, lengths, greedy)

    def with_model(_):
      m_drafts, m_q, _, m_conf = _scored(self.model, params, state, tokens, lengths, keys,
                                         batch, greedy, target)
      use, at = found, start
      if self.short is not None and self.unsure > 0:
        s_start = self.short._match(tokens, lengths)
        # m_conf[:, 0] is the peak of q at position 1: it does not depend on
        # the token drawn, so the offered drafts stay distributed as q.
        by_short = ~found & (s_start >= 0) & (m_conf[:, 0] < self.unsure)
        use, at = found | by_short, jnp.where(by_short, s_start, start)
      l_drafts, l_q, l_conf = self.lookup.proposal(at, tokens, lengths, greedy)
      if not greedy and self.sampled_min > 0:
        # The model's probability of lookup's first token: context only.
        q_first = jnp.take_along_axis(m_q[:, 0], l_drafts[:, :1], axis=-1)[:, 0]
        use = use & ((batch.temperature <= 0) | (q_first >= self.sampled_min))
      pick = lambda a, b: jnp.where(use.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
      return (pick(l_drafts, m_drafts), None if greedy else pick(l_q, m_q),
              pick(l_conf, m_conf))

    if not greedy and self.sampled_min > 0:
      drafts, q, conf = with_model(None)
    else:
      drafts, q, conf = jax.lax.cond(jnp.all(found), lookup_only, with_model, None)
    return drafts, q, state, conf


# The +lookup kinds' default `unsure`: on the held-out prompts (k = 4, greedy)
# 0 / 0.4 / 0.7 gave code 2.80 / 2.80 / 2.82, prose 1.63 / 1.67 / 1.70, chat
# 3.07 / 3.07 / 3.10 tokens per call (docs/BENCHMARKS.md section 10).
LOOKUP_UNSURE = 0.7
# ... and `sampled_min`'s: at T = 1 on 20 held-out code prompts (k = 4) mtp
# alone gave 1.82 tokens per call, mtp+lookup with sampled_min 0 / 0.3 / 0.6
# 1.74 / 1.78 / 1.74 (docs/BENCHMARKS.md section 11): sampling, lookup only
# where the trained drafter is certain of its token.
LOOKUP_SAMPLED_MIN = 1.0


def with_lookup(model, lookup: int, max_ngram: int = 3, unsure: float = 0.0,
                sampled_min: float = 0.0):
  """`model` with prompt lookup first: rows with an earlier occurrence of
  their last `lookup` .. max(lookup, max_ngram) tokens draft from it; with
  `unsure` > 0 also rows with a shorter match whose model is less sure than
  that at its first draft; with `sampled_min` > 0 a sampled row only where
  the model gives lookup's first token at least that probability."""
  if lookup < 1:
    raise ValueError(f'lookup must be >= 1 (0 = off), got {lookup}')
  if not 0 <= unsure <= 1:
    raise ValueError(f'lookup_unsure must be in [0, 1] (0 = off), got {unsure}')
  if not 0 <= sampled_min <= 1:
    raise ValueError(f'lookup_sampled_min must be in [0, 1] (0 = off), got {sampled_min}')
  if isinstance(model, (NgramDrafter, DraftModelDrafter, LookupDrafter)):
    raise ValueError('prompt lookup first applies to the stateless trained drafters (mtp, heads, '
                     f'a Gemma 4 assistant), not {type(model).__name__}')
  V = model.config.target.vocab_size
  short = (NgramDrafter(model.draft_len, V, max_ngram=lookup - 1, min_ngram=1)
           if unsure > 0 and lookup > 1 else None)
  return LookupDrafter(NgramDrafter(model.draft_len, V, max_ngram=max(lookup, max_ngram),
                                    min_ngram=lookup), model, short, float(unsure) if short else 0.0,
                      float(sampled_min))


def _scored(drafter, *args):
  """drafter.draft_scored(*args), or its draft with full confidence."""
  if hasattr(drafter, 'draft_scored'):
    return drafter.draft_scored(*args)
  drafts, q, state = drafter.draft(*args)
  return drafts, q, state, jnp.ones(drafts.shape, jnp.float32)


def with_draft_len(drafter, k: int):
  """The same drafter proposing k tokens (the policy compiles one per length)."""
  if hasattr(drafter, 'with_draft_len'):
    return drafter.with_draft_len(k)
  return dataclasses.replace(drafter, draft_len=k)


def check_compatible(dcfg: DrafterConfig, target_config: ModelConfig):
  """Raises ValueError unless a trained drafter fits this target's shapes."""
  keys = ('vocab_size', 'embed_dim', 'num_layers', 'num_kv_heads', 'head_dim')
  bad = [f'{k} {getattr(dcfg.target, k)} vs {getattr(target_config, k)}' for k in keys
         if getattr(dcfg.target, k) != getattr(target_config, k)]
  if bad:
    raise ValueError('the drafter was trained for another target (' + ', '.join(bad) + ')')


def make_drafter(kind: str, *, draft_len: int, target_config: ModelConfig,
                 drafter_config=None, max_ngram: int = 3, min_ngram: int = 1):
  """A drafter of `kind`; `drafter_config` is a ModelConfig for 'draft_model'
  and a DrafterConfig for 'mtp' / 'heads'."""
  if kind == 'ngram':
    return NgramDrafter(draft_len, target_config.vocab_size, max_ngram=max_ngram,
                        min_ngram=min_ngram)
  if kind == 'draft_model':
    if drafter_config.vocab_size != target_config.vocab_size:
      raise ValueError(f'the drafter vocabulary ({drafter_config.vocab_size}) differs '
                       f"from the target's ({target_config.vocab_size})")
    return DraftModelDrafter(drafter_config, draft_len)
  if kind in ('mtp', 'heads'):
    if not isinstance(target_config, ModelConfig):
      raise ValueError(f'our own {kind} drafters are built for Gemma 3 targets (they read its '
                       'single-shape KV cache); for a Gemma 4 target use its official '
                       'assistant (drafter=mtp, drafter_checkpoint=<gemma4_assistant folder>) '
                       'or drafter=ngram / draft_model')
    if drafter_config.kind != kind:
      raise ValueError(f'the checkpoint holds a {drafter_config.kind!r} drafter, not {kind!r}')
    check_compatible(drafter_config, target_config)
    if draft_len > drafter_config.max_draft_len:
      raise ValueError(f'draft_len={draft_len} exceeds the drafter\'s '
                       f'{drafter_config.max_draft_len} heads')
    cls = MTPDrafter if kind == 'mtp' else HeadsDrafter
    # Run at the target's dtypes (the drafter shares its embedding and cache).
    return cls(dataclasses.replace(drafter_config, target=target_config), draft_len)
  raise ValueError(f'unknown drafter {kind!r}')
