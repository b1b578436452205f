"""experiments/bench_hf.py runs each peer system in its own process: one that
crashes keeps the rows it finished, costs the others nothing, and is named.

The real inner processes need torch and llama-cpp-python in a throwaway venv;
here the inner script is the real `inner` with fake systems: HF finishes 3
rows, llama.cpp finishes 2 and then dies of SIGSEGV as llama-cpp-python 0.3.36
did on the Gemma GGUF (exit 139 in a shell).
"""
import json
import os
import signal
import sys

from experiments import bench_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_INNER = f"""
import os, signal, sys
sys.path.insert(0, {ROOT!r})
from experiments import bench_hf

def fake(system, rows, crash):
  def run(job, out):
    out.write(meta=dict(versions={{system: '1.0'}}))
    for i in range(rows):
      out.write(row=dict(system=system, domain='code', prompt_index=i, seed=job['seed']))
    if crash:
      os.kill(os.getpid(), signal.SIGSEGV)
  return run

bench_hf.run_hf = fake('hf', 3, False)
bench_hf.run_llama_cpp = fake('llama.cpp', 2, True)
if __name__ == '__main__':
  bench_hf.inner(*sys.argv[2:5])
"""


def test_a_crashing_system_keeps_its_rows_and_is_named(tmp_path):
  script = tmp_path / 'fake_inner.py'
  script.write_text(FAKE_INNER)
  job = tmp_path / 'job.json'
  job.write_text(json.dumps(dict(seed=7)))
  rows, meta, crashed = bench_hf.run_systems(sys.executable, ['hf', 'llama.cpp'], job, tmp_path,
                                             script=script)
  assert crashed == {'llama.cpp': -signal.SIGSEGV}           # hf exited 0: not listed
  # Every row either system finished, the crashed one's included.
  assert [(r['system'], r['prompt_index']) for r in rows] == [
      ('hf', 0), ('hf', 1), ('hf', 2), ('llama.cpp', 0), ('llama.cpp', 1)]
  assert all(r['seed'] == 7 for r in rows)                  # each process read the job
  assert meta['versions'] == {'hf': '1.0', 'llama.cpp': '1.0'}

  header = '| system | domain | drafter | k |'
  marker, = bench_hf.crash_rows(crashed, rows, header)
  assert marker == (f'| llama.cpp | crashed (exit status {-signal.SIGSEGV}, signal '
                    f'{signal.SIGSEGV}) after 2 rows | – | – |')
  assert bench_hf.crash_rows({}, rows, header) == []
