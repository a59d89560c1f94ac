"""Build the projection figures into a tmp dir (the curves figure at a tiny size; the full size is slow)."""

import pytest

from experiments.fig_projection import CURVE_RULES, build_curves, build_spectrum


def test_spectrum_figure_builds(tmp_path):
    res = build_spectrum(tmp_path)
    assert (tmp_path / "projection_spectrum.png").stat().st_size > 0
    assert res.held in ("yes", "partly", "no") and "Target-only" in res.finding
    bias_t, var_t, _ = res.extra["Target-only"]
    bias_f, var_f, _ = res.extra["Full-Training"]
    assert var_t > var_f and bias_f > bias_t  # the two ends of the spectrum


def test_curves_figure_builds_small(tmp_path):
    res = build_curves(tmp_path, steps=40, seeds=(0, 1))
    assert (tmp_path / "projection_target_loss.png").stat().st_size > 0
    assert set(res.extra["final"]) == set(CURVE_RULES)
    assert set(res.extra["sweep"]) == {f"{g} k={k}" for g in ("global", "block", "layer") for k in (1, 2, 4, 6)}
    # held follows the computed claims, not a typed value
    claims = res.extra["claims"]
    core = claims["overfits"] and claims["biased"] and claims["beat_both"] and claims["projection"]
    assert (res.held == "yes") == (core and claims["layerwise_best"])


@pytest.mark.slow
def test_curves_figure_full(tmp_path):
    """The default run (5 seeds x 2000 steps, about 30 s) shows the paper's curve shape: Target-only
    overfits (mean held-out final/min > 1.5), both subset rules end below Target-only and Full-Training,
    the Cone projection between or below, Layer-Wise at or below Global."""
    res = build_curves(tmp_path)
    assert res.held == "yes", res.finding
    assert min(res.extra["target_only_ratio"]) > 1.5
