"""scale.evaluate: the pass@k estimator against brute-force enumeration of k-subsets, its edge cases,
benchmark loading (prompt / messages / chat template), and an end-to-end `ptlab eval` on a tiny model."""

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scale.evaluate import evaluate, load_benchmark, pass_at_k


def _brute(n, c, k):
    """Probability that a uniformly drawn k-subset of n samples (c of them correct) holds a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_enumeration(nck):
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12)


def test_pass_at_k_closed_form_and_large_n():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)      # pass@1 is the fraction correct
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    # large n: the product form agrees with exact integer binomials (which float division would overflow)
    n, c, k = 2048, 7, 1024
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n, c, k, name", [(0, 0, 1, "n"), (3, 4, 1, "c"), (3, 1, 4, "k"), (3, 1, 0, "k"),
                                           (3.0, 1, 1, "n"), (3, True, 1, "c")])
def test_pass_at_k_validates(n, c, k, name):
    with pytest.raises(ValueError, match=name):
        pass_at_k(n, c, k)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from toy.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", hidden_size=16, intermediate_size=32)


def test_load_benchmark_formats(tmp_path, tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"prompt": "What is 1 + 1?\n", "answer": 2}) + "\n"
                 + json.dumps({"id": "q2", "prompt": "What is 2 + 2?\n", "answer": "4"}) + "\n")
    rows = load_benchmark(f, tok)
    assert rows == [{"id": 0, "prompt": "What is 1 + 1?\n", "answer": "2", "columns": {"id": None}},
                    {"id": "q2", "prompt": "What is 2 + 2?\n", "answer": "4", "columns": {"id": "q2"}}]
    wrapped = load_benchmark(f, tok, chat_template=True, limit=1)
    assert len(wrapped) == 1 and wrapped[0]["prompt"] == \
        "<|im_start|>user\nWhat is 1 + 1?\n<|im_end|>\n<|im_start|>assistant\n"
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                             "answer": "A"}) + "\n")
    assert load_benchmark(m, tok)[0]["prompt"] == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl lacks column\(s\) \['answer'\]"):
        load_benchmark(bad, tok)
    gap = tmp_path / "gap.jsonl"   # one row without its answer: named by line, not graded against "None"
    gap.write_text(json.dumps({"prompt": "a", "answer": "1"}) + "\n\n" + json.dumps({"prompt": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"gap.jsonl: example 1 \(line 3\): column 'answer' holds nothing"):
        load_benchmark(gap, tok)


def test_grade_calls_trl_rewards_with_prompt_columns_and_ids():
    from scale.evaluate import grade

    seen = []

    def trl_style(prompts, completions, completion_ids, answer, level, **kwargs):
        seen.append((prompts, completion_ids, answer, level))
        return [float(c == f"\\boxed{{{a}}}") if lv == 1 else None for c, a, lv in zip(completions, answer, level)]

    rows = [{"id": "a", "prompt": "P1", "answer": "7", "columns": {"level": 1}, "level": 1},
            {"id": "b", "prompt": "P2", "answer": "8", "columns": {"level": 2}}]
    comps = [["\\boxed{7}", "no"], ["\\boxed{8}", "x"]]
    with pytest.raises(ValueError, match=r"returned None \(not applicable\) for completion 0.*\[prompt 'b'\]"):
        grade(rows, comps, trl_style, 2, completion_ids=[[[1], [2]], [[3], [4]]])
    assert seen == [(["P1", "P1"], [[1], [2]], ["7", "7"], [1, 1]), (["P2", "P2"], [[3], [4]], ["8", "8"], [2, 2])]
    (p,) = grade(rows[:1], comps[:1], trl_style, 2)
    assert p == {"id": "a", "n": 2, "correct": 1, "rewards": [1.0, 0.0], "level": 1}


def test_evaluate_with_a_reward_that_knows_the_answer(tmp_path, tiny, monkeypatch):
    """A user reward marks completions correct by a rule independent of the model (even sample index
    within each prompt's group), so pass@k and avg@n can be checked exactly."""
    (tmp_path / "parity_reward.py").write_text(
        "def every_other(completions, answers, **kw):\n"
        "    return [float(i % 2 == 0) for i in range(len(completions))]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = tmp_path / "b.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?\n", "answer": str(i + 1)}) + "\n" for i in range(3)))
    r = evaluate(tiny, f, n=4, ks=[1, 2, 4], max_new_tokens=3, batch_size=2, reward="parity_reward:every_other",
                 samples=tmp_path / "s.jsonl")
    assert r["per_prompt"] == [{"id": i, "n": 4, "correct": 2} for i in range(3)]
    assert r["metrics"] == pytest.approx({"pass@1": 0.5, "pass@2": _brute(4, 2, 2), "pass@4": 1.0, "avg@4": 0.5,
                                          "all_fail": 0.0})
    assert (r["temperature"], r["top_p"], r["top_k"]) == (1.0, 1.0, 0)   # the sampling settings are recorded
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(len(x["completions"]) == 4 and len(x["rewards"]) == 4 for x in lines)


def test_greedy_is_deterministic(tmp_path, tiny):
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"prompt": "What is 3 + 4?\n", "answer": "7"}) + "\n")
    r = evaluate(tiny, f, n=2, temperature=0.0, max_new_tokens=4, samples=tmp_path / "s.jsonl")
    comps = json.loads((tmp_path / "s.jsonl").read_text())["completions"]
    assert comps[0] == comps[1] and set(r["metrics"]) == {"pass@1", "pass@2", "avg@2", "all_fail"}



def test_backend_errors_name_the_argument(tmp_path, tiny):
    """The vllm backend loads a model folder itself; without vllm installed (this machine) it says so, naming
    `backend`; an unknown backend is refused."""
    import importlib.util

    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"prompt": "What is 3 + 4?\n", "answer": "7"}) + "\n")
    with pytest.raises(ValueError, match="backend"):
        evaluate(tiny, f, backend="sglang")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ValueError, match="backend: 'vllm' is not installed"):
            evaluate(str(tiny), f, backend="vllm")

def test_metrics_per_level_and_role():
    """metrics_of groups by the records' level and role; each group's numbers are its own prompts' means."""
    from scale.evaluate import metrics_of

    recs = [{"correct": c, "n": 4, "level": lv, "role": role, "greedy": g}
            for c, lv, role, g in [(4, 1, "easy", 1), (2, 1, "easy", 1), (0, 3, "middle", 0), (1, 3, "middle", 1)]]
    m = metrics_of(recs, 4, [1, 4])
    assert m["avg@4"] == pytest.approx(7 / 16) and m["greedy"] == pytest.approx(0.75)
    assert m["L1/avg@4"] == pytest.approx(0.75) and m["L3/avg@4"] == pytest.approx(0.125)
    assert m["middle/all_fail"] == pytest.approx(0.5) and m["easy/pass@4"] == pytest.approx(1.0)
    assert m["L3/pass@4"] == pytest.approx(0.5) and m["middle/greedy"] == pytest.approx(0.5)


def test_cli_eval_end_to_end(tmp_path, tiny, capsys):
    from experiments.cli import main

    f = tmp_path / "bench.jsonl"
    f.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"What is {i} + 2?\n", "answer": str(i + 2)}) + "\n"
                         for i in range(2)))
    out = tmp_path / "res.json"
    assert main(["eval", str(tiny), str(f), "--n", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_prompts"] == 2 and res["n"] == 2 and [p["id"] for p in res["per_prompt"]] == ["q0", "q1"]
    assert set(res["metrics"]) == {"pass@1", "pass@2", "avg@2", "all_fail"} and res["top_k"] == 0
    assert all(0.0 <= v <= 1.0 for v in res["metrics"].values())
    assert '"pass@1"' in capsys.readouterr().out
    # bad input: one clear error line, exit code 2, before any generation
    assert main(["eval", str(tmp_path / "nope"), str(f), "--out", str(out)]) == 2
    assert "model: path" in capsys.readouterr().err
    assert main(["eval", "no-such-org/no-model", str(f), "--out", str(out)]) == 2   # hub id, offline
    assert "model: cannot load 'no-such-org/no-model'" in capsys.readouterr().err
    assert main(["eval", str(tiny), str(f), "--n", "2", "--k", "3", "--out", str(out)]) == 2
    assert "ks" in capsys.readouterr().err
    # several rewards with weights: exact match weighted 0, a reward of 1 for anything weighted 1
    ones = ["--reward", "exact", "tests.scale.test_evaluate:always_one", "--reward-weights", "0", "1"]
    assert main(["eval", str(tiny), str(f), "--n", "2", "--max-new-tokens", "4", "--out", str(out), *ones]) == 0
    res = json.loads(out.read_text())
    assert res["metrics"]["avg@2"] == 1.0 and res["reward_weights"] == [0.0, 1.0]
    assert main(["eval", str(tiny), str(f), "--out", str(out), *ones[:-1]]) == 2
    assert "reward_weights" in capsys.readouterr().err


def always_one(completions, **_):
    return [1.0] * len(completions)
