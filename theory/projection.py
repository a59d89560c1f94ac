"""Feasible sets of update directions, exact Euclidean projections onto them, and linear maximisation.

Dr. Post-Training (``shared/reference/drpt.md``) builds, each step, a feasible set of update directions
from the per-sample gradients of a general minibatch, ``G`` (shape ``[n, d]``), and maps the target
gradient ``g`` (shape ``[d]``) into it. Two maps are offered:

* ``project(g, S)``: the Euclidean projection ``argmin_{z in S} ||z - g||`` (exact);
* ``lmo(g, S)``: the linear maximisation oracle ``argmax_{z in S} <g, z>``; over ``SubsetAverages`` it is
  the top-k rule of the released code.

Sets (section 4 of ``theory/README.md`` says which known method each one is):

========================  =====================================================  ==================
set                       members                                                known method
========================  =====================================================  ==================
``Whole(d)``              all of R^d                                             Target-only
``Point(p)``              the single point p (``Point.general_mean(G)``)         Full-Training
``Span(G)``               ``G^T c``, any c                                        [ours]
``Cone(G)``               ``G^T c``, c >= 0                                       [ours]
``Hull(G)``               ``G^T c``, c >= 0, sum c = 1                            [ours]
``SubsetAverages(G, k)``  weighted averages of k of the n rows                    Global Subset
``HalfSpaces(G)``         z with ``G z >= 0``                                     GEM
``HalfSpace(a)``          z with ``<a, z> >= offset``                             A-GEM
``Ball(center, radius)``  ``||z - center|| <= radius``                           [ours]
``Product(sets, groups)`` one member of ``sets[q]`` on the coordinates groups[q]  Layer-/Block-Wise
========================  =====================================================  ==================

Numerics. Everything is float64 numpy inside. Span uses least squares on G^T (d x n). The other
polyhedral sets are handled in the n x n Gram space (``K = G G^T``), never with a d x d matrix: Cone is
non-negative least squares in the coefficients, HalfSpaces is ``g + P_Cone(-g)`` (Moreau), and Hull is
a least-distance problem turned into one more non-negative least squares (README section 4). All three
use one Lawson-Hanson active-set solver on the Gram matrix, ``_nnls_gram``. Working on K squares the
condition number of G: accuracy is about 1e-12 relative for well-conditioned G and degrades to about
1e-7 when cond(G) reaches 1e4 and beyond.

Array types. ``g`` and ``G`` may be numpy arrays or torch tensors; they are converted to float64 numpy at
the boundary. ``project`` and ``lmo`` return the type of ``g``: a numpy float64 array, or a torch tensor
with ``g``'s dtype and device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from theory._checks import real_array

# ----------------------------------------------------------------------------- input checking


def _like(z: np.ndarray, g):
    """Return z as the type of g (numpy, or torch with g's dtype and device)."""
    if hasattr(g, "detach"):
        import torch

        return torch.as_tensor(z, dtype=g.dtype, device=g.device)
    return z


def _weights(w, n: int) -> np.ndarray:
    if w is None:
        return np.ones(n)
    w = real_array("weights", w, 1)
    if w.shape != (n,):
        raise ValueError(f"weights: expected shape ({n},) (one per row of G), got {w.shape}")
    if np.any(w <= 0):
        raise ValueError("weights: expected positive values (token counts)")
    return w


# ----------------------------------------------------------------------------- the Gram-space solver


def _nnls_gram(Q: np.ndarray, p: np.ndarray, scale: float) -> np.ndarray:
    """min_{u >= 0} 1/2 u^T Q u - p^T u for PSD Q (n x n), by Lawson-Hanson's active-set method.

    This is NNLS ``min ||A u - y||`` written with ``Q = A^T A`` and ``p = A^T y``, so it never needs A.
    ``scale`` sets the tolerance of the sign tests (the size of the entries of the gradient p - Q u).
    Lawson-Hanson keeps the passive columns linearly independent, so a rank-deficient Q is fine.
    """
    n = p.shape[0]
    u = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 1e-12 * max(scale, 1e-300) * max(n, 1)
    for _ in range(10 * n + 10):
        w = p - Q @ u
        cand = np.where(~passive & (w > tol))[0]
        if cand.size == 0:
            return u
        passive[cand[np.argmax(w[cand])]] = True
        for _ in range(10 * n + 10):  # inner loop: keep the passive least-squares solution feasible
            idx = np.where(passive)[0]
            z = np.zeros(n)
            z[idx] = np.linalg.lstsq(Q[np.ix_(idx, idx)], p[idx], rcond=None)[0]
            if np.all(z[idx] > 0):
                u = z
                break
            bad = idx[z[idx] <= 0]
            alpha = np.min(u[bad] / (u[bad] - z[bad]))
            u = u + alpha * (z - u)
            passive &= u > 1e-15 * max(1.0, np.max(np.abs(u)))
            u[~passive] = 0.0
    raise RuntimeError("Lawson-Hanson NNLS did not converge; the Gram matrix may be badly scaled")


# ----------------------------------------------------------------------------- sets


class FeasibleSet:
    """Base class. ``dim`` is d; ``bounded`` says whether lmo is defined."""

    bounded = True

    @property
    def dim(self) -> int:  # pragma: no cover - every set overrides
        raise NotImplementedError

    def _project(self, g: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _lmo(self, g: np.ndarray) -> np.ndarray:
        raise ValueError(f"S: lmo over {type(self).__name__} is unbounded; use project")


class _RowsSet(FeasibleSet):
    """A set built from the rows of G ([n, d]); caches the Gram matrix lazily."""

    def __init__(self, G):
        self.G = real_array("G", G, 2)
        self._K = None

    @property
    def n(self) -> int:
        return self.G.shape[0]

    @property
    def dim(self) -> int:
        return self.G.shape[1]

    @property
    def K(self) -> np.ndarray:
        if self._K is None:
            self._K = self.G @ self.G.T
        return self._K


class Whole(FeasibleSet):
    """All of R^d. project = identity: the Target-only rule. lmo is unbounded."""

    bounded = False

    def __init__(self, d: int):
        if not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"d: expected a non-negative integer, got {d!r}")
        self.d = int(d)

    @property
    def dim(self) -> int:
        return self.d

    def _project(self, g):
        return g.copy()


class Point(FeasibleSet):
    """The single point p. With p = the general mean it is the Full-Training rule."""

    def __init__(self, p):
        self.p = real_array("p", p, 1)

    @classmethod
    def general_mean(cls, G, weights=None) -> Point:
        """The (token-)weighted mean of the rows of G: the Full-Training update."""
        G = real_array("G", G, 2)
        if G.shape[0] == 0:
            raise ValueError("G: the general mean needs at least one row")
        w = _weights(weights, G.shape[0])
        return cls(w @ G / w.sum())

    @property
    def dim(self) -> int:
        return self.p.shape[0]

    def _project(self, g):
        return self.p.copy()

    _lmo = _project


class Span(_RowsSet):
    """{G^T c : c in R^n}. Projection = G^T c with c the least-squares coefficients.

    Solved by LAPACK least squares on G^T (d x n, an SVD; singular values below 1e-12 of the largest are
    dropped) rather than on the Gram matrix, whose condition number is the square of G's.
    """

    bounded = False

    def _project(self, g):
        if self.n == 0:
            return np.zeros_like(g)
        c = np.linalg.lstsq(self.G.T, g, rcond=1e-12)[0]
        return self.G.T @ c


def _cone_coefficients(G: np.ndarray, K: np.ndarray, g: np.ndarray) -> np.ndarray:
    """argmin_{c >= 0} ||G^T c - g||, on the Gram matrix K = G G^T.

    The cone does not change when rows are rescaled, so the NNLS runs on unit-length rows (Gram
    D^-1 K D^-1, D = diag of row norms) and the coefficients are mapped back; per-sample gradient norms
    spanning many orders of magnitude would otherwise break the active set's sign tests.
    """
    if G.shape[0] == 0:
        return np.zeros(0)
    norms = np.sqrt(np.clip(np.diag(K), 0.0, None))
    live = norms > 0
    c = np.zeros(G.shape[0])
    if not live.any():
        return c
    d = norms[live]
    Kn = K[np.ix_(live, live)] / np.outer(d, d)
    bn = (G[live] @ g) / d
    c[live] = _nnls_gram(Kn, bn, max(np.max(np.abs(bn)), 1.0)) / d
    return c


class Cone(_RowsSet):
    """{G^T c : c >= 0}. Projection = NNLS in the coefficients, solved on the Gram matrix."""

    bounded = False

    def coefficients(self, g: np.ndarray) -> np.ndarray:
        return _cone_coefficients(self.G, self.K, g)

    def _project(self, g):
        return self.G.T @ self.coefficients(g)


class HalfSpaces(_RowsSet):
    """{z : G z >= 0}: GEM's constraint set (do not increase any general loss to first order).

    It is the dual cone of Cone(G), so by Moreau's decomposition P(g) = g + P_Cone(G)(-g) (README s. 4).
    """

    bounded = False

    def _project(self, g):
        return g + self.G.T @ _cone_coefficients(self.G, self.K, -g)


class HalfSpace(FeasibleSet):
    """{z : <a, z> >= offset}: A-GEM's set with a = the mean reference gradient. Closed form."""

    bounded = False

    def __init__(self, a, offset: float = 0.0):
        self.a = real_array("a", a, 1)
        self.offset = float(offset)
        if not math.isfinite(self.offset):
            raise ValueError("offset: expected a finite number")
        if not np.any(self.a) and self.offset > 0:
            raise ValueError("a: a zero normal with a positive offset gives an empty set")

    @property
    def dim(self) -> int:
        return self.a.shape[0]

    def _project(self, g):
        aa = self.a @ self.a
        viol = self.a @ g - self.offset
        if viol >= 0 or aa == 0:
            return g.copy()
        return g - (viol / aa) * self.a


class Hull(_RowsSet):
    """{G^T c : c >= 0, sum c = 1}, the convex hull of the rows.

    Projection: g is first replaced by q, its projection onto the affine hull (Pythagoras: same answer,
    better conditioned). With h_i = g_i - q the problem is the minimum-norm point of conv{h_i}; it equals
    the NNLS min_{u >= 0} ||H^T u||^2 + tau^2 (1 - 1^T u)^2, any tau > 0, rescaled by 1/sum(u)
    (README section 4, [ours]).
    """

    def __init__(self, G):
        super().__init__(G)
        if self.n == 0:
            raise ValueError("G: the convex hull of zero rows is empty; expected n >= 1")

    def coefficients(self, g: np.ndarray) -> np.ndarray:
        n, K = self.n, self.K
        one = np.ones(n)
        # Pythagoras: first replace g by q, its projection onto the affine hull of the rows (coefficients
        # alpha, sum alpha = 1), so that the Gram entries below do not cancel at the scale of ||g||^2.
        border = np.block([[K, one[:, None]], [one[None, :], np.zeros((1, 1))]])
        alpha = np.linalg.lstsq(border, np.append(self.G @ g, 1.0), rcond=None)[0][:n]
        Ka = K @ alpha
        QH = K - np.outer(Ka, one) - np.outer(one, Ka) + (alpha @ Ka) * np.outer(one, one)
        tau2 = float(np.max(np.diag(QH))) if np.max(np.diag(QH)) > 0 else 1.0  # any tau > 0 works; match scale
        Q = QH + tau2 * np.outer(one, one)
        u = _nnls_gram(Q, tau2 * one, float(np.max(np.diag(Q))))
        return u / u.sum()

    def _project(self, g):
        return self.G.T @ self.coefficients(g)

    def _lmo(self, g):
        # a linear function over a polytope peaks at a vertex; ties -> lowest row index
        return self.G[int(np.argmax(self.G @ g))].copy()


class Ball(FeasibleSet):
    """{z : ||z - center|| <= radius}. Closed forms for both maps."""

    def __init__(self, center, radius: float):
        self.center = real_array("center", center, 1)
        if not (isinstance(radius, (int, float, np.floating, np.integer)) and math.isfinite(radius)
                and radius >= 0):
            raise ValueError(f"radius: expected a finite number >= 0, got {radius!r}")
        self.radius = float(radius)

    @property
    def dim(self) -> int:
        return self.center.shape[0]

    def _project(self, g):
        r = g - self.center
        nr = np.linalg.norm(r)
        return g.copy() if nr <= self.radius else self.center + (self.radius / nr) * r

    def _lmo(self, g):
        ng = np.linalg.norm(g)
        # tie rule: g = 0 makes every point a maximiser; return the center
        return self.center.copy() if ng == 0 else self.center + (self.radius / ng) * g


class SubsetAverages(_RowsSet):
    """The finite set {sum_{i in S} w_i g_i / sum_{i in S} w_i : S subset of rows, |S| = k}.

    ``weights`` are per-row token counts T_i with rows g_i = the token-mean gradient of sample i alone;
    then the member for S is exactly the gradient of a forward/backward pass on S alone (drpt.md 1.3).
    With weights None every row counts once. k = n gives the general mean (Full-Training).

    lmo: the exact argmax of <g, .> over the set. Unweighted, it is the top-k of the scores <g_i, g>.
    Weighted, the objective is a ratio; Dinkelbach's iteration over top-k problems finds it exactly
    (README section 4). Ties go to the lower row index. ``released_rule`` is the released code's rule.
    project: the nearest member, by enumerating all C(n, k) subsets (up to ``max_enum``).
    """

    def __init__(self, G, k: int, weights=None, max_enum: int = 200_000):
        super().__init__(G)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= self.n:
            raise ValueError(f"k: expected an integer in [1, n={self.n}], got {k!r}")
        self.k = int(k)
        self.w = _weights(weights, self.n)
        self.max_enum = max_enum

    def average(self, idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=int)
        return self.w[idx] @ self.G[idx] / self.w[idx].sum()

    def select(self, g: np.ndarray) -> np.ndarray:
        """Sorted row indices of the lmo subset."""
        s = self.G @ g
        order = np.argsort(-s, kind="stable")
        best = np.sort(order[: self.k])
        if np.all(self.w == self.w[0]):
            return best
        lam = self.w[best] @ s[best] / self.w[best].sum()
        for _ in range(self.n * self.n + 10):  # Dinkelbach: lam increases strictly over finitely many S
            v = self.w * (s - lam)
            cand = np.sort(np.argsort(-v, kind="stable")[: self.k])
            if v[cand].sum() <= 1e-13 * (np.abs(v).max() + 1e-300) * self.k:
                return best
            best = cand
            lam = self.w[best] @ s[best] / self.w[best].sum()
        raise RuntimeError("Dinkelbach iteration did not terminate")  # pragma: no cover

    def _lmo(self, g):
        return self.average(self.select(g))

    def released_rule(self, g: np.ndarray) -> np.ndarray:
        """The released code: top-k of the token-weighted scores w_i <g_i, g>, then the weighted mean."""
        s = self.w * (self.G @ g)
        return np.sort(np.argsort(-s, kind="stable")[: self.k])

    def _project(self, g):
        n, k = self.n, self.k
        if math.comb(n, k) > self.max_enum:
            raise ValueError(f"S: projection onto SubsetAverages enumerates C({n},{k}) subsets, more than "
                             f"max_enum={self.max_enum}; use lmo or Hull")
        b, K = self.G @ g, self.K
        best, best_val = None, np.inf
        for S in combinations(range(n), k):  # lexicographic, so ties go to the first subset
            idx = np.array(S)
            c = self.w[idx] / self.w[idx].sum()
            val = c @ K[np.ix_(idx, idx)] @ c - 2 * c @ b[idx]
            if val < best_val - 1e-12 * (abs(best_val) if np.isfinite(best_val) else 1.0):
                best, best_val = idx, val
        return self.average(best)


@dataclass
class Product(FeasibleSet):
    """The product of ``sets[q]`` over coordinate groups ``groups[q]`` (a partition of range(d)).

    Layer-wise rules are Products of SubsetAverages, one per layer; one group is the global rule.
    """

    sets: list
    groups: list
    _idx: list = field(init=False, repr=False)

    def __post_init__(self):
        if len(self.sets) != len(self.groups):
            raise ValueError(f"groups: expected one group per set ({len(self.sets)}), got {len(self.groups)}")
        if len(self.sets) == 0:
            raise ValueError("sets: expected at least one set")
        self._idx = []
        for q, (S, grp) in enumerate(zip(self.sets, self.groups)):
            if not isinstance(S, FeasibleSet):
                raise ValueError(f"sets: entry {q} is a {type(S).__name__}, expected a FeasibleSet")
            idx = np.asarray(grp if not hasattr(grp, "detach") else grp.cpu().numpy()).astype(np.int64)
            if idx.ndim != 1 or idx.shape[0] != S.dim:
                raise ValueError(f"groups: group {q} has {idx.size} indices but its set has dim {S.dim}")
            self._idx.append(idx)
        allidx = np.concatenate(self._idx) if self._idx else np.zeros(0, np.int64)
        if not np.array_equal(np.sort(allidx), np.arange(allidx.size)):
            raise ValueError("groups: expected a partition of range(d) (each coordinate exactly once)")
        self.bounded = all(S.bounded for S in self.sets)

    @property
    def dim(self) -> int:
        return sum(i.size for i in self._idx)

    def _apply(self, g, op):
        z = np.empty_like(g)
        for S, idx in zip(self.sets, self._idx):
            z[idx] = getattr(S, op)(g[idx])
        return z

    def _project(self, g):
        return self._apply(g, "_project")

    def _lmo(self, g):
        return self._apply(g, "_lmo")


# ----------------------------------------------------------------------------- public maps


def _check(g, S) -> np.ndarray:
    if not isinstance(S, FeasibleSet):
        raise ValueError(f"S: expected a FeasibleSet, got {type(S).__name__}")
    g = real_array("g", g, 1)
    if g.shape[0] != S.dim:
        raise ValueError(f"g: expected length {S.dim} (the set's dimension), got {g.shape[0]}")
    return g


def project(g, S: FeasibleSet):
    """Euclidean projection argmin_{z in S} ||z - g|| (exact; nearest member for SubsetAverages)."""
    g_np = _check(g, S)
    return _like(S._project(g_np), g)


def lmo(g, S: FeasibleSet):
    """argmax_{z in S} <g, z>; raises ValueError for unbounded sets (Whole, Span, Cone, half-spaces).

    Ties: lowest row index (Hull, SubsetAverages), the center (Ball at g = 0).
    """
    g_np = _check(g, S)
    if not S.bounded:
        raise ValueError(f"S: lmo over {type(S).__name__} is unbounded; use project")
    return _like(S._lmo(g_np), g)


def negative_filtering(g, G, frac: float = 1.0, weights=None):
    """The filtering rule of the released code (RLHF/RLVR, IIF): drop negative-score rows, average the rest.

    Scores s_i = <g_i, g>. frac = 1 drops every row with s_i < 0 (rows with s_i = 0 are kept, as in the
    code); frac < 1 drops only the floor(frac * #negative) most negative. Returns (update, keep) with
    the (token-)weighted mean of the kept rows, or zeros when nothing is kept. With frac = 1 the kept set
    is an argmax of sum_{i in S} s_i over all subsets S.
    """
    G_np = real_array("G", G, 2)
    g_np = real_array("g", g, 1)
    if g_np.shape[0] != G_np.shape[1]:
        raise ValueError(f"g: expected length {G_np.shape[1]} (columns of G), got {g_np.shape[0]}")
    if not (isinstance(frac, (int, float)) and 0.0 <= frac <= 1.0):
        raise ValueError(f"frac: expected a number in [0, 1], got {frac!r}")
    w = _weights(weights, G_np.shape[0])
    s = G_np @ g_np
    neg = np.where(s < 0)[0]
    drop = neg[np.argsort(s[neg], kind="stable")][: int(math.floor(frac * neg.size))]
    keep = np.ones(G_np.shape[0], dtype=bool)
    keep[drop] = False
    z = w[keep] @ G_np[keep] / w[keep].sum() if keep.any() else np.zeros(G_np.shape[1])
    return _like(z, g), keep


def support(g, S: FeasibleSet) -> float:
    """The support function max_{z in S} <g, z> (bounded sets only)."""
    return float(real_array("g", g, 1) @ real_array("lmo", lmo(g, S), 1))


# ----------------------------------------------------------------------------- moments of projected updates


@dataclass
class Moments:
    """Bias squared, variance and MSE of an update u against the true target gradient t.

    mse = bias2 + variance holds exactly. For Monte Carlo values the estimators are unbiased
    (bias2 = ||mean u - t||^2 - variance / m, variance with 1/(m-1)) and se_* are standard errors
    (delta method for bias2); for exact values ``exact`` is True and the se_* are 0.
    """

    bias2: float
    variance: float
    mse: float
    se_bias2: float = 0.0
    se_variance: float = 0.0
    se_mse: float = 0.0
    exact: bool = False
    m: int = 0


def update_moments(updates, truth) -> Moments:
    """Monte Carlo moments from samples of the update (rows of ``updates``, shape [m, d], m >= 2)."""
    U = real_array("updates", updates, 2)
    t = real_array("truth", truth, 1)
    m = U.shape[0]
    if m < 2:
        raise ValueError(f"updates: expected at least 2 samples, got {m}")
    if U.shape[1] != t.shape[0]:
        raise ValueError(f"truth: expected length {U.shape[1]}, got {t.shape[0]}")
    ubar = U.mean(0)
    dev = U - ubar
    sq_dev = np.einsum("ij,ij->i", dev, dev)
    var = sq_dev.sum() / (m - 1)
    err = U - t
    sq_err = np.einsum("ij,ij->i", err, err)
    mse = sq_err.mean()
    proj = dev @ (ubar - t)
    se_b = math.sqrt(4 * np.mean(proj**2) / m + (var / m) ** 2)
    return Moments(bias2=float(mse - var), variance=float(var), mse=float(mse), se_bias2=se_b,
                   se_variance=float(sq_dev.std(ddof=1) / math.sqrt(m)),
                   se_mse=float(sq_err.std(ddof=1) / math.sqrt(m)), exact=False, m=m)


def _is_linear(S: FeasibleSet) -> bool:
    if isinstance(S, Product):
        return all(_is_linear(T) for T in S.sets)
    return isinstance(S, (Whole, Point, Span))


def moments(S: FeasibleSet, truth, *, mean=None, cov=None, samples=None, rule: str = "project",
            n_mc: int = 4000, seed: int = 0) -> Moments:
    """Moments of the update u = rule(g_hat, S) for a target-gradient estimator g_hat.

    Give the estimator as ``mean`` and ``cov`` (a Gaussian when sampling is needed) or as ``samples``
    ([m, d] draws). Exact when ``rule='project'``, the set is linear (Whole, Point, Span, or a Product of
    these: u = a + P g_hat with P an orthogonal projector), and mean/cov are given:
    E u = rule(mean), Var = tr(P cov P^T). Otherwise Monte Carlo over the samples or over n_mc Gaussian
    draws (seeded), with standard errors.
    """
    if rule not in ("project", "lmo"):
        raise ValueError(f"rule: expected 'project' or 'lmo', got {rule!r}")
    f = project if rule == "project" else lmo
    t = real_array("truth", truth, 1)
    if t.shape[0] != S.dim:
        raise ValueError(f"truth: expected length {S.dim}, got {t.shape[0]}")
    if samples is not None:
        X = real_array("samples", samples, 2)
        if X.shape[1] != S.dim:
            raise ValueError(f"samples: expected {S.dim} columns, got {X.shape[1]}")
        return update_moments(np.stack([f(x, S) for x in X]), t)
    if mean is None or cov is None:
        raise ValueError("mean, cov: give both (or samples)")
    mu = real_array("mean", mean, 1)
    C = real_array("cov", cov, 2)
    d = S.dim
    if mu.shape != (d,) or C.shape != (d, d):
        raise ValueError(f"mean, cov: expected shapes ({d},) and ({d}, {d}), got {mu.shape}, {C.shape}")
    if not np.allclose(C, C.T, atol=1e-12 * (1 + np.abs(C).max())):
        raise ValueError("cov: expected a symmetric matrix")
    if rule == "project" and _is_linear(S):
        a = project(np.zeros(d), S)
        P_C = np.stack([project(c, S) - a for c in C.T], axis=1)          # P cov
        P_C_Pt = np.stack([project(r, S) - a for r in P_C], axis=1)       # P (P cov)^T = P cov P^T
        bias2 = float(np.sum((project(mu, S) - t) ** 2))
        var = float(np.trace(P_C_Pt))
        return Moments(bias2=bias2, variance=var, mse=bias2 + var, exact=True)
    lam, V = np.linalg.eigh(C)
    if lam.min() < -1e-10 * max(1.0, lam.max()):
        raise ValueError("cov: expected a positive semi-definite matrix")
    L = V * np.sqrt(np.clip(lam, 0, None))
    Z = np.random.default_rng(seed).standard_normal((n_mc, d))
    return update_moments(np.stack([f(x, S) for x in mu + Z @ L.T]), t)
