"""Drafter training features from self-distilled shards (distill_data.py).

`train.py` with `shards = '<folder>'` uses these instead of computing
teacher-forced features. Rows keep train.Features' interface (`rows(idx)`,
`labels`, `lengths`, len) plus `start`, the first position a loss may use:

  shard row (P prompt tokens, L tokens held)   ->  training row
  hidden valid at [P-2, L-2]                       start = P-2
  labels[t] = tokens[t+1], t in [P-1, L-2]         lengths = L-1 (train's mask is
                                                   t+1+j < lengths: labels up to L-2)

Held-out rows are those whose prompt source (a file, or a chat opening) falls
in the held-out hash range, as train.py splits files. Shards are memory-mapped
after their sha256 is checked; only the small per-row arrays sit in memory.
"""
import hashlib
import json
import pathlib
from typing import Dict, List

import numpy as np

from specdec_jax import distill_data, shards
from specdec_jax.errors import UserError

KINDS = ('all', 'greedy', 'sampled')


def is_heldout(source: str, fraction: float) -> bool:
  return int(hashlib.sha256(source.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


class ShardFeatures:
  """Selected rows of several memory-mapped shards."""

  def __init__(self, parts: List[Dict[str, np.ndarray]], index: np.ndarray):
    self.parts, self.index = parts, index                           # index [N, 2]: (part, row)
    take = lambda k: (np.concatenate([parts[p][k][index[index[:, 0] == p, 1]] for p in
                                      range(len(parts))]) if len(index) else np.zeros((0,)))
    # index is sorted by part, so the concatenation follows it.
    self.tokens = take('tokens').astype(np.int32)
    self.labels = take('labels').astype(np.int32)
    held = take('lengths').astype(np.int32)
    self.lengths = held - 1
    self.start = np.maximum(take('prompt_lengths').astype(np.int32) - 2, 0)

  def __len__(self):
    return len(self.index)

  def rows(self, idx) -> Dict[str, np.ndarray]:
    idx = np.sort(np.asarray(idx))
    big = {k: np.stack([self.parts[p][k][r] for p, r in self.index[idx]])
           for k in ('hidden', 'top_ids', 'top_logp', 'kv')}
    return dict(tokens=self.tokens[idx], lengths=self.lengths[idx], start=self.start[idx],
                labels=self.labels[idx], **big)


def _open_folder(folder: pathlib.Path, c, kv_layers):
  """The manifest of one shard folder, checked against the training run."""
  m = shards.load_manifest(folder)
  if m is None:
    raise UserError(f'shards={folder}: no {shards.MANIFEST} there (distill_data writes it)')
  ident = m['identity']
  if ident.get('format') != distill_data.FORMAT or ident.get('layout_version') != distill_data.LAYOUT_VERSION:
    raise UserError(f'shards={folder} holds feature layout {ident.get("layout_version")!r}; '
                    f'this code reads layout {distill_data.LAYOUT_VERSION}')
  t = ident.get('target', {})
  if t.get('name') != c.model or t.get('gguf', '') != c.gguf:
    raise UserError(f'shards={folder} were written by target {t.get("name")!r} '
                    f'(gguf {t.get("gguf")!r}), not {c.model!r}')
  if list(ident.get('kv_layers', [])) != list(kv_layers):
    raise UserError(f'shards={folder} store the KV of layers {ident.get("kv_layers")}, '
                    f'training reads {list(kv_layers)}')
  return m


def _stream(ident) -> str:
  """What fixes a folder's prompt stream: two folders alike here hold the same rows."""
  return json.dumps({k: ident.get(k) for k in ('seed', 'data_digest', 'greedy_fraction',
                                               'temperature', 'min_prompt_tokens',
                                               'max_prompt_tokens', 'max_new_tokens')},
                    sort_keys=True)


def load(c, target, kv_layers, workdir: pathlib.Path, log=print):
  """-> (train ShardFeatures, held-out ShardFeatures, a name for run.json).

  `c.shards` is one folder or several, comma-separated (written with other
  seeds: a folder holding the same prompt stream as another is refused).
  Uses the first `c.shard_count` shards of a single folder (0: all listed
  now); a resumed training run reuses the counts its run.json recorded, so
  its data do not grow under it while a generator keeps appending.
  """
  folders = [pathlib.Path(f.strip()) for f in str(c.shards).split(',') if f.strip()]
  if c.shard_rows_kind not in KINDS:
    raise UserError(f'shard_rows_kind must be one of {", ".join(KINDS)}, got {c.shard_rows_kind!r}')
  if c.shard_count and len(folders) > 1:
    raise UserError(f'shard_count={c.shard_count} applies to one shard folder; '
                    f'shards lists {len(folders)}')
  manifests = [_open_folder(f, c, kv_layers) for f in folders]
  streams = {}
  for f, m in zip(folders, manifests):
    other = streams.setdefault(_stream(m['identity']), f)
    if other != f:
      raise UserError(f'shards={f} holds the same prompt stream as {other} (same seed and '
                      'data settings); write one of them with another seed')
  counts = [c.shard_count or len(m['shards']) for m in manifests]
  meta = workdir / 'run.json'
  if meta.is_file():
    old = json.loads(meta.read_text()).get('features', '')
    if old.startswith('shards:'):
      recorded = [int(n) for n in old.rsplit(':', 1)[1].split('+')]
      if len(recorded) != len(folders):
        raise UserError(f'the run in {workdir} trained on {len(recorded)} shard folder(s), '
                        f'shards lists {len(folders)}; use the same shards or a new workdir')
      counts = recorded
  parts, sel = [], {'train': [], 'heldout': []}
  for folder, m, count in zip(folders, manifests, counts):
    if count > len(m['shards']) or count < 1:
      raise UserError(f'shards={folder} lists {len(m["shards"])} shards; {count} wanted')
    for e in m['shards'][:count]:
      arr = shards.open_mmap(folder, e)
      p = len(parts)
      parts.append(arr)
      for r in range(e['rows']):
        if c.shard_rows_kind != 'all' and bool(arr['greedy'][r]) != (c.shard_rows_kind == 'greedy'):
          continue
        split = 'heldout' if is_heldout(str(arr['source'][r]), c.heldout_fraction) else 'train'
        sel[split].append((p, r))
  if not sel['heldout'] and len(sel['train']) > 1:      # too few sources for the hash split
    n = max(1, int(len(sel['train']) * c.heldout_fraction))
    sel['heldout'], sel['train'] = sel['train'][-n:], sel['train'][:-n]
  out = {}
  for split, rows in sel.items():
    if not rows:
      raise UserError(f'shards={c.shards} gave no {split} rows ({c.shard_rows_kind}); '
                      'generate more or change shard_rows_kind')
    out[split] = ShardFeatures(parts, np.asarray(rows, np.int64).reshape(-1, 2))
  for folder, m, count in zip(folders, manifests, counts):
    tokens = int(sum(e['new_tokens'] for e in m['shards'][:count]))
    log(f'shards: {count} of {len(m["shards"])} in {folder} ({tokens} generated tokens, '
        'sha256 checked)')
  log(f'{len(out["train"])} train / {len(out["heldout"])} held-out rows ({c.shard_rows_kind})')
  digests = '+'.join(m['identity']['data_digest'] for m in manifests)
  return (out['train'], out['heldout'],
          f'shards:{digests}:{c.shard_rows_kind}:{"+".join(map(str, counts))}')
