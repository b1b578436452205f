"""On-device autoregressive generation: batching, EOS, limits, recompiles."""
import chex
import jax
import jax.numpy as jnp
import pytest

from specdec_jax import drafters, generate
from specdec_jax.model import Transformer

PROMPTS = [[2, 10, 11, 12], [2, 7], [2, 20, 21, 22, 23, 24, 25, 26, 27], [2, 5, 9]]


def run(cfg, params, prompts, *, max_new=10, batch_size=None, greedy=True, seed=0,
        temperature=0.0, top_k=0, top_p=1.0, cache_size=64):
  gen = generate.Generator(cfg, cache_size=cache_size, greedy=greedy)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(
      jnp.arange(len(prompts)))
  batch = generate.make_batch(prompts, batch_size=batch_size or len(prompts), bucket_len=16,
                              max_new_tokens=max_new, keys=keys, temperature=temperature,
                              top_k=top_k, top_p=top_p)
  return generate.completions(gen.generate(params, batch), cfg.eos_id)


def reference_greedy(cfg, params, prompt, n):
  """Greedy by full forward passes, no cache: the slow, obvious way."""
  fwd = jax.jit(lambda p, x: Transformer(cfg).apply({'params': p}, x)[0])
  ids = list(prompt)
  for _ in range(n):
    ids.append(int(jnp.argmax(fwd(params, jnp.array([ids]))[0, -1])))
  return ids[len(prompt):]


def test_greedy_equals_uncached_reference(tiny):
  cfg, params = tiny
  for prompt, row in zip(PROMPTS[:2], run(cfg, params, PROMPTS[:2])):
    assert row['completion_ids'] == reference_greedy(cfg, params, prompt, 10)


@pytest.mark.parametrize('sampled', [False, True])
def test_ragged_batch_rows_equal_solo_runs(tiny, sampled):
  cfg, params = tiny
  kw = dict(greedy=not sampled, temperature=1.0 if sampled else 0.0)
  batched = run(cfg, params, PROMPTS, batch_size=6, **kw)    # 2 padding rows too
  for i, prompt in enumerate(PROMPTS):
    # Solo: same per-row key as row i of the batch (fold_in(seed, i)).
    gen = generate.Generator(cfg, cache_size=64, greedy=not sampled)
    key = jax.random.fold_in(jax.random.key(0), i)[None]
    batch = generate.make_batch([prompt], batch_size=1, bucket_len=16, max_new_tokens=10,
                                keys=key, temperature=kw['temperature'])
    solo = generate.completions(gen.generate(params, batch), cfg.eos_id)[0]
    assert batched[i]['completion_ids'] == solo['completion_ids']
    assert batched[i]['new_tokens'] == 10


def test_sampling_depends_on_seed_and_not_on_greedy(tiny):
  cfg, params = tiny
  a = run(cfg, params, PROMPTS, greedy=False, temperature=1.0, seed=0, max_new=20)
  b = run(cfg, params, PROMPTS, greedy=False, temperature=1.0, seed=1, max_new=20)
  g = run(cfg, params, PROMPTS, max_new=20)
  assert [r['completion_ids'] for r in a] != [r['completion_ids'] for r in b]
  assert [r['completion_ids'] for r in a] != [r['completion_ids'] for r in g]
  # temperature 0 rows in a sampling generator are greedy.
  z = run(cfg, params, PROMPTS, greedy=False, temperature=0.0, max_new=20)
  assert [r['completion_ids'] for r in z] == [r['completion_ids'] for r in g]


def test_eos_ends_only_its_row(tiny):
  cfg, params = tiny
  free = run(cfg, params, PROMPTS, max_new=12)
  eos = free[0]['completion_ids'][3]          # make row 0's 4th token the EOS
  first = free[0]['completion_ids'].index(eos)
  rows = run(cfg.replace(eos_id=eos), params, PROMPTS, max_new=12)
  assert rows[0]['finish_reason'] == 'eos'
  assert rows[0]['completion_ids'] == free[0]['completion_ids'][:first]
  assert rows[0]['new_tokens'] == first + 1 and rows[0]['target_calls'] == first + 1
  for r, f in zip(rows[1:], free[1:]):   # every other row: cut at its own first EOS, if any
    ids = f['completion_ids']
    cut = ids.index(eos) if eos in ids else len(ids)
    assert r['completion_ids'] == ids[:cut]
    assert r['finish_reason'] == ('eos' if eos in ids else 'length')
    assert r['new_tokens'] == min(cut + 1, 12)


def test_max_new_tokens_is_exact(tiny):
  cfg, params = tiny
  for n in (1, 7):
    for r in run(cfg, params, PROMPTS, max_new=n):
      assert r['new_tokens'] == n and len(r['completion_ids']) == n


def test_python_stepper_equals_while_loop(tiny):
  cfg, params = tiny
  gen = generate.Generator(cfg, cache_size=64, greedy=True)
  batch = generate.make_batch(PROMPTS, batch_size=4, bucket_len=16, max_new_tokens=6,
                              keys=jax.random.split(jax.random.key(0), 4))
  state = gen.prefill(params, batch)
  while not bool(jnp.all(state.done)):
    state = gen.step(params, state)
  stepped = generate.completions(state, cfg.eos_id)
  assert stepped == run(cfg, params, PROMPTS, max_new=6)


def test_no_recompile_within_a_bucket_or_for_new_settings(tiny):
  """Three batches (new prompt lengths within a bucket, new temperature /
  top-k / top-p, new limits): one trace of the whole generation, and exactly
  one compile of each jitted method per generator. cache_size=40 is used by
  no other test, so an earlier test cannot have compiled these programs
  already (which would hide one recompile per method)."""
  cfg, params = tiny
  gen = generate.Generator(cfg, cache_size=40, greedy=False)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def generate_fn(params, batch):
    return gen.decode(params, gen.prefill(params, batch)).tokens

  methods = (generate.Generator.prefill, generate.Generator.decode)
  sizes = [m._cache_size() for m in methods]
  for prompt, t, k, p, n in [([2, 3], 1.0, 0, 1.0, 5), ([2, 3, 4, 5, 6, 7], 0.7, 5, 0.9, 9),
                             ([2] * 16, 0.0, 0, 1.0, 3)]:
    batch = generate.make_batch([prompt, [2, 9]], batch_size=2, bucket_len=16, max_new_tokens=n,
                                keys=jax.random.split(jax.random.key(n), 2),
                                temperature=t, top_k=k, top_p=p)
    generate_fn(params, batch)
    # The jitted methods too, with a fresh but equal Generator each time,
    # plain and speculative: two programs per method in all.
    generate.Generator(cfg, cache_size=40, greedy=False).generate(params, batch)
    generate.Generator(cfg, cache_size=40, greedy=False,
                       drafter=drafters.NgramDrafter(3, cfg.vocab_size)).generate(params, batch)
  assert [m._cache_size() - s for m, s in zip(methods, sizes)] == [2, 2], sizes
