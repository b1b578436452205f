"""What a decode-loop round costs, AR step vs verify round, on this machine;
and the speedup that acceptance measured elsewhere would give here.

    python -m experiments.bench_costs --output=costs_cpu.json          # Gemma 3 270M (~12 min here)
    python -m experiments.bench_costs --weights=random --batch_sizes=1,8 \
        --acceptance_from=costs_cpu.json --output=costs_gpu.json       # e.g. on a GPU

Why: an accelerator machine may not hold the Gemma weights (the lent GPUs of
this project reach no package index), but what a round costs depends on the
shapes, not on the weights' values, and how many rounds of each kind a
generation takes does not depend on the hardware (greedy outputs are the
target's). So the speedup on machine M is projected as

    AR steps x (AR step on M)
      / (verify rounds x (verify round on M) + abstained rounds x (AR step on M))

with the round counts from a run with the real weights (--acceptance_from)
and the costs timed on M with weights of the same shapes. Abstained rounds
are those where the drafter had no proposal and the round was an AR step
(ngram without a match). At batch 1 the counts are exact; for larger batches
they come from the per-prompt counts (a batch runs as long as its longest
row; its verify rounds are taken as its rows' most, a lower bound).

With the real weights the script measures the speedup itself. Run with random
weights on the machine that measured the source, the projection sits beside
that measured speedup: a check that a round's cost does not depend on the
weights' values.

Trees (`--drafters=mtp:dyn4-d3-k2,ngram:3x1x1`, #18) are timed and
projected the same way, a tree round standing for a verify round: its cost
depends on the node count, not on which nodes a dynamic tree picks, so
random weights time it as well as real ones.

The draft-length policy (`--drafters=mtp:1,mtp:2,mtp:4,mtp:4:dynamic`,
#17) chooses among lengths from their costs, so its projection goes the
other way round: time the chain entries on M first (random weights), then
run here with `--policy_costs_from=<M's JSON>`: the policy decides with
M's costs (it would draft longer where a verify pass is cheap), and its
rounds by length priced at M's costs give the speedup on M
(`projected_speedup_range`: a round that drafted k and verified j costs
between c(j) and c(k)). Without the flag it runs on this machine's chain
costs of the same run, and the range sits beside the measured speedup (the
check of the method).

Timing: the whole on-device loop (`Generator.decode`, prefill excluded), one
compile per (batch size, drafter), then `repeats` runs per batch, median; a
verify round's cost = (loop time - abstained rounds x AR step) / verify
rounds. Prompt sets (experiments/prompts/): `repetitive` (bench_spec's
repetitive code, where prompt lookup shines) and `code` (held-out HumanEval
stubs). Greedy; with the real weights every speculative output is asserted
identical to AR's.
"""
import json
import pathlib
import statistics
import time

from absl import app, flags
import jax

from specdec_jax import api, config as config_lib, generate, precision, sweep
from specdec_jax import policy as policy_lib
from specdec_jax import tree as tree_lib
from specdec_jax.errors import UserError
from specdec_jax.model import init_params
from specdec_jax.targets import Target, load_target

_WEIGHTS = flags.DEFINE_enum('weights', 'gguf', ['gguf', 'random'],
                             'gguf: the Gemma 3 270M weights; random: the same shapes, random values.')
_DRAFTERS = flags.DEFINE_list('drafters', ['ngram:4', 'ngram:8', 'mtp:4'],
                               'kind:k (a chain of k), kind:tree (a draft tree, e.g. '
                               'mtp:dyn4-d3-k2, ngram:3x1x1) or kind:K:dynamic (the draft-'
                               'length policy up to K) entries.')
_SETS = flags.DEFINE_list('prompt_sets', ['repetitive', 'code'], 'Prompt sets.')
_BATCH = flags.DEFINE_list('batch_sizes', ['1'], 'Batch sizes (prompts repeat to fill rows).')
_N = flags.DEFINE_integer('prompts', 3, 'Prompts per set.')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'New tokens per prompt.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per batch (median).')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'auto', ['auto', 'bfloat16', 'float32'],
                                 'Weight dtype (auto: precision.resolve); activations float32.')
_FROM = flags.DEFINE_string('acceptance_from', '', 'A JSON this script wrote with real weights: '
                            'its prompts, new_tokens and round counts are used here.')
_POLICY_FROM = flags.DEFINE_string(
    'policy_costs_from', '', 'A JSON this script wrote on machine M (its batch-1 chain entries '
    'of each k the policy may choose): kind:K:dynamic entries run the policy with M\'s round '
    'costs and project its speedup on M. Without it they use this run\'s chain entries.')
_OUT = flags.DEFINE_string('output', '', 'Write the results JSON here.')


def read_source():
  """The --acceptance_from JSON ({} without one); a bad file is one error line."""
  if not _FROM.value:
    return {}
  try:
    src = json.loads(pathlib.Path(_FROM.value).read_text())
    if src['weights'] != 'gguf' or not isinstance(src['prompts'], dict):
      raise ValueError('not a run with the real weights')
    return src
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SystemExit(f'error: --acceptance_from={_FROM.value}: {e}') from None


def read_policy_source():
  """(results, device) of --policy_costs_from ([] and '' without one)."""
  if not _POLICY_FROM.value:
    return [], ''
  try:
    src = json.loads(pathlib.Path(_POLICY_FROM.value).read_text())
    return list(src['results']), str(src['device'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise SystemExit(f'error: --policy_costs_from={_POLICY_FROM.value}: {e}') from None


def parse_drafters():
  """[(kind, k, tree shape, 'dynamic' or None)] from 'kind:k', 'kind:tree'
  and 'kind:K:dynamic' entries."""
  out = []
  for d in _DRAFTERS.value:
    kind, _, k = d.partition(':')
    if k.endswith(':dynamic'):
      k = k.removesuffix(':dynamic')
      if kind not in ('ngram', 'mtp', 'heads') or not k.isdigit() or int(k) < 1:
        raise SystemExit(f'error: --drafters entry {d!r}: want kind:K:dynamic with K >= 1')
      out.append((kind, int(k), None, 'dynamic'))
      continue
    if kind not in ('ngram', 'mtp', 'heads') or not k:
      raise SystemExit(f'error: --drafters entry {d!r}: want ngram:K, mtp:K or heads:K, '
                       'or kind:TREE such as mtp:dyn4-d3-k2')
    if k.isdigit() and int(k) >= 1:
      out.append((kind, int(k), None, None))
      continue
    try:
      shape = tree_lib.resolve(k, kind)
    except UserError as e:
      raise SystemExit(f'error: --drafters entry {d!r}: {e}') from None
    if shape is None:
      raise SystemExit(f'error: --drafters entry {d!r}: want a positive k or a tree')
    out.append((kind, shape.depth, shape, None))
  return out


def prompt_sets(tok, source):
  """{set: [ids]}: the source's if given, else tokenized here."""
  if source:
    return source['prompts']
  if tok is None:
    raise SystemExit('error: --weights=random needs --acceptance_from (its prompt ids)')
  for name in _SETS.value:
    if not (sweep.PROMPT_DIR / f'{name}.jsonl').is_file():
      raise SystemExit(f'error: no prompt set {name!r} in {sweep.PROMPT_DIR}')
  return {name: sweep.load_prompts(sweep.PROMPT_DIR, name, tok, _N.value, 0)
          for name in _SETS.value}


def layout(n_prompts, bs):
  """Prompt index of every row, in batches of `bs` (prompts repeat to fill rows)."""
  rows = [i % n_prompts for i in range(max(bs, n_prompts))]
  return [rows[i:i + bs] for i in range(0, len(rows), bs)]


def rounds_for(per_prompt, bs):
  """Loop rounds for batches of `bs` from per-prompt round counts: a row's rounds
  do not depend on what shares its batch (greedy), and a batch runs as many
  rounds as its longest row."""
  return sum(max(per_prompt[i] for i in rows) for rows in layout(len(per_prompt), bs))


_COMPILED = {}


def compiled(gen, params, dparams, b, knobs=None):
  """(prefill, decode) compiled once per generator and batch shape (prompt
  sets share one); knobs: the policy's PolicyParams (arrays: not in the key)."""
  key = (gen, b.prompts.shape)
  if key not in _COMPILED:
    pre = gen.prefill.lower(gen, params, b, dparams, knobs).compile()
    dec = gen.decode.lower(gen, params, jax.eval_shape(lambda: pre(params, b, dparams, knobs)),
                           dparams).compile()
    _COMPILED[key] = pre, dec
  return _COMPILED[key]


def timed_loop(gen, params, dparams, batches, knobs=None):
  """(median seconds per batch summed, rounds summed, verify rounds summed,
  completions, the policy's rounds by drafted and by verified length summed
  ({} without a policy))."""
  total, rounds, verify, rows, by_len = 0.0, 0, 0, [], {}
  for b in batches:
    pre, dec = compiled(gen, params, dparams, b, knobs)
    times = []
    for _ in range(_REPEATS.value):
      state = jax.block_until_ready(pre(params, b, dparams, knobs))
      t = time.perf_counter()
      state = jax.block_until_ready(dec(params, state, dparams))
      times.append(time.perf_counter() - t)
    total += statistics.median(times)
    rounds += int(state.step)
    verify += int(state.verify_rounds)
    rows += generate.completions(state, gen.config.eos_id)
    if gen.policy is not None:
      summ = policy_lib.summary(gen.policy, state.policy)
      for f in ('rounds_by_drafted_len', 'rounds_by_verified_len'):
        for k, n in summ[f].items():
          by_len.setdefault(f, {}).setdefault(k, 0)
          by_len[f][k] += n
  return total, rounds, verify, rows, by_len


def policy_costs(kind, ks, name, bs, results, source_results):
  """The policy's round costs in AR steps, one per k in ks (cost(0) = 1):
  --policy_costs_from's batch-1 chain entries of `kind` (median over its
  prompt sets), else this run's chain entries for this prompt set and batch.
  Returns (costs, where they came from)."""
  if _POLICY_FROM.value:
    pool = [r for r in source_results if r['batch'] == 1]
    where = f'{_POLICY_FROM.value} (batch 1, median over prompt sets)'
  else:
    pool = [r for r in results if r['batch'] == bs and r['prompt_set'] == name]
    where = 'this run\'s chain entries'
  costs = [1.0]
  for k in ks[1:]:
    vals = [r['verify_cost_in_steps'] for r in pool if r['drafter'] == kind
            and r['draft_len'] == k and not r.get('tree') and not r.get('policy')]
    if not vals:
      raise SystemExit(f'error: {kind}:{max(ks)}:dynamic needs the cost of a {kind} chain of '
                       f'k = {k} from {where}: add {kind}:{k} to --drafters (before it)')
    costs.append(max(statistics.median(vals), 1e-3))
  return costs, where


def policy_projection(counts, costs, ks, tokens):
  """Tokens / rounds' cost, from the policy's rounds by length: a round that
  drafted k and verified j costs at least c(j) (drafting j, verifying j) and
  at most c(k) (verifying all k), so the speedup lies between tokens / the
  sum of c(k) over drafted lengths and tokens / the sum of c(j) over
  verified ones (equal when every round verifies what it drafted)."""
  c = dict(zip(map(str, ks), costs))
  lo = sum(n * c[k] for k, n in counts['rounds_by_drafted_len'].items())
  hi = sum(n * c[k] for k, n in counts['rounds_by_verified_len'].items())
  return round(tokens / lo, 3), round(tokens / hi, 3)


def main(_):
  parse_drafters()                  # bad input fails before anything loads
  read_source()
  read_policy_source()
  if _WEIGHTS.value == 'gguf':
    target = load_target('gemma3_270m', param_dtype=_PARAM_DTYPE.value)
  else:
    pd = precision.resolve(_PARAM_DTYPE.value)[0]
    cfg = config_lib.gemma3_270m(param_dtype=pd)
    target = Target('gemma3_270m', cfg, jax.device_put(init_params(cfg, jax.random.key(0))), None)
  cfg, params = target.config, target.params
  source = read_source()
  sets = prompt_sets(target.tokenizer, source)
  new_tokens = source.get('new_tokens', _NEW.value)
  source = source.get('results', [])
  policy_source, policy_device = read_policy_source()
  specs = parse_drafters()
  margin = max(k + 1 if shape is None else shape.num_nodes for _, k, shape, _ in specs)
  bucket_len = generate.bucket(max(len(p) for ps in sets.values() for p in ps))
  cache = -(-(bucket_len + new_tokens + margin) // 128) * 128
  results = []
  for bs in map(int, _BATCH.value):
    def batches(prompts):
      return [generate.make_batch([prompts[i] for i in rows], batch_size=bs,
                                  bucket_len=bucket_len, max_new_tokens=new_tokens,
                                  keys=jax.random.split(jax.random.key(0), len(rows)))
              for rows in layout(len(prompts), bs)]
    ar = generate.Generator(cfg, cache_size=cache, greedy=True)
    for name, prompts in sets.items():
      ar_s, ar_rounds, _, ar_rows, _ = timed_loop(ar, params, None, batches(prompts))
      step_ms = ar_s / ar_rounds * 1e3
      for kind, k, shape, mode in specs:
        d = api.load_drafter(target, kind, draft_len=k)
        pol, knobs = None, None
        if mode == 'dynamic':
          pol = policy_lib.DraftPolicy(policy_lib.default_ks(k))
          costs, costs_from = policy_costs(kind, pol.ks, name, bs, results, policy_source)
          knobs = policy_lib.PolicyParams.make(costs)
        gen = generate.Generator(cfg, cache_size=cache, greedy=True, drafter=d.drafter,
                                 tree=shape, policy=pol)
        sp_s, sp_rounds, sp_verify, rows, by_len = timed_loop(gen, params, d.params,
                                                              batches(prompts), knobs)
        tokens = sum(r['new_tokens'] for r in rows)
        calls = sum(r['target_calls'] for r in rows)
        if _WEIGHTS.value == 'gguf':
          same = [r['completion_ids'] for r in rows] == [r['completion_ids'] for r in ar_rows]
          # Verify rows are bitwise AR's (README, "bf16 and greedy identity"),
          # tree paths their chain's; with bf16 weights at a 384-slot cache a
          # near-tie still flipped (docs/TREE.md): recorded, fatal for chains.
          assert same or shape is not None, \
              f'{name}/{kind}:{k}: greedy speculative output differs from AR'
        # Rounds where the drafter abstained are AR steps: take them out at
        # the AR loop's step cost to get what one verify round costs.
        verify_ms = (sp_s * 1e3 - (sp_rounds - sp_verify) * step_ms) / max(sp_verify, 1)
        res = dict(prompt_set=name, batch=bs, drafter=kind, draft_len=k,
                   greedy_identical=same if _WEIGHTS.value == 'gguf' else None,
                   tree=None if shape is None else tree_lib.label(shape), policy=mode,
                   verify_rows=k + 1 if shape is None else shape.num_nodes,
                   ar_rounds=ar_rounds, spec_rounds=sp_rounds, verify_rounds=sp_verify,
                   tokens_per_call=round(tokens / calls, 3),
                   ar_ms_per_step=round(step_ms, 3), verify_ms_per_round=round(verify_ms, 3),
                   verify_cost_in_steps=round(verify_ms / step_ms, 3))
        if bs == 1:   # per-prompt round counts, for projections at any batch size
          res['calls_per_prompt'] = [r['target_calls'] for r in rows]
          res['draft_calls_per_prompt'] = [r['draft_calls'] for r in rows]
          res['tokens_per_prompt'] = [r['new_tokens'] for r in rows]
        if mode == 'dynamic':
          # A round of the policy verifies one of several lengths: its costs
          # and counts give the speedup (on M when the costs are M's).
          res.update(verify_ms_per_round=None, verify_cost_in_steps=None,
                     policy_ks=list(pol.ks), policy_costs=[round(c, 3) for c in costs],
                     costs_from=costs_from, **by_len)
          res['projected_speedup_range'] = policy_projection(by_len, costs, pol.ks, tokens)
          if _POLICY_FROM.value:
            res['projected_on'] = policy_device
        src = None if mode else next((s for s in source if s['batch'] == 1 and all(
            s.get(f) == res[f] for f in ('prompt_set', 'drafter', 'draft_len', 'tree'))), None)
        if src is not None:
          # Verify rounds of a batch >= its rows' most (exact at batch 1).
          rounds = rounds_for(src['calls_per_prompt'], bs)
          verify = rounds_for(src['draft_calls_per_prompt'], bs)
          ar_time = rounds_for(src['tokens_per_prompt'], bs) * step_ms
          res['projected_speedup'] = round(
              ar_time / (verify * verify_ms + (rounds - verify) * step_ms), 3)
          res['source_tokens_per_call'] = src['tokens_per_call']
          if bs == 1:
            res['source_measured_speedup'] = src.get('measured_speedup')
        if _WEIGHTS.value == 'gguf':
          res['measured_speedup'] = round(ar_s / sp_s, 3)
        results.append(res)
        print(json.dumps(res), flush=True)
  device = jax.devices()[0]
  out = dict(weights=_WEIGHTS.value, param_dtype=target.config.param_dtype, new_tokens=new_tokens,
             device=f'{device.platform}: {device.device_kind}', prompts=sets, results=results)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(out, indent=1))
  print(f'\n{out["device"]}, {_WEIGHTS.value} weights in {out["param_dtype"]}, '
        f'{new_tokens} new tokens per prompt, greedy\n')
  print('| prompts | batch | drafter (k) | AR ms/step | verify ms/round | verify / step | '
        'tokens/call | measured speedup | projected speedup | source measured |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in results:
    what = r.get('tree') or (f'{r["draft_len"]}, dynamic' if r.get('policy') else r['draft_len'])
    projected = r.get('projected_speedup', '')
    if r.get('projected_speedup_range'):
      projected = '{}-{}'.format(*r['projected_speedup_range'])
      if r.get('projected_on'):
        projected += f' on {r["projected_on"]}'
    print(f'| {r["prompt_set"]} | {r["batch"]} | {r["drafter"]} ({what}) | '
          f'{r["ar_ms_per_step"]} | {r["verify_ms_per_round"] or "-"} | '
          f'{r["verify_cost_in_steps"] or "-"} | '
          f'{r.get("source_tokens_per_call", r["tokens_per_call"])} | '
          f'{r.get("measured_speedup", "")} | {projected} | '
          f'{r.get("source_measured_speedup") or ""} |')


if __name__ == '__main__':
  app.run(main)
