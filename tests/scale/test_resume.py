"""Resume: an interrupted run continued from its checkpoint ends with exactly the parameters of an
uninterrupted run (CPU); a crash while a checkpoint is written leaves the previous one usable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from experiments.cli import main as cli
from scale import checkpoint as ckpt
from tests.scale.conftest import base_overrides, read_metrics

CASES = {  # generation (RNG state), ALRIGHT's seeded draws, and HPT's gate + SFT rows
    "grpo": ("rl", "rl", {}),
    "alright": ("sft_dpo", "joint", {"method.joint.schedule": "alright"}),
    "hpt": ("hpt", "rl", {"method.hpt.gamma": 0.5}),
}


def _run(world, out: Path, method, data, extra, *more):
    ov = base_overrides(world, method, data, out, **{"run.max_steps": 4, "run.save_model": True, **extra})
    assert cli(["train", *_cfg(out), *ov, *more]) == 0


def _cfg(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    f = out.parent / f"{out.name}.yaml"
    f.write_text("{}\n")
    return [str(f)]


def _final(out: Path):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_uninterrupted(world, tmp_path, case):
    method, data, extra = CASES[case]
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(world, full, method, data, extra)
    _run(world, cut, method, data, extra, "run.stop_after=2")
    assert not (cut / "final").exists()
    assert ckpt.latest(cut).name == "step-000002"
    _run(world, cut, method, data, extra, "run.resume=true")
    a, b = _final(full), _final(cut)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in read_metrics(cut)] == [1, 2, 3, 4]
    la, lb = read_metrics(full), read_metrics(cut)
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_resume_datareg_cycles_like_uninterrupted(world, tmp_path):
    """The datareg engine's target cycling and random control follow the trainer's checkpointed step."""
    extra = {"datareg.update_rule": "layerwise_subset", "datareg.selection": "random", "datareg.k": 2,
             "datareg.target_path": str(world["target"])}
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(world, full, "sft", "general", extra)
    _run(world, cut, "sft", "general", extra, "run.stop_after=2")
    _run(world, cut, "sft", "general", extra, "run.resume=true")
    a, b = _final(full), _final(cut)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_crash_while_writing_keeps_previous_checkpoint(world, tmp_path, monkeypatch):
    from scale.train import Trainer

    method, data, extra = CASES["grpo"]
    full, crash = tmp_path / "full", tmp_path / "crash"
    _run(world, full, method, data, extra)
    original = Trainer.save_checkpoint

    def failing(self, _fail=False):
        return original(self, _fail=self.step == 3)

    monkeypatch.setattr(Trainer, "save_checkpoint", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(world, crash, method, data, extra, "run.save_every=1")
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    root = crash / "checkpoints"
    assert (root / "step-000003.tmp").is_dir()              # the half-written one
    assert ckpt.latest(crash).name == "step-000002"         # the pointer still names the complete one
    _run(world, crash, method, data, extra, "run.resume=true")
    a, b = _final(full), _final(crash)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list(root.glob("*.tmp"))                     # cleaned by the next save


def test_pointer_to_incomplete_checkpoint_is_named(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000001").mkdir(parents=True)
    ckpt.write_pointer(root, "step-000001")
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.latest(tmp_path)
