"""Timing and the Leviathan et al. model, shared by the jobs and the benchmarks."""
import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int = 10) -> float:
  """Median wall time of fn(*args) over `repeats` runs after one warm-up
  (which compiles); waits for the device each time."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def fit_alpha(tokens_per_call: float, k: int):
  """α with (1 - α^(k+1)) / (1 - α) = tokens per call, by bisection (None for k = 0)."""
  if k == 0:
    return None
  lo, hi = 0.0, 1.0
  for _ in range(60):
    mid = (lo + hi) / 2
    if sum(mid ** i for i in range(k + 1)) < tokens_per_call:
      lo = mid
    else:
      hi = mid
  return lo


def predicted_speedup(alpha: float, k: int, c: float, v: float,
                      verify_fraction: float = 1.0) -> float:
  """Leviathan et al.: expected tokens per round / cost of a round in AR steps
  (k drafts at c each, one verify pass at v). With a drafter that abstains,
  a fraction 1 - f of the target calls are plain AR steps (1 token, cost 1):
  (f E + 1 - f) / (f (k c + v) + 1 - f), E the expected tokens per verify."""
  tokens = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
  f = verify_fraction
  return (f * tokens + 1 - f) / (f * (k * c + v) + 1 - f)
