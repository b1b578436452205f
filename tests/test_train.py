"""Drafter training on a tiny random target: the loss falls and the measured
acceptance rises; a run killed after a checkpoint resumes and ends exactly
where an uninterrupted run ends; bad input fails with one line."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from specdec_jax import checkpoints, drafters, generate
from specdec_jax.drafter_models import DrafterConfig, init_drafter_params
from specdec_jax.targets import load_target

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = '--config=configs/train_mtp.py:tiny'


def train_cli(cache, *args, wait=True):
  env = dict(os.environ, SPECDEC_CACHE=str(cache))
  cmd = [sys.executable, '-m', 'experiments.run', TINY, *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope='session')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('specdec_cache')


@pytest.fixture(scope='session')
def trained(tmp_path_factory, cache):
  """{kind: (workdir, exported drafter folder)} for 120-step tiny runs."""
  out = {}
  for kind in ('mtp', 'heads'):
    work = tmp_path_factory.mktemp(f'train_{kind}')
    r = train_cli(cache, f'--config.drafter={kind}', f'--config.workdir={work}',
                  f'--config.output={work}/drafter')
    assert r.returncode == 0, r.stderr[-3000:]
    out[kind] = (work, work / 'drafter')
  return out


def measured_acceptance(drafter_dir, randomize=False, k=4):
  """Mean tokens per target call when generating from held-out-style text."""
  target = load_target('tiny')
  dcfg, params, _ = checkpoints.load_drafter(drafter_dir)
  if randomize:   # the same drafter before training
    params = init_drafter_params(dcfg, jax.random.key(1), params['vocab'])
  d = drafters.make_drafter(dcfg.kind, draft_len=k, target_config=target.config,
                            drafter_config=dcfg)
  texts = ['def read_config(path):\n    with open(path) as f:\n',
           'class Message:\n    """An email message."""\n\n    def __init__(self',
           'import json\n\ndef dump(obj, fp, indent=None):\n']
  prompts = [target.tokenizer.encode(t) for t in texts]
  gen = generate.Generator(target.config, cache_size=192, greedy=True, drafter=d)
  batch = generate.make_batch(prompts, batch_size=3, bucket_len=128, max_new_tokens=40,
                              keys=jax.random.split(jax.random.key(0), 3))
  res = generate.completions(gen.generate(target.params, batch, jax.device_put(params)),
                             target.config.eos_id)
  return sum(r['new_tokens'] for r in res) / sum(r['target_calls'] for r in res)


@pytest.mark.parametrize('kind', ['mtp', 'heads'])
def test_training_lowers_loss_and_raises_acceptance(trained, kind):
  work, drafter_dir = trained[kind]
  log = [json.loads(l) for l in (work / 'log.jsonl').read_text().splitlines()]
  train = [r for r in log if r['kind'] == 'train']
  held = [r for r in log if r['kind'] == 'heldout']
  assert train[-1]['step'] == 120 and held[-1]['step'] == 120
  assert held[-1]['loss'] < 0.8 * held[0]['loss']
  assert held[0]['step'] == 0 and held[-1]['acc_1'] > held[0]['acc_1'] + 0.1
  before = measured_acceptance(drafter_dir, randomize=True)
  after = measured_acceptance(drafter_dir)
  # Random drafts are almost never accepted (1.0 token per call); heads, with
  # no view of the context beyond h, learn less than mtp in 120 steps.
  assert after > before + (0.3 if kind == 'mtp' else 0.1), (before, after)
  manifest = json.loads((drafter_dir / 'drafter.json').read_text())
  assert manifest['kind'] == kind and manifest['training']['steps'] == 120
  assert (drafter_dir / 'NOTICE').is_file()


@pytest.mark.parametrize('kind', ['mtp', 'heads'])
def test_the_best_heldout_evaluation_is_exported(trained, kind):
  """export='best' (the default): the exported weights are those of the
  held-out evaluation with the most expected accepted drafts per round."""
  work, drafter_dir = trained[kind]
  held = [r for r in map(json.loads, (work / 'log.jsonl').read_text().splitlines())
          if r['kind'] == 'heldout' and r['step'] > 0]
  score = lambda r: sum(r[f'chain_{j}'] for j in range(1, 5))
  best = max(held, key=score)              # the first of equals: a later tie does not replace it
  manifest = json.loads((drafter_dir / 'drafter.json').read_text())
  assert manifest['training']['exported_step'] == best['step']
  assert manifest['training']['heldout']['acc_1'] == round(best['acc_1'], 4)
  with np.load(work / 'best.npz') as z:
    kept = {k: z[k] for k in z.files}
  got = _arrays(drafter_dir)
  for k, v in kept.items():
    np.testing.assert_array_equal(got[f'net/{k}'], v, err_msg=k)


def _arrays(folder):
  with np.load(folder / 'drafter.npz') as z:
    return {k: z[k] for k in z.files}


def test_killed_run_resumes_and_matches_uninterrupted(tmp_path, cache, trained):
  """SIGKILL once the first checkpoint exists, rerun: same final weights as
  the uninterrupted 120-step run of the `trained` fixture (same settings)."""
  work = tmp_path / 'w'
  args = ['--config.drafter=mtp', f'--config.workdir={work}', f'--config.output={work}/drafter']
  p = train_cli(cache, *args, wait=False)
  deadline = time.time() + 600
  while (not any(c.name.isdigit() for c in (work / 'checkpoints').glob('*'))
         and p.poll() is None):
    assert time.time() < deadline
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert p.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  assert not (work / 'drafter').exists()
  r = train_cli(cache, *args)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resumed from the step-' in r.stderr
  ref, got = _arrays(trained['mtp'][1]), _arrays(work / 'drafter')
  assert ref.keys() == got.keys()
  for k in ref:
    np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_training_continues_from_an_exported_drafter(tmp_path, cache, trained):
  """init_from: the run starts from the exported drafter's weights and reduced
  vocabulary (its step-0 held-out evaluation is the one the drafter was
  exported at), records the source in run.json, and a checkpoint of another
  shape is one error line."""
  src = trained['mtp'][1]
  work = tmp_path / 'w'
  r = train_cli(cache, '--config.drafter=mtp', f'--config.init_from={src}', '--config.steps=40',
                '--config.eval_every=40', '--config.checkpoint_every=40',
                f'--config.workdir={work}', f'--config.output={work}/drafter')
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'starting from {src}' in r.stderr
  manifest = json.loads((src / 'drafter.json').read_text())
  held0 = next(r for r in map(json.loads, (work / 'log.jsonl').read_text().splitlines())
               if r['kind'] == 'heldout' and r['step'] == 0)
  for key in ('acc_1', 'acc_2', 'chain_2', 'loss'):
    assert round(held0[key], 4) == pytest.approx(manifest['training']['heldout'][key], abs=2e-4), key
  np.testing.assert_array_equal(_arrays(work / 'drafter')['vocab'], _arrays(src)['vocab'])
  assert json.loads((work / 'run.json').read_text())['init_from'] == manifest['sha256']
  exported = json.loads((work / 'drafter' / 'drafter.json').read_text())['training']
  assert exported['init_from']['sha256'] == manifest['sha256']
  bad = train_cli(cache, '--config.drafter=mtp', f'--config.init_from={src}', '--config.width=48',
                  f'--config.workdir={tmp_path}/w2')
  assert bad.returncode == 2 and 'Traceback' not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith(f'error: init_from={src} has width=32')
  missing = train_cli(cache, f'--config.init_from={tmp_path}/none', f'--config.workdir={tmp_path}/w3')
  assert missing.returncode == 2 and 'missing drafter.json' in missing.stderr.strip().splitlines()[-1]


def test_workdir_with_other_settings_is_refused(cache, trained):
  work = trained['mtp'][0]
  r = train_cli(cache, '--config.drafter=mtp', '--config.learning_rate=0.1',
                f'--config.workdir={work}', '--config.output=')
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith('error: workdir')


@pytest.mark.parametrize('args,needle', [
    (["--config.data=('/nonexistent/*.txt',)"], 'match no files'),
    (['--config.loss=mse'], 'unknown loss'),
    (['--config.drafter=medusa'], 'unknown trainable drafter'),
    (['--config.steps=0'], 'steps must be'),
    (['--config.export=final'], "export must be 'best'"),
])
def test_bad_training_config_is_one_error_line(tmp_path, cache, args, needle):
  r = train_cli(cache, *args, f'--config.workdir={tmp_path}/w')
  assert r.returncode == 2, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith('error:') and needle in lines[-1], lines[-3:]
  assert 'Traceback' not in r.stderr


# ----------------------------------------------------------------------------
# Checkpoint files: a corrupt or foreign drafter never loads.
# ----------------------------------------------------------------------------

def gen_cli(*args):
  return subprocess.run([sys.executable, '-m', 'experiments.run', '--config=configs/generate.py',
                         '--config.model=tiny', '--config.max_new_tokens=8', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_job_runs_trained_drafters_exactly(tmp_path, trained):
  outs = {}
  for name, extra in [('ar', ['--config.drafter=none']),
                      ('mtp', ['--config.drafter=mtp', f'--config.drafter_checkpoint={trained["mtp"][1]}']),
                      ('heads', ['--config.drafter=heads',
                                 f'--config.drafter_checkpoint={trained["heads"][1]}'])]:
    r = gen_cli(f'--config.output={tmp_path}/{name}.jsonl', *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    outs[name] = [json.loads(l)['completion_ids']
                  for l in (tmp_path / f'{name}.jsonl').read_text().splitlines()]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary['drafter'] == ('none' if name == 'ar' else name)
  assert outs['mtp'] == outs['ar'] == outs['heads']


def test_heads_draft_len_beyond_its_heads_is_refused(tmp_path, trained):
  r = gen_cli(f'--config.output={tmp_path}/o.jsonl', '--config.drafter=heads', '--config.draft_len=9',
              f'--config.drafter_checkpoint={trained["heads"][1]}')
  assert r.returncode == 2 and 'heads' in r.stderr.strip().splitlines()[-1]


def _copy(src, dst):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


@pytest.mark.parametrize('damage', ['missing', 'truncated', 'flipped', 'other_target', 'no_manifest'])
def test_bad_drafter_checkpoint_is_one_error_line(tmp_path, trained, damage):
  d = _copy(trained['mtp'][1], tmp_path / 'ckpt')
  npz = d / 'drafter.npz'
  if damage == 'missing':
    d = tmp_path / 'nowhere'
  elif damage == 'truncated':
    npz.write_bytes(npz.read_bytes()[:len(npz.read_bytes()) // 2])
  elif damage == 'flipped':
    b = bytearray(npz.read_bytes())
    b[len(b) // 2] ^= 0x01
    npz.write_bytes(bytes(b))
  elif damage == 'no_manifest':
    (d / 'drafter.json').unlink()
  elif damage == 'other_target':   # a well-formed drafter for a 64-token tiny target
    from specdec_jax import config as config_lib
    dcfg = DrafterConfig('mtp', config_lib.tiny(vocab_size=64), draft_vocab_size=16,
                         width=32, hidden_dim=64)
    params = jax.device_get(init_drafter_params(dcfg, jax.random.key(0), np.arange(16)))
    checkpoints.save_drafter(d, dcfg, params, target={'name': 'tiny64'}, training={})
  if damage in ('truncated', 'flipped', 'missing', 'no_manifest'):
    with pytest.raises(checkpoints.CheckpointError):
      checkpoints.load_drafter(d)
  r = gen_cli(f'--config.output={tmp_path}/o.jsonl', '--config.drafter=mtp',
              f'--config.drafter_checkpoint={d}')
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('error:') and 'Traceback' not in r.stderr
  want = {'missing': 'missing', 'truncated': 'corrupt', 'flipped': 'corrupt',
          'other_target': 'another target', 'no_manifest': 'missing'}[damage]
  assert want in last, last


# The from-scratch pipeline (SentencePiece tokenizer -> small target, held-out
# loss falls -> MTP drafter on it -> greedy speculative == AR, and better than
# an all-zero drafter) runs as colab/train_drafter.ipynb in tests/test_notebooks.py.
