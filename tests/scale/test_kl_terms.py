"""The trainer's KL term (issue 14 item 4): method.rl.kl_* reach the estimator, the micro-batch loss adds the
estimator's KL (the defaults being ptlab's earlier term), and the in-reward KL shapes the rewards as a loop says."""

from types import SimpleNamespace

import torch

from scale.config import load_config
from scale.loss import Row, Terms, collate, micro_loss
from scale.methods.rl import kl_in_reward, rl_preset
from theory.estimator import KL_STYLES

BASE = ["model.path=/m", "data.path=/d", "method.name=rl"]
F64 = torch.float64


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate((3, 1, 4, 2)):
        ref = (-torch.rand(n, generator=g, dtype=F64) * 3).tolist()
        rows.append(Row([5] * 2 + [7] * n, 2, "rl", advantage=float(i) - 1.5, ref_token_logp=ref,
                        meta={"reward": float(i % 2)}))
    return rows


def test_config_keys_reach_the_estimator():
    cfg = load_config(None, BASE + ["method.rl.kl_coef=0.04", "method.rl.kl_aggregation=policy",
                                    "method.rl.kl_bias_correction=true"])
    est = rl_preset(cfg, "grpo")
    assert est.kl_coef == 0.04 and {k: getattr(est, k) for k in KL_STYLES["trl"]} == KL_STYLES["trl"]
    cfg = load_config(None, BASE + ["method.rl.kl_coef=0.01", "method.rl.kl_estimator=low_var_kl",
                                    "method.rl.kl_aggregation=policy"])
    assert {k: getattr(rl_preset(cfg, "grpo"), k) for k in KL_STYLES["verl"]} == KL_STYLES["verl"]


def test_default_kl_term_is_the_earlier_one():
    """Defaults (k3, global token mean, no ratio): the loss ptlab's trainer computed before the kl_* keys."""
    rows = _rows()
    mb = collate(rows, pad_id=0)
    T = mb["input_ids"].shape[1]
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(len(rows), T, generator=g, dtype=F64) * 3).requires_grad_()
    M = mb["score_mask"]
    norms = {"rl_tokens": float(M.sum()), "rl_rows": 4.0, "rl_nonempty_rows": 4.0, "all_tokens": float(M.sum())}
    cfg = load_config(None, BASE + ["method.rl.kl_coef=0.1"])
    terms = Terms(rl=rl_preset(cfg, "grpo"))
    loss, stats = micro_loss(logp, torch.zeros_like(logp), mb, terms, norms)
    delta = (mb["ref_token_logp"] - logp).clamp(-20, 20)
    k3 = torch.where(M, torch.exp(delta) - delta - 1, torch.zeros_like(logp))
    plain = micro_loss(logp, torch.zeros_like(logp), mb, Terms(rl=rl_preset(load_config(None, BASE), "grpo")),
                       norms)[0]
    want = plain + 0.1 * k3.sum() / M.sum()
    g1, g2 = torch.autograd.grad(loss, logp)[0], torch.autograd.grad(want, logp)[0]
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(g1, g2, rtol=1e-13, atol=1e-16)
    kl_sum = float(k3.detach().sum())
    assert abs(stats["kl_sum"] - kl_sum) <= 1e-12 * max(1.0, kl_sum)


class _Ref:
    def __init__(self, rows):
        self.lps = {id(r): torch.tensor(r.ref_token_logp, dtype=F64) for r in rows}

    def token_logps(self, rows):
        return [self.lps[id(r)] for r in rows]


def test_kl_in_reward_is_reward_minus_beta_times_the_summed_kl():
    rows = _rows(2)
    g = torch.Generator().manual_seed(3)
    sampled = {id(r): (-torch.rand(r.n_scored, generator=g, dtype=F64) * 2).tolist() for r in rows}

    def fill_old_logps(rs):
        for r in rs:
            r.old_logp = sampled[id(r)]
    cfg = load_config(None, BASE + ["method.rl.kl_coef=0.2", "method.rl.kl_placement=reward",
                                    "method.rl.kl_estimator=k1"])
    acc = SimpleNamespace(device="cpu", reduce=lambda x, op: x)
    tr = SimpleNamespace(terms=Terms(rl=rl_preset(cfg, "grpo")), fill_old_logps=fill_old_logps,
                         reference=_Ref(rows), acc=acc)
    info = {}
    got = kl_in_reward(tr, rows, info)
    want = [r.meta["reward"] - 0.2 * sum(o - f for o, f in zip(sampled[id(r)], r.ref_token_logp)) for r in rows]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-13
    n = sum(r.n_scored for r in rows)
    k1_mean = sum(o - f for r in rows for o, f in zip(sampled[id(r)], r.ref_token_logp)) / n
    assert abs(info["kl_reward"] - k1_mean) < 1e-13
    assert all(r.old_logp is None for r in rows)   # one update per batch stays on-policy
