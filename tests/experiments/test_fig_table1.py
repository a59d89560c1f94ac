"""`ptlab table1` / the table1 figure: rendered from the presets, checked against references."""

from experiments import fig_table1
from experiments.cli import main
from theory.estimator import PRESETS, UPGE


def test_table1_renders_every_preset_and_writes_the_index(tmp_path):
    assert main(["table1", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "table1.md").read_text()
    tex = (tmp_path / "table1.tex").read_text()
    for name in PRESETS:
        assert f"`{name}`" in md
        assert name.replace("_", r"\_") in tex
    index = (tmp_path / "README.md").read_text()
    assert "| table1 |" in index and "| yes |" in index
    # every Markdown row has the header's number of cells (escaped pipes do not split cells)
    rows = [line for line in md.splitlines() if line.startswith("|")]
    counts = {len(line.replace("\\|", "").split("|")) for line in rows}
    assert len(counts) == 1


def test_a_new_preset_appears_with_no_other_edit(monkeypatch):
    extra = dict(PRESETS)
    extra["my_method"] = UPGE(name="my_method", reference="old", advantage="rloo", mask="dual_clip",
                              aggregation="token_mean")
    monkeypatch.setattr(fig_table1, "PRESETS", extra)
    md, tex, checks = fig_table1.render(extra)
    assert "`my_method`" in md and "dual clip (c=3)" in md and "my\\_method" in tex
    assert checks["my_method"] is None  # no plain-loop reference for it: said, not invented


def test_reference_check_detects_a_wrong_estimator():
    """The 'checked' column can fail: GRPO's reference against an estimator with another aggregation."""
    wrong = PRESETS["grpo"].replace(aggregation="token_mean")
    assert fig_table1.reference_check("grpo", wrong) > 1e-6
    assert fig_table1.reference_check("grpo", PRESETS["grpo"]) < 1e-12


def test_fast_skips_slow_figures_and_the_index_keeps_earlier_rows(tmp_path, monkeypatch):
    """`--fast` leaves slow figures out; a later `--only` run refreshes its row and keeps the others."""
    from experiments import registry
    from tests.experiments.conftest import stub_build

    calls = []
    figs = {"quick": registry.Figure("quick", "r", stub_build("quick", calls)),
            "long": registry.Figure("long", "r", stub_build("long", calls), slow=True)}
    monkeypatch.setattr(registry, "discover", lambda: figs)
    assert registry.run_figures(tmp_path, include_slow=False) == ["quick"]
    assert registry.run_figures(tmp_path, only=["long"]) == ["long"]
    index = (tmp_path / "README.md").read_text()
    assert "| quick |" in index and "| long |" in index and calls == ["quick", "long"]
