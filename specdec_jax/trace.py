"""The trace of rounds: which drafts each verify round offered and accepted.

`Generator(trace=True)` keeps a `Trace` in its DecodeState (absent otherwise,
so the default program is unchanged) and the job writes it per output line
(`--config.trace=true`) as

    "rounds": [{"drafts": [ids], "accepted": n}, ...]

one entry per verify round of the row, in order: the drafts the row offered
(a chain: its k drafts, fewer where the dynamic policy offered fewer; a tree:
the accepted path's n drafts) and how many the target accepted. Rounds where
the drafter abstained (plain autoregressive steps) are not recorded, so for a
drafter that never abstains the completion is, round by round, the accepted
drafts followed by one target token (the correction or the bonus token).

The decode loop runs on device, so the buffers have a fixed size: a row runs
at most one round per token it holds, hence `cache_size` rounds.
"""
from typing import List

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class Trace:
  drafts: jax.Array      # [B, R, k] int32: offered drafts per verify round; -1 = none
  accepted: jax.Array    # [B, R] int32: drafts the target accepted in that round
  rounds: jax.Array      # [B] int32: verify rounds recorded per row

  @classmethod
  def init(cls, batch_size: int, max_rounds: int, draft_len: int) -> 'Trace':
    return cls(drafts=jnp.full((batch_size, max_rounds, draft_len), -1, jnp.int32),
               accepted=jnp.zeros((batch_size, max_rounds), jnp.int32),
               rounds=jnp.zeros((batch_size,), jnp.int32))


def record(t: Trace, drafts, offered, accepted, verified) -> Trace:
  """Appends one round for the rows in `verified` [B] bool.

  drafts [B, k'] (k' <= the trace's k), offered [B] drafts each row offered
  (the rest are stored as -1), accepted [B]."""
  B, R, K = t.drafts.shape
  k = drafts.shape[1]
  slot = jnp.arange(K)
  drafts = jnp.pad(drafts, [(0, 0), (0, K - k)], constant_values=-1)
  drafts = jnp.where(slot[None] < offered[:, None], drafts, -1)              # [B, K]
  rows = jnp.arange(B)
  at = jnp.minimum(t.rounds, R - 1)
  return t.replace(
      drafts=t.drafts.at[rows, at].set(jnp.where(verified[:, None], drafts, t.drafts[rows, at])),
      accepted=t.accepted.at[rows, at].set(jnp.where(verified, accepted, t.accepted[rows, at])),
      rounds=t.rounds + verified.astype(jnp.int32))


def rows(t: Trace) -> List[List[dict]]:
  """Per batch row: [{'drafts': [ids], 'accepted': n}, ...] (host lists)."""
  drafts, accepted = np.asarray(t.drafts), np.asarray(t.accepted)
  out = []
  for b, n in enumerate(np.asarray(t.rounds).tolist()):
    out.append([{'drafts': [int(x) for x in drafts[b, r] if x >= 0],
                 'accepted': int(accepted[b, r])} for r in range(n)])
  return out
