"""Plain-loop reference losses, written from each method's paper or library formula.

These are the independent references for `theory.estimator`: explicit Python loops over sequences
and tokens, the natural surrogate of each method (e.g. -min(rho A, clip(rho) A)), and autograd for
the gradient. They share no code with the estimator. Slow on purpose; use them on small tensors.

Every function takes `logp`, `old` ([B, T] float, `logp` with requires_grad), `A` ([B]), `M`
([B, T] bool) and returns a scalar tensor. Formulas and sources are in each docstring.
"""

from __future__ import annotations

import math

import torch


def _rows(M):
    return [[t for t in range(M.shape[1]) if bool(M[i, t])] for i in range(M.shape[0])]


def _ppo_token(lp, old, a, lo, hi):
    """-min(rho a, clip(rho, lo, hi) a): PPO's clipped surrogate for one token."""
    rho = torch.exp(lp - old)
    return -torch.minimum(rho * a, rho.clamp(lo, hi) * a)


def advantages_group_norm(rewards, G, eps=1e-6):
    """(r - mean) / (sample std + eps) per group; constant group -> 0 (verl grpo, TRL scale='group')."""
    out = []
    for g in range(0, len(rewards), G):
        grp = [float(r) for r in rewards[g:g + G]]
        mu = sum(grp) / G
        sd = math.sqrt(sum((r - mu) ** 2 for r in grp) / (G - 1)) if G > 1 else 1.0
        out += [0.0 if max(grp) == min(grp) else (r - mu) / (sd + eps) for r in grp]
    return torch.tensor(out, dtype=torch.float64)


def advantages_group_mean(rewards, G):
    out = []
    for g in range(0, len(rewards), G):
        grp = [float(r) for r in rewards[g:g + G]]
        out += [0.0 if max(grp) == min(grp) else r - sum(grp) / G for r in grp]
    return torch.tensor(out, dtype=torch.float64)


def advantages_rloo(rewards, G):
    """r_i - mean of the other G-1 rewards of the group (Kool et al. 2019)."""
    out = []
    for g in range(0, len(rewards), G):
        grp = [float(r) for r in rewards[g:g + G]]
        out += [0.0 if max(grp) == min(grp) else r - (sum(grp) - r) / (G - 1) for r in grp]
    return torch.tensor(out, dtype=torch.float64)


def sft(logp, old, A, M, **_):
    """TRL SFT: token-mean negative log-likelihood over all completion tokens."""
    rows = _rows(M)
    n = sum(len(r) for r in rows)
    return sum((-logp[i, t] for i, r in enumerate(rows) for t in r), torch.zeros(())) / max(n, 1)


def reinforce(logp, old, A, M, **_):
    """REINFORCE: (1/B) sum_i A_i * sum_t -log pi(y_it)."""
    rows = _rows(M)
    return sum((-A[i] * logp[i, t] for i, r in enumerate(rows) for t in r), torch.zeros(())) / len(rows)


rloo = reinforce  # same loss; RLOO differs in its advantages (advantages_rloo)


def grpo(logp, old, A, M, eps_low=0.2, eps_high=0.2, **_):
    """TRL loss_type='grpo': (1/B) sum_i (1/|o_i|) sum_t -min(rho A, clip(rho) A)."""
    total = torch.zeros((), dtype=logp.dtype)
    for i, r in enumerate(_rows(M)):
        if r:
            total = total + sum(_ppo_token(logp[i, t], old[i, t], A[i], 1 - eps_low, 1 + eps_high) for t in r) / len(r)
    return total / M.shape[0]


def bnpo(logp, old, A, M, eps_low=0.2, eps_high=0.2, **_):
    """TRL loss_type='bnpo': sum of clipped token losses / number of tokens in the micro-batch."""
    rows = _rows(M)
    n = sum(len(r) for r in rows)
    tot = sum((_ppo_token(logp[i, t], old[i, t], A[i], 1 - eps_low, 1 + eps_high) for i, r in enumerate(rows)
               for t in r), torch.zeros(()))
    return tot / max(n, 1)


ppo = bnpo  # PPO's clip (Schulman et al. 2017) with a token mean; verl's default vanilla loss adds a dual clip
# (clip_ratio_c = 3): preset('ppo', mask='dual_clip'), checked in tests/theory/test_estimator.py


def dapo(logp, old, A, M, eps_low=0.2, eps_high=0.28, num_items=None, **_):
    """TRL loss_type='dapo': sum of clipped token losses / num_items_in_batch (global token count)."""
    rows = _rows(M)
    n = num_items if num_items is not None else sum(len(r) for r in rows)
    tot = sum((_ppo_token(logp[i, t], old[i, t], A[i], 1 - eps_low, 1 + eps_high) for i, r in enumerate(rows)
               for t in r), torch.zeros(()))
    return tot / n


def dr_grpo(logp, old, A, M, eps_low=0.2, eps_high=0.2, max_length=None, **_):
    """TRL loss_type='dr_grpo': sum of clipped token losses / (B * max_completion_length)."""
    L = max_length if max_length is not None else M.shape[1]
    rows = _rows(M)
    tot = sum((_ppo_token(logp[i, t], old[i, t], A[i], 1 - eps_low, 1 + eps_high) for i, r in enumerate(rows)
               for t in r), torch.zeros(()))
    return tot / (M.shape[0] * L)


def hpt_paper(logp, old, A, M, eps_low=0.2, eps_high=0.2, **_):
    """HPT Eq. 11: -(1/n) sum_i sum_t min(r A, clip(r) A)."""
    rows = _rows(M)
    tot = sum((_ppo_token(logp[i, t], old[i, t], A[i], 1 - eps_low, 1 + eps_high) for i, r in enumerate(rows)
               for t in r), torch.zeros(()))
    return tot / M.shape[0]


def hpt_code(logp, old, A, M, max_length=8192, **_):
    """HPT released code (mix_actor.py): sum over on-policy tokens of -A * ratio, / 8192, no clip."""
    rows = _rows(M)
    tot = sum((-A[i] * torch.exp(logp[i, t] - old[i, t]) for i, r in enumerate(rows) for t in r), torch.zeros(()))
    return tot / max_length


def cispo(logp, old, A, M, eps_low=1.0, eps_high=4.0, **_):
    """MiniMax-M1 CISPO: -sg(clip(rho, 1-eps_low, 1+eps_high)) * A * log pi, token-level mean."""
    rows = _rows(M)
    n = sum(len(r) for r in rows)
    tot = torch.zeros((), dtype=logp.dtype)
    for i, r in enumerate(rows):
        for t in r:
            w = torch.exp(logp[i, t] - old[i, t]).clamp(1 - eps_low, 1 + eps_high).detach()
            tot = tot - w * A[i] * logp[i, t]
    return tot / max(n, 1)


def gspo(logp, old, A, M, eps_low=3e-4, eps_high=4e-4, **_):
    """GSPO: (1/B) sum_i -min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log(pi/pi_old)) (a function of
    every token of the sequence, differentiated through all of them)."""
    total = torch.zeros((), dtype=logp.dtype)
    for i, r in enumerate(_rows(M)):
        if r:
            s = torch.exp(sum(logp[i, t] - old[i, t] for t in r) / len(r))
            total = total - torch.minimum(s * A[i], s.clamp(1 - eps_low, 1 + eps_high) * A[i])
    return total / M.shape[0]


def _mixed(logp, old, A, M, is_demo, demo_term, eps_low, eps_high, per_sequence):
    rows = _rows(M)
    total = torch.zeros((), dtype=logp.dtype)
    for i, r in enumerate(rows):
        terms = [demo_term(logp[i, t], A[i]) if bool(is_demo[i]) else
                 _ppo_token(logp[i, t], old[i, t], A[i], 1 - eps_low, 1 + eps_high) for t in r]
        if terms:
            total = total + (sum(terms) / len(r) if per_sequence else sum(terms))
    if per_sequence:
        return total / M.shape[0]
    return total / max(sum(len(r) for r in rows), 1)


def srft(logp, old, A, M, is_demo, eps_low=0.2, eps_high=0.2, **_):
    """HPT App. A Eq. 19 for demonstrations (-A * pi, pi_ref = 1), PPO clip for rollouts;
    (1/B) sum_i (1/|tau_i|) sum_t."""
    return _mixed(logp, old, A, M, is_demo, lambda lp, a: -a * torch.exp(lp), eps_low, eps_high, True)


def luffy(logp, old, A, M, is_demo, eps_low=0.2, eps_high=0.2, gamma=0.1, **_):
    """LUFFY: demonstrations -A * f(pi), f(p) = p / (p + gamma); rollouts PPO clip; token mean."""
    def shaped(lp, a):
        p = torch.exp(lp)
        return -a * p / (p + gamma)

    return _mixed(logp, old, A, M, is_demo, shaped, eps_low, eps_high, False)


def sapo(logp, old, A, M, tau_pos=1.0, tau_neg=1.05, **_):
    """SAPO (arXiv 2511.20347; TRL loss_type='sapo', verl 'sapo'): per token -A * (4 / tau) *
    sigmoid(tau (rho - 1)), tau = tau_pos if A > 0 else tau_neg; (1/B) sum_i (1/|o_i|) sum_t."""
    total = torch.zeros((), dtype=logp.dtype)
    for i, r in enumerate(_rows(M)):
        tau = tau_pos if float(A[i]) > 0 else tau_neg
        if r:
            total = total + sum(-A[i] * 4 / tau * torch.sigmoid(tau * (torch.exp(logp[i, t] - old[i, t]) - 1))
                                for t in r) / len(r)
    return total / M.shape[0]


def luspo(logp, old, A, M, eps_low=3e-4, eps_high=4e-4, **_):
    """LUSPO as TRL 1.16 runs it (loss_type='luspo', sequence-level ratio): GSPO's clipped sequence surrogate on
    every token of the sequence, summed over the sequence's tokens, mean over the B sequences."""
    total = torch.zeros((), dtype=logp.dtype)
    for i, r in enumerate(_rows(M)):
        if r:
            s = torch.exp(sum(logp[i, t] - old[i, t] for t in r) / len(r))
            surrogate = -torch.minimum(s * A[i], s.clamp(1 - eps_low, 1 + eps_high) * A[i])
            total = total + len(r) * surrogate
    return total / M.shape[0]


def vespo(logp, old, A, M, k_pos=2.0, lam_pos=3.0, k_neg=3.0, lam_neg=2.0, **_):
    """VESPO as TRL 1.16 runs it: -phi(w_i) A_i log pi per token with phi(w) = e^lam w^k e^(-lam w) held constant,
    w_i = prod_t pi/pi_old over the sequence (its log clamped to [log 1e-8, 20]); / number of valid tokens."""
    total, n = torch.zeros((), dtype=logp.dtype), 0
    for i, r in enumerate(_rows(M)):
        log_w = min(max(sum(float((logp[i, t] - old[i, t]).detach()) for t in r), math.log(1e-8)), 20.0)
        k, lam = (k_pos, lam_pos) if float(A[i]) >= 0 else (k_neg, lam_neg)
        phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
        total = total + sum(-phi * A[i] * logp[i, t] for t in r)
        n += len(r)
    return total / max(n, 1)


REFERENCES = {"sft": sft, "ppo": ppo, "grpo": grpo, "reinforce": reinforce, "cispo": cispo, "gspo": gspo,
              "srft": srft, "luffy": luffy, "dapo": dapo, "dr_grpo": dr_grpo, "bnpo": bnpo, "rloo": rloo,
              "hpt_paper": hpt_paper, "hpt_code": hpt_code, "sapo": sapo,
              "luspo": luspo, "vespo": vespo}
