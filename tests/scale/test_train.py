"""Every method runs a few steps on the tiny model through the CLI; the trainer's losses equal
theory.estimator on the same tensors; schedule decisions equal theory.schedules'; bad input fails early."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import main as cli
from tests.scale.conftest import base_overrides, read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
RUNS = [  # (config, data set, extra overrides)
    ("tiny_sft.yaml", "sft", {}),
    ("tiny_dpo.yaml", "dpo", {}),
    ("tiny_grpo.yaml", "rl", {}),
    ("tiny_hpt_paper.yaml", "rl", {"method.hpt.gamma": 0.5}),
    ("tiny_hpt_code.yaml", "rl", {"method.rl.entropy_coef": 0.001, "run.skip_grad_norm": 80.0}),
    ("tiny_luffy.yaml", "rl", {}),
    ("tiny_srft.yaml", "rl", {}),
    ("tiny_grpo.yaml", "rl", {"method.rl.estimator": "dapo", "method.rl.mini_batches": 2, "method.rl.kl_coef": 0.1}),
    ("tiny_sequential.yaml", "joint", {}),
    ("tiny_mix.yaml", "joint", {}),
    ("tiny_alright.yaml", "joint", {}),
    ("tiny_maxright.yaml", "joint", {"method.joint.k": 1}),
]


def _params(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("config,data,extra", RUNS, ids=[f"{c[:-5]}-{i}" for i, (c, _, _) in enumerate(RUNS)])
def test_method_runs_through_cli(world, tmp_path, config, data, extra):
    out = tmp_path / "run"
    ov = base_overrides(world, "", data, out, **{"run.save_model": True, **extra})
    ov = [o for o in ov if not o.startswith("method.name=")]
    assert cli(["train", str(CONFIGS / config), *ov]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "grad_norm", "entropy", "tokens_per_s", "offline_ratio", "lr"):
            assert math.isfinite(r[k]), (k, r)
    if data == "rl":
        for k in ("reward", "accuracy", "response_length", "clip_fraction", "kl"):
            assert math.isfinite(rows[-1][k]), k
    before, after = _params(world["model"]), _params(out / "final")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no parameter changed"
    assert (out / "checkpoints" / "LATEST").is_file()


def test_cli_subprocess_sft(world, tmp_path):
    """The installed entry point path: `python -m experiments.cli train ...` in a fresh process."""
    out = tmp_path / "run"
    ov = base_overrides(world, "sft", "sft", out, **{"run.max_steps": 1})
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    p = subprocess.run([sys.executable, "-m", "experiments.cli", "train", str(CONFIGS / "tiny_sft.yaml"), *ov],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(read_metrics(out)) == 1
