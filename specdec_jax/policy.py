"""Dynamic draft length: each round decides how many tokens to draft (0 = a
plain autoregressive step) from what each length costs on this hardware and
how likely the drafts are to be accepted.

    policy = DraftPolicy(ks=(0, 1, 2, 4, 8))                # static: compiled lengths
    knobs = PolicyParams.make(costs=[1, 1.09, 1.05, 1.3, 1.7], threshold=0.4)
    gen = Generator(cfg, cache_size, drafter=d, policy=policy)
    state = gen.generate(params, batch, drafter_params, knobs)

A round has two decisions, neither of which may look at the target's verdict
on the round's own drafts (that is what keeps sampling exact: the number of
drafts offered is a stopping time of the draft process, and every offered
draft still passes through the rejection sampler):

1. Before drafting (history): each row keeps a discounted count of drafts
   accepted and drafts tried; its acceptance rate alpha_b is their ratio,
   shrunk towards `prior`. A chain of k drafts then yields
   E_b(k) = 1 + alpha + ... + alpha^k tokens (capped by the row's remaining
   budget), and the row plans the k in `ks` maximising E_b(k) / cost(k),
   where cost(k) is the measured cost of a round with k drafts (drafting +
   one verify pass over k + 1 tokens) in units of one autoregressive step
   (cost(0) = 1). Rows that cannot draft (an abstaining ngram row) plan 0.
   The batch drafts the longest plan; each row offers at most its own, so a
   row's tokens do not depend on its batch. While a row takes plain steps its
   counts decay, so alpha returns to the prior and drafting is tried again.
2. After drafting (the drafter's confidence): a row offers its leading drafts
   whose confidence is at least `threshold` (HF's
   `assistant_confidence_threshold` rule), where the confidence of draft i is
   the peak of the distribution q_i it was drawn from. It must not be q_i(x_i),
   the drawn token's own probability: offering x_i only when q_i(x_i) is high
   makes the offered x_i follow q_i cut to its likely tokens rather than q_i,
   and the rejection sampler's output is then no longer the target's
   (tests/test_policy.py rejects that variant by chi-square). Greedy drafts
   are the argmax, where both are the same number. The verify
   pass runs at the smallest compiled length that covers every row's offer,
   and a row accepts at most its own offer (its other draft slots are
   masked). If no row offers anything the round is a plain step.

`ks`, the drafter and the sampling kind are static; costs, the threshold, the
prior and the decay are arrays, so a sweep over them never recompiles.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import statistics
import time
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from specdec_jax.errors import UserError

PRIOR_WEIGHT = 1.0   # how many tried drafts the prior counts for


@dataclasses.dataclass(frozen=True)
class DraftPolicy:
  """The draft lengths the loop may choose, ascending, starting at 0."""
  ks: Tuple[int, ...]

  def __post_init__(self):
    ks = self.ks
    if not ks or ks[0] != 0 or list(ks) != sorted(set(ks)) or len(ks) < 2:
      raise ValueError(f'policy ks must be ascending, distinct, start at 0 and hold a '
                       f'positive length, got {ks}')

  @property
  def max_k(self) -> int:
    return self.ks[-1]


def default_ks(draft_len: int) -> Tuple[int, ...]:
  """0, the powers of two below draft_len, and draft_len: 4 -> (0, 1, 2, 4)."""
  ks = {0, draft_len}
  p = 1
  while p < draft_len:
    ks.add(p)
    p *= 2
  return tuple(sorted(ks))


def parse_ks(text: str, draft_len: int) -> Tuple[int, ...]:
  """'' -> default_ks; '1,2,4' -> (0, 1, 2, 4): 0 (a plain step) is always
  allowed. UserError for a length outside 1..draft_len."""
  if not str(text).strip():
    return default_ks(draft_len)
  try:
    ks = sorted({int(x) for x in str(text).replace(' ', '').split(',') if x})
  except ValueError:
    raise UserError(f'policy_ks must be a comma-separated list of draft lengths, '
                    f'got {text!r}') from None
  bad = [k for k in ks if not 0 <= k <= draft_len]
  if bad:
    raise UserError(f'policy_ks {bad} outside 0..draft_len={draft_len}')
  ks = tuple(sorted(set(ks) | {0}))
  if len(ks) < 2:
    raise UserError('policy_ks needs at least one positive draft length')
  return ks


@struct.dataclass
class PolicyParams:
  """The policy's knobs, all arrays."""
  costs: jax.Array       # [n] float32: cost of a round with ks[i] drafts, in AR steps
  threshold: jax.Array   # [] float32: least drafter confidence a draft is offered at
  prior: jax.Array       # [] float32: acceptance rate assumed without evidence
  decay: jax.Array       # [] float32: per-round discount of the acceptance counts

  @classmethod
  def make(cls, costs: Sequence[float], threshold: float = 0.4, prior: float = 0.6,
           decay: float = 0.7) -> 'PolicyParams':
    check(costs, threshold, prior, decay)
    f = lambda x: jnp.asarray(x, jnp.float32)
    return cls(costs=f(costs), threshold=f(threshold), prior=f(prior), decay=f(decay))


def check(costs, threshold, prior, decay, ks=None):
  """UserError (one line) for settings out of range."""
  costs = [float(c) for c in costs]
  if ks is not None and len(costs) != len(ks):
    raise UserError(f'{len(costs)} costs for {len(ks)} draft lengths {tuple(ks)} '
                    '(one per length, 0 included)')
  if not all(c > 0 and c == c and c != float('inf') for c in costs):
    raise UserError(f'policy costs must be positive and finite, got {costs}')
  if not 0.0 <= threshold <= 1.0:
    raise UserError(f'confidence_threshold must be in [0, 1], got {threshold}')
  if not 0.0 < prior < 1.0:
    raise UserError(f'acceptance_prior must be in (0, 1), got {prior}')
  if not 0.0 <= decay < 1.0:
    raise UserError(f'acceptance_decay must be in [0, 1), got {decay}')


@struct.dataclass
class PolicyState:
  """Per-call policy state carried through the decode loop."""
  params: PolicyParams
  accepted: jax.Array    # [B] float32: discounted drafts accepted
  tried: jax.Array       # [B] float32: discounted drafts tried (accepted + first rejected)
  planned: jax.Array     # [n] int32: rounds whose batch drafted ks[i] tokens (0: none)
  verified: jax.Array    # [n] int32: rounds whose verify pass ran at ks[i] (0: plain steps)

  @classmethod
  def init(cls, params: PolicyParams, batch_size: int) -> 'PolicyState':
    n = params.costs.shape[0]
    z = jnp.zeros((batch_size,), jnp.float32)
    return cls(params=params, accepted=z, tried=z, planned=jnp.zeros((n,), jnp.int32),
               verified=jnp.zeros((n,), jnp.int32))

  def alpha(self):
    """[B] each row's estimated probability that a draft is accepted."""
    p = self.params
    a = (self.accepted + p.prior * PRIOR_WEIGHT) / (self.tried + PRIOR_WEIGHT)
    return jnp.clip(a, 0.0, 0.999)


def plan(policy: DraftPolicy, ps: PolicyState, live, can_draft, remaining):
  """[B] int32: each row's index into ks of the draft length with the most
  expected tokens per unit of round cost, from its own history alone (0 for
  rows that are done or cannot draft). live, can_draft [B] bool; remaining
  [B] int32 tokens the row may still emit. The batch drafts the longest of
  these; a row offers at most its own, so its output does not depend on
  which rows share its batch (or device)."""
  ks = jnp.asarray(policy.ks, jnp.float32)                                # [n]
  a = ps.alpha()[:, None]                                                 # [B, 1]
  chain = (1.0 - a ** (ks[None, :] + 1.0)) / (1.0 - a)                    # [B, n]
  chain = jnp.minimum(chain, jnp.maximum(remaining, 1)[:, None].astype(jnp.float32))
  value = chain / ps.params.costs[None, :]                                # [B, n]
  # Ties go to the shorter length (argmax takes the first).
  best = jnp.argmax(value, axis=1).astype(jnp.int32)
  return jnp.where(live & can_draft, best, 0)


def offers(conf, threshold, row_k):
  """[B] drafts each row offers: its leading drafts with confidence >= the
  threshold, at most row_k [B] (its own planned length; 0 = none).
  conf [B, K] (0 past the drafted length)."""
  K = conf.shape[1]
  ok = (conf >= threshold) & (jnp.arange(K)[None, :] < row_k[:, None])
  return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def verify_index(policy: DraftPolicy, offered):
  """Index of the smallest compiled length covering max(offered) (0: none)."""
  m = jnp.max(offered)
  ks = jnp.asarray(policy.ks, jnp.int32)
  return jnp.argmax(ks >= m).astype(jnp.int32)


def update(ps: PolicyState, planned_idx, verify_idx, offered, n_accepted):
  """After a round: discount, then count drafts accepted and tried per row.

  A row that offered m drafts and had n accepted tried n + 1 of them when
  n < m (the first rejection ends the chain) and n when all passed.
  """
  d = ps.params.decay
  tried = jnp.where(offered > 0, n_accepted + (n_accepted < offered), 0)
  return ps.replace(
      accepted=ps.accepted * d + jnp.where(offered > 0, n_accepted, 0),
      tried=ps.tried * d + tried,
      planned=ps.planned.at[planned_idx].add(1),
      verified=ps.verified.at[verify_idx].add(1))


def summary(policy: DraftPolicy, ps: PolicyState) -> dict:
  """Rounds by drafted and by verified length, for the job summary (pmap's
  per-device counters are summed)."""
  n = len(policy.ks)
  count = lambda x: np.asarray(jax.device_get(x)).reshape(-1, n).sum(0).tolist()
  planned, verified = count(ps.planned), count(ps.verified)
  return {'draft_lens': list(policy.ks),
          'rounds_by_drafted_len': dict(zip(map(str, policy.ks), planned)),
          'rounds_by_verified_len': dict(zip(map(str, policy.ks), verified)),
          'plain_steps': verified[0]}


# ---------------------------------------------------------------- measured costs

def measure_costs(gen, params, state, drafter_params, repeats: int = 7):
  """costs[i] for gen.policy.ks: (draft ks[i] tokens + verify ks[i] + 1) / (one
  autoregressive step), timed on this hardware with `state` (after prefill).

  Every variant runs once per repeat, interleaved (this VM drifts by tens of
  percent between sequential runs); medians are compared.
  """
  ks = gen.policy.ks
  fns = []
  for k in ks:
    drafts = jnp.zeros((state.tokens.shape[0], k), jnp.int32)
    verify = lambda d=drafts: gen.verify_part(params, state, d)
    if k == 0:
      fns.append([verify])
    else:
      draft = lambda k=k: gen.draft_part(params, state, drafter_params, k)
      fns.append([draft, verify])
  for parts in fns:                      # compile and warm up
    for f in parts:
      jax.block_until_ready(f())
  times = [[] for _ in ks]
  for _ in range(repeats):
    for i, parts in enumerate(fns):
      t0 = time.perf_counter()
      for f in parts:
        jax.block_until_ready(f())
      times[i].append(time.perf_counter() - t0)
  med = [statistics.median(t) for t in times]
  return [m / med[0] for m in med]


def cost_key(*parts) -> str:
  """A cache key for costs: the device (CPU model and flags), jax, and what
  is compiled (the Generator's repr holds the model, cache, drafter, ks)."""
  from specdec_jax.precision import cpu_info
  dev = jax.devices()[0]
  name, flags = cpu_info() if dev.platform == 'cpu' else ('', ())
  text = json.dumps([getattr(dev, 'device_kind', dev.platform), name, sorted(flags),
                     jax.__version__, [repr(p) for p in parts]])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_costs(key: str, measure, cache_dir: pathlib.Path):
  """Costs cached per key under cache_dir (measured once per compiled setup)."""
  path = cache_dir / f'costs-{key}.json'
  try:
    return json.loads(path.read_text())['costs'], True
  except (OSError, ValueError, KeyError):
    pass
  costs = measure()
  cache_dir.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f'.{os.getpid()}.tmp')   # per process: several may measure at once
  tmp.write_text(json.dumps({'costs': costs}))
  tmp.replace(path)
  return costs, False
