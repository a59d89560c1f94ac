"""theory.estimator: autograd vs coefficients, the UPGE formula, paper/library references, invariance,
degenerate and bad inputs."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from theory import advantages as adv
from theory.estimator import AGGREGATIONS, PRESETS, UPGE, preset
from toy import reference_losses as ref

F64 = torch.float64


def make_batch(seed, n_groups, G, T, demo=False, spread=0.3, p_mask=0.2):
    """Random log-probs, old log-probs near them, a token mask with ragged rows, binary rewards."""
    g = torch.Generator().manual_seed(seed)
    B = n_groups * G
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 4
    old = (logp + spread * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=0)
    M = torch.rand(B, T, generator=g) > p_mask
    M[:, 0] = True
    rewards = torch.randint(0, 2, (B,), generator=g).to(F64)
    is_demo = (torch.arange(B) % G == G - 1) if demo else None
    return logp, old, M, rewards, is_demo


def advantages_for(est, rewards, G, seed=0):
    if est.advantage == "given":
        return torch.randn(len(rewards), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return est.advantages(rewards, group_size=G)


def grad_of(est, logp, **kw):
    x = logp.clone().requires_grad_()
    loss = est.loss(x, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def upge_formula(est, logp, old, A, M, is_demo):
    """The UPGE weight written out token by token: mask * (pi/pi_ref) * A * shaping' * aggregation weight."""
    B, T = logp.shape
    rows = [[t for t in range(T) if M[i, t]] for i in range(B)]
    n_tok = sum(len(r) for r in rows)
    L = est.max_length or T
    w = torch.zeros(B, T, dtype=F64)
    for i in range(B):
        demo = bool(is_demo[i]) if is_demo is not None else False
        reference = est.demo_reference if demo else est.reference
        shaping = est.demo_shaping if demo else est.shaping
        seq_ratio = math.exp(sum(float(logp[i, t] - old[i, t]) for t in rows[i]) / max(len(rows[i]), 1))
        for t in rows[i]:
            pi = math.exp(float(logp[i, t]))
            a = float(A[i])
            ratio = {"policy": 1.0, "one": pi, "old": math.exp(float(logp[i, t] - old[i, t])),
                     "sequence_geometric": seq_ratio}[reference]
            shaping_prime = est.shaping_gamma / (pi + est.shaping_gamma) ** 2 if shaping == "luffy" else 1.0
            stable, weight = 1.0, ratio
            if not demo and est.mask in ("ppo_clip", "sequence_clip", "dual_clip"):
                out = (a > 0 and ratio > 1 + est.eps_high) or (a < 0 and ratio < 1 - est.eps_low)
                if est.mask == "dual_clip":
                    out = out or (a < 0 and ratio > est.clip_c)
                stable = 0.0 if out else 1.0
            if not demo and est.mask == "cispo":
                weight = min(max(ratio, 1 - est.eps_low), 1 + est.eps_high)
            if not demo and est.mask == "vespo":  # stop-gradient gamma weight on the sequence product ratio
                log_w = min(max(sum(float(logp[i, u] - old[i, u]) for u in rows[i]), math.log(1e-8)), 20.0)
                k, lam = (est.vespo_k_pos, est.vespo_lambda_pos) if a >= 0 else (est.vespo_k_neg, est.vespo_lambda_neg)
                weight = math.exp(lam + k * log_w - lam * math.exp(log_w))
            if not demo and est.mask == "sapo":  # d/dlogp of (4/tau) sigmoid(tau (rho - 1)) = 4 s (1 - s) rho
                tau = est.sapo_tau_pos if a > 0 else est.sapo_tau_neg
                s = 1 / (1 + math.exp(-tau * (ratio - 1)))
                weight = 4 * s * (1 - s) * ratio
            agg = {"token_mean": 1 / n_tok, "global_token_mean": 1 / n_tok,
                   "seq_mean_token_mean": 1 / (B * len(rows[i])), "seq_mean_token_sum": 1 / B,
                   "seq_mean_token_sum_norm": 1 / (B * L), "batch_token_sum_norm": 1 / (B * L),
                   "token_sum_norm": 1 / L}[est.aggregation]
            w[i, t] = stable * weight * a * shaping_prime * agg
    return w


batches = st.fixed_dictionaries({
    "seed": st.integers(0, 10_000),
    "n_groups": st.integers(1, 3),
    "G": st.integers(2, 4),
    "T": st.integers(1, 6),
    "spread": st.sampled_from([0.0, 0.1, 0.5]),
})


def drawn_batch(est, b):
    """(logp, keyword arguments of est.loss / coefficients) for a hypothesis-drawn batch description b."""
    logp, old, M, r, demo = make_batch(b["seed"], b["n_groups"], b["G"], b["T"], est.demo_reference is not None,
                                       b["spread"])
    return logp, dict(old_logp=old, advantages=advantages_for(est, r, b["G"], b["seed"]), mask=M, is_demo=demo)


@given(name=st.sampled_from(list(PRESETS)), b=batches)
def test_autograd_equals_minus_coefficients_exactly(name, b):
    est = preset(name)
    logp, kw = drawn_batch(est, b)
    _, g = grad_of(est, logp, **kw)
    w = est.coefficients(logp, **kw)
    torch.testing.assert_close(g, -w, rtol=0, atol=0)


@given(name=st.sampled_from(list(PRESETS)), b=batches)
def test_coefficients_equal_upge_formula(name, b):
    est = preset(name)
    logp, kw = drawn_batch(est, b)
    w = est.coefficients(logp, **kw)
    want = upge_formula(est, logp, kw["old_logp"], kw["advantages"], kw["mask"], kw["is_demo"])
    torch.testing.assert_close(w, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preset_matches_plain_loop_reference(name, seed):
    """Loss value and gradient against the method's formula from its paper or library (TRL for grpo,
    bnpo, dr_grpo, dapo), written as loops with autograd in toy/reference_losses.py."""
    est = preset(name)
    logp, old, M, r, demo = make_batch(seed, 2, 4, 5, est.demo_reference is not None, spread=0.4)
    A = torch.ones(len(r), dtype=F64) if name == "sft" else advantages_for(est, r, 4, seed)
    loss, g = grad_of(est, logp, old_logp=old, advantages=A, mask=M, is_demo=demo)
    x = logp.clone().requires_grad_()
    opts = dict(eps_low=est.eps_low, eps_high=est.eps_high, is_demo=demo)
    ref_loss = ref.REFERENCES[name](x, old, A, M, **opts)
    (ref_g,) = torch.autograd.grad(ref_loss, x)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, ref_g, rtol=1e-10, atol=1e-14)


def test_clipping_is_active_in_reference_comparisons():
    """The reference comparison above must exercise the clipped branches, not only ratio ~ 1."""
    logp, old, M, r, _ = make_batch(0, 2, 4, 5, spread=0.4)
    est = preset("grpo")
    d = est.diagnostics(logp, old_logp=old, advantages=est.advantages(r, 4), mask=M)
    assert 0.05 < d["clip_fraction"] < 0.95


# ------------------------------------------------------------------ verl's and TRL's aggregations, from their source
# Plain loops written from verl 0.9.1 (PyPI wheel, verl/trainer/ppo/core_algos.py `agg_loss`), the verl of
# 2026-01-29 (volcengine/verl b178a3cd56f5, the same function before its 2026-02 change) and TRL 1.16.0
# (trl/trainer/grpo_trainer.py `_compute_loss`): single process (dp_size 1, one process, no accumulation).
def _valid(M, i):
    return [t for t in range(M.shape[1]) if M[i, t]]


def verl_agg_loss_091(loss_mat, M, mode, global_batch_size=None, batch_num_tokens=None, loss_scale_factor=None):
    """verl 0.9.1 agg_loss. Without global_batch_size the seq-mean modes divide by the number of rows that
    have a valid token; seq-mean-token-mean divides each row by (its token count + 1e-8)."""
    B, T = M.shape
    if mode == "token-mean":
        n = batch_num_tokens if batch_num_tokens is not None else sum(len(_valid(M, i)) for i in range(B))
        return sum(loss_mat[i, t] for i in range(B) for t in _valid(M, i)) / n
    nonempty = [i for i in range(B) if _valid(M, i)]
    S = global_batch_size if global_batch_size is not None else len(nonempty)
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        loss = sum(sum(loss_mat[i, t] for t in _valid(M, i)) for i in nonempty) / S
        if mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_scale_factor if loss_scale_factor is not None else T)
        return loss
    if mode == "seq-mean-token-mean":
        return sum(sum(loss_mat[i, t] for t in _valid(M, i)) / (len(_valid(M, i)) + 1e-8) for i in nonempty) / S
    raise AssertionError(mode)


def verl_agg_loss_2026_01(loss_mat, M, loss_scale_factor=None):
    """verl before 2026-02 (b178a3cd56f5), seq-mean-token-sum-norm: every valid token's loss summed, divided
    by the constant; no sequence count (what the HPT and LUFFY released code compute, docs/hpt.md 6.3)."""
    B, T = M.shape
    return sum(loss_mat[i, t] for i in range(B) for t in _valid(M, i)) / (loss_scale_factor or T)


def trl_agg_116(loss_mat, M, loss_type, max_completion_length=None, num_items_in_batch=None):
    """TRL 1.16 _compute_loss aggregation, one process, gradient_accumulation 1: grpo divides each row by
    max(1, its tokens) and averages over all B rows; bnpo and dapo are token means (dapo's count may be the
    generation batch's); dr_grpo divides the token sum by B * max_completion_length."""
    B, T = M.shape
    tok = [[loss_mat[i, t] for t in _valid(M, i)] for i in range(B)]
    if loss_type == "grpo":
        return sum(sum(r) / max(1, len(r)) for r in tok) / B
    if loss_type in ("bnpo", "dapo"):
        n = num_items_in_batch if loss_type == "dapo" and num_items_in_batch else max(1, sum(len(r) for r in tok))
        return sum(sum(r) for r in tok) / n
    if loss_type == "dr_grpo":
        return sum(sum(r) for r in tok) / (B * max_completion_length)
    raise AssertionError(loss_type)


def ragged_batch(seed=3, B=6, T=7):
    """Ragged mask with an empty row (row 2), log-probs and advantages, float64."""
    logp, _, M, _, _ = make_batch(seed, 2, B // 2, T)
    M[2] = False
    M[4, 3:] = False
    A = torch.linspace(-1, 1, B, dtype=F64)
    return logp, M, A


@pytest.mark.parametrize("count_empty_rows", [True, False])
@pytest.mark.parametrize("agg,mode", [("token_mean", "token-mean"), ("seq_mean_token_sum", "seq-mean-token-sum"),
                                      ("seq_mean_token_sum_norm", "seq-mean-token-sum-norm"),
                                      ("seq_mean_token_mean", "seq-mean-token-mean")])
def test_aggregations_match_verl_091(agg, mode, count_empty_rows):
    """ptlab's aggregation == verl 0.9.1 agg_loss, value and gradient, with an empty row. count_empty_rows=False
    is verl's agg_loss without a global batch size (S = non-empty rows); True is verl's trainer, which passes
    global_batch_size = all rows. seq-mean-token-mean: verl adds 1e-8 to each row's count (relative 1e-8/L_i)."""
    logp, M, A = ragged_batch()
    B = len(A)
    for L in (None, 16):
        est = UPGE(reference="policy", advantage="given", mask="none", aggregation=agg, max_length=L,
                   count_empty_rows=count_empty_rows)
        loss, g = grad_of(est, logp, advantages=A, mask=M)
        x = logp.clone().requires_grad_()
        want = verl_agg_loss_091(-A[:, None] * x, M, mode, global_batch_size=B if count_empty_rows else None,
                                 loss_scale_factor=L)
        (g_want,) = torch.autograd.grad(want, x)
        tol = dict(rtol=2e-8, atol=0) if mode == "seq-mean-token-mean" else dict(rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(loss, want.detach(), **tol)
        torch.testing.assert_close(g, g_want, **tol)


def test_seq_mean_token_sum_norm_divides_by_the_sequence_count_and_token_sum_norm_does_not():
    """verl 0.9.1's seq-mean-token-sum-norm = token sum / (S L); the pre-2026-02 one (token_sum_norm, the
    HPT code's) = token sum / L; both against their plain loops, and the first equals TRL's dr_grpo weights."""
    logp, M, A = ragged_batch()
    B = len(A)
    x = logp.clone().requires_grad_()
    old_mode = verl_agg_loss_2026_01(-A[:, None] * x, M, loss_scale_factor=16)
    (g_old,) = torch.autograd.grad(old_mode, x)
    est = UPGE(reference="policy", advantage="given", mask="none", aggregation="token_sum_norm", max_length=16)
    loss, g = grad_of(est, logp, advantages=A, mask=M)
    torch.testing.assert_close(loss, old_mode.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g, g_old, rtol=1e-12, atol=1e-15)
    new = est.replace(aggregation="seq_mean_token_sum_norm")
    w_old = est.coefficients(logp, advantages=A, mask=M)
    torch.testing.assert_close(new.coefficients(logp, advantages=A, mask=M), w_old / B, rtol=1e-15, atol=0)
    dr = est.replace(aggregation="batch_token_sum_norm")
    assert torch.equal(new.coefficients(logp, advantages=A, mask=M), dr.coefficients(logp, advantages=A, mask=M))
    # hpt_code keeps the HPT code's normaliser: a token's weight does not depend on how many rows share the batch
    hpt = preset("hpt_code")
    assert hpt.aggregation == "token_sum_norm" and hpt.max_length == 8192
    w_all = hpt.coefficients(logp, advantages=A, mask=M)
    torch.testing.assert_close(hpt.coefficients(logp[:3], advantages=A[:3], mask=M[:3]), w_all[:3], rtol=0, atol=0)
    torch.testing.assert_close(w_all, A[:, None] * M / 8192, rtol=1e-15, atol=0)


@pytest.mark.parametrize("agg,loss_type", [("seq_mean_token_mean", "grpo"), ("token_mean", "bnpo"),
                                           ("global_token_mean", "dapo"), ("batch_token_sum_norm", "dr_grpo")])
def test_aggregations_match_trl_116(agg, loss_type):
    """ptlab's aggregation == TRL 1.16's loss_type aggregation, value and gradient, empty row included (TRL
    counts it in B, as count_empty_rows=True does)."""
    logp, M, A = ragged_batch()
    est = UPGE(reference="policy", advantage="given", mask="none", aggregation=agg, max_length=16)
    kw = {"num_items": 40} if agg == "global_token_mean" else {}
    loss, g = grad_of(est, logp, advantages=A, mask=M, **kw)
    x = logp.clone().requires_grad_()
    want = trl_agg_116(-A[:, None] * x, M, loss_type, max_completion_length=16, num_items_in_batch=40)
    (g_want,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g, g_want, rtol=1e-12, atol=1e-15)


def test_count_empty_rows_option():
    logp, M, A = ragged_batch()
    est = preset("grpo", count_empty_rows=False)
    w = est.coefficients(logp, advantages=A, mask=M)
    w_all = preset("grpo").coefficients(logp, advantages=A, mask=M)
    torch.testing.assert_close(w, w_all * 6 / 5, rtol=1e-15, atol=0)      # S = 5 non-empty rows of 6
    assert torch.equal(est.coefficients(logp, advantages=A, mask=M, num_seqs=6), w_all)  # an explicit S wins
    none = torch.zeros_like(M)
    loss, g = grad_of(est, logp, advantages=A, mask=none)  # verl would divide 0 by 0
    assert float(loss) == 0.0 and bool((g == 0).all())


# ------------------------------------------------------------------ verl's policy losses and its log-ratio clamp
def _loss_matrix(M, per_token):
    """[B, T] tensor of per_token(i, t) at valid positions (0 elsewhere), keeping autograd."""
    B, T = M.shape
    zero = torch.zeros((), dtype=F64)
    return torch.stack([torch.stack([per_token(i, t) if M[i, t] else zero for t in range(T)]) for i in range(B)])


def verl_vanilla_091(x, old, A, M, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, mode="token-mean", **agg):
    """verl 0.9.1 compute_policy_loss_vanilla: log-ratio clamped to [-20, 20] inside autograd, PPO clip, and for
    A < 0 the dual-clip cap min(-A c, .) (clip_ratio_c 3 by default); then agg_loss."""
    def token(i, t):
        ratio = torch.exp(torch.clamp(x[i, t] - old[i, t], min=-20.0, max=20.0))
        clipped = torch.maximum(-A[i] * ratio, -A[i] * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
        return torch.minimum(-A[i] * clip_ratio_c, clipped) if A[i] < 0 else clipped
    return verl_agg_loss_091(_loss_matrix(M, token), M, mode, **agg)


def verl_gspo_091(x, old, A, M, clip_low, clip_high, mode, **agg):
    """verl 0.9.1 compute_policy_loss_gspo: per row s = sg(mean_t log-ratio) (no per-token clamp); each token
    carries log s + logp - sg(logp), capped at 10 from above inside autograd; PPO clip on exp of it."""
    B = M.shape[0]
    seq = [(sum((x[i, t] - old[i, t] for t in _valid(M, i)), torch.zeros((), dtype=F64))
            / max(len(_valid(M, i)), 1)).detach() for i in range(B)]

    def token(i, t):
        s_it = torch.exp(torch.clamp(x[i, t] - x[i, t].detach() + seq[i], max=10.0))
        return torch.maximum(-A[i] * s_it, -A[i] * torch.clamp(s_it, 1 - clip_low, 1 + clip_high))
    return verl_agg_loss_091(_loss_matrix(M, token), M, mode, **agg)


def test_verl_default_vanilla_loss_is_ppo_with_dual_clip():
    """verl's default policy loss (vanilla, clip_ratio_c = 3, token-mean) is preset('ppo', mask='dual_clip');
    with clamp_gradient='zero' also beyond the +-20 clamp. preset('ppo') (clip only, Schulman et al.) is not."""
    logp, M, A = ragged_batch()
    g = torch.Generator().manual_seed(11)
    old = (logp + 0.4 * torch.randn(logp.shape, generator=g, dtype=F64)).clamp(max=0)
    old[1, 2] = logp[1, 2] - 1.5       # A < 0, ratio e^1.5 > c = 3: the dual-clip cap acts
    old[0, 0] = logp[0, 0] - 25.0      # ratio beyond e^20
    old[4, 0] = logp[4, 0] + 25.0      # ratio below e^-20 with A > 0: the one place the clamp's gradient shows
    x = logp.clone().requires_grad_()
    want = verl_vanilla_091(x, old, A, M)
    (g_want,) = torch.autograd.grad(want, x)
    est = preset("ppo", mask="dual_clip", clamp_gradient="zero")
    assert est.clip_c == 3.0
    loss, g_est = grad_of(est, logp, old_logp=old, advantages=A, mask=M)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_est, g_want, rtol=1e-12, atol=1e-15)
    # ptlab's default keeps the clamped ratio's weight beyond the clamp: only token (4, 0) differs, by A e^-20 / N
    _, g_keep = grad_of(preset("ppo", mask="dual_clip"), logp, old_logp=old, advantages=A, mask=M)
    diff = (g_keep - g_want).abs()
    assert float(diff[4, 0]) == pytest.approx(float(A[4]) * math.exp(-20.0) / int(M.sum()), rel=1e-12)
    diff[4, 0] = 0
    assert float(diff.max()) < 1e-15
    # without the dual clip (the old 'verl vanilla' citation of preset ppo) the capped token differs
    loss_ppo, g_ppo = grad_of(preset("ppo"), logp, old_logp=old, advantages=A, mask=M)
    assert abs(float(loss_ppo) - float(want.detach())) > 1e-3 and float((g_ppo - g_want).abs().max()) > 1e-3


@pytest.mark.parametrize("agg,mode", [("token_mean", "token-mean"), ("seq_mean_token_sum", "seq-mean-token-sum")])
def test_verl_gspo_with_its_sequence_cap(agg, mode):
    """verl 0.9.1 GSPO == preset('gspo', sequence_log_ratio_max=10, clamp_gradient='zero') (verl's agg_loss
    without a global batch size: count_empty_rows=False); without the cap, a sequence log-ratio above 10
    changes value and gradient."""
    logp, M, A = ragged_batch()
    g = torch.Generator().manual_seed(5)
    old = logp + 1e-4 * torch.randn(logp.shape, generator=g, dtype=F64)
    old[0] = logp[0] - 12.0   # A < 0, sequence log-ratio 12 > 10: verl caps it (zero gradient there)
    old[1] = logp[1] - 5.0    # A < 0, 5 < 10: stable, the gradient flows at ratio e^5
    est = preset("gspo", aggregation=agg, count_empty_rows=False, sequence_log_ratio_max=10.0, clamp_gradient="zero")
    x = logp.clone().requires_grad_()
    want = verl_gspo_091(x, old, A, M, est.eps_low, est.eps_high, mode)
    (g_want,) = torch.autograd.grad(want, x)
    loss, g_est = grad_of(est, logp, old_logp=old, advantages=A, mask=M)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_est, g_want, rtol=1e-12, atol=1e-15)
    assert bool((g_want[0] == 0).all()) and float(g_want[1].abs().max()) > 1.0
    plain = est.replace(sequence_log_ratio_max=None, clamp_gradient="keep")
    loss_plain, g_plain = grad_of(plain, logp, old_logp=old, advantages=A, mask=M)
    assert float(loss_plain) - float(want.detach()) > 1.0                      # value: -A e^12 against verl's -A e^10
    assert float(g_plain[0][M[0]].abs().min()) > 1.0       # ptlab's default: weight A e^12 on row 0
    torch.testing.assert_close(g_plain[1:], g_want[1:], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["hpt_code", "grpo", "cispo", "gspo", "reinforce"])
def test_clamp_gradient_zero_drops_exactly_the_clamped_tokens(name):
    """'zero' == 'keep' except at tokens whose |log-ratio| exceeds the clamp, where w = 0 (ratio references;
    CISPO's weight is a stop-gradient and a ratio-free reference has no clamp: both unchanged); autograd is
    still exactly -coefficients."""
    est = preset(name)
    logp, old, M, r, _ = make_batch(2, 2, 3, 5, spread=0.3)
    old[0, 1] = logp[0, 1] - 30.0
    old[3, 2] = logp[3, 2] + 30.0
    A = advantages_for(est, r, 3)
    A[0], A[3] = -1.0, 1.0
    kw = dict(old_logp=old, advantages=A, mask=M)
    keep, zero = est.coefficients(logp, **kw), est.replace(clamp_gradient="zero").coefficients(logp, **kw)
    _, g = grad_of(est.replace(clamp_gradient="zero"), logp, **kw)
    assert torch.equal(g, -zero)
    assert torch.equal(est.loss(logp, **kw), est.replace(clamp_gradient="zero").loss(logp, **kw))  # same value
    if name in ("cispo", "reinforce", "gspo"):  # gspo: the per-token clamp only enters the stop-gradient mean
        assert torch.equal(keep, zero)
        return
    beyond = torch.zeros_like(M)
    beyond[0, 1] = beyond[3, 2] = True
    assert bool((zero[beyond] == 0).all()) and bool((keep[beyond] != 0).any())
    assert torch.equal(keep[~beyond], zero[~beyond])


@pytest.mark.parametrize("aggregation", ["global_token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                         "batch_token_sum_norm"])
@pytest.mark.parametrize("n_micro", [2, 3, 6])
def test_global_normalisers_make_split_invariant(aggregation, n_micro):
    """Summing micro-batch gradients with global num_items / num_seqs gives the whole-batch gradient."""
    est = preset("grpo", aggregation=aggregation)
    logp, old, M, r, _ = make_batch(7, 3, 4, 6, spread=0.3)  # B = 12
    A = est.advantages(r, 4)
    kw = dict(num_items=int(M.sum()), num_seqs=len(r))
    _, g_whole = grad_of(est, logp, old_logp=old, advantages=A, mask=M, **kw)
    parts = []
    for idx in torch.arange(len(r)).chunk(n_micro):
        parts.append(grad_of(est, logp[idx], old_logp=old[idx], advantages=A[idx], mask=M[idx], **kw)[1])
    torch.testing.assert_close(torch.cat(parts), g_whole, rtol=1e-13, atol=1e-16)


def test_local_token_mean_is_not_split_invariant():
    """The contrast: bnpo (local token mean) changes with the split when rows have unequal lengths."""
    est = preset("bnpo")
    logp, old, M, r, _ = make_batch(7, 3, 4, 6, spread=0.3)
    A = est.advantages(r, 4)
    _, g_whole = grad_of(est, logp, old_logp=old, advantages=A, mask=M)
    parts = [grad_of(est, logp[i], old_logp=old[i], advantages=A[i], mask=M[i])[1] / 2
             for i in torch.arange(12).chunk(2)]
    assert not torch.allclose(torch.cat(parts), g_whole)


# ------------------------------------------------------------------------------------- advantages
@given(seed=st.integers(0, 10_000), G=st.integers(1, 6), n=st.integers(1, 4), real=st.booleans())
def test_advantages_match_loop_references(seed, G, n, real):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n * G, generator=g, dtype=F64) if real else torch.randint(0, 2, (n * G,), generator=g).to(F64)
    if G > 1:
        torch.testing.assert_close(adv.compute("group_norm", r, G), ref.advantages_group_norm(r, G))
        torch.testing.assert_close(adv.compute("rloo", r, G), ref.advantages_rloo(r, G))
        # RLOO = G/(G-1) * (r - mean): the identity docs/ecosystem.md section 8 lists
        torch.testing.assert_close(adv.compute("rloo", r, G), adv.compute("group_mean", r, G) * G / (G - 1))
    torch.testing.assert_close(adv.compute("group_mean", r, G), ref.advantages_group_mean(r, G))


@given(value=st.floats(-1e6, 1e6, allow_nan=False), G=st.integers(1, 9),
       name=st.sampled_from(["group_mean", "group_norm", "group_center_batch_std_trl",
                             "group_center_token_whiten_verl", "rloo"]))
def test_constant_reward_group_gives_exactly_zero_advantage(value, G, name):
    r = torch.full((2 * G,), value, dtype=F64)
    r[G:] = 0.1  # a second constant group with a value whose mean is inexact in binary
    a = adv.compute(name, r, G, lengths=torch.full((2 * G,), 3.0, dtype=F64))
    if G == 1 and name in ("rloo", "group_center_token_whiten_verl"):  # verl: a singleton's baseline is 0
        if name == "rloo":
            assert torch.equal(a, r)
    else:
        assert bool((a == 0).all())


def trl_scale_rewards_batch_116(rewards, G, eps):
    """TRL 1.16 GRPOTrainer advantages with scale_rewards="batch" (one reward function, no None): the reward
    minus its group's mean, divided by (Bessel std of ALL the raw rewards of the batch + eps); a batch of one
    has std 0."""
    r = [float(x) for x in rewards]
    B = len(r)
    mean_g = [sum(r[(i // G) * G:(i // G + 1) * G]) / G for i in range(B)]
    m = sum(r) / B
    std = math.sqrt(sum((x - m) ** 2 for x in r) / B * B / (B - 1)) if B > 1 else 0.0
    return torch.tensor([(r[i] - mean_g[i]) / (std + eps) for i in range(B)], dtype=F64)


def verl_reinforce_pp_baseline_091(rewards, lengths, G, unbiased=True):
    """verl 0.9.1 compute_reinforce_plus_plus_baseline_outcome_advantage: score minus its group's mean (a group
    of one: mean 0), copied onto each valid token, then masked_whiten over all valid tokens of the batch
    (masked_mean divides by count + 1e-8, masked_var is Bessel-corrected, rsqrt(var + 1e-8)); per row, the
    value of its tokens (0 for a row without tokens)."""
    B = len(rewards)
    groups: dict[int, list[float]] = {}
    for i in range(B):
        groups.setdefault(i // G, []).append(float(rewards[i]))
    mean = {k: 0.0 if len(v) == 1 else sum(v) / len(v) for k, v in groups.items()}
    c = [float(rewards[i]) - mean[i // G] for i in range(B)]
    tokens = [c[i] for i in range(B) for _ in range(int(lengths[i]))]
    N = len(tokens)
    mu = sum(tokens) / (N + 1e-8)
    var = sum((v - mu) ** 2 for v in tokens) / (N + 1e-8)
    if unbiased:
        var = var * N / (N - 1)
    return torch.tensor([(c[i] - mu) / math.sqrt(var + 1e-8) if lengths[i] > 0 else 0.0 for i in range(B)],
                        dtype=F64)


@given(seed=st.integers(0, 10_000), G=st.integers(1, 5), n=st.integers(1, 4), real=st.booleans(),
       eps=st.sampled_from([1e-4, 1e-6, 0.0]))
def test_batch_std_advantage_matches_trl_116(seed, G, n, real, eps):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n * G, generator=g, dtype=F64) if real else torch.randint(0, 2, (n * G,), generator=g).to(F64)
    if not bool((r != r[0]).any()) and eps == 0.0:
        eps = 1e-4  # TRL divides 0 by 0 on a constant batch with eps 0; ptlab returns 0
    want = trl_scale_rewards_batch_116(r, G, eps)
    got = adv.compute("group_center_batch_std_trl", r, G, std_eps=eps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 10_000), G=st.integers(1, 5), n=st.integers(1, 4), real=st.booleans(),
       unbiased=st.booleans())
def test_token_whitened_advantage_matches_verl_091(seed, G, n, real, unbiased):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n * G, generator=g, dtype=F64) if real else torch.randint(0, 2, (n * G,), generator=g).to(F64)
    lengths = torch.randint(0, 9, (n * G,), generator=g).to(F64)  # ragged, some rows empty
    lengths[0] = 2.0
    want = verl_reinforce_pp_baseline_091(r, lengths, G, unbiased)
    got = adv.compute("group_center_token_whiten_verl", r, G, lengths=lengths, std_unbiased=unbiased)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batch_advantages_differ_from_group_norm_and_from_each_other():
    """The two named batch normalisations are not the same thing: on unequal lengths the token weighting
    moves the mean; the batch std of raw rewards is not the std of the centred rewards."""
    r = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0], dtype=F64)
    lengths = torch.tensor([1.0, 9.0, 2.0, 2.0, 5.0, 1.0, 3.0, 8.0], dtype=F64)
    trl = adv.compute("group_center_batch_std_trl", r, 4, std_eps=1e-4)
    verl = adv.compute("group_center_token_whiten_verl", r, 4, lengths=lengths)
    centred = adv.compute("group_mean", r, 4)
    torch.testing.assert_close(trl, centred / (r.std() + 1e-4), rtol=1e-15, atol=0)
    assert float((trl - centred / (centred.std() + 1e-4)).abs().max()) > 1e-2
    # token mean 0 (up to verl's 1e-8 in the count), row mean not
    assert abs(float((verl * lengths).sum())) < 1e-7 and abs(float(verl.mean())) > 1e-2


# ------------------------------------------------------------------------------------- degenerate inputs
@pytest.mark.parametrize("name", list(PRESETS))
def test_fully_masked_row_contributes_exactly_nothing(name):
    est = preset(name)
    logp, old, M, r, demo = make_batch(5, 2, 3, 4, est.demo_reference is not None)
    M[1] = False
    logp[1] = -math.inf  # padding garbage must not leak into the loss or the gradient
    old[1] = math.nan
    A = advantages_for(est, r, 3)
    loss, g = grad_of(est, logp, old_logp=old, advantages=A, mask=M, is_demo=demo)
    assert torch.isfinite(loss) and bool(torch.isfinite(g).all())
    assert bool((g[1] == 0).all())
    # and the other rows are unchanged by the presence of the empty row (for per-sequence means,
    # only the count of sequences S enters, which the caller controls with num_seqs)
    keep = torch.tensor([0, 2, 3, 4, 5])
    num_seqs = 6 if est.aggregation.startswith(("seq", "batch")) else None
    _, g2 = grad_of(est, logp[keep], old_logp=old[keep], advantages=A[keep], mask=M[keep],
                    is_demo=None if demo is None else demo[keep], num_seqs=num_seqs)
    torch.testing.assert_close(g[keep], g2)


@pytest.mark.parametrize("name", list(PRESETS))
def test_extreme_log_probs_give_finite_loss_and_gradient(name):
    est = preset(name)
    logp, old, M, r, demo = make_batch(9, 2, 3, 4, est.demo_reference is not None)
    logp[0] = -1e4
    old[1] = -1e4
    A = advantages_for(est, r, 3)
    loss, g = grad_of(est, logp, old_logp=old, advantages=A, mask=M, is_demo=demo)
    assert torch.isfinite(loss) and bool(torch.isfinite(g).all())


def test_one_dimensional_bandit_form():
    est = preset("grpo")
    logp = torch.log(torch.tensor([0.2, 0.5, 0.3, 0.9], dtype=F64))
    A = est.advantages(torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=F64), 4)
    w = est.coefficients(logp, advantages=A)
    assert w.shape == (4,)
    torch.testing.assert_close(w, A / 4)  # on-policy ratio 1, one token per sequence, 1/B


# ------------------------------------------------------------------------------------- bad inputs
def _err(fn, *words):
    with pytest.raises(ValueError) as e:
        fn()
    for w in words:
        assert w in str(e.value)


def test_bad_inputs_name_the_argument():
    est = preset("grpo")
    logp = -torch.rand(4, 3, dtype=F64)
    A = torch.zeros(4, dtype=F64)
    _err(lambda: est.loss(logp, old_logp=logp[:, :2], advantages=A), "old_logp", "(4, 3)")
    _err(lambda: est.loss(logp, advantages=A, mask=torch.ones(4, 2)), "mask")
    _err(lambda: est.loss(logp, advantages=A[:3]), "advantages")
    _err(lambda: est.loss(logp), "advantages")
    _err(lambda: est.loss(-logp - 0.5, advantages=A), "logp")
    _err(lambda: est.advantages(torch.zeros(5), group_size=2), "group_size", "divisible")
    _err(lambda: est.advantages(torch.zeros(4), group_size=0), "group_size")
    _err(lambda: est.advantages(torch.tensor([0.0, math.nan]), group_size=2), "rewards", "NaN")
    _err(lambda: preset("grpoo"), "preset", "grpo", "dapo")
    _err(lambda: preset("grpo", epsilon=0.1), "epsilon", "eps_high")
    _err(lambda: preset("grpo", aggregation="token-mean"), "aggregation", "token_mean")
    _err(lambda: preset("grpo", eps_low=-0.1), "eps_low")
    _err(lambda: est.loss(logp, advantages=A, is_demo=torch.ones(4, dtype=torch.bool)), "is_demo")
    _err(lambda: preset("grpo", aggregation="global_token_mean").loss(logp, advantages=A, num_items=0), "num_items")
    _err(lambda: UPGE(reference="policy", mask="ppo_clip"), "mask", "ratio")
    _err(lambda: UPGE(reference="behaviour", advantage="given", mask="none").loss(logp, advantages=A),
         "behaviour_logp")


def test_every_aggregation_is_reachable():
    for name in AGGREGATIONS:
        UPGE(reference="policy", advantage="given", mask="none", aggregation=name)


def test_preset_options_override_and_keep_name():
    est = preset("dapo", eps_low=0.1)
    assert (est.name, est.eps_low, est.eps_high) == ("dapo", 0.1, 0.28)
    assert PRESETS["dapo"].eps_low == 0.2  # the registry is not mutated


# ------------------------------------------------------------------------------ dtypes and normalisers (issue 18)
def test_half_precision_log_ratios_are_computed_in_float32():
    """dr_grpo on float16 logp=-1, old=-13, A=-1: exp(12) > float16 max, so the loss was NaN."""
    est = preset("dr_grpo")
    want = math.exp(12.0)  # the ratio; stable for A < 0 and ratio > 1 - eps; one token, S = L = 1
    for dt in (torch.float16, torch.bfloat16):
        lp = torch.tensor([[-1.0]], dtype=dt)
        kw = dict(old_logp=torch.tensor([[-13.0]], dtype=dt), advantages=torch.tensor([-1.0], dtype=dt))
        loss = est.loss(lp, **kw)
        w = est.coefficients(lp, **kw)
        assert loss.dtype == torch.float32 and w.dtype == torch.float32
        assert math.isclose(loss.item(), want, rel_tol=1e-6) and math.isclose(-w.item(), want, rel_tol=1e-6)
    # autograd still reaches the half-precision leaf (bf16 holds 1.6e5; float16 would overflow to inf)
    lp = torch.tensor([[-1.0]], dtype=torch.bfloat16, requires_grad=True)
    est.loss(lp, old_logp=torch.tensor([[-13.0]]), advantages=torch.tensor([-1.0])).backward()
    assert lp.grad.dtype == torch.bfloat16 and math.isclose(lp.grad.item(), want, rel_tol=1e-2)


def test_float32_and_float64_keep_their_dtype():
    for dt in (torch.float32, torch.float64):
        logp, old, M, r, _ = make_batch(0, 2, 3, 4)
        est = preset("grpo")
        w = est.coefficients(logp.to(dt), old_logp=old.to(dt), advantages=est.advantages(r, 3), mask=M)
        assert w.dtype == dt


@pytest.mark.parametrize("arg", ["logp", "old_logp", "behaviour_logp"])
def test_non_finite_log_probs_at_unmasked_positions_are_rejected(arg):
    """-inf at an unmasked logp gave NaN while NaN there was rejected; masked positions may hold anything."""
    est = UPGE(reference="behaviour", advantage="given", mask="ppo_clip")
    base = -torch.rand(2, 3, dtype=F64)
    M = torch.tensor([[True, True, False], [True, True, True]])
    bad_values = [math.nan, math.inf] + ([-math.inf] if arg == "logp" else [])
    for bad in bad_values:
        kw = {"logp": base.clone(), "old_logp": base.clone(), "behaviour_logp": base.clone()}
        kw[arg][0, 1] = bad
        with pytest.raises(ValueError, match=arg):
            est.loss(kw.pop("logp"), advantages=torch.ones(2, dtype=F64), mask=M, **kw)
        kw = {"logp": base.clone(), "old_logp": base.clone(), "behaviour_logp": base.clone()}
        kw[arg][0, 2] = bad  # masked: contributes exactly nothing
        logp = kw.pop("logp")
        assert torch.isfinite(est.loss(logp, advantages=torch.ones(2, dtype=F64), mask=M, **kw))
    # a reference probability of 0 is allowed: the clamp bounds the ratio
    w = est.coefficients(base, old_logp=base, behaviour_logp=torch.full((2, 3), -math.inf, dtype=F64),
                         advantages=-torch.ones(2, dtype=F64))
    assert bool(torch.isfinite(w).all())


@pytest.mark.parametrize("arg", ["num_items", "num_seqs", "max_length"])
def test_normalisers_are_validated_and_accept_any_number_type(arg):
    """inf and 1e-300 were accepted (inf or 0 weights), numpy's int64(4) was refused."""
    agg = {"num_items": "global_token_mean", "num_seqs": "seq_mean_token_sum", "max_length": "batch_token_sum_norm"}
    est = preset("grpo", aggregation=agg[arg])
    logp, old, M, r, _ = make_batch(1, 2, 2, 3)
    kw = dict(old_logp=old, advantages=est.advantages(r, 2), mask=M)
    want = est.coefficients(logp, **kw, **{arg: 4})
    for ok in (np.int64(4), np.int32(4), 4.0, np.float32(4.0), torch.tensor(4), torch.tensor(4.0)):
        assert torch.equal(est.coefficients(logp, **kw, **{arg: ok}), want), repr(ok)
    for bad in (math.inf, math.nan, 1e-300, 0, -4, True, "4", torch.ones(2)):
        with pytest.raises(ValueError, match=arg):
            est.coefficients(logp, **kw, **{arg: bad})


def test_advantages_of_extreme_float32_rewards_are_finite_and_computed_in_float64():
    """float32 rewards near 3e38 gave -inf advantages; a Python list was read as float32."""
    r = torch.tensor([3e38, -3e38, 1e38, 2e38], dtype=torch.float32)
    lengths = torch.tensor([1.0, 3.0, 2.0, 2.0])
    for name in ("raw", "group_mean", "group_norm", "group_center_batch_std_trl", "group_center_token_whiten_verl",
                 "rloo"):
        a = adv.compute(name, r, 2, lengths=lengths)
        assert a.dtype == F64 and bool(torch.isfinite(a).all()), name
        torch.testing.assert_close(a, adv.compute(name, r.double(), 2, lengths=lengths), rtol=0, atol=0)
    listed = adv.compute("group_norm", [0.1, 0.7, 0.3], 3)
    assert listed.dtype == F64
    assert torch.equal(listed, adv.compute("group_norm", torch.tensor([0.1, 0.7, 0.3], dtype=F64), 3))


def test_more_bad_options_name_the_argument():
    _err(lambda: preset([]), "preset")
    _err(lambda: preset({"grpo"}), "preset")
    _err(lambda: preset("grpo", std_unbiased="yes"), "std_unbiased")
    _err(lambda: preset("grpo", std_unbiased=None), "std_unbiased")
    _err(lambda: preset("grpo", log_ratio_clamp=math.inf), "log_ratio_clamp")
    _err(lambda: preset("grpo", max_length=2.5), "max_length")
    _err(lambda: adv.compute(["group_norm"], torch.zeros(2), 2), "advantage")
    _err(lambda: adv.compute("group_norm", ["a", "b"], 2), "rewards")
    _err(lambda: adv.compute("group_norm", torch.zeros(2), 2, std_unbiased=1), "std_unbiased")
    assert preset("hpt_code", max_length=np.int64(16)).max_length == 16
    _err(lambda: preset("grpo", clamp_gradient="none"), "clamp_gradient", "keep", "zero")
    _err(lambda: preset("grpo", count_empty_rows="no"), "count_empty_rows")
    _err(lambda: preset("grpo", count_empty_rows=None), "count_empty_rows")
    _err(lambda: preset("grpo", sequence_log_ratio_max=10.0), "sequence_log_ratio_max", "sequence_geometric")
    for bad in (-1.0, math.inf, math.nan, True, "10"):
        _err(lambda bad=bad: preset("gspo", sequence_log_ratio_max=bad), "sequence_log_ratio_max")
    assert preset("gspo", sequence_log_ratio_max=np.int64(10)).sequence_log_ratio_max == 10.0
    _err(lambda: preset("grpo", aggregation="seq-mean-token-sum-norm"), "aggregation", "token_sum_norm")
    _err(lambda: preset("grpo", advantage="batch_norm"), "advantage", "group_center_batch_std_trl",
         "group_center_token_whiten_verl")
    whiten = "group_center_token_whiten_verl"
    r4 = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=F64)
    _err(lambda: adv.compute(whiten, r4, 2), "lengths", whiten)
    _err(lambda: preset("grpo", advantage=whiten).advantages(r4, 2), "lengths", whiten)
    _err(lambda: adv.compute(whiten, r4, 2, lengths=torch.ones(3)), "lengths", "[4]")
    _err(lambda: adv.compute(whiten, r4, 2, lengths=[1.0, -1.0, 2.0, 2.0]), "lengths", ">= 0")
    _err(lambda: adv.compute(whiten, r4, 2, lengths=[1.0, math.nan, 2.0, 2.0]), "lengths")
    _err(lambda: adv.compute(whiten, r4, 2, lengths=[1.0, 0.0, 0.0, 0.0]), "lengths", "at least 2")
    _err(lambda: adv.compute(whiten, r4, 2, lengths=["a"] * 4), "lengths")
    est = preset("grpo")
    logp = -torch.rand(4, 3, dtype=F64)
    _err(lambda: est.loss(logp, advantages=["x"] * 4), "advantages")
    _err(lambda: est.loss(logp, old_logp=object(), advantages=torch.zeros(4, dtype=F64)), "old_logp")
