"""Target models by name: the real Gemma 3 270M, or a tiny random model."""
import dataclasses
import sys
from typing import Any

import jax

from specdec_jax import config as config_lib
from specdec_jax.errors import UserError
from specdec_jax.model import init_params
from specdec_jax.tokenizer import ByteTokenizer

TARGETS = ('gemma3_270m', 'tiny')


def check_model_name(name: str) -> None:
  """UserError unless `name` is a known target or a trained target folder."""
  from specdec_jax import target_training
  if name not in TARGETS and not target_training.is_target_dir(name):
    raise UserError(f'unknown model {name!r}; choose one of {", ".join(TARGETS)} '
                    'or a trained target folder (one with target.json)')


@dataclasses.dataclass
class Target:
  name: str
  config: config_lib.ModelConfig
  params: Any
  tokenizer: Any
  precision: str = ''      # why these weight / activation dtypes (precision.resolve)


def load_target(name: str, *, gguf: str = '', param_dtype: str = 'float32',
                dtype: str = 'float32', seed: int = 0) -> Target:
  """'gemma3_270m': the packaged GGUF (or `gguf`); 'tiny': random weights, byte
  tokenizer; or the folder of a target trained from scratch (target_training.py).

  `param_dtype` ('auto', 'bfloat16', 'float32') is the weights' dtype, `dtype`
  the activations'; 'auto' is resolved by precision.resolve. The default keeps
  the exact float32 model.
  """
  from specdec_jax import precision, target_training
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
    print('Gemma weights: use is subject to the Gemma Terms of Use'
          + (f' ({terms / "GEMMA_TERMS.html"})' if terms else ' (https://ai.google.dev/gemma/terms)'),
          file=sys.stderr)
  elif name == 'tiny':
    tok = ByteTokenizer()
    cfg = config_lib.tiny(vocab_size=tok.vocab_size, dtype=dtype, param_dtype=param_dtype)
    params = init_params(cfg, jax.random.key(seed))
  else:
    raise UserError(f'unknown model {name!r}; choose one of {", ".join(TARGETS)} '
                    'or a trained target folder')
  return Target(name, cfg, jax.device_put(params), tok,
                precision=f'weights {param_dtype}, activations {dtype}: {why}')
