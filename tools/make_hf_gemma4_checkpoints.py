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
                           max_new_tokens=NEW_TOKENS,
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


# Assistants (gemma4_assistant), each paired with a target family above: its
# layers read the target's KV of the last non-shared layer of each type, so
# their head shapes follow the target's.
ASSISTANTS = {
    'assistant_e_style': dict(
        target='e_style', use_ordered_embeddings=False,
        text=dict(num_key_value_heads=2, global_head_dim=16)),
    'assistant_dense_centroids': dict(
        target='dense_k_eq_v', use_ordered_embeddings=True, num_centroids=8,
        centroid_intermediate_top_k=3,
        text=dict(num_key_value_heads=2, global_head_dim=16, attention_k_eq_v=True,
                  num_global_key_value_heads=1)),
}
DRAFT_STEPS = 4
PREFIX_LENGTHS = (2, 5, 9, 15, 22)   # tokens so far; the last one is pending


def inner_assistants(out_dir):
  """For each prefix s of the target's fixture sequences: the target run on
  s[:-1] (positions 0 .. n-2 cached, the hidden state that predicted s[-1]),
  then the assistant called directly for DRAFT_STEPS greedy steps from the
  pending token s[-1] at position n-1, as the first round of transformers'
  SinglePositionMultiTokenCandidateGenerator after a prefill of s[:-1] does."""
  import numpy as np
  import torch
  import transformers
  from transformers import (Gemma4AssistantConfig, Gemma4AssistantForCausalLM,
                            Gemma4ForCausalLM, Gemma4ForConditionalGeneration,
                            Gemma4TextConfig)

  out_dir = pathlib.Path(out_dir)
  for seed, (name, spec) in enumerate(ASSISTANTS.items()):
    torch.manual_seed(50 + seed)
    tpath = out_dir / spec['target']
    tcfg = json.loads((tpath / 'config.json').read_text())
    multimodal = tcfg['model_type'] == 'gemma4'
    target = (Gemma4ForConditionalGeneration if multimodal else Gemma4ForCausalLM).from_pretrained(
        tpath, dtype=torch.float32, attn_implementation='eager').eval()
    lm = target.model.language_model if multimodal else target.model
    text = Gemma4TextConfig(**{**COMMON, 'hidden_size': 24, 'intermediate_size': 40,
                               'num_attention_heads': 4, 'num_hidden_layers': 3,
                               'layer_types': ['sliding_attention', 'sliding_attention',
                                               'full_attention'],
                               'vocab_size_per_layer_input': 0, **spec['text']})
    config = Gemma4AssistantConfig(
        text_config=text.to_dict(), backbone_hidden_size=COMMON['hidden_size'],
        use_ordered_embeddings=spec['use_ordered_embeddings'],
        **{k: spec[k] for k in ('num_centroids', 'centroid_intermediate_top_k') if k in spec})
    model = Gemma4AssistantForCausalLM(config)
    gen = torch.Generator().manual_seed(200 + seed)
    _perturb(model, gen)
    if spec['use_ordered_embeddings']:
      with torch.no_grad():
        model.masked_embedding.token_ordering.copy_(torch.randperm(VOCAB, generator=gen))
    path = out_dir / name
    if path.exists():
      shutil.rmtree(path)
    model.to(torch.bfloat16).save_pretrained(path)
    (path / 'generation_config.json').unlink(missing_ok=True)
    ref = Gemma4AssistantForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation='eager').eval()
    seqs = json.loads((tpath / 'hf_outputs.json').read_text())['cases']
    cases = []
    for c in seqs:
      seq = c['prompt_ids'] + c['greedy_ids']
      for n in [n for n in PREFIX_LENGTHS if n <= len(seq)]:
        ids = torch.tensor([seq[:n - 1]])
        with torch.no_grad():
          out = lm(input_ids=ids, output_hidden_states=True, return_shared_kv_states=True)
          h = out.hidden_states[-1][:, -1:]
          # The generator's seed state is the final-normed hidden state.
          assert torch.equal(h, out.last_hidden_state[:, -1:])
          kv = dict(out.shared_kv_states)
          token = torch.tensor([[seq[n - 1]]])
          drafts, top_ids, top_logits = [], [], []
          for _ in range(DRAFT_STEPS):
            x = torch.cat([lm.embed_tokens(token), h], dim=-1)
            o = ref(inputs_embeds=x, attention_mask=torch.ones(1, n, dtype=torch.long),
                    position_ids=torch.tensor([[n - 1]]), shared_kv_states=kv, use_cache=False)
            logits = o.logits[0, 0].numpy()
            token, h = o.logits.argmax(-1), o.last_hidden_state
            order = np.argsort(-logits)[:TOP]
            drafts.append(int(token))
            top_ids.append(order.tolist())
            top_logits.append(np.round(logits[order], 6).tolist())
        cases.append(dict(tokens=seq[:n], drafts=drafts, top_ids=top_ids, top_logits=top_logits))
      print(name, len(seq), [x['drafts'] for x in cases if len(x['tokens']) <= len(seq)][-3:],
            file=sys.stderr)
    fixture = dict(
        about=(f'HF transformers Gemma4AssistantForCausalLM ({name}) drafting for the '
               f'{spec["target"]} target: for each `tokens` (the last one pending), the '
               'target run on tokens[:-1], then the assistant called directly for '
               f'{DRAFT_STEPS} greedy steps at position len(tokens) - 1. Written by '
               'tools/make_hf_gemma4_checkpoints.py.'),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
        target=spec['target'], draft_steps=DRAFT_STEPS, cases=cases)
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
    inner_assistants(args.inner)
  else:
    outer()
