"""Self-distilled data and drafter training inside a fixed time box, for a
borrowed accelerator (issue #14): the same jobs as on the CPU, sized by the
clock instead of by counts.

    python tools/accelerator_drafters.py --out=OUT --gen_seconds=120 --train_seconds=60
    python tools/accelerator_drafters.py --out=/tmp/rehearsal --variant=tiny \
        --gen_seconds=20 --train_seconds=15            # the tiny random target, on a CPU

1. configs/distill_data.py with `max_seconds=gen_seconds` (and `max_prompts`)
   writes shards into WORK/data;
   (`--gen_seconds=0` skips this and trains on the shards already there);
2. a short probe of configs/train_mtp.py on those shards measures seconds per
   step (the step is bound by gathering rows from the shards, the same for
   every drafter below at one batch size);
3. each drafter in DRAFTERS trains for ~train_seconds worth of steps (its own
   workdir, cosine schedule over those steps) and is exported;
4. OUT gets one .tar.gz per drafter (the exported folder, its log and
   stderr), logs.tar.gz (every job's stderr, the shard manifest and the data
   log, not the shards) and results.json: at most 5 files.

A job that fails is recorded (its stderr in OUT) and the next one runs. The
commands each step runs are printed, so any of them can be rerun by hand.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent

# name -> (config file, overrides): the shipped architecture, a deeper one, and
# the Medusa-style heads.
DRAFTERS = {
    'mtp': ('configs/train_mtp.py', {}),
    'mtp2': ('configs/train_mtp.py', {'num_layers': 2}),
    'heads': ('configs/train_heads.py', {}),
}


def job(config: str, overrides: dict, log: pathlib.Path, timeout: float) -> dict:
  cmd = [sys.executable, '-m', 'experiments.run', f'--config={config}']
  cmd += [f'--config.{k}={v}' for k, v in overrides.items()]
  print('$ ' + ' '.join(cmd[1:]), flush=True)
  t = time.time()
  log.parent.mkdir(parents=True, exist_ok=True)
  with log.open('w') as err:
    try:
      p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
                         timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
      print(f'  timed out after {timeout:.0f} s', flush=True)
      return dict(error='timeout')
  lines = p.stdout.strip().splitlines()
  tail = log.read_text().strip().splitlines()[-3:]
  print(f'  exit {p.returncode} after {time.time() - t:.0f} s; ' + ' | '.join(tail), flush=True)
  if p.returncode or not lines:
    return dict(error=f'exit {p.returncode}')
  return json.loads(lines[-1])


def seconds_per_step(workdir: pathlib.Path):
  """From the probe's log: the second half of its logged steps (past
  compilation); None when it logged too few."""
  try:
    recs = [json.loads(l) for l in (workdir / 'log.jsonl').read_text().splitlines()]
  except OSError:
    return None
  steps = [(r['step'], r['seconds']) for r in recs if r.get('kind') == 'train']
  if len(steps) < 2:
    return None
  (s0, t0), (s1, t1) = steps[len(steps) // 2 - 1], steps[-1]
  return (t1 - t0) / max(s1 - s0, 1)


def tokens_only(data: pathlib.Path, path: pathlib.Path):
  """The shards' small per-row arrays (tokens, labels, lengths, prompt
  lengths, greedy, source: ~1 KB per row) in one npz, so the generated text
  outlives the machine (the features, ~1 MB per row, do not travel)."""
  sys.path.insert(0, str(ROOT))
  from specdec_jax import shards
  try:
    m = shards.load_manifest(data)
    keys = ['tokens', 'labels', 'lengths', 'prompt_lengths', 'prompt_index', 'greedy', 'source']
    parts = [shards.read(data, e, keys) for e in m['shards']]
    np.savez_compressed(path, **{k: np.concatenate([p[k] for p in parts]) for k in keys})
    return path
  except Exception as e:                   # the results must still be packed
    print(f'tokens.npz not written: {type(e).__name__}: {e}', flush=True)
    return None


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--out', required=True)
  ap.add_argument('--work', default='/tmp/accelerator_drafters')
  ap.add_argument('--variant', default='', help="'tiny': the tiny random target (rehearsal)")
  ap.add_argument('--gen_seconds', type=float, required=True,
                  help='0: no generation; train on the shards already in WORK/data')
  ap.add_argument('--train_seconds', type=float, required=True, help='per drafter')
  ap.add_argument('--gen_batch', type=int, default=512)
  ap.add_argument('--max_prompts', type=int, default=24_576)
  ap.add_argument('--train_batch', type=int, default=64)
  ap.add_argument('--drafters', default=','.join(DRAFTERS))
  ap.add_argument('--probe_steps', type=int, default=40)
  ap.add_argument('--min_steps', type=int, default=50)
  ap.add_argument('--max_epochs', type=float, default=6,
                  help='at most this many passes over the rows (0: no cap): the 2026-11-27 '
                       'H200 run overfitted past ~9 (held-out best at step 800 of 3200)')
  ap.add_argument('--deadline', type=float, default=0,
                  help='seconds: no job runs past it (0: none); packing the results follows')
  a = ap.parse_args()
  out, work = pathlib.Path(a.out), pathlib.Path(a.work)
  out.mkdir(parents=True, exist_ok=True)
  work.mkdir(parents=True, exist_ok=True)
  suffix = f':{a.variant}' if a.variant else ''
  t_start = time.time()
  left = lambda want: (min(want, a.deadline - (time.time() - t_start) - 20) if a.deadline
                       else want)
  data, logs = work / 'data', work / 'logs'
  # Data resume; the probe and the training runs are sized anew each time.
  for d in [work / 'probe', logs] + [work / f'train_{n}' for n in DRAFTERS]:
    shutil.rmtree(d, ignore_errors=True)
  if a.gen_seconds > 0:
    r = job(f'configs/distill_data.py{suffix}',
            dict(folder=data, batch_size=a.gen_batch, shard_rows=a.gen_batch,
                 max_prompts=a.max_prompts, max_seconds=a.gen_seconds),
            logs / 'data.stderr', left(a.gen_seconds * 3 + 300))
  elif (data / 'manifest.json').is_file():
    r = dict(reused=str(data))
  else:
    sys.exit(f'error: --gen_seconds=0 reuses {data}, which holds no shards')
  results = {'data': r}
  try:
    rows = sum(e['rows'] for e in json.loads((data / 'manifest.json').read_text())['shards'])
  except (OSError, ValueError, KeyError):
    rows = 0
  common = dict(shards=data, batch_size=a.train_batch, eval_rows=8 * a.train_batch,
                log_every=10, checkpoint_every=10**6)
  probe = work / 'probe'
  r = job(f'configs/train_mtp.py{suffix}',
          dict(common, workdir=probe, output='', steps=10**6, log_every=max(1, a.probe_steps // 4),
               stop_at_step=a.probe_steps, eval_every=10**6), logs / 'probe.stderr', left(600))
  rate = seconds_per_step(probe) if 'error' not in r else None
  results['seconds_per_step'] = rate
  print(f'probe: {rate} s per step of {a.train_batch} rows', flush=True)
  for name in a.drafters.split(','):
    if rate is None or left(10**9) < a.train_seconds:
      print(f'{name}: skipped (no step rate, or too little time left)', flush=True)
      continue
    config, extra = DRAFTERS[name]
    # The probe's rate leaves out evaluations and the export: ~1.4x measured
    # on the H200 (0.025 s/step probed, 0.036 over a 3200-step run).
    steps = max(a.min_steps, int(a.train_seconds / (1.4 * max(rate, 1e-3))))
    if rows and a.max_epochs:
      steps = min(steps, max(a.min_steps, int(a.max_epochs * rows / a.train_batch)))
    wd = work / f'train_{name}'
    r = job(f'{config}{suffix}',
            dict(common, **extra, workdir=wd, output=wd / 'drafter', steps=steps,
                 warmup_steps=max(10, steps // 20), eval_every=max(1, steps // 4)),
            logs / f'{name}.stderr', left(a.train_seconds * 3 + 300))
    results[name] = r
    if 'error' not in r:
      with tarfile.open(out / f'{name}.tar.gz', 'w:gz') as tf:
        tf.add(wd / 'drafter', arcname=name)
        tf.add(wd / 'log.jsonl', arcname=f'{name}/train_log.jsonl')
        tf.add(logs / f'{name}.stderr', arcname=f'{name}/train.stderr')
  results['seconds'] = round(time.time() - t_start, 1)
  (out / 'results.json').write_text(json.dumps(results, indent=1, default=str) + '\n')
  tokens = tokens_only(data, work / 'tokens.npz')
  with tarfile.open(out / 'logs.tar.gz', 'w:gz') as tf:
    if tokens:
      tf.add(tokens, arcname='data/tokens.npz')
    tf.add(logs, arcname='logs')
    for f in ('manifest.json', 'log.jsonl'):
      if (data / f).is_file():
        tf.add(data / f, arcname=f'data/{f}')
  print(json.dumps(results, default=str), flush=True)


if __name__ == '__main__':
  main()
