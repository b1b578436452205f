"""Tree drafting (tree.py) is exact: the tree-masked verify pass gives each
root-to-leaf path the chain's logits and cache; greedy tree decoding == AR
token for token; sampled == AR in distribution, and the sibling rule is
exact on its own (with a power check)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec_jax import drafters, generate
from specdec_jax import tree as tree_lib
from specdec_jax import tree_proposals
from specdec_jax.errors import UserError
from specdec_jax.model import KVCache, Transformer, cast_params, init_params

from test_speculative import (NEW, N, PROMPTS, SETTINGS, chi2_stat, chi2_tests,  # noqa: F401
                              small_target, trained_drafter)
from scipy_free_chi2 import chi2_quantile_999


def test_layout_worked_example():
  lay = tree_lib.TreeShape((2, 1)).layout
  assert lay['parents'].tolist() == [-1, 0, 0, 1, 2]
  assert lay['depths'].tolist() == [0, 1, 1, 2, 2]
  assert lay['children'].tolist() == [[1, 2], [3, -1], [4, -1], [-1, -1], [-1, -1]]
  assert np.flatnonzero(lay['ancestors'][3]).tolist() == [0, 1, 3]
  assert tree_lib.TreeShape((2, 2, 1)).num_nodes == 11
  assert tree_lib.TreeShape((2, 1)).leaves() == [[0, 1, 3], [0, 2, 4]]


@pytest.mark.parametrize('branching,param_dtype,S,lengths', [
    ((2, 2, 1), 'float32', 32, (9, 6)),
    ((2, 1, 1, 1, 1), 'float32', 32, (9, 6)),   # deeper than the window
    ((2, 2, 1), 'bfloat16', 32, (9, 6)),
    ((2, 2, 1), 'float32', 1024, (520, 505))])  # wide heads, a tree across slot 512
def test_tree_verify_equals_chain_per_path(tiny, branching, param_dtype, S, lengths):
  """Two rows at different lengths: every root-to-leaf path's logits and
  hidden states from the tree pass equal a chain pass over that path bit for
  bit, with float32 and with bf16 weights, and after commit_path the cache
  holds the chain's keys/values at the path's positions (and the prefix is
  untouched). Bitwise: a greedy tree must pick AR's token at a near-tie too;
  the softmax denominator summed in slot order differed from the chain's in
  the last bit, and with bf16 weights by ~0.01 in the logits (a model wider
  than `tiny`, so that such a bit moves a bf16 rounding). XLA:CPU sums the
  value product over 1024 slots of 64-wide heads in blocks of 512 slots
  (over 32 slots of `tiny`'s 16-wide heads one slot after another), so a
  tree across slot 512 tells whether each node's values sit in its chain's
  slot layout (model.attend; with values in tree slots this case failed)."""
  cfg, params = tiny
  if param_dtype == 'bfloat16' or S > 32:
    cfg = cfg.replace(vocab_size=256, embed_dim=128, hidden_dim=256, num_kv_heads=1,
                      head_dim=64, query_pre_attn_scalar=64.0, param_dtype=param_dtype)
    params = cast_params(init_params(cfg.replace(param_dtype='float32'), jax.random.key(1)),
                         param_dtype)
  shape = tree_lib.TreeShape(branching)
  apply = jax.jit(Transformer(cfg).apply, static_argnames='compute_logits')   # compiled, as decoding runs
  B, T = 2, shape.num_nodes
  prompts = jnp.array(np.random.default_rng(0).integers(3, cfg.vocab_size, (B, lengths[0])))
  cache = KVCache.init(cfg, B, S)
  _, _, cache = apply({'params': params}, prompts, cache, compute_logits=False)
  cache = cache.replace(lengths=jnp.array(lengths))            # row 1 rolled back
  nodes = jnp.array(np.random.default_rng(1).integers(3, cfg.vocab_size, (B, T)))
  logits, hidden, tcache = apply({'params': params}, nodes, cache, tree=shape.mask)
  assert (tcache.lengths == cache.lengths + T).all()
  for path in shape.leaves():
    chain_logits, chain_hidden, ccache = apply({'params': params}, nodes[:, path], cache)
    np.testing.assert_array_equal(logits[:, path], chain_logits)
    np.testing.assert_array_equal(hidden[:, path], chain_hidden)
    committed = tree_lib.commit_path(tcache, cache.lengths,
                                     jnp.broadcast_to(jnp.array(path), (B, len(path))))
    for b, L in enumerate(cache.lengths.tolist()):
      for got, want in zip(committed.k + committed.v, ccache.k + ccache.v):
        np.testing.assert_array_equal(got[b, :, :L + len(path)], want[b, :, :L + len(path)])


def run_tree(cfg, params, prompts, drafter, dparams, shape, *, max_new=17, greedy=True,
             batch_size=None, seed=0, temperature=0.0, top_k=0, top_p=1.0, cache_size=64,
             bucket_len=16):
  gen = generate.Generator(cfg, cache_size=cache_size, greedy=greedy, drafter=drafter,
                           tree=shape)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(len(prompts)))
  batch = generate.make_batch(prompts, batch_size=batch_size or len(prompts), bucket_len=bucket_len,
                              max_new_tokens=max_new, keys=keys, temperature=temperature,
                              top_k=top_k, top_p=top_p)
  return generate.completions(gen.generate(params, batch, dparams), cfg.eos_id)


REPETITIVE = [[2, 10, 11, 12, 10, 11, 12, 10, 11], [2, 5, 6, 5, 7, 5, 6, 5], [2, 30, 31]]


def test_greedy_tree_equals_autoregressive(tiny):
  """heads (Medusa product of top-b) and ngram (b chains) trees, ragged
  batch rows: the AR tokens exactly; with the AR output itself as the
  context, ngram's tree accepts whole paths (fewer target calls). (A row
  alone == its batch row: test_batch_rows_equal_solo_runs, and for mtp and
  heads test_tree_dynamic.py's greedy test.)"""
  cfg, params = tiny
  gen_ar = lambda prompts: run_tree(cfg, params, prompts, None, None, None)
  ar = gen_ar(PROMPTS + REPETITIVE)
  cases = {
      'heads': trained_drafter(cfg, 'heads', 3) + (tree_lib.TreeShape((3, 2, 1)),),
      'mtp': trained_drafter(cfg, 'mtp', 3) + (tree_lib.TreeShape((2, 2, 2)),),
      'ngram': (drafters.NgramDrafter(4, cfg.vocab_size), None, tree_lib.TreeShape((3, 1, 1, 1))),
      'ngram trie': (drafters.NgramDrafter(3, cfg.vocab_size), None, tree_lib.TreeShape((2, 2, 1))),
  }
  for name, (d, dp, shape) in cases.items():
    sp = run_tree(cfg, params, PROMPTS + REPETITIVE, d, dp, shape, batch_size=9)
    assert [s['completion_ids'] for s in sp] == [a['completion_ids'] for a in ar], name
  # The AR continuation repeated: ngram finds it, the tree accepts deep paths.
  loop = ar[0]['prompt_ids'] + ar[0]['completion_ids'] + ar[0]['prompt_ids'][1:]
  d, _, shape = cases['ngram']
  again = run_tree(cfg, params, [loop], None, None, None, max_new=12, cache_size=96,
                   bucket_len=32)[0]
  sp = run_tree(cfg, params, [loop], d, None, shape, max_new=12, cache_size=96, bucket_len=32)[0]
  assert sp['completion_ids'] == again['completion_ids']
  assert sp['target_calls'] < 12 and max(sp['accepted_by_position']) > 0


def test_greedy_tree_equals_autoregressive_with_bf16_weights(tiny):
  """bfloat16 weights: the tree pass's 15 rows give the AR step's argmax."""
  cfg, params = tiny
  cfg = cfg.replace(param_dtype='bfloat16')
  params = cast_params(params, jnp.bfloat16)
  ar = run_tree(cfg, params, PROMPTS, None, None, None)
  d, dp = trained_drafter(cfg, 'mtp', 3)
  sp = run_tree(cfg, params, PROMPTS, d, dp, tree_lib.TreeShape((2, 2, 2)), batch_size=6)
  assert [s['completion_ids'] for s in sp] == [a['completion_ids'] for a in ar]


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_batch_rows_equal_solo_runs(tiny, temperature):
  """A batch mixing a row whose ngram drafter abstains (no earlier
  occurrence) with rows that verify trees: every row gets its solo run's
  tokens and call counts, greedy and sampled (keys depend on row and
  position only)."""
  cfg, params = tiny
  d, shape = drafters.NgramDrafter(2, cfg.vocab_size), tree_lib.TreeShape((2, 1))
  prompts = [[2, 30, 31, 32, 33]] + REPETITIVE[:2]
  stats = lambda r: (r['completion_ids'], r['target_calls'], r['draft_calls'])
  kw = dict(greedy=temperature == 0, temperature=temperature)
  batched = run_tree(cfg, params, prompts, d, None, shape, batch_size=4, **kw)
  solo = [_solo(cfg, params, prompts, i, d, shape, temperature) for i in range(len(prompts))]
  assert [stats(r) for r in batched] == [stats(r) for r in solo]
  assert solo[0]['draft_calls'] < solo[0]['target_calls']      # abstained at least once
  assert solo[1]['draft_calls'] > 0                              # and verified trees


def _solo(cfg, params, prompts, i, drafter, shape, temperature):
  """Row i of `prompts` alone, with the PRNG stream it has in the batch."""
  gen = generate.Generator(cfg, cache_size=64, greedy=temperature == 0, drafter=drafter,
                           tree=shape)
  keys = jax.random.fold_in(jax.random.key(0), i)[None]
  batch = generate.make_batch([prompts[i]], batch_size=1, bucket_len=16, max_new_tokens=17,
                              keys=keys, temperature=temperature)
  return generate.completions(gen.generate(params, batch), cfg.eos_id)[0]


def test_ngram_trie_merges_matches_by_prefix():
  """The pending 5 occurred at 1, 4 and 7, continued by 7 8 5, 7 9 5 and
  6 1 5: the (2, 2, 1) trie's first level holds 6 (most recent) and 7; 7's
  children are 9 and 8 (one node for the shared 7); 6 has one continuation,
  so its spare child (and that child's child) is the pending token."""
  d = drafters.NgramDrafter(3, 64, max_ngram=1)
  tokens = jnp.array([[2, 5, 7, 8, 5, 7, 9, 5, 6, 1, 5, 0, 0, 0, 0, 0]])
  nodes = tree_proposals.propose_ngram(d, tree_lib.TreeShape((2, 2, 1)), tokens, jnp.array([11]))
  assert nodes[0].tolist() == [5, 6, 7, 1, 5, 9, 8, 5, 5, 5, 5]
  # (3, 1, 1): three chains from three matches with distinct first tokens; a
  # match repeating an earlier one's first token is merged, not a new branch.
  nodes = tree_proposals.propose_ngram(d, tree_lib.TreeShape((3, 1)), tokens, jnp.array([11]))
  assert nodes[0].tolist() == [5, 6, 7, 5, 1, 9, 5]


def test_mtp_tree_of_single_children_is_the_greedy_chain(tiny):
  """Branching (1, 1, 1): the mtp tree's nodes are the chain drafter's
  greedy drafts (same drafter calls, rows run as one batch of nodes)."""
  cfg, params = tiny
  d, dp = trained_drafter(cfg, 'mtp', 3)
  gen = generate.Generator(cfg, cache_size=64, greedy=True, drafter=d)
  batch = generate.make_batch(PROMPTS, batch_size=5, bucket_len=16, max_new_tokens=4,
                              keys=jax.random.split(jax.random.key(0), 5))
  state = gen.prefill(params, batch, dp)
  chain = gen.draft_part(params, state, dp)                              # [B, 3]
  view = drafters.TargetView(embedding=params['embedding'], cache=state.cache,
                             hidden=state.hidden)
  nodes, _, _ = tree_proposals.propose(d, tree_lib.TreeShape((1, 1, 1)), dp, state.tokens,
                                       state.lengths, view)
  assert (nodes[:, 1:] == chain).all()
  assert (nodes[:, 0] == state.tokens[jnp.arange(5), state.lengths - 1]).all()


# ----------------------------------------------------------------------------
# Sampled.
# ----------------------------------------------------------------------------

def _sample_tree(shape, p, nodes, draft_probs=None, rows=20000, seed=0, **kw):
  """Rows of one fixed tree: (best node, next token) per row, numpy."""
  keys = jax.random.split(jax.random.key(seed), rows)
  tile = lambda x: jnp.broadcast_to(x, (rows,) + x.shape[1:]) if x.shape[0] == 1 else x
  best, nxt = jax.jit(functools.partial(tree_lib.accept_sampled, shape, **kw))(
      keys, tile(nodes), tile(p), None if draft_probs is None else tile(draft_probs))
  return np.asarray(best), np.asarray(nxt)


def _emitted(shape, nodes, best, nxt):
  """(first, second) emitted token per row, [rows] each; second = -1 where
  only one was emitted."""
  lay = shape.layout
  path = lay['path_nodes'][best]                                          # [rows, D+1]
  depth = lay['depths'][best]
  toks = np.take_along_axis(np.broadcast_to(np.asarray(nodes), path.shape[:1] + nodes.shape[-1:]),
                            path[:, 1:], axis=1)
  toks = np.pad(toks, [(0, 0), (0, 1)], constant_values=-1)              # a depth-1 tree
  first = np.where(depth >= 1, toks[:, 0], nxt)
  second = np.where(depth >= 2, toks[:, 1], np.where(depth == 1, nxt, -1))
  return first, second


def _sibling_rule_ratios(residual_update):
  """Deterministic siblings (the target's top tokens, so rejections and
  acceptances both happen often) at depth 1 and 2 of a (3, 2) tree over
  V = 8: the first emitted token must follow p at the root, the second,
  given that the first is child c's token, p at c. Returns the chi-square
  ratios (> 1 rejects)."""
  shape = tree_lib.TreeShape((3, 2))
  lay = shape.layout
  V, T = 8, shape.num_nodes
  rng = np.random.default_rng(0)
  p = rng.dirichlet(np.full(V, 0.5), T).astype(np.float32)               # [T, V]
  nodes = np.zeros(T, np.int32)
  for i in range(T):   # children: the parent's top tokens in order
    kids = lay['children'][i][lay['children'][i] >= 0]
    nodes[kids] = np.argsort(-p[i])[:len(kids)]
  best, nxt = _sample_tree(shape, jnp.asarray(p)[None], jnp.asarray(nodes)[None],
                           residual_update=residual_update)
  first, second = _emitted(shape, nodes, best, nxt)
  ratios = []
  stat, dof = chi2_stat(first, p[0])
  ratios.append(stat / chi2_quantile_999(dof))
  for c in lay['children'][0]:
    sel = (first == nodes[c]) & (second >= 0)   # (a wrong rule may redraw it at the root)
    stat, dof = chi2_stat(second[sel], p[c])
    ratios.append(stat / chi2_quantile_999(dof))
  return ratios


def test_sibling_rule_is_exact_and_the_test_sees_a_wrong_one():
  assert max(_sibling_rule_ratios(True)) < 1
  # Power: siblings tested against the root's p, never its residual.
  assert max(_sibling_rule_ratios(False)) > 1


def test_sibling_rule_with_iid_sampled_siblings():
  """Siblings drawn i.i.d. from a q (with replacement), draft_probs = q:
  the first emitted token follows p."""
  shape = tree_lib.TreeShape((3,))
  V, rows = 8, 20000
  rng = np.random.default_rng(1)
  p = rng.dirichlet(np.full(V, 0.5), 4).astype(np.float32)
  q = rng.dirichlet(np.full(V, 0.5)).astype(np.float32)
  kids = jax.random.categorical(jax.random.key(5), jnp.log(jnp.asarray(q)), shape=(rows, 3))
  nodes = jnp.concatenate([jnp.zeros((rows, 1), jnp.int32), kids.astype(jnp.int32)], 1)
  dprobs = jnp.broadcast_to(jnp.asarray(q), (rows, 4, V))
  best, nxt = _sample_tree(shape, jnp.asarray(p)[None], nodes, dprobs, rows=rows)
  first, _ = _emitted(shape, np.asarray(nodes), best, nxt)
  stat, dof = chi2_stat(first, p[0])
  assert stat < chi2_quantile_999(dof)
  assert (best > 0).mean() > 0.3          # siblings were accepted, not only residual draws


@dataclasses.dataclass(frozen=True)
class PatchedTreeGenerator(generate.Generator):
  """Not equal to any Generator: jit traces the patched rule in afresh."""
  patch: str = ''


def sampled_tree_run(cfg, params, prompt, drafter, dparams, shape, setting, gen_cls=None):
  temperature, top_k, top_p = setting
  gen = (gen_cls or generate.Generator)(cfg, cache_size=24, greedy=False, drafter=drafter,
                                        tree=shape)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(N))
  batch = generate.make_batch([prompt] * N, batch_size=N, bucket_len=16, max_new_tokens=NEW,
                              keys=keys, temperature=temperature, top_k=top_k, top_p=top_p)
  return generate.completions(gen.generate(params, batch, dparams), cfg.eos_id)


@pytest.mark.parametrize('kind', ['heads', 'mtp', 'ngram'])
def test_sampled_tree_matches_autoregressive_distribution(small_target, kind, monkeypatch):
  """4096 tree-decoded samples of 3 tokens vs the exact AR distributions
  (marginals and the joints across the first round's boundary), at T = 1;
  and the same with the sibling residual not updated (power)."""
  cfg, params, _, reference = small_target
  setting = SETTINGS[0]
  if kind in ('heads', 'mtp'):
    d, dp = trained_drafter(cfg, kind, 2, seed=3, vocab_size=12)
    shape, prompt = tree_lib.TreeShape((3, 2)), [2, 5, 9]
  else:     # three earlier continuations of 5: [9, 7, 3]
    d, dp = drafters.NgramDrafter(2, cfg.vocab_size), None
    shape, prompt = tree_lib.TreeShape((3, 1)), [2, 5, 9, 5, 7, 5, 3, 1, 5]
  spec = sampled_tree_run(cfg, params, prompt, d, dp, shape, setting)
  calls = np.array([s['target_calls'] for s in spec])
  assert calls.sum() < N * NEW and (calls >= 2).mean() > 0.5
  ref = reference(setting, prompt)
  for name, ratio in chi2_tests(spec, ref, cfg.vocab_size):
    assert ratio < 1, (name, ratio)
  if kind == 'ngram':
    monkeypatch.setattr(tree_lib, 'accept_sampled',
                        functools.partial(tree_lib.accept_sampled, residual_update=False))
    broken = sampled_tree_run(cfg, params, prompt, d, dp, shape, setting,
                              functools.partial(PatchedTreeGenerator, patch='no_residual'))
    ratios = dict(chi2_tests(broken, ref, cfg.vocab_size))
    assert max(ratios.values()) > 1, ratios


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------

def test_bad_trees_are_one_clear_error(tiny):
  cfg, params = tiny
  with pytest.raises(UserError, match='branching factor >= 1'):
    tree_lib.TreeShape((2, 0))
  with pytest.raises(UserError, match='branching factor >= 1'):
    tree_lib.TreeShape(())
  shape = tree_lib.TreeShape((4, 4, 4))                                  # 85 nodes
  with pytest.raises(UserError, match='cache_size 64'):
    generate.Generator(cfg, cache_size=64, drafter=trained_drafter(cfg, 'heads', 3)[0],
                       tree=shape)
  with pytest.raises(UserError, match='needs a cache of'):
    tree_lib.check_fits(tree_lib.TreeShape((2, 2)), 20, 40, 64)
  with pytest.raises(UserError, match='draft_len'):
    generate.Generator(cfg, cache_size=64, drafter=drafters.NgramDrafter(2, cfg.vocab_size),
                       tree=tree_lib.TreeShape((2, 1, 1)))
  with pytest.raises(UserError, match='ngram, heads or mtp'):
    generate.Generator(cfg, cache_size=64, drafter=drafters.DraftModelDrafter(cfg, 2),
                       tree=tree_lib.TreeShape((2, 2)))


# ----------------------------------------------------------------------------
# The job's keys: cache margin, `tree`, the trace of rounds.
# ----------------------------------------------------------------------------

def test_cache_margin_is_the_tree_node_count():
  """A chain of k writes k + 1 slots past a row's end, a tree its node
  count: the cache (and the context check) must hold that many."""
  from specdec_jax import runs
  assert runs.cache_size(16, 100, 3, 1024) == 128                       # 16 + 100 + 4
  assert runs.cache_size(16, 100, 3, 1024, tree_nodes=21) == 256        # 16 + 100 + 21
  with pytest.raises(UserError, match="tree's 21 nodes needs a cache of 131 slots > the model "
                                      'context 128'):
    runs.cache_size(10, 100, 3, 128, tree_nodes=21)
  with pytest.raises(UserError, match="tree's 21 nodes it needs a cache of 131 > 128"):
    runs.cache_size(10, 100, 3, 1024, requested=128, tree_nodes=21)


def test_tree_key_values():
  assert tree_lib.parse('') is None and tree_lib.parse('chain') is None
  assert tree_lib.parse('auto') == 'auto'
  assert tree_lib.parse('4,2,1') == tree_lib.parse('4x2x1') == tree_lib.TreeShape((4, 2, 1))
  assert tree_lib.resolve('auto', 'ngram') == tree_lib.TreeShape((3, 1, 1))
  assert tree_lib.resolve('auto', 'mtp') == tree_lib.DynamicTree(4, 3, 2)
  assert tree_lib.label(tree_lib.TreeShape((2, 2, 1))) == '2x2x1'
  with pytest.raises(UserError, match='such as 4,2,1'):
    tree_lib.parse('wide')
  with pytest.raises(UserError, match='branching factor >= 1'):
    tree_lib.parse('2,0')
  assert tree_lib.resolve('2,2', 'ngram') == tree_lib.TreeShape((2, 2))    # a trie
  with pytest.raises(UserError, match='not draft_model'):
    tree_lib.resolve('2,2', 'draft_model')
  assert tree_lib.TreeShape((1000,) * 4).num_nodes > 10 ** 12          # counted, not built


def _replay(rounds, completion):
  """Walks the completion round by round: each round's accepted drafts are
  the next tokens, then one target token (the last round may be cut at the
  token limit). Returns where the last round began."""
  pos = start = 0
  for r in rounds:
    n = r['accepted']
    seg = completion[pos:pos + n]
    assert r['drafts'][:len(seg)] == seg and len(r['drafts']) >= n, (r, pos, completion)
    start, pos = pos, pos + n + 1
  assert start < len(completion) <= pos         # the last round may be cut at the limit
  return start


def _traced(cfg, params, prompts, drafter, dparams, shape, trace, **kw):
  gen = generate.Generator(cfg, cache_size=kw.pop('cache_size', 64), greedy=True,
                           drafter=drafter, tree=shape, trace=trace)
  keys = jax.random.split(jax.random.key(0), len(prompts))
  batch = generate.make_batch(prompts, batch_size=len(prompts), max_new_tokens=17, keys=keys,
                              bucket_len=kw.pop('bucket_len', 16))
  return generate.completions(gen.generate(params, batch, dparams), cfg.eos_id)


def test_trace_of_rounds_replays_the_completion(tiny):
  """Greedy, chain (the target drafting for itself: every draft accepted;
  a random mtp drafter: few) and tree (mtp): the trace's accepted drafts and
  one target token per round give the completion, one round per verify
  call. ngram's tree on a repetitive context (deep paths; it may abstain, so
  no replay): one round per verify call, the accepted path's drafts. Trace
  off (a chain and a tree): the same completions and no `rounds`."""
  cfg, params = tiny
  mtp, mtp_params = trained_drafter(cfg, 'mtp', 3)
  ar = run_tree(cfg, params, PROMPTS[:1], None, None, None)[0]
  loop = ar['prompt_ids'] + ar['completion_ids'] + ar['prompt_ids'][1:]
  cases = [
      ('self chain', PROMPTS, drafters.DraftModelDrafter(cfg, 3), params, None),
      ('mtp chain', PROMPTS, mtp, mtp_params, None),
      ('mtp tree', PROMPTS, mtp, mtp_params, tree_lib.TreeShape((2, 2, 1))),
      ('ngram tree', [loop], drafters.NgramDrafter(4, cfg.vocab_size), None,
       tree_lib.TreeShape((3, 1, 1, 1))),
  ]
  for name, prompts, d, dp, shape in cases:
    kw = dict(cache_size=96, bucket_len=32) if name == 'ngram tree' else {}
    on = _traced(cfg, params, prompts, d, dp, shape, True, **kw)
    if name in ('self chain', 'ngram tree'):   # each off run is another compile
      off = _traced(cfg, params, prompts, d, dp, shape, False, **kw)
      for r, plain in zip(on, off):
        assert 'rounds' not in plain
        assert {k: v for k, v in r.items() if k != 'rounds'} == plain, name
    for r in on:
      assert r['draft_calls'] == len(r['rounds']), name
      if name != 'ngram tree':        # ngram may abstain (plain steps are not rounds)
        assert r['draft_calls'] == r['target_calls'], name
        _replay(r['rounds'], r['completion_ids'] + [cfg.eos_id] * (r['finish_reason'] == 'eos'))
      for step in r['rounds']:
        assert len(step['drafts']) == (3 if shape is None else step['accepted']), name
    accepted = sum(s['accepted'] for r in on for s in r['rounds'])
    if name in ('self chain', 'ngram tree'):
      assert accepted >= 10, name


def test_trace_with_an_abstaining_drafter_omits_plain_steps(tiny):
  """ngram abstains where the context has no match: those steps are not
  rounds; the rounds recorded are the verify calls."""
  cfg, params = tiny
  d = drafters.NgramDrafter(2, cfg.vocab_size)
  for shape in (None, tree_lib.TreeShape((2, 1))):
    rows = _traced(cfg, params, [[2, 30, 31, 32, 33]] + REPETITIVE[:2], d, None, shape, True)
    for r in rows:
      assert len(r['rounds']) == r['draft_calls'] <= r['target_calls']
    assert any(r['draft_calls'] < r['target_calls'] for r in rows)


def _job(tmp_path, **overrides):
  from configs.generate import get_config
  from specdec_jax import jobs
  c = get_config()
  c.model, c.output, c.max_new_tokens = 'tiny', str(tmp_path / 'o.jsonl'), 12
  for key, value in overrides.items():
    c[key] = value
  summary = jobs.run(c)
  import json
  return summary, [json.loads(l) for l in (tmp_path / 'o.jsonl').read_text().splitlines()]


def test_job_tree_and_trace_keys(tmp_path):
  """`tree=3,1` with ngram: the same greedy completions as the chain, the
  summary names the tree; `trace=true` adds `rounds` to each line."""
  chain, chain_lines = _job(tmp_path / 'c', drafter='ngram', draft_len=2, dynamic=False)
  tree, lines = _job(tmp_path / 't', drafter='ngram', tree='3,1', trace=True)
  assert [l['completion_ids'] for l in lines] == [l['completion_ids'] for l in chain_lines]
  assert tree['tree'] == [3, 1] and tree['draft_len'] == 2 and not tree['dynamic']
  assert tree['verify_rows'] == 7 and chain['verify_rows'] == 3 and chain['tree'] is None
  assert all('rounds' in l for l in lines) and not any('rounds' in l for l in chain_lines)
  for l in lines:
    assert len(l['rounds']) == l['stats']['draft_calls']
