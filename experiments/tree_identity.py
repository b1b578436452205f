"""Where greedy speculative decoding (a tree, or a chain with --tree=) first
differs from greedy AR, and how close a call it was there (the full
forward's top logits at that token). Prints one line per prompt.

    python -m experiments.tree_identity --tree=dyn4-d3-k2 --param_dtype=bfloat16
    python -m experiments.tree_identity --tree= --drafter=ngram --draft_len=3 --cache_size=384

With bf16 weights a verify row must be bitwise the AR step's, or a near-tie
turns into another token (README, "bf16 and greedy identity"; docs/TREE.md,
"Greedy identity with bf16 weights", for what this found).
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
_K = flags.DEFINE_integer('draft_len', 3, 'Draft length of a chain (--tree=).')
_CACHE = flags.DEFINE_integer('cache_size', 0, 'Cache slots (0: the tokens needed, rounded '
                              'up to 128, as the job does).')


def check_paths(cfg, params, shape, prompt, cache_size):
  """One tree verify pass over random nodes after `prompt`, each root-to-leaf
  path against a chain verify pass over it (both compiled): the largest
  logit difference (0: bitwise)."""
  from specdec_jax.model import KVCache
  fwd = jax.jit(lambda p, x, c: Transformer(cfg).apply({'params': p}, x, c))
  fwd_tree = jax.jit(lambda p, x, c, d, a: Transformer(cfg).apply({'params': p}, x, c, tree=(d, a)))
  _, _, cache = fwd(params, jnp.asarray([prompt]), KVCache.init(cfg, 1, cache_size))
  nodes = jnp.asarray(np.random.default_rng(0).integers(3, 5000, (1, shape.num_nodes)))
  logits = np.asarray(fwd_tree(params, nodes, cache, *map(jnp.asarray, shape.mask))[0])
  diffs = [float(np.abs(logits[:, path] - np.asarray(fwd(params, nodes[:, path], cache)[0])).max())
           for path in shape.leaves()]
  print(f'tree verify vs chain verify per path (random nodes after prompt 0): largest logit '
        f'difference {max(diffs):.4g} over {len(diffs)} paths')


def main(_):
  target = load_target('gemma3_270m', param_dtype=_DTYPE.value)
  cfg, params = target.config, target.params
  shape = tree_lib.resolve(_TREE.value, _DRAFTER.value)
  k = _K.value if shape is None else shape.depth
  d = api.load_drafter(target, _DRAFTER.value, draft_len=k)
  prompts = sweep.load_prompts(sweep.PROMPT_DIR, _SET.value, target.tokenizer, _N.value, 0)
  bucket = generate.bucket(max(map(len, prompts)))
  cache = _CACHE.value or -(-(bucket + _NEW.value + (k + 1 if shape is None else shape.num_nodes))
                          // 128) * 128

  if isinstance(shape, tree_lib.TreeShape):
    check_paths(cfg, params, shape, prompts[0], cache)

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
  what = f'chain k = {k}' if shape is None else f'tree {tree_lib.label(shape)}'
  print(f'{target.precision}; {what} ({_DRAFTER.value}), {_SET.value} x {len(prompts)}, '
        f'{_NEW.value} new tokens, cache {cache}')
  for i, (a, t) in enumerate(zip(ar, tr)):
    if a == t:
      print(f'prompt {i}: identical ({len(a)} tokens)')
      continue
    j = next(m for m in range(min(len(a), len(t))) if a[m] != t[m])
    logits = Transformer(cfg).apply({'params': params}, jnp.asarray([prompts[i] + a[:j]]))[0]
    last = np.asarray(logits[0, -1], np.float32)
    top = np.argsort(-last)[:2]
    print(f'prompt {i}: first differs at token {j} of {len(a)}: AR {a[j]}, speculative {t[j]}; the '
          f'full forward\'s top two there {top.tolist()} at '
          f'{", ".join(f"{x:.3f}" for x in last[top])} '
          f'(gap {last[top[0]] - last[top[1]]:.3f})')


if __name__ == '__main__':
  app.run(main)
