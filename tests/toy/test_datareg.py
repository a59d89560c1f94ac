"""Tests for toy/datareg.py: per-sample gradients, coordinate groups, rules as theory.projection members."""

import numpy as np
import pytest
import torch

from theory.projection import Product, SubsetAverages, lmo, update_moments
from toy.datareg import World, groups, per_sample_grads, rule, spectrum_draws, train


def test_per_sample_grads_match_autograd_loop():
    world = World(seed=3)
    model = world.student(1)
    x, y = world.sample_general(5)
    G = per_sample_grads(model, x, y)
    for i in range(5):
        model.zero_grad()
        (0.5 * (model(x[i:i + 1]).squeeze() - y[i]) ** 2).backward()
        ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert torch.allclose(G[i], ref, atol=1e-12)


def test_groups_partition_and_nest():
    model = World().student(0)
    d = sum(p.numel() for p in model.parameters())
    sets = {g: groups(model, g) for g in ("global", "block", "layer")}
    for grp in sets.values():
        assert np.array_equal(np.sort(np.concatenate(grp)), np.arange(d))
    # every layer lies inside one block, every block inside the global group
    for layer in sets["layer"]:
        assert sum(np.isin(layer, b).all() for b in sets["block"]) == 1
    assert len(sets["layer"]) == 4 and len(sets["block"]) == 2 and len(sets["global"]) == 1
    with pytest.raises(ValueError, match="granularity"):
        groups(model, "sublayer")


def test_rules_are_the_theory_members():
    world = World(seed=0)
    model = world.student(0)
    x, y = world.sample_general(8)
    G = per_sample_grads(model, x, y).numpy()
    g = per_sample_grads(model, world.x_target[:1], world.y_target[:1]).mean(0).numpy()
    assert np.array_equal(rule("target_only")(g, G), g)
    assert np.allclose(rule("full")(g, G), G.mean(0))
    assert np.allclose(rule("subset", 8, "layer", model)(g, G), G.mean(0))  # k = n: Full-Training
    assert np.allclose(rule("subset", 3, "global", model)(g, G), lmo(g, SubsetAverages(G, 3)))
    grp = groups(model, "layer")
    z = rule("subset", 3, "layer", model)(g, G)
    assert np.allclose(z, lmo(g, Product([SubsetAverages(G[:, q], 3) for q in grp], grp)))
    # the layer-wise rule reaches at least the global rule's alignment with the target (nesting)
    assert g @ z >= g @ rule("subset", 3, "global", model)(g, G) - 1e-12
    with pytest.raises(ValueError, match="name"):
        rule("nope")
    with pytest.raises(ValueError, match="model"):
        rule("subset")
    with pytest.raises(ValueError, match="align"):
        World(align=1.5)


def test_train_runs_every_rule_and_is_deterministic():
    world = World(seed=0)
    model = world.student(0)
    for name in ("target_only", "full", "cone", "hull", "gem", "agem", "span", "filter"):
        r = train(World(seed=0), rule(name), steps=20, eval_every=10)
        assert np.all(np.isfinite(r["loss"])) and r["steps"].tolist() == [0, 10, 20]
        assert r["loss"][-1] != r["loss"][0]
    f = rule("subset", 4, "layer", model)
    a, b = train(World(seed=0), f, steps=20), train(World(seed=0), f, steps=20)
    assert np.array_equal(a["loss"], b["loss"])


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
