"""Bad trainer input (issue 18 items 6-9): every case fails with ONE line naming the key (or the file and the
line), a non-zero exit from `ptlab train`, before the model loads where that is possible, and without
touching any existing file. The cases that cannot fail before the model loads (a reward that fails on some
generated completions, a full disk while saving) run on the tiny model."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import typing
from pathlib import Path

import pytest
import torch

from experiments.cli import main as cli
from scale import checkpoint as ckpt
from scale.config import RANGES, Config, DataRegConfig, load_config, numeric_type, ranges_of
from tests.scale.conftest import base_overrides

BASE = ["model.path=/m", "data.path=/d"]


# ------------------------------------------------------------------------------- every numeric key: a range
def _sections(cls=Config, prefix=""):
    """(dotted prefix, dataclass) of every section of the schema; list items as `key[0].`."""
    yield prefix, cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp, f"{prefix}{f.name}.")
        elif dataclasses.is_dataclass(item):
            yield from _sections(item, f"{prefix}{f.name}[0].")


def _numeric_keys():
    """(key, int or float, is a list, Range) of every numeric field."""
    for prefix, cls in _sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = numeric_type(hints[f.name])
            if tp is not None:
                yield prefix + f.name, tp, typing.get_origin(hints[f.name]) is list, ranges_of(cls).get(f.name)


def test_every_numeric_key_has_a_range():
    missing = [key for key, _, _, rng in _numeric_keys() if rng is None]
    assert not missing, f"add these keys to scale.config.RANGES: {missing}"
    assert len(list(_numeric_keys())) > 50 and all(dataclasses.is_dataclass(c) for c in RANGES)


def _bad_values(tp, rng):
    """Values just outside the range (and, for floats, NaN and infinities), as YAML text."""
    out = []
    if math.isfinite(rng.lo):
        out.append(rng.lo if rng.lo_open else rng.lo - (1 if tp is int else 0.5))
    if math.isfinite(rng.hi):
        out.append(rng.hi if rng.hi_open else rng.hi + (1 if tp is int else 0.5))
    if tp is float:
        out += [".nan", ".inf", "-.inf"]
    else:
        out.append(1.5)  # not an integer
    return [v if isinstance(v, str) else repr(int(v) if tp is int and v == int(v) else v) for v in out]


def _override(key, value, is_list):
    """An override setting `key` to `value` (a list key: as its one item; eval.sets[0].*: a whole set)."""
    if key.startswith("eval.sets[0]."):
        return f"eval.sets=[{{name: s, path: /p, {key.rsplit('.', 1)[1]}: {value}}}]"
    return f"{key}=[{value}]" if is_list else f"{key}={value}"


RANGE_CASES = [(key + ("[0]" if is_list else ""), _override(key, v, is_list))
               for key, tp, is_list, rng in _numeric_keys() if rng is not None for v in _bad_values(tp, rng)]


@pytest.mark.parametrize("key,override", RANGE_CASES, ids=[o for _, o in RANGE_CASES])
def test_out_of_range_value_names_the_key(key, override):
    with pytest.raises(ValueError) as e:
        load_config(None, BASE + [override])
    msg = str(e.value)
    assert msg.startswith(f"{key}: expected") and "\n" not in msg, msg


def test_objects_built_in_python_are_checked_too():
    with pytest.raises(ValueError, match=r"datareg\.fraction: expected a number in \(0, 1\], got nan"):
        DataRegConfig(update_rule="layerwise_subset", fraction=float("nan")).validate()
    with pytest.raises(ValueError, match=r"datareg\.k: expected an integer >= 0, got '2'"):
        DataRegConfig(update_rule="layerwise_subset", k="2").validate()


def test_boundary_values_are_accepted():
    load_config(None, BASE + ["run.warmup_ratio=0", "run.betas=[0, 0.999]", "run.seed=0", "data.limit=0",
                              "method.hpt.gamma=1", "method.joint.lam=0", "run.max_grad_norm=0", "generation.top_p=1",
                              "method.rl.entropy_coef=-0.01", "method.hpt.switch_gate=-1"])


# ------------------------------------------------------------------------------- the cases, end to end
class ModelLoaded(BaseException):
    """Not an Exception: no `except Exception` on the way may turn it into a tidy error message."""


@pytest.fixture
def no_model_load(monkeypatch):
    import transformers

    def boom(*a, **k):
        raise ModelLoaded("the model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def _write_bad_files(tmp: Path, world) -> None:
    good = Path(world["sft"]).read_text().splitlines()
    (tmp / "broken.jsonl").write_text("\n".join(good[:2] + ['{"prompt": "1 + 1", "completion": }'] + good[2:]) + "\n")
    (tmp / "latin1.jsonl").write_bytes(("\n".join(good[:3]) + "\n").encode() +
                                       '{"prompt": "caf\xe9", "completion": "2"}\n'.encode("latin-1"))
    rows = [{"prompt": 5, "completion": "2"}, {"prompt": "1 + 1", "completion": "2"}]
    (tmp / "int_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"prompt": "1 + 1", "completion": "2"}, {"prompt": "1 + 2"}]
    (tmp / "no_completion.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "latin1.yaml").write_bytes("run:\n  output_dir: caf\xe9\n".encode("latin-1"))
    (tmp / "syntax.yaml").write_text("run:\n  lr: 1e-5\n max_steps: 2\n")
    (tmp / "a_file").write_text("not a folder\n")
    for name, damaged in (("model_tok", "tokenizer.json"), ("model_trunc", "model.safetensors")):
        shutil.copytree(world["model"], tmp / name)
        data = (tmp / name / damaged).read_bytes()
        (tmp / name / damaged).write_bytes(data[: len(data) // 2])


# id: (method, data set, raw overrides ({tmp}: the test's folder), fragments the error line must hold)
CASES = {
    # item 7: accepted silently before
    "lr_inf": ("sft", "sft", ["run.lr=.inf"], ["run.lr", "finite"]),
    "max_grad_norm_nan": ("sft", "sft", ["run.max_grad_norm=.nan"], ["run.max_grad_norm"]),
    "warmup_negative": ("sft", "sft", ["run.warmup_ratio=-0.5"], ["run.warmup_ratio", "[0, 1)"]),
    "warmup_one": ("sft", "sft", ["run.warmup_ratio=1"], ["run.warmup_ratio", "[0, 1)"]),
    "save_every_negative": ("sft", "sft", ["run.save_every=-1"], ["run.save_every", ">= 0"]),
    "output_dir_empty": ("sft", "sft", ["run.output_dir="], ["run.output_dir", "required"]),
    "seed_negative": ("sft", "sft", ["run.seed=-1"], ["run.seed"]),
    "betas": ("sft", "sft", ["run.betas=[1.5, 0.9]"], ["run.betas[0]", "[0, 1)"]),
    "weight_decay_negative": ("sft", "sft", ["run.weight_decay=-1"], ["run.weight_decay"]),
    "data_limit_negative": ("sft", "sft", ["data.limit=-1"], ["data.limit"]),
    "dpo_beta_zero": ("dpo", "dpo", ["method.dpo.beta=0"], ["method.dpo.beta", "> 0"]),
    "hpt_gamma": ("hpt", "rl", ["method.hpt.gamma=1.5"], ["method.hpt.gamma", "[0, 1]"]),
    "hpt_switch_gate": ("hpt", "rl", ["method.hpt.variant=code", "method.hpt.switch_gate=5"],
                        ["method.hpt.switch_gate", "generation.n=4"]),
    "joint_lam": ("sft_dpo", "joint", ["method.joint.lam=2"], ["method.joint.lam"]),
    "temperature_zero": ("rl", "rl", ["generation.temperature=0"], ["generation.temperature"]),
    "eval_n_zero": ("sft", "sft", ["eval.n=0"], ["eval.n"]),
    "estimator_option": ("rl", "rl", ["method.rl.estimator_options={eps_high: -1}"],
                         ["method.rl.estimator_options", "eps_high"]),
    "estimator_unknown": ("rl", "rl", ["method.rl.estimator=grpoo"], ["method.rl.estimator", "grpoo"]),
    "kl_estimator": ("rl", "rl", ["method.rl.kl_estimator=k4"], ["method.rl.kl_estimator", "k4"]),
    "kl_placement": ("rl", "rl", ["method.rl.kl_placement=advantage"], ["method.rl.kl_placement", "advantage"]),
    "kl_aggregation": ("rl", "rl", ["method.rl.kl_aggregation=sum"], ["method.rl.kl_aggregation", "sum"]),
    "kl_bias_correction": ("rl", "rl", ["method.rl.kl_bias_correction=3"], ["method.rl.kl_bias_correction"]),
    "kl_in_estimator_options": ("rl", "rl", ["method.rl.estimator_options={kl_coef: 0.1}"],
                                ["method.rl.estimator_options", "kl_coef", "method.rl."]),
    "entropy_mask_in_trainer": ("rl", "rl", ["method.rl.estimator_options={top_entropy_quantile: 0.2}"],
                                ["method.rl.estimator_options", "top_entropy_quantile", "not supported"]),
    # item 6: crashed after the model loaded
    "log_every_zero": ("sft", "sft", ["run.log_every=0"], ["run.log_every", ">= 1"]),
    "output_dir_under_a_file": ("sft", "sft", ["run.output_dir={tmp}/a_file/run"], ["run.output_dir", "a_file"]),
    "output_dir_is_a_file": ("sft", "sft", ["run.output_dir={tmp}/a_file"], ["run.output_dir", "is a file"]),
    "truncated_weights": ("sft", "sft", ["model.path={tmp}/model_trunc"],
                          ["model.path", "model_trunc/model.safetensors", "truncated"]),
    "reward_raises": ("rl", "rl", ["method.rl.reward=tests.scale.test_bad_configs:raising_reward"],
                      ["raising_reward", "ZeroDivisionError", "example 0"]),
    "reward_none": ("rl", "rl", ["method.rl.reward=tests.scale.test_bad_configs:none_reward"],
                    ["none_reward", "returned None"]),
    # item 8: messages that named nothing
    "broken_jsonl_line": ("sft", "sft", ["data.path={tmp}/broken.jsonl"], ["broken.jsonl", "line 3", "JSON"]),
    "data_not_utf8": ("sft", "sft", ["data.path={tmp}/latin1.jsonl"], ["latin1.jsonl", "line 4", "UTF-8"]),
    "config_not_utf8": ("sft", "sft", ["CONFIG=latin1.yaml"], ["latin1.yaml", "line 2", "UTF-8"]),
    "config_yaml_syntax": ("sft", "sft", ["CONFIG=syntax.yaml"], ["syntax.yaml", "line 3", "YAML"]),
    "override_yaml_syntax": ("sft", "sft", ["run.lr=[1,"], ["run.lr", "YAML"]),
    "corrupt_tokenizer": ("sft", "sft", ["model.path={tmp}/model_tok"], ["model_tok/tokenizer.json", "JSON"]),
    "template_placeholder": ("sft", "sft", ['data.prompt_template="Q: {question}"'],
                             ["data.prompt_template", "{question}", "{prompt}"]),
    "template_unquoted": ("sft", "sft", ["data.prompt_template={question}"], ["data.prompt_template", "quote"]),
    "int_prompt": ("sft", "sft", ["data.path={tmp}/int_prompt.jsonl"], ["int_prompt.jsonl", "example 0", "'prompt'"]),
    "missing_completion": ("sft", "sft", ["data.path={tmp}/no_completion.jsonl"],
                           ["no_completion.jsonl", "example 1", "'completion'"]),
    "nan_reward": ("rl", "rl", ["method.rl.reward=tests.scale.test_bad_configs:nan_reward"],
                   ["nan_reward", "nan", "finite"]),
}


def raising_reward(completions, answers, **_):
    return [1 / 0 for _ in completions]


def none_reward(completions, answers, **_):
    return None


def nan_reward(completions, answers, **_):
    return [math.nan] * len(completions)


def picky_reward(completions, answers, **_):
    """Grades the trial call (a boxed answer), fails on the model's completions."""
    if any("boxed" not in c for c in completions):
        raise RuntimeError("cannot grade")
    return [1.0] * len(completions)


def _error_line(err: str) -> str:
    """The one error line: stderr's last (progress bars of model and data loading may come before it)."""
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("ptlab train: error: "), err
    assert not any("Traceback" in ln or "ptlab train: error" in ln for ln in lines[:-1]), err
    return lines[-1]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_before_the_model_loads(world, tmp_path, capsys, no_model_load, case):
    method, data, raw, fragments = CASES[case]
    _write_bad_files(tmp_path, world)
    out = tmp_path / "run"  # an earlier run's folder: must stay as it is
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "checkpoints" / "LATEST").write_text("step-000001\n")
    (tmp_path / "c.yaml").write_text("{}\n")
    config = next((r.split("=", 1)[1] for r in raw if r.startswith("CONFIG=")), "c.yaml")
    raw = [r.replace("{tmp}", str(tmp_path)) for r in raw if not r.startswith("CONFIG=")]
    before = _snapshot(tmp_path)
    assert cli(["train", str(tmp_path / config), *base_overrides(world, method, data, out), *raw]) == 2
    err = _error_line(capsys.readouterr().err)
    for f in fragments:
        assert f in err, (f, err)
    assert _snapshot(tmp_path) == before


def test_reward_errors_name_the_function_and_the_completion():
    from scale.rewards import RewardError, load_reward

    def fussy(completions, answers, **_):
        return [1.0 if c != "b" else 1 / 0 for c in completions]

    with pytest.raises(RewardError, match=r"reward 'fussy': raised ZeroDivisionError.*completion 1: 'b'") as e:
        load_reward(fussy)(["a", "b", "c"], ["1", "2", "3"])
    assert e.value.index == 1
    with pytest.raises(RewardError, match=r"value 2 is 'x', expected a finite number.*completion 2") as e:
        load_reward(lambda c, a: [0, 1, "x"])(["a", "b", "c"], ["1", "2", "3"])
    assert e.value.index == 2


def test_resume_without_checkpoint_fails_before_the_model_loads(world, tmp_path, capsys, no_model_load):
    assert _run(world, tmp_path / "run", "sft", "sft", "run.resume=true") == 2
    assert "run.resume: no checkpoint" in _error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------- the ones that need the model
def _run(world, out, method, data, *raw, **extra) -> int:
    (out.parent / "c.yaml").write_text("{}\n")
    return cli(["train", str(out.parent / "c.yaml"), *base_overrides(world, method, data, out, **extra), *raw])


def test_reward_failing_on_generated_completions_names_the_example(world, tmp_path, capsys):
    rc = _run(world, tmp_path / "run", "rl", "rl", "method.rl.reward=tests.scale.test_bad_configs:picky_reward")
    err = _error_line(capsys.readouterr().err)
    assert rc == 2
    assert all(f in err for f in ("picky_reward", "RuntimeError: cannot grade", "rl.jsonl", "step 1")), err


@pytest.mark.parametrize("method,data,extra", [
    ("sft", "sft", {"run.batch_size": 4}),
    ("dpo", "dpo", {"run.batch_size": 4}),
    ("rl", "rl", {"run.batch_size": 2, "generation.n": 2}),   # 4 rollouts
])
def test_more_micro_batches_than_rows(world, tmp_path, method, data, extra):
    """grad_accum=5 on 4 rows (2 pairs for DPO): the empty micro-batches add zero gradients, so the run
    ends with the parameters of grad_accum=1."""
    from safetensors.torch import load_file

    final = {}
    for accum in (1, 5):
        out = tmp_path / f"accum{accum}"
        assert _run(world, out, method, data, f"run.grad_accum={accum}",
                    **{"model.dtype": "float64", "run.save_model": True, **extra}) == 0
        final[accum] = load_file(str(out / "final" / "model.safetensors"))
    for k, v in final[1].items():
        assert torch.allclose(final[5][k], v, rtol=1e-9, atol=1e-12), k


def test_disk_full_while_checkpointing(world, tmp_path, capsys, monkeypatch):
    """torch's message on a full disk names nothing: the error says "no space left" and which checkpoint,
    the half-written folder is removed, and the previous checkpoint stays the latest, intact."""
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "step-000002.tmp" in str(f):
            Path(f).write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 0))
    out = tmp_path / "run"
    assert _run(world, out, "sft", "sft", "run.save_every=1") == 1
    err = _error_line(capsys.readouterr().err)
    assert "no space left on device" in err and "step-000002.tmp" in err, err
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert ckpt.latest(out).name == "step-000001"
    assert json.loads((out / "checkpoints" / "step-000001" / "trainer_state.json").read_text())["step"] == 1


def test_disk_full_while_saving_the_final_model(world, tmp_path, capsys, monkeypatch):
    """No final.tmp is left behind, and a final/ of an earlier run is not damaged."""
    from transformers import PreTrainedModel

    def full_disk(self, path, *a, **k):
        os.makedirs(path, exist_ok=True)
        Path(path, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"   # the run's first part saves final/; its continuation (2 -> 3 steps) cannot
    assert _run(world, out, "sft", "sft", **{"run.save_model": True}) == 0
    earlier = (out / "final" / "model.safetensors").read_bytes()
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert _run(world, out, "sft", "sft", **{"run.save_model": True, "run.resume": "auto", "run.max_steps": 3}) == 1
    err = _error_line(capsys.readouterr().err)
    assert "no space left on device" in err and "final.tmp" in err, err
    assert not (out / "final.tmp").exists()
    assert (out / "final" / "model.safetensors").read_bytes() == earlier
    assert ckpt.latest(out).name == "step-000003"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_dir(world, tmp_path, capsys, no_model_load):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert _run(world, locked / "run", "sft", "sft") == 2
    finally:
        locked.chmod(0o700)
    err = _error_line(capsys.readouterr().err)
    assert "run.output_dir" in err and "cannot write" in err, err
