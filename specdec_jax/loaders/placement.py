"""Putting loaded tensors on devices one at a time, in the dtype asked for.

A loader reads one host tensor, hands it to `place`, and drops it: the
checkpoint is never held twice in host memory, and with a sharding each
device receives only its part. Casting happens on the device (XLA), not in
numpy: numpy's elementwise bf16 cast (ml_dtypes) is minutes slow for a big
model here (see gemma_gguf.py).

A sharding function maps a leaf's '/'-joined path and its
jax.ShapeDtypeStruct to a jax.sharding.Sharding, or None for the default
device. `mesh_sharding_fn(mesh)` is the mesh path's rule;
`tree_sharding_fn` adapts any tree of shardings to one.
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

ShardingFn = Callable[[str, jax.ShapeDtypeStruct], Optional[jax.sharding.Sharding]]


@functools.partial(jax.jit, static_argnums=1)
def _cast(x, dtype):
  return x.astype(dtype)   # the output keeps the input's sharding


def leaf_dtype(path: str, ndim: int, param_dtype) -> jnp.dtype:
  """model.cast_params' rule: matrices in `param_dtype`, norm scales float32."""
  from specdec_jax.model import is_matrix
  probe = np.empty((1,) * ndim, np.float32)
  return jnp.dtype(param_dtype) if is_matrix(path, probe) else jnp.dtype(jnp.float32)


def place(host: np.ndarray, path: str, param_dtype, sharding: Optional[ShardingFn] = None):
  """One host tensor -> a device array in its dtype (see `leaf_dtype`), sharded."""
  dtype = leaf_dtype(path, host.ndim, param_dtype)
  target = sharding(path, jax.ShapeDtypeStruct(host.shape, dtype)) if sharding else None
  x = jax.device_put(host, target)
  return x if x.dtype == dtype else _cast(x, dtype)


def tree_sharding_fn(shardings) -> ShardingFn:
  """A tree of shardings (same structure as the params) -> a ShardingFn."""
  flat = {}
  for path, s in jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]:
    flat['/'.join(str(getattr(p, 'key', p)) for p in path)] = s
  return lambda path, leaf: flat.get(path)


def mesh_sharding_fn(mesh: jax.sharding.Mesh) -> ShardingFn:
  """The mesh path's rule (parallel.param_sharding: big matrices split over
  'model'), leaf by leaf: a loader places each tensor straight on its shards,
  so no device ever holds a whole matrix meant to be split."""
  from specdec_jax.parallel import param_sharding

  def fn(path: str, leaf: jax.ShapeDtypeStruct):
    name = path.rsplit('/', 1)[-1]
    return param_sharding({name: leaf}, mesh)[name]
  return fn


def param_bytes(params) -> int:
  """Total bytes of a params tree's leaves (device arrays or ShapeDtypeStructs)."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(params))
