"""run.skip_zero_advantage: RL samples whose advantage is exactly 0 leave the forward and backward, and the step
is the same: loss, gradient and logged statistics equal the step over every row to 1e-12 in float64 (tiny
model), padded and packed, with and without the entropy logged, on- and off-policy. A control shows the
comparison can fail: leaving the samples out of the normalisers too changes the gradient. The key is refused
where a term acts on a sample whatever its advantage."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.scale.conftest import base_overrides
from tests.scale.test_invariance import _cases, _recording
from tests.scale.test_packing import _norm_in_float64, _trainer

ALLOWED = ("grpo", "dr_grpo", "verl_norm_nonempty", "hpt_paper+sft_token")   # no KL in the loss, no bonus


def _with_zero_groups(units):
    """The case's units with every other prompt's samples at advantage 0 (a group whose rewards were equal)."""
    units = copy.deepcopy(units)
    for j, u in enumerate(units):
        for rw in u:
            if j % 2 == 0 and rw.kind == "rl":
                rw.advantage = 0.0
    return units


def _step(tr, units, terms, extra, skip: bool, init: dict, old_shift: float | None = None):
    """(metrics, gradient) of one update from `init`; old_shift: give every RL row old log-probs (its current
    ones shifted by this), so that ratios differ from 1 and some tokens clip."""
    with torch.no_grad():
        for k, v in tr.policy.named_parameters():
            v.copy_(init[k])
    tr.terms = terms
    tr.cfg.run.skip_zero_advantage = skip
    rows = [rw for u in units for rw in u]
    tr.updates_per_step = 1 if old_shift is None else 2   # what the trainer reads: old log-probs are set
    if old_shift is not None:
        rl = [rw for rw in rows if rw.kind == "rl"]
        tr.fill_old_logps(rl)
        for i, rw in enumerate(rl):
            rw.old_logp = [v + old_shift * (-1) ** (i + t) for t, v in enumerate(rw.old_logp)]
    box = {}
    step = tr.opt.optimizer.step
    tr.opt.optimizer.step = _recording(tr, box, step)
    try:
        m = tr.update(rows, extra)
    finally:
        tr.opt.optimizer.step = step
    return m, box["g"]


@pytest.mark.parametrize("mode", ["padded", "shared"])
def test_skipping_zero_advantage_samples_keeps_the_step(world, tmp_path, monkeypatch, mode):
    from scale import train

    run = {}
    if mode == "shared":   # regrouped rows sum a shared prompt's gradient in another order: float64 norms
        _norm_in_float64(monkeypatch)
        run = {"run.padding_free": True, "run.share_prefix": True}
    tr = _trainer(world, 3, tmp_path / "t", **run)
    init = {k: v.detach().clone() for k, v in tr.policy.named_parameters()}
    forwards = []
    real = train.policy_logps
    monkeypatch.setattr(train, "policy_logps", lambda m, mb, *a, **k: forwards.append(
        (torch.is_grad_enabled(), mb["input_ids"].shape[0])) or real(m, mb, *a, **k))
    cases = {name: (units, terms, extra) for name, units, terms, extra in _cases(tr)}
    for name in ALLOWED:
        units, terms, extra = cases[name]
        units = _with_zero_groups(units)
        n_zero = sum(rw.kind == "rl" and rw.advantage == 0.0 for u in units for rw in u)
        assert n_zero >= 8
        for entropy_every, old_shift in ((1, None), (2, None), (1, 0.3)):
            tr.cfg.run.entropy_every = entropy_every
            tr.step = 0   # logged when (step + 1) % entropy_every == 0: not with 2
            m0, g0 = _step(tr, units, terms, extra, False, init, old_shift)
            forwards.clear()
            m1, g1 = _step(tr, units, terms, extra, True, init, old_shift)
            trained = sum(n for grad, n in forwards if grad)
            scale = float(g0.abs().max())
            assert scale > 1e-4, name
            assert float((g1 - g0).abs().max()) <= 1e-12 * max(1.0, scale), name
            assert m1.keys() == m0.keys(), name
            for k in m0:
                if k not in ("grad_norm",):
                    assert m1[k] == pytest.approx(m0[k], rel=1e-12, abs=1e-12), (name, k, m1[k], m0[k])
            assert m1["grad_norm"] == pytest.approx(m0["grad_norm"], rel=1e-12)
            assert trained <= sum(len(u) for u in units) - n_zero + 3, (name, forwards)   # 3: placeholder rows
            # the left-out rows' forward (no gradient) runs only where their statistics need log-probs
            logged_or_off = entropy_every == 1 or old_shift is not None
            assert any(not grad for grad, _ in forwards) == logged_or_off, (name, forwards)
    tr.cfg.run.entropy_every = 1


def test_control_leaving_the_samples_out_of_the_counts_changes_the_gradient(world, tmp_path):
    """Dropping the zero-advantage samples from the batch (their tokens no longer normalise) is a different
    step: the comparison above would catch a trainer that did that."""
    tr = _trainer(world, 3, tmp_path / "c")
    init = {k: v.detach().clone() for k, v in tr.policy.named_parameters()}
    units, terms, extra = {n: (u, t, e) for n, u, t, e in _cases(tr)}["grpo"]
    units = _with_zero_groups(units)
    _, g0 = _step(tr, units, terms, extra, False, init)
    kept = [[rw for rw in u if rw.advantage != 0.0] for u in units]
    _, g1 = _step(tr, [u for u in kept if u], terms, extra, False, init)
    assert float((g1 - g0).abs().max()) > 1e-3 * float(g0.abs().max())


@pytest.mark.parametrize("extra, needle", [
    (["method.rl.kl_coef=0.1", "method.rl.kl_placement=loss"], "KL term"),
    (["method.rl.entropy_coef=0.01"], "entropy bonus"),
])
def test_refused_where_a_term_acts_on_every_sample(world, tmp_path, extra, needle):
    from scale.config import load_config
    from scale.train import Trainer

    ov = base_overrides(world, "rl", "rl", tmp_path / "r") + ["run.skip_zero_advantage=true", "run.cpu=true", *extra]
    with pytest.raises(ValueError, match=f"run.skip_zero_advantage: .*{needle}"):
        Trainer(load_config(None, ov))


def test_refused_without_rl_samples_and_with_datareg(world, tmp_path):
    from scale.config import load_config
    from scale.train import Trainer

    ov = base_overrides(world, "sft", "sft", tmp_path / "s") + ["run.skip_zero_advantage=true", "run.cpu=true"]
    with pytest.raises(ValueError, match="run.skip_zero_advantage: method 'sft' samples no RL"):
        Trainer(load_config(None, ov))
    with pytest.raises(ValueError, match="run.skip_zero_advantage: not available with datareg"):
        load_config(None, [f"model.path={world['model']}", f"data.path={world['rl']}", "method.name=rl",
                           "run.skip_zero_advantage=true", "datareg.update_rule=target_only", "datareg.target=file",
                           f"datareg.target_path={world['sft']}", f"run.output_dir={tmp_path}"]).validate()


def test_in_every_preset_a_zero_advantage_sample_has_zero_gradient():
    """What the key relies on, for every estimator preset (KL term off, as the trainer requires): the loss's
    gradient with respect to a sample's log-probs is exactly 0 when its advantage is 0, on- and off-policy
    (ratios away from 1), while on-policy the other samples' is not (GSPO-style clips hold every ratio off-policy)."""
    from scale.loss import rl_estimator
    from theory.estimator import PRESETS

    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    mask = torch.ones(B, T, dtype=torch.bool)
    for name in PRESETS:
        est = rl_estimator(name, max_new_tokens=T).replace(kl_coef=0.0)
        for shift in (0.0, 0.1):
            logp = (-3 * torch.rand(B, T, generator=g, dtype=torch.float64)).requires_grad_()
            old = logp.detach() + shift * torch.randn(B, T, generator=g, dtype=torch.float64)
            A = torch.randn(B, generator=g, dtype=torch.float64)
            A[::2] = 0.0
            loss = est.loss(logp, old_logp=old, advantages=A, mask=mask, num_items=float(B * T), num_seqs=float(B))
            (grad,) = torch.autograd.grad(loss, logp)
            assert bool((grad[::2] == 0).all()), (name, shift)
            assert shift or float(grad[1::2].abs().max()) > 0, name
