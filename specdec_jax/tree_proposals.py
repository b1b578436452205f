"""Tree proposals: the node tokens of each row's draft tree (node 0 = the
pending token), and for dynamic trees their per-row structure.

    nodes, tables, q = tree_proposals.propose(drafter, shape, params, tokens, lengths, target)

Static shapes (tree.TreeShape): `mtp` expands every node of a depth by the
drafter's top-b tokens given the path to it (EAGLE's static tree); `heads`
takes each head's top-b tokens, products along the tree (Medusa); `ngram`
merges the continuations of several earlier matches into a trie.

Dynamic trees (tree.DynamicTree, EAGLE-2): a node's score is the sum of the
drafter's log-probabilities along its path. Each depth expands the `topk`
best-scoring nodes of the depth above by their `topk` best children; of all
the nodes expanded, the `nodes` best-scoring ones form the tree. A child
scores below its parent (log-probabilities <= 0, and a depth penalty of
1e-3 breaks ties), so the chosen set holds every chosen node's ancestors,
and sorted by score it numbers parents before children. Every choice reads
the drafter's outputs only, never the target's verdict, and siblings are
distinct tokens: the acceptance rules of tree.py stay exact.

All these proposals are deterministic given the context (the sampled
acceptance treats them as one-hot draft distributions). A sampled shape
(`TreeShape(.., sampled=True)`, spec `2x1-s`) instead draws each node's
children from the drafter's warped distribution q without replacement (the
Gumbel top-b), when the loop samples; the acceptance then reads each
child's own q (`propose_sampled`). Top-b siblings are accepted with p(x)
alone, which at T = 1 loses to a sampled chain's min(1, p/q); sampled
siblings keep that rule.
"""
import jax
import jax.numpy as jnp
import numpy as np

from specdec_jax import sampling
from specdec_jax.errors import UserError
from specdec_jax.tree import DynamicTree, TreeShape, build_tables, label, tables_of

DEPTH_PENALTY = 1e-3   # per depth: a child always scores strictly below its parent


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


def _pending(tokens, lengths):
  """[B] the last token of each row's context."""
  return jnp.take_along_axis(tokens, (lengths - 1)[:, None], axis=1)[:, 0]


def _heads_logits(drafter, depth: int, params, tokens, lengths, target):
  """[B, depth, V'] the first `depth` heads' logits (head d: the token at
  depth d + 1)."""
  from specdec_jax.drafter_models import HeadsNet
  if depth > drafter.config.num_draft_heads:
    raise UserError(f'a tree {depth} deep needs {depth} heads; the heads drafter has '
                    f'{drafter.config.num_draft_heads}')
  sub, embed = drafter._inputs(params, target)
  return HeadsNet(drafter.config).apply({'params': params['net']},
                                        embed(_pending(tokens, lengths)),
                                        target.hidden[:, None], sub)[:, 0, :depth]


def _mtp_expander(drafter, params, lengths, target):
  """expand(level [B, n] tokens, h [B, n, D] their states) -> (logits [B, n,
  V'] of each node's children, the children's state h [B, n, D]): one
  drafter call runs every node of a depth as a query row. MTPNet's rows are
  independent (they read only the target's cache, at the pending token's
  position, as the chain's steps do)."""
  from specdec_jax.drafter_models import MTPNet
  cfg = drafter.config
  sub, embed = drafter._inputs(params, target)
  kvs = tuple((target.cache.k[l], target.cache.v[l]) for l in cfg.kv_layers)
  net = MTPNet(cfg)

  def expand(level, h):
    B, n = level.shape
    emb = embed(level.reshape(-1))[:, 0].reshape(B, n, -1)               # [B, n, D]
    q_pos = jnp.broadcast_to((lengths - 1)[:, None], (B, n))
    h, logits = net.apply({'params': params['net']}, emb, h, q_pos, kvs, sub)
    return logits, h
  return expand


def propose_heads(drafter, shape: TreeShape, params, tokens, lengths, target):
  """A tree from a HeadsDrafter: per head its top-b tokens (of its logits;
  warping keeps the order, and top-k/top-p only cut the tail, where a
  proposal is simply rejected), products along the tree. [B, T] int32."""
  logits = _heads_logits(drafter, shape.depth, params, tokens, lengths, target)
  idx = expand_top(shape, logits)                                        # [B, T]
  ids = params['vocab'][jnp.maximum(idx, 0)]
  pending = _pending(tokens, lengths)
  return jnp.where(idx < 0, pending[:, None], ids).astype(jnp.int32)


def propose_mtp(drafter, shape: TreeShape, params, tokens, lengths, target):
  """A tree from the recurrent MTPDrafter: each node's children are the
  drafter's top-b tokens given the path to it (EAGLE's static tree), one
  drafter call per depth. [B, T] int32."""
  expand = _mtp_expander(drafter, params, lengths, target)
  B = tokens.shape[0]
  level = _pending(tokens, lengths)[:, None]                             # [B, n] tokens
  h = target.hidden[:, None]                                             # [B, n, D]
  out = [level]
  for b in shape.branching:
    n = level.shape[1]
    logits, h = expand(level, h)                                         # [B, n, V']
    top = jax.lax.top_k(logits, b)[1]                                    # [B, n, b]
    # Parent-major, rank-minor: the breadth-first numbering of the layout.
    level = params['vocab'][top].reshape(B, n * b)
    h = jnp.repeat(h, b, axis=1)                                         # children's state
    out.append(level)
  return jnp.concatenate(out, 1).astype(jnp.int32)


def propose_dynamic(tree: DynamicTree, pending, h, expand, vocab):
  """EAGLE-2's tree (module docstring). pending [B]; h the root's drafter
  state (or None); expand(level [B, n], h, depth) -> (logits [B, n, V'],
  the children's state); vocab [V'] maps drafter ids to target ids.
  Returns (node tokens [B, nodes + 1], Tables)."""
  B, K = pending.shape[0], tree.topk
  rows = jnp.arange(B)[:, None]
  zeros = jnp.zeros((B, 1), jnp.int32)
  pool = dict(token=[pending[:, None].astype(jnp.int32)], score=[jnp.zeros((B, 1))],
              parent=[zeros], depth=[zeros])
  level, score, index, size = pending[:, None], jnp.zeros((B, 1)), zeros, 1
  for d in range(tree.depth):
    n = level.shape[1]
    logits, h_out = expand(level, h, d)                                  # [B, n, V']
    top_lp, top_i = jax.lax.top_k(jax.nn.log_softmax(logits.astype(jnp.float32), -1), K)
    cand_score = (score[:, :, None] + top_lp).reshape(B, n * K)          # parent-major
    cand_token = vocab[top_i].reshape(B, n * K).astype(jnp.int32)
    pool['token'].append(cand_token)
    pool['score'].append(cand_score)
    pool['parent'].append(jnp.repeat(index, K, axis=1))
    pool['depth'].append(jnp.full((B, n * K), d + 1, jnp.int32))
    if d + 1 < tree.depth:                   # the K best candidates are expanded next
      score, pick = jax.lax.top_k(cand_score, K)                         # [B, K]
      level = jnp.take_along_axis(cand_token, pick, axis=1)
      index = size + pick.astype(jnp.int32)
      if h_out is not None:
        h = jnp.take_along_axis(h_out, (pick // K)[:, :, None], axis=1)  # the parent's output
    size += n * K
  pool = {k: jnp.concatenate(v, axis=1) for k, v in pool.items()}       # [B, P]
  key = pool['score'] - DEPTH_PENALTY * pool['depth']                    # the root: 0, the top
  chosen = jax.lax.top_k(key, tree.num_nodes)[1]                         # [B, T] best first
  T = tree.num_nodes
  node_of = jnp.full(key.shape, -1, jnp.int32).at[rows, chosen].set(
      jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)))          # pool -> node
  take = lambda x: jnp.take_along_axis(x, chosen, axis=1)
  parents = jnp.take_along_axis(node_of, take(pool['parent']), axis=1)
  tables = build_tables(parents, take(pool['depth']), tree.depth, K)
  return take(pool['token']), tables


def sample_children(logits, b: int, key, batch, vocab, vocab_size: int):
  """b children per node drawn without replacement from q = warp(logits).

  logits [B, n, V'] (the drafter's, over its head's ids), key [B], batch
  the rows' sampling settings, vocab [V'] -> target ids. Returns (tokens
  [B, n * b] parent-major, q_j [B, n * b, V]: the distribution child j was
  drawn from, given its earlier siblings: q with them removed, renormalised,
  or one-hot on the child where nothing is left (a deterministic proposal:
  T = 0 rows, top-k smaller than b)). The Gumbel top-b of log q is a draw
  without replacement in order, so child j ~ q_j."""
  B, n, R = logits.shape
  rep = lambda x: jnp.repeat(x, n)
  q = sampling.warp(logits.reshape(B * n, R), rep(batch.temperature), rep(batch.top_k),
                    rep(batch.top_p)).reshape(B, n, R)
  u = jax.vmap(lambda k: jax.random.uniform(k, (n, R), minval=1e-20, maxval=1.0))(key)
  gumbel = -jnp.log(-jnp.log(u))
  idx = jax.lax.top_k(jnp.log(q) + gumbel, b)[1]                         # [B, n, b] in draw order
  taken = jax.nn.one_hot(idx, R, dtype=q.dtype)                          # [B, n, b, R]
  earlier = jnp.cumsum(taken, axis=2) - taken                            # siblings before j
  q_j = q[:, :, None] * (1.0 - earlier)
  mass = jnp.sum(q_j, axis=-1, keepdims=True)
  q_j = jnp.where(mass > 0, q_j / jnp.where(mass > 0, mass, 1.0), taken)
  full = jnp.zeros((B, n * b, vocab_size), jnp.float32)
  full = full.at[:, :, vocab].set(q_j.reshape(B, n * b, R), unique_indices=True)
  return vocab[idx].reshape(B, n * b).astype(jnp.int32), full


def propose_sampled(shape: TreeShape, pending, h, expand, vocab, key, batch, vocab_size):
  """A static shape whose children are drawn (`sample_children`), not
  ranked. expand(level [B, n], h, depth) -> (logits [B, n, V'], the
  children's state) as for dynamic trees. Returns (node tokens [B, T],
  draft_probs [B, T, V]: node i's q_j; the root's row is zero)."""
  B = pending.shape[0]
  level, out = pending[:, None].astype(jnp.int32), [pending[:, None].astype(jnp.int32)]
  probs = [jnp.zeros((B, 1, vocab_size), jnp.float32)]
  for d, b in enumerate(shape.branching):
    logits, h = expand(level, h, d)                                      # [B, n, V']
    level, q = sample_children(logits, b, jax.vmap(jax.random.fold_in, (0, None))(key, d),
                               batch, vocab, vocab_size)
    if h is not None:
      h = jnp.repeat(h, b, axis=1)                                       # children's state
    out.append(level)
    probs.append(q)
  return jnp.concatenate(out, 1), jnp.concatenate(probs, 1)


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


def _expander(drafter, shape, params, tokens, lengths, target):
  """(expand(level, h, depth) -> (children's logits [B, n, V'], their
  state), the root's state) for an mtp or heads drafter."""
  from specdec_jax import drafters
  if isinstance(drafter, drafters.MTPDrafter):
    mtp = _mtp_expander(drafter, params, lengths, target)
    return (lambda level, h, d: mtp(level, h)), target.hidden[:, None]
  if isinstance(drafter, drafters.HeadsDrafter):
    logits = _heads_logits(drafter, shape.depth, params, tokens, lengths, target)
    return (lambda level, h, d: (jnp.broadcast_to(
        logits[:, d][:, None], level.shape + logits.shape[-1:]), None)), None
  raise UserError(f'tree {label(shape)} needs an mtp or heads drafter, not '
                  f'{type(drafter).__name__}')


def propose(drafter, shape, params, tokens, lengths, target, sample=None):
  """(node tokens [B, T], Tables, draft_probs [B, T, V] or None) of the
  drafter's tree (node 0 = the pending token): a TreeShape's layout or a
  DynamicTree's chosen nodes. sample = (keys [B], batch) when the loop
  samples: a sampled shape then draws its siblings (draft_probs = their
  q_j); None (greedy) gives every shape its ranked proposals."""
  from specdec_jax import drafters
  B = tokens.shape[0]
  if isinstance(shape, DynamicTree):
    expand, h = _expander(drafter, shape, params, tokens, lengths, target)
    return (*propose_dynamic(shape, _pending(tokens, lengths), h, expand, params['vocab']),
            None)
  if shape.sampled and sample is not None:
    expand, h = _expander(drafter, shape, params, tokens, lengths, target)
    nodes, q = propose_sampled(shape, _pending(tokens, lengths), h, expand, params['vocab'],
                               *sample, drafter.config.target.vocab_size)
    return nodes, tables_of(shape, B), q
  if isinstance(drafter, drafters.NgramDrafter):
    nodes = propose_ngram(drafter, shape, tokens, lengths)
  elif isinstance(drafter, drafters.MTPDrafter):
    nodes = propose_mtp(drafter, shape, params, tokens, lengths, target)
  else:
    nodes = propose_heads(drafter, shape, params, tokens, lengths, target)
  return nodes, tables_of(shape, B), None
