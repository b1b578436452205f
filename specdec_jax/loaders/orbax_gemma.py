"""Gemma 3 in the official JAX layout of the `gemma` library (an orbax checkpoint).

    cfg, params, tok = load('/path/to/gemma3-1b', param_dtype='bfloat16')

The checkpoint is an orbax PyTree directory (`_METADATA`, `manifest.ocdbt`,
...). Two layouts are read, both as the `gemma` library writes them:
- FLAT (the released checkpoints): top-level keys such as
  'transformer/layer_0/attn/q_einsum' -> {'w': [N, D, H]},
  'transformer/layer_0/mlp/gating_einsum' -> {'w': [2, F, D]}; the vision
  encoder under 'SigLiPFromPatches_0/...' (ignored);
- NESTED (`gm.ckpts.save_params` of `model.init` params): {'layer_0': {'attn':
  {'q_einsum': {'w'}}, 'mlp': {'gating_einsum': [2, F, D], 'linear': [F, D]}}}.
Shapes give vocabulary, width, layers, heads, head and MLP widths; what the
checkpoint does not hold (window, RoPE, query scaling, context) comes from
the library's config of that size (`KNOWN_SIZES`, by layers and width). Each
leaf is restored alone to host memory, rearranged into our [out, in]
layout, converted and placed (loaders/placement.py) before the next.
Norm scales are stored as w in (1 + w), as in HF checkpoints.
Tokenizer: tokenizer.model (or tokenizer.json) in the folder or its parent.
"""
import pathlib
from typing import Any, Dict, Optional, Tuple

import numpy as np

from specdec_jax import config as config_lib
from specdec_jax.checkpoints import unflatten
from specdec_jax.errors import UserError
from specdec_jax.loaders import placement
from specdec_jax.loaders.hf_tokenizer import load_tokenizer

# The gemma library's Gemma 3 configs (gemma/gm/nn/_gemma.py), by (layers,
# width): what the weights' shapes cannot tell. Every size: a global layer
# every 6th, RoPE base 1e4 local / 1e6 global, no soft-capping.
KNOWN_SIZES: Dict[Tuple[int, int], dict] = {
    (18, 640): dict(name='270M', sliding_window=512, rope_scale_global=1.0, max_context=32_768),
    (26, 1152): dict(name='1B', sliding_window=512, rope_scale_global=1.0, max_context=32_768),
    (34, 2560): dict(name='4B', sliding_window=1024, rope_scale_global=8.0, max_context=131_072),
    (48, 3840): dict(name='12B', sliding_window=1024, rope_scale_global=8.0, max_context=131_072),
    # 27B scales queries by (width / heads)^-1/2, the others by head_dim^-1/2.
    (62, 5376): dict(name='27B', sliding_window=1024, rope_scale_global=8.0, max_context=131_072,
                     query_pre_attn_scalar=5376 / 32),
}
_COMMON = dict(sliding_window_pattern=6, rope_base_global=1_000_000.0, rope_base_local=10_000.0)


def is_orbax_dir(path) -> bool:
  """True for an orbax checkpoint directory (no config.json: that is a HF folder)."""
  p = pathlib.Path(path).expanduser()
  return (p.is_dir() and not (p / 'config.json').is_file()
          and any((p / f).is_file() for f in ('_METADATA', '_CHECKPOINT_METADATA')))


class OrbaxCheckpoint:
  """Lazy access to the leaves of an orbax PyTree checkpoint, by a normalised
  name in the NESTED layout ('layer_0/attn/q_einsum/w', 'layer_0/mlp/linear')."""

  def __init__(self, path):
    import orbax.checkpoint as ocp
    self.path = pathlib.Path(path).expanduser()
    self._ckpt = ocp.PyTreeCheckpointer()
    try:
      meta = self._ckpt.metadata(self.path)
      tree = meta.item_metadata.tree if hasattr(meta, 'item_metadata') else meta
    except Exception as e:   # orbax raises many kinds; one line for all
      raise UserError(f'{self.path}: not a readable orbax checkpoint '
                      f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
    self._keys: Dict[str, tuple] = {}      # normalised name -> key path in the file
    self._meta: Dict[str, Any] = {}
    self._walk(tree, ())
    if not self._keys:
      raise UserError(f'{self.path}: the orbax checkpoint holds no Gemma transformer weights')

  def _walk(self, node, keys):
    if isinstance(node, dict):
      for k, v in node.items():
        self._walk(v, keys + (k,))
      return
    name = '/'.join(keys)
    if name.startswith('SigLiPFromPatches_0/') or name.startswith('vision_encoder/'):
      return                                   # the vision tower: not ours
    name = name[len('transformer/'):] if name.startswith('transformer/') else name
    if name.endswith(('/mlp/gating_einsum/w', '/mlp/linear/w')):
      name = name[:-2]                         # FLAT keeps a 'w' the module drops
    self._keys[name] = keys
    self._meta[name] = node

  def __contains__(self, name):
    return name in self._keys

  def names(self):
    return sorted(self._keys)

  def shape(self, name) -> Tuple[int, ...]:
    if name not in self._keys:
      raise UserError(f'{self.path}: {name!r} is missing from the checkpoint')
    return tuple(self._meta[name].shape)

  def get(self, name) -> np.ndarray:
    """One leaf restored to host memory, in its stored dtype."""
    import orbax.checkpoint as ocp
    keys = self._keys[name]
    item: Any = None
    args: Any = None
    for k in reversed(keys):
      item = {k: item} if item is not None else {k: self._meta[name]}
      args = {k: args} if args is not None else {k: ocp.RestoreArgs(restore_type=np.ndarray)}
    try:
      out = self._ckpt.restore(self.path, args=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
    except Exception as e:
      raise UserError(f'{self.path}: cannot restore {"/".join(keys)} '
                      f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
    for k in keys:
      out = out[k]
    return np.asarray(out)


def config_from_shapes(ck: OrbaxCheckpoint, *, param_dtype='float32',
                       dtype='float32') -> config_lib.ModelConfig:
  if any(n.startswith('stacked') or '/stacked' in n for n in ck.names()):
    raise UserError(f'{ck.path}: the STACKED orbax layout is not supported (FLAT or NESTED)')
  V, D = ck.shape('embedder/input_embedding')
  L = sum(1 for n in ck.names() if n.startswith('layer_') and n.endswith('/pre_attention_norm/scale'))
  if 'layer_0/attn/qkv_einsum/w' in ck:
    _, N, _, H = ck.shape('layer_0/attn/qkv_einsum/w')        # [3, N, D, H]
    K = N
  else:
    N, _, H = ck.shape('layer_0/attn/q_einsum/w')              # [N, D, H]
    K = ck.shape('layer_0/attn/kv_einsum/w')[1]                # [2, K, D, H]
  F = ck.shape('layer_0/mlp/linear')[0]                        # [F, D]
  known = KNOWN_SIZES.get((L, D))
  if known is None:
    sizes = ', '.join(f'{v["name"]} ({l} layers, width {d})' for (l, d), v in KNOWN_SIZES.items())
    raise UserError(f'{ck.path}: a Gemma 3 of {L} layers and width {D} is not a known size '
                    f'(orbax checkpoints hold no config; known: {sizes})')
  extra = {k: v for k, v in known.items() if k != 'name'}
  extra.setdefault('query_pre_attn_scalar', float(H))
  return config_lib.ModelConfig(
      vocab_size=V, num_layers=L, embed_dim=D, hidden_dim=F, num_heads=N, num_kv_heads=K,
      head_dim=H, dtype=dtype, param_dtype=param_dtype, **{**_COMMON, **extra})


def _leaves(ck: OrbaxCheckpoint, cfg: config_lib.ModelConfig):
  """(our flat name, a function giving the host array in our layout)."""
  N, K, H, D, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim, cfg.hidden_dim
  norm = lambda name: lambda: ck.get(name).astype(np.float32) + np.float32(1.0)
  rows = lambda w: np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(-1, D)   # [n, D, H] -> [nH, D]

  def check(name, want):
    if ck.shape(name) != want:
      raise UserError(f'{ck.path}: {name} has shape {list(ck.shape(name))}, expected '
                      f'{list(want)} for this Gemma 3')

  def qkv(i):
    a = f'layer_{i}/attn/'
    if a + 'qkv_einsum/w' in ck:
      check(a + 'qkv_einsum/w', (3, N, D, H))
      w = ck.get(a + 'qkv_einsum/w')
      return np.concatenate([rows(w[0]), rows(w[1]), rows(w[2])])
    check(a + 'q_einsum/w', (N, D, H))
    check(a + 'kv_einsum/w', (2, K, D, H))
    kv = ck.get(a + 'kv_einsum/w')
    return np.concatenate([rows(ck.get(a + 'q_einsum/w')), rows(kv[0]), rows(kv[1])])

  def gate_up(i):
    w = ck.get(f'layer_{i}/mlp/gating_einsum')
    if w.shape == (2, D, F) and D != F:
      w = w.transpose(0, 2, 1)                                 # the untransposed variant
    if w.shape != (2, F, D):
      raise UserError(f'{ck.path}: layer_{i}/mlp/gating_einsum has shape {list(w.shape)}, '
                      f'expected {[2, F, D]}')
    return np.ascontiguousarray(w).reshape(2 * F, D)          # [gate; up]

  def out(i):
    check(f'layer_{i}/attn/attn_vec_einsum/w', (N, H, D))
    return np.ascontiguousarray(ck.get(f'layer_{i}/attn/attn_vec_einsum/w').reshape(N * H, D).T)

  def down(i):
    check(f'layer_{i}/mlp/linear', (F, D))
    return np.ascontiguousarray(ck.get(f'layer_{i}/mlp/linear').T)

  yield 'embedding', lambda: ck.get('embedder/input_embedding')
  yield 'final_norm/scale', norm('final_norm/scale')
  for i in range(cfg.num_layers):
    l = f'layer_{i}/'   # the same layer prefix in both trees
    for ours, theirs in (('pre_attn_norm', 'pre_attention_norm'),
                         ('post_attn_norm', 'post_attention_norm'),
                         ('pre_ffw_norm', 'pre_ffw_norm'), ('post_ffw_norm', 'post_ffw_norm')):
      check(l + theirs + '/scale', (D,))
      yield l + ours + '/scale', norm(l + theirs + '/scale')
    check(l + 'attn/_query_norm/scale', (H,))
    check(l + 'attn/_key_norm/scale', (H,))
    yield l + 'attn/q_norm', norm(l + 'attn/_query_norm/scale')
    yield l + 'attn/k_norm', norm(l + 'attn/_key_norm/scale')
    yield l + 'attn/qkv', lambda i=i: qkv(i)
    yield l + 'attn/out', lambda i=i: out(i)
    yield l + 'mlp/gate_up', lambda i=i: gate_up(i)
    yield l + 'mlp/down', lambda i=i: down(i)


def load(path, *, param_dtype: str = 'float32', dtype: str = 'float32',
         sharding: Optional[placement.ShardingFn] = None) -> Tuple[config_lib.ModelConfig, Any, Any]:
  """(config, params on device, tokenizer or None) for a gemma-library checkpoint."""
  ck = OrbaxCheckpoint(path)
  cfg = config_from_shapes(ck, param_dtype=param_dtype, dtype=dtype)
  flat = {name: placement.place(read(), name, param_dtype, sharding)
          for name, read in _leaves(ck, cfg)}
  tok = None
  for d in (ck.path, ck.path.parent):
    tok = load_tokenizer(d, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id)
    if tok is not None:
      break
  return cfg, unflatten(flat), tok
