"""toy.tasks: answers are right (checked by Python arithmetic), demonstrations end in the boxed answer,
rejected responses are wrong, files carry the TRL columns, and everything is deterministic."""

import json
import re

import pytest

from toy.tasks import LEVELS, make_examples, make_mixed, write_datasets, write_jsonl


def _boxed(text):
    return re.findall(r"\\boxed\{([^{}]*)\}", text)[-1]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_examples_are_correct_and_rejected_is_wrong(level):
    rows = make_examples(50, level, seed=3)
    assert len(rows) == 50
    for r in rows:
        expr = re.fullmatch(r"What is (.+)\?\n", r["prompt"]).group(1)
        truth = eval(expr)  # independent reference: Python's own arithmetic on the prompt's expression
        assert r["answer"] == str(truth)
        assert _boxed(r["completion"]) == r["answer"] and r["chosen"] == r["completion"]
        assert _boxed(r["rejected"]) != r["answer"]
        assert r["level"] == level
        # every worked step in the demonstration is itself correct
        for lhs, rhs in re.findall(r"([\d +*-]+?) = (-?\d+)", r["completion"]):
            assert eval(lhs) == int(rhs)


def test_deterministic_and_seed_dependent():
    assert make_examples(20, 2, seed=1) == make_examples(20, 2, seed=1)
    assert make_examples(20, 2, seed=1) != make_examples(20, 2, seed=2)
    assert make_mixed(30, (1, 3), seed=0) == make_mixed(30, (1, 3), seed=0)
    assert {r["level"] for r in make_mixed(60, (1, 3), seed=0)} == {1, 3}


def test_bad_arguments():
    with pytest.raises(ValueError, match="level"):
        make_examples(3, 9)
    with pytest.raises(ValueError, match="n"):
        make_examples(-1, 1)
    with pytest.raises(ValueError, match="levels"):
        make_mixed(3, [])


def test_write_datasets_columns(tmp_path):
    paths = write_datasets(tmp_path, n_train=12, n_test=5, seed=0)
    want = {"sft": {"prompt", "completion"}, "dpo": {"prompt", "chosen", "rejected"},
            "rl": {"prompt", "answer", "completion"}, "joint": {"prompt", "completion", "chosen", "rejected"},
            "test": {"id", "prompt", "answer", "level"},
            "general": {"prompt", "completion", "answer", "level"},
            "target": {"prompt", "completion", "answer", "level"}}
    assert set(paths) == set(want)
    for name, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == (5 if name == "test" else 12)
        assert all(set(r) == want[name] for r in rows), name
    assert {json.loads(x)["level"] for x in paths["target"].read_text().splitlines()} == {5}
    assert {json.loads(x)["level"] for x in paths["general"].read_text().splitlines()} <= {1, 2, 3, 4}
    # same seed -> byte-identical files
    again = write_datasets(tmp_path / "again", n_train=12, n_test=5, seed=0)
    assert all(again[k].read_bytes() == paths[k].read_bytes() for k in paths)


def test_write_jsonl_roundtrip(tmp_path):
    p = write_jsonl([{"a": 1}, {"b": "x"}], tmp_path / "sub" / "f.jsonl")
    assert [json.loads(x) for x in p.read_text().splitlines()] == [{"a": 1}, {"b": "x"}]
