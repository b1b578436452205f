"""The generation job: prompts in, a JSONL of completions and a summary out.

    python -m experiments.run --config=configs/generate.py

`run(config)` validates the whole config before loading anything, reads the
prompts, batches them (sorted by length, each batch padded to a power-of-two
bucket), compiles each shape once ahead of time (timed as compile_seconds),
generates, and appends each finished batch to the output JSONL at once
(flushed and synced: a kill loses at most the batch in flight). An existing
output is refused unless `resume` (skip the (index, sample) pairs already
there; settings must match `<output>.meta.json`) or `overwrite`
(outputs.py). It returns the summary dict whose JSON the entry point prints
as the last stdout line. Multi-host: every process runs this with the same
config; process 0 alone writes (runs.py).
"""
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import List

import jax
import numpy as np

from specdec_jax import config as config_lib
from specdec_jax import drafters, outputs, parallel, precision, runs
from specdec_jax import policy as policy_lib
from specdec_jax import tree as tree_lib
from specdec_jax.errors import UserError
from specdec_jax.loaders import hf_gemma4_assistant
from specdec_jax.measure import median_seconds
from specdec_jax.model import init_params
from specdec_jax.targets import check_model_name, load_target

DRAFTERS = ('auto', 'none', 'ngram', 'draft_model', 'mtp', 'heads', 'mtp+lookup', 'heads+lookup')
DRAFT_MODELS = ('target', 'tiny')
PARALLEL = ('auto', 'none', 'pmap', 'mesh')
DEMO_PROMPTS = [
    'The capital of France is',
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    'Speculative decoding makes large language models faster because',
]


def validate(c) -> None:
  """Every check that needs no model: bad values fail before the 20 s load."""
  check_model_name(c.model)
  if c.max_new_tokens <= 0:
    raise UserError(f'max_new_tokens must be > 0, got {c.max_new_tokens}')
  if not c.temperature >= 0 or math.isinf(c.temperature):
    raise UserError(f'temperature must be a finite number >= 0, got {c.temperature}')
  if c.top_k < 0:
    raise UserError(f'top_k must be >= 0 (0 = off), got {c.top_k}')
  if not 0 < c.top_p <= 1:
    raise UserError(f'top_p must be in (0, 1] (1 = off), got {c.top_p}')
  if c.batch_size < 1:
    raise UserError(f'batch_size must be >= 1, got {c.batch_size}')
  if c.num_samples < 1:
    raise UserError(f'num_samples must be >= 1, got {c.num_samples}')
  if c.cache_size < 0:
    raise UserError(f'cache_size must be >= 0 (0 = fit the prompts), got {c.cache_size}')
  if c.drafter not in DRAFTERS:
    raise UserError(f'unknown drafter {c.drafter!r}; choose one of {", ".join(DRAFTERS)}')
  if c.draft_len < 1:
    raise UserError(f'draft_len must be >= 1, got {c.draft_len}')
  if c.draft_model not in DRAFT_MODELS:
    raise UserError(f'unknown draft_model {c.draft_model!r}; choose one of {", ".join(DRAFT_MODELS)}')
  if not 1 <= c.min_ngram <= c.max_ngram:
    raise UserError(f'need 1 <= min_ngram <= max_ngram, got {c.min_ngram} and {c.max_ngram}')
  if c.get('lookup', 2) < 1:
    raise UserError(f'lookup must be >= 1 (the shortest match the +lookup drafters look up), '
                    f'got {c.lookup}')
  if not 0 <= c.get('lookup_unsure', 0.0) <= 1:
    raise UserError(f'lookup_unsure must be in [0, 1] (0 = off), got {c.lookup_unsure}')
  if not 0 <= c.get('lookup_sampled_min', 0.0) <= 1:
    raise UserError(f'lookup_sampled_min must be in [0, 1] (0 = off), got {c.lookup_sampled_min}')
  validate_policy(c)
  shape = tree_shape(c)
  if c.parallel not in PARALLEL:
    raise UserError(f'unknown parallel mode {c.parallel!r}; choose one of {", ".join(PARALLEL)}')
  if c.num_devices < 0:
    raise UserError(f'num_devices must be >= 0 (0 = all), got {c.num_devices}')
  precision.resolve(c.param_dtype, c.dtype)       # names and combination; 'auto' later
  if not c.output:
    raise UserError('output must name a JSONL file')
  if c.prompts and not os.path.isfile(c.prompts):
    raise UserError(f'prompts file not found: {c.prompts}')
  if c.gguf and not os.path.isfile(c.gguf):
    raise UserError(f'GGUF file not found: {c.gguf}')
  if c.drafter_checkpoint and not os.path.isdir(c.drafter_checkpoint):
    raise UserError(f'drafter_checkpoint {c.drafter_checkpoint}: missing (no such folder)')
  if c.drafter_checkpoint and not (
      os.path.isfile(os.path.join(c.drafter_checkpoint, 'drafter.json'))
      or hf_gemma4_assistant.is_assistant_folder(c.drafter_checkpoint)):
    raise UserError(f'drafter_checkpoint {c.drafter_checkpoint}: drafter.json is missing, and '
                    'it is not a Gemma 4 assistant either (config.json, model_type '
                    'gemma4_assistant)')
  outputs.check_resume_flags(c)
  # Sizes the model's context rules out, before it loads (the prompts'
  # lengths are checked once tokenized, still before any cache exists).
  context = runs.known_context(c.model, c.gguf)
  k = c.draft_len + 1 if resolve_drafter(c) != 'none' else 0
  if shape is not None:
    k = shape.num_nodes
  what = (f' + the tree\'s {k} nodes' if shape is not None else
          f' + draft_len + 1 = {k}' if k else '')
  if context and 1 + c.max_new_tokens + k > context:
    raise UserError(f'1 prompt token + max_new_tokens={c.max_new_tokens}{what} need a cache '
                    f'larger than the model context {context} (every slot is a position); '
                    'lower ' + ('them' if k else 'it'))
  if c.cache_size and context and c.cache_size > context:
    raise UserError(f'cache_size={c.cache_size} exceeds the model context {context}')


def validate_policy(c) -> None:
  """The dynamic draft-length settings (policy.py), one error line each."""
  if not c.get('dynamic', False):
    return
  ks = policy_lib.parse_ks(c.policy_ks, c.draft_len)
  costs = runs.parse_costs(c.costs)
  policy_lib.check(costs or [1.0] * len(ks), c.confidence_threshold, c.acceptance_prior,
                   c.acceptance_decay, ks if costs else None)


def tree_shape(c):
  """The `tree` key: None (a chain, or no drafter) or a tree.TreeShape for the
  drafter; UserError (one line) for a bad value or a drafter without trees.
  A tree's depth is its draft length (draft_len is not used), and its rounds
  are never dynamic (the `dynamic` key is ignored)."""
  spec = tree_lib.parse(c.get('tree', ''))
  kind = resolve_drafter(c)
  if spec is None:
    return None
  if kind == 'none':
    raise UserError(f'tree={c.tree} needs a drafter (drafter={c.drafter} runs plain decoding '
                    f'for model {c.model}): set drafter to mtp, heads or ngram')
  if (kind == 'mtp' and c.drafter_checkpoint
      and hf_gemma4_assistant.is_assistant_folder(c.drafter_checkpoint)):
    raise UserError(f'tree={c.tree}: tree drafting is not implemented for Gemma 4\'s '
                    'assistant drafter; leave tree empty (a chain)')
  if kind == 'draft_model':
    raise UserError(f'tree={c.tree}: tree drafting needs an ngram, heads or mtp drafter, '
                    'not draft_model; leave tree empty (a chain)')
  if '+' in kind:
    raise UserError(f'tree={c.tree}: trees are not drafted by {kind}; use drafter='
                    f'{base_kind(kind)} or leave tree empty (a chain)')
  return tree_lib.resolve(spec, kind)


def make_policy(c, target, drafter, drafter_params, prompts):
  """runs.make_policy from the config: (DraftPolicy, PolicyParams, source)."""
  if drafter is None or not c.get('dynamic', False) or tree_shape(c) is not None:
    return None, None, None
  return runs.make_policy(target, drafter, drafter_params, prompts, policy_ks=c.policy_ks,
                          costs=c.costs, threshold=c.confidence_threshold,
                          prior=c.acceptance_prior, decay=c.acceptance_decay,
                          max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                          cache_size_=c.cache_size, temperature=c.temperature, top_k=c.top_k,
                          top_p=c.top_p, seed=c.seed)


def read_prompts(path: str) -> List[dict]:
  """[{'prompt': str} | {'prompt_ids': [int]}] from a JSONL file (or the demo)."""
  if not path:
    return [{'prompt': p} for p in DEMO_PROMPTS]
  out = []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{n}'
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{where}: not valid JSON ({e.msg})') from None
      if not isinstance(row, dict) or ('prompt' in row) == ('prompt_ids' in row):
        raise UserError(f'{where}: each line needs exactly one of "prompt" or "prompt_ids"')
      if 'prompt' in row:
        if not isinstance(row['prompt'], str) or not row['prompt']:
          raise UserError(f'{where}: "prompt" must be a non-empty string')
      else:
        ids = row['prompt_ids']
        if (not isinstance(ids, list) or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
          raise UserError(f'{where}: "prompt_ids" must be a non-empty list of ints')
      out.append(row)
  if not out:
    raise UserError(f'{path}: no prompts')
  return out


def base_kind(kind: str) -> str:
  """'mtp' for 'mtp+lookup' (prompt lookup in front of the mtp drafter)."""
  return kind.partition('+')[0]


def resolve_drafter(c) -> str:
  """'auto' = the shipped trained mtp drafter for the model, behind prompt
  lookup (a tree: alone), if there is one (docs/BENCHMARKS.md section 9)."""
  if c.drafter != 'auto':
    return c.drafter
  if not shipped_drafter(c.model):
    return 'none'
  # Trees are drafted by the trained drafter alone.
  return 'mtp' if tree_lib.parse(c.get('tree', '')) is not None else 'mtp+lookup'


def shipped_drafter(model: str, kind: str = 'mtp'):
  """The folder of the `kind` drafter shipped for `model`, or None."""
  path = pathlib.Path(__file__).parent / 'assets' / f'{model}_{kind}'
  return path if (path / 'drafter.json').is_file() else None


def make_drafter(c, target):
  """(drafter, its params) from the config; (None, None) for plain AR."""
  kind = resolve_drafter(c)
  d, params = _make_drafter(c, target, base_kind(kind))
  if '+' in kind:
    d = drafters.with_lookup(d, c.get('lookup', 2), c.max_ngram, c.get('lookup_unsure', 0.0),
                             c.get('lookup_sampled_min', 0.0))
  return d, params


def _make_drafter(c, target, kind):
  if kind == 'none':
    return None, None
  cfg = target.config
  if (kind == 'mtp' and c.drafter_checkpoint
      and hf_gemma4_assistant.is_assistant_folder(c.drafter_checkpoint)):
    # Gemma 4's official MTP assistant (models/gemma4_assistant.py).
    from specdec_jax.assistant_drafter import AssistantDrafter
    acfg, params = hf_gemma4_assistant.load(c.drafter_checkpoint, cfg)
    return AssistantDrafter(acfg, c.draft_len), params
  if kind in ('mtp', 'heads'):
    from specdec_jax import checkpoints
    path = c.drafter_checkpoint or shipped_drafter(c.model, kind)
    if not path:
      raise UserError(f'no {kind} drafter is shipped for model {c.model!r}; '
                      'set drafter_checkpoint to a trained one')
    try:
      dcfg, params, _ = checkpoints.load_drafter(path, param_dtype=cfg.param_dtype)
      d = drafters.make_drafter(kind, draft_len=c.draft_len, target_config=cfg,
                                drafter_config=dcfg)
    except ValueError as e:         # CheckpointError included
      raise UserError(str(e)) from None
    return d, jax.device_put(params)
  try:
    if kind == 'ngram':
      return drafters.make_drafter('ngram', draft_len=c.draft_len, target_config=cfg,
                                   max_ngram=c.max_ngram, min_ngram=c.min_ngram), None
    if c.draft_model == 'target':     # the target drafting for itself: always right
      return drafters.make_drafter('draft_model', draft_len=c.draft_len, target_config=cfg,
                                   drafter_config=cfg), target.params
    dcfg = config_lib.tiny(vocab_size=c.draft_vocab_size or cfg.vocab_size, num_layers=2,
                           dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d = drafters.make_drafter('draft_model', draft_len=c.draft_len, target_config=cfg,
                              drafter_config=dcfg)
  except ValueError as e:
    raise UserError(str(e)) from None
  return d, jax.device_put(init_params(dcfg, jax.random.key(c.seed + 1)))


def settings(c, rows) -> dict:
  """What determines the output lines (stored beside the output; `resume`
  refuses other settings). Batch size, parallel mode and devices are left
  out: a row's output does not depend on them."""
  kind = resolve_drafter(c)
  s = dict(format=1, model=c.model, model_weights=runs.model_identity(c.model, c.gguf, c.seed),
           param_dtype=precision.resolve(c.param_dtype, c.dtype)[0], dtype=c.dtype,
           drafter=kind, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, seed=c.seed,
           max_new_tokens=c.max_new_tokens, num_samples=c.num_samples,
           prompts=hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest())
  if c.get('trace', False):        # the lines carry `rounds`
    s['trace'] = True
  shape = tree_shape(c)
  if shape is not None:            # its depth is the draft length; never dynamic
    s.update(draft_len=shape.depth, tree=tree_lib.describe(shape))
  elif kind != 'none':
    s['draft_len'] = c.draft_len
    if c.get('dynamic', False):    # the policy changes which drafts are offered
      s.update(dynamic=True, policy_ks=list(policy_lib.parse_ks(c.policy_ks, c.draft_len)),
               confidence_threshold=c.confidence_threshold, costs=str(c.costs),
               acceptance_prior=c.acceptance_prior, acceptance_decay=c.acceptance_decay)
  if '+' in kind:                  # prompt lookup first
    s.update(lookup=c.get('lookup', 2), max_ngram=c.max_ngram)
    if c.get('lookup_unsure', 0.0):
      s['lookup_unsure'] = c.lookup_unsure
    if c.get('lookup_sampled_min', 0.0) and c.temperature > 0:   # greedy rounds ignore it
      s['lookup_sampled_min'] = c.lookup_sampled_min
  kind = base_kind(kind)
  if kind in ('mtp', 'heads'):
    path = c.drafter_checkpoint or shipped_drafter(c.model, kind)
    meta = path and pathlib.Path(path) / 'drafter.json'
    if meta and not meta.is_file():          # a Gemma 4 assistant folder
      meta = pathlib.Path(path) / 'config.json'
    s['drafter_weights'] = meta and outputs.file_digest(meta)
  elif kind == 'ngram':
    s.update(max_ngram=c.max_ngram, min_ngram=c.min_ngram)
  elif kind == 'draft_model':
    s.update(draft_model=c.draft_model, draft_vocab_size=c.draft_vocab_size)
  return s


def line_for(i, s, r, rows, tok, seconds, verified, part_ms) -> dict:
  line = {'index': i, 'sample': s, 'prompt_ids': r['prompt_ids'],
          'completion_ids': r['completion_ids'],
          'finish_reason': r['finish_reason'],
          'stats': {'new_tokens': r['new_tokens'], 'target_calls': r['target_calls'],
                    'draft_calls': r['draft_calls'],
                    'mean_accepted_per_call': round(r['new_tokens'] / max(r['target_calls'], 1), 4),
                    'acceptance_by_position': [
                        round(a / max(r['draft_calls'], 1), 4) for a in r['accepted_by_position']],
                    'seconds': round(seconds, 4)}}
  if part_ms:                     # this row's batch: verify rounds x measured cost
    line['stats'].update(draft_seconds=round(verified * part_ms[0] / 1e3, 4),
                         verify_seconds=round(verified * part_ms[1] / 1e3, 4))
  if tok is not None:            # a checkpoint folder without a tokenizer: ids only
    line['completion'] = tok.decode(r['completion_ids'])
  if 'rounds' in r:              # trace=true: each verify round's drafts and acceptance
    line['rounds'] = r['rounds']
  if 'prompt' in rows[i]:
    line['prompt'] = rows[i]['prompt']
  return line


def run(c) -> dict:
  runs.init_distributed(c)           # before anything touches the backend
  validate(c)
  rows = read_prompts(c.prompts)
  jobs = [(i, s) for i in range(len(rows)) for s in range(c.num_samples)]
  out = None

  def open_output():                 # process 0 only; the others learn what is done
    nonlocal out
    out = outputs.JsonlOutput(c.output, settings(c, rows), resume=c.get('resume', False),
                              overwrite=c.get('overwrite', False), key=lambda l: (l['index'], l['sample']))
    return [int(j in out.done) for j in jobs]

  done = runs.agree(open_output)
  t0 = time.perf_counter()
  # parallel=mesh: each checkpoint tensor goes straight to its shards.
  target = load_target(c.model, gguf=c.gguf, param_dtype=c.param_dtype, dtype=c.dtype,
                       seed=c.seed, sharding=parallel.load_sharding(
                           c.parallel, c.num_devices, c.batch_size))
  cfg, tok = target.config, target.tokenizer
  load_seconds = time.perf_counter() - t0

  prompts = []
  for i, row in enumerate(rows):
    if 'prompt_ids' not in row and tok is None:
      raise UserError(f'prompt {i}: {c.model} has no tokenizer (tokenizer.model or '
                      'tokenizer.json); give "prompt_ids"')
    ids = row['prompt_ids'] if 'prompt_ids' in row else tok.encode(row['prompt'])
    bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
    if bad:
      raise UserError(f'prompt {i}: token id {bad[0]} outside the vocabulary (size {cfg.vocab_size})')
    prompts.append(ids)
  drafter, drafter_params = make_drafter(c, target)
  shape = None if drafter is None else tree_shape(c)
  k = 0 if drafter is None else shape.depth if shape is not None else c.draft_len
  t = time.perf_counter()
  pol, knobs, costs_source = make_policy(c, target, drafter, drafter_params, prompts)
  policy_seconds = time.perf_counter() - t
  # Sized from every prompt, done or not: a resumed run compiles what the
  # uninterrupted one did.
  run_ = runs.Run.build(target, drafter, drafter_params,
                        longest_prompt=max(len(p) for p in prompts),
                        max_new_tokens=c.max_new_tokens, batch_size=c.batch_size,
                        temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                        parallel=c.parallel, num_devices=c.num_devices, cache_size_=c.cache_size,
                        policy=pol, policy_params=knobs, tree=shape,
                        trace=c.get('trace', False))
  gen, runner, cache_size = run_.gen, run_.runner, run_.cache_size
  kept = sum(done)
  todo = [j for j, d in zip(jobs, done) if not d]
  todo.sort(key=lambda j: len(prompts[j[0]]))           # similar lengths share a bucket
  part_ms, total_rounds = None, 0
  gen_seconds = 0.0
  new_tokens = target_calls = draft_calls = 0
  verify_rounds = 0
  accepted_total = np.zeros(k, np.int64)
  # Rounds by drafted / verified length (the policy's); zeros when every
  # batch was resumed from the output.
  planned = np.zeros(len(pol.ks) if pol else 0, np.int64)
  verified_by_len = np.zeros_like(planned)
  try:
    for start in range(0, len(todo), c.batch_size):
      chunk = todo[start:start + c.batch_size]
      batch = run_.batch([prompts[i] for i, _ in chunk],
                         runs.row_keys(c.seed, [i for i, _ in chunk], [s for _, s in chunk]))
      state, seconds = run_(batch)
      gen_seconds += seconds
      if drafter is not None and shape is None and runner.mode == 'none' and part_ms is None:
        t = time.perf_counter()
        part_ms = time_parts(gen, target.params, drafter_params, state)
        run_.compile_seconds += time.perf_counter() - t - 10 * sum(part_ms) / 1e3
      state = runs.local(state)
      # pmap returns one loop counter per device: the batch took the longest.
      rounds, verified = int(np.max(state.step)), int(np.max(state.verify_rounds))
      if pol is not None:
        n = len(pol.ks)
        planned = planned + np.asarray(state.policy.planned).reshape(-1, n).sum(0)
        verified_by_len = verified_by_len + np.asarray(state.policy.verified).reshape(-1, n).sum(0)
      total_rounds += rounds
      verify_rounds += verified
      results = run_.completions(state)
      lines = []
      for (i, s), r in zip(chunk, results):
        if c.get('trace', False) and drafter is None:
          r['rounds'] = []              # plain decoding: no verify rounds
        new_tokens += r['new_tokens']
        target_calls += r['target_calls']
        draft_calls += r['draft_calls']
        accepted_total += np.array(r['accepted_by_position'], np.int64)
        lines.append(json.dumps(line_for(i, s, r, rows, tok, seconds, verified, part_ms)))
      if out is not None:
        out.write(lines)
      done_n = kept + min(start + c.batch_size, len(todo))
      if runs.is_writer():
        print(f'[{done_n}/{len(jobs)}] {sum(r["new_tokens"] for r in results)}'
              f' tokens in {seconds:.2f}s', file=sys.stderr, flush=True)
  finally:
    if out is not None:
      out.close()
  compile_seconds = run_.compile_seconds
  policy_summary = None
  if pol is not None:
    counts = policy_lib.PolicyState.init(knobs, 1).replace(planned=np.asarray(planned),
                                                             verified=np.asarray(verified_by_len))
    policy_summary = {
        **policy_lib.summary(pol, counts),   # rounds by drafted / verified length (0: plain steps)
        'costs': [round(x, 4) for x in knobs.costs.tolist()],
        'costs_from': costs_source, 'costs_seconds': round(policy_seconds, 3),
        'confidence_threshold': c.confidence_threshold,
        'acceptance_prior': c.acceptance_prior, 'acceptance_decay': c.acceptance_decay}
  return {
      'model': c.model, 'drafter': resolve_drafter(c), 'output': str(c.output),
      'prompts': len(prompts), 'samples': len(jobs), 'batch_size': c.batch_size,
      'resumed': kept, 'generated': len(todo), 'processes': jax.process_count(),
      'new_tokens': new_tokens, 'target_calls': target_calls, 'draft_calls': draft_calls,
      'mean_accepted_per_call': round(new_tokens / max(target_calls, 1), 4),
      'draft_len': k, 'dynamic': pol is not None, 'policy': policy_summary,
      'tree': tree_lib.describe(shape),
      'verify_rows': shape.num_nodes if shape is not None else k + 1 if k else 1,
      'acceptance_by_position': [round(float(a) / max(draft_calls, 1), 4) for a in accepted_total],
      'parallel': runner.mode, 'devices': runner.num_devices,
      'tokens_per_second': round(new_tokens / gen_seconds, 3) if gen_seconds else 0.0,
      'generate_seconds': round(gen_seconds, 3),
      'compile_seconds': round(compile_seconds, 3), 'load_seconds': round(load_seconds, 3),
      'cache_size': cache_size,
      'param_dtype': cfg.param_dtype, 'dtype': cfg.dtype, 'precision': target.precision,
      # Draft vs verify: each half timed alone (median of 5) on the first
      # batch's state, times the rounds that verified (the others were plain
      # AR steps: the drafter abstained); null for plain AR, a tree or pmap/mesh.
      'draft_ms_per_round': part_ms and round(part_ms[0], 3),
      'verify_ms_per_round': part_ms and round(part_ms[1], 3),
      'rounds': total_rounds, 'verify_rounds': verify_rounds,
      'draft_seconds': part_ms and round(verify_rounds * part_ms[0] / 1e3, 3),
      'verify_seconds': part_ms and round(verify_rounds * part_ms[1] / 1e3, 3),
  }


def time_parts(gen, params, drafter_params, state, repeats=5):
  """(draft ms, verify ms) per round, each half compiled and timed alone."""
  drafts = jax.block_until_ready(gen.draft_part(params, state, drafter_params))
  return tuple(1e3 * median_seconds(fn, repeats=repeats) for fn in (
      lambda: gen.draft_part(params, state, drafter_params),
      lambda: gen.verify_part(params, state, drafts)))
