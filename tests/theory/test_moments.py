"""theory.moments: closed form == enumeration (1e-10); the exact bias identities of theory/README.md 2.4-2.7;
input validation. The Monte Carlo check (autograd through estimator.loss) is in tests/toy/test_bandit.py."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom

from theory.estimator import UPGE, preset
from theory.finite import FiniteProblem, Objective, softmax_policy
from theory.moments import GateRule, exact_moments

TOL = 1e-10

# (estimator, scheme, extra kwargs) covering every preset and every reference / advantage / scheme
CASES = [(n, "on_policy", {}) for n in ("grpo", "reinforce", "cispo", "gspo", "dapo", "dr_grpo", "bnpo", "rloo",
                                        "hpt_paper", "hpt_code", "luffy", "srft")]
CASES += [("sft", "demonstration", {}), ("luffy", "mixed", {}), ("srft", "mixed", {}),
          ("hpt_paper", "hpt_gate", {"gate": GateRule("paper", 0.25)}),
          ("hpt_code", "hpt_gate", {"gate": GateRule("code", 1, sft_coef=0.3)}),
          ("grpo", "hpt_gate", {}), ("ppo", "on_policy", {"table": True})]
CUSTOM = {
    "batch_std_trl": UPGE(reference="policy", advantage="group_center_batch_std_trl", mask="none",
                          aggregation="seq_mean_token_sum"),
    "token_whiten_verl": UPGE(reference="policy", advantage="group_center_token_whiten_verl", mask="none",
                              aggregation="seq_mean_token_sum"),
    "is_behaviour": UPGE(reference="behaviour", advantage="raw", mask="none", aggregation="seq_mean_token_sum"),
    "dual_clip": UPGE(reference="old", advantage="group_norm", mask="dual_clip", eps_low=0.1, eps_high=0.1),
    "opsm": preset("grpo", off_policy_mask_threshold=0.05),   # TRL's off-policy sequence mask (vs pi_old)
}
CASES += [("sapo", "on_policy", {}), ("luspo", "on_policy", {}), ("vespo", "on_policy", {}), ("opsm", "on_policy", {})]
CASES += [("batch_std_trl", "on_policy", {}), ("token_whiten_verl", "on_policy", {}),
          ("is_behaviour", "demonstration", {}), ("is_behaviour", "on_policy", {}), ("dual_clip", "on_policy", {})]


def _est(name):
    return CUSTOM[name] if name in CUSTOM else preset(name)


def _problem(seed, X=2, K=3, stochastic=False, real=False, full_support=False):
    """Random problem in which every context has a correct and an incorrect action."""
    rng = np.random.default_rng(seed)
    R = (rng.random((X, K)) < 0.5).astype(float)
    R[:, 0], R[:, 1] = 1.0, 0.0
    if stochastic:
        R = np.clip(np.abs(R - rng.uniform(0.05, 0.3, size=(X, K))), 0, 1)
    if real:
        R = rng.normal(size=(X, K))
    beta = rng.dirichlet(np.ones(K), size=X)
    if not full_support:
        beta[:, -1] = 0.0
        beta /= beta.sum(1, keepdims=True)
    return (FiniteProblem(R, rng.dirichlet(np.ones(X)), beta, stochastic=stochastic), rng.normal(size=(X, K)),
            rng.normal(scale=0.8, size=(X, K)))


def _kw(case_kw, prob, theta, old, use_old, scheme):
    kw = {}
    if "gate" in case_kw:
        kw["gate"] = case_kw["gate"]
    if case_kw.get("table"):
        pi = softmax_policy(theta if not use_old else theta + old)
        kw["advantage_table"] = prob.rewards - (pi * prob.rewards).sum(1, keepdims=True)
    if use_old and scheme != "demonstration":
        kw["old_logits"] = theta + old
    return kw


@pytest.mark.parametrize("name,scheme,case_kw", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), G=st.integers(1, 4), K=st.integers(2, 3), use_old=st.booleans(),
       stochastic=st.booleans())
def test_closed_form_equals_enumeration(name, scheme, case_kw, seed, G, K, use_old, stochastic):
    if scheme == "mixed" or name == "token_whiten_verl":  # verl's whitening needs 2 tokens (one per response)
        G = max(G, 2)
    # importance weights pi/beta need beta > 0 (else the estimator's clamped e^20 ratios swamp 1e-10)
    prob, theta, old = _problem(seed, K=K, stochastic=stochastic, full_support=name == "is_behaviour")
    kw = _kw(case_kw, prob, theta, old, use_old, scheme)
    a = exact_moments(_est(name), prob, theta, G, scheme, method="closed_form", **kw)
    b = exact_moments(_est(name), prob, theta, G, scheme, method="enumeration", **kw)
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.cov, b.cov, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.cov, a.cov.T, atol=1e-15)
    assert np.linalg.eigvalsh(a.cov).min() > -1e-12  # a covariance


@pytest.mark.parametrize("name,scheme", [("reinforce", "on_policy"), ("sft", "demonstration"),
                                         ("luffy_raw", "mixed"), ("ppo", "on_policy")])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), G=st.integers(2, 4), use_old=st.booleans())
def test_real_rewards_per_sample_closed_form(name, scheme, seed, G, use_old):
    """Real-valued rewards: the closed form without conditioning (per-sample advantages) == enumeration."""
    est = preset("luffy", advantage="raw") if name == "luffy_raw" else preset(name)
    prob, theta, old = _problem(seed, real=True)
    kw = _kw({"table": name == "ppo"}, prob, theta, old, use_old, scheme)
    a = exact_moments(est, prob, theta, G, scheme, method="closed_form", **kw)
    b = exact_moments(est, prob, theta, G, scheme, method="enumeration", **kw)
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.cov, b.cov, rtol=0, atol=TOL)


# ------------------------------------------------------------------ identities (README 2.4)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), G=st.integers(1, 4), real=st.booleans(), stochastic=st.booleans())
def test_reinforce_and_rloo_unbiased_on_policy(seed, G, real, stochastic):
    prob, theta, _ = _problem(seed, real=real, stochastic=stochastic and not real)
    for name in ("reinforce", "rloo"):
        m = exact_moments(preset(name), prob, theta, G, "on_policy")
        assert m.objective == Objective(reward=1.0)
        np.testing.assert_allclose(m.bias, 0.0, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), G=st.integers(1, 4))
def test_sft_unbiased_for_mu_term_and_importance_sampling_unbiased(seed, G):
    prob, theta, _ = _problem(seed, full_support=True)
    m = exact_moments(preset("sft"), prob, theta, G, "demonstration")
    assert m.objective == Objective(reward=0.0, mu=1.0)
    np.testing.assert_allclose(m.bias, 0.0, atol=1e-12)
    # pi_ref = pi_beta on demonstrations (importance weights pi/beta) is unbiased for grad E[r]
    m = exact_moments(CUSTOM["is_behaviour"], prob, theta, G, "demonstration", objective=Objective(reward=1.0))
    np.testing.assert_allclose(m.bias, 0.0, atol=1e-12)
    # PPO with the exact advantage r - V and ratio 1 (token mean = 1/G) is unbiased
    pi = softmax_policy(theta)
    table = prob.rewards - (pi * prob.rewards).sum(1, keepdims=True)
    m = exact_moments(preset("ppo"), prob, theta, G, advantage_table=table)
    np.testing.assert_allclose(m.bias, 0.0, atol=1e-12)


def _grpo_adv(c, G, eps=1e-6, std=True):
    """(A_incorrect, A_correct) of group_norm / group_mean for c correct of G (README 2.4)."""
    if c in (0, G) or G < 2:
        return 0.0, 0.0
    s = np.sqrt(c * (G - c) / (G * (G - 1))) + eps if std else 1.0
    return (-c / G) / s, (1 - c / G) / s


def _rl_part(G, p, agg, adv):
    """kappa with E[g | x] = kappa g* for an on-policy ratio-1 estimator, binary rewards (Theorem 2.4)."""
    return sum(binom.pmf(c, G, p) * agg * (c * adv(c)[1] - (G - c) * adv(c)[0] * p / (1 - p))
               for c in range(G + 1)) / p


def _gstar(prob, theta):
    pi = softmax_policy(theta)
    return pi, pi * (prob.rewards - (pi * prob.rewards).sum(1, keepdims=True)), (pi * prob.rewards).sum(1)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), G=st.integers(2, 8))
def test_grpo_exact_bias_formula(seed, G):
    prob, theta, _ = _problem(seed, X=3, K=4)
    _, gs, p = _gstar(prob, theta)
    rho = prob.context_probs[:, None]
    kappas = []
    for name, std, kappa_dr in (("grpo", True, None), ("dr_grpo", False, (G - 1) / G)):
        m = exact_moments(preset(name), prob, theta, G)
        kappa = np.array([_rl_part(G, px, 1 / G, lambda c, s=std: _grpo_adv(c, G, std=s)) for px in p])
        np.testing.assert_allclose(m.bias, rho * (kappa[:, None] - 1) * gs, atol=TOL)
        if kappa_dr is not None:
            np.testing.assert_allclose(kappa, kappa_dr, atol=TOL)
        kappas.append(kappa)
    # std division: kappa(p) differs between contexts (for G >= 3; for G = 2 it is the constant 1/sqrt(2)),
    # so the direction is biased; without it (Dr. GRPO) the bias is the pure scale (G-1)/G.
    if G == 2:
        np.testing.assert_allclose(kappas[0], 1 / np.sqrt(2) / (1 + 1e-6 * np.sqrt(2)), rtol=1e-12)
    if np.ptp(kappas[0]) > 0.05:
        assert exact_moments(preset("grpo"), prob, theta, G).cosine < 1 - 1e-8
    assert abs(exact_moments(preset("dr_grpo"), prob, theta, G).cosine - 1) < 1e-12


def _demo_h(name, pi, gamma=0.1):
    return pi * gamma / (pi + gamma) ** 2 if name == "luffy" else pi


@pytest.mark.parametrize("name", ["luffy", "srft"])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), G=st.integers(2, 6))
def test_pi_ref_one_exact_bias_formula(name, seed, G):
    """Mixed scheme, on-policy ratio 1: README Theorem 2.5 (the pi_ref = 1 demonstration term)."""
    prob, theta, _ = _problem(seed, X=2, K=4)
    pi, gs, p = _gstar(prob, theta)
    beta, C = prob.behaviour, prob.rewards == 1
    mean = np.zeros_like(pi)
    for x in range(2):
        pb = beta[x][C[x]].sum()
        bd = {1: np.where(C[x], beta[x], 0) / pb, 0: np.where(C[x], 0, beta[x]) / (1 - pb)}
        demo_dir = {d: (bd[d] * _demo_h(name, pi[x])) @ (np.eye(4) - pi[x][None, :]) for d in (0, 1)}
        for c_on in range(G):
            for d in (0, 1):
                c = c_on + d
                Am, Ap = _grpo_adv(c, G)
                P = binom.pmf(c_on, G - 1, p[x]) * (pb if d else 1 - pb)
                rl = (c_on * Ap - (G - 1 - c_on) * Am * p[x] / (1 - p[x])) * gs[x] / p[x]
                mean[x] += P / G * (rl + (Ap if d else Am) * demo_dir[d])
    m = exact_moments(preset(name), prob, theta, G, "mixed")
    assert m.objective == Objective(reward=(G - 1) / G, mu=1 / G)
    np.testing.assert_allclose(m.mean, prob.context_probs[:, None] * mean, atol=TOL)
    assert np.abs(m.bias).max() > 1e-6  # biased on a generic problem


@pytest.mark.parametrize("name,gate", [("hpt_paper", GateRule("paper", 0.0)), ("hpt_paper", GateRule("paper", 0.25)),
                                       ("hpt_code", GateRule("code", 0)), ("hpt_code", GateRule("code", 2, 0.3))])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), G=st.integers(2, 8))
def test_hpt_gate_exact_mean(name, gate, seed, G):
    """README Theorem 2.6: P(SFT) sft_coef (beta - pi) + sum over RL counts of the RL part."""
    prob, theta, _ = _problem(seed, X=2, K=4)
    pi, gs, p = _gstar(prob, theta)
    agg, std = (1 / G, True) if name == "hpt_paper" else (1 / 8192, False)
    mean = np.zeros_like(pi)
    for x in range(2):
        for c in range(G + 1):
            P = binom.pmf(c, G, p[x])
            if gate.trains_sft(c, G):
                mean[x] += P * gate.sft_coef * (prob.behaviour[x] - pi[x])
            else:
                Am, Ap = _grpo_adv(c, G, std=std)
                mean[x] += P * agg * (c * Ap - (G - c) * Am * p[x] / (1 - p[x])) * gs[x] / p[x]
    m = exact_moments(preset(name), prob, theta, G, "hpt_gate", gate=gate)
    np.testing.assert_allclose(m.mean, prob.context_probs[:, None] * mean, atol=TOL)


def test_gate_zero_adds_sft_only_where_rl_is_silent():
    """Corollary 2.6: with gamma = 0, HPT's mean = the RL mean + (1-p)^G (beta - pi), per context."""
    prob, theta, _ = _problem(7, X=3, K=4)
    pi, _, p = _gstar(prob, theta)
    G = 5
    rl = exact_moments(preset("hpt_paper"), prob, theta, G).mean
    hpt = exact_moments(preset("hpt_paper"), prob, theta, G, "hpt_gate", gate=GateRule("paper", 0.0)).mean
    np.testing.assert_allclose(hpt - rl, prob.context_probs[:, None] * (1 - p[:, None]) ** G * (prob.behaviour - pi),
                               atol=TOL)


def test_moments_properties():
    prob, theta, _ = _problem(11, X=3, K=4)
    m = exact_moments(preset("grpo"), prob, theta, 4)
    np.testing.assert_allclose(m.mse, m.bias_sq + m.variance)
    np.testing.assert_allclose((m.direction_bias * m.target).sum(), 0.0, atol=1e-14)
    assert -1 <= m.cosine <= 1 and 0 <= m.scale_free_mse <= 1
    np.testing.assert_allclose(m.coordinate_variance.sum(), m.variance)


# ------------------------------------------------------------------ validation
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), G=st.integers(2, 4))
def test_kin_estimators_reduce_to_grpo_where_they_should(seed, G):
    """One-step problems: on-policy SAPO (gate slope 1 at rho = 1) and VESPO (phi(1) = 1) are GRPO exactly; LUSPO
    (one token: the sequence sum is the token) is GRPO with GSPO's clip range, off-policy too."""
    prob, theta, old = _problem(seed)
    grpo = exact_moments(preset("grpo"), prob, theta, G)
    for name in ("sapo", "vespo"):
        m = exact_moments(preset(name), prob, theta, G)
        np.testing.assert_allclose(m.mean, grpo.mean, rtol=0, atol=1e-13)
        np.testing.assert_allclose(m.cov, grpo.cov, rtol=0, atol=1e-13)
    kw = dict(old_logits=theta + 0.01 * old)   # ratios near 1: GSPO's narrow clip is active on some actions
    a = exact_moments(preset("luspo"), prob, theta, G, **kw)
    b = exact_moments(preset("grpo", eps_low=3e-4, eps_high=4e-4), prob, theta, G, **kw)
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=1e-13)
    np.testing.assert_allclose(a.cov, b.cov, rtol=0, atol=1e-13)


def test_bad_inputs_raise():
    prob, theta, _ = _problem(0)
    real, _, _ = _problem(0, real=True)
    for opts, word in (({"kl_coef": 0.1}, "kl_coef"), ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
                       ({"rollout_correction": "token_truncate", "rollout_is_max": 2.0}, "rollout_correction")):
        with pytest.raises(ValueError, match=word):
            exact_moments(preset("grpo", **opts), prob, theta, 2)
    with pytest.raises(ValueError, match="group_size"):
        exact_moments(preset("grpo"), prob, theta, -1)
    with pytest.raises(ValueError, match="group_size"):
        exact_moments(preset("luffy"), prob, theta, 1, "mixed")
    with pytest.raises(ValueError, match="logits"):
        exact_moments(preset("grpo"), prob, theta[:, :2], 2)
    with pytest.raises(ValueError, match="old_logits"):
        exact_moments(preset("grpo"), prob, theta, 2, old_logits=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="sampling"):
        exact_moments(preset("grpo"), prob, theta, 2, "offline")
    with pytest.raises(ValueError, match="sampling"):
        exact_moments(preset("grpo"), prob, theta, 2, "demonstration")
    with pytest.raises(ValueError, match="sampling"):
        exact_moments(preset("grpo"), prob, theta, 2, "mixed")
    with pytest.raises(ValueError, match="sampling"):
        exact_moments(preset("grpo"), real, theta, 2, "hpt_gate")
    with pytest.raises(ValueError, match="gate"):
        exact_moments(preset("grpo"), prob, theta, 2, gate=GateRule())
    with pytest.raises(ValueError, match="advantage_table"):
        exact_moments(preset("ppo"), prob, theta, 2)
    with pytest.raises(ValueError, match="method"):
        exact_moments(preset("grpo"), real, theta, 2, method="closed_form")
    with pytest.raises(ValueError, match="group_size"):
        exact_moments(preset("grpo"), real, theta, 60, max_outcomes=1000)
    with pytest.raises(ValueError, match="behaviour"):
        exact_moments(preset("sft"), FiniteProblem(prob.rewards, prob.context_probs), theta, 2, "demonstration")
    with pytest.raises(ValueError, match="threshold"):
        GateRule("paper", 1.5)
    with pytest.raises(ValueError, match="threshold"):
        GateRule("code", 0.5)
    with pytest.raises(ValueError, match="estimator"):
        exact_moments("grpo", prob, theta, 2)


def test_clip_is_exercised_off_policy():
    """With pi_old != pi_theta the clip changes the exact moments (so the equality tests above cover it)."""
    prob, theta, old = _problem(3, X=2, K=3)
    kw = {"old_logits": theta + 2 * old}
    a = exact_moments(preset("grpo"), prob, theta, 4, **kw)
    b = exact_moments(preset("grpo", mask="none"), prob, theta, 4, **kw)
    c = exact_moments(preset("grpo", mask="none"), prob, theta, 4, method="enumeration", **kw)
    assert np.abs(a.mean - b.mean).max() > 1e-3
    np.testing.assert_allclose(b.mean, c.mean, atol=TOL)
    # unclipped ratio-weighted Dr. GRPO is unbiased up to (G-1)/G even off-policy (importance sampling)
    d = exact_moments(preset("dr_grpo", mask="none"), prob, theta, 4, **kw)
    np.testing.assert_allclose(d.mean, 0.75 * d.target, atol=TOL)


# ------------------------------------------------------------------ sequences (README 2.6)
def _seq_problem():
    from theory.finite import SequenceProblem

    return SequenceProblem(3, 3, lambda y: float(y[0] == 1)), np.random.default_rng(0).normal(size=(7, 3))


def _autograd_group(est, prob, theta, idx):
    """-grad of est.loss on the group of responses idx, through torch log_softmax and the padding mask."""
    import torch

    t = torch.tensor(theta, requires_grad=True)
    lp_all = torch.log_softmax(t, -1)
    pids, toks, mask = (torch.as_tensor(a[list(idx)]) for a in (prob.prefix_ids, prob.tokens, prob.mask))
    lp = torch.where(mask, lp_all[pids, toks], torch.zeros((), dtype=torch.float64))
    A = est.advantages(torch.as_tensor(prob.rewards[list(idx)]), len(idx))
    est.loss(lp, None, A, mask).backward()
    return -t.grad.numpy()


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_sequence_moments_against_autograd_pairs(agg):
    """G = 2: the exact mean == sum over ordered pairs of responses of P(pair) * autograd gradient."""
    from theory.moments import sequence_moments

    prob, theta = _seq_problem()
    est = preset("grpo", aggregation=agg, max_length=3)
    p = prob.sequence_probs(theta)
    S = len(p)
    ref = sum(p[i] * p[j] * _autograd_group(est, prob, theta, (i, j)) for i in range(S) for j in range(S))
    np.testing.assert_allclose(sequence_moments(est, prob, theta, 2).mean, ref, atol=1e-12)


def test_sequence_identities_and_length_bias():
    from theory.moments import length_drift, sequence_moments

    prob, theta = _seq_problem()
    for name in ("reinforce", "rloo"):  # per-response sums: unbiased for grad E r
        np.testing.assert_allclose(sequence_moments(preset(name), prob, theta, 3).bias, 0.0, atol=1e-12)
    m = {agg: sequence_moments(preset("grpo", aggregation=agg, max_length=3), prob, theta, 3)
         for agg in ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")}
    assert abs(m["seq_mean_token_sum_norm"].cosine - 1) < 1e-12  # one prompt: a pure scale
    assert m["seq_mean_token_mean"].cosine < m["token_mean"].cosine < 1 - 1e-6
    assert length_drift(m["seq_mean_token_mean"], prob, theta) > length_drift(m["token_mean"], prob, theta) > 1e-6
    with pytest.raises(ValueError, match="group_size"):
        sequence_moments(preset("grpo"), prob, theta, 8, max_outcomes=100)


# ---- a success probability of 1 + 1 ulp (issue 18 item 2)


def test_all_correct_context_whose_success_probability_rounds_above_one():
    """sum(softmax([0.1, 0.2, 0.3])) rounds to 1 + 1 ulp; binom.pmf(., ., p > 1) is NaN, so the mean was NaN."""
    logits = np.array([[0.1, 0.2, 0.3]])
    from scipy.special import log_softmax

    assert np.exp(log_softmax(logits, axis=-1)).sum() > 1.0  # the premise of the example, as moments computes it
    prob = FiniteProblem(np.ones((1, 3)), np.ones(1))
    m = exact_moments(preset("grpo"), prob, logits, 4)
    e = exact_moments(preset("grpo"), prob, logits, 4, method="enumeration")
    assert np.array_equal(m.mean, np.zeros((1, 3))) and m.variance == 0.0
    assert np.allclose(m.mean, e.mean, atol=TOL) and np.allclose(m.cov, e.cov, atol=TOL)


@pytest.mark.parametrize("scheme, name", [("on_policy", "grpo"), ("on_policy", "reinforce"), ("mixed", "luffy"),
                                          ("hpt_gate", "hpt_paper")])
def test_random_logits_on_all_correct_contexts_give_finite_moments(scheme, name):
    """8 of 200 random logits were NaN for an all-correct context; every scheme now agrees with enumeration."""
    rng = np.random.default_rng(18)
    R = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    beta = np.full((2, 3), 1 / 3)
    prob = FiniteProblem(R, np.array([0.5, 0.5]), beta)
    for _ in range(50):
        theta = rng.normal(scale=3.0, size=(2, 3))
        m = exact_moments(preset(name), prob, theta, 3, scheme)
        e = exact_moments(preset(name), prob, theta, 3, scheme, method="enumeration")
        assert np.all(np.isfinite(m.mean)) and np.all(np.isfinite(m.cov))
        assert np.allclose(m.mean, e.mean, atol=TOL) and np.allclose(m.cov, e.cov, atol=TOL)
