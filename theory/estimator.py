"""The Unified Policy Gradient Estimator (UPGE) of the HPT paper (arXiv 2509.04419, Eq. 6).

    grad = 1_stable * (1 / pi_ref) * A * grad pi_theta  =  1_stable * (pi_theta / pi_ref) * A * grad log pi_theta

An estimator is the four parts plus an aggregation over tokens and sequences:

- `reference` (the denominator pi_ref): `policy` (pi_ref = pi_theta: grad log pi), `old`
  (pi_ref = pi_old: the PPO ratio), `one` (pi_ref = 1: grad pi), `behaviour` (pi_ref = pi_beta, from
  `behaviour_logp`), `sequence_geometric` (GSPO: pi_theta / pi_ref = (pi_theta / pi_old)^(1/|y|) per
  sequence, the same value on each token of the sequence).
- `advantage`: a name from `theory.advantages.ADVANTAGES`.
- `mask` (1_stable): `none`, `ppo_clip` (eps_low, eps_high), `dual_clip` (PPO clip plus the cap c for
  A < 0), `cispo` (no mask; the weight is the clipped ratio, stop-gradient), `sequence_clip` (PPO clip
  on GSPO's sequence ratio), `sapo` (SAPO's soft gate 4/tau sigmoid(tau (rho - 1)): weight
  4 s (1 - s) rho A), `vespo` (VESPO's stop-gradient gamma weight phi(w) of the sequence product ratio).
  Extra masks multiply value and weight: TRL's off-policy sequence mask (`off_policy_mask_threshold`), its
  top-entropy token mask (`top_entropy_quantile`, needs `entropy`), and the rollout importance correction
  (`rollout_correction`: pi_old / pi_rollout per token or sequence, truncated or masked to
  [rollout_is_min, rollout_is_max], needs `rollout_logp`).
- KL to a reference (`kl_coef` > 0, needs `ref_logp`): `kl_estimator` k1 / k2 / k3 / low_var_kl, placed in
  the loss (aggregated by the policy's weights or by the global token count, optionally times the ratio:
  TRL's bias correction) or in the reward (`kl_rewards`); `KL_STYLES` holds TRL's and verl's defaults.
  theory/README.md section 1.8 has the formulas and their gradients.
- `shaping` of the likelihood gradient: `none`, or `luffy`: f(pi) = pi / (pi + gamma), so that
  grad f(pi) = gamma / (pi + gamma)^2 * grad pi.
- `aggregation` (the weights a_{i,t} with loss = sum a * l; M is the token mask, L_i = sum_t M_it,
  S the number of sequences (`num_seqs`; by default B, or with `count_empty_rows=False` the number of
  rows with at least one valid token), L a constant length (`max_length`, default T)):

  | name                      | a_{i,t}            | matches                                               |
  |---------------------------|--------------------|-------------------------------------------------------|
  | `token_mean`              | M / sum M          | verl token-mean (local), TRL bnpo                     |
  | `global_token_mean`       | M / num_items      | verl token-mean (global), TRL dapo                    |
  | `seq_mean_token_mean`     | M / (S L_i)        | verl seq-mean-token-mean, TRL grpo                    |
  | `seq_mean_token_sum`      | M / S              | verl seq-mean-token-sum                               |
  | `seq_mean_token_sum_norm` | M / (S L)          | verl seq-mean-token-sum-norm (verl 0.9.1, since 2026-02) |
  | `batch_token_sum_norm`    | M / (S L)          | TRL dr_grpo (the same weights as the line above)      |
  | `token_sum_norm`          | M / L              | verl seq-mean-token-sum-norm before 2026-02 (no 1/S); |
  |                           |                    | the HPT and LUFFY released code (`hpt_code`)          |

  Empty rows (no valid token): TRL and verl's trainer (global_batch_size = mini-batch size x n)
  count them in S, as ptlab does by default; verl's `agg_loss` called without a global batch size
  counts only non-empty rows in its seq-mean modes, which is `count_empty_rows=False`. A batch whose
  rows are all empty then has S = 1 (a zero loss) where verl divides 0 by 0.

Demonstration rows (`is_demo`, for LUFFY and SRFT) use `demo_reference` and `demo_shaping` instead of
`reference` and `shaping`, and are never masked, as in both methods' code.

The loss is built so that its gradient with respect to `logp` is exactly `-coefficients`:

    loss = sum_{i,t} a_{i,t} * ( sg(l_{i,t}) - sg(w_{i,t}) * (logp_{i,t} - sg(logp_{i,t})) )

where l is the method's per-token loss value (e.g. -min(rho A, clip(rho) A)) and w = 1_stable *
(pi_theta/pi_ref) * A * shaping' its UPGE weight. The value of the loss is therefore the method's
loss, and the gradient is the UPGE estimate with no tie-breaking ambiguity at the clip boundaries.
The tests check both against plain-loop references written from the papers and libraries
(tests/theory/test_estimator.py).

Numerics: log-ratios are clamped to [-log_ratio_clamp, log_ratio_clamp] = [-20, 20] before
exponentiation (verl's guard); GSPO clamps each token's log-ratio before the sequence mean (verl
clamps none there). Beyond the clamp ptlab holds the ratio at e^{+-20} in both the loss value and
the weight w (a truncated importance weight; `clamp_gradient="keep"`, the default). verl clamps
inside autograd, so there the gradient through the ratio is zero beyond the clamp:
`clamp_gradient="zero"` gives that (w = 0 where |log-ratio| > log_ratio_clamp; CISPO's weight is a
stop-gradient in both libraries and is not affected). verl's GSPO also caps the sequence log-ratio at
10 from above, inside autograd: `sequence_log_ratio_max=10.0` (reference `sequence_geometric` only;
default None, no cap), with `clamp_gradient` deciding the gradient beyond the cap. TRL clamps no
ratio (theory/README.md 1.6). Masked positions are replaced by 0 before any arithmetic, so a fully
masked row contributes exactly nothing. Inputs in
float16 or bfloat16 are computed in float32 (exp(20) overflows float16), so `loss` and `coefficients`
come back in float32 for them and in the input's dtype otherwise (float32, float64: numbers unchanged);
the gradient with respect to a float16 `logp` is stored in float16 by autograd and overflows if a
coefficient exceeds 65504. Unmasked log-probs must be finite (`old_logp` and `behaviour_logp` may be
-inf, a reference probability of 0, whose ratio the clamp bounds); NaN or +inf raise ValueError.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from theory import advantages as adv_mod

Tensor = torch.Tensor

REFERENCES = ("policy", "old", "one", "behaviour", "sequence_geometric")
MASKS = ("none", "ppo_clip", "dual_clip", "cispo", "sequence_clip", "sapo", "vespo")
SHAPINGS = ("none", "luffy")
AGGREGATIONS = ("token_mean", "global_token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                "seq_mean_token_sum_norm", "batch_token_sum_norm", "token_sum_norm")
CLAMP_GRADIENTS = ("keep", "zero")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl", "k1+", "k3+", "low_var_kl+")
KL_PLACEMENTS = ("loss", "reward")
KL_AGGREGATIONS = ("global_token_mean", "policy")
ROLLOUT_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# The KL options of each library's default KL term (coefficient aside): preset(name, **KL_STYLES["trl"]).
KL_STYLES = {
    "trl": dict(kl_estimator="k3", kl_placement="loss", kl_aggregation="policy", kl_bias_correction=True),
    "verl": dict(kl_estimator="low_var_kl", kl_placement="loss", kl_aggregation="policy",
                 kl_bias_correction=False),
    "verl_in_reward": dict(kl_estimator="k1", kl_placement="reward", kl_bias_correction=False),
    "ptlab_v0": dict(kl_estimator="k3", kl_placement="loss", kl_aggregation="global_token_mean",
                     kl_bias_correction=False),
}
_RATIO_REFERENCES = ("old", "behaviour", "sequence_geometric")


@dataclass(frozen=True)
class UPGE:
    """One estimator: the four UPGE parts, an aggregation, and their options.

    Build one with `preset(name, **options)` or directly, e.g.
    `UPGE(reference="old", advantage="group_mean", mask="ppo_clip", aggregation="token_mean")`.
    """

    name: str = "custom"
    reference: str = "old"
    advantage: str = "group_norm"
    mask: str = "ppo_clip"
    shaping: str = "none"
    aggregation: str = "token_mean"
    eps_low: float = 0.2             # clip range [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.2
    clip_c: float = 3.0              # dual clip: loss capped at -c * A for A < 0 (verl's clip_ratio_c)
    shaping_gamma: float = 0.1       # LUFFY's gamma in f(p) = p / (p + gamma)
    std_eps: float = 1e-6            # advantage normalisation: (r - mean) / (std + std_eps)
    std_unbiased: bool = True
    demo_reference: str | None = None  # reference on demonstration rows; None: no demonstrations
    demo_shaping: str = "none"
    max_length: int | None = None    # constant L of the *_norm aggregations; None: the padded length T
    count_empty_rows: bool = True    # S counts rows without a valid token (TRL); False: verl's agg_loss
    seq_len_eps: float = 0.0         # seq_mean_token_mean divides row i by L_i + seq_len_eps (verl: 1e-8)
    log_ratio_clamp: float = 20.0
    clamp_gradient: str = "keep"     # beyond the clamp: "keep" w at the clamped ratio, "zero" (verl)
    sequence_log_ratio_max: float | None = None  # GSPO: cap on the sequence log-ratio (verl: 10.0)
    kl_coef: float = 0.0             # beta of the KL penalty to a reference policy (0: none)
    kl_estimator: str = "k3"         # k1, k2, k3, low_var_kl (k3 with verl's clamps); "+": k2's gradient
    kl_placement: str = "loss"       # "loss": beta * KL in the loss; "reward": R - beta * sum_t KL (verl)
    kl_aggregation: str = "global_token_mean"  # or "policy": the policy loss's own weights (TRL, verl)
    kl_bias_correction: bool = False  # TRL: per-token KL times the (differentiable) ratio pi_theta / pi_old
    off_policy_mask_threshold: float | None = None  # TRL OPSM: drop A < 0 rows whose mean KL exceeds it
    top_entropy_quantile: float = 1.0  # TRL: keep only the tokens in the top fraction of entropy (1: all)
    rollout_correction: str = "none"  # pi_old / pi_rollout weight (TRL vLLM IS, verl rollout_is)
    rollout_is_min: float | None = None  # bounds of that weight: truncate to, or mask outside, [min, max]
    rollout_is_max: float | None = None
    sapo_tau_pos: float = 1.0        # SAPO gate temperatures (mask="sapo"), for A > 0 and A <= 0
    sapo_tau_neg: float = 1.05
    vespo_k_pos: float = 2.0         # VESPO gamma weight phi(w) = e^lam w^k e^(-lam w), for A >= 0 and A < 0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    in_table1: bool = False          # listed in the HPT paper's Table 1
    citation: str = ""

    def __post_init__(self):
        _check_choice("reference", self.reference, REFERENCES)
        _check_choice("advantage", self.advantage, tuple(adv_mod.ADVANTAGES))
        _check_choice("mask", self.mask, MASKS)
        _check_choice("shaping", self.shaping, SHAPINGS)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("demo_shaping", self.demo_shaping, SHAPINGS)
        _check_choice("clamp_gradient", self.clamp_gradient, CLAMP_GRADIENTS)
        if self.demo_reference is not None:
            _check_choice("demo_reference", self.demo_reference, ("policy", "one"))
        if self.mask != "none" and self.reference not in _RATIO_REFERENCES:
            raise ValueError(f"mask: {self.mask!r} needs a ratio, i.e. reference in {_RATIO_REFERENCES}; "
                             f"got reference={self.reference!r}")
        if (self.mask == "sequence_clip") != (self.reference == "sequence_geometric" and self.mask != "none"):
            raise ValueError("mask: 'sequence_clip' goes with reference='sequence_geometric' and only with it; "
                             f"got mask={self.mask!r}, reference={self.reference!r}")
        if self.shaping == "luffy" and self.reference != "one":
            raise ValueError("shaping: 'luffy' shapes grad pi and needs reference='one'")
        if self.demo_shaping == "luffy" and self.demo_reference != "one":
            raise ValueError("demo_shaping: 'luffy' needs demo_reference='one'")
        for f in ("eps_low", "eps_high", "shaping_gamma", "std_eps", "log_ratio_clamp", "clip_c", "seq_len_eps"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v != v:
                raise ValueError(f"{f}: expected a non-negative number, got {v!r}")
        if not math.isfinite(self.log_ratio_clamp):  # exp(inf) is inf: the ratio must stay finite
            raise ValueError(f"log_ratio_clamp: expected a finite number, got {self.log_ratio_clamp!r}")
        for f in ("std_unbiased", "count_empty_rows"):
            if not isinstance(getattr(self, f), (bool, np.bool_)):
                raise ValueError(f"{f}: expected a bool, got {getattr(self, f)!r}")
        m = self.sequence_log_ratio_max
        if m is not None:
            if isinstance(m, (bool, np.bool_)) or not isinstance(m, (int, float, np.integer, np.floating)) \
                    or not (math.isfinite(m) and m >= 0):
                raise ValueError(f"sequence_log_ratio_max: expected a finite number >= 0 or None, got {m!r}")
            if self.reference != "sequence_geometric":
                raise ValueError("sequence_log_ratio_max: caps GSPO's sequence log-ratio and needs "
                                 f"reference='sequence_geometric'; got reference={self.reference!r}")
            object.__setattr__(self, "sequence_log_ratio_max", float(m))
        if self.mask == "dual_clip" and not self.clip_c > 1 + self.eps_high:
            raise ValueError(f"clip_c: dual clip needs clip_c > 1 + eps_high, got {self.clip_c!r}")
        if self.shaping_gamma == 0 and "luffy" in (self.shaping, self.demo_shaping):
            raise ValueError("shaping_gamma: must be > 0 for the LUFFY shaping")
        self._check_kl_and_masks()
        if self.max_length is not None:
            L = self.max_length
            if isinstance(L, (bool, np.bool_)) or not isinstance(L, (int, np.integer)) or L < 1:
                raise ValueError(f"max_length: expected a positive int or None, got {L!r}")
            object.__setattr__(self, "max_length", int(L))  # numpy ints are welcome; store a plain int

    def _check_kl_and_masks(self):
        _check_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_choice("kl_placement", self.kl_placement, KL_PLACEMENTS)
        _check_choice("kl_aggregation", self.kl_aggregation, KL_AGGREGATIONS)
        _check_choice("rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        if not isinstance(self.kl_bias_correction, (bool, np.bool_)):
            raise ValueError(f"kl_bias_correction: expected a bool, got {self.kl_bias_correction!r}")
        _number("kl_coef", self.kl_coef, lo=0.0)
        _number("sapo_tau_pos", self.sapo_tau_pos, lo=0.0, lo_open=True)
        _number("sapo_tau_neg", self.sapo_tau_neg, lo=0.0, lo_open=True)
        for f in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            _number(f, getattr(self, f), lo=0.0)
        if self.mask == "vespo" and self.rollout_correction not in ("none", "token_truncate", "token_mask"):
            raise ValueError("rollout_correction: VESPO folds the rollout weight into its sequence weight token by "
                             f"token (TRL): 'token_truncate' or 'token_mask', got {self.rollout_correction!r}")
        q = _number("top_entropy_quantile", self.top_entropy_quantile, lo=0.0, lo_open=True)
        if q > 1:
            raise ValueError(f"top_entropy_quantile: expected a number in (0, 1], got {q!r}")
        for f in ("off_policy_mask_threshold", "rollout_is_min", "rollout_is_max"):
            if getattr(self, f) is not None:
                _number(f, getattr(self, f), lo=0.0)
        lo, hi = self.rollout_is_min, self.rollout_is_max
        if self.rollout_correction != "none" and lo is None and hi is None:
            raise ValueError(f"rollout_is_max: rollout_correction={self.rollout_correction!r} needs a bound "
                             "(rollout_is_max and/or rollout_is_min)")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"rollout_is_min: must be <= rollout_is_max, got {lo!r} > {hi!r}")

    def replace(self, **options) -> UPGE:
        _check_options(options)
        return dataclasses.replace(self, **options)

    # ------------------------------------------------------------------ advantages
    def advantages(self, rewards, group_size: int, lengths=None) -> Tensor:
        """rewards [B] (B = n_prompts * group_size, groups contiguous) -> advantages [B]. `lengths` [B]:
        each row's number of valid tokens, required by `group_center_token_whiten_verl` (verl whitens
        over tokens) and ignored by the other advantages."""
        return adv_mod.compute(self.advantage, rewards, group_size, lengths=lengths,
                               std_eps=self.std_eps, std_unbiased=self.std_unbiased)

    # ------------------------------------------------------------------ loss and coefficients
    def loss(self, logp: Tensor, old_logp: Tensor | None = None, advantages: Tensor | None = None,
             mask: Tensor | None = None, **kw) -> Tensor:
        """Scalar surrogate; its negative gradient with respect to `logp` is the UPGE estimate.

        logp, old_logp, mask: [B, T] (or [B] for one-step problems such as bandits); advantages: [B].
        Keywords: is_demo [B] bool, behaviour_logp [B, T], num_items (global token count for
        `global_token_mean`), num_seqs (global sequence count S of the seq_* and batch_* aggregations;
        with `count_empty_rows=False` count the rows that have a valid token), max_length (L of the
        *_norm aggregations). `old_logp=None` means on-policy (old = sg(logp)).
        """
        t = self._terms(logp, old_logp, advantages, mask, **kw)
        lp = t["logp"]
        per_token = t["value"] - t["w"] * (lp - lp.detach())
        loss = (t["agg"] * torch.where(t["mask"], per_token, torch.zeros_like(per_token))).sum()
        if "kl_coef" in t:  # its own weights already hold the aggregation: sum c * (lp - sg(lp))
            loss = loss + t["kl_value"] - (t["kl_coef"] * (lp - lp.detach())).sum()
        return loss

    def coefficients(self, logp: Tensor, old_logp: Tensor | None = None, advantages: Tensor | None = None,
                     mask: Tensor | None = None, **kw) -> Tensor:
        """Per-token weights w with grad(loss, logp) == -w; same shape as `logp`."""
        t = self._terms(logp, old_logp, advantages, mask, **kw)
        w = torch.where(t["mask"], t["agg"] * t["w"], torch.zeros_like(t["w"]))
        if "kl_coef" in t:
            w = w + t["kl_coef"]
        return w.reshape(logp.shape)

    def diagnostics(self, logp: Tensor, old_logp: Tensor | None = None, advantages: Tensor | None = None,
                    mask: Tensor | None = None, **kw) -> dict[str, float]:
        """Token-mean statistics over valid tokens: clip fraction, ratio mean / max / min."""
        t = self._terms(logp, old_logp, advantages, mask, **kw)
        m = t["mask"]
        n = max(int(m.sum()), 1)
        ratio = t["ratio"][m]
        return {
            "clip_fraction": float((t["clipped"] & m).sum()) / n,
            "ratio_mean": float(ratio.mean()) if ratio.numel() else 1.0,
            "ratio_max": float(ratio.max()) if ratio.numel() else 1.0,
            "ratio_min": float(ratio.min()) if ratio.numel() else 1.0,
        }

    # ------------------------------------------------------------------ internals
    def _terms(self, logp, old_logp, advantages, mask, is_demo=None, behaviour_logp=None,
               num_items=None, num_seqs=None, max_length=None, ref_logp=None, rollout_logp=None,
               entropy=None) -> dict[str, Tensor]:
        logp, old_logp, behaviour_logp, A, M, demo = self._check_inputs(
            logp, old_logp, advantages, mask, is_demo, behaviour_logp)
        extra = self._check_extra(logp, M, ref_logp=ref_logp, rollout_logp=rollout_logp, entropy=entropy)
        zero = torch.zeros_like(logp)
        # Masked positions become 0 before any arithmetic: padding may hold -inf or garbage.
        lp = torch.where(M, logp, zero)
        lp_d = lp.detach()
        old = torch.where(M, old_logp, zero) if old_logp is not None else lp_d
        beh = torch.where(M, behaviour_logp, zero) if behaviour_logp is not None else None
        A = A[:, None].expand_as(lp).to(lp.dtype)

        fold = None
        if self.mask == "vespo" and self.rollout_correction != "none":  # TRL: inside VESPO's sequence weight
            fold = self._rollout_weight(old, self._need(extra, "rollout_logp", "rollout_correction"), M)
        value, w, ratio, clipped = self._policy_part(lp, lp_d, old, beh, A, M, fold)
        keep = self._extra_masks(lp_d, old, A, M, extra)  # OPSM, top-entropy, rollout IS: a constant factor
        value, w = value * keep, w * keep
        if demo is not None and bool(demo.any()):
            dv, dw, dr = _denominator(self.demo_reference, self.demo_shaping, self.shaping_gamma, lp, lp_d, A)
            d = demo[:, None].expand_as(lp)
            value, w, ratio = torch.where(d, dv, value), torch.where(d, dw, w), torch.where(d, dr, ratio)
            clipped = clipped & ~d
        agg = self._aggregation(M.to(lp.dtype), num_items, num_seqs, max_length)
        out = {"logp": lp, "value": value.detach(), "w": w.detach(), "agg": agg, "mask": M,
               "ratio": ratio.detach(), "clipped": clipped}
        if self.kl_coef > 0 and self.kl_placement == "loss":
            if extra["ref_logp"] is None:
                raise ValueError(f"ref_logp: required by kl_coef={self.kl_coef!r} with kl_placement='loss'")
            out.update(self._kl_part(lp_d, old, extra["ref_logp"], M, agg, num_items))
        return out

    # ------------------------------------------------------------------ the KL term and the extra masks
    def kl_per_token(self, logp: Tensor, ref_logp: Tensor) -> tuple[Tensor, Tensor]:
        """(value, d value / d logp) of the per-token KL estimate, elementwise. With d = logp - ref_logp:
        k1 = d; k2 = d^2 / 2; k3 = e^-d + d - 1 (d clamped to [-20, 20], zero derivative beyond, as
        verl and ptlab's earlier trainer did); low_var_kl = min(k3, 10) (verl: zero derivative above 10).
        A trailing "+" (verl's straight-through form) keeps the value and takes k2's derivative d, whose
        expectation is the gradient of KL(pi || ref)."""
        d = logp - ref_logp
        if self.kl_estimator.endswith("+"):
            v, _ = self.replace(kl_estimator=self.kl_estimator[:-1]).kl_per_token(logp, ref_logp)
            return v, d
        if self.kl_estimator == "k1":
            return d, torch.ones_like(d)
        if self.kl_estimator == "k2":
            return 0.5 * d * d, d
        u = (-d).clamp(-20.0, 20.0)
        v = torch.exp(u) - u - 1
        dv = torch.where(d.abs() <= 20.0, 1 - torch.exp(u), torch.zeros_like(u))
        if self.kl_estimator == "low_var_kl":
            dv = torch.where(v > 10.0, torch.zeros_like(dv), dv)
            v = v.clamp(-10.0, 10.0)
        return v, dv

    def kl_rewards(self, rewards, logp, ref_logp, mask=None) -> Tensor:
        """`kl_placement="reward"` (verl's use_kl_in_reward): R_i - kl_coef * sum_t KL_t, the KL estimate at
        the sampling policy's log-probs `logp` [B, T] (verl: old_log_prob), no gradient. rewards [B]."""
        R = _as_tensor("rewards", rewards).to(torch.float64)
        lp = _as_tensor("logp", logp).to(torch.float64)
        if lp.dim() != 2 or R.shape != (lp.shape[0],):
            raise ValueError(f"rewards: expected shape [B] with logp [B, T]; got {tuple(R.shape)} and "
                             f"{tuple(lp.shape)}")
        M = torch.ones_like(lp, dtype=torch.bool) if mask is None else (_as_tensor("mask", mask, False) != 0)
        extra = self._check_extra(lp, M, ref_logp=ref_logp)
        if extra["ref_logp"] is None:
            raise ValueError("ref_logp: required by kl_rewards")
        z = torch.zeros_like(lp)
        v, _ = self.kl_per_token(torch.where(M, lp, z), extra["ref_logp"])
        return R - self.kl_coef * torch.where(M, v, z).sum(-1)

    def _kl_part(self, lp_d, old, ref, M, agg, num_items) -> dict[str, Tensor]:
        """The KL term's value (a scalar) and its coefficients c with grad = -c (one [B, T] tensor holding
        the aggregation weights). With `kl_bias_correction` the per-token KL is multiplied by the ratio
        rho = pi_theta / pi_old (the sequence ratio for GSPO), whose own gradient enters (product rule)."""
        Mf = M.to(lp_d.dtype)
        if self.kl_aggregation == "policy":
            a = agg * Mf
        else:
            n = _positive("num_items", num_items, None)
            a = Mf / (n if n is not None else max(float(Mf.sum()), 1.0))
        v, dv = self.kl_per_token(lp_d, ref)
        v, dv = v * Mf, dv * Mf
        if not self.kl_bias_correction:
            return {"kl_value": self.kl_coef * (a * v).sum(), "kl_coef": -self.kl_coef * a * dv, "kl": v}
        rho, drho = self._kl_ratio(lp_d, old, M)
        if self.reference == "sequence_geometric":  # d rho_i / d logp_s = rho_i / L_i on every token of row i
            cross = drho * (a * v).sum(-1, keepdim=True)
            c = -self.kl_coef * (a * dv * rho + cross) * Mf
        else:
            c = -self.kl_coef * a * (dv * rho + v * drho)
        return {"kl_value": self.kl_coef * (a * v * rho).sum(), "kl_coef": c, "kl": v}

    def _kl_ratio(self, lp_d, old, M):
        """(rho, d rho / d logp) for the KL bias correction: the token ratio, or GSPO's sequence ratio."""
        c = self.log_ratio_clamp
        raw = lp_d - old
        lr = raw.clamp(-c, c)
        if self.reference != "sequence_geometric":
            rho = torch.exp(lr)
            beyond = M & (raw.abs() > c)
            d = torch.where(beyond, torch.zeros_like(rho), rho) if self.clamp_gradient == "zero" else rho
            return rho, d
        Mf = M.to(lp_d.dtype)
        n = Mf.sum(-1, keepdim=True).clamp(min=1)
        seq = (lr * Mf).sum(-1, keepdim=True) / n
        capped = torch.zeros_like(seq, dtype=torch.bool)
        if self.sequence_log_ratio_max is not None:
            capped = seq > self.sequence_log_ratio_max
            seq = seq.clamp(max=self.sequence_log_ratio_max)
        rho = torch.exp(seq)
        d = rho / n
        if self.clamp_gradient == "zero":
            d = torch.where(capped, torch.zeros_like(d), d)
        return rho.expand_as(lp_d), d.expand_as(lp_d) * Mf

    def _extra_masks(self, lp_d, old, A, M, extra) -> Tensor:
        """The product of TRL's off-policy sequence mask, its top-entropy token mask and the rollout
        importance weight pi_old / pi_rollout (truncated or masked); 1 where none is set. A constant."""
        keep = torch.ones_like(lp_d)
        Mf = M.to(lp_d.dtype)
        roll = extra["rollout_logp"]
        if self.off_policy_mask_threshold is not None:
            # the sampler's log-probs if given (TRL: vLLM's), else pi_old; mean over the row's valid tokens
            base = roll if roll is not None else old
            kl = ((base - lp_d) * Mf).sum(-1, keepdim=True) / Mf.sum(-1, keepdim=True).clamp(min=1)
            keep = keep * ((A >= 0) | (kl <= self.off_policy_mask_threshold)).to(keep.dtype)
        if self.top_entropy_quantile < 1.0:
            H = extra["entropy"]
            if H is None:
                raise ValueError(f"entropy: required by top_entropy_quantile={self.top_entropy_quantile!r}")
            valid = H[M]
            if valid.numel() == 0:
                return torch.zeros_like(keep)
            # TRL takes the quantile in float32 (torch.quantile, linear interpolation): so does ptlab
            thr = torch.quantile(valid.float(), 1 - self.top_entropy_quantile)
            keep = keep * ((H >= thr) & M).to(keep.dtype)
        if self.rollout_correction != "none" and self.mask != "vespo":
            keep = keep * self._rollout_weight(old, self._need(extra, "rollout_logp", "rollout_correction"), M)
        return keep

    def _need(self, extra, name, option):
        if extra[name] is None:
            raise ValueError(f"{name}: required by {option}={getattr(self, option)!r}")
        return extra[name]

    def _rollout_weight(self, old, roll, M):
        """pi_old / pi_rollout per token, or per sequence (the product over the row), its log clamped at
        log_ratio_clamp (verl's safety bound), then truncated to, or masked outside, [min, max]."""
        c = self.log_ratio_clamp
        d = torch.where(M, old - roll, torch.zeros_like(old))
        if self.rollout_correction.startswith("sequence"):
            d = d.sum(-1, keepdim=True)
        w = torch.exp(d.clamp(-c, c)).expand_as(old)
        lo = self.rollout_is_min if self.rollout_is_min is not None else -math.inf
        hi = self.rollout_is_max if self.rollout_is_max is not None else math.inf
        if self.rollout_correction.endswith("truncate"):
            return w.clamp(lo, hi)
        return torch.where((w < lo) | (w > hi), torch.zeros_like(w), w)

    def _check_extra(self, lp, M, **tensors):
        """ref_logp, rollout_logp, entropy: [B, T] like logp (or [B]), finite where valid; None passes."""
        out = {}
        cd = lp.dtype if lp.dtype in (torch.float32, torch.float64) else torch.float32
        for name, x in tensors.items():
            if x is not None:
                x = _as_tensor(name, x)
                if x.numel() != M.numel() or x.shape[0] != M.shape[0]:
                    raise ValueError(f"{name}: expected the shape of logp {tuple(lp.shape)}, got {tuple(x.shape)}")
                x = x.to(cd).reshape(M.shape)
                if not bool(torch.isfinite(x[M]).all()):
                    raise ValueError(f"{name}: contains NaN or infinite values at unmasked positions")
                x = torch.where(M, x, torch.zeros_like(x))
            out[name] = x
        return out

    def _policy_part(self, lp, lp_d, old, beh, A, M, fold=None):
        """Per-token (loss value, UPGE weight, ratio pi_theta/pi_ref, clipped flag) of non-demo rows. `fold`:
        VESPO's per-token rollout weights, which enter its sequence weight."""
        if self.reference not in _RATIO_REFERENCES:
            value, w, ratio = _denominator(self.reference, self.shaping, self.shaping_gamma, lp, lp_d, A)
            return value, w, ratio, torch.zeros_like(M)
        base = beh if self.reference == "behaviour" else old
        c = self.log_ratio_clamp
        raw = lp_d - base
        log_ratio = raw.clamp(-c, c)
        beyond = M & (raw.abs() > c)  # where a clamp inside autograd (verl) has zero gradient
        if self.reference == "sequence_geometric":
            # the per-token clamp acts on the stop-gradient sequence mean: no gradient passes through it
            Mf = M.to(lp.dtype)
            seq = (log_ratio * Mf).sum(-1, keepdim=True) / Mf.sum(-1, keepdim=True).clamp(min=1)
            beyond = torch.zeros_like(M)
            if self.sequence_log_ratio_max is not None:
                beyond = M & (seq > self.sequence_log_ratio_max)
                seq = seq.clamp(max=self.sequence_log_ratio_max)
            log_ratio = seq.expand_as(lp)
        rho = torch.exp(log_ratio)
        lo, hi = 1 - self.eps_low, 1 + self.eps_high
        zero = (lambda w: torch.where(beyond, torch.zeros_like(w), w)) if self.clamp_gradient == "zero" \
            else (lambda w: w)
        if self.mask == "none":
            return -A * rho, zero(A * rho), rho, torch.zeros_like(M)
        if self.mask == "vespo":
            return self._vespo(lp_d, log_ratio, A, M, fold)
        if self.mask == "sapo":  # a soft gate f(rho) = 4/tau sigmoid(tau (rho - 1)): f'(rho) = 4 s (1 - s)
            tau = torch.where(A > 0, torch.full_like(A, self.sapo_tau_pos), torch.full_like(A, self.sapo_tau_neg))
            s = torch.sigmoid(tau * (rho - 1))
            return -(4 / tau) * s * A, zero(A * rho * 4 * s * (1 - s)), rho, torch.zeros_like(M)
        if self.mask == "cispo":  # the weight is a stop-gradient: the clamp never carries gradient here
            weight = rho.clamp(lo, hi)
            return -weight * A * lp_d, weight * A, rho, (rho < lo) | (rho > hi)
        # PPO-style clip (token or sequence ratio): zero gradient where the ratio left the trust
        # region in the direction the advantage pushes it.
        value = torch.maximum(-rho * A, -rho.clamp(lo, hi) * A)
        unstable = ((A > 0) & (rho > hi)) | ((A < 0) & (rho < lo))
        if self.mask == "dual_clip":
            capped = (A < 0) & (rho > self.clip_c)
            value = torch.where(A < 0, torch.minimum(value, -self.clip_c * A), value)
            unstable = unstable | capped
        w = torch.where(unstable, torch.zeros_like(rho), A * rho)
        return value, zero(w), rho, unstable

    def _vespo(self, lp_d, log_ratio, A, M, fold):
        """VESPO (TRL loss_type='vespo'): a stop-gradient weight phi(w) = exp(lam + k log w - lam w) on the
        sequence weight w = prod_t pi/pi_old (a product, not GSPO's geometric mean; each token's log-ratio
        clamped at log_ratio_clamp, the sum at [log 1e-8, 20], TRL's bounds), k and lam by the sign of A."""
        Mf = M.to(lp_d.dtype)
        floor = math.log(1e-8)
        logw = (log_ratio * Mf).sum(-1, keepdim=True)
        if fold is not None:  # TRL adds each token's clamped log rollout weight (0 weight: log 1e-8)
            logw = logw + (torch.log(fold).clamp(floor, 20.0) * Mf).sum(-1, keepdim=True)
        logw = logw.clamp(floor, 20.0)
        pos = A >= 0
        k = torch.where(pos, torch.full_like(A, self.vespo_k_pos), torch.full_like(A, self.vespo_k_neg))
        lam = torch.where(pos, torch.full_like(A, self.vespo_lambda_pos), torch.full_like(A, self.vespo_lambda_neg))
        lam = lam.clamp(min=1e-4)
        phi = torch.exp(lam + k * logw - lam * torch.exp(logw)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return -phi * A * lp_d, phi * A, torch.exp(logw).expand_as(lp_d), torch.zeros_like(M)

    def _aggregation(self, Mf, num_items, num_seqs, max_length) -> Tensor:
        B, T = Mf.shape
        rows = B if self.count_empty_rows else max(int((Mf.sum(-1) > 0).sum()), 1)
        S = _positive("num_seqs", num_seqs, rows)
        L = _positive("max_length", max_length, self.max_length if self.max_length is not None else T)
        N = _positive("num_items", num_items, None)  # checked even where unused: a bad value is a bug upstream
        name = self.aggregation
        if name == "token_mean":
            out = Mf / Mf.sum().clamp(min=1)
        elif name == "global_token_mean":
            out = Mf / (N if N is not None else max(float(Mf.sum()), 1.0))
        elif name == "seq_mean_token_mean":
            n = Mf.sum(-1, keepdim=True)
            out = Mf / ((n + self.seq_len_eps if self.seq_len_eps else n.clamp(min=1)) * S)
        elif name == "seq_mean_token_sum":
            out = Mf / S
        elif name in ("seq_mean_token_sum_norm", "batch_token_sum_norm"):
            out = Mf / (S * L)
        else:  # token_sum_norm
            out = Mf / L
        return out

    def _check_inputs(self, logp, old_logp, advantages, mask, is_demo, behaviour_logp):
        if not isinstance(logp, Tensor) or not logp.is_floating_point():
            raise ValueError("logp: expected a floating-point torch.Tensor of shape [B, T] or [B]")
        if logp.dim() not in (1, 2):
            raise ValueError(f"logp: expected shape [B, T] or [B], got {tuple(logp.shape)}")
        shape = logp.shape
        # float16 / bfloat16 are computed in float32 (exp(20) > float16 max); float32 and float64 as given
        cd = torch.promote_types(logp.dtype, torch.float32)
        two_d = (logp if logp.dim() == 2 else logp[:, None]).to(cd)
        B = shape[0]

        M = torch.ones_like(two_d, dtype=torch.bool)
        if mask is not None:
            mask = _as_tensor("mask", mask, floating=False)
            if mask.shape != shape:
                raise ValueError(f"mask: expected shape {tuple(shape)} (that of logp), got {tuple(mask.shape)}")
            M = (mask != 0).reshape(two_d.shape)

        def same(name, x):
            if x is None:
                return None
            x = _as_tensor(name, x)
            if x.shape != shape:
                raise ValueError(f"{name}: expected shape {tuple(shape)} (that of logp), got {tuple(x.shape)}")
            x = x.to(cd).reshape(two_d.shape)
            # -inf is a reference probability of 0 (the clamp bounds its ratio); NaN and +inf are garbage
            if bool((torch.isnan(x[M]) | (x[M] == math.inf)).any()):
                raise ValueError(f"{name}: contains NaN or +inf at unmasked positions")
            return x

        if not bool(torch.isfinite(two_d[M]).all()):  # -inf * 0 and inf - inf would make the loss NaN
            raise ValueError("logp: contains NaN or infinite values at unmasked positions")
        if bool((two_d[M] > 1e-4).any()):
            raise ValueError("logp: log-probabilities must be <= 0 (got positive values: logits or probabilities?)")
        old = same("old_logp", old_logp)
        if self.reference == "behaviour" and behaviour_logp is None:
            raise ValueError("behaviour_logp: required by reference='behaviour'")
        beh = same("behaviour_logp", behaviour_logp)
        if advantages is None:
            if self.advantage != "one":
                raise ValueError(f"advantages: required (estimator {self.name!r} uses advantage "
                                 f"{self.advantage!r}); compute them with est.advantages(rewards, group_size)")
            advantages = torch.ones(B, dtype=cd)
        A = _as_tensor("advantages", advantages).to(cd)
        if A.shape != (B,):
            raise ValueError(f"advantages: expected shape [B]=[{B}], got {tuple(A.shape)}")
        if not bool(torch.isfinite(A).all()):
            raise ValueError(f"advantages: contains NaN or infinite values (in {cd}, the compute dtype)")
        demo = None
        if is_demo is not None:
            demo = _as_tensor("is_demo", is_demo, floating=False).to(torch.bool)
            if demo.shape != (B,):
                raise ValueError(f"is_demo: expected shape [B]=[{B}], got {tuple(demo.shape)}")
            if bool(demo.any()) and self.demo_reference is None:
                raise ValueError(f"is_demo: estimator {self.name!r} has no demonstration part "
                                 "(set demo_reference, or use 'luffy' / 'srft')")
        return two_d, old, beh, A, M, demo


def _denominator(reference, shaping, gamma, lp, lp_d, A):
    """(value, weight, ratio) for the ratio-free references `policy` and `one`."""
    if reference == "policy":  # pi_ref = pi_theta: -A log pi, weight A
        return -A * lp_d, A.clone(), torch.ones_like(lp)
    p = torch.exp(lp_d)  # pi_ref = 1: -A pi (or -A f(pi)), weight A pi (times f'(pi))
    if shaping == "luffy":
        return -A * p / (p + gamma), A * p * gamma / (p + gamma) ** 2, p
    return -A * p, A * p, p


def _as_tensor(name, x, floating=True) -> Tensor:
    """A tensor as given, or an array-like converted through float64 numpy (torch would pick float32)."""
    if isinstance(x, Tensor):
        return x
    try:
        return torch.from_numpy(np.array(x, dtype=np.float64 if floating else None))
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a tensor or a numeric array, got {type(x).__name__}") from None


def _positive(name, value, default):
    """A normaliser (num_items, num_seqs, max_length): a count or a length, so finite and >= 1; any int
    or float type, numpy's included, or a one-element tensor."""
    if value is None:
        return default
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a finite number >= 1 (a count or a length), got {value!r}")
    value = int(value) if isinstance(value, (int, np.integer)) else float(value)
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{name}: expected a finite number >= 1 (a count or a length), got {value!r}")
    return value


def _number(name, v, lo, lo_open=False):
    """A finite real option >= lo (> lo with lo_open); a clear error naming it otherwise."""
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(v) and (v > lo if lo_open else v >= lo)
    if not ok:
        raise ValueError(f"{name}: expected a finite number {'>' if lo_open else '>='} {lo:g}, got {v!r}")
    return float(v)


def _check_choice(arg, value, valid):
    if value not in valid:
        raise ValueError(f"{arg}: unknown value {value!r}; valid: {list(valid)}")


_FIELDS = tuple(f.name for f in dataclasses.fields(UPGE))


def _check_options(options):
    bad = sorted(set(options) - set(_FIELDS) - {"name"})
    if bad:
        raise ValueError(f"unknown option(s) {bad}; valid options: {sorted(set(_FIELDS) - {'name'})}")


# ---------------------------------------------------------------------------------------- presets
# Table 1 of the HPT paper first (in its order), then its kin. A preset added here appears in
# `ptlab table1` with no other edit.
PRESETS: dict[str, UPGE] = {}


def _add(**kw):
    PRESETS[kw["name"]] = UPGE(**kw)


_add(name="sft", reference="policy", advantage="one", mask="none", aggregation="token_mean",
     in_table1=True, citation="behaviour cloning; TRL SFTTrainer (token mean)")
_add(name="ppo", reference="old", advantage="given", mask="ppo_clip", aggregation="token_mean",
     in_table1=True, citation="Schulman et al. 2017 (clip only, token mean); verl's default vanilla loss adds "
     "dual clip: preset('ppo', mask='dual_clip'), clip_c 3")
_add(name="grpo", reference="old", advantage="group_norm", mask="ppo_clip", aggregation="seq_mean_token_mean",
     in_table1=True, citation="Shao et al. 2024; TRL loss_type='grpo'")
_add(name="reinforce", reference="policy", advantage="raw", mask="none", aggregation="seq_mean_token_sum",
     in_table1=True, citation="Williams 1992; Ahmadian et al. 2024 (A = +-1)")
_add(name="cispo", reference="old", advantage="group_norm", mask="cispo", eps_low=1.0, eps_high=4.0,
     aggregation="global_token_mean", in_table1=True,
     citation="MiniMax-M1 2025; weight sg(clip(rho, 0, 5)), token-level normaliser")
_add(name="gspo", reference="sequence_geometric", advantage="group_norm", mask="sequence_clip",
     eps_low=3e-4, eps_high=4e-4, aggregation="seq_mean_token_mean", in_table1=True,
     citation="Zheng et al. 2025")
_add(name="srft", reference="old", advantage="group_norm", mask="ppo_clip", demo_reference="one",
     aggregation="seq_mean_token_mean", in_table1=True,
     citation="Fu et al. 2025; demonstrations with pi_ref = 1 (HPT Table 1, App. A Eq. 19)")
_add(name="luffy", reference="old", advantage="group_norm", mask="ppo_clip", demo_reference="one",
     demo_shaping="luffy", aggregation="token_mean", in_table1=True,
     citation="Yan et al. 2025; demonstrations shaped by f(p) = p/(p+0.1)")
_add(name="dapo", reference="old", advantage="group_norm", mask="ppo_clip", eps_high=0.28,
     aggregation="global_token_mean", citation="Yu et al. 2025; TRL loss_type='dapo'")
_add(name="dr_grpo", reference="old", advantage="group_mean", mask="ppo_clip",
     aggregation="batch_token_sum_norm", citation="Liu et al. 2025; TRL loss_type='dr_grpo'")
_add(name="bnpo", reference="old", advantage="group_norm", mask="ppo_clip", aggregation="token_mean",
     citation="TRL loss_type='bnpo' (token mean of the local micro-batch)")
_add(name="rloo", reference="policy", advantage="rloo", mask="none", aggregation="seq_mean_token_sum",
     citation="Kool et al. 2019; Ahmadian et al. 2024")
_add(name="sapo", reference="old", advantage="group_norm", mask="sapo", aggregation="seq_mean_token_mean",
     citation="Gao et al. 2025 (arXiv 2511.20347); TRL loss_type='sapo', verl policy_loss 'sapo': soft gate "
     "4/tau sigmoid(tau (rho - 1)), tau 1.0 (A > 0) / 1.05")
_add(name="luspo", reference="sequence_geometric", advantage="group_norm", mask="sequence_clip", eps_low=3e-4,
     eps_high=4e-4, aggregation="seq_mean_token_sum",
     citation="LUSPO (arXiv 2602.05261), as TRL loss_type='luspo' runs it: GSPO's sequence ratio and clip, each "
     "sequence's token losses summed (its length weighs it), mean over sequences; GSPO's clip range")
_add(name="vespo", reference="old", advantage="group_norm", mask="vespo", aggregation="global_token_mean",
     citation="VESPO (arXiv 2602.10693), as TRL loss_type='vespo' runs it: stop-gradient gamma weight "
     "phi(w) on the sequence product ratio, k/lambda 2/3 (A >= 0), 3/2 (A < 0); token-level normaliser")
_add(name="hpt_paper", reference="old", advantage="group_norm", mask="ppo_clip",
     aggregation="seq_mean_token_sum", citation="HPT Eq. 11: the RL part of HPT as printed")
_add(name="hpt_code", reference="old", advantage="group_mean", mask="none",
     aggregation="token_sum_norm", max_length=8192,
     citation="HPT released code: no std, no clip, token sum / 8192 (no 1/S)")


def preset(name: str, **options) -> UPGE:
    """The named estimator, with options overridden (e.g. `preset("dapo", eps_high=0.3)`)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; valid: {list(PRESETS)}")
    return PRESETS[name].replace(**options)
