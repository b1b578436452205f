"""Self-distilled drafter data on the tiny random target: shards resume after a
stop without duplicates or gaps (also from a copied folder), the features
recorded while generating equal a teacher-forced forward over the same tokens,
evaluation prompts never reach the data, and bad input is one error line."""
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import distill_data as distill_config
from specdec_jax import distill_data, jobs, shards, train
from specdec_jax.errors import UserError
from specdec_jax.generate import Generator
from specdec_jax.model import Transformer
from specdec_jax.targets import load_target

ROOT = pathlib.Path(__file__).resolve().parent.parent


def config(folder, **kw):
  c = distill_config.get_config('tiny')
  c.param_dtype = 'float32'
  c.folder = str(folder)
  c.max_prompts, c.shard_rows, c.batch_size = 48, 16, 8
  for k, v in kw.items():
    c[k] = v
  return c


def all_rows(folder, keys=None):
  m = shards.load_manifest(folder)
  parts = [shards.read(folder, e, keys) for e in m['shards']]
  return m, {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope='module')
def full(tmp_path_factory):
  """An uninterrupted run: 48 prompts in 3 shards."""
  folder = tmp_path_factory.mktemp('full')
  jobs.run(config(folder))
  return folder


def test_uninterrupted_run(full):
  m, rows = all_rows(full)
  assert [e['rows'] for e in m['shards']] == [16, 16, 16]
  assert rows['prompt_index'].tolist() == list(range(48))
  assert 0 < rows['greedy'].sum() < 48                     # both kinds present
  assert (rows['lengths'] > rows['prompt_lengths']).all()
  assert sum(e['new_tokens'] for e in m['shards']) == int((rows['lengths'] - rows['prompt_lengths']).sum())
  lines = [json.loads(l) for l in (full / 'log.jsonl').read_text().splitlines()]
  assert any(l.get('kind') == 'progress' and l['tok_s'] > 0 for l in lines)


def test_resume_after_stop_equals_uninterrupted(full, tmp_path):
  """Stop after one shard (a kill at a shard boundary), leave a shard the
  manifest never named (a kill between the two renames) and a temp file,
  resume from a copy of the folder (a fresh machine): same rows, in order."""
  a = tmp_path / 'a'
  r = jobs.run(config(a, stop_after_shards=1))
  assert r['shards'] == 1 and r['prompts'] == 16
  shutil.copy(a / 'shard-000000.npz', a / 'shard-000001.npz')     # orphan: not in the manifest
  (a / '.shard-000002.npz.tmp123').write_bytes(b'partial')
  b = tmp_path / 'b'
  shutil.copytree(a, b)
  r = jobs.run(config(b))
  assert r['shards'] == 3 and r['prompts'] == 48
  m_full, want = all_rows(full)
  m, got = all_rows(b)
  assert got['prompt_index'].tolist() == list(range(48))
  for k in ('tokens', 'lengths', 'greedy', 'source', 'labels', 'top_ids'):
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  np.testing.assert_allclose(got['hidden'].astype(np.float32), want['hidden'].astype(np.float32),
                             atol=2e-3)
  assert jobs.run(config(b))['stopped'] == 'max_prompts'         # a finished run adds nothing
  assert len(shards.load_manifest(b)['shards']) == 3


def test_time_limit_stops_at_a_shard_boundary_and_resumes(full, tmp_path):
  """max_seconds ends the run after the shard that crossed it (a time-boxed
  job on a borrowed machine); the same command continues, same rows."""
  a = tmp_path / 'a'
  r = jobs.run(config(a, max_seconds=1e-6))
  assert (r['stopped'], r['shards'], r['prompts']) == ('max_seconds', 1, 16)
  r = jobs.run(config(a))
  assert (r['stopped'], r['shards'], r['prompts']) == ('max_prompts', 3, 48)
  _, want = all_rows(full, ['prompt_index', 'tokens'])
  _, got = all_rows(a, ['prompt_index', 'tokens'])
  np.testing.assert_array_equal(got['prompt_index'], want['prompt_index'])
  np.testing.assert_array_equal(got['tokens'], want['tokens'])


def test_recorded_features_equal_teacher_forced(tmp_path):
  target = load_target('tiny', param_dtype='float32')
  cfg = target.config
  stream = distill_data.PromptStream(['1:{stdlib}/json/*.py', '1:chat'],
                                     distill_data.resolve_files(['1:{stdlib}/json/*.py', '1:chat']),
                                     target.tokenizer, seed=3, min_tokens=4, max_tokens=20,
                                     greedy_fraction=0.5)
  prompts = [stream.prompt(i) for i in range(8)]
  kv_layers = train.feature_kv_layers(cfg)
  gen = Generator(cfg, cache_size=32 + 24)
  rows = distill_data.generate_rows(gen, target.params, prompts, batch_size=8, bucket_len=32,
                                    max_new_tokens=24, temperature=1.0, seed=0,
                                    kv_layers=kv_layers, topk=16)
  B, S = rows['tokens'].shape
  # The reference: one causal forward over the same tokens, no cache.
  _, hidden, _ = Transformer(cfg).apply({'params': target.params}, jnp.asarray(rows['tokens']),
                                        compute_logits=False)
  logits = np.asarray(Transformer(cfg).apply({'params': target.params}, hidden,
                                             method=Transformer.logits))
  hidden = np.asarray(hidden)
  # Keys and values of the kv layers, from the same forward with a cache of S slots.
  from specdec_jax.model import KVCache
  _, _, cache = Transformer(cfg).apply({'params': target.params}, jnp.asarray(rows['tokens']),
                                       KVCache.init(cfg, B, S), compute_logits=False)
  for b in range(B):
    P, L = rows['prompt_lengths'][b], rows['lengths'][b]
    assert L == P + 24 or rows['tokens'][b, L - 1] == cfg.eos_id
    t = slice(P - 2, L - 1)                                 # the positions the drafter trains on
    np.testing.assert_allclose(rows['hidden'][b, t], hidden[b, t], atol=2e-3, rtol=2e-3)
    assert not rows['hidden'][b, :P - 2].any() and not rows['hidden'][b, L - 1:].any()
    for i, l in enumerate(kv_layers):
      np.testing.assert_allclose(rows['kv'][b, i, 0, :, :L - 1], cache.k[l][b, :, :L - 1],
                                 atol=2e-3, rtol=2e-3)
      np.testing.assert_allclose(rows['kv'][b, i, 1, :, :L - 1], cache.v[l][b, :, :L - 1],
                                 atol=2e-3, rtol=2e-3)
    g = slice(P - 1, L - 1)                                 # positions whose next token was chosen
    np.testing.assert_array_equal(rows['labels'][b, g], rows['tokens'][b, P:L])
    assert (rows['labels'][b, :P - 1] == -1).all() and (rows['labels'][b, L - 1:] == -1).all()
    lp = logits[b, g] - jax.nn.logsumexp(logits[b, g], -1, keepdims=True)
    np.testing.assert_allclose(rows['top_logp'][b, g].astype(np.float32),
                               np.take_along_axis(lp, rows['top_ids'][b, g], -1), atol=1e-2)
    np.testing.assert_array_equal(rows['top_ids'][b, g, 0], logits[b, g].argmax(-1))
    if rows['greedy'][b]:
      np.testing.assert_array_equal(rows['tokens'][b, P:L], logits[b, P - 1:L - 1].argmax(-1))


def test_prompt_stream_is_a_function_of_seed_and_index():
  spec = ['2:{stdlib}/json/*.py', '1:chat']
  tok = load_target('tiny').tokenizer
  mk = lambda seed: distill_data.PromptStream(spec, distill_data.resolve_files(spec), tok, seed=seed,
                                              min_tokens=8, max_tokens=40, greedy_fraction=0.5)
  a, b = mk(0), mk(0)
  assert [a.prompt(i) for i in (7, 3, 0)] == [b.prompt(i) for i in (7, 3, 0)]
  assert [mk(1).prompt(i).ids for i in range(10)] != [a.prompt(i).ids for i in range(10)]
  srcs = {a.prompt(i).source for i in range(60)}
  assert any(s.startswith('chat/') for s in srcs) and 'decoder.py' in srcs   # relative names


def test_evaluation_prompts_stay_out():
  """No benchmark prompt (experiments/prompts: HumanEval, fortunes, chat,
  repetitive) is or contains a training prompt source, and the eval sources'
  files are refused as data."""
  sys.path.insert(0, str(ROOT / 'tools'))
  import make_prompt_sets
  evals = [json.loads(l)['prompt'] for f in sorted((ROOT / 'experiments' / 'prompts').glob('*.jsonl'))
           for l in f.read_text().splitlines() if l.strip()]
  assert len(evals) > 40
  assert not set(distill_data.CHAT_OPENINGS) & set(make_prompt_sets.CHAT_QUESTIONS)
  assert make_prompt_sets.CHAT_PREAMBLE not in distill_data.CHAT_PREAMBLES
  chats = [distill_data.chat_prompt(p, t, g, x, q) for p in range(len(distill_data.CHAT_PREAMBLES))
           for t in range(len(distill_data.CHAT_TURNS))
           for g in range(len(distill_data.CHAT_GREETINGS))
           for x in range(len(distill_data.CHAT_CONTEXTS)) for q in (0, 7)]
  assert len(set(chats)) == len(chats)
  assert not any(q in c for q in make_prompt_sets.CHAT_QUESTIONS
                 for c in chats + list(distill_data.CHAT_OPENINGS))
  # The shipped config names no evaluation source; a file of one is refused.
  c = distill_config.get_config()
  assert not any(s in d.lower() for d in c.data for s in distill_data.EVAL_SOURCES)
  with pytest.raises(UserError, match='evaluation source'):
    distill_data.resolve_files([f'1:{ROOT}/experiments/prompts/*.jsonl'])
  # Prompts drawn from the stdlib + chat stream contain no evaluation prompt's
  # opening (HumanEval stubs, fortunes quotations, chat questions).
  spec = ['1:{stdlib}/**/*.py', '1:chat']
  stream = distill_data.PromptStream(spec, distill_data.resolve_files(spec), load_target('tiny').tokenizer,
                                     seed=0, min_tokens=16, max_tokens=200, greedy_fraction=0.5)
  tok = load_target('tiny').tokenizer
  heads = [e.split('User: ')[-1][:40] for e in evals]
  for i in range(200):
    text = tok.decode(stream.prompt(i).ids[1:])
    assert not any(h in text for h in heads), text


@pytest.mark.parametrize('case, match', [
    ('no_files', 'matches no files'),
    ('bad_entry', 'weight:pattern'),
    ('other_target', 'target='),
    ('other_layout', 'feature layout'),
    ('other_settings', 'max_new_tokens='),
    ('truncated', 'truncated'),
    ('not_a_manifest', 'not a shard manifest'),
    ('negative_seconds', 'max_seconds must be >= 0'),
])
def test_bad_input_is_one_line(full, tmp_path, case, match):
  folder = tmp_path / 'f'
  shutil.copytree(full, folder)
  kw = {}
  if case == 'no_files':
    kw['data'] = ('1:/nonexistent/**/*.py', '1:chat')
  elif case == 'bad_entry':
    kw['data'] = ('{stdlib}/json/*.py',)
  elif case == 'other_target':
    kw['target_seed'] = 1
  elif case == 'other_settings':
    kw['max_new_tokens'] = 16
  elif case == 'other_layout':
    m = json.loads((folder / 'manifest.json').read_text())
    m['identity']['layout_version'] = 0
    (folder / 'manifest.json').write_text(json.dumps(m))
  elif case == 'truncated':
    p = folder / 'shard-000001.npz'
    p.write_bytes(p.read_bytes()[:1000])
  elif case == 'not_a_manifest':
    (folder / 'manifest.json').write_text('{"shards": [')
  elif case == 'negative_seconds':
    kw['max_seconds'] = -1.0
  with pytest.raises(UserError, match=match) as e:
    jobs.run(config(folder, max_prompts=64, **kw))
  assert '\n' not in str(e.value)


def test_every_model_config_field_is_named_for_the_identity():
  """A field added to ModelConfig must be put in IDENTITY_FIELDS (it changes
  what the target computes: folders written before are refused) or in
  NOT_IDENTITY_FIELDS; hashing every field orphaned every folder once."""
  import dataclasses
  from specdec_jax import config as config_lib
  names = [f.name for f in dataclasses.fields(config_lib.ModelConfig)]
  assert sorted(distill_data.IDENTITY_FIELDS + distill_data.NOT_IDENTITY_FIELDS) == sorted(names)
  assert not set(distill_data.IDENTITY_FIELDS) & set(distill_data.NOT_IDENTITY_FIELDS)


def test_identity_hash_and_the_earlier_form(full, tmp_path):
  """Stop ids other than the default change the hash; a folder written with
  the earlier every-field hash resumes (its hash is rewritten), and one whose
  hash is neither is refused."""
  import types
  c = config(full)
  target = load_target('tiny', param_dtype='float32', seed=c.target_seed)
  ident = distill_data.target_identity(c, target)
  other = types.SimpleNamespace(config=target.config.replace(eos_ids=(1, 5)))
  assert distill_data.target_identity(c, other)['config_sha256'] != ident['config_sha256']
  same = types.SimpleNamespace(config=target.config.replace(eos_ids=(target.config.eos_id,)))
  assert distill_data.target_identity(c, same)['config_sha256'] == ident['config_sha256']
  legacy = distill_data.legacy_config_hash(c, target)
  assert legacy != ident['config_sha256']
  folder = tmp_path / 'old'
  shutil.copytree(full, folder)
  m = json.loads((folder / 'manifest.json').read_text())
  m['identity']['target']['config_sha256'] = legacy
  (folder / 'manifest.json').write_text(json.dumps(m))
  r = jobs.run(config(folder, max_prompts=64))
  assert r['prompts'] == 64
  m = json.loads((folder / 'manifest.json').read_text())
  assert m['identity']['target'] == ident
  m['identity']['target']['config_sha256'] = '0123456789abcdef'
  (folder / 'manifest.json').write_text(json.dumps(m))
  with pytest.raises(UserError, match='config_sha256'):
    jobs.run(config(folder, max_prompts=80))


def test_corrupt_shard_is_never_read(full, tmp_path):
  folder = tmp_path / 'f'
  shutil.copytree(full, folder)
  p = folder / 'shard-000002.npz'
  data = bytearray(p.read_bytes())
  data[len(data) // 2] ^= 0xFF                              # same size, other content
  p.write_bytes(bytes(data))
  m = shards.load_manifest(folder)
  shards.read(folder, m['shards'][1])
  with pytest.raises(UserError, match='corrupt'):
    shards.read(folder, m['shards'][2])


def test_cli_error_exit_status(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'experiments.run',
                      '--config=configs/distill_data.py:tiny', f'--config.folder={tmp_path}',
                      "--config.data=('1:/nonexistent/*.txt',)"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: data pattern '/nonexistent/*.txt' matches no files"], r.stderr


@pytest.mark.parametrize('loss, kind', [('ce', 'all'), ('kl', 'sampled')])
def test_train_from_shards(full, tmp_path, loss, kind):
  from configs import train_mtp
  c = train_mtp.get_config('tiny')
  c.shards, c.loss, c.shard_rows_kind = str(full), loss, kind
  c.steps, c.batch_size, c.warmup_steps = 4, 4, 1
  c.eval_every = c.checkpoint_every = 2
  c.eval_rows, c.log_every, c.heldout_fraction = 8, 1, 0.2
  c.workdir, c.output = str(tmp_path / 'w'), str(tmp_path / 'w' / 'drafter')
  r = jobs.run(c)
  assert r['steps'] == 4 and np.isfinite(r['heldout']['loss']) and r['seq_len'] == 64
  assert json.loads((tmp_path / 'w' / 'run.json').read_text())['features'].endswith(f':{kind}:3')
  assert (tmp_path / 'w' / 'drafter').is_dir()


def test_train_from_several_shard_folders(full, tmp_path):
  """shards='a,b' trains on both folders' rows (another seed: another prompt
  stream); a folder holding the same stream as another, a shard_count over
  several folders, and a resumed run given other folders are refused."""
  from configs import train_mtp
  other = tmp_path / 'seed1'
  jobs.run(config(other, seed=1, max_prompts=16))

  def cfg(shards_, work, **kw):
    c = train_mtp.get_config('tiny')
    c.shards, c.steps, c.batch_size, c.warmup_steps = shards_, 2, 4, 1
    c.eval_every = c.checkpoint_every = 2
    c.eval_rows, c.log_every, c.heldout_fraction = 8, 1, 0.2
    c.workdir, c.output = str(tmp_path / work), ''
    for k, v in kw.items():
      c[k] = v
    return c
  one = jobs.run(cfg(str(full), 'w1'))
  both = jobs.run(cfg(f'{full},{other}', 'w2'))
  assert both['train_windows'] + both['heldout_windows'] == \
      one['train_windows'] + one['heldout_windows'] + 16
  assert json.loads((tmp_path / 'w2' / 'run.json').read_text())['features'].endswith(':3+1')
  twin = tmp_path / 'twin'
  shutil.copytree(full, twin)
  with pytest.raises(UserError, match='same prompt stream'):
    jobs.run(cfg(f'{full},{twin}', 'w3'))
  with pytest.raises(UserError, match='applies to one shard folder'):
    jobs.run(cfg(f'{full},{other}', 'w4', shard_count=1))
  with pytest.raises(UserError, match='trained on 1 shard folder'):
    jobs.run(cfg(f'{full},{other}', 'w1'))


def test_train_from_shards_refuses_bad_folders(full, tmp_path):
  from configs import train_mtp
  c = train_mtp.get_config('tiny')
  c.steps, c.workdir, c.output = 2, str(tmp_path / 'w'), ''
  c.shards = str(tmp_path)                                  # no manifest
  with pytest.raises(UserError, match='no manifest.json'):
    jobs.run(c)
  folder = tmp_path / 'f'
  shutil.copytree(full, folder)
  p = folder / 'shard-000000.npz'
  data = bytearray(p.read_bytes())
  data[-100] ^= 0xFF
  p.write_bytes(bytes(data))
  c.shards = str(folder)
  with pytest.raises(UserError, match='corrupt'):
    jobs.run(c)


def test_draw_is_exact():
  """draw's frequencies match softmax(logits / T) (chi-square over 300 ids,
  spanning blocks), greedy rows take the argmax, and zero-probability ids
  are never drawn."""
  V, n = 1300, 40_000
  logits = jax.random.normal(jax.random.key(0), (V,)) * 2
  logits = logits.at[::7].set(-jnp.inf)                     # impossible ids
  u = jax.random.uniform(jax.random.key(1), (n,))
  rows = jnp.broadcast_to(logits, (n, V))
  got = np.asarray(jax.jit(distill_data.draw)(rows, jnp.full((n,), 0.7), u))
  p = np.asarray(jax.nn.softmax(logits / 0.7))
  assert (p[got] > 0).all()
  counts = np.bincount(got, minlength=V)
  big = p * n >= 20
  expected = np.append(p[big] * n, p[~big].sum() * n)
  observed = np.append(counts[big], counts[~big].sum())
  chi2 = ((observed - expected) ** 2 / expected).sum()
  dof = len(expected) - 1
  assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)
  greedy = distill_data.draw(rows[:4], jnp.zeros(4), u[:4])
  assert (np.asarray(greedy) == int(jnp.argmax(logits))).all()


def test_sigkill_then_resume(tmp_path):
  """A real kill at a random moment (mid-batch or mid-write), then the same
  command: the shards equal an uninterrupted run's, prompts 0..N-1 once each."""
  import signal
  import time
  folder = tmp_path / 'k'
  cmd = [sys.executable, '-m', 'experiments.run', '--config=configs/distill_data.py:tiny',
         f'--config.folder={folder}', '--config.param_dtype=float32', '--config.shard_rows=16']
  proc = subprocess.Popen(cmd + ['--config.max_prompts=100000'], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while time.time() < deadline:
      m = shards.load_manifest(folder) if (folder / 'manifest.json').is_file() else None
      if m and len(m['shards']) >= 2:
        break
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  killed_at = len(shards.load_manifest(folder)['shards'])
  assert killed_at >= 2
  n = (killed_at + 2) * 16
  r = subprocess.run(cmd + [f'--config.max_prompts={n}'], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  _, got = all_rows(folder)
  ref = tmp_path / 'ref'
  jobs.run(config(ref, max_prompts=n))
  _, want = all_rows(ref)
  assert got['prompt_index'].tolist() == list(range(n))
  for k in ('tokens', 'lengths', 'labels', 'source', 'greedy'):
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_other_data_files_refused(full, tmp_path):
  folder = tmp_path / 'f'
  shutil.copytree(full, folder)
  m = json.loads((folder / 'manifest.json').read_text())
  m['identity']['data_digest'] = '0' * 16
  (folder / 'manifest.json').write_text(json.dumps(m))
  with pytest.raises(UserError, match='other files under the same data patterns'):
    jobs.run(config(folder, max_prompts=64))


def test_training_resume_ignores_shards_added_since(full, tmp_path):
  """A training run stopped at a checkpoint resumes on the shards it started
  with while the data job keeps appending: it ends as an uninterrupted run."""
  from configs import train_mtp
  data = tmp_path / 'data'
  shutil.copytree(full, data)

  def cfg(work, **kw):
    c = train_mtp.get_config('tiny')
    c.shards, c.steps, c.batch_size, c.warmup_steps = str(data), 4, 4, 1
    c.eval_every = c.checkpoint_every = 2
    c.eval_rows, c.log_every, c.heldout_fraction = 8, 1, 0.2
    c.workdir, c.output = str(work), ''
    for k, v in kw.items():
      c[k] = v
    return c
  want = jobs.run(cfg(tmp_path / 'w1'))
  assert jobs.run(cfg(tmp_path / 'w2', stop_at_step=2))['stopped_at'] == 2
  jobs.run(config(data, max_prompts=64))                      # a 4th shard appears
  assert len(shards.load_manifest(data)['shards']) == 4
  got = jobs.run(cfg(tmp_path / 'w2'))
  assert got['train_windows'] == want['train_windows']
  assert got['heldout'] == want['heldout']
