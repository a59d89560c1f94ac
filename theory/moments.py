"""Exact mean, covariance, bias and variance of every UPGE estimator on finite problems.

    m = exact_moments(estimator, problem, logits, group_size=G, sampling="on_policy")

The estimate g_hat is minus the gradient, with respect to the logits theta [X, K], of `estimator.loss`
on ONE prompt x ~ rho with its group of G samples. With a tabular softmax policy the gradient of
log pi(a | x) is e_a - pi(x), so g_hat is zero outside row x and

    g_hat[x] = sum_j w_j (e_{a_j} - pi_theta(x)),   w = estimator.coefficients(logp, old_logp, A, ...)

where logp, old_logp are the [G] log-probabilities of the sampled actions and A = estimator.advantages
of their rewards. Every weight is read from the estimator code itself, so the moments describe the
code that trains, not a transcription of it.

Sampling schemes (`SCHEMES`):

| scheme          | group                                                        | default target (Objective)   |
|-----------------|--------------------------------------------------------------|------------------------------|
| `on_policy`     | G rollouts from pi_old (= pi_theta unless `old_logits`)      | reward=1 (grad E r)          |
| `demonstration` | G samples from pi_beta, ordinary rows (SFT)                  | reward=0, mu=1 (SFT term)    |
| `mixed`         | G-1 rollouts + 1 demonstration row with is_demo (LUFFY, SRFT) | reward=(G-1)/G, mu=1/G       |
| `hpt_gate`      | G rollouts; c correct; SFT on one demonstration iff the gate  | reward=1 (grad E r)          |
|                 | fires (`GateRule`), else the estimator on the rollouts        |                              |

Two exact methods (`method=`): `closed_form` conditions on the number of correct samples (binary or
noisy-binary rewards, any estimator) or needs no conditioning (per-sample advantages, any rewards);
`enumeration` sums over every multiset of group outcomes, running the estimator on each group. They
agree to 1e-10 (tests/theory/test_moments.py). Derivations: theory/README.md section 2.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import gammaln, log_softmax
from scipy.stats import binom

from theory._checks import positive_int
from theory.estimator import UPGE, preset
from theory.finite import FiniteProblem, Objective

SCHEMES = ("on_policy", "demonstration", "mixed", "hpt_gate")
METHODS = ("auto", "closed_form", "enumeration")
_PER_SAMPLE = ("one", "raw", "given")  # advantages that depend on the sample's own reward only
_DT = torch.float64


@dataclass(frozen=True)
class GateRule:
    """HPT's switch (docs/hpt.md sections 4.1, 6.1): with c correct rollouts out of G, train SFT on the
    demonstration iff

    - variant `paper`: c / G <= threshold (gamma in [0, 1]; gamma = 0: SFT only when all rollouts fail);
    - variant `code`:  c <= threshold (`switch_gate`, an integer count).

    Otherwise the prompt trains on its rollouts. `sft_coef` scales the SFT loss (the code's sft_loss_coef).
    """

    variant: str = "paper"
    threshold: float = 0.0
    sft_coef: float = 1.0

    def __post_init__(self):
        if self.variant not in ("paper", "code"):
            raise ValueError(f"variant: expected 'paper' or 'code', got {self.variant!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ValueError(f"threshold: expected a non-negative number, got {t!r}")
        if self.variant == "paper" and t > 1:
            raise ValueError(f"threshold: the paper's gamma is a fraction in [0, 1], got {t!r}")
        if self.variant == "code" and int(t) != t:
            raise ValueError(f"threshold: the code's switch_gate is an integer count, got {t!r}")
        if isinstance(self.sft_coef, bool) or not isinstance(self.sft_coef, (int, float)) or not self.sft_coef >= 0:
            raise ValueError(f"sft_coef: expected a non-negative number, got {self.sft_coef!r}")

    def trains_sft(self, n_correct, group_size: int):
        c = np.asarray(n_correct)
        if self.variant == "paper":  # c/G <= gamma, compared in counts to avoid 2/8 <= 0.25 rounding
            return c <= self.threshold * group_size + 1e-9
        return c <= self.threshold


@dataclass(frozen=True, eq=False)
class Moments:
    """Exact first and second moments of g_hat and its error against `target` = objective's gradient."""

    mean: np.ndarray          # [X, K]  E[g_hat]
    cov: np.ndarray           # [X*K, X*K]  Cov[g_hat] (row-major flattening of [X, K])
    target: np.ndarray        # [X, K]  the gradient of `objective` at the logits
    objective: Objective
    sampling: str
    group_size: int
    method: str

    @property
    def bias(self) -> np.ndarray:
        return self.mean - self.target

    @property
    def bias_sq(self) -> float:
        return float((self.bias ** 2).sum())

    @property
    def variance(self) -> float:
        """E ||g_hat - E g_hat||^2 = trace of the covariance."""
        return float(np.trace(self.cov))

    @property
    def coordinate_variance(self) -> np.ndarray:
        return np.diag(self.cov).reshape(self.mean.shape).copy()

    @property
    def mse(self) -> float:
        return self.bias_sq + self.variance

    @property
    def cosine(self) -> float:
        """cos(E g_hat, target): 1 means a pure scale difference, no direction bias."""
        d = np.linalg.norm(self.mean) * np.linalg.norm(self.target)
        return float((self.mean * self.target).sum() / d) if d > 0 else float("nan")

    @property
    def scale(self) -> float:
        """s minimising ||E g_hat - s target||: the scale part of the bias."""
        tt = float((self.target ** 2).sum())
        return float((self.mean * self.target).sum() / tt) if tt > 0 else float("nan")

    @property
    def direction_bias(self) -> np.ndarray:
        """E g_hat - scale * target: the part of the bias that no step size removes."""
        return self.mean - (self.scale if np.isfinite(self.scale) else 0.0) * self.target

    @property
    def context_cosine(self) -> np.ndarray:
        """Per-context cos(E g_hat[x], target[x]) (NaN where either is zero)."""
        num = (self.mean * self.target).sum(-1)
        den = np.linalg.norm(self.mean, axis=-1) * np.linalg.norm(self.target, axis=-1)
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)

    @property
    def scale_free_mse(self) -> float:
        """min_{s >= 0} E||s g_hat - target||^2 / ||target||^2 = 1 - max(<E g, t>, 0)^2 / (||t||^2 E||g||^2)."""
        return self.batch_scale_free_mse(1)

    def batch_scale_free_mse(self, batch: int) -> float:
        """`scale_free_mse` of the mean of `batch` independent g_hat (prompts): variance / batch."""
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch: expected a positive int, got {batch!r}")
        second = self.variance / batch + float((self.mean ** 2).sum())
        tt = float((self.target ** 2).sum())
        if tt == 0 or second == 0:
            return float("nan")
        # s >= 0: a mean pointing away from the target is not rescued by flipping the step's sign
        return 1.0 - max(float((self.mean * self.target).sum()), 0.0) ** 2 / (tt * second)


def default_objective(sampling: str, group_size: int, gate: GateRule | None = None) -> Objective:
    """The objective whose gradient each scheme's bias is measured against (module table; README 2.2)."""
    _check_choice("sampling", sampling, SCHEMES)
    if sampling == "demonstration":
        return Objective(reward=0.0, mu=1.0)
    if sampling == "mixed":
        return Objective(reward=(group_size - 1) / group_size, mu=1.0 / group_size)
    return Objective(reward=1.0)


def exact_moments(estimator: UPGE, problem: FiniteProblem, logits, group_size: int, sampling: str = "on_policy",
                  *, old_logits=None, objective: Objective | None = None, gate: GateRule | None = None,
                  advantage_table=None, method: str = "auto", max_outcomes: int = 200_000) -> Moments:
    """Exact moments of g_hat (module doc).

    estimator: a `theory.estimator.UPGE`. problem: a `FiniteProblem`. logits: [X, K] (theta).
    group_size: G >= 1 (>= 2 for `mixed`). old_logits: [X, K] logits of pi_old, which draws the rollouts
    and is the ratio's denominator (None: pi_old = pi_theta, ratio 1). objective: the target (None:
    `default_objective`); its lam term uses pi_ref = pi_old. gate: the `GateRule` of `hpt_gate` (None:
    paper rule, gamma = 0). advantage_table: [X, K] advantages for estimators with advantage 'given'.
    method: `auto` (closed form where it applies, else enumeration), `closed_form`, `enumeration`.
    max_outcomes: enumeration refuses larger outcome sets.
    """
    s = _setup(estimator, problem, logits, group_size, sampling, old_logits, gate, advantage_table)
    _check_choice("method", method, METHODS)
    closed_ok = problem.binary or (estimator.advantage in _PER_SAMPLE and sampling != "hpt_gate")
    if method == "closed_form" and not closed_ok:
        raise ValueError("method: the closed form needs binary (or noisy-binary) rewards, or an estimator whose "
                         f"advantage depends on its own sample only ({_PER_SAMPLE}); use method='enumeration'")
    if method == "enumeration" or (method == "auto" and not closed_ok):
        mean_x, second_x = _enumerate(s, max_outcomes)
        used = "enumeration"
    else:
        mean_x, second_x = _closed_form(s)
        used = "closed_form"
    rho = problem.context_probs
    X, K = problem.rewards.shape
    mean = rho[:, None] * mean_x
    cov = np.zeros((X * K, X * K))
    for x in range(X):
        cov[x * K:(x + 1) * K, x * K:(x + 1) * K] = rho[x] * second_x[x]
    cov -= np.outer(mean.reshape(-1), mean.reshape(-1))
    cov = 0.5 * (cov + cov.T)
    obj = objective if objective is not None else default_objective(sampling, group_size, gate)
    if not isinstance(obj, Objective):
        raise ValueError(f"objective: expected a theory.finite.Objective, got {type(obj).__name__}")
    target = obj.gradient(problem, s.theta, s.old_theta)
    return Moments(mean, cov, target, obj, sampling, group_size, used)


# ------------------------------------------------------------------------------------------ set-up
@dataclass
class _Setup:
    est: UPGE
    problem: FiniteProblem
    G: int
    sampling: str
    gate: GateRule | None
    theta: np.ndarray
    old_theta: np.ndarray | None
    log_pi: np.ndarray        # [X, K] log pi_theta (the policy differentiated)
    log_old: np.ndarray       # [X, K] log pi_old (the rollout policy)
    sampler: np.ndarray       # [X, K] distribution of the non-demonstration rows
    beta: np.ndarray | None
    adv_table: np.ndarray | None


def _setup(est, problem, logits, G, sampling, old_logits, gate, advantage_table) -> _Setup:
    if not isinstance(est, UPGE):
        raise ValueError(f"estimator: expected a theory.estimator.UPGE, got {type(est).__name__}")
    if not isinstance(problem, FiniteProblem):
        raise ValueError(f"problem: expected a theory.finite.FiniteProblem, got {type(problem).__name__}")
    G = positive_int("group_size", G)
    _check_choice("sampling", sampling, SCHEMES)
    _check_finite_options(est)
    theta = problem.check_logits(logits)
    old_theta = None if old_logits is None else problem.check_logits(old_logits, "old_logits")
    log_pi = log_softmax(theta, axis=-1)
    log_old = log_pi if old_theta is None else log_softmax(old_theta, axis=-1)
    beta = problem.behaviour
    if sampling in ("demonstration", "mixed", "hpt_gate") or est.reference == "behaviour":
        beta = problem.require_behaviour(f"sampling={sampling!r} / reference={est.reference!r}")
    if sampling == "demonstration" and est.reference in ("old", "sequence_geometric"):
        raise ValueError(f"sampling: 'demonstration' rows are not drawn from pi_old, so estimator {est.name!r} "
                         f"(reference={est.reference!r}) cannot use them; use reference 'policy', 'one' or "
                         "'behaviour' (e.g. the 'sft' preset)")
    if sampling == "mixed":
        if est.demo_reference is None:
            raise ValueError(f"sampling: 'mixed' needs an estimator with a demonstration part (demo_reference), "
                             f"e.g. 'luffy' or 'srft'; {est.name!r} has none")
        if G < 2:
            raise ValueError(f"group_size: 'mixed' needs G >= 2 (G-1 rollouts + 1 demonstration), got {G}")
    if sampling == "hpt_gate":
        if not problem.binary:
            raise ValueError("sampling: 'hpt_gate' counts correct rollouts and needs binary rewards")
        gate = GateRule() if gate is None else gate
        if not isinstance(gate, GateRule):
            raise ValueError(f"gate: expected a GateRule, got {type(gate).__name__}")
    elif gate is not None:
        raise ValueError(f"gate: only used with sampling='hpt_gate', got sampling={sampling!r}")
    table = None
    if est.advantage == "given":
        if advantage_table is None:
            raise ValueError(f"advantage_table: estimator {est.name!r} takes given advantages; pass an [X, K] table")
        table = problem.check_logits(advantage_table, "advantage_table")
    elif advantage_table is not None:
        raise ValueError(f"advantage_table: only for estimators with advantage 'given' ({est.name!r} computes its own)")
    sampler = beta if sampling == "demonstration" else np.exp(log_old)
    return _Setup(est, problem, G, sampling, gate, theta, old_theta, log_pi, log_old, sampler, beta, table)


def _check_finite_options(est: UPGE) -> None:
    """Options a finite problem cannot feed: a reference policy (KL), the sampler's own log-probs (rollout
    correction), a quantile over the whole batch (top-entropy mask: the weights stop being per row)."""
    if est.kl_coef > 0:
        raise ValueError(f"estimator: kl_coef={est.kl_coef!r} needs a reference policy, which a FiniteProblem "
                         "does not have; use kl_coef=0")
    if est.rollout_correction != "none":
        raise ValueError(f"estimator: rollout_correction={est.rollout_correction!r} needs the rollout engine's "
                         "log-probs, which a FiniteProblem does not have; use 'none'")
    if est.top_entropy_quantile < 1:
        raise ValueError(f"estimator: top_entropy_quantile={est.top_entropy_quantile!r} couples the rows of a "
                         "batch through a quantile; the exact moments need per-row weights (use 1.0)")


def _check_choice(arg, value, valid):
    if value not in valid:
        raise ValueError(f"{arg}: unknown value {value!r}; valid: {list(valid)}")


# ------------------------------------------------------------------------ weights from the estimator
def _aggregation_scale(est: UPGE, n_rows: int, group_size: int) -> float:
    """Ratio of the estimator's per-row aggregation weight in a group of `group_size` rows to that in one
    call on `n_rows` rows. Row weights are otherwise elementwise, so one call on all (action, advantage)
    pairs times this ratio gives the weights the estimator uses inside a real group."""
    def first(n):
        lp = torch.full((n,), math.log(0.5), dtype=_DT)
        kw = {"behaviour_logp": lp} if est.reference == "behaviour" else {}
        return est.coefficients(lp, lp, torch.ones(n, dtype=_DT), **kw)[0]

    return float(first(group_size) / first(n_rows))


def _row_weights(s: _Setup, actions, adv, demo: bool, est: UPGE | None = None, rows_in_group=None):
    """Estimator weights w for rows of (context x, action a, advantage A); arrays broadcast to one shape
    [X, ...]. Returns numpy weights of that shape, as inside a group of `rows_in_group` (default G)."""
    est = s.est if est is None else est
    X = s.theta.shape[0]
    xs = np.broadcast_to(np.arange(X).reshape((X,) + (1,) * (np.ndim(actions) - 1)), np.shape(actions))
    shape = np.shape(actions)
    lp = torch.from_numpy(np.array(s.log_pi[xs, actions]).reshape(-1))
    old = None if s.old_theta is None else torch.from_numpy(np.array(s.log_old[xs, actions]).reshape(-1))
    A = torch.from_numpy(np.array(np.broadcast_to(adv, shape), dtype=np.float64).reshape(-1))
    kw = {}
    if est.reference == "behaviour":
        with np.errstate(divide="ignore"):
            kw["behaviour_logp"] = torch.from_numpy(np.log(s.beta[xs, actions]).reshape(-1))
    if demo:
        kw["is_demo"] = torch.ones(lp.shape[0], dtype=torch.bool)
    n = lp.shape[0]
    w = est.coefficients(lp, old, A, **kw).numpy()
    return w.reshape(shape) * _aggregation_scale(est, n, s.G if rows_in_group is None else rows_in_group)


def _count_advantages(est: UPGE, G: int) -> np.ndarray:
    """[G+1, 2]: advantage of an incorrect (col 0) / correct (col 1) sample in a group with c correct."""
    R = np.zeros((G + 1, G))
    for c in range(G + 1):
        R[c, :c] = 1.0
    A = _group_advantages(est, R)
    out = np.zeros((G + 1, 2))
    out[1:, 1] = A[1:, 0]
    out[:G, 0] = A[:G, G - 1]
    return out


_BATCH_ADVANTAGES = ("group_center_batch_std_trl", "group_center_token_whiten_verl")


def _one_step_advantages(est: UPGE, rewards: np.ndarray, G: int) -> torch.Tensor:
    """est.advantages of one-step rows (one token each: the lengths of verl's token whitening are 1)."""
    r = torch.from_numpy(np.array(rewards, dtype=np.float64))  # a copy: the input may be a read-only view
    return est.advantages(r, G, lengths=torch.ones_like(r))


def _group_advantages(est: UPGE, R: np.ndarray) -> np.ndarray:
    """est.advantages of each row of R [M, G] as one prompt's group (the batch-statistics advantages
    `_BATCH_ADVANTAGES`: one call per group, a batch of one prompt)."""
    M, G = R.shape
    if est.advantage in _BATCH_ADVANTAGES:
        return np.stack([_one_step_advantages(est, R[m], G).numpy() for m in range(M)])
    return _one_step_advantages(est, R.reshape(-1), G).numpy().reshape(M, G)


# ---------------------------------------------------------------------------------- closed form
def _closed_form(s: _Setup):
    """Per-context conditional moments: see README 2.3. Builds, per context, a list of conditions k
    (probability P_k) each made of blocks b of n_b iid rows from q_b with weight u_b(a)."""
    prob, G, sc = s.problem, s.G, s.sampling
    X, K = prob.rewards.shape
    acts = np.arange(K)
    if not prob.binary:  # per-sample advantages, any reward: one condition
        if s.adv_table is not None:
            A = s.adv_table
        else:
            A = _one_step_advantages(s.est, prob.rewards.reshape(-1), 1).numpy().reshape(X, K)
        u = _row_weights(s, np.broadcast_to(acts, (X, K)), A, demo=False)
        n_roll = G - 1 if sc == "mixed" else G
        blocks = [(np.full((X, 1), float(n_roll)), s.sampler[:, None], u[:, None])]
        if sc == "mixed":
            ud = _row_weights(s, np.broadcast_to(acts, (X, K)), A, demo=True)
            blocks.append((np.ones((X, 1)), s.beta[:, None], ud[:, None]))
        return _assemble(np.ones((X, 1)), blocks, np.exp(s.log_pi))

    succ = prob.rewards  # success probability of each action (0/1 for deterministic binary rewards)
    q_plus, p = _normalise(s.sampler * succ, success=True)
    q_minus, _ = _normalise(s.sampler * (1 - succ))
    cs = np.arange(G + 1)
    act3 = np.broadcast_to(acts, (X, G + 1, K))
    if s.adv_table is not None:
        A_plus = A_minus = np.broadcast_to(s.adv_table[:, None, :], (X, G + 1, K))
    else:
        Ac = _count_advantages(s.est, G)
        A_plus = np.broadcast_to(Ac[None, :, 1, None], (X, G + 1, K))
        A_minus = np.broadcast_to(Ac[None, :, 0, None], (X, G + 1, K))
    u_plus = _row_weights(s, act3, A_plus, demo=False)
    u_minus = _row_weights(s, act3, A_minus, demo=False)
    one = np.ones((X, 1))

    if sc in ("on_policy", "demonstration"):
        P = binom.pmf(cs[None, :], G, p[:, None])
        blocks = [(cs[None, :] * one, q_plus[:, None], u_plus), ((G - cs)[None, :] * one, q_minus[:, None], u_minus)]
        return _assemble(P, blocks, np.exp(s.log_pi))

    if sc == "mixed":
        qb_plus, pb = _normalise(s.beta * succ, success=True)
        qb_minus, _ = _normalise(s.beta * (1 - succ))
        ud_plus = _row_weights(s, act3, A_plus, demo=True)
        ud_minus = _row_weights(s, act3, A_minus, demo=True)
        c_on = np.repeat(np.arange(G), 2)      # conditions k = (c_on, d), d = demonstration correct
        d = np.tile([0, 1], G)
        c_tot = c_on + d
        P = binom.pmf(c_on[None, :], G - 1, p[:, None]) * np.where(d[None, :] == 1, pb[:, None], 1 - pb[:, None])
        qd = np.where(d[None, :, None] == 1, qb_plus[:, None], qb_minus[:, None])
        ud = np.where(d[None, :, None] == 1, ud_plus[:, c_tot], ud_minus[:, c_tot])
        blocks = [(c_on[None, :] * one, q_plus[:, None], u_plus[:, c_tot]),
                  ((G - 1 - c_on)[None, :] * one, q_minus[:, None], u_minus[:, c_tot]),
                  (one * np.ones(2 * G), qd, ud)]
        return _assemble(P, blocks, np.exp(s.log_pi))

    # hpt_gate: SFT on one demonstration (weights of the 'sft' preset on a one-row batch) iff the gate fires
    P = binom.pmf(cs[None, :], G, p[:, None])
    rl = (~s.gate.trains_sft(cs, G)).astype(float)[None, :] * one
    u_sft = s.gate.sft_coef * _row_weights(s, np.broadcast_to(acts, (X, K)), np.ones((X, K)), demo=False,
                                           est=preset("sft"), rows_in_group=1)
    blocks = [(rl * cs[None, :], q_plus[:, None], u_plus), (rl * (G - cs)[None, :], q_minus[:, None], u_minus),
              (1 - rl, s.beta[:, None], u_sft[:, None])]
    return _assemble(P, blocks, np.exp(s.log_pi))


def _normalise(v, success: bool = False):
    """(v / its row sums, the row sums). A success probability is a sum of softmax probabilities, which can
    round to 1 + 1 ulp when every action succeeds; binom.pmf returns NaN for p > 1, so it is clipped."""
    tot = v.sum(-1)
    out = v / np.where(tot > 0, tot, 1.0)[:, None]
    return out, (np.clip(tot, 0.0, 1.0) if success else tot)


def _assemble(P, blocks, pi):
    """Mean [X, K] and second moment [X, K, K] of g = sum_b sum_{j in b} u_b(a_j)(e_{a_j} - pi) given x.

    P: [X, C] condition probabilities. blocks: (n [X, C], q [X, C or 1, K], u [X, C or 1, K]).
    Given k, rows are independent: E[g|k] = sum_b n_b m_b and Cov[g|k] = sum_b n_b (S_b - m_b m_b^T),
    with m_b = t_b - (1.t_b) pi, t_b = q_b u_b, and S_b = E_q[u^2 (e_a - pi)(e_a - pi)^T] determined by
    z_b = q_b u_b^2 (README 2.3). Cost O(X C K) for mean and z, plus one rank-(B+1)C product per context.
    """
    X, C = P.shape
    K = pi.shape[-1]
    mu = np.zeros((X, C, K))
    z = np.zeros((X, K))
    vecs, wts = [], []
    for n, q, u in blocks:
        n = np.broadcast_to(n, (X, C))
        t = q * u
        m = t - t.sum(-1, keepdims=True) * pi[:, None, :]
        m = np.broadcast_to(m, (X, C, K))
        mu += n[..., None] * m
        z += np.einsum("xc,xck->xk", P * n, np.broadcast_to(q * u * u, (X, C, K)))
        vecs.append(m)
        wts.append(-P * n)
    vecs.append(mu)
    wts.append(P)
    mean = np.einsum("xc,xck->xk", P, mu)
    Y = np.concatenate(vecs, axis=1)                  # [X, (B+1)C, K]
    W = np.concatenate(wts, axis=1)                   # [X, (B+1)C]
    second = np.einsum("xn,xnk,xnl->xkl", W, Y, Y, optimize=True)
    zs = z.sum(-1)
    second += np.einsum("xk,kl->xkl", z, np.eye(K)) - z[:, :, None] * pi[:, None, :] - pi[:, :, None] * z[:, None, :]
    second += zs[:, None, None] * pi[:, :, None] * pi[:, None, :]
    return mean, second


# ---------------------------------------------------------------------------------- enumeration
def _enumerate(s: _Setup, max_outcomes: int):
    """Reference: every multiset of group outcomes, each group run through the estimator.

    Outcomes of one row are atoms (action, reward) with probability sampler(a) * P(reward | a).
    Cost: C(N + n - 1, n) groups of n rollouts over N atoms per context (times the demonstration atoms
    for `mixed`, and for the SFT branch of `hpt_gate`), each evaluated in O(G + K).
    """
    prob, G, sc = s.problem, s.G, s.sampling
    X, K = prob.rewards.shape
    n_roll = G - 1 if sc == "mixed" else G
    pi = np.exp(s.log_pi)
    means, seconds = np.zeros((X, K)), np.zeros((X, K, K))
    for x in range(X):
        ra, rr, rp = _atoms(prob, x, s.sampler[x])
        n_groups = math.comb(len(ra) + n_roll - 1, n_roll)
        da, dr, dp = _atoms(prob, x, s.beta[x]) if s.beta is not None else (None, None, None)
        total = n_groups * (len(da) if sc == "mixed" else 1)
        if total > max_outcomes:
            raise ValueError(f"group_size: enumeration needs {total} group outcomes in context {x} "
                             f"(> max_outcomes={max_outcomes}); use the closed form or a smaller G, K")
        combos = np.array(list(itertools.combinations_with_replacement(range(len(ra)), n_roll)), dtype=np.int64)
        combos = combos.reshape(n_groups, n_roll)
        counts = np.zeros((n_groups, len(ra)))
        np.add.at(counts, (np.repeat(np.arange(n_groups), n_roll), combos.reshape(-1)), 1.0)
        with np.errstate(divide="ignore"):
            logp = gammaln(n_roll + 1) - gammaln(counts + 1).sum(1) + (counts * np.log(rp)).sum(1, where=counts > 0)
        P = np.exp(logp)
        acts, rews = ra[combos], rr[combos]
        if sc == "mixed":
            acts = np.concatenate([np.repeat(acts, len(da), 0), np.tile(da, n_groups)[:, None]], 1)
            rews = np.concatenate([np.repeat(rews, len(da), 0), np.tile(dr, n_groups)[:, None]], 1)
            P = np.repeat(P, len(da)) * np.tile(dp, n_groups)
        g = _group_gradients(s, x, acts, rews, demo_last=(sc == "mixed"))
        if sc == "hpt_gate":
            sft = s.gate.trains_sft(rews.sum(1), G)
            # SFT branch: the group's gradient is replaced by one demonstration's, a* ~ beta(x)
            w_sft = s.gate.sft_coef * _row_weights(s, np.broadcast_to(np.arange(K), (X, K)), np.ones((X, K)),
                                                   demo=False, est=preset("sft"), rows_in_group=1)[x]
            g_sft = w_sft[:, None] * (np.eye(K) - pi[x][None, :])
            p_sft = P[sft].sum()
            means[x] += p_sft * (s.beta[x] @ g_sft)
            seconds[x] += p_sft * np.einsum("a,ak,al->kl", s.beta[x], g_sft, g_sft)
            P = np.where(sft, 0.0, P)
        means[x] += P @ g
        seconds[x] += np.einsum("m,mk,ml->kl", P, g, g)
    return means, seconds


def _atoms(prob: FiniteProblem, x: int, dist: np.ndarray):
    """(actions, rewards, probabilities) of one sampled row in context x; zero-probability atoms dropped."""
    K = prob.n_actions
    if prob.stochastic:
        a = np.concatenate([np.arange(K), np.arange(K)])
        r = np.concatenate([np.ones(K), np.zeros(K)])
        p = np.concatenate([dist * prob.rewards[x], dist * (1 - prob.rewards[x])])
    else:
        a, r, p = np.arange(K), prob.rewards[x].copy(), dist.copy()
    keep = p > 0
    return a[keep], r[keep], p[keep]


def _group_gradients(s: _Setup, x: int, acts: np.ndarray, rews: np.ndarray, demo_last: bool) -> np.ndarray:
    """g_hat[x] for each group (row of acts [M, G]), from the estimator's advantages and coefficients."""
    est = s.est
    M, G = acts.shape
    if s.adv_table is not None:
        A = s.adv_table[x][acts]
    else:
        A = _group_advantages(est, rews)
    lp = torch.from_numpy(s.log_pi[x][acts].reshape(-1).copy())
    old = None if s.old_theta is None else torch.from_numpy(s.log_old[x][acts].reshape(-1).copy())
    kw = {}
    if est.reference == "behaviour":
        with np.errstate(divide="ignore"):
            kw["behaviour_logp"] = torch.from_numpy(np.log(s.beta[x][acts]).reshape(-1))
    if demo_last:
        demo = np.zeros((M, G), dtype=bool)
        demo[:, -1] = True
        kw["is_demo"] = torch.from_numpy(demo.reshape(-1))
    w = est.coefficients(lp, old, torch.from_numpy(A.reshape(-1).copy()), **kw).numpy()
    w = w.reshape(M, G) * _aggregation_scale(est, M * G, G)
    K = s.theta.shape[1]
    g = np.zeros((M, K))
    np.add.at(g, (np.repeat(np.arange(M), G), acts.reshape(-1)), w.reshape(-1))
    return g - w.sum(1, keepdims=True) * np.exp(s.log_pi[x])[None, :]


# ---------------------------------------------------------------------------------- sequences
def sequence_moments(estimator: UPGE, problem, logits, group_size: int, *, old_logits=None,
                     max_outcomes: int = 20_000) -> Moments:
    """Exact moments of g_hat for G responses of a `theory.finite.SequenceProblem` (on-policy rollouts
    from pi_old, default pi_theta), by enumeration of every multiset of G responses. Each group is one
    call of `estimator.coefficients` on its [G, T] log-probabilities with the padding mask, so the
    token-level aggregations (token_mean's 1/sum of lengths, seq_mean_token_mean's 1/(G L_i),
    seq_mean_token_sum_norm's 1/T) are those of the code. Target: grad E_pi[r]. Shapes: mean [P, V],
    cov [P*V, P*V] (P prefixes, V tokens). Cost: C(S + G - 1, G) estimator calls, S responses.
    """
    from theory.finite import SequenceProblem

    if not isinstance(estimator, UPGE):
        raise ValueError(f"estimator: expected a theory.estimator.UPGE, got {type(estimator).__name__}")
    if not isinstance(problem, SequenceProblem):
        raise ValueError(f"problem: expected a theory.finite.SequenceProblem, got {type(problem).__name__}")
    group_size = positive_int("group_size", group_size)
    if estimator.advantage == "given" or estimator.reference == "behaviour" or estimator.demo_reference:
        raise ValueError(f"estimator: {estimator.name!r} needs given advantages, a behaviour policy or "
                         "demonstrations, which sequence_moments does not provide")
    G = int(group_size)
    lp_tok = problem.token_logp(logits)
    old_tok = lp_tok if old_logits is None else problem.token_logp(old_logits)
    p_old = np.exp(old_tok.sum(1))
    S = len(problem.sequences)
    n = math.comb(S + G - 1, G)
    if n > max_outcomes:
        raise ValueError(f"group_size: enumeration needs {n} groups (> max_outcomes={max_outcomes})")
    # per-token score vectors: grad_theta log pi(y_t | y_<t) of response s, flattened [P * V]
    pi = np.exp(log_softmax(np.asarray(logits, dtype=np.float64), axis=-1))
    Pn, V = problem.shape
    tok_score = np.zeros(problem.tokens.shape + (Pn * V,))
    for s in range(S):
        for t in range(problem.lengths[s]):
            row = problem.prefix_ids[s, t]
            tok_score[s, t, row * V:(row + 1) * V] -= pi[row]
            tok_score[s, t, row * V + problem.tokens[s, t]] += 1.0
    mean = np.zeros(Pn * V)
    second = np.zeros((Pn * V, Pn * V))
    for combo in itertools.combinations_with_replacement(range(S), G):
        idx = np.array(combo)
        counts = np.bincount(idx, minlength=S)
        prob = math.exp(gammaln(G + 1) - gammaln(counts + 1).sum()) * float(np.prod(p_old[idx]))
        if prob == 0.0:
            continue
        A = estimator.advantages(torch.from_numpy(problem.rewards[idx].copy()), G,
                                 lengths=torch.from_numpy(problem.lengths[idx].astype(np.float64)))
        lp = torch.from_numpy(lp_tok[idx].copy())
        old = None if old_logits is None else torch.from_numpy(old_tok[idx].copy())
        w = estimator.coefficients(lp, old, A, torch.from_numpy(problem.mask[idx].copy())).numpy()
        g = np.einsum("gt,gtd->d", w, tok_score[idx])
        mean += prob * g
        second += prob * np.outer(g, g)
    cov = second - np.outer(mean, mean)
    target = problem.gradient(logits)
    return Moments(mean.reshape(Pn, V), 0.5 * (cov + cov.T), target, Objective(reward=1.0), "on_policy", G,
                   "enumeration")


def length_drift(moments: Moments, problem, logits) -> float:
    """Extra growth of the expected response length per unit step along the normalised mean, compared with
    a unit step along the target: <E g/||E g|| - t/||t||, grad E_pi[L]>. Positive: the estimator lengthens
    responses beyond what the reward gradient asks (Dr. GRPO's length bias, measured)."""
    grad_len = problem.gradient(logits, values=problem.lengths.astype(float))
    m, t = moments.mean, moments.target
    return float(((m / np.linalg.norm(m) - t / np.linalg.norm(t)) * grad_len).sum())
