"""Tests for toy/datareg.py: hand backprop vs autograd, Adam vs torch, groups, rules as theory.projection
members, the labels' law, and (fixed seeds) the scarce-target regime the figures rely on."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from theory.projection import Cone, HalfSpaces, Product, Span, SubsetAverages, lmo, project, update_moments
from toy.datareg import (
    MLP,
    Adam,
    World,
    _one_blas_thread,
    _openblas,
    groups,
    rule,
    spectrum_draws,
    target_loss,
    teacher_loss,
    train,
)


def _autograd_rows(model: MLP, x, y):
    net = model.to_torch()
    rows = []
    for i in range(len(x)):
        net.zero_grad()
        z = net(torch.from_numpy(x[i:i + 1])).squeeze()
        torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor(y[i])).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy())
    return np.stack(rows)


def test_per_sample_grads_match_autograd_loop():
    world = World(seed=3)
    model = world.student(1)
    x, y = world.sample_general(6, np.random.default_rng(0))
    G = model.per_sample_grads(x, y)
    assert np.allclose(G, _autograd_rows(model, x, y), rtol=1e-10, atol=1e-13)
    assert np.allclose(model.grad(x, y), G.mean(0), rtol=1e-10, atol=1e-14)
    # the output and the held-out loss agree with torch too
    net = model.to_torch()
    with torch.no_grad():
        z = net(torch.from_numpy(world.x_eval)).squeeze(-1)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.from_numpy(world.y_eval))
    assert target_loss(model, world) == pytest.approx(float(ref), rel=1e-12)


def test_adam_matches_torch():
    rng = np.random.default_rng(0)
    theta = rng.standard_normal(7)
    p = torch.nn.Parameter(torch.from_numpy(theta.copy()))
    ref = torch.optim.Adam([p], lr=0.01)
    opt = Adam(theta, 0.01)
    for _ in range(5):
        g = rng.standard_normal(7)
        opt.step(g)
        p.grad = torch.from_numpy(g)
        ref.step()
    assert np.allclose(theta, p.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_groups_partition_and_nest():
    model = World().student(0)
    sets = {g: groups(model, g) for g in ("global", "block", "layer")}
    for grp in sets.values():
        assert np.array_equal(np.concatenate(grp), np.arange(model.d))  # contiguous, in order
    for layer in sets["layer"]:
        assert sum(np.isin(layer, b).all() for b in sets["block"]) == 1
    assert len(sets["layer"]) == 4 and len(sets["block"]) == 2 and len(sets["global"]) == 1
    with pytest.raises(ValueError, match="granularity"):
        groups(model, "sublayer")


def test_rules_are_the_theory_members():
    world = World(seed=0)
    model = world.student(0)
    rng = np.random.default_rng(1)
    G = model.per_sample_grads(*world.sample_general(8, rng))
    g = model.grad(world.x_target[:4], world.y_target[:4])
    assert np.array_equal(rule("target_only")(g, G), g)
    assert np.allclose(rule("full")(g, G), G.mean(0))
    assert np.allclose(rule("subset", 8, "layer", model)(g, G), G.mean(0))  # k = n: Full-Training
    assert np.allclose(rule("subset", 3, "global", model)(g, G), lmo(g, SubsetAverages(G, 3)))
    grp = groups(model, "layer")
    z = rule("subset", 3, "layer", model)(g, G)
    assert np.allclose(z, lmo(g, Product([SubsetAverages(G[:, q], 3) for q in grp], grp)))
    # the layer-wise rule reaches at least the global rule's alignment with the target (nesting)
    assert g @ z >= g @ rule("subset", 3, "global", model)(g, G) - 1e-12
    # cone, gem and span normalise the rows: the same sets, so the same projections
    for name, S in (("cone", Cone), ("gem", HalfSpaces), ("span", Span)):
        ref = project(g, S(G))
        assert np.allclose(rule(name)(g, G), ref, atol=1e-9 * np.linalg.norm(g))
    with pytest.raises(ValueError, match="name"):
        rule("nope")
    with pytest.raises(ValueError, match="model"):
        rule("subset")


def test_cone_rule_on_rows_of_very_different_norms():
    """Fitted examples have logistic gradients ~1e-6 of the others; the cone rule must still be the exact
    projection. Reference: scipy's NNLS on G^T directly (not through the Gram matrix)."""
    rng = np.random.default_rng(4)
    G = rng.standard_normal((8, 50)) * np.array([1e-5, 4e-2, 8e-2, 9, 8, 0.2, 3e-6, 13])[:, None]
    g = rng.standard_normal(50)
    c, _ = nnls(G.T, g)
    assert np.allclose(rule("cone")(g, G), G.T @ c, atol=1e-8)
    G[2] = 0.0  # a zero row generates nothing
    c, _ = nnls(G.T, g)
    assert np.allclose(rule("cone")(g, G), G.T @ c, atol=1e-8)


def test_labels_follow_the_teacher_with_label_noise():
    """P(y = 1 | x) = noise + (1 - 2 noise) sigmoid(f_target(x)); checked on the mean within 4 standard
    errors (fixed seed). The teacher's held-out loss is below that of the constant 1/2 predictor."""
    world = World(seed=2, noise=0.2)
    x, y = world.sample_target(20000, np.random.default_rng(0))
    q = 0.2 + 0.6 / (1 + np.exp(-world.f_target(x)))
    assert abs(np.mean(y - q)) < 4 * np.sqrt(np.mean(q * (1 - q)) / len(y))
    assert teacher_loss(world) < np.log(2)
    xg, yg = World(seed=2, align=1.0, noise=0.0).sample_general(20000, np.random.default_rng(1))
    qg = 1 / (1 + np.exp(-world.f_target(xg)))
    assert abs(np.mean(yg - qg)) < 4 * np.sqrt(np.mean(qg * (1 - qg)) / len(yg))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="align"):
        World(align=1.5)
    with pytest.raises(ValueError, match="noise"):
        World(noise=0.5)
    with pytest.raises(ValueError, match="student_sizes"):
        World(d_in=3)
    with pytest.raises(ValueError, match="sizes"):
        MLP([2])
    with pytest.raises(ValueError, match="m"):
        train(World(), rule("full"), steps=5, m=17)


def test_train_runs_every_rule_and_is_deterministic():
    world = World(seed=0)
    model = world.student(0)
    for name in ("target_only", "full", "cone", "hull", "gem", "agem", "span", "filter"):
        r = train(world, rule(name), steps=20, eval_every=10)
        assert np.all(np.isfinite(r["loss"])) and r["steps"].tolist() == [0, 10, 20]
        assert r["loss"][-1] != r["loss"][0]
    f = rule("subset", 4, "layer", model)
    a, b = train(World(seed=0), f, steps=30, eval_every=10), train(World(seed=0), f, steps=30, eval_every=10)
    assert np.array_equal(a["loss"], b["loss"])
    c = train(World(seed=0), f, steps=30, eval_every=10, lr_decay=True)
    assert not np.array_equal(a["loss"], c["loss"])
    # the general stream does not depend on m: Full-Training, which ignores g, is the same run
    full = [train(World(seed=0), rule("full"), steps=30, eval_every=10, m=mm)["loss"] for mm in (1, 16)]
    assert np.array_equal(*full)


def test_one_blas_thread_restores_the_thread_count():
    fns = _openblas()
    if fns is None:
        pytest.skip("numpy's OpenBLAS not found")
    before = fns[0]()
    with _one_blas_thread():
        assert fns[0]() == 1
    assert fns[0]() == before


def test_scarce_target_regime():
    """The regime of the projection_target_loss figure, small (3 seeds x 1000 steps, mean over seeds):
    Target-only overfits the 16 examples (held-out final/min > 1.5) and the layer-wise subset ends below
    Full-Training. Final = mean of the last 10% of the curve."""
    ratio, full, layer = [], [], []
    for s in (0, 1, 2):
        w = World(seed=s)
        for name, f, out in (("t", rule("target_only"), ratio), ("f", rule("full"), full),
                             ("l", rule("subset", 4, "layer", w.student(s)), layer)):
            L = train(w, f, steps=1000, seed=s)["loss"]
            fin = L[-len(L) // 10:].mean()
            out.append(fin / L.min() if name == "t" else fin)
    assert np.mean(ratio) > 1.5
    assert np.mean(layer) < np.mean(full)


def test_target_only_is_unbiased_and_full_training_is_not():
    """Target minibatches come from the target distribution: the Target-only update is unbiased for the
    (held-out) target gradient up to the held-out sample; Full-Training carries the general data's bias.
    Tolerance: 4 standard errors, fixed seed."""
    rules = {"t": lambda m: rule("target_only"), "f": lambda m: rule("full")}
    U, truth = spectrum_draws(World(seed=0), rules, draws=300, warm_steps=50)
    t, f = update_moments(U["t"], truth), update_moments(U["f"], truth)
    assert abs(t.bias2) <= 4 * t.se_bias2
    assert f.bias2 > 4 * f.se_bias2
    assert t.variance > f.variance
