"""Speculative decoding is exact: greedy == autoregressive token for token;
sampled == autoregressive in distribution."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import config as config_lib
from specdec_jax import drafters, generate
from specdec_jax.drafter_models import DrafterConfig, init_drafter_params
from specdec_jax.model import Transformer, init_params

PROMPTS = [[2, 10, 11, 12], [2, 7], [2, 20, 21, 22, 23, 24, 25, 26, 27], [2, 5, 9], [2, 3, 3]]


@dataclasses.dataclass(frozen=True)
class WrongDrafter:
  """Always wrong at greedy: the target's own greedy draft, each token + 1."""
  base: drafters.DraftModelDrafter

  @property
  def draft_len(self):
    return self.base.draft_len

  def init_state(self, params, batch, cache_size):
    return self.base.init_state(params, batch, cache_size)

  def commit(self, state, lengths):
    return self.base.commit(state, lengths)

  def draft(self, params, state, tokens, lengths, keys, batch, greedy, target=None):
    d, q, state = self.base.draft(params, state, tokens, lengths, keys, batch, greedy)
    return (d + 1) % self.base.config.vocab_size, q, state


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


def drafter_cases(cfg, params, k):
  other = init_params(cfg, jax.random.key(7))
  return {
      'mtp': trained_drafter(cfg, 'mtp', k),
      'heads': trained_drafter(cfg, 'heads', k),
      'ngram': (drafters.NgramDrafter(k, cfg.vocab_size), None),
      'target_itself': (drafters.DraftModelDrafter(cfg, k), params),
      'always_wrong': (WrongDrafter(drafters.DraftModelDrafter(cfg, k)), params),
      'other_model': (drafters.DraftModelDrafter(cfg, k), other),
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


def test_ragged_rows_equal_solo_runs_and_eos_mid_block(tiny):
  cfg, params = tiny
  ar = run(cfg, params, PROMPTS, max_new=17)
  # Make row 0's 7th token the EOS: with k = 4 it lands inside a block.
  eos = ar[0]['completion_ids'][6]
  cut = cfg.replace(eos_id=eos)
  ar_eos = run(cut, params, PROMPTS, max_new=17)
  assert ar_eos[0]['finish_reason'] == 'eos'
  for name, (d, dp) in drafter_cases(cut, params, 4).items():
    batched = run(cut, params, PROMPTS, d, dp, max_new=17, batch_size=8)
    for i, prompt in enumerate(PROMPTS):
      solo = run(cut, params, [prompt], d, dp, max_new=17)[0]
      assert batched[i]['completion_ids'] == solo['completion_ids'] == ar_eos[i]['completion_ids']
      assert batched[i]['finish_reason'] == ar_eos[i]['finish_reason'], name


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

def exact_marginals(cfg, params, prompt, n, temperature, top_k, top_p):
  """P(token at new position t) for t < n, enumerating every prefix."""
  from specdec_jax import sampling
  fwd = jax.jit(lambda p, x: Transformer(cfg).apply({'params': p}, x)[0][:, -1])
  V = cfg.vocab_size
  prefixes, weights = [list(prompt)], np.ones(1)
  marginals = []
  for _ in range(n):
    logits = fwd(params, jnp.array(prefixes))
    m = len(prefixes)
    probs = np.asarray(sampling.warp(logits, jnp.full(m, temperature), jnp.full(m, top_k, jnp.int32),
                                     jnp.full(m, top_p)), np.float64)
    joint = weights[:, None] * probs                                   # [prefixes, V]
    marginals.append(joint.sum(0))
    prefixes = [p + [v] for p in prefixes for v in range(V)]
    weights = joint.ravel()
  return marginals


def chi2_stat(samples, probs):
  counts = np.bincount(samples, minlength=len(probs)).astype(float)
  expected = probs * len(samples)
  big = expected >= 5                       # pool sparse cells so the test is valid
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  keep = exp > 0
  obs, exp = obs[keep], exp[keep]
  return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize('kind', ['draft_model', 'mtp', 'heads', 'ngram'])
@pytest.mark.parametrize('temperature,top_k,top_p', [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8)])
def test_sampled_speculative_matches_autoregressive_distribution(temperature, top_k, top_p, kind):
  """4096 speculative samples of 3 tokens vs the exact AR marginals.

  alpha = 1e-3 per position (chi-square). Power: the same test on samples
  from the drafter alone (what a broken acceptance rule would emit) must
  reject; it does so by a wide margin, asserted below.
  """
  from scipy_free_chi2 import chi2_quantile_999
  cfg = config_lib.tiny(vocab_size=16, eos_id=-1)   # no EOS: every sample has n tokens
  params = init_params(cfg, jax.random.key(0))
  dparams = init_params(cfg, jax.random.key(3))
  drafter = drafters.DraftModelDrafter(cfg, 2)
  if kind in ('mtp', 'heads'):   # q = 0 outside its 12-token vocabulary
    drafter, dparams_kind = trained_drafter(cfg, kind, 2, seed=3, vocab_size=12)
  prompt, n, N = [2, 5, 9], 3, 4096
  if kind == 'ngram':   # the first round drafts [9, 5]; later rows abstain on new tokens
    drafter, dparams_kind = drafters.NgramDrafter(2, cfg.vocab_size), None
    prompt = [2, 5, 9, 5]
  kw = dict(max_new=n, greedy=False, temperature=temperature, top_k=top_k, top_p=top_p,
            cache_size=16)
  spec = run(cfg, params, [prompt] * N, drafter,
             dparams if kind == 'draft_model' else dparams_kind, **kw)
  wrong = run(cfg, dparams, [prompt] * N, None, None, seed=1, **kw)     # the drafter's own AR
  calls = sum(s['target_calls'] for s in spec)
  if kind == 'ngram':   # both kinds of round ran (top-k may cut every proposal)
    assert 0 < sum(s['draft_calls'] for s in spec) < calls
  else:
    assert N * n / 3 < calls < N * n                 # some, not all, drafts accepted
  exact = exact_marginals(cfg, params, prompt, n, temperature, top_k, top_p)
  for t in range(n):
    stat, dof = chi2_stat(np.array([s['completion_ids'][t] for s in spec]), exact[t])
    assert stat < chi2_quantile_999(dof), (t, stat, dof)
    power_stat, dof = chi2_stat(np.array([w['completion_ids'][t] for w in wrong]), exact[t])
    assert power_stat > 3 * chi2_quantile_999(dof), (t, power_stat)


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
