"""Speculative vs plain autoregressive decoding, Gemma 3 270M, same process.

    python -m experiments.bench_spec                       # ngram, k=4, ~4 min here
    python -m experiments.bench_spec --draft_len=8 --min_ngram=2 --max_ngram=5

Same prompts, same max tokens, greedy; each mode compiled first (reported
separately), then `repeats` timed runs per prompt, median. Prints per mode:
tok/s, ms/token, the speedup over AR, mean tokens per target call, the
per-position acceptance, and the measured costs behind the Leviathan et al.
prediction: v = one verify call on k+1 tokens / one T=1 target step, c = one
draft of k tokens / (k target steps). Predicted speedup = E / (f (k c + v)
+ 1 - f) with E the measured tokens per target call and f the fraction of
calls that verified a draft (the drafter abstains where it finds no match of
min_ngram tokens: those calls are AR steps); the α-form uses α fitted to the
tokens per verify call (measure.predicted_speedup). The prompts are repetitive code
(experiments/prompts/repetitive.jsonl), where prompt lookup shines (no
HumanEval: those are held out for the drafter evaluations).
"""
import json
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import drafters, generate, sweep
from specdec_jax.measure import fit_alpha, median_seconds, predicted_speedup
from specdec_jax.model import KVCache, Transformer
from specdec_jax.targets import load_target

_DRAFTER = flags.DEFINE_enum('drafter', 'ngram', ['ngram'], 'Drafter kind.')
_K = flags.DEFINE_integer('draft_len', 4, 'Tokens drafted per round.')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'New tokens per prompt.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per prompt (median).')
_MIN_N = flags.DEFINE_integer('min_ngram', 1, 'Shortest match the ngram drafter drafts from '
                              '(shorter: it abstains and the round is an AR step).')
_MAX_N = flags.DEFINE_integer('max_ngram', 3, 'Longest match tried first.')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'auto', ['auto', 'bfloat16', 'float32'],
                                    'Weight dtype (auto: precision.resolve).')



def run_mode(gen, params, prompts, dparams):
  """(compile seconds, median seconds per prompt list, completions)."""
  t = time.perf_counter()
  compiled = {}
  for ids in prompts:
    batch = make(ids)
    shape = batch.prompts.shape
    if shape not in compiled:
      pre = gen.prefill.lower(gen, params, batch, dparams).compile()
      st = jax.eval_shape(lambda: pre(params, batch, dparams))
      compiled[shape] = (pre, gen.decode.lower(gen, params, st, dparams).compile())
  compile_s = time.perf_counter() - t
  seconds, rows = 0.0, []
  for ids in prompts:
    batch = make(ids)
    pre, dec = compiled[batch.prompts.shape]
    times = []
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      state = jax.block_until_ready(dec(params, pre(params, batch, dparams), dparams))
      times.append(time.perf_counter() - t)
    seconds += statistics.median(times)
    rows += generate.completions(state, gen.config.eos_id)
  return compile_s, seconds, rows


def make(ids):
  return generate.make_batch([ids], batch_size=1, bucket_len=generate.bucket(len(ids)),
                             max_new_tokens=_NEW.value, keys=jax.random.key(0)[None])


def main(_):
  target = load_target('gemma3_270m', param_dtype=_PARAM_DTYPE.value)
  print(json.dumps({'precision': target.precision}), flush=True)
  cfg, params, tok = target.config, target.params, target.tokenizer
  k = _K.value
  prompts = sweep.load_prompts(sweep.PROMPT_DIR, 'repetitive', tok, 100, 0)
  cache = max(generate.bucket(len(p)) for p in prompts) + _NEW.value + k + 1
  cache = -(-cache // 128) * 128
  ar_gen = generate.Generator(cfg, cache_size=cache, greedy=True)
  drafter = drafters.NgramDrafter(k, cfg.vocab_size, max_ngram=_MAX_N.value,
                                  min_ngram=_MIN_N.value)
  sp_gen = generate.Generator(cfg, cache_size=cache, greedy=True, drafter=drafter)
  ar_c, ar_s, ar_rows = run_mode(ar_gen, params, prompts, None)
  sp_c, sp_s, sp_rows = run_mode(sp_gen, params, prompts, None)
  # Computed, not assumed: printed below, and a mismatch also ends with status 1.
  identical = [r['completion_ids'] for r in sp_rows] == [r['completion_ids'] for r in ar_rows]
  tokens = sum(r['new_tokens'] for r in sp_rows)
  calls = sum(r['target_calls'] for r in sp_rows)
  draft_calls = sum(r['draft_calls'] for r in sp_rows)     # the rest: AR steps (abstained)
  accepted = np.sum([r['accepted_by_position'] for r in sp_rows], axis=0) / max(draft_calls, 1)

  # Measured costs: one target step at T=1 and T=k+1 on a warm cache, one draft.
  apply = jax.jit(lambda p, x, c: Transformer(cfg).apply({'params': p}, x, c)[0])
  kv = KVCache.init(cfg, 1, cache).replace(lengths=jnp.array([100], jnp.int32))
  t1 = median_seconds(lambda: apply(params, jnp.ones((1, 1), jnp.int32), kv))
  tk = median_seconds(lambda: apply(params, jnp.ones((1, k + 1), jnp.int32), kv))
  toks = jnp.asarray(np.resize(prompts[0], (1, cache)).astype(np.int32))
  propose = jax.jit(drafter.propose)
  td = median_seconds(lambda: propose(toks, jnp.array([len(prompts[0])])))
  v, c = tk / t1, td / (k * t1)
  e = tokens / calls
  f = draft_calls / calls
  e_verify = (tokens - (calls - draft_calls)) / max(draft_calls, 1)
  alpha = fit_alpha(e_verify, k)
  summary = {
      'drafter': _DRAFTER.value, 'draft_len': k, 'prompts': len(prompts), 'new_tokens': tokens,
      'ar_tokens_per_second': round(tokens / ar_s, 2),
      'spec_tokens_per_second': round(tokens / sp_s, 2),
      'speedup': round(ar_s / sp_s, 3),
      'ar_ms_per_token': round(ar_s / tokens * 1e3, 2),
      'spec_ms_per_token': round(sp_s / tokens * 1e3, 2),
      'mean_accepted_per_call': round(e, 3),
      'verify_fraction': round(f, 3), 'tokens_per_verify': round(e_verify, 3),
      'acceptance_by_position': [round(float(a), 3) for a in accepted],
      'verify_cost_v': round(v, 3), 'draft_cost_c': round(c, 4),
      'predicted_speedup': round(e / (f * (k * c + v) + 1 - f), 3),
      'alpha_fitted': round(alpha, 3),
      'predicted_speedup_alpha': round(predicted_speedup(alpha, k, c, v, f), 3),
      'compile_seconds': {'ar': round(ar_c, 2), 'spec': round(sp_c, 2)},
      'greedy_outputs_identical': identical,
  }
  print(json.dumps(summary))
  if not identical:
    sys.exit('error: greedy speculative output differs from autoregressive')


if __name__ == '__main__':
  app.run(main)
