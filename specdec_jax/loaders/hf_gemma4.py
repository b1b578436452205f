"""Gemma 4 from a local Hugging Face folder: config.json -> Gemma4Config, weights
-> the params tree of models.gemma4.Gemma4, tokenizer beside them.

    cfg, params, tok = load('/path/to/gemma-4-E2B', param_dtype='bfloat16')

Model types: `gemma4_text` (Gemma4ForCausalLM) and `gemma4`
(Gemma4ForConditionalGeneration), whose language model is loaded and whose
vision / audio towers are ignored. Every shape and option comes from
config.json; a key it omits takes transformers 5.24's Gemma4TextConfig
default, as transformers does. Per-layer head shapes come either from
`per_layer_config` (what transformers 5.24 writes: overrides by layer index)
or from the older `global_head_dim` / `num_global_key_value_heads` keys
(the published checkpoints), resolved as Gemma4TextConfig does. What the
model cannot run (bidirectional attention, biases, an untied LM head, other
activations or RoPE kinds, head shapes that vary within one layer type) is
refused with one line.

Norm weights load as stored: Gemma 4's RMSNorm multiplies by w (not 1 + w).
"""
import pathlib
from typing import Any, Optional, Tuple

from specdec_jax.checkpoints import unflatten
from specdec_jax.errors import UserError
from specdec_jax.loaders import placement
from specdec_jax.loaders.hf_tokenizer import load_tokenizer
from specdec_jax.loaders.safetensors_folder import (
    HFFolder, check_shapes, config_value, language_model_prefix, open_hf_folder, token_ids)
from specdec_jax.models.gemma4 import Gemma4Config

MODEL_TYPES = ('gemma4_text', 'gemma4')

# transformers 5.24's Gemma4TextConfig defaults (configuration_gemma4.py).
DEFAULTS = dict(
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation='gelu_pytorch_tanh', max_position_embeddings=131_072,
    rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    tie_word_embeddings=True, attention_bias=False, sliding_window=512,
    final_logit_softcapping=None, use_bidirectional_attention=None,
    vocab_size_per_layer_input=262_144, hidden_size_per_layer_input=256,
    attention_k_eq_v=False, num_kv_shared_layers=0, enable_moe_block=False,
    use_double_wide_mlp=False, num_experts=None, top_k_experts=None,
    moe_intermediate_size=None, global_head_dim=512, num_global_key_value_heads=None)
DEFAULT_ROPE = {
    'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0},
    'full_attention': {'rope_type': 'proportional', 'partial_rotary_factor': 0.25,
                       'rope_theta': 1_000_000.0},
}
_GELU_TANH = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast')
_TYPES = ('sliding_attention', 'full_attention')


def _get(folder: HFFolder, key: str):
  """A text-config value; a key present wins even when null
  (hidden_size_per_layer_input: null = no PLE)."""
  return config_value(folder, key, DEFAULTS, keep_null=True)


def _layer_types(folder: HFFolder, n: int):
  types = folder.text_config.get('layer_types')
  if types is None:   # transformers' default: every sixth layer global
    types = ['full_attention' if (i + 1) % 6 == 0 else 'sliding_attention' for i in range(n)]
  if not isinstance(types, list) or len(types) != n or set(types) - set(_TYPES):
    raise UserError(f'{folder.path}: layer_types must list {n} of sliding_attention / '
                    f'full_attention, got {types}')
  # transformers forces the last layer to full attention (with a warning);
  # the checkpoint runs that way there, so it does here.
  return [t == 'full_attention' for t in types[:-1]] + [True]


def _heads(folder: HFFolder, is_global) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """((K, H) of sliding layers, (K, H) of full layers), after the per-layer
  overrides, which must agree within each layer type."""
  base = (int(_get(folder, 'num_key_value_heads')), int(_get(folder, 'head_dim')))
  per = [list(base) for _ in is_global]
  overrides = folder.text_config.get('per_layer_config')
  if overrides is None:   # Gemma4TextConfig.__post_init__'s rule
    kv = _get(folder, 'num_global_key_value_heads') if _get(folder, 'attention_k_eq_v') else None
    overrides = {i: dict(head_dim=_get(folder, 'global_head_dim'),
                         **({} if kv is None else {'num_key_value_heads': kv}))
                 for i, g in enumerate(is_global) if g}
  if not isinstance(overrides, dict):
    raise UserError(f'{folder.path}: per_layer_config must map layer indices to overrides')
  for key, over in overrides.items():
    try:
      i = int(key)
      assert 0 <= i < len(is_global) and isinstance(over, dict)
    except (ValueError, AssertionError):
      raise UserError(f'{folder.path}: per_layer_config key {key!r} is not a layer index '
                      f'(0..{len(is_global) - 1}) with a dict of overrides') from None
    unknown = set(over) - {'head_dim', 'num_key_value_heads'}
    if unknown:
      raise UserError(f'{folder.path}: per_layer_config[{key}] overrides {sorted(unknown)}; '
                      'supported: head_dim, num_key_value_heads')
    per[i] = [int(over.get('num_key_value_heads', per[i][0])), int(over.get('head_dim', per[i][1]))]
  out = []
  for kind in (False, True):
    shapes = {tuple(s) for s, g in zip(per, is_global) if g == kind}
    if len(shapes) > 1:
      raise UserError(f'{folder.path}: {_TYPES[kind]} layers have different head shapes '
                      f'{sorted(shapes)} (kv heads, head dim); one per layer type is supported')
    out.append(shapes.pop() if shapes else tuple(base))
  return out[0], out[1]


def _rope(folder: HFFolder, kind: str) -> Tuple[float, float, float]:
  """(base, rotating fraction, linear scale) of one layer type."""
  params = folder.text_config.get('rope_parameters') or DEFAULT_ROPE
  p = params.get(kind) if isinstance(params, dict) else None
  if not isinstance(p, dict):
    raise UserError(f'{folder.path}: rope_parameters has no {kind!r} entry')
  rope_type = p.get('rope_type', 'default')
  if rope_type not in ('default', 'linear', 'proportional'):
    raise UserError(f'{folder.path}: {kind} layers use RoPE {rope_type!r}; supported: '
                    'default, linear, proportional')
  # transformers' default RoPE ignores partial_rotary_factor and factor.
  fraction = float(p.get('partial_rotary_factor', 1.0)) if rope_type == 'proportional' else 1.0
  scale = float(p.get('factor', 1.0)) if rope_type != 'default' else 1.0
  return float(p.get('rope_theta', DEFAULT_ROPE[kind]['rope_theta'])), fraction, scale


def config_from_hf(folder: HFFolder, *, param_dtype: str = 'float32',
                   dtype: str = 'float32') -> Gemma4Config:
  """Our Gemma4Config from a gemma4 / gemma4_text folder's config.json."""
  try:
    return _config_from_hf(folder, param_dtype, dtype)
  except UserError:
    raise
  except (TypeError, ValueError) as e:   # a null or a string where a number belongs
    raise UserError(f'{folder.path}: config.json: {e}') from None


def _config_from_hf(folder: HFFolder, param_dtype: str, dtype: str) -> Gemma4Config:
  src = folder.path
  bidi = _get(folder, 'use_bidirectional_attention')
  if bidi not in (None, 'vision'):   # 'vision' changes image tokens only
    raise UserError(f'{src}: use_bidirectional_attention={bidi!r} is not supported')
  if _get(folder, 'attention_bias'):
    raise UserError(f'{src}: attention_bias=true is not supported by this Gemma 4 model')
  if not _get(folder, 'tie_word_embeddings'):
    raise UserError(f'{src}: tie_word_embeddings=false (an untied LM head) is not supported')
  act = _get(folder, 'hidden_activation')
  if act not in _GELU_TANH:
    raise UserError(f'{src}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh)')
  n = int(_get(folder, 'num_hidden_layers'))
  is_global = _layer_types(folder, n)
  (kv_local, h_local), (kv_global, h_global) = _heads(folder, is_global)
  heads = int(_get(folder, 'num_attention_heads'))
  for kv in (kv_local, kv_global):
    if heads % kv:
      raise UserError(f'{src}: num_attention_heads={heads} is not a multiple of {kv} kv heads')
  shared = int(_get(folder, 'num_kv_shared_layers'))
  first = n - shared
  if not 0 <= shared < n or set(is_global[first:]) - set(is_global[:first]):
    raise UserError(f'{src}: num_kv_shared_layers={shared} leaves a shared layer type '
                    f'without a non-shared layer of that type among the first {first}')
  moe = bool(_get(folder, 'enable_moe_block'))
  experts = [_get(folder, k) for k in ('num_experts', 'top_k_experts', 'moe_intermediate_size')]
  if moe and not all(isinstance(x, int) and x > 0 for x in experts):
    raise UserError(f'{src}: enable_moe_block needs num_experts, top_k_experts and '
                    f'moe_intermediate_size, got {experts}')
  if moe and experts[1] > experts[0]:
    raise UserError(f'{src}: top_k_experts={experts[1]} > num_experts={experts[0]}')
  ple = int(_get(folder, 'hidden_size_per_layer_input') or 0)
  base_l, frac_l, scale_l = _rope(folder, 'sliding_attention')
  base_g, frac_g, scale_g = _rope(folder, 'full_attention')
  cap = _get(folder, 'final_logit_softcapping')
  return Gemma4Config(
      vocab_size=int(_get(folder, 'vocab_size')), num_layers=n,
      embed_dim=int(_get(folder, 'hidden_size')),
      hidden_dim=int(_get(folder, 'intermediate_size')), num_heads=heads,
      is_global=tuple(is_global), head_dim=h_local, num_kv_heads=kv_local,
      global_head_dim=h_global, num_global_kv_heads=kv_global,
      sliding_window=int(_get(folder, 'sliding_window')),
      rope_base_local=base_l, rope_fraction_local=frac_l, rope_scale_local=scale_l,
      rope_base_global=base_g, rope_fraction_global=frac_g, rope_scale_global=scale_g,
      attention_k_eq_v=bool(_get(folder, 'attention_k_eq_v')),
      num_kv_shared_layers=shared, double_wide_mlp=bool(_get(folder, 'use_double_wide_mlp')),
      ple_dim=ple, ple_vocab_size=int(_get(folder, 'vocab_size_per_layer_input')) if ple else 0,
      num_experts=experts[0] if moe else 0, top_k_experts=experts[1] if moe else 0,
      moe_hidden_dim=experts[2] if moe else 0,
      final_logit_softcap=None if cap is None else float(cap),
      norm_eps=float(_get(folder, 'rms_norm_eps')),
      max_context=int(_get(folder, 'max_position_embeddings')),
      dtype=dtype, param_dtype=param_dtype,
      **token_ids(lambda key: _get(folder, key)))


def _sources(cfg: Gemma4Config):
  """Our flat param name -> ([(HF name without prefix, shape)], how to join).

  Linear weights keep PyTorch's [out, in] layout (model.linear reads that);
  q/k/v and gate/up are stacked along the output rows; experts stay [E, out, in].
  KV-shared layers' k/v weights, if a checkpoint has them, are not read
  (transformers ignores them too).
  """
  V, D, N, L = cfg.vocab_size, cfg.embed_dim, cfg.num_heads, cfg.num_layers
  out = {'embedding': [('embed_tokens.weight', (V, D))],
         'final_norm/scale': [('norm.weight', (D,))]}
  if cfg.ple_dim:
    P = cfg.ple_dim
    out['embedding_per_layer'] = [('embed_tokens_per_layer.weight', (cfg.ple_vocab_size, L * P))]
    out['per_layer_projection'] = [('per_layer_model_projection.weight', (L * P, D))]
    out['per_layer_projection_norm/scale'] = [('per_layer_projection_norm.weight', (P,))]
  for i in range(L):
    hf, p = f'layers.{i}.', f'layer_{i}/'
    K, H = cfg.heads(i)
    F = cfg.mlp_dim(i)
    norms = [('pre_attn_norm', 'input_layernorm'), ('post_attn_norm', 'post_attention_layernorm'),
             ('pre_ffw_norm', 'pre_feedforward_layernorm'),
             ('post_ffw_norm', 'post_feedforward_layernorm')]
    if cfg.num_experts:
      norms += [('post_ffw_norm_1', 'post_feedforward_layernorm_1'),
                ('pre_ffw_norm_2', 'pre_feedforward_layernorm_2'),
                ('post_ffw_norm_2', 'post_feedforward_layernorm_2')]
    if cfg.ple_dim:
      norms += [('post_ple_norm', 'post_per_layer_input_norm')]
    for ours, theirs in norms:
      out[p + ours + '/scale'] = [(hf + theirs + '.weight', (D,))]
    a = hf + 'self_attn.'
    qkv = [(a + 'q_proj.weight', (N * H, D))]
    out[p + 'attn/q_norm'] = [(a + 'q_norm.weight', (H,))]
    if i < cfg.first_shared:
      qkv.append((a + 'k_proj.weight', (K * H, D)))
      if not cfg.k_eq_v(i):
        qkv.append((a + 'v_proj.weight', (K * H, D)))
      out[p + 'attn/k_norm'] = [(a + 'k_norm.weight', (H,))]
    out[p + 'attn/qkv'] = qkv
    out[p + 'attn/out'] = [(a + 'o_proj.weight', (D, N * H))]
    out[p + 'mlp/gate_up'] = [(hf + 'mlp.gate_proj.weight', (F, D)),
                              (hf + 'mlp.up_proj.weight', (F, D))]
    out[p + 'mlp/down'] = [(hf + 'mlp.down_proj.weight', (D, F))]
    if cfg.num_experts:
      E, Fe = cfg.num_experts, cfg.moe_hidden_dim
      out[p + 'moe/router'] = [(hf + 'router.proj.weight', (E, D))]
      out[p + 'moe/router_scale'] = [(hf + 'router.scale', (D,))]
      out[p + 'moe/per_expert_scale'] = [(hf + 'router.per_expert_scale', (E,))]
      out[p + 'moe/experts_gate_up'] = [(hf + 'experts.gate_up_proj', (E, 2 * Fe, D))]
      out[p + 'moe/experts_down'] = [(hf + 'experts.down_proj', (E, D, Fe))]
    if cfg.ple_dim:
      out[p + 'ple_gate'] = [(hf + 'per_layer_input_gate.weight', (cfg.ple_dim, D))]
      out[p + 'ple_proj'] = [(hf + 'per_layer_projection.weight', (D, cfg.ple_dim))]
    out[p + 'layer_scalar'] = [(hf + 'layer_scalar', (1,))]
  return out


def load_params(folder: HFFolder, cfg: Gemma4Config, *,
                sharding: Optional[placement.ShardingFn] = None) -> dict:
  """The params tree, each leaf read, joined and placed before the next.

  Every shape is checked against the config (from the file headers) before
  any tensor is read."""
  import numpy as np
  prefix = language_model_prefix(folder, 'Gemma 4')
  sources = _sources(cfg)
  check_shapes(folder, prefix, [part for parts in sources.values() for part in parts])
  flat = {}
  for path, parts in sources.items():
    arrays = [folder.get(prefix + name) for name, _ in parts]
    host = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    del arrays
    flat[path] = placement.place(host, path, cfg.param_dtype, sharding)
  return unflatten(flat)


def load(path, *, param_dtype: str = 'float32', dtype: str = 'float32',
         sharding: Optional[placement.ShardingFn] = None) -> Tuple[Gemma4Config, Any, Any]:
  """(config, params on device, tokenizer or None) for a Gemma 4 HF folder."""
  folder = path if isinstance(path, HFFolder) else open_hf_folder(path)
  if folder.model_type not in MODEL_TYPES:
    raise UserError(f'{folder.path}: model_type {folder.model_type!r} is not Gemma 4 '
                    f'({", ".join(MODEL_TYPES)})')
  cfg = config_from_hf(folder, param_dtype=param_dtype, dtype=dtype)
  try:
    params = load_params(folder, cfg, sharding=sharding)
  finally:
    folder.close()
  tok = load_tokenizer(pathlib.Path(folder.path), bos_id=cfg.bos_id, eos_id=cfg.eos_id,
                       pad_id=cfg.pad_id)
  return cfg, params, tok
