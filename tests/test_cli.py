"""The generation job end to end through `python -m experiments.run`."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=300, devices=1):
  """`python -m experiments.run --config=configs/generate.py ARGS` on `devices`
  fake CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  if devices > 1:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return subprocess.run([sys.executable, '-m', 'experiments.run', '--config=configs/generate.py',
                         *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def job_error(tmp_path, **overrides):
  """Runs the generation job in this process (model=tiny, output under
  tmp_path) and returns the UserError it must raise: what experiments/run.py
  prints as its one `error:` line before exiting with status 2 (the
  subprocess tests below check that path)."""
  from configs.generate import get_config
  from specdec_jax import jobs
  from specdec_jax.errors import UserError
  c = get_config()
  c.model, c.output = 'tiny', str(tmp_path / 'o.jsonl')
  for key, value in overrides.items():
    c[key] = value
  with pytest.raises(UserError) as e:
    jobs.run(c)
  assert '\n' not in str(e.value), str(e.value)
  return str(e.value)


def test_tiny_job_writes_every_line_and_a_summary(tmp_path):
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text('{"prompt": "hello"}\n\n{"prompt_ids": [2, 40, 41]}\n{"prompt": "a longer prompt"}\n')
  out = tmp_path / 'out' / 'o.jsonl'
  r = cli('--config.model=tiny', f'--config.prompts={prompts}', f'--config.output={out}',
          '--config.max_new_tokens=5', '--config.num_samples=2', '--config.batch_size=4',
          '--config.temperature=0.8', '--config.top_k=20')
  assert r.returncode == 0, r.stderr
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert sorted((l['index'], l['sample']) for l in lines) == [(i, s) for i in range(3) for s in range(2)]
  for l in lines:
    assert {'index', 'sample', 'prompt_ids', 'completion_ids', 'completion', 'stats'} <= set(l)
    assert l['stats']['new_tokens'] <= 5 and l['stats']['target_calls'] == l['stats']['new_tokens']
  assert [l['prompt_ids'] for l in lines if l['index'] == 1][0] == [2, 40, 41]
  assert summary['new_tokens'] == sum(l['stats']['new_tokens'] for l in lines)
  assert summary['target_calls'] == summary['new_tokens']
  assert summary['mean_accepted_per_call'] == 1.0
  for key in ('tokens_per_second', 'compile_seconds'):
    assert summary[key] > 0
  assert '[6/6]' in r.stderr                                    # progress on stderr


BAD = [
    (dict(max_new_tokens=0), 'max_new_tokens'),
    (dict(temperature=-0.5), 'temperature'),
    (dict(top_p=0.0), 'top_p'),
    (dict(top_p=1.2), 'top_p'),
    (dict(top_k=-1), 'top_k'),
    (dict(prompts='/nonexistent/prompts.jsonl'), 'not found'),
    (dict(drafter='magic'), 'drafter'),
    (dict(draft_len=0), 'draft_len'),
    (dict(batch_size=0), 'batch_size'),
    (dict(drafter='draft_model', draft_vocab_size=100), 'vocabulary'),
    (dict(drafter='ngram', draft_len=600, cache_size=256), 'cache'),
    (dict(drafter='ngram', min_ngram=4), 'min_ngram'),
    (dict(num_devices=64), 'device'),
    (dict(num_devices=1, parallel='warp'), 'parallel'),
    (dict(param_dtype='float8'), 'param_dtype must be one of'),
    (dict(dtype='float16'), 'dtype must be one of'),
    (dict(dtype='bfloat16', param_dtype='bfloat16'), 'not supported on CPU'),
    (dict(drafter='ngram', confidence_threshold=-0.1), 'confidence_threshold must be in'),
    (dict(drafter='ngram', policy_ks='1,2,8'), 'outside 0..draft_len=4'),
    (dict(drafter='ngram', costs='1,0,1.2,1.5'), 'costs must be positive'),
    (dict(drafter='ngram', costs='1,2'), '2 costs for 4 draft lengths'),
    (dict(drafter='ngram', costs='1,x'), 'comma-separated list of numbers'),
    (dict(drafter='ngram', acceptance_decay=1.5), 'acceptance_decay'),
    (dict(drafter='ngram', tree='2,0'), 'branching factor >= 1'),
    (dict(drafter='ngram', tree='wide'), 'such as 4,2,1'),
    (dict(drafter='draft_model', tree='2,1'), 'not draft_model'),
    (dict(tree='2,1'), 'needs a drafter'),
    (dict(drafter='ngram', tree='600'), "tree's 601 nodes need a cache larger than the model"),
    (dict(drafter='ngram', tree='50,1', cache_size=128), "tree's 101 nodes it needs a cache"),
    (dict(drafter='mtp+lookup', lookup=0), 'lookup must be >= 1'),
    (dict(drafter='mtp+lookup', lookup_unsure=1.5), 'lookup_unsure must be in [0, 1]'),
    (dict(drafter='mtp+lookup', lookup_sampled_min=2), 'lookup_sampled_min must be in [0, 1]'),
    (dict(drafter='mtp+lookup', tree='2,1'), 'trees are not drafted by mtp+lookup'),
    (dict(drafter='ngram+lookup'), 'unknown drafter'),
]


@pytest.mark.parametrize('overrides,needle', BAD, ids=[str(o) for o, _ in BAD])
def test_bad_input_is_one_clear_line(tmp_path, overrides, needle):
  assert needle in job_error(tmp_path, **overrides)
  assert not (tmp_path / 'o.jsonl').exists()


@pytest.mark.parametrize('content,needle', [
    ('{"prompt": "ok"}\n{"prompt": "broken"\n', ':2: not valid JSON'),
    ('{"prompt": ""}\n', ':1: "prompt" must be a non-empty string'),
    ('{"prompt_ids": []}\n', ':1: "prompt_ids" must be a non-empty list'),
    ('{"text": "x"}\n', ':1: each line needs exactly one of'),
    ('{"prompt_ids": [2, 999999]}\n', 'outside the vocabulary'),
    ('\n\n', 'no prompts'),
    (json.dumps({'prompt_ids': [2] + [50] * 600}) + '\n', 'cache'),   # longer than the cache
])
def test_bad_prompts_file(tmp_path, content, needle):
  p = tmp_path / 'p.jsonl'
  p.write_text(content)
  assert needle in job_error(tmp_path, prompts=str(p))


# Through the real command line: exit status 2 and one `error:` line, no
# traceback, for a job's own error and for errors of the flags themselves.
@pytest.mark.parametrize('args,needle', [
    (['--config.model=tiny', '--config.temperature=-0.5'], 'temperature'),   # the job's UserError
    (['--config.model=tiny', '--config.no_such_key=1'], 'no_such_key'),     # absl / ml_collections
    (['--config.model=tiny', '--config.max_new_tokens=many'], 'max_new_tokens'),
])
def test_bad_input_exits_2_with_one_error_line(args, needle):
  r = cli(*args)
  assert r.returncode == 2, r.stderr
  assert r.stderr.count('\n') == 1 and r.stderr.startswith('error:'), r.stderr
  assert needle in r.stderr and 'Traceback' not in r.stderr


def test_missing_config_file():
  env = dict(os.environ)
  r = subprocess.run([sys.executable, '-m', 'experiments.run', '--config=configs/nope.py'],
                     cwd=ROOT, env=env, capture_output=True, text=True)
  assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'nope.py' in r.stderr, r.stderr


@pytest.fixture(scope='module')
def tiny_job(tmp_path_factory):
  """Runs the job on the tiny model (11 new tokens) and returns (lines,
  summary); plain AR runs are kept for the module: the ngram and draft_model
  cases compare with the same AR run (one CLI process less)."""
  runs = {}

  def job(batch, parallel, devices, extra=()):
    key = (batch, parallel, devices, tuple(extra))
    if not extra and key in runs:
      return runs[key]
    out = tmp_path_factory.mktemp('job') / 'o.jsonl'
    r = cli('--config.model=tiny', f'--config.output={out}', '--config.max_new_tokens=11',
            f'--config.batch_size={batch}', f'--config.parallel={parallel}', *extra,
            devices=devices)
    assert r.returncode == 0, r.stderr
    runs[key] = ([json.loads(l) for l in out.read_text().splitlines()],
                 json.loads(r.stdout.strip().splitlines()[-1]))
    return runs[key]
  return job


@pytest.mark.parametrize('drafter,parallel', [('ngram', 'none'), ('draft_model', 'none'),
                                              ('ngram', 'pmap')])
def test_speculative_job_matches_autoregressive(tiny_job, drafter, parallel):
  """Greedy through the CLI: same completions as plain AR, fewer target calls
  for the target drafting for itself; pmap over the 8 fake devices too."""
  devices = 8 if parallel == 'pmap' else 1
  batch = '8' if parallel == 'pmap' else '2'
  # The dynamic draft length is on (the default); draft_model (the target
  # itself, always right) gets costs under which the longest k always pays,
  # the ngram runs measure theirs.
  given = (['--config.costs=1,1,1,1', '--config.confidence_threshold=0']
           if drafter == 'draft_model' else [])
  ar, ar_sum = tiny_job(batch, parallel, devices)
  spec, spec_sum = tiny_job(batch, parallel, devices, [
      f'--config.drafter={drafter}', '--config.draft_len=3', '--config.draft_model=target',
      *given])
  assert ar_sum['devices'] == spec_sum['devices'] == devices      # pmap: one row per device
  assert ar_sum['parallel'] == spec_sum['parallel'] == parallel
  assert [l['completion_ids'] for l in spec] == [l['completion_ids'] for l in ar]
  assert len(spec_sum['acceptance_by_position']) == 3 and spec_sum['draft_len'] == 3
  assert all(len(l['stats']['acceptance_by_position']) == 3 for l in spec)
  assert spec_sum['mean_accepted_per_call'] == round(spec_sum['new_tokens'] / spec_sum['target_calls'], 4)
  assert 0 < spec_sum['draft_calls'] <= spec_sum['target_calls']
  assert 0 < spec_sum['verify_rounds'] <= spec_sum['rounds']
  if parallel == 'pmap':             # the halves are timed on one device only
    assert spec_sum['draft_ms_per_round'] is None
    return
  # Draft vs verify time, each half measured alone.
  assert spec_sum['draft_ms_per_round'] > 0 and spec_sum['verify_ms_per_round'] > 0
  assert all(l['stats']['draft_seconds'] > 0 and l['stats']['verify_seconds'] > 0 for l in spec)
  assert ar_sum['draft_seconds'] is None
  assert spec_sum['dynamic'] and spec_sum['policy']['draft_lens'] == [0, 1, 2, 3]
  if drafter == 'draft_model':       # always right: ceil(11 / 4) = 3 calls per prompt
    assert spec_sum['target_calls'] == 3 * 3
    assert spec_sum['policy']['costs_from'] == 'config'
  else:
    assert spec_sum['policy']['costs_from'].startswith('measured on this machine')
    assert all(c > 0 for c in spec_sum['policy']['costs'])


@pytest.mark.slow
def test_gemma_demo_job(tmp_path):
  """The README's main job on the real model, shortened, with the policy's
  costs given: measuring them compiles a draft and a verify program per
  length on the real model (~1 min on a clean machine), and the measured
  path is test_speculative_job_matches_autoregressive's (tiny model)."""
  out = tmp_path / 'o.jsonl'
  r = cli(f'--config.output={out}', '--config.max_new_tokens=8', '--config.costs=1,1.1,1.2,1.3')
  assert r.returncode == 0, r.stderr
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert lines[0]['completion'].startswith(' the capital of')
  assert json.loads(r.stdout.strip().splitlines()[-1])['new_tokens'] == 24


def test_a_checkpoint_without_a_tokenizer_takes_prompt_ids(tmp_path):
  """A Hugging Face folder with no tokenizer file: prompt_ids work (lines
  carry ids, no text); text prompts (the demo's) are one error line."""
  folder = os.path.join(ROOT, 'tests', 'fixtures', 'hf_tiny', 'gemma3_mm')
  prompts = tmp_path / 'p.jsonl'
  prompts.write_text('{"prompt_ids": [2, 40, 41, 42]}\n')
  out = tmp_path / 'o.jsonl'
  r = cli(f'--config.model={folder}', f'--config.prompts={prompts}', f'--config.output={out}',
          '--config.max_new_tokens=4', '--config.drafter=ngram')
  assert r.returncode == 0, r.stderr
  line = json.loads(out.read_text())
  assert 'completion' not in line and len(line['completion_ids']) <= 4
  assert 'no tokenizer' in job_error(tmp_path, model=folder, output=str(tmp_path / 'x.jsonl'))
