"""Forgetting between SFT and DPO on the log-linear policy class, computed exactly (float64).

The model (docs/xright.md section 1.2): pi_theta(y | x) = softmax_y(theta . phi[x, y]), features phi [X, Y, d].

    f_sft(theta) = sum_{x,y} S[x,y] * (-log pi_theta(y|x))
    f_dpo(theta) = sum_{x,w,l} P[x,w,l] * softplus(-m),   m = beta * (theta - theta_ref) . (phi[x,w] - phi[x,l])
    f_mix(theta) = lam * f_dpo + (1 - lam) * f_sft            (lam is the DPO weight, as in XRIGHT)

Both are convex (log-sum-exp plus linear; softplus of an affine margin: the partition function cancels
in the DPO log-ratio difference), smooth, with bounded gradients. `LogLinearProblem` gives exact values,
gradients, Hessians, optima (Levenberg-Marquardt Newton on the subspace the objective depends on, each
certified by its gradient norm or refused with OptimumNotCertified), the Pareto front,
the ideal point and the Chebyshev point that MAXRIGHT targets. An instance whose infimum is not attained
(DPO pairs that some direction separates, i.e. no conflicting pairs; SFT targets with zeros that the
class only approaches in the limit) is detected by a linear program and raises `NoFiniteMinimiser`.

`run_schedule` runs any `theory.schedules` schedule with full-batch or minibatch gradient steps and
returns the trajectory and its cost in gradient evaluations. `sequential_lower_bound`,
`alright_rate_bound` and `maxright_bound` are the statements of theory/README.md section 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from scipy.optimize import brentq, linprog
from scipy.special import expit, log_softmax

from theory._checks import unit_interval
from theory.schedules import Schedule, cost

__all__ = ["LogLinearProblem", "NoFiniteMinimiser", "OptimumNotCertified", "ParetoFront", "Run", "run_schedule",
           "gd_batch", "sequential_final", "alright_step", "maxright_bound",
           "random_problem", "toy_problem", "SequentialBound", "sequential_lower_bound",
           "alright_rate_bound", "maxright_bound"]

_SUM_TOL = 1e-9


class NoFiniteMinimiser(ValueError):
    """The objective's infimum is not attained: some direction decreases it for ever."""


class OptimumNotCertified(RuntimeError):
    """The solver could not bring the gradient norm below the stated tolerance (it says so, never silently)."""


class ParetoFront(NamedTuple):
    lams: np.ndarray     # [n] DPO weights
    thetas: np.ndarray   # [n, d] argmin of f_mix,lam
    f_sft: np.ndarray    # [n]
    f_dpo: np.ndarray    # [n]


def _float_array(a, name: str) -> np.ndarray:
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a real array, got {type(a).__name__}") from None


def _distribution(a, name: str, shape: tuple[int, ...]) -> np.ndarray:
    a = _float_array(a, name)
    if a.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{name}: expected finite non-negative weights")
    if abs(a.sum() - 1.0) > _SUM_TOL:
        raise ValueError(f"{name}: expected weights summing to one, got sum {a.sum():.12g}")
    return a


class LogLinearProblem:
    """SFT and DPO objectives of a log-linear policy, exact in float64.

    features [X, Y, d]; sft_weights S [X, Y] (a joint distribution over (context, target));
    pref_weights P [X, Y, Y] with P[x, w, l] the weight of the pair (x, y_w = w, y_l = l), zero diagonal;
    beta > 0; theta_ref [d] (None: zeros) defines pi_ref = pi_{theta_ref}.
    Methods take theta [d] or a batch [..., d] and return [...]-shaped values.
    """

    def __init__(self, features, sft_weights, pref_weights, beta: float = 0.1, theta_ref=None):
        phi = _float_array(features, "features")
        if phi.ndim != 3 or min(phi.shape) < 1 or phi.shape[1] < 2:
            raise ValueError(f"features: expected shape [X, Y >= 2, d], got {phi.shape}")
        if not np.all(np.isfinite(phi)):
            raise ValueError("features: expected finite values")
        X, Y, d = phi.shape
        S = _distribution(sft_weights, "sft_weights", (X, Y))
        P = _distribution(pref_weights, "pref_weights", (X, Y, Y))
        if np.any(np.einsum("xyy->xy", P) != 0):
            raise ValueError("pref_weights: pairs with y_w == y_l (the diagonal) must have weight zero")
        if isinstance(beta, bool) or not isinstance(beta, (int, float, np.integer, np.floating)) \
                or not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta: expected a positive number, got {beta!r}")
        ref = np.zeros(d) if theta_ref is None else _float_array(theta_ref, "theta_ref")
        if ref.shape != (d,) or not np.all(np.isfinite(ref)):
            raise ValueError(f"theta_ref: expected a finite vector of shape ({d},), got shape {ref.shape}")
        self.phi, self.S, self.P, self.beta, self.theta_ref = phi, S, P, float(beta), ref
        self.dim = d
        self.ctx_mass = S.sum(axis=1)                       # s_x
        self.sft_mean = np.einsum("xy,xyd->d", S, phi)      # sum S phi
        x, w, l = np.nonzero(P)
        self.pair_w = P[x, w, l]                            # [K]
        self.pair_diff = phi[x, w] - phi[x, l]              # [K, d]
        self._exists: dict[str, tuple[bool, str]] = {}
        self._opt_cache: dict[float, tuple[np.ndarray, float]] = {}
        self._constants: dict[str, float] | None = None

    # ---- values and derivatives -------------------------------------------------------------------
    def _theta(self, theta, name: str = "theta", finite: bool = False) -> np.ndarray:
        """theta as float64 [..., d]; `finite` for starting points (evaluations let inf through: diverged runs)."""
        try:
            t = np.asarray(theta, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a real array of shape [..., {self.dim}]") from None
        if t.ndim < 1 or t.shape[-1] != self.dim:
            raise ValueError(f"{name}: expected shape [..., {self.dim}], got {t.shape}")
        if finite and not np.all(np.isfinite(t)):
            raise ValueError(f"{name}: expected finite values")
        return t

    def log_policy(self, theta) -> np.ndarray:
        """log pi_theta(y | x): [..., X, Y]."""
        return log_softmax(np.einsum("xyd,...d->...xy", self.phi, self._theta(theta)), axis=-1)

    def f_sft(self, theta) -> np.ndarray:
        return -np.einsum("xy,...xy->...", self.S, self.log_policy(theta))

    def grad_sft(self, theta) -> np.ndarray:
        pi = np.exp(self.log_policy(theta))
        return np.einsum("x,...xy,xyd->...d", self.ctx_mass, pi, self.phi) - self.sft_mean

    def hess_sft(self, theta) -> np.ndarray:
        """sum_x s_x Cov_{pi(.|x)}(phi[x, .]): theta [..., d] -> [..., d, d]."""
        pi = np.exp(self.log_policy(theta))
        mean = np.einsum("...xy,xyd->...xd", pi, self.phi)
        second = np.einsum("x,...xy,xyd,xye->...de", self.ctx_mass, pi, self.phi, self.phi)
        return second - np.einsum("x,...xd,...xe->...de", self.ctx_mass, mean, mean)

    def margins(self, theta) -> np.ndarray:
        """DPO margins m_k = beta (theta - theta_ref) . (phi_w - phi_l) for the pairs with weight: [..., K]."""
        return self.beta * (self._theta(theta) - self.theta_ref) @ self.pair_diff.T

    def f_dpo(self, theta) -> np.ndarray:
        return np.logaddexp(0.0, -self.margins(theta)) @ self.pair_w

    def grad_dpo(self, theta) -> np.ndarray:
        return -self.beta * (expit(-self.margins(theta)) * self.pair_w) @ self.pair_diff

    def hess_dpo(self, theta) -> np.ndarray:
        """sum_k p_k beta^2 sigma(m_k) sigma(-m_k) diff_k diff_k^T: theta [..., d] -> [..., d, d]."""
        m = self.margins(theta)
        c = self.beta**2 * self.pair_w * expit(m) * expit(-m)
        return np.einsum("...k,kd,ke->...de", c, self.pair_diff, self.pair_diff)

    def f_mix(self, theta, lam: float) -> np.ndarray:
        lam = unit_interval("lam", lam)
        return lam * self.f_dpo(theta) + (1.0 - lam) * self.f_sft(theta)

    def grad_mix(self, theta, lam: float) -> np.ndarray:
        lam = unit_interval("lam", lam)
        return lam * self.grad_dpo(theta) + (1.0 - lam) * self.grad_sft(theta)

    # ---- constants used by the bounds ---------------------------------------------------------------
    def constants(self) -> dict[str, float]:
        """Gradient and smoothness bounds valid for every theta.

        D_sft: max over contexts with mass of the diameter of {phi[x, y]}_y, so ||grad f_sft|| <= D_sft.
        D_dpo: max ||phi_w - phi_l|| over weighted pairs, so ||grad f_dpo|| <= beta D_dpo.
        L_sft = sum_x s_x diam_x^2 / 4 >= ||hess f_sft|| (a variance on a set of diameter D is <= D^2/4).
        L_dpo = beta^2 / 4 * ||sum_k p_k diff_k diff_k^T|| >= ||hess f_dpo|| (sigma(m) sigma(-m) <= 1/4).
        """
        if self._constants is None:  # the optimiser asks for them at every call
            self._constants = self._compute_constants()
        return dict(self._constants)

    def _compute_constants(self) -> dict[str, float]:
        diam = np.array([np.max(np.linalg.norm(f[:, None] - f[None], axis=-1)) for f in self.phi])
        live = self.ctx_mass > 0
        D_sft = float(diam[live].max())
        D_dpo = float(np.linalg.norm(self.pair_diff, axis=1).max())
        L_sft = float(np.sum(self.ctx_mass * diam**2) / 4)
        M = np.einsum("k,kd,ke->de", self.pair_w, self.pair_diff, self.pair_diff)
        L_dpo = float(self.beta**2 / 4 * np.linalg.eigvalsh(M)[-1])
        return {"D_sft": D_sft, "D_dpo": D_dpo, "G_sft": D_sft, "G_dpo": self.beta * D_dpo,
                "L_sft": L_sft, "L_dpo": L_dpo}

    # ---- existence of a finite minimiser -------------------------------------------------------------
    def _recession_rows(self, lam: float) -> np.ndarray:
        """Rows r with f_mix non-increasing along v iff r . v <= 0 for all r (the recession cone)."""
        rows = []
        if lam < 1:
            for x in np.nonzero(self.ctx_mass > 0)[0]:
                for y in np.nonzero(self.S[x] > 0)[0]:       # a target must stay among the top logits
                    rows.append(self.phi[x] - self.phi[x, y])
        if lam > 0:
            rows.append(-self.pair_diff)                      # every weighted margin must not shrink
        return np.concatenate([np.reshape(r, (-1, self.dim)) for r in rows], axis=0)

    def finite_minimiser(self, lam: float) -> tuple[bool, str]:
        """Is inf f_mix,lam attained? (True, "") or (False, why).

        f_mix is a sum of log-sum-exp / softplus terms of affine maps, so its infimum is attained iff
        every direction v of recession (all rows r of `_recession_rows` have r . v <= 0) keeps f constant
        (r . v = 0 for all r). An LP looks for v in the box [-1, 1]^d maximising sum_r -r . v subject to
        r . v <= 0; a positive optimum is a direction along which f decreases for ever.
        """
        lam = unit_interval("lam", lam)
        key = "sft" if lam == 0 else ("dpo" if lam == 1 else "mix")
        if key not in self._exists:
            R = self._recession_rows(lam)
            res = linprog(c=R.sum(axis=0), A_ub=R, b_ub=np.zeros(len(R)), bounds=[(-1, 1)] * self.dim,
                          method="highs")
            scale = 1.0 + np.abs(R).sum()
            if res.status != 0:
                raise RuntimeError(f"existence LP failed: {res.message}")
            if -res.fun > 1e-9 * scale:
                v = res.x
                why = []
                if lam < 1 and np.any(self.S == 0):
                    why.append("SFT targets with zero weight that the class can only approach in the limit")
                if lam > 0:
                    why.append("DPO pairs without conflicts (some direction grows every weighted margin)")
                self._exists[key] = (False, f"f_mix,lam={lam:g} decreases for ever along v={np.round(v, 4)}: "
                                     + " or ".join(why))
            else:
                self._exists[key] = (True, "")
        return self._exists[key]

    # ---- optima ------------------------------------------------------------------------------------
    def _basis(self, lam: float) -> np.ndarray:
        """Orthonormal basis [d, r] of the directions f_mix,lam depends on (zero-loss directions removed)."""
        rows = []
        if lam < 1:
            live = self.ctx_mass > 0
            rows.append((self.phi[live] - self.phi[live][:, :1]).reshape(-1, self.dim))
        if lam > 0:
            rows.append(self.pair_diff)
        R = np.concatenate(rows, axis=0)
        if R.size == 0:
            return np.zeros((self.dim, 0))
        _, sv, vt = np.linalg.svd(R, full_matrices=False)
        rank = int(np.sum(sv > sv.max() * 1e-12)) if sv.size and sv.max() > 0 else 0
        return vt[:rank].T

    def optimum(self, lam: float, theta0=None) -> tuple[np.ndarray, float]:
        """(theta*, f*) minimising lam f_dpo + (1 - lam) f_sft; theta* is the minimiser of least norm.

        Certified: ||grad f_mix,lam(theta*)|| <= `gradient_tolerance(lam)` = 1e-9 (1 + G), G the bound on
        the gradient norm (`constants`), or OptimumNotCertified is raised with the norm reached. Solver:
        Levenberg-Marquardt Newton (`_minimise`) in the coordinates of `_basis`, which crosses the flat
        regions of saturated sigmoids and softmaxes, from theta0 if given, else from the better of theta = 0
        and theta_ref (where every DPO margin is 0), the other start being the fallback. Raises
        NoFiniteMinimiser when the infimum is not attained.
        """
        lam = unit_interval("lam", lam)
        if theta0 is None and lam in self._opt_cache:
            t, v = self._opt_cache[lam]
            return t.copy(), v
        ok, why = self.finite_minimiser(lam)
        if not ok:
            raise NoFiniteMinimiser(why)
        B = self._basis(lam)
        f = lambda z: float(self.f_mix(B @ z, lam))  # noqa: E731
        if theta0 is not None:
            starts = [B.T @ self._theta(theta0, "theta0", finite=True)]
        else:  # theta = 0, and for DPO theta_ref's part in the basis (margins 0: no saturation there)
            starts = [np.zeros(B.shape[1])] + ([B.T @ self.theta_ref] if lam > 0 else [])
            starts.sort(key=f)
        tol = self.gradient_tolerance(lam)
        best = None
        for z0 in starts:
            th = B @ self._minimise(lam, B, z0, tol)
            gn = float(np.linalg.norm(self.grad_mix(th, lam)))
            if best is None or gn < best[1]:
                best = (th, gn)
            if gn <= tol:
                break
        th, gn = best
        if gn > tol:
            raise OptimumNotCertified(f"lam: the minimiser of f_mix,lam={lam:g} was not certified: "
                                      f"||grad|| = {gn:.3g} > {tol:.3g} after Levenberg-Marquardt from every start")
        out = (th, float(self.f_mix(th, lam)))
        if theta0 is None:
            self._opt_cache[lam] = (th.copy(), out[1])
        return out

    def gradient_tolerance(self, lam: float) -> float:
        """The certificate of `optimum`: 1e-9 (1 + lam G_dpo + (1 - lam) G_sft), G the gradient bounds."""
        c = self.constants()
        return 1e-9 * (1.0 + lam * c["G_dpo"] + (1.0 - lam) * c["G_sft"])

    def _minimise(self, lam: float, B: np.ndarray, z: np.ndarray, tol: float, max_iter: int = 500) -> np.ndarray:
        """Levenberg-Marquardt on f(B z): steps -(H + mu I)^-1 g with mu adapted by the agreement of f with
        its quadratic model. mu = 0 is Newton's method (quadratic convergence near the optimum, where the
        Hessian is positive definite in the basis); a large mu is a short gradient step, which always
        decreases f (mu >= L, the Hessian bound). On saturated sigmoids the Hessian vanishes while the
        gradient does not: rejected steps raise mu, accepted ones lower it, so the steps grow geometrically
        across the plateau. Near the optimum f differences drown in rounding, so a step is also accepted
        when f stays level and the gradient shrinks. Stops once certified (||g|| <= tol) and no longer
        improving fast (at rounding level), or when even tiny steps fail; the caller checks the certificate.
        """
        if B.shape[1] == 0:
            return z
        c = self.constants()
        L = max(lam * c["L_dpo"] + (1 - lam) * c["L_sft"], 1e-300)
        f = lambda z: float(self.f_mix(B @ z, lam))  # noqa: E731
        grad = lambda z: B.T @ self.grad_mix(B @ z, lam)  # noqa: E731
        fz, g, mu = f(z), grad(z), 0.0
        for _ in range(max_iter):
            gn = float(np.linalg.norm(g))
            if gn == 0.0:
                break
            th = B @ z
            ev, V = np.linalg.eigh(B.T @ (lam * self.hess_dpo(th) + (1 - lam) * self.hess_sft(th)) @ B)
            ev, Vg = np.clip(ev, 0.0, None), V.T @ g
            while mu <= 1e12 * L:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # huge trial steps: rejected
                    step = -V @ (Vg / np.maximum(ev + mu, 1e-300))
                    pred = -float(g @ step) - 0.5 * float(np.sum(ev * (V.T @ step) ** 2))  # model decrease > 0
                    z_new = z + step
                    f_new = f(z_new) if np.isfinite(pred) else np.nan
                if np.isfinite(f_new) and f_new <= fz - 1e-4 * pred:
                    g_new = grad(z_new)
                    break
                if np.isfinite(f_new) and abs(f_new - fz) <= 1e-14 * (1.0 + abs(fz)):
                    g_new = grad(z_new)  # f level at rounding: judge by the gradient instead
                    if np.linalg.norm(g_new) < gn:
                        break
                if gn <= tol:  # certified, and the step does not improve: done
                    return z
                mu = max(8.0 * mu, 1e-12 * L)
            else:
                return z  # no step decreases f, even a tiny gradient step: rounding level
            gn_new = float(np.linalg.norm(g_new))
            if gn_new <= tol and gn_new > 0.1 * gn:  # certified, and no longer converging fast: rounding level
                return z_new
            z, fz, g = z_new, f_new, g_new
            mu = mu / 4.0 if mu > 1e-10 * L else 0.0
        return z

    def gap_mix(self, theta, lam: float) -> np.ndarray:
        """f_mix,lam(theta) - f*_mix,lam (>= 0)."""
        return self.f_mix(theta, lam) - self.optimum(lam)[1]

    def ideal_point(self) -> np.ndarray:
        """(f*_sft, f*_dpo): the separate minima."""
        return np.array([self.optimum(0.0)[1], self.optimum(1.0)[1]])

    def pareto_front(self, lams: Sequence[float]) -> ParetoFront:
        """argmin f_mix,lam and its (f_sft, f_dpo) for each lam."""
        lams = np.array([unit_interval("lam", v) for v in np.atleast_1d(lams)])
        thetas = np.stack([self.optimum(v)[0] for v in lams]) if lams.size else np.zeros((0, self.dim))
        return ParetoFront(lams, thetas, self.f_sft(thetas), self.f_dpo(thetas))

    def chebyshev_gap(self, theta, lam: float) -> np.ndarray:
        """MAXRIGHT's objective: max(lam (f_dpo - f*_dpo), (1 - lam) (f_sft - f*_sft))."""
        lam = unit_interval("lam", lam)
        ideal = self.ideal_point()
        return np.maximum(lam * (self.f_dpo(theta) - ideal[1]), (1 - lam) * (self.f_sft(theta) - ideal[0]))

    def chebyshev_point(self, lam: float, return_weight: bool = False):
        """(theta_c, h*) minimising `chebyshev_gap`; with return_weight also the mix weight mu of theta_c.

        The minimiser lies on the Pareto front theta*_mu = argmin f_mix,mu where the two weighted gaps are
        equal (theory/README.md s3): the DPO gap falls and the SFT gap rises with mu, so Brent's method
        finds mu. At lam = 0 (or 1) any SFT (DPO) optimum has h = 0; the SFT (DPO) optimum is returned.
        """
        lam = unit_interval("lam", lam)
        ideal = self.ideal_point()

        def h(mu):
            th = self.optimum(mu)[0]
            return lam * (self.f_dpo(th) - ideal[1]) - (1 - lam) * (self.f_sft(th) - ideal[0])

        if lam == 0 or h(0.0) <= 0:
            mu = 0.0
        elif lam == 1 or h(1.0) >= 0:
            mu = 1.0
        else:
            mu = brentq(lambda m: h(float(m)), 0.0, 1.0, xtol=1e-14, rtol=1e-15, maxiter=200)
        th = self.optimum(mu)[0]
        val = float(self.chebyshev_gap(th, lam))
        return (th, val, mu) if return_weight else (th, val)

    # ---- minibatch gradients ---------------------------------------------------------------------
    def sample_sft(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.choice(self.S.size, size=n, p=self.S.ravel())
        return np.unravel_index(idx, self.S.shape)

    def sample_pairs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.choice(len(self.pair_w), size=n, p=self.pair_w / self.pair_w.sum())

    def minibatch_sft(self, theta, xs, ys) -> tuple[float, np.ndarray]:
        """Mean -log pi(y|x) over the batch and its gradient (an unbiased estimate of f_sft, grad f_sft)."""
        logits = self.phi[xs] @ theta                      # [B, Y]
        logp = log_softmax(logits, axis=-1)
        pi = np.exp(logp)
        g = np.einsum("by,byd->d", pi, self.phi[xs]) / len(xs) - self.phi[xs, ys].mean(axis=0)
        return float(-logp[np.arange(len(xs)), ys].mean()), g

    def minibatch_dpo(self, theta, ks) -> tuple[float, np.ndarray]:
        m = self.beta * self.pair_diff[ks] @ (theta - self.theta_ref)
        g = -self.beta * expit(-m) @ self.pair_diff[ks] / len(ks)
        return float(np.logaddexp(0.0, -m).mean()), g


# ---- instances -------------------------------------------------------------------------------------
def toy_problem() -> LogLinearProblem:
    """The 2-D instance of docs/xright.md section 4 [ours, not the paper's]: one prompt, three responses,
    phi = (1,0), (0,1), (0,0); SFT target (0.2, 0.7, 0.1); DPO on all ordered pairs weighted by
    Bradley-Terry probabilities of the reward r = (2, 0, 1); beta = 1, theta_ref = 0. SFT favours y2 and
    DPO y1: theta*_sft = (log 2, log 7), theta*_dpo = (1, -1)."""
    phi = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    S = np.array([[0.2, 0.7, 0.1]])
    r = np.array([2.0, 0.0, 1.0])
    P = expit(r[:, None] - r[None, :])
    np.fill_diagonal(P, 0.0)
    return LogLinearProblem(phi, S, P[None] / P.sum(), beta=1.0)


def random_problem(seed: int, n_contexts: int = 3, n_responses: int = 4, dim: int = 2, beta: float = 1.0,
                   reward_scale: float = 2.0) -> LogLinearProblem:
    """A random instance with finite minimisers: Gaussian features, a full-support Dirichlet SFT target,
    and every ordered pair weighted by Bradley-Terry probabilities of a random reward (so each pair
    appears in both orders: the DPO data always conflicts)."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(size=(n_contexts, n_responses, dim))
    S = rng.dirichlet(np.ones(n_responses), size=n_contexts) * rng.dirichlet(np.ones(n_contexts))[:, None]
    r = reward_scale * rng.normal(size=(n_contexts, n_responses))
    P = expit(r[:, :, None] - r[:, None, :])
    P[:, np.arange(n_responses), np.arange(n_responses)] = 0.0
    return LogLinearProblem(phi, S / S.sum(), P / P.sum(), beta=beta)


# ---- runs of schedules ---------------------------------------------------------------------------
@dataclass
class Run:
    """A trajectory: theta and the exact (f_sft, f_dpo) at steps 0..T, the weights used at each step
    and the cumulative number of gradient evaluations (one per objective with non-zero weight)."""

    schedule: str
    thetas: np.ndarray        # [T + 1, d]
    f_sft: np.ndarray         # [T + 1]
    f_dpo: np.ndarray         # [T + 1]
    weights: np.ndarray       # [T, 2]: (sft, dpo) weight of each step
    grad_evals: np.ndarray    # [T + 1] cumulative
    value_evals: int = 0      # objective evaluations the schedule asked for (MAXRIGHT's refreshes)
    extra: dict = field(default_factory=dict)

    @property
    def theta(self) -> np.ndarray:
        return self.thetas[-1]

    def averaged_theta(self) -> np.ndarray:
        """Mean of theta_0..theta_{T-1} (the iterate of the SGD rate)."""
        return self.thetas[:-1].mean(axis=0)


def _lr_fn(lr) -> Callable[[int], float]:
    if callable(lr):
        return lr
    if not (np.isscalar(lr) and np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr: expected a positive number or a function of the step, got {lr!r}")
    return lambda t: float(lr)


def run_schedule(problem: LogLinearProblem, schedule: Schedule, steps: int, theta0, lr,
                 batch_size: int | None = None, seed: int = 0, start_step: int = 0) -> Run:
    """Gradient steps theta <- theta - lr(t) * sum_i w_i(t) g_i(theta) for t = start_step .. start_step+steps-1.

    g_i is the exact gradient (batch_size=None) or a minibatch estimate from batch_size samples of S or
    of the pairs P (drawn with numpy Generator(seed)). Schedules with `needs_values` (MAXRIGHT) get exact
    values (full batch) or the current minibatch losses at their refresh steps, and `observe` the
    pre-update value of the objective they chose, as the released code does.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps: expected a non-negative integer, got {steps!r}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
    lr = _lr_fn(lr)
    theta = problem._theta(theta0, "theta0", finite=True).copy()
    if theta.shape != (problem.dim,):
        raise ValueError(f"theta0: expected shape ({problem.dim},), got {theta.shape}")
    rng = np.random.default_rng(seed)
    wants_values = hasattr(schedule, "needs_values")
    thetas, weights, evals = [theta.copy()], [], [0]
    n_values = 0
    for t in range(start_step, start_step + steps):
        if batch_size is None:
            vals = {"sft": lambda th: float(problem.f_sft(th)), "dpo": lambda th: float(problem.f_dpo(th))}
            grads = {"sft": problem.grad_sft, "dpo": problem.grad_dpo}
        else:
            xs, ys = problem.sample_sft(rng, batch_size)
            ks = problem.sample_pairs(rng, batch_size)
            mb = {"sft": lambda th, xs=xs, ys=ys: problem.minibatch_sft(th, xs, ys),
                  "dpo": lambda th, ks=ks: problem.minibatch_dpo(th, ks)}
            vals = {k: (lambda th, f=f: f(th)[0]) for k, f in mb.items()}
            grads = {k: (lambda th, f=f: f(th)[1]) for k, f in mb.items()}
        stats = None
        if wants_values and schedule.needs_values(t):
            stats = {"f_sft": vals["sft"](theta), "f_dpo": vals["dpo"](theta)}
            n_values += 2
        w = schedule.weights(t, stats)
        g = np.zeros_like(theta)
        for name, wi in w.items():
            if wi != 0.0:
                g += wi * grads[name](theta)
                if wants_values:
                    schedule.observe(name, vals[name](theta))
        theta = theta - lr(t) * g
        thetas.append(theta.copy())
        weights.append([w.get("sft", 0.0), w.get("dpo", 0.0)])
        evals.append(evals[-1] + cost(w))
    th = np.array(thetas)
    return Run(schedule.describe(), th, problem.f_sft(th), problem.f_dpo(th),
               np.array(weights).reshape(-1, 2), np.array(evals), n_values)


# ---- theory: the statements of theory/README.md section 3 ---------------------------------------
def _objective_lam(name: str) -> float:
    if name not in ("sft", "dpo"):
        raise ValueError(f"order: objective names must be 'sft' or 'dpo', got {name!r}")
    return 0.0 if name == "sft" else 1.0


def gd_batch(problem: LogLinearProblem, name: str, thetas, lr: float, steps) -> np.ndarray:
    """Full-batch gradient descent on one objective for a batch of starts [B, d]; row b takes steps[b]
    steps (an int applies to all). Returns [B, d]. Vectorised: the sequential splits use it."""
    th = np.array(thetas, dtype=np.float64, ndmin=2)
    n = np.broadcast_to(np.asarray(steps), (th.shape[0],))
    grad = problem.grad_sft if name == "sft" else problem.grad_dpo
    for t in range(int(n.max(initial=0))):
        live = n > t
        th[live] -= lr * grad(th[live])
    return th


def sequential_final(problem: LogLinearProblem, order: Sequence[str], lr: float, theta0,
                     total_steps: int, first_steps) -> np.ndarray:
    """theta after Sequential(stages=[(order[0], n1), (order[1], total_steps - n1)]) with full-batch GD,
    for every n1 in first_steps: [len(first_steps), d]. Same arithmetic as run_schedule, vectorised."""
    n1 = np.asarray(first_steps, dtype=int)
    if np.any(n1 < 0) or np.any(n1 > total_steps):
        raise ValueError(f"first_steps: expected integers in [0, {total_steps}]")
    _objective_lam(order[0]), _objective_lam(order[1])
    path = gd_batch(problem, order[0], np.tile(problem._theta(theta0), (len(n1), 1)), lr, n1)
    return gd_batch(problem, order[1], path, lr, total_steps - n1)


@dataclass
class SequentialBound:
    """A lower bound on f_mix,lam(theta_seq) - f*_mix,lam valid for every split (n1, n2) of every budget."""

    bound: float              # the certified lower bound (theory/README.md s3, Theorem 1)
    asymptotic_gap: float     # gap at the second objective's optimum: the limit for any fixed split fraction
    gradient_bound: float     # closed-form lower bound on asymptotic_gap: w_A^2 ||grad f_A(theta*_B)||^2 / (2L)
    first_steps: int          # I: stage-1 steps enumerated
    second_steps: int         # J: stage-2 steps enumerated
    parts: dict               # the four minima whose smallest is `bound`


def sequential_lower_bound(problem: LogLinearProblem, lam: float, order: Sequence[str], lr: float, theta0,
                           min_stage_steps: int = 0, rel_tol: float = 0.02,
                           max_steps: int = 20000) -> SequentialBound:
    """Certificate that Sequential training order[0] -> order[1] (full-batch GD, step lr <= 2/L of each
    objective) stays at least `bound` above f*_mix,lam, whatever the split and the budget; with
    min_stage_steps = m, for every split that gives each stage at least m steps (the paper's regime).

    Enumerates stage 1 for I steps (until G ||theta_I - theta*_A|| <= rel_tol * gap(theta*_B)), runs
    stage 2 from each theta_i (i < I) and from theta*_A for J steps, and closes the infinite tails with
    Fejer monotonicity and non-expansiveness of gradient steps (proof in theory/README.md s3).
    """
    lam = unit_interval("lam", lam)
    if len(order) != 2 or order[0] == order[1]:
        raise ValueError(f"order: expected ('sft', 'dpo') or ('dpo', 'sft'), got {order!r}")
    A, B = order
    lam_A, lam_B = _objective_lam(A), _objective_lam(B)
    c = problem.constants()
    if not (np.isscalar(lr) and 0 < lr <= 2.0 / max(c["L_" + A], c["L_" + B])):
        raise ValueError(f"lr: the bound needs 0 < lr <= 2 / max(L_{A}, L_{B}) = "
                         f"{2.0 / max(c['L_' + A], c['L_' + B]):.4g}, got {lr!r}")
    theta0 = problem._theta(theta0)
    G = lam * c["G_dpo"] + (1 - lam) * c["G_sft"]
    L = lam * c["L_dpo"] + (1 - lam) * c["L_sft"]
    th_A, th_B = problem.optimum(lam_A)[0], problem.optimum(lam_B)[0]
    gap = lambda th: problem.gap_mix(th, lam)  # noqa: E731
    gap_B = float(gap(th_B))
    gn_B = float(np.linalg.norm(problem.grad_mix(th_B, lam)))
    w_A = lam if A == "dpo" else 1 - lam
    grad_A = problem.grad_dpo(th_B) if A == "dpo" else problem.grad_sft(th_B)
    closed = float(w_A**2 * np.sum(grad_A**2) / (2 * L)) if L > 0 else 0.0

    def lower(g_w, gn_w, r):  # lower bound on the gap over the ball of radius r around w
        return np.maximum(g_w - G * r, g_w - gn_w * r - L * r**2 / 2)

    if gap_B <= 0:
        return SequentialBound(0.0, gap_B, closed, 0, 0, {})
    target = rel_tol * gap_B / G
    m = int(min_stage_steps)
    if m < 0:
        raise ValueError(f"min_stage_steps: expected a non-negative integer, got {min_stage_steps!r}")
    # stage 1: theta_m .. theta_{m+I}
    grad_first = problem.grad_sft if A == "sft" else problem.grad_dpo
    th = gd_batch(problem, A, theta0, lr, m)[0]
    path = [th.copy()]
    while np.linalg.norm(th - th_A) > target and len(path) <= max_steps:
        th = th - lr * grad_first(th)
        path.append(th.copy())
    e_I = float(np.linalg.norm(path[-1] - th_A))
    starts = np.array(path[:-1] + [th_A])                  # rows 0..I-1: theta_i; last row: theta*_A
    I = len(path) - 1
    grad_second = problem.grad_sft if B == "sft" else problem.grad_dpo
    z = starts.copy()
    a = np.inf          # min exact gap over i < I, j < J
    c1 = np.inf         # min over j < J of the lower bound around w_j = G_B^j theta*_A, radius e_I
    J = 0
    while True:
        if J >= m:  # only stage-2 lengths j >= m count
            g = gap(z)
            if I:
                a = min(a, float(g[:-1].min()))
            gn_w = float(np.linalg.norm(problem.grad_mix(z[-1], lam)))
            c1 = min(c1, float(lower(g[-1], gn_w, e_I)))
        dist = np.linalg.norm(z - th_B, axis=1)
        if J >= m and (dist.max() + e_I <= target or J >= max_steps + m):
            break
        z = z - lr * grad_second(z)
        J += 1
    b = float(lower(gap_B, gn_B, dist[:-1]).min()) if I else np.inf   # i < I, j >= J
    c2 = float(lower(gap_B, gn_B, dist[-1] + e_I))                    # i >= I, j >= J
    parts = {"enumerated": a, "second_tail": b, "first_tail": c1, "both_tails": c2}
    return SequentialBound(max(0.0, min(parts.values())), gap_B, closed, I, J, parts)


def alright_step(problem: LogLinearProblem, lam: float, theta0, T: int) -> float:
    """The step of Theorem 2: min(1 / (2 L_mix), R / (sigma sqrt(T)))."""
    b = alright_rate_bound(problem, lam, theta0, T, lr=None)
    return b["lr"]


def alright_rate_bound(problem: LogLinearProblem, lam: float, theta0, T: int, lr: float | None) -> dict:
    """Theorem 2 (ALRIGHT is SGD on f_mix): with constant step lr <= 1/(2 L_mix) for T steps,
    E f_mix(mean(theta_0..theta_{T-1})) - f* <= R^2 / (lr T) + lr sigma^2, where R = ||theta_0 - theta*||
    and sigma^2 = lam (1 - lam) (G_dpo + G_sft)^2 bounds the selection variance. lr=None takes
    min(1/(2L), R / (sigma sqrt T)), giving <= 2 R sigma / sqrt(T) once T is large."""
    lam = unit_interval("lam", lam)
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T: expected a positive integer, got {T!r}")
    c = problem.constants()
    L = lam * c["L_dpo"] + (1 - lam) * c["L_sft"]
    sigma2 = lam * (1 - lam) * (c["G_dpo"] + c["G_sft"]) ** 2
    R = float(np.linalg.norm(problem._theta(theta0) - problem.optimum(lam)[0]))
    cap = 1.0 / (2 * L)
    if lr is None:
        lr = cap if sigma2 == 0 else min(cap, R / np.sqrt(sigma2 * T))
    elif not (np.isscalar(lr) and 0 < lr <= cap):
        raise ValueError(f"lr: the bound needs 0 < lr <= 1/(2 L_mix) = {cap:.4g}, got {lr!r}")
    return {"lr": float(lr), "R": R, "sigma2": sigma2, "L": L, "bound": R**2 / (lr * T) + lr * sigma2}


def maxright_bound(problem: LogLinearProblem, lam: float, theta0, lrs) -> float:
    """Theorem 3: exact MAXRIGHT (k = 1, full batch) with steps lrs[0..T-1] satisfies
    min_{t<T} h(theta_t) - h* <= (R^2 + G_h^2 sum a_t^2) / (2 sum a_t), h = `chebyshev_gap`,
    R = ||theta_0 - theta_c||, G_h = max(lam G_dpo, (1 - lam) G_sft), using
    sum a_t >= sum lrs / max(lam, 1 - lam) and sum a_t^2 <= sum lrs^2 / min(lam, 1 - lam)^2."""
    lam = unit_interval("lam", lam)
    if not 0 < lam < 1:
        raise ValueError(f"lam: the MAXRIGHT bound needs lam in (0, 1), got {lam}")
    lrs = np.asarray(lrs, dtype=np.float64)
    if lrs.ndim != 1 or lrs.size == 0 or np.any(lrs <= 0):
        raise ValueError("lrs: expected a non-empty 1-D array of positive steps")
    c = problem.constants()
    G_h = max(lam * c["G_dpo"], (1 - lam) * c["G_sft"])
    R = float(np.linalg.norm(problem._theta(theta0) - problem.chebyshev_point(lam)[0]))
    s1 = lrs.sum() / max(lam, 1 - lam)
    s2 = np.sum(lrs**2) / min(lam, 1 - lam) ** 2
    return float((R**2 + G_h**2 * s2) / (2 * s1))
