"""The dynamic draft-length policy against fixed k and plain decoding (#17).

    python -m experiments.bench_dynamic          # ~25 min on this 2-core CPU (docs/BENCHMARKS.md §7)
    python -m experiments.bench_dynamic --drafters=ngram --domains=code --repeats=1
    python -m experiments.bench_dynamic --drafters=mtp --draft_lens=1,2,4 --dynamic_lens=4 \
        --thresholds=0,0.1,0.2,0.4,0.6 --temperatures=1     # the confidence lever, 9 min

For each temperature, every variant is compiled first: plain AR (`none`),
each drafter at each fixed k (`--draft_lens`), and each drafter with the
policy drafting at most k (`--dynamic_lens`; the job's default is the policy
with draft_len = 4, costs measured once on this machine and cached). Then,
per domain (held-out prompt sets in experiments/prompts), every repeat runs
each variant in turn over the domain's prompts (batch 1), so drift on a
shared machine hits them alike; the median time per variant gives tok/s and
the speedup over AR measured in the same process. Greedy outputs must equal
AR's (checked). Printed: one table row per (domain, T, variant) and, per
drafter, the two numbers #17 asks for: the default policy's worst speedup
over AR across domains and temperatures, and its mean ratio to the best
fixed k. Everything is also written as JSON to --output.
"""
import json
import pathlib
import statistics
import sys
import time

from absl import app, flags
import jax
import numpy as np

from specdec_jax import api, runs, sweep
from specdec_jax import generate as gen_lib
from specdec_jax.precision import cpu_info
from specdec_jax.targets import load_target

_DRAFTERS = flags.DEFINE_list('drafters', ['mtp', 'ngram'], 'Drafter kinds.')
_LENS = flags.DEFINE_list('draft_lens', ['2', '4', '8'], 'Fixed k.')
_DYN = flags.DEFINE_list('dynamic_lens', ['4', '8'], 'Largest k of the policy.')
_DOMAINS = flags.DEFINE_list('domains', ['code', 'prose', 'chat'], 'Prompt sets.')
_TEMPS = flags.DEFINE_list('temperatures', ['0', '1'], 'Temperatures.')
_PROMPTS = flags.DEFINE_integer('prompts', 3, 'Prompts per domain.')
_NEW = flags.DEFINE_integer('max_new_tokens', 48, 'New tokens per prompt.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed passes (median).')
_DTYPE = flags.DEFINE_string('param_dtype', 'auto', 'auto | bfloat16 | float32.')
_DEFAULT_K = flags.DEFINE_integer('default_len', 4, "The job's default draft_len (its policy).")
_THRESHOLDS = flags.DEFINE_list('thresholds', ['0.4'],
                                "The policy's confidence thresholds (0.4: the job's default).")
DEFAULT_THRESHOLD = 0.4
_OUT = flags.DEFINE_string('output', '', 'JSON results ("" = not written).')


def main(_):
  target = load_target('gemma3_270m', param_dtype=_DTYPE.value)
  cpu = cpu_info()[0]
  print(f'# {cpu}, {target.precision}', file=sys.stderr)
  prompts = {d: sweep.load_prompts(sweep.PROMPT_DIR, d, target.tokenizer, _PROMPTS.value, 0)
             for d in _DOMAINS.value}
  longest = max(len(p) for ps in prompts.values() for p in ps)
  max_k = max(map(int, _LENS.value + _DYN.value))
  # One prompt bucket for every domain, programs dropped between
  # temperatures: a program per variant and bucket exhausted XLA:CPU's code
  # mappings at the third domain ('LLVM compilation error: Cannot allocate
  # memory', 2026-11-27).
  bucket_len = gen_lib.bucket(longest)
  rows = []
  for T in map(float, _TEMPS.value):
    variants = {'none': None}
    for kind in _DRAFTERS.value:
      for k in map(int, _LENS.value):
        variants[f'{kind} k={k}'] = (kind, k, False)
      for k in map(int, _DYN.value):
        for thr in map(float, _THRESHOLDS.value):
          name = f'{kind} dynamic k<={k}' + ('' if thr == DEFAULT_THRESHOLD else f' thr={thr:g}')
          variants[name] = (kind, k, thr)
    built = {}
    jax.clear_caches()       # the previous temperature's programs
    for name, v in variants.items():
      t0 = time.perf_counter()
      drafter = dparams = pol = knobs = None
      if v is not None:
        kind, k, thr = v
        d = api.load_drafter(target, kind, draft_len=k)
        drafter, dparams = d.drafter, d.params
        if thr is not False:
          pol, knobs, _ = runs.make_policy(target, drafter, dparams, prompts[_DOMAINS.value[0]],
                                           threshold=thr,
                                           max_new_tokens=_NEW.value, batch_size=1,
                                           cache_size_=runs.cache_size(longest, _NEW.value, max_k,
                                                                       target.config.max_context),
                                           temperature=T)
      run = runs.Run.build(target, drafter, dparams, longest_prompt=longest,
                           max_new_tokens=_NEW.value, batch_size=1, temperature=T,
                           draft_len=max_k, policy=pol, policy_params=knobs)
      run.compile(run.batch(prompts[_DOMAINS.value[0]][:1], runs.row_keys(0, [0]), bucket_len))
      built[name] = (run, knobs)
      print(f'built {name} at T={T} ({time.perf_counter() - t0:.1f} s)', file=sys.stderr,
            flush=True)
    for domain in _DOMAINS.value:
      times = {n: [] for n in built}
      stats = {}
      for rep in range(_REPEATS.value):
        for name, (run, knobs) in built.items():
          total, outs, counts = 0.0, [], None
          for i, p in enumerate(prompts[domain]):
            state, seconds = run(run.batch([p], runs.row_keys(0, [i]), bucket_len))
            total += seconds
            r = run.completions(state)[0]
            outs.append(r)
            if knobs is not None:
              pc = np.asarray(runs.local(state).policy.verified)
              counts = pc if counts is None else counts + pc
          times[name].append(total)
          stats[name] = (outs, counts)
        print(f'{domain} T={T} pass {rep + 1}/{_REPEATS.value}', file=sys.stderr, flush=True)
      ar_s = statistics.median(times['none'])
      ar_ids = [o['completion_ids'] for o in stats['none'][0]]
      for name in built:
        outs, counts = stats[name]
        new = sum(o['new_tokens'] for o in outs)
        calls = sum(o['target_calls'] for o in outs)
        s = statistics.median(times[name])
        row = dict(domain=domain, temperature=T, variant=name, tok_s=round(new / s, 2),
                   speedup=round(ar_s / s * new / sum(o['new_tokens'] for o in stats['none'][0]), 3),
                   tokens_per_call=round(new / calls, 3),
                   identical_to_ar=([o['completion_ids'] for o in outs] == ar_ids) if T == 0 else None)
        if counts is not None:
          row['rounds_by_verified_len'] = counts.tolist()
        rows.append(row)
        print(json.dumps(row), flush=True)
  greedy_ok = all(r['identical_to_ar'] for r in rows if r['identical_to_ar'] is not None)
  summary = {}
  for kind in _DRAFTERS.value:
    default = f'{kind} dynamic k<={_DEFAULT_K.value}'
    worst, rel = [], []
    for domain in _DOMAINS.value:
      for T in map(float, _TEMPS.value):
        sel = {r['variant']: r['speedup'] for r in rows
               if r['domain'] == domain and r['temperature'] == T}
        if default not in sel:
          continue
        best_fixed = max(v for n, v in sel.items() if n.startswith(f'{kind} k='))
        worst.append(sel[default])
        rel.append(sel[default] / best_fixed)
    if worst:
      summary[kind] = dict(default=default, worst_speedup_over_ar=min(worst),
                           mean_ratio_to_best_fixed_k=round(statistics.mean(rel), 3),
                           ratios_to_best_fixed_k=[round(x, 3) for x in rel])
    # Every policy variant (other k, other thresholds): its mean ratio.
    by_variant = {}
    for name in {r['variant'] for r in rows if r['variant'].startswith(f'{kind} dynamic')}:
      rel = []
      for domain in _DOMAINS.value:
        for T in map(float, _TEMPS.value):
          sel = {r['variant']: r['speedup'] for r in rows
                 if r['domain'] == domain and r['temperature'] == T}
          rel.append(sel[name] / max(v for n, v in sel.items() if n.startswith(f'{kind} k=')))
      by_variant[name] = round(statistics.mean(rel), 3)
    if by_variant:
      summary.setdefault(kind, {})['mean_ratio_to_best_fixed_k_by_variant'] = dict(
          sorted(by_variant.items()))
  print('\n| domain | T | variant | tok/s | speedup vs AR | tokens/call |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['domain']} | {r['temperature']:g} | {r['variant']} | {r['tok_s']} | "
          f"{r['speedup']} | {r['tokens_per_call']} |")
  result = dict(cpu=cpu, precision=target.precision, greedy_identical=greedy_ok,
                summary=summary, rows=rows,
                command='python -m experiments.bench_dynamic ' + ' '.join(sys.argv[1:]))
  print(json.dumps(dict(greedy_identical=greedy_ok, summary=summary)))
  if _OUT.value:
    pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
  app.run(main)
