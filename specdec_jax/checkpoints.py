"""The shipped drafter format: one folder, the only code that knows it.

    <dir>/drafter.npz    the parameters, flattened with '/'-joined names
    <dir>/drafter.json   {"format", "kind", "config", "sha256", "target", "training"}
    <dir>/NOTICE         (and the Gemma terms when the target is Gemma)

`load_drafter` checks the file's SHA-256 against the manifest before it reads
a single array, so a truncated or corrupted checkpoint never loads silently.
(Training checkpoints, for resuming, are orbax's; see train.py.)
"""
import hashlib
import io
import json
import os
import pathlib
import tempfile

import numpy as np

from specdec_jax.drafter_models import DrafterConfig

FORMAT = 1


class CheckpointError(ValueError):
  pass


def flatten(tree, prefix=''):
  """Nested dict of arrays -> {'a/b/c': np.ndarray}."""
  out = {}
  for k, v in tree.items():
    name = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, name + '/'))
    else:
      out[name] = np.asarray(v)
  return out


def unflatten(flat):
  """{'a/b/c': x} -> nested dict (the inverse of flatten)."""
  tree = {}
  for name, v in flat.items():
    node = tree
    *path, leaf = name.split('/')
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def sha256_file(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def save_drafter(directory, dcfg: DrafterConfig, params: dict, *, target: dict,
                 training: dict, dtype: str = 'float32', notice: str = '',
                 extra_files: dict = None) -> pathlib.Path:
  """Writes the folder atomically enough: arrays first, manifest last.

  `dtype` is the storage dtype of the float arrays (float16 halves the size;
  loading converts back to the target's dtype).
  """
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  flat = flatten(params)
  flat = {k: (v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v)
          for k, v in flat.items()}
  buf = io.BytesIO()
  np.savez(buf, **flat)
  npz = d / 'drafter.npz'
  with tempfile.NamedTemporaryFile(dir=d, delete=False) as f:
    f.write(buf.getvalue())
  os.chmod(f.name, 0o644)
  os.replace(f.name, npz)
  manifest = dict(format=FORMAT, kind=dcfg.kind, config=dcfg.to_dict(),
                  sha256=sha256_file(npz), target=target, training=training)
  (d / 'drafter.json').write_text(json.dumps(manifest, indent=1) + '\n')
  if notice:
    (d / 'NOTICE').write_text(notice)
  for name, text in (extra_files or {}).items():
    (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
  return d


def load_drafter(directory, param_dtype: str = 'float32'):
  """-> (DrafterConfig, params {'net': ..., 'vocab': ...}, manifest).

  Matrices come back in `param_dtype`, norm scales in float32, whatever the
  storage dtype.

  Raises CheckpointError (one line) for a missing folder or file, a manifest
  that does not parse, a checksum mismatch (truncated / corrupt), or arrays
  that do not match the config's shapes.
  """
  d = pathlib.Path(directory)
  man_path, npz = d / 'drafter.json', d / 'drafter.npz'
  for p in (man_path, npz):
    if not p.is_file():
      raise CheckpointError(f'drafter checkpoint {d}: missing {p.name}')
  try:
    manifest = json.loads(man_path.read_text())
    dcfg = DrafterConfig.from_dict(manifest['config'])
    expected = manifest['sha256']
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'drafter checkpoint {d}: unreadable drafter.json ({e})') from None
  if manifest.get('format') != FORMAT:
    raise CheckpointError(f'drafter checkpoint {d}: format {manifest.get("format")}, '
                          f'this code reads {FORMAT}')
  actual = sha256_file(npz)
  if actual != expected:
    raise CheckpointError(f'drafter checkpoint {d}: drafter.npz is corrupt or truncated '
                          f'(sha256 {actual[:12]}..., manifest says {expected[:12]}...)')
  with np.load(npz) as z:
    flat = {k: z[k] for k in z.files}
  from specdec_jax.model import is_matrix
  flat = {k: (v.astype(param_dtype if is_matrix(k, v) else np.float32)
              if np.issubdtype(v.dtype, np.floating) else v) for k, v in flat.items()}
  params = unflatten(flat)
  _check_shapes(d, dcfg, params)
  return dcfg, params, manifest


def _shapes(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_shapes(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = tuple(np.shape(v))
  return out


def _check_shapes(d, dcfg, params):
  import jax
  from specdec_jax.drafter_models import init_net_params
  want = _shapes(jax.eval_shape(lambda: init_net_params(dcfg, jax.random.key(0))))
  got = _shapes(params.get('net', {}))
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:3]
    raise CheckpointError(f'drafter checkpoint {d}: parameters do not match its config ({diff})')
  if tuple(np.shape(params.get('vocab'))) != (dcfg.draft_vocab_size,):
    raise CheckpointError(f'drafter checkpoint {d}: vocab has shape '
                          f'{np.shape(params.get("vocab"))}, expected ({dcfg.draft_vocab_size},)')
