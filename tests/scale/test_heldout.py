"""The eval: section: held-out metrics at step 0, every N steps and at the end, per level; f_sft and f_dpo
equal plain-loop references; evaluation does not change the training run; resume trims the records;
bad eval config fails naming the key."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from scale.config import load_config
from scale.train import Trainer
from tests.scale.conftest import base_overrides, read_metrics


def _sets(world, *kinds):
    files = {"generate": world["test"], "sft": world["sft"], "dpo": world["dpo"]}
    return json.dumps([{"name": f"h{k}", "path": str(files[k]), "kind": k, "limit": 6} for k in kinds])


def _cfg(world, out, method="rl", data="rl", **extra):
    return load_config(None, base_overrides(world, method, data, out, **extra))


def test_eval_logged_at_start_every_and_end_with_records(world, tmp_path):
    out = tmp_path / "run"
    t = Trainer(_cfg(world, out, **{"run.max_steps": 3, "eval.every": 2, "eval.n": 4,
                                    "eval.sets": json.loads(_sets(world, "generate", "sft", "dpo"))}))
    t.train()
    rows = read_metrics(out)
    evals = {r["step"]: r for r in rows if "eval/hgenerate/avg@4" in r}
    assert sorted(evals) == [0, 2, 3]
    for r in evals.values():
        for k in ("avg@4", "pass@1", "pass@2", "pass@4", "greedy", "all_fail", "L1/avg@4", "L2/avg@4"):
            assert 0.0 <= r[f"eval/hgenerate/{k}"] <= 1.0, k
        assert r["eval/hgenerate/pass@1"] == pytest.approx(r["eval/hgenerate/avg@4"])
        assert math.isfinite(r["eval/hsft/f_sft"]) and r["eval/hsft/f_sft"] > 0
        assert 0.0 <= r["eval/hdpo/pref_accuracy"] <= 1.0
    assert evals[0]["eval/hdpo/f_dpo"] == pytest.approx(math.log(2), abs=1e-5)   # policy == reference
    recs = [json.loads(x) for x in (out / "eval_records.jsonl").read_text().splitlines()]
    assert len(recs) == 3 * 4 and {r["step"] for r in recs} == {0, 2, 3}   # test.jsonl has 4 prompts
    assert all(0 <= r["correct"] <= r["n"] == 4 and r["greedy"] in (0, 1) and "level" in r for r in recs)
    # the logged avg@n is the records' mean
    for step, r in evals.items():
        mine = [x for x in recs if x["step"] == step]
        assert r["eval/hgenerate/avg@4"] == pytest.approx(sum(x["correct"] for x in mine) / (4 * len(mine)))


def test_a_set_with_its_own_interval(world, tmp_path):
    """eval.sets[i].every overrides eval.every for that set (0: end only); the others keep eval.every."""
    out = tmp_path / "run"
    sets = json.loads(_sets(world, "generate", "sft"))
    sets[0]["every"], sets[1]["every"] = 1, 0
    Trainer(_cfg(world, out, **{"run.max_steps": 3, "eval.every": 2, "eval.n": 2, "eval.sets": sets})).train()
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "eval/hgenerate/avg@2" in r] == [0, 1, 2, 3]
    assert [r["step"] for r in rows if "eval/hsft/f_sft" in r] == [0, 3]


def always_right(completions, **kwargs):
    return [1.0] * len(completions)


def test_a_set_with_its_own_reward(world, tmp_path):
    """eval.sets[i].reward grades that set only; the other set keeps the method's reward; a bad one fails
    naming the set's key before the model loads."""
    out = tmp_path / "run"
    sets = json.loads(_sets(world, "generate")) * 2
    sets[1] = {**sets[1], "name": "mine", "reward": "tests.scale.test_heldout:always_right"}
    Trainer(_cfg(world, out, **{"run.max_steps": 1, "eval.n": 2, "eval.sets": sets})).train()
    rows = [r for r in read_metrics(out) if "eval/mine/avg@2" in r]
    assert [(r["eval/mine/avg@2"], r["eval/mine/greedy"]) for r in rows] == [(1.0, 1.0)] * 2
    assert any(r["eval/hgenerate/avg@2"] < 1.0 for r in rows)    # the tiny model gets some wrong
    sets[1]["reward"] = "tests.scale.test_heldout:no_such_function"
    with pytest.raises((ValueError, AttributeError, ImportError), match=r"eval\.sets\[1\]\.reward"):
        Trainer(_cfg(world, tmp_path / "bad", **{"eval.sets": sets}))


def test_heldout_objectives_equal_plain_references(world, tmp_path):
    t = Trainer(_cfg(world, tmp_path / "run", method="sft", data="sft",
                     **{"eval.sets": json.loads(_sets(world, "sft", "dpo"))}))
    with torch.no_grad():
        for p in t._model().parameters():   # move away from the reference so f_dpo is not log 2
            p.add_(0.01 * torch.randn_like(p))
    m, _ = t.heldout.run(1, 1)
    model, ref = t._model(), t.reference.model.model

    def seq_logp(mdl, ids, plen):
        x = torch.tensor([ids])
        lp = torch.log_softmax(mdl(input_ids=x).logits[0, :-1].double(), -1)
        return lp[torch.arange(plen - 1, len(ids) - 1), x[0, plen:]]

    with torch.no_grad():
        (_, sft), (_, pref) = t.heldout.sets
        nll = [-seq_logp(model, e["completion"]["input_ids"], e["completion"]["prompt_len"]) for e in sft]
        f_sft = float(torch.cat(nll).sum() / sum(len(x) for x in nll))
        margins = []
        for e in pref:
            lr = [seq_logp(mdl, e[k]["input_ids"], e[k]["prompt_len"]).sum() for mdl in (model, ref)
                  for k in ("chosen", "rejected")]
            margins.append(0.1 * ((lr[0] - lr[2]) - (lr[1] - lr[3])))
        margins = torch.stack(margins)
    assert m["eval/hsft/f_sft"] == pytest.approx(f_sft, rel=1e-5)
    assert m["eval/hdpo/f_dpo"] == pytest.approx(float(-F.logsigmoid(margins).mean()), rel=1e-4)
    assert m["eval/hdpo/pref_accuracy"] == pytest.approx(float((margins > 0).double().mean()))


def test_evaluation_does_not_change_training(world, tmp_path):
    def losses(out, **extra):
        Trainer(_cfg(world, out, **{"run.max_steps": 3, **extra})).train()
        return [(r["loss"], r["reward"]) for r in read_metrics(out) if "loss" in r]

    plain = losses(tmp_path / "a")
    with_eval = losses(tmp_path / "b", **{"eval.every": 1, "eval.sets": json.loads(_sets(world, "generate"))})
    assert plain == with_eval


def test_resume_trims_records_past_the_checkpoint(world, tmp_path):
    extra = {"run.max_steps": 4, "eval.every": 1, "eval.sets": json.loads(_sets(world, "generate"))}
    Trainer(_cfg(world, tmp_path / "full", **extra)).train()
    out = tmp_path / "run"
    Trainer(_cfg(world, out, **{**extra, "run.stop_after": 2})).train()   # checkpoint at step 2
    with open(out / "eval_records.jsonl", "a") as f:   # a record the killed run wrote after its checkpoint
        f.write(json.dumps({"step": 3, "set": "hgenerate", "id": 0, "n": 8, "correct": 8}) + "\n")
    Trainer(_cfg(world, out, **{**extra, "run.resume": True})).train()
    assert (out / "eval_records.jsonl").read_text() == (tmp_path / "full" / "eval_records.jsonl").read_text()


@pytest.mark.parametrize("override,key", [
    ('eval.sets=[{name: a, path: x.jsonl, kind: rank}]', "eval.sets[0].kind"),
    ('eval.sets=[{name: a, path: x.jsonl}, {name: a, path: y.jsonl}]', "eval.sets"),
    ('eval.sets=[{name: "", path: x.jsonl}]', "eval.sets[0].name"),
    ('eval.sets=[{name: a}]', "eval.sets[0].path"),
    ('eval.sets=[{name: a, path: x.jsonl, colour: red}]', "eval.sets[0].colour"),
    ("eval.ks=[16]", "eval.ks"),
    ("eval.every=-1", "eval.every"),
    ('eval.sets=[{name: a, path: x.jsonl, every: -2}]', "eval.sets[0].every"),
    ("eval.n=0", "eval.n"),
    ("generation.top_k=-1", "generation.top_k"),
])
def test_bad_eval_config_names_the_key(world, tmp_path, override, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, base_overrides(world, "rl", "rl", tmp_path) + [override])


def test_missing_eval_file_fails_before_the_model_loads(world, tmp_path, monkeypatch):
    import scale.train as train

    monkeypatch.setattr(train.Trainer, "_load_model", lambda *a: pytest.fail("model loaded"))
    cfg = _cfg(world, tmp_path, **{"eval.sets": [{"name": "a", "path": str(tmp_path / "nope.jsonl")}]})
    with pytest.raises(ValueError, match="nope.jsonl"):
        Trainer(cfg)


def test_two_processes_evaluate_every_prompt_once(world, tmp_path):
    """Under torchrun (2 CPU processes, gloo) each process evaluates its share and the counts are gathered:
    every held-out prompt appears once per evaluation, and the held-out objectives equal one process's."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from toy.tiny import save_tiny_model

    root = Path(__file__).resolve().parents[2]
    # a reference other than the policy: with the policy as its own reference every step-0 margin is zero up to
    # rounding, and the preference accuracy would count the signs of rounding errors (they differ between
    # CPU kernel sets: this comparison failed on AVX-512 kernels with the policy as reference)
    ref = save_tiny_model(tmp_path / "ref", seed=1, hidden_size=32, intermediate_size=64, max_positions=128)
    sets = json.dumps([{"name": "hgenerate", "path": str(world["test"])},
                       {"name": "hdpo", "path": str(world["dpo"]), "kind": "dpo", "limit": 6}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")

    def run(out, nproc):
        ov = base_overrides(world, "rl", "rl", out, **{"run.max_steps": 1, "run.cpu": True,
                                                       "model.ref_path": str(ref)}) + [f"eval.sets={sets}"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(port), "-m", "experiments.cli", "train", str(cfg), *ov]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return [r for r in read_metrics(out) if "eval/hdpo/f_dpo" in r]

    two, one = run(tmp_path / "two", 2), run(tmp_path / "one", 1)
    recs = [json.loads(x) for x in (tmp_path / "two" / "eval_records.jsonl").read_text().splitlines()]
    n_prompts = len((world["test"]).read_text().splitlines())
    for step in (0, 1):
        assert sorted(r["id"] for r in recs if r["step"] == step) == list(range(n_prompts))
    assert [r["step"] for r in two] == [0, 1]
    assert two[0]["eval/hdpo/f_dpo"] == pytest.approx(one[0]["eval/hdpo/f_dpo"], abs=1e-6)
    assert two[0]["eval/hdpo/pref_accuracy"] == one[0]["eval/hdpo/pref_accuracy"]
