"""Fuzzing harness for the theory APIs (issue 18): hypothesis draws valid and invalid inputs and asserts

- finite output for finite valid input;
- ValueError naming the offending argument for invalid input;
- no other exception, ever (no NaN, LinAlgError, TypeError, RuntimeError, hang).

Each property runs twice: a fast derandomised profile in the default run (the whole file in well under a
minute) and a long randomised profile under `pytest -m slow` (many more examples; a failure prints the
blob that reproduces it). The targeted regression tests with the issue's examples live next to each
module's other tests; this file is the net that catches what they did not think of.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from theory import projection as tp
from theory.estimator import PRESETS, preset
from theory.finite import FiniteProblem
from theory.forgetting import LogLinearProblem, random_problem
from theory.moments import exact_moments
from theory.schedules import HptGate, Maxright

FAST = settings(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck), database=None)
LONG = settings(derandomize=False, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


def fuzz(fast: int, long: int, **strategies):
    """(fast test, long test) of one property: `fast` derandomised examples, `long` random ones under slow."""

    def build(check):
        quick = settings(FAST, max_examples=fast)(given(**strategies)(check))
        slow = pytest.mark.slow(settings(LONG, max_examples=long)(given(**strategies)(check)))
        return quick, slow

    return build


def outcome(fn, *args, **kwargs):
    """Run fn: ('ok', value) or ('value_error', message); any other exception fails the test."""
    try:
        return "ok", fn(*args, **kwargs)
    except ValueError as e:
        return "value_error", str(e)


def expect_value_error(words, fn, *args, **kwargs):
    kind, got = outcome(fn, *args, **kwargs)
    assert kind == "value_error", f"expected ValueError naming {words}, got a result"
    assert any(w in got for w in words), f"ValueError does not name {words}: {got}"


def finite(x) -> bool:
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all())
    return bool(np.all(np.isfinite(np.asarray(x, dtype=np.float64))))


# ----------------------------------------------------------------------------- projections


@st.composite
def rows(draw, n_max=6, d_max=6):
    """(G, g) with moderate entries: generic, rank-deficient, duplicated, integer or offset rows."""
    n, d = draw(st.integers(1, n_max)), draw(st.integers(1, d_max))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["generic", "low_rank", "duplicate", "integer", "offset", "zero_row"]))
    G = rng.standard_normal((n, d))
    if kind == "low_rank" and min(n, d) > 1:
        r = int(rng.integers(1, min(n, d)))
        G = rng.standard_normal((n, r)) @ rng.standard_normal((r, d))
    elif kind == "duplicate":
        G[-1] = G[0]
    elif kind == "integer":
        G = rng.integers(-2, 3, (n, d)).astype(float)
    elif kind == "offset":
        G += 10.0
    elif kind == "zero_row":
        G[0] = 0.0
    g = rng.standard_normal(d) * 10.0 ** draw(st.integers(-2, 2))
    return G, g


def set_pairs(G, g, s):
    """Pairs (S on G, the same set on s G) for every set type."""
    n, d = G.shape
    w = np.arange(1.0, n + 1)
    k = max(1, n // 2)
    offset = 0.3 if np.any(G.mean(0)) else 0.0  # a zero normal with a positive offset is the empty set
    out = [(tp.Span(G), tp.Span(s * G)), (tp.Cone(G), tp.Cone(s * G)), (tp.Hull(G), tp.Hull(s * G)),
           (tp.HalfSpaces(G), tp.HalfSpaces(s * G)), (tp.Point.general_mean(G, w), tp.Point.general_mean(s * G, w)),
           (tp.HalfSpace(G.mean(0), offset), tp.HalfSpace(G.mean(0), offset * s)),
           (tp.Ball(G[0], 0.7), tp.Ball(s * G[0], 0.7 * s)), (tp.Whole(d), tp.Whole(d)),
           (tp.SubsetAverages(G, k, w), tp.SubsetAverages(s * G, k, w))]
    if d >= 2:
        groups = [np.arange(d // 2), np.arange(d // 2, d)]
        out.append((tp.Product([tp.Cone(G[:, groups[0]]), tp.Hull(G[:, groups[1]])], groups),
                    tp.Product([tp.Cone(s * G[:, groups[0]]), tp.Hull(s * G[:, groups[1]])], groups)))
    return out


def check_projection_scale(data, k):
    """P(s g; s G) / s = P(g; G) for s = 10^k, k in [-30, 30]; the same for lmo over bounded sets."""
    G, g = data
    s = 10.0**k
    scale = 1 + np.linalg.norm(g) + np.abs(G).max()
    for S, S_s in set_pairs(G, g, s):
        kind, z = outcome(tp.project, s * g, S_s)
        assert kind == "ok", (type(S).__name__, z)
        assert finite(z), type(S).__name__
        assert np.linalg.norm(z / s - tp.project(g, S)) <= 1e-6 * scale, type(S).__name__
        if S.bounded:
            assert np.linalg.norm(tp.lmo(s * g, S_s) / s - tp.lmo(g, S)) <= 1e-9 * scale, type(S).__name__


def check_projection_extreme(data, k, j):
    """G at 10^k and g at 10^j, anywhere in 1e-160..1e160: finite answers, never an exception."""
    G, g = data
    for _, S in set_pairs(G, g, 10.0**k):
        kind, z = outcome(tp.project, 10.0**j * g, S)
        assert kind == "ok" and finite(z), (type(S).__name__, z)
        if S.bounded:
            assert finite(tp.lmo(10.0**j * g, S)), type(S).__name__


def check_projection_invalid(data, bad):
    G, g = data
    h = g.copy()
    h[0] = bad
    Gb = G.copy()
    Gb[-1, -1] = bad
    for _, S in set_pairs(G, g, 1.0):
        expect_value_error(["g"], tp.project, h, S)
        expect_value_error(["g"], tp.project, np.append(g, 1.0), S)
    for make in (tp.Span, tp.Cone, tp.Hull, tp.HalfSpaces):
        expect_value_error(["G"], make, Gb)
    expect_value_error(["radius"], tp.Ball, g, bad)
    expect_value_error(["offset", "a"], tp.HalfSpace, g, bad)


test_projection_scale, test_projection_scale_long = fuzz(25, 400, data=rows(), k=st.integers(-30, 30))(
    check_projection_scale)
test_projection_extreme, test_projection_extreme_long = fuzz(15, 300, data=rows(), k=st.integers(-160, 160),
                                                             j=st.integers(-160, 160))(check_projection_extreme)
test_projection_invalid, test_projection_invalid_long = fuzz(
    5, 50, data=rows(), bad=st.sampled_from([math.nan, math.inf, -math.inf]))(check_projection_invalid)


# ----------------------------------------------------------------------------- estimator

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def batches(draw):
    """(estimator, logp, keywords) with random dtype, mask, advantages, demonstrations and normalisers."""
    est = preset(draw(st.sampled_from(sorted(PRESETS))))
    dtype = draw(st.sampled_from(DTYPES))
    G, n_groups, T = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 5))
    B = G * n_groups
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    spread = draw(st.sampled_from([0.0, 1.0, 15.0]))  # 15: log-ratios beyond the clamp
    depth = draw(st.sampled_from([1.0, 30.0, 1e4]))   # how negative log-probs get
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * depth
    old = (logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0)
    mask = torch.rand(B, T, generator=g) > draw(st.sampled_from([0.0, 0.3, 1.0]))  # 1.0: all masked
    logp = torch.where(mask, logp, torch.full_like(logp, draw(st.sampled_from([0.0, -math.inf, math.nan]))))
    kw = dict(old_logp=old.to(dtype), mask=mask)
    if est.advantage == "given":
        kw["advantages"] = torch.randn(B, generator=g, dtype=torch.float64) * 3
    elif est.advantage != "one":
        rewards = torch.randint(0, 2, (B,), generator=g).to(torch.float64)
        if draw(st.booleans()):
            rewards = torch.randn(B, generator=g, dtype=torch.float64) * 10.0 ** draw(st.integers(-3, 30))
        kw["advantages"] = est.advantages(rewards.to(draw(st.sampled_from([torch.float32, torch.float64]))), G)
    if est.demo_reference is not None:
        kw["is_demo"] = torch.arange(B) % G == G - 1
    for name in ("num_items", "num_seqs", "max_length"):
        if draw(st.booleans()):
            kw[name] = draw(st.sampled_from([int, np.int64, np.int32, float, np.float32]))(draw(st.integers(1, 50)))
    return est, logp.to(dtype), kw


def check_estimator(batch):
    est, logp, kw = batch
    kind, w = outcome(est.coefficients, logp, **kw)
    assert kind == "ok", w
    assert finite(w) and w.dtype == torch.promote_types(logp.dtype, torch.float32)
    x = logp.clone().requires_grad_()
    loss = est.loss(x, **kw)
    assert finite(loss)
    loss.backward()
    if logp.dtype != torch.float16:  # float16 stores the gradient in float16: coefficients > 65504 overflow
        assert finite(x.grad[kw["mask"]])
    assert all(math.isfinite(v) for v in est.diagnostics(logp, **kw).values())


def check_estimator_invalid(batch, where, bad):
    est, logp, kw = batch
    M = kw["mask"]
    if not bool(M.any()):
        return
    i, t = [int(v[0]) for v in torch.nonzero(M, as_tuple=True)]
    if where == "logp":
        logp = logp.clone()
        logp[i, t] = bad
        expect_value_error(["logp"], est.loss, logp, **kw)
    elif where == "old_logp" and bad != -math.inf:  # -inf is a reference probability of 0: allowed
        old = kw["old_logp"].clone()
        old[i, t] = bad
        expect_value_error(["old_logp"], est.loss, logp, **{**kw, "old_logp": old})
    elif where == "advantages" and "advantages" in kw:
        A = kw["advantages"].clone()
        A[i] = bad
        expect_value_error(["advantages"], est.loss, logp, **{**kw, "advantages": A})
    elif where in ("num_items", "num_seqs", "max_length"):
        expect_value_error([where], est.loss, logp, **{**kw, where: bad})


test_estimator, test_estimator_long = fuzz(60, 2000, batch=batches())(check_estimator)
test_estimator_invalid, test_estimator_invalid_long = fuzz(
    30, 600, batch=batches(), where=st.sampled_from(["logp", "old_logp", "advantages", "num_items", "num_seqs",
                                                     "max_length"]),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]))(check_estimator_invalid)


def check_advantages(name, values, G, dtype):
    """Rewards of any float magnitude the dtype holds: float64 advantages, finite."""
    est = preset(name)
    r = torch.tensor(values[: len(values) // G * G] or [0.0] * G, dtype=dtype)
    kind, a = outcome(est.advantages, r, G)
    assert kind == "ok", a
    assert a.dtype == torch.float64 and finite(a)


test_advantages, test_advantages_long = fuzz(
    30, 1000, name=st.sampled_from([n for n in sorted(PRESETS) if PRESETS[n].advantage != "given"]),
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=12),
    G=st.integers(1, 4), dtype=st.sampled_from([torch.float32, torch.float64]))(check_advantages)


# ----------------------------------------------------------------------------- moments


def check_moments(name, scheme, seed, logit_scale, G):
    """Saturated logits (softmax probabilities down to e^-100) and all-correct contexts: finite moments,
    and the closed form equals enumeration."""
    rng = np.random.default_rng(seed)
    X, K = 2, 3
    R = (rng.random((X, K)) < 0.5).astype(float)
    R[0] = 1.0  # an all-correct context: its success probability is a sum of softmaxes
    beta = rng.dirichlet(np.ones(K), size=X)
    prob = FiniteProblem(R, rng.dirichlet(np.ones(X)), beta)
    theta = rng.normal(size=(X, K)) * logit_scale
    if scheme == "mixed" and G < 2:
        G = 2
    kind, m = outcome(exact_moments, preset(name), prob, theta, G, scheme)
    assert kind == "ok", m
    assert finite(m.mean) and finite(m.cov) and finite(m.target)
    e = exact_moments(preset(name), prob, theta, G, scheme, method="enumeration")
    assert np.allclose(m.mean, e.mean, rtol=1e-8, atol=1e-10) and np.allclose(m.cov, e.cov, rtol=1e-8, atol=1e-10)


test_moments, test_moments_long = fuzz(
    20, 500, name=st.sampled_from(["grpo", "reinforce", "dr_grpo", "rloo", "cispo", "hpt_code"]),
    scheme=st.sampled_from(["on_policy", "hpt_gate"]), seed=st.integers(0, 10**6),
    logit_scale=st.sampled_from([0.1, 1.0, 10.0, 50.0]), G=st.integers(1, 4))(check_moments)
test_moments_mixed, test_moments_mixed_long = fuzz(
    8, 200, name=st.sampled_from(["luffy", "srft"]), scheme=st.just("mixed"), seed=st.integers(0, 10**6),
    logit_scale=st.sampled_from([1.0, 50.0]), G=st.integers(2, 3))(check_moments)


# ----------------------------------------------------------------------------- forgetting optima


def check_forgetting(seed, ref_scale, beta, features, lam, shape):
    """Saturated sigmoids (theta_ref far from 0) and softmaxes (large features): the optimum is certified,
    and no worse than either natural start."""
    X, Y, d = shape
    p0 = random_problem(seed, X, Y, d, beta)
    ref = ref_scale * np.random.default_rng(seed + 1).normal(size=d)
    p = LogLinearProblem(p0.phi * features, p0.S, p0.P, beta=beta, theta_ref=ref)
    kind, out = outcome(p.optimum, lam)
    assert kind == "ok", out
    theta, value = out
    assert finite(theta) and math.isfinite(value)
    assert np.linalg.norm(p.grad_mix(theta, lam)) <= p.gradient_tolerance(lam)
    tie = 1e-9 * (1 + abs(value))
    assert value <= p.f_mix(np.zeros(d), lam) + tie and value <= p.f_mix(ref, lam) + tie


def check_forgetting_invalid(lam, theta0):
    p = random_problem(0, 2, 3, 2)
    expect_value_error(["lam"], p.optimum, lam)
    expect_value_error(["theta0"], p.optimum, 0.5, theta0)


test_forgetting, test_forgetting_long = fuzz(
    20, 500, seed=st.integers(0, 10**6), ref_scale=st.sampled_from([0.0, 10.0, 30.0, 100.0]),
    beta=st.sampled_from([0.1, 1.0, 5.0]), features=st.sampled_from([1.0, 10.0, 30.0]),
    lam=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)),
    shape=st.tuples(st.integers(1, 3), st.integers(2, 4), st.integers(1, 4)))(check_forgetting)
test_forgetting_invalid, test_forgetting_invalid_long = fuzz(
    5, 50, lam=st.sampled_from([math.nan, -0.1, 1.5, math.inf, "x", None]),
    theta0=st.sampled_from([[math.nan, 0.0], [0.0, math.inf], [0.0], "ab"]))(check_forgetting_invalid)


# ----------------------------------------------------------------------------- schedules


def check_schedules(lam, f_sft, f_dpo, accuracy):
    m = Maxright(lam, {"sft": 1.0, "dpo": 0.5})
    stats = {"f_sft": f_sft, "f_dpo": f_dpo}
    if math.isfinite(f_sft) and math.isfinite(f_dpo):
        w = m.weights(0, stats)
        assert sorted(w.values()) == [0.0, 1.0]
    else:
        expect_value_error(["f_sft", "f_dpo"], m.weights, 0, stats)
    kind, w = outcome(HptGate(lam).weights, 0, {"accuracy": accuracy})
    if 0.0 <= accuracy <= 1.0:
        assert kind == "ok" and all(math.isfinite(v) for v in w.values())
    else:
        assert kind == "value_error" and "accuracy" in w


test_schedules, test_schedules_long = fuzz(
    30, 1000, lam=st.floats(0.0, 1.0), f_sft=st.floats(allow_nan=True, allow_infinity=True),
    f_dpo=st.floats(allow_nan=True, allow_infinity=True),
    accuracy=st.one_of(st.floats(0.0, 1.0), st.floats(allow_nan=True, allow_infinity=True)))(check_schedules)
