"""Greedy speculative == greedy autoregressive on the real Gemma 3 270M."""
import json
import pathlib

import jax
import pytest

from specdec_jax import drafters, generate
from test_speculative import WrongDrafter

pytestmark = pytest.mark.slow
FIXTURE = json.loads((pathlib.Path(__file__).parent / 'fixtures' / 'hf_gemma3_270m.json').read_text())


def test_gemma_greedy_speculative_equals_autoregressive(gemma):
  cfg, params = gemma.config, gemma.params
  cases = FIXTURE['cases'][2:5]                     # prose and code
  prompts = [c['prompt_ids'] for c in cases]
  n, k = 24, 4

  def run(drafter=None, dparams=None):
    gen = generate.Generator(cfg, cache_size=128, greedy=True, drafter=drafter)
    batch = generate.make_batch(prompts, batch_size=len(prompts), bucket_len=32, max_new_tokens=n,
                                keys=jax.random.split(jax.random.key(0), len(prompts)))
    return generate.completions(gen.generate(params, batch, dparams), cfg.eos_id)

  ar = run()
  assert [r['completion_ids'] for r in ar] == [c['greedy_ids'] for c in cases]   # == HF too
  for name, d, dp in [('ngram', drafters.NgramDrafter(k, cfg.vocab_size), None),
                      ('target_itself', drafters.DraftModelDrafter(cfg, k), params),
                      ('always_wrong', WrongDrafter(drafters.DraftModelDrafter(cfg, k)), params)]:
    sp = run(d, dp)
    assert [r['completion_ids'] for r in sp] == [r['completion_ids'] for r in ar], name
    calls = [r['target_calls'] for r in sp]
    if name == 'target_itself':
      assert calls == [-(-n // (k + 1))] * len(prompts)
    if name == 'always_wrong':
      assert calls == [n] * len(prompts)
