"""Sampled siblings (a static shape with `-s`): each node's children are
drawn from the drafter's q without replacement, and the acceptance reads
each child's own q_j. The draw follows q (chi-square), the sibling rule
with such siblings emits p's tokens (and the test sees a wrong q_j), and
sampled tree decoding == AR in distribution for mtp and heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import drafters, generate
from specdec_jax import tree as tree_lib
from specdec_jax import tree_proposals
from specdec_jax.errors import UserError

from test_speculative import SETTINGS, chi2_stat, chi2_tests, small_target, trained_drafter  # noqa: F401
from test_tree import _emitted, _sample_tree, sampled_tree_run
from scipy_free_chi2 import chi2_quantile_999

ROWS = 20000


def _batch(rows, temperature=1.0, top_k=0):
  return generate.make_batch([[1, 2]] * rows, batch_size=rows, bucket_len=4, max_new_tokens=1,
                             keys=jax.random.split(jax.random.key(0), rows),
                             temperature=temperature, top_k=top_k)


def _draw(q, b, rows=ROWS, **kw):
  """(children [rows, b] in draw order, q_j [rows, b, V]) for one node whose
  drafter distribution is q [V] (logits log q, vocab = identity)."""
  V = q.shape[0]
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(q)), (rows, 1, V))
  keys = jax.random.split(jax.random.key(7), rows)
  kids, qj = jax.jit(tree_proposals.sample_children, static_argnums=(1, 5))(
      logits, b, keys, _batch(rows, **kw), jnp.arange(V), V)
  return np.asarray(kids), np.asarray(qj)


def test_children_are_a_draw_without_replacement_from_q():
  rng = np.random.default_rng(3)
  q = rng.dirichlet(np.full(6, 0.7)).astype(np.float32)
  kids, qj = _draw(q, 3)
  assert (kids[:, 0] != kids[:, 1]).all() and (kids[:, 1] != kids[:, 2]).all() \
      and (kids[:, 0] != kids[:, 2]).all()
  stat, dof = chi2_stat(kids[:, 0], q)
  assert stat < chi2_quantile_999(dof)
  np.testing.assert_allclose(qj[:, 0], np.broadcast_to(q, qj[:, 0].shape), rtol=1e-5)
  # The second child given the first: q without the first, renormalised, and
  # that is what q_2 says.
  for first in range(6):
    sel = kids[:, 0] == first
    want = q * (np.arange(6) != first)
    want /= want.sum()
    np.testing.assert_allclose(qj[sel, 1], np.broadcast_to(want, qj[sel, 1].shape), rtol=1e-5)
    stat, dof = chi2_stat(kids[sel, 1], want)
    assert stat < chi2_quantile_999(dof), first


def test_a_node_with_nothing_left_to_draw_proposes_deterministically():
  """top_k = 1 (or T = 0): q is one token; the second child has no mass
  left, so its q_j is one-hot on it (a deterministic proposal)."""
  q = np.array([0.1, 0.6, 0.3], np.float32)
  kids, qj = _draw(q, 2, rows=16, top_k=1)
  assert (kids[:, 0] == 1).all() and (kids[:, 1] != 1).all()
  np.testing.assert_array_equal(qj[:, 0], np.eye(3)[np.full(16, 1)])
  np.testing.assert_array_equal(qj[:, 1], np.eye(3)[kids[:, 1]])


@pytest.mark.parametrize('honest', [True, False])
def test_sibling_rule_with_siblings_drawn_without_replacement(honest):
  """Three siblings drawn without replacement from a peaked q, a p unlike
  it: the first emitted token follows p with each child's q_j, and not when
  every child claims the undivided q (the power of the check)."""
  shape = tree_lib.TreeShape((3,), sampled=True)
  V = 6
  p = np.array([[0.05, 0.05, 0.1, 0.2, 0.3, 0.3]] + [[1 / V] * V] * 3, np.float32)
  q = np.array([0.5, 0.3, 0.1, 0.05, 0.03, 0.02], np.float32)
  kids, qj = _draw(q, 3)
  if not honest:
    qj = np.broadcast_to(q, qj.shape)
  nodes = np.concatenate([np.zeros((ROWS, 1), np.int32), kids], 1)
  dprobs = np.concatenate([np.zeros((ROWS, 1, V), np.float32), qj], 1)
  best, nxt = _sample_tree(shape, jnp.asarray(p)[None], jnp.asarray(nodes),
                           jnp.asarray(dprobs), rows=ROWS)
  first, _ = _emitted(shape, nodes, best, nxt)
  stat, dof = chi2_stat(first, p[0])
  assert (stat < chi2_quantile_999(dof)) == honest, stat


@pytest.mark.parametrize('kind', ['mtp', 'heads'])
def test_sampled_siblings_match_autoregressive_distribution(small_target, kind):
  """4096 samples of 3 tokens with a sampled (3, 2) tree, T = 1, against the
  exact AR distributions (marginals and joints, tests/test_speculative.py)."""
  cfg, params, _, reference = small_target
  setting = SETTINGS[0]
  d, dp = trained_drafter(cfg, kind, 2, seed=3, vocab_size=12)
  prompt = [2, 5, 9]
  spec = sampled_tree_run(cfg, params, prompt, d, dp, tree_lib.TreeShape((3, 2), True), setting)
  calls = np.array([s['target_calls'] for s in spec])
  assert calls.sum() < len(spec) * 3 and (calls >= 2).mean() > 0.5
  for name, ratio in chi2_tests(spec, reference(setting, prompt), cfg.vocab_size):
    assert ratio < 1, (name, ratio)


def test_greedy_sampled_shape_proposes_the_ranked_tree(tiny):
  """Without sampling keys (a greedy loop) a `-s` shape proposes what the
  plain shape does: the drafter's top-b."""
  cfg, params = tiny
  d, dp = trained_drafter(cfg, 'mtp', 2)
  gen = generate.Generator(cfg, cache_size=64, greedy=True, drafter=d)
  batch = generate.make_batch([[1, 2, 3], [4, 5]], batch_size=2, bucket_len=16,
                              max_new_tokens=4, keys=jax.random.split(jax.random.key(0), 2))
  state = gen.prefill(params, batch, dp)
  view = drafters.TargetView(embedding=params['embedding'], cache=state.cache,
                             hidden=state.hidden)
  args = (dp, state.tokens, state.lengths, view)
  ranked, _, _ = tree_proposals.propose(d, tree_lib.TreeShape((2, 1)), *args)
  plain, _, q = tree_proposals.propose(d, tree_lib.TreeShape((2, 1), True), *args)
  assert q is None and (plain == ranked).all()


def test_sampled_shape_specs_and_bad_input():
  shape = tree_lib.parse('3x2-s')
  assert shape == tree_lib.TreeShape((3, 2), True) and tree_lib.label(shape) == '3x2-s'
  assert tree_lib.describe(shape) == '3x2-s' and shape.num_nodes == 10
  assert tree_lib.parse('3,2') == tree_lib.TreeShape((3, 2))
  with pytest.raises(UserError, match='ngram has not; drop the -s'):
    tree_lib.resolve('3x1-s', 'ngram')
  with pytest.raises(UserError, match='drop the -s'):
    tree_lib.check_drafter(drafters.NgramDrafter(1, 32), tree_lib.TreeShape((2,), True))
  with pytest.raises(UserError, match='4x2x1-s'):
    tree_lib.parse('3x2-q')
