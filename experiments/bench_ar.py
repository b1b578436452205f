"""Decode-step costs of Gemma 3 270M by weight dtype, batch and cache size;
the verify pass's cost v in decode steps, inside the decode loop.

    python -m experiments.bench_ar                    # ~20 min on this 2-core CPU
    python -m experiments.bench_ar --param_dtypes=float32 --batch_sizes=1 \
        --cache_sizes=256 --verify_lens=4 --repeats=3

For each weight dtype (`float32`, `bfloat16`: bf16 matmul operands, float32
accumulation, everything else float32), batch size and cache size, the
on-device loop (`Generator.decode`, prefill excluded, compiled first) runs
`new_tokens` AR steps, `repeats` times; the median per step is reported. A
cache of S slots is timed S - new_tokens - 8 tokens deep (the prompt's state
is moved there: what an AR step costs depends on the slots it attends to, not
on their values), so `cache=2048` means ~2000 cached tokens.

v(k): the same loop with a drafter that proposes k tokens that are never
accepted (pad ids), so every round is one verify pass over k + 1 tokens
emitting one token; v = round time / AR step time at the same batch and
cache (the drafter itself costs nothing), the two loops timed in turn. That
is the v of the Leviathan formula, measured where it is paid. Every variant
being compared (weight dtypes and caches of a batch size; AR vs verify) is
timed in turn, one run each per repeat, so drift on a shared machine hits
them alike.

Beside them: the roofline (every matmul of one step timed alone at the same
rows, summed), the LM head [262,144 x 640] at 1/2/5/9 rows in each weight
form, and one attention layer at batch 8 x 2048 slots in the five-letter
einsum form against model.attend. Ratios printed at the end compare numbers
from this one process; on a shared machine compare those, not absolute times.
"""
import dataclasses
import json
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

from specdec_jax import generate
from specdec_jax.measure import median_seconds
from specdec_jax.model import attend, matmul
from specdec_jax.precision import cpu_info
from specdec_jax.targets import load_target

_DTYPES = flags.DEFINE_list('param_dtypes', ['float32', 'bfloat16'], 'Weight dtypes.')
_BATCH = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Batch sizes.')
_CACHE = flags.DEFINE_list('cache_sizes', ['256', '2048'], 'Cache slots per row.')
_VLENS = flags.DEFINE_list('verify_lens', ['1', '2', '4', '8', '16'],
                           'k for v(k), at the smallest cache size.')
_NEW = flags.DEFINE_integer('new_tokens', 32, 'Loop steps per timed run.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs (median).')
_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


@dataclasses.dataclass(frozen=True)
class RejectedDrafter:
  """Proposes k pad tokens every round: each round is one verify pass."""
  draft_len: int

  def init_state(self, params, batch, cache_size):
    return ()

  def commit(self, state, lengths):
    return state

  def draft(self, params, state, tokens, lengths, keys, batch, greedy, target=None):
    return jnp.zeros((tokens.shape[0], self.draft_len), jnp.int32), None, state


def loop_timer(target, prompt, batch_size, cache_size, drafter=None):
  """A function () -> seconds per loop round (one timed run), compiled once,
  the state moved deep into the cache."""
  cfg, params = target.config, target.params
  gen = generate.Generator(cfg, cache_size=cache_size, greedy=True, drafter=drafter)
  rounds = _NEW.value
  batch = generate.make_batch([prompt] * batch_size, batch_size=batch_size,
                              bucket_len=generate.bucket(len(prompt)), max_new_tokens=rounds,
                              keys=jax.random.split(jax.random.key(0), batch_size))
  shift = max(0, cache_size - rounds * (gen.draft_len + 1) - len(prompt) - 8)
  prefill = jax.jit(lambda p, b: gen.prefill(p, b))

  def deep(state):
    # Positions shift by `shift`; each round then emits exactly one token.
    return state.replace(lengths=state.lengths + shift,
                         cache=state.cache.replace(lengths=state.cache.lengths + shift),
                         batch=state.batch.replace(limits=state.lengths + shift + rounds))
  decode = gen.decode.lower(gen, params, deep(prefill(params, batch))).compile()

  def timed():
    state = deep(jax.block_until_ready(prefill(params, batch)))
    t = time.perf_counter()
    out = jax.block_until_ready(decode(params, state))
    seconds = time.perf_counter() - t
    assert int(out.step) == rounds, (int(out.step), rounds)
    return seconds / rounds
  timed()                                                   # warm-up
  return timed


def interleaved(timers):
  """{name: median seconds} over `repeats` rounds of one run per timer, in
  turn: on a shared machine, drift hits every variant alike."""
  times = {name: [] for name in timers}
  for _ in range(_REPEATS.value):
    for name, fn in timers.items():
      times[name].append(fn())
  return {name: statistics.median(t) for name, t in times.items()}


def roofline_step_seconds(params, cfg, rows):
  """Sum of the isolated matmul times of one decode step with `rows` rows."""
  mm = jax.jit(matmul)
  total = 0.0
  layer = params['layer_0']
  for w in (layer['attn']['qkv'], layer['attn']['out'], layer['mlp']['gate_up'],
            layer['mlp']['down']):
    x = jnp.ones((rows, w.shape[1]), jnp.float32)
    total += cfg.num_layers * median_seconds(mm, x, w, repeats=20)
  h = jnp.ones((rows, cfg.embed_dim), jnp.float32)
  return total + median_seconds(mm, h, params['embedding'], repeats=20)


def head_forms(embedding_f32):
  """ms of the LM head by row count, the forms timed in turn (median of 15):
  float32 (w @ x^T), bf16 as model.matmul runs it (x @ w^T, f32
  accumulation, one row padded to two), bf16 in the other order (one row
  not padded)."""
  e16 = embedding_f32.astype(jnp.bfloat16)
  bf16_wx = jax.jit(lambda x, w: jnp.einsum('OI,RI->RO', w, x.astype(w.dtype),
                                            preferred_element_type=jnp.float32))
  ours = jax.jit(matmul)
  out = {}
  for rows in (1, 2, 5, 9):
    h = jnp.ones((rows, embedding_f32.shape[1]), jnp.float32)
    forms = {'float32': lambda: ours(h, embedding_f32), 'bfloat16 (ours)': lambda: ours(h, e16),
             'bfloat16 w@x^T': lambda: bf16_wx(h, e16)}
    times = {name: [] for name in forms}
    for f in forms.values():
      jax.block_until_ready(f())
    for _ in range(15):
      for name, f in forms.items():
        t = time.perf_counter()
        jax.block_until_ready(f())
        times[name].append(time.perf_counter() - t)
    out[rows] = {name: round(statistics.median(t) * 1e3, 1) for name, t in times.items()}
  return out


def attention_forms(batch=8, slots=2048, T=1, K=1, G=4, H=256):
  """ms of one layer's attention over a full cache: einsums vs model.attend."""
  r = lambda i, *s: jax.random.normal(jax.random.key(i), s)
  q, keys, values = r(1, batch, T, K * G, H), r(2, batch, K, slots, H), r(3, batch, K, slots, H)
  q_pos = jnp.full((batch, T), slots - T) + jnp.arange(T)
  k_pos = jnp.broadcast_to(jnp.arange(slots), (batch, slots))

  def einsums(q, keys, values, q_pos, k_pos):
    qq = q.reshape(batch, T, K, G, H).transpose(0, 2, 3, 1, 4)
    s = jnp.einsum('BKGTH,BKSH->BKGTS', qq, keys)
    s = jnp.where((k_pos[:, None, :] <= q_pos[:, :, None])[:, None, None], s, -1e30)
    return jnp.einsum('BKGTS,BKSH->BTKGH', jax.nn.softmax(s, -1), values)
  ours = jax.jit(lambda *a: attend(*a, window=None))
  args = (q, keys, values, q_pos, k_pos)
  return {'einsums_ms': round(median_seconds(jax.jit(einsums), *args, repeats=10) * 1e3, 2),
          'attend_ms': round(median_seconds(ours, *args, repeats=10) * 1e3, 2),
          'shape': f'batch {batch} x {slots} slots, T={T}, K={K}, G={G}, H={H}'}


def main(_):
  cpu, flags_ = cpu_info()
  print(json.dumps({'cpu': cpu, 'bf16_instructions': sorted(
      {'avx512_bf16', 'amx_bf16'} & set(flags_)), 'backend': jax.default_backend()}), flush=True)
  targets = {pd: load_target('gemma3_270m', param_dtype=pd) for pd in _DTYPES.value}
  prompt = next(iter(targets.values())).tokenizer.encode(_PROMPT)
  rows, v_rows = [], []
  caches = sorted(map(int, _CACHE.value))
  for b in map(int, _BATCH.value):
    # Every (weight dtype, cache) of this batch size timed in turn.
    timers = {(pd, s): loop_timer(t, prompt, b, s) for pd, t in targets.items() for s in caches}
    steps = interleaved(timers)
    for (pd, s), step in steps.items():
      roof = roofline_step_seconds(targets[pd].params, targets[pd].config, b)
      rows.append(dict(param_dtype=pd, batch=b, cache=s, ms_per_step=round(step * 1e3, 2),
                       tokens_per_second=round(b / step, 2),
                       roofline_ms=round(roof * 1e3, 2), of_roofline=round(roof / step, 2)))
      print(json.dumps(rows[-1]), flush=True)
    for k in map(int, _VLENS.value):
      # v(k): the verify loop next to the AR loop, in turn, per weight dtype.
      for pd, t in targets.items():
        got = interleaved({'ar': timers[pd, caches[0]],
                           'verify': loop_timer(t, prompt, b, caches[0], RejectedDrafter(k))})
        v_rows.append(dict(param_dtype=pd, batch=b, cache=caches[0], k=k,
                           v=round(got['verify'] / got['ar'], 3)))
        print(json.dumps(v_rows[-1]), flush=True)
  f32_embedding = targets['float32'].params['embedding'] if 'float32' in targets else None
  if f32_embedding is not None:
    print(json.dumps({'lm_head_ms_by_rows': head_forms(f32_embedding)}), flush=True)
  print(json.dumps({'attention_one_layer': attention_forms()}), flush=True)

  print('\n| weights | batch | cache | ms/step | tok/s | roofline ms | of roofline |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['param_dtype']} | {r['batch']} | {r['cache']} | {r['ms_per_step']} | "
          f"{r['tokens_per_second']} | {r['roofline_ms']} | {r['of_roofline']:.0%} |")
  if v_rows:
    print('\n| weights | batch | ' + ' | '.join(f'v(k={k})' for k in _VLENS.value) + ' |')
    print('|---|---|' + '---|' * len(_VLENS.value))
    for pd in _DTYPES.value:
      for b in map(int, _BATCH.value):
        vs = [r['v'] for r in v_rows if r['param_dtype'] == pd and r['batch'] == b]
        print(f'| {pd} | {b} | ' + ' | '.join(map(str, vs)) + ' |')
  tps = {(r['param_dtype'], r['batch'], r['cache']): r['tokens_per_second'] for r in rows}
  ratios = {}
  for (pd, b, s), t in tps.items():
    if pd != 'float32' and ('float32', b, s) in tps:
      ratios[f'{pd}/float32 tok/s, batch {b}, cache {s}'] = round(t / tps['float32', b, s], 2)
    if s == caches[-1] and len(caches) > 1:
      ratios[f'step at cache {s} / cache {caches[0]}, {pd}, batch {b}'] = round(
          tps[pd, b, caches[0]] / t, 2)
    if b != 1 and (pd, 1, s) in tps:
      ratios[f'batch {b} / batch 1 tok/s, {pd}, cache {s}'] = round(t / tps[pd, 1, s], 2)
  print('\n' + json.dumps({'ratios': ratios}, indent=1))


if __name__ == '__main__':
  app.run(main)
