"""experiments/bench_costs.py: the draft-length policy's projection and the
entries' bad input (the timing itself runs on the real model: docs)."""
import subprocess
import sys

import pytest

from experiments import bench_costs

ROOT = bench_costs.pathlib.Path(__file__).resolve().parent.parent


def test_policy_projection_brackets_the_rounds_cost():
  """6 rounds: 2 plain steps, 1 drafted 1 and verified 1, 3 drafted 4 of
  which 1 verified 4, 1 verified 2 and 1 verified nothing (a plain step
  after drafting). 20 tokens."""
  ks, costs = (0, 1, 2, 4), [1.0, 1.1, 1.2, 1.5]
  counts = {'rounds_by_drafted_len': {'0': 2, '1': 1, '2': 0, '4': 3},
            'rounds_by_verified_len': {'0': 3, '1': 1, '2': 1, '4': 1}}
  lo, hi = bench_costs.policy_projection(counts, costs, ks, 20)
  assert lo == round(20 / (2 * 1.0 + 1.1 + 3 * 1.5), 3)
  assert hi == round(20 / (3 * 1.0 + 1.1 + 1.2 + 1.5), 3)
  assert lo < hi


@pytest.mark.parametrize('args, error', [
    (['--drafters=mtp:0:dynamic'], "want kind:K:dynamic with K >= 1"),
    (['--drafters=ngram:dyn4'], 'which ngram has not'),
    (['--drafters=mtp:2x0'], 'branching factor >= 1'),
    (['--policy_costs_from=/nonexistent.json'], '--policy_costs_from=/nonexistent.json'),
])
def test_bad_entries_are_one_error_line(args, error):
  r = subprocess.run([sys.executable, '-m', 'experiments.bench_costs', *args], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith('error: ') and error in r.stderr, r.stderr
