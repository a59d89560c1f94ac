"""The method registry (scale/methods/): names resolve, a user's own Method loads from module:Class, and the
README's example method (experiments/examples/reinforce_with_demos.py) trains as written; the trainer and
the engine modules of scale/ test no method name and import each other in no circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from scale.methods import Method, get_method, method_names, register
from tests.scale.conftest import base_overrides

SCALE = Path(__file__).resolve().parents[2] / "scale"
EXAMPLE = "experiments.examples.reinforce_with_demos:ReinforceWithDemos"


def test_registry_names_and_errors():
    assert set(method_names()) == {"sft", "dpo", "sft_dpo", "rl", "hpt", "luffy", "srft"}
    assert get_method("hpt").name == "hpt" and get_method("srft").data == "demo"
    assert get_method(EXAMPLE).__name__ == "ReinforceWithDemos"
    for bad, msg in [("ppo", "unknown value 'ppo'"), ("no_such_module_xyz:M", "cannot load"),
                     ("scale.loss:Row", "not a subclass")]:
        with pytest.raises(ValueError, match=rf"^method\.name: .*{msg}"):
            get_method(bad)
    with pytest.raises(TypeError, match="Method subclass"):
        register("x")(object)
    with pytest.raises(ValueError, match="already has this name"):
        register("sft")(type("Other", (Method,), {}))


def test_config_checks_a_user_method_and_its_options():
    from scale.config import load_config

    base = ["model.path=m", "data.path=d", f"method.name={EXAMPLE}"]
    assert load_config(None, base + ["method.options={demo_coef: 0.5}"]).method.options == {"demo_coef": 0.5}
    with pytest.raises(ValueError, match=r"^method\.options\.demo_coef: expected a number >= 0, got -1"):
        load_config(None, base + ["method.options={demo_coef: -1}"])
    with pytest.raises(ValueError, match=r"^method\.name: cannot load"):
        load_config(None, ["model.path=m", "data.path=d", "method.name=nowhere_xyz:M"])


def test_example_method_builds_its_rows_and_trains(world, tmp_path):
    """Per prompt: n graded samples with leave-one-out advantages (recomputed here from the rewards) and
    the demonstration with weight demo_coef; the logged SFT term equals demo_coef x the demonstrations'
    token-mean NLL from a plain forward pass; the offline ratio is 1 / (n + 1); the step changes weights."""
    from scale.config import load_config
    from scale.train import Trainer

    n, coef = 4, 0.5
    tr = Trainer(load_config(None, base_overrides(
        world, EXAMPLE, "rl", tmp_path / "o", **{"model.dtype": "float64", "run.cpu": True, "generation.n": n,
                                                 "method.options": {"demo_coef": coef}})))
    info: dict = {}
    rows = tr.method.rows(tr, 0, info)
    rl = [r for r in rows if r.kind == "rl"]
    demos = [r for r in rows if r.kind == "sft"]
    assert len(rl) == n * 4 and len(demos) == 4 and all(d.weight == coef for d in demos)
    spread = 0.0
    for q in range(4):
        rewards = torch.tensor([r.meta["reward"] for r in rl[q * n:(q + 1) * n]], dtype=torch.float64)
        loo = rewards - (rewards.sum() - rewards) / (n - 1)
        got = torch.tensor([r.advantage for r in rl[q * n:(q + 1) * n]], dtype=torch.float64)
        assert torch.allclose(got, loo, atol=1e-12)
        spread += float(loo.abs().sum())
    assert spread > 0   # some group has mixed rewards, so the check above is not 0 == 0
    model = tr._model()
    nll, count = 0.0, 0
    with torch.no_grad():
        for d in demos:
            ids = torch.tensor([d.input_ids])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            tok = lp[torch.arange(len(d.input_ids) - 1), ids[0, 1:]][d.prompt_len - 1:]
            nll, count = nll - float(tok.sum()), count + len(tok)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = tr.method.update(tr, rows, info)
    assert metrics["sft_loss"] == pytest.approx(coef * nll / count, rel=1e-9)
    assert metrics["offline_ratio"] == pytest.approx(1 / (n + 1))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _source_files():
    return [f for f in SCALE.rglob("*.py") if "methods" not in f.relative_to(SCALE).parts]


def test_no_method_name_is_tested_outside_the_registry():
    """Outside scale/methods/, no code compares method.name (or a name list) to decide what to do."""
    pattern = re.compile(r"(method\.name|\bm\.name)\s*(==|!=|\bin\b|\bnot in\b)")
    hits = [f"{f.name}:{i}" for f in _source_files() for i, line in enumerate(f.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []


def _imports(f: Path) -> set[str]:
    """The scale.* modules a file imports, anywhere in it (also inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("scale"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("scale")}
    return out


def test_no_import_circles_in_scale():
    mods = {".".join(("scale", *f.relative_to(SCALE).with_suffix("").parts)).removesuffix(".__init__"): f
            for f in SCALE.rglob("*.py")}
    graph = {m: {i for i in _imports(f) if i in mods and i != m} for m, f in mods.items()}
    for m in graph:   # a package's module imports its own package's __init__ by design: not a circle
        graph[m] = {i for i in graph[m] if not m.startswith(i + ".")}
    assert {"scale.methods", "scale.loss"} <= graph["scale.train"]   # the graph is read, not empty
    assert "scale.train" not in set().union(*graph.values())       # nothing reaches back into the trainer
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for i in sorted(graph[m]):
            visit(i, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])
