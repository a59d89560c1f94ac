"""Contextual bandits: generators of finite problems and samplers that run the real estimator code.

- `make_problem`: contexts of graded difficulty, a binary (optionally noisy) verifier, and a
  demonstrator of chosen quality.
- `logits_for_accuracy`: logits whose policy answers correctly with a given probability.
- `sample_gradient` / `monte_carlo`: draw a prompt and its group, compute `estimator.loss` on the
  log-probabilities of a tabular softmax policy, and return minus the autograd gradient. This shares
  nothing with `theory.moments` except the estimator and the gate rule, so it is the Monte Carlo check
  of the exact moments.
- `train`: a small training loop on the same samplers (plain gradient ascent on g_hat).
"""

from __future__ import annotations

import numpy as np
import torch

from theory.estimator import UPGE, preset
from theory.finite import FiniteProblem
from theory.moments import SCHEMES, GateRule


def make_problem(n_contexts: int = 4, n_actions: int = 6, *, difficulty=None, n_correct: int = 1,
                 demo_quality: float = 0.9, reward_noise: float = 0.0,
                 seed: int = 0) -> tuple[FiniteProblem, np.ndarray]:
    """A finite problem and initial logits.

    difficulty: [X] numbers in (0, 1), the probability that the initial policy answers context x
    incorrectly (None: evenly spaced from 0.2 to 0.95). n_correct: correct actions per context.
    demo_quality: mass the demonstrator puts on correct actions (spread evenly), the rest on incorrect
    ones. reward_noise: probability that the verifier flips a reward (then rewards are stochastic).
    Returns (problem, logits [X, K]).
    """
    X, K = n_contexts, n_actions
    if not (isinstance(X, int) and X >= 1 and isinstance(K, int) and K >= 2):
        raise ValueError(f"n_contexts, n_actions: expected ints >= 1 and >= 2, got {X!r}, {K!r}")
    if not (isinstance(n_correct, int) and 1 <= n_correct < K):
        raise ValueError(f"n_correct: expected an int in [1, {K - 1}], got {n_correct!r}")
    if not 0 <= demo_quality <= 1:
        raise ValueError(f"demo_quality: expected a number in [0, 1], got {demo_quality!r}")
    if not 0 <= reward_noise < 0.5:
        raise ValueError(f"reward_noise: expected a number in [0, 0.5), got {reward_noise!r}")
    diff = np.linspace(0.2, 0.95, X) if difficulty is None else np.asarray(difficulty, dtype=np.float64)
    if diff.shape != (X,) or np.any(diff <= 0) or np.any(diff >= 1):
        raise ValueError(f"difficulty: expected {X} numbers in (0, 1), got {difficulty!r}")
    rng = np.random.default_rng(seed)
    correct = np.zeros((X, K), dtype=bool)
    for x in range(X):
        correct[x, rng.choice(K, n_correct, replace=False)] = True
    R = correct.astype(float)
    if reward_noise:
        R = np.where(correct, 1 - reward_noise, reward_noise)
    beta = np.where(correct, demo_quality / n_correct, (1 - demo_quality) / (K - n_correct))
    base = rng.normal(scale=0.5, size=(X, K))
    logits = np.stack([logits_for_accuracy(base[x], correct[x], 1 - diff[x]) for x in range(X)])
    rho = rng.dirichlet(np.full(X, 5.0))
    return FiniteProblem(R, rho, beta, stochastic=bool(reward_noise)), logits


def logits_for_accuracy(base, correct, p: float) -> np.ndarray:
    """base [K] shifted on the `correct` actions so that softmax puts mass p on them (0 < p < 1)."""
    base, correct = np.asarray(base, dtype=np.float64), np.asarray(correct, dtype=bool)
    if not 0 < p < 1:
        raise ValueError(f"p: expected a probability in (0, 1), got {p!r}")
    if not correct.any() or correct.all():
        raise ValueError("correct: expected at least one correct and one incorrect action")
    lz_c = np.logaddexp.reduce(base[correct])
    lz_i = np.logaddexp.reduce(base[~correct])
    shift = np.log(p) - np.log1p(-p) + lz_i - lz_c
    return base + shift * correct


def sample_gradient(estimator: UPGE, problem: FiniteProblem, logits, group_size: int, sampling: str,
                    rng: np.random.Generator, *, old_logits=None, gate: GateRule | None = None,
                    advantage_table=None) -> np.ndarray:
    """One g_hat [X, K]: minus the autograd gradient of estimator.loss on one prompt's group."""
    theta = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    loss = _group_loss(estimator, problem, theta, group_size, sampling, rng, old_logits, gate, advantage_table)
    loss.backward()
    return -theta.grad.numpy()


def monte_carlo(estimator: UPGE, problem: FiniteProblem, logits, group_size: int, sampling: str = "on_policy",
                n: int = 1000, seed: int = 0, **kw) -> np.ndarray:
    """n independent g_hat, shape [n, X, K] (keywords as `sample_gradient`)."""
    if sampling not in SCHEMES:
        raise ValueError(f"sampling: unknown value {sampling!r}; valid: {list(SCHEMES)}")
    rng = np.random.default_rng(seed)
    return np.stack([sample_gradient(estimator, problem, logits, group_size, sampling, rng, **kw) for _ in range(n)])


def _draw(rng, problem, x, dist, n):
    """n (action, reward) pairs in context x, actions ~ dist, rewards from the table or the noisy verifier."""
    a = rng.choice(problem.n_actions, size=n, p=dist / dist.sum())
    r = problem.rewards[x, a]
    if problem.stochastic:
        r = (rng.random(n) < r).astype(float)
    return a, r


def _group_loss(est, problem, theta, G, sampling, rng, old_logits, gate, table):
    X, K = problem.rewards.shape
    x = rng.choice(X, p=problem.context_probs)
    logp_all = torch.log_softmax(theta[x], -1)
    old_all = logp_all.detach() if old_logits is None else torch.log_softmax(
        torch.as_tensor(np.asarray(old_logits, dtype=np.float64))[x], -1)
    beta = problem.behaviour
    pi_old = torch.exp(old_all).numpy()
    if sampling == "demonstration":
        a, r = _draw(rng, problem, x, beta[x], G)
        demo = None
    elif sampling == "mixed":
        a1, r1 = _draw(rng, problem, x, pi_old, G - 1)
        a2, r2 = _draw(rng, problem, x, beta[x], 1)
        a, r = np.concatenate([a1, a2]), np.concatenate([r1, r2])
        demo = torch.tensor([False] * (G - 1) + [True])
    else:
        a, r = _draw(rng, problem, x, pi_old, G)
        demo = None
    if sampling == "hpt_gate":
        gate = GateRule() if gate is None else gate
        if bool(gate.trains_sft(int(r.sum()), G)):
            (a_star,), _ = _draw(rng, problem, x, beta[x], 1)
            return gate.sft_coef * preset("sft").loss(logp_all[[int(a_star)]])
    idx = torch.as_tensor(a)
    if table is not None:
        A = torch.as_tensor(np.asarray(table)[x, a])
    else:  # one token per response: the lengths of verl's token-whitened advantage are 1
        r = torch.as_tensor(r, dtype=torch.float64)
        A = est.advantages(r, G, lengths=torch.ones_like(r))
    kw = {}
    if demo is not None:
        kw["is_demo"] = demo
    if est.reference == "behaviour":
        kw["behaviour_logp"] = torch.log(torch.as_tensor(beta[x][a]))
    old = None if old_logits is None else old_all[idx]
    return est.loss(logp_all[idx], old, A, **kw)


def train(estimator: UPGE, problem: FiniteProblem, logits, group_size: int, sampling: str = "on_policy", *,
          steps: int = 100, lr: float = 1.0, batch: int = 8, seed: int = 0, **kw) -> np.ndarray:
    """Gradient ascent theta += lr * mean of `batch` g_hat per step (on-policy: pi_old = pi_theta).
    Returns the expected reward E_{x, pi_theta}[r] after each step, shape [steps + 1]."""
    rng = np.random.default_rng(seed)
    theta = np.asarray(logits, dtype=np.float64).copy()

    def reward(t):
        pi = np.exp(t - np.logaddexp.reduce(t, axis=-1, keepdims=True))
        return float(problem.context_probs @ (pi * problem.rewards).sum(-1))

    out = [reward(theta)]
    for _ in range(steps):
        g = np.mean([sample_gradient(estimator, problem, theta, group_size, sampling, rng, **kw)
                     for _ in range(batch)], axis=0)
        theta = theta + lr * g
        out.append(reward(theta))
    return np.array(out)
