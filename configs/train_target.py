"""Train a tokenizer and a small Gemma-architecture target from scratch.

    python -m experiments.run --config=configs/train_target.py          # ~3 min here
    python -m experiments.run --config=configs/train_mtp.py:tiny \
        --config.model=outputs/train_target/target                       # then its drafter
    python -m experiments.run --config=configs/generate.py --config.model=outputs/train_target/target \
        --config.drafter=mtp --config.drafter_checkpoint=outputs/train_mtp_tiny/drafter

A SentencePiece tokenizer (unigram, byte fallback, Gemma's special ids) and a
4-layer, 128-wide Gemma 3 architecture LM (local + global attention) trained
on the Python standard library's sources; the exported folder works as
`model=` everywhere. Progress, held-out loss and ETA on stderr and in
`workdir/log.jsonl`; a rerun with the same workdir resumes from the newest
checkpoint.
"""
import ml_collections


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = 'train_target'
  c.data = ('{stdlib}/**/*.py',)
  c.vocab_size = 1024
  c.tokenizer_chars = 3_000_000      # characters of text the tokenizer trains on
  c.num_layers = 4
  c.embed_dim = 128
  c.hidden_dim = 512
  c.num_heads = 4
  c.num_kv_heads = 1
  c.head_dim = 32
  c.sliding_window = 64
  c.sliding_window_pattern = 2       # local, global, local, global
  c.max_context = 2048
  c.seq_len = 128
  c.max_tokens = 400_000
  c.max_windows_per_file = 8
  c.heldout_fraction = 0.05
  c.batch_size = 16
  c.steps = 600
  c.learning_rate = 3e-3
  c.warmup_steps = 50
  c.weight_decay = 0.01
  c.seed = 0
  c.checkpoint_every = 200
  c.eval_every = 200
  c.eval_rows = 64
  c.log_every = 50
  c.workdir = 'outputs/train_target'
  c.output = 'outputs/train_target/target'
  if arg == 'test':                    # seconds: the CI pipeline test
    c.data = ('{stdlib}/json/*.py', '{stdlib}/email/*.py', '{stdlib}/logging/*.py')
    c.vocab_size, c.tokenizer_chars, c.max_tokens = 512, 300_000, 60_000
    c.num_layers, c.embed_dim, c.hidden_dim, c.head_dim = 2, 64, 128, 16
    c.steps, c.checkpoint_every, c.eval_every, c.log_every, c.batch_size = 150, 50, 50, 25, 16
    c.warmup_steps = 20
  elif arg:
    raise ValueError(f'unknown variant {arg!r} (use :test or nothing)')
  return c
