"""Running a Generator on one device, data-parallel with pmap, or on a mesh.

- `none`: one device; prefill and decode compiled ahead of time.
- `pmap`: the per-shard program (prefill + the whole while_loop) mapped over
  local devices with `jax.pmap`; the batch is split evenly, params replicated.
  Each device runs its own loop until its own rows finish.
- `mesh`: `jax.jit` over a ('data', 'model') mesh with `NamedSharding`: the
  batch is split over 'data' and the target's big matrices over 'model'
  (vocabulary rows of the embedding, output rows of qkv / gate_up, input
  columns of out / down), so a target too large for one core spans several.
  'data' gets gcd(devices, batch_size) devices, 'model' the rest. Multi-host:
  after `runs.init_distributed` (the jobs call it first) the mesh spans every
  process's devices; each process feeds the same global batch and keeps its
  share.
- `auto`: pmap when there are several devices and the batch divides evenly,
  otherwise none; the mesh when several processes share the run.

Each runner's `compile(batch)` returns a function batch -> DecodeState with
the batch axis flat, whatever the mode.
"""
import dataclasses
import math
from typing import Any, Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from specdec_jax.errors import UserError

# Which axis of each big matrix the 'model' mesh axis splits (by leaf name).
_MODEL_AXIS = {'embedding': 0, 'qkv': 0, 'gate_up': 0, 'out': 1, 'down': 1}


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


def param_sharding(params, mesh: Mesh):
  """NamedShardings that split the big matrices over 'model' (when divisible)."""
  size = mesh.shape['model']

  def spec(path, leaf):
    name = getattr(path[-1], 'key', None)
    axis = _MODEL_AXIS.get(name)
    if axis is None or leaf.shape[axis] % size:
      return NamedSharding(mesh, P())
    parts = [None] * leaf.ndim
    parts[axis] = 'model'
    return NamedSharding(mesh, P(*parts))

  return jax.tree_util.tree_map_with_path(spec, params)


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
  if mode == 'none':
    return Runner('none', 1, lambda batch: _compile_single(gen, params, drafter_params, batch,
                                                           policy_params))
  if mode == 'pmap':
    if batch_size % n:
      raise UserError(f'batch_size={batch_size} is not divisible by the {n} devices (pmap)')
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
  data = math.gcd(n, batch_size)
  mesh = Mesh(np.array(devices).reshape(data, n // data), ('data', 'model'))
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
    compiled = fn.lower(params_s, put(batch), dparams_s, pp_s).compile()
    return lambda b: compiled(params_s, put(b), dparams_s, pp_s)

  return Runner(f'mesh(data={data},model={n // data})', n, compile)
