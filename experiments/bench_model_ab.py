"""The target's forward pass as written at another git revision against the
working tree's, timed in turn in one process (so drift hits both alike).

    python -m experiments.bench_model_ab --ref=HEAD~1
    python -m experiments.bench_model_ab --ref=8fe968a --batch_sizes=1,8 \
        --cache_sizes=512,2048 --tokens=1,5 --repeats=7
    python -m experiments.bench_model_ab --ref=2a82472 --tokens= --trees=4x2x1x1

`specdec_jax/model.py` is read from `ref` (`git show`) and imported beside
the current one; both run Gemma 3 270M with the same weights (`param_dtype`)
as one cached forward pass: `tokens` new tokens per row (1 = a plain decode
step, k + 1 = a verify pass) on a cache `cache` slots long, 40 slots short of
full; with `trees`, also a tree verify pass of each shape (its nodes as the
new tokens). Prints per setting the median of each and the ratio new / old, and
whether the logits are bitwise equal. Say which CPU (printed) with a figure.
"""
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import model as model_new
from specdec_jax import tree as tree_lib
from specdec_jax.errors import UserError
from specdec_jax.precision import cpu_info
from specdec_jax.targets import load_target

_REF = flags.DEFINE_string('ref', 'HEAD', 'Git revision whose model.py is "old".')
_DTYPE = flags.DEFINE_string('param_dtype', 'auto', 'Weight dtype.')
_BATCH = flags.DEFINE_list('batch_sizes', ['1', '8'], 'Batch sizes.')
_CACHE = flags.DEFINE_list('cache_sizes', ['512', '2048'], 'Cache slots per row.')
_TOKENS = flags.DEFINE_list('tokens', ['1', '5'], 'New tokens per row per pass.')
_TREES = flags.DEFINE_list('trees', [], 'Tree shapes (4x2x1x1) whose tree verify pass is timed '
                           'too, beside the chains of --tokens.')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Timed runs per variant (median).')


def old_model(ref: str):
  try:
    text = subprocess.run(['git', 'show', f'{ref}:specdec_jax/model.py'], check=True,
                          capture_output=True, text=True).stdout
  except subprocess.CalledProcessError as e:
    sys.exit(f'error: git show {ref}:specdec_jax/model.py failed: {e.stderr.strip()}')
  f = tempfile.NamedTemporaryFile('w', suffix='_model_old.py', delete=False)
  f.write(text)
  f.close()
  spec = importlib.util.spec_from_file_location('model_old', f.name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def interleaved(fns, repeats):
  """{name: median seconds}, the variants run in turn within each repeat."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def main(_):
  try:
    trees = [tree_lib.parse(t) for t in _TREES.value]
  except UserError as e:
    sys.exit(f'error: {e}')
  if any(not isinstance(t, tree_lib.TreeShape) for t in trees):
    sys.exit('error: --trees takes static tree shapes such as 4x2x1x1')
  old = old_model(_REF.value)
  target = load_target('gemma3_270m', param_dtype=_DTYPE.value)
  cfg, params = target.config, target.params
  name, cpu_flags = cpu_info()
  print(json.dumps({'cpu': name, 'bf16_flags': sorted(cpu_flags & {'avx512_bf16', 'amx_bf16'}),
                    'ref': _REF.value,
                    'param_dtype': str(params['embedding'].dtype)}))
  rows = []
  for b in map(int, _BATCH.value):
    for s in map(int, _CACHE.value):
      for t in list(map(int, _TOKENS.value)) + trees:
        tree = t.mask if isinstance(t, tree_lib.TreeShape) else None
        n = t.num_nodes if tree is not None else t
        cache = model_new.KVCache.init(cfg, b, s)
        cache = cache.replace(lengths=jnp.full((b,), s - 40, jnp.int32))
        toks = jnp.asarray(np.random.default_rng(0).integers(2, 1000, (b, n)), jnp.int32)
        fns = {name: jax.jit(lambda p, x, c, M=M: M.Transformer(cfg).apply({'params': p}, x, c,
                                                                          tree=tree)[0])
               for name, M in (('old', old), ('new', model_new))}
        outs = {name: np.asarray(f(params, toks, cache)) for name, f in fns.items()}
        times = interleaved({name: (lambda f=f: f(params, toks, cache))
                             for name, f in fns.items()}, _REPEATS.value)
        row = {'batch': b, 'cache': s,
               'tokens': n if tree is None else f"tree {'x'.join(map(str, t.branching))}",
               'old_ms': round(times['old'] * 1e3, 2), 'new_ms': round(times['new'] * 1e3, 2),
               'new/old': round(times['new'] / times['old'], 3),
               'logits_equal': bool((outs['old'] == outs['new']).all())}
        rows.append(row)
        print(json.dumps(row), flush=True)
  ratios = [r['new/old'] for r in rows]
  print(json.dumps({'median new/old': round(float(np.median(ratios)), 3)}))


if __name__ == '__main__':
  app.run(main)
