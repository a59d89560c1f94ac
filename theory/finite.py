"""Finite post-training problems and their exact objectives (HPT paper Eq. 1-3 and App. B.2).

A finite problem has contexts x = 0..X-1 drawn with probabilities rho(x), actions a = 0..K-1, a reward
table r(x, a) and, optionally, a behaviour (demonstration) policy pi_beta(x, .).

Rewards are deterministic (`r(x, a)`, binary or real) or, with `stochastic=True`, a noisy binary
verifier: the reward of a sampled action is Bernoulli(r(x, a)), so r(x, a) in [0, 1] is its success
probability. E_{pi}[r] is the same number in both readings.

Policies are tabular softmax over logits theta[x, a] (`softmax_policy`), or log-linear,
theta[x, a] = phi(x, a) . psi (`LogLinearPolicy`), whose gradients are pulled back from the logits.

The objective (`Objective`) is

    J(theta) = sum_x rho(x) [ c_r E_{pi(x)}[r] - mu KL(pi_beta(x) || pi(x)) - lam KL(pi(x) || pi_ref(x)) ]

with c_r = `reward` (1 in the paper; 0 for the pure data-adherence term estimated by SFT). Its gradient
with respect to the logits of context x is (theory/README.md section 2.1)

    rho(x) [ c_r pi * (r - E_pi r)  +  mu (pi_beta - pi)  -  lam pi * (l - E_pi l) ],   l = log pi - log pi_ref.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax

from theory._checks import real_array

_ATOL = 1e-9  # tolerance on probability vectors summing to one


def _check_distribution(name, p, axis=-1):
    if np.any(p < 0):
        raise ValueError(f"{name}: probabilities must be non-negative")
    s = p.sum(axis=axis)
    if not np.allclose(s, 1.0, atol=_ATOL, rtol=0):
        raise ValueError(f"{name}: probabilities must sum to one along the last axis (sums: {np.round(s, 6)})")


@dataclass(frozen=True, eq=False)
class FiniteProblem:
    """rewards [X, K]; context_probs [X]; behaviour [X, K] or None; stochastic: Bernoulli rewards."""

    rewards: np.ndarray
    context_probs: np.ndarray
    behaviour: np.ndarray | None = None
    stochastic: bool = False

    def __post_init__(self):
        R = real_array("rewards", self.rewards, 2)
        rho = real_array("context_probs", self.context_probs, 1)
        if R.shape[0] != rho.shape[0] or R.shape[1] < 1:
            raise ValueError(f"rewards: expected shape [X, K] with X = len(context_probs) = {rho.shape[0]}, "
                             f"got {R.shape}")
        _check_distribution("context_probs", rho)
        if not isinstance(self.stochastic, bool):
            raise ValueError(f"stochastic: expected a bool, got {self.stochastic!r}")
        if self.stochastic and (np.any(R < 0) or np.any(R > 1)):
            raise ValueError("rewards: with stochastic=True rewards are success probabilities in [0, 1]")
        beta = None
        if self.behaviour is not None:
            beta = real_array("behaviour", self.behaviour, 2)
            if beta.shape != R.shape:
                raise ValueError(f"behaviour: expected shape {R.shape} (that of rewards), got {beta.shape}")
            _check_distribution("behaviour", beta)
        for name, v in (("rewards", R), ("context_probs", rho), ("behaviour", beta)):
            if v is not None:
                v.setflags(write=False)
            object.__setattr__(self, name, v)

    @property
    def n_contexts(self) -> int:
        return self.rewards.shape[0]

    @property
    def n_actions(self) -> int:
        return self.rewards.shape[1]

    @property
    def binary(self) -> bool:
        """Every sampled reward is 0 or 1 (a deterministic 0/1 table, or a noisy verifier)."""
        return self.stochastic or bool(np.all((self.rewards == 0) | (self.rewards == 1)))

    def check_logits(self, logits, name="logits") -> np.ndarray:
        theta = real_array(name, logits, 2)
        if theta.shape != self.rewards.shape:
            raise ValueError(f"{name}: expected shape {self.rewards.shape} (that of rewards), got {theta.shape}")
        return theta

    def require_behaviour(self, why: str) -> np.ndarray:
        if self.behaviour is None:
            raise ValueError(f"behaviour: {why} needs a behaviour (demonstration) policy; the problem has none")
        return self.behaviour


def softmax_policy(logits) -> np.ndarray:
    """pi[x, a] = softmax(theta[x])[a], computed in log space."""
    theta = real_array("logits", logits, 2)
    return np.exp(log_softmax(theta, axis=-1))


@dataclass(frozen=True)
class Objective:
    """J = sum_x rho(x)[reward * E_pi r - mu KL(beta || pi) - lam KL(pi || pi_ref)] (see the module doc)."""

    reward: float = 1.0
    mu: float = 0.0
    lam: float = 0.0

    def __post_init__(self):
        for f in ("reward", "mu", "lam"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
                raise ValueError(f"{f}: expected a finite number, got {v!r}")
        if self.mu < 0 or self.lam < 0:
            raise ValueError(f"mu, lam: expected non-negative coefficients, got mu={self.mu!r}, lam={self.lam!r}")

    def _parts(self, problem: FiniteProblem, logits, ref_logits):
        theta = problem.check_logits(logits)
        log_pi = log_softmax(theta, axis=-1)
        beta = problem.require_behaviour("mu > 0") if self.mu > 0 else None
        log_ref = log_pi if ref_logits is None else log_softmax(problem.check_logits(ref_logits, "ref_logits"), -1)
        return log_pi, beta, log_ref

    def value(self, problem: FiniteProblem, logits, ref_logits=None) -> float:
        """J(theta); `ref_logits` define pi_ref of the lam term (None: pi_ref = pi_theta, so KL = 0)."""
        log_pi, beta, log_ref = self._parts(problem, logits, ref_logits)
        pi = np.exp(log_pi)
        per_x = self.reward * (pi * problem.rewards).sum(-1)
        if beta is not None:
            safe = np.where(beta > 0, beta, 1.0)
            per_x = per_x - self.mu * np.where(beta > 0, beta * (np.log(safe) - log_pi), 0.0).sum(-1)
        if self.lam:
            per_x = per_x - self.lam * (pi * (log_pi - log_ref)).sum(-1)
        return float(problem.context_probs @ per_x)

    def gradient(self, problem: FiniteProblem, logits, ref_logits=None) -> np.ndarray:
        """Exact dJ/dtheta, shape [X, K] (README 2.1)."""
        log_pi, beta, log_ref = self._parts(problem, logits, ref_logits)
        pi = np.exp(log_pi)
        R = problem.rewards
        g = self.reward * pi * (R - (pi * R).sum(-1, keepdims=True))
        if beta is not None:
            g = g + self.mu * (beta - pi)
        if self.lam:
            ell = log_pi - log_ref
            g = g - self.lam * pi * (ell - (pi * ell).sum(-1, keepdims=True))
        return problem.context_probs[:, None] * g


@dataclass(frozen=True, eq=False)
class LogLinearPolicy:
    """theta[x, a] = features[x, a, :] . psi; gradients pulled back through the features."""

    features: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "features", real_array("features", self.features, 3))

    @property
    def n_params(self) -> int:
        return self.features.shape[-1]

    def logits(self, params) -> np.ndarray:
        psi = real_array("params", params, 1)
        if psi.shape[0] != self.n_params:
            raise ValueError(f"params: expected shape [{self.n_params}], got {psi.shape}")
        return self.features @ psi

    def pull_back(self, logit_vector) -> np.ndarray:
        """A gradient (or mean) with respect to the logits [X, K] -> with respect to psi [d]."""
        g = real_array("logit_vector", logit_vector, 2)
        return np.einsum("xad,xa->d", self.features, g)

    def pull_back_cov(self, cov) -> np.ndarray:
        """A covariance over flattened logits [X*K, X*K] -> over psi [d, d]."""
        F = self.features.reshape(-1, self.n_params)
        return F.T @ np.asarray(cov, dtype=np.float64) @ F

    def objective_gradient(self, objective: Objective, problem: FiniteProblem, params, ref_params=None):
        ref = None if ref_params is None else self.logits(ref_params)
        return self.pull_back(objective.gradient(problem, self.logits(params), ref))


@dataclass(frozen=True, eq=False)
class SequenceProblem:
    """One prompt, an autoregressive tabular policy over `vocab_size` tokens, responses of at most
    `max_length` tokens that end at the token `eos` (or are truncated at max_length), and a reward
    `reward_fn(sequence tuple) -> float` per response.

    The policy's logits are a table [P, V] with one row per non-terminal prefix (`prefixes`, in order of
    length); pi(y) = prod_t softmax(logits[prefix_t])[y_t]. Every response is listed in `sequences`,
    with arrays `tokens`, `prefix_ids` [S, T] (padded with 0), `mask` [S, T], `lengths` [S], `rewards` [S].
    """

    vocab_size: int
    max_length: int
    reward_fn: object
    eos: int = 0

    def __post_init__(self):
        V, T = self.vocab_size, self.max_length
        if not (isinstance(V, int) and V >= 2 and isinstance(T, int) and T >= 1):
            raise ValueError(f"vocab_size, max_length: expected ints >= 2 and >= 1, got {V!r}, {T!r}")
        if not (isinstance(self.eos, int) and 0 <= self.eos < V):
            raise ValueError(f"eos: expected a token id in [0, {V}), got {self.eos!r}")
        if not callable(self.reward_fn):
            raise ValueError("reward_fn: expected a callable sequence -> reward")
        prefixes, seqs = [()], []
        frontier = [()]
        for t in range(T):
            nxt = []
            for pre in frontier:
                for tok in range(V):
                    y = pre + (tok,)
                    if tok == self.eos or t == T - 1:
                        seqs.append(y)
                    else:
                        nxt.append(y)
            prefixes += nxt
            frontier = nxt
        index = {p: i for i, p in enumerate(prefixes)}
        S = len(seqs)
        tokens, pids, mask = np.zeros((S, T), int), np.zeros((S, T), int), np.zeros((S, T), bool)
        for s, y in enumerate(seqs):
            for t, tok in enumerate(y):
                tokens[s, t], pids[s, t], mask[s, t] = tok, index[y[:t]], True
        rewards = np.array([float(self.reward_fn(y)) for y in seqs])
        if not np.all(np.isfinite(rewards)):
            raise ValueError("reward_fn: returned NaN or infinite rewards")
        for name, v in (("prefixes", prefixes), ("sequences", seqs), ("tokens", tokens), ("prefix_ids", pids),
                        ("mask", mask), ("lengths", mask.sum(1)), ("rewards", rewards)):
            object.__setattr__(self, name, v)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.prefixes), self.vocab_size

    def token_logp(self, logits) -> np.ndarray:
        """[S, T] log pi(y_t | y_<t), 0 at padding."""
        theta = real_array("logits", logits, 2)
        if theta.shape != self.shape:
            raise ValueError(f"logits: expected shape {self.shape} (prefixes x vocab), got {theta.shape}")
        lp = log_softmax(theta, axis=-1)[self.prefix_ids, self.tokens]
        return np.where(self.mask, lp, 0.0)

    def sequence_probs(self, logits) -> np.ndarray:
        return np.exp(self.token_logp(logits).sum(1))

    def scores(self, logits) -> np.ndarray:
        """[S, P, V]: grad_theta log pi(y) = sum_t (e_{y_t} - pi(. | y_<t)) at row prefix_t."""
        pi = np.exp(log_softmax(real_array("logits", logits, 2), axis=-1))
        S, T = self.tokens.shape
        out = np.zeros((S,) + self.shape)
        for t in range(T):
            rows = np.nonzero(self.mask[:, t])[0]
            out[rows, self.prefix_ids[rows, t]] -= pi[self.prefix_ids[rows, t]]
            out[rows, self.prefix_ids[rows, t], self.tokens[rows, t]] += 1.0
        return out

    def gradient(self, logits, values=None) -> np.ndarray:
        """Exact grad_theta E_pi[f(y)] = sum_y pi(y) f(y) grad log pi(y), f = rewards (default) or `values` [S]."""
        f = self.rewards if values is None else np.asarray(values, dtype=np.float64)
        return np.einsum("s,s,spv->pv", self.sequence_probs(logits), f, self.scores(logits))
