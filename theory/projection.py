"""Feasible sets of update directions, exact Euclidean projections onto them, and linear maximisation.

Dr. Post-Training (``docs/drpt.md``) builds, each step, a feasible set of update directions
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
polyhedral sets are handled in the n x n Gram space, never with a d x d matrix: Cone is non-negative
least squares in the coefficients, HalfSpaces is ``g + P_Cone(-g)`` (Moreau), and Hull is the quadratic
program over the simplex in coordinates centred at the vertex nearest to g. All three use one
active-set solver, ``_active_set`` (Lawson-Hanson, with each face's KKT system for the simplex), with
tolerances relative to the rounding level of each gradient entry and an iteration cap that raises
``ProjectionError`` instead of looping. Working on Gram matrices squares the condition number of G:
accuracy is about 1e-12 relative for well-conditioned G and degrades to about 1e-7 when cond(G) reaches
1e4 and beyond.

Scale. Every map is equivariant, ``P(s g; s G) = s P(g; G)`` for s > 0, and so is the code: g and the
rows of G are divided by powers of two near their largest entries (exact in binary floating point), the
solvers see O(1) numbers, and the answer is scaled back. Any finite input works, from 1e-300 to 1e300;
nothing squares an entry into overflow or underflow (tests/theory/test_projection.py, test_fuzz.py).

Array types. ``g`` and ``G`` may be numpy arrays or torch tensors; they are converted to float64 numpy at
the boundary. A float64 CPU ``G`` is not copied: the set keeps a read-only view of it (a layer's per-sample
gradients can be gigabytes), so change G only after the set is no longer used. ``project`` and ``lmo``
return the type of ``g``: a numpy float64 array, or a torch tensor with ``g``'s dtype and device.
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


# ----------------------------------------------------------------------------- scaling
#
# Every set's projection is equivariant, P(s g; s S) = s P(g; S) for s > 0, so the solvers work on O(1)
# numbers: g and the rows of G are divided by powers of two (exact in binary floating point), solved, and
# multiplied back. Tolerances are then relative by construction, nothing squares a 1e200 entry into inf,
# and no 1e-200 entry is squared into zero.


def _pow2(m: float) -> float:
    """The power of two p with m / p in [1, 2) (1.0 for m = 0); finite for every finite m."""
    if not m > 0:
        return 1.0
    return math.ldexp(1.0, math.frexp(m)[1] - 1)


def _max_abs(x: np.ndarray, axis=None):
    """max |x| (over `axis`) from max and min, which read x without the full-size copy np.abs would make."""
    return np.maximum(np.max(x, axis=axis), -np.min(x, axis=axis))


def _scale(x: np.ndarray) -> float:
    return _pow2(float(_max_abs(x))) if x.size else 1.0


def _shrink(x: np.ndarray, s: float) -> np.ndarray:
    """x / s, except that an x more than 2^600 times larger than s is brought down to 2^600: a target that
    far from the set acts on the solution only through its direction in float64, and must not overflow."""
    sx = _scale(x)
    if math.frexp(sx)[1] - math.frexp(s)[1] > 600:
        return x / sx * 2.0**600
    return x / s


def _norm(x: np.ndarray) -> float:
    """||x||, without the overflow of the squares above 1e154 or their underflow below 1e-154."""
    s = _scale(x)
    return s * float(np.sqrt(np.sum((x / s) ** 2)))


_BLOCK = 1 << 22  # entries of G handled at once (32 MB): bounds the temporary copies of a wide G
_DIRECT = 2.0**200  # row scales within [1/_DIRECT, _DIRECT]: G itself can enter the products (see _Rows)


class _Rows:
    """The rows of G as (G_i / div_i - center) / post_i, without copying G when it can be avoided.

    The sets solve in these normalised coordinates. Without a center and with every row scale `div_i`
    within 2^+-200, the products are taken on G itself and the row factors applied to the n x n or n-long
    results (`direct`): no entry of G G^T can overflow (|G| < 2^201, d < 2^500), and a product that
    underflows is below 2^-600 in the normalised units (entries of order 1), far under the solvers'
    tolerances. Otherwise (a center; extreme scales) the normalised rows are formed a block of columns at
    a time, which bounds the temporary copies to one block.
    """

    def __init__(self, G: np.ndarray, div: np.ndarray, center: np.ndarray | None = None, post=None):
        n, d = G.shape
        self.G, self.div, self.center = G, div, center
        self.post = np.ones(n) if post is None else post
        self.direct = center is None and bool(np.all((div >= 1 / _DIRECT) & (div <= _DIRECT)))
        # direct: row i of the normalised rows is inv_i * G_i (formed only then: extreme div could overflow)
        self.inv = 1.0 / (div * self.post) if self.direct else None
        step = max(1, _BLOCK // max(n, 1))
        self.blocks = [slice(j, j + step) for j in range(0, d, step)]

    def block(self, blk: slice) -> np.ndarray:
        A = self.G[:, blk] / self.div[:, None]
        if self.center is not None:
            A -= self.center[blk]
        return A / self.post[:, None]

    def gram(self) -> np.ndarray:
        n = self.G.shape[0]
        if self.direct:  # G @ G.T: numpy hands a matrix times its own transpose to BLAS syrk (half the work)
            return (self.G @ self.G.T) * np.outer(self.inv, self.inv)
        K = np.zeros((n, n))
        for blk in self.blocks:
            A = self.block(blk)
            K += A @ A.T
        return K

    def dot(self, x: np.ndarray) -> np.ndarray:
        """A x, A the normalised rows."""
        if self.direct:
            return self.inv * (self.G @ x)
        out = np.zeros(self.G.shape[0])
        for blk in self.blocks:
            out += self.block(blk) @ x[blk]
        return out

    def combine(self, c: np.ndarray) -> np.ndarray:
        """A^T c."""
        if self.direct:
            return (self.inv * c) @ self.G
        out = np.zeros(self.G.shape[1])
        for blk in self.blocks:
            out[blk] = c @ self.block(blk)
        return out


def _row_scales(row_max: np.ndarray) -> np.ndarray:
    """`_pow2` of each row's largest |entry| (`_RowsSet.row_max`), vectorised."""
    return np.where(row_max > 0, np.ldexp(1.0, np.frexp(row_max)[1] - 1), 1.0)


# ----------------------------------------------------------------------------- the Gram-space solver


class ProjectionError(RuntimeError):
    """The active-set solver hit its iteration cap (it never has in the tests; it says so rather than hang)."""


def _face_minimiser(K: np.ndarray, b: np.ndarray, passive: np.ndarray, simplex: bool) -> np.ndarray:
    """argmin of 1/2 c^T K c - b^T c over the coordinates in `passive` (others 0), with sum c = 1 if simplex.

    Solved in the variables y_i = sqrt(K_ii) c_i (unit diagonal), so rows of very different norms keep
    their digits, by least squares (minimum norm): a face can be singular up to rounding.
    """
    idx = np.flatnonzero(passive)
    z = np.zeros(b.shape[0])
    if idx.size == 0:
        return z
    d = np.sqrt(np.diag(K)[idx])
    d = np.where(d > 0, d, 1.0)
    Kt, bt = K[np.ix_(idx, idx)] / np.outer(d, d), b[idx] / d
    if simplex:  # KKT system of the face: [K u; u^T 0] [y; -nu] = [b; 1/beta], u = (1/d) / beta
        m = idx.size
        u = 1.0 / d
        beta = float(u.max())
        M = np.zeros((m + 1, m + 1))
        M[:m, :m], M[:m, m], M[m, :m] = Kt, u / beta, u / beta
        y = np.linalg.lstsq(M, np.append(bt, 1.0 / beta), rcond=None)[0][:m]
    else:
        y = np.linalg.lstsq(Kt, bt, rcond=None)[0]
    z[idx] = y / d
    return z


def _descend(K, b, c, passive, simplex):
    """Lawson-Hanson's inner loop: move from the feasible c towards the face minimiser, dropping the
    coordinates that reach zero, until the face minimiser itself is feasible."""
    for _ in range(b.shape[0] + 2):
        z = _face_minimiser(K, b, passive, simplex)
        bad = passive & (z <= 0)
        if not bad.any():
            return z, passive
        gap = c[bad] - z[bad]  # > 0 except when both are 0
        ratio = np.divide(c[bad], gap, out=np.zeros_like(gap), where=gap > 0)
        k = int(np.argmin(ratio))
        alpha = float(np.clip(ratio[k], 0.0, 1.0))
        c = c + alpha * (z - c)
        c[np.flatnonzero(bad)[k]] = 0.0  # the blocking coordinate, exactly
        passive = passive & (c > 0)
        c[~passive] = 0.0
        if simplex:
            if not passive.any():  # cannot happen in exact arithmetic (sum c = 1): give up this entry
                return None, None
            c = c / c.sum()
    return c, passive


def _active_set(K: np.ndarray, b: np.ndarray, simplex: bool = False, max_iter: int | None = None) -> np.ndarray:
    """argmin of 1/2 c^T K c - b^T c over c >= 0 (and sum c = 1 when `simplex`), K symmetric PSD (n x n).

    Lawson-Hanson's active-set method (NNLS written with K = A^T A, b = A^T y, so A is never needed),
    extended to the simplex by solving each face's KKT system. A coordinate enters only if its gradient
    entry beats the rounding level of the gradient, so a rank-deficient K is fine. Anti-cycling: an entry
    that rounding undoes at once (the objective does not decrease) is skipped until the next real
    decrease. The callers pass O(1)-scaled K and b; iterations are capped (default 20 n + 50, far above
    the n to 3n it takes) and the cap raises ProjectionError.
    """
    n = b.shape[0]
    max_iter = 20 * n + 50 if max_iter is None else max_iter
    c = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    if n == 0:
        return c
    if simplex:  # start from the nearest vertex
        j = int(np.argmax(b - 0.5 * np.diag(K)))
        c[j], passive[j] = 1.0, True
    absK, absb = np.abs(K), np.abs(b)
    obj = lambda u: 0.5 * u @ K @ u - b @ u  # noqa: E731
    f = obj(c)
    skip = np.zeros(n, dtype=bool)
    for _ in range(max_iter):
        w = b - K @ c  # minus the gradient
        nu = float(c @ w) if simplex else 0.0  # on the simplex, w is constant (nu) on the support at a face optimum
        # rounding level of each w_j - nu, per coordinate: rows of very different norms keep their own scale
        size = absb + absK @ c
        tol = 1e-13 * n * (size + (float(c @ size) if simplex else 0.0)) + 1e-300
        free = ~passive & ~skip & (w - nu > tol)
        if not free.any():
            return c
        j = int(np.flatnonzero(free)[np.argmax(w[free])])
        trial = passive.copy()
        trial[j] = True
        c_new, p_new = _descend(K, b, c, trial, simplex)
        f_new = obj(c_new) if c_new is not None else np.inf
        if f_new < f or (f_new == f and p_new[j]):
            if f_new < f:
                skip[:] = False
            c, passive, f = c_new, p_new, f_new
        else:  # rounding undid the entry of j: no progress, so do not try j again until there is some
            skip[j] = True
    raise ProjectionError(f"S: the active-set solver did not converge in {max_iter} iterations "
                          f"(n={n} rows); please report the (g, G) that caused it")


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
    """A set built from the rows of G ([n, d]); caches its normalised Gram matrices lazily."""

    def __init__(self, G):
        # A read-only view, not a copy: G may be the size of a model layer. Its finiteness is read off the
        # row maxima of |G|, which the scalings need anyway (NaN and inf propagate through max and min), so
        # the check costs no pass over G of its own.
        self.G = real_array("G", G, 2, copy=False, finite=False)
        self.row_max = _max_abs(self.G, axis=1) if self.dim else np.zeros(self.n)
        if not np.all(np.isfinite(self.row_max)):
            raise ValueError("G: contains NaN or infinite values")
        self._cache: dict = {}

    @property
    def n(self) -> int:
        return self.G.shape[0]

    @property
    def dim(self) -> int:
        return self.G.shape[1]

    def _scaled(self):
        """(rows G / s, their Gram matrix) with s = `_pow2` of max |G|: for sets that change with row scales."""
        if "scaled" not in self._cache:
            rows = _Rows(self.G, np.full(self.n, self._g_scale()))
            self._cache["scaled"] = (rows, rows.gram())
        return self._cache["scaled"]

    def _g_scale(self) -> float:
        """`_scale(self.G)`, from the row maxima."""
        return _pow2(float(self.row_max.max(initial=0.0)))

    def _scores(self, g: np.ndarray) -> np.ndarray:
        """<G_i, g> up to one positive factor (the same for all i): enough for every ranking and sign test."""
        return self._scaled()[0].dot(g / _scale(g))


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

    Solved by LAPACK least squares on the row-normalised G^T (d x n, an SVD; singular values below 1e-12 of
    the largest are dropped) rather than on the Gram matrix, whose condition number is the square of G's.
    The span does not change when a row is rescaled, so each row is first divided by a power of two near
    its largest entry: rows of very different norms all count.
    """

    bounded = False

    def _project(self, g):
        if self.n == 0:
            return np.zeros_like(g)
        A = self.G / _row_scales(self.row_max)[:, None]
        s = _scale(g)
        c = np.linalg.lstsq(A.T, g / s, rcond=1e-12)[0]
        return s * (A.T @ c)


class _ConeBase(_RowsSet):
    """Cone(G) and its dual HalfSpaces(G) share the NNLS on unit-length rows."""

    def _unit(self):
        """(rows G_i / ||G_i||, their Gram matrix, rows that are not zero).

        The cone does not change when rows are rescaled, so the NNLS runs on unit-length rows and its
        coefficients map back; per-sample gradient norms spanning many orders of magnitude would
        otherwise break the active set's sign tests. Each row is first divided by a power of two near
        its largest entry, so that its norm neither overflows nor underflows.
        """
        if "unit" not in self._cache:
            div = _row_scales(self.row_max)
            K = _Rows(self.G, div).gram()
            norms = np.sqrt(np.diag(K)).copy()
            live = norms > 0
            norms[~live] = 1.0
            self._cache["unit"] = (_Rows(self.G, div, post=norms), K / np.outer(norms, norms), live)
        return self._cache["unit"]

    def _unit_coefficients(self, g: np.ndarray) -> tuple[np.ndarray, float]:
        """(c, s): the projection of g onto the cone is s * sum_i c_i G_i / ||G_i|| (s a power of two)."""
        rows, K, live = self._unit()
        c = np.zeros(self.n)
        s = _scale(g)
        if live.any():
            b = rows.dot(g / s)
            c[live] = _active_set(K[np.ix_(live, live)], b[live])
        return c, s

    def _cone_point(self, g: np.ndarray) -> np.ndarray:
        c, s = self._unit_coefficients(g)
        return s * self._unit()[0].combine(c)


class Cone(_ConeBase):
    """{G^T c : c >= 0}. Projection = NNLS in the coefficients, solved on the Gram matrix of unit rows."""

    bounded = False

    def coefficients(self, g: np.ndarray) -> np.ndarray:
        """c >= 0 with project(g) = G^T c (in G's own units; may overflow if G and g differ by > 1e300)."""
        c, s = self._unit_coefficients(real_array("g", g, 1))
        rows = self._unit()[0]
        with np.errstate(over="ignore"):
            return c * s / rows.div / rows.post

    def _project(self, g):
        return self._cone_point(g)


class HalfSpaces(_ConeBase):
    """{z : G z >= 0}: GEM's constraint set (do not increase any general loss to first order).

    It is the dual cone of Cone(G), so by Moreau's decomposition P(g) = g + P_Cone(G)(-g) (README s. 4).
    """

    bounded = False

    def _project(self, g):
        return g + self._cone_point(-g)


class HalfSpace(FeasibleSet):
    """{z : <a, z> >= offset}: A-GEM's set with a = the mean reference gradient. Closed form."""

    bounded = False

    def __init__(self, a, offset: float = 0.0):
        self.a = real_array("a", a, 1)
        try:
            self.offset = float(offset)
        except (TypeError, ValueError):
            raise ValueError(f"offset: expected a finite number, got {offset!r}") from None
        if not math.isfinite(self.offset):
            raise ValueError("offset: expected a finite number")
        if not np.any(self.a) and self.offset > 0:
            raise ValueError("a: a zero normal with a positive offset gives an empty set")

    @property
    def dim(self) -> int:
        return self.a.shape[0]

    def _project(self, g):
        s = _scale(self.a)  # {z : <a/s, z> >= offset/s} is the same set, with O(1) products
        a = self.a / s
        viol = a @ g - self.offset / s
        aa = a @ a
        if viol >= 0 or aa == 0:
            return g.copy()
        return g - (viol / aa) * a


class Hull(_RowsSet):
    """{G^T c : c >= 0, sum c = 1}, the convex hull of the rows.

    Projection: the quadratic program min 1/2 ||G^T c - g||^2 over the simplex, solved by the active-set
    method with each face's KKT system, in coordinates centred at the vertex v = G_p nearest to g: with
    D_i = G_i - v and r = g - v it is min 1/2 c^T (D D^T) c - (D r)^T c. Centring near the answer keeps
    the Gram entries at the scale of the geometry around it (rows sharing a large common component, or
    small rows next to a huge one, do not cancel), and there is no ||g||^2 term, so a target far from the
    hull costs no accuracy. D and r are scaled by powers of two; one Gram matrix is cached per centre.
    """

    def __init__(self, G):
        super().__init__(G)
        if self.n == 0:
            raise ValueError("G: the convex hull of zero rows is empty; expected n >= 1")

    def _centred(self, p: int):
        """(rows D / t, their Gram matrix, s, m, t): D = G / s - m with m = G_p / s; s, t powers of two."""
        key = ("centred", p)
        if key not in self._cache:
            s, n = self._g_scale(), self.n
            m = self.G[p] / s
            spread = _Rows(self.G, np.full(n, s), center=m)
            t = max((_scale(spread.block(blk)) for blk in spread.blocks), default=1.0)
            rows = _Rows(self.G, np.full(n, s), center=m, post=np.full(n, t))
            self._cache[key] = (rows, rows.gram(), s, m, t)
        return self._cache[key]

    def _nearest_vertex(self, g: np.ndarray) -> int:
        s = self._g_scale()
        rows = _Rows(self.G, np.full(self.n, s), center=_shrink(g, s))
        t = max((_scale(rows.block(blk)) for blk in rows.blocks), default=1.0)  # squares cannot overflow
        sq = np.zeros(self.n)
        for blk in rows.blocks:
            sq += np.sum((rows.block(blk) / t) ** 2, axis=1)
        return int(np.argmin(sq))

    def coefficients(self, g: np.ndarray) -> np.ndarray:
        """c on the simplex with project(g) = G^T c."""
        g = real_array("g", g, 1)
        rows, K, s, m, t = self._centred(self._nearest_vertex(g))
        r = _shrink(_shrink(g, s) - m, t)
        return _active_set(K, rows.dot(r), simplex=True)

    def _project(self, g):
        return self.G.T @ self.coefficients(g)

    def _lmo(self, g):
        # a linear function over a polytope peaks at a vertex; ties -> lowest row index
        return self.G[int(np.argmax(self._scores(g)))].copy()


class Ball(FeasibleSet):
    """{z : ||z - center|| <= radius}. Closed forms for both maps."""

    def __init__(self, center, radius: float):
        self.center = real_array("center", center, 1)
        if not (isinstance(radius, (int, float, np.floating, np.integer)) and not isinstance(radius, bool)
                and math.isfinite(radius) and radius >= 0):
            raise ValueError(f"radius: expected a finite number >= 0, got {radius!r}")
        self.radius = float(radius)

    @property
    def dim(self) -> int:
        return self.center.shape[0]

    def _project(self, g):
        r = g - self.center
        nr = _norm(r)
        return g.copy() if nr <= self.radius else self.center + (self.radius / nr) * r

    def _lmo(self, g):
        ng = _norm(g)
        # tie rule: g = 0 makes every point a maximiser; return the center
        return self.center.copy() if ng == 0 else self.center + (self.radius / ng) * g


class SubsetAverages(_RowsSet):
    """The finite set {sum_{i in S} w_i g_i / sum_{i in S} w_i : S subset of rows, |S| = k}.

    ``weights`` are per-row token counts T_i with rows g_i = the token-mean gradient of sample i alone;
    then the member for S is exactly the gradient of a forward/backward pass on S alone (docs/drpt.md section 1.3).
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
        s = self._scores(np.asarray(g, dtype=np.float64))  # positively rescaled scores: the same ranking
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
        s = self.w * self._scores(np.asarray(g, dtype=np.float64))
        return np.sort(np.argsort(-s, kind="stable")[: self.k])

    def _project(self, g):
        n, k = self.n, self.k
        if math.comb(n, k) > self.max_enum:
            raise ValueError(f"S: projection onto SubsetAverages enumerates C({n},{k}) subsets, more than "
                             f"max_enum={self.max_enum}; use lmo or Hull")
        rows, K = self._scaled()  # ||avg - g||^2 - ||g||^2 in units of the rows' scale: no overflow
        b = rows.dot(_shrink(g, rows.div[0] if n else 1.0))
        best, best_val = None, np.inf
        for S in combinations(range(n), k):  # lexicographic, so ties go to the first subset
            idx = np.array(S)
            c = self.w[idx] / self.w[idx].sum()
            val = c @ K[np.ix_(idx, idx)] @ c - 2 * c @ b[idx]
            if best is None or val < best_val - 1e-12 * abs(best_val):
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
    s = _Rows(G_np, np.full(G_np.shape[0], _scale(G_np))).dot(g_np / _scale(g_np))  # signs and order of <g_i, g>
    neg = np.where(s < 0)[0]
    drop = neg[np.argsort(s[neg], kind="stable")][: int(math.floor(frac * neg.size))]
    keep = np.ones(G_np.shape[0], dtype=bool)
    keep[drop] = False
    z = w[keep] @ G_np[keep] / w[keep].sum() if keep.any() else np.zeros(G_np.shape[1])
    return _like(z, g), keep


def support(g, S: FeasibleSet) -> float:
    """The support function max_{z in S} <g, z> (bounded sets only)."""
    g_np, z = real_array("g", g, 1), real_array("lmo", lmo(g, S), 1)
    sg, sz = _scale(g_np), _scale(z)
    try:  # the product of the O(1) parts, then both powers of two at once: no intermediate over/underflow
        return math.ldexp(float((g_np / sg) @ (z / sz)), math.frexp(sg)[1] + math.frexp(sz)[1] - 2)
    except OverflowError:
        raise ValueError(f"g: the support value overflows float64 (|g| ~ {sg:.3g}, |lmo| ~ {sz:.3g})") from None


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
