"""Writes tiny random Gemma 3 checkpoints with HF transformers (dev time only).

    python tools/make_hf_checkpoints.py          # ~1 min; needs the venv below

Runs transformers itself, in its own throwaway virtual environment (CPU torch
2.13.0 + transformers 5.24.0, like tools/make_hf_fixture.py), and writes under
tests/fixtures/hf_tiny/ one folder per checkpoint, each a real
`save_pretrained` folder (config.json + safetensors) plus `reference.json`:
HF's greedy continuation (ending with <eos> = 1 where HF stopped there) and
top logits (float32, eager attention) for a few prompt_ids sequences longer
than the sliding window.

- `gemma3_text/`: Gemma3ForCausalLM; GQA, head_dim * heads != hidden,
  query_pre_attn_scalar != head_dim, layers sliding / sliding / full,
  linear RoPE scaling on the full layer; stored bfloat16, sharded with
  `model.safetensors.index.json`; a `tokenizer.json` (a small BPE trained
  here with the `tokenizers` library) and its encodings of a few texts.
- `gemma3_mm/`: Gemma3ForConditionalGeneration (multimodal `gemma3`: a tiny
  SigLIP vision tower and projector our loader must ignore); stored float32
  in one file; no tokenizer (prompt_ids only).

Norm weights are random (HF's RMSNorm multiplies by 1 + w; a missed +1
cannot hide) and the linear weights are scaled so the logits are far from
uniform (greedy ties would make "tokens exactly equal" meaningless). The
reference is the saved folder as transformers loads it (float32). tests/test_hf_loader.py checks specdec_jax against
them; the folders are committed, so CI never needs torch.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / 'tests' / 'fixtures' / 'hf_tiny'
VENV = pathlib.Path(os.environ.get('HF_PARITY_VENV', '/tmp/specdec_hf_venv'))
REQUIREMENTS = ['torch==2.13.0', 'transformers==5.24.0', 'tokenizers', 'safetensors',
                'numpy']

# Prompt ids avoid 0..2 (pad, eos, bos) after the leading bos, and the
# multimodal model's image ids (125..127).
PROMPTS = [
    [2, 17, 45, 9, 88, 23, 61, 5, 30, 71, 12],
    [2, 100, 4, 4, 4, 57, 33, 33, 90],
    [2, 8, 19, 64, 77, 102, 3, 41, 56, 119, 24, 36, 6],
]
NEW_TOKENS = 12
TOP = 8
TOKENIZER_TEXTS = ['the cat sat on the mat', 'def f(x):\n    return x + 1',
                   'hello world, hello tiny gemma']


def text_config(cls, **kw):
  base = dict(hidden_activation='gelu_pytorch_tanh', rms_norm_eps=1e-6, pad_token_id=0,
              eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
              max_position_embeddings=256, attn_implementation='eager')
  base.update(kw)
  return cls(**base)


def randomize(model, torch):
  """Weights far from init: norms N(0, 0.4) (multiplier 1 + w), matrices
  1/sqrt(fan_in), embeddings 0.5/sqrt(D) (scaled by sqrt(D) at run time they
  must not drown the layers, or greedy just repeats the last token)."""
  g = torch.Generator().manual_seed(1234)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight') or 'layernorm' in name:
        p.copy_(0.4 * torch.randn(p.shape, generator=g))
      elif 'embed_tokens' in name:
        p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p.shape[-1] ** 0.5)
      elif p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))


def reference(model, torch, np):
  cases = []
  for ids in PROMPTS:
    x = torch.tensor([ids])
    with torch.no_grad():
      # Stops at <eos> like ours (min_new_tokens would mask it: another argmax).
      out = model.generate(x, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)[0]
      greedy = out[len(ids):].tolist()
      if 1 in greedy:
        greedy = greedy[:greedy.index(1) + 1]
      out = out[:len(ids) + len(greedy)]
      full = model(out[None]).logits[0].float().numpy()
    top_ids = np.argsort(-full, axis=-1)[:, :TOP]
    top_vals = np.take_along_axis(full, top_ids, axis=-1)
    gap = top_vals[:, 0] - top_vals[:, 1]
    cases.append(dict(prompt_ids=ids, greedy_ids=greedy,
                      top_ids=top_ids.tolist(), top_logits=np.round(top_vals, 6).tolist(),
                      min_top2_gap=round(float(gap.min()), 6)))
  return cases


def make_tokenizer(out_dir, vocab_size):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  corpus = TOKENIZER_TEXTS * 4 + ['abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789',
                                  '():,.+-=\n']
  trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                special_tokens=['<pad>', '<eos>', '<bos>', '<unk>'])
  tok.train_from_iterator(corpus, trainer)
  tok.save(str(out_dir / 'tokenizer.json'))
  return [dict(text=t, ids=[2] + tok.encode(t).ids) for t in TOKENIZER_TEXTS]


def save(model, cfg_name, out_dir, dtype, shard, torch, np, transformers, **extra):
  """Saves `model` in `dtype`, then takes the reference from the saved folder
  as transformers loads it in float32 (not from the model in memory: its
  non-persistent buffers, such as the embedding scale, would keep a bf16
  rounding that a fresh load does not have)."""
  import shutil
  shutil.rmtree(out_dir, ignore_errors=True)
  model.to(dtype).save_pretrained(out_dir, max_shard_size=shard)
  (out_dir / 'generation_config.json').unlink(missing_ok=True)
  loaded = type(model).from_pretrained(out_dir, dtype=torch.float32,
                                       attn_implementation='eager').eval()
  cases = reference(loaded, torch, np)
  about = (f'tiny random {cfg_name} written by tools/make_hf_checkpoints.py with '
           f'transformers {transformers.__version__}, torch {torch.__version__}; '
           f'stored {str(dtype).split(".")[-1]}; reference: the folder loaded in float32, '
           'eager attention, greedy')
  (out_dir / 'reference.json').write_text(json.dumps(
      dict(about=about, new_tokens=NEW_TOKENS, top=TOP, cases=cases, **extra), indent=0))
  print(out_dir, [c['greedy_ids'] for c in cases],
        'min top-2 gap', min(c['min_top2_gap'] for c in cases), file=sys.stderr)


def inner(out_root):
  import numpy as np
  import torch
  import transformers
  from transformers import (Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration,
                            Gemma3TextConfig, SiglipVisionConfig)
  out_root = pathlib.Path(out_root)
  torch.manual_seed(0)

  cfg = text_config(
      Gemma3TextConfig, vocab_size=256, hidden_size=32, intermediate_size=64,
      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
      query_pre_attn_scalar=24, sliding_window=4,
      layer_types=['sliding_attention', 'sliding_attention', 'full_attention'],
      rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 4.0,
                                          'rope_theta': 10_000.0},
                       'sliding_attention': {'rope_type': 'default', 'rope_theta': 100.0}})
  model = Gemma3ForCausalLM(cfg)
  randomize(model, torch)
  d = out_root / 'gemma3_text'
  save(model, 'gemma3_text', d, torch.bfloat16, '20KB', torch, np, transformers)
  texts = make_tokenizer(d, 200)
  ref = json.loads((d / 'reference.json').read_text())
  ref['tokenizer_texts'] = texts
  (d / 'reference.json').write_text(json.dumps(ref, indent=0))

  tcfg = text_config(
      Gemma3TextConfig, vocab_size=128, hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
      query_pre_attn_scalar=8, sliding_window=3,
      layer_types=['sliding_attention', 'full_attention'],
      rope_parameters={'full_attention': {'rope_type': 'default', 'rope_theta': 1000.0},
                       'sliding_attention': {'rope_type': 'default', 'rope_theta': 50.0}})
  vcfg = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, image_size=16, patch_size=4,
                            num_channels=3)
  mcfg = Gemma3Config(text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(),
                      mm_tokens_per_image=4, boi_token_index=125, eoi_token_index=126,
                      image_token_index=127, tie_word_embeddings=True)
  mcfg.text_config._attn_implementation = 'eager'
  mcfg._attn_implementation = 'eager'
  model = Gemma3ForConditionalGeneration(mcfg)
  randomize(model, torch)
  save(model, 'gemma3 (multimodal)', out_root / 'gemma3_mm', torch.float32, '10MB',
       torch, np, transformers)


def outer():
  py = VENV / 'bin' / 'python'
  if not py.exists():
    subprocess.run([sys.executable, '-m', 'venv', str(VENV)], check=True)
    subprocess.run([str(py), '-m', 'pip', 'install', '-q', *REQUIREMENTS], check=True)
  OUT.mkdir(parents=True, exist_ok=True)
  subprocess.run([str(py), __file__, '--inner', str(OUT)], check=True)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--inner', metavar='OUT_DIR')
  args = parser.parse_args()
  if args.inner:
    inner(args.inner)
  else:
    outer()
