"""Which dtypes a run computes in: weights (`param_dtype`) and activations (`dtype`).

    param_dtype, dtype, why = precision.resolve('auto', 'float32')

Weights in bfloat16 halve the bytes a decode step reads; matmuls then take
bf16 operands and accumulate in float32 (model.matmul), while norms, RoPE,
softmax and the sampler stay float32. Whether that is faster depends on the
hardware: TPUs and GPUs multiply bf16 natively; on CPUs XLA:CPU's kernels
decide, with or without AVX512_BF16 / AMX, and differently at the few rows
a decode step multiplies than at the 5+ of a verify pass. So `auto` on a CPU
times the product that dominates a step of Gemma 3 270M (its 262,144 x 640
LM head) at 1 and at 5 rows (a decode step and a k = 4 verify pass) in both
weight dtypes, once per machine, and picks bf16 only if it wins on the sum;
the verdict is cached under ~/.cache/specdec_jax/ keyed by CPU model, flags
and jax version. Seen with jax 0.10.2 (`python -m experiments.bench_ar`):
on a Zen 4 EPYC with AVX512_BF16 bf16 wins at both; on a Zen 3 EPYC (AVX2,
no bf16 instructions) float32 wins at 1 row (35 vs 39 ms) and bf16 at 5
(64 vs 37 ms), so a decode step is 0.74x as fast in bf16 there but a k = 4
verify pass costs 1.2 bf16 steps instead of 2.5 float32 ones, and `auto`
picks bf16 (the README, "Across CPUs"). `float32` weights keep the exact
model for parity checks and the fastest plain decoding on such a CPU.
"""
import functools
import hashlib
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Tuple

from specdec_jax.errors import UserError

PARAM_DTYPES = ('auto', 'bfloat16', 'float32')
DTYPES = ('float32', 'bfloat16')
_CACHE = pathlib.Path(os.environ.get('SPECDEC_CACHE',
                                     pathlib.Path.home() / '.cache' / 'specdec_jax'))


def cache_dir() -> pathlib.Path:
  """Where measured verdicts (this file's, policy.py's costs) are cached."""
  return _CACHE


def cpu_info() -> Tuple[str, frozenset]:
  """(model name, flags) from /proc/cpuinfo; ('', {}) where there is none."""
  try:
    text = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return platform.processor(), frozenset()
  name, flags = '', frozenset()
  for line in text.splitlines():
    key, _, value = line.partition(':')
    if key.strip() == 'model name' and not name:
      name = value.strip()
    elif key.strip() == 'flags' and not flags:
      flags = frozenset(value.split())
  return name, flags


def cpu_has_bf16(flags) -> bool:
  return bool({'avx512_bf16', 'amx_bf16'} & set(flags))


def _time_head(dtype: str, rows: int) -> float:
  """Median seconds of the LM-head-shaped product through model.matmul."""
  import jax
  import jax.numpy as jnp
  from specdec_jax.model import matmul
  w = jnp.ones((262_144, 640), dtype)
  x = jnp.ones((rows, 640), jnp.float32)
  f = jax.jit(matmul)
  jax.block_until_ready(f(x, w))
  times = []
  for _ in range(7):
    t = time.perf_counter()
    jax.block_until_ready(f(x, w))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


@functools.lru_cache(maxsize=None)
def _cpu_verdict() -> Tuple[str, str]:
  """('bfloat16' | 'float32', why) for this CPU, measured once and cached."""
  import jax
  name, flags = cpu_info()
  key = hashlib.sha256(f'{name}|{sorted(flags)}|{jax.__version__}'.encode()).hexdigest()[:16]
  path = _CACHE / f'precision-{key}.json'
  try:
    got = json.loads(path.read_text())
    return got['param_dtype'], got['why']
  except (OSError, ValueError, KeyError):
    pass
  ms = {d: [_time_head(d, r) * 1e3 for r in (1, 5)] for d in ('float32', 'bfloat16')}
  best = 'bfloat16' if sum(ms['bfloat16']) < sum(ms['float32']) else 'float32'
  has = 'has' if cpu_has_bf16(flags) else 'has no'
  why = (f'CPU {name or "?"} {has} bf16 instructions; LM head at 1 / 5 rows: float32 '
         f'{ms["float32"][0]:.1f} / {ms["float32"][1]:.1f} ms, bfloat16 '
         f'{ms["bfloat16"][0]:.1f} / {ms["bfloat16"][1]:.1f} ms (measured once, cached in {path})')
  if best == 'bfloat16' and ms['float32'][0] < ms['bfloat16'][0]:
    why += '; float32 is faster at 1 row: plain decoding alone runs faster with param_dtype=float32'
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f'.{os.getpid()}.tmp')   # per process: several may measure
    tmp.write_text(json.dumps({'param_dtype': best, 'why': why, 'ms': ms}))
    os.replace(tmp, path)
  except OSError:
    pass
  return best, why


def resolve(param_dtype: str, dtype: str = 'float32') -> Tuple[str, str, str]:
  """Validates the names and resolves `auto`: (param_dtype, dtype, why)."""
  if param_dtype not in PARAM_DTYPES:
    raise UserError(f'param_dtype must be one of {", ".join(PARAM_DTYPES)}, got {param_dtype!r}')
  if dtype not in DTYPES:
    raise UserError(f'dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
  import jax
  backend = jax.default_backend()
  if dtype == 'bfloat16' and backend == 'cpu':
    raise UserError('dtype=bfloat16 (bf16 activations) is not supported on CPU: XLA:CPU runs '
                    'them 5-10x slower than float32; use dtype=float32 with '
                    'param_dtype=bfloat16')
  if dtype == 'bfloat16' and param_dtype == 'float32':
    raise UserError('dtype=bfloat16 with param_dtype=float32 would round every float32 '
                    'weight to bf16 on each call; use param_dtype=bfloat16')
  if param_dtype != 'auto':
    return param_dtype, dtype, 'as configured'
  if backend in ('tpu', 'gpu'):
    return 'bfloat16', dtype, f'{backend} multiplies bf16 natively'
  best, why = _cpu_verdict()
  return best, dtype, why
