"""The ablation sweep job (configs/ablate.py) and the quality checks it reports."""
import collections
import csv
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import config as config_lib
from specdec_jax import generate, quality
from specdec_jax.model import Transformer, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sweep(*args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m', 'experiments.run', '--config=configs/ablate.py:tiny',
                         *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope='module')
def tiny_sweep(tmp_path_factory):
  out = tmp_path_factory.mktemp('sweep') / 'results'
  r = sweep(f'--config.output={out}', '--config.drafters=ngram,draft_model:target',
            '--config.draft_lens=2', '--config.temperatures=0,1.0')
  assert r.returncode == 0, r.stderr[-3000:]
  return out, json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_sweep_writes_every_artefact(tiny_sweep):
  out, summary, stderr = tiny_sweep
  for name in ('raw.jsonl', 'results.csv', 'results.md', 'config.json',
               'speedup_vs_draft_len.png', 'acceptance_by_position.png',
               'tokens_per_second_vs_temperature.png'):
    assert (out / name).stat().st_size > 0, name
  assert (out / 'speedup_vs_draft_len.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # 2 domains x 2 temperatures x (AR + 2 drafters x 1 k) points, 3 prompts each.
  assert summary['points'] == 12 and summary['rows'] == 36
  # One program per (drafter, k, greedy, batch): domains and T=1 share them.
  assert summary['compiles'] == 2 + 2 * 2
  assert summary['greedy_identical'] == 1.0
  assert '[12/12]' in stderr and 'ETA' in stderr
  md = (out / 'results.md').read_text().splitlines()
  assert len([l for l in md if l.startswith('| code') or l.startswith('| prose')]) == 12


def test_sweep_compares_fixed_and_dynamic_draft_lengths(tmp_path):
  """dynamic=false,true: each (drafter, k) twice, the policy's points
  labelled '<drafter> dynamic' with its rounds by length; greedy identical."""
  out = tmp_path / 'results'
  r = sweep(f'--config.output={out}', '--config.drafters=ngram', '--config.draft_lens=2',
            '--config.temperatures=0', '--config.dynamic=false,true', '--config.costs=1,1.2,1.4')
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary['points'] == 2 * (1 + 2) and summary['greedy_identical'] == 1.0
  raw = [json.loads(l) for l in (out / 'raw.jsonl').read_text().splitlines()]
  assert {l['drafter'] for l in raw} == {'none', 'ngram', 'ngram dynamic'}
  dyn = [l for l in raw if l['drafter'] == 'ngram dynamic']
  assert all(l['policy']['draft_lens'] == [0, 1, 2] and l['policy']['costs'] == [1, 1.2, 1.4]
             and sum(l['policy']['rounds_by_drafted_len']) > 0 for l in dyn)
  assert 'ngram dynamic' in (out / 'results.md').read_text()


def test_sweep_compares_trees_with_chains_at_equal_verify_rows(tmp_path):
  """trees=2x1: ngram's tree 2x1 (5 verify rows) beside its chain at k = 4
  (also 5 rows) and k = 2; draft_model cannot draft trees (skipped, said);
  greedy identical to AR; the tree plots written."""
  out = tmp_path / 'results'
  r = sweep(f'--config.output={out}', '--config.drafters=ngram,draft_model:target',
            '--config.draft_lens=2', '--config.temperatures=0', '--config.trees=2x1')
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary['points'] == 2 * 5 and summary['greedy_identical'] == 1.0
  assert 'skipping draft_model:target tree 2x1' in r.stderr
  raw = [json.loads(l) for l in (out / 'raw.jsonl').read_text().splitlines()]
  rows = {(l['drafter'], l['draft_len']): l['verify_rows'] for l in raw}
  assert rows == {('none', 0): 1, ('ngram', 2): 3, ('ngram', 4): 5, ('ngram tree 2x1', 2): 5,
                  ('draft_model:target', 2): 3}
  assert '| ngram tree 2x1 | 2 (5 rows) |' in (out / 'results.md').read_text()
  for name in ('tree_vs_chain_speedup.png', 'tree_vs_chain_tokens_per_call.png'):
    assert (out / name).stat().st_size > 0


def test_table_is_recomputed_from_raw(tiny_sweep):
  out = tiny_sweep[0]
  raw = [json.loads(l) for l in (out / 'raw.jsonl').read_text().splitlines()]
  table = list(csv.DictReader((out / 'results.csv').open()))
  groups = collections.defaultdict(list)
  for r in raw:
    groups[(r['domain'], r['drafter'], r['draft_len'], r['temperature'])].append(r)

  def tok_s(rows):
    per_batch = {r['batch']: r['batch_seconds'] for r in rows}
    return sum(r['new_tokens'] for r in rows) / sum(per_batch.values())

  assert len(table) == len(groups)
  for t in table:
    rows = groups[(t['domain'], t['drafter'], int(t['draft_len']), float(t['temperature']))]
    ar = groups[(t['domain'], 'none', 0, float(t['temperature']))]
    tokens = sum(r['new_tokens'] for r in rows)
    calls = sum(r['target_calls'] for r in rows)
    assert int(t['new_tokens']) == tokens and int(t['target_calls']) == calls
    assert float(t['tokens_per_second']) == pytest.approx(tok_s(rows), rel=1e-3)
    assert float(t['speedup']) == pytest.approx(tok_s(rows) / tok_s(ar), abs=1e-3)
    assert float(t['mean_accepted_per_call']) == pytest.approx(tokens / calls, abs=1e-3)
    assert float(t['logprob_per_token']) == pytest.approx(
        sum(r['logprob_sum'] for r in rows) / tokens, abs=1e-4)
    k = int(t['draft_len'])
    if k:   # per verify call: rounds where ngram abstained were AR steps
      draft_calls = sum(r['draft_calls'] for r in rows)
      assert int(t['draft_calls']) == draft_calls <= calls
      acc = np.sum([r['accepted_by_position'] for r in rows], axis=0) / draft_calls
      assert [float(a) for a in t['acceptance_by_position'].split('/')] == pytest.approx(acc, abs=1e-4)
      assert float(t['v']) == pytest.approx(
          rows[0]['verify_ms_per_round'] / rows[0]['ar_ms_per_step'], abs=1e-4)
    if t['drafter'] == 'draft_model:target':         # the target drafting for itself
      assert float(t['acceptance_rate']) == 1.0
    if float(t['temperature']) == 0:
      if k:
        assert float(t['greedy_identical']) == 1.0
        assert all(r['completion_ids'] == a['completion_ids'] for r, a in zip(rows, ar))
    else:
      pits = [x for r in rows for x in r['pit']]
      assert len(pits) == tokens
      assert float(t['pit_p_value']) == pytest.approx(quality.pit_p_value(pits), abs=1e-4)


@pytest.mark.parametrize('key, value, message', [
    ('draft_lens', '2,0', 'every k must be >= 1'),
    ('temperatures', '0,-0.5', 'finite number >= 0'),
    ('temperatures', '0,hot', "'hot' is not a valid float"),
    ('drafters', 'ngram,medusa', "unknown drafter 'medusa'"),
    ('drafters', 'mtp:/nonexistent', 'not a drafter checkpoint folder'),
    ('drafters', 'draft_model:big', 'layer count or "target"'),
    ('drafters', 'ngram,ngram', 'twice'),
    ('drafters', 'ngram+lookup', "unknown drafter 'ngram+lookup'"),
    ('drafters', 'mtp+lookahead', "unknown drafter 'mtp+lookahead'"),
    ('lookup', 0, 'lookup must be >= 1'),
    ('lookup_unsure', -0.1, 'lookup_unsure must be in [0, 1]'),
    ('lookup_sampled_min', 1.5, 'lookup_sampled_min must be in [0, 1]'),
    ('domains', 'code,poetry', "unknown domain 'poetry'"),
    ('batch_sizes', '0', 'every value must be >= 1'),
    ('draft_lens', '', 'draft_lens is empty'),
    ('dynamic', 'maybe', "dynamic: 'maybe' is not a valid boolean"),
    ('confidence_threshold', -0.5, 'confidence_threshold must be in [0, 1]'),
    ('trees', '2x0', 'branching factor >= 1'),
    ('trees', 'wide', 'such as 4,2,1'),
    ('trees', '2x1,2x1', 'twice'),
    ('trees', '500x1', "the largest tree's 1001 nodes"),
])
def test_bad_sweep_values_are_refused_before_anything_runs(key, value, message, tmp_path):
  from configs import ablate
  from specdec_jax import sweep as sweep_lib
  from specdec_jax.errors import UserError
  c = ablate.get_config('tiny')
  c.output = str(tmp_path / 'o')
  c[key] = value
  with pytest.raises(UserError, match=re.escape(message)):
    sweep_lib.run(c)
  assert not (tmp_path / 'o').exists()


def test_existing_results_are_refused_unless_overwrite(tiny_sweep):
  out = tiny_sweep[0]
  before = (out / 'raw.jsonl').read_bytes()
  r = sweep(f'--config.output={out}', timeout=120)
  assert r.returncode == 2 and 'already holds results' in r.stderr and 'overwrite' in r.stderr
  assert (out / 'raw.jsonl').read_bytes() == before


def test_unknown_variant_fails_with_one_line():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  r = subprocess.run([sys.executable, '-m', 'experiments.run', '--config=configs/ablate.py:huge'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
  assert 'unknown variant' in r.stderr


# ----------------------------------------------------------------------------- quality.py

@pytest.fixture(scope='module')
def small():
  cfg = config_lib.tiny(vocab_size=64)
  return cfg, init_params(cfg, jax.random.key(3))


def _sample(cfg, params, temperature, rows=16, new=40):
  gen = generate.Generator(cfg, cache_size=64, greedy=False)
  prompts = [[2, 5 + i % 7, 9 + i % 5] for i in range(rows)]
  batch = generate.make_batch(prompts, batch_size=rows, bucket_len=16, max_new_tokens=new,
                              keys=jax.random.split(jax.random.key(0), rows),
                              temperature=temperature)
  state = gen.generate(params, batch)
  out = generate.completions(state, cfg.eos_id)
  return ([r['prompt_ids'] for r in out],
          [r['completion_ids'] + ([cfg.eos_id] if r['finish_reason'] == 'eos' else []) for r in out])


def test_score_log_probs_equal_the_full_forward(small):
  cfg, params = small
  prompts, comps = _sample(cfg, params, 1.0, rows=3, new=10)
  scores = quality.Scorer(cfg, params, length=32, new=10, chunk=2)(prompts, comps, temperature=1.0)
  seqs = np.zeros((len(prompts), 32), np.int32)      # right padding: causal, so harmless
  for i, (p, c) in enumerate(zip(prompts, comps)):
    seqs[i, :len(p) + len(c)] = p + c
  logits, _, _ = Transformer(cfg).apply({'params': params}, jnp.asarray(seqs))
  for i, (p, c, (logp, pit)) in enumerate(zip(prompts, comps, scores)):
    ref = jax.nn.log_softmax(logits[i, len(p) - 1:len(p) + len(c) - 1], axis=-1)[
        jnp.arange(len(c)), jnp.array(c)]
    assert len(logp) == len(pit) == len(c)
    np.testing.assert_allclose(logp, ref, atol=1e-4)


def test_pit_accepts_exact_sampling_and_rejects_a_wrong_temperature(small):
  """Significance 0.001: exact samples pass; samples drawn at T=1.6 scored as
  T=0.6 (a large distortion, ~600 tokens) must fail."""
  cfg, params = small
  # 28 rows x <= 40 tokens: > 500 scored tokens whatever the draws (16 rows
  # gave 388 under an inverse-CDF sampler: this model ends rows early).
  prompts, comps = _sample(cfg, params, 1.6, rows=28)
  scorer = quality.Scorer(cfg, params, length=64, new=40)
  right = [x for _, pit in scorer(prompts, comps, temperature=1.6) for x in pit]
  wrong = [x for _, pit in scorer(prompts, comps, temperature=0.6) for x in pit]
  assert len(right) > 500
  assert quality.pit_p_value(right) > 1e-3
  assert quality.pit_p_value(wrong) < 1e-3
  assert quality.pit_p_value(right[:5]) is None
