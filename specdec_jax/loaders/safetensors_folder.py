"""A local Hugging Face checkpoint folder, read lazily one tensor at a time.

    folder = open_hf_folder('/path/to/gemma-3-1b-pt')
    folder.text_config['hidden_size']         # the text model's config
    for name in folder.names(): x = folder.get(name)   # np.ndarray, on demand

The folder holds `config.json` and either one `model.safetensors` (or any
`*.safetensors` files) or shards listed by `model.safetensors.index.json`.
Every file's header is read (and checked against the file's length) when the
folder is opened, so a truncated or corrupt file fails before any weight is
loaded; the data are memory-mapped and copied out only by `get`, so a caller
that places each tensor on its device right away never holds two copies of
a big checkpoint in host memory. bfloat16 tensors come back as ml_dtypes'
bfloat16 numpy arrays (the `safetensors` numpy backend reads them directly).

The only module that knows the safetensors folder layout; architectures map
the names (see hf_gemma3.py).
"""
import json
import pathlib
from typing import Dict, List, Tuple

import ml_dtypes  # noqa: F401  registers numpy's 'bfloat16', which safetensors asks for
import numpy as np

from specdec_jax.errors import UserError

INDEX = 'model.safetensors.index.json'
# Multimodal model types whose language model sits under `text_config`.
_MULTIMODAL = ('gemma3', 'gemma4')


def is_hf_folder(path) -> bool:
  """True for a directory with a config.json (what `open_hf_folder` reads)."""
  p = pathlib.Path(path)
  return p.is_dir() and (p / 'config.json').is_file()


def _read_json(path: pathlib.Path, what: str) -> dict:
  try:
    out = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise UserError(f'{path}: unreadable {what} ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""})') from None
  if not isinstance(out, dict):
    raise UserError(f'{path}: {what} is not a JSON object')
  return out


def _open_file(path: pathlib.Path):
  """A safetensors handle; its header is parsed and checked against the length."""
  from safetensors import safe_open
  try:
    return safe_open(str(path), framework='numpy')
  except Exception as e:   # SafetensorError and OSError: one line either way
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f'{path}: not a readable safetensors file '
                    f'(truncated or corrupt?): {msg}') from None


class HFFolder:
  """config.json plus lazy access to every tensor of the folder's safetensors.

  Attributes: `path` (pathlib.Path), `config` (config.json as a dict),
  `text_config` (the text model's sub-config for multimodal model types,
  else `config` itself).
  """

  def __init__(self, path: pathlib.Path, config: dict, files: Dict[str, pathlib.Path],
               where: Dict[str, str]):
    self.path = path
    self.config = config
    text = config.get('text_config') if config.get('model_type') in _MULTIMODAL else None
    self.text_config = text if isinstance(text, dict) else config
    self._files = files                 # file name -> path
    self._where = where                 # tensor name -> file name
    self._handles = {}

  def __repr__(self):
    return f'HFFolder({str(self.path)!r}, {len(self._where)} tensors)'

  @property
  def model_type(self) -> str:
    return str(self.config.get('model_type', ''))

  def names(self) -> List[str]:
    """Every tensor name, sorted."""
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def _handle(self, name: str):
    if name not in self._where:
      raise UserError(f'{self.path}: tensor {name!r} is missing from the checkpoint')
    fname = self._where[name]
    if fname not in self._handles:
      self._handles[fname] = _open_file(self._files[fname])
    return self._handles[fname]

  def shape(self, name: str) -> Tuple[int, ...]:
    """A tensor's shape, read from its file's header (no data loaded)."""
    return tuple(self._handle(name).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    """One tensor as a numpy array (bfloat16 via ml_dtypes), read on demand."""
    h = self._handle(name)
    try:
      return h.get_tensor(name)
    except Exception as e:   # a data range the header promised but cannot be read
      raise UserError(f'{self.path}: cannot read tensor {name!r} from '
                      f'{self._where[name]}: {str(e).splitlines()[0] if str(e) else e!r}') from None

  def close(self) -> None:
    """Drops the open handles (their memory maps); `get` reopens on demand."""
    self._handles.clear()


def open_hf_folder(path) -> HFFolder:
  """Opens a local HF checkpoint folder: config.json and its safetensors.

  Raises UserError (one line) for a missing folder, a missing or unreadable
  config.json, no safetensors, an index naming a file that is not there, or
  a truncated / corrupt safetensors file.
  """
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise UserError(f'checkpoint folder not found: {root}')
  if not (root / 'config.json').is_file():
    raise UserError(f'{root}: no config.json (not a Hugging Face checkpoint folder)')
  config = _read_json(root / 'config.json', 'config.json')
  files: Dict[str, pathlib.Path] = {}
  where: Dict[str, str] = {}
  handles = {}
  if (root / INDEX).is_file():
    weight_map = _read_json(root / INDEX, INDEX).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise UserError(f'{root / INDEX}: no weight_map')
    for fname in sorted(set(weight_map.values())):
      p = root / fname
      if not p.is_file():
        raise UserError(f'{root}: {INDEX} names {fname}, which is missing')
      files[fname] = p
      handles[fname] = _open_file(p)
    for name, fname in weight_map.items():
      if name not in handles[fname].keys():
        raise UserError(f'{root}: {INDEX} puts {name!r} in {fname}, which lacks it')
      where[name] = fname
  else:
    paths = sorted(root.glob('*.safetensors'))
    if not paths:
      raise UserError(f'{root}: no *.safetensors files (and no {INDEX})')
    for p in paths:
      files[p.name] = p
      handles[p.name] = _open_file(p)
      for name in handles[p.name].keys():
        if name in where:
          raise UserError(f'{root}: tensor {name!r} is in both {where[name]} and {p.name}')
        where[name] = p.name
  folder = HFFolder(root, config, files, where)
  folder._handles = handles
  return folder


# ----------------------------------------------------------------------------- shared by the Gemma loaders

# Where a Gemma language model's tensors sit: `model.` (*_text checkpoints),
# `model.language_model.` (transformers >= 4.52 in memory) or
# `language_model.model.` (the published multimodal checkpoints, and
# transformers 5 on save).
LANGUAGE_MODEL_PREFIXES = ('model.language_model.', 'language_model.model.', 'model.')


def language_model_prefix(folder: HFFolder, what: str) -> str:
  """The prefix under which `folder` holds its language model (`what`, e.g.
  'Gemma 3', names it in the error line)."""
  for p in LANGUAGE_MODEL_PREFIXES:
    if p + 'embed_tokens.weight' in folder:
      return p
  raise UserError(f'{folder.path}: no {what} language model in the checkpoint (looked for '
                  + ', '.join(p + 'embed_tokens.weight' for p in LANGUAGE_MODEL_PREFIXES) + ')')


def config_value(folder: HFFolder, key: str, defaults: dict, *, keep_null: bool = False):
  """A text-config value as transformers reads it: text_config first, then
  the top level (ids sit there in multimodal configs), else `defaults[key]`.
  A null counts as absent unless `keep_null` (for keys where null means
  something, e.g. Gemma 4's hidden_size_per_layer_input: null = no PLE)."""
  for d in (folder.text_config, folder.config):
    if key in d and (keep_null or d[key] is not None):
      return d[key]
  return defaults[key]


def token_ids(get) -> dict:
  """bos_id, eos_id, pad_id and eos_ids of a model config, from `get(key)`
  (a config_value). Instruction-tuned configs list several stop ids (e.g.
  [1, 106]: <eos>, <end_of_turn>): eos_id is the first, and generation stops
  on any of eos_ids."""
  first = lambda x: int(x[0] if isinstance(x, (list, tuple)) else x)
  eos = get('eos_token_id')
  return dict(bos_id=first(get('bos_token_id')), eos_id=first(eos),
              pad_id=first(get('pad_token_id')),
              eos_ids=tuple(int(i) for i in eos) if isinstance(eos, (list, tuple)) else ())


def check_shapes(folder: HFFolder, prefix: str, parts) -> None:
  """UserError (one line) unless each (name, shape) in `parts` has that shape
  in the file headers: run before any tensor is read."""
  for name, want in parts:
    got = folder.shape(prefix + name)
    if got != want:
      raise UserError(f'{folder.path}: {prefix + name} has shape {list(got)} but '
                      f'config.json implies {list(want)}')
