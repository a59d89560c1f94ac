"""`ptlab sweep`: validation, cells and commands, statistics, report, and resuming with a fake trainer.

No model is trained: the resume tests replace `sweep.cell_command` with a few lines of Python that write
a metrics.jsonl into the cell folder, as the trainer would.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from scipy import stats

from experiments import sweep as sw
from experiments.cli import main


@pytest.fixture
def configs(tmp_path, monkeypatch):
    """Two (empty) training configs; the working directory is tmp_path so relative paths resolve there."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("run: {}\n")
    return tmp_path


def spec(**changes) -> dict:
    """A small valid sweep mapping (2 methods x 2 seeds), with top-level keys replaced by `changes`."""
    raw = {"name": "t", "out": "out", "seeds": [1, 2], "overrides": ["run.max_steps=3"],
           "methods": {"a": {"config": "a.yaml", "overrides": ["run.lr=1e-4"]}, "b": {"config": "b.yaml"}},
           "metrics": ["eval/test/avg@8"], "baseline": "b"}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("changes, key", [
    ({"colour": 1}, "colour"),
    ({"name": None}, "name"),
    ({"name": "a/b"}, "name"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, 1]}, "seeds"),
    ({"seeds": [1, "2"]}, "seeds"),
    ({"jobs": 0}, "jobs"),
    ({"jobs": True}, "jobs"),
    ({"threads": "2"}, "threads"),
    ({"out": 3}, "out"),
    ({"overrides": ["run.max_steps"]}, "overrides"),
    ({"metrics": []}, "metrics"),
    ({"metrics": None}, "metrics"),
    ({"methods": {}}, "methods"),
    ({"methods": {"a": {"config": "missing.yaml"}}}, "methods.a.config"),
    ({"methods": {"a": {}}}, "methods.a.config"),
    ({"methods": {"a": {"config": "a.yaml", "seed": 1}}}, "methods.a.seed"),
    ({"methods": {"a": {"config": "a.yaml", "overrides": "run.lr=1"}}}, "methods.a.overrides"),
    ({"methods": {"a__x": {"config": "a.yaml"}}}, "methods.a__x"),
    ({"grid": {"method.hpt.gamma": []}}, "grid.method.hpt.gamma"),
    ({"grid": {"method.hpt.gamma": [{"x": 1}]}}, "grid.method.hpt.gamma"),
    ({"grid": {"bad key": [1]}}, "grid"),
    ({"baseline": "c"}, "baseline"),
])
def test_validation_errors_name_the_key(configs, changes, key):
    with pytest.raises(ValueError, match=f"^{key.replace('.', '[.]')}[: ]"):
        sw.parse_sweep(spec(**changes))


def test_defaults_and_a_missing_sweep_file(configs):
    s = sw.parse_sweep(spec(out=None, baseline=None))
    assert (s.out, s.jobs, s.threads, s.baseline) == (Path("runs/sweeps/t"), 1, 1, None)
    with pytest.raises(ValueError, match="sweep file not found"):
        sw.load_sweep(configs / "nope.yaml")
    (configs / "s.yaml").write_text(yaml.safe_dump(spec(seeds=[])))
    assert main(["sweep", str(configs / "s.yaml"), "--dry-run"]) == 2  # clear error line, no traceback


# ---------------------------------------------------------------------------------------------- cells


def test_cells_folders_and_commands_with_a_grid(configs, capsys):
    s = sw.parse_sweep(spec(grid={"method.hpt.gamma": [0, 0.125]}, baseline=None,
                            methods={"a": {"config": "a.yaml", "overrides": ["run.lr=1e-4"],
                                           "grid": {"run.lr": ["1e-3"]}},
                                     "b": {"config": "b.yaml"}}))
    assert [v.name for v in s.variants] == ["a__gamma=0,lr=1e-3", "a__gamma=0.125,lr=1e-3",
                                            "b__gamma=0", "b__gamma=0.125"]
    cs = sw.cells(s)
    assert len(cs) == 8 and [c.seed for c in cs] == [1] * 4 + [2] * 4
    c = cs[1]
    assert c.dir == Path("out/a__gamma=0.125,lr=1e-3/seed1")
    assert sw.cell_command(s, c) == [
        sys.executable, "-m", "experiments.cli", "train", "a.yaml", "run.max_steps=3", "run.lr=1e-4",
        "method.hpt.gamma=0.125", "run.lr=1e-3", "run.seed=1", f"run.output_dir={c.dir}", "run.progress=false"]
    (configs / "s.yaml").write_text(yaml.safe_dump(spec()))
    assert main(["sweep", "s.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("experiments.cli train") == 4 and "[4/4] b seed=2" in out
    assert not Path("out").exists()  # a dry run creates nothing


def test_baseline_pairs_by_grid_point_or_is_single(configs):
    s = sw.parse_sweep(spec(grid={"method.hpt.gamma": [0, 1]}))
    v = {x.name: x for x in s.variants}
    assert sw.baseline_for(s, v["a__gamma=1"]).name == "b__gamma=1"
    assert sw.baseline_for(s, v["b__gamma=1"]) is None
    s = sw.parse_sweep(spec(methods={"a": {"config": "a.yaml", "grid": {"x.y": [1, 2]}}, "b": {"config": "b.yaml"}}))
    assert {sw.baseline_for(s, x).name for x in s.variants if x.method == "a"} == {"b"}


# ---------------------------------------------------------------------------------------------- statistics


def test_t_interval_textbook_value():
    # mean 3, s = sqrt(2.5), t(0.975, 4) = 2.776445: half-width 2.776445 * sqrt(2.5 / 5) = 1.963243
    lo, hi = sw.t_interval([1, 2, 3, 4, 5])
    assert lo == pytest.approx(3 - 1.963243, abs=1e-6) and hi == pytest.approx(3 + 1.963243, abs=1e-6)
    ref = stats.t.interval(0.95, 2, loc=0.5, scale=stats.sem([0.2, 0.5, 0.8]))
    assert sw.t_interval([0.2, 0.5, 0.8]) == pytest.approx(ref)
    assert sw.t_interval([0.4]) is None


def test_cell_values_and_mean_curve():
    rows = [{"step": 0, "m": 0.3}, {"step": 1, "loss": 2.0}, {"step": 2, "m": 0.5}, {"step": 3, "loss": 1.0}]
    assert sw.cell_values(rows, "m") == (0.5, 0.3)
    assert sw.cell_values(rows[1:], "m") == (0.5, None)
    assert sw.cell_values(rows, "absent") == (None, None)
    steps, mean, lo, hi = sw.mean_curve([{0: 1.0, 2: 3.0, 4: 5.0}, {0: 3.0, 2: 1.0}])
    assert steps.tolist() == [0, 2] and mean.tolist() == [2.0, 2.0] and lo.tolist() == [1.0, 1.0]
    assert hi.tolist() == [3.0, 3.0]


def write_cell(root: Path, variant: str, seed: int, initial: float, final: float, done: bool = True) -> None:
    d = root / variant / f"seed{seed}"
    d.mkdir(parents=True)
    rows = [{"step": 0, "eval/test/avg@8": initial}, {"step": 1, "loss": 1.0},
            {"step": 2, "eval/test/avg@8": (initial + final) / 2}, {"step": 4, "eval/test/avg@8": final}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # torn line
    if done:
        (d / "DONE.json").write_text(json.dumps({"seconds": 1.0, "returncode": 0, "command": []}))


def test_paired_differences_and_report_on_synthetic_cells(configs, capsys):
    for seed, (a, b) in {1: (0.5, 0.4), 2: (0.6, 0.3), 3: (0.2, 0.3)}.items():
        write_cell(Path("out"), "a", seed, 0.1, a)
        write_cell(Path("out"), "b", seed, 0.1, b, done=seed != 3)  # b's seed 3 is unfinished: left out
    p = sw.paired_differences({1: 0.5, 2: 0.6, 3: 0.2}, {1: 0.4, 2: 0.3})
    assert p["seeds"] == [1, 2] and p["diffs"] == pytest.approx([0.1, 0.3]) and p["better"] == 2
    assert p["mean"] == pytest.approx(0.2) and p["ci"] == pytest.approx(sw.t_interval([0.1, 0.3]))
    assert sw.paired_differences({1: 0.5}, {2: 0.5}) is None

    (configs / "s.yaml").write_text(yaml.safe_dump(spec(seeds=[1, 2, 3])))
    assert main(["sweep", "s.yaml", "--report-only"]) == 0
    report = json.loads(Path("out/report.json").read_text())
    assert report["cells_done"] == 5 and report["cells_total"] == 6
    fa = report["variants"]["a"]["metrics"]["eval/test/avg@8"]
    assert fa["final"]["n"] == 3 and fa["final"]["mean"] == pytest.approx(13 / 30)
    assert fa["gain"]["mean"] == pytest.approx(13 / 30 - 0.1)
    assert report["variants"]["b"]["metrics"]["eval/test/avg@8"]["final"]["n"] == 2
    paired = report["paired"]["a"]
    assert paired["baseline"] == "b" and paired["metrics"]["eval/test/avg@8"]["diffs"] == pytest.approx([0.1, 0.3])
    md = Path("out/report.md").read_text()
    assert md in capsys.readouterr().out
    assert "## Paired differences vs baseline `b`" in md and "| a | b | 2 | 0.2 |" in md and "2/2" in md
    assert Path("out/curves.png").stat().st_size > 1000
    rows = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert all(ln.replace("\\|", "").count("|") in (10, 9) for ln in rows)  # every row has its table's width


# ---------------------------------------------------------------------------------------------- resuming

FAKE = """
import json, pathlib, sys
out, seed, fail = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
with open(sys.argv[4], "a") as f:
    f.write(f"{out}\\n")
print("fake trainer in", out)
if fail:
    print("boom: the fake trainer fails"); sys.exit(3)
out.mkdir(parents=True, exist_ok=True)
rows = [{"step": 0, "eval/test/avg@8": 0.1}, {"step": 1, "eval/test/avg@8": 0.1 * seed}]
(out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
"""


@pytest.fixture
def fake_trainer(configs, monkeypatch):
    """Cells run FAKE instead of `ptlab train`; method `bad` fails. Returns the list file of started cells."""
    calls = configs / "calls.txt"

    def command(sweep, cell):
        fail = "1" if cell.variant.method == "bad" else "0"
        return [sys.executable, "-c", FAKE, str(cell.dir), str(cell.seed), fail, str(calls)]

    monkeypatch.setattr(sw, "cell_command", command)
    return calls


def started(calls: Path) -> list[str]:
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return lines


def test_resume_skips_done_cells_and_cleans_interrupted_ones(configs, fake_trainer, capsys):
    (configs / "s.yaml").write_text(yaml.safe_dump(spec(jobs=2)))
    assert main(["sweep", "s.yaml"]) == 0
    assert len(started(fake_trainer)) == 4
    out = capsys.readouterr().out
    assert "done in" in out and "eval/test/avg@8=0.2" in out
    done = json.loads(Path("out/a/seed1/DONE.json").read_text())
    assert done["returncode"] == 0 and done["seconds"] > 0 and done["command"][1] == "-c"
    assert "fake trainer in" in Path("out/a/seed1/log.txt").read_text()

    assert main(["sweep", "s.yaml"]) == 0  # second run: nothing to do
    assert started(fake_trainer) == [] and capsys.readouterr().out.count("skip (done)") == 4

    Path("out/b/seed2/DONE.json").unlink()  # as if killed: folder left without DONE.json
    Path("out/b/seed2/stale.txt").write_text("from the interrupted run")
    assert main(["sweep", "s.yaml", "--jobs", "1"]) == 0
    assert started(fake_trainer) == [str(Path("out/b/seed2"))]
    assert not Path("out/b/seed2/stale.txt").exists() and Path("out/b/seed2/DONE.json").exists()


def test_a_cell_running_in_another_sweep_is_left_alone(configs, fake_trainer, capsys):
    """Two sweeps over one folder: a cell whose RUNNING.json names a live process is skipped, not deleted;
    one naming a dead process is an interrupted cell (cleaned and rerun); no RUNNING.json is left behind."""
    import subprocess

    (configs / "s.yaml").write_text(yaml.safe_dump(spec(jobs=1)))
    live = Path("out/a/seed1")
    live.mkdir(parents=True)
    (live / "RUNNING.json").write_text(json.dumps({"pid": os.getpid()}))   # this test process: alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    Path("out/b/seed1").mkdir(parents=True)
    Path("out/b/seed1/RUNNING.json").write_text(json.dumps({"pid": int(dead.stdout)}))   # exited: not alive
    assert main(["sweep", "s.yaml"]) == 0
    assert str(live) not in started(fake_trainer) and (live / "RUNNING.json").exists()
    assert "skip (running elsewhere" in capsys.readouterr().out
    assert Path("out/b/seed1/DONE.json").exists() and not list(Path("out").glob("b/*/RUNNING.json"))


def test_a_failing_cell_does_not_stop_the_others(configs, fake_trainer, capsys):
    methods = {"a": {"config": "a.yaml"}, "bad": {"config": "b.yaml"}}
    (configs / "s.yaml").write_text(yaml.safe_dump(spec(methods=methods, baseline="a", jobs=2)))
    assert main(["sweep", "s.yaml"]) == 1
    assert len(started(fake_trainer)) == 4
    captured = capsys.readouterr()
    assert "bad seed=1 FAILED (exit 3)" in captured.out and "boom: the fake trainer fails" in captured.out
    assert "2 cell(s) failed" in captured.err and "bad seed=2" in captured.err
    assert not Path("out/bad/seed1/DONE.json").exists() and Path("out/a/seed2/DONE.json").exists()
    assert main(["sweep", "s.yaml"]) == 1  # the failed cells are retried, the finished ones skipped
    assert sorted(started(fake_trainer)) == [str(Path("out/bad/seed1")), str(Path("out/bad/seed2"))]


def test_a_changed_sweep_file_does_not_mix_with_finished_cells(configs, fake_trainer, monkeypatch):
    s = sw.parse_sweep(spec(seeds=[1]))
    assert sw.run_sweep(s) == []
    original = sw.cell_command
    monkeypatch.setattr(sw, "cell_command", lambda sweep, cell: [*original(sweep, cell), "extra=1"])
    with pytest.raises(ValueError, match="^out: 2 finished cell"):
        sw.run_sweep(s)
