"""Every drafter kind against plain AR on held-out prompts, per domain, Gemma 3 270M.

    python -m experiments.bench_drafters                      # greedy, k=4 (~15 min here)
    python -m experiments.bench_drafters --temperature=1.0    # sampled
    python -m experiments.bench_drafters --drafters=mtp --domains=code

Prompts: experiments/prompts/{code,prose}.jsonl (HumanEval stubs and
fortunes quotations; neither is in the drafter training data; see
tools/make_prompt_sets.py). For each domain, AR and each drafter run in this
one process on the same prompts (batch 1, one bucket per domain so each
mode compiles once; compile time is excluded and printed separately); times
are the sum over prompts of the median of `repeats` runs. `speedup` is end to
end (prefill + decode, as this script always reported it), `decode_speedup`
the decode loop alone (prefill excluded: it is the same work in both modes,
and with the prompts padded to one bucket per domain it is a large share of
a 64-token generation: ~1.4 s of ~5 s per code prompt with bf16 weights on a
Zen 3). Greedy runs assert that every speculative output equals AR's token
for token.

Drafters: ngram (prompt lookup), draft_model (an untrained random 2-layer
Gemma with the full vocabulary: a floor, not a contender), mtp and heads
(trained checkpoints; the shipped ones by default); mtp+lookup and
heads+lookup: prompt lookup first where the last --lookup+ tokens occurred
earlier, the trained drafter elsewhere. Prints one JSON line
per (domain, drafter) and then a markdown table.

--ar_param_dtype=float32 also times plain AR with the weights in that dtype
(another model: its outputs are not compared) and adds the speedup against
it: on a CPU where `auto` picks bf16 for its verify passes but a float32
decode step is faster (a Zen 3 EPYC: README, "Across CPUs"), that is the
speedup over the fastest plain decoding there.
"""
import json
import statistics
import time

from absl import app, flags
import jax
import numpy as np

from specdec_jax import api, drafters, generate, sweep
from specdec_jax.targets import load_target

KINDS = ['ngram', 'draft_model', 'mtp', 'heads']
LOOKUP_KINDS = ['mtp+lookup', 'heads+lookup']   # prompt lookup first (drafters.LookupDrafter)

_DOMAINS = flags.DEFINE_list('domains', ['code', 'prose'], 'Prompt sets (experiments/prompts/).')
_DRAFTERS = flags.DEFINE_list('drafters', KINDS, 'Drafter kinds to compare (also ' +
                              ', '.join(LOOKUP_KINDS) + ').')
_LOOKUP = flags.DEFINE_integer('lookup', 2, 'The +lookup kinds: the shortest earlier match '
                               'that drafts by prompt lookup.')
_UNSURE = flags.DEFINE_float('lookup_unsure', drafters.LOOKUP_UNSURE,
                             'The +lookup kinds: rows with only a shorter match draft from it '
                             'where the trained drafter\'s first-token confidence is below '
                             'this (0 = off).')
_SAMPLED_MIN = flags.DEFINE_float('lookup_sampled_min', drafters.LOOKUP_SAMPLED_MIN,
                                  'The +lookup kinds, sampling: a row drafts by lookup only '
                                  'where the trained drafter gives lookup\'s first token at '
                                  'least this probability (0 = off).')
_K = flags.DEFINE_integer('draft_len', 4, 'Tokens drafted per round.')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'New tokens per prompt.')
_N = flags.DEFINE_integer('prompts', 6, 'Prompts per domain (the first n).')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Timed runs per prompt (median).')
_TEMP = flags.DEFINE_float('temperature', 0.0, '0 = greedy.')
_MTP = flags.DEFINE_string('mtp', '', 'mtp drafter folder; empty = the shipped one.')
_HEADS = flags.DEFINE_string('heads', '', 'heads drafter folder; empty = the shipped one.')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'auto', ['auto', 'bfloat16', 'float32'],
                                    'Weight dtype (auto: precision.resolve).')
_AR_DTYPE = flags.DEFINE_enum('ar_param_dtype', '', ['', 'bfloat16', 'float32'],
                              'Also time plain AR with weights in this dtype (another model, '
                              'not compared) and print the speedup against it.')


def make_drafter(target, kind, k):
  """(drafter, params) through api.load_drafter; (None, reason) when a checkpoint is missing."""
  base = kind.partition('+')[0]
  try:
    d = api.load_drafter(target, kind, draft_len=k,
                         checkpoint={'mtp': _MTP.value, 'heads': _HEADS.value}.get(base, ''),
                         lookup=_LOOKUP.value if base != kind else 0,
                         lookup_unsure=_UNSURE.value if base != kind else 0.0,
                         lookup_sampled_min=_SAMPLED_MIN.value if base != kind else 0.0)
  except ValueError as e:
    return None, str(e)
  return d.drafter, d.params


def run_mode(gen, params, dparams, prompts, bucket_len):
  """(compile s, total s, decode s, completions): one compile, then per-prompt
  medians of prefill + decode and of decode alone."""
  def batch(ids, i):
    return generate.make_batch([ids], batch_size=1, bucket_len=bucket_len,
                               max_new_tokens=_NEW.value, keys=jax.random.key(i)[None],
                               temperature=_TEMP.value)
  t = time.perf_counter()
  b0 = batch(prompts[0], 0)
  pre = gen.prefill.lower(gen, params, b0, dparams).compile()
  dec = gen.decode.lower(gen, params, jax.eval_shape(lambda: pre(params, b0, dparams)),
                         dparams).compile()
  compile_s = time.perf_counter() - t
  total, decode, rows = 0.0, 0.0, []
  for i, ids in enumerate(prompts):
    b = batch(ids, i)
    times, dec_times = [], []
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      s0 = jax.block_until_ready(pre(params, b, dparams))
      t1 = time.perf_counter()
      state = jax.block_until_ready(dec(params, s0, dparams))
      t2 = time.perf_counter()
      times.append(t2 - t)
      dec_times.append(t2 - t1)
    total += statistics.median(times)
    decode += statistics.median(dec_times)
    rows += generate.completions(state, gen.config.eos_id)
  return compile_s, total, decode, rows


def main(_):
  bad = sorted(set(_DRAFTERS.value) - set(KINDS + LOOKUP_KINDS))
  if bad:
    raise SystemExit(f'error: unknown drafter {bad[0]!r}; choose from '
                     f'{", ".join(KINDS + LOOKUP_KINDS)}')
  target = load_target('gemma3_270m', param_dtype=_PARAM_DTYPE.value)
  print(json.dumps({'precision': target.precision}), flush=True)
  cfg, params, tok = target.config, target.params, target.tokenizer
  k, greedy = _K.value, _TEMP.value == 0
  other = None
  if _AR_DTYPE.value and _AR_DTYPE.value != cfg.param_dtype:
    other = load_target('gemma3_270m', param_dtype=_AR_DTYPE.value)
  results = []
  for domain in _DOMAINS.value:
    prompts = sweep.load_prompts(sweep.PROMPT_DIR, domain, tok, _N.value, 0)
    bucket_len = generate.bucket(max(map(len, prompts)))
    cache = -(-(bucket_len + _NEW.value + k + 1) // 128) * 128
    ar = generate.Generator(cfg, cache_size=cache, greedy=greedy)
    ar_c, ar_s, ar_dec, ar_rows = run_mode(ar, params, None, prompts, bucket_len)
    ar_tokens = sum(r['new_tokens'] for r in ar_rows)
    if other is not None:
      ar2 = generate.Generator(other.config, cache_size=cache, greedy=greedy)
      _, ar2_s, ar2_dec, ar2_rows = run_mode(ar2, other.params, None, prompts, bucket_len)
      ar2_tokens = sum(r['new_tokens'] for r in ar2_rows)
    for kind in _DRAFTERS.value:
      d, dparams = make_drafter(target, kind, k)
      if d is None:
        print(json.dumps({'domain': domain, 'drafter': kind, 'skipped': dparams}))
        continue
      gen = generate.Generator(cfg, cache_size=cache, greedy=greedy, drafter=d)
      sp_c, sp_s, sp_dec, rows = run_mode(gen, params, dparams, prompts, bucket_len)
      tokens = sum(r['new_tokens'] for r in rows)
      calls = sum(r['target_calls'] for r in rows)
      identical = [r['completion_ids'] for r in rows] == [r['completion_ids'] for r in ar_rows]
      if greedy:
        assert identical, f'{domain}/{kind}: greedy speculative output differs from AR'
      acc = (np.sum([r['accepted_by_position'] for r in rows], axis=0)
             / max(sum(r['draft_calls'] for r in rows), 1))
      res = dict(domain=domain, drafter=kind, draft_len=k, temperature=_TEMP.value,
                 prompts=len(prompts), new_tokens=tokens,
                 ar_tokens_per_second=round(ar_tokens / ar_s, 2),
                 spec_tokens_per_second=round(tokens / sp_s, 2),
                 speedup=round((tokens / sp_s) / (ar_tokens / ar_s), 3),
                 decode_speedup=round((tokens / sp_dec) / (ar_tokens / ar_dec), 3),
                 spec_ms_per_token=round(sp_s / tokens * 1e3, 1),
                 mean_accepted_per_call=round(tokens / calls, 3),
                 acceptance_by_position=[round(float(a), 3) for a in acc],
                 greedy_identical=identical if greedy else None,
                 compile_seconds=dict(ar=round(ar_c, 1), spec=round(sp_c, 1)))
      if other is not None:
        o = other.config.param_dtype
        res.update({f'ar_{o}_tokens_per_second': round(ar2_tokens / ar2_s, 2),
                    f'speedup_vs_{o}_ar': round((tokens / sp_s) / (ar2_tokens / ar2_s), 3),
                    f'decode_speedup_vs_{o}_ar':
                        round((tokens / sp_dec) / (ar2_tokens / ar2_dec), 3)})
      results.append(res)
      print(json.dumps(res), flush=True)
  print()
  print(f'k = {k}, temperature = {_TEMP.value}, {_N.value} prompts x {_NEW.value} new tokens '
        'per domain, batch 1')
  print()
  o = other and other.config.param_dtype
  extra = f' | vs {o} AR: speedup, decode speedup' if o else ''
  print(f'| domain | drafter | AR tok/s | spec tok/s | speedup | decode speedup{extra} | '
        'tokens/call | acceptance by position |')
  print('|---|---|---|---|---|---|' + ('---|' if o else '') + '---|---|')
  for r in results:
    cells = (f' | {r[f"speedup_vs_{o}_ar"]}x, {r[f"decode_speedup_vs_{o}_ar"]}x' if o else '')
    print(f'| {r["domain"]} | {r["drafter"]} | {r["ar_tokens_per_second"]} | '
          f'{r["spec_tokens_per_second"]} | {r["speedup"]}x | {r["decode_speedup"]}x{cells} | '
          f'{r["mean_accepted_per_call"]} | '
          f'{" / ".join(str(a) for a in r["acceptance_by_position"])} |')


if __name__ == '__main__':
  app.run(main)
