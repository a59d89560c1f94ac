"""`ptlab ideal-point`: each run trains one objective only (the other's weight is 0 on every step), f* are the
final train-set values the runs logged, finished runs are reused, and a config that is not joint fails
naming method.name."""

from __future__ import annotations

import json

from experiments.cli import main as cli
from tests.scale.conftest import base_overrides, read_metrics


def _config(tmp_path):
    path = tmp_path / "joint.yaml"
    path.write_text("method: {name: sft_dpo}\n")
    return str(path)


def _overrides(world, out):
    ov = base_overrides(world, "sft_dpo", "sft", out, **{"data.pref_path": str(world["dpo"]), "run.lr": 1e-3,
                                                        "eval.sets": [{"name": "h", "path": str(world["sft"]),
                                                                       "kind": "sft", "limit": 4}]})
    return [o for o in ov if not o.startswith("run.output_dir=")]


def test_ideal_point_runs_each_objective_alone(world, tmp_path):
    out = tmp_path / "ip"
    assert cli(["ideal-point", _config(tmp_path), *_overrides(world, out), "--out", str(out)]) == 0
    res = json.loads((out / "ideal_point.json").read_text())
    for objective, other, key in (("sft", "dpo", "eval/train_sft/f_sft"), ("dpo", "sft", "eval/train_pref/f_dpo")):
        rows = read_metrics(out / objective)
        steps = [r for r in rows if "loss" in r]
        assert len(steps) == 2 and all(r[f"w_{other}"] == 0 and r[f"w_{objective}"] == 1 for r in steps)
        assert res[f"f_star_{objective}"] == [r[key] for r in rows if key in r][-1]
    assert res["heldout"]["h"] == [r["eval/h/f_sft"] for r in read_metrics(out / "sft") if "eval/h/f_sft" in r][-1]
    assert res["f_star_dpo"] < 0.693    # below log 2: the DPO-only run moved away from the reference

    before = (out / "sft" / "metrics.jsonl").read_text()
    # a second call reuses the finished runs
    assert cli(["ideal-point", _config(tmp_path), *_overrides(world, out), "--out", str(out)]) == 0
    assert (out / "sft" / "metrics.jsonl").read_text() == before
    assert json.loads((out / "ideal_point.json").read_text())["f_star_sft"] == res["f_star_sft"]


def test_ideal_point_needs_a_joint_config(world, tmp_path, capsys):
    ov = [o.replace("method.name=sft_dpo", "method.name=sft") for o in _overrides(world, tmp_path)]
    assert cli(["ideal-point", _config(tmp_path), *ov, "--out", str(tmp_path / "x")]) == 2
    assert "method.name" in capsys.readouterr().err
