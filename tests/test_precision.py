"""Weights in bfloat16, activations in float32: the matmul path, and how
`param_dtype=auto` decides (precision.resolve)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import precision
from specdec_jax.errors import UserError
from specdec_jax.model import Transformer, cast_params, matmul


@pytest.mark.parametrize('rows', [1, 2, 5])
def test_bf16_matmul_accumulates_in_float32(rows):
  """bf16 weights: the product of the bf16-rounded operands summed in float32
  (one row padded to two on CPU gives the same numbers)."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (rows, 640))
  w = jax.random.normal(kw, (384, 640))
  w16 = w.astype(jnp.bfloat16)
  got = jax.jit(matmul)(x, w16)
  assert got.dtype == jnp.float32 and got.shape == (rows, 384)
  rounded = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(w16, np.float64).T
  np.testing.assert_allclose(got, rounded, atol=1e-3, rtol=1e-4)
  exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
  assert np.abs(np.asarray(got) - exact).max() > 1e-2      # the bf16 path really ran
  np.testing.assert_allclose(jax.jit(matmul)(x, w), exact, atol=1e-3, rtol=1e-4)


def test_cast_params_keeps_norms_float32(tiny):
  cfg, params = tiny
  p16 = cast_params(params, jnp.bfloat16)
  assert p16['embedding'].dtype == jnp.bfloat16
  assert p16['layer_0']['mlp']['gate_up'].dtype == jnp.bfloat16
  assert p16['layer_0']['attn']['q_norm'].dtype == jnp.float32
  assert p16['layer_0']['pre_attn_norm']['scale'].dtype == jnp.float32
  assert p16['final_norm']['scale'].dtype == jnp.float32


def test_bf16_cached_decode_equals_bf16_full_forward(tiny):
  """The cache (and the local layers' window slice) is exact at any weight
  dtype: step-by-step decoding equals one full pass with the same weights."""
  from specdec_jax.model import KVCache
  cfg, params = tiny
  cfg = cfg.replace(param_dtype='bfloat16')
  params = cast_params(params, jnp.bfloat16)
  apply = jax.jit(Transformer(cfg).apply)
  tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, cfg.vocab_size)
  full = apply({'params': params}, tokens)[0]
  cache = KVCache.init(cfg, 2, 64)
  steps = []
  for t in range(14):
    logits, _, cache = apply({'params': params}, tokens[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('param_dtype, dtype, message', [
    ('float8', 'float32', 'param_dtype must be one of'),
    ('float32', 'float16', 'dtype must be one of'),
    ('bfloat16', 'bfloat16', 'not supported on CPU'),
    ('float32', 'bfloat16', 'not supported on CPU'),
])
def test_bad_dtypes_are_one_line(param_dtype, dtype, message):
  with pytest.raises(UserError, match=message) as e:
    precision.resolve(param_dtype, dtype)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('flags', [{'avx512f', 'avx512_bf16'}, {'avx2'}], ids=['bf16', 'avx2'])
@pytest.mark.parametrize('faster', ['bfloat16', 'float32'])
def test_auto_measures_once_and_caches_the_verdict(monkeypatch, tmp_path, faster, flags):
  """On any CPU, with or without bf16 instructions (a Zen 3 without them
  runs the 5-row product faster in bf16), `auto` picks whichever weight
  dtype runs the LM head faster summed over 1 and 5 rows, and a second
  process reads the verdict from the cache instead of measuring again."""
  monkeypatch.setattr(precision, '_CACHE', tmp_path)
  monkeypatch.setattr(precision, 'cpu_info', lambda: ('Test CPU', frozenset(flags)))
  calls = []
  def fake(dtype, rows):   # float32 faster at 1 row, slower at 5 (as on the Zen 3)
    calls.append((dtype, rows))
    if rows == 1:
      return 0.035 if dtype == 'float32' else 0.039
    return 0.02 if dtype == faster else 0.07
  monkeypatch.setattr(precision, '_time_head', fake)
  precision._cpu_verdict.cache_clear()
  try:
    assert precision.resolve('auto')[0] == faster
    assert len(calls) == 4
    precision._cpu_verdict.cache_clear()
    monkeypatch.setattr(precision, '_time_head', lambda *a: pytest.fail('measured twice'))
    pd, _, why = precision.resolve('auto')
  finally:
    precision._cpu_verdict.cache_clear()
  assert pd == faster and 'Test CPU' in why
  assert ('has no bf16' in why) == ('avx512_bf16' not in flags)
  # bf16 chosen while float32 wins a single row: the summary says so
  assert ('param_dtype=float32' in why) == (faster == 'bfloat16')
  assert precision.resolve('float32')[0] == 'float32'     # explicit names need no verdict
