"""Shared fixtures for the trainer tests: a tiny random model and toy data sets, built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model is far faster on one thread when cores are shared; restored after each test."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> dict[str, Path]:
    """{"model": tiny model folder, "sft"/"dpo"/"rl"/"joint": JSONL files, "root": the folder}."""
    from toy.tasks import write_datasets
    from toy.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("world")
    paths = dict(write_datasets(root / "data", n_train=32, n_test=4, seed=0))
    paths["model"] = save_tiny_model(root / "model", hidden_size=32, intermediate_size=64, max_positions=128)
    paths["root"] = root
    return paths


def parity_reward(completions, answers, **_):
    """A reward a random model earns about half the time (even completion length in characters), so RL
    tests have non-constant groups and non-zero gradients."""
    return [float(len(c) % 2 == 0) for c in completions]


def base_overrides(world, method: str, data: str, out: Path, **extra) -> list[str]:
    opts = {"model.path": str(world["model"]), "data.path": str(world[data]), "method.name": method,
            "run.output_dir": str(out), "run.max_steps": 2, "run.batch_size": 4, "run.lr": 1e-2,
            "run.progress": False, "run.save_model": False, "generation.n": 4, "generation.max_new_tokens": 8,
            "method.rl.reward": "tests.scale.conftest:parity_reward", "data.max_length": 96,
            "eval.sets": [], "data.pref_path": ""}  # the shipped configs' held-out sets live in runs/tiny
    opts.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) or not v else v}" for k, v in opts.items()]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
