"""Exactness of the log-linear SFT/DPO problem, its optima and fronts, runs of schedules, and the three
statements of theory/README.md section 3 (sequential lower bound, ALRIGHT rate, MAXRIGHT's target)."""

import warnings

import cvxpy as cp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.forgetting import (
    LogLinearProblem,
    NoFiniteMinimiser,
    alright_rate_bound,
    maxright_bound,
    random_problem,
    run_schedule,
    sequential_final,
    sequential_lower_bound,
    toy_problem,
)
from theory.schedules import Alright, Maxright, Mix, Sequential

# ---- references ------------------------------------------------------------------------------------


def loop_values(p, theta):
    """f_sft and f_dpo by plain loops over contexts, targets and pairs."""
    X, Y, _ = p.phi.shape
    f_sft = f_dpo = 0.0
    for x in range(X):
        logits = [float(theta @ p.phi[x, y]) for y in range(Y)]
        ref = [float(p.theta_ref @ p.phi[x, y]) for y in range(Y)]
        lz, lz_ref = np.log(np.sum(np.exp(logits))), np.log(np.sum(np.exp(ref)))
        for y in range(Y):
            f_sft -= p.S[x, y] * (logits[y] - lz)
            for l in range(Y):
                if p.P[x, y, l] > 0:
                    m = p.beta * ((logits[y] - lz) - (ref[y] - lz_ref) - (logits[l] - lz) + (ref[l] - lz_ref))
                    f_dpo += p.P[x, y, l] * np.log1p(np.exp(-m))
    return f_sft, f_dpo


def torch_grads(p, theta):
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    phi = torch.tensor(p.phi)
    logp = torch.log_softmax(phi @ th, dim=-1)
    f_sft = -(torch.tensor(p.S) * logp).sum()
    m = p.beta * (torch.tensor(p.pair_diff) @ (th - torch.tensor(p.theta_ref)))
    f_dpo = (torch.tensor(p.pair_w) * torch.nn.functional.softplus(-m)).sum()
    g_sft, = torch.autograd.grad(f_sft, th)
    g_dpo, = torch.autograd.grad(f_dpo, th)
    return g_sft.numpy(), g_dpo.numpy()


def cvx_mix(p, lam):
    """argmin of f_mix,lam with cvxpy's log_sum_exp and logistic atoms."""
    th = cp.Variable(p.dim)
    obj = 0
    if lam < 1:
        obj += (1 - lam) * (sum(p.ctx_mass[x] * cp.log_sum_exp(p.phi[x] @ th)
                                for x in range(p.phi.shape[0]) if p.ctx_mass[x] > 0) - p.sft_mean @ th)
    if lam > 0:
        obj += lam * (p.pair_w @ cp.logistic(-p.beta * (p.pair_diff @ th - p.pair_diff @ p.theta_ref)))
    prob = cp.Problem(cp.Minimize(obj))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return th.value, prob.value


def cvx_chebyshev(p, lam):
    th, t = cp.Variable(p.dim), cp.Variable()
    ideal = p.ideal_point()
    f_sft = sum(p.ctx_mass[x] * cp.log_sum_exp(p.phi[x] @ th) for x in range(p.phi.shape[0])) - p.sft_mean @ th
    f_dpo = p.pair_w @ cp.logistic(-p.beta * (p.pair_diff @ th - p.pair_diff @ p.theta_ref))
    cons = [lam * (f_dpo - ideal[1]) <= t, (1 - lam) * (f_sft - ideal[0]) <= t]
    prob = cp.Problem(cp.Minimize(t), cons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return th.value, prob.value


problems = st.builds(
    lambda seed, X, Y, d, beta, ref: _with_ref(random_problem(seed, X, Y, d, beta), ref, seed),
    seed=st.integers(0, 10**6), X=st.integers(1, 3), Y=st.integers(2, 4), d=st.integers(1, 4),
    beta=st.sampled_from([0.1, 0.5, 2.0]), ref=st.booleans())


def _with_ref(p, ref, seed):
    if not ref:
        return p
    theta_ref = np.random.default_rng(seed + 1).normal(size=p.dim)
    return LogLinearProblem(p.phi, p.S, p.P, beta=p.beta, theta_ref=theta_ref)


# ---- exact values and derivatives --------------------------------------------------------------------


@given(p=problems, seed=st.integers(0, 100))
@settings(max_examples=25, deadline=None)
def test_values_match_loops_and_gradients_match_autograd(p, seed):
    theta = np.random.default_rng(seed).normal(size=p.dim) * 2
    f_sft, f_dpo = loop_values(p, theta)
    assert np.isclose(p.f_sft(theta), f_sft, rtol=1e-12, atol=1e-12)
    assert np.isclose(p.f_dpo(theta), f_dpo, rtol=1e-12, atol=1e-12)
    g_sft, g_dpo = torch_grads(p, theta)
    assert np.allclose(p.grad_sft(theta), g_sft, atol=1e-12)
    assert np.allclose(p.grad_dpo(theta), g_dpo, atol=1e-12)
    # Hessians against central differences of the exact gradients
    eps = 1e-6
    E = np.eye(p.dim) * eps
    fd_sft = np.stack([(p.grad_sft(theta + e) - p.grad_sft(theta - e)) / (2 * eps) for e in E])
    fd_dpo = np.stack([(p.grad_dpo(theta + e) - p.grad_dpo(theta - e)) / (2 * eps) for e in E])
    assert np.allclose(p.hess_sft(theta), fd_sft, atol=1e-7)
    assert np.allclose(p.hess_dpo(theta), fd_dpo, atol=1e-7)
    # batched evaluation agrees with one-at-a-time
    thetas = np.stack([theta, -theta, 0 * theta])
    assert np.allclose(p.f_mix(thetas, 0.3), [p.f_mix(t, 0.3) for t in thetas], atol=1e-14)


def test_constants_bound_gradients_and_hessians():
    p = random_problem(3, 3, 4, 3, beta=0.5)
    c = p.constants()
    rng = np.random.default_rng(0)
    for _ in range(200):
        th = rng.normal(size=p.dim) * 3
        assert np.linalg.norm(p.grad_sft(th)) <= c["G_sft"] + 1e-12
        assert np.linalg.norm(p.grad_dpo(th)) <= c["G_dpo"] + 1e-12
        assert np.linalg.eigvalsh(p.hess_sft(th))[-1] <= c["L_sft"] + 1e-12
        assert np.linalg.eigvalsh(p.hess_dpo(th))[-1] <= c["L_dpo"] + 1e-12


# ---- optima ---------------------------------------------------------------------------------------


@given(p=problems, lam=st.sampled_from([0.0, 0.3, 0.75, 1.0]))
@settings(max_examples=30, deadline=None)
def test_optimum_matches_cvxpy(p, lam):
    theta, value = p.optimum(lam)
    th_c, v_c = cvx_mix(p, lam)
    assert abs(value - v_c) < 1e-8
    # ours is the minimum: cvxpy's point, evaluated exactly, is not lower
    assert p.f_mix(th_c, lam) >= value - 1e-12
    assert np.linalg.norm(p.grad_mix(theta, lam)) < 1e-8


def test_toy_optima_in_closed_form():
    p = toy_problem()
    th, v = p.optimum(0.0)
    assert np.allclose(th, np.log([2.0, 7.0]), atol=1e-12)
    assert np.isclose(v, -np.sum(np.array([0.2, 0.7, 0.1]) * np.log([0.2, 0.7, 0.1])), atol=1e-14)
    assert np.allclose(p.optimum(1.0)[0], [1.0, -1.0], atol=1e-10)   # BT optimum: r - r_3


def test_zero_loss_directions_give_the_least_norm_minimiser():
    # a feature that is the same for every response (a context bias) is invisible to both objectives
    base = random_problem(5, 2, 3, 2)
    phi = np.concatenate([base.phi, np.ones(base.phi.shape[:2] + (1,))], axis=-1)
    p = LogLinearProblem(phi, base.S, base.P, beta=base.beta)
    for lam in (0.0, 0.4, 1.0):
        th, v = p.optimum(lam)
        assert abs(th[-1]) < 1e-12 and np.isclose(v, base.optimum(lam)[1], atol=1e-12)
        assert np.isclose(p.f_mix(th + np.array([0, 0, 5.0]), lam), v, atol=1e-12)


def test_no_conflicting_pairs_is_detected():
    phi = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    S = np.array([[0.2, 0.7, 0.1]])
    P = np.zeros((1, 3, 3))
    P[0, 0, 1], P[0, 0, 2], P[0, 2, 1] = 0.5, 0.3, 0.2          # a consistent order y1 > y3 > y2
    p = LogLinearProblem(phi, S, P, beta=0.1)
    ok, why = p.finite_minimiser(1.0)
    assert not ok and "DPO" in why
    with pytest.raises(NoFiniteMinimiser, match="DPO"):
        p.optimum(1.0)
    with pytest.raises(NoFiniteMinimiser):
        p.ideal_point()
    # the SFT term is strictly convex in every direction here, so any mix has a finite minimiser
    assert p.finite_minimiser(0.5)[0] and np.isfinite(p.optimum(0.5)[1])
    # gradient descent on f_dpo indeed runs away: the loss keeps falling while |theta| grows
    run = run_schedule(p, Mix(1.0), 3000, np.zeros(2), lr=50.0)
    assert np.all(np.diff(run.f_dpo) < 0) and np.linalg.norm(run.theta) > 20


def test_unrealisable_sft_targets_are_detected_but_zeros_alone_are_not():
    phi = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    P = np.zeros((1, 3, 3))
    P[0, 0, 1] = P[0, 1, 0] = 0.5
    p = LogLinearProblem(phi, np.array([[0.3, 0.7, 0.0]]), P)
    assert not p.finite_minimiser(0.0)[0]
    with pytest.raises(NoFiniteMinimiser, match="SFT"):
        p.optimum(0.0)
    # 1-D features 0, 1, 2 with target (1/2, 0, 1/2): no direction makes both targets the top logit
    line = np.array([[[0.0], [1.0], [2.0]]])
    P1 = np.zeros((1, 3, 3))
    P1[0, 0, 2] = P1[0, 2, 0] = 0.5
    q = LogLinearProblem(line, np.array([[0.5, 0.0, 0.5]]), P1)
    assert q.finite_minimiser(0.0)[0]
    assert np.isclose(q.optimum(0.0)[1], cvx_mix(q, 0.0)[1], atol=1e-8)


def test_pareto_front_is_monotone_and_not_dominated():
    p = random_problem(7, 2, 4, 3)
    lams = np.linspace(0, 1, 21)
    front = p.pareto_front(lams)
    assert np.all(np.diff(front.f_sft) >= -1e-12) and np.all(np.diff(front.f_dpo) <= 1e-12)
    assert np.allclose(p.ideal_point(), [front.f_sft[0], front.f_dpo[-1]], atol=1e-12)
    rng = np.random.default_rng(1)
    thetas = front.thetas[rng.integers(0, 21, 4000)] + rng.normal(size=(4000, p.dim)) * 0.3
    fs, fd = p.f_sft(thetas), p.f_dpo(thetas)
    dominated = (fs[:, None] < front.f_sft[None, 1:-1] - 1e-12) & (fd[:, None] < front.f_dpo[None, 1:-1] - 1e-12)
    assert not dominated.any()


@pytest.mark.parametrize("seed, lam", [(0, 0.5), (1, 0.25), (2, 0.8)])
def test_chebyshev_point_matches_cvxpy(seed, lam):
    p = random_problem(seed, 2, 3, 2)
    th, val, mu = p.chebyshev_point(lam, return_weight=True)
    th_c, v_c = cvx_chebyshev(p, lam)
    assert abs(val - v_c) < 1e-8
    assert p.chebyshev_gap(th_c, lam) >= val - 1e-10
    ideal = p.ideal_point()
    # both weighted gaps are equal at the Chebyshev point
    assert np.isclose(lam * (p.f_dpo(th) - ideal[1]), (1 - lam) * (p.f_sft(th) - ideal[0]), atol=1e-10)
    assert 0 < mu < 1


@pytest.mark.parametrize("make, arg", [
    (lambda p: LogLinearProblem(p.phi, -p.S, p.P), "sft_weights"),
    (lambda p: LogLinearProblem(p.phi, p.S * 2, p.P), "sft_weights"),
    (lambda p: LogLinearProblem(p.phi, p.S[:, :-1], p.P), "sft_weights"),
    (lambda p: LogLinearProblem(p.phi, p.S, p.P * 0.5), "pref_weights"),
    (lambda p: LogLinearProblem(p.phi, p.S, p.P[:, :-1]), "pref_weights"),
    (lambda p: LogLinearProblem(p.phi, p.S, p.P, beta=0.0), "beta"),
    (lambda p: LogLinearProblem(p.phi, p.S, p.P, beta=-1.0), "beta"),
    (lambda p: LogLinearProblem(p.phi[..., 0], p.S, p.P), "features"),
    (lambda p: LogLinearProblem(p.phi, p.S, p.P, theta_ref=np.zeros(p.dim + 1)), "theta_ref"),
    (lambda p: p.optimum(1.5), "lam"),
    (lambda p: p.f_mix(np.zeros(p.dim), -0.1), "lam"),
    (lambda p: p.f_sft(np.zeros(p.dim + 1)), "theta"),
    (lambda p: p.chebyshev_point(2.0), "lam"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(make, arg):
    p = random_problem(0, 2, 3, 2)
    with pytest.raises(ValueError, match=arg):
        make(p)


def test_pairs_on_the_diagonal_are_rejected():
    p = random_problem(0, 1, 3, 2)
    P = p.P.copy()
    P[0, 1, 1] = 0.1
    with pytest.raises(ValueError, match="pref_weights"):
        LogLinearProblem(p.phi, p.S, P / P.sum())


# ---- runs -----------------------------------------------------------------------------------------


def test_runs_cost_and_sequential_agrees_with_the_vectorised_version():
    p = toy_problem()
    th0 = np.array([-2.0, -2.0])
    mix = run_schedule(p, Mix(0.5), 50, th0, lr=0.5)
    assert mix.grad_evals[-1] == 100 and mix.thetas.shape == (51, 2)
    al = run_schedule(p, Alright(0.5, seed=3), 50, th0, lr=0.5)
    assert al.grad_evals[-1] == 50 and set(al.weights.sum(axis=1)) == {1.0}
    seq = run_schedule(p, Sequential(order=("dpo", "sft"), split=0.3, total_steps=50), 50, th0, lr=0.5)
    assert np.allclose(seq.theta, sequential_final(p, ("dpo", "sft"), 0.5, th0, 50, [15])[0], atol=1e-13)
    # a Mix step is the exact gradient step on f_mix
    assert np.allclose(mix.thetas[1], th0 - 0.5 * p.grad_mix(th0, 0.5), atol=1e-15)
    assert np.allclose(mix.f_sft, p.f_sft(mix.thetas)) and np.allclose(mix.f_dpo, p.f_dpo(mix.thetas))


def test_maxright_run_follows_the_exact_rule_and_the_stale_rule():
    p = random_problem(2, 2, 3, 2)
    ideal = p.ideal_point()
    lam = 0.5
    run = run_schedule(p, Maxright(lam, ideal, k=1), 200, np.zeros(2), lr=0.3)
    gs = (1 - lam) * (run.f_sft[:-1] - ideal[0])
    gd = lam * (run.f_dpo[:-1] - ideal[1])
    assert np.array_equal(run.weights[:, 1] == 1.0, gd > gs)
    assert run.value_evals == 400
    stale = run_schedule(p, Maxright(lam, ideal, k=10), 200, np.zeros(2), lr=0.3)
    assert stale.value_evals == 40 and stale.grad_evals[-1] == 200


def test_minibatch_gradients_are_unbiased():
    p = random_problem(4, 3, 4, 2)
    th = np.array([0.3, -0.7])
    rng = np.random.default_rng(0)
    gs = np.array([p.minibatch_sft(th, *p.sample_sft(rng, 8))[1] for _ in range(4000)])
    gd = np.array([p.minibatch_dpo(th, p.sample_pairs(rng, 8))[1] for _ in range(4000)])
    for g, exact in ((gs, p.grad_sft(th)), (gd, p.grad_dpo(th))):
        se = g.std(axis=0) / np.sqrt(len(g))
        assert np.all(np.abs(g.mean(axis=0) - exact) < 5 * se + 1e-12)     # 5 standard errors
    run = run_schedule(p, Alright(0.5, 1), 20, th, lr=0.1, batch_size=4, seed=2)
    assert run.grad_evals[-1] == 20 and np.all(np.isfinite(run.thetas))


# ---- theory/README.md section 3 -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", [("sft", "dpo"), ("dpo", "sft")])
def test_sequential_lower_bound_holds_for_every_split_and_budget(seed, order):
    p = random_problem(seed, 2, 3, 2)
    c = p.constants()
    lr = 1.0 / max(c["L_sft"], c["L_dpo"])
    th0 = np.random.default_rng(seed).normal(size=2) * 2
    lam = 0.5
    for m in (0, 25):
        b = sequential_lower_bound(p, lam, order, lr, th0, min_stage_steps=m)
        assert b.bound > 0 and b.gradient_bound <= b.asymptotic_gap + 1e-12
        for N in (60, 300, 3000):
            n1 = np.unique(np.linspace(m, N - m, 61).astype(int))
            gaps = p.gap_mix(sequential_final(p, order, lr, th0, N, n1), lam)
            assert gaps.min() >= b.bound - 1e-12
    # bounded away from zero as the budget grows: at a fixed split fraction the gap tends to the gap at
    # the second objective's optimum, and the certificate for long stages approaches it
    far = p.gap_mix(sequential_final(p, order, lr, th0, 20000, [10000]), lam)[0]
    assert np.isclose(far, b.asymptotic_gap, rtol=1e-3)
    assert sequential_lower_bound(p, lam, order, lr, th0, min_stage_steps=1000).bound >= 0.9 * b.asymptotic_gap


def test_sequential_bound_is_zero_when_the_second_optimum_is_the_target():
    p = random_problem(0, 2, 3, 2)
    b = sequential_lower_bound(p, 1.0, ("sft", "dpo"), 0.5, np.zeros(2))
    assert b.bound == 0.0 and abs(b.asymptotic_gap) < 1e-12
    with pytest.raises(ValueError, match="lr"):
        sequential_lower_bound(p, 0.5, ("sft", "dpo"), 1e3, np.zeros(2))


def _alright_gaps(p, lam, th0, T, seeds):
    """f_mix gap of the averaged ALRIGHT iterate, step of Theorem 2, for each seed (vectorised)."""
    info = alright_rate_bound(p, lam, th0, T, lr=None)
    th = np.tile(th0, (len(seeds), 1))
    acc = np.zeros_like(th)
    scheds = [Alright(lam, seed=s) for s in seeds]
    for t in range(T):
        acc += th
        pick_dpo = np.array([s.choice(t) == "dpo" for s in scheds])[:, None]
        th = th - info["lr"] * np.where(pick_dpo, p.grad_dpo(th), p.grad_sft(th))
    return p.gap_mix(acc / T, lam), info


def test_alright_rate_bound_holds_and_the_decay_is_at_least_inverse_sqrt():
    p = random_problem(1, 2, 3, 2)
    lam, th0 = 0.5, np.array([2.0, -2.0])
    Ts = [100, 400, 1600, 6400]
    means = []
    for T in Ts:
        gaps, info = _alright_gaps(p, lam, th0, T, seeds=range(12))
        means.append(gaps.mean())
        assert gaps.mean() <= info["bound"]          # the bound is on the expectation; it is loose here
    slope = np.polyfit(np.log(Ts), np.log(means), 1)[0]
    assert slope <= -0.45, f"observed decay T^{slope:.2f}"


def test_maxright_reaches_the_chebyshev_point_not_the_mix_optimum():
    p = toy_problem()
    lam, th0 = 0.25, np.array([-2.0, -2.0])
    T = 4000
    lrs = 1.0 / np.sqrt(np.arange(T) + 1.0)
    ideal = p.ideal_point()
    run = run_schedule(p, Maxright(lam, ideal, k=1), T, th0, lr=lambda t: lrs[t])
    th_c, h_star = p.chebyshev_point(lam)
    h = p.chebyshev_gap(run.thetas[:-1], lam)
    assert h.min() - h_star <= maxright_bound(p, lam, th0, lrs)
    assert h.min() - h_star < 1e-3
    assert np.linalg.norm(run.theta - th_c) < 0.02
    # ... which is not argmin f_mix: its f_mix gap stays at that of the Chebyshev point
    gap_c = p.gap_mix(th_c, lam)
    assert gap_c > 1e-3 and abs(p.gap_mix(run.theta, lam) - gap_c) < 0.2 * gap_c
    # ALRIGHT with the same steps goes to argmin f_mix instead
    al = run_schedule(p, Alright(lam, seed=0), T, th0, lr=lambda t: lrs[t])
    assert p.gap_mix(al.averaged_theta(), lam) < 0.2 * gap_c


# ---- saturated sigmoids and softmaxes (issue 18 items 3 and 5) ------------------------------------------


def saturated(seed, scale, beta, X=3, Y=3, d=3, features=1.0):
    """random_problem with theta_ref = scale * N(0, I) (DPO margins saturate at theta = 0) and features
    multiplied by `features` (softmaxes saturate)."""
    p = random_problem(seed, X, Y, d, beta)
    theta_ref = scale * np.random.default_rng(seed + 1).normal(size=d)
    return LogLinearProblem(p.phi * features, p.S, p.P, beta=beta, theta_ref=theta_ref)


def test_saturated_example_of_the_issue_is_certified():
    """Damped Newton returned theta = 0 with f* = 65.7 > f(theta_ref) = log 2 and |grad| = 2 without a word
    (the Newton direction of a numerically singular Hessian had a negative decrement)."""
    p = saturated(3, scale=30, beta=2)
    theta, value = p.optimum(1.0)
    assert np.linalg.norm(p.grad_mix(theta, 1.0)) <= p.gradient_tolerance(1.0)
    assert value <= p.f_dpo(p.theta_ref) == np.log(2.0)
    th_c, v_c = cvx_mix(p, 1.0)
    assert abs(value - v_c) < 1e-8 and p.f_mix(th_c, 1.0) >= value - 1e-12


@given(seed=st.integers(0, 10**6), regime=st.sampled_from([(30, 2, 1), (100, 5, 1), (0, 1, 30), (30, 2, 10)]),
       lam=st.sampled_from([0.0, 0.3, 0.75, 1.0]))
@settings(max_examples=25, deadline=None)
def test_saturated_optima_are_certified_and_match_cvxpy(seed, regime, lam):
    scale, beta, features = regime
    p = saturated(seed, scale, beta, features=features)
    theta, value = p.optimum(lam)
    assert np.linalg.norm(p.grad_mix(theta, lam)) <= p.gradient_tolerance(lam)
    th_c, v_c = cvx_mix(p, lam)
    assert abs(value - v_c) <= 1e-7 * (1 + abs(value))
    assert p.f_mix(th_c, lam) >= value - 1e-10 * (1 + abs(value))


def test_an_uncertified_optimum_raises(monkeypatch):
    from theory.forgetting import OptimumNotCertified

    p = saturated(3, scale=30, beta=2)
    monkeypatch.setattr(LogLinearProblem, "_minimise", lambda self, lam, B, z, tol: z)  # a solver that gives up
    with pytest.raises(OptimumNotCertified, match="not certified"):
        p.optimum(1.0)


def test_hessians_take_a_batch_of_theta():
    p = random_problem(1, 2, 3, 3)
    thetas = np.random.default_rng(0).normal(size=(4, 5, 3))
    for hess in (p.hess_sft, p.hess_dpo):
        H = hess(thetas)
        assert H.shape == (4, 5, 3, 3)
        assert np.allclose(H[2, 3], hess(thetas[2, 3]), rtol=0, atol=1e-15)


@pytest.mark.parametrize("call, arg", [
    (lambda p: p.optimum(0.5, theta0=[np.nan] * 2), "theta0"),
    (lambda p: run_schedule(p, Mix(0.5), 3, [np.inf, 0.0], 0.1), "theta0"),
    (lambda p: LogLinearProblem(p.phi, p.S, p.P, beta="2"), "beta"),
    (lambda p: LogLinearProblem(p.phi, p.S, p.P, beta=True), "beta"),
    (lambda p: LogLinearProblem("features", p.S, p.P), "features"),
    (lambda p: p.f_sft("x"), "theta"),
])
def test_more_bad_inputs_name_the_argument(call, arg):
    p = random_problem(0, 2, 3, 2)
    with pytest.raises(ValueError, match=arg):
        call(p)
