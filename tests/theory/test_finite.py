"""theory.finite: the exact objective and its gradient against autograd; input validation."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.finite import FiniteProblem, LogLinearPolicy, Objective, softmax_policy


def _random(seed, X=3, K=4, binary=True):
    rng = np.random.default_rng(seed)
    R = (rng.random((X, K)) < 0.4).astype(float) if binary else rng.normal(size=(X, K))
    rho = rng.dirichlet(np.ones(X))
    beta = rng.dirichlet(np.ones(K), size=X)
    beta[0, 0] = 0.0  # a zero in the demonstrator: 0 log 0 = 0
    beta[0] /= beta[0].sum()
    return FiniteProblem(R, rho, beta), rng.normal(size=(X, K)), rng.normal(size=(X, K))


def _torch_objective(prob, theta, ref, obj):
    """J written directly in torch (autograd reference)."""
    lp = torch.log_softmax(theta, -1)
    pi = lp.exp()
    lref = torch.log_softmax(ref, -1)
    beta = torch.tensor(np.array(prob.behaviour))
    kl_b = torch.where(beta > 0, beta * (torch.log(beta.clamp_min(1e-300)) - lp), torch.zeros_like(lp)).sum(-1)
    kl_r = (pi * (lp - lref)).sum(-1)
    per_x = obj.reward * (pi * torch.tensor(np.array(prob.rewards))).sum(-1) - obj.mu * kl_b - obj.lam * kl_r
    return (torch.tensor(np.array(prob.context_probs)) * per_x).sum()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), reward=st.floats(0, 2), mu=st.floats(0, 2), lam=st.floats(0, 2),
       binary=st.booleans())
def test_gradient_matches_autograd(seed, reward, mu, lam, binary):
    prob, theta, ref = _random(seed, binary=binary)
    obj = Objective(reward, mu, lam)
    t = torch.tensor(theta, requires_grad=True)
    J = _torch_objective(prob, t, torch.tensor(ref), obj)
    J.backward()
    np.testing.assert_allclose(obj.value(prob, theta, ref), J.item(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(obj.gradient(prob, theta, ref), t.grad.numpy(), rtol=1e-10, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_log_linear_gradient_matches_autograd(seed):
    prob, _, _ = _random(seed)
    rng = np.random.default_rng(seed + 1)
    F = rng.normal(size=(3, 4, 5))
    policy = LogLinearPolicy(F)
    psi, psi_ref = rng.normal(size=5), rng.normal(size=5)
    obj = Objective(1.0, 0.5, 0.3)
    p = torch.tensor(psi, requires_grad=True)
    Ft = torch.tensor(F)
    J = _torch_objective(prob, Ft @ p, Ft @ torch.tensor(psi_ref), obj)
    J.backward()
    np.testing.assert_allclose(policy.objective_gradient(obj, prob, psi, psi_ref), p.grad.numpy(), rtol=1e-10,
                               atol=1e-12)
    # the covariance pull-back is F^T C F: check on a rank-one C = v v^T against pull_back(v)
    v = rng.normal(size=(3, 4))
    np.testing.assert_allclose(policy.pull_back_cov(np.outer(v.reshape(-1), v.reshape(-1))),
                               np.outer(policy.pull_back(v), policy.pull_back(v)), rtol=1e-12, atol=1e-12)


def test_sft_term_is_beta_minus_pi():
    prob, theta, _ = _random(3)
    g = Objective(reward=0.0, mu=1.0).gradient(prob, theta)
    np.testing.assert_allclose(g, prob.context_probs[:, None] * (prob.behaviour - softmax_policy(theta)), atol=1e-15)


def test_validation():
    R = np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="context_probs"):
        FiniteProblem(R, np.array([0.5, 0.6]))
    with pytest.raises(ValueError, match="behaviour"):
        FiniteProblem(R, np.array([0.5, 0.5]), np.array([[0.5, 0.4], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="behaviour"):
        FiniteProblem(R, np.array([0.5, 0.5]), np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="rewards"):
        FiniteProblem(np.ones((3, 2)), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="rewards"):
        FiniteProblem(R * 2, np.array([0.5, 0.5]), stochastic=True)
    with pytest.raises(ValueError, match="context_probs"):
        FiniteProblem(R, np.array([1.5, -0.5]))
    prob = FiniteProblem(R, np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="logits"):
        Objective().gradient(prob, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="behaviour"):
        Objective(mu=1.0).gradient(prob, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="mu"):
        Objective(mu=-1.0)
    assert prob.binary and not FiniteProblem(R * 0.5, np.array([0.5, 0.5])).binary


def test_sequence_problem_gradient_matches_autograd():
    from theory.finite import SequenceProblem

    prob = SequenceProblem(3, 3, lambda y: len(y) + 0.5 * y[0])
    assert len(prob.sequences) == 15 and prob.shape == (7, 3)
    theta = np.random.default_rng(0).normal(size=prob.shape)
    np.testing.assert_allclose(prob.sequence_probs(theta).sum(), 1.0, atol=1e-14)
    t = torch.tensor(theta, requires_grad=True)
    lp = torch.where(torch.as_tensor(prob.mask), torch.log_softmax(t, -1)[prob.prefix_ids, prob.tokens], 0.0)
    (lp.sum(1).exp() * torch.as_tensor(prob.rewards)).sum().backward()
    np.testing.assert_allclose(prob.gradient(theta), t.grad.numpy(), atol=1e-12)
    with pytest.raises(ValueError, match="eos"):
        SequenceProblem(3, 3, len, eos=5)
    with pytest.raises(ValueError, match="logits"):
        prob.token_logp(np.zeros((3, 3)))
