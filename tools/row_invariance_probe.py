"""Does a query row round alike alone and among other rows, on this machine?

    python tools/row_invariance_probe.py

Greedy speculative decoding equals plain greedy decoding bit for bit only if
each product gives a row the same bits whether it is computed alone (a plain
step) or among the k + 1 rows of a verify pass. That is a property of
XLA:CPU's kernels on a given CPU, not of the code. This prints, for the
products the model runs, the row counts at which row 0 differs from the
row count a plain step uses:

  matmul     model.matmul, float32 and bf16 weights, Gemma 3 270M shapes:
             row 0 of R rows vs 1 row (a plain step; bf16 pads it to 2)
  attend     model.attend (scores, softmax, the probabilities x values
             product) with G = 4 query rows per token: token 0 of T tokens
             vs T = 1

Seen (2026-11-28) on an AMD EPYC Zen 3 (AVX2, no AVX512_BF16): float32
matmul differs at every R >= 2 (1 row takes another kernel; 2..64 rows agree
with each other), bf16 none; attend, with the values-left dot product of
sessions 9-13, at T >= 3 (one product over all 4T rows changed kernel at 12+
rows), with the sum over slots of session 14 at none. value_sum_blocks: the
slots where that sum starts a block ([256, 512] for 600 slots x 256, [512]
for 1024 x 64, none for 32 x 16).
"""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from specdec_jax.model import attend, matmul  # noqa: E402


def cpu_name() -> str:
  try:
    info = dict(l.split(':', 1) for l in open('/proc/cpuinfo').read().split('\n\n')[0].splitlines()
                if ':' in l)
  except OSError:
    return 'unknown'
  info = {k.strip(): v.strip() for k, v in info.items()}
  return (f"{info.get('model name', '?')}, family {info.get('cpu family', '?')} "
          f"model {info.get('model', '?')}")


def main():
  rng = np.random.default_rng(0)
  rows = [2, 3, 4, 5, 8, 9, 16, 17, 32]
  out = dict(cpu=cpu_name(), bf16_instructions=' avx512_bf16' in open('/proc/cpuinfo').read(),
             matmul={}, attend={})
  for dtype in ('float32', 'bfloat16'):
    for O, I in ((2048, 640), (640, 2048), (1024, 640)):
      w = jnp.asarray(rng.standard_normal((O, I)) / 30, dtype)
      x = jnp.asarray(rng.standard_normal((32, I)), jnp.float32)
      f = jax.jit(lambda x, w=w: matmul(x, w))
      ref = np.asarray(f(x[:1]))[0]
      out['matmul'][f'{dtype} {O}x{I}'] = [r for r in rows
                                          if (np.asarray(f(x[:r]))[0] != ref).any()]
  S, H = 512, 256
  keys = jnp.asarray(rng.standard_normal((1, 1, S, H)), jnp.float32)
  vals = jnp.asarray(rng.standard_normal((1, 1, S, H)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((1, 9, 4, H)) * 0.1, jnp.float32)
  kp = jnp.arange(S, dtype=jnp.int32)[None]
  f = jax.jit(lambda q, qp: attend(q, keys, vals, qp, kp, 512))
  at = lambda T: np.asarray(f(q[:, :T], (100 + jnp.arange(T, dtype=jnp.int32))[None]))[0, 0]
  ref = at(1)
  out['attend'][f'cache {S}, tokens'] = [T for T in range(2, 10) if (at(T) != ref).any()]
  out['value_sum_blocks'] = {f'{S} slots x {H}': value_sum_blocks(S, H)
                             for S, H in ((600, 256), (1024, 64), (32, 16))}
  print(json.dumps(out))


def value_sum_blocks(S: int, H: int):
  """The slots at which attend's sum over slots starts a new block (block
  partials added afterwards, so a term's column matters; model.attend moves
  a tree node into its chain's columns for this). Terms 1 at slot 0 and
  2^-24 at slots c, c + 1 sum to 1 when added slot by slot and to 1 + 2^-23
  when c, c + 1 fall in another block than slot 0."""
  f = jax.jit(lambda p, v: jnp.sum(p[..., None] * v[:, :, None], axis=-2))
  p = np.zeros((S - 2, 1, 4, S), np.float32)
  for c in range(1, S - 1):
    p[c - 1, 0, :, 0], p[c - 1, 0, :, c:c + 2] = 1.0, 2.0 ** -24
  apart = np.asarray(f(jnp.asarray(p), jnp.ones((S - 2, 1, S, H), jnp.float32)))[:, 0, 0, 0] != 1
  return [c for c in range(1, S - 1) if apart[c - 1] and (c == 1 or not apart[c - 2])]


if __name__ == '__main__':
  main()
