"""Gemma 3 from a local Hugging Face folder (loaders/) against HF transformers.

The fixtures under tests/fixtures/hf_tiny/ were written by transformers 5.24
itself (tools/make_hf_checkpoints.py): `gemma3_text` (Gemma3ForCausalLM,
bf16, sharded with an index, a tokenizer.json) and `gemma3_mm` (multimodal
Gemma3ForConditionalGeneration, float32, one file, a vision tower to
ignore, no tokenizer). Norm weights are random, so a missed `1 + w` shows;
both have sliding and full layers and windows shorter than the prompts.
"""
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import generate
from specdec_jax.errors import UserError
from specdec_jax.loaders import hf_gemma3
from specdec_jax.loaders.safetensors_folder import HFFolder, open_hf_folder
from specdec_jax.model import Transformer

ROOT = pathlib.Path(__file__).parent / 'fixtures' / 'hf_tiny'
FIXTURES = ('gemma3_text', 'gemma3_mm')
# float32 logits vs HF's float32 (eager attention): measured max |diff| over
# the top-8 logits of every position 1.7e-6 (gemma3_text), 1.5e-6 (gemma3_mm).
TOL = 1e-4


def reference(name):
  return json.loads((ROOT / name / 'reference.json').read_text())


def completion(case):
  """HF's greedy tokens as our completions list them: without the final <eos>."""
  ids = case['greedy_ids']
  return ids[:-1] if ids[-1:] == [1] else ids


@pytest.fixture(scope='module', params=FIXTURES)
def loaded(request):
  cfg, params, tok = hf_gemma3.load(ROOT / request.param)
  return request.param, cfg, params, tok


@functools.lru_cache(maxsize=None)
def _forward_fn(cfg):
  return jax.jit(lambda p, x: Transformer(cfg).apply({'params': p}, x)[0])


def forward(cfg, params, ids, pad_to=32):
  """Logits [len(ids), V]; padded at the end to one length (causal: the pad
  changes nothing before it) so every case shares one compile."""
  x = jnp.zeros((1, pad_to), jnp.int32).at[0, :len(ids)].set(jnp.array(ids))
  return np.asarray(_forward_fn(cfg)(params, x)[0, :len(ids)])


def test_config_read_from_config_json(loaded):
  name, cfg, _, _ = loaded
  if name == 'gemma3_text':
    assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (3, 32, 2, 1, 32)
    assert cfg.is_global == (False, False, True) and cfg.sliding_window == 4
    assert (cfg.rope_base_global, cfg.rope_scale_global, cfg.rope_base_local) == (1e4, 4.0, 100.0)
    assert cfg.query_pre_attn_scalar == 24
  else:   # the text_config of a multimodal checkpoint
    assert (cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (128, 2, 4, 2, 8)
    assert cfg.is_global == (False, True) and cfg.sliding_window == 3


def test_logits_and_argmax_match_hf(loaded):
  """Teacher-forced over prompt + HF's greedy continuation: HF's top-8 logits
  within TOL and the same argmax at every position."""
  name, cfg, params, _ = loaded
  worst = 0.0
  for case in reference(name)['cases']:
    logits = forward(cfg, params, case['prompt_ids'] + case['greedy_ids'])
    top_ids = np.array(case['top_ids'])
    ours = np.take_along_axis(logits, top_ids, axis=-1)
    worst = max(worst, float(np.abs(ours - np.array(case['top_logits'])).max()))
    np.testing.assert_array_equal(logits.argmax(-1), top_ids[:, 0])
  print(f'{name}: max |logit diff| vs HF {worst:.2e}')
  assert worst < TOL, worst


def test_cached_greedy_decode_matches_hf(loaded):
  """The Generator's on-device loop (prefill + cached steps, ragged batch)
  emits HF's greedy tokens exactly."""
  name, cfg, params, _ = loaded
  ref = reference(name)
  cases, n = ref['cases'], ref['new_tokens']
  gen = generate.Generator(cfg, cache_size=64, greedy=True)
  batch = generate.make_batch([c['prompt_ids'] for c in cases], batch_size=len(cases),
                              bucket_len=16, max_new_tokens=n,
                              keys=jax.random.split(jax.random.key(0), len(cases)))
  rows = generate.completions(gen.generate(params, batch), cfg.eos_id)
  assert [r['completion_ids'] for r in rows] == [completion(c) for c in cases]
  assert [r['finish_reason'] for r in rows] == [
      'eos' if c['greedy_ids'][-1] == 1 else 'length' for c in cases]


def test_bf16_weights(loaded):
  """param_dtype=bfloat16: matrices bf16, norm scales float32, placed on the
  device; the argmax agrees with float32 at >= 90% of positions (tiny random
  models have close logits: measured in the message)."""
  name, cfg32, params32, _ = loaded
  cfg, params, _ = hf_gemma3.load(ROOT / name, param_dtype='bfloat16')
  assert cfg.param_dtype == 'bfloat16'
  assert params['embedding'].dtype == jnp.bfloat16
  assert params['layer_0']['attn']['qkv'].dtype == jnp.bfloat16
  assert params['layer_0']['attn']['q_norm'].dtype == jnp.float32
  assert isinstance(params['embedding'], jax.Array)
  same = total = 0
  worst = 0.0
  for case in reference(name)['cases']:
    ids = case['prompt_ids'] + case['greedy_ids']
    a, b = forward(cfg32, params32, ids), forward(cfg, params, ids)
    same += int((a.argmax(-1) == b.argmax(-1)).sum())
    total += len(ids)
    worst = max(worst, float(np.abs(a - b).max()))
  print(f'{name} bf16 vs float32 weights: argmax equal at {same} / {total}, '
        f'max |logit diff| {worst:.3f}')
  assert same / total >= 0.9 and 0 < worst < 0.5, (same, total, worst)


def test_sharded_load_on_a_mesh():
  """Placed leaf by leaf with the mesh path's sharding (8 fake CPU devices,
  'model' = 8): big matrices split over 'model', norms replicated; the
  forward equals the single-device one."""
  from jax.sharding import Mesh, PartitionSpec as P
  from specdec_jax.loaders.placement import mesh_sharding_fn
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 8), ('data', 'model'))
  cfg, params, _ = hf_gemma3.load(ROOT / 'gemma3_text', sharding=mesh_sharding_fn(mesh))
  _, single, _ = hf_gemma3.load(ROOT / 'gemma3_text')
  assert params['embedding'].sharding.spec == P('model', None)
  assert params['layer_0']['mlp']['down'].sharding.spec == P(None, 'model')
  assert params['layer_0']['attn']['q_norm'].sharding.spec == P()
  ids = reference('gemma3_text')['cases'][0]['prompt_ids']
  np.testing.assert_allclose(forward(cfg, params, ids), forward(cfg, single, ids), atol=1e-5)


def test_tokenizer_json():
  """No tokenizer.model: tokenizer.json through `tokenizers`, BOS added once."""
  _, _, tok = hf_gemma3.load(ROOT / 'gemma3_text')
  for t in reference('gemma3_text')['tokenizer_texts']:
    assert tok.encode(t['text']) == t['ids']
    assert tok.decode(t['ids']) == t['text']
  assert tok.encode('the cat', add_bos=False)[0] != tok.bos_id


def test_no_tokenizer_gives_none():
  assert hf_gemma3.load(ROOT / 'gemma3_mm')[2] is None


def test_other_name_prefix_and_vision_tower_ignored(tmp_path):
  """transformers in memory names the multimodal text model
  `model.language_model.*` (the file says `language_model.model.*`): both load,
  to the same params."""
  from safetensors.numpy import save_file
  src = open_hf_folder(ROOT / 'gemma3_mm')
  renamed = {n.replace('language_model.model.', 'model.language_model.'): src.get(n)
             for n in src.names()}
  assert any(n.startswith('vision_tower.') for n in renamed)
  save_file(renamed, str(tmp_path / 'model.safetensors'))
  shutil.copy(ROOT / 'gemma3_mm' / 'config.json', tmp_path)
  _, a, _ = hf_gemma3.load(ROOT / 'gemma3_mm')
  _, b, _ = hf_gemma3.load(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def fake_folder(config, model_type='gemma3'):
  return HFFolder(pathlib.Path('/ckpt'), dict(config, model_type=model_type), {}, {})


def test_published_style_config_uses_transformers_defaults():
  """A gemma-3-4b-style config.json: the text_config lists only what differs
  from transformers' defaults, RoPE in the older keys, ids at the top."""
  folder = fake_folder({'eos_token_id': [1, 106], 'text_config': {
      'hidden_size': 2560, 'intermediate_size': 10240, 'model_type': 'gemma3_text',
      'num_hidden_layers': 34, 'rope_scaling': {'factor': 8.0, 'rope_type': 'linear'},
      'sliding_window': 1024}})
  cfg = hf_gemma3.config_from_hf(folder)
  assert (cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (262_208, 8, 4, 256)
  assert cfg.is_global == tuple((i + 1) % 6 == 0 for i in range(34))
  assert (cfg.rope_base_global, cfg.rope_scale_global, cfg.rope_base_local) == (1e6, 8.0, 1e4)
  assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.eos_id, cfg.bos_id) == (1024, 256, 1, 2)
  # Both listed ids end a generation (config.is_eos); the config stays hashable.
  assert cfg.stop_ids == (1, 106) and hash(cfg) == hash(cfg.replace())


def test_gemma3_270m_config_gives_our_270m():
  """transformers' own config of Gemma 3 270M (as recorded in the GGUF parity
  fixture) maps to the config the GGUF loader builds."""
  from specdec_jax.config import gemma3_270m
  hf = json.loads((ROOT.parent / 'hf_gemma3_270m.json').read_text())['config']
  cfg = hf_gemma3.config_from_hf(fake_folder(hf, 'gemma3_text'))
  assert cfg.replace(norm_eps=1e-6) == gemma3_270m()
  assert cfg.norm_eps == pytest.approx(1e-6)


@pytest.mark.parametrize('change, needle', [
    ({'final_logit_softcapping': 30.0}, 'final_logit_softcapping'),
    ({'attn_logit_softcapping': 50.0}, 'attn_logit_softcapping'),
    ({'use_bidirectional_attention': True}, 'use_bidirectional_attention'),
    ({'tie_word_embeddings': False}, 'untied'),
    ({'hidden_activation': 'silu'}, 'silu'),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0}}, 'yarn'),
    ({'num_hidden_layers': 3, 'layer_types': ['full_attention', 'sliding_attention',
                                              'full_attention']}, 'p-th layer'),
    ({'num_hidden_layers': 2, 'layer_types': ['full_attention']}, 'layer_types'),
])
def test_unsupported_options_refused_in_one_line(change, needle):
  with pytest.raises(UserError, match=needle) as e:
    hf_gemma3.config_from_hf(fake_folder(change, 'gemma3_text'))
  assert '\n' not in str(e.value)


# ---------------------------------------------------------------- bad folders

def copy_fixture(tmp_path, name='gemma3_text'):
  dst = tmp_path / name
  shutil.copytree(ROOT / name, dst)
  return dst


def load_error(path, **kw):
  from specdec_jax.targets import load_target
  with pytest.raises(UserError) as e:
    load_target(str(path), **kw)
  assert '\n' not in str(e.value), str(e.value)
  return str(e.value)


def test_bad_folders_fail_in_one_line(tmp_path):
  d = copy_fixture(tmp_path)
  (d / 'config.json').rename(d / 'other.json')
  assert 'no config.json' in load_error(d)
  assert 'unknown model' in load_error(tmp_path / 'nope')

  d = copy_fixture(tmp_path, 'gemma3_mm')
  cfg = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps(dict(cfg, model_type='llama')))
  msg = load_error(d)
  assert "'llama' is not supported" in msg and 'gemma3_text' in msg and 'gemma4' in msg
  (d / 'config.json').write_text(json.dumps(dict(cfg, model_type='gemma4_assistant')))
  assert 'a Gemma 4 assistant (a drafter), not a target' in load_error(d)
  (d / 'config.json').write_text('{"model_type": "gemma3", ')
  assert 'unreadable config.json' in load_error(d)

  (d / 'config.json').write_text(json.dumps(cfg))
  (d / 'model.safetensors').unlink()
  assert 'no *.safetensors' in load_error(d)


def test_missing_or_truncated_safetensors(tmp_path):
  d = copy_fixture(tmp_path)
  shard = sorted(d.glob('model-0000*.safetensors'))[2]
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) - 100])
  assert 'truncated or corrupt' in load_error(d)
  shard.unlink()
  assert f'names {shard.name}, which is missing' in load_error(d)


def test_missing_tensor(tmp_path):
  from safetensors.numpy import save_file
  d = copy_fixture(tmp_path, 'gemma3_mm')
  src = open_hf_folder(d)
  kept = {n: src.get(n) for n in src.names() if 'layers.1.mlp.up_proj' not in n}
  src.close()
  save_file(kept, str(d / 'model.safetensors'))
  assert "'language_model.model.layers.1.mlp.up_proj.weight' is missing" in load_error(d)


@pytest.mark.parametrize('key, value, needle', [
    ('intermediate_size', 80, 'mlp.gate_proj.weight has shape [64, 32] but config.json implies [80, 32]'),
    ('num_key_value_heads', 2, 'k_proj.weight has shape [32, 32] but config.json implies [64, 32]'),
    ('vocab_size', 300, 'embed_tokens.weight has shape [256, 32]'),
])
def test_shape_disagreeing_with_config(tmp_path, key, value, needle):
  d = copy_fixture(tmp_path)
  cfg = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps(dict(cfg, **{key: value})))
  assert needle in load_error(d)


# ---------------------------------------------------------------- the job

def job(tmp_path, model, prompts, **overrides):
  from configs.generate import get_config
  from specdec_jax import jobs
  c = get_config()
  c.model, c.output, c.param_dtype = str(model), str(tmp_path / 'o.jsonl'), 'float32'
  c.prompts = str(tmp_path / 'p.jsonl')
  (tmp_path / 'p.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in prompts))
  for key, value in overrides.items():
    c[key] = value
  summary = jobs.run(c)
  return summary, [json.loads(l) for l in (tmp_path / 'o.jsonl').read_text().splitlines()]


@pytest.mark.parametrize('drafter', ['none', 'ngram'])
def test_generation_job_on_a_folder(tmp_path, drafter):
  """`model=<folder>` in the job: HF's greedy tokens, text prompts through
  tokenizer.json, plain and speculative alike."""
  ref = reference('gemma3_text')
  prompts = [{'prompt_ids': c['prompt_ids']} for c in ref['cases']] + [{'prompt': 'the cat'}]
  summary, lines = job(tmp_path, ROOT / 'gemma3_text', prompts, drafter=drafter,
                       max_new_tokens=ref['new_tokens'], batch_size=4)
  lines.sort(key=lambda l: l['index'])
  assert [l['completion_ids'] for l in lines[:3]] == [completion(c) for c in ref['cases']]
  assert lines[3]['prompt_ids'][:1] == [2] and isinstance(lines[3]['completion'], str)
  assert summary['new_tokens'] == sum(l['stats']['new_tokens'] for l in lines)


def test_cli_folder_without_config_json(tmp_path):
  """`python -m experiments.run ... --config.model=<folder>`: one error line, exit 2."""
  import subprocess
  import sys
  (tmp_path / 'model.safetensors').write_bytes(b'')
  r = subprocess.run([sys.executable, '-m', 'experiments.run', '--config=configs/generate.py',
                      f'--config.model={tmp_path}', f'--config.output={tmp_path / "o.jsonl"}'],
                     cwd=ROOT.parents[2], capture_output=True, text=True, timeout=120,
                     env={**__import__('os').environ, 'JAX_PLATFORMS': 'cpu'})
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [f'error: {tmp_path}: no config.json (a Hugging Face '
                                           'checkpoint folder) nor target.json (a trained '
                                           'target folder)'], r.stderr
