"""Chi-square 0.999 quantiles without scipy (Wilson–Hilferty, <1% error for dof >= 3)."""
import math

_EXACT = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}


def chi2_quantile_999(dof: int) -> float:
  if dof in _EXACT:
    return _EXACT[dof]
  z = 3.0902  # standard normal 0.999 quantile
  return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
