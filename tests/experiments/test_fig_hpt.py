"""experiments/fig_hpt.py: the verdict rules on hand-made numbers (each outcome reachable), the readers on
hand-written run folders, and every figure built from a synthetic set of runs (no training)."""

from __future__ import annotations

import json
import random

import pytest

import experiments.fig_hpt as fh


def test_beats_needs_every_paired_seed():
    assert fh.beats({1: 0.5, 2: 0.6}, {1: 0.4, 2: 0.5})
    assert not fh.beats({1: 0.5, 2: 0.5}, {1: 0.4, 2: 0.5})        # a tie is not a win
    assert not fh.beats({1: 0.5}, {2: 0.1})                          # no shared seed
    assert fh.grade([True, True]) == "yes" and fh.grade([True, False]) == "partly" and fh.grade([False]) == "no"


def _scores(hpt_code, hpt_paper, base=0.3):
    out = {b: {1: base, 2: base, 3: base} for b in fh.BASELINES}
    out["hpt_code"], out["hpt_paper"] = hpt_code, hpt_paper
    return out


def test_main_verdict_outcomes():
    low = {1: 0.1, 2: 0.1, 3: 0.1}
    assert fh.main_verdict(_scores({1: 0.4, 2: 0.4, 3: 0.4}, low))[0] == "yes"
    s = _scores(low, low)
    s["hpt_paper"] = {1: 0.5, 2: 0.5, 3: 0.5}
    s["grpo"] = {1: 0.6, 2: 0.2, 3: 0.2}                             # GRPO wins one seed
    held, won = fh.main_verdict(s)
    assert held == "partly" and "grpo" not in won["hpt_paper"] and len(won["hpt_paper"]) == 4
    assert fh.main_verdict(_scores(low, low))[0] == "no"


def test_exclusive_counts_per_level_and_overall():
    a = {"p1": (1, 1), "p2": (3, 1), "p3": (3, 0), "p4": (5, 1)}
    b = {"p1": (1, 1), "p2": (3, 0), "p3": (3, 1), "p4": (5, 0)}
    assert fh.exclusive(a, b) == {0: (2, 1), 1: (0, 0), 3: (1, 1), 5: (1, 0)}


def test_passk_verdict():
    at = {m: 0.5 for m in fh.METHODS} | {"grpo": 0.4, "hpt_code": 0.6}
    assert fh.passk_verdict(at)[0] == "yes"
    assert fh.passk_verdict(at | {"sft": 0.4})[0] == "partly"        # one demo method not above GRPO
    assert fh.passk_verdict(at | {"hpt_code": 0.45, "sft": 0.3})[0] == "no"


def test_heatmap_verdict():
    def diff(d0, d_mid, d_hard):
        return {0: {"a": (3, d0), "b": (5, d0)}, fh.RL_STEPS: {"a": (3, d_mid), "b": (5, d_hard)}}

    assert fh.heatmap_verdict(diff(-0.2, 0.1, 0.3))[0] == "yes"
    assert fh.heatmap_verdict(diff(-0.2, -0.3, -0.1))[0] == "partly"   # leads nowhere at the end, but (a), (c)
    assert fh.heatmap_verdict(diff(0.2, 0.1, -0.5))[0] == "no"


def test_gate_verdict():
    r = {0.0: {1: 0.1, 2: 0.1}, 0.125: {1: 0.2, 2: 0.2}, 0.25: {1: 0.3, 2: 0.3}}
    s = {0.0: {1: 0.5, 2: 0.5}, 0.125: {1: 0.4, 2: 0.4}, 0.25: {1: 0.4, 2: 0.4}}
    assert fh.gate_verdict(r, s)[0] == "yes"
    assert fh.gate_verdict(r | {0.25: {1: 0.3, 2: 0.15}}, s)[0] == "partly"
    assert fh.gate_verdict(r | {0.25: {1: 0.3, 2: 0.15}}, s | {0.25: {1: 0.9, 2: 0.9}})[0] == "no"


def test_batch_sfmse_equals_the_moments_own_for_its_target():
    """The figure's batch scale-free MSE, given a Moments' own target, is Moments.batch_scale_free_mse."""
    from theory.estimator import preset
    from theory.moments import exact_moments
    from toy.bandit import make_problem

    prob, theta = make_problem(3, 5, difficulty=[0.3, 0.6, 0.9], seed=1)
    m = exact_moments(preset("grpo"), prob, theta, 4)
    for batch in (1, 16):
        assert fh.batch_sfmse(m.mean, m.variance, m.target, batch) == pytest.approx(m.batch_scale_free_mse(batch),
                                                                                    rel=1e-12)
    assert fh.spearman({"a": 1, "b": 2, "c": 3}, {"a": 10, "b": 20, "c": 30}) == pytest.approx(1.0)
    assert fh.spearman({"a": 1, "b": 2, "c": 3}, {"a": 30, "b": 20, "c": 10}) == pytest.approx(-1.0)


def test_readers():
    rows = [{"step": 0, "eval/test/middle/avg@8": 0.2, "eval/test/hard/avg@8": 0.0},
            {"step": 1, "loss": 1.0, "entropy": 2.0}, {"step": 2, "loss": 1.0, "entropy": 4.0},
            {"step": 2, "eval/test/middle/avg@8": 0.5, "eval/test/hard/avg@8": 0.1}]
    assert fh.macro(rows) == pytest.approx(0.3) and fh.macro(rows, step=0) == pytest.approx(0.1)
    assert fh.train_mean(rows, "entropy", 1, 2) == 3.0
    with pytest.raises(ValueError, match="entropy"):
        fh.train_mean(rows, "entropy", 5, 9)
    with pytest.raises(ValueError, match="never logged"):
        fh.final(rows, "reward")


# ------------------------------------------------------------------------------------------ synthetic runs
def _synthetic(tmp_path) -> dict:
    """Runs shaped like the sweep's (metrics, eval records, pass@k results), drawn at random."""
    rng = random.Random(0)
    variants = [*fh.METHODS, *fh.GATE.values(), *fh.TABLE5.values()]
    metrics, dirs = {}, {}
    for v in dict.fromkeys(variants):
        for s in (1, 2, 3):
            d = tmp_path / v / f"seed{s}"
            d.mkdir(parents=True)
            rows, recs = [], []
            for t in range(fh.RL_STEPS + 1):
                if t:
                    rows.append({"step": t, "loss": 1.0, "reward": rng.random(), "offline_ratio": rng.random() / 4,
                                 "entropy": rng.random(), "response_length": 10 + rng.random()})
                if t % 20 == 0:
                    rows.append({"step": t, "eval/test/avg@8": rng.random(), **{
                        fh.KEY.format(c): rng.random() for c in ("middle", "hard", *(f"L{i}" for i in range(1, 7)))}})
                    recs += [{"step": t, "set": "test", "id": f"L{lv}-{i}", "level": lv, "n": 8,
                              "correct": rng.randint(0, 8), "greedy": rng.randint(0, 1)}
                             for lv in range(1, 7) for i in range(4)]
                if t % 10 == 0:
                    recs += [{"step": t, "set": "probe", "id": f"L{lv}-{i}", "level": lv, "n": 8,
                              "correct": rng.randint(0, 8), "greedy": 0} for lv in range(1, 7) for i in range(3)]
            (d / "eval_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            metrics.setdefault(v, {})[s], dirs.setdefault(v, {})[s] = rows, d
    res = lambda: {"metrics": {f"pass@{k}": min(1.0, rng.random() * k / 8) for k in fh.ks()}}   # noqa: E731
    passk = {m: {s: res() for s in (1, 2, 3)} for m in fh.METHODS} | {"base": {0: res()}}
    return {"metrics": metrics, "dirs": dirs, "passk": passk, "seconds": 120.0}


@pytest.mark.parametrize("name", ["hpt_main_table", "hpt_exclusive", "hpt_passk", "hpt_heatmaps",
                                  "hpt_validation", "hpt_dynamics", "hpt_gate", "hpt_table5",
                                  "hpt_theory_practice"])
def test_every_figure_builds_from_synthetic_runs(tmp_path, monkeypatch, name):
    from experiments.registry import FIGURES

    data = _synthetic(tmp_path / "runs")
    monkeypatch.setattr(fh, "runs", lambda: data)
    out = tmp_path / "out"
    out.mkdir()
    res = FIGURES[name].build(out)
    assert res.held in ("yes", "partly", "no") and res.finding
    assert all((out / f).stat().st_size > 0 for f in res.files)
