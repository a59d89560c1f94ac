"""Build the projection figures into a tmp dir (the curves figure at a tiny size; full size is slow)."""

import pytest

from experiments.fig_projection import build_curves, build_spectrum


def test_spectrum_figure_builds(tmp_path):
    res = build_spectrum(tmp_path)
    assert (tmp_path / "projection_spectrum.png").stat().st_size > 0
    assert res.held in ("yes", "partly", "no") and "Target-only" in res.finding
    bias_t, var_t, _ = res.extra["Target-only"]
    bias_f, var_f, _ = res.extra["Full-Training"]
    assert var_t > var_f and bias_f > bias_t  # the two ends of the spectrum


def test_curves_figure_builds_small(tmp_path):
    res = build_curves(tmp_path, steps=20, seeds=(0,))
    assert (tmp_path / "projection_target_loss.png").stat().st_size > 0
    assert set(res.extra["final"]) == {"Target-only", "Full-Training", "Global Subset", "Layer-Wise Subset",
                                       "Cone projection"}


@pytest.mark.slow
def test_curves_figure_full(tmp_path):
    """What the full-size run showed (3 seeds): Full-Training ends worst (its bias), the Cone projection best."""
    res = build_curves(tmp_path)
    fin = res.extra["final"]
    assert fin["Full-Training"] == max(fin.values()) and fin["Cone projection"] == min(fin.values())
