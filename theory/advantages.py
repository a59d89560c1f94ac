"""Advantage estimators: rewards of grouped samples -> one advantage per sample.

Every estimator takes `rewards` of shape [B], with B = n_groups * group_size and the samples of one
prompt stored contiguously (rows g*G .. g*G+G-1), and returns advantages of shape [B] in float64
whatever the rewards' dtype (float32 rewards near 3e38 would overflow in their own dtype; lists and
integers are read as float64). Registry `ADVANTAGES` maps a name to the function; `compute(name, ...)`
validates.

| name         | A_i                                              | used by                        |
|--------------|--------------------------------------------------|--------------------------------|
| `one`        | 1                                                | SFT (every demonstration +1)   |
| `raw`        | r_i                                              | REINFORCE with +-1 rewards     |
| `group_mean` | r_i - mean_g r                                   | Dr. GRPO, HPT released code    |
| `group_norm` | (r_i - mean_g r) / (std_g r + eps)               | GRPO, DAPO, GSPO, LUFFY, SRFT  |
| `batch_norm` | (r_i - mean_g r) / (std_batch(r - mean_g) + eps) | REINFORCE++-baseline, Lite PPO |
| `rloo`       | r_i - mean_{j != i in g} r_j                     | RLOO                           |
| `given`      | the advantages passed in (GAE etc.)              | PPO                            |

Conventions (those of TRL and verl): std is Bessel-corrected (unbiased=True) by default; a group of
one sample has std 1 (verl) and a leave-one-out baseline of 0. A group whose rewards are all equal
gets advantage exactly 0 in every estimator that centres, whatever floating-point residue the mean
would leave (NeMo-RL #4161 is the bug this prevents).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from theory._checks import positive_int

Tensor = torch.Tensor


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    return rewards.reshape(-1, group_size)


def _centred(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """r - mean per group, and a [n_groups, G] flag of constant groups (set to exactly zero)."""
    g = _groups(rewards, group_size)
    constant = (g.max(dim=1, keepdim=True).values == g.min(dim=1, keepdim=True).values).expand_as(g)
    centred = torch.where(constant, torch.zeros_like(g), g - g.mean(dim=1, keepdim=True))
    return centred, constant


def _std(x: Tensor, unbiased: bool, dim=None) -> Tensor:
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2:  # verl's convention for a singleton group: std 1
        return torch.ones((), dtype=x.dtype) if dim is None else torch.ones_like(x.mean(dim, keepdim=True))
    if dim is None:
        return x.std(unbiased=unbiased)
    return x.std(dim=dim, keepdim=True, unbiased=unbiased)


def one(rewards: Tensor, group_size: int, **_) -> Tensor:
    return torch.ones_like(rewards)


def raw(rewards: Tensor, group_size: int, **_) -> Tensor:
    return rewards.clone()


def group_mean(rewards: Tensor, group_size: int, **_) -> Tensor:
    return _centred(rewards, group_size)[0].reshape(-1)


def group_norm(rewards: Tensor, group_size: int, std_eps: float = 1e-6, std_unbiased: bool = True,
               **_) -> Tensor:
    centred, constant = _centred(rewards, group_size)
    std = _std(_groups(rewards, group_size), std_unbiased, dim=1)
    out = centred / (std + std_eps)
    return torch.where(constant, torch.zeros_like(out), out).reshape(-1)


def batch_norm(rewards: Tensor, group_size: int, std_eps: float = 1e-6, std_unbiased: bool = True,
               **_) -> Tensor:
    centred, _ = _centred(rewards, group_size)
    centred = centred.reshape(-1)
    if bool((centred == 0).all()):
        return centred
    return centred / (_std(centred, std_unbiased) + std_eps)


def rloo(rewards: Tensor, group_size: int, **_) -> Tensor:
    if group_size < 2:
        return raw(rewards, group_size)
    # r_i - (sum_g - r_i)/(G-1) = G/(G-1) * (r_i - mean_g)
    return group_mean(rewards, group_size) * (group_size / (group_size - 1))


def given(rewards: Tensor, group_size: int, **_) -> Tensor:
    raise ValueError("advantage 'given': this estimator takes its advantages from the caller; "
                     "pass advantages=... to loss() instead of calling advantages()")


ADVANTAGES: dict[str, Callable[..., Tensor]] = {
    "one": one,
    "raw": raw,
    "group_mean": group_mean,
    "group_norm": group_norm,
    "batch_norm": batch_norm,
    "rloo": rloo,
    "given": given,
}


def compute(name: str, rewards, group_size: int, **options) -> Tensor:
    """Validate and dispatch. `rewards`: [B] (tensor or array-like); `group_size` divides B. float64 out."""
    if not isinstance(name, str) or name not in ADVANTAGES:
        raise ValueError(f"advantage: unknown estimator {name!r}; valid: {sorted(ADVANTAGES)}")
    if not isinstance(rewards, Tensor):  # through numpy: torch.as_tensor would read a list as float32
        try:
            rewards = torch.from_numpy(np.array(rewards, dtype=np.float64))
        except (TypeError, ValueError):
            raise ValueError(f"rewards: expected a tensor or a numeric array, got {type(rewards).__name__}") from None
    rewards = rewards.to(torch.float64)  # a no-op for float64 rewards: their numbers do not change
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape [B], got {tuple(rewards.shape)}")
    group_size = positive_int("group_size", group_size)
    if rewards.numel() % group_size:
        raise ValueError(f"group_size: B={rewards.numel()} rewards are not divisible by group_size={group_size}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards: contains NaN or infinite values")
    std_eps, unbiased = options.get("std_eps", 1e-6), options.get("std_unbiased", True)
    if isinstance(std_eps, bool) or not isinstance(std_eps, (int, float)) or not (0 <= std_eps < math.inf):
        raise ValueError(f"std_eps: expected a finite non-negative number, got {std_eps!r}")
    if not isinstance(unbiased, (bool, np.bool_)):
        raise ValueError(f"std_unbiased: expected a bool, got {unbiased!r}")
    return ADVANTAGES[name](rewards, group_size, **options)
