"""The convex instance beside the XRIGHT miniature: tangent features against forward-mode autograd and HF's own
loss, the instance's structure, the verdict rule on hand-made numbers, and the figure built from synthetic
features and a synthetic measured record (the real features need the world's base model: a slow figure)."""

import json

import numpy as np
import pytest
import torch

from experiments import fig_xright_convex as fc
from toy.tiny import make_model, make_tokenizer

PROMPTS = ["What is 12 + 7?\n", "What is 40 - 3?\n", "What is 5 + 6 + 1?\n"]
COMPLETIONS = ["The answer is \\boxed{19}.", "40 - 3 = 37. The answer is \\boxed{37}.", "The answer is \\boxed{12}."]


@pytest.fixture(scope="module")
def tiny():
    tok = make_tokenizer()
    return make_model(tok, hidden_size=32, intermediate_size=64).double().eval(), tok


def test_directions_are_seeded_unit_columns(tiny):
    model, _ = tiny
    r = fc.directions(model, d=5)
    assert r.shape == (sum(p.numel() for p in model.parameters()), 5)
    assert torch.allclose(r.norm(dim=0), torch.ones(5, dtype=torch.float64))
    assert torch.equal(r, fc.directions(model, d=5)) and not torch.equal(r, fc.directions(model, d=5, seed=1))


def test_tangent_features_match_forward_mode_autograd_and_cross_entropy(tiny):
    from scale.data import tokenize_pairs

    model, tok = tiny
    dirs = fc.directions(model, d=3)
    feats = fc.tangent_features(model, tok, PROMPTS, COMPLETIONS, dirs)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    w0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    rows = tokenize_pairs(PROMPTS, COMPLETIONS, tok, fc.MAX_LENGTH)

    def loglik(flat, row):   # summed cross-entropy of the completion tokens (HF's own loss upcasts to float32)
        split = dict(zip(names, torch.split(flat, [params[n].numel() for n in names])))
        shaped = {n: split[n].view_as(params[n]) for n in names}
        logits = torch.func.functional_call(model, shaped, (torch.tensor([row["input_ids"]]),)).logits[0, :-1]
        return -torch.nn.functional.cross_entropy(logits, torch.tensor(row["labels"][1:]), reduction="sum")

    with torch.no_grad():
        for i, row in enumerate(rows):
            assert feats[i, -1] == pytest.approx(loglik(w0, row).item(), rel=1e-12)
    # forward mode has no rule for sdpa's kernel; eager attention takes its softmax in float32, hence rel 1e-6
    model.set_attn_implementation("eager")
    try:
        for i, row in enumerate(rows):
            for k in range(3):
                _, jvp = torch.func.jvp(lambda w, row=row: loglik(w, row), (w0,), (dirs[:, k],))
                assert feats[i, k] == pytest.approx(jvp.item(), rel=1e-6, abs=1e-9)
    finally:
        model.set_attn_implementation("sdpa")


def _feats(rng, n, d=4, shift=0.0):
    return {"terse": rng.normal(size=(n, d + 1)) + shift, "worked": rng.normal(size=(n, d + 1))}


def test_problem_structure_and_reference_is_the_renormalised_base():
    rng = np.random.default_rng(0)
    sft, pref = _feats(rng, 3), _feats(rng, 2)
    p = fc.problem(sft, pref)
    assert p.phi.shape == (5, 2, 5) and p.S[:3, 0].sum() == pytest.approx(1) and p.S[:, 1].sum() == 0
    assert p.P[3:, 1, 0].sum() == pytest.approx(1) and p.P[:3].sum() == 0 and p.P[:, 0, 1].sum() == 0
    base = np.stack([np.concatenate([sft[s], pref[s]])[:, -1] for s in ("terse", "worked")], axis=1)
    ref = base - np.logaddexp(base[:, :1], base[:, 1:])
    assert np.allclose(p.log_policy(p.theta_ref), ref)
    assert p.f_dpo(p.theta_ref) == pytest.approx(np.log(2))      # zero margins at the reference


def test_schedules_follow_the_miniature_configs():
    f_star = {"sft": 0.1, "dpo": 0.2}
    seq = fc.schedule("seq_sft_dpo", 0.25, 1, f_star)
    assert [seq.weights(t)["sft"] for t in (0, 149)] == [1.0, 1.0] and seq.weights(150)["dpo"] == 1.0
    seq = fc.schedule("seq_dpo_sft", 0.25, 1, f_star)
    assert seq.weights(49)["dpo"] == 1.0 and seq.weights(50)["sft"] == 1.0
    assert fc.schedule("maxright_k10", 0.5, 1, f_star).k == 10
    with pytest.raises(ValueError, match="method"):
        fc.schedule("nope", 0.5, 1, f_star)


def _cells(fn):
    return {(m, lam): fn(i, j) for i, m in enumerate(fc.METHODS) for j, lam in enumerate(fc.LAMS)}


def test_convex_verdict_reaches_every_outcome():
    meas = _cells(lambda i, j: 1.0 + i + 0.1 * j)          # seq_sft_dpo best everywhere, then seq_dpo_sft, ...
    assert fc.convex_verdict(meas, meas)[0] == "yes"
    flipped = _cells(lambda i, j: 10.0 - i - 0.1 * j)       # instance ranks in reverse
    held, claims = fc.convex_verdict(flipped, meas)
    assert held == "no" and claims["spearman"] < 0 and claims["agrees_at"] == []
    # same ranking except that the instance's best is the measured third at every lam
    third_first = _cells(lambda i, j: 1.0 + i + 0.1 * j if i != 2 else 0.5)
    held, claims = fc.convex_verdict(third_first, meas)
    assert held == "partly" and claims["B_spearman_at_least_0.5"] and not claims["A_best_agrees_at_2_lams"]


def test_measured_reads_the_tradeoff_record_and_names_it_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="xright_tradeoff"):
        fc.measured(tmp_path)
    _record(tmp_path)
    got = fc.measured(tmp_path)
    assert got[("mix", 0.5)] == {1: 2.0, 2: 2.0, 3: 2.0}


def _record(out, value=lambda m, lam: 1.0 + fc.METHODS.index(m) * lam):
    (out / "meta").mkdir(exist_ok=True)
    rec = {"extra": {"ideal_distance": {f"{m}@{lam}": {str(s): value(m, lam) for s in fc.SEEDS}
                                        for m in fc.METHODS for lam in fc.LAMS}}}
    (out / "meta" / "xright_tradeoff.json").write_text(json.dumps(rec))


def test_figure_builds_from_synthetic_features(tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "STEPS", 20)
    rng = np.random.default_rng(1)
    feats = {k: _feats(rng, 12, shift=0.5) for k in fc.SETS}
    _record(tmp_path)
    res = fc.build(tmp_path, feats)
    assert res.held in ("yes", "partly", "no") and (tmp_path / "xright_convex.png").exists()
    table = (tmp_path / "xright_convex.md").read_text()
    assert "Theorem 1" in table and "Theorem 2" in table
    assert set(res.extra["instance_distance"]) == {f"{m}@{lam}" for m in fc.METHODS for lam in fc.LAMS}
    assert all(np.isfinite(v) for v in res.extra["instance_distance"].values())
