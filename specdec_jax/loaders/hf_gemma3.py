"""Gemma 3 from a local Hugging Face folder: config.json -> ModelConfig, weights
-> the params tree of model.Transformer, tokenizer beside them.

    cfg, params, tok = load('/path/to/gemma-3-1b-pt', param_dtype='bfloat16')

Model types: `gemma3_text` (Gemma3ForCausalLM: 270M, 1B) and `gemma3`
(Gemma3ForConditionalGeneration: 4B, 12B, 27B), whose language model is
loaded and whose vision tower and projector are ignored. Every shape and
option comes from config.json; a key it omits takes transformers'
Gemma3TextConfig default, as transformers does (the multimodal checkpoints'
`text_config` lists only what differs from those defaults). What our model
cannot run (logit soft-capping, bidirectional attention, biases, an untied
LM head, RoPE kinds other than default / linear, layer types that are not a
periodic local/global pattern) is refused with one line.

Names: under one of safetensors_folder.LANGUAGE_MODEL_PREFIXES.
"""
import pathlib
from typing import Any, Optional, Tuple

from specdec_jax import config as config_lib
from specdec_jax.checkpoints import unflatten
from specdec_jax.errors import UserError
from specdec_jax.loaders import placement
from specdec_jax.loaders.hf_tokenizer import load_tokenizer
from specdec_jax.loaders.safetensors_folder import (
    HFFolder, check_shapes, config_value, language_model_prefix, open_hf_folder, token_ids)

MODEL_TYPES = ('gemma3_text', 'gemma3')

# transformers 5.24's Gemma3TextConfig defaults (configuration_gemma3.py).
DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation='gelu_pytorch_tanh', max_position_embeddings=131_072,
    rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    tie_word_embeddings=True, attention_bias=False, query_pre_attn_scalar=256,
    sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
    use_bidirectional_attention=False, sliding_window_pattern=6,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None)
# The tanh approximation of GELU under its transformers names.
_GELU_TANH = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast')


def _get(folder: HFFolder, key: str):
  """A text-config value (a null takes the default)."""
  return config_value(folder, key, DEFAULTS)


def _layer_pattern(folder: HFFolder, n: int) -> int:
  """ModelConfig.sliding_window_pattern p: layer i is global iff (i + 1) % p == 0."""
  types = folder.text_config.get('layer_types')
  if types is None:
    return int(_get(folder, 'sliding_window_pattern'))
  if len(types) != n or set(types) - {'sliding_attention', 'full_attention'}:
    raise UserError(f'{folder.path}: layer_types must list {n} of sliding_attention / '
                    f'full_attention, got {types}')
  is_global = [t == 'full_attention' for t in types]
  # No global layer: p = n + 1 divides no i + 1 <= n.
  p = is_global.index(True) + 1 if any(is_global) else n + 1
  if is_global != [(i + 1) % p == 0 for i in range(n)]:
    raise UserError(f'{folder.path}: layer_types {types} is not one global layer every '
                    f'p-th layer, the only arrangement this model runs')
  return p


def _rope(folder: HFFolder) -> Tuple[float, float, float]:
  """(base_global, linear scale_global, base_local) from rope_parameters, or
  the older rope_theta / rope_local_base_freq / rope_scaling keys."""
  t = folder.text_config
  params = t.get('rope_parameters')
  if isinstance(params, dict) and 'full_attention' in params:
    full, local = params['full_attention'] or {}, params.get('sliding_attention') or {}
  else:
    full = dict(t.get('rope_scaling') or {}, rope_theta=_get(folder, 'rope_theta'))
    local = {'rope_theta': _get(folder, 'rope_local_base_freq')}

  def kind(p, which):
    rope_type = p.get('rope_type', p.get('type', 'default'))
    factor = float(p.get('factor', 1.0)) if rope_type == 'linear' else 1.0
    if rope_type not in ('default', 'linear') or (which == 'local' and factor != 1.0):
      raise UserError(f'{folder.path}: {which} layers use RoPE {rope_type!r}'
                      f'{f" x{factor}" if factor != 1.0 else ""}; supported: default, '
                      'and linear scaling on global layers')
    return float(p.get('rope_theta', DEFAULTS['rope_theta' if which == 'global'
                                               else 'rope_local_base_freq'])), factor

  base_global, scale_global = kind(full, 'global')
  base_local, _ = kind(local, 'local')
  return base_global, scale_global, base_local


def config_from_hf(folder: HFFolder, *, param_dtype: str = 'float32',
                   dtype: str = 'float32') -> config_lib.ModelConfig:
  """Our ModelConfig from a gemma3 / gemma3_text folder's config.json."""
  src = folder.path
  refuse = [(k, _get(folder, k)) for k in ('final_logit_softcapping', 'attn_logit_softcapping')
            if _get(folder, k) is not None]
  refuse += [(k, True) for k in ('use_bidirectional_attention', 'attention_bias')
             if _get(folder, k)]
  if refuse:
    k, v = refuse[0]
    raise UserError(f'{src}: {k}={v} is not supported by this Gemma 3 model')
  if not _get(folder, 'tie_word_embeddings'):
    raise UserError(f'{src}: tie_word_embeddings=false (an untied LM head) is not supported')
  act = folder.text_config.get('hidden_activation') or folder.text_config.get('hidden_act') \
      or DEFAULTS['hidden_activation']
  if act not in _GELU_TANH:
    raise UserError(f'{src}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)')
  n = int(_get(folder, 'num_hidden_layers'))
  heads, kv = int(_get(folder, 'num_attention_heads')), int(_get(folder, 'num_key_value_heads'))
  if heads % kv:
    raise UserError(f'{src}: num_attention_heads={heads} is not a multiple of '
                    f'num_key_value_heads={kv}')
  base_global, scale_global, base_local = _rope(folder)
  return config_lib.ModelConfig(
      vocab_size=int(_get(folder, 'vocab_size')), num_layers=n,
      embed_dim=int(_get(folder, 'hidden_size')),
      hidden_dim=int(_get(folder, 'intermediate_size')),
      num_heads=heads, num_kv_heads=kv, head_dim=int(_get(folder, 'head_dim')),
      query_pre_attn_scalar=float(_get(folder, 'query_pre_attn_scalar')),
      sliding_window=int(_get(folder, 'sliding_window')),
      sliding_window_pattern=_layer_pattern(folder, n),
      rope_base_global=base_global, rope_base_local=base_local,
      rope_scale_global=scale_global, norm_eps=float(_get(folder, 'rms_norm_eps')),
      max_context=int(_get(folder, 'max_position_embeddings')),
      dtype=dtype, param_dtype=param_dtype,
      **token_ids(lambda key: _get(folder, key)))


def _sources(cfg: config_lib.ModelConfig):
  """Our flat param name -> (HF names without prefix, their shapes, how to join).

  Linear weights keep PyTorch's [out, in] layout (model.linear reads that);
  q/k/v and gate/up are stacked along the output rows.
  """
  V, D, F = cfg.vocab_size, cfg.embed_dim, cfg.hidden_dim
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  out = {'embedding': ([('embed_tokens.weight', (V, D))], 'one'),
         'final_norm/scale': ([('norm.weight', (D,))], 'norm')}
  for i in range(cfg.num_layers):
    L, p = f'layers.{i}.', f'layer_{i}/'
    for ours, theirs in (('pre_attn_norm', 'input_layernorm'),
                         ('post_attn_norm', 'post_attention_layernorm'),
                         ('pre_ffw_norm', 'pre_feedforward_layernorm'),
                         ('post_ffw_norm', 'post_feedforward_layernorm')):
      out[p + ours + '/scale'] = ([(L + theirs + '.weight', (D,))], 'norm')
    out[p + 'attn/q_norm'] = ([(L + 'self_attn.q_norm.weight', (H,))], 'norm')
    out[p + 'attn/k_norm'] = ([(L + 'self_attn.k_norm.weight', (H,))], 'norm')
    out[p + 'attn/qkv'] = ([(L + 'self_attn.q_proj.weight', (N * H, D)),
                            (L + 'self_attn.k_proj.weight', (K * H, D)),
                            (L + 'self_attn.v_proj.weight', (K * H, D))], 'rows')
    out[p + 'attn/out'] = ([(L + 'self_attn.o_proj.weight', (D, N * H))], 'one')
    out[p + 'mlp/gate_up'] = ([(L + 'mlp.gate_proj.weight', (F, D)),
                               (L + 'mlp.up_proj.weight', (F, D))], 'rows')
    out[p + 'mlp/down'] = ([(L + 'mlp.down_proj.weight', (D, F))], 'one')
  return out


def load_params(folder: HFFolder, cfg: config_lib.ModelConfig, *,
                sharding: Optional[placement.ShardingFn] = None) -> dict:
  """The params tree, each leaf read, converted and placed before the next.

  Every shape is checked against the config (from the file headers) before
  any tensor is read. Norm weights become Gemma's full multiplier 1 + w (in
  float32), as model.rms_norm expects.
  """
  import numpy as np
  prefix = language_model_prefix(folder, 'Gemma 3')
  sources = _sources(cfg)
  check_shapes(folder, prefix, [part for parts, _ in sources.values() for part in parts])
  flat = {}
  for path, (parts, how) in sources.items():
    arrays = [folder.get(prefix + name) for name, _ in parts]
    if how == 'norm':
      host = arrays[0].astype(np.float32) + np.float32(1.0)
    elif how == 'rows':
      host = np.concatenate(arrays, axis=0)
    else:
      host = arrays[0]
    del arrays
    flat[path] = placement.place(host, path, cfg.param_dtype, sharding)
  return unflatten(flat)


def load(path, *, param_dtype: str = 'float32', dtype: str = 'float32',
         sharding: Optional[placement.ShardingFn] = None) -> Tuple[config_lib.ModelConfig, Any, Any]:
  """(config, params on device, tokenizer or None) for a Gemma 3 HF folder."""
  folder = path if isinstance(path, HFFolder) else open_hf_folder(path)
  if folder.model_type not in MODEL_TYPES:
    raise UserError(f'{folder.path}: model_type {folder.model_type!r} is not Gemma 3 '
                    f'({", ".join(MODEL_TYPES)})')
  cfg = config_from_hf(folder, param_dtype=param_dtype, dtype=dtype)
  try:
    params = load_params(folder, cfg, sharding=sharding)
  finally:
    folder.close()
  tok = load_tokenizer(pathlib.Path(folder.path), bos_id=cfg.bos_id, eos_id=cfg.eos_id,
                       pad_id=cfg.pad_id)
  return cfg, params, tok
