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


def real_array(name: str, value, ndim: int, copy: bool = True, finite: bool = True) -> np.ndarray:
    """A float64 numpy array of an array, list or torch tensor, with its dimension and finiteness checked.

    copy=True returns a private copy. copy=False returns a read-only view of ``value`` when it already is
    float64 on the CPU (a large matrix such as ``G`` is not duplicated; the caller must not change it while
    the view is in use), and a read-only converted array otherwise. finite=False leaves the finiteness
    check to a caller that reads it off a reduction it computes anyway.
    """
    if hasattr(value, "detach"):  # torch tensor; duck-typed so theory need not import torch here
        value = value.detach().cpu().double().numpy()
    try:
        arr = np.array(value, dtype=np.float64) if copy else np.asarray(value, dtype=np.float64).view()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a real array, got {type(value).__name__}") from e
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if finite and not all_finite(arr):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if not copy:
        arr.flags.writeable = False  # the view must never write into the caller's array
    return arr


def all_finite(arr: np.ndarray, block: int = 1 << 16) -> bool:
    """True when no entry is NaN or infinite. Checked a slice at a time, so the boolean temporary is one
    slice long, not the size of the array (a 64 x 1e6 G would need a 64 MB mask)."""
    if arr.ndim > 1 and not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        return all(all_finite(a, block) for a in arr)  # a strided view: one sub-array at a time, no full copy
    flat = arr.ravel(order="K")  # a view of contiguous memory
    return all(np.isfinite(flat[i:i + block]).all() for i in range(0, flat.size, block))


def positive_int(name: str, value) -> int:
    """A positive integer (a group size, a batch size); bools are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)
