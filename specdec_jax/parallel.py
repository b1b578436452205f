"""Running a Generator on one device, data-parallel with pmap, or on a mesh.

- `none`: one device; prefill and decode compiled ahead of time.
- `pmap`: the per-shard program (prefill + the whole while_loop) mapped over
  local devices with `jax.pmap`; the batch is split evenly, params replicated.
  Each device runs its own loop until its own rows finish.
- `mesh`: `jax.jit` over a ('data', 'model') mesh with `NamedSharding`: the
  batch is split over 'data' and the big matrices over 'model' (`_MODEL_AXIS`:
  vocabulary rows of the embedding, output rows of qkv / gate_up, input
  columns of out / down, Gemma 4's per-layer tables and MoE experts, the
  assistant's projections), so a target too large for one core spans several.
  The KV cache is split over its rows on 'data' and over its KV heads on
  'model' where they divide (slot == position and per-row lengths unchanged).
  'data' gets gcd(devices, batch_size) devices, 'model' the rest. Multi-host:
  after `runs.init_distributed` (the jobs call it first) the mesh spans every
  process's devices; each process feeds the same global batch and keeps its
  share.
- `auto`: pmap when there are several devices and the batch divides evenly,
  otherwise none; the mesh when several processes share the run.

Each runner's `compile(batch)` returns a function batch -> DecodeState with
the batch axis flat, whatever the mode. `make_runner` first prints the
parameter and KV-cache bytes per device and refuses, in one line, a run
that cannot fit the devices' memory (`check_memory`).
"""
import dataclasses
import math
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from specdec_jax.errors import UserError
from specdec_jax.model import KVCache, cache_spec

# Which axis of each big matrix the 'model' mesh axis splits (by leaf name):
# the first of the listed axes that the 'model' size divides; a matrix no
# listed axis of which divides stays whole on every device.
_MODEL_AXIS = {
    # Gemma 3 and 4 (model.py, models/gemma4.py), the drafters' networks
    'embedding': (0,), 'qkv': (0,), 'gate_up': (0,), 'out': (1,), 'down': (1,),
    # Gemma 4's per-layer embeddings: the table [V', L * P] by columns (a row
    # gather stays local), its projection [L * P, D] by output rows, each
    # layer's gate [P, D] by rows and projection [D, P] by input columns.
    'embedding_per_layer': (1, 0), 'per_layer_projection': (0,),
    'ple_gate': (0,), 'ple_proj': (1,),
    # MoE experts [E, 2F, D] / [E, D, F]: whole experts per device where the
    # expert count divides, else each expert's hidden width.
    'experts_gate_up': (0, 1), 'experts_down': (0, 2),
    # Gemma 4's assistant: [d, 2 D_t] / [D_t, d] by output rows; centroids [C, d].
    'pre_projection': (0,), 'post_projection': (0,), 'centroids': (0,),
}


@dataclasses.dataclass
class Runner:
  mode: str
  num_devices: int
  compile: Callable[[Any], Callable[[Any], Any]]


def _devices(num_devices):
  available = jax.devices()
  n = num_devices or len(available)
  if n > len(available):
    raise UserError(f'num_devices={n} but only {len(available)} device(s) exist')
  return available[:n]


def make_mesh(devices, batch_size: int) -> Mesh:
  """('data', 'model'): gcd(devices, batch_size) on 'data', the rest on 'model'."""
  n = len(devices)
  data = math.gcd(n, batch_size)
  return Mesh(np.array(devices).reshape(data, n // data), ('data', 'model'))


def load_sharding(mode: str, num_devices: int, batch_size: int):
  """The per-leaf sharding function a loader places a target's tensors with
  (loaders/placement.py) when the run will use the mesh, so each tensor goes
  straight to its shards; None (the default device) otherwise."""
  from specdec_jax.loaders.placement import mesh_sharding_fn
  if not (mode == 'mesh' or (mode == 'auto' and jax.process_count() > 1)):
    return None
  return mesh_sharding_fn(make_mesh(_devices(num_devices), batch_size))


def param_sharding(params, mesh: Mesh):
  """NamedShardings that split the big matrices over 'model' (when divisible)."""
  size = mesh.shape['model']

  def spec(path, leaf):
    name = getattr(path[-1], 'key', None)
    axes = [a for a in _MODEL_AXIS.get(name, ()) if a < leaf.ndim and leaf.shape[a] % size == 0]
    if size == 1 or not axes:
      return NamedSharding(mesh, P())
    parts = [None] * leaf.ndim
    parts[axes[0]] = 'model'
    return NamedSharding(mesh, P(*parts))

  return jax.tree_util.tree_map_with_path(spec, params)


# ----------------------------------------------------------------------------- memory

# Bytes per device to check against instead of the devices' own memory (tests;
# or to keep headroom for other work on the same devices).
MEMORY_LIMIT_ENV = 'SPECDEC_MEMORY_LIMIT_BYTES'


def _bytes(shape, dtype) -> int:
  return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def _size(n: int) -> str:
  if n >= 2**30:
    return f'{n / 2**30:.2f} GiB'
  return f'{n / 2**20:.1f} MiB' if n >= 2**20 else f'{n / 2**10:.1f} KiB'


def _weights(params, drafter_params):
  """The weight trees a run holds (a target drafting for itself: once)."""
  if drafter_params is None or drafter_params is params:
    return [params]
  return [params, drafter_params]


def memory_per_device(gen, params, drafter_params, mode: str, devices,
                      batch_size: int) -> dict:
  """{'params', 'cache'}: bytes one device holds for a run (the largest
  share), from shapes only: the target's and drafter's weights as the mode
  places them, and every KV cache (the target's; a draft model's own)."""
  from specdec_jax import drafters
  mesh = make_mesh(devices, batch_size) if mode == 'mesh' else None
  param = 0
  for tree in _weights(params, drafter_params):
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(param_sharding(tree, mesh)) if mesh else [None] * len(leaves)
    param += sum(_bytes(s.shard_shape(x.shape) if s else x.shape, x.dtype)
                 for x, s in zip(leaves, shards))
  caches = [gen.config]
  if isinstance(gen.drafter, drafters.DraftModelDrafter):
    caches.append(gen.drafter.config)
  rows = batch_size // len(devices) if mode == 'pmap' else batch_size
  cache = 0
  for cfg in caches:
    shapes = jax.eval_shape(lambda: KVCache.init(cfg, batch_size, gen.cache_size))
    for x in shapes.k + shapes.v:
      share = (NamedSharding(mesh, cache_spec(x.shape[1], mesh.shape)).shard_shape(x.shape) if mesh
               else (rows,) + x.shape[1:])
      cache += _bytes(share, x.dtype)
  return {'params': param, 'cache': cache}


def _host_available() -> int:
  """MemAvailable of /proc/meminfo (free pages where it is missing)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def device_memory_limit(devices, resident: int = 0):
  """(bytes one device may hold, where the number comes from).

    - `SPECDEC_MEMORY_LIMIT_BYTES` when set;
    - an accelerator's `memory_stats()['bytes_limit']` (the smallest);
    - CPU devices share the host: the memory available now plus `resident`
      (the loaded weights, already counted as used), split evenly over the
      process's devices of the run.
  """
  env = os.environ.get(MEMORY_LIMIT_ENV)
  if env:
    return int(env), MEMORY_LIMIT_ENV
  local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
  limits = []
  for d in local:
    try:
      stats = d.memory_stats()
    except Exception:      # backends without the call raise (CPU returns None)
      stats = None
    if stats and stats.get('bytes_limit'):
      limits.append(int(stats['bytes_limit']))
  if limits:
    return min(limits), f'{local[0].device_kind} memory'
  return ((_host_available() + resident) // len(local),
          f'host memory available, shared by {len(local)} device(s)')


def check_memory(gen, params, drafter_params, mode: str, devices, batch_size: int) -> dict:
  """Prints one line (params and KV cache bytes per device, against the
  limit) and raises UserError when they do not fit: before anything compiles
  or the cache is allocated. Returns the numbers."""
  need = memory_per_device(gen, params, drafter_params, mode, devices, batch_size)
  resident = sum(_bytes(x.shape, x.dtype) for t in _weights(params, drafter_params)
                 for x in jax.tree.leaves(t))
  limit, source = device_memory_limit(devices, resident)
  total = need['params'] + need['cache']
  where = f'{mode}, {len(devices)} device(s)'
  if jax.process_index() == 0:
    print(f'memory per device ({where}): params {_size(need["params"])} + KV cache '
          f'{_size(need["cache"])} (cache_size={gen.cache_size}, batch_size={batch_size}) = '
          f'{_size(total)} of {_size(limit)} ({source})', file=sys.stderr, flush=True)
  if total > limit:
    raise UserError(
        f'the run needs {_size(total)} per device (params {_size(need["params"])} + KV cache '
        f'{_size(need["cache"])}, parallel={where}) but a device has {_size(limit)} '
        f'({source}); use more devices with parallel=mesh, bfloat16 weights, a smaller '
        'batch_size or a shorter max_new_tokens / cache_size')
  return dict(need, limit=limit)


def make_runner(gen, params, drafter_params, *, mode: str, num_devices: int,
                batch_size: int, policy_params=None) -> Runner:
  """policy_params: the draft-length policy's knobs (arrays, replicated),
  with a Generator that has a policy."""
  devices = _devices(num_devices)
  n = len(devices)
  if jax.process_count() > 1:
    # auto: one program over every process's devices; none: each process
    # runs everything on its first device (the sweep's process 0 does).
    if mode == 'pmap':
      raise UserError(f'parallel=pmap maps over one process\'s devices; with '
                      f'{jax.process_count()} processes use parallel=mesh (or auto)')
    mode = 'mesh' if mode == 'auto' else mode
    if mode == 'mesh' and n != len(jax.devices()):
      raise UserError('num_devices must be 0 (every device) with several processes')
  if mode == 'auto':
    mode = 'pmap' if n > 1 and batch_size % n == 0 else 'none'
  if mode == 'pmap' and batch_size % n:
    raise UserError(f'batch_size={batch_size} is not divisible by the {n} devices (pmap)')
  check_memory(gen, params, drafter_params, mode, devices[:1] if mode == 'none' else devices,
               batch_size)
  if mode == 'none':
    return Runner('none', 1, lambda batch: _compile_single(gen, params, drafter_params, batch,
                                                           policy_params))
  if mode == 'pmap':
    return _pmap_runner(gen, params, drafter_params, devices, policy_params)
  return _mesh_runner(gen, params, drafter_params, devices, batch_size, policy_params)


def _compile_single(gen, params, drafter_params, batch, pp):
  prefill = gen.prefill.lower(gen, params, batch, drafter_params, pp).compile()
  state = jax.eval_shape(lambda: prefill(params, batch, drafter_params, pp))
  decode = gen.decode.lower(gen, params, state, drafter_params).compile()
  return lambda b: decode(params, prefill(params, b, drafter_params, pp), drafter_params)


def _pmap_runner(gen, params, drafter_params, devices, pp):
  n = len(devices)
  shard = lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:])
  unshard = lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]) if x.ndim >= 2 else x

  def per_shard(p, b, dp, pp):
    return gen.decode(p, gen.prefill(p, b, dp, pp), dp)

  # Params are broadcast (in_axes=None): pmap places a copy on each device.
  mapped = jax.pmap(per_shard, in_axes=(None, 0, None, None), devices=devices)

  def compile(batch):
    sharded = jax.tree.map(shard, batch)
    fn = mapped.lower(params, sharded, drafter_params, pp).compile()
    return lambda b: jax.tree.map(unshard, fn(params, jax.tree.map(shard, b), drafter_params,
                                              pp))

  return Runner('pmap', n, compile)


def _mesh_runner(gen, params, drafter_params, devices, batch_size, pp):
  n = len(devices)
  mesh = make_mesh(devices, batch_size)
  data = mesh.shape['data']
  # A target loaded with `load_sharding` is already in place (no copy).
  params_s = jax.device_put(params, param_sharding(params, mesh))
  dparams_s = (None if drafter_params is None else
               jax.device_put(drafter_params, param_sharding(drafter_params, mesh)))
  rows = NamedSharding(mesh, P('data'))
  fn = jax.jit(lambda p, b, dp, pp: gen.decode(p, gen.prefill(p, b, dp, pp), dp))
  pp_s = None if pp is None else jax.device_put(pp, NamedSharding(mesh, P()))

  def put_rows(x):
    # Typed PRNG keys go as their raw data: a process can place only host
    # values on devices of other processes.
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(jax.device_put(np.asarray(jax.random.key_data(x)), rows),
                                      impl=jax.random.key_impl(x))
    return jax.device_put(x, rows)

  def compile(batch):
    put = lambda b: jax.tree.map(put_rows, b)
    with jax.set_mesh(mesh):    # every KV cache split over rows and heads (KVCache.on_mesh)
      compiled = fn.lower(params_s, put(batch), dparams_s, pp_s).compile()
    return lambda b: compiled(params_s, put(b), dparams_s, pp_s)

  return Runner(f'mesh(data={data},model={n // data})', n, compile)
