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
            The proposals below (heads, mtp: top-b; ngram: matches) are
            all deterministic.
"""
import dataclasses
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

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
  """A static draft tree: `branching[d]` children per node at depth d."""
  branching: Tuple[int, ...]

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


# The `tree` key of the job, the api and the sweep: '' = a chain, 'auto' =
# the shape below for the drafter kind, or the branching per depth: '4,2,1'
# or '4x2x1'. AUTO is the tree with the best mean speedup over AR in
# experiments/bench_tree.py's two short runs on this CPU (docs/TREE.md: mtp
# 2x1, ngram 3x1x1; on a CPU a verify pass over many rows costs too much for
# larger trees to pay); heads was not measured and takes mtp's shape.
AUTO = {'mtp': (2, 1), 'heads': (2, 1), 'ngram': (3, 1, 1)}
CHAIN = ('', 'none', 'chain')


def parse(spec):
  """'' / 'none' / 'chain' -> None; 'auto' -> 'auto'; '4,2,1', '4x2x1' or a
  sequence of ints -> TreeShape. UserError (one line) otherwise."""
  if isinstance(spec, TreeShape) or spec is None:
    return spec
  if isinstance(spec, (list, tuple)):
    items = list(spec)
  else:
    text = str(spec).strip().lower()
    if text in CHAIN:
      return None
    if text == 'auto':
      return 'auto'
    items = [x.strip() for x in text.replace('x', ',').split(',')]
  try:
    branching = tuple(int(x) for x in items)
  except (TypeError, ValueError):
    raise UserError(f'tree {spec!r}: use \'\' (a chain), auto, or a branching factor per depth '
                    'such as 4,2,1 (or 4x2x1)') from None
  return TreeShape(branching)


def resolve(spec, kind: str):
  """The TreeShape (or None: a chain) for a drafter kind ('mtp', 'heads',
  'ngram'); 'auto' picks AUTO[kind]. UserError for kinds without trees."""
  shape = parse(spec)
  if shape is None:
    return None
  if kind not in AUTO:
    raise UserError(f'tree drafting needs an ngram, heads or mtp drafter, not {kind}')
  if shape == 'auto':
    return TreeShape(AUTO[kind])
  return shape


def label(shape) -> str:
  """'2x2x1' for TreeShape((2, 2, 1)); 'chain' for None."""
  return 'chain' if shape is None else 'x'.join(map(str, shape.branching))


def check_fits(shape: TreeShape, longest_prompt: int, max_new_tokens: int, cache_size: int):
  """UserError unless a verify pass over the tree fits in the cache: it writes
  num_nodes slots from the pending token on (a chain's margin is k + 1)."""
  need = longest_prompt + max_new_tokens + shape.num_nodes
  if need > cache_size:
    raise UserError(f'tree {shape.branching} has {shape.num_nodes} nodes: prompt '
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

def accept_greedy(shape: TreeShape, node_tokens, target_logits):
  """node_tokens [B, T] (node 0 the pending token), target_logits [B, T, V]
  -> (best [B] deepest node on an all-matching path, next_token [B])."""
  lay = shape.layout
  parents = np.maximum(lay['parents'], 0)
  best_at = jnp.argmax(target_logits, axis=-1)                           # [B, T]
  match = node_tokens == best_at[:, parents]                             # [B, T]
  match = match.at[:, 0].set(True)
  # On the path iff every ancestor (itself included) matches.
  ok = jnp.all(match[:, None, :] | ~lay['ancestors'][None], axis=-1)    # [B, T]
  best = jnp.argmax(jnp.where(ok, lay['depths'][None], -1), axis=-1).astype(jnp.int32)
  return best, jnp.take_along_axis(best_at, best[:, None], axis=1)[:, 0].astype(jnp.int32)


def accept_sampled(shape: TreeShape, keys, node_tokens, target_probs, draft_probs=None,
                   residual_update: bool = True):
  """Recursive rejection sampling down the tree (module docstring).

  keys [B]; node_tokens [B, T]; target_probs p [B, T, V] (warped; p[:, i]
  is the target's distribution after node i); draft_probs q [B, T, V] (the
  distribution node i was drawn from) or None for deterministic proposals.
  residual_update=False is a deliberately wrong variant for the tests'
  power check (p is not reduced between siblings).
  Returns (best [B] the last accepted node, next_token [B]).
  """
  lay = shape.layout
  B, T, V = target_probs.shape
  b_max = lay['children'].shape[1]
  u_key, r_key = jax.vmap(lambda key: jax.random.split(key))(keys).transpose(1, 0)
  u = jax.vmap(lambda key: jax.random.uniform(key, (shape.depth, b_max)))(u_key)   # [B, D, b]
  rows = jnp.arange(B)
  children = jnp.asarray(lay['children'])
  cur = jnp.zeros((B,), jnp.int32)
  walking = jnp.ones((B,), bool)               # still descending
  p = target_probs[:, 0]                        # [B, V]
  for d in range(shape.depth):
    p = jnp.where(walking[:, None], target_probs[rows, cur], p)
    base = p
    chosen = jnp.full((B,), -1, jnp.int32)
    for j in range(b_max):
      c = children[cur, j]                                               # [B]
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


# ----------------------------------------------------------------------------
# Proposals: node tokens [B, T] (node 0 = the pending token), deterministic.
# ----------------------------------------------------------------------------

def expand_top(shape: TreeShape, head_logits):
  """Medusa's product tree: head_logits [B, D, V'] (head d
  predicts the token at depth d + 1 with any prefix). A node at depth d with
  sibling rank j holds head d-1's j-th best token. Returns ranked indices
  into V' ([B, T], node 0 = -1: the caller puts the pending token there)."""
  lay = shape.layout
  b_max = max(shape.branching)
  top = jax.lax.top_k(head_logits, b_max)[1]                             # [B, D, b_max]
  d = np.maximum(lay['depths'] - 1, 0)
  picked = top[:, d, lay['ranks']]                                       # [B, T]
  return picked.at[:, 0].set(-1)


def propose_heads(drafter, shape: TreeShape, params, tokens, lengths, target):
  """A tree from a HeadsDrafter: per head its top-b tokens (of its logits;
  warping keeps the order, and top-k/top-p only cut the tail, where a
  proposal is simply rejected), products along the tree. [B, T] int32."""
  from specdec_jax.drafter_models import HeadsNet
  if shape.depth > drafter.config.num_draft_heads:
    raise UserError(f'tree {shape.branching} is {shape.depth} deep; the heads drafter has '
                    f'{drafter.config.num_draft_heads} heads')
  sub, embed = drafter._inputs(params, target)
  pending = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]
  logits = HeadsNet(drafter.config).apply({'params': params['net']}, embed(pending),
                                          target.hidden[:, None], sub)[:, 0, :shape.depth]
  idx = expand_top(shape, logits)                                        # [B, T]
  ids = params['vocab'][jnp.maximum(idx, 0)]
  return jnp.where(idx < 0, pending[:, None], ids).astype(jnp.int32)


def propose_mtp(drafter, shape: TreeShape, params, tokens, lengths, target):
  """A tree from the recurrent MTPDrafter: each node's children are the
  drafter's top-b tokens given the path to it (EAGLE's static tree). One
  drafter call per depth runs every node of the previous depth as a query
  row: MTPNet's rows are independent (they read only the target's cache, at
  the pending token's position, as the chain's steps do). [B, T] int32."""
  from specdec_jax.drafter_models import MTPNet
  cfg = drafter.config
  sub, embed = drafter._inputs(params, target)
  kvs = tuple((target.cache.k[l], target.cache.v[l]) for l in cfg.kv_layers)
  net = MTPNet(cfg)
  B = tokens.shape[0]
  level = jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)   # [B, n] tokens
  h = target.hidden[:, None]                                             # [B, n, D]
  out = [level]
  for b in shape.branching:
    n = level.shape[1]
    emb = embed(level.reshape(-1))[:, 0].reshape(B, n, -1)               # [B, n, D]
    q_pos = jnp.broadcast_to((lengths - 1)[:, None], (B, n))
    h, logits = net.apply({'params': params['net']}, emb, h, q_pos, kvs, sub)   # [B, n, R]
    top = jax.lax.top_k(logits, b)[1]                                    # [B, n, b]
    # Parent-major, rank-minor: the breadth-first numbering of the layout.
    level = params['vocab'][top].reshape(B, n * b)
    h = jnp.repeat(h, b, axis=1)                                         # children's state
    out.append(level)
  return jnp.concatenate(out, 1).astype(jnp.int32)


def propose_ngram(drafter, shape: TreeShape, tokens, lengths):
  """A trie from prompt lookup: the continuations of the M best earlier
  occurrences of the context's last n tokens (longest n first, then most
  recent, as NgramDrafter; M = the tree's leaves) merged by common prefix. A
  node's children are the first b distinct next tokens among the
  continuations through it, in that order; where there are fewer, the spare
  children are the pending token (deterministic, hence exact: the target
  judges them as any draft). For (b, 1, .., 1) that is b chains from b
  matches that differ in their first token. [B, T] int32."""
  B, S = tokens.shape
  D, M = shape.depth, int(np.prod(shape.branching))
  m = drafter.max_ngram
  rows = jnp.arange(B)
  starts = jnp.arange(S)
  suffix = jnp.take_along_axis(
      tokens, jnp.clip(lengths[:, None] - m + jnp.arange(m), 0, S - 1), axis=1)   # [B, m]
  # score[b, e] = n * S + e for the longest n-gram match ending just before
  # e (where its proposal begins): longest first, then most recent; indexed
  # by e so two n-grams proposing the same continuation count once.
  score = jnp.full((B, S), -1, jnp.int32)
  for n in range(drafter.min_ngram, m + 1):
    match = jnp.ones((B, S), bool)
    for i in range(n):
      match &= jnp.roll(tokens, -i, axis=1) == suffix[:, m - n + i][:, None]
    valid = (starts[None, :] + n <= lengths[:, None] - 1) & (lengths[:, None] >= n)
    # Shift start j to end j + n (the wrapped-around starts are never valid).
    hit = jnp.roll(match & valid, n, axis=1)
    score = jnp.where(hit, n * S + starts[None, :], score)
  val, _ = jax.lax.top_k(score, min(M, S))                               # [B, M] best first
  begin = jnp.where(val >= 0, val % S, -1)                               # proposal starts
  pos = begin[:, :, None] + jnp.arange(D)                                # [B, M, D]
  known = (begin[:, :, None] >= 0) & (pos < lengths[:, None, None])      # inside the context
  cand = jnp.take_along_axis(tokens, jnp.clip(pos, 0, S - 1).reshape(B, -1),
                             axis=1).reshape(pos.shape)                  # [B, M, D]
  pending = tokens[rows, lengths - 1]                                    # [B]
  out, level = [pending], [begin >= 0]       # per node: the continuations through it [B, M]
  for d, b in enumerate(shape.branching):
    nxt = []
    for through in level:
      avail = through & known[:, :, d]
      taken = jnp.zeros_like(avail)
      for _ in range(b):
        left = avail & ~taken
        has = jnp.any(left, axis=1)                                      # [B]
        tok = jnp.where(has, cand[rows, jnp.argmax(left, axis=1), d], pending)
        child = avail & (cand[:, :, d] == tok[:, None]) & has[:, None]
        taken |= child
        out.append(tok)
        nxt.append(child)
    level = nxt
  return jnp.stack(out, 1).astype(jnp.int32)


def check_drafter(drafter, shape: TreeShape):
  """UserError unless `drafter` can propose trees of this shape."""
  from specdec_jax import drafters
  kinds = (drafters.NgramDrafter, drafters.HeadsDrafter, drafters.MTPDrafter)
  if drafter is None or not isinstance(drafter, kinds):
    raise UserError(f'tree drafting needs an ngram, heads or mtp drafter, not '
                    f'{type(drafter).__name__}')
  if drafter.draft_len != shape.depth:
    raise UserError(f'tree {shape.branching} is {shape.depth} deep: the drafter\'s draft_len '
                    f'({drafter.draft_len}) must equal it')
  if isinstance(drafter, drafters.HeadsDrafter) and shape.depth > drafter.config.num_draft_heads:
    raise UserError(f'tree {shape.branching} is {shape.depth} deep; the heads drafter has '
                    f'{drafter.config.num_draft_heads} heads')


def propose(drafter, shape: TreeShape, params, tokens, lengths, target):
  """Node tokens [B, T] of the drafter's tree (node 0 = the pending token)."""
  from specdec_jax import drafters
  if isinstance(drafter, drafters.NgramDrafter):
    return propose_ngram(drafter, shape, tokens, lengths)
  if isinstance(drafter, drafters.MTPDrafter):
    return propose_mtp(drafter, shape, params, tokens, lengths, target)
  return propose_heads(drafter, shape, params, tokens, lengths, target)


def check_tree_generator(gen):
  """The Generator's checks for a tree (UserError)."""
  from specdec_jax.config import ModelConfig
  if not isinstance(gen.tree, TreeShape):
    raise UserError(f'tree must be a tree.TreeShape, not {gen.tree!r}')
  if gen.policy is not None:
    raise UserError('a draft tree and a draft-length policy do not combine')
  if not isinstance(gen.config, ModelConfig):
    raise UserError('tree verify passes need a Gemma 3 target (model.Transformer)')
  check_drafter(gen.drafter, gen.tree)
  if gen.tree.num_nodes >= gen.cache_size:
    raise UserError(f'tree {gen.tree.branching} has {gen.tree.num_nodes} nodes, more than '
                    f'cache_size {gen.cache_size} leaves room for')
