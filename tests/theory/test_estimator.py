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
            agg = {"token_mean": 1 / n_tok, "global_token_mean": 1 / n_tok,
                   "seq_mean_token_mean": 1 / (B * len(rows[i])), "seq_mean_token_sum": 1 / B,
                   "seq_mean_token_sum_norm": 1 / L, "batch_token_sum_norm": 1 / (B * L)}[est.aggregation]
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


def verl_agg(loss_mat, M, mode, L=None):
    """verl's agg_loss formulas (docs/ecosystem.md section 2.4), single process, local counts."""
    Mf = M.to(F64)
    if mode == "token_mean":
        return (loss_mat * Mf).sum() / Mf.sum()
    seq_sum = (loss_mat * Mf).sum(-1)
    if mode == "seq_mean_token_mean":
        return (seq_sum / Mf.sum(-1)).mean()
    if mode == "seq_mean_token_sum":
        return seq_sum.mean()
    if mode == "seq_mean_token_sum_norm":
        return (loss_mat * Mf).sum() / (L or M.shape[1])
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                  "seq_mean_token_sum_norm"])
def test_aggregations_match_verl(mode):
    logp, _, M, _, _ = make_batch(3, 2, 3, 7)
    A = torch.linspace(-1, 1, 6, dtype=F64)
    est = UPGE(reference="policy", advantage="given", mask="none", aggregation=mode)
    loss_mat = -A[:, None] * logp  # the per-token loss of this estimator
    torch.testing.assert_close(est.loss(logp, advantages=A, mask=M), verl_agg(loss_mat, M, mode))
    est_L = est.replace(max_length=16)
    if mode == "seq_mean_token_sum_norm":
        torch.testing.assert_close(est_L.loss(logp, advantages=A, mask=M), verl_agg(loss_mat, M, mode, L=16))


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
       name=st.sampled_from(["group_mean", "group_norm", "batch_norm", "rloo"]))
def test_constant_reward_group_gives_exactly_zero_advantage(value, G, name):
    r = torch.full((2 * G,), value, dtype=F64)
    r[G:] = 0.1  # a second constant group with a value whose mean is inexact in binary
    a = adv.compute(name, r, G)
    if name == "rloo" and G == 1:  # no other sample to leave out: baseline 0 (verl's convention)
        assert torch.equal(a, r)
    else:
        assert bool((a == 0).all())


def test_batch_norm_uses_batch_std():
    r = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], dtype=F64)
    centred = ref.advantages_group_mean(r, 4)
    torch.testing.assert_close(adv.compute("batch_norm", r, 4), centred / (centred.std() + 1e-6))


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
    for name in ("raw", "group_mean", "group_norm", "batch_norm", "rloo"):
        a = adv.compute(name, r, 2)
        assert a.dtype == F64 and bool(torch.isfinite(a).all()), name
        torch.testing.assert_close(a, adv.compute(name, r.double(), 2), rtol=0, atol=0)
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
    est = preset("grpo")
    logp = -torch.rand(4, 3, dtype=F64)
    _err(lambda: est.loss(logp, advantages=["x"] * 4), "advantages")
    _err(lambda: est.loss(logp, old_logp=object(), advantages=torch.zeros(4, dtype=F64)), "old_logp")
