"""The Gemma 4 assistant (transformers' gemma4_assistant) as a drafter.

Follows the drafter protocol of drafters.py (init_state / draft /
draft_scored / commit); the network is models/gemma4_assistant.py. Each
round drafts k tokens under `lax.scan` (unrolled) from the round's TargetView: step 0
reads the target's final-normed hidden state that predicted the pending
token and the pending token's scaled target embedding; every step queries at
the pending token's position over the target's cache (positions < q), which
after a rollback holds exactly the accepted prefix. No state of its own.

Sampling is exact at any temperature: each draft is drawn from the warped
distribution q of the assistant's logits (the centroid head's masked tokens
have q = 0), and q is what the rejection sampler receives.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

from specdec_jax import sampling
from specdec_jax.drafters import Stateless
from specdec_jax.model import take_rows
from specdec_jax.models.gemma4_assistant import AssistantConfig, Gemma4Assistant


@dataclasses.dataclass(frozen=True)
class AssistantDrafter(Stateless):
  config: AssistantConfig
  draft_len: int

  def draft_scored(self, params, state, tokens, lengths, keys, batch, greedy, target):
    cfg = self.config
    t = cfg.target
    E = target.embedding                                                  # [V, D_t]
    scale = jnp.asarray(math.sqrt(t.embed_dim), t.jnp_dtype)
    embed = lambda tok: (take_rows(E, tok).astype(t.jnp_dtype) * scale)[:, None, :]
    q_pos = (lengths - 1)[:, None]                                        # the pending token
    kvs = tuple((target.cache.k[l], target.cache.v[l]) for l in cfg.target_layers)
    net = Gemma4Assistant(cfg)
    pending = jnp.take_along_axis(tokens, q_pos, axis=1)[:, 0]

    def step(carry, i):
      h, tok = carry
      h, logits = net.apply({'params': params}, embed(tok), h[:, None], q_pos, kvs)
      logits = logits[:, 0]                                               # [B, V]
      if greedy:
        nxt, probs = sampling.greedy(logits), None
        conf = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
      else:
        probs = sampling.warp(logits, batch.temperature, batch.top_k, batch.top_p)
        nxt = sampling.sample(jax.vmap(jax.random.fold_in, (0, None))(keys, i), probs)
        conf = jnp.max(probs, axis=-1)
      return (h[:, 0], nxt), (nxt, probs, conf)

    # Fully unrolled (k is small), as drafters.py does: as a loop XLA:CPU
    # copied the closed-over target embedding and cache into every step.
    _, (drafts, probs, conf) = jax.lax.scan(
        step, (target.hidden.astype(t.jnp_dtype), pending), jnp.arange(self.draft_len),
        unroll=True)
    return (drafts.T.astype(jnp.int32), None if greedy else probs.transpose(1, 0, 2),
            state, conf.T)
