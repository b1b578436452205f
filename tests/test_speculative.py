"""Speculative decoding is exact: greedy == autoregressive token for token;
sampled == autoregressive in distribution."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import config as config_lib
from specdec_jax import drafters, generate, rejection
from specdec_jax.drafter_models import DrafterConfig, init_drafter_params
from specdec_jax.model import Transformer, cast_params, init_params

PROMPTS = [[2, 10, 11, 12], [2, 7], [2, 20, 21, 22, 23, 24, 25, 26, 27], [2, 5, 9], [2, 3, 3]]


@dataclasses.dataclass(frozen=True)
class ShiftedDrafter:
  """A DraftModelDrafter whose drafts are each token + params['shift'] (mod
  vocab), params = {'model': its params, 'shift': int32}: shift 0 is the draft
  model as it is (everything else is passed through); with the target as its
  own draft model, shift 1 is always wrong at greedy (the target's own greedy
  draft, each token + 1). The shift is an operand, not a constant, so the
  target drafting for itself, another draft model and the always-wrong drafter
  run one compiled program (a compile per Generator is most of these tests'
  time on CPU)."""
  base: drafters.DraftModelDrafter

  @property
  def draft_len(self):
    return self.base.draft_len

  def with_draft_len(self, k):
    return ShiftedDrafter(drafters.with_draft_len(self.base, k))

  def init_state(self, params, batch, cache_size):
    return self.base.init_state(params['model'], batch, cache_size)

  def commit(self, state, lengths):
    return self.base.commit(state, lengths)

  def catch_up(self, params, state, tokens, lengths):
    return self.base.catch_up(params['model'], state, tokens, lengths)

  def draft(self, params, state, tokens, lengths, keys, batch, greedy, target=None):
    return self.draft_scored(params, state, tokens, lengths, keys, batch, greedy, target)[:3]

  def draft_scored(self, params, state, tokens, lengths, keys, batch, greedy, target=None):
    d, *rest = self.base.draft_scored(params['model'], state, tokens, lengths, keys, batch, greedy,
                                      target)
    return ((d + params['shift']) % self.base.config.vocab_size, *rest)


def shifted(model_params, shift=0):
  """ShiftedDrafter's params."""
  return {'model': model_params, 'shift': jnp.int32(shift)}


def run(cfg, params, prompts, drafter=None, drafter_params=None, *, max_new=17, greedy=True,
        batch_size=None, seed=0, temperature=0.0, top_k=0, top_p=1.0, cache_size=64):
  gen = generate.Generator(cfg, cache_size=cache_size, greedy=greedy, drafter=drafter)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(len(prompts)))
  batch = generate.make_batch(prompts, batch_size=batch_size or len(prompts), bucket_len=16,
                              max_new_tokens=max_new, keys=keys, temperature=temperature,
                              top_k=top_k, top_p=top_p)
  return generate.completions(gen.generate(params, batch, drafter_params), cfg.eos_id)


def trained_drafter(cfg, kind, k, seed=0, vocab_size=None):
  """A randomly initialised mtp / heads drafter over a random reduced vocabulary."""
  R = vocab_size or (3 * cfg.vocab_size) // 4
  dcfg = DrafterConfig(kind, cfg, draft_vocab_size=R, width=24, hidden_dim=32,
                       num_layers=2, num_heads=4, num_draft_heads=max(k, 4))
  vocab = np.random.default_rng(seed).permutation(cfg.vocab_size)[:R]
  params = init_drafter_params(dcfg, jax.random.key(seed), vocab)
  return drafters.make_drafter(kind, draft_len=k, target_config=cfg, drafter_config=dcfg), params


def lookup_case(cfg, k, n, seed=0, vocab_size=None, unsure=0.0):
  """A random mtp drafter behind prompt lookup of n+ tokens (and of shorter
  ones where it is less sure than `unsure`)."""
  d, p = trained_drafter(cfg, 'mtp', k, seed, vocab_size)
  return drafters.with_lookup(d, n, unsure=unsure), p


def drafter_cases(cfg, params, k):
  other = init_params(cfg, jax.random.key(7))
  return {
      'mtp': trained_drafter(cfg, 'mtp', k),
      'heads': trained_drafter(cfg, 'heads', k),
      'ngram': (drafters.NgramDrafter(k, cfg.vocab_size), None),
      'mtp+lookup': lookup_case(cfg, k, 1),
      'mtp+lookup_unsure': lookup_case(cfg, k, 2, unsure=drafters.LOOKUP_UNSURE),
      'target_itself': (ShiftedDrafter(drafters.DraftModelDrafter(cfg, k)), shifted(params)),
      'always_wrong': (ShiftedDrafter(drafters.DraftModelDrafter(cfg, k)), shifted(params, 1)),
      'other_model': (ShiftedDrafter(drafters.DraftModelDrafter(cfg, k)), shifted(other)),
  }


@pytest.mark.parametrize('k', [1, 4])
@pytest.mark.parametrize('max_new', [17, 10])       # neither a multiple of k + 1 = 5 ... 2
def test_greedy_speculative_equals_autoregressive(tiny, k, max_new):
  cfg, params = tiny
  ar = run(cfg, params, PROMPTS, max_new=max_new, batch_size=6)
  for name, (d, dp) in drafter_cases(cfg, params, k).items():
    sp = run(cfg, params, PROMPTS, d, dp, max_new=max_new, batch_size=6)
    for a, s in zip(ar, sp):
      assert s['completion_ids'] == a['completion_ids'], name
      assert s['new_tokens'] == max_new
    calls = np.array([s['target_calls'] for s in sp])
    accepted = np.array([s['accepted_by_position'] for s in sp])
    if name == 'target_itself':   # every draft accepted: ceil(n / (k + 1)) calls
      assert (calls == -(-max_new // (k + 1))).all(), name
      assert (accepted == calls[:, None]).all()
    if name == 'always_wrong':    # nothing accepted: one token per call
      assert (calls == max_new).all() and (accepted == 0).all(), name


def test_greedy_speculative_equals_autoregressive_with_bf16_weights(tiny):
  """The same with bfloat16 weights (bf16 matmuls accumulating in float32):
  the exactness argument does not depend on the precision, and a verify pass
  (k + 1 rows) must give the same argmax as the AR step (one row, padded to
  two on CPU) on this model."""
  cfg, params = tiny
  cfg = cfg.replace(param_dtype='bfloat16')
  params = cast_params(params, jnp.bfloat16)
  assert params['layer_0']['attn']['qkv'].dtype == jnp.bfloat16
  ar = run(cfg, params, PROMPTS, max_new=17, batch_size=6)
  for name, (d, dp) in drafter_cases(cfg, params, 4).items():
    sp = run(cfg, params, PROMPTS, d, dp, max_new=17, batch_size=6)
    assert [s['completion_ids'] for s in sp] == [a['completion_ids'] for a in ar], name
    calls = np.array([s['target_calls'] for s in sp])
    if name == 'target_itself':
      assert (calls == -(-17 // 5)).all(), name
    if name == 'always_wrong':
      assert (calls == 17).all(), name


def test_ragged_rows_equal_solo_runs_and_eos_mid_block(tiny):
  cfg, params = tiny
  ar = run(cfg, params, PROMPTS, max_new=17)
  # Make row 1's 3rd token the EOS (its first occurrence there): with k = 4 it
  # lands inside the first round's block of k + 1.
  eos = ar[1]['completion_ids'][2]
  cut = cfg.replace(eos_id=eos)
  ar_eos = run(cut, params, PROMPTS, max_new=17)
  assert ar_eos[1]['finish_reason'] == 'eos' and ar_eos[1]['new_tokens'] == 3
  for name, (d, dp) in drafter_cases(cut, params, 4).items():
    batched = run(cut, params, PROMPTS, d, dp, max_new=17, batch_size=8)
    for i, prompt in enumerate(PROMPTS):
      solo = run(cut, params, [prompt], d, dp, max_new=17)[0]
      assert batched[i]['completion_ids'] == solo['completion_ids'] == ar_eos[i]['completion_ids']
      assert batched[i]['finish_reason'] == ar_eos[i]['finish_reason'], name
      assert batched[i]['new_tokens'] == solo['new_tokens'] == ar_eos[i]['new_tokens'], name
    if name == 'target_itself':
      # Every draft accepted: the first round would emit 5 tokens and stops
      # at the EOS, its 3rd: mid-block, in one target call.
      assert batched[1]['target_calls'] == 1 and batched[1]['accepted_by_position'] == [1] * 4


def prefilled_rows(cfg, params, model, dp, prompts):
  """(state, view, keys) after prefilling `prompts` for the stateless
  drafter `model`: the arguments a drafter's draft_scored reads."""
  n = len(prompts)
  gen = generate.Generator(cfg, cache_size=16, greedy=False, drafter=model)
  batch = generate.make_batch(prompts, batch_size=n, bucket_len=8, max_new_tokens=4,
                              keys=jax.random.split(jax.random.key(0), n), temperature=1.0)
  state = gen.prefill(params, batch, dp)
  view = drafters.TargetView(embedding=params['embedding'], cache=state.cache,
                             hidden=state.hidden)
  return state, batch, view, jax.random.split(jax.random.key(1), n)


def test_lookup_first_drafts_each_row_from_its_source(tiny):
  """mtp+lookup: a row whose last token occurred earlier drafts what followed
  it, with a one-hot q and confidence 1; a row without a match gets the mtp
  drafter's draft, q and confidence unchanged; when every row matches, the
  draft is lookup's alone. The drafter never abstains (no has_draft)."""
  cfg, params = tiny
  d, dp = lookup_case(cfg, 4, 1)
  assert not hasattr(d, 'has_draft')
  state, batch, view, keys = prefilled_rows(cfg, params, d.model, dp,
                                            [[2, 10, 11, 12, 10], [2, 30, 31, 32, 33]])
  for greedy in (True, False):
    args = (dp, (), state.tokens, state.lengths, keys, batch, greedy, view)
    drafts, q, _, conf = d.draft_scored(*args)
    m_drafts, m_q, _, m_conf = d.model.draft_scored(*args)
    # Row 0: its pending 10 follows 2 earlier; the 4th draft is past the context.
    np.testing.assert_array_equal(drafts[0], [11, 12, 10, 10])
    np.testing.assert_array_equal(conf[0], [1, 1, 1, 0])
    np.testing.assert_array_equal(drafts[1], m_drafts[1])
    np.testing.assert_array_equal(conf[1], m_conf[1])
    if not greedy:
      np.testing.assert_array_equal(q[0], jax.nn.one_hot(drafts[0], cfg.vocab_size))
      np.testing.assert_array_equal(q[1], m_q[1])
  rows = state.tokens.at[1].set(state.tokens[0])
  drafts = d.draft_scored(dp, (), rows, state.lengths, keys, batch, True, view)[0]
  np.testing.assert_array_equal(drafts, [[11, 12, 10, 10]] * 2)
  with pytest.raises(ValueError, match='stateless'):
    drafters.with_lookup(drafters.NgramDrafter(3, cfg.vocab_size), 2)


def test_lookup_unsure_takes_a_shorter_match_where_the_model_is_unsure(tiny):
  """lookup 2 with lookup_unsure = c: a row whose only earlier match is its
  last token drafts from it where the mtp drafter's first-position peak is
  below c, and the mtp draft where it is not; a row with a 2-token match
  drafts by lookup and a row with none from mtp, whatever c."""
  cfg, params = tiny
  model, dp = trained_drafter(cfg, 'mtp', 4)
  state, batch, view, keys = prefilled_rows(
      cfg, params, model, dp, [[2, 10, 11, 12, 10], [2, 30, 31, 40, 30, 31], [2, 50, 51, 52, 53]])
  for greedy in (True, False):
    args = (dp, (), state.tokens, state.lengths, keys, batch, greedy, view)
    m_drafts, m_q, _, m_conf = model.draft_scored(*args)
    peak = float(m_conf[0, 0])
    assert 0 < peak < 1
    for unsure, short in ((0.0, False), (peak, False), (min(1.0, peak + 1e-4), True), (1.0, True)):
      d = drafters.with_lookup(model, 2, unsure=unsure)
      drafts, q, _, conf = d.draft_scored(*args)
      if short:
        np.testing.assert_array_equal(drafts[0], [11, 12, 10, 10])
        np.testing.assert_array_equal(conf[0], [1, 1, 1, 0])
      else:
        np.testing.assert_array_equal(drafts[0], m_drafts[0])
        np.testing.assert_array_equal(conf[0], m_conf[0])
      np.testing.assert_array_equal(drafts[1], [40, 30, 31, 31])          # after 30 31
      np.testing.assert_array_equal(drafts[2], m_drafts[2])
      if not greedy:
        np.testing.assert_array_equal(q[1], jax.nn.one_hot(drafts[1], cfg.vocab_size))
        np.testing.assert_array_equal(q[2], m_q[2])
        np.testing.assert_array_equal(
            q[0], jax.nn.one_hot(drafts[0], cfg.vocab_size) if short else m_q[0])
  with pytest.raises(ValueError, match='lookup_unsure'):
    drafters.with_lookup(model, 2, unsure=1.5)


def test_lookup_sampled_min_keeps_lookup_where_the_model_gives_its_token_the_bar(tiny):
  """Sampling with sampled_min = m: a T > 0 row with a match drafts by lookup
  only where the mtp drafter's first q gives lookup's first token >= m (its
  q then one-hot), else the mtp draft and q; a T = 0 row in the same batch
  keeps lookup; greedy rounds ignore m."""
  cfg, params = tiny
  model, dp = trained_drafter(cfg, 'mtp', 4)
  prompts = [[2, 10, 11, 12, 10], [2, 10, 11, 12, 10], [2, 50, 51, 52, 53]]
  state, batch, view, keys = prefilled_rows(cfg, params, model, dp, prompts)
  batch = batch.replace(temperature=jnp.array([1.0, 0.0, 1.0]))
  args = (dp, (), state.tokens, state.lengths, keys, batch, False, view)
  m_drafts, m_q, _, _ = model.draft_scored(*args)
  q_l = float(m_q[0, 0, 11])                      # lookup's first token after 10
  assert 0 < q_l < 1
  for m, by_lookup in ((0.0, True), (q_l, True), (min(1.0, q_l + 1e-4), False), (1.0, False)):
    drafts, q, _, _ = drafters.with_lookup(model, 1, sampled_min=m).draft_scored(*args)
    if by_lookup:
      np.testing.assert_array_equal(drafts[0], [11, 12, 10, 10])
      np.testing.assert_array_equal(q[0], jax.nn.one_hot(drafts[0], cfg.vocab_size))
    else:
      np.testing.assert_array_equal(drafts[0], m_drafts[0])
      np.testing.assert_array_equal(q[0], m_q[0])
    np.testing.assert_array_equal(drafts[1], [11, 12, 10, 10])          # T = 0: lookup
    np.testing.assert_array_equal(drafts[2], m_drafts[2])               # no match
  greedy = drafters.with_lookup(model, 1, sampled_min=1.0).draft_scored(
      dp, (), state.tokens, state.lengths, keys, batch, True, view)[0]
  np.testing.assert_array_equal(greedy[:2], [[11, 12, 10, 10]] * 2)
  with pytest.raises(ValueError, match='lookup_sampled_min'):
    drafters.with_lookup(model, 1, sampled_min=1.5)


def test_ngram_abstains_without_a_match(tiny):
  """A pending token never seen before: the round is a plain AR step. A batch
  mixing rows that abstain with rows that verify gives every row its solo run
  (tokens and call counts), greedy and sampled."""
  cfg, params = tiny
  d = drafters.NgramDrafter(4, cfg.vocab_size)
  prompts = [[2, 30, 31, 32, 33], [2, 10, 11, 12, 10, 11, 12, 10, 11]]
  gen = lambda drafter, greedy: generate.Generator(cfg, cache_size=64, greedy=greedy,
                                                   drafter=drafter)
  def rows(drafter, greedy, idx):
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.array(idx))
    batch = generate.make_batch([prompts[i] for i in idx], batch_size=len(idx), bucket_len=16,
                                max_new_tokens=17, keys=keys, temperature=0.0 if greedy else 1.0)
    return generate.completions(gen(drafter, greedy).generate(params, batch), cfg.eos_id)
  for greedy in (True, False):
    batched = rows(d, greedy, [0, 1])
    solo = [rows(d, greedy, [i])[0] for i in (0, 1)]
    stats = lambda r: (r['completion_ids'], r['target_calls'], r['draft_calls'])
    assert [stats(r) for r in batched] == [stats(r) for r in solo], greedy
    assert solo[0]['draft_calls'] < solo[0]['target_calls']     # abstained at least once
    assert solo[1]['draft_calls'] > 0                            # and verified drafts
    if greedy:
      assert [r['completion_ids'] for r in batched] == [
          r['completion_ids'] for r in rows(None, True, [0, 1])]


# ----------------------------------------------------------------------------
# Sampled: distribution equality against exact enumeration.
# ----------------------------------------------------------------------------

SETTINGS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8)]     # (temperature, top_k, top_p)
N, NEW = 4096, 3             # samples, new tokens per sample
PAIRS = [(0, 1), (1, 2)]     # joints checked: with k = 2, every sample whose first
                             # round emits 1 or 2 tokens has a round boundary in one


def exact_distributions(cfg, params, prompt, n, temperature, top_k, top_p):
  """Enumerating every prefix: P(token at new position t) for t < n, and the
  joint P(tokens at t - 1, t) [V, V] for 0 < t < n."""
  from specdec_jax import sampling
  fwd = jax.jit(lambda p, x: Transformer(cfg).apply({'params': p}, x)[0][:, -1])
  V = cfg.vocab_size
  prefixes, weights = [list(prompt)], np.ones(1)
  marginals, pairs = [], []
  for t in range(n):
    logits = fwd(params, jnp.array(prefixes))
    m = len(prefixes)
    probs = np.asarray(sampling.warp(logits, jnp.full(m, temperature), jnp.full(m, top_k, jnp.int32),
                                     jnp.full(m, top_p)), np.float64)
    joint = weights[:, None] * probs                                   # [prefixes, V]
    marginals.append(joint.sum(0))
    if t:   # prefixes list the last token fastest: [earlier, token t-1, token t]
      pairs.append(joint.reshape(-1, V, V).sum(0))
    prefixes = [p + [v] for p in prefixes for v in range(V)]
    weights = joint.ravel()
  return marginals, pairs


def chi2_stat(samples, probs):
  """Pearson chi-square of samples (cell ids) against probs, and its dof.

  A sample in a cell of probability 0 is an impossible token: the statistic
  is inf at once (a sampler leaking mass outside the top-k / top-p support
  must fail however few it emits). Cells expected fewer than 5 times are
  pooled into one so the chi-square approximation holds.
  """
  probs = np.asarray(probs, np.float64).ravel()
  counts = np.bincount(samples, minlength=len(probs)).astype(float)
  assert len(counts) == len(probs), 'a sample outside the cells'
  if counts[probs == 0].sum() > 0:
    return float('inf'), 1
  expected = probs * len(samples)
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0                            # the pooled cell may be empty
  obs, exp = obs[keep], exp[keep]
  return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def chi2_tests(completions, reference, V):
  """[(name, stat / its 0.999 quantile)] for every position and pair: > 1 rejects."""
  from scipy_free_chi2 import chi2_quantile_999
  ids = np.array([c['completion_ids'] for c in completions])         # [N, NEW]
  marginals, pairs = reference
  out = []
  for t in range(NEW):
    stat, dof = chi2_stat(ids[:, t], marginals[t])
    out.append((f'position {t}', stat / chi2_quantile_999(dof)))
  for (a, b), joint in zip(PAIRS, pairs):
    stat, dof = chi2_stat(ids[:, a] * V + ids[:, b], joint)
    out.append((f'pair {a},{b}', stat / chi2_quantile_999(dof)))
  return out


@dataclasses.dataclass(frozen=True)
class PatchedGenerator(generate.Generator):
  """Not equal to any Generator: jit traces it anew, so a monkeypatched
  rejection rule is compiled in rather than a cached program reused."""
  patch: str = ''


@pytest.fixture(scope='module')
def small_target():
  """A 16-token vocabulary (exact enumeration of 3 tokens: 4096 prefixes), no
  EOS (every sample has NEW tokens); the prompt's exact distributions and the
  draft_model drafter's own AR samples, once per sampling setting."""
  cfg = config_lib.tiny(vocab_size=16, eos_id=-1)
  params = init_params(cfg, jax.random.key(0))
  dparams = init_params(cfg, jax.random.key(3))
  cache = {}

  def reference(setting, prompt):
    if (setting, tuple(prompt)) not in cache:
      cache[setting, tuple(prompt)] = exact_distributions(cfg, params, prompt, NEW, *setting)
    return cache[setting, tuple(prompt)]
  return cfg, params, dparams, reference


def sampled_run(cfg, params, prompt, drafter, dparams, setting, gen_cls=generate.Generator,
                seed=0):
  temperature, top_k, top_p = setting
  gen = gen_cls(cfg, cache_size=16, greedy=False, drafter=drafter)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(N))
  batch = generate.make_batch([prompt] * N, batch_size=N, bucket_len=16, max_new_tokens=NEW,
                              keys=keys, temperature=temperature, top_k=top_k, top_p=top_p)
  return generate.completions(gen.generate(params, batch, dparams), cfg.eos_id)


def sampled_case(cfg, dparams, kind):
  """(drafter, its params, prompt) of each kind, k = 2."""
  if kind == 'draft_model':
    return drafters.DraftModelDrafter(cfg, 2), dparams, [2, 5, 9]
  if kind == 'ngram':      # the first round drafts [9, 5]; later rows abstain on new tokens
    return drafters.NgramDrafter(2, cfg.vocab_size), None, [2, 5, 9, 5]
  if kind == 'lookup':     # the first round drafts [9, 5] by lookup; later rows with
    # a new last token take the mtp drafter's draws
    return (*lookup_case(cfg, 2, 1, seed=3, vocab_size=12), [2, 5, 9, 5])
  if kind == 'lookup_unsure':   # lookup 2: later rounds take a 1-token match or the mtp
    # draws by the peak of mtp's first q (the threshold: first_round_unsure)
    d, p = trained_drafter(cfg, 'mtp', 2, seed=3, vocab_size=12)
    return drafters.with_lookup(d, 2, unsure=0.5), p, [2, 5, 9, 5]
  if kind == 'lookup_sampled':   # lookup 1: a row with a match drafts by lookup where mtp's
    # first q gives lookup's first token the bar (first_round_sampled_min)
    d, p = trained_drafter(cfg, 'mtp', 2, seed=3, vocab_size=12)
    return drafters.with_lookup(d, 1, sampled_min=0.5), p, [2, 5, 9, 5]
  drafter, p = trained_drafter(cfg, kind, 2, seed=3, vocab_size=12)   # q = 0 off its 12 ids
  return drafter, p, [2, 5, 9]


# Per drafter kind: a bug it could realistically have, and the setting its
# power check runs at (one per kind keeps CI time; each setting is covered).
# ('drafter', bug): negative_controls.BrokenDrafter; ('accept', bug): the
# rejection rule patched with negative_controls.accept_sampled_with(bug).
REALISTIC_BUG = {
    'draft_model': (('drafter', 'drafted_without_warp'), SETTINGS[1]),
    'mtp': (('drafter', 'q_of_previous_step'), SETTINGS[2]),
    'heads': (('drafter', 'keys_shared_by_heads'), SETTINGS[0]),
    'ngram': (('accept', 'residual_not_renormalised'), SETTINGS[0]),
    'lookup': (('drafter', 'model_q_for_lookup_rows'), SETTINGS[1]),
    'lookup_unsure': (('drafter', 'unsure_by_drawn_token'), SETTINGS[0]),
    'lookup_sampled': (('drafter', 'sampled_min_of_drawn_token'), SETTINGS[0]),
}


def first_round_scored(cfg, params, drafter, dp, prompt, setting):
  """What the +lookup drafter's model drafts in the first sampled round after
  `prompt`: its draft_scored (drafts, q, state, confidence)."""
  gen = generate.Generator(cfg, cache_size=16, greedy=False, drafter=drafter.model)
  batch = generate.make_batch([prompt], batch_size=1, bucket_len=16, max_new_tokens=NEW,
                              keys=jax.random.key(0)[None], temperature=setting[0],
                              top_k=setting[1], top_p=setting[2])
  state = gen.prefill(params, batch, dp)
  view = drafters.TargetView(embedding=params['embedding'], cache=state.cache, hidden=state.hidden)
  return drafter.model.draft_scored(dp, (), state.tokens, state.lengths, jax.random.key(1)[None],
                                    batch, False, view)


def first_round_unsure(cfg, params, drafter, dp, prompt, setting):
  """lookup_unsure's threshold for the sampled test: just below the peak of
  mtp's first q after the prompt, so the first round (the prompt's only
  match is its last token) drafts from mtp, while the bug of
  negative_controls' 'unsure_by_drawn_token' sends every draw other than the
  peak token to lookup."""
  conf = first_round_scored(cfg, params, drafter, dp, prompt, setting)[3]
  return dataclasses.replace(drafter, unsure=0.98 * float(conf[0, 0]))


def first_round_sampled_min(cfg, params, drafter, dp, prompt, setting):
  """lookup_sampled's bar for the sampled test: just below the probability
  mtp's first q after the prompt gives lookup's first token (the prompt
  [2, 5, 9, 5] drafts 9 by lookup), so the first round drafts by lookup,
  while the bug of negative_controls' 'sampled_min_of_drawn_token' does only
  when mtp's draw is as likely."""
  q = first_round_scored(cfg, params, drafter, dp, prompt, setting)[1]
  return dataclasses.replace(drafter, sampled_min=0.98 * float(q[0, 0, prompt[2]]))


# Every kind at every setting; mtp+lookup (whose parts are the mtp and ngram
# kinds above) at the two that warp q, its T = 1 case is the bf16 test's.
SAMPLED_CASES = ([(kind, s) for kind in ('draft_model', 'mtp', 'heads', 'ngram') for s in SETTINGS]
                 + [('lookup', s) for s in SETTINGS[1:]] + [('lookup_unsure', SETTINGS[0]), ('lookup_sampled', SETTINGS[0])])


@pytest.mark.parametrize('kind, setting', SAMPLED_CASES,
                         ids=lambda x: x if isinstance(x, str) else '-'.join(map(str, x)))
def test_sampled_speculative_matches_autoregressive_distribution(small_target, setting, kind,
                                                                 monkeypatch):
  """4096 speculative samples of 3 tokens vs the exact AR distributions: each
  position's marginal and the joints of positions (0, 1) and (1, 2), which
  span the first round's boundary in most samples (chi-square, alpha = 1e-3
  per test; an impossible token fails at once).

  Power: at one setting per kind, the same drafter with a bug it could
  realistically have (REALISTIC_BUG) must be rejected by at least one test.
  """
  import negative_controls
  cfg, params, dparams, reference = small_target
  drafter, dp, prompt = sampled_case(cfg, dparams, kind)
  if kind == 'lookup_unsure':
    drafter = first_round_unsure(cfg, params, drafter, dp, prompt, setting)
  if kind == 'lookup_sampled':
    drafter = first_round_sampled_min(cfg, params, drafter, dp, prompt, setting)
  spec = sampled_run(cfg, params, prompt, drafter, dp, setting)
  calls = np.array([s['target_calls'] for s in spec])
  if kind == 'ngram':   # both kinds of round ran (top-k may cut every proposal)
    assert 0 < sum(s['draft_calls'] for s in spec) < calls.sum()
  else:
    assert N * NEW / 3 < calls.sum() < N * NEW        # some, not all, drafts accepted
  assert (calls >= 2).mean() > 0.5                    # a round boundary inside PAIRS
  ref = reference(setting, prompt)
  for name, ratio in chi2_tests(spec, ref, cfg.vocab_size):
    assert ratio < 1, (name, ratio)

  (where, bug), at = REALISTIC_BUG[kind]
  if setting != at:
    return
  if where == 'drafter':
    broken = sampled_run(cfg, params, prompt, negative_controls.BrokenDrafter(drafter, bug), dp,
                         setting)
  else:
    monkeypatch.setattr(rejection, 'accept_sampled', negative_controls.accept_sampled_with(bug))
    broken = sampled_run(cfg, params, prompt, drafter, dp, setting,
                         functools.partial(PatchedGenerator, patch=bug))
  ratios = dict(chi2_tests(broken, ref, cfg.vocab_size))
  assert max(ratios.values()) > 1, (bug, ratios)


@pytest.mark.parametrize('kind', ['draft_model', 'mtp', 'heads', 'ngram', 'lookup'])
def test_sampled_speculative_is_exact_with_bf16_weights(small_target, kind):
  """With bfloat16 weights the target is the bf16-weight model: speculative
  samples must follow its exact distributions (enumerated with the same
  weights), at T = 1, marginals and joints as above."""
  cfg, params, dparams, _ = small_target
  cfg = cfg.replace(param_dtype='bfloat16')
  params, dparams = cast_params(params, jnp.bfloat16), cast_params(dparams, jnp.bfloat16)
  setting = SETTINGS[0]
  drafter, dp, prompt = sampled_case(cfg, dparams, kind)
  spec = sampled_run(cfg, params, prompt, drafter, dp, setting)
  calls = np.array([s['target_calls'] for s in spec])
  assert calls.sum() < N * NEW                        # drafts were accepted
  ref = exact_distributions(cfg, params, prompt, NEW, *setting)
  ref32 = exact_distributions(cfg.replace(param_dtype='float32'), small_target[1], prompt,
                              NEW, *setting)
  assert np.abs(ref[0][0] - ref32[0][0]).max() > 0    # the bf16 model is another model
  for name, ratio in chi2_tests(spec, ref, cfg.vocab_size):
    assert ratio < 1, (name, ratio)


@pytest.mark.parametrize('setting', SETTINGS, ids=lambda s: '-'.join(map(str, s)))
def test_distribution_tests_reject_a_wrong_sampler(small_target, setting):
  """What the chi-square tests above can see, once per setting (it does not
  depend on the drafter): the draft_model drafter's own AR samples (what an
  acceptance rule that let every draft through would emit) fail by a wide
  margin at every position; a sampler that puts 1% of its mass outside the
  top-k / top-p support fails at once."""
  cfg, params, dparams, reference = small_target
  prompt = [2, 5, 9]
  wrong = sampled_run(cfg, dparams, prompt, None, None, setting, seed=1)
  ratios = dict(chi2_tests(wrong, reference(setting, prompt), cfg.vocab_size))
  for t in range(NEW):
    assert ratios[f'position {t}'] > 3, (t, ratios)

  marginals, pairs = reference(setting, prompt)
  rng = np.random.default_rng(0)
  for name, exact in [('position 0', marginals[0]), ('pair 0,1', pairs[0].ravel())]:
    outside = np.flatnonzero(exact == 0)
    assert (len(outside) > 0) == (setting != SETTINGS[0]), name   # zero cells iff a filter
    if len(outside):
      good = rng.choice(len(exact), N, p=exact / exact.sum())
      leaky = np.where(rng.random(N) < 0.01, rng.choice(outside, N), good)
      assert chi2_stat(good, exact)[0] < float('inf')
      assert chi2_stat(leaky, exact)[0] == float('inf'), name


def test_python_stepper_equals_while_loop_for_speculative(tiny):
  cfg, params = tiny
  d = drafters.NgramDrafter(3, cfg.vocab_size)
  gen = generate.Generator(cfg, cache_size=64, greedy=True, drafter=d)
  batch = generate.make_batch(PROMPTS, batch_size=5, bucket_len=16, max_new_tokens=9,
                              keys=jax.random.split(jax.random.key(0), 5))
  state = gen.prefill(params, batch)
  rounds = 0
  while not bool(jnp.all(state.done)):
    state = gen.step(params, state)
    rounds += 1
  assert generate.completions(state, cfg.eos_id) == run(cfg, params, PROMPTS, d, max_new=9)
  assert rounds == int(np.max([r['target_calls'] for r in generate.completions(state, cfg.eos_id)]))
