"""Plain-text literary prose for drafter data, from Debian packages whose text
is stored compressed (issue #14: the prose lever).

    sh tools/fetch_corpora.sh sword-text-web dict-devil
    pip install pysword            # reads SWORD Bible modules (this tool only)
    python tools/plain_text_corpora.py

Writes, under {corpora} (tools/fetch_corpora.sh's folder):
  plain/web-bible/<book>.txt   the World English Bible (public domain,
                               Debian sword-text-web), one file per book,
                               a verse per line, markup removed
  plain/devil/devil.txt        Ambrose Bierce's "The Devil's Dictionary"
                               (public domain, Debian dict-devil), the
                               dictd file decompressed

configs/distill_data.py's `:literary` data reads them. The evaluation prose
(experiments/prompts/prose.jsonl, from fortunes-min) is checked against the
written text: a prompt found in it is an error.
"""
import gzip
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from specdec_jax import train  # noqa: E402  (corpora_dir)


def _norm(s: str) -> str:
  return re.sub(r'\W+', ' ', s).strip().lower()


def web_bible(corpora: pathlib.Path, out: pathlib.Path) -> int:
  try:
    from pysword.modules import SwordModules
  except ImportError:
    raise SystemExit('error: pip install pysword first (it reads the SWORD module)')
  src = corpora / 'sword-text-web' / 'usr' / 'share' / 'sword'
  if not src.is_dir():
    raise SystemExit('error: sh tools/fetch_corpora.sh sword-text-web first')
  sword = SwordModules(str(src))
  key = next(iter(sword.parse_modules()))
  bible = sword.get_bible_from_module(key)
  out.mkdir(parents=True, exist_ok=True)
  n = 0
  for testament in bible.get_structure().get_books().values():
    for book in testament:
      verses = bible.get_iter(books=[book.osis_name], clean=False)
      lines = []
      for v in verses:
        v = re.sub(r'<note[^>]*>.*?</note>', ' ', v, flags=re.S)    # footnotes (between words)
        v = re.sub(r'<[^>]+>', '', v)                                 # word tags
        v = re.sub(r'\s+', ' ', v).strip()
        if v:
          lines.append(v)
      (out / f'{book.osis_name}.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
      n += sum(len(l) for l in lines)
  return n


def devil(corpora: pathlib.Path, out: pathlib.Path) -> int:
  src = corpora / 'dict-devil' / 'usr' / 'share' / 'dictd' / 'devil.dict.dz'
  if not src.is_file():
    raise SystemExit('error: sh tools/fetch_corpora.sh dict-devil first')
  text = gzip.open(src, 'rt', encoding='utf-8', errors='replace').read()
  out.mkdir(parents=True, exist_ok=True)
  (out / 'devil.txt').write_text(text, encoding='utf-8')
  return len(text)


def check_eval_prose(folders) -> None:
  """No evaluation prose prompt may occur in the written text."""
  prompts = [_norm(json.loads(l)['prompt'])[:60]
             for l in (ROOT / 'experiments' / 'prompts' / 'prose.jsonl').read_text().splitlines()]
  for folder in folders:
    for f in sorted(folder.glob('*.txt')):
      text = _norm(f.read_text(encoding='utf-8'))
      for p in prompts:
        if p in text:
          raise SystemExit(f'error: evaluation prompt {p[:40]!r}... occurs in {f}')


def main():
  corpora = train.corpora_dir()
  plain = corpora / 'plain'
  chars = dict(web_bible=web_bible(corpora, plain / 'web-bible'),
               devil=devil(corpora, plain / 'devil'))
  check_eval_prose([plain / 'web-bible', plain / 'devil'])
  print(json.dumps(dict(folder=str(plain), chars=chars, eval_prose_overlap=0)))


if __name__ == '__main__':
  main()
