"""Tree drafting against chains and plain decoding (#18), ratios in one run.

    python -m experiments.bench_tree                  # ~25 min on this 2-core CPU
    python -m experiments.bench_tree --domains=code,chat --prompts=2 --max_new_tokens=32 \
        --repeats=1 --trees=2x1,3x1x1,2x2x1,3x2x1 \
        --output=outputs/bench_tree_short.json       # the short form in docs/TREE.md

Gemma 3 270M with its shipped `mtp` drafter and `ngram` (prompt lookup).
For each temperature, every variant is compiled first: plain AR (`none`),
each drafter as a chain at each k (`--draft_lens`) and as each tree
(`--trees`, branching per depth written with x; ngram drafts a trie of
its matches). All share one
cache size. Then, per domain (held-out prompt sets in experiments/prompts),
every repeat runs each variant in turn over the domain's prompts (batch 1),
so drift on a shared machine hits them alike; the median time per variant
gives tok/s and the speedup over AR measured in the same process. Greedy
outputs must equal AR's (checked). Printed: one table row per (domain, T,
variant) with its verify rows (k + 1 for a chain, the node count for a
tree), tokens per target call and speedup; then per drafter its best tree
against its best chain (the two ratios #18 asks for: tokens per call and
wall-clock speedup) and the tree with the best mean speedup, which is what
`tree=auto` should pick (specdec_jax/tree.py, AUTO). JSON to --output.
"""
import json
import pathlib
import statistics
import sys
import time

from absl import app, flags
import jax

from specdec_jax import api, runs, sweep
from specdec_jax import generate as gen_lib
from specdec_jax import tree as tree_lib
from specdec_jax.precision import cpu_info
from specdec_jax.targets import load_target

_DRAFTERS = flags.DEFINE_list('drafters', ['mtp', 'ngram'], 'Drafter kinds.')
_LENS = flags.DEFINE_list('draft_lens', ['2', '4'], 'Chains: k.')
_TREES = flags.DEFINE_list('trees', ['2x1', '3x1x1', '2x2x1', '3x2x1', '2x1x1x1', '3x1x1x1'],
                           'Trees: branching per depth.')
_DOMAINS = flags.DEFINE_list('domains', ['code', 'prose', 'chat'], 'Prompt sets.')
_TEMPS = flags.DEFINE_list('temperatures', ['0', '1'], 'Temperatures.')
_PROMPTS = flags.DEFINE_integer('prompts', 3, 'Prompts per domain.')
_NEW = flags.DEFINE_integer('max_new_tokens', 48, 'New tokens per prompt.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Timed passes (median).')
_DTYPE = flags.DEFINE_string('param_dtype', 'auto', 'auto | bfloat16 | float32.')
_OUT = flags.DEFINE_string('output', '', 'JSON results ("" = not written).')


def variants():
  """name -> None (AR) or (kind, k, TreeShape or None)."""
  out = {'none': None}
  for kind in _DRAFTERS.value:
    for k in map(int, _LENS.value):
      out[f'{kind} k={k}'] = (kind, k, None)
    for spec in _TREES.value:
      try:
        shape = tree_lib.resolve(tree_lib.parse(spec), kind)
      except Exception as e:     # a shape this drafter cannot draft
        print(f'skipping {kind} tree {spec}: {e}', file=sys.stderr)
        continue
      out[f'{kind} tree {tree_lib.label(shape)}'] = (kind, shape.depth, shape)
  return out


def main(_):
  target = load_target('gemma3_270m', param_dtype=_DTYPE.value)
  cpu = cpu_info()[0]
  print(f'# {cpu}, {target.precision}', file=sys.stderr)
  prompts = {d: sweep.load_prompts(sweep.PROMPT_DIR, d, target.tokenizer, _PROMPTS.value, 0)
             for d in _DOMAINS.value}
  longest = max(len(p) for ps in prompts.values() for p in ps)
  # One prompt bucket for every domain: one program per variant (dozens of
  # programs per bucket exhaust XLA:CPU's code mappings).
  bucket_len = gen_lib.bucket(longest)
  todo = variants()
  max_k = max(v[1] for v in todo.values() if v)
  max_nodes = max((v[2].num_nodes for v in todo.values() if v and v[2]), default=0)
  rows = []
  for T in map(float, _TEMPS.value):
    built = {}
    jax.clear_caches()
    for name, v in todo.items():
      t0 = time.perf_counter()
      drafter = dparams = shape = None
      if v is not None:
        kind, k, shape = v
        d = api.load_drafter(target, kind, draft_len=k)
        drafter, dparams = d.drafter, d.params
      run = runs.Run.build(target, drafter, dparams, longest_prompt=longest,
                           max_new_tokens=_NEW.value, batch_size=1, temperature=T,
                           draft_len=max_k, tree_nodes=max_nodes, tree=shape)
      run.compile(run.batch(prompts[_DOMAINS.value[0]][:1], runs.row_keys(0, [0]), bucket_len))
      built[name] = run
      print(f'built {name} at T={T} ({time.perf_counter() - t0:.1f} s)', file=sys.stderr,
            flush=True)
    for domain in _DOMAINS.value:
      times = {n: [] for n in built}
      outs = {}
      for rep in range(_REPEATS.value):
        for name, run in built.items():
          total, got = 0.0, []
          for i, p in enumerate(prompts[domain]):
            state, seconds = run(run.batch([p], runs.row_keys(0, [i]), bucket_len))
            total += seconds
            got.append(run.completions(state)[0])
          times[name].append(total)
          outs[name] = got
        print(f'{domain} T={T} pass {rep + 1}/{_REPEATS.value}', file=sys.stderr, flush=True)
      ar_s = statistics.median(times['none'])
      ar_new = sum(o['new_tokens'] for o in outs['none'])
      ar_ids = [o['completion_ids'] for o in outs['none']]
      for name, run in built.items():
        new = sum(o['new_tokens'] for o in outs[name])
        calls = sum(o['target_calls'] for o in outs[name])
        s = statistics.median(times[name])
        v = todo[name]
        rows.append(dict(
            domain=domain, temperature=T, variant=name,
            verify_rows=1 if v is None else (v[2].num_nodes if v[2] else v[1] + 1),
            tok_s=round(new / s, 2), speedup=round(ar_s / s * new / ar_new, 3),
            tokens_per_call=round(new / calls, 3),
            identical_to_ar=([o['completion_ids'] for o in outs[name]] == ar_ids
                             if T == 0 else None)))
        print(json.dumps(rows[-1]), flush=True)
  greedy_ok = all(r['identical_to_ar'] for r in rows if r['identical_to_ar'] is not None)
  summary = {}
  for kind in _DRAFTERS.value:
    per_point, tree_speedups = [], {}
    for domain in _DOMAINS.value:
      for T in map(float, _TEMPS.value):
        sel = [r for r in rows if r['domain'] == domain and r['temperature'] == T]
        chains = [r for r in sel if r['variant'].startswith(f'{kind} k=')]
        trees = [r for r in sel if r['variant'].startswith(f'{kind} tree ')]
        if not chains or not trees:
          continue
        for r in trees:
          tree_speedups.setdefault(r['variant'], []).append(r['speedup'])
        best = lambda rs, key: max(rs, key=lambda r: r[key])
        per_point.append(dict(
            domain=domain, temperature=T,
            tokens_per_call_ratio=round(best(trees, 'tokens_per_call')['tokens_per_call']
                                        / best(chains, 'tokens_per_call')['tokens_per_call'], 3),
            speedup_ratio=round(best(trees, 'speedup')['speedup']
                                / best(chains, 'speedup')['speedup'], 3),
            best_tree=best(trees, 'speedup')['variant'],
            best_chain=best(chains, 'speedup')['variant']))
    if per_point:
      auto = max(tree_speedups, key=lambda n: statistics.mean(tree_speedups[n]))
      summary[kind] = dict(
          auto=auto, auto_mean_speedup=round(statistics.mean(tree_speedups[auto]), 3),
          tokens_per_call_ratio=[p['tokens_per_call_ratio'] for p in per_point],
          speedup_ratio=[p['speedup_ratio'] for p in per_point], points=per_point)
  print('\n| domain | T | variant | verify rows | tok/s | speedup vs AR | tokens/call |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['domain']} | {r['temperature']:g} | {r['variant']} | {r['verify_rows']} | "
          f"{r['tok_s']} | {r['speedup']}x | {r['tokens_per_call']} |")
  result = dict(cpu=cpu, precision=target.precision, greedy_identical=greedy_ok,
                summary=summary, rows=rows,
                command='python -m experiments.bench_tree ' + ' '.join(sys.argv[1:]))
  print(json.dumps(dict(greedy_identical=greedy_ok, summary=summary)))
  if _OUT.value:
    pathlib.Path(_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(_OUT.value).write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
  app.run(main)
