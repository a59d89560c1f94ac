"""toy.bandit: Monte Carlo through estimator.loss + autograd agrees with theory.moments' exact mean
(within 4 standard errors per coordinate, the standard errors from the exact variance); autograd on a
group equals the coefficient form the exact moments use; generators and the training loop."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.estimator import preset
from theory.finite import softmax_policy
from theory.moments import GateRule, exact_moments
from toy.bandit import logits_for_accuracy, make_problem, monte_carlo, train

N = 400  # samples per check: ~0.25 s per estimator

CASES = [("grpo", "on_policy", {}), ("rloo", "on_policy", {}), ("cispo", "on_policy", {}),
         ("sft", "demonstration", {}), ("luffy", "mixed", {}), ("srft", "mixed", {}),
         ("hpt_paper", "hpt_gate", {"gate": GateRule("paper", 0.25)}),
         ("hpt_code", "hpt_gate", {"gate": GateRule("code", 1, sft_coef=0.3)}), ("ppo", "on_policy", {"table": 1})]


@pytest.mark.parametrize("name,scheme,extra", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 1000), off_policy=st.booleans(), noise=st.sampled_from([0.0, 0.2]))
def test_monte_carlo_matches_exact(name, scheme, extra, seed, off_policy, noise):
    prob, theta = make_problem(2, 4, n_correct=2, demo_quality=0.7, reward_noise=noise, seed=seed)
    G = 4
    kw = {k: v for k, v in extra.items() if k == "gate"}
    if off_policy and scheme != "demonstration":
        kw["old_logits"] = theta + np.random.default_rng(seed).normal(scale=0.7, size=theta.shape)
    if "table" in extra:
        pi_old = softmax_policy(kw.get("old_logits", theta))
        kw["advantage_table"] = prob.rewards - (pi_old * prob.rewards).sum(1, keepdims=True)
    est = preset(name)
    m = exact_moments(est, prob, theta, G, scheme, **kw)
    s = monte_carlo(est, prob, theta, G, scheme, n=N, seed=seed, **kw)
    se = np.sqrt(m.coordinate_variance / N)
    assert np.all(np.abs(s.mean(0) - m.mean) <= 4 * se + 1e-12), (s.mean(0) - m.mean) / np.maximum(se, 1e-300)


@pytest.mark.parametrize("name", ["grpo", "luffy", "gspo", "cispo", "hpt_code"])
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000), G=st.integers(1, 5))
def test_autograd_equals_coefficient_form(name, seed, G):
    """Per group, -grad of estimator.loss == sum_j w_j (e_{a_j} - pi): the form the exact moments use
    (so the covariance, checked against enumeration in tests/theory, is that of the autograd estimate)."""
    from theory.moments import _group_gradients, _setup

    prob, theta = make_problem(2, 4, seed=seed)
    rng = np.random.default_rng(seed)
    old = theta + rng.normal(size=theta.shape)
    sampling = "mixed" if name == "luffy" and G >= 2 else "on_policy"
    s = _setup(preset(name), prob, theta, G, sampling, old, None, None)
    for x in range(2):
        acts = rng.integers(0, 4, size=(3, G))
        rews = prob.rewards[x][acts]
        g = _group_gradients(s, x, acts, rews, demo_last=sampling == "mixed")
        for m in range(3):
            t = torch.tensor(theta, requires_grad=True)
            lp = torch.log_softmax(t[x], -1)[torch.as_tensor(acts[m])]
            old_lp = torch.log_softmax(torch.tensor(old[x]), -1)[torch.as_tensor(acts[m])]
            kw = {"is_demo": torch.tensor([False] * (G - 1) + [True])} if sampling == "mixed" else {}
            preset(name).loss(lp, old_lp, preset(name).advantages(torch.as_tensor(rews[m]), G), **kw).backward()
            np.testing.assert_allclose(-t.grad.numpy()[x], g[m], atol=1e-12)


def test_make_problem_and_accuracy():
    prob, theta = make_problem(3, 5, difficulty=[0.1, 0.5, 0.9], n_correct=2, demo_quality=0.8, seed=3)
    acc = (softmax_policy(theta) * prob.rewards).sum(1)
    np.testing.assert_allclose(acc, [0.9, 0.5, 0.1], atol=1e-12)
    np.testing.assert_allclose((prob.behaviour * prob.rewards).sum(1), 0.8, atol=1e-12)
    noisy, _ = make_problem(3, 5, reward_noise=0.1, seed=3)
    assert noisy.stochastic and noisy.binary
    with pytest.raises(ValueError, match="p"):
        logits_for_accuracy(np.zeros(3), [True, False, False], 1.0)
    with pytest.raises(ValueError, match="n_correct"):
        make_problem(2, 3, n_correct=3)
    with pytest.raises(ValueError, match="difficulty"):
        make_problem(2, 3, difficulty=[0.5])


def test_training_improves_reward():
    prob, theta = make_problem(2, 4, difficulty=[0.5, 0.7], seed=0)
    curve = train(preset("rloo"), prob, theta, 4, steps=30, lr=2.0, batch=4, seed=0)
    assert curve[-1] > curve[0] + 0.1
