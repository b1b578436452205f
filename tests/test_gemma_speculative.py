"""Greedy speculative == greedy autoregressive on the real Gemma 3 270M."""
import json
import pathlib

import jax
import pytest

from specdec_jax import drafters, generate
from test_speculative import ShiftedDrafter, shifted

pytestmark = pytest.mark.slow
FIXTURE = json.loads((pathlib.Path(__file__).parent / 'fixtures' / 'hf_gemma3_270m.json').read_text())


def test_gemma_greedy_speculative_equals_autoregressive(gemma):
  cfg, params = gemma.config, gemma.params
  cases = FIXTURE['cases'][2:5]                     # prose and code
  prompts = [c['prompt_ids'] for c in cases]
  # 12 tokens: the target drafting for itself takes 3 rounds (5 + 5 + 2, the
  # last cut by max_new_tokens); the fixture's full 24 tokens == HF are
  # test_gemma_parity's. 24 here cost ~12 s more for no other code path.
  n, k = 12, 4

  def run(drafter=None, dparams=None):
    gen = generate.Generator(cfg, cache_size=128, greedy=True, drafter=drafter)
    batch = generate.make_batch(prompts, batch_size=len(prompts), bucket_len=32, max_new_tokens=n,
                                keys=jax.random.split(jax.random.key(0), len(prompts)))
    return generate.completions(gen.generate(params, batch, dparams), cfg.eos_id)

  ar = run()
  assert [r['completion_ids'] for r in ar] == [c['greedy_ids'][:n] for c in cases]   # == HF too
  itself = ShiftedDrafter(drafters.DraftModelDrafter(cfg, k))
  for name, d, dp in [('ngram', drafters.NgramDrafter(k, cfg.vocab_size), None),
                      ('target_itself', itself, shifted(params)),    # one compiled program
                      ('always_wrong', itself, shifted(params, 1))]:  # for both (~32 s each)
    sp = run(d, dp)
    assert [r['completion_ids'] for r in sp] == [r['completion_ids'] for r in ar], name
    calls = [r['target_calls'] for r in sp]
    if name == 'target_itself':
      assert calls == [-(-n // (k + 1))] * len(prompts)
    if name == 'always_wrong':
      assert calls == [n] * len(prompts)


def test_shipped_mtp_drafter_loads_drafts_and_is_exact(gemma):
  """The committed MTP drafter: loads (checksum, shapes, target match), is
  what configs/generate.py uses by default, and drafts tokens the target
  accepts, greedy and sampled paths alike."""
  from specdec_jax import checkpoints
  from specdec_jax.generation_job import resolve_drafter, shipped_drafter
  from configs.generate import get_config
  cfg, params = gemma.config, gemma.params
  path = shipped_drafter('gemma3_270m')
  assert path is not None and resolve_drafter(get_config()) == 'mtp+lookup'
  with_tree = get_config()
  with_tree.tree = '2,1'
  assert resolve_drafter(with_tree) == 'mtp'          # trees are drafted by mtp alone
  dcfg, dparams, manifest = checkpoints.load_drafter(path)
  assert manifest['target']['name'] == 'gemma3_270m' and (path / 'NOTICE').is_file()
  d = drafters.make_drafter('mtp', draft_len=4, target_config=cfg, drafter_config=dcfg)
  tok = gemma.tokenizer
  prompts = [tok.encode('def add(a, b):\n    """Return the sum of a and b."""\n'),
             tok.encode('The quick brown fox jumps over the lazy dog. The quick brown')]

  def run(drafter=None, dp=None, temperature=0.0):
    gen = generate.Generator(cfg, cache_size=128, greedy=temperature == 0, drafter=drafter)
    batch = generate.make_batch(prompts, batch_size=2, bucket_len=32, max_new_tokens=24,
                                keys=jax.random.split(jax.random.key(0), 2),
                                temperature=temperature)
    return generate.completions(gen.generate(params, batch, dp), cfg.eos_id)

  ar, sp = run(), run(d, jax.device_put(dparams))
  assert [r['completion_ids'] for r in sp] == [r['completion_ids'] for r in ar]
  per_call = sum(r['new_tokens'] for r in sp) / sum(r['target_calls'] for r in sp)
  # It drafts what Gemma would say: a drafter the target never agrees with
  # gives 1.0 here; the shipped drafters measured 1.5 (2026-11-27's, float32
  # weights) and above 1.5 (the one before).
  assert per_call > 1.35, per_call
  sampled = run(d, jax.device_put(dparams), temperature=1.0)
  assert all(r['new_tokens'] == 24 or r['finish_reason'] == 'eos' for r in sampled)
  # Sampling, the target accepts drafts too: more than one token per call,
  # and first drafts accepted in every row (all rejected would give exactly 1).
  per_call = sum(r['new_tokens'] for r in sampled) / sum(r['target_calls'] for r in sampled)
  assert per_call > 1.2, per_call
  assert all(r['draft_calls'] > 0 and r['accepted_by_position'][0] > 0 for r in sampled), sampled


def test_gemma_bf16_greedy_speculative_equals_autoregressive():
  """With bf16 weights too, token for token, on the prose prompts where it
  used to break: before model.row_sum / row_max / settled, a plain step (one
  query row) and a verify pass (k + 1 rows) rounded norms, the residual add
  and the attention softmax differently in the last bit, bf16 rounding of the
  next matmul's input amplified that to ~0.05 in the logits, and near-ties
  (top-2 gaps 0.013 and 0.019) flipped on 2 of these 3 prompts."""
  from specdec_jax import api, sweep
  t = api.load_target('gemma3_270m', param_dtype='bfloat16')
  prompts = sweep.load_prompts(sweep.PROMPT_DIR, 'prose', t.tokenizer, 3, 0)
  ar = api.generate(t, prompts, max_new_tokens=48, parallel='none')
  d = api.load_drafter(t, 'ngram', draft_len=4)
  sp = api.generate(t, prompts, drafter=d, max_new_tokens=48, parallel='none', dynamic=False)
  assert sp.completion_ids == ar.completion_ids
  # The shipped mtp drafter behind prompt lookup (rows with an earlier match
  # of their last 2+ tokens draft from it): still AR's output, in fewer calls.
  d = api.load_drafter(t, 'mtp+lookup', draft_len=4)
  assert d.kind == 'mtp+lookup' and d.drafter.lookup.min_ngram == 2
  sp = api.generate(t, prompts, drafter=d, max_new_tokens=48, parallel='none', dynamic=False)
  assert sp.completion_ids == ar.completion_ids
  assert sp.target_calls < ar.target_calls
