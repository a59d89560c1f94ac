"""The XRIGHT figures: lam of a cell, the tuning rules, each verdict rule on hand-made numbers, and every figure
built from synthetic runs shaped like the set's (the real runs take an hour: slow figures)."""

import random

import pytest

from experiments import fig_xright as fx

LAMS = fx.LAMS


def _rows(f_sft, f_dpo, **end):
    return [{"step": 0, fx.F["sft"]: 1.0, fx.F["dpo"]: 0.7},
            {"step": fx.STEPS, fx.F["sft"]: f_sft, fx.F["dpo"]: f_dpo, **end}]


def test_lam_of_each_method():
    assert fx.lam_of("seq_sft_dpo", {"method.joint.split": 0.75}) == 0.25     # T_DPO = lam * steps, second
    assert fx.lam_of("seq_dpo_sft", {"method.joint.split": 0.25}) == 0.25     # T_DPO = lam * steps, first
    assert fx.lam_of("mix", {"method.joint.lam": 0.5}) == 0.5


def test_tuning_rules_pick_the_lowest_and_break_ties_to_the_smaller_rate():
    def cell(method, lr, **end):
        return {"method": method, "point": {"run.lr": lr}, "rows": [{"step": fx.STEPS, **end}]}

    t1 = [cell("sft_only", 1e-3, **{fx.TRAIN_F["sft"]: 0.1, fx.F["sft"]: 0.2}),
          cell("sft_only", 1e-4, **{fx.TRAIN_F["sft"]: 0.1, fx.F["sft"]: 0.3}),
          cell("dpo_only", 1e-4, **{fx.TRAIN_F["dpo"]: 0.5, fx.F["dpo"]: 0.6}),
          cell("dpo_only", 3e-4, **{fx.TRAIN_F["dpo"]: 0.2, fx.F["dpo"]: 0.25})]
    obj = fx.objective_rates(t1)
    assert obj["sft"] == {"lr": 1e-4, "f_star": 0.1, "heldout": 0.3} and obj["dpo"]["lr"] == 3e-4
    ideal = {"sft": 0.0, "dpo": 0.0}
    t2 = [{"method": "mix", "point": {"run.lr": lr}, "rows": _rows(a, b)} for lr, a, b in
          ((1e-4, 0.3, 0.4), (3e-4, 0.0, 0.3), (1e-3, 0.3, 0.0))]
    assert fx.method_rates(t2, ideal) == {"mix": 3e-4}
    assert fx.ideal_distance(_rows(0.3, 0.4), ideal) == pytest.approx(0.5)


def _dist(**by_method):
    """{(method, lam): {seed: value}} with every method at `default` unless given."""
    return {(m, lam): {s: by_method.get(m, 1.0) for s in (1, 2, 3)} for m in fx.METHODS for lam in LAMS}


def test_tradeoff_verdict():
    held, c = fx.tradeoff_verdict(_dist(alright=0.5, maxright_k10=0.2, mix=0.3))
    assert held == "yes" and c["maxright_lowest_at"] == list(LAMS)
    held, c = fx.tradeoff_verdict(_dist(alright=0.5, maxright_k10=0.4, mix=0.3))
    assert held == "partly" and not c["C_maxright_lowest_at_2_lams"]
    assert fx.tradeoff_verdict(_dist(alright=2.0, maxright_k10=2.0))[0] == "no"
    # the Pythia grid: the same rule on its two lam, C at both
    d = {(m, lam): {s: {"maxright_k10": 0.2, "alright": 0.5}.get(m, 1.0) for s in (1, 2, 3)} for m in fx.METHODS
         for lam in fx.PYTHIA_LAMS}
    assert fx.tradeoff_verdict(d, fx.PYTHIA_LAMS)[0] == "yes"
    d[("maxright_k10", 0.99)] = {1: 0.9, 2: 0.9, 3: 0.9}
    held, c = fx.tradeoff_verdict(d, fx.PYTHIA_LAMS)
    assert held == "partly" and c["maxright_lowest_at"] == [0.01] and not c["C_maxright_lowest_at_2_lams"]


def test_cost_tasks_and_k_verdicts():
    ratio = {(m, lam): {"mix": 1.5, "alright": 1.0, "maxright_k10": 1.1}.get(m, 1.0) for m in fx.METHODS
             for lam in LAMS}
    assert fx.cost_verdict(ratio)[0] == "yes"
    assert fx.cost_verdict({**ratio, ("mix", 0.5): 1.1})[0] == "partly"
    t = {side: {(m, lam): {"alright": 0.6, "maxright_k10": 0.6}.get(m, 0.5) for m in fx.METHODS for lam in LAMS}
         for side in ("sft", "dpo")}
    assert fx.tasks_verdict(t)[0] == "yes"
    t["sft"] = {k: 0.5 for k in t["sft"]}
    assert fx.tasks_verdict(t)[1] == {"A_alright_dpo_side": True, "B_maxright_dpo_side": True,
                                      "C_either_sft_side": False}
    rt = {1: 30.0, 10: 20.0, 50: 10.0, 200: 9.0}
    d = {1: {1: 0.1, 2: 0.1}, 10: {}, 50: {}, 200: {1: 0.2, 2: 0.05}}
    assert fx.k_verdict(rt, d) == ("partly", {"A_runtime_falls_with_k": True, "B_k1_closer_than_k200": False})


def _synthetic(lams=LAMS) -> dict:
    rng = random.Random(0)

    def cell(seed):
        rows = [{"step": t, "step_time": 0.1 + rng.random() / 10, "peak_rss_mb": 500 + rng.random()}
                for t in range(1, fx.STEPS + 1)]
        rows += [{"step": t, fx.F["sft"]: rng.random(), fx.F["dpo"]: rng.random()} for t in range(0, 201, 20)]
        rows += [{"step": t, fx.TASK["sft"]: rng.random(), fx.TASK["dpo"]: rng.random()} for t in (0, fx.STEPS)]
        return {"seed": seed, "rows": rows, "done": {"seconds": 60.0}}

    by = {(m, lam): {s: cell(s) for s in (1, 2, 3)} for m in fx.METHODS for lam in lams}
    by.update({("maxright_k", k): {s: cell(s) for s in (1, 2, 3)} for k in fx.KS})
    cells = [c for v in by.values() for c in v.values()]
    return {"cells": cells, "ideal": {s: {"sft": 0.01, "dpo": 0.001} for s in (1, 2, 3)}, "by": by,
            "seconds": 60.0 * len(cells)}


@pytest.mark.parametrize("name", ["xright_tradeoff", "xright_cost", "xright_tasks", "xright_k"])
def test_every_figure_builds_from_synthetic_runs(tmp_path, monkeypatch, name):
    from experiments.registry import FIGURES

    data = _synthetic()
    monkeypatch.setattr(fx, "runs", lambda: data)
    res = FIGURES[name].build(tmp_path)
    assert res.held in ("yes", "partly", "no") and res.finding
    assert all((tmp_path / f).stat().st_size > 0 for f in res.files)


def test_pythia_grid_figure_builds_from_synthetic_runs(tmp_path, monkeypatch):
    from experiments.registry import FIGURES

    data = _synthetic(fx.PYTHIA_LAMS)
    monkeypatch.setattr(fx, "collect", lambda path: data if path == fx.PYTHIA else None)
    res = FIGURES["xright_pythia_grid"].build(tmp_path)
    assert res.held in ("yes", "partly", "no") and "lam=0.99" in res.finding
    assert set(res.extra["ideal_distance"]) == {f"{m}@{lam}" for m in fx.METHODS for lam in fx.PYTHIA_LAMS}
    assert (tmp_path / "xright_pythia_grid.png").stat().st_size > 0
