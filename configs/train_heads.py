"""Train the parallel-heads drafter (Medusa-style) for Gemma 3 270M.

    python -m experiments.run --config=configs/train_heads.py
    python -m experiments.run --config=configs/train_heads.py:tiny   # tiny random target

The same data and cached target features as configs/train_mtp.py (computed
once, shared); `depth` heads, head i predicting the token i+1 after the
pending one from concat[embed(pending), h]. Writes outputs/train_heads/drafter,
which `python -m experiments.bench_drafters` picks up.
"""
from configs import train_mtp


def get_config(arg: str = ''):
  c = train_mtp.get_config(arg)
  c.drafter = 'heads'
  if arg != 'tiny':
    c.hidden_dim = 512
    c.steps = 300
    c.workdir = 'outputs/train_heads'
    c.output = 'outputs/train_heads/drafter'
  else:
    c.workdir = 'outputs/train_heads_tiny'
    c.output = 'outputs/train_heads_tiny/drafter'
  return c
