"""Generation, the whole loop on device: autoregressive or speculative.

    gen = Generator(model_config, cache_size=512, greedy=True)        # plain AR
    gen = Generator(model_config, cache_size=512, greedy=True,
                    drafter=NgramDrafter(4, vocab))                   # speculative
    batch = make_batch(prompt_ids_list, batch_size=8, bucket_len=64,
                       max_new_tokens=64, keys=keys)
    state = gen.generate(params, batch, drafter_params)  # one jitted lax.while_loop

`Generator` is a frozen dataclass of static, hashable fields (the jit cache
keys on it): the model config, the cache size, whether sampling is greedy,
and the drafter (which carries k); the prompt bucket is the prompt array's
shape. Everything that varies
per call is an array in `Batch` / `DecodeState` (prompt lengths, token limits,
temperature, top-k, top-p, PRNG keys), so a new prompt length within a bucket
or a new temperature reuses the compiled program.

Invariant shared with speculative decoding: row b holds `lengths[b]` tokens in
`tokens`; the KV cache holds the first `lengths[b] - 1` of them, and the last
one is *pending* (the next target call feeds it). Prefill therefore runs the
prompt body without the LM head, and the first step feeds the last prompt token.
"""
import dataclasses
import functools
from typing import Any, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from specdec_jax import policy as policy_lib
from specdec_jax import rejection, sampling
from specdec_jax import trace as trace_lib
from specdec_jax import tree as tree_lib
from specdec_jax import tree_proposals
from specdec_jax.config import ModelConfig, is_eos
from specdec_jax.drafters import TargetView, with_draft_len
from specdec_jax.model import KVCache, build


@struct.dataclass
class Batch:
  """A padded batch of prompts and its per-row settings (all arrays)."""
  prompts: jax.Array          # [B, P] int32, right-padded; P is the bucket
  prompt_lengths: jax.Array   # [B] int32, >= 1
  limits: jax.Array           # [B] int32: max total length (prompt + new tokens)
  keys: jax.Array             # [B] PRNG keys, one stream per row
  temperature: jax.Array      # [B] float32; 0 = greedy
  top_k: jax.Array            # [B] int32; 0 = off
  top_p: jax.Array            # [B] float32; 1 = off
  active: jax.Array           # [B] bool; False for rows that only pad the batch


@struct.dataclass
class DecodeState:
  tokens: jax.Array           # [B, S] int32: prompt then generated; slot == position
  lengths: jax.Array          # [B] int32: tokens held; the last one is pending
  done: jax.Array             # [B] bool
  cache: KVCache              # target cache over tokens[:, :lengths - 1]
  hidden: jax.Array           # [B, D] target's final-normed hidden at position
                              # lengths - 2 (it predicted the pending token)
  target_calls: jax.Array     # [B] int32: target calls while the row was active
  draft_calls: jax.Array      # [B] int32: those that verified a draft (the rest
                              # were autoregressive steps: the drafter abstained)
  accepted: jax.Array         # [B, k] int32: rounds in which draft i was accepted
  step: jax.Array             # [] int32: rounds run
  verify_rounds: jax.Array    # [] int32: those that verified drafts
  batch: Batch
  drafter_state: Any = None
  policy: Any = None          # policy.PolicyState when the draft length is dynamic
  trace: Any = None           # trace.Trace with Generator(trace=True) and a drafter


def bucket(n: int, minimum: int = 16) -> int:
  """Prompt lengths are padded to powers of two: few shapes, few compiles."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Generator:
  config: ModelConfig
  cache_size: int
  greedy: bool = True
  drafter: Any = None         # None: plain autoregressive decoding
  # policy.DraftPolicy: each round chooses its draft length among policy.ks
  # (0 = a plain step; the largest is the drafter's draft_len). None: always
  # draft_len, except rounds where an abstaining drafter has nothing.
  policy: Any = None
  # tree.TreeShape or tree.DynamicTree: each round verifies a tree of drafts
  # in one pass (`_tree_step`); the drafter's draft_len is its depth. None: a chain.
  tree: Any = None
  # Record each verify round's drafts and acceptance per row (trace.py);
  # False leaves the state and the compiled program as they were.
  trace: bool = False

  def __post_init__(self):
    if self.policy is not None:
      if self.drafter is None:
        raise ValueError('a draft-length policy needs a drafter')
      if self.policy.max_k != self.drafter.draft_len:
        raise ValueError(f'the policy\'s largest draft length {self.policy.max_k} must be '
                         f'the drafter\'s draft_len {self.drafter.draft_len}')
    if self.tree is not None:
      tree_lib.check_tree_generator(self)

  @property
  def draft_len(self) -> int:
    return 0 if self.drafter is None else self.drafter.draft_len

  @property
  def model(self):
    return build(self.config)

  def call_target(self, params, tokens, cache, compute_logits=True):
    return self.model.apply({'params': params}, tokens, cache,
                            compute_logits=compute_logits)

  def next_tokens(self, logits, batch: Batch, positions, probs=None):
    """Draws each row's next token from logits [B, V] for the given positions
    (`probs`: their warped distribution, when already computed)."""
    if self.greedy:
      return sampling.greedy(logits)
    if probs is None:
      probs = sampling.warp(logits, batch.temperature, batch.top_k, batch.top_p)
    # The key depends on (row stream, position) only: a row's sample is the
    # same whatever else shares its batch.
    keys = jax.vmap(jax.random.fold_in)(batch.keys, positions)
    return sampling.sample(keys, probs)

  @functools.partial(jax.jit, static_argnames=('self',))
  def prefill(self, params, batch: Batch, drafter_params=None,
              policy_params=None) -> DecodeState:
    """policy_params: a policy.PolicyParams, required with a policy."""
    B, P = batch.prompts.shape
    if (self.policy is None) != (policy_params is None):
      raise ValueError('policy_params go with a policy, and a policy needs them')
    cache = KVCache.init(self.config, B, self.cache_size)
    _, hidden, cache = self.call_target(params, batch.prompts, cache, compute_logits=False)
    # The state that predicted the pending (last prompt) token; a 1-token
    # prompt has none, and gets zeros.
    last = jnp.maximum(batch.prompt_lengths - 2, 0)
    hidden = jnp.where((batch.prompt_lengths >= 2)[:, None],
                       jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0], 0)
    # Slots past each row's prompt hold padding; they sit beyond every later
    # query's causal horizon until overwritten.
    cache = cache.replace(lengths=batch.prompt_lengths - 1)
    tokens = jnp.zeros((B, self.cache_size), jnp.int32).at[:, :P].set(batch.prompts)
    drafter_state = (None if self.drafter is None else
                     self.drafter.init_state(drafter_params, batch, self.cache_size))
    return DecodeState(tokens=tokens, lengths=batch.prompt_lengths,
                       done=~batch.active | (batch.prompt_lengths >= batch.limits),
                       cache=cache, hidden=hidden, target_calls=jnp.zeros((B,), jnp.int32),
                       draft_calls=jnp.zeros((B,), jnp.int32),
                       accepted=jnp.zeros((B, self.draft_len), jnp.int32),
                       step=jnp.zeros((), jnp.int32), verify_rounds=jnp.zeros((), jnp.int32),
                       batch=batch,
                       drafter_state=drafter_state,
                       policy=(None if self.policy is None else
                               policy_lib.PolicyState.init(policy_params, B)),
                       trace=(trace_lib.Trace.init(B, self.cache_size, self.draft_len)
                              if self.trace and self.drafter is not None else None))

  def _ar_step(self, params, state: DecodeState) -> DecodeState:
    b = state.batch
    rows = jnp.arange(state.tokens.shape[0])
    pending = state.tokens[rows, state.lengths - 1]                       # [B]
    logits, hidden, cache = self.call_target(params, pending[:, None], state.cache)
    nxt = self.next_tokens(logits[:, 0], b, state.lengths)               # [B]
    live = ~state.done
    hidden = jnp.where(live[:, None], hidden[:, 0], state.hidden)
    tokens = state.tokens.at[rows, state.lengths].set(
        jnp.where(live, nxt, state.tokens[rows, state.lengths]))
    lengths = state.lengths + live
    done = state.done | (live & is_eos(nxt, self.config)) | (lengths >= b.limits)
    return state.replace(
        tokens=tokens, lengths=lengths, done=done, hidden=hidden,
        cache=cache.replace(lengths=lengths - 1),
        target_calls=state.target_calls + live, step=state.step + 1)

  def _spec_round(self, params, drafter_params, state: DecodeState, drafted, limit=None,
                  num_uniforms=None):
    """Verify k drafts in one target call -> accept per row -> write.

    drafted: (drafts [B, k], q [B, k, V] or None, drafter state), k static.
    limit ([B] int32, or None = k): drafts each row offers. A row offering
    none (an abstaining or unconfident row) accepts nothing and draws its
    token from the target's first distribution exactly as `_ar_step` would
    (same key), so its output does not depend on whether its batch verified.
    Returns (state, n [B] drafts accepted per row).
    """
    b = state.batch
    drafts, q, dstate = drafted
    B, k = drafts.shape
    L = state.lengths
    live = ~state.done
    # Keys depend on (row stream, position at round start): reproducible, and
    # independent of batch composition.
    keys = jax.vmap(jax.random.fold_in)(b.keys, L)
    accept_keys = jax.vmap(lambda key: jax.random.split(key))(keys)[:, 1]
    pending = jnp.take_along_axis(state.tokens, (L - 1)[:, None], axis=1)   # [B, 1]
    logits, hidden, cache = self.call_target(params, jnp.concatenate([pending, drafts], 1),
                                        state.cache)                       # [B, k+1, V]
    p = None
    if self.greedy:
      n, nxt = rejection.accept_greedy(drafts, logits, limit)
    else:
      rep = lambda x: jnp.repeat(x, k + 1)
      p = sampling.warp(logits.reshape(B * (k + 1), -1), rep(b.temperature), rep(b.top_k),
                        rep(b.top_p)).reshape(B, k + 1, -1)
      n, nxt = rejection.accept_sampled(accept_keys, drafts, q, p, limit, num_uniforms)
    abstain = None if limit is None else limit == 0
    if abstain is not None:
      first = self.next_tokens(logits[:, 0], b, L, p if p is None else p[:, 0])
      nxt = jnp.where(abstain, first, nxt)
    # Emitted this round: x_1..x_n then the correction / bonus token.
    slot = jnp.arange(k + 1)
    emitted = jnp.where(slot < n[:, None], jnp.concatenate([drafts, drafts[:, :1]], 1),
                        nxt[:, None])                                      # [B, k+1]
    count = n + 1
    eos = is_eos(emitted, self.config) & (slot < count[:, None])
    hit_eos = jnp.any(eos, axis=1)
    count = jnp.where(hit_eos, jnp.argmax(eos, axis=1) + 1, count)
    count = jnp.where(live, jnp.minimum(count, b.limits - L), 0)           # never past the limit
    rows = jnp.arange(B)[:, None]
    at = L[:, None] + slot                                                 # [B, k+1]
    tokens = state.tokens.at[rows, at].set(
        jnp.where(slot < count[:, None], emitted, state.tokens[rows, at]),
        mode='promise_in_bounds', unique_indices=True)
    lengths = L + count
    done = state.done | (live & hit_eos) | (lengths >= b.limits)
    K = state.accepted.shape[1]
    accepted = state.accepted + (live[:, None] & (jnp.arange(K) < n[:, None]))
    # The new pending token sits at L + count - 1; the verify pass's state at
    # the slot before it predicted it.
    last = jnp.take_along_axis(hidden, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    hidden = jnp.where((count > 0)[:, None], last, state.hidden)
    verified = live if abstain is None else live & ~abstain
    if state.trace is not None:
      state = state.replace(trace=trace_lib.record(
          state.trace, drafts, jnp.full((B,), k) if limit is None else limit, n, verified))
    return state.replace(
        tokens=tokens, lengths=lengths, done=done, hidden=hidden,
        cache=cache.replace(lengths=lengths - 1),
        drafter_state=self.drafter.commit(dstate, lengths),
        target_calls=state.target_calls + live,
        draft_calls=state.draft_calls + verified,
        accepted=accepted, step=state.step + 1,
        verify_rounds=state.verify_rounds + 1), jnp.where(verified, n, 0)

  def _draft(self, params, drafter_params, state: DecodeState, k=None):
    """The draft half of a round with k drafts (static; None = draft_len):
    (drafts [B, k], q or None, drafter state, confidence [B, k])."""
    b, L = state.batch, state.lengths
    keys = jax.vmap(jax.random.fold_in)(b.keys, L)
    draft_keys = jax.vmap(lambda key: jax.random.split(key))(keys)[:, 0]
    view = TargetView(embedding=params['embedding'], cache=state.cache, hidden=state.hidden)
    drafter = self.drafter
    if k is not None and k != drafter.draft_len:
      drafter = with_draft_len(drafter, k)
    args = (drafter_params, state.drafter_state, state.tokens, L, draft_keys, b, self.greedy,
            view)
    if hasattr(drafter, 'draft_scored'):
      return drafter.draft_scored(*args)
    drafts, q, dstate = drafter.draft(*args)
    return drafts, q, dstate, jnp.ones(drafts.shape, jnp.float32)

  @functools.partial(jax.jit, static_argnames=('self', 'k'))
  def draft_part(self, params, state: DecodeState, drafter_params=None, k=None):
    """The draft half of a round alone (k drafts; None = draft_len), for
    timing draft vs verify outside the fused loop (where XLA interleaves them)."""
    return self._draft(params, drafter_params, state, k)[0]

  @functools.partial(jax.jit, static_argnames=('self',))
  def verify_part(self, params, state: DecodeState, drafts):
    """The verify half alone: one target call on the pending token + drafts."""
    pending = jnp.take_along_axis(state.tokens, (state.lengths - 1)[:, None], axis=1)
    logits, _, _ = self.call_target(params, jnp.concatenate([pending, drafts], 1), state.cache)
    return logits

  def _plain_step(self, params, drafter_params, state):
    """A plain autoregressive step in a speculative loop: the drafter's state
    follows (commit, after a catch-up where its cache needs the pending token)."""
    dstate = state.drafter_state
    if hasattr(self.drafter, 'catch_up'):
      dstate = self.drafter.catch_up(drafter_params, dstate, state.tokens, state.lengths)
    s = self._ar_step(params, state)
    return s.replace(drafter_state=self.drafter.commit(dstate, s.lengths))

  def _step(self, params, drafter_params, state):
    if self.drafter is None:
      return self._ar_step(params, state)
    if self.policy is not None:
      return self._dynamic_step(params, drafter_params, state)
    if self.tree is not None:
      return self._tree_step(params, drafter_params, state)
    k = self.draft_len
    if not hasattr(self.drafter, 'has_draft'):
      drafts, q, dstate, _ = self._draft(params, drafter_params, state)
      return self._spec_round(params, drafter_params, state, (drafts, q, dstate))[0]
    # A drafter that can abstain: when no unfinished row has a proposal, one
    # target step on the pending token beats a verify pass over k+1 guesses.
    # The draft runs before the branch, next to has_draft, so XLA computes
    # what they share (ngram's match) once.
    limit = jnp.where(self.drafter.has_draft(state.tokens, state.lengths), k, 0)
    drafts, q, dstate, _ = self._draft(params, drafter_params, state)
    return jax.lax.cond(
        jnp.all((limit == 0) | state.done),
        lambda s: self._plain_step(params, drafter_params, s),
        lambda s: self._spec_round(params, drafter_params, s, (drafts, q, dstate), limit)[0],
        state)

  def _dynamic_step(self, params, drafter_params, state):
    """One round whose draft length the policy picks (policy.py): each row
    plans from its past acceptance, the batch drafts the longest plan, each
    row offers its confident drafts up to its own plan, and the verify pass
    runs at the smallest compiled length covering the offers."""
    pol, ps = self.policy, state.policy
    K, B = self.draft_len, state.tokens.shape[0]
    live = ~state.done
    can = (self.drafter.has_draft(state.tokens, state.lengths)
           if hasattr(self.drafter, 'has_draft') else jnp.ones((B,), bool))
    row_plan = policy_lib.plan(pol, ps, live, can, state.batch.limits - state.lengths)  # [B]
    plan = jnp.max(row_plan)                                  # the batch drafts the longest
    V = self.config.vocab_size

    def draft_branch(k):
      def f():
        if k == 0:
          q = None if self.greedy else jnp.zeros((B, K, V), jnp.float32)
          return (jnp.zeros((B, K), jnp.int32), q, state.drafter_state,
                  jnp.zeros((B, K), jnp.float32))
        drafts, q, dstate, conf = self._draft(params, drafter_params, state, k)
        pad = lambda x: jnp.pad(x, [(0, 0), (0, K - k)] + [(0, 0)] * (x.ndim - 2))
        return pad(drafts), (None if q is None else pad(q)), dstate, pad(conf)
      return f

    drafts, q, dstate, conf = jax.lax.switch(plan, [draft_branch(k) for k in pol.ks])
    offered = policy_lib.offers(conf, ps.params.threshold, jnp.asarray(pol.ks)[row_plan])
    j = policy_lib.verify_index(pol, offered)

    def verify_branch(k):
      def f(s):
        if k == 0:
          return self._plain_step(params, drafter_params, s), jnp.zeros((B,), jnp.int32)
        drafted = (drafts[:, :k], None if q is None else q[:, :k], dstate)
        return self._spec_round(params, drafter_params, s, drafted, offered, num_uniforms=K)
      return f

    new, n = jax.lax.switch(j, [verify_branch(k) for k in pol.ks], state)
    return new.replace(policy=policy_lib.update(ps, plan, j, offered, n))

  def _tree_step(self, params, drafter_params, state):
    """One tree round (tree.py). As in `_step`, a drafter that can abstain
    makes the round a plain step when no unfinished row has a proposal."""
    view = TargetView(embedding=params['embedding'], cache=state.cache, hidden=state.hidden)
    sample = None
    if not self.greedy and getattr(self.tree, 'sampled', False):   # a chain round's draft keys
      keys = jax.vmap(jax.random.fold_in)(state.batch.keys, state.lengths)
      sample = (jax.vmap(lambda key: jax.random.split(key))(keys)[:, 0], state.batch)
    nodes, tables, q = tree_proposals.propose(self.drafter, self.tree, drafter_params,
                                              state.tokens, state.lengths, view, sample)
    if not hasattr(self.drafter, 'has_draft'):
      return self._tree_round(params, state, nodes, tables, q=q)
    offered = self.drafter.has_draft(state.tokens, state.lengths)       # [B]
    return jax.lax.cond(
        jnp.all(~offered | state.done),
        lambda s: self._plain_step(params, drafter_params, s),
        lambda s: self._tree_round(params, s, nodes, tables, offered, q), state)

  def _tree_round(self, params, state: DecodeState, nodes, tables, offered=None, q=None):
    """Verify a tree in one target call -> accept a path per row -> write.

    nodes [B, T]: node tokens (node 0 the pending token), T = tree.num_nodes;
    tables: each row's tree (tree.Tables; the same for every row with a
    static shape). offered ([B] bool or None = all): a row offering no tree
    accepts nothing and draws its token as `_ar_step` would (same key), as
    in `_spec_round`. q [B, T, V]: the distribution each node was drawn
    from (sampled siblings), None for ranked proposals.
    """
    b = state.batch
    B, T = nodes.shape
    D = tables.depth
    L = state.lengths
    live = ~state.done
    rows = jnp.arange(B)
    keys = jax.vmap(jax.random.fold_in)(b.keys, L)
    accept_keys = jax.vmap(lambda key: jax.random.split(key))(keys)[:, 1]
    first = state.cache.lengths                                            # the root's slot
    logits, hidden, cache = self.model.apply({'params': params}, nodes, state.cache,
                                             tree=tables.mask)            # [B, T, V]
    p = None
    if self.greedy:
      best, nxt = tree_lib.accept_greedy(tables, nodes, logits)
    else:
      rep = lambda x: jnp.repeat(x, T)
      p = sampling.warp(logits.reshape(B * T, -1), rep(b.temperature), rep(b.top_k),
                        rep(b.top_p)).reshape(B, T, -1)
      best, nxt = tree_lib.accept_sampled(tables, accept_keys, nodes, p, q)
    if offered is not None:
      ar = self.next_tokens(logits[:, 0], b, L, None if p is None else p[:, 0])
      best = jnp.where(offered, best, 0)
      nxt = jnp.where(offered, nxt, ar)
    path = tables.path_nodes[rows, best]                                   # [B, D+1]
    n = tables.depths[rows, best]                                          # [B] accepted
    path_tokens = jnp.take_along_axis(nodes, path[:, 1:], axis=1)          # [B, D]
    # Emitted this round: the path's n tokens then the correction / bonus.
    slot = jnp.arange(D + 1)
    emitted = jnp.where(slot < n[:, None],
                        jnp.concatenate([path_tokens, path_tokens[:, :1]], 1),
                        nxt[:, None])                                      # [B, D+1]
    count = n + 1
    eos = is_eos(emitted, self.config) & (slot < count[:, None])
    hit_eos = jnp.any(eos, axis=1)
    count = jnp.where(hit_eos, jnp.argmax(eos, axis=1) + 1, count)
    count = jnp.where(live, jnp.minimum(count, b.limits - L), 0)
    at = L[:, None] + slot                                                 # [B, D+1]
    tokens = state.tokens.at[rows[:, None], at].set(
        jnp.where(slot < count[:, None], emitted, state.tokens[rows[:, None], at]),
        mode='promise_in_bounds', unique_indices=True)
    lengths = L + count
    done = state.done | (live & hit_eos) | (lengths >= b.limits)
    K = state.accepted.shape[1]
    accepted = state.accepted + (live[:, None] & (jnp.arange(K) < n[:, None]))
    # The new pending token sits at L + count - 1; the path node before it
    # predicted it.
    last_node = jnp.take_along_axis(path, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    hidden = jnp.where((count > 0)[:, None], hidden[rows, last_node], state.hidden)
    cache = tree_lib.commit_path(cache, first, path)
    verified = live if offered is None else live & offered
    if state.trace is not None:     # the accepted path's drafts
      state = state.replace(trace=trace_lib.record(state.trace, path_tokens, n, n, verified))
    return state.replace(
        tokens=tokens, lengths=lengths, done=done, hidden=hidden,
        cache=cache.replace(lengths=lengths - 1),
        drafter_state=self.drafter.commit(state.drafter_state, lengths),
        target_calls=state.target_calls + live,
        draft_calls=state.draft_calls + verified,
        accepted=accepted, step=state.step + 1,
        verify_rounds=state.verify_rounds + 1)

  @functools.partial(jax.jit, static_argnames=('self',), donate_argnames=('state',))
  def step(self, params, state: DecodeState, drafter_params=None) -> DecodeState:
    """One round for every unfinished row (for streaming and debugging)."""
    return self._step(params, drafter_params, state)

  @functools.partial(jax.jit, static_argnames=('self',), donate_argnames=('state',))
  def decode(self, params, state: DecodeState, drafter_params=None) -> DecodeState:
    """Rounds until every row is done, in one lax.while_loop."""
    return jax.lax.while_loop(lambda s: ~jnp.all(s.done),
                              lambda s: self._step(params, drafter_params, s), state)

  def generate(self, params, batch: Batch, drafter_params=None,
               policy_params=None) -> DecodeState:
    state = self.prefill(params, batch, drafter_params, policy_params)
    return self.decode(params, state, drafter_params)


def make_batch(prompts: Sequence[Sequence[int]], *, batch_size: int, bucket_len: int,
               max_new_tokens: int, keys, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0) -> Batch:
  """Pads `prompts` (lists of ids, BOS included) into a Batch of `batch_size` rows.

  `keys` is one PRNG key per prompt ([n] typed keys). Rows past len(prompts)
  repeat the first prompt and are inactive (done from the start).
  """
  n = len(prompts)
  if not 1 <= n <= batch_size:
    raise ValueError(f'{n} prompts for a batch of {batch_size}')
  arr = np.zeros((batch_size, bucket_len), np.int32)
  lengths = np.zeros((batch_size,), np.int32)
  for i in range(batch_size):
    p = prompts[i] if i < n else prompts[0]
    arr[i, :len(p)] = p
    lengths[i] = len(p)
  keys = jnp.concatenate([keys, jnp.repeat(keys[:1], batch_size - n)]) if n < batch_size else keys
  full = lambda v, dt: jnp.full((batch_size,), v, dt)
  return Batch(prompts=jnp.asarray(arr), prompt_lengths=jnp.asarray(lengths),
               limits=jnp.asarray(lengths + max_new_tokens),
               keys=keys, temperature=full(temperature, jnp.float32),
               top_k=full(top_k, jnp.int32), top_p=full(top_p, jnp.float32),
               active=jnp.asarray(np.arange(batch_size) < n))


def completions(state: DecodeState, eos_id) -> List[dict]:
  """Per active row: completion ids (EOS stripped), finish reason, stats.
  `eos_id`: the stop id, or all of them (a config's `stop_ids`)."""
  stops = set(np.atleast_1d(eos_id).tolist())
  tokens = np.asarray(state.tokens)
  lengths = np.asarray(state.lengths)
  b = state.batch
  plen, active = np.asarray(b.prompt_lengths), np.asarray(b.active)
  calls = np.asarray(state.target_calls)
  draft_calls = np.asarray(state.draft_calls)
  accepted = np.asarray(state.accepted)
  rounds = None if state.trace is None else trace_lib.rows(state.trace)
  out = []
  for i in np.flatnonzero(active):
    ids = tokens[i, plen[i]:lengths[i]].tolist()
    eos = bool(ids) and ids[-1] in stops
    out.append(dict(prompt_ids=tokens[i, :plen[i]].tolist(),
                    completion_ids=ids[:-1] if eos else ids,
                    finish_reason='eos' if eos else 'length',
                    new_tokens=len(ids), target_calls=int(calls[i]),
                    draft_calls=int(draft_calls[i]),
                    accepted_by_position=accepted[i].tolist()))
    if rounds is not None:
      out[-1]['rounds'] = rounds[i]
  return out
