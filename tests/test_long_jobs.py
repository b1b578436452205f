"""Jobs that survive: a killed generation job or sweep resumes to what an
uninterrupted run writes, an existing output is never overwritten by accident,
bad paths and sizes fail before the model loads, and two processes on this
machine (jax.distributed, gloo) write what one does."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from specdec_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ('seconds', 'draft_seconds', 'verify_seconds')


def env(devices=1, **extra):
  e = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
  e.pop('XLA_FLAGS', None)
  if devices > 1:
    e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return e


def command(config, *args):
  return [sys.executable, '-m', 'experiments.run', f'--config={config}', *args]


def job_config(tmp_path, **overrides):
  from configs.generate import get_config
  c = get_config()
  c.model, c.output = 'tiny', str(tmp_path / 'o.jsonl')
  for key, value in overrides.items():
    c[key] = value
  return c


def run_job(tmp_path, **overrides):
  from specdec_jax import jobs
  return jobs.run(job_config(tmp_path, **overrides))


def job_error(tmp_path, **overrides):
  from specdec_jax import jobs
  with pytest.raises(UserError) as e:
    jobs.run(job_config(tmp_path, **overrides))
  assert '\n' not in str(e.value), str(e.value)
  return str(e.value)


def lines(path):
  """The output's lines without their timings (which differ run to run)."""
  out = []
  for l in path.read_text().splitlines():
    row = json.loads(l)
    row['stats'] = {k: v for k, v in row['stats'].items() if k not in TIMING}
    out.append(row)
  return out


# 24 prompts of one bucket x 2 samples, sampled (per-row keys must not depend
# on the batch) with ngram drafts: 24 batches of 2.
PROMPTS = ''.join(json.dumps({'prompt': f'item {i}: ' + 'abc ' * (i % 3)}) + '\n' for i in range(24))
# costs are pinned: measured costs differ between runs (and between a mesh and one
# device), and with a dynamic draft length a sampled row's tokens follow its plan
JOB = dict(drafter='ngram', draft_len=2, max_new_tokens=12, num_samples=2, batch_size=2,
           temperature=0.8, top_k=20, costs='1,1.1,1.2')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  d = tmp_path_factory.mktemp('full')
  (d / 'p.jsonl').write_text(PROMPTS)
  summary = run_job(d, prompts=str(d / 'p.jsonl'), **JOB)
  assert summary['samples'] == 48 and summary['resumed'] == 0
  return d, lines(d / 'o.jsonl')


def test_sigkill_then_resume_writes_every_pair_once(uninterrupted, tmp_path):
  """A real SIGKILL once the first batch is on disk (the kill may land mid-
  write), then resume=true: each (index, sample) once, equal to the
  uninterrupted run's lines (order included), and the meta file kept."""
  full_dir, full = uninterrupted
  out = tmp_path / 'o.jsonl'
  p = subprocess.Popen(command('configs/generate.py', '--config.model=tiny',
                               f'--config.prompts={full_dir / "p.jsonl"}', f'--config.output={out}',
                               *[f'--config.{k}={v}' for k, v in JOB.items()]),
                       cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while time.time() < deadline and p.poll() is None:
    if out.exists() and out.stat().st_size > 0:
      break
    time.sleep(0.002)
  p.send_signal(signal.SIGKILL)
  assert p.wait() == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
  partial = out.read_bytes().count(b'\n')
  assert 0 < partial < len(full)                     # killed after the first batch, before the end
  summary = run_job(tmp_path, prompts=str(full_dir / 'p.jsonl'), resume=True, **JOB)
  assert summary['resumed'] >= partial - 1 and summary['resumed'] + summary['generated'] == 48
  assert lines(out) == full
  assert (tmp_path / 'o.jsonl.meta.json').read_text() == (full_dir / 'o.jsonl.meta.json').read_text()


def test_torn_last_line_is_dropped_and_redone(uninterrupted, tmp_path):
  full_dir, full = uninterrupted
  data = (full_dir / 'o.jsonl').read_bytes()
  cut = data.index(b'\n', len(data) // 3) + 40      # 40 bytes into a line
  (tmp_path / 'o.jsonl').write_bytes(data[:cut])
  (tmp_path / 'o.jsonl.meta.json').write_bytes((full_dir / 'o.jsonl.meta.json').read_bytes())
  summary = run_job(tmp_path, prompts=str(full_dir / 'p.jsonl'), resume=True, **JOB)
  assert summary['resumed'] == data[:cut].count(b'\n')
  assert lines(tmp_path / 'o.jsonl') == full
  # Resuming a finished output generates nothing and changes nothing.
  before = (tmp_path / 'o.jsonl').read_bytes()
  summary = run_job(tmp_path, prompts=str(full_dir / 'p.jsonl'), resume=True, **JOB)
  assert summary['generated'] == 0 and (tmp_path / 'o.jsonl').read_bytes() == before


def test_existing_output_is_refused_untouched_unless_resume_or_overwrite(uninterrupted):
  full_dir, full = uninterrupted
  out = full_dir / 'o.jsonl'
  before, mtime = out.read_bytes(), out.stat().st_mtime_ns
  prompts = str(full_dir / 'p.jsonl')
  msg = job_error(full_dir, prompts=prompts, **JOB)
  assert 'already exists' in msg and 'resume=true' in msg and 'overwrite=true' in msg
  assert 'exclude each other' in job_error(full_dir, prompts=prompts, resume=True,
                                           overwrite=True, **JOB)
  for change in (dict(temperature=0.5), dict(seed=1), dict(drafter='none'),
                 dict(max_new_tokens=11), dict(draft_len=3, costs='1,1.1,1.2,1.3'), dict(num_samples=1)):
    msg = job_error(full_dir, prompts=prompts, resume=True, **dict(JOB, **change))
    assert 'other settings' in msg and f'{next(iter(change))}:' in msg, msg
  assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
  # batch_size and the parallel mode are not settings of the output.
  assert run_job(full_dir, prompts=prompts, resume=True, **dict(JOB, batch_size=3))['generated'] == 0


def test_overwrite_replaces_and_resume_needs_the_meta_file(uninterrupted, tmp_path):
  full_dir, full = uninterrupted
  out = tmp_path / 'o.jsonl'
  out.write_text('{"old": 1}\n')
  assert 'meta.json is missing' in job_error(tmp_path, prompts=str(full_dir / 'p.jsonl'),
                                             resume=True, **JOB)
  run_job(tmp_path, prompts=str(full_dir / 'p.jsonl'), overwrite=True, **JOB)
  assert lines(out) == full


# ----------------------------------------------------------------------------- bad input

def test_bad_paths_and_sizes_fail_before_the_model_loads(tmp_path, monkeypatch):
  """The default model (Gemma 3 270M): each of these would load it first."""
  from specdec_jax import generation_job
  def no_load(*a, **k):
    raise AssertionError('the model loaded')
  monkeypatch.setattr(generation_job, 'load_target', no_load)
  cases = [
      (dict(drafter='ngram', draft_len=100000), 'model context 32768'),
      (dict(output='/proc/nope/o.jsonl'), 'cannot write in /proc/nope'),
      (dict(output=str(tmp_path)), 'is a folder'),
      (dict(cache_size=100000), 'exceeds the model context'),
      (dict(max_new_tokens=40000, drafter='none'), 'model context'),
      (dict(gguf='/nonexistent.gguf'), 'GGUF file not found'),
      (dict(drafter='mtp', drafter_checkpoint=str(tmp_path)), 'drafter.json is missing'),
  ]
  for overrides, needle in cases:
    c = job_config(tmp_path, model='gemma3_270m', **overrides)
    with pytest.raises(UserError, match=needle):
      generation_job.run(c)


def test_cache_check_counts_the_draft_margin_against_the_context(tmp_path):
  """tiny: context 512. A prompt + max_new_tokens that fit alone but not with
  k + 1 more slots is refused once tokenized, before any cache exists."""
  p = tmp_path / 'p.jsonl'
  p.write_text(json.dumps({'prompt_ids': [2] + [50] * 399}) + '\n')
  msg = job_error(tmp_path, prompts=str(p), max_new_tokens=100, drafter='ngram', draft_len=20)
  assert 'model context 512' in msg and 'draft_len' in msg
  assert not (tmp_path / 'o.jsonl').exists()


def test_bad_sweep_and_training_paths_and_sizes_fail_up_front(tmp_path):
  from configs import ablate, train_mtp
  from specdec_jax import sweep, train
  for overrides, needle in [(dict(output='/proc/nope/r'), 'cannot write in /proc/nope'),
                            (dict(max_new_tokens=600), 'model context 512'),
                            (dict(gguf='/nonexistent.gguf'), 'GGUF file not found')]:
    c = sweep_config(tmp_path / 'r', **overrides)
    with pytest.raises(UserError, match=re.escape(needle)):
      sweep.parse(c)
  for overrides, needle in [(dict(output='/proc/nope/drafter'), 'cannot write in /proc/nope'),
                            (dict(workdir='/proc/nope/w'), 'cannot write in /proc/nope'),
                            (dict(seq_len=1000), 'model context 512'),
                            (dict(export_dtype='int8'), 'export_dtype'),
                            (dict(eval_rows=0), 'eval_rows')]:
    c = train_mtp.get_config('tiny')
    c.workdir, c.output = str(tmp_path / 'w'), str(tmp_path / 'w' / 'drafter')
    for k, v in overrides.items():
      c[k] = v
    with pytest.raises(UserError, match=re.escape(needle)):
      train.validate(c)


@pytest.mark.parametrize('variables,needle', [
    (dict(JAX_COORDINATOR_ADDRESS='127.0.0.1:1234', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='2'),
     'must be in [0, 2), got 2'),
    (dict(JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='0'), 'need a coordinator'),
    (dict(JAX_COORDINATOR_ADDRESS='nohost', JAX_NUM_PROCESSES='2'), 'host:port'),
    (dict(JAX_COORDINATOR_ADDRESS='127.0.0.1:1234', JAX_PROCESS_ID='x'), 'not an integer'),
])
def test_bad_process_settings_are_one_line(tmp_path, monkeypatch, variables, needle):
  for k, v in variables.items():
    monkeypatch.setenv(k, v)
  assert needle in job_error(tmp_path)


# ----------------------------------------------------------------------------- sweep

SWEEP = dict(domains='code,prose', drafters='ngram', draft_lens='2', temperatures='0,1.0',
             prompts_per_domain=2, max_new_tokens=8)


def sweep_config(out, **overrides):
  from configs import ablate
  c = ablate.get_config('tiny')
  c.output = str(out)
  for k, v in dict(SWEEP, **overrides).items():
    c[k] = v
  return c


def raw(out):
  keep = ('domain', 'drafter', 'draft_len', 'temperature', 'prompt_index', 'completion_ids',
          'identical_to_ar', 'pit', 'logprob_sum')
  return [{k: r[k] for k in keep} for r in map(json.loads, (out / 'raw.jsonl').read_text().splitlines())]


@pytest.fixture(scope='module')
def full_sweep(tmp_path_factory):
  from specdec_jax import sweep
  out = tmp_path_factory.mktemp('sweep') / 'r'
  summary = sweep.run(sweep_config(out))
  assert summary['points'] == 8 and summary['rows'] == 16
  return out


def partial_sweep(full, out, rows=5):
  """`full`'s raw.jsonl cut after `rows` (odd) lines plus half a line: the
  last point there is partial (one of its two prompts), then a torn line."""
  out.mkdir(parents=True)
  data = (full / 'raw.jsonl').read_text().splitlines(keepends=True)
  (out / 'raw.jsonl').write_text(''.join(data[:rows]) + data[rows][:50])
  (out / 'config.json').write_bytes((full / 'config.json').read_bytes())


def test_sweep_resumes_complete_points_and_redoes_the_rest(full_sweep, tmp_path):
  from specdec_jax import sweep
  out = tmp_path / 'r'
  partial_sweep(full_sweep, out)
  with pytest.raises(UserError, match='already holds results'):
    sweep.run(sweep_config(out))
  with pytest.raises(UserError, match='max_new_tokens'):
    sweep.run(sweep_config(out, resume=True, max_new_tokens=9))
  summary = sweep.run(sweep_config(out, resume=True))
  assert summary['resumed_points'] == 2 and summary['points'] == 8
  assert raw(out) == raw(full_sweep)
  assert (out / 'results.md').is_file()


# ----------------------------------------------------------------------------- two processes

def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def two_processes(config, args_for, timeout=240):
  """Starts processes 0 and 1 (4 fake CPU devices each) with the JAX_*
  variables; returns their CompletedProcess-like (rc, stdout, stderr)."""
  port = free_port()
  procs = [subprocess.Popen(command(config, *args_for(i)), cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(4, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                                    JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def summary_of(stdout):
  """The JSON summary line (gloo writes its connection lines to stdout too)."""
  return json.loads([l for l in stdout.splitlines() if l.startswith('{')][-1])


def test_two_processes_on_a_mesh_write_what_one_process_writes(uninterrupted, tmp_path):
  """parallel=mesh over 2 processes x 4 devices: batch rows split over the
  processes ('data' = 4), weights over 'model' = 2; process 0 alone writes
  (process 1 is given another output path, which must not appear) and prints
  the summary. Its lines equal the one-process, one-device run's for the
  same prompts (the first 6 of its 24: rows depend on their index, not on
  the file)."""
  full_dir, full = uninterrupted
  (tmp_path / 'p.jsonl').write_text(''.join(PROMPTS.splitlines(keepends=True)[:6]))
  args = ['--config.model=tiny', f'--config.prompts={tmp_path / "p.jsonl"}',
          '--config.parallel=mesh'] + [f'--config.{k}={v}' for k, v in dict(JOB, batch_size=4).items()]
  results = two_processes('configs/generate.py', lambda i: args + [
      f'--config.output={tmp_path / f"mesh{i}.jsonl"}'])
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  summary = summary_of(results[0][1])
  assert summary['processes'] == 2 and summary['devices'] == 8 and summary['samples'] == 12
  assert summary['parallel'] == 'mesh(data=4,model=2)'
  # (gloo prints its connections on stdout; no summary there)
  assert '{' not in results[1][1] and not (tmp_path / 'mesh1.jsonl').exists()
  assert lines(tmp_path / 'mesh0.jsonl') == [l for l in full if l['index'] < 6]


def test_two_processes_resume_a_sweep(full_sweep, tmp_path):
  """The same sweep command on both processes with resume=true: process 0
  finishes the interrupted sweep, process 1 waits; raw.jsonl equals the
  uninterrupted one-process sweep's."""
  out = tmp_path / 'r'
  partial_sweep(full_sweep, out, rows=13)
  args = [f'--config.output={out}', '--config.resume=true'] + [
      f'--config.{k}={v}' for k, v in SWEEP.items()]
  results = two_processes('configs/ablate.py:tiny', lambda i: args)
  for rc, _, err in results:
    assert rc == 0, err[-3000:]
  assert summary_of(results[0][1])['resumed_points'] == 6
  assert '{' not in results[1][1]
  assert raw(out) == raw(full_sweep)


def test_unreachable_coordinator_is_a_timeout_in_one_line(tmp_path):
  r = subprocess.run(command('configs/generate.py', '--config.model=tiny',
                             f'--config.output={tmp_path / "o.jsonl"}',
                             '--config.coordinator_timeout=2'),
                     cwd=ROOT, text=True, capture_output=True, timeout=120,
                     env=env(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{free_port()}',
                             JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1'))
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.count('\n') == 1 and r.stderr.startswith('error: no contact'), r.stderr
  assert 'within 2 s' in r.stderr and not (tmp_path / 'o.jsonl').exists()
