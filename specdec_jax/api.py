"""The few calls a notebook needs: load a target and a drafter, generate, compare.

    from specdec_jax import api
    target = api.load_target('gemma3_270m')
    drafter = api.load_drafter(target, 'mtp', draft_len=4)       # the shipped one
    ar = api.generate(target, ['def add(a, b):'], max_new_tokens=32)
    sd = api.generate(target, ['def add(a, b):'], drafter=drafter, max_new_tokens=32)
    assert ar.texts == sd.texts                                   # greedy: identical
    print(sd.tokens_per_second / ar.tokens_per_second, sd.acceptance_by_position)

`generate` puts all prompts in one batch (padded to a multiple of the device
count), runs it on every local device (`parallel='auto'`: pmap over TPU
cores, one device on a CPU), compiles once (timed apart), and returns the
completions with the run's statistics. It runs through `runs.Run`, as the
experiment jobs (generation_job, sweep) do.
"""
import dataclasses
from typing import Any, List, Optional, Sequence, Union

import jax
import numpy as np

from specdec_jax import config as config_lib
from specdec_jax import drafters as drafters_lib
from specdec_jax.model import init_params
from specdec_jax.targets import Target, load_target  # noqa: F401  (re-exported)


@dataclasses.dataclass
class Drafter:
  drafter: Any
  params: Any
  kind: str
  num_params: int = 0             # the drafter's own weights (the target's, for draft_model=target)


@dataclasses.dataclass
class Result:
  texts: Optional[List[str]]      # None for a target without a tokenizer
  completion_ids: List[List[int]]
  new_tokens: int
  target_calls: int
  seconds: float                  # generation, compile excluded
  compile_seconds: float
  acceptance_by_position: List[float]
  devices: int
  parallel: str
  policy: Optional[dict] = None   # dynamic draft length: lengths, costs, rounds by length
  tree: Optional[List[int]] = None   # the tree's branching per depth; None: a chain
  rounds: Optional[List[List[dict]]] = None   # trace=True: per prompt, its verify rounds

  @property
  def tokens_per_second(self) -> float:
    return self.new_tokens / self.seconds

  @property
  def mean_accepted_per_call(self) -> float:
    return self.new_tokens / max(self.target_calls, 1)


def load_drafter(target: Target, kind: str, *, draft_len: int = 4, checkpoint: str = '',
                 max_ngram: int = 3, min_ngram: int = 1, num_layers: int = 2,
                 seed: int = 0, lookup: int = 0,
                 lookup_unsure: float = drafters_lib.LOOKUP_UNSURE,
                 lookup_sampled_min: float = drafters_lib.LOOKUP_SAMPLED_MIN) -> Drafter:
  """kind: 'ngram'; 'mtp' / 'heads' (checkpoint '' = the one shipped for the
  target; 'mtp' also takes a Gemma 4 assistant folder for a Gemma 4 target);
  'draft_model' (checkpoint '' = a random `num_layers` Gemma with the
  target's vocabulary; 'target' = the target itself). ValueError (one line)
  for a missing, corrupt or incompatible checkpoint or an impossible k.
  The drafter computes in the target's weight and activation dtypes.

  'mtp+lookup' / 'heads+lookup' (or lookup = n > 0 with mtp / heads): prompt
  lookup first (drafters.LookupDrafter): a row whose last n+ tokens (n =
  lookup, 2 by default; up to max(n, max_ngram)) occurred earlier drafts what
  followed them, the other rows take the trained drafter's draft;
  lookup_unsure = c (0.7 by default; 0 = off) also sends a row with a
  shorter match (1 .. n - 1 tokens) to lookup where the trained drafter's
  first-token confidence is below c; lookup_sampled_min = m (1 by default:
  only where the drafter is certain; 0 = off) lets a sampled row draft by
  lookup only where the trained drafter gives lookup's first token a
  probability of at least m."""
  from specdec_jax import checkpoints
  from specdec_jax.generation_job import shipped_drafter
  cfg = target.config
  count = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))
  if kind == 'ngram':
    return Drafter(drafters_lib.NgramDrafter(draft_len, cfg.vocab_size, max_ngram=max_ngram,
                                             min_ngram=min_ngram), None, kind)
  if kind == 'draft_model':
    dcfg = cfg if checkpoint == 'target' else config_lib.tiny(
        vocab_size=cfg.vocab_size, num_layers=num_layers, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype)
    params = (target.params if checkpoint == 'target' else
              jax.device_put(init_params(dcfg, jax.random.key(seed + 1))))
    return Drafter(drafters_lib.make_drafter('draft_model', draft_len=draft_len,
                                             target_config=cfg, drafter_config=dcfg),
                   params, kind, count(params))
  if kind in ('mtp+lookup', 'heads+lookup'):
    kind, lookup = kind.partition('+')[0], lookup or 2
  if lookup:
    if kind not in ('mtp', 'heads'):
      raise ValueError(f'lookup applies to the mtp and heads drafters, not {kind!r}')
    if lookup < 1:
      raise ValueError(f'lookup must be >= 1 (0 = off), got {lookup}')
    d = load_drafter(target, kind, draft_len=draft_len, checkpoint=checkpoint)
    return Drafter(drafters_lib.with_lookup(d.drafter, lookup, max_ngram, lookup_unsure,
                                                    lookup_sampled_min), d.params,
                   f'{kind}+lookup', d.num_params)
  from specdec_jax.loaders import hf_gemma4_assistant
  if kind == 'mtp' and checkpoint and hf_gemma4_assistant.is_assistant_folder(checkpoint):
    # Gemma 4's official MTP assistant (models/gemma4_assistant.py), as the job loads it.
    from specdec_jax.assistant_drafter import AssistantDrafter
    from specdec_jax.errors import UserError
    try:
      acfg, params = hf_gemma4_assistant.load(checkpoint, cfg)
    except UserError as e:
      raise ValueError(str(e)) from None
    return Drafter(AssistantDrafter(acfg, draft_len), params, kind, count(params))
  path = checkpoint or shipped_drafter(target.name, kind)
  if not path:
    raise ValueError(f'no {kind} drafter is shipped for {target.name!r}; pass a checkpoint')
  dcfg, params, _ = checkpoints.load_drafter(path, param_dtype=cfg.param_dtype)
  if dcfg.kind != kind:
    raise ValueError(f'{path} holds a {dcfg.kind} drafter, not {kind}')
  # The head's vocabulary subset is ids; its weights are the target's embedding.
  return Drafter(drafters_lib.make_drafter(kind, draft_len=draft_len, target_config=cfg,
                                           drafter_config=dcfg),
                 jax.device_put(params), kind, count(params['net']))


def generate(target: Target, prompts: Sequence[Union[str, Sequence[int]]], *,
             drafter: Optional[Drafter] = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             parallel: str = 'auto', dynamic: bool = True, policy_ks: str = '',
             costs: Union[str, Sequence[float]] = '', confidence_threshold: float = 0.4,
             acceptance_prior: float = 0.6, acceptance_decay: float = 0.7,
             tree: Any = '', trace: bool = False) -> Result:
  """With a drafter, `dynamic` (the default) lets each round choose its draft
  length up to the drafter's (policy.py; `costs` '' = measured once here and
  cached); dynamic=False always drafts the drafter's draft_len.
  `tree` ('' = a chain; 'auto'; '4,2,1' or (4, 2, 1): branching per depth;
  tree.py) verifies a tree of drafts per round; its depth is the draft
  length and its rounds are never dynamic. `trace`: Result.rounds lists each
  prompt's verify rounds ({'drafts': [ids], 'accepted': n}; trace.py)."""
  from specdec_jax import tree as tree_lib
  from specdec_jax import policy as policy_lib
  from specdec_jax import runs
  cfg, tok = target.config, target.tokenizer
  if tok is None and any(isinstance(p, str) for p in prompts):
    raise ValueError(f'{target.name} has no tokenizer: give prompts as token ids')
  ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
  n_dev = jax.local_device_count()
  batch_size = -(-len(ids) // n_dev) * n_dev if parallel in ('auto', 'pmap') else len(ids)
  pol = knobs = shape = None
  if drafter is not None:
    shape = tree_lib.resolve(tree, drafter.kind)
  if drafter is not None and dynamic and shape is None:
    pol, knobs, _ = runs.make_policy(
        target, drafter.drafter, drafter.params, ids, policy_ks=policy_ks, costs=costs,
        threshold=confidence_threshold, prior=acceptance_prior, decay=acceptance_decay,
        max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed)
  run = runs.Run.build(target, drafter and drafter.drafter, drafter.params if drafter else None,
                       longest_prompt=max(map(len, ids)), max_new_tokens=max_new_tokens,
                       batch_size=batch_size, temperature=temperature, top_k=top_k, top_p=top_p,
                       parallel=parallel, policy=pol, policy_params=knobs, tree=shape,
                       trace=trace)
  k, runner = run.draft_len, run.runner
  batch = run.batch(ids, runs.row_keys(seed, range(len(ids))))
  state, seconds = run(batch)
  compile_s = run.compile_seconds
  rows = run.completions(state)
  calls = sum(r['target_calls'] for r in rows)
  draft_calls = sum(r['draft_calls'] for r in rows)
  accepted = np.sum([r['accepted_by_position'] for r in rows], axis=0) if k else np.zeros(0)
  return Result(texts=None if tok is None else [tok.decode(r['completion_ids']) for r in rows],
                completion_ids=[r['completion_ids'] for r in rows],
                new_tokens=sum(r['new_tokens'] for r in rows), target_calls=calls,
                seconds=seconds, compile_seconds=compile_s,
                acceptance_by_position=[float(a) / max(draft_calls, 1) for a in accepted],
                devices=runner.num_devices, parallel=runner.mode,
                policy=None if pol is None else {
                    **policy_lib.summary(pol, runs.local(state).policy),
                    'costs': [round(x, 4) for x in knobs.costs.tolist()]},
                tree=tree_lib.describe(shape),
                rounds=[r['rounds'] for r in rows] if trace and drafter is not None else None)
