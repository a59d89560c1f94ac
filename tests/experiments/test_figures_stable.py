"""`ptlab figures` is byte-stable and `--fast` skips the figures registered slow (experiments/registry.py)."""

import dataclasses
import json
import random
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch

from experiments import cli, registry
from tests.experiments.conftest import stub_build

SLOW = {"projection_target_loss", "datareg_sft", "datareg_case_study", "datareg_rlvr",   # registry docstring
        "hpt_main_table", "hpt_exclusive", "hpt_passk", "hpt_heatmaps", "hpt_validation", "hpt_dynamics",
        "hpt_gate", "hpt_table5", "hpt_theory_practice",
        "xright_tradeoff", "xright_cost", "xright_tasks", "xright_k", "xright_convex", "xright_pythia_grid"}
PAPER_FIGS = Path(__file__).resolve().parents[2] / "paper_figs"


def test_the_slow_figures_are_registered_slow():
    figs = registry.discover()
    assert {n for n, f in figs.items() if f.slow} == SLOW


def test_fast_runs_every_fast_figure_and_never_a_slow_one(tmp_path, monkeypatch):
    """The real registry through the CLI: slow builds fail if called, fast ones are stubbed (to stay quick)."""
    figs = registry.discover()
    ran = []

    def must_not_run(out):
        raise AssertionError("--fast ran a slow figure")

    for name, fig in figs.items():
        build = must_not_run if fig.slow else stub_build(name, ran)
        monkeypatch.setitem(figs, name, dataclasses.replace(fig, build=build))
    assert cli.main(["figures", "--fast", "--out", str(tmp_path)]) == 0
    assert sorted(ran) == sorted(set(figs) - SLOW)
    assert sorted(p.stem for p in (tmp_path / "meta").glob("*.json")) == sorted(ran)


def test_deterministic_fixes_threads_seeds_and_style_and_puts_them_back():
    threads, width = torch.get_num_threads(), matplotlib.rcParams["lines.linewidth"]
    matplotlib.rcParams["lines.linewidth"] = 3.0
    torch.set_num_threads(2)
    try:
        with registry.deterministic():
            assert torch.get_num_threads() == 1
            assert matplotlib.rcParams["lines.linewidth"] == 1.5  # matplotlib's default, not the caller's
            draws = (random.random(), np.random.rand(), float(torch.rand(())))
        with registry.deterministic():
            assert (random.random(), np.random.rand(), float(torch.rand(()))) == draws
        assert torch.get_num_threads() == 2 and matplotlib.rcParams["lines.linewidth"] == 3.0
    finally:
        matplotlib.rcParams["lines.linewidth"] = width
        torch.set_num_threads(threads)


def test_save_figure_writes_no_version_or_date(tmp_path):
    import matplotlib.pyplot as plt

    for i in range(2):
        with registry.deterministic():
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.plot([0, 1], [1, 0])
            for ext in ("png", "svg", "pdf"):
                registry.save_figure(fig, tmp_path / f"f{i}.{ext}", dpi=50)
            plt.close(fig)
    for ext in ("png", "svg", "pdf"):
        a, b = (tmp_path / f"f0.{ext}").read_bytes(), (tmp_path / f"f1.{ext}").read_bytes()
        assert a == b, ext
        assert matplotlib.__version__.encode() not in a, ext


def test_records_keep_twelve_significant_digits():
    rec = registry._rounded({"a": [0.1 + 0.2, 1 / 3, np.float64(2.0) / 3], "b": 0.0, "c": 7, "d": float("nan"),
                             "e": True, "f": "x"})
    assert rec["a"] == [0.3, 0.333333333333, 0.666666666667]
    assert rec["b"] == 0.0 and rec["c"] == 7 and rec["d"] != rec["d"] and rec["e"] is True and rec["f"] == "x"


def test_lowest_mse_names_every_rule_tied_at_rounding_level():
    from experiments.fig_projection import _lowest_mse

    M = lambda v: type("M", (), {"mse": v})  # noqa: E731
    mom = {"Full-Training": M(0.3547501290971385), "global k=7": M(0.36), "global k=8": M(0.3547501290971384)}
    assert _lowest_mse(mom) == "Full-Training = global k=8 (tied within 1e-09 relative)"
    mom["global k=8"] = M(0.35475012)
    assert _lowest_mse(mom) == "global k=8"


def _build_twice(tmp_path, names):
    for d in ("a", "b"):
        registry.run_figures(tmp_path / d, only=names)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files
    return files


def test_one_figure_regenerates_byte_for_byte(tmp_path):
    """moments_vs_group_size (a PNG and its record, a few seconds) built twice gives the same bytes."""
    files = _build_twice(tmp_path, ["moments_vs_group_size"])
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.slow
def test_fast_figures_reproduce_the_committed_files(tmp_path):
    """Every fast figure, built here, equals paper_figs/ byte for byte (same machine kind and library versions;
    registry docstring). Fails when a change of the code was committed without `ptlab figures`."""
    names = [n for n, f in registry.discover().items() if not f.slow]
    registry.run_figures(tmp_path, only=names)
    for n in names:
        rec = json.loads((tmp_path / "meta" / f"{n}.json").read_text())
        for f in rec["files"] + [f"meta/{n}.json"]:
            assert (tmp_path / f).read_bytes() == (PAPER_FIGS / f).read_bytes(), f
