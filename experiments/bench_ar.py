"""Autoregressive decode throughput on Gemma 3 270M next to a matmul roofline.

    python -m experiments.bench_ar                     # ~3 min on this 2-core CPU
    python -m experiments.bench_ar --batch_sizes=1 --new_tokens=32 --repeats=3

For each batch size: compiles first (reported separately), then times the
on-device decode loop (prefill excluded) over `repeats` runs and reports the
median. The roofline is what the weights alone cost: every matmul of one
decode step (qkv, out, gate_up, down per layer; the LM head), each timed in
isolation at the same number of rows, median of 20, summed. It also times the
LM head at several rows as a plain einsum and as model.lm_head, and jnp.argmax
against sampling.argmax over the vocabulary at 1 and 5 rows.
All numbers come from one process; on a shared machine compare the ratios.
"""
import json
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from specdec_jax import generate, sampling
from specdec_jax.measure import median_seconds
from specdec_jax.model import linear, lm_head
from specdec_jax.targets import load_target

_BATCH = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Batch sizes to time.')
_NEW = flags.DEFINE_integer('new_tokens', 64, 'Tokens generated per row per run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per batch size (median).')
_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def roofline_step_seconds(params, cfg, rows):
  """Sum of the isolated matmul times of one decode step with `rows` rows."""
  mm = jax.jit(linear)
  total = 0.0
  layer = params['layer_0']
  for w in (layer['attn']['qkv'], layer['attn']['out'], layer['mlp']['gate_up'],
            layer['mlp']['down']):
    x = jnp.ones((rows, w.shape[1]), w.dtype)
    total += cfg.num_layers * median_seconds(mm, x, w, repeats=20)
  h = jnp.ones((rows, cfg.embed_dim), jnp.float32)
  return total + median_seconds(jax.jit(lm_head), h, params['embedding'], repeats=20)


def main(_):
  target = load_target('gemma3_270m')
  cfg, params = target.config, target.params
  prompt = target.tokenizer.encode(_PROMPT)
  results = []
  for b in map(int, _BATCH.value):
    gen = generate.Generator(cfg, cache_size=256, greedy=True)
    batch = generate.make_batch([prompt] * b, batch_size=b, bucket_len=generate.bucket(len(prompt)),
                                max_new_tokens=_NEW.value,
                                keys=jax.random.split(jax.random.key(0), b))
    t = time.perf_counter()
    prefill = gen.prefill.lower(gen, params, batch).compile()
    state = prefill(params, batch)
    decode = gen.decode.lower(gen, params, state).compile()
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(_REPEATS.value):
      state = jax.block_until_ready(prefill(params, batch))
      t = time.perf_counter()
      jax.block_until_ready(decode(params, state))
      times.append(time.perf_counter() - t)
    step = statistics.median(times) / _NEW.value
    roof = roofline_step_seconds(params, cfg, b)
    results.append(dict(batch=b, tokens_per_second=round(b / step, 2),
                        ms_per_step=round(step * 1e3, 2),
                        roofline_tokens_per_second=round(b / roof, 2),
                        roofline_ms_per_step=round(roof * 1e3, 2),
                        fraction_of_roofline=round(roof / step, 3),
                        compile_seconds=round(compile_s, 2)))
    print(json.dumps(results[-1]), flush=True)
  head = {}
  for rows in (1, 2, 5, 8):
    h = jnp.ones((rows, cfg.embed_dim), jnp.float32)
    plain = median_seconds(jax.jit(lambda h, e: jnp.einsum('RD,VD->RV', h, e)), h, params['embedding'],
                           repeats=20)
    ours = median_seconds(jax.jit(lm_head), h, params['embedding'], repeats=20)
    head[rows] = dict(einsum_ms=round(plain * 1e3, 1), lm_head_ms=round(ours * 1e3, 1),
                      ratio=round(plain / ours, 2))
  print(json.dumps({'lm_head_by_rows': head}))
  argmax = {}
  for rows in (1, 5):
    x = jax.random.normal(jax.random.key(0), (rows, cfg.vocab_size))
    plain = median_seconds(jax.jit(lambda x: jnp.argmax(x, axis=-1)), x, repeats=20)
    ours = median_seconds(jax.jit(sampling.argmax), x, repeats=20)
    argmax[rows] = dict(jnp_argmax_ms=round(plain * 1e3, 2), ours_ms=round(ours * 1e3, 2))
  print(json.dumps({'argmax_by_rows': argmax}))
  print('\n| batch | tok/s | ms/step | roofline tok/s | of roofline |\n|---|---|---|---|---|')
  for r in results:
    print(f"| {r['batch']} | {r['tokens_per_second']} | {r['ms_per_step']} | "
          f"{r['roofline_tokens_per_second']} | {r['fraction_of_roofline']:.0%} |")


if __name__ == '__main__':
  app.run(main)
