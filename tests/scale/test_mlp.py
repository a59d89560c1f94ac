"""run.fused_mlp (scale.mlp): the lean gated MLPs give the plain module's values and gradients (float64, 1e-12,
against autograd through the original module), keep exactly two (GatedMLP) or one (SiluMul) fewer
[tokens, intermediate] tensors for the backward (counted with saved-tensor hooks), behave under bf16 autocast,
and are switched on by the trainer, which refuses the key for a model without a gated SiLU MLP."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from scale.mlp import GatedMLP, SiluMul, fuse_gated_mlps


def _tiny(world, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world["model"], dtype=dtype)


def test_functions_equal_autograd_through_the_plain_expression():
    g = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(2, 5, 16, dtype=torch.float64, generator=g) * 3 for _ in range(2))
    weight = torch.randn(8, 16, dtype=torch.float64, generator=g)
    w_out = torch.randn(2, 5, 8, dtype=torch.float64, generator=g)
    for fn, plain, args in ((GatedMLP.apply, lambda a, b, w: F.linear(F.silu(a) * b, w), (gate, up, weight)),
                            (SiluMul.apply, lambda a, b: F.silu(a) * b, (gate, up))):
        res = []
        for f in (fn, plain):
            xs = [x.clone().requires_grad_() for x in args]
            out = f(*xs)
            w = w_out if out.shape[-1] == 8 else w_out.new_ones(out.shape)
            res.append((out.detach(), torch.autograd.grad((out * w).sum(), xs)))
        (o1, g1), (o2, g2) = res
        assert float((o1 - o2).abs().max()) <= 1e-12
        for a, b in zip(g1, g2):
            assert b.abs().max() > 1 and float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())
    # a frozen down_proj weight: no weight gradient is formed, the others are unchanged
    xs = [x.clone().requires_grad_() for x in (gate, up)]
    got = torch.autograd.grad((GatedMLP.apply(*xs, weight) * w_out).sum(), xs)
    want = torch.autograd.grad((F.linear(F.silu(xs[0]) * xs[1], weight) * w_out).sum(), xs)
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) <= 1e-12 * float(b.abs().max())


def _saved_bytes(mlp, x) -> int:
    """Bytes of the non-parameter tensors autograd keeps for the backward of mlp(x), each storage once."""
    params = {p.data_ptr() for p in mlp.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x).sum().backward()
    return sum(seen.values())


def test_fewer_activations_are_kept_and_the_model_is_unchanged(world):
    model = _tiny(world)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 7, model.config.hidden_size, dtype=torch.float64)
    one = 7 * model.config.intermediate_size * 8   # one [tokens, intermediate] float64 tensor
    plain = _saved_bytes(mlp, x)
    ids = torch.tensor([[3, 9, 4, 1, 7, 7, 2, 5]])
    w = torch.randn(1, 8, model.config.vocab_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def grads(m):
        m.zero_grad()
        out = m(input_ids=ids).logits
        (out * w).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}

    ref = grads(model)
    for take, fewer in ((True, 2), (False, 1)):
        m = _tiny(world)
        counts = fuse_gated_mlps(m, take_down_proj=take)
        n = model.config.num_hidden_layers
        assert counts == ({"fused": n, "silu_mul": 0} if take else {"fused": 0, "silu_mul": n})
        assert _saved_bytes(m.model.layers[0].mlp, x) == plain - fewer * one
        out, g = grads(m)
        assert float((out - ref[0]).abs().max()) <= 1e-12
        for k, v in ref[1].items():
            assert float((g[k] - v).abs().max()) <= 1e-12 * max(1.0, float(v.abs().max())), k


def test_bf16_autocast_matches_the_plain_module(world):
    model = _tiny(world, torch.float32)
    mlp = model.model.layers[0].mlp
    x = torch.randn(1, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    res = []
    for fuse in (False, True):
        if fuse:
            fuse_gated_mlps(model)
        mlp.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mlp(x)
        out.float().square().sum().backward()
        res.append((out, {k: p.grad for k, p in mlp.named_parameters()}))
    (o1, g1), (o2, g2) = res
    assert o1.dtype == o2.dtype == torch.bfloat16
    assert float((o1.float() - o2.float()).abs().max()) <= 1e-2 * float(o1.float().abs().max())
    for k in g1:
        assert g1[k].dtype == g2[k].dtype == torch.float32
        assert float((g1[k] - g2[k]).abs().max()) <= 2e-2 * float(g1[k].abs().max()), k


def test_the_trainer_switches_the_mlps_and_its_step_is_unchanged(world, tmp_path, monkeypatch):
    from scale import train
    from tests.scale.test_invariance import _cases
    from tests.scale.test_packing import _run, _trainer

    got = {}
    for fused in (False, True):
        tr = _trainer(world, 2, tmp_path / str(fused), **({"run.fused_mlp": True} if fused else {}))
        mlp = tr._model().model.layers[0].mlp
        assert ("forward" in vars(mlp)) == fused   # the lean forward is set on the instance
        got[fused] = _run(tr, [_cases(tr)[2]], ["plain"])[("grpo", "plain")]
    (l0, g0), (l1, g1) = got[False], got[True]
    assert float(g0.abs().max()) > 1e-4
    assert abs(l1 - l0) <= 1e-12 and float((g1 - g0).abs().max()) <= 1e-12
    # an engine that shards weights keeps down_proj: SiluMul only
    model = _tiny(world)
    fake = SimpleNamespace(_zero3=lambda: True, acc=SimpleNamespace(state=SimpleNamespace()))
    train.Trainer._fuse_mlps(fake, model)
    assert "forward" in vars(model.model.layers[0].mlp)
    assert model.model.layers[0].mlp.forward.__func__.__name__ == "_silu_mul_forward"
    monkeypatch.setattr(train, "fuse_gated_mlps", lambda model, take_down_proj: {"fused": 0, "silu_mul": 0})
    with pytest.raises(ValueError, match="run.fused_mlp: .* has no gated SiLU MLP"):
        _trainer(world, 1, tmp_path / "none", **{"run.fused_mlp": True})


def test_a_model_without_gated_mlps_is_left_alone():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    assert fuse_gated_mlps(model) == {"fused": 0, "silu_mul": 0}
