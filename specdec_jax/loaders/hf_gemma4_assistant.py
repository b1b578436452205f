"""A Gemma 4 assistant drafter (`gemma4_assistant`) from a local HF folder.

    cfg, params = load('/path/to/gemma-4-E2B-it-assistant', target_config)

config.json holds the assistant's own Gemma 4 text config under
`text_config` (read as hf_gemma4 reads a target's; its layers are all
KV-shared) plus `backbone_hidden_size` (the target's width),
`use_ordered_embeddings` (the centroid head), `num_centroids` and
`centroid_intermediate_top_k`. The target's config is checked against it:
width, vocabulary, and the (kv heads, head dim) of the target layers each
assistant layer reads. One line per mismatch.
"""
import types
from typing import Any, Optional, Tuple

import jax

from specdec_jax.checkpoints import unflatten
from specdec_jax.errors import UserError
from specdec_jax.loaders import hf_gemma4, placement
from specdec_jax.loaders.safetensors_folder import HFFolder, open_hf_folder
from specdec_jax.models.gemma4 import Gemma4Config
from specdec_jax.models.gemma4_assistant import AssistantConfig

MODEL_TYPE = 'gemma4_assistant'


def is_assistant_folder(path) -> bool:
  from specdec_jax.loaders.safetensors_folder import is_hf_folder
  import json
  import pathlib
  if not is_hf_folder(path):
    return False
  try:
    return json.loads((pathlib.Path(path) / 'config.json').read_text()).get(
        'model_type') == MODEL_TYPE
  except (OSError, ValueError):
    return False


def config_from_hf(folder: HFFolder, target: Gemma4Config) -> AssistantConfig:
  src = folder.path
  c = folder.config
  text = c.get('text_config')
  if not isinstance(text, dict):
    raise UserError(f'{src}: config.json has no text_config (the assistant\'s layers)')
  for key, bad in (('hidden_size_per_layer_input', 0), ('enable_moe_block', False),
                   ('use_double_wide_mlp', False)):
    if text.get(key, bad) not in (bad, None):
      raise UserError(f'{src}: an assistant with {key}={text[key]} is not supported')
  bidi = text.get('use_bidirectional_attention')
  # Its layers read the target's KV as hf_gemma4 reads a target config, with
  # no layer of its own making keys (the body's kv-sharing is implied).
  view = types.SimpleNamespace(
      path=src, config={},
      text_config=dict(text, num_kv_shared_layers=0, hidden_size_per_layer_input=0,
                       enable_moe_block=False, use_bidirectional_attention=None))
  body = hf_gemma4.config_from_hf(view, param_dtype=target.param_dtype, dtype=target.dtype)
  if bidi == 'all':   # transformers then narrows the window, as Gemma4TextConfig does
    body = body.replace(sliding_window=body.sliding_window // 2 + 1)
  backbone = c.get('backbone_hidden_size', 1536)
  if backbone != target.embed_dim:
    raise UserError(f'{src}: backbone_hidden_size={backbone} but the target\'s hidden size '
                    f'is {target.embed_dim}: this assistant drafts for another model')
  if body.vocab_size != target.vocab_size:
    raise UserError(f'{src}: vocab_size={body.vocab_size} but the target\'s is '
                    f'{target.vocab_size}')
  centroids = c.get('num_centroids', 2048) if c.get('use_ordered_embeddings') else 0
  top = c.get('centroid_intermediate_top_k', 32) if centroids else 0
  if centroids and not (isinstance(centroids, int) and isinstance(top, int)
                        and 0 < top <= centroids and body.vocab_size % centroids == 0):
    raise UserError(f'{src}: num_centroids={centroids}, centroid_intermediate_top_k={top} '
                    f'do not fit a vocabulary of {body.vocab_size}')
  try:
    return AssistantConfig(body=body, target=target, num_centroids=centroids,
                           centroid_top_k=top)
  except ValueError as e:
    raise UserError(f'{src}: {e} (the target\'s layer it reads)') from None


def _sources(cfg: AssistantConfig):
  b, D_t = cfg.body, cfg.target.embed_dim
  d, N = b.embed_dim, b.num_heads
  out = {'embedding': [('model.embed_tokens.weight', (b.vocab_size, d))],
         'final_norm/scale': [('model.norm.weight', (d,))],
         'pre_projection': [('pre_projection.weight', (d, 2 * D_t))],
         'post_projection': [('post_projection.weight', (D_t, d))]}
  if cfg.num_centroids:
    out['centroids'] = [('masked_embedding.centroids.weight', (cfg.num_centroids, d))]
    out['token_ordering'] = [('masked_embedding.token_ordering', (b.vocab_size,))]
  for i in range(b.num_layers):
    hf, p = f'model.layers.{i}.', f'layer_{i}/'
    H, F = b.heads(i)[1], b.mlp_dim(i)
    for ours, theirs in (('pre_attn_norm', 'input_layernorm'),
                         ('post_attn_norm', 'post_attention_layernorm'),
                         ('pre_ffw_norm', 'pre_feedforward_layernorm'),
                         ('post_ffw_norm', 'post_feedforward_layernorm')):
      out[p + ours + '/scale'] = [(hf + theirs + '.weight', (d,))]
    out[p + 'attn/qkv'] = [(hf + 'self_attn.q_proj.weight', (N * H, d))]
    out[p + 'attn/q_norm'] = [(hf + 'self_attn.q_norm.weight', (H,))]
    out[p + 'attn/out'] = [(hf + 'self_attn.o_proj.weight', (d, N * H))]
    out[p + 'mlp/gate_up'] = [(hf + 'mlp.gate_proj.weight', (F, d)),
                              (hf + 'mlp.up_proj.weight', (F, d))]
    out[p + 'mlp/down'] = [(hf + 'mlp.down_proj.weight', (d, F))]
    out[p + 'layer_scalar'] = [(hf + 'layer_scalar', (1,))]
  return out


def load(path, target: Gemma4Config, *,
         sharding: Optional[placement.ShardingFn] = None) -> Tuple[AssistantConfig, Any]:
  """(AssistantConfig, params on device) in the target's dtypes."""
  import numpy as np
  folder = path if isinstance(path, HFFolder) else open_hf_folder(path)
  if folder.model_type != MODEL_TYPE:
    raise UserError(f'{folder.path}: model_type {folder.model_type!r} is not {MODEL_TYPE}')
  if not isinstance(target, Gemma4Config):
    raise UserError(f'{folder.path}: a Gemma 4 assistant drafts for a Gemma 4 target, '
                    f'not a {type(target).__name__}')
  cfg = config_from_hf(folder, target)
  sources = _sources(cfg)
  try:
    for parts in sources.values():
      for name, want in parts:
        got = folder.shape(name)
        if got != want:
          raise UserError(f'{folder.path}: {name} has shape {list(got)} but config.json '
                          f'implies {list(want)}')
    flat = {}
    for p, parts in sources.items():
      arrays = [folder.get(name) for name, _ in parts]
      host = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
      if p == 'token_ordering':
        host = host.astype(np.int32)
        if sorted(host.tolist()) != list(range(cfg.body.vocab_size)):
          raise UserError(f'{folder.path}: masked_embedding.token_ordering is not a '
                          'permutation of the vocabulary')
        flat[p] = jax.device_put(host)
        continue
      flat[p] = placement.place(host, p, cfg.body.param_dtype, sharding)
  finally:
    folder.close()
  return cfg, unflatten(flat)
