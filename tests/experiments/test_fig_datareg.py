"""The datareg_sft figure: its verdict rule on hand-made numbers, its data files, and a build from synthetic
runs shaped like the sweep's (the real runs take minutes: slow figure)."""

import math
import random

import pytest

from experiments import fig_datareg as fd


def test_verdict_rule():
    ppl = {"full": {1: 3.0, 2: 3.2}, "global_subset": {1: 2.5, 2: 2.6}, "layerwise_subset": {1: 2.0, 2: 2.1},
           "target_only": {1: 5.0, 2: 6.0}}
    acc = {"full": {1: 0.1}, "global_subset": {1: 0.2}, "layerwise_subset": {1: 0.3}}
    held, claims = fd.verdict(ppl, {s: 1.5 for s in range(1, 6)}, acc)
    assert held == "yes" and all(claims.values())
    held, claims = fd.verdict(ppl, {1: 1.5, 2: 1.5, 3: 1.05, 4: 1.0, 5: 1.5}, {**acc, "full": {1: 0.3}})
    assert held == "partly" and claims == {"A_layerwise_lt_global_lt_full": True,
                                          "B_target_only_overfits_in_4_of_5": False,
                                          "C_layerwise_best_task_metric": False}   # a tie is not best
    flipped = {**ppl, "full": {1: 1.0, 2: 1.0}}
    assert fd.verdict(flipped, {1: 1.0}, {**acc, "layerwise_subset": {1: 0.0}})[0] == "no"


def test_written_data_separates_target_and_pool(tmp_path):
    import json

    paths = fd.write_data(tmp_path)
    rows = {k: [json.loads(x) for x in p.read_text().splitlines()] for k, p in paths.items()}
    assert len(rows["general"]) == 256 * len(fd.POOL_LEVELS) and len(rows["target"]) == 256
    assert all(r["prompt"].count("+") + r["prompt"].count("-") == 2 for r in rows["target"])   # three operands
    assert not {r["prompt"] for r in rows["heldout_target"]} & {r["prompt"] for r in rows["target"]}
    assert [r["prompt"] for r in rows["heldout_target"]] == [r["prompt"] for r in rows["heldout_target_sft"]]


def test_builds_from_synthetic_runs(tmp_path, monkeypatch):
    rng = random.Random(0)

    def rows():
        out = [{"step": t, "step_time": 0.1, "datareg/score_positive": rng.random(), "datareg/overlap": rng.random()}
               for t in range(1, fd.STEPS + 1)]
        out += [{"step": t, fd.NLL: math.log(1 + rng.random() * 3)} for t in range(0, fd.STEPS + 1, 25)]
        return out + [{"step": fd.STEPS, fd.ACC: rng.random()}]

    by = {r: {s: {"rows": rows()} for s in range(1, 6)} for r in fd.RULES}
    monkeypatch.setattr(fd, "runs", lambda: {"by": by, "seconds": 60.0})
    res = fd.fig_datareg_sft(tmp_path)
    assert res.held in ("yes", "partly", "no") and all((tmp_path / f).stat().st_size > 0 for f in res.files)
    assert set(res.extra["overfit"]) == set(range(1, 6))


@pytest.mark.slow
def test_full_figure(tmp_path):
    res = fd.fig_datareg_sft(tmp_path)
    assert (tmp_path / "datareg_sft_ppl.png").is_file() and res.finding


def test_case_verdict():
    types = fd.TYPES
    mag = {t: 1.0 for t in types} | {"down_proj": 5.0}
    rho = {t: 0.2 for t in types} | {"down_proj": 0.5}
    assert fd.case_verdict(mag, rho, {t: 0.9 for t in types})[0] == "yes"
    held, c = fd.case_verdict(mag | {"q_proj": 9.0}, rho | {"k_proj": -0.1}, {t: 0.9 for t in types})
    assert held == "partly" and c == {"A_down_largest": False, "B_all_positive_down_highest": False,
                                      "C_sketch_agrees_0.8": True}


def test_rlvr_verdict():
    acc = {"full": {1: 0.63}, "global_subset": {1: 0.62}, "layerwise_subset": {1: 0.64}}
    assert fd.rlvr_verdict(acc)[0] == "yes"
    assert fd.rlvr_verdict({**acc, "global_subset": {1: 0.635}})[0] == "partly"
    assert fd.rlvr_verdict({**acc, "layerwise_subset": {1: 0.60}})[0] == "no"
