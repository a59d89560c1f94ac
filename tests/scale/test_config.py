"""Config validation and bad input: each fails before any model loads, with the key or problem named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.cli import main as cli
from scale.config import Config, from_dict, load_config
from tests.scale.conftest import base_overrides

BASE = ["model.path=/m", "data.path=/d"]


def test_defaults_and_overrides():
    c = load_config(None, BASE + ["run.lr=1e-5", "method.rl.estimator_options={eps_high: 0.28}", "run.betas=[0.9,0.95]",
                                  "method.joint.order=[dpo, sft]"])
    assert isinstance(c, Config) and c.run.lr == 1e-5 and c.method.rl.estimator_options == {"eps_high": 0.28}
    assert c.run.betas == [0.9, 0.95] and c.method.joint.order == ["dpo", "sft"]
    assert from_dict(c.to_dict()) == c


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "experiments" / "configs").glob(
    "*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    """Every shipped config, the papers' real-run ones included, passes the schema (no model is loaded); a
    pipeline file (scale/stages.py), every one of its stages."""
    from scale.stages import is_pipeline, load_pipeline

    if is_pipeline(path):
        assert len(load_pipeline(path, [])) >= 2
        return
    cfg = load_config(str(path), [])
    if path.name.startswith("drpt_"):
        assert cfg.datareg.update_rule == "layerwise_subset" and cfg.datareg.merged_target


@pytest.mark.parametrize("override,key", [
    ("run.max_step=3", "run.max_step"),                 # unknown key
    ("modle.path=x", "modle"),                          # unknown section
    ("run.lr=fast", "run.lr"),                          # wrong type
    ("run.max_steps=2.5", "run.max_steps"),
    ("model.lora.enabled=yes please", "model.lora.enabled"),
    ("method.hpt.gamma=[1]", "method.hpt.gamma"),
    ("method.name=ppo", "method.name"),                 # unknown choice
    ("method.joint.schedule=random", "method.joint.schedule"),
    ("method.hpt.offline=offline_rl", "method.hpt.offline"),
    ("method.hpt.off_coef=-1", "method.hpt.off_coef"),
    ("generation.n=1", "generation.n"),
    ("run.batch_size=0", "run.batch_size"),
    ("generation.top_p=1.5", "generation.top_p"),
])
def test_bad_config_names_the_key(override, key):
    extra = ["method.name=rl"] if override.startswith("generation.n") else []
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, BASE + extra + [override])


def test_config_file_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  max_steps: 3\n  bogus: 1\n")
    with pytest.raises(ValueError, match=r"run\.bogus"):
        load_config(f, BASE)
    with pytest.raises(ValueError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, BASE + ["run.max_steps"])


@pytest.fixture
def no_model_load(monkeypatch):
    """Bad input must be caught before the weights load."""
    import transformers

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def _cli_error(capsys, args) -> str:
    assert cli(["train", *args]) == 2
    return capsys.readouterr().err


def _cfg(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("{}\n")
    return str(f)


def test_missing_model_path(world, tmp_path, capsys, no_model_load):
    ov = base_overrides(world, "sft", "sft", tmp_path / "o", **{"model.path": str(tmp_path / "nope")})
    err = _cli_error(capsys, [_cfg(tmp_path), *ov])
    assert "model.path" in err and "does not exist" in err


def test_dataset_without_needed_columns(world, tmp_path, capsys, no_model_load):
    ov = base_overrides(world, "dpo", "sft", tmp_path / "o")           # SFT data for DPO
    err = _cli_error(capsys, [_cfg(tmp_path), *ov])
    assert "chosen" in err and "rejected" in err and "dpo" in err


def test_rl_needs_answers(world, tmp_path, capsys, no_model_load):
    ov = base_overrides(world, "rl", "sft", tmp_path / "o")
    assert "answer" in _cli_error(capsys, [_cfg(tmp_path), *ov])


def test_empty_dataset(world, tmp_path, capsys, no_model_load):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    ov = base_overrides(world, "sft", "sft", tmp_path / "o", **{"data.path": str(empty)})
    err = _cli_error(capsys, [_cfg(tmp_path), *ov])
    assert "empty" in err or "cannot read" in err


def test_prompt_longer_than_context(world, tmp_path, capsys, no_model_load):
    long = tmp_path / "long.jsonl"
    rows = [{"prompt": "What is 1 + 1?\n", "completion": "2"}, {"prompt": "1 + 2 + 3 " * 80, "completion": "x"}]
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ov = base_overrides(world, "sft", "sft", tmp_path / "o", **{"data.path": str(long), "data.max_prompt_length": 2000,
                                                                "data.max_length": 2000})
    err = _cli_error(capsys, [_cfg(tmp_path), *ov])
    assert "example 1" in err and "prompt" in err
    # RL: the prompt fits, but not with the generation budget inside the model's context (128)
    rl = tmp_path / "rl.jsonl"
    rl.write_text(json.dumps({"prompt": "1 + 2 " * 10, "answer": "3"}) + "\n")
    ov = base_overrides(world, "rl", "rl", tmp_path / "o", **{"data.path": str(rl), "generation.max_new_tokens": 100,
                                                              "data.max_length": 1000})
    err = _cli_error(capsys, [_cfg(tmp_path), *ov])
    assert "example 0" in err and "context" in err


def test_bad_column_mapping(world, tmp_path, capsys, no_model_load):
    ov = base_overrides(world, "sft", "sft", tmp_path / "o", **{"data.columns": {"completion": "target"}})
    assert "target" in _cli_error(capsys, [_cfg(tmp_path), *ov])
