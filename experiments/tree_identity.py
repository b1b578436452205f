"""Where greedy tree decoding first differs from greedy AR, and how close a
call it was there (the full forward's top logits at that token).

    python -m experiments.tree_identity --tree=dyn4-d3-k2 --param_dtype=bfloat16
    python -m experiments.tree_identity --tree=dyn4-d3-k2 --param_dtype=float32

Chains are bitwise AR's with bf16 weights (README, "bf16 and greedy
identity"); a tree's nodes sit in cache slots their chain would not use
(siblings share a position), and XLA:CPU's sums pair terms by slot, so a
node's logits can differ from the AR step's in the last bits and flip a
near-tie (docs/TREE.md). Prints one line per prompt.
"""
from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import api, generate, sweep
from specdec_jax import tree as tree_lib
from specdec_jax.model import Transformer
from specdec_jax.targets import load_target

_TREE = flags.DEFINE_string('tree', 'dyn4-d3-k2', 'Tree spec (tree.parse).')
_DRAFTER = flags.DEFINE_enum('drafter', 'mtp', ['mtp', 'heads', 'ngram'], 'Drafter kind.')
_DTYPE = flags.DEFINE_enum('param_dtype', 'bfloat16', ['auto', 'bfloat16', 'float32'], 'Weights.')
_SET = flags.DEFINE_string('prompt_set', 'repetitive', 'Prompt set (experiments/prompts).')
_N = flags.DEFINE_integer('prompts', 3, 'Prompts.')
_NEW = flags.DEFINE_integer('new_tokens', 128, 'New tokens per prompt.')


def main(_):
  target = load_target('gemma3_270m', param_dtype=_DTYPE.value)
  cfg, params = target.config, target.params
  shape = tree_lib.resolve(_TREE.value, _DRAFTER.value)
  d = api.load_drafter(target, _DRAFTER.value, draft_len=shape.depth)
  prompts = sweep.load_prompts(sweep.PROMPT_DIR, _SET.value, target.tokenizer, _N.value, 0)
  bucket = generate.bucket(max(map(len, prompts)))
  cache = -(-(bucket + _NEW.value + shape.num_nodes) // 128) * 128

  def run(gen, dp):
    out = []
    for p in prompts:
      b = generate.make_batch([p], batch_size=1, bucket_len=bucket, max_new_tokens=_NEW.value,
                              keys=jax.random.split(jax.random.key(0), 1))
      out.append(generate.completions(gen.generate(params, b, dp), cfg.eos_id)[0]['completion_ids'])
    return out
  ar = run(generate.Generator(cfg, cache_size=cache, greedy=True), None)
  tr = run(generate.Generator(cfg, cache_size=cache, greedy=True, drafter=d.drafter, tree=shape),
           d.params)
  print(f'{target.precision}; tree {tree_lib.label(shape)} ({_DRAFTER.value}), '
        f'{_SET.value} x {len(prompts)}, {_NEW.value} new tokens')
  for i, (a, t) in enumerate(zip(ar, tr)):
    if a == t:
      print(f'prompt {i}: identical ({len(a)} tokens)')
      continue
    j = next(k for k in range(min(len(a), len(t))) if a[k] != t[k])
    logits = Transformer(cfg).apply({'params': params}, jnp.asarray([prompts[i] + a[:j]]))[0]
    last = np.asarray(logits[0, -1], np.float32)
    top = np.argsort(-last)[:2]
    print(f'prompt {i}: first differs at token {j} of {len(a)}: AR {a[j]}, tree {t[j]}; the '
          f'full forward\'s top two there {top.tolist()} at '
          f'{", ".join(f"{x:.3f}" for x in last[top])} '
          f'(gap {last[top[0]] - last[top[1]]:.3f})')


if __name__ == '__main__':
  app.run(main)
