"""Cached decoding equals one full forward pass; rollback is a length reset."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax.model import KVCache, Transformer, take_rows


def _full(cfg, params, tokens):
  logits, hidden, _ = jax.jit(Transformer(cfg).apply)({'params': params}, tokens)
  return logits, hidden


def _incremental(cfg, params, tokens, chunks, cache_size=64):
  """Feeds `tokens` in chunks of the given sizes through the cache."""
  apply = jax.jit(Transformer(cfg).apply)
  cache = KVCache.init(cfg, tokens.shape[0], cache_size)
  outs, start = [], 0
  for n in chunks:
    logits, _, cache = apply({'params': params}, tokens[:, start:start + n], cache)
    outs.append(logits)
    start += n
  return jnp.concatenate(outs, axis=1), cache


def test_cached_step_by_step_equals_full_forward(tiny):
  cfg, params = tiny
  # 14 tokens > sliding window 4: local layers must forget, global ones not.
  tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, cfg.vocab_size)
  full, _ = _full(cfg, params, tokens)
  for chunks in ([1] * 14, [5] + [1] * 9, [6, 3, 5]):
    inc, cache = _incremental(cfg, params, tokens, chunks)
    np.testing.assert_allclose(inc, full, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [14, 14])


def test_sliding_window_changes_local_layers(tiny):
  """Guards the test above: with a huge window the logits must differ."""
  cfg, params = tiny
  tokens = jax.random.randint(jax.random.key(1), (1, 14), 0, cfg.vocab_size)
  a, _ = _full(cfg, params, tokens)
  b, _ = _full(cfg.replace(sliding_window=1000), params, tokens)
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)   # inside the window
  assert np.abs(np.asarray(a[:, 8:] - b[:, 8:])).max() > 1e-3


def test_rows_at_different_positions_and_rollback(tiny):
  """Per-row lengths: rows advance independently; rolling back = resetting lengths."""
  cfg, params = tiny
  apply = jax.jit(Transformer(cfg).apply)
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
  full, _ = _full(cfg, params, tokens)
  # Row 0 first sees junk in positions 5..7 (a rejected draft), then rolls
  # back to 5 tokens; row 1 keeps its 8.
  first = tokens[:, :8].at[0, 5:8].set((tokens[0, 5:8] + 1) % cfg.vocab_size)
  _, _, cache = apply({'params': params}, first, KVCache.init(cfg, 2, 32))
  cache = cache.replace(lengths=jnp.array([5, 8]))
  step = jnp.stack([tokens[0, 5:9], tokens[1, 8:12]])
  logits, _, cache = apply({'params': params}, step, cache)
  np.testing.assert_allclose(logits[0], full[0, 5:9], atol=1e-5)
  np.testing.assert_allclose(logits[1], full[1, 8:12], atol=1e-5)
  np.testing.assert_array_equal(cache.lengths, [9, 12])


@pytest.mark.slow
def test_gemma_cached_equals_full(gemma):
  t = gemma
  ids = t.tokenizer.encode('def add(a, b):\n    return a + b\n\nprint(add(2, 3))')
  tokens = jnp.array([ids])
  full, _ = _full(t.config, t.params, tokens)
  n = tokens.shape[1]
  inc, _ = _incremental(t.config, t.params, tokens, [n - 4, 1, 3], cache_size=64)
  # Relative to the logit scale (~30): float32 accumulation-order noise only.
  np.testing.assert_allclose(inc, full, atol=2e-3, rtol=0)
  np.testing.assert_array_equal(np.argmax(inc, -1), np.argmax(full, -1))


def test_a_query_rounds_alike_among_any_number_of_rows():
  """attend / rms_norm: row 0's output is bitwise the same whether it is
  computed alone (a plain step) or among 2..9 query rows (a verify pass).
  jax.nn.softmax fails this on XLA:CPU (52 of 1024 outputs differed for 1 vs
  2 tokens); see model.row_max."""
  from specdec_jax.model import attend, rms_norm, row_max, row_softmax, row_sum
  rng = np.random.default_rng(1)
  S, H = 512, 256
  keys = jnp.asarray(rng.standard_normal((1, 1, S, H)), jnp.float32)
  vals = jnp.asarray(rng.standard_normal((1, 1, S, H)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((1, 9, 4, H)) * 0.1, jnp.float32)
  kp = jnp.arange(S, dtype=jnp.int32)[None]
  f = jax.jit(lambda q, qp: attend(q, keys, vals, qp, kp, 512))
  x = jnp.asarray(rng.standard_normal((1, 9, 640)) * 3, jnp.float32)
  scale = jnp.asarray(rng.standard_normal(640), jnp.float32)
  norm = jax.jit(lambda x: rms_norm(x, scale, 1e-6))
  first_att = first_norm = None
  for T in [1, 2, 3, 5, 9]:
    att = np.asarray(f(q[:, :T], (100 + jnp.arange(T, dtype=jnp.int32))[None]))[0, 0]
    nrm = np.asarray(norm(x[:, :T]))[0, 0]
    if first_att is None:
      first_att, first_norm = att, nrm
    np.testing.assert_array_equal(att, first_att, err_msg=f'T={T}')
    np.testing.assert_array_equal(nrm, first_norm, err_msg=f'T={T}')
  # a local layer's window cut out of a longer cache (model.SPAN_PAD)
  from specdec_jax.model import visible_slots
  S2 = 2048
  keys2 = jnp.asarray(rng.standard_normal((1, 1, S2, H)), jnp.float32)
  vals2 = jnp.asarray(rng.standard_normal((1, 1, S2, H)), jnp.float32)

  def local(q, qp):
    k, v, kpos = visible_slots(keys2, vals2, qp, 512)
    return attend(q, k, v, qp, kpos, 512)
  g = jax.jit(local)
  first = None
  for T in [1, 2, 5, 9]:
    out = np.asarray(g(q[:, :T], (700 + jnp.arange(T, dtype=jnp.int32))[None]))[0, 0]
    first = out if first is None else first
    np.testing.assert_array_equal(out, first, err_msg=f'window cut, T={T}')
  # and they are the sums, maxima and softmax they stand for
  y = jnp.asarray(rng.standard_normal((3, 7, 300)), jnp.float32)
  np.testing.assert_allclose(row_sum(y), y.sum(-1, keepdims=True), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(row_max(y), y.max(-1, keepdims=True))
  np.testing.assert_allclose(row_softmax(y), jax.nn.softmax(y, -1), rtol=1e-5, atol=1e-7)


def test_a_long_query_block_takes_the_value_product_as_one_dot(monkeypatch):
  """From DOT_PRODUCT_MIN_TOKENS queries on, attend multiplies probabilities
  by values with a dot: the same values as the sum over slots within float32
  rounding, and under autodiff no [TG, S, H] product held in memory (the sum's
  form, the negative control, holds one: 64 MB here)."""
  from specdec_jax import model
  rng = np.random.default_rng(2)
  B, T, N, H, S = 1, model.DOT_PRODUCT_MIN_TOKENS, 4, 256, 256
  q = jnp.asarray(rng.standard_normal((B, T, N, H)) * 0.1, jnp.float32)
  kv = [jnp.asarray(rng.standard_normal((B, 1, S, H)), jnp.float32) for _ in range(2)]
  qp = jnp.asarray(100 + np.arange(T), jnp.int32)[None]
  kp = jnp.arange(S, dtype=jnp.int32)[None]

  def grad_temp_bytes():
    f = lambda q, v: jnp.sum(model.attend(q, kv[0], v, qp, kp, None, strict=True) ** 2)
    return jax.jit(jax.grad(f, argnums=(0, 1))).lower(q, kv[1]).compile(
        ).memory_analysis().temp_size_in_bytes

  dot_out = model.attend(q, kv[0], kv[1], qp, kp, None, strict=True)
  dot_bytes = grad_temp_bytes()
  monkeypatch.setattr(model, 'DOT_PRODUCT_MIN_TOKENS', 10 ** 9)
  sum_out = model.attend(q, kv[0], kv[1], qp, kp, None, strict=True)
  sum_bytes = grad_temp_bytes()
  np.testing.assert_allclose(dot_out, sum_out, rtol=1e-5, atol=1e-6)
  product = T * N * S * H * 4
  assert sum_bytes >= product > 4 * dot_bytes, (sum_bytes, dot_bytes, product)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_take_rows_is_take_without_casting_the_table(dtype):
  """take_rows == jnp.take bit for bit, gradient included; in a loop over a
  bf16 table, the compiled program holds no float32 copy of the table (XLA:CPU
  gathers bf16 in float32 and hoisted that cast of the whole table)."""
  table = jax.random.normal(jax.random.key(0), (4096, 64)).astype(dtype)
  ids = jnp.array([[3, 4095, 0], [7, 7, 1]])
  np.testing.assert_array_equal(take_rows(table, ids), jnp.take(table, ids, axis=0))
  w = jax.random.normal(jax.random.key(1), (2, 3, 64))
  loss = lambda take: lambda t: jnp.sum(take(t, ids).astype(jnp.float32) * w)
  np.testing.assert_array_equal(jax.grad(loss(take_rows))(table),
                                jax.grad(loss(lambda t, i: jnp.take(t, i, axis=0)))(table))

  def loop(take):
    def body(i, acc):
      return acc + take(table, ids[:, :1] + i).astype(jnp.float32)
    return jax.jit(lambda: jax.lax.fori_loop(0, 5, body, jnp.zeros((2, 1, 64))))
  hlo = loop(take_rows).lower().compile().as_text()
  if dtype == jnp.bfloat16:
    assert 'f32[4096,64]' not in hlo
    assert 'f32[4096,64]' in loop(lambda t, i: jnp.take(t, i, axis=0)).lower().compile().as_text()
