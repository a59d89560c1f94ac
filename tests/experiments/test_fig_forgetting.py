"""The forgetting figures build into a temporary folder, and their verdicts are computed, not typed."""

import json

from experiments.registry import discover, run_figures


def test_forgetting_figures_build(tmp_path):
    names = ["forgetting_toy", "forgetting_tradeoff", "forgetting_seq_bound"]
    figs = discover()
    assert all(n in figs and not figs[n].slow for n in names)
    run_figures(tmp_path, only=names)
    for n in names:
        meta = json.loads((tmp_path / "meta" / f"{n}.json").read_text())
        assert meta["held"] in {"yes", "no", "partly"} and meta["finding"] and meta["caption"]
        for f in meta["files"]:
            assert (tmp_path / f).stat().st_size > 10_000
    toy = json.loads((tmp_path / "meta" / "forgetting_toy.json").read_text())
    gaps = toy["extra"]["gaps"]
    assert gaps["Sequential SFT->DPO"] > 0.1 and gaps["ALRIGHT"] < 1e-3
    assert json.loads((tmp_path / "meta" / "forgetting_seq_bound.json").read_text())["held"] == "yes"
