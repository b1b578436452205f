"""Target models by name: the real Gemma 3 270M, a tiny random model, a
target trained from scratch, a local Hugging Face checkpoint folder, or a
Gemma 3 orbax checkpoint of the `gemma` library."""
import dataclasses
import importlib.util
import pathlib
import sys
from typing import Any

import jax

from specdec_jax import config as config_lib
from specdec_jax.errors import UserError
from specdec_jax.model import init_params
from specdec_jax.tokenizer import ByteTokenizer

TARGETS = ('gemma3_270m', 'tiny')


# HF model types by loader module (specdec_jax.loaders.<module>).
HF_MODEL_TYPES = {'gemma3_text': 'hf_gemma3', 'gemma3': 'hf_gemma3',
                  'gemma4_text': 'hf_gemma4', 'gemma4': 'hf_gemma4'}


def check_model_name(name: str) -> None:
  """UserError unless `name` is a known target, a trained target folder, a
  Hugging Face checkpoint folder (one with config.json) or a Gemma 3 orbax
  checkpoint of the `gemma` library."""
  from specdec_jax import target_training
  from specdec_jax.loaders.orbax_gemma import is_orbax_dir
  from specdec_jax.loaders.safetensors_folder import is_hf_folder
  if (name in TARGETS or target_training.is_target_dir(name) or is_hf_folder(name)
      or is_orbax_dir(name)):
    return
  if pathlib.Path(name).expanduser().is_dir():
    raise UserError(f'{name}: no config.json (a Hugging Face checkpoint folder) nor '
                    'target.json (a trained target folder)')
  raise UserError(f'unknown model {name!r}; choose one of {", ".join(TARGETS)}, '
                  'a trained target folder (one with target.json), a Hugging Face '
                  'checkpoint folder (one with config.json) or a Gemma 3 orbax checkpoint')


@dataclasses.dataclass
class Target:
  name: str
  config: config_lib.ModelConfig
  params: Any
  tokenizer: Any
  precision: str = ''      # why these weight / activation dtypes (precision.resolve)


def _gemma_terms_notice(url_or_path: str) -> None:
  print(f'Gemma weights: use is subject to the Gemma Terms of Use ({url_or_path})',
        file=sys.stderr)


def load_hf_folder(path, *, param_dtype: str, dtype: str, sharding=None):
  """(config, params on device, tokenizer or None) for a HF checkpoint folder,
  by its config.json's model_type. `sharding`: a per-leaf sharding function
  (loaders.placement); each tensor is placed as it is read."""
  from specdec_jax.loaders.safetensors_folder import open_hf_folder
  folder = open_hf_folder(path)
  module = HF_MODEL_TYPES.get(folder.model_type)
  if folder.model_type == 'gemma4_assistant':
    raise UserError(f'{folder.path} is a Gemma 4 assistant (a drafter), not a target: pass it '
                    'as drafter_checkpoint with drafter=mtp')
  if module is None:
    raise UserError(f'{folder.path}: model_type {folder.model_type!r} is not supported; '
                    f'supported: {", ".join(HF_MODEL_TYPES)}')
  if importlib.util.find_spec(f'specdec_jax.loaders.{module}') is None:
    raise UserError(f'{folder.path}: {folder.model_type} support is not installed')
  loader = importlib.import_module(f'specdec_jax.loaders.{module}')
  cfg, params, tok = loader.load(folder, param_dtype=param_dtype, dtype=dtype,
                                 sharding=sharding)
  if folder.model_type.startswith('gemma3'):
    _gemma_terms_notice('https://ai.google.dev/gemma/terms')
  else:
    print(f'{folder.model_type} weights: use is subject to their license (see the '
          'checkpoint\'s model card)', file=sys.stderr)
  _print_param_memory(params, param_dtype, tok)
  return cfg, params, tok


def _print_param_memory(params, param_dtype, tok) -> None:
  from specdec_jax.loaders import placement
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  print(f'target params: {n:,} parameters, '
        f'{placement.param_bytes(params) / 2**20:.1f} MiB ({param_dtype} matrices, '
        f'float32 norms){"" if tok else "; no tokenizer: prompt_ids prompts only"}',
        file=sys.stderr)


def load_target(name: str, *, gguf: str = '', param_dtype: str = 'float32',
                dtype: str = 'float32', seed: int = 0, sharding=None) -> Target:
  """'gemma3_270m': the packaged GGUF (or `gguf`); 'tiny': random weights, byte
  tokenizer; the folder of a target trained from scratch (target_training.py);
  a local Hugging Face checkpoint folder (config.json + safetensors: Gemma 3
  and Gemma 4, see `HF_MODEL_TYPES`); or a Gemma 3 orbax checkpoint of the
  `gemma` library (loaders/orbax_gemma.py). Checkpoints are read tensor by
  tensor and placed as read (`sharding`: a per-leaf function, see
  loaders/placement.py; checkpoint folders only).
  Its tokenizer may be None (a folder with neither tokenizer.model nor
  tokenizer.json).

  `param_dtype` ('auto', 'bfloat16', 'float32') is the weights' dtype, `dtype`
  the activations'; 'auto' is resolved by precision.resolve. The default keeps
  the exact float32 model.
  """
  from specdec_jax import precision, target_training
  from specdec_jax.loaders.orbax_gemma import is_orbax_dir
  from specdec_jax.loaders.safetensors_folder import is_hf_folder
  param_dtype, dtype, why = precision.resolve(param_dtype, dtype)
  if target_training.is_target_dir(name):
    from specdec_jax.checkpoints import CheckpointError
    try:
      cfg, params, tok = target_training.load_target_dir(name, param_dtype, dtype)
    except CheckpointError as e:
      raise UserError(str(e)) from None
  elif name == 'gemma3_270m':
    from specdec_jax.gemma_gguf import load_gemma3
    from specdec_jax.gemma_gguf import terms_dir
    cfg, params, tok = load_gemma3(gguf or None, param_dtype=param_dtype, dtype=dtype)
    terms = terms_dir()
    _gemma_terms_notice(str(terms / 'GEMMA_TERMS.html') if terms
                        else 'https://ai.google.dev/gemma/terms')
  elif is_hf_folder(name):
    cfg, params, tok = load_hf_folder(name, param_dtype=param_dtype, dtype=dtype,
                                      sharding=sharding)
    return Target(name, cfg, params, tok,
                  precision=f'weights {param_dtype}, activations {dtype}: {why}')
  elif is_orbax_dir(name):
    from specdec_jax.loaders import orbax_gemma
    cfg, params, tok = orbax_gemma.load(name, param_dtype=param_dtype, dtype=dtype,
                                        sharding=sharding)
    _gemma_terms_notice('https://ai.google.dev/gemma/terms')
    _print_param_memory(params, param_dtype, tok)
    return Target(name, cfg, params, tok,
                  precision=f'weights {param_dtype}, activations {dtype}: {why}')
  elif name == 'tiny':
    tok = ByteTokenizer()
    cfg = config_lib.tiny(vocab_size=tok.vocab_size, dtype=dtype, param_dtype=param_dtype)
    params = init_params(cfg, jax.random.key(seed))
  else:
    check_model_name(name)   # raises the line the config check gives
    raise UserError(f'unknown model {name!r}')
  return Target(name, cfg, jax.device_put(params), tok,
                precision=f'weights {param_dtype}, activations {dtype}: {why}')
