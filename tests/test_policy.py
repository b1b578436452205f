"""The dynamic draft-length policy (policy.py): exact greedy and sampled, the
cost model's two extremes, no recompiles, bad settings."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import drafters, generate, policy, rejection
from specdec_jax.errors import UserError
from test_speculative import (N, NEW, PROMPTS, PatchedGenerator, chi2_tests, drafter_cases,
                              sampled_case, small_target)  # noqa: F401 (a fixture)

# Costs under which every choice is sometimes best: with the prior 0.6 the
# first round drafts 2 (k = 2) or 4; rows that keep rejecting fall to 1 or 0.
COSTS4 = [1.0, 1.25, 1.45, 1.9]


def run(cfg, params, prompts, drafter, dparams, knobs, *, ks, greedy=True, max_new=17, seed=0,
        temperature=0.0, gen_cls=generate.Generator, cache_size=64):
  gen = gen_cls(cfg, cache_size=cache_size, greedy=greedy, drafter=drafter,
                policy=policy.DraftPolicy(ks))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
      jnp.arange(len(prompts)))
  batch = generate.make_batch(prompts, batch_size=len(prompts), bucket_len=16,
                              max_new_tokens=max_new, keys=keys, temperature=temperature)
  state = gen.generate(params, batch, dparams, knobs)
  return generate.completions(state, cfg.eos_id), policy.summary(gen.policy, state.policy)


def test_greedy_with_the_policy_equals_autoregressive(tiny):
  """Every drafter kind, six rows whose histories differ (mixed offers and
  verify lengths in one batch): token for token the AR output."""
  from test_speculative import run as run_fixed
  cfg, params = tiny
  ar = run_fixed(cfg, params, PROMPTS, max_new=17, batch_size=6)
  knobs = policy.PolicyParams.make(COSTS4, threshold=0.3)
  seen = np.zeros(4, int)
  for name, (d, dp) in drafter_cases(cfg, params, 4).items():
    out, summ = run(cfg, params, PROMPTS, d, dp, knobs, ks=(0, 1, 2, 4))
    assert [o['completion_ids'] for o in out] == [a['completion_ids'] for a in ar], name
    seen += np.array(list(summ['rounds_by_verified_len'].values()))
  assert (seen > 0).all(), seen    # every verify length (and plain steps) ran somewhere


def test_a_rows_tokens_do_not_depend_on_its_batch(tiny):
  """Sampled, a rejecting drafter: each row plans and offers from its own
  history and confidence, so batched rows equal their solo runs (tokens and
  target calls) although the batch drafts the longest plan."""
  cfg, params = tiny
  d, dp = drafter_cases(cfg, params, 4)['other_model']
  knobs = policy.PolicyParams.make(COSTS4, threshold=0.1)
  kw = dict(ks=(0, 1, 2, 4), greedy=False, temperature=1.0)
  batched, summ = run(cfg, params, PROMPTS, d, dp, knobs, **kw)
  assert 0 < summ['plain_steps'] < sum(summ['rounds_by_verified_len'].values()), summ
  for i, prompt in enumerate(PROMPTS):
    # run() keys row i by fold_in(seed, i): the solo row needs the same key.
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.key(0), j))(jnp.array([i]))
    gen = generate.Generator(cfg, cache_size=64, greedy=False, drafter=d,
                             policy=policy.DraftPolicy(kw['ks']))
    batch = generate.make_batch([prompt], batch_size=1, bucket_len=16, max_new_tokens=17,
                                keys=keys, temperature=1.0)
    solo = generate.completions(gen.generate(params, batch, dp, knobs), cfg.eos_id)[0]
    assert (solo['completion_ids'], solo['target_calls']) == (
        batched[i]['completion_ids'], batched[i]['target_calls']), i


def test_cost_model_extremes(tiny):
  """Costs where speculation cannot pay: plain steps only (target calls ==
  new tokens, nothing drafted). Drafts always right and verifying is cheap:
  the longest k every round (ceil(n / (k + 1)) calls)."""
  cfg, params = tiny
  d = drafters.DraftModelDrafter(cfg, 4)
  never = policy.PolicyParams.make([1.0, 50.0, 60.0, 80.0])
  out, summ = run(cfg, params, PROMPTS, d, params, never, ks=(0, 1, 2, 4))
  assert all(o['target_calls'] == o['new_tokens'] == 17 and o['draft_calls'] == 0 for o in out)
  assert summ['rounds_by_drafted_len']['0'] == summ['plain_steps'] == 17
  always = policy.PolicyParams.make([1.0, 1.0, 1.0, 1.0], threshold=0.0)
  out, summ = run(cfg, params, PROMPTS, d, params, always, ks=(0, 1, 2, 4), max_new=17)
  assert all(o['target_calls'] == -(-17 // 5) for o in out)
  # The last round has 2 tokens left: a draft of 2 covers them.
  assert summ['rounds_by_drafted_len'] == {'0': 0, '1': 0, '2': 1, '4': 3}


def test_plan_prefers_longer_drafts_as_acceptance_rises():
  """The planner alone: at fixed costs, the chosen k grows with alpha, and a
  row that cannot draft counts one token whatever k."""
  pol = policy.DraftPolicy((0, 1, 2, 4, 8))
  knobs = policy.PolicyParams.make([1.0, 1.1, 1.2, 1.4, 1.9])
  chosen = []
  for a in (0.02, 0.3, 0.6, 0.8, 0.97):
    ps = policy.PolicyState.init(knobs, 1).replace(accepted=jnp.array([1000.0 * a]),
                                                   tried=jnp.array([1000.0]))
    chosen.append(pol.ks[int(policy.plan(pol, ps, jnp.array([True]), jnp.array([True]),
                                         jnp.array([100]))[0])])
  assert chosen == sorted(chosen) and chosen[0] == 0 and chosen[-1] == 8, chosen
  ps = policy.PolicyState.init(knobs, 1)
  assert int(policy.plan(pol, ps, jnp.array([True]), jnp.array([False]),
                         jnp.array([100]))[0]) == 0
  # Two tokens left: drafting beyond one draft buys nothing.
  assert pol.ks[int(policy.plan(pol, ps.replace(accepted=jnp.array([990.0]),
                                                tried=jnp.array([1000.0])),
                                jnp.array([True]), jnp.array([True]), jnp.array([2]))[0])] == 1


def test_no_recompile_for_new_costs_thresholds_and_prompts(tiny):
  cfg, params = tiny
  d = drafters.NgramDrafter(4, cfg.vocab_size)
  gen = generate.Generator(cfg, cache_size=48, greedy=True, drafter=d,
                           policy=policy.DraftPolicy((0, 1, 2, 4)))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fn(params, batch, knobs):
    return gen.decode(params, gen.prefill(params, batch, None, knobs)).tokens

  for i, (costs, thr) in enumerate([(COSTS4, 0.3), ([1.0, 2.0, 3.0, 4.0], 0.9),
                                    ([1.0, 1.0, 1.0, 1.0], 0.0)]):
    batch = generate.make_batch([PROMPTS[i], PROMPTS[i + 1]], batch_size=2, bucket_len=16,
                                max_new_tokens=9 + i, keys=jax.random.split(jax.random.key(i), 2))
    fn(params, batch, policy.PolicyParams.make(costs, threshold=thr))


# ---------------------------------------------------------------- sampled

COSTS2 = [1.0, 1.3, 1.5]


@pytest.mark.parametrize('kind', ['draft_model', 'mtp', 'heads', 'ngram', 'lookup'])
def test_sampled_with_the_policy_matches_autoregressive(small_target, kind, monkeypatch):
  """4096 samples of 3 tokens, T = 1, k <= 2, the policy choosing 0 / 1 / 2
  drafts per round and rows offering fewer drafts than their batch verifies:
  marginals and joints against the exact AR distributions (chi-square,
  alpha = 1e-3 per test). Power (draft_model): two realistic bugs must be
  rejected: offering a draft by its own probability q_i(x_i) rather than by
  the peak of q_i, and a rejection rule that, after a row's last offered
  draft passed, draws from the residual of the unoffered draft's q instead
  of a bonus from p."""
  import negative_controls
  cfg, params, dparams, reference = small_target
  drafter, dp, prompt = sampled_case(cfg, dparams, kind)
  knobs = policy.PolicyParams.make(COSTS2, threshold=0.25)
  out, summ = run(cfg, params, [prompt] * N, drafter, dp, knobs, ks=(0, 1, 2), greedy=False,
                  max_new=NEW, temperature=1.0, cache_size=16)
  drafted = sum(o['draft_calls'] for o in out)
  assert 0 < drafted < sum(o['target_calls'] for o in out), summ
  ref = reference((1.0, 0, 1.0), prompt)
  for name, ratio in chi2_tests(out, ref, cfg.vocab_size):
    assert ratio < 1, (name, ratio, summ)
  if kind != 'draft_model':
    return
  broken, _ = run(cfg, params, [prompt] * N, negative_controls.DrawnTokenConfidence(drafter), dp,
                  knobs, ks=(0, 1, 2), greedy=False, max_new=NEW, temperature=1.0, cache_size=16)
  ratios = dict(chi2_tests(broken, ref, cfg.vocab_size))
  assert max(ratios.values()) > 1, ('drawn-token confidence', ratios)
  bug = 'unoffered_draft_residual'
  monkeypatch.setattr(rejection, 'accept_sampled', negative_controls.accept_sampled_with(bug))
  broken, _ = run(cfg, params, [prompt] * N, drafter, dp, knobs, ks=(0, 1, 2), greedy=False,
                  max_new=NEW, temperature=1.0, cache_size=16,
                  gen_cls=functools.partial(PatchedGenerator, patch=bug))
  ratios = dict(chi2_tests(broken, ref, cfg.vocab_size))
  assert max(ratios.values()) > 1, ratios


# ---------------------------------------------------------------- bad settings

@pytest.mark.parametrize('kw, msg', [
    (dict(costs=[1.0, -1.0]), 'positive'),
    (dict(costs=[1.0, 0.0]), 'positive'),
    (dict(costs=[1.0, 2.0], threshold=-0.1), 'confidence_threshold'),
    (dict(costs=[1.0, 2.0], prior=1.0), 'acceptance_prior'),
    (dict(costs=[1.0, 2.0], decay=1.0), 'acceptance_decay'),
])
def test_bad_policy_settings_are_one_line(kw, msg):
  with pytest.raises(UserError, match=msg):
    policy.PolicyParams.make(**kw)


def test_bad_draft_length_lists():
  assert policy.parse_ks('', 8) == (0, 1, 2, 4, 8)
  assert policy.parse_ks('', 6) == (0, 1, 2, 4, 6)
  assert policy.parse_ks('2,4', 4) == (0, 2, 4)
  for text, msg in [('1,2,9', 'outside'), ('a,b', 'comma-separated'), ('0', 'positive')]:
    with pytest.raises(UserError, match=msg):
      policy.parse_ks(text, 8)
  with pytest.raises(UserError, match='costs for'):
    policy.check([1.0, 2.0], 0.4, 0.6, 0.7, ks=(0, 1, 2))
