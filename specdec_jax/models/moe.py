"""A routed mixture-of-experts GeGLU block (Gemma 4's, beside its dense MLP).

Routing, as transformers 5.24's Gemma4TextRouter: RMS-norm the router input
without a scale, multiply by a learned scale and 1/sqrt(D), project to E
expert scores, softmax (float32), keep the top k, renormalise them to sum to
one, then multiply each by its expert's learned `per_expert_scale`.

Dispatch: the B*T*k (token, expert) assignments are sorted by expert and run
as two grouped matmuls (`lax.ragged_dot_general`), so each expert's weights
are read once per call whatever the number of tokens routed to it, and no
[tokens, k, F, D] weight gather is materialised. Outputs are weighted and
summed back per token with a scatter-add.

Dimension letters: R rows (B * T), D embed, E experts, F expert width,
A = R * k assignments.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from specdec_jax.model import linear, rms_norm

# lhs [A, I] (ragged over A by expert) x rhs [E, O, I] -> [A, O]: weights stay
# in the [out, in] layout of every other matrix here (and of the checkpoints).
_RAGGED = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((1,), (2,)), ((), ())),
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def grouped_matmul(x, w, group_sizes):
  """x [A, I] sorted by group, w [E, O, I], group_sizes [E] -> [A, O].

  bf16 weights multiply as bf16 x bf16 accumulated in float32 (as
  `model.matmul`)."""
  if w.dtype == jnp.float32:
    return jax.lax.ragged_dot_general(x.astype(w.dtype), w, group_sizes, _RAGGED)
  out = jax.lax.ragged_dot_general(x.astype(w.dtype), w, group_sizes, _RAGGED,
                                   preferred_element_type=jnp.float32)
  return out.astype(x.dtype)


def route(x, scale, w_router, per_expert_scale, top_k: int, eps: float):
  """x [R, D] -> (weights [R, k], expert ids [R, k])."""
  D = x.shape[-1]
  h = rms_norm(x, jnp.float32(1.0), eps) * scale.astype(x.dtype) * jnp.asarray(D ** -0.5, x.dtype)
  # Scores in float32 whatever the weights' dtype: routing is discrete, and
  # bf16-rounded inputs flip near-tied top-k choices (the [E, D] upcast is
  # cheap next to the experts).
  probs = jax.nn.softmax(linear(h.astype(jnp.float32), w_router.astype(jnp.float32)),
                         axis=-1)                                           # [R, E]
  weights, experts = jax.lax.top_k(probs, top_k)                            # [R, k]
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights * per_expert_scale.astype(jnp.float32)[experts], experts


class MoE(nn.Module):
  embed_dim: int
  num_experts: int
  top_k: int
  hidden_dim: int
  eps: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, router_in, x):
    """router_in, x [B, T, D] -> [B, T, D]: experts chosen from `router_in`,
    applied to `x`."""
    D, E, F, k = self.embed_dim, self.num_experts, self.hidden_dim, self.top_k
    pd = self.param_dtype
    init = lambda fan_in: nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
    w_router = self.param('router', init(D), (E, D), pd)
    scale = self.param('router_scale', nn.initializers.ones, (D,), jnp.float32)
    per_expert = self.param('per_expert_scale', nn.initializers.ones, (E,), jnp.float32)
    w_gate_up = self.param('experts_gate_up', init(D), (E, 2 * F, D), pd)   # [gate; up]
    w_down = self.param('experts_down', init(F), (E, D, F), pd)

    lead = x.shape[:-1]
    xr = x.reshape(-1, D)                                                   # [R, D]
    weights, experts = route(router_in.reshape(-1, D), scale, w_router, per_expert,
                             k, self.eps)
    flat = experts.reshape(-1)                                              # [A]
    order = jnp.argsort(flat, stable=True)
    token = order // k                                                      # [A] row of each
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)                  # [E]
    gate, up = jnp.split(grouped_matmul(xr[token], w_gate_up, sizes), 2, axis=-1)
    y = grouped_matmul(jax.nn.gelu(gate, approximate=True) * up, w_down, sizes)   # [A, D]
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    out = jnp.zeros_like(xr).at[token].add(y)
    return out.reshape(*lead, D)
