"""Float32 master weights with bf16 compute (what the shipped real configs use): one AdamW step at the HPT
configs' lr 5e-6 changes every weight; pure bf16 weights, the old configs' setting, change only a few (and
the trainer warns)."""

from __future__ import annotations

import pytest
import torch

from tests.scale.conftest import base_overrides


@pytest.fixture
def fresh_accelerate_state():
    """accelerate fixes mixed precision once per process: start and leave with a clean state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _changed_fraction(world, tmp_path, dtype, mixed) -> tuple[float, torch.dtype]:
    from accelerate.state import AcceleratorState

    from scale.config import load_config
    from scale.train import Trainer

    AcceleratorState._reset_state(True)
    ov = base_overrides(world, "sft", "sft", tmp_path / f"{dtype}_{mixed}", **{
        "run.lr": 5e-6, "run.cpu": True, "model.dtype": dtype, "run.mixed_precision": mixed, "run.max_steps": 1})
    tr = Trainer(load_config(None, ov))
    before = [p.detach().clone() for p in tr._model().parameters()]
    tr.train_step(0)
    after = list(tr._model().parameters())
    changed = sum(int((a.detach() != b).sum()) for a, b in zip(after, before))
    return changed / sum(b.numel() for b in before), after[0].dtype


def test_float32_masters_move_every_weight_at_a_small_lr(world, tmp_path, capsys, fresh_accelerate_state):
    frac, dt = _changed_fraction(world, tmp_path, "float32", "bf16")
    assert dt == torch.float32 and frac == 1.0
    assert "warning" not in capsys.readouterr().err
    frac_bf16, dt = _changed_fraction(world, tmp_path, "bfloat16", "no")
    assert dt == torch.bfloat16 and frac_bf16 < 0.5          # measured 0.08 on the tiny model
    assert "model.dtype=bfloat16 trains half-precision weights" in capsys.readouterr().err


def test_shipped_real_configs_keep_float32_masters():
    from pathlib import Path

    from scale.config import load_config

    for f in sorted((Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.yaml")):
        if f.name.startswith("tiny_"):
            continue
        c = load_config(f, [])
        assert c.model.lora.enabled or (c.model.dtype == "float32" and c.run.mixed_precision == "bf16"), f.name
