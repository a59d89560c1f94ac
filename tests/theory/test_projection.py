"""Tests for theory/projection.py: cvxpy references, brute-force lmo, properties, degenerate inputs."""

from itertools import combinations

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.projection import (
    Ball,
    Cone,
    HalfSpace,
    HalfSpaces,
    Hull,
    Point,
    Product,
    Span,
    SubsetAverages,
    Whole,
    lmo,
    moments,
    negative_filtering,
    project,
    support,
    update_moments,
)

SET = settings(max_examples=60, deadline=None, derandomize=True)


def instance(seed, rank_deficient=False, n_max=6, d_max=8):
    """Random (G, g); rank-deficient variants duplicate rows and lower the rank."""
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, n_max + 1)), int(rng.integers(1, d_max + 1))
    G = rng.standard_normal((n, d)) * rng.uniform(0.2, 3.0)
    if rank_deficient and n >= 2:
        r = int(rng.integers(1, n))
        G = rng.standard_normal((n, r)) @ rng.standard_normal((r, d))
        G[-1] = G[0]
    g = rng.standard_normal(d) * rng.uniform(0.2, 3.0)
    return G, g


def cvx_project(g, S):
    """Reference projection with cvxpy (CLARABEL)."""
    d = g.shape[0]
    if isinstance(S, (Span, Cone, Hull)):
        c = cp.Variable(S.n)
        z = S.G.T @ c
        cons = {Span: [], Cone: [c >= 0], Hull: [c >= 0, cp.sum(c) == 1]}[type(S)]
    else:
        z = cp.Variable(d)
        if isinstance(S, HalfSpaces):
            cons = [S.G @ z >= 0]
        elif isinstance(S, HalfSpace):
            cons = [S.a @ z >= S.offset]
        else:
            cons = [cp.norm(z - S.center) <= S.radius]
    cp.Problem(cp.Minimize(cp.sum_squares(z - g)), cons).solve(solver="CLARABEL", tol_gap_abs=1e-10,
                                                                tol_gap_rel=1e-10, tol_feas=1e-10)
    return np.asarray(z.value).ravel()


def convex_sets(G, g, seed=0):
    rng = np.random.default_rng(seed)
    return [Whole(G.shape[1]), Point.general_mean(G), Span(G), Cone(G), Hull(G), HalfSpaces(G),
            HalfSpace(G.mean(0), offset=float(rng.normal())), Ball(G[0], float(rng.uniform(0.1, 2.0)))]


def member_samples(S, rng, m=8):
    """Points of S, drawn without using project (so the optimality test is independent)."""
    d = S.dim
    if isinstance(S, Whole):
        return rng.standard_normal((m, d)) * 3
    if isinstance(S, Point):
        return np.tile(S.p, (m, 1))
    if isinstance(S, Span):
        return rng.standard_normal((m, S.n)) @ S.G
    if isinstance(S, Cone):
        return np.abs(rng.standard_normal((m, S.n))) @ S.G
    if isinstance(S, Hull):
        return rng.dirichlet(np.ones(S.n), size=m) @ S.G
    if isinstance(S, Ball):
        u = rng.standard_normal((m, d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        return S.center + u * S.radius * rng.uniform(0, 1, (m, 1))
    z = rng.standard_normal((200, d)) * 3  # half-spaces: rejection sampling, plus the origin ray
    if isinstance(S, HalfSpaces):
        ok = np.all(z @ S.G.T >= 0, axis=1)
        return np.vstack([z[ok][:m], np.zeros((1, d))])
    ok = z @ S.a >= S.offset
    return z[ok][:m]


def in_set(z, S, tol=1e-7):
    scale = 1 + np.abs(z).max()
    if isinstance(S, Whole):
        return True
    if isinstance(S, Point):
        return np.allclose(z, S.p, atol=tol * scale)
    if isinstance(S, (Span, Cone, Hull)):  # an LP: the l1 distance from z to the set (HiGHS, accurate)
        c = cp.Variable(S.n)
        cons = {Span: [], Cone: [c >= 0], Hull: [c >= 0, cp.sum(c) == 1]}[type(S)]
        prob = cp.Problem(cp.Minimize(cp.norm1(S.G.T @ c - z)), cons)
        return prob.solve(solver="HIGHS") <= 1e-7 * scale
    if isinstance(S, HalfSpaces):
        return np.all(S.G @ z >= -tol * scale * (1 + np.abs(S.G).max()))
    if isinstance(S, HalfSpace):
        return S.a @ z >= S.offset - tol * scale * (1 + np.abs(S.a).max())
    return np.linalg.norm(z - S.center) <= S.radius * (1 + tol) + tol


# ----------------------------------------------------------------------------- exactness against cvxpy


@SET
@given(seed=st.integers(0, 10**6), deficient=st.booleans())
def test_projection_matches_cvxpy(seed, deficient):
    G, g = instance(seed, deficient)
    for S in convex_sets(G, g, seed)[2:]:
        ours, ref = project(g, S), cvx_project(g, S)
        assert np.linalg.norm(ours - ref) <= 1e-6 * (1 + np.linalg.norm(g)), type(S).__name__


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), deficient=st.booleans())
def test_projection_matches_cvxpy_many_rows(seed, deficient):
    G, g = instance(seed, deficient, n_max=24, d_max=30)
    for S in [Cone(G), Hull(G), HalfSpaces(G)]:
        assert np.linalg.norm(project(g, S) - cvx_project(g, S)) <= 1e-6 * (1 + np.linalg.norm(g))


def test_hull_far_target_is_optimal():
    """g far from a small hull (||g||^2 >> the Gram entries): no cancellation error; distance <= cvxpy's."""
    rng = np.random.default_rng(13)
    G, g = 0.5 * rng.standard_normal((18, 35)), 600.0 * rng.standard_normal(35)
    S = Hull(G)
    z = project(g, S)
    assert np.all(S.coefficients(g) >= 0) and np.isclose(S.coefficients(g).sum(), 1.0)
    assert np.linalg.norm(z - g) <= np.linalg.norm(cvx_project(g, S) - g) + 1e-9 * np.linalg.norm(g)
    for zz in member_samples(S, rng, m=50):  # optimality condition at scale
        assert (g - z) @ (zz - z) <= 1e-9 * np.linalg.norm(g) ** 2


def test_projection_matches_cvxpy_wide():
    """n = 20 rows in d = 50, the regime of the scale trainer (few rows, many coordinates)."""
    rng = np.random.default_rng(3)
    G, g = rng.standard_normal((20, 50)), rng.standard_normal(50)
    G[5:10] = -G[:5] * 0.5  # opposite rows make the cone and half-space constraints bind
    for S in [Span(G), Cone(G), Hull(G), HalfSpaces(G)]:
        assert np.linalg.norm(project(g, S) - cvx_project(g, S)) <= 1e-6 * np.linalg.norm(g)


# ----------------------------------------------------------------------------- properties


@SET
@given(seed=st.integers(0, 10**6), deficient=st.booleans())
def test_idempotent_nonexpansive_optimal(seed, deficient):
    G, g = instance(seed, deficient)
    rng = np.random.default_rng(seed + 1)
    h = rng.standard_normal(g.shape[0]) * 2
    for S in convex_sets(G, g, seed):
        p, q = project(g, S), project(h, S)
        name = type(S).__name__
        scale = 1 + np.linalg.norm(g) + np.linalg.norm(h)
        assert np.allclose(project(p, S), p, atol=1e-9 * scale), name
        assert np.linalg.norm(p - q) <= np.linalg.norm(g - h) + 1e-9 * scale, name
        assert in_set(p, S), name
        for z in member_samples(S, rng):
            assert (g - p) @ (z - p) <= 1e-8 * scale * (1 + np.linalg.norm(z)), name


@SET
@given(seed=st.integers(0, 10**6))
def test_row_order_does_not_matter(seed):
    G, g = instance(seed)
    perm = np.random.default_rng(seed).permutation(G.shape[0])
    k = max(1, G.shape[0] // 2)
    w = np.random.default_rng(seed + 2).integers(1, 9, G.shape[0]).astype(float)
    for S, T in [(Span(G), Span(G[perm])), (Cone(G), Cone(G[perm])), (Hull(G), Hull(G[perm])),
                 (HalfSpaces(G), HalfSpaces(G[perm])),
                 (SubsetAverages(G, k, w), SubsetAverages(G[perm], k, w[perm]))]:
        assert np.allclose(project(g, S), project(g, T), atol=1e-9 * (1 + np.abs(g).max()))
    assert np.allclose(lmo(g, SubsetAverages(G, k, w)), lmo(g, SubsetAverages(G[perm], k, w[perm])))
    assert np.allclose(lmo(g, Hull(G)), lmo(g, Hull(G[perm])))


# ----------------------------------------------------------------------------- lmo and subset rules


def brute_lmo(g, G, k, w):
    best, val = None, -np.inf
    for S in combinations(range(G.shape[0]), k):
        idx = list(S)
        z = w[idx] @ G[idx] / w[idx].sum()
        if g @ z > val:
            best, val = z, g @ z
    return best, val


def brute_project(g, G, k, w):
    best, val = None, np.inf
    for S in combinations(range(G.shape[0]), k):
        idx = list(S)
        z = w[idx] @ G[idx] / w[idx].sum()
        if np.sum((z - g) ** 2) < val:
            best, val = z, np.sum((z - g) ** 2)
    return best


@SET
@given(seed=st.integers(0, 10**6), weighted=st.booleans())
def test_lmo_subset_matches_brute_force(seed, weighted):
    G, g = instance(seed, n_max=8)
    n = G.shape[0]
    rng = np.random.default_rng(seed)
    w = rng.integers(1, 50, n).astype(float) if weighted else np.ones(n)
    for k in range(1, n + 1):
        S = SubsetAverages(G, k, w if weighted else None)
        z_ref, v_ref = brute_lmo(g, G, k, w)
        assert g @ lmo(g, S) >= v_ref - 1e-10 * (1 + abs(v_ref))
        assert np.allclose(lmo(g, S), z_ref, atol=1e-9 * (1 + np.abs(z_ref).max()))
        assert np.allclose(project(g, S), brute_project(g, G, k, w))
        if not weighted:  # unweighted, the lmo is the released code's top-k rule
            assert np.allclose(S.average(S.released_rule(g)), lmo(g, S))


def test_released_rule_is_not_the_lmo_with_token_weights():
    """[ours] With unequal token counts, top-k of token-weighted scores can miss the best subset average."""
    G = np.array([[1.0], [0.9], [0.1]])
    w = np.array([1.0, 1.0, 100.0])
    S = SubsetAverages(G, 2, w)
    g = np.array([1.0])
    assert list(S.released_rule(g)) == [0, 2]  # scores w*s = 1, 0.9, 10
    assert list(S.select(g)) == [0, 1]          # the average of rows 0, 1 (0.95) beats that of 0, 2 (~0.11)
    assert g @ lmo(g, S) > g @ S.average(S.released_rule(g))


def test_hull_and_ball_lmo():
    rng = np.random.default_rng(0)
    G, g = rng.standard_normal((7, 5)), rng.standard_normal(5)
    assert np.isclose(support(g, Hull(G)), max(G @ g))
    B = Ball(G[0], 2.0)
    assert np.isclose(support(g, B), g @ G[0] + 2.0 * np.linalg.norm(g))
    assert np.array_equal(lmo(np.zeros(5), B), G[0])  # tie rule: the center


# ----------------------------------------------------------------------------- special cases and nesting


def test_special_cases():
    rng = np.random.default_rng(1)
    G, g = rng.standard_normal((6, 9)), rng.standard_normal(9)
    w = rng.integers(1, 20, 6).astype(float)
    assert np.array_equal(project(g, Whole(9)), g)
    mean = w @ G / w.sum()
    assert np.allclose(lmo(g, SubsetAverages(G, 6, w)), mean)
    assert np.allclose(project(g, SubsetAverages(G, 6, w)), mean)
    assert np.allclose(project(g, Point.general_mean(G, w)), mean)
    one = Product([SubsetAverages(G, 3, w)], [np.arange(9)])
    assert np.array_equal(lmo(g, one), lmo(g, SubsetAverages(G, 3, w)))
    shuffled = rng.permutation(9)  # a single group in any coordinate order is still the global rule
    assert np.allclose(lmo(g, Product([SubsetAverages(G[:, shuffled], 3, w)], [shuffled])),
                       lmo(g, SubsetAverages(G, 3, w)))
    # a Product of Whole/Cone acts per group
    P = Product([Whole(4), Cone(G[:, 4:])], [np.arange(4), np.arange(4, 9)])
    z = project(g, P)
    assert np.array_equal(z[:4], g[:4]) and np.allclose(z[4:], project(g[4:], Cone(G[:, 4:])))


@SET
@given(seed=st.integers(0, 10**6))
def test_products_nest(seed):
    """global in block in layer-wise: support grows, distance to the nearest member shrinks."""
    rng = np.random.default_rng(seed)
    n, d, k = 5, 12, int(rng.integers(1, 5))
    G, g = rng.standard_normal((n, d)), rng.standard_normal(d)
    layers = [np.arange(i, i + 2) for i in range(0, d, 2)]
    blocks = [np.concatenate(layers[i:i + 2]) for i in range(0, len(layers), 2)]
    chain = [[np.arange(d)], blocks, layers]
    sets = [Product([SubsetAverages(G[:, q], k) for q in grp], grp) for grp in chain]
    sup = [support(g, S) for S in sets]
    dist = [np.linalg.norm(project(g, S) - g) for S in sets]
    assert sup[0] <= sup[1] + 1e-12 and sup[1] <= sup[2] + 1e-12
    assert dist[0] >= dist[1] - 1e-12 and dist[1] >= dist[2] - 1e-12
    # membership: the global lmo point, cut into blocks, is a member of each block's set
    z = lmo(g, sets[0])
    for q in blocks:
        S = SubsetAverages(G[:, q], k)
        assert min(np.abs(S.average(list(c)) - z[q]).max() for c in combinations(range(n), k)) < 1e-12


# ----------------------------------------------------------------------------- filtering


@SET
@given(seed=st.integers(0, 10**6), frac=st.sampled_from([0.0, 0.5, 1.0]))
def test_negative_filtering(seed, frac):
    G, g = instance(seed, n_max=7)
    s = G @ g
    z, keep = negative_filtering(g, G, frac=frac)
    neg = np.sum(s < 0)
    assert keep.sum() == G.shape[0] - int(np.floor(frac * neg))
    assert np.all(s[keep] >= s[~keep].max(initial=-np.inf)) or frac == 0
    if frac == 1.0:  # the kept set maximises the sum of scores over all subsets
        best = max(sum(s[list(S)]) for r in range(G.shape[0] + 1) for S in combinations(range(len(s)), r))
        assert np.isclose(s[keep].sum(), best)
    if keep.any():
        assert np.allclose(z, G[keep].mean(0))
    else:
        assert np.array_equal(z, np.zeros(G.shape[1]))


# ----------------------------------------------------------------------------- degenerate and bad inputs


def test_degenerate_inputs():
    G0 = np.zeros((0, 4))
    g = np.array([1.0, -2.0, 0.5, 3.0])
    assert np.array_equal(project(g, Span(G0)), np.zeros(4))
    assert np.array_equal(project(g, Cone(G0)), np.zeros(4))
    assert np.array_equal(project(g, HalfSpaces(G0)), g)
    with pytest.raises(ValueError, match="G"):
        Hull(G0)
    with pytest.raises(ValueError, match="k"):
        SubsetAverages(G0, 1)
    with pytest.raises(ValueError, match="G"):
        Point.general_mean(G0)
    G = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 0]])  # duplicate and zero rows
    assert np.allclose(project(g, Span(G)), [1.0, 0, 0, 0])
    assert np.allclose(project(-g, Cone(G)), 0)
    z = np.zeros(4)  # a zero target gradient
    assert np.array_equal(project(z, Cone(G)), z)
    assert np.allclose(project(z, Hull(G)), 0)
    assert np.array_equal(lmo(z, SubsetAverages(G, 2)), G[:2].mean(0))  # ties -> lowest row indices
    assert np.array_equal(project(z, HalfSpaces(G)), z)
    assert np.array_equal(project(g, HalfSpace(np.zeros(4))), g)


def test_bad_inputs_name_the_argument():
    rng = np.random.default_rng(0)
    G, g = rng.standard_normal((4, 3)), rng.standard_normal(3)
    for k in [0, 5, 2.5, True, -1]:
        with pytest.raises(ValueError, match="k"):
            SubsetAverages(G, k)
    Gn = G.copy()
    Gn[0, 0] = np.nan
    with pytest.raises(ValueError, match="G"):
        Cone(Gn)
    with pytest.raises(ValueError, match="g"):
        project(np.array([np.nan, 0, 0]), Cone(G))
    with pytest.raises(ValueError, match="g"):
        project(np.ones(4), Cone(G))
    with pytest.raises(ValueError, match="G"):
        Span(np.ones(3))
    with pytest.raises(ValueError, match="weights"):
        SubsetAverages(G, 2, weights=np.ones(3))
    with pytest.raises(ValueError, match="weights"):
        SubsetAverages(G, 2, weights=np.array([1.0, 0, 1, 1]))
    with pytest.raises(ValueError, match="groups"):
        Product([Whole(2), Whole(2)], [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="groups"):
        Product([Whole(2)], [[0, 1, 2]])
    with pytest.raises(ValueError, match="radius"):
        Ball(g, -1.0)
    with pytest.raises(ValueError, match="S"):
        lmo(g, Cone(G))
    with pytest.raises(ValueError, match="S"):
        project(g, "cone")
    with pytest.raises(ValueError, match="S"):
        project(g, SubsetAverages(rng.standard_normal((30, 3)), 15))  # too many subsets to enumerate
    with pytest.raises(ValueError, match="frac"):
        negative_filtering(g, G, frac=2.0)
    with pytest.raises(ValueError, match="a"):
        HalfSpace(np.zeros(3), offset=1.0)



ROW_SETS = {"cone": Cone, "gem": HalfSpaces, "hull": Hull, "span": Span, "subset": lambda G: SubsetAverages(G, 2)}


@pytest.mark.parametrize("name", list(ROW_SETS))
def test_sets_keep_a_view_of_G_and_never_write_to_it(name):
    """G is held as a read-only view, not copied (issue 19 item 6): projecting leaves G and g as they were
    (numpy and torch, contiguous and strided), and NaN / inf anywhere in G or g is still refused by name."""
    rng = np.random.default_rng(1)
    wide = rng.standard_normal((5, 14))
    for G in (wide[:, :7].copy(), wide[:, ::2]):   # contiguous, and a strided view
        g = rng.standard_normal(G.shape[1])
        G0, g0 = G.copy(), g.copy()
        S = ROW_SETS[name](G)
        z = project(g, S)
        assert np.array_equal(G, G0) and np.array_equal(g, g0) and G.flags.writeable
        np.testing.assert_allclose(z, project(g0, ROW_SETS[name](G0)), rtol=1e-12, atol=1e-14)  # BLAS order
        for bad in (np.nan, np.inf, -np.inf):
            Gb, gb = G.copy(), g.copy()
            Gb[3, 5], gb[4] = bad, bad
            with pytest.raises(ValueError, match="^G: contains NaN or infinite values"):
                ROW_SETS[name](Gb)
            with pytest.raises(ValueError, match="^g: contains NaN or infinite values"):
                project(gb, S)
    Gt, gt = torch.tensor(G0), torch.tensor(g0)
    project(gt, ROW_SETS[name](Gt))
    assert torch.equal(Gt, torch.tensor(G0)) and torch.equal(gt, torch.tensor(g0))



def test_all_finite_equals_the_full_mask_for_every_layout():
    """The sliced finiteness check (no full-size boolean mask) == np.isfinite(x).all(), for C, Fortran,
    strided and 3-D transposed arrays, a bad value at every position, slices shorter than a row."""
    from theory._checks import all_finite

    base = np.arange(60.0).reshape(3, 4, 5)
    layouts = [lambda a: a, lambda a: np.asfortranarray(a), lambda a: a[:, ::2, 1:], lambda a: a.transpose(2, 0, 1),
               lambda a: a[1, :, ::3]]
    for make in layouts:
        assert all_finite(make(base), block=7)
        for i in range(base.size):
            for bad in (np.nan, np.inf, -np.inf):
                x = base.copy()
                x.flat[i] = bad
                view = make(x)
                assert all_finite(view, block=7) == bool(np.isfinite(view).all())

def test_direct_products_equal_the_blocked_normalised_rows(monkeypatch):
    """The Gram / dot / combine products taken on G itself (row scales within 2^+-200) equal the blocked
    computation on explicitly normalised rows, for rows of norms 1e-30 .. 1e30."""
    import theory.projection as tp

    rng = np.random.default_rng(2)
    G = rng.standard_normal((12, 40)) * np.logspace(-30, 30, 12)[:, None]
    G[: 4] *= -1
    g = rng.standard_normal(40)
    fast = {k: project(g, ROW_SETS[k](G)) for k in ("cone", "gem", "hull", "subset")}
    assert ROW_SETS["cone"](G)._unit()[0].direct
    monkeypatch.setattr(tp, "_DIRECT", 0.5)  # no row scale lies in [2, 0.5]: every product goes by blocks
    assert not ROW_SETS["cone"](G)._unit()[0].direct
    for k, z in fast.items():
        np.testing.assert_allclose(z, project(g, ROW_SETS[k](G)), rtol=1e-12, atol=1e-12 * np.abs(z).max(),
                                   err_msg=k)

def test_torch_in_torch_out():
    rng = np.random.default_rng(0)
    G, g = rng.standard_normal((5, 6)), rng.standard_normal(6)
    gt = torch.tensor(g, dtype=torch.float32)
    for S in [Cone(torch.tensor(G)), Hull(G), HalfSpaces(torch.tensor(G, dtype=torch.float32))]:
        out = project(gt, S)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        assert np.allclose(out.numpy(), project(gt.double().numpy(), S), atol=1e-6)
    out = lmo(gt, SubsetAverages(torch.tensor(G), 2))
    assert isinstance(out, torch.Tensor)


# ----------------------------------------------------------------------------- moments


def test_moments_linear_exact_vs_monte_carlo():
    rng = np.random.default_rng(0)
    d = 6
    G = rng.standard_normal((3, d))
    A = rng.standard_normal((d, d))
    cov, mean, truth = A @ A.T / d, rng.standard_normal(d), rng.standard_normal(d)
    groups = [np.arange(3), np.arange(3, 6)]
    for S in [Whole(d), Point.general_mean(G), Span(G),
              Product([Span(G[:, :3]), Point(np.zeros(3))], groups)]:
        ex = moments(S, truth, mean=mean, cov=cov)
        assert ex.exact and np.isclose(ex.mse, ex.bias2 + ex.variance)
        X = mean + rng.standard_normal((20000, d)) @ np.linalg.cholesky(cov).T
        mc = moments(S, truth, samples=X)
        assert abs(mc.mse - ex.mse) <= 4 * mc.se_mse + 1e-12  # 4 standard errors, fixed seed
        assert abs(mc.variance - ex.variance) <= 4 * mc.se_variance + 1e-12
        # on the empirical distribution of the samples, Monte Carlo and the exact formula coincide
        emp = moments(S, truth, mean=X.mean(0), cov=np.cov(X.T, bias=True))
        assert np.isclose(mc.mse, emp.mse, rtol=1e-9)
    assert moments(Point(mean), truth, mean=mean, cov=cov).variance == 0.0


def test_moments_monte_carlo_nonlinear():
    rng = np.random.default_rng(1)
    d = 5
    G = rng.standard_normal((4, d))
    mean, truth = rng.standard_normal(d), rng.standard_normal(d)
    cov = 0.3 * np.eye(d)
    m = moments(Cone(G), truth, mean=mean, cov=cov, n_mc=3000, seed=0)
    assert not m.exact and np.isclose(m.mse, m.bias2 + m.variance)
    # a loop reference over the same draws
    Z = np.random.default_rng(0).standard_normal((3000, d))
    U = np.stack([project(mean + np.sqrt(0.3) * z, Cone(G)) for z in Z])
    assert np.isclose(m.mse, np.mean(np.sum((U - truth) ** 2, 1)), rtol=1e-8)
    # projection is non-expansive and truth = P(truth) here, so the update's MSE <= the estimator's
    t_in = project(truth, Cone(G))
    m2 = moments(Cone(G), t_in, mean=mean, cov=cov, n_mc=3000)
    raw = np.sum((mean - t_in) ** 2) + np.trace(cov)
    assert m2.mse <= raw + 4 * m2.se_mse
    lm = moments(SubsetAverages(G, 2), truth, mean=mean, cov=cov, rule="lmo", n_mc=500)
    assert lm.variance >= 0 and lm.m == 500
    with pytest.raises(ValueError, match="updates"):
        update_moments(np.zeros((1, d)), truth)
    with pytest.raises(ValueError, match="cov"):
        moments(Cone(G), truth, mean=mean, cov=-np.eye(d))
    with pytest.raises(ValueError, match="rule"):
        moments(Cone(G), truth, mean=mean, cov=cov, rule="other")


def test_cone_and_gem_on_rows_of_very_different_norms():
    """Per-sample gradient norms spanning 1e-5..1e5 (logistic losses do this): the projections still satisfy
    their optimality conditions (the cone is invariant to row scaling, which the solver exploits)."""
    rng = np.random.default_rng(3)
    G = rng.normal(size=(20, 40)) * np.logspace(-5, 5, 20)[:, None]
    g = rng.normal(size=40)
    p = project(g, Cone(G))
    r = g - p
    unit = G / np.linalg.norm(G, axis=1, keepdims=True)
    assert np.max(unit @ r) <= 1e-8 * np.linalg.norm(g)      # <g - P(g), G_i> <= 0 for every generator
    assert abs(r @ p) <= 1e-8 * np.linalg.norm(g) ** 2       # complementary slackness
    q = project(g, HalfSpaces(G))
    assert np.min(unit @ q) >= -1e-8 * np.linalg.norm(g)     # feasible: G q >= 0
    np.testing.assert_allclose(q - g, project(-g, Cone(G)), atol=1e-8 * np.linalg.norm(g))  # Moreau


# ----------------------------------------------------------------------------- scale and termination (issue 18)


TRIANGLE = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])


@pytest.mark.parametrize("s", [1e-30, 1e-8, 1e-7, 1e-6, 1.0, 1e8, 1e30])
def test_hull_example_of_the_issue_is_scale_equivariant(s):
    """Hull of s*[[1,0],[0,1],[-1,-1]] with g = s*[3,3] is s*[0.5, 0.5] at every scale (it was
    [0.498, 0.502] at 1e-7 and [4e-16, -4e-16] at 1e-8)."""
    z = project(s * np.array([3.0, 3.0]), Hull(s * TRIANGLE))
    np.testing.assert_allclose(z / s, [0.5, 0.5], rtol=1e-13)


def test_tiny_gradients_are_projected_with_relative_tolerances():
    """bf16 per-sample gradients can be 1e-13: an absolute tolerance used to zero them."""
    np.testing.assert_allclose(project(np.array([1e-13, -1e-13]), Cone(np.eye(2))), [1e-13, 0.0], rtol=1e-14)
    z = project(np.array([-1e-13, 1e-13]), HalfSpaces(np.eye(2)))
    np.testing.assert_allclose(z, [0.0, 1e-13], rtol=1e-14)
    assert np.all(z >= 0)  # inside the set (it used to return g)


@pytest.mark.parametrize("s", [1e-300, 1e-200, 1e-160, 1e160, 1e200, 1e300])
def test_extreme_scales_give_the_right_answer_for_every_set(s):
    """Beyond 1e+-160 the Gram entries over/underflow: NaN, LinAlgError, a TypeError from SubsetAverages
    and a wrong Ball before; Hull at 1e200 hung in lstsq."""
    G, g = s * TRIANGLE, s * np.array([3.0, 3.0])
    expected = {Hull(G): [0.5, 0.5], Cone(G): [3.0, 3.0], HalfSpaces(G): [0.0, 0.0], Span(G): [3.0, 3.0],
                SubsetAverages(G, 2): [0.5, 0.5], HalfSpace(G[0]): [3.0, 3.0],
                Ball(G[0], 2.0 * s): [1 + 4 / 13**0.5, 6 / 13**0.5]}
    for S, want in expected.items():
        np.testing.assert_allclose(project(g, S) / s, want, rtol=1e-12, atol=1e-15, err_msg=type(S).__name__)
    np.testing.assert_allclose(lmo(g, Ball(G[0], s)) / s, [1 + 0.5**0.5, 0.5**0.5], rtol=1e-14)
    assert np.array_equal(lmo(g, Hull(G)), G[0]) and np.allclose(lmo(g, SubsetAverages(G, 2)) / s, [0.5, 0.5])
    assert np.isclose(support(g / s, Hull(G)) / s, 3.0)


def test_hull_at_1e200_returns_at_once():
    import time

    start = time.perf_counter()
    z = project(1e200 * np.array([1.0, 1.0]), Hull(1e200 * np.eye(2)))
    assert time.perf_counter() - start < 5.0
    np.testing.assert_allclose(z, [5e199, 5e199], rtol=1e-14)


def test_active_set_terminates_on_rank_deficient_problems_and_reprojections_at_1e30():
    """The issue's counts: 1 of 500 rank-2 6x5 problems did not converge, 346 of 500 re-projections at 1e30."""
    rng = np.random.default_rng(18)
    for _ in range(500):
        G = rng.standard_normal((6, 2)) @ rng.standard_normal((2, 5))
        g = rng.standard_normal(5)
        for make in (Cone, Hull, HalfSpaces):
            z = project(g, make(G))
            scale = 1 + np.linalg.norm(g)
            assert np.linalg.norm(project(z, make(G)) - z) <= 1e-7 * scale, make.__name__
            z30 = project(1e30 * z, make(1e30 * G))
            assert np.linalg.norm(project(z30, make(1e30 * G)) - z30) <= 1e-7 * 1e30 * scale, make.__name__


def test_the_iteration_cap_raises_a_clear_error():
    from theory.projection import ProjectionError, _active_set

    K, b = np.eye(3), np.ones(3)  # needs three entries
    assert np.allclose(_active_set(K, b), 1.0)
    with pytest.raises(ProjectionError, match="did not converge in 1 iterations"):
        _active_set(K, b, max_iter=1)


scales = st.integers(-30, 30).map(lambda k: 10.0**k)


def scaled_sets(G, g, seed, s):
    """The convex sets of `convex_sets` built on s*G (offsets and radii scaled to match)."""
    rng = np.random.default_rng(seed)
    offset, radius = float(rng.normal()), float(rng.uniform(0.1, 2.0))
    return [(Span(G), Span(s * G)), (Cone(G), Cone(s * G)), (Hull(G), Hull(s * G)),
            (HalfSpaces(G), HalfSpaces(s * G)), (HalfSpace(G.mean(0), offset), HalfSpace(G.mean(0), s * offset)),
            (Ball(G[0], radius), Ball(s * G[0], s * radius))]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), deficient=st.booleans(), s=scales)
def test_projection_is_scale_equivariant_and_matches_cvxpy(seed, deficient, s):
    """P(s g; s G) / s equals cvxpy's projection of g on G for s over 1e-30..1e30."""
    G, g = instance(seed, deficient)
    for S, S_s in scaled_sets(G, g, seed, s):
        z = project(s * g, S_s) / s
        assert np.all(np.isfinite(z))
        assert np.linalg.norm(z - cvx_project(g, S)) <= 1e-6 * (1 + np.linalg.norm(g)), type(S).__name__
        assert np.linalg.norm(z - project(g, S)) <= 1e-9 * (1 + np.linalg.norm(g)), type(S).__name__


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), s=scales, weighted=st.booleans())
def test_subset_rules_are_scale_invariant_and_match_brute_force(seed, s, weighted):
    G, g = instance(seed, n_max=6)
    n = G.shape[0]
    w = np.random.default_rng(seed).integers(1, 50, n).astype(float) if weighted else np.ones(n)
    k = max(1, n // 2)
    S = SubsetAverages(s * G, k, w)
    np.testing.assert_allclose(project(s * g, S) / s, brute_project(g, G, k, w), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lmo(s * g, S) / s, brute_lmo(g, G, k, w)[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(lmo(s * g, Hull(s * G)) / s, lmo(g, Hull(G)), rtol=1e-15)
    assert np.array_equal(negative_filtering(s * g, s * G)[1], negative_filtering(g, G)[1])
