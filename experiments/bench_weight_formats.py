"""Reduced-precision weight formats for the product that dominates a decode
step of Gemma 3 270M: the tied LM head, 262,144 x 640. Speed of each format
at 1 / 2 / 5 rows (a decode step, a padded decode step, a k = 4 verify pass),
and what it does to the real model's next-token argmax.

    python -m experiments.bench_weight_formats                # speed + real-model agreement
    python -m experiments.bench_weight_formats --agreement=false

Formats (weights stored [V, D]; activations float32 on entry):
  float32   the exact model (model.matmul's float32 form)
  bfloat16  bf16 x bf16 accumulating in float32 (model.matmul's bf16 form)
  float16   the same with float16 operands
  int8_w    int8 weights, one float32 scale per vocabulary row, dequantised
            to float32 inside the jitted product (weight-only)
  int8_w8a8 int8 weights as above and the activation row quantised to int8
            on the fly (one scale per row), int8 x int8 accumulating in int32,
            both scales applied to the result

Agreement: teacher-forced over the held-out prompts' first 1,024 tokens per
domain (1,792 positions, as tests/test_gemma_parity.py counts), the body in
bfloat16 as `param_dtype=auto` runs it here, each format's head against the
float32 model's logits. The precision issue's bar is 99% agreement.
"""
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

_AGREEMENT = flags.DEFINE_bool('agreement', True, 'also measure argmax agreement on the real model')
_REPEATS = flags.DEFINE_integer('repeats', 9, 'timed calls per format and row count (median)')

V, D = 262_144, 640
FORMATS = ('float32', 'bfloat16', 'float16', 'int8_w', 'int8_w8a8')


def prepare(w: jnp.ndarray, fmt: str):
  """The stored form of a float32 [V, D] weight in `fmt`: a tuple of arrays."""
  if fmt in ('float32', 'bfloat16', 'float16'):
    return (w.astype(fmt),)
  scale = jnp.max(jnp.abs(w), axis=1) / 127.0                            # [V]
  return jnp.round(w / scale[:, None]).astype(jnp.int8), scale


def head(x: jnp.ndarray, stored, fmt: str) -> jnp.ndarray:
  """x [R, D] float32 times the stored [V, D] weight -> [R, V] float32.
  Reduced-precision forms pad one row to two, as model.matmul does on CPU
  (XLA:CPU's one-row bf16 / int8 products are ~10x slower than two rows)."""
  from specdec_jax.model import matmul
  if fmt == 'float32':
    return matmul(x, stored[0])
  R = x.shape[0]
  xp = jnp.concatenate([x, x]) if R == 1 else x
  if fmt in ('bfloat16', 'float16'):
    out = jnp.einsum('RD,VD->RV', xp.astype(fmt), stored[0], preferred_element_type=jnp.float32)
  elif fmt == 'int8_w':
    w8, scale = stored
    out = jnp.einsum('RD,VD->RV', xp, w8.astype(jnp.float32)) * scale
  else:
    w8, scale = stored
    xs = jnp.max(jnp.abs(xp), axis=1, keepdims=True) / 127.0              # [R', 1]
    xq = jnp.round(xp / xs).astype(jnp.int8)
    acc = lax.dot_general(xq, w8, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    out = acc.astype(jnp.float32) * xs * scale
  return out[:R]


def speed(repeats: int) -> dict:
  """Median ms of each format's head at 1 / 2 / 5 rows, formats interleaved."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((V, D), np.float32) * 0.02)
  stored = {f: prepare(w, f) for f in FORMATS}
  fns = {f: jax.jit(lambda x, s, f=f: head(x, s, f)) for f in FORMATS}
  out = {}
  for rows in (1, 2, 5):
    x = jnp.asarray(rng.standard_normal((rows, D), np.float32))
    for f in FORMATS:
      jax.block_until_ready(fns[f](x, stored[f]))
    times = {f: [] for f in FORMATS}
    for _ in range(repeats):
      for f in FORMATS:
        t = time.perf_counter()
        jax.block_until_ready(fns[f](x, stored[f]))
        times[f].append(time.perf_counter() - t)
    out[rows] = {f: round(1e3 * statistics.median(times[f]), 2) for f in FORMATS}
    print(f'{rows} row(s), median ms: ' + ', '.join(f'{f} {out[rows][f]}' for f in FORMATS),
          flush=True)
  return out


def agreement() -> dict:
  """Argmax agreement of each format's head (on the bf16 body's hidden state)
  with the float32 model, and the largest |logit diff|."""
  from specdec_jax import model as model_lib
  from specdec_jax import sweep
  from specdec_jax.targets import load_target
  f32 = load_target('gemma3_270m', param_dtype='float32')
  bf16 = load_target('gemma3_270m', param_dtype='bfloat16')
  seqs = []
  for domain in ('prose', 'code', 'chat'):
    flat = [t for p in sweep.load_prompts(sweep.PROMPT_DIR, domain, f32.tokenizer, 40, 0)
            for t in p]
    seqs += [flat[i:i + 256] for i in range(0, min(len(flat), 1024) - 255, 256)]

  def body(target):
    module = model_lib.build(target.config)
    return jax.jit(lambda p, t: module.apply({'params': p}, t, compute_logits=False)[1][0])

  body_f32, body_bf16 = body(f32), body(bf16)
  emb = f32.params['embedding']
  stored = {f: prepare(emb, f) for f in FORMATS}
  heads = {f: jax.jit(lambda h, s, f=f: head(h, s, f)) for f in FORMATS}
  same = dict.fromkeys(FORMATS, 0)
  worst = dict.fromkeys(FORMATS, 0.0)
  total = 0
  for seq in seqs:
    tokens = jnp.array([seq])
    ref = np.asarray(heads['float32'](body_f32(f32.params, tokens), stored['float32']))
    hid = body_bf16(bf16.params, tokens)
    total += ref.shape[0]
    for f in FORMATS:
      got = np.asarray(heads[f](hid, stored[f]))
      same[f] += int((got.argmax(-1) == ref.argmax(-1)).sum())
      worst[f] = max(worst[f], float(np.abs(got - ref).max()))
  out = {f: {'agree': round(same[f] / total, 4), 'max_abs_logit_diff': round(worst[f], 3)}
         for f in FORMATS}
  for f in FORMATS:
    print(f'{f}: argmax equal to float32 at {same[f]} / {total} '
          f'({out[f]["agree"]:.2%}), max |logit diff| {out[f]["max_abs_logit_diff"]}', flush=True)
  return out


def main(argv):
  del argv
  from specdec_jax.precision import cpu_info
  print(f'CPU: {cpu_info()[0]}; jax {jax.__version__}')
  speed(_REPEATS.value)
  if _AGREEMENT.value:
    agreement()


if __name__ == '__main__':
  app.run(main)
