"""Statistics helpers shared by ``ddpo eval`` and the sweep summary (numpy only)."""
from __future__ import annotations

import math

import numpy as np


def mean_se(values) -> dict:
    """Mean, standard error of the mean (sample std / sqrt(n); 0 for n = 1) and n of finite values."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return {"mean": None, "se": None, "n": 0}
    se = float(array.std(ddof=1) / math.sqrt(array.size)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "se": se, "n": int(array.size)}


def significant(change: dict, sign: int, threshold: float) -> bool:
    """Whether a paired change is clearly above 0 (sign=+1) or below 0 (sign=-1): ``|mean| > threshold * se``."""
    return change["mean"] is not None and sign * change["mean"] > 0 and abs(change["mean"]) > threshold * change["se"]


def fmt(stat: dict, signed: bool = False) -> str:
    """``mean ± se`` of a :func:`mean_se` result (``-`` when there is no value)."""
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:{'+' if signed else ''}.4g} ± {stat['se']:.2g}"
