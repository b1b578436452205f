"""The tokenizer of a Hugging Face folder, with the interface of tokenizer.Tokenizer.

`tokenizer.model` (SentencePiece, what Gemma ships) wins; else `tokenizer.json`
through the `tokenizers` library; else None (prompt_ids prompts only).
"""
import pathlib
from typing import List, Optional, Sequence

from specdec_jax.errors import UserError
from specdec_jax.tokenizer import Tokenizer


class JsonTokenizer:
  """A `tokenizers` tokenizer.json: encodes with BOS first, decodes without
  special tokens (as SentencePiece drops control pieces)."""

  def __init__(self, path, *, bos_id: int, eos_id: int, pad_id: int):
    from tokenizers import Tokenizer as HFTokenizer
    try:
      self.tk = HFTokenizer.from_file(str(path))
    except Exception as e:   # the Rust side raises a bare Exception
      raise UserError(f'{path}: unreadable tokenizer.json ({str(e).splitlines()[0]})') from None
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

  @property
  def vocab_size(self) -> int:
    return self.tk.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_bos: bool = True) -> List[int]:
    # Without the file's own post-processor: BOS is added here, once.
    ids = self.tk.encode(text, add_special_tokens=False).ids
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(folder, *, bos_id: int, eos_id: int, pad_id: int) -> Optional[object]:
  """The folder's tokenizer (see the module docstring), or None."""
  folder = pathlib.Path(folder)
  if (folder / 'tokenizer.model').is_file():
    try:
      return Tokenizer.from_file(folder / 'tokenizer.model')
    except (OSError, RuntimeError) as e:
      raise UserError(f'{folder / "tokenizer.model"}: unreadable SentencePiece model '
                      f'({str(e).splitlines()[0] if str(e) else type(e).__name__})') from None
  if (folder / 'tokenizer.json').is_file():
    return JsonTokenizer(folder / 'tokenizer.json', bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
  return None
