"""pmap over 8 fake CPU devices and the mesh path give the single-device tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import drafters, generate, parallel, policy
from specdec_jax.errors import UserError
from specdec_jax.model import cast_params, init_params

PROMPTS = [[2, 10, 11, 12], [2, 7], [2, 20, 21, 22, 23, 24, 25, 26, 27], [2, 5, 9],
           [2, 3, 3], [2, 4, 4, 4], [2, 30], [2, 31, 32]]


def _batch(temperature):
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(8))
  return generate.make_batch(PROMPTS, batch_size=8, bucket_len=16, max_new_tokens=13,
                             keys=keys, temperature=temperature)


# Three cases cover plain AR, greedy speculative (stateless drafter) and
# sampled speculative with a drafter that keeps its own sharded cache; the
# full 2 x 3 product cost CI ~2.5 more minutes for no new code path. The
# sampled drafter is another random model, so drafts are rejected and the
# residual is sampled under pmap and the mesh too (the target drafting for
# itself would accept every draft and never reach that code).
# The last case repeats the rejecting draft_model with bf16 weights (the
# mesh shards bf16 matrices; the exactness argument is the same).
# 'dynamic': the rejecting draft_model under the dynamic draft-length policy
# (policy.py): rows plan and offer from their own history, so one row per
# device gives the batch's tokens and call counts.
@pytest.mark.parametrize('temperature, drafter_kind, param_dtype',
                         [(1.0, 'none', 'float32'), (0.0, 'ngram', 'float32'),
                          (1.0, 'draft_model', 'float32'), (1.0, 'draft_model', 'bfloat16'),
                          (1.0, 'dynamic', 'float32')])
def test_pmap_and_mesh_equal_single_device(tiny, drafter_kind, temperature, param_dtype):
  assert jax.device_count() == 8, 'conftest sets 8 fake CPU devices'
  cfg, params = tiny
  pol = knobs = None
  if drafter_kind == 'dynamic':
    drafter_kind = 'draft_model'
    # Three choices (a plain step, 1 or 3 drafts) keep plans and offers that
    # differ across a batch; each one is a branch of every compile (0, 1, 2, 3
    # cost ~9 s more on 2 CPU cores for no new code path).
    pol = policy.DraftPolicy((0, 1, 3))
    knobs = policy.PolicyParams.make([1.0, 1.25, 1.7], threshold=0.1)
  cfg = cfg.replace(param_dtype=param_dtype)
  params = cast_params(params, param_dtype)
  k = 3
  drafter, dparams = {
      'none': (None, None),
      'ngram': (drafters.NgramDrafter(k, cfg.vocab_size), None),
      'draft_model': (drafters.DraftModelDrafter(cfg, k),
                      cast_params(init_params(cfg, jax.random.key(7)), param_dtype)),
  }[drafter_kind]
  gen = generate.Generator(cfg, cache_size=64, greedy=temperature == 0, drafter=drafter,
                           policy=pol)
  batch = _batch(temperature)
  want = generate.completions(gen.generate(params, batch, dparams, knobs), cfg.eos_id)
  if drafter_kind == 'draft_model' and pol is None:
    # Drafts accepted and rejected: tokens per target call well between 1
    # (nothing accepted) and 13 / 4 = 3.25 (everything accepted: 13 new
    # tokens in ceil(13 / (k + 1)) calls), and the first draft rejected in
    # some round of most rows.
    per_call = sum(w['new_tokens'] for w in want) / sum(w['target_calls'] for w in want)
    accepted = np.array([w['accepted_by_position'] for w in want])
    calls = np.array([w['draft_calls'] for w in want])
    assert 1.2 < per_call < 3, per_call
    assert (accepted[:, 0] < calls).sum() >= 6, (accepted, calls)
  # mesh with batch 8: data=8; with a batch of 2 rows per call: data=2, model=4.
  # Every mode for plain decoding; the drafter cases skip mesh data=8 (what it
  # adds over pmap is the mesh program, which mesh data=2 x model=4 also runs):
  # each mode is a compile, and the suite has a time budget.
  modes = [('pmap', 8), ('mesh', 8), ('mesh', 2)] if drafter_kind == 'none' else [
      ('pmap', 8), ('mesh', 2)]
  for mode, batch_size in modes:
    runner = parallel.make_runner(gen, params, dparams, mode=mode, num_devices=8,
                                  batch_size=batch_size, policy_params=knobs)
    if batch_size == 8:
      got = generate.completions(runner.compile(batch)(batch), cfg.eos_id)
    else:
      got = []
      for start in range(0, 8, 2):
        sub = jax.tree.map(lambda x: x[start:start + 2], batch)
        got += generate.completions(runner.compile(sub)(sub), cfg.eos_id)
    assert [g['completion_ids'] for g in got] == [w['completion_ids'] for w in want], runner.mode
    assert [g['target_calls'] for g in got] == [w['target_calls'] for w in want], runner.mode
    assert [g['accepted_by_position'] for g in got] == [
        w['accepted_by_position'] for w in want], runner.mode
    assert runner.num_devices == 8, runner.mode


def test_param_sharding_splits_the_big_matrices(tiny):
  cfg, params = tiny
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
  shardings = parallel.param_sharding(params, mesh)
  assert shardings['embedding'].spec == jax.sharding.PartitionSpec('model', None)
  assert shardings['layer_0']['mlp']['down'].spec == jax.sharding.PartitionSpec(None, 'model')
  assert shardings['layer_0']['attn']['qkv'].spec == jax.sharding.PartitionSpec('model', None)
  assert shardings['final_norm']['scale'].spec == jax.sharding.PartitionSpec()


def test_bad_device_requests(tiny):
  cfg, params = tiny
  gen = generate.Generator(cfg, cache_size=64)
  with pytest.raises(UserError, match='only 8 device'):
    parallel.make_runner(gen, params, None, mode='pmap', num_devices=16, batch_size=16)
  with pytest.raises(UserError, match='not divisible'):
    parallel.make_runner(gen, params, None, mode='pmap', num_devices=8, batch_size=6)


def test_memory_per_device(tiny, capsys):
  """Params and KV-cache bytes per device, from shapes: one device holds all;
  the mesh splits the matrices over 'model' and the cache over rows ('data')
  and KV heads ('model', when they divide); one line printed."""
  cfg, params = tiny
  gen = generate.Generator(cfg, cache_size=64)
  devs = jax.devices()
  # [B, K, S, H] float32, keys and values, every layer.
  cache = 2 * cfg.num_layers * 8 * cfg.num_kv_heads * 64 * cfg.head_dim * 4
  whole = parallel.memory_per_device(gen, params, None, 'none', devs[:1], 8)
  assert whole['cache'] == cache
  assert whole['params'] == sum(x.nbytes for x in jax.tree.leaves(params))
  assert parallel.memory_per_device(gen, params, None, 'pmap', devs, 8) == dict(
      whole, cache=cache // 8)
  # batch 4: data=4, model=2 (K = 2 heads split); batch 2: data=2, model=4
  # (K = 2 does not divide: heads whole).
  mesh4 = parallel.memory_per_device(gen, params, None, 'mesh', devs, 4)
  assert mesh4['cache'] == cache // 2 // 8
  mesh2 = parallel.memory_per_device(gen, params, None, 'mesh', devs, 2)
  assert mesh2['cache'] == cache // 4 // 2
  assert mesh2['params'] < mesh4['params'] < whole['params']
  parallel.check_memory(gen, params, None, 'mesh', devs, 4)
  line = capsys.readouterr().err.strip()
  assert line.startswith('memory per device (mesh, 8 device(s)): params ') and '\n' not in line
  assert 'host memory available, shared by 8 device(s)' in line


def test_a_run_that_cannot_fit_fails_before_compiling(tiny, monkeypatch):
  """A device limit below params + cache (SPECDEC_MEMORY_LIMIT_BYTES fakes a
  small device) -> one UserError line from make_runner, nothing compiled."""
  cfg, params = tiny
  gen = generate.Generator(cfg, cache_size=64)
  need = parallel.memory_per_device(gen, params, None, 'none', jax.devices()[:1], 8)
  monkeypatch.setenv(parallel.MEMORY_LIMIT_ENV, str(need['params'] + need['cache'] - 1))
  with pytest.raises(UserError, match=r'needs .* per device \(params .* \+ KV cache') as e:
    parallel.make_runner(gen, params, None, mode='none', num_devices=1, batch_size=8)
  assert '\n' not in str(e.value)
  # The mesh's share fits the same limit.
  runner = parallel.make_runner(gen, params, None, mode='mesh', num_devices=8, batch_size=4)
  assert runner.mode == 'mesh(data=4,model=2)'


def test_load_sharding_only_for_the_mesh():
  assert parallel.load_sharding('none', 0, 8) is None
  assert parallel.load_sharding('pmap', 0, 8) is None
  fn = parallel.load_sharding('mesh', 8, 2)          # data=2, model=4
  leaf = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  assert fn('layer_0/attn/qkv', leaf).spec == jax.sharding.PartitionSpec('model', None)
  assert fn('final_norm/scale', jax.ShapeDtypeStruct((32,), jnp.float32)).spec == (
      jax.sharding.PartitionSpec())
