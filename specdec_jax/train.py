"""Drafter training: data, cached target features, the multi-token loss, the loop.

    python -m experiments.run --config=configs/train_mtp.py

Pipeline (each stage cached, so a rerun or a resume skips it):
  1. text: files matched by the config's globs ({stdlib} = this Python's
     standard library, {corpora} = tools/fetch_corpora.sh's folder), split
     into train / held-out *by file*, tokenized with the target's tokenizer
     and cut into windows of `seq_len` tokens that start with BOS.
  2. target features, computed once per window with the frozen target:
     the final-normed hidden state at every position, the target's greedy
     token there (what a greedy verify accepts), its top-16 log-probs (for
     the KL loss), and the KV cache of the layers the MTP drafter reads.
     Stored as float16 .npy files under the cache folder, memory-mapped.
  3. the reduced vocabulary: the `draft_vocab_size` most frequent target
     greedy tokens on the training split.
  4. AdamW with warm-up + cosine decay; loss summed over the k block
     positions: cross-entropy to the target's greedy tokens ('ce') or KL to
     its (top-16, renormalised on the subset) distribution ('kl'). Teacher
     forcing: step j reads the text token at t+1+j.
  5. orbax checkpoints every `checkpoint_every` steps; a rerun with the same
     workdir resumes from the newest one and ends where an uninterrupted run
     ends (data order is a function of the step; see `batch_rows`).
  With `shards` set, stages 1-2 read the target's own continuations and the
  features recorded while it generated them (distill_data.py,
  shard_features.py) instead; labels are then the tokens it chose.
  6. held-out per-position accuracy (argmax == target greedy token) and the
     chained acceptance (all drafts up to i right) logged as it trains, with
     progress and ETA; the final drafter is exported with checkpoints.py.

Alignment with inference (generate.py): at position t the drafter gets the
target state h_t (which predicted token t+1) and the embedding of token t+1
(the pending token), attends to target keys at positions <= t, sits at query
position t+1, and its step j predicts the target's token at t+2+j.
"""
import concurrent.futures
import dataclasses
import glob
import hashlib
import io
import json
import math
import os
import pathlib
import sys
import sysconfig
import time
from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specdec_jax.drafter_models import DrafterConfig, HeadsNet, MTPNet, init_drafter_params
from specdec_jax.errors import UserError
from specdec_jax.model import KVCache, Transformer, lm_head, take_rows

TOPK = 16
# Part of the feature cache key: bump it when the windowing or the feature
# computation changes, so no stale features are reused.
FEATURES_VERSION = 2


def default_cache_root() -> pathlib.Path:
  return pathlib.Path(os.environ.get('SPECDEC_CACHE', pathlib.Path.home() / '.cache' / 'specdec_jax'))


def corpora_dir() -> pathlib.Path:
  return default_cache_root() / 'corpora'


# ----------------------------------------------------------------------------
# 1. Text.
# ----------------------------------------------------------------------------

def expand_data(patterns: Sequence[str]) -> List[pathlib.Path]:
  """Globs with {stdlib} / {corpora} placeholders -> sorted unique files.

  Raises UserError when nothing at all matches (a pattern that matches
  nothing beside others that do is reported on stderr).
  """
  subs = dict(stdlib=sysconfig.get_paths()['stdlib'], corpora=str(corpora_dir()))
  files = set()
  for pat in patterns:
    matched = [pathlib.Path(p) for p in glob.glob(pat.format(**subs), recursive=True)]
    # {stdlib} means the standard library, not packages installed beside it.
    matched = [p for p in matched if p.is_file() and not (
        '{stdlib}' in pat and ({'site-packages', 'dist-packages'} & set(p.parts)))]
    if not matched:
      print(f'warning: data pattern {pat!r} matches no files', file=sys.stderr)
    files.update(matched)
  if not files:
    raise UserError(f'the training data patterns {list(patterns)} match no files')
  return sorted(files)


def _is_heldout(path: pathlib.Path, fraction: float) -> bool:
  h = int(hashlib.sha256(str(path.name).encode() + str(path.parent.name).encode()).hexdigest()[:8], 16)
  return h / 0xFFFFFFFF < fraction


def build_windows(files, tokenizer, *, seq_len: int, max_tokens: int, heldout_fraction: float,
                  bos_id: int, pad_id: int, max_windows_per_file: int = 4):
  """-> {'train': (tokens [N, T] int32, lengths [N]), 'heldout': (...)}.

  Each file is one document: BOS + its tokens, cut into windows of seq_len
  (later windows start with BOS too, as every prompt does). A tail shorter
  than seq_len // 4 is dropped, longer ones padded. At most
  max_windows_per_file come from one file (variety over depth). Stops at
  max_tokens (train) and max_tokens * heldout_fraction (held-out).
  """
  out = {'train': ([], []), 'heldout': ([], [])}
  budget = {'train': max_tokens, 'heldout': max(seq_len, int(max_tokens * heldout_fraction))}
  # A fixed shuffle, so a token budget samples every source (code, prose)
  # rather than the alphabetically first files.
  files = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
  for path in files:
    split = 'heldout' if _is_heldout(path, heldout_fraction) else 'train'
    if budget[split] <= 0:
      if all(b <= 0 for b in budget.values()):
        break
      continue
    try:
      text = path.read_text(encoding='utf-8')
    except (UnicodeDecodeError, OSError):
      continue
    ids = tokenizer.encode(text)
    ids = ids[1:] if ids and ids[0] == bos_id else ids
    body = seq_len - 1
    for s in range(0, min(len(ids), body * max_windows_per_file), body):
      chunk = ids[s:s + body]
      if len(chunk) < seq_len // 4 or budget[split] <= 0:
        break
      row = np.full((seq_len,), pad_id, np.int32)
      row[0] = bos_id
      row[1:1 + len(chunk)] = chunk
      out[split][0].append(row)
      out[split][1].append(1 + len(chunk))
      budget[split] -= 1 + len(chunk)
  if not out['heldout'][0] and len(out['train'][0]) > 1:
    # Too few files for the hash split to pick one: hold out the last train
    # windows (other windows, possibly of the same file).
    n = max(1, int(len(out['train'][0]) * heldout_fraction))
    out['heldout'] = (out['train'][0][-n:], out['train'][1][-n:])
    out['train'] = (out['train'][0][:-n], out['train'][1][:-n])
  result = {}
  for split, (rows, lens) in out.items():
    if not rows:
      raise UserError(f'the training data gave no {split} windows: add files or lower seq_len')
    result[split] = (np.stack(rows), np.asarray(lens, np.int32))
  return result


# ----------------------------------------------------------------------------
# 2. Target features.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class Features:
  tokens: np.ndarray      # [N, T] int32
  lengths: np.ndarray     # [N] int32
  hidden: np.ndarray      # [N, T, D] float16
  labels: np.ndarray      # [N, T] int32: target greedy token after position t
  top_ids: np.ndarray     # [N, T, TOPK] int32
  top_logp: np.ndarray    # [N, T, TOPK] float16
  kv: np.ndarray          # [N, L, 2, K, T, H] float16 (L = kv layers read)

  def rows(self, idx) -> Dict[str, np.ndarray]:
    idx = np.sort(np.asarray(idx))
    return dict(tokens=self.tokens[idx], lengths=self.lengths[idx], hidden=self.hidden[idx],
                labels=self.labels[idx], top_ids=self.top_ids[idx],
                top_logp=self.top_logp[idx], kv=self.kv[idx])

  def __len__(self):
    return len(self.tokens)


def _feature_fns(cfg, kv_layers):
  """Body, head, top-k and logsumexp as separate jitted calls: in one
  program (even without the head) XLA:CPU took 25 s per 256 rows of real
  Gemma logits for what takes 0.5 s as separate calls."""
  model = Transformer(cfg)

  @jax.jit
  def body(params, tokens):
    B, T = tokens.shape
    cache = KVCache.init(cfg, B, T)
    _, hidden, cache = model.apply({'params': params}, tokens, cache, compute_logits=False)
    kv = jnp.stack([jnp.stack([cache.k[l], cache.v[l]], 1) for l in kv_layers], 1)
    return hidden, kv.astype(jnp.float16)

  head = jax.jit(lm_head)                                          # [T, D] -> [T, V]
  top = jax.jit(lambda logits: jax.lax.top_k(logits, TOPK))
  lse = jax.jit(lambda logits: jax.nn.logsumexp(logits, axis=-1, keepdims=True))

  def fn(params, tokens):
    hidden, kv = body(params, tokens)
    labels, top_i, top_lp = [], [], []
    for b in range(tokens.shape[0]):
      logits = head(hidden[b], params['embedding'])
      v, i = top(logits)
      labels.append(i[:, 0])
      top_i.append(i)
      top_lp.append((v - lse(logits)).astype(jnp.float16))
    return (hidden.astype(jnp.float16), jnp.stack(labels), jnp.stack(top_i),
            jnp.stack(top_lp), kv)

  return fn


def compute_features(target, windows, kv_layers, directory: pathlib.Path, *,
                     batch_size: int = 4, log=print) -> Features:
  """Runs the frozen target over the windows once; cached in `directory`."""
  names = ('hidden', 'labels', 'top_ids', 'top_logp', 'kv')
  done = directory / 'done.json'
  if done.is_file():
    arrs = {n: np.load(directory / f'{n}.npy', mmap_mode='r') for n in names}
    return Features(tokens=np.load(directory / 'tokens.npy'), lengths=np.load(directory / 'lengths.npy'),
                    **arrs)
  directory.mkdir(parents=True, exist_ok=True)
  tokens, lengths = windows
  cfg = target.config
  N, T = tokens.shape
  K, H, D = cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
  shapes = dict(hidden=((N, T, D), np.float16), labels=((N, T), np.int32),
                top_ids=((N, T, TOPK), np.int32), top_logp=((N, T, TOPK), np.float16),
                kv=((N, len(kv_layers), 2, K, T, H), np.float16))
  out = {n: np.lib.format.open_memmap(directory / f'{n}.npy', mode='w+', dtype=dt, shape=s)
         for n, (s, dt) in shapes.items()}
  fn = _feature_fns(cfg, tuple(kv_layers))
  t0 = time.time()
  for s in range(0, N, batch_size):
    rows = tokens[s:s + batch_size]
    pad = batch_size - len(rows)
    if pad:
      rows = np.concatenate([rows, np.repeat(rows[-1:], pad, 0)])
    res = jax.device_get(fn(target.params, jnp.asarray(rows)))
    for n, r in zip(names, res):
      out[n][s:s + batch_size] = r[:batch_size - pad]
    if (s // batch_size) % 20 == 0 or s + batch_size >= N:
      done_n = min(s + batch_size, N)
      rate = done_n * T / (time.time() - t0)
      log(f'  target features {done_n}/{N} windows, {rate:.0f} tok/s, '
          f'ETA {(N - done_n) * T / rate / 60:.1f} min')
  for a in out.values():
    a.flush()
  np.save(directory / 'tokens.npy', tokens)
  np.save(directory / 'lengths.npy', lengths)
  done.write_text(json.dumps(dict(windows=int(N), seq_len=int(T),
                                  seconds=round(time.time() - t0, 1))))
  return compute_features(target, windows, kv_layers, directory)


def choose_vocab(feats: Features, size: int, vocab_size: int) -> np.ndarray:
  """The `size` most frequent target greedy tokens (ties by id), sorted by id;
  unseen ids fill up the rest if the data has fewer distinct tokens."""
  T = feats.labels.shape[1]
  labels = np.asarray(feats.labels)
  valid = (np.arange(T)[None, :] < feats.lengths[:, None]) & (labels >= 0)
  counts = np.bincount(labels[valid], minlength=vocab_size)
  order = np.lexsort((np.arange(vocab_size), -counts))
  return np.sort(order[:size]).astype(np.int32)


# ----------------------------------------------------------------------------
# 4. Loss.
# ----------------------------------------------------------------------------

def _shift(a, s):
  """a[:, s:] padded back to length T with zeros (axis 1)."""
  pad = [(0, 0)] * a.ndim
  pad[1] = (0, s)
  return jnp.pad(a[:, s:], pad)


def feature_kv_layers(target_config) -> tuple:
  """Target layers whose KV the features store: its last local and last
  global layer, which is what any MTP depth reads (see DrafterConfig.kv_layers)."""
  return tuple(sorted(set(DrafterConfig('mtp', target_config, draft_vocab_size=1,
                                        num_layers=2).kv_layers)))


def drafter_outputs(dcfg: DrafterConfig, net_params, embedding, vocab, batch, depth: int):
  """Reduced-vocabulary logits for every position t and block step j:
  [depth] list of [B, T, R] float32 (step j predicts the target token at t+2+j).
  batch['kv'] holds the layers of feature_kv_layers(target), in that order."""
  t_cfg = dcfg.target
  tokens = batch['tokens']
  B, T = tokens.shape
  sub = take_rows(embedding, vocab).astype(t_cfg.jnp_dtype)
  scale = math.sqrt(t_cfg.embed_dim)
  embed = lambda tok: take_rows(embedding, tok).astype(t_cfg.jnp_dtype) * scale
  h = batch['hidden'].astype(t_cfg.jnp_dtype)
  if dcfg.kind == 'heads':
    logits = HeadsNet(dcfg).apply({'params': net_params}, embed(_shift(tokens, 1)), h, sub)
    return [logits[:, :, j] for j in range(depth)]
  q_pos = jnp.broadcast_to(jnp.arange(1, T + 1), (B, T))
  kv = batch['kv'].astype(t_cfg.jnp_dtype)                     # [B, L, 2, K, T, H]
  stored = feature_kv_layers(t_cfg)
  kvs = tuple((kv[:, stored.index(l), 0], kv[:, stored.index(l), 1]) for l in dcfg.kv_layers)
  net = MTPNet(dcfg)
  out = []
  for j in range(depth):
    h, logits = net.apply({'params': net_params}, embed(_shift(tokens, 1 + j)), h, q_pos, kvs, sub)
    out.append(logits)
  return out


def loss_and_metrics(dcfg, net_params, embedding, vocab, inv_vocab, batch, depth, loss_kind):
  T = batch['tokens'].shape[1]
  t = jnp.arange(T)[None, :]
  all_logits = drafter_outputs(dcfg, net_params, embedding, vocab, batch, depth)
  total, metrics, chain = 0.0, {}, None
  for j, logits in enumerate(all_logits):
    valid = (t + 1 + j < batch['lengths'][:, None])                      # position t+1+j exists
    if 'start' in batch:           # self-distilled rows: no target state before the prompt's end
      valid &= t >= batch['start'][:, None]
    labels = _shift(batch['labels'], 1 + j)
    logp = jax.nn.log_softmax(logits, axis=-1)
    if loss_kind == 'ce':
      lab_r = inv_vocab[labels]
      w = valid & (lab_r >= 0)
      nll = -jnp.take_along_axis(logp, jnp.maximum(lab_r, 0)[..., None], axis=-1)[..., 0]
    else:                                          # 'kl' to the top-16, on the subset
      ids_r = inv_vocab[_shift(batch['top_ids'], 1 + j)]                 # [B, T, 16]
      tl = jnp.where(ids_r >= 0, _shift(batch['top_logp'], 1 + j).astype(jnp.float32), -jnp.inf)
      p = jax.nn.softmax(tl, axis=-1)
      p = jnp.where(jnp.isfinite(tl), p, 0.0)
      w = valid & jnp.any(ids_r >= 0, axis=-1)
      q = jnp.take_along_axis(logp, jnp.maximum(ids_r, 0), axis=-1)
      nll = -jnp.sum(p * jnp.where(ids_r >= 0, q, 0.0), axis=-1) + jnp.sum(
          jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)
    wf = w.astype(jnp.float32)
    total = total + jnp.sum(nll * wf) / jnp.maximum(jnp.sum(wf), 1.0)
    correct = (vocab[jnp.argmax(logits, axis=-1)] == labels)
    chain = correct if chain is None else chain & correct
    vf = valid.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(vf), 1.0)
    metrics[f'acc_{j + 1}'] = jnp.sum(correct * vf) / n
    metrics[f'chain_{j + 1}'] = jnp.sum(chain * vf) / n
  metrics['loss'] = total
  return total, metrics


# ----------------------------------------------------------------------------
# The training loop.
# ----------------------------------------------------------------------------

def batch_rows(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
  """Rows of training batch `step`: epoch-wise permutations, a pure function
  of (step, seed), so a resumed run sees exactly the batches it would have."""
  start = step * batch_size
  rows = []
  while len(rows) < batch_size:
    epoch, offset = divmod(start + len(rows), n)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    rows.extend(perm[offset:offset + batch_size - len(rows)].tolist())
  return np.asarray(rows)


def make_optimizer(c):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, c.learning_rate, max(1, c.warmup_steps), max(c.steps, c.warmup_steps + 1),
      end_value=c.learning_rate * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=c.weight_decay))


def evaluate(eval_fn, params, feats: Features, batch_size: int, max_rows: int):
  """Mean held-out metrics over the first max_rows windows (whole batches)."""
  n = max(batch_size, (min(len(feats), max_rows) // batch_size) * batch_size)
  rows = np.arange(n) % len(feats)
  sums = {}
  for s in range(0, n, batch_size):
    m = jax.device_get(eval_fn(params, feats.rows(rows[s:s + batch_size])))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {k: v / (n // batch_size) for k, v in sums.items()}


LOSSES = ('ce', 'kl')


def drafter_config_from(c, target_config) -> DrafterConfig:
  try:
    return DrafterConfig(kind=c.drafter, target=target_config,
                         draft_vocab_size=c.draft_vocab_size, width=c.width,
                         hidden_dim=c.hidden_dim, num_layers=c.num_layers,
                         num_heads=c.num_heads, num_draft_heads=c.depth)
  except ValueError as e:
    raise UserError(str(e)) from None


def validate(c) -> None:
  from specdec_jax.targets import check_model_name
  check_model_name(c.model)
  if c.drafter not in ('mtp', 'heads'):
    raise UserError(f'unknown trainable drafter {c.drafter!r}; choose mtp or heads')
  if c.loss not in LOSSES:
    raise UserError(f'unknown loss {c.loss!r}; choose one of {", ".join(LOSSES)}')
  for key in ('steps', 'batch_size', 'depth', 'seq_len', 'max_tokens', 'num_layers', 'width',
              'hidden_dim', 'draft_vocab_size', 'checkpoint_every', 'eval_every'):
    if c[key] < 1:
      raise UserError(f'{key} must be >= 1, got {c[key]}')
  if c.seq_len < 8:
    raise UserError(f'seq_len must be >= 8, got {c.seq_len}')
  if not 0 < c.heldout_fraction < 1:
    raise UserError(f'heldout_fraction must be in (0, 1), got {c.heldout_fraction}')
  if not c.learning_rate > 0:
    raise UserError(f'learning_rate must be > 0, got {c.learning_rate}')
  if not c.workdir:
    raise UserError('workdir must name a folder (checkpoints and logs go there)')
  if not c.data and not c.get('shards'):
    raise UserError('data must list at least one file glob (or set shards)')
  for key in ('feature_batch_size', 'eval_rows', 'log_every'):
    if c[key] < 1:
      raise UserError(f'{key} must be >= 1, got {c[key]}')
  if c.warmup_steps < 0 or c.stop_at_step < 0:
    raise UserError('warmup_steps and stop_at_step must be >= 0 '
                    f'(got {c.warmup_steps} and {c.stop_at_step})')
  if c.get('export', 'last') not in ('best', 'last'):
    raise UserError(f"export must be 'best' (the held-out evaluation with the most expected "
                    f"accepted drafts) or 'last', got {c.export!r}")
  if c.export_dtype not in ('float32', 'float16', 'bfloat16'):
    raise UserError(f'export_dtype must be float32, float16 or bfloat16, got {c.export_dtype!r}')
  if c.gguf and not os.path.isfile(c.gguf):
    raise UserError(f'GGUF file not found: {c.gguf}')
  from specdec_jax import outputs, runs
  context = runs.known_context(c.model, c.gguf)
  if context and c.seq_len > context:
    raise UserError(f'seq_len={c.seq_len} exceeds the model context {context}')
  # Both folders are written after minutes of work: prove they can be first.
  outputs.check_writable_dir(pathlib.Path(c.workdir), f'workdir {c.workdir}')
  if c.output:
    outputs.check_writable_dir(pathlib.Path(c.output).parent, f'output {c.output}')
  from specdec_jax import precision
  precision.resolve(c.param_dtype, c.dtype)


def _features_key(c, target, files, kv_layers) -> str:
  h = hashlib.sha256()
  cfg = dataclasses.asdict(target.config)
  from specdec_jax import target_training
  if target_training.is_target_dir(c.model):     # a retrained folder must not reuse old features
    h.update(json.loads((pathlib.Path(c.model) / 'target.json').read_text())['sha256'].encode())
  h.update(json.dumps([FEATURES_VERSION, c.model, c.gguf, c.target_seed if c.model == 'tiny' else 0, cfg,
                       c.seq_len, c.max_tokens, c.heldout_fraction, list(kv_layers), TOPK,
                       [(str(f), f.stat().st_size) for f in files]], sort_keys=True).encode())
  return h.hexdigest()[:20]


class Logger:
  """Prints progress lines to stderr and appends JSON records to log.jsonl."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / 'log.jsonl'

  def __call__(self, msg: str, **record):
    print(msg, file=sys.stderr, flush=True)
    if record:
      with self.path.open('a') as f:
        f.write(json.dumps(record) + '\n')


def _teacher_forced_features(c, target, files, kv_layers, log):
  """Stages 1-2: corpus windows and the target's features over them (cached)."""
  feat_root = default_cache_root() / 'features' / _features_key(c, target, files, kv_layers)
  log(f'data: {len(files)} files; target features in {feat_root}')
  if (feat_root / 'train' / 'done.json').is_file() and (feat_root / 'heldout' / 'done.json').is_file():
    windows = {s: None for s in ('train', 'heldout')}
  else:
    windows = build_windows(files, target.tokenizer, seq_len=c.seq_len, max_tokens=c.max_tokens,
                            heldout_fraction=c.heldout_fraction, bos_id=target.config.bos_id,
                            pad_id=target.config.pad_id)
  feats = {s: compute_features(target, windows[s], kv_layers, feat_root / s,
                               batch_size=c.feature_batch_size, log=log)
           for s in ('train', 'heldout')}
  return feats['train'], feats['heldout'], feat_root.name


def run(c) -> dict:
  """The drafter training job (config: configs/train_mtp.py)."""
  import orbax.checkpoint as ocp
  from specdec_jax import checkpoints
  from specdec_jax.targets import load_target

  validate(c)
  init = _init_from(c) if c.get('init_from') else None      # before minutes of features
  files = [] if c.get('shards') else expand_data(list(c.data))
  workdir = pathlib.Path(c.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = Logger(workdir)
  t_start = time.time()
  target = load_target(c.model, gguf=c.gguf, param_dtype=c.param_dtype, dtype=c.dtype,
                       seed=c.target_seed)
  # The drafter trains in float32 whatever the target's weights (optax state, export).
  dcfg = drafter_config_from(c, target.config.replace(param_dtype='float32'))
  kv_layers = feature_kv_layers(target.config)
  if c.get('shards'):             # self-distilled shards (distill_data.py) replace stages 1-2
    from specdec_jax import shard_features
    train_f, held_f, feat_name = shard_features.load(c, target, kv_layers, workdir, log)
  else:
    train_f, held_f, feat_name = _teacher_forced_features(c, target, files, kv_layers, log)
  if len(train_f) < c.batch_size:
    raise UserError(f'only {len(train_f)} training windows for batch_size={c.batch_size}; '
                    'add data or lower batch_size')
  V = target.config.vocab_size
  vocab = init['vocab'] if init else choose_vocab(train_f, dcfg.draft_vocab_size, V)
  inv_vocab = np.full((V,), -1, np.int32)
  inv_vocab[vocab] = np.arange(len(vocab))
  T = train_f.labels.shape[1]
  labels = np.asarray(train_f.labels)
  valid = (np.arange(T)[None] < train_f.lengths[:, None]) & (labels >= 0)
  coverage = float(np.isin(labels[valid], vocab).mean())
  log(f'{len(train_f)} train / {len(held_f)} held-out windows of {T} tokens; reduced vocabulary '
      f'{len(vocab)} covers {coverage:.3f} of the target\'s greedy tokens')

  meta = dict(drafter=dcfg.to_dict(), loss=c.loss, depth=c.depth, steps=c.steps,
              batch_size=c.batch_size, learning_rate=c.learning_rate, seed=c.seed,
              features=feat_name)
  if init:
    meta['init_from'] = init['sha256']
  meta = json.loads(json.dumps(meta))   # as read back: tuples (eos_ids) become lists
  meta_path = workdir / 'run.json'
  if meta_path.is_file():
    old = json.loads(meta_path.read_text())
    if old != meta:
      changed = sorted(k for k in meta if old.get(k) != meta[k])
      raise UserError(f'workdir {workdir} holds a run with other settings ({", ".join(changed)}); '
                      'use a new workdir or delete it')
  else:
    meta_path.write_text(json.dumps(meta, indent=1) + '\n')

  embedding = target.params['embedding']
  vocab_j, inv_j = jnp.asarray(vocab), jnp.asarray(inv_vocab)
  opt = make_optimizer(c)
  params = init['net'] if init else init_drafter_params(dcfg, jax.random.key(c.seed), vocab)['net']
  state = {'params': params, 'opt_state': opt.init(params)}
  n_params = sum(x.size for x in jax.tree.leaves(params))

  def loss_fn(p, batch):
    return loss_and_metrics(dcfg, p, embedding, vocab_j, inv_j, batch, c.depth, c.loss)

  @jax.jit
  def train_step(state, batch):
    (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(state['params'], batch)
    updates, opt_state = opt.update(g, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}, m

  eval_fn = jax.jit(lambda p, b: loss_fn(p, b)[1])
  mgr = ocp.CheckpointManager(
      (workdir / 'checkpoints').absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
  start = mgr.latest_step() or 0
  if start:
    state = mgr.restore(start, args=ocp.args.StandardRestore(state))
    log(f'resumed from the step-{start} checkpoint in {workdir / "checkpoints"}')
  log(f'training {dcfg.kind} drafter ({n_params / 1e6:.2f}M params, {c.loss} loss, depth {c.depth})'
      f' for {c.steps} steps of {c.batch_size} x {T} tokens'
      + (f', starting from {c.init_from}' if init else ''))

  best = BestParams(workdir)

  def log_heldout(step):
    held = evaluate(eval_fn, state['params'], held_f, c.batch_size, c.eval_rows)
    accs = ' '.join(f'{held[f"acc_{j + 1}"]:.3f}' for j in range(c.depth))
    chain = sum(held[f'chain_{j + 1}'] for j in range(c.depth))
    log(f'  held-out step {step}: loss {held["loss"]:.3f}, accuracy by position {accs}, '
        f'expected accepted drafts/round {chain:.2f}', kind='heldout', step=step, **held)
    if step and c.get('export', 'last') == 'best':
      best.offer(step, chain, held, state['params'])
    return held

  if start == 0:
    log_heldout(0)
  t_loop, t_first, held = time.time(), None, {}
  # The next batch is gathered (memory-mapped shard rows, a copy of ~1 MB per
  # row) on a thread while the device runs this step.
  fetch = lambda s: train_f.rows(batch_rows(s, len(train_f), c.batch_size, c.seed))
  pool = concurrent.futures.ThreadPoolExecutor(1)
  nxt = pool.submit(fetch, start) if start < c.steps else None
  for step in range(start, c.steps):
    batch = nxt.result()
    if step + 1 < c.steps:
      nxt = pool.submit(fetch, step + 1)
    state, m = train_step(state, batch)
    done = step + 1
    if t_first is None:                  # the first step includes compilation
      jax.block_until_ready(m)
      t_first = time.time()
    if done % c.log_every == 0 or done == c.steps:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      rate = (time.time() - t_first) / max(1, done - start - 1)
      log(f'step {done}/{c.steps} loss {m["loss"]:.3f} acc@1 {m["acc_1"]:.3f} | '
          f'{rate:.2f} s/step, ETA {(c.steps - done) * rate / 60:.1f} min',
          kind='train', step=done, seconds=round(time.time() - t_start, 1), **m)
    if done % c.eval_every == 0 or done == c.steps:
      held = log_heldout(done)
    if done % c.checkpoint_every == 0 or done == c.steps:
      mgr.save(done, args=ocp.args.StandardSave(state))
      mgr.wait_until_finished()
    if c.stop_at_step and done >= c.stop_at_step and done < c.steps:
      log(f'stopping at step {done} (stop_at_step); rerun the same command to resume')
      mgr.close()
      pool.shutdown(cancel_futures=True)
      return dict(stopped_at=done, workdir=str(workdir))
  mgr.close()
  pool.shutdown()
  if start >= c.steps:
    log(f'the run in {workdir} already finished ({start} steps); exporting it')
    held = log_heldout(start)

  train_seconds = time.time() - t_loop
  net, exported_step = state['params'], c.steps
  if c.get('export', 'last') == 'best' and best.step is not None:
    net, exported_step, held = best.load(state['params']), best.step, best.held
    log(f'exporting the step-{best.step} parameters (held-out expected accepted drafts '
        f'{best.score:.2f}: the best evaluation)')
  params = jax.device_get({'net': net, 'vocab': vocab})
  summary = dict(kind=dcfg.kind, steps=c.steps, exported_step=exported_step,
                 params_millions=round(n_params / 1e6, 3),
                 loss=c.loss, depth=c.depth, vocab_coverage=round(coverage, 4),
                 train_windows=len(train_f), heldout_windows=len(held_f), seq_len=T,
                 heldout={k: round(v, 4) for k, v in held.items()},
                 train_seconds_this_run=round(train_seconds, 1),
                 total_seconds_this_run=round(time.time() - t_start, 1),
                 data=f'shards:{c.shards}' if c.get('shards') else list(c.data),
                 init_from=dict(folder=str(c.init_from), sha256=init['sha256']) if init else None)
  out = ''
  if c.output:
    notice, extra = _notice(c.model)
    out = str(checkpoints.save_drafter(
        c.output, dcfg, params, target=dict(name=c.model, gguf=c.gguf),
        training=summary, dtype=c.export_dtype, notice=notice, extra_files=extra))
    log(f'drafter written to {out}')
  return dict(summary, output=out, workdir=str(workdir))


def _init_from(c) -> dict:
  """An exported drafter to continue training from (`init_from`): its
  network in float32 and its reduced vocabulary. Its architecture must be the
  one the config describes (kind, widths, layers, heads, vocabulary size) and
  its target the run's."""
  from specdec_jax import checkpoints
  try:
    old, params, manifest = checkpoints.load_drafter(c.init_from, 'float32')
  except checkpoints.CheckpointError as e:
    raise UserError(f'init_from: {e}') from None
  if manifest.get('target', {}).get('name') != c.model:
    raise UserError(f'init_from={c.init_from} was trained for target '
                    f'{manifest.get("target", {}).get("name")!r}, not {c.model!r}')
  theirs = old.to_dict()
  for key, name in (('kind', 'drafter'), ('draft_vocab_size', 'draft_vocab_size'),
                    ('width', 'width'), ('hidden_dim', 'hidden_dim'),
                    ('num_layers', 'num_layers'), ('num_heads', 'num_heads'),
                    ('num_draft_heads', 'depth')):
    if key == 'num_draft_heads' and c.drafter != 'heads':
      continue                    # mtp's depth is the loss's, not the network's
    if theirs.get(key) != c[name]:
      raise UserError(f'init_from={c.init_from} has {key}={theirs.get(key)!r}, the config '
                      f'{name}={c[name]!r}; set the config to the checkpoint\'s shape')
  net = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params['net'])
  return dict(net=net, vocab=np.asarray(params['vocab']), sha256=manifest['sha256'])


class BestParams:
  """The drafter parameters of the best held-out evaluation so far (most
  expected accepted drafts per round), kept in the workdir (best.npz +
  best.json) so a resumed run still knows them: a drafter trained past its
  best epoch exports the best one (`export = 'best'`)."""

  def __init__(self, workdir: pathlib.Path):
    self.npz, self.meta = workdir / 'best.npz', workdir / 'best.json'
    self.step = self.score = self.held = None
    if self.meta.is_file() and self.npz.is_file():
      m = json.loads(self.meta.read_text())
      self.step, self.score, self.held = m['step'], m['score'], m['heldout']

  def offer(self, step: int, score: float, held: dict, params) -> None:
    if self.score is not None and score <= self.score:
      return
    from specdec_jax.checkpoints import flatten
    from specdec_jax.outputs import write_atomic
    buf = io.BytesIO()
    np.savez(buf, **flatten(jax.device_get(params)))
    write_atomic(self.npz, buf.getvalue())
    write_atomic(self.meta, json.dumps(dict(step=step, score=score, heldout=held)).encode())
    self.step, self.score, self.held = step, score, held

  def load(self, like):
    from specdec_jax.checkpoints import unflatten
    with np.load(self.npz) as z:
      tree = unflatten({k: z[k] for k in z.files})
    return jax.tree.map(lambda ref, x: jnp.asarray(x, ref.dtype), like, tree)


def _notice(model: str):
  """NOTICE text (+ the Gemma terms file) for a drafter trained on `model`."""
  if model != 'gemma3_270m':
    return ('A drafter trained by specdec_jax on a randomly initialised target.\n', {})
  from specdec_jax.gemma_gguf import terms_dir
  text = ('This drafter was trained by distillation from Gemma 3 270M (its hidden states,\n'
          'tokens and embedding table). It is a Model Derivative of Gemma and is\n'
          'distributed under, and its use is subject to, the Gemma Terms of Use\n'
          '(GEMMA_TERMS.html here; https://ai.google.dev/gemma/terms) and the Gemma\n'
          'Prohibited Use Policy (https://ai.google.dev/gemma/prohibited_use_policy).\n'
          'Gemma is provided under and subject to the Gemma Terms of Use found at\n'
          'ai.google.dev/gemma/terms.\n')
  extra = {}
  d = terms_dir()
  if d and (d / 'GEMMA_TERMS.html').is_file():
    extra['GEMMA_TERMS.html'] = (d / 'GEMMA_TERMS.html').read_bytes()
  return text, extra
