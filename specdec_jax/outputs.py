"""Result files that survive a kill: refused, resumed or overwritten, never mixed.

    out = outputs.JsonlOutput(path, settings, resume=c.resume, overwrite=c.overwrite)
    done = out.done                   # keys of the complete lines already there (resume)
    ...                               # load the model, compile
    out.write(lines)                  # one batch: written, flushed and fsynced

An existing file is refused (one UserError line) unless `resume` (keep its
complete lines, drop a torn last line, append the rest) or `overwrite`
(replace it; the old file stays until the first batch is written). The
settings that determine its lines sit beside it in `<name>.meta.json`,
written atomically before the first line; `resume` refuses a file whose
settings differ. A line reaches the disk with its batch, so a kill loses at
most the batch in flight.
"""
import json
import os
import pathlib
import tempfile
from typing import Callable, Dict, Iterable, List, Optional

from specdec_jax.errors import UserError

HINT = 'set --config.resume=true to continue it or --config.overwrite=true to replace it'


def check_resume_flags(c) -> None:
  if c.get('resume', False) and c.get('overwrite', False):
    raise UserError('resume and overwrite exclude each other: resume continues the output, '
                    'overwrite replaces it; set one')


def check_writable_dir(folder: pathlib.Path, what: str) -> None:
  """Creates `folder` (and parents) and proves a file can be made there, so
  a bad path fails before the model loads, not after generating."""
  try:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix='.probe-'):
      pass
  except OSError as e:
    raise UserError(f'{what}: cannot write in {folder} ({e.strerror or e})') from None


def write_atomic(path: pathlib.Path, data) -> None:
  """Replaces `path` by `data` (str or bytes) all at once (a temporary file,
  fsync, rename)."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
  try:
    os.fchmod(fd, 0o644)                 # mkstemp's 0600 would hide results from others
    with os.fdopen(fd, 'wb') as f:
      f.write(data.encode('utf-8') if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def read_complete_lines(path: pathlib.Path):
  """(parsed complete lines, byte length they span): a last line without its
  newline (a write cut short by a kill) is left out."""
  data = path.read_bytes()
  end = data.rfind(b'\n') + 1
  rows = []
  for n, line in enumerate(data[:end].splitlines(), 1):
    try:
      rows.append(json.loads(line))
    except ValueError:
      raise UserError(f'{path}:{n} is not a JSON line; this is not a file the job wrote '
                      '(set --config.overwrite=true to replace it)') from None
  return rows, end


def differences(stored: Dict, now: Dict) -> List[str]:
  keys = sorted(set(stored) | set(now))
  return [f'{k}: {stored.get(k)!r} there, {now.get(k)!r} now' for k in keys
          if stored.get(k) != now.get(k)]


def fsync_append(f, lines: Iterable[str]) -> None:
  for line in lines:
    f.write(line + '\n')
  f.flush()
  os.fsync(f.fileno())


class JsonlOutput:
  """A JSONL output file with its settings beside it; see the module doc.

  `key(line)` names a line's unit (the job: (index, sample)); `done` holds
  the keys of the complete lines kept by `resume`. Nothing is written until
  `write` is first called."""

  def __init__(self, path, settings: Dict, *, resume: bool, overwrite: bool,
               key: Callable[[dict], tuple]):
    self.path = pathlib.Path(path)
    self.meta_path = self.path.with_name(self.path.name + '.meta.json')
    self.settings = json.loads(json.dumps(settings))       # as stored: lists, not tuples
    self.overwrite = overwrite
    self.done, self.keep_bytes = set(), None
    self._file = None
    if self.path.is_dir():
      raise UserError(f'output {self.path} is a folder; name a JSONL file')
    check_writable_dir(self.path.parent, f'output {self.path}')
    if not self.path.exists() or overwrite:
      return
    if not resume:
      raise UserError(f'output {self.path} already exists; {HINT}')
    try:
      stored = json.loads(self.meta_path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
      raise UserError(f'cannot resume {self.path}: {self.meta_path.name} is missing or '
                      'unreadable, so its settings are unknown; set --config.overwrite=true '
                      'to replace it') from None
    diff = differences(stored, self.settings)
    if diff:
      raise UserError(f'cannot resume {self.path}: it was written with other settings '
                      f'({"; ".join(diff)}); use them, another output, or '
                      '--config.overwrite=true')
    rows, self.keep_bytes = read_complete_lines(self.path)
    for row in rows:
      try:
        self.done.add(key(row))
      except (KeyError, TypeError):
        raise UserError(f'cannot resume {self.path}: a line lacks its key fields') from None

  def write(self, lines: Iterable[str]) -> None:
    """Appends `lines` (JSON strings) and syncs them to disk."""
    if self._file is None:
      self._file = self._open()
    fsync_append(self._file, lines)

  def _open(self):
    if self.keep_bytes is not None:               # resume: drop a torn last line
      os.truncate(self.path, self.keep_bytes)
      return self.path.open('a', encoding='utf-8')
    # Fresh or overwrite: the old file goes first and the settings come
    # before any line, so a kill in between never pairs lines with the
    # wrong settings.
    self.path.unlink(missing_ok=True)
    write_atomic(self.meta_path, json.dumps(self.settings, indent=1, sort_keys=True) + '\n')
    return self.path.open('w', encoding='utf-8')

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def file_digest(path) -> Optional[str]:
  """sha256 of a file's bytes (None when there is no path)."""
  import hashlib
  if not path:
    return None
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()
