"""Writes tiny random Gemma 4 checkpoints with HF transformers (dev time only).

    python tools/make_hf_gemma4_checkpoints.py      # ~1 min once the venv exists

Runs HF transformers (CPU torch 2.13.0, transformers 5.24.0) in its own
throwaway virtual environment, like tools/make_hf_fixture.py, and writes one
folder per Gemma 4 feature family under tests/fixtures/hf_tiny_gemma4/:

- `e_style`: per-layer embeddings (PLE), KV sharing over the last 3 of 6
  layers (both attention types shared), the double-wide MLP on shared layers.
- `moe_k_eq_v`: the MoE block beside the dense MLP (4 experts, top 2),
  keys == values on global layers with their own kv-head count.
- `dense_k_eq_v`: keys == values on global layers, saved as the multimodal
  `gemma4` type (text_config, `model.language_model.*` names, no towers).

Every family has sliding and full layers, a window (4) shorter than the test
sequences, a global head dim twice the local one with proportional RoPE, and a
final logit softcap small enough to bite. Weights are drawn wider than HF's
init and every RMSNorm scale, `layer_scalar` and router scale is perturbed
(they init to ones), so a missed scale cannot hide. Each folder holds
`config.json`, `model.safetensors` (bfloat16, as the published checkpoints)
and `hf_outputs.json`: for a few prompt_ids, HF's greedy tokens and top
logits at every position of prompt + continuation, computed by the checkpoint
reloaded in float32 (the bf16 values, exactly) with eager attention.
tests/test_gemma4.py checks specdec_jax against them; CI never needs torch.
"""
import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / 'tests' / 'fixtures' / 'hf_tiny_gemma4'
VENV = pathlib.Path(os.environ.get('HF_PARITY_VENV', '/tmp/specdec_hf_venv'))
REQUIREMENTS = ['torch==2.13.0', 'transformers==5.24.0', 'numpy']

VOCAB = 160
NEW_TOKENS = 12
TOP = 8
# bos, then random ids; lengths 3 / 9 / 14 span the window (4) several times.
PROMPT_LENGTHS = (3, 9, 14)

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, global_head_dim=16, sliding_window=4,
              rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=2,
              eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
              hidden_size_per_layer_input=0, initializer_range=0.15)

FAMILIES = {
    'e_style': dict(
        num_hidden_layers=6, final_logit_softcapping=3.0,
        layer_types=['sliding_attention', 'sliding_attention', 'full_attention'] * 2,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        num_kv_shared_layers=3, use_double_wide_mlp=True),
    'moe_k_eq_v': dict(
        num_hidden_layers=4, final_logit_softcapping=4.0,
        layer_types=['sliding_attention', 'full_attention'] * 2,
        attention_k_eq_v=True, num_global_key_value_heads=1,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16),
    'dense_k_eq_v': dict(
        num_hidden_layers=4, final_logit_softcapping=5.0,
        layer_types=['sliding_attention', 'sliding_attention', 'full_attention', 'full_attention'],
        attention_k_eq_v=True, num_global_key_value_heads=1, multimodal=True),
}


def _perturb(model, gen):
  """Scales that init to one (norms, layer_scalar, router scales) drawn away
  from it, so a missed multiplier or a `1 + w` convention shows in the logits."""
  import torch
  with torch.no_grad():
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
      leaf = name.rsplit('.', 1)[-1]
      is_norm = 'norm' in name and leaf == 'weight'
      if is_norm or leaf in ('layer_scalar', 'scale', 'per_expert_scale'):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))


def inner(out_dir):
  import numpy as np
  import torch
  import transformers
  from transformers import (Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration,
                            Gemma4TextConfig)

  out_dir = pathlib.Path(out_dir)
  for seed, (family, opts) in enumerate(FAMILIES.items()):
    opts = dict(opts)
    multimodal = opts.pop('multimodal', False)
    torch.manual_seed(seed)
    text = Gemma4TextConfig(**{**COMMON, **opts})
    if multimodal:
      config = Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
      model = Gemma4ForConditionalGeneration(config)
    else:
      model = Gemma4ForCausalLM(text)
    gen = torch.Generator().manual_seed(100 + seed)
    _perturb(model, gen)
    path = out_dir / family
    if path.exists():
      shutil.rmtree(path)
    model.to(torch.bfloat16).save_pretrained(path)
    for extra in ('generation_config.json',):
      (path / extra).unlink(missing_ok=True)

    # The reference: the saved bf16 weights, reloaded and run in float32.
    cls = Gemma4ForConditionalGeneration if multimodal else Gemma4ForCausalLM
    ref = cls.from_pretrained(path, dtype=torch.float32, attn_implementation='eager')
    ref.eval()
    rng = np.random.default_rng(seed)
    cases = []
    for n in PROMPT_LENGTHS:
      prompt = [2] + rng.integers(3, VOCAB, size=n - 1).tolist()
      ids = torch.tensor([prompt])
      with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                           pad_token_id=0)
        full = ref(out).logits[0].float().numpy()                      # [T, V]
      top_ids = np.argsort(-full, axis=-1)[:, :TOP]
      top_vals = np.take_along_axis(full, top_ids, axis=-1)
      m = full.max(-1, keepdims=True)
      lse = np.log(np.exp(full - m).sum(-1)) + m[:, 0]
      cases.append(dict(prompt_ids=prompt, greedy_ids=out[0, len(prompt):].tolist(),
                        top_ids=top_ids.tolist(), top_logits=np.round(top_vals, 6).tolist(),
                        logsumexp=np.round(lse, 6).tolist()))
      print(family, len(prompt), '->', out[0, len(prompt):].tolist(),
            'logit range', float(full.min()), float(full.max()), file=sys.stderr)
    fixture = dict(
        about=(f'HF transformers Gemma 4 ({family}), tiny random weights saved in bf16 and '
               'run in float32 with eager attention; greedy. Written by '
               'tools/make_hf_gemma4_checkpoints.py.'),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
        new_tokens=NEW_TOKENS, cases=cases)
    (path / 'hf_outputs.json').write_text(json.dumps(fixture) + '\n')
    size = sum(f.stat().st_size for f in path.iterdir())
    print('wrote', path, f'{size / 1024:.0f} KiB', file=sys.stderr)


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
