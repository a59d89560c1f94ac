"""The moments figures build (fast: a few seconds) and report computed findings."""

import json

from experiments.registry import run_figures


def test_fig_moments_build(tmp_path):
    names = ["moments_vs_group_size", "moments_vs_policy_quality", "moments_table1"]
    assert run_figures(tmp_path, only=names) == names
    for n in names:
        rec = json.loads((tmp_path / "meta" / f"{n}.json").read_text())
        assert rec["held"] in ("yes", "no", "partly") and rec["finding"]
        for f in rec["files"]:
            assert (tmp_path / f).stat().st_size > 0
    table = (tmp_path / "moments_table1.md").read_text()
    assert "| grpo |" in table and "| luffy |" in table and "hpt_code+gate" in table
