"""Tree drafting: several candidates per position, verified in one target pass.

A chain of k drafts loses everything after its first wrong guess; a tree
offers siblings at each depth (SpecInfer, Medusa, Sequoia). The tree here has
a static shape, `TreeShape(branching=(b_1, .., b_D))`: the root is the
pending token (depth 0) and every node at depth d - 1 has b_d children, so
(2, 2, 1) has 1 + 2 + 4 + 4 = 11 nodes. Nodes are numbered breadth first,
siblings in proposal order (worked example for (2, 1)):

    node     0   1   2   3   4        parents  [-1, 0, 0, 1, 2]
    depth    0   1   1   2   2        children [[1, 2], [3, -1], [4, -1], ..]
    path     ()  (0) (1) (0,0) (1,0)  ancestors[3] = nodes {0, 1, 3}

The verify pass (`Transformer(..., tree=(depths, ancestors))`) writes node i
at cache slot L + i with position L + depth_i, each node attending to the
cache and its ancestors: its logits are those of the chain of its
root-to-node path. After acceptance `commit_path` gathers the accepted path's
keys/values into slots L + depth (slot == position again); the rest of the
tree lies beyond the cut `lengths` and is overwritten before anything reads it.

Acceptance, per row:
  greedy  - the deepest node whose every ancestor's token (and its own) is
            the target's argmax at its parent; then the argmax at that node.
  sampled - recursive rejection sampling over siblings (SpecInfer's
            multi-step speculative sampling, SpecTr with k = 1 per step): at
            node c with target distribution p, try its children x_1, x_2, ..
            in order: accept x_j with probability min(1, p(x_j) / q_j(x_j));
            on rejection p <- norm(max(p - q_j, 0)) and try the next sibling;
            when every child is rejected (or c is a leaf) draw the token from
            the current p. Each step is the chain's exact rule applied to the
            residual target left by the earlier siblings, so it is exact when
            sibling j was drawn from q_j independently of the earlier
            siblings given the prefix: i.i.d. samples from one q (with
            replacement), or deterministic proposals (top-b, n-gram matches),
            whose q_j is one-hot(x_j) (`draft_probs=None`): then x_j is
            accepted with probability p(x_j) and p loses x_j on rejection.
            The proposals (tree_proposals.py: heads, mtp: top-b; ngram:
            matches; the dynamic trees: top-scoring nodes) are
            deterministic, except a sampled shape's (`2x1-s`): its
            siblings are drawn from q without replacement, sibling j from
            q with siblings 1..j-1 removed and renormalised, and that is
            its q_j (drawn given the earlier siblings, which is all the
            rule needs: the rest of the walk draws from the residual
            whatever x_j was).

Dynamic trees (`DynamicTree(nodes, depth, topk)`, EAGLE-2's expansion): the
shape differs per row and per round, within a static budget of `nodes`
drafted nodes, so every array keeps its size. The drafter expands the
`topk` best-scoring nodes of each depth by their `topk` best children (score
= the path's summed drafter log-probabilities), and the `nodes` best-scoring
nodes of everything expanded form the tree. Acceptance, the mask and the
cache commit read a per-row `Tables` (parents, depths, ancestors, children,
paths); a static `TreeShape` is the same tables broadcast over the batch.
"""
import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from flax import struct

from specdec_jax.errors import UserError
from specdec_jax import sampling
from specdec_jax.model import KVCache


@functools.lru_cache(maxsize=None)
def _layout(branching: Tuple[int, ...]):
  """numpy tables of a tree shape (built once, at trace time)."""
  parents, depths, ranks = [-1], [0], [0]
  level = [0]
  for d, b in enumerate(branching, start=1):
    nxt = []
    for parent in level:
      for j in range(b):
        nxt.append(len(parents))
        parents.append(parent)
        depths.append(d)
        ranks.append(j)
    level = nxt
  T, D = len(parents), len(branching)
  parents, depths = np.array(parents, np.int32), np.array(depths, np.int32)
  ancestors = np.eye(T, dtype=bool)                                      # [T, T] self included
  for i in range(1, T):
    ancestors[i] |= ancestors[parents[i]]
  children = np.full((T, max(branching)), -1, np.int32)                 # [T, b_max]
  for i in range(1, T):
    children[parents[i], ranks[i]] = i
  # path_nodes[i, d]: node i's ancestor at depth d (node i itself past its depth).
  path_nodes = np.zeros((T, D + 1), np.int32)                            # [T, D+1]
  for i in range(T):
    node = i
    for d in range(depths[i], -1, -1):
      path_nodes[i, d] = node
      node = parents[node]
    path_nodes[i, depths[i] + 1:] = i
  return dict(parents=parents, depths=depths, ranks=np.array(ranks, np.int32),
              ancestors=ancestors, children=children, path_nodes=path_nodes)


@dataclasses.dataclass(frozen=True)
class TreeShape:
  """A static draft tree: `branching[d]` children per node at depth d.
  sampled: when the loop samples (T > 0), each node's children are drawn
  from the drafter's q without replacement instead of being its top-b
  tokens (spec suffix `-s`; tree_proposals.propose_sampled)."""
  branching: Tuple[int, ...]
  sampled: bool = False

  def __post_init__(self):
    b = tuple(self.branching)
    if not b or not all(isinstance(x, (int, np.integer)) and x >= 1 for x in b):
      raise UserError(f'tree branching {b!r}: every depth needs a branching factor >= 1')
    object.__setattr__(self, 'branching', tuple(int(x) for x in b))

  @property
  def depth(self) -> int:
    return len(self.branching)

  @property
  def num_nodes(self) -> int:
    """Verify rows: the root (the pending token) and the drafted nodes
    (counted without building the layout, so a huge shape fails its size
    checks instead of filling memory)."""
    total = level = 1
    for b in self.branching:
      level *= b
      total += level
    return total

  @property
  def layout(self):
    return _layout(self.branching)

  @property
  def mask(self):
    """(depths [T] int32, ancestors [T, T] bool): the model's `tree` argument."""
    return self.layout['depths'], self.layout['ancestors']

  def leaves(self):
    """The root-to-leaf node lists (for tests)."""
    lay = self.layout
    return [lay['path_nodes'][i].tolist() for i in range(self.num_nodes)
            if lay['depths'][i] == self.depth]


@dataclasses.dataclass(frozen=True)
class DynamicTree:
  """EAGLE-2's dynamic tree within a static budget: `nodes` drafted nodes
  (verify rows: nodes + 1), at most `depth` deep, each expansion the `topk`
  best children of the `topk` best-scoring nodes of a depth."""
  nodes: int
  depth: int = 4
  topk: int = 4

  def __post_init__(self):
    for name in ('nodes', 'depth', 'topk'):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise UserError(f'dynamic tree {name}={v!r}: it must be an integer >= 1')
    if self.nodes > self.pool_size:
      raise UserError(f'dynamic tree of {self.nodes} nodes: depth {self.depth} x topk '
                      f'{self.topk} expands only {self.pool_size} candidates; raise depth or '
                      'topk, or lower nodes')

  @property
  def pool_size(self) -> int:
    """Candidates expanded: topk at depth 1, topk^2 at each depth below."""
    return self.topk + (self.depth - 1) * self.topk ** 2

  @property
  def num_nodes(self) -> int:
    return self.nodes + 1


@struct.dataclass
class Tables:
  """A batch of trees, row by row (T nodes, node 0 the root, parents
  before children): what the verify mask, acceptance and the commit read."""
  parents: jax.Array      # [B, T] int32 (the root: 0)
  depths: jax.Array       # [B, T] int32
  ancestors: jax.Array    # [B, T, T] bool, self included
  children: jax.Array     # [B, T, C] int32 in sibling order, -1 past the last
  path_nodes: jax.Array   # [B, T, D+1] int32: the ancestor at each depth (itself past its own)

  @property
  def depth(self) -> int:
    return self.path_nodes.shape[-1] - 1

  @property
  def mask(self):
    """(depths [B, T], ancestors [B, T, T]): the model's `tree` argument."""
    return self.depths, self.ancestors


def tables_of(tree, batch: int) -> Tables:
  """`Tables` as they are, or a TreeShape's layout broadcast over `batch` rows."""
  if isinstance(tree, Tables):
    return tree
  lay = tree.layout
  b = lambda x: jnp.broadcast_to(jnp.asarray(x), (batch,) + x.shape)
  return Tables(parents=b(np.maximum(lay['parents'], 0)), depths=b(lay['depths']),
                ancestors=b(lay['ancestors']), children=b(lay['children']),
                path_nodes=b(lay['path_nodes']))


def build_tables(parents, depths, depth: int, max_children: int) -> Tables:
  """Tables of per-row trees given each node's parent and depth ([B, T];
  node 0 the root, parents numbered before their children, at most
  `max_children` children per node, none deeper than `depth`). Siblings
  keep their node order."""
  B, T = parents.shape
  rows = jnp.arange(B)[:, None]
  node = jnp.arange(T, dtype=jnp.int32)
  eye = jnp.eye(T, dtype=bool)
  parents = parents.at[:, 0].set(0)
  anc = jnp.broadcast_to(eye, (B, T, T))
  for _ in range(depth):                          # each pass adds one more generation
    anc = eye[None] | jnp.take_along_axis(anc, parents[:, :, None], axis=1)
  # Sibling rank: earlier nodes with the same parent (the root has none).
  same = (parents[:, :, None] == parents[:, None, :]) & (node[:, None] > node[None, :])
  rank = jnp.sum(same & (node[None, None, :] > 0), axis=-1).astype(jnp.int32)   # [B, T]
  target = jnp.where(node[None] > 0, parents, T)                          # the root: dropped
  children = jnp.full((B, T, max_children), -1, jnp.int32).at[
      rows, target, rank].set(jnp.broadcast_to(node, (B, T)), mode='drop')
  path = []
  for d in range(depth + 1):
    at_d = anc & (depths[:, None, :] == d)                                # [B, T, T]
    path.append(jnp.where(jnp.any(at_d, -1), jnp.argmax(at_d, -1), node[None]))
  return Tables(parents=parents, depths=depths.astype(jnp.int32), ancestors=anc,
                children=children, path_nodes=jnp.stack(path, -1).astype(jnp.int32))


# The `tree` key of the job, the api and the sweep: '' = a chain, 'auto' =
# the tree below for the drafter kind, the branching per depth ('4,2,1' or
# '4x2x1'), or a dynamic tree ('dyn8'). AUTO is the tree with the best mean
# speedup over AR, six (domain, T) points, in experiments/bench_tree.py's
# runs on this CPU (docs/TREE.md, run 3: mtp and heads dyn4-d3-k2, 5 verify
# rows; ngram 3x1x1 over runs 1-2; on a CPU a verify pass over many rows
# costs too much for larger trees to pay).
AUTO = {'mtp': DynamicTree(4, 3, 2), 'heads': DynamicTree(4, 3, 2), 'ngram': TreeShape((3, 1, 1))}
CHAIN = ('', 'none', 'chain')


def parse(spec):
  """'' / 'none' / 'chain' -> None; 'auto' -> 'auto'; '4,2,1', '4x2x1' or a
  sequence of ints -> TreeShape; 'dyn8', 'dyn6-d3-k2' -> DynamicTree.
  UserError (one line) otherwise."""
  if isinstance(spec, (TreeShape, DynamicTree)) or spec is None:
    return spec
  sampled = False
  if isinstance(spec, (list, tuple)):
    items = list(spec)
  else:
    text = str(spec).strip().lower()
    if text in CHAIN:
      return None
    if text == 'auto':
      return 'auto'
    if text.startswith('dyn'):
      return parse_dynamic(text)
    sampled = text.endswith('-s')
    items = [x.strip() for x in text.removesuffix('-s').replace('x', ',').split(',')]
  try:
    branching = tuple(int(x) for x in items)
  except (TypeError, ValueError):
    raise UserError(f'tree {spec!r}: use \'\' (a chain), auto, a branching factor per depth '
                    'such as 4,2,1 (or 4x2x1, 4x2x1-s for siblings sampled from the '
                    'drafter), or a dynamic tree such as dyn8 or dyn8-d4-k4') from None
  return TreeShape(branching, sampled)


def parse_dynamic(text: str) -> DynamicTree:
  """'dyn8' -> DynamicTree(8); 'dyn6-d3-k2' -> 6 nodes, depth 3, top 2."""
  head, *rest = text.split('-')
  try:
    args = {'nodes': int(head[3:])}
    for part in rest:
      key = {'d': 'depth', 'k': 'topk'}[part[0]]
      if key in args:
        raise KeyError(key)
      args[key] = int(part[1:])
  except (ValueError, KeyError, IndexError):
    raise UserError(f'tree {text!r}: a dynamic tree is dyn<nodes>, optionally -d<depth> and '
                    '-k<topk>, e.g. dyn8 or dyn6-d3-k2') from None
  return DynamicTree(**args)


def resolve(spec, kind: str):
  """The TreeShape or DynamicTree (or None: a chain) for a drafter kind ('mtp', 'heads',
  'ngram'); 'auto' picks AUTO[kind]. UserError for kinds without trees."""
  shape = parse(spec)
  if shape is None:
    return None
  if kind not in AUTO:
    raise UserError(f'tree drafting needs an ngram, heads or mtp drafter, not {kind}')
  if shape == 'auto':
    return AUTO[kind]
  check_kind(shape, kind)
  return shape


def check_kind(shape, kind: str) -> None:
  """UserError for a dynamic tree, or sampled siblings, from a drafter
  without probabilities."""
  if isinstance(shape, DynamicTree) and kind == 'ngram':
    raise UserError(f'tree {label(shape)}: a dynamic tree ranks nodes by the drafter\'s '
                    'probabilities, which ngram has not; use a static shape such as 3x1x1')
  if getattr(shape, 'sampled', False) and kind == 'ngram':
    raise UserError(f'tree {label(shape)}: sampled siblings are drawn from the drafter\'s '
                    'probabilities, which ngram has not; drop the -s')


def label(shape) -> str:
  """'2x2x1' for TreeShape((2, 2, 1)); 'dyn8-d4-k4' for DynamicTree(8);
  'chain' for None."""
  if shape is None:
    return 'chain'
  if isinstance(shape, DynamicTree):
    return f'dyn{shape.nodes}-d{shape.depth}-k{shape.topk}'
  return 'x'.join(map(str, shape.branching)) + ('-s' if shape.sampled else '')


def describe(shape):
  """What summaries record: the branching list of a static tree, the label
  of a dynamic one, None for a chain."""
  if shape is None:
    return None
  if isinstance(shape, DynamicTree) or shape.sampled:
    return label(shape)
  return list(shape.branching)


def check_fits(shape, longest_prompt: int, max_new_tokens: int, cache_size: int):
  """UserError unless a verify pass over the tree fits in the cache: it writes
  num_nodes slots from the pending token on (a chain's margin is k + 1)."""
  need = longest_prompt + max_new_tokens + shape.num_nodes
  if need > cache_size:
    raise UserError(f'tree {label(shape)} has {shape.num_nodes} nodes: prompt '
                    f'({longest_prompt}) + max_new_tokens ({max_new_tokens}) + nodes needs a '
                    f'cache of {need} > cache_size {cache_size}; use a smaller tree')


# ----------------------------------------------------------------------------
# Cache.
# ----------------------------------------------------------------------------

def commit_path(cache: KVCache, first_slot, path) -> KVCache:
  """Moves the accepted path's keys/values to the slots of their positions.

  first_slot [B]: the root's slot (the verify pass wrote node i at
  first_slot + i); path [B, D+1]: node at each depth. Slot first_slot + d
  gets node path[d]'s entry; path[d] >= d (breadth-first numbering), and all
  entries are read before any is written. Lengths are left to the caller.
  """
  B, D1 = path.shape
  src = first_slot[:, None] + path                                       # [B, D+1]
  dst = first_slot[:, None] + jnp.arange(D1, dtype=jnp.int32)[None]      # [B, D+1]
  rows = jnp.arange(B)[:, None, None]
  heads = jnp.arange(cache.k[0].shape[1])[None, :, None]

  def move(c):                                                           # [B, K, S, H]
    moved = jnp.take_along_axis(c, src[:, None, :, None], axis=2)        # [B, K, D+1, H]
    return c.at[rows, heads, dst[:, None, :]].set(moved, mode='promise_in_bounds',
                                                 unique_indices=True)
  return cache.replace(k=tuple(map(move, cache.k)), v=tuple(map(move, cache.v)))


# ----------------------------------------------------------------------------
# Acceptance.
# ----------------------------------------------------------------------------

def accept_greedy(tree, node_tokens, target_logits):
  """tree: a TreeShape or per-row Tables; node_tokens [B, T] (node 0 the
  pending token), target_logits [B, T, V] -> (best [B] deepest node on an
  all-matching path, next_token [B])."""
  t = tables_of(tree, node_tokens.shape[0])
  best_at = jnp.argmax(target_logits, axis=-1)                           # [B, T]
  match = node_tokens == jnp.take_along_axis(best_at, t.parents, axis=1)  # [B, T]
  match = match.at[:, 0].set(True)
  # On the path iff every ancestor (itself included) matches.
  ok = jnp.all(match[:, None, :] | ~t.ancestors, axis=-1)               # [B, T]
  best = jnp.argmax(jnp.where(ok, t.depths, -1), axis=-1).astype(jnp.int32)
  return best, jnp.take_along_axis(best_at, best[:, None], axis=1)[:, 0].astype(jnp.int32)


def accept_sampled(tree, keys, node_tokens, target_probs, draft_probs=None,
                   residual_update: bool = True):
  """Recursive rejection sampling down the tree (module docstring).

  tree: a TreeShape or per-row Tables; keys [B]; node_tokens [B, T];
  target_probs p [B, T, V] (warped; p[:, i] is the target's distribution
  after node i); draft_probs q [B, T, V] (the
  distribution node i was drawn from) or None for deterministic proposals.
  residual_update=False is a deliberately wrong variant for the tests'
  power check (p is not reduced between siblings).
  Returns (best [B] the last accepted node, next_token [B]).
  """
  B, T, V = target_probs.shape
  t = tables_of(tree, B)
  D, b_max = t.depth, t.children.shape[-1]
  u_key, r_key = jax.vmap(lambda key: jax.random.split(key))(keys).transpose(1, 0)
  u = jax.vmap(lambda key: jax.random.uniform(key, (D, b_max)))(u_key)   # [B, D, b]
  rows = jnp.arange(B)
  cur = jnp.zeros((B,), jnp.int32)
  walking = jnp.ones((B,), bool)               # still descending
  p = target_probs[:, 0]                        # [B, V]
  for d in range(D):
    p = jnp.where(walking[:, None], target_probs[rows, cur], p)
    base = p
    chosen = jnp.full((B,), -1, jnp.int32)
    for j in range(b_max):
      c = t.children[rows, cur, j]                                       # [B]
      trying = walking & (c >= 0) & (chosen < 0)
      cc = jnp.maximum(c, 0)
      x = node_tokens[rows, cc]                                          # [B]
      q = (jax.nn.one_hot(x, V, dtype=p.dtype) if draft_probs is None
           else draft_probs[rows, cc])                                   # [B, V]
      px, qx = p[rows, x], q[rows, x]
      if not residual_update:
        px = base[rows, x]
      ok = trying & (u[:, d, j] * qx < px)
      chosen = jnp.where(ok, c, chosen)
      rejected = trying & ~ok
      residual = jnp.maximum(p - q, 0.0)
      mass = jnp.sum(residual, axis=-1, keepdims=True)
      # mass > 0 after a rejection (p(x) < q(x) there); the guard covers round-off.
      residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)
      if residual_update:
        p = jnp.where(rejected[:, None], residual, p)
    cur = jnp.where(walking & (chosen >= 0), chosen, cur)
    walking = walking & (chosen >= 0)
  # A row still walking reached a leaf: its bonus token comes from p there.
  p = jnp.where(walking[:, None], target_probs[rows, cur], p)
  nxt = sampling.sample(r_key, p)
  return cur, nxt


def check_drafter(drafter, shape):
  """UserError unless `drafter` can propose trees of this shape."""
  from specdec_jax import drafters
  kinds = (drafters.NgramDrafter, drafters.HeadsDrafter, drafters.MTPDrafter)
  if drafter is None or not isinstance(drafter, kinds):
    raise UserError(f'tree drafting needs an ngram, heads or mtp drafter, not '
                    f'{type(drafter).__name__}')
  check_kind(shape, 'ngram' if isinstance(drafter, drafters.NgramDrafter) else '')
  if drafter.draft_len != shape.depth:
    raise UserError(f'tree {label(shape)} is {shape.depth} deep: the drafter\'s draft_len '
                    f'({drafter.draft_len}) must equal it')
  if isinstance(drafter, drafters.HeadsDrafter) and shape.depth > drafter.config.num_draft_heads:
    raise UserError(f'tree {label(shape)} is {shape.depth} deep; the heads drafter has '
                    f'{drafter.config.num_draft_heads} heads')


def check_tree_generator(gen):
  """The Generator's checks for a tree (UserError)."""
  from specdec_jax.config import ModelConfig
  if not isinstance(gen.tree, (TreeShape, DynamicTree)):
    raise UserError(f'tree must be a tree.TreeShape or tree.DynamicTree, not {gen.tree!r}')
  if gen.policy is not None:
    raise UserError('a draft tree and a draft-length policy do not combine')
  if not isinstance(gen.config, ModelConfig):
    raise UserError('tree verify passes need a Gemma 3 target (model.Transformer)')
  check_drafter(gen.drafter, gen.tree)
  if gen.tree.num_nodes >= gen.cache_size:
    raise UserError(f'tree {label(gen.tree)} has {gen.tree.num_nodes} nodes, more than '
                    f'cache_size {gen.cache_size} leaves room for')
