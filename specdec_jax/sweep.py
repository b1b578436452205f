"""Ablation sweeps: the tables and plots of a paper's ablation section, one command.

    python -m experiments.run --config=configs/ablate.py:quick

A sweep is the product domains x temperatures x batch sizes x drafters x
draft lengths, with plain AR measured in the same process for every
(domain, temperature, batch size). Each compiled shape is built once and
reused: the key is (drafter, k, greedy, batch size); all domains share one
prompt bucket and one cache size, and temperature is an array, so T = 0.7
and T = 1.0 share a program (`compiles` in the summary counts them).

Per point it measures generation time (prefill + decode, median of
`repeats` per batch), tokens, target calls, per-position acceptance; the
costs behind the Leviathan et al. prediction (the AR step, the verify pass
over k + 1 tokens, the k-token draft, each compiled and timed alone); and the
quality of the output against the target itself (`quality.py`): greedy
completions compared token for token with AR's, sampled ones by a PIT
goodness-of-fit p-value, and the target's log-likelihood of every completion.

The output folder gets:
  raw.jsonl    one line per (point, prompt): everything measured, appended as
               each point finishes (an interrupted sweep keeps what it did)
  results.csv, results.md   one row per point, computed from raw.jsonl alone
               by `sweep_results.aggregate` (what tests recompute)
  *.png        speedup vs draft_len, per-position acceptance, tok/s vs
               temperature, and vs batch size / drafter size when swept
  config.json  the config that made it
A folder that already holds results is refused unless `overwrite` is set
(then those files are replaced, never mixed) or `resume` (config.json must
match; the points complete in raw.jsonl are kept, a torn or partial point is
dropped, and the sweep goes on from there). raw.jsonl is synced point by
point. Multi-host: started the same way on every process (runs.py), process
0 runs the sweep on its first device and writes; the others wait for it.

Drafter entries: `ngram`; `draft_model` (a random 2-layer Gemma with the
target's vocabulary: a cost floor), `draft_model:N` (N layers),
`draft_model:target` (the target drafting for itself: every draft accepted,
the drafter-size ceiling); `mtp` / `heads` (the drafter shipped for the
model), `mtp:<folder>` / `heads:<folder>` (a trained checkpoint).
"""
import collections
import json
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import drafters as drafters_lib
from specdec_jax import generate as gen_lib
from specdec_jax import outputs, precision, quality, runs
from specdec_jax import tree as tree_lib
from specdec_jax.measure import median_seconds
from specdec_jax.errors import UserError
from specdec_jax.sweep_results import (POINT_KEYS, aggregate, batch_seconds, fraction, markdown,
                                       write_csv, write_plots)
from specdec_jax.targets import check_model_name, load_target

KINDS = ('ngram', 'draft_model', 'mtp', 'heads')
ARTEFACTS = ('raw.jsonl', 'results.csv', 'results.md', 'config.json')
PROMPT_DIR = pathlib.Path(__file__).resolve().parent.parent / 'experiments' / 'prompts'


# ----------------------------------------------------------------------------- config

def parse_list(value, cast, name):
  """'1,2,4' or (1, 2, 4) -> [cast(x)]; UserError on a bad item."""
  items = value.split(',') if isinstance(value, str) else list(value)
  out = []
  for item in items:
    if isinstance(item, str):
      item = item.strip()
      if not item:
        continue
    try:
      out.append(cast(item))
    except (TypeError, ValueError):
      raise UserError(f'{name}: {item!r} is not a valid {cast.__name__}') from None
  if not out:
    raise UserError(f'{name} is empty')
  return out


def boolean(text) -> bool:
  if str(text).lower() in ('true', '1', 'yes'):
    return True
  if str(text).lower() in ('false', '0', 'no'):
    return False
  raise ValueError(text)


def parse(c):
  """The sweep's axes from the config, validated (nothing loaded yet)."""
  check_model_name(c.model)
  precision.resolve(c.param_dtype, c.dtype)
  ax = dict(
      domains=parse_list(c.domains, str, 'domains'),
      drafters=parse_list(c.drafters, str, 'drafters'),
      draft_lens=parse_list(c.draft_lens, int, 'draft_lens'),
      temperatures=parse_list(c.temperatures, float, 'temperatures'),
      batch_sizes=parse_list(c.batch_sizes, int, 'batch_sizes'),
      dynamic=parse_list(c.get('dynamic', 'false'), boolean, 'dynamic'),
      trees=parse_trees(c.get('trees', '')))
  if len(set(ax['dynamic'])) != len(ax['dynamic']):
    raise UserError('dynamic lists a value twice')
  from specdec_jax import policy as policy_lib
  policy_lib.check(runs.parse_costs(c.costs) or [1.0], c.confidence_threshold,
                   c.acceptance_prior, c.acceptance_decay)
  for k in ax['draft_lens']:
    if k < 1:
      raise UserError(f'draft_lens: every k must be >= 1, got {k}')
  for t in ax['temperatures']:
    if not (t >= 0 and math.isfinite(t)):
      raise UserError(f'temperatures: every value must be a finite number >= 0, got {t}')
  for b in ax['batch_sizes']:
    if b < 1:
      raise UserError(f'batch_sizes: every value must be >= 1, got {b}')
  for d in ax['drafters']:
    kind, _, arg = d.partition(':')
    kind, plus, extra = kind.partition('+')
    if kind not in KINDS or (plus and (extra != 'lookup' or kind not in ('mtp', 'heads'))):
      raise UserError(f'unknown drafter {d!r} in drafters; choose from {", ".join(KINDS)}, '
                      'mtp+lookup, heads+lookup (optionally kind:<checkpoint folder>, '
                      'draft_model:<layers>|target)')
    if kind == 'draft_model' and arg and arg != 'target' and not (arg.isdigit() and int(arg) > 0):
      raise UserError(f'drafter {d!r}: draft_model takes a layer count or "target"')
    if kind in ('mtp', 'heads') and arg and not (pathlib.Path(arg) / 'drafter.json').is_file():
      raise UserError(f'drafter {d!r}: {arg} is not a drafter checkpoint folder '
                      '(no drafter.json)')
    if kind == 'ngram' and arg:
      raise UserError(f'drafter {d!r}: ngram takes no argument (max_ngram sets n)')
  if len(set(ax['drafters'])) != len(ax['drafters']):
    raise UserError('drafters lists an entry twice')
  prompt_dir = pathlib.Path(c.prompt_dir) if c.prompt_dir else PROMPT_DIR
  for d in ax['domains']:
    if not (prompt_dir / f'{d}.jsonl').is_file():
      have = sorted(p.stem for p in prompt_dir.glob('*.jsonl'))
      raise UserError(f'unknown domain {d!r}: no {prompt_dir / (d + ".jsonl")} '
                      f'(have: {", ".join(have) or "none"})')
  for key in ('prompts_per_domain', 'max_new_tokens', 'repeats'):
    if c[key] < 1:
      raise UserError(f'{key} must be >= 1, got {c[key]}')
  if c.get('lookup', 2) < 1:
    raise UserError(f'lookup must be >= 1 (the +lookup drafters\' shortest match), got {c.lookup}')
  if not 0 <= c.get('lookup_unsure', 0.0) <= 1:
    raise UserError(f'lookup_unsure must be in [0, 1] (0 = off), got {c.lookup_unsure}')
  if not 0 <= c.get('lookup_sampled_min', 0.0) <= 1:
    raise UserError(f'lookup_sampled_min must be in [0, 1] (0 = off), got {c.lookup_sampled_min}')
  if c.max_prompt_len < 0 or not 1 <= c.min_ngram <= c.max_ngram:
    raise UserError('max_prompt_len must be >= 0 (0 = whole prompts) and '
                    '1 <= min_ngram <= max_ngram')
  if c.gguf and not pathlib.Path(c.gguf).is_file():
    raise UserError(f'GGUF file not found: {c.gguf}')
  context = runs.known_context(c.model, c.gguf)
  margin = max(ax['draft_lens']) + 1
  nodes = max((s.num_nodes for d in ax['drafters'] for s in tree_points(d, ax['trees'])[0]),
              default=0)
  if context and 1 + c.max_new_tokens + max(margin, nodes) > context:
    what = (f'the largest tree\'s {nodes} nodes' if nodes > margin else
            f'the largest draft_len + 1 = {margin}')
    raise UserError(f'max_new_tokens={c.max_new_tokens} + {what} '
                    f'leave no room for a prompt in the model context {context}')
  if not c.output:
    raise UserError('output must name a results folder')
  out = pathlib.Path(c.output)
  if out.exists() and not out.is_dir():
    raise UserError(f'output {out} exists and is not a folder')
  outputs.check_resume_flags(c)
  resume = c.get('resume', False)
  held = out.is_dir() and any((out / a).exists() for a in ARTEFACTS)
  if held and not c.overwrite and not resume:
    raise UserError(f'output folder {out} already holds results; choose another output, '
                    'set --config.resume=true to continue them or --config.overwrite=true '
                    'to replace them')
  if held and resume and (out / 'raw.jsonl').exists():
    try:
      stored = json.loads((out / 'config.json').read_text())
    except (OSError, ValueError):
      raise UserError(f'cannot resume {out}: its config.json is missing or unreadable; '
                      'set --config.overwrite=true to replace the results') from None
    diff = outputs.differences(_settings(stored), _settings(_config_json(c)))
    if diff:
      raise UserError(f'cannot resume {out}: it was made with another config '
                      f'({"; ".join(diff)}); use it, another output, or --config.overwrite=true')
  outputs.check_writable_dir(out, f'output {out}')
  ax['prompt_dir'] = prompt_dir
  return ax


def parse_trees(value):
  """The `trees` axis: '' = none; else comma-separated entries, each 'auto'
  (the drafter's tree.AUTO shape) or a branching per depth written with x
  ('2x2x1'); 'chain' entries are dropped (chains are the draft_lens)."""
  out = []
  for item in (value.split(',') if isinstance(value, str) else list(value)):
    item = str(item).strip()
    if item and item not in tree_lib.CHAIN:
      shape = tree_lib.parse(item)
      if shape in out:
        raise UserError(f'trees lists {item!r} twice')
      out.append(shape)
  return out


def tree_points(entry, trees):
  """(shapes, skipped notes) of a drafter entry: its trees ('auto' resolved
  for its kind); shapes it cannot draft are skipped (draft_model: none at all)."""
  kind = entry.partition(':')[0]
  shapes, notes = [], []
  for spec in trees:
    try:
      shape = tree_lib.resolve(spec, kind)
    except UserError as e:
      notes.append(f'skipping {entry} tree {spec if spec == "auto" else tree_lib.label(spec)}: {e}')
      continue
    if shape not in shapes:
      shapes.append(shape)
  return shapes, notes


# Keys that say how or where a sweep runs, not what it measures.
_OPERATIONAL = ('output', 'overwrite', 'resume', 'coordinator_address', 'num_processes',
                'process_id', 'coordinator_timeout')


def _config_json(c) -> dict:
  d = json.loads(json.dumps(c.to_dict(), default=str))
  d['resolved_param_dtype'] = precision.resolve(c.param_dtype, c.dtype)[0]
  return d


def _settings(config: dict) -> dict:
  return {k: v for k, v in config.items() if k not in _OPERATIONAL}


def _prepare_output(c, expected) -> tuple:
  """(folder, {point: rows} kept from an interrupted run). `expected`: the
  prompt count per domain; a point with fewer rows (killed while writing)
  is dropped with any torn line, and raw.jsonl rewritten without them."""
  out = pathlib.Path(c.output)
  out.mkdir(parents=True, exist_ok=True)
  raw = out / 'raw.jsonl'
  kept = collections.OrderedDict()
  if c.get('resume', False) and raw.exists():
    rows, _ = outputs.read_complete_lines(raw)
    for r in rows:
      kept.setdefault(tuple(r[k] for k in POINT_KEYS), []).append(r)
    kept = collections.OrderedDict(
        (k, v) for k, v in kept.items()
        if sorted(r['prompt_index'] for r in v) == list(range(expected[k[1]])))
    outputs.write_atomic(raw, ''.join(json.dumps(r) + '\n' for v in kept.values() for r in v))
  else:
    for name in ARTEFACTS:
      (out / name).unlink(missing_ok=True)
  for png in out.glob('*.png'):
    png.unlink()
  outputs.write_atomic(out / 'config.json', json.dumps(_config_json(c), indent=1) + '\n')
  return out, kept


def load_prompts(prompt_dir, domain, tok, n, max_len):
  """First n prompts of a domain as ids; max_len > 0 keeps BOS + the last
  max_len - 1 tokens (the part a continuation depends on most)."""
  rows = []
  for line in (pathlib.Path(prompt_dir) / f'{domain}.jsonl').read_text(encoding='utf-8').splitlines():
    if line.strip():
      try:
        rows.append(json.loads(line)['prompt'])
      except (ValueError, KeyError, TypeError):
        raise UserError(f'{prompt_dir}/{domain}.jsonl: each line needs a "prompt" string') from None
  out = []
  for text in rows[:n]:
    ids = tok.encode(text)
    if max_len and len(ids) > max_len:
      ids = ids[:1] + ids[len(ids) - max_len + 1:]
    out.append(ids)
  return out


# ----------------------------------------------------------------------------- drafters

def build_drafter(entry, k, target, c):
  """(drafter, params, parameter count) for a sweep entry (api.load_drafter)."""
  from specdec_jax import api
  kind, _, arg = entry.partition(':')
  try:
    d = api.load_drafter(target, kind, draft_len=k, max_ngram=c.max_ngram,
                         min_ngram=c.min_ngram, lookup=c.get('lookup', 2) if '+' in kind else 0,
                         lookup_unsure=c.get('lookup_unsure', 0.0),
                         lookup_sampled_min=c.get('lookup_sampled_min', 0.0),
                         seed=c.seed, num_layers=int(arg) if arg.isdigit() else 2,
                         checkpoint='target' if arg == 'target' else
                         ('' if kind == 'draft_model' else arg))
  except ValueError as e:                   # CheckpointError, incompatible target, k too big
    raise UserError(f'drafter {entry!r}: {e}') from None
  return d.drafter, d.params, d.num_params


# ----------------------------------------------------------------------------- timing

class Runner:
  """One runs.Run per (drafter, k, greedy, batch size): compiled once, shared by
  the domains and temperatures (temperature is an array)."""

  def __init__(self, target, longest, bucket_len, max_new, max_k, repeats, max_nodes=0):
    self.target = target
    self.longest, self.bucket_len, self.max_new, self.max_k = longest, bucket_len, max_new, max_k
    self.max_nodes = max_nodes
    self.repeats = repeats
    self.programs = {}

  def program(self, key, drafter, dparams, batch_size, greedy, policy=None,
              tree=None) -> runs.Run:
    """policy: (DraftPolicy, PolicyParams) for a dynamic draft length; tree:
    a tree.TreeShape (None: a chain)."""
    if key not in self.programs:
      pol, knobs = policy or (None, None)
      self.programs[key] = runs.Run.build(
          self.target, drafter, dparams, longest_prompt=self.longest,
          max_new_tokens=self.max_new, batch_size=batch_size, temperature=0.0 if greedy else 1.0,
          draft_len=self.max_k, tree_nodes=self.max_nodes,   # one cache size for every point
          policy=pol, policy_params=knobs, tree=tree)
    return self.programs[key]

  def run(self, key, drafter, dparams, prompts, batch_size, temperature, seed, policy=None,
          tree=None):
    """-> (rows: per prompt dict, last state, the Run, the policy's rounds by
    length summed over the batches, or None)."""
    run = self.program(key, drafter, dparams, batch_size, temperature == 0, policy, tree)
    rows, state, counts = [], None, None
    for b, s in enumerate(range(0, len(prompts), batch_size)):
      idx = list(range(s, min(s + batch_size, len(prompts))))
      batch = run.batch([prompts[i] for i in idx], runs.row_keys(seed, idx),
                        bucket_len=self.bucket_len, temperature=temperature)
      times = []
      for _ in range(self.repeats):
        state, seconds = run(batch)
        times.append(seconds)
      seconds = statistics.median(times)
      if policy is not None:
        local = runs.local(state).policy
        c = np.stack([np.asarray(local.planned), np.asarray(local.verified)])
        counts = c if counts is None else counts + c
      for i, r in zip(idx, run.completions(state)):
        ids = r['completion_ids'] + ([run.gen.config.eos_id] if r['finish_reason'] == 'eos' else [])
        rows.append(dict(prompt_index=i, batch=b, batch_seconds=seconds,
                         prompt_ids=r['prompt_ids'], completion_ids=ids,
                         finish_reason=r['finish_reason'], new_tokens=r['new_tokens'],
                         target_calls=r['target_calls'], draft_calls=r['draft_calls'],
                         accepted_by_position=r['accepted_by_position']))
    return rows, state, run, counts


# ----------------------------------------------------------------------------- the sweep

def run(c) -> dict:
  runs.init_distributed(c)           # before anything touches the backend
  if jax.process_count() == 1:
    return _run(c)
  # Several processes: process 0 runs the sweep on its first device; the
  # others wait for its outcome (a failure there fails them too).
  failed = 1
  try:
    if runs.is_writer():
      summary = _run(c)
      failed = 0
      return summary
  finally:
    failed = int(runs.broadcast([failed])[0])
  if failed:
    raise UserError('process 0 stopped the sweep; its error line says why')
  return dict(output=str(c.output), process=jax.process_index(), ran_on='process 0')


def _run(c) -> dict:
  ax = parse(c)
  t_start = time.perf_counter()
  target = load_target(c.model, gguf=c.gguf, param_dtype=c.param_dtype, dtype=c.dtype,
                       seed=c.seed)
  cfg, tok = target.config, target.tokenizer
  if tok is None:
    raise UserError(f'{c.model} has no tokenizer (tokenizer.model or tokenizer.json): the '
                    "sweep's prompt sets are text")
  prompts = {d: load_prompts(ax['prompt_dir'], d, tok, c.prompts_per_domain, c.max_prompt_len)
             for d in ax['domains']}
  for d, ps in prompts.items():
    bad = [t for p in ps for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
      raise UserError(f'domain {d}: token id {bad[0]} outside the vocabulary')
  longest = max(len(p) for ps in prompts.values() for p in ps)
  bucket_len = gen_lib.bucket(longest)
  # Every entry must load before the first measurement. A k beyond what a
  # drafter can draft (more than a heads drafter's heads) is skipped, and
  # said; so are trees it cannot draft. Each tree comes with its drafter's
  # chain at the same verify rows (k = nodes - 1): `equal_rows` below.
  skipped, trees, equal_rows = [], {}, {}
  for entry in ax['drafters']:
    d, _, _ = build_drafter(entry, min(ax['draft_lens']), target, c)
    limit = d.config.num_draft_heads if isinstance(d, drafters_lib.HeadsDrafter) else None
    for k in ax['draft_lens']:
      if limit is not None and k > limit:
        skipped.append((entry, k))
        print(f'skipping {entry} at k={k}: it has {limit} heads', file=sys.stderr)
    shapes, notes = tree_points(entry, ax['trees'])
    for note in notes:
      print(note, file=sys.stderr)
    trees[entry] = [s for s in shapes if limit is None or s.depth <= limit]
    for s in shapes:
      if s not in trees[entry]:
        print(f'skipping {entry} tree {tree_lib.label(s)}: it has {limit} heads', file=sys.stderr)
    equal_rows[entry] = sorted({s.num_nodes - 1 for s in trees[entry]} - set(ax['draft_lens']))
    for k in equal_rows[entry]:
      if limit is not None and k > limit:
        print(f'skipping {entry} at k={k} (a tree\'s verify rows): it has {limit} heads',
              file=sys.stderr)
    equal_rows[entry] = [k for k in equal_rows[entry] if limit is None or k <= limit]
  max_k = max(ax['draft_lens'] + [k for ks in equal_rows.values() for k in ks])
  max_nodes = max((s.num_nodes for ss in trees.values() for s in ss), default=0)
  try:
    runs.cache_size(longest, c.max_new_tokens, max_k, cfg.max_context, tree_nodes=max_nodes)
  except UserError as e:
    raise UserError(f'{e} (max_prompt_len shortens them)') from None
  out, kept = _prepare_output(c, {d: len(ps) for d, ps in prompts.items()})

  runner = Runner(target, longest, bucket_len, c.max_new_tokens, max_k, c.repeats, max_nodes)
  scorer = quality.Scorer(cfg, target.params, length=bucket_len + c.max_new_tokens,
                          new=c.max_new_tokens, seed=c.seed)
  n_points = (len(ax['batch_sizes']) * len(ax['temperatures']) * len(ax['domains'])
              * (1 + (len(ax['drafters']) * len(ax['draft_lens']) - len(skipped))
                 * len(ax['dynamic'])
                 + sum(len(trees[e]) + len(equal_rows[e]) for e in ax['drafters'])))
  costs = {}             # (entry, k, greedy, B, dynamic) -> (draft ms, verify ms) per round
  ar_ms = {}             # B -> ms per AR step
  done = [len(kept)]
  t_points = time.perf_counter()
  if kept:
    print(f'resuming: {len(kept)}/{n_points} points already in {out / "raw.jsonl"}',
          file=sys.stderr, flush=True)

  def record(rows, point, ar_rows, greedy, temperature, extra):
    scores = scorer([r['prompt_ids'] for r in rows], [r['completion_ids'] for r in rows],
                    temperature=temperature)
    ar_by_prompt = {r['prompt_index']: r['completion_ids'] for r in ar_rows or []}
    lines = []
    for r, (logp, pit) in zip(rows, scores):
      lines.append(json.dumps(dict(
          point, **r, logprob_sum=round(float(np.sum(logp)), 5),
          identical_to_ar=(r['completion_ids'] == ar_by_prompt[r['prompt_index']]
                           if greedy and ar_rows else None),
          pit=None if greedy else [round(x, 5) for x in pit], **extra)))
    with (out / 'raw.jsonl').open('a', encoding='utf-8') as f:
      outputs.fsync_append(f, lines)         # a point reaches the disk whole or is redone
    done[0] += 1
    tok_s = sum(r['new_tokens'] for r in rows) / batch_seconds(rows)
    eta = (time.perf_counter() - t_points) / (done[0] - len(kept)) * (n_points - done[0])
    print(f'[{done[0]}/{n_points}] {point["domain"]} {point["drafter"]} k={point["draft_len"]} '
          f'T={point["temperature"]} B={point["batch_size"]}: {tok_s:.2f} tok/s, '
          f'ETA {eta / 60:.1f} min', file=sys.stderr, flush=True)

  def previous(point):
    """The rows of a point an interrupted run completed, or None."""
    return kept.get(tuple(point[k] for k in POINT_KEYS))

  def run_drafter_points(entry, k, dyn, B, T, greedy, ar_rows, shape=None):
    """The points of one drafter entry at k (dyn: the dynamic policy with k
    its longest draft; labelled '<entry> dynamic'; shape: a tree of depth k,
    labelled '<entry> tree 2x2x1'), every domain."""
    key = (entry, k, greedy, B, dyn) + (() if shape is None else (shape,))
    label = (entry + (' dynamic' if dyn else '')
             + ('' if shape is None else f' tree {tree_lib.label(shape)}'))
    points = [_point(d, label, entry.partition(':')[0], k, T, B) for d in ax['domains']]
    for point in points:
      rows = previous(point)
      if rows:
        costs.setdefault(key, (rows[0]['draft_ms_per_round'], rows[0]['verify_ms_per_round']))
    if all(previous(p) for p in points):
      return
    drafter, dparams, n_params = build_drafter(entry, k, target, c)
    policy = None
    if dyn:
      pol, knobs, _ = runs.make_policy(
          target, drafter, dparams, prompts[ax['domains'][0]], policy_ks=c.policy_ks,
          costs=c.costs, threshold=c.confidence_threshold, prior=c.acceptance_prior,
          decay=c.acceptance_decay, max_new_tokens=c.max_new_tokens, batch_size=B,
          cache_size_=runs.cache_size(longest, c.max_new_tokens, max_k, cfg.max_context,
                                      tree_nodes=max_nodes),
          temperature=T, seed=c.seed)
      policy = (pol, knobs)
    for d, point in zip(ax['domains'], points):
      if previous(point):
        continue
      rows, state, run, counts = runner.run(key, drafter, dparams, prompts[d], B, T, c.seed,
                                            policy, shape)
      if key not in costs and shape is not None:
        costs[key] = (None, None)           # the chain's cost model does not apply
      if key not in costs:
        gen = run.gen
        drafts = gen.draft_part(target.params, state, dparams)
        # Verify on a drafter-free generator and state: one compile per (k, B).
        verifier = gen_lib.Generator(cfg, cache_size=run.cache_size)
        bare = state.replace(drafter_state=None, accepted=state.accepted[:, :0], policy=None)
        costs[key] = tuple(1e3 * median_seconds(fn, repeats=5) for fn in (
            lambda: gen.draft_part(target.params, state, dparams),
            lambda: verifier.verify_part(target.params, bare, drafts)))
      extra = dict(ar_ms_per_step=ar_ms[B], draft_ms_per_round=costs[key][0],
                   verify_ms_per_round=costs[key][1], drafter_params=n_params,
                   compile_seconds=run.compile_seconds,
                   verify_rows=k + 1 if shape is None else shape.num_nodes,
                   tree=tree_lib.describe(shape))
      if dyn:   # rounds by drafted / verified length over the point's batches
        extra['policy'] = dict(draft_lens=list(policy[0].ks),
                               costs=[round(x, 4) for x in policy[1].costs.tolist()],
                               rounds_by_drafted_len=counts[0].tolist(),
                               rounds_by_verified_len=counts[1].tolist())
      record(rows, point, ar_rows[d], greedy, T, extra)

  for B in ax['batch_sizes']:
    for T in ax['temperatures']:
      greedy = T == 0
      ar_rows = {}
      for d in ax['domains']:
        point = _point(d, 'none', 'none', 0, T, B)
        rows = previous(point)
        if rows:                  # the costs measured then serve the points to come
          ar_ms.setdefault(B, rows[0]['ar_ms_per_step'])
          ar_rows[d] = rows
          continue
        rows, state, run, _ = runner.run(('none', 0, greedy, B), None, None, prompts[d], B, T,
                                         c.seed)
        if B not in ar_ms:        # one target call on the pending token = an AR step
          zero = jnp.zeros((B, 0), jnp.int32)
          ar_ms[B] = 1e3 * median_seconds(
              lambda: run.gen.verify_part(target.params, state, zero), repeats=5)
        ar_rows[d] = rows
        record(rows, point, None, greedy, T,
               dict(ar_ms_per_step=ar_ms[B], draft_ms_per_round=None, verify_ms_per_round=None,
                    drafter_params=0, compile_seconds=run.compile_seconds, verify_rows=1))
      for entry in ax['drafters']:
        for dyn in ax['dynamic']:
          for k in ax['draft_lens']:
            if (entry, k) not in skipped:
              run_drafter_points(entry, k, dyn, B, T, greedy, ar_rows)
        for k in equal_rows[entry]:            # chains with a tree's verify rows
          run_drafter_points(entry, k, False, B, T, greedy, ar_rows)
        for shape in trees[entry]:
          run_drafter_points(entry, shape.depth, False, B, T, greedy, ar_rows, shape)

  raw = [json.loads(l) for l in (out / 'raw.jsonl').read_text().splitlines()]
  table = aggregate(raw)
  write_csv(table, out / 'results.csv')
  (out / 'results.md').write_text(markdown(table, c) + '\n')
  plots = write_plots(table, out)
  return dict(output=str(out), points=len(table), rows=len(raw), resumed_points=len(kept),
              precision=target.precision, compiles=len(runner.programs), plots=[p.name for p in plots],
              skipped=[f'{e} k={k}' for e, k in skipped],
              seconds=round(time.perf_counter() - t_start, 1),
              greedy_identical=fraction([r['identical_to_ar'] for r in raw
                                          if r['identical_to_ar'] is not None]),
              best=max((t for t in table if t['drafter'] != 'none'),
                       key=lambda t: t['speedup'], default=None))


def _point(domain, drafter, kind, k, T, B):
  return dict(system='specdec_jax', domain=domain, drafter=drafter, kind=kind, draft_len=k,
              temperature=T, batch_size=B)
