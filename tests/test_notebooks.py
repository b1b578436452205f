"""Every notebook in colab/ runs top to bottom (small settings), as a researcher would run it."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / 'colab').glob('*.ipynb'))


def test_the_three_notebooks_exist_and_are_stripped():
  assert [p.name for p in NOTEBOOKS] == ['ablation.ipynb', 'quickstart.ipynb',
                                         'train_drafter.ipynb']
  for path in NOTEBOOKS:
    nb = json.loads(path.read_text())
    for cell in nb['cells']:
      if cell['cell_type'] == 'code':
        assert not cell['outputs'] and cell['execution_count'] is None, path.name
    tagged = [c for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(tagged) == 1 and 'SMALL = False' in ''.join(tagged[0]['source']), path.name


@pytest.mark.slow
@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:                     # papermill-style parameter injection
    if 'parameters' in cell.metadata.get('tags', []):
      cell.source = 'SMALL = True'
  env_backup = dict(os.environ)
  os.environ.pop('XLA_FLAGS', None)         # one CPU device, as on a plain Colab CPU runtime
  os.environ['JAX_PLATFORMS'] = 'cpu'
  try:
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                                     resources={'metadata': {'path': str(tmp_path)}})
    client.execute()                        # raises CellExecutionError on any failing cell
  finally:
    os.environ.clear()
    os.environ.update(env_backup)
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.outputs if o.get('output_type') == 'stream')
  assert 'specdec_jax from' in text
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
            if 'image/png' in o.get('data', {})]
  assert images, 'every notebook shows at least one plot'


def test_first_cell_says_what_to_install_when_the_package_is_missing(tmp_path):
  """The install cell, run by a Python where specdec_jax cannot be imported."""
  nb = json.loads((ROOT / 'colab' / 'quickstart.ipynb').read_text())
  first = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code')
  script = tmp_path / 'cell.py'
  script.write_text(first + '\n')
  # -I -S: no site-packages, so no specdec_jax (nor anything else installed).
  r = subprocess.run([sys.executable, '-I', '-S', str(script)], cwd=tmp_path, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode != 0
  assert 'specdec_jax is not installed' in r.stderr and 'pip install -e .' in r.stderr
  assert 'Traceback' not in r.stderr
  for path in NOTEBOOKS:                     # every notebook starts with the same cell
    cells = json.loads(path.read_text())['cells']
    assert next(''.join(c['source']) for c in cells if c['cell_type'] == 'code') == first
