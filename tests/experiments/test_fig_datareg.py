"""The datareg_sft figure: a short build (few steps) writes its PNG and computes held from its numbers."""

import pytest

from experiments import fig_datareg


def test_short_build_writes_the_figure(tmp_path):
    res = fig_datareg.build(tmp_path, seeds=(0,), steps=6, eval_every=3)
    assert (tmp_path / "datareg_sft_ppl.png").is_file()
    assert res.held in ("yes", "partly", "no")
    assert set(res.extra["final"]) == set(fig_datareg.RULES)
    assert all(v > 1.0 for v in res.extra["final"].values())


@pytest.mark.slow
def test_full_figure(tmp_path):
    res = fig_datareg.fig_datareg_sft(tmp_path)
    assert (tmp_path / "datareg_sft_ppl.png").is_file() and res.finding
