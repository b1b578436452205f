"""Sum the per-test compile profile written by tests/conftest.py.

    SPECDEC_COMPILE_PROFILE=/tmp/prof python -m pytest -q -n 2 --dist loadfile tests
    python tools/compile_profile.py /tmp/prof [--top=30]

Prints, per test file and for the slowest tests, wall seconds and the part
spent tracing, lowering and compiling (jax.monitoring's timers, in the pytest
process only: subprocesses a test starts count as wall time).
"""
import argparse
import collections
import glob
import json
import os
import sys


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('folder')
  ap.add_argument('--top', type=int, default=30)
  args = ap.parse_args(argv)
  rows = []
  for path in glob.glob(os.path.join(args.folder, '*.jsonl')):
    with open(path) as f:
      rows += [json.loads(line) for line in f if line.strip()]
  if not rows:
    sys.exit(f'error: no profile lines under {args.folder}')
  keys = ('wall_s', 'trace_s', 'lower_s', 'compile_s', 'compiles')
  by_file = collections.defaultdict(lambda: dict.fromkeys(keys, 0))
  for r in rows:
    agg = by_file[r['test'].split('::')[0]]
    for k in keys:
      agg[k] += r.get(k, 0)
  head = f"{'wall s':>8} {'trace':>7} {'lower':>7} {'compile':>8} {'n':>5}  "
  line = lambda d: (f"{d['wall_s']:8.1f} {d['trace_s']:7.1f} {d['lower_s']:7.1f} "
                    f"{d['compile_s']:8.1f} {d['compiles']:5d}  ")
  total = {k: sum(d[k] for d in by_file.values()) for k in keys}
  print(head + 'file')
  for name, d in sorted(by_file.items(), key=lambda kv: -kv[1]['wall_s']):
    print(line(d) + name)
  print(line(total) + f'all {len(rows)} tests')
  print()
  print(head + 'test')
  for r in sorted(rows, key=lambda r: -r['wall_s'])[:args.top]:
    print(line(r) + r['test'])


if __name__ == '__main__':
  main()
