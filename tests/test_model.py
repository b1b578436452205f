"""Cached decoding equals one full forward pass; rollback is a length reset."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax.model import KVCache, Transformer


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
