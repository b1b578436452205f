"""Gemma 3 in the `gemma` library's orbax layout (loaders/orbax_gemma.py).

No released checkpoint is small enough to ship, so the tests write one: the
tiny HF-written Gemma 3 (tests/fixtures/hf_tiny/gemma3_text) rearranged into
the library's parameter shapes (gemma/gm/nn/_modules.py: q_einsum [N, D, H],
kv_einsum [2, K, D, H], attn_vec_einsum [N, H, D], gating_einsum [2, F, D],
linear [F, D], norms as w in 1 + w), in the FLAT layout of the released
checkpoints and the NESTED one `gm.ckpts.save_params` writes. Loaded, it
must give exactly the params the HF loader gives, hence HF's logits.
"""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax.errors import UserError
from specdec_jax.loaders import hf_gemma3, orbax_gemma
from specdec_jax.loaders.safetensors_folder import open_hf_folder

HF = pathlib.Path(__file__).parent / 'fixtures' / 'hf_tiny' / 'gemma3_text'
# What the tiny model's config.json says and an orbax checkpoint cannot.
TINY = dict(name='tiny', sliding_window=4, sliding_window_pattern=3, rope_base_global=1e4,
            rope_scale_global=4.0, rope_base_local=100.0, query_pre_attn_scalar=24.0,
            max_context=256)


def gemma_library_params(layout):
  """The HF fixture's weights as the gemma library names and shapes them."""
  f = open_hf_folder(HF)
  c = f.config
  N, K, H, D = (c['num_attention_heads'], c['num_key_value_heads'], c['head_dim'],
                c['hidden_size'])
  g = lambda n: jnp.asarray(f.get('model.' + n))
  heads = lambda w, n: w.reshape(n, H, D).transpose(0, 2, 1)             # [nH, D] -> [n, D, H]
  tree = {'embedder': {'input_embedding': g('embed_tokens.weight')},
          'final_norm': {'scale': g('norm.weight')}}
  for i in range(c['num_hidden_layers']):
    L = f'layers.{i}.'
    gating = jnp.stack([g(L + 'mlp.gate_proj.weight'), g(L + 'mlp.up_proj.weight')])
    tree[f'layer_{i}'] = {
        'attn': {'q_einsum': {'w': heads(g(L + 'self_attn.q_proj.weight'), N)},
                 'kv_einsum': {'w': jnp.stack([heads(g(L + 'self_attn.k_proj.weight'), K),
                                               heads(g(L + 'self_attn.v_proj.weight'), K)])},
                 'attn_vec_einsum': {'w': g(L + 'self_attn.o_proj.weight').T.reshape(N, H, D)},
                 '_query_norm': {'scale': g(L + 'self_attn.q_norm.weight')},
                 '_key_norm': {'scale': g(L + 'self_attn.k_norm.weight')}},
        'mlp': {'gating_einsum': gating, 'linear': g(L + 'mlp.down_proj.weight').T},
        'pre_attention_norm': {'scale': g(L + 'input_layernorm.weight')},
        'post_attention_norm': {'scale': g(L + 'post_attention_layernorm.weight')},
        'pre_ffw_norm': {'scale': g(L + 'pre_feedforward_layernorm.weight')},
        'post_ffw_norm': {'scale': g(L + 'post_feedforward_layernorm.weight')}}
  if layout == 'nested':
    return tree
  flat = {'SigLiPFromPatches_0/siglip_encoder/embedding': {'kernel': jnp.ones((4, 3))}}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = ['transformer'] + [p.key for p in path]
    if keys[-2] in ('gating_einsum', 'linear'):        # FLAT keeps a 'w' here
      keys.append('w')
    flat.setdefault('/'.join(keys[:-1]), {})[keys[-1]] = leaf
  return flat


def write(tmp_path, layout):
  import orbax.checkpoint as ocp
  path = tmp_path / layout / 'ckpt'
  ck = ocp.StandardCheckpointer()
  ck.save(path.absolute(), gemma_library_params(layout))
  ck.wait_until_finished()
  shutil.copy(HF / 'tokenizer.json', path.parent)      # beside it, as the releases ship it
  return path


@pytest.fixture
def tiny_size(monkeypatch):
  monkeypatch.setitem(orbax_gemma.KNOWN_SIZES, (3, 32), TINY)


@pytest.mark.parametrize('layout', ['flat', 'nested'])
def test_loads_the_same_params_as_the_hf_folder(tmp_path, tiny_size, layout):
  path = write(tmp_path, layout)
  assert orbax_gemma.is_orbax_dir(path)
  cfg, params, tok = orbax_gemma.load(path)
  hf_cfg, hf_params, _ = hf_gemma3.load(HF)
  assert cfg == hf_cfg
  jax.tree.map(np.testing.assert_array_equal, params, hf_params)
  assert tok is not None and tok.encode('the cat')[0] == 2


def test_through_load_target_in_bf16(tmp_path, tiny_size):
  from specdec_jax.targets import check_model_name, load_target
  path = write(tmp_path, 'flat')
  check_model_name(str(path))
  t = load_target(str(path), param_dtype='bfloat16')
  assert t.params['layer_0']['attn']['qkv'].dtype == jnp.bfloat16
  assert t.params['layer_0']['attn']['q_norm'].dtype == jnp.float32


def test_unknown_size_and_unreadable_checkpoint(tmp_path):
  path = write(tmp_path, 'flat')             # (3 layers, width 32): not a Gemma 3 size
  with pytest.raises(UserError, match='3 layers and width 32 is not a known size') as e:
    orbax_gemma.load(path)
  assert '\n' not in str(e.value)
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / '_METADATA').write_text('{not json')
  with pytest.raises(UserError, match='not a readable orbax checkpoint') as e:
    orbax_gemma.load(bad)
  assert '\n' not in str(e.value)
