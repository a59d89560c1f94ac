"""Input checks shared by the theory modules: each raises ValueError naming the argument."""

from __future__ import annotations

import numpy as np


def unit_interval(name: str, value) -> float:
    """A number in [0, 1] (a mixing weight, a gate threshold)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return value


def real_array(name: str, value, ndim: int) -> np.ndarray:
    """A float64 numpy copy of an array, list or torch tensor, with its dimension and finiteness checked."""
    if hasattr(value, "detach"):  # torch tensor; duck-typed so theory need not import torch here
        value = value.detach().cpu().double().numpy()
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a real array, got {type(value).__name__}") from e
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def positive_int(name: str, value) -> int:
    """A positive integer (a group size, a batch size); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)
