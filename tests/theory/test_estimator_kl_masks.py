"""theory.estimator's KL term, SAPO, TRL's off-policy and top-entropy masks and the rollout importance correction,
against plain loops written from the formulas (autograd for their gradients); errors name the option.
tests/theory/test_parity_libs.py checks the same options against TRL's and verl's own code."""

import math

import pytest
import torch

from theory.estimator import KL_STYLES, preset

F64 = torch.float64


def batch(seed=0, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=0)
    ref = (logp + 0.8 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=0)
    roll = (old + 0.1 + 0.5 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=0)
    M = torch.rand(B, T, generator=g) > 0.3
    M[:, 0] = True
    M[2] = False
    A = torch.randn(B, generator=g, dtype=F64)
    H = torch.rand(B, T, generator=g, dtype=F64)
    return logp, old, ref, roll, M, A, H


def rows(M):
    return [[t for t in range(M.shape[1]) if M[i, t]] for i in range(M.shape[0])]


def kl_token(k, lp, rf):
    """Schulman's estimators of KL(pi || ref) at one sampled token, d = log pi - log ref; a trailing '+' keeps
    the value and takes the gradient of k2 = d^2 / 2 (straight-through)."""
    d = lp - rf
    if k.endswith("+"):
        v = kl_token(k[:-1], lp, rf)
        return v.detach() + d * d / 2 - (d * d / 2).detach()
    if k == "k1":
        return d
    if k == "k2":
        return d * d / 2
    v = torch.exp(-d.clamp(-20, 20)) + d.clamp(-20, 20) - 1
    return v.clamp(max=10.0) if k == "low_var_kl" else v


def agg_weight(agg, M, i, t):
    """The weight of token (i, t) under the aggregations used here, with S = all rows (TRL, ptlab default)."""
    B, n = M.shape[0], int(M.sum())
    L_i = int(M[i].sum())
    return {"global_token_mean": 1 / n, "token_mean": 1 / n, "seq_mean_token_mean": 1 / (B * L_i),
            "batch_token_sum_norm": 1 / (B * 16)}[agg]


def loop_kl(x, old, ref, M, est):
    """beta * sum_{i,t} a_it * KL_it (* rho_it with the bias correction), every factor differentiable."""
    total = torch.zeros((), dtype=F64)
    agg = est.aggregation if est.kl_aggregation == "policy" else "global_token_mean"
    for i, r in enumerate(rows(M)):
        if est.reference == "sequence_geometric" and r:
            seq = torch.exp(sum(x[i, t] - old[i, t] for t in r) / len(r))
        for t in r:
            v = kl_token(est.kl_estimator, x[i, t], ref[i, t])
            if est.kl_bias_correction:
                v = v * (seq if est.reference == "sequence_geometric" else torch.exp(x[i, t] - old[i, t]))
            total = total + agg_weight(agg, M, i, t) * v
    return est.kl_coef * total


def loss_and_grad(fn, x0):
    x = x0.clone().requires_grad_()
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo", "gspo"])
@pytest.mark.parametrize("kl", ["k1", "k2", "k3", "low_var_kl", "k1+", "k3+", "low_var_kl+"])
@pytest.mark.parametrize("aggregation", ["policy", "global_token_mean"])
@pytest.mark.parametrize("bias", [False, True])
def test_kl_term_matches_plain_loop(name, kl, aggregation, bias):
    logp, old, ref, _, M, A, _ = batch(1)
    opts = {"max_length": 16} if name == "dr_grpo" else {}
    plain = preset(name, **opts)
    est = plain.replace(kl_coef=0.3, kl_estimator=kl, kl_aggregation=aggregation, kl_bias_correction=bias)
    got = loss_and_grad(lambda x: est.loss(x, old_logp=old, advantages=A, mask=M, ref_logp=ref), logp)
    want = loss_and_grad(lambda x: plain.loss(x, old_logp=old, advantages=A, mask=M) + loop_kl(x, old, ref, M, est),
                         logp)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-14)
    w = est.coefficients(logp, old_logp=old, advantages=A, mask=M, ref_logp=ref)
    torch.testing.assert_close(w, -got[1], rtol=0, atol=0)


def test_low_var_kl_cap_is_reached_and_stops_the_gradient():
    logp, old, ref, _, M, A, _ = batch(2)
    far = ref - 15.0
    est = preset("grpo", kl_coef=1.0, kl_estimator="low_var_kl", kl_aggregation="global_token_mean")
    v, dv = est.kl_per_token(logp, far)
    assert bool((v == 10.0).all()) and bool((dv == 0).all())
    g_kl = est.coefficients(logp, old_logp=old, advantages=A, mask=M, ref_logp=far) \
        - preset("grpo").coefficients(logp, old_logp=old, advantages=A, mask=M)
    assert float(g_kl.abs().max()) == 0.0


def test_kl_defaults_are_the_earlier_trainer_term():
    """kl_* defaults = ptlab's earlier trainer KL: k3, clamp 20, global token mean, no ratio (KL_STYLES['ptlab_v0'])."""
    logp, old, ref, _, M, A, _ = batch(3)
    est = preset("grpo", kl_coef=0.1)
    assert {k: getattr(est, k) for k in KL_STYLES["ptlab_v0"]} == KL_STYLES["ptlab_v0"]

    def earlier(x):
        delta = (ref - x).clamp(-20, 20)
        k3 = torch.where(M, torch.exp(delta) - delta - 1, torch.zeros_like(x))
        return preset("grpo").loss(x, old_logp=old, advantages=A, mask=M) + 0.1 * k3.sum() / M.sum()
    got = loss_and_grad(lambda x: est.loss(x, old_logp=old, advantages=A, mask=M, ref_logp=ref), logp)
    want = loss_and_grad(earlier, logp)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_in_reward_is_the_reward_minus_the_summed_kl(kl):
    logp, old, ref, _, M, _, _ = batch(4)
    R = torch.arange(6, dtype=F64)
    est = preset("grpo", kl_coef=0.2, kl_placement="reward", kl_estimator=kl)
    want = torch.tensor([float(R[i]) - 0.2 * sum(float(kl_token(kl, old[i, t], ref[i, t])) for t in r)
                         for i, r in enumerate(rows(M))], dtype=F64)
    torch.testing.assert_close(est.kl_rewards(R, old, ref, M), want, rtol=1e-13, atol=1e-14)
    # in the reward, the loss has no KL term and needs no ref_logp
    logp_, A = logp, est.advantages(R, 3)
    torch.testing.assert_close(est.loss(logp_, old_logp=old, advantages=A, mask=M),
                               preset("grpo").loss(logp_, old_logp=old, advantages=A, mask=M), rtol=0, atol=0)


def test_sapo_matches_its_formula_and_is_a_soft_trust_region():
    logp, old, _, _, M, A, _ = batch(5)
    est = preset("sapo")

    def loop(x):
        out = torch.zeros((), dtype=F64)
        for i, r in enumerate(rows(M)):
            tau = 1.0 if A[i] > 0 else 1.05
            for t in r:
                out = out - A[i] * 4 / tau * torch.sigmoid(tau * (torch.exp(x[i, t] - old[i, t]) - 1)) / len(r)
        return out / M.shape[0]
    got, want = loss_and_grad(lambda x: est.loss(x, old_logp=old, advantages=A, mask=M), logp), loss_and_grad(loop,
                                                                                                              logp)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # at rho = 1 the gate's slope is 1: on-policy SAPO is GRPO's on-policy gradient
    torch.testing.assert_close(est.coefficients(logp, advantages=A, mask=M),
                               preset("grpo").coefficients(logp, advantages=A, mask=M), rtol=1e-15, atol=0)


def test_extra_masks_match_plain_loops():
    logp, old, _, roll, M, A, H = batch(6)
    base = preset("grpo")
    w0 = base.coefficients(logp, old_logp=old, advantages=A, mask=M)
    # off-policy sequence mask: drop a row with A < 0 whose mean (log pi_sampler - log pi) exceeds delta
    for delta, sampler in ((0.0, None), (0.05, roll)):
        est = base.replace(off_policy_mask_threshold=delta)
        s = sampler if sampler is not None else old
        keep = [A[i] >= 0 or (sum(float(s[i, t] - logp[i, t]) for t in r) / max(len(r), 1)) <= delta
                for i, r in enumerate(rows(M))]
        assert not all(keep)
        w = est.coefficients(logp, old_logp=old, advantages=A, mask=M, rollout_logp=sampler)
        torch.testing.assert_close(w, w0 * torch.tensor(keep, dtype=F64)[:, None], rtol=0, atol=0)
    # top-entropy tokens: entropy >= the (1 - q) quantile of the valid tokens' entropies (linear interpolation)
    q = 0.4
    vals = sorted(float(H[i, t]) for i, r in enumerate(rows(M)) for t in r)
    pos = (1 - q) * (len(vals) - 1)
    thr = vals[math.floor(pos)] + (pos - math.floor(pos)) * (vals[math.ceil(pos)] - vals[math.floor(pos)])
    keep = torch.tensor([[bool(M[i, t]) and float(H[i, t]) >= thr - 1e-6 for t in range(M.shape[1])]
                         for i in range(M.shape[0])], dtype=F64)
    w = base.replace(top_entropy_quantile=q).coefficients(logp, old_logp=old, advantages=A, mask=M, entropy=H)
    torch.testing.assert_close(w, w0 * keep, rtol=0, atol=0)
    assert 0 < float(keep.sum()) < float(M.sum())


@pytest.mark.parametrize("mode,lo,hi", [("token_truncate", None, 1.5), ("token_mask", 0.6, 1.5),
                                        ("sequence_truncate", 0.5, 2.0), ("sequence_mask", None, 1.0)])
def test_rollout_correction_matches_plain_loop(mode, lo, hi):
    logp, old, _, roll, M, A, _ = batch(7)
    base = preset("grpo")
    w0 = base.coefficients(logp, old_logp=old, advantages=A, mask=M)
    lo_, hi_ = lo if lo is not None else -math.inf, hi if hi is not None else math.inf
    want = torch.zeros_like(w0)
    for i, r in enumerate(rows(M)):
        seq = math.exp(sum(float(old[i, t] - roll[i, t]) for t in r))
        for t in r:
            x = seq if mode.startswith("sequence") else math.exp(float(old[i, t] - roll[i, t]))
            x = min(max(x, lo_), hi_) if mode.endswith("truncate") else (x if lo_ <= x <= hi_ else 0.0)
            want[i, t] = w0[i, t] * x
    est = base.replace(rollout_correction=mode, rollout_is_min=lo, rollout_is_max=hi)
    torch.testing.assert_close(est.coefficients(logp, old_logp=old, advantages=A, mask=M, rollout_logp=roll), want,
                               rtol=1e-13, atol=0)


def test_kl_and_masks_keep_the_split_invariance_of_global_normalisers():
    logp, old, ref, roll, M, A, _ = batch(8)
    est = preset("grpo", kl_coef=0.2, off_policy_mask_threshold=0.0, rollout_correction="token_truncate",
                 rollout_is_max=2.0, **KL_STYLES["trl"])
    kw = dict(old_logp=old, advantages=A, mask=M, ref_logp=ref, rollout_logp=roll)
    whole = est.coefficients(logp, **kw)
    parts = [est.coefficients(logp[s], **{k: v[s] for k, v in kw.items()}, num_seqs=6, num_items=int(M.sum()))
             for s in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-14, atol=0)


def _err(fn, *words):
    with pytest.raises(ValueError) as e:
        fn()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_options_and_missing_inputs_name_the_argument():
    logp, old, ref, roll, M, A, H = batch(0)
    _err(lambda: preset("grpo", kl_estimator="k4"), "kl_estimator")
    _err(lambda: preset("grpo", kl_placement="advantage"), "kl_placement")
    _err(lambda: preset("grpo", kl_aggregation="sum"), "kl_aggregation")
    _err(lambda: preset("grpo", kl_coef=-1.0), "kl_coef")
    _err(lambda: preset("grpo", kl_bias_correction=1), "kl_bias_correction")
    _err(lambda: preset("grpo", top_entropy_quantile=0.0), "top_entropy_quantile")
    _err(lambda: preset("grpo", top_entropy_quantile=1.5), "top_entropy_quantile")
    _err(lambda: preset("grpo", off_policy_mask_threshold=float("nan")), "off_policy_mask_threshold")
    _err(lambda: preset("grpo", rollout_correction="token"), "rollout_correction")
    _err(lambda: preset("grpo", rollout_correction="token_mask"), "rollout_is_max")
    _err(lambda: preset("grpo", rollout_correction="token_mask", rollout_is_min=2.0, rollout_is_max=1.0),
         "rollout_is_min")
    _err(lambda: preset("grpo", sapo_tau_neg=0.0), "sapo_tau_neg")
    _err(lambda: preset("gspo", mask="sapo"), "mask")
    _err(lambda: preset("vespo", vespo_lambda_neg=-1.0), "vespo_lambda_neg")
    _err(lambda: preset("vespo", rollout_correction="sequence_mask", rollout_is_max=3.0), "rollout_correction",
         "token_truncate")
    _err(lambda: preset("vespo", rollout_correction="token_mask", rollout_is_max=3.0).loss(
        logp, old_logp=old, advantages=A, mask=M), "rollout_logp")
    _err(lambda: preset("grpo", kl_coef=0.1).loss(logp, old_logp=old, advantages=A, mask=M), "ref_logp")
    _err(lambda: preset("grpo", top_entropy_quantile=0.5).loss(logp, advantages=A, mask=M), "entropy")
    _err(lambda: preset("grpo", rollout_correction="token_truncate", rollout_is_max=2.0).loss(
        logp, advantages=A, mask=M), "rollout_logp")
    _err(lambda: preset("grpo", kl_coef=0.1).loss(logp, advantages=A, mask=M, ref_logp=ref[:, :2]), "ref_logp")
    bad = ref.clone()
    bad[0, 0] = float("nan")
    _err(lambda: preset("grpo", kl_coef=0.1).loss(logp, advantages=A, mask=M, ref_logp=bad), "ref_logp", "NaN")
    _err(lambda: preset("grpo", kl_coef=0.1).kl_rewards(torch.zeros(3), logp, ref), "rewards")
