"""From scratch: a SentencePiece tokenizer and a small Gemma-architecture target.

    python -m experiments.run --config=configs/train_target.py        # ~3 min here

Trains a SentencePiece model on the configured text, then a small Gemma 3
architecture LM (next-token cross-entropy, AdamW + warm-up/cosine, orbax
checkpoints with resume, held-out loss logged with an ETA) with the same
data code as the drafter training, and exports a target folder:

    <output>/target.json     {"format", "config", "sha256", "training"}
    <output>/params.npz      float32 weights, '/'-joined names
    <output>/tokenizer.model SentencePiece

`model=<that folder>` then works wherever `model=gemma3_270m` does (the
generation job, drafter training, the benchmarks), so the whole pipeline —
tokenizer, target, drafter, speculative decoding — runs in minutes, for
notebooks, tests and ablations.
"""
import dataclasses
import io
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specdec_jax import config as config_lib
from specdec_jax.checkpoints import CheckpointError, flatten, sha256_file, unflatten
from specdec_jax.errors import UserError
from specdec_jax.model import Transformer, cast_params, init_params
from specdec_jax.tokenizer import Tokenizer

FORMAT = 1


def train_tokenizer(files, vocab_size: int, max_chars: int) -> Tokenizer:
  """A SentencePiece unigram model with Gemma's special ids (pad 0, eos 1,
  bos 2, unk 3) and byte fallback, so any text encodes."""
  import sentencepiece as spm

  def lines():
    left = max_chars
    for f in files:
      try:
        text = f.read_text(encoding='utf-8')
      except (UnicodeDecodeError, OSError):
        continue
      for line in text.splitlines():
        if line.strip() and left > 0:
          left -= len(line)
          yield line
      if left <= 0:
        return

  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size,
        model_type='unigram', byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        character_coverage=0.9995, remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=['\n', '\t', '    '],
        minloglevel=2)
  except RuntimeError as e:
    raise UserError(f'SentencePiece training failed: {str(e).splitlines()[-1]}') from None
  return Tokenizer(model.getvalue())


def save_target(directory, cfg, params, tokenizer_proto: bytes, training: dict):
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  np.savez(d / 'params.npz', **flatten(jax.device_get(params)))
  (d / 'tokenizer.model').write_bytes(tokenizer_proto)
  manifest = dict(format=FORMAT, config=dataclasses.asdict(cfg),
                  sha256=sha256_file(d / 'params.npz'), training=training)
  (d / 'target.json').write_text(json.dumps(manifest, indent=1) + '\n')
  return d


def is_target_dir(path: str) -> bool:
  return bool(path) and (pathlib.Path(path) / 'target.json').is_file()


def load_target_dir(directory, param_dtype: str = 'float32', dtype: str = 'float32'):
  """-> (ModelConfig, params, Tokenizer); CheckpointError on any damage."""
  d = pathlib.Path(directory)
  for name in ('target.json', 'params.npz', 'tokenizer.model'):
    if not (d / name).is_file():
      raise CheckpointError(f'target folder {d}: missing {name}')
  try:
    manifest = json.loads((d / 'target.json').read_text())
    cfg = config_lib.ModelConfig(**manifest['config']).replace(dtype=dtype,
                                                                   param_dtype=param_dtype)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'target folder {d}: unreadable target.json ({e})') from None
  if sha256_file(d / 'params.npz') != manifest.get('sha256'):
    raise CheckpointError(f'target folder {d}: params.npz is corrupt or truncated')
  with np.load(d / 'params.npz') as z:
    params = cast_params(unflatten({k: z[k] for k in z.files}), param_dtype)
  return cfg, params, Tokenizer((d / 'tokenizer.model').read_bytes())


def validate(c):
  for key in ('vocab_size', 'num_layers', 'embed_dim', 'hidden_dim', 'num_heads', 'head_dim',
              'steps', 'batch_size', 'seq_len', 'max_tokens', 'checkpoint_every', 'eval_every'):
    if c[key] < 1:
      raise UserError(f'{key} must be >= 1, got {c[key]}')
  if c.vocab_size < 384:
    raise UserError(f'vocab_size must be >= 384 (256 byte pieces, specials, and some words), '
                    f'got {c.vocab_size}')
  if not 0 < c.heldout_fraction < 1:
    raise UserError(f'heldout_fraction must be in (0, 1), got {c.heldout_fraction}')
  if not c.workdir or not c.output:
    raise UserError('workdir and output must both name folders')


def run(c) -> dict:
  import orbax.checkpoint as ocp
  from specdec_jax import train

  validate(c)
  files = train.expand_data(list(c.data))
  workdir = pathlib.Path(c.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = train.Logger(workdir)
  t0 = time.time()
  tok_path = workdir / 'tokenizer.model'
  if tok_path.is_file():
    tok = Tokenizer(tok_path.read_bytes())
  else:
    tok = train_tokenizer(files, c.vocab_size, c.tokenizer_chars)
    tok_path.write_bytes(tok.model_proto)
  log(f'tokenizer: {tok.vocab_size} pieces ({time.time() - t0:.1f} s)')
  windows = train.build_windows(files, tok, seq_len=c.seq_len, max_tokens=c.max_tokens,
                                heldout_fraction=c.heldout_fraction, bos_id=2, pad_id=0,
                                max_windows_per_file=c.max_windows_per_file)
  (tr, tr_len), (ho, ho_len) = windows['train'], windows['heldout']
  if len(tr) < c.batch_size:
    raise UserError(f'only {len(tr)} training windows for batch_size={c.batch_size}')
  cfg = config_lib.ModelConfig(
      vocab_size=tok.vocab_size, num_layers=c.num_layers, embed_dim=c.embed_dim,
      hidden_dim=c.hidden_dim, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
      head_dim=c.head_dim, query_pre_attn_scalar=float(c.head_dim),
      sliding_window=c.sliding_window, sliding_window_pattern=c.sliding_window_pattern,
      max_context=c.max_context)
  model = Transformer(cfg)

  def loss_fn(params, tokens, lengths):
    logits, _, _ = model.apply({'params': params}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    w = (jnp.arange(1, tokens.shape[1])[None] < lengths[:, None]).astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

  opt = train.make_optimizer(c)

  @jax.jit
  def step_fn(state, tokens, lengths):
    loss, g = jax.value_and_grad(loss_fn)(state['params'], tokens, lengths)
    updates, opt_state = opt.update(g, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}, loss

  eval_fn = jax.jit(loss_fn)

  def heldout_loss(params):
    n = max(1, min(len(ho), c.eval_rows) // c.batch_size)
    rows = np.arange(n * c.batch_size) % len(ho)
    return float(np.mean([eval_fn(params, ho[rows[i:i + c.batch_size]], ho_len[rows[i:i + c.batch_size]])
                          for i in range(0, len(rows), c.batch_size)]))

  params = init_params(cfg, jax.random.key(c.seed))
  state = {'params': params, 'opt_state': opt.init(params)}
  mgr = ocp.CheckpointManager((workdir / 'checkpoints').absolute(), options=ocp.CheckpointManagerOptions(
      max_to_keep=2, enable_async_checkpointing=False))
  start = mgr.latest_step() or 0
  if start:
    state = mgr.restore(start, args=ocp.args.StandardRestore(state))
    log(f'resumed from the step-{start} checkpoint')
  n_params = sum(x.size for x in jax.tree.leaves(params))
  log(f'training a {n_params / 1e6:.2f}M-parameter target on {len(tr)} windows of {c.seq_len} '
      f'tokens for {c.steps} steps')
  if start == 0:
    log(f'  held-out loss at step 0: {heldout_loss(state["params"]):.3f}', kind='heldout', step=0,
        loss=heldout_loss(state['params']))
  t_first = None
  for step in range(start, c.steps):
    rows = train.batch_rows(step, len(tr), c.batch_size, c.seed)
    state, loss = step_fn(state, tr[rows], tr_len[rows])
    done = step + 1
    if t_first is None:
      jax.block_until_ready(loss)
      t_first = time.time()
    if done % c.log_every == 0 or done == c.steps:
      loss = float(loss)                 # waits for the step: the rate below is real
      rate = (time.time() - t_first) / max(1, done - start - 1)
      log(f'step {done}/{c.steps} loss {loss:.3f} | {rate:.2f} s/step, '
          f'ETA {(c.steps - done) * rate / 60:.1f} min', kind='train', step=done, loss=loss)
    if done % c.eval_every == 0 or done == c.steps:
      h = heldout_loss(state['params'])
      log(f'  held-out loss at step {done}: {h:.3f}', kind='heldout', step=done, loss=h)
    if done % c.checkpoint_every == 0 or done == c.steps:
      mgr.save(done, args=ocp.args.StandardSave(state))
      mgr.wait_until_finished()
  mgr.close()
  final = heldout_loss(state['params'])
  summary = dict(params_millions=round(n_params / 1e6, 3), vocab_size=tok.vocab_size,
                 steps=c.steps, heldout_loss=round(final, 4), train_windows=len(tr),
                 seconds_this_run=round(time.time() - t0, 1), data=list(c.data))
  out = save_target(c.output, cfg, state['params'], tok.model_proto, summary)
  log(f'target written to {out}')
  return dict(summary, output=str(out))
