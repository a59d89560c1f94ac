"""Advantage estimators: rewards of grouped samples -> one advantage per sample.

Every estimator takes `rewards` of shape [B], with B = n_groups * group_size and the samples of one
prompt stored contiguously (rows g*G .. g*G+G-1), and returns advantages of shape [B] in float64
whatever the rewards' dtype (float32 rewards near 3e38 would overflow in their own dtype; lists and
integers are read as float64). Registry `ADVANTAGES` maps a name to the function; `compute(name, ...)`
validates. `lengths` [B] (each row's number of valid tokens) is read only by the token-weighted
`group_center_token_whiten_verl`, which requires it.

| name                             | A_i                                          | matches                         |
|----------------------------------|----------------------------------------------|---------------------------------|
| `one`                            | 1                                            | SFT (every demonstration +1)    |
| `raw`                            | r_i                                          | REINFORCE with +-1 rewards      |
| `group_mean`                     | c_i = r_i - mean_g r                         | Dr. GRPO, HPT released code     |
| `group_norm`                     | c_i / (std_g r + eps)                        | GRPO, DAPO, GSPO, LUFFY, SRFT   |
| `group_center_batch_std_trl`     | c_i / (std_batch r + eps), raw rewards' std  | TRL scale_rewards="batch"       |
| `group_center_token_whiten_verl` | c_i whitened over tokens (below)             | verl reinforce_plus_plus_baseline |
| `rloo`                           | r_i - mean_{j != i in g} r_j                 | RLOO                            |
| `given`                          | the advantages passed in (GAE etc.)          | PPO                             |

`group_center_batch_std_trl` (TRL 1.16 `GRPOTrainer`, `scale_rewards="batch"`): the group-centred
reward divided by the Bessel std of the raw rewards of the whole batch (all groups; in TRL all
processes), plus eps. TRL's eps is 1e-4: set `std_eps=1e-4` to match it.

`group_center_token_whiten_verl` (verl 0.9.1 `compute_reinforce_plus_plus_baseline_outcome_advantage`
and `verl.utils.torch_functional.masked_whiten`): c_i = r_i - mean_g r (a group of one sample has mean
0, so c_i = r_i there), then every valid token of row i carries c_i and the batch is whitened over
tokens: with L_i = lengths[i] and N = sum L_i,

    mu_tok = sum_i L_i c_i / (N + 1e-8),   var_tok = sum_i L_i (c_i - mu_tok)^2 / (N + 1e-8) * N / (N - 1),
    A_i = (c_i - mu_tok) / sqrt(var_tok + 1e-8)     (0 for a row with no valid token).

A long response weighs more in mu_tok and var_tok than a short one. The constants 1e-8 are verl's;
`std_eps` does not enter; `std_unbiased=False` drops the factor N / (N - 1). verl refuses N < 2, and so
does ptlab.

Conventions: std is Bessel-corrected (unbiased=True) by default, as in TRL and verl. A group whose
rewards are all equal gets advantage exactly 0 in every estimator that centres, whatever
floating-point residue the mean would leave (NeMo-RL #4161 is the bug this prevents); TRL and verl
compute r - mean and keep that residue.

Group size 1 (a singleton group) differs between the libraries. ptlab's `group_mean` and `group_norm`
give 0 (a singleton is a constant group), as TRL does (its mean is the reward itself). verl's `grpo`
estimator gives a singleton mean 0 and std 1, so A = r / (1 + eps) (A = r without std); ptlab does not
follow that. verl's and ptlab's `rloo` give r (baseline 0); `group_center_token_whiten_verl` follows
verl (c = r before whitening).
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
    if n < 2:  # one sample: std 1 (its centred value is 0 anyway; this avoids 0 / 0)
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


def group_center_batch_std_trl(rewards: Tensor, group_size: int, std_eps: float = 1e-6,
                               std_unbiased: bool = True, **_) -> Tensor:
    centred, _ = _centred(rewards, group_size)
    centred = centred.reshape(-1)
    if bool((centred == 0).all()):  # every group constant (std_eps = 0 would give 0 / 0)
        return centred
    return centred / (_std(rewards, std_unbiased) + std_eps)


def group_center_token_whiten_verl(rewards: Tensor, group_size: int, lengths: Tensor | None = None,
                                   std_unbiased: bool = True, **_) -> Tensor:
    if lengths is None:
        raise ValueError("lengths: required by advantage 'group_center_token_whiten_verl' (verl whitens over "
                         "tokens): pass each row's number of valid tokens, shape [B]")
    L = lengths
    N = float(L.sum())
    if N < 2:  # verl's masked_var refuses a mask with fewer than 2 tokens
        raise ValueError(f"lengths: advantage 'group_center_token_whiten_verl' needs at least 2 valid tokens in "
                         f"the batch (verl's masked_var), got {N:g}")
    # verl: a singleton group has mean 0 (c = r); otherwise r - mean (exactly 0 for a constant group)
    c = rewards.clone() if group_size == 1 else _centred(rewards, group_size)[0].reshape(-1)
    mu = (L * c).sum() / (N + 1e-8)
    var = (L * (c - mu) ** 2).sum() / (N + 1e-8)
    if std_unbiased:
        var = var * (N / (N - 1))
    out = (c - mu) / torch.sqrt(var + 1e-8)
    return torch.where(L > 0, out, torch.zeros_like(out))


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
    "group_center_batch_std_trl": group_center_batch_std_trl,
    "group_center_token_whiten_verl": group_center_token_whiten_verl,
    "rloo": rloo,
    "given": given,
}


def compute(name: str, rewards, group_size: int, lengths=None, **options) -> Tensor:
    """Validate and dispatch. `rewards`: [B] (tensor or array-like); `group_size` divides B; `lengths`:
    [B] valid-token counts (read by `group_center_token_whiten_verl` only). float64 out."""
    if not isinstance(name, str) or name not in ADVANTAGES:
        raise ValueError(f"advantage: unknown estimator {name!r}; valid: {sorted(ADVANTAGES)}")
    rewards = _float64("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected shape [B], got {tuple(rewards.shape)}")
    group_size = positive_int("group_size", group_size)
    if rewards.numel() % group_size:
        raise ValueError(f"group_size: B={rewards.numel()} rewards are not divisible by group_size={group_size}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards: contains NaN or infinite values")
    if lengths is not None:
        lengths = _float64("lengths", lengths)
        if lengths.shape != rewards.shape:
            raise ValueError(f"lengths: expected shape [B]=[{rewards.numel()}] (one count per reward), "
                             f"got {tuple(lengths.shape)}")
        if not bool((torch.isfinite(lengths) & (lengths >= 0)).all()):
            raise ValueError("lengths: expected finite token counts >= 0")
    std_eps, unbiased = options.get("std_eps", 1e-6), options.get("std_unbiased", True)
    if isinstance(std_eps, bool) or not isinstance(std_eps, (int, float)) or not (0 <= std_eps < math.inf):
        raise ValueError(f"std_eps: expected a finite non-negative number, got {std_eps!r}")
    if not isinstance(unbiased, (bool, np.bool_)):
        raise ValueError(f"std_unbiased: expected a bool, got {unbiased!r}")
    return ADVANTAGES[name](rewards, group_size, lengths=lengths, **options)


def _float64(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):  # through numpy: torch.as_tensor would read a list as float32
        try:
            x = torch.from_numpy(np.array(x, dtype=np.float64))
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a tensor or a numeric array, got {type(x).__name__}") from None
    return x.to(torch.float64)  # a no-op for float64: the numbers do not change
