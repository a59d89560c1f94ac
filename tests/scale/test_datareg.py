"""scale.datareg against a reference that materialises per-sample gradients (a loop of autograd calls).

A float64 tiny Qwen2; a general batch of SFT rows of different lengths (so the token weights differ and the
top-k rule is the weighted lmo); a target set of two examples. The reference builds G (rows: each sample's
own token-mean gradient over the hooked parameters) and g (the target gradient) and applies
``theory.projection.lmo`` / ``project`` over ``Product`` of per-group sets; the engine's ``.grad`` must
equal it to 1e-5 (relative to the update's scale).

Also the worker of the two-process test: ``torchrun --nproc_per_node 2 tests/scale/test_datareg.py OUT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scale.datareg import DataReg, DataRegConfig, hookable_layers, make_groups
from tests.scale.conftest import base_overrides, read_metrics
from theory import projection as tp

ROOT = Path(__file__).resolve().parents[2]
N_GEN = 6


def build_world(seed: int = 0, tie: bool = True):
    """(model, general rows, target rows); a row is (ids [T], scored mask [T])."""
    from toy.tasks import make_examples, make_mixed
    from toy.tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model(tok, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=24,
                       seed=seed, tie_embeddings=tie).double()

    def rows(exs):
        out = []
        for e in exs:
            p = tok(e["prompt"])["input_ids"]
            c = tok(e["completion"])["input_ids"] + [tok.eos_token_id]
            ids = torch.tensor(p + c)
            mask = torch.zeros(len(ids), dtype=torch.bool)
            mask[len(p):] = True
            out.append((ids, mask))
        return out

    return model, rows(make_mixed(N_GEN, (1, 2, 3, 4), seed=seed)), rows(make_examples(2, 5, seed=seed))


def nll_sum(model, rows) -> torch.Tensor:
    """Sum over scored tokens of -log p (right padding)."""
    return nll_rows(model, rows).sum()


def nll_rows(model, rows) -> torch.Tensor:
    """Per row: the sum over its scored tokens of -log p, from one forward of all rows (right padding)."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    sc = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (x, m) in enumerate(rows):
        ids[i, :len(x)], att[i, :len(x)], sc[i, :len(x)] = x, 1, m
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(lp * sc[:, 1:]).sum(1)


def tokens(rows) -> torch.Tensor:
    return torch.tensor([float(m.sum()) for _, m in rows], dtype=torch.float64)


def closures(model, gen, tgt):
    W = float(tokens(gen).sum())

    def general_loss(sel):
        part = gen if sel is None else [gen[i] for i in sel.tolist()]
        return nll_sum(model, part) / W

    def target_loss():
        return nll_sum(model, tgt) / float(tokens(tgt).sum())

    return general_loss, target_loss


def hooked_params(model):
    return [p for m in hookable_layers(model).values() for p in (m.weight, getattr(m, "bias", None)) if p is not None]


def flat_grad(params, loss) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def reference(model, gen, tgt):
    """(G [n, d] per-sample token-mean gradients, g [d] target gradient, w [n]) over the hooked params."""
    params = hooked_params(model)
    G = torch.stack([flat_grad(params, nll_sum(model, [r]) / float(r[1].sum())) for r in gen])
    g = flat_grad(params, nll_sum(model, tgt) / float(tokens(tgt).sum()))
    return G.numpy(), g.numpy(), tokens(gen).numpy()


def coordinate_groups(model, groups):
    """Flat-vector index arrays of each group (layers in hooked order, weight then bias)."""
    mods = hookable_layers(model)
    starts, o = {}, 0
    for name, m in mods.items():
        size = sum(p.numel() for p in (m.weight, getattr(m, "bias", None)) if p is not None)
        starts[name] = np.arange(o, o + size)
        o += size
    return [np.concatenate([starts[n] for n in g]) for g in groups]


def engine_grads(model, cfg, gen, tgt, target="set"):
    """Run one engine step from zero gradients; returns (hooked flat grad, {name: grad} of all, info)."""
    model.zero_grad(set_to_none=True)
    eng = DataReg(model, cfg)
    try:
        general_loss, target_loss = closures(model, gen, tgt)
        info = eng.step(general_loss, tokens(gen), "batch" if target == "batch" else target_loss)
    finally:
        eng.close()
    flat = torch.cat([p.grad.reshape(-1) for p in hooked_params(model)])
    return flat.numpy(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, info, eng


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, gen, tgt = build_world()
    G, g, w = reference(model, gen, tgt)
    return {"model": model, "gen": gen, "tgt": tgt, "G": G, "g": g, "w": w}


def close(a, b, tol=1e-5):
    scale = max(1.0, float(np.abs(b).max()))
    return float(np.abs(a - b).max()) <= tol * scale


@pytest.mark.parametrize("rule,grouping,k", [("global_subset", "", 3), ("blockwise_subset", "", 2),
                                             ("layerwise_subset", "", 3), ("layerwise_subset", "sublayer", 1)])
def test_subset_rules_equal_lmo_per_group(tiny, rule, grouping, k):
    model, G, g, w = tiny["model"], tiny["G"], tiny["g"], tiny["w"]
    assert len(set(w.tolist())) > 1, "lengths must differ so the weighted lmo is exercised"
    cfg = DataRegConfig(update_rule=rule, k=k, groups=grouping)
    got, _, info, eng = engine_grads(model, cfg, tiny["gen"], tiny["tgt"])
    grp = coordinate_groups(model, eng.groups)
    want = tp.lmo(g, tp.Product([tp.SubsetAverages(G[:, q], k, weights=w) for q in grp], grp))
    assert close(got, want), float(np.abs(got - want).max())
    # the selected sets are the theory's subsets
    for q, sel in zip(grp, sorted_by_group(eng, info)):
        assert list(sel) == tp.SubsetAverages(G[:, q], k, weights=w).select(g[q]).tolist()
    # not the trivial update: per-group subsets differ somewhere for the layer-wise rule
    if rule == "layerwise_subset" and grouping == "":
        assert len({tuple(s) for s in info["selected"]}) > 1


def sorted_by_group(eng, info):
    """info['selected'] is in backward order of group completion; map it back to group order."""
    return [eng.selected[q].tolist() for q in range(len(eng.groups))]


def test_unhooked_parameters_keep_the_ordinary_gradient(tiny):
    model = tiny["model"]
    _, grads, _, _ = engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=2), tiny["gen"],
                                  tiny["tgt"])
    model.zero_grad(set_to_none=True)
    general_loss, _ = closures(model, tiny["gen"], tiny["tgt"])
    general_loss(None).backward()
    hooked = {id(p) for p in hooked_params(model)}
    checked = 0
    for name, p in model.named_parameters():
        if id(p) not in hooked:
            assert torch.allclose(grads[name], p.grad, rtol=0, atol=1e-12), name
            checked += 1
    assert checked >= 5  # norms and the (tied) embedding


def test_released_rule_and_filtering_and_random(tiny):
    model, G, g, w = tiny["model"], tiny["G"], tiny["g"], tiny["w"]
    got, _, _, eng = engine_grads(model, DataRegConfig(update_rule="global_subset", k=3, selection="released"),
                                  tiny["gen"], tiny["tgt"])
    S = tp.SubsetAverages(G, 3, weights=w)
    assert close(got, S.average(S.released_rule(g)))
    got, _, _, eng = engine_grads(model, DataRegConfig(update_rule="layerwise_subset",
                                                       selection="negative_filtering"), tiny["gen"], tiny["tgt"])
    grp = coordinate_groups(model, eng.groups)
    want, dropped = np.zeros_like(got), 0
    for q in grp:
        want[q], keep = tp.negative_filtering(g[q], G[:, q], 1.0, weights=w)
        dropped += int((~keep).sum())
    assert dropped > 0, "some layer should drop a sample here, else the filter is not exercised"
    assert close(got, want)
    a, _, ia, _ = engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=2, selection="random", seed=3),
                               tiny["gen"], tiny["tgt"])
    b, _, ib, _ = engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=2, selection="random", seed=3),
                               tiny["gen"], tiny["tgt"])
    assert ia["selected"] == ib["selected"] and np.array_equal(a, b)


@pytest.mark.parametrize("name", ["hull", "cone", "subset", "agem"])
def test_projection_rule_equals_project(tiny, name):
    model, G, g, w = tiny["model"], tiny["G"], tiny["g"], tiny["w"]
    cfg = DataRegConfig(update_rule="projection", projection_set=name, groups="block", k=2)
    got, _, _, eng = engine_grads(model, cfg, tiny["gen"], tiny["tgt"])
    grp = coordinate_groups(model, eng.groups)
    make = {"hull": tp.Hull, "cone": tp.Cone, "subset": lambda A: tp.SubsetAverages(A, 2, weights=w),
            "agem": lambda A: tp.HalfSpace(w @ A / w.sum())}[name]
    want = tp.project(g, tp.Product([make(G[:, q]) for q in grp], grp))
    assert close(got, want), float(np.abs(got - want).max())


@pytest.mark.parametrize("rule,mode", [("layerwise_subset", "one_pass"), ("global_subset", "two_pass")])
def test_accumulation_selects_per_micro_batch(tiny, rule, mode):
    """Two micro-batches of one optimizer step: each selects among its own samples, its update is weighted by
    its share of the batch, the target is captured once."""
    model, G, g, w = tiny["model"], tiny["G"], tiny["g"], tiny["w"]
    W, halves, calls = float(w.sum()), [np.arange(0, 3), np.arange(3, N_GEN)], []
    _, target_loss = closures(model, tiny["gen"], tiny["tgt"])
    model.zero_grad(set_to_none=True)
    eng = DataReg(model, DataRegConfig(update_rule=rule, k=2, subset_mode=mode))
    try:
        for j, idx in enumerate(halves):
            part = [tiny["gen"][i] for i in idx]

            def general_loss(sel, part=part):
                return nll_sum(model, part if sel is None else [part[i] for i in sel.tolist()]) / W

            eng.step(general_loss, tokens(part), lambda: calls.append(1) or target_loss(), new_target=j == 0)
    finally:
        eng.close()
    got = torch.cat([p.grad.reshape(-1) for p in hooked_params(model)]).numpy()
    grp = coordinate_groups(model, eng.groups)
    want = sum(w[idx].sum() / W * tp.lmo(g, tp.Product([tp.SubsetAverages(G[idx][:, q], 2, weights=w[idx])
                                                        for q in grp], grp)) for idx in halves)
    assert len(calls) == 1 and close(got, want), float(np.abs(got - want).max())


@pytest.mark.parametrize("rule,k", [("layerwise_subset", 3), ("global_subset", 2)])
def test_merged_target_rows_equal_a_separate_target_pass(tiny, rule, k):
    """The target rows appended to the general batch (one forward and backward) give the same selection and
    update as a separate target pass, un-hooked parameters included (they keep the general rows' gradient)."""
    model, gen, tgt = tiny["model"], tiny["gen"], tiny["tgt"]
    W, WT = float(tokens(gen).sum()), float(tokens(tgt).sum())
    want, gw, iw, _ = engine_grads(model, DataRegConfig(update_rule=rule, k=k), gen, tgt)

    def merged_loss(sel):
        r = nll_rows(model, gen + tgt)
        return r[:len(gen)].sum() / W + r[len(gen):].sum() / WT

    model.zero_grad(set_to_none=True)
    eng = DataReg(model, DataRegConfig(update_rule=rule, k=k))
    try:
        info = eng.step(merged_loss, tokens(gen), None, merged=len(tgt))
    finally:
        eng.close()
    got = {name: p.grad for name, p in model.named_parameters()}
    assert info["selected"] == iw["selected"]
    assert len(eng.others) >= 5  # norms and the tied embedding / head
    for name, g in gw.items():
        assert torch.allclose(got[name], g, rtol=1e-9, atol=1e-12), name
    eng = DataReg(model, DataRegConfig(update_rule="full"))
    try:
        with pytest.raises(ValueError, match="merged"):
            eng.step(merged_loss, tokens(gen), None, merged=2)
    finally:
        eng.close()


def test_new_target_needs_a_first_capture(tiny):
    model = tiny["model"]
    general_loss, target_loss = closures(model, tiny["gen"], tiny["tgt"])
    eng = DataReg(model, DataRegConfig(update_rule="layerwise_subset", k=2))
    try:
        with pytest.raises(ValueError, match="new_target"):
            eng.step(general_loss, tokens(tiny["gen"]), target_loss, new_target=False)
    finally:
        eng.close()


def test_two_pass_equals_one_pass_on_hooked_layers(tiny):
    model = tiny["model"]
    one, g1, i1, _ = engine_grads(model, DataRegConfig(update_rule="global_subset", k=3), tiny["gen"], tiny["tgt"])
    two, g2, i2, _ = engine_grads(model, DataRegConfig(update_rule="global_subset", k=3, subset_mode="two_pass"),
                                  tiny["gen"], tiny["tgt"])
    assert i1["selected"] == i2["selected"]
    assert close(two, one, 1e-9)
    # un-hooked parameters: the subset's own gradient in two-pass (GREATS), the full batch's in one-pass
    sel = torch.tensor(i2["selected"][0])
    model.zero_grad(set_to_none=True)
    part = [tiny["gen"][i] for i in sel.tolist()]
    (nll_sum(model, part) / float(tokens(part).sum())).backward()
    norm = "model.norm.weight"
    assert torch.allclose(g2[norm], dict(model.named_parameters())[norm].grad, atol=1e-12)
    assert not torch.allclose(g1[norm], g2[norm], atol=1e-9)


def test_exact_and_identity_sketch_agree(tiny):
    model = tiny["model"]
    ex, _, ie, eng_e = engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=3), tiny["gen"],
                                    tiny["tgt"])
    sk, _, isk, eng_s = engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=3, scoring="sketched",
                                                          sketch_rank=64), tiny["gen"], tiny["tgt"])
    assert isk["scoring"] == {"sketched": len(eng_s.layers)}
    for a, b in zip(eng_e.scores, eng_s.scores):  # rank >= every dimension: the sketch is the identity
        assert np.array_equal(np.argsort(a.numpy()), np.argsort(b.numpy()))
        assert torch.allclose(a, b, rtol=1e-10, atol=0)
    assert ie["selected"] == isk["selected"] and close(sk, ex, 1e-10)


def test_random_sketch_ranks_like_exact(tiny):
    """A genuine rank-4 Gaussian sketch (dims 16-24): scores correlate with the exact ones (fixed seed)."""
    from scipy.stats import spearmanr

    model = tiny["model"]
    _, _, _, eng_e = engine_grads(model, DataRegConfig(update_rule="global_subset", k=3), tiny["gen"], tiny["tgt"])
    rhos = []
    for seed in range(4):
        _, _, _, eng_s = engine_grads(model, DataRegConfig(update_rule="global_subset", k=3, scoring="sketched",
                                                           sketch_rank=8, seed=seed), tiny["gen"], tiny["tgt"])
        rhos.append(spearmanr(eng_e.scores[0].numpy(), eng_s.scores[0].numpy())[0])
    assert np.mean(rhos) > 0.5, rhos


def test_exact_forms_agree(tiny):
    """The two exact forms, ghost (target factors) and matrix (explicit G_T), give the same scores."""
    model = tiny["model"]
    run = {}
    for form in ("ghost", "matrix"):
        _, _, info, eng = engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=3, scoring=form),
                                       tiny["gen"], tiny["tgt"])
        assert info["scoring"] == {form: len(eng.layers)}
        run[form] = (eng.scores, info["selected"])
    for a, b in zip(run["ghost"][0], run["matrix"][0]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    assert run["ghost"][1] == run["matrix"][1]


def test_auto_uses_the_cost_model():
    eng = DataReg.__new__(DataReg)
    eng.cfg = DataRegConfig(update_rule="layerwise_subset", scoring="auto", sketch_rank=64)
    assert eng._method(64, 64, 1000) == "matrix"        # identity sketch: nothing to save; ghost 1000*128 > 64^2
    assert eng._method(128, 64, 1000) == "matrix"       # 128*64 + 64*64 > 128*64
    assert eng._method(1024, 1024, 1000) == "sketched"  # 2*1024*64 + 64^2 << 1024^2, ghost 2048*1000
    assert eng._method(1024, 1024, 8) == "ghost"        # 8 target tokens: 8*2048 < sketch
    assert eng._method(1024, 1024, None) == "sketched"  # a batch target has no factors to keep
    eng.cfg = DataRegConfig(update_rule="layerwise_subset", scoring="exact")
    assert eng._method(1024, 1024, 100) == "ghost" and eng._method(1024, 1024, 1000) == "matrix"
    eng.cfg = DataRegConfig(update_rule="layerwise_subset", scoring="ghost")
    with pytest.raises(ValueError, match="datareg.scoring"):
        eng._method(64, 64, None)


def test_full_is_the_ordinary_step(tiny):
    model = tiny["model"]
    _, grads, _, _ = engine_grads(model, DataRegConfig(update_rule="full"), tiny["gen"], tiny["tgt"])
    model.zero_grad(set_to_none=True)
    closures(model, tiny["gen"], tiny["tgt"])[0](None).backward()
    for name, p in model.named_parameters():
        assert torch.equal(grads[name], p.grad), name


def test_target_only_is_training_on_the_target(tiny):
    model = tiny["model"]
    _, grads, _, _ = engine_grads(model, DataRegConfig(update_rule="target_only"), tiny["gen"], tiny["tgt"])
    model.zero_grad(set_to_none=True)
    closures(model, tiny["gen"], tiny["tgt"])[1]().backward()
    for name, p in model.named_parameters():
        assert torch.equal(grads[name], p.grad), name


def test_batch_target_is_the_general_mean(tiny):
    model, G, w = tiny["model"], tiny["G"], tiny["w"]
    got, _, _, eng = engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=3), tiny["gen"],
                                  tiny["tgt"], target="batch")
    grp = coordinate_groups(model, eng.groups)
    gbar = w @ G / w.sum()
    want = tp.lmo(gbar, tp.Product([tp.SubsetAverages(G[:, q], 3, weights=w) for q in grp], grp))
    assert close(got, want)


@pytest.fixture(scope="module")
def untied():
    model, gen, tgt = build_world(tie=False)
    G, g, w = reference(model, gen, tgt)
    return {"model": model, "gen": gen, "tgt": tgt, "G": G, "g": g, "w": w}


@pytest.mark.parametrize("rule,k,target", [("layerwise_subset", 3, "set"), ("global_subset", 2, "set"),
                                           ("layerwise_subset", 3, "batch")])
def test_untied_embedding_is_hooked(untied, rule, k, target):
    """An untied input embedding is its own hooked layer (scores from the target's token rows); the update is
    still the lmo over the hooked parameters, the embedding's included."""
    model, G, g, w = untied["model"], untied["G"], untied["g"], untied["w"]
    got, _, info, eng = engine_grads(model, DataRegConfig(update_rule=rule, k=k), untied["gen"], untied["tgt"],
                                     target=target)
    assert "model.embed_tokens" in eng.names and info["scoring"]["embedding"] == 1
    grp = coordinate_groups(model, eng.groups)
    t = w @ G / w.sum() if target == "batch" else g
    want = tp.lmo(t, tp.Product([tp.SubsetAverages(G[:, q], k, weights=w) for q in grp], grp))
    assert close(got, want), float(np.abs(got - want).max())


def test_untied_embedding_merged_equals_separate(untied):
    model, gen, tgt = untied["model"], untied["gen"], untied["tgt"]
    _, want, iw, _ = engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=3), gen, tgt)
    W, WT = float(tokens(gen).sum()), float(tokens(tgt).sum())
    model.zero_grad(set_to_none=True)
    eng = DataReg(model, DataRegConfig(update_rule="layerwise_subset", k=3))
    try:
        info = eng.step(lambda sel: (lambda r: r[:len(gen)].sum() / W + r[len(gen):].sum() / WT)(
            nll_rows(model, gen + tgt)), tokens(gen), None, merged=len(tgt))
    finally:
        eng.close()
    assert info["selected"] == iw["selected"]
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], rtol=1e-9, atol=1e-12), name


def test_bad_input_is_named(tiny):
    model = tiny["model"]
    with pytest.raises(ValueError, match="datareg.k: 7 is larger than the general batch of 6"):
        engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=7), tiny["gen"], tiny["tgt"])
    with pytest.raises(ValueError, match="matches no hooked layer"):
        DataReg(model, DataRegConfig(update_rule="blockwise_subset", groups="custom",
                                     custom_groups=[["*q_proj"], ["*nonexistent*"]]))
    with pytest.raises(ValueError, match="target_loss"):
        engine_grads_no_target(model, tiny)
    with pytest.raises(ValueError, match="datareg.update_rule"):
        DataRegConfig(update_rule="layerwise").validate()
    names = list(hookable_layers(model))
    assert len(make_groups(names, "custom", [["*.0.*"]])) == 1 + len(names) // 2


def engine_grads_no_target(model, tiny):
    eng = DataReg(model, DataRegConfig(update_rule="layerwise_subset", k=2))
    try:
        eng.step(closures(model, tiny["gen"], tiny["tgt"])[0], tokens(tiny["gen"]), None)
    finally:
        eng.close()


# ---------------------------------------------------------------------------------------------- two processes
DDP_CASES = [("layerwise_subset", "one_pass"), ("global_subset", "one_pass"), ("global_subset", "two_pass"),
             ("blockwise_subset", "one_pass"), ("layerwise_subset", "merged")]  # merged: target rows appended


def ddp_worker(out: str):
    """Each process takes its half of the general batch (DDP-wrapped model, gloo); saves rank 0's results."""
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    P, rank = acc.num_processes, acc.process_index
    results = {}
    for rule, mode in DDP_CASES:
        model, gen, tgt = build_world()
        W = float(tokens(gen).sum())
        mine = gen[rank * N_GEN // P:(rank + 1) * N_GEN // P]
        ddp = acc.prepare(model)
        merged = len(tgt) if mode == "merged" else 0
        eng = DataReg(model, DataRegConfig(update_rule=rule, k=3, subset_mode="one_pass" if merged else mode))

        def general_loss(sel, mine=mine, ddp=ddp, W=W, tgt=tgt, merged=merged):
            if merged:  # one forward over this process's general rows and the (shared) target rows
                r = nll_rows(ddp, mine + tgt)
                return r[:len(mine)].sum() / W + r[len(mine):].sum() / float(tokens(tgt).sum())
            part = mine if sel is None else [mine[i] for i in sel.tolist()]
            return nll_sum(ddp, part) / W

        def target_loss(model=model, tgt=tgt):
            return nll_sum(model, tgt) / float(tokens(tgt).sum())

        info = eng.step(general_loss, tokens(mine), None if merged else target_loss,
                        no_sync=lambda ddp=ddp: acc.no_sync(ddp), merged=merged)
        eng.close()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        results[(rule, mode)] = (info["selected"], {k: v.detach().clone() for k, v in model.named_parameters()})
    if rank == 0:
        torch.save(results, out)


def test_two_processes_select_and_step_like_one(tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    import socket

    with socket.socket() as sock:  # a free port, not a fixed one that another run may hold
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__)), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ddp = torch.load(out)
    for rule, mode in DDP_CASES:
        model, gen, tgt = build_world()
        init = {k: v.detach().clone() for k, v in model.named_parameters()}
        eng = DataReg(model, DataRegConfig(update_rule=rule, k=3, subset_mode=mode.replace("merged", "one_pass")))
        general_loss, target_loss = closures(model, gen, tgt)
        info = eng.step(general_loss, tokens(gen), target_loss)
        eng.close()
        sel, params = ddp[(rule, mode)]
        assert sel == info["selected"], (rule, mode)
        for k, p in model.named_parameters():
            want = init[k] - 0.1 * p.grad
            assert not torch.equal(want, init[k]) or k.endswith("bias"), k
            assert torch.allclose(params[k], want, rtol=0, atol=1e-10), (rule, mode, k)


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
    from scale.train import _end_distributed

    _end_distributed()


# ---------------------------------------------------------------------------------------------- the trainer
@pytest.mark.parametrize("accum,k,merged", [(1, 2, False), (2, 1, False), (2, 1, True)])
def test_cli_smoke_layerwise_subset(world, tmp_path, accum, k, merged):
    """`ptlab train` with datareg.update_rule=layerwise_subset (sketched, k of the 4 / accum samples of each
    micro-batch) on the general pool and the target task: runs, parameters change, metrics are finite."""
    from scale.config import load_config
    from scale.train import Trainer

    ov = base_overrides(world, "sft", "general", tmp_path / "run", **{
        "datareg.update_rule": "layerwise_subset", "datareg.k": k, "datareg.scoring": "sketched",
        "datareg.sketch_rank": 8, "datareg.target_path": str(world["target"]), "run.save_model": True,
        "run.grad_accum": accum, "datareg.merged_target": merged})
    tr = Trainer(load_config(None, ov))
    init = {k: v.detach().clone() for k, v in tr.policy.named_parameters()}
    tr.train()
    m = read_metrics(tmp_path / "run")
    assert len(m) == 2 and all(np.isfinite(x["loss"]) and np.isfinite(x["grad_norm"]) for x in m)
    assert any(not torch.equal(init[k], v) for k, v in tr.policy.named_parameters())
    assert len(tr.datareg.last_info["selected"]) == len(tr.datareg.engine.layers)
    assert all(len(s) == k for s in tr.datareg.last_info["selected"])
    for x in m:   # the selection statistics in the log (every group keeps k of the 4 / accum samples)
        assert x["datareg/kept"] == pytest.approx(k / (4 // accum))
        assert 0 <= x["datareg/overlap"] <= 1 and 0 <= x["datareg/score_positive"] <= 1
        assert x["datareg/score_std"] > 0 and x["datareg/target_loss"] > 0


@pytest.mark.parametrize("method,data", [("sft", "general"), ("dpo", "dpo"), ("rl", "rl")])
def test_trainer_merged_target_equals_separate(world, tmp_path, method, data):
    """datareg.merged_target (one pass over general + target rows) reaches the parameters of a separate
    target pass, with the same selections."""
    from scale.config import load_config
    from scale.train import Trainer

    common = {"run.batch_size": 4, "data.shuffle": False, "run.max_steps": 2, "model.dtype": "float64",
              "datareg.update_rule": "layerwise_subset", "datareg.k": 2, "datareg.target_batch_size": 2,
              "datareg.target_path": str(world["target"])}
    runs = []
    for merged in (False, True):
        tr = Trainer(load_config(None, base_overrides(world, method, data, tmp_path / str(merged), **common,
                                                      **{"datareg.merged_target": merged})))
        tr.train()
        runs.append(tr)
    a, b = (dict(t.policy.named_parameters()) for t in runs)
    assert runs[0].datareg.last_info["selected"] == runs[1].datareg.last_info["selected"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-10), k


@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_target_only_equals_training_on_the_target(world, tmp_path, accum):
    """With accumulation too: the target gradient is added once per optimizer step."""
    from scale.config import load_config
    from scale.train import Trainer

    common = {"run.batch_size": 2, "data.shuffle": False, "run.max_steps": 2, "model.dtype": "float64"}
    a = Trainer(load_config(None, base_overrides(world, "sft", "general", tmp_path / "a", **common, **{
        "datareg.update_rule": "target_only", "datareg.target_path": str(world["target"]),
        "datareg.target_batch_size": 2, "run.grad_accum": accum})))
    a.train()
    b = Trainer(load_config(None, base_overrides(world, "sft", "target", tmp_path / "b", **common)))
    b.train()
    pa, pb = dict(a.policy.named_parameters()), dict(b.policy.named_parameters())
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=0, atol=1e-12), k


def test_trainer_bad_target_is_named(world, tmp_path):
    from scale.config import load_config
    from scale.train import Trainer

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    ov = base_overrides(world, "sft", "general", tmp_path / "run", **{
        "datareg.update_rule": "layerwise_subset", "datareg.target_path": str(empty)})
    with pytest.raises(ValueError, match="datareg.target_path"):
        Trainer(load_config(None, ov))
    ov = base_overrides(world, "sft", "general", tmp_path / "run", **{
        "datareg.update_rule": "layerwise_subset", "datareg.k": 9, "datareg.target_path": str(world["target"])})
    with pytest.raises(ValueError, match="datareg.k: 9 is larger than the general batch of 4"):
        Trainer(load_config(None, ov)).train()


def test_lora_adapters_are_hooked_as_their_own_layers():
    """Under peft LoRA, lora_A and lora_B are separate layers (frozen base layers are not hooked) and the
    layer-wise update equals the lmo over the adapter parameters."""
    from peft import LoraConfig, get_peft_model

    model, gen, tgt = build_world(seed=1)
    model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                             init_lora_weights=False))
    names = list(hookable_layers(model))
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names) and len(names) == 8
    G, g, w = reference(model, gen, tgt)
    got, _, info, eng = engine_grads(model, DataRegConfig(update_rule="layerwise_subset", k=2), gen, tgt)
    grp = coordinate_groups(model, eng.groups)
    want = tp.lmo(g, tp.Product([tp.SubsetAverages(G[:, q], 2, weights=w) for q in grp], grp))
    assert close(got, want)


def test_selection_stats_by_hand():
    from scale.datareg import selection_stats

    info = {"scores": [np.array([1.0, -1.0, 2.0]), np.array([0.5, 0.5, -1.0])], "selected": [[0, 2], [0, 1]]}
    st = selection_stats(info, 3)
    assert st["score_std"] == pytest.approx((np.sqrt(14 / 9) + np.sqrt(0.5)) / 2)   # population std per group
    assert st["score_positive"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert st["kept"] == pytest.approx(2 / 3) and st["overlap"] == pytest.approx(1 / 3)   # {0} of {0, 1, 2}
    assert "overlap" not in selection_stats({"scores": info["scores"][:1], "selected": [[0]]}, 3)
    assert selection_stats({}, 3) == {}



def _rl_target_trainer(world, tmp_path, target_loss, **extra):
    from scale.config import load_config
    from scale.train import Trainer

    return Trainer(load_config(None, base_overrides(world, "rl", "rl", tmp_path / target_loss, **{
        "model.dtype": "float64", "datareg.update_rule": "target_only", "datareg.target_loss": target_loss,
        "datareg.target_path": str(world["rl"]), "datareg.target_batch_size": 2, "data.shuffle": False, **extra})))


@pytest.mark.parametrize("target_loss,estimator", [("reward", "grpo"), ("pg", "grpo"), ("train_loss", "dapo")])
def test_rl_target_gradient_equals_a_plain_reference(world, tmp_path, target_loss, estimator):
    """target_only with an RL target adds exactly the gradient of -sum_i A_i sum_t log pi / tokens over the
    target rollouts (plain forward, autograd): rewards recomputed from the decoded texts, A by hand for
    `reward` (batch-normalised), the preset's advantages for `pg`; `train_loss` under DAPO (token-mean,
    on-policy, no KL) has the same gradient with DAPO's advantages."""
    from tests.scale.conftest import parity_reward

    tr = _rl_target_trainer(world, tmp_path, target_loss, **{"method.rl.estimator": estimator})
    rows = tr.method.rows(tr, 0, {})
    tr.datareg.backward(rows, tr.global_counts(rows))
    got = {k: p.grad.clone() for k, p in tr.policy.named_parameters() if p.grad is not None}
    trows = tr.datareg.last_target_rows
    assert len(trows) == 2 * tr.cfg.generation.n
    texts = [tr.tok.decode(r.input_ids[r.prompt_len:], skip_special_tokens=True) for r in trows]
    R = torch.tensor(parity_reward(texts, None), dtype=torch.float64)
    assert [r.meta["reward"] for r in trows] == R.tolist()
    if target_loss == "reward":
        A = (R - R.mean()) / R.std(unbiased=False) if R.std() > 0 else R - 0.5
    else:
        A = tr.terms.rl.advantages(R, group_size=tr.cfg.generation.n)
    assert torch.allclose(torch.tensor([r.advantage for r in trows], dtype=torch.float64), A)
    tr.opt.zero_grad(set_to_none=True)
    model = tr.acc.unwrap_model(tr.policy).model
    total, tokens = 0.0, 0
    for r, a in zip(trows, A):
        x = torch.tensor([r.input_ids])
        lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
        sel = lp[torch.arange(r.prompt_len - 1, len(r.input_ids) - 1), x[0, r.prompt_len:]]
        total, tokens = total - a * sel.sum(), tokens + sel.numel()
    (total / tokens).backward()
    for k, p in tr.policy.named_parameters():
        if k in got:
            assert torch.allclose(got[k], p.grad, rtol=1e-8, atol=1e-12), k


def test_rl_target_is_logged_and_bad_uses_are_named(world, tmp_path):
    from scale.config import load_config
    from scale.train import Trainer

    tr = _rl_target_trainer(world, tmp_path, "reward", **{"datareg.update_rule": "layerwise_subset", "datareg.k": 2})
    tr.train()
    m = read_metrics(tmp_path / "reward")
    assert all(0 <= x["datareg/target_reward"] <= 1 and np.isfinite(x["datareg/target_loss"]) for x in m)
    with pytest.raises(ValueError, match="datareg.target_loss: reward needs a method that samples rollouts"):
        Trainer(load_config(None, base_overrides(world, "sft", "general", tmp_path / "x", **{
            "datareg.update_rule": "target_only", "datareg.target_loss": "reward",
            "datareg.target_path": str(world["rl"])})))
    for bad in ({"datareg.target": "batch"}, {"datareg.merged_target": True}):
        with pytest.raises(ValueError, match="datareg.target_loss"):
            load_config(None, base_overrides(world, "rl", "rl", tmp_path / "y", **{
                "datareg.update_rule": "layerwise_subset", "datareg.target_loss": "pg",
                "datareg.target_path": str(world["rl"]), **bad}))
    with pytest.raises(ValueError, match="datareg.target_loss"):
        load_config(None, base_overrides(world, "rl", "rl", tmp_path / "z", **{
            "datareg.update_rule": "layerwise_subset", "datareg.target_loss": "ppo",
            "datareg.target_path": str(world["rl"])}))


def test_target_size_draws_a_seeded_subset(world, tmp_path):
    """datareg.target_size=n keeps n distinct examples of the target file, the same for one seed, another
    subset for another seed; more than the file has is an error naming the key."""
    import json

    from scale.config import load_config
    from scale.train import Trainer

    def subset(seed, size):
        ov = base_overrides(world, "sft", "general", tmp_path / f"s{seed}", **{
            "datareg.update_rule": "target_only", "datareg.target_path": str(world["target"]),
            "datareg.target_size": size, "run.seed": seed})
        return [tuple(e["completion"]["input_ids"]) for e in Trainer(load_config(None, ov)).datareg.target]

    n = len([x for x in world["target"].read_text().splitlines() if x.strip() and json.loads(x)])
    a, b = subset(1, 3), subset(2, 3)
    assert len(set(a)) == 3 and a == subset(1, 3) and a != b
    assert len(subset(1, 0)) == n
    with pytest.raises(ValueError, match="datareg.target_size"):
        subset(1, n + 1)
