"""Pipelines (scale/stages.py): SFT -> GRPO as one command equals the hand-chained pair of runs, per-stage and
common overrides land where they should, a stopped pipeline continues where it stopped, and bad pipeline
files fail naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiments.cli import main as cli
from scale.stages import load_pipeline
from tests.scale.conftest import base_overrides, read_metrics


def _configs(world, tmp_path) -> Path:
    """A two-stage pipeline file (sft then rl on the tiny world) whose stage configs hold the test settings."""
    for name, method, data in (("sft", "sft", "sft"), ("rl", "rl", "rl")):
        ov = dict(o.split("=", 1) for o in base_overrides(world, method, data, tmp_path / "unused"))
        ov.pop("run.output_dir")
        raw: dict = {}
        for k, v in ov.items():
            node = raw
            for part in k.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[k.split(".")[-1]] = yaml.safe_load(v) if v.strip() else ""   # as load_config reads overrides
        (tmp_path / f"{name}.yaml").write_text(json.dumps(raw))
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(json.dumps({"output_dir": str(tmp_path / "pipe"), "stages": [
        {"name": "sft", "config": str(tmp_path / "sft.yaml")},
        {"name": "rl", "config": str(tmp_path / "rl.yaml"), "overrides": ["run.lr=0.002"]}]}))
    return pipe


def test_pipeline_equals_the_hand_chained_runs(world, tmp_path):
    pipe = _configs(world, tmp_path)
    assert cli(["train", str(pipe), "run.seed=3", "rl.run.max_steps=3"]) == 0
    out = tmp_path / "pipe"
    rl_cfg = json.loads((out / "rl" / "config.json").read_text())
    assert rl_cfg["model"]["path"] == str(out / "sft" / "final") and rl_cfg["run"]["lr"] == 0.002
    assert rl_cfg["run"]["seed"] == 3 and rl_cfg["run"]["max_steps"] == 3
    merged = read_metrics(out)
    assert [(r["stage"], r["step"]) for r in merged] == [("sft", 1), ("sft", 2), ("rl", 3), ("rl", 4), ("rl", 5)]
    # by hand: the rl config from the sft stage's final model, same seed and overrides
    hand = tmp_path / "hand"
    assert cli(["train", str(tmp_path / "rl.yaml"), f"model.path={out / 'sft' / 'final'}", "run.lr=0.002",
                "run.seed=3", "run.max_steps=3", f"run.output_dir={hand}"]) == 0
    assert [r["loss"] for r in read_metrics(hand)] == [r["loss"] for r in merged if r["stage"] == "rl"]


def test_a_stopped_pipeline_continues(world, tmp_path):
    pipe = _configs(world, tmp_path)
    assert cli(["train", str(pipe), "sft.run.stop_after=1"]) == 0
    out = tmp_path / "pipe"
    assert not (out / "rl").exists() and [r["step"] for r in read_metrics(out / "sft")] == [1]
    assert cli(["train", str(pipe)]) == 0
    assert [(r["stage"], r["step"]) for r in read_metrics(out)] == [("sft", 1), ("sft", 2), ("rl", 3), ("rl", 4)]
    full = tmp_path / "full"
    full.mkdir()
    pipe2 = _configs(world, full)
    assert cli(["train", str(pipe2)]) == 0
    assert [r["loss"] for r in read_metrics(full / "pipe")] == pytest.approx([r["loss"] for r in read_metrics(out)])


def test_bad_pipelines_name_the_key(world, tmp_path):
    pipe = _configs(world, tmp_path)
    good = json.loads(pipe.read_text())
    for change, msg in [({"stagez": []}, "stagez: unknown key"),
                        ({"stages": []}, "stages: expected a non-empty list"),
                        ({"stages": good["stages"][:1] * 2}, "distinct name"),
                        ({"stages": [{**good["stages"][0], "override": []}]}, r"stages\[0\]: expected keys")]:
        pipe.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=msg):
            load_pipeline(pipe, [])
    pipe.write_text(json.dumps(good))
    with pytest.raises(ValueError, match=r"stages\[1\] \(rl\): run.lr"):
        load_pipeline(pipe, ["rl.run.lr=fast"])
