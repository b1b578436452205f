"""Append-only shard folders: numbered .npz files and a JSON manifest.

    folder/manifest.json          identity + settings + one entry per shard
    folder/shard-000000.npz       uncompressed npz of [rows, ...] arrays
    folder/log.jsonl              progress records (the writer's)

Every write is atomic (a temporary file in the folder, fsync, rename), the
shard before the manifest entry that names it: after a kill at any moment the
manifest lists only complete shards, and a shard it lists is checked against
its size and sha256 before use (`read`). Nothing else in the package knows
this format.
"""
import hashlib
import io
import json
import pathlib
import struct
import zipfile
from typing import Dict, Optional

import numpy as np

from specdec_jax.errors import UserError
from specdec_jax.outputs import write_atomic

MANIFEST = 'manifest.json'


def shard_name(i: int) -> str:
  return f'shard-{i:06d}.npz'


def load_manifest(folder: pathlib.Path) -> Optional[Dict]:
  """The manifest, None when the folder has none; UserError when unreadable."""
  path = pathlib.Path(folder) / MANIFEST
  if not path.is_file():
    return None
  try:
    m = json.loads(path.read_text())
    m['shards'], m['identity']          # the keys every reader needs
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise UserError(f'{path} is not a shard manifest ({type(e).__name__}: {e})') from None
  return m


def check_identity(folder: pathlib.Path, manifest: Dict, identity: Dict) -> None:
  """UserError naming the first difference: another target, another layout,
  other settings that fix the data."""
  old = manifest.get('identity', {})
  for key in list(identity) + [k for k in old if k not in identity]:   # the caller's order
    if old.get(key) != identity.get(key):
      raise UserError(f'shard folder {folder} was written with {key}={old.get(key)!r}, '
                      f'not {identity.get(key)!r}; use another folder (or the settings it was '
                      'written with)')


def write_manifest(folder: pathlib.Path, manifest: Dict) -> None:
  write_atomic(pathlib.Path(folder) / MANIFEST, (json.dumps(manifest, indent=1) + '\n').encode())


def append(folder: pathlib.Path, manifest: Dict, arrays: Dict[str, np.ndarray], **info) -> Dict:
  """Writes the next shard, then the manifest naming it; returns its entry."""
  folder = pathlib.Path(folder)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  data = buf.getvalue()
  name = shard_name(len(manifest['shards']))
  write_atomic(folder / name, data)
  entry = dict(file=name, rows=int(len(next(iter(arrays.values())))), bytes=len(data),
               sha256=hashlib.sha256(data).hexdigest(), **info)
  manifest['shards'].append(entry)
  write_manifest(folder, manifest)
  return entry


def check_sizes(folder: pathlib.Path, manifest: Dict) -> None:
  """Every listed shard present at its recorded size (cheap; `read` checks
  the content)."""
  for e in manifest['shards']:
    p = pathlib.Path(folder) / e['file']
    size = p.stat().st_size if p.is_file() else -1
    if size != e['bytes']:
      what = 'missing' if size < 0 else f'truncated or changed ({size} of {e["bytes"]} bytes)'
      raise UserError(f'shard {p} is {what}; delete the folder or restore the file')


def read(folder: pathlib.Path, entry: Dict, keys=None) -> Dict[str, np.ndarray]:
  """A listed shard's arrays, read into memory after `verify`."""
  with np.load(verify(folder, entry), allow_pickle=False) as z:
    return {k: z[k] for k in (keys or z.files)}


def verify(folder: pathlib.Path, entry: Dict) -> pathlib.Path:
  """The shard's path after checking its size and sha256 (streamed)."""
  p = pathlib.Path(folder) / entry['file']
  try:
    with p.open('rb') as f:
      digest = hashlib.file_digest(f, 'sha256').hexdigest()
    size = p.stat().st_size
  except OSError as e:
    raise UserError(f'shard {p} cannot be read ({e.strerror or e})') from None
  if size != entry['bytes'] or digest != entry['sha256']:
    raise UserError(f'shard {p} is corrupt or truncated (size or sha256 differs from '
                    f'{MANIFEST}); delete the folder or restore the file')
  return p


def open_mmap(folder: pathlib.Path, entry: Dict) -> Dict[str, np.ndarray]:
  """A listed shard's arrays memory-mapped (read-only), after `verify`.

  np.savez stores each array uncompressed as a .npy member of a zip, so the
  array's bytes sit contiguously in the file: map them in place instead of
  reading the shard (training gathers a few rows per step out of GBs).
  """
  p = verify(folder, entry)
  out = {}
  with zipfile.ZipFile(p) as z, p.open('rb') as f:
    for info in z.infolist():
      if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith('.npy'):
        raise UserError(f'shard {p}: member {info.filename} is not a stored .npy')
      f.seek(info.header_offset)
      local = f.read(30)                                # zip local file header
      name_len, extra_len = struct.unpack('<HH', local[26:30])
      f.seek(info.header_offset + 30 + name_len + extra_len)
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      out[info.filename[:-4]] = np.memmap(p, dtype=dtype, mode='r', offset=f.tell(), shape=shape,
                                          order='F' if fortran else 'C')
  return out
