"""Token samplers: sampling.sample (jax.random.categorical, the Gumbel trick:
a random number and a log per id) against sampling.inverse_cdf (one uniform
per row), over Gemma's 262,144 ids, batch 1 and 8, interleaved medians.

    python -m experiments.bench_sampler
"""
import statistics
import time

import jax
import jax.numpy as jnp

from specdec_jax import sampling

V = 262144


def main():
  old = jax.jit(lambda keys, p: jax.vmap(jax.random.categorical)(keys, jnp.log(p)).astype(jnp.int32))
  new = jax.jit(lambda keys, p: sampling.inverse_cdf(p, jax.vmap(jax.random.uniform)(keys)))
  for B in (1, 8):
    p = jax.nn.softmax(jax.random.normal(jax.random.key(0), (B, V)) * 3, -1)
    keys = jax.random.split(jax.random.key(1), B)
    for f in (old, new):
      f(keys, p).block_until_ready()
    t = {'old': [], 'new': []}
    for _ in range(15):
      for name, f in (('old', old), ('new', new)):
        t0 = time.perf_counter(); f(keys, p).block_until_ready(); t[name].append(time.perf_counter() - t0)
    mo, mn = statistics.median(t['old']) * 1e3, statistics.median(t['new']) * 1e3
    print(f'batch {B}: categorical {mo:.2f} ms, inverse_cdf {mn:.2f} ms, ratio {mo / mn:.1f}x')


if __name__ == '__main__':
  main()
