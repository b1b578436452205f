"""The suite's own plumbing (tests/conftest.py): one compilation cache shared
by the whole run, and the per-test compile profile behind
tools/compile_profile.py."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
import compile_profile  # noqa: E402


def test_the_run_shares_one_compilation_cache():
  folder = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  assert folder and os.path.isdir(folder)
  assert jax.config.jax_compilation_cache_dir == folder
  before = set(os.listdir(folder))
  # A program no other test (nor an earlier run kept by SPECDEC_TEST_XLA_CACHE)
  # compiled: a constant drawn now is part of it. Its entry lands in the folder.
  c = 1.0 + int.from_bytes(os.urandom(4), 'little') / 2**32
  jax.jit(lambda x: jnp.cumsum(x * c) - 0.5)(jnp.arange(7.0)).block_until_ready()
  assert set(os.listdir(folder)) - before


def test_the_profile_records_each_test_and_the_tool_sums_it(tmp_path, capsys):
  prof = tmp_path / 'prof'
  env = dict(os.environ, SPECDEC_COMPILE_PROFILE=str(prof), JAX_PLATFORMS='cpu')
  env.pop('JAX_COMPILATION_CACHE_DIR')      # its own cache: this run's holds the program
  r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                      'tests/test_suite_tools.py::test_the_run_shares_one_compilation_cache'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  rows = [json.loads(line) for p in prof.glob('*.jsonl') for line in p.read_text().splitlines()]
  assert [row['test'] for row in rows] == [
      'tests/test_suite_tools.py::test_the_run_shares_one_compilation_cache']
  assert rows[0]['compiles'] >= 1 and 0 < rows[0]['compile_s'] < rows[0]['wall_s']
  compile_profile.main([str(prof)])
  out = capsys.readouterr().out
  assert 'tests/test_suite_tools.py' in out and 'all 1 tests' in out


def test_the_tool_sums_files_and_refuses_an_empty_folder(tmp_path, capsys):
  lines = [dict(test='tests/a.py::t1', wall_s=3.0, trace_s=1.0, lower_s=0.5, compile_s=1.0, compiles=2),
           dict(test='tests/a.py::t2', wall_s=1.0, trace_s=0.0, lower_s=0.0, compile_s=0.5, compiles=1),
           dict(test='tests/b.py::t3', wall_s=9.0, trace_s=0.0, lower_s=0.0, compile_s=0.0, compiles=0)]
  (tmp_path / '1.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines[:2]))
  (tmp_path / '2.jsonl').write_text(json.dumps(lines[2]) + '\n')
  compile_profile.main([str(tmp_path)])
  out = capsys.readouterr().out.splitlines()
  # Files by wall time, then the total.
  assert out[1].split()[-1] == 'tests/b.py' and out[2].split()[:5] == ['4.0', '1.0', '0.5', '1.5', '3']
  assert out[3].split()[:5] == ['13.0', '1.0', '0.5', '1.5', '3'] and out[3].endswith('all 3 tests')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(SystemExit, match='no profile lines'):
    compile_profile.main([str(empty)])
