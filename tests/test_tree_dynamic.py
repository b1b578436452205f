"""Dynamic (EAGLE-2) draft trees: a different tree per row and per round
within a static node budget. The per-row tables equal a static shape's
layout; the chosen nodes are the best-scoring ones, ancestors included; the
per-row tree mask gives every node its root-to-node chain's logits and
cache; greedy == AR token for token and sampled == AR in distribution for
the mtp and heads drafters; bad specs are one clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import drafters, generate
from specdec_jax import tree as tree_lib
from specdec_jax import tree_proposals
from specdec_jax.errors import UserError
from specdec_jax.model import KVCache, Transformer

from test_speculative import (PROMPTS, SETTINGS, chi2_tests,  # noqa: F401
                              small_target, trained_drafter)
from test_tree import REPETITIVE, run_tree, sampled_tree_run


@pytest.mark.parametrize('branching', [(2, 1), (3, 2, 1), (1, 3, 2)])
def test_tables_from_parents_equal_the_static_layout(branching):
  shape = tree_lib.TreeShape(branching)
  lay, B = shape.layout, 3
  rows = lambda x: jnp.broadcast_to(jnp.asarray(x), (B,) + x.shape)
  got = tree_lib.build_tables(rows(np.maximum(lay['parents'], 0)), rows(lay['depths']),
                              shape.depth, max(branching))
  want = tree_lib.tables_of(shape, B)
  for field in ('parents', 'depths', 'ancestors', 'children', 'path_nodes'):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)


def _table_expand(logp):
  """expand() whose children's log-probabilities depend on the parent token
  only: logp [V', V'] (row = parent token)."""
  return lambda level, h, d: (jnp.asarray(logp)[level], None)


def _worked_example(rows):
  """The worked example's tree (depth 2, top 2, budget 3, V = 6) for `rows`
  rows with the pending token 5."""
  V = 6
  probs = np.full((V, V), 1e-4)
  probs[5, [0, 1]] = [0.6, 0.3]
  probs[0, [2, 3]] = [0.9, 0.05]
  probs[1, [4, 5]] = [0.5, 0.4]
  tree = tree_lib.DynamicTree(nodes=3, depth=2, topk=2)
  return tree_proposals.propose_dynamic(tree, jnp.full((rows,), 5), None,
                                        _table_expand(np.log(probs)), jnp.arange(V))


def test_dynamic_tree_worked_example():
  """Depth 2, top 2, budget 3. From the pending token 5 the drafter gives
  0 (0.6) and 1 (0.3); after 0: 2 (0.9), 3 (0.05); after 1: 4 (0.5), 5
  (0.4). Path scores: 0 -0.51, 0>2 -0.62, 1 -1.20, 1>4 -1.90, 1>5 -2.12,
  0>3 -3.51: the tree is 5 -> {0 -> {2}, 1}, numbered by score."""
  nodes, t = _worked_example(rows=1)
  assert nodes[0].tolist() == [5, 0, 2, 1]
  assert t.parents[0].tolist() == [0, 0, 1, 0] and t.depths[0].tolist() == [0, 1, 2, 1]
  assert t.children[0].tolist() == [[1, 3], [2, -1], [-1, -1], [-1, -1]]
  assert t.path_nodes[0].tolist() == [[0, 0, 0], [0, 1, 1], [0, 1, 2], [0, 3, 3]]
  assert np.flatnonzero(t.ancestors[0, 2]).tolist() == [0, 1, 2]


def _eagle2_reference(logp, pending, tree):
  """Sorted keys (score - 1e-3 depth) of the best `tree.nodes` candidates,
  written out in numpy: expand the top-k nodes of each depth by their
  top-k children, rerank everything expanded."""
  level, pool = [(pending, 0.0)], []
  for d in range(tree.depth):
    cands = [(int(c), s + logp[tok, c]) for tok, s in level
             for c in np.argsort(-logp[tok], kind='stable')[:tree.topk]]
    pool += [s - 1e-3 * (d + 1) for _, s in cands]
    level = sorted(cands, key=lambda x: -x[1])[:tree.topk]
  return np.sort(pool)[::-1][:tree.nodes]


def test_dynamic_trees_hold_the_best_nodes_with_their_ancestors():
  """Random drafter tables, 16 rows: every chosen node's parent is chosen
  and numbered before it, siblings are distinct tokens, and the chosen
  nodes are the best-scoring candidates (a numpy EAGLE-2 reference)."""
  V, B = 9, 16
  rng = np.random.default_rng(0)
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(rng.normal(size=(V, V)) * 2), -1))
  tree = tree_lib.DynamicTree(nodes=7, depth=3, topk=3)
  pending = rng.integers(0, V, B)
  nodes, t = tree_proposals.propose_dynamic(tree, jnp.asarray(pending), None,
                                            _table_expand(logp), jnp.arange(V))
  nodes, parents, depths = map(np.asarray, (nodes, t.parents, t.depths))
  for b in range(B):
    key = np.zeros(tree.num_nodes)
    score = np.zeros(tree.num_nodes)
    for i in range(1, tree.num_nodes):
      par = parents[b, i]
      assert par < i and depths[b, i] == depths[b, par] + 1
      score[i] = score[par] + logp[nodes[b, par], nodes[b, i]]
      key[i] = score[i] - 1e-3 * depths[b, i]
    for i in range(tree.num_nodes):
      kids = nodes[b, 1:][parents[b, 1:] == i]
      assert len(set(kids.tolist())) == len(kids)
    np.testing.assert_allclose(np.sort(key[1:])[::-1],
                               _eagle2_reference(logp, pending[b], tree), atol=1e-5)


def test_per_row_tree_verify_equals_each_nodes_chain(tiny):
  """Two rows at different lengths with different dynamic trees: each
  node's logits from the one tree pass equal a chain pass over its
  root-to-node path bit for bit, and committing a row's deepest path leaves the
  chain's cache."""
  cfg, params = tiny
  apply = jax.jit(Transformer(cfg).apply, static_argnames='compute_logits')   # compiled, as decoding runs
  B, S = 2, 40
  rng = np.random.default_rng(3)
  prompts = jnp.array(rng.integers(3, cfg.vocab_size, (B, 9)))
  cache = KVCache.init(cfg, B, S)
  _, _, cache = apply({'params': params}, prompts, cache, compute_logits=False)
  cache = cache.replace(lengths=jnp.array([9, 6]))
  V = cfg.vocab_size
  logp = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(V, V)) * 3), -1)
  tree = tree_lib.DynamicTree(nodes=6, depth=3, topk=2)
  nodes, t = tree_proposals.propose_dynamic(tree, jnp.array([7, 11]), None,
                                            _table_expand(logp), jnp.arange(V))
  assert not (np.asarray(t.parents[0]) == np.asarray(t.parents[1])).all() or \
      not (np.asarray(nodes[0]) == np.asarray(nodes[1])).all()
  logits, _, tcache = apply({'params': params}, nodes, cache, tree=t.mask)
  one = lambda x, b: jax.tree_util.tree_map(lambda a: a[b:b + 1], x)
  for b in range(B):
    for i in range(tree.num_nodes):
      path = np.asarray(t.path_nodes[b, i, :int(t.depths[b, i]) + 1])
      chain_logits, _, ccache = apply({'params': params}, nodes[b:b + 1, path], one(cache, b))
      if len(path) > 1:   # bit for bit
        np.testing.assert_array_equal(logits[b, path], chain_logits[0])
      else:               # a one-token chain is a 1-row product: float32 GEMV rounds otherwise
        np.testing.assert_allclose(logits[b, path], chain_logits[0], atol=1e-5, rtol=1e-5)
      if i == int(np.argmax(np.asarray(t.depths[b]))):
        committed = tree_lib.commit_path(one(tcache, b), one(cache, b).lengths,
                                         t.path_nodes[b:b + 1, i])
        L = int(cache.lengths[b]) + len(path)
        for got, want in zip(committed.k + committed.v, ccache.k + ccache.v):
          np.testing.assert_array_equal(got[0, :, :L], want[0, :, :L])


def test_greedy_acceptance_follows_the_matching_path_of_each_row():
  """accept_greedy on per-row tables: the target's argmax after each node is
  set so that row 0 matches 0 -> 2 (depth 2) and row 1 matches only 1."""
  V = 6
  nodes, t = _worked_example(rows=2)
  # nodes per row: [5, 0, 2, 1]; argmax wanted after each node.
  want = np.array([[0, 2, 4, 3], [1, 3, 3, 4]])
  logits = jax.nn.one_hot(jnp.asarray(want), V) * 5.0
  best, nxt = tree_lib.accept_greedy(t, nodes, logits)
  assert best.tolist() == [2, 3] and nxt.tolist() == [4, 4]


def test_greedy_dynamic_tree_equals_autoregressive(tiny):
  """mtp and heads, ragged batch rows, greedy: AR's tokens exactly; a row
  alone gets its batch tokens and call counts."""
  cfg, params = tiny
  ar = run_tree(cfg, params, PROMPTS + REPETITIVE, None, None, None)
  tree = tree_lib.DynamicTree(nodes=6, depth=3, topk=2)
  for kind in ('mtp', 'heads'):
    d, dp = trained_drafter(cfg, kind, 3)
    sp = run_tree(cfg, params, PROMPTS + REPETITIVE, d, dp, tree, batch_size=9)
    assert [s['completion_ids'] for s in sp] == [a['completion_ids'] for a in ar], kind
    solo = run_tree(cfg, params, [PROMPTS[2]], d, dp, tree)[0]
    assert (solo['completion_ids'], solo['target_calls']) == (sp[2]['completion_ids'],
                                                              sp[2]['target_calls']), kind


@pytest.mark.parametrize('kind', ['mtp', 'heads'])
def test_sampled_dynamic_tree_matches_autoregressive_distribution(small_target, kind):
  """4096 samples of 3 tokens at T = 1 against the exact AR distributions
  (the chi-square tests of tests/test_speculative.py; their power is shown
  there and in test_tree.py with the same acceptance rule)."""
  cfg, params, _, reference = small_target
  setting = SETTINGS[0]
  d, dp = trained_drafter(cfg, kind, 2, seed=3, vocab_size=12)
  tree, prompt = tree_lib.DynamicTree(nodes=5, depth=2, topk=3), [2, 5, 9]
  spec = sampled_tree_run(cfg, params, prompt, d, dp, tree, setting)
  calls = np.array([s['target_calls'] for s in spec])
  assert calls.sum() < len(spec) * 3 and (calls >= 2).mean() > 0.5
  for name, ratio in chi2_tests(spec, reference(setting, prompt), cfg.vocab_size):
    assert ratio < 1, (name, ratio)


def test_dynamic_tree_specs_and_bad_input(tiny):
  cfg, _ = tiny
  assert tree_lib.parse('dyn8') == tree_lib.DynamicTree(8, 4, 4)
  assert tree_lib.parse('dyn6-d3-k2') == tree_lib.parse('DYN6-k2-d3') == \
      tree_lib.DynamicTree(6, 3, 2)
  assert tree_lib.label(tree_lib.parse('dyn8')) == 'dyn8-d4-k4'
  assert tree_lib.describe(tree_lib.parse('dyn8')) == 'dyn8-d4-k4'
  assert tree_lib.describe(tree_lib.TreeShape((2, 1))) == [2, 1]
  assert tree_lib.parse('dyn8').num_nodes == 9
  for bad in ('dyn', 'dynx', 'dyn8-q2', 'dyn8-d2-d3', 'dyn8-d'):
    with pytest.raises(UserError, match='dyn<nodes>'):
      tree_lib.parse(bad)
  with pytest.raises(UserError, match='nodes=0'):
    tree_lib.parse('dyn0')
  with pytest.raises(UserError, match='expands only 6 candidates'):
    tree_lib.parse('dyn7-d2-k2')
  with pytest.raises(UserError, match='which ngram has not'):
    tree_lib.resolve('dyn8', 'ngram')
  with pytest.raises(UserError, match='which ngram has not'):
    generate.Generator(cfg, cache_size=64, drafter=drafters.NgramDrafter(4, cfg.vocab_size),
                       tree=tree_lib.DynamicTree(4))
  with pytest.raises(UserError, match='draft_len'):
    generate.Generator(cfg, cache_size=64, drafter=trained_drafter(cfg, 'mtp', 3)[0],
                       tree=tree_lib.DynamicTree(4))
  from test_tree import _job
  import pathlib
  import tempfile
  with tempfile.TemporaryDirectory() as tmp, pytest.raises(UserError, match='which ngram has not'):
    _job(pathlib.Path(tmp), drafter='ngram', tree='dyn8')
