"""Schedules: stage arithmetic, ALRIGHT's law and resumability, MAXRIGHT's refresh rule, the HPT gate."""

import math
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theory.schedules import Alright, HptGate, Maxright, Mix, Schedule, Sequential, cost


def test_all_schedules_satisfy_the_protocol_and_pickle():
    objs = [Sequential(stages=[("sft", 3), ("dpo", 2)]), Mix(0.3), Alright(0.3, seed=1),
            Maxright(0.3, {"sft": 1.0, "dpo": 0.5}), HptGate(0.25)]
    for s in objs:
        assert isinstance(s, Schedule)
        assert isinstance(s.describe(), str) and s.name
        clone = pickle.loads(pickle.dumps(s))
        assert clone.describe() == s.describe()


def test_sequential_stages_and_split():
    s = Sequential(stages=[("sft", 3), ("dpo", 2)])
    got = [max(s.weights(t), key=s.weights(t).get) for t in range(5)]
    assert got == ["sft"] * 3 + ["dpo"] * 2
    assert [s.stage_start(t) for t in range(5)] == [True, False, False, True, False]
    assert s.total_steps == 5
    with pytest.raises(ValueError, match="step"):
        s.weights(5)
    c = Sequential(order=("dpo", "sft"), split=0.25, total_steps=8)
    assert c.stages == (("dpo", 2), ("sft", 6))
    assert [cost(c.weights(t)) for t in range(8)] == [1] * 8
    # an empty first stage starts directly with the second objective
    e = Sequential(order=("sft", "dpo"), split=0.0, total_steps=4)
    assert e.weights(0) == {"sft": 0.0, "dpo": 1.0} and e.stage_start(0)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(stages=[("sft", -1)]), "stages"), (dict(stages=[]), "stages"),
    (dict(order=("sft", "dpo"), split=1.5, total_steps=4), "split"),
    (dict(order=("sft", "sft"), split=0.5, total_steps=4), "order"),
    (dict(order=("sft", "dpo"), split=0.5, total_steps=-3), "total_steps"),
])
def test_sequential_bad_inputs(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        Sequential(**kwargs)


def test_mix_weights_and_cost():
    m = Mix(0.25)
    assert m.weights(7) == {"sft": 0.75, "dpo": 0.25} and cost(m.weights(7)) == 2
    assert cost(Mix(0.0).weights(0)) == 1
    for bad in (-0.1, 1.1, "x"):
        with pytest.raises(ValueError, match="lam"):
            Mix(bad)


def test_alright_is_a_function_of_seed_and_step_and_has_the_right_law():
    a = Alright(0.3, seed=5)
    draws = [a.choice(t) for t in range(4000)]
    # resuming at step t (a fresh object) gives the same draws as the uninterrupted run
    b = Alright(0.3, seed=5)
    assert [b.choice(t) for t in range(2000, 4000)] == draws[2000:]
    assert [Alright(0.3, seed=6).choice(t) for t in range(50)] != draws[:50]
    frac = np.mean([d == "dpo" for d in draws])
    # Binomial(4000, 0.3): sd = 0.0072; 4 sd tolerance
    assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 4000)
    assert all(Alright(1.0, 0).choice(t) == "dpo" for t in range(20))
    assert all(Alright(0.0, 0).choice(t) == "sft" for t in range(20))
    assert cost(a.weights(3)) == 1


@given(lam=st.floats(0.05, 0.95), f_sft=st.floats(0, 5), f_dpo=st.floats(0, 5))
@settings(max_examples=40, deadline=None)
def test_maxright_picks_the_larger_weighted_gap(lam, f_sft, f_dpo):
    m = Maxright(lam, (0.5, 0.2), k=1)
    w = m.weights(0, {"f_sft": f_sft + 0.5, "f_dpo": f_dpo + 0.2})
    expect = "dpo" if lam * f_dpo > (1 - lam) * f_sft else "sft"
    assert w[expect] == 1.0 and cost(w) == 1


def test_maxright_tie_picks_sft_and_refresh_rule():
    m = Maxright(0.5, {"sft": 0.0, "dpo": 0.0}, k=3)
    assert m.weights(0, {"f_sft": 1.0, "f_dpo": 1.0})["sft"] == 1.0       # tie -> SFT, like the code
    assert [m.needs_values(t) for t in range(7)] == [True, False, False, True, False, False, True]
    # between refreshes, stats are ignored and the cached (stale) values decide
    assert m.weights(1, {"f_sft": 0.0, "f_dpo": 9.0})["sft"] == 1.0
    m.observe("sft", 0.2)                                                   # the code refreshes the trained one
    assert m.weights(2)["dpo"] == 1.0
    with pytest.raises(ValueError, match="stats"):
        m.weights(3)                                                        # a refresh step needs values
    never = Maxright(0.5, (0.0, 0.0), k=None)
    assert [never.needs_values(t) for t in range(3)] == [True, True, True]  # nothing cached yet
    never.weights(0, {"f_sft": 1.0, "f_dpo": 2.0})
    assert not never.needs_values(10**6)
    # a fresh object (e.g. after a restart) asks for values whatever the step
    assert Maxright(0.5, (0.0, 0.0), k=10).needs_values(17)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(lam=2.0, f_star=(0, 0)), "lam"), (dict(lam=0.5, f_star=(0,)), "f_star"),
    (dict(lam=0.5, f_star={"sft": 0}), "f_star"), (dict(lam=0.5, f_star=(0, 0), k=0), "k"),
    (dict(lam=0.5, f_star=(0, float("nan"))), "f_star"),
])
def test_maxright_bad_inputs(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        Maxright(**kwargs)


def test_hpt_switch_at_the_threshold():
    g = HptGate(0.25)
    a, b = g.prompt_weights(np.array([0.0, 0.25, 0.25 + 1e-12, 0.5, 1.0]))
    assert a.tolist() == [0, 0, 1, 1, 1] and b.tolist() == [1, 1, 0, 0, 0]
    assert g.weights(0, {"accuracy": 0.25}) == {"rl": 0.0, "sft": 1.0}
    g0 = HptGate(0.0)                                   # Qwen: SFT only when every rollout fails
    assert g0.prompt_weights([0.0, 1 / 8])[1].tolist() == [1.0, 0.0]


def test_hpt_code_gate_matches_the_paper_gate_on_counts():
    n = 8
    for gate in range(n + 1):
        code = HptGate.from_code(gate, n)
        counts = np.arange(n + 1)
        a_code, b_code = code.count_weights(counts)
        a_paper, b_paper = HptGate(gate / n).prompt_weights(counts / n)
        assert np.array_equal(a_code, a_paper) and np.array_equal(b_code, b_paper)
        assert np.array_equal(b_code, (counts <= gate).astype(float))
    with pytest.raises(ValueError, match="num_correct"):
        HptGate(0.25).count_weights([1])
    with pytest.raises(ValueError, match="switch_gate"):
        HptGate.from_code(9, 8)


@given(gamma=st.floats(0, 1), temp=st.floats(0.01, 1.0))
@settings(max_examples=30, deadline=None)
def test_hpt_smooth_is_monotone_and_sums_to_one(gamma, temp):
    g = HptGate(gamma, mode="smooth", temperature=temp)
    p = np.linspace(0, 1, 101)
    a, b = g.prompt_weights(p)
    assert np.all(np.diff(a) >= 0) and np.all(np.diff(b) <= 0)
    assert np.allclose(a + b, 1.0) and np.all((a >= 0) & (a <= 1))


def test_hpt_smooth_tends_to_switch():
    p = np.array([0.0, 0.1, 0.3, 0.6])
    a, _ = HptGate(0.2, mode="smooth", temperature=1e-4).prompt_weights(p)
    assert np.allclose(a, HptGate(0.2).prompt_weights(p)[0], atol=1e-12)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(gamma=-0.1), "gamma"), (dict(gamma=1.5), "gamma"), (dict(gamma="a"), "gamma"),
    (dict(gamma=0.2, mode="soft"), "mode"), (dict(gamma=0.2, mode="smooth", temperature=0), "temperature"),
])
def test_hpt_bad_inputs(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        HptGate(**kwargs)
    with pytest.raises(ValueError, match="accuracy"):
        HptGate(0.2).prompt_weights([1.2])


# ---- NaN statistics and malformed arguments (issue 18 item 5)


def test_maxright_rejects_nan_statistics_naming_them():
    """A NaN value made MAXRIGHT pick SFT (every comparison with NaN is False)."""
    m = Maxright(0.5, {"sft": 1.0, "dpo": 0.5})
    for stats, arg in [({"f_sft": float("nan"), "f_dpo": 1.0}, "f_sft"), ({"f_sft": 1.0, "f_dpo": math.inf}, "f_dpo"),
                       ({"f_sft": "x", "f_dpo": 1.0}, "f_sft"), ([1.0, 2.0], "stats"), (None, "stats")]:
        with pytest.raises(ValueError, match=arg):
            m.weights(0, stats)
    m.weights(0, {"f_sft": 2.0, "f_dpo": 1.0})
    with pytest.raises(ValueError, match="value"):
        m.observe("dpo", float("nan"))
    for f_star in [{"sft": float("nan"), "dpo": 0.0}, (0.0, "x"), 3.0, "ab"]:
        with pytest.raises(ValueError, match="f_star"):
            Maxright(0.5, f_star)


@pytest.mark.parametrize("make, arg", [
    (lambda: HptGate(0.5).weights(0, {"accuracy": float("nan")}), "accuracy"),
    (lambda: HptGate(0.5).weights(0, {"accuracy": "x"}), "accuracy"),
    (lambda: HptGate(0.5).weights(0, [0.5]), "stats"),
    (lambda: HptGate(0.5, temperature=True), "temperature"),
    (lambda: Mix(float("nan")), "lam"),
    (lambda: Alright(float("nan")), "lam"),
    (lambda: Sequential(order=("sft", "dpo"), split=float("nan"), total_steps=4), "split"),
    (lambda: Sequential(order=("sft", "dpo"), split="x", total_steps=4), "split"),
    (lambda: Sequential(order=3, split=0.5, total_steps=4), "order"),
    (lambda: Sequential(order=("sft", 1), split=0.5, total_steps=4), "order"),
    (lambda: Sequential(stages=[3]), "stages"),
    (lambda: Sequential(stages=7), "stages"),
])
def test_malformed_arguments_raise_value_error_naming_them(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_array_arguments_are_read_like_lists():
    assert Maxright(0.5, np.array([1.0, 0.5])).f_star == {"sft": 1.0, "dpo": 0.5}
    assert Sequential(order=np.array(["sft", "dpo"]), split=0.5, total_steps=4).stages == (("sft", 2), ("dpo", 2))
