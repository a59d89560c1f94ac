"""toy.pretrain: the cached base is built once, atomically, keyed by the recipe; the tiny tokenizer
reloads unchanged; and (slow) the full recipe gives the ladder its roles (easy / middle / hard rungs)."""

import json
import os
import platform

import pytest

import toy.pretrain as pretrain
from toy.pretrain import Recipe, ladder, pretrained_base

SMALL = Recipe(n_examples=64, steps=3, batch_size=8, hidden_size=32, intermediate_size=64, num_layers=1)


def test_tokenizer_roundtrip(tmp_path):
    """The in-memory tokenizer and the one AutoTokenizer rebuilds next to a qwen2 config split alike."""
    from transformers import AutoTokenizer

    from toy.tasks import make_mixed
    from toy.tiny import make_tokenizer, save_tiny_model
    from toy.world import LEVELS, examples

    path = save_tiny_model(tmp_path / "m", hidden_size=16, intermediate_size=32)
    a, b = make_tokenizer(), AutoTokenizer.from_pretrained(path)
    texts = [r["prompt"] + r["completion"] + r["rejected"] for r in make_mixed(200, (1, 2, 3, 4, 5), seed=0)]
    texts += [r["prompt"] + r["worked"] + r["terse"] for lv in LEVELS for r in examples(lv, "train", 30)]
    texts.append(b.apply_chat_template([{"role": "user", "content": "What is 12 + 3?"}], tokenize=False,
                                       add_generation_prompt=True))
    assert all(a(t)["input_ids"] == b(t)["input_ids"] for t in texts)
    assert b.decode(b(texts[0])["input_ids"]) == texts[0]


def test_cache_is_built_once_and_keyed_by_recipe(tmp_path, monkeypatch):
    calls = []
    real = pretrain.train_base
    monkeypatch.setattr(pretrain, "train_base", lambda out, r: calls.append(r) or real(out, r))
    p1 = pretrained_base(tmp_path, recipe=SMALL)
    p2 = pretrained_base(tmp_path, recipe=SMALL)
    assert p1 == p2 and len(calls) == 1                          # second call reuses the cache
    assert {"config.json", "tokenizer.json", "ptlab_recipe.json"} <= {f.name for f in p1.iterdir()}
    assert json.loads((p1 / "ptlab_recipe.json").read_text())["recipe"]["steps"] == SMALL.steps
    other = Recipe(**{**SMALL.__dict__, "seed": 1})
    assert pretrained_base(tmp_path, recipe=other) != p1 and len(calls) == 2   # a recipe change rebuilds
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".building-")]   # no temp folders left
    monkeypatch.setenv("PTLAB_CACHE", str(tmp_path))
    assert pretrained_base(recipe=SMALL) == p1 and len(calls) == 2   # env var names the cache


def test_losing_the_race_keeps_the_winner(tmp_path, monkeypatch):
    """Another process finishes the same folder while we build: os.replace fails, theirs is used."""
    real = pretrain.train_base
    final = tmp_path / f"tiny-base-{SMALL.key()}"

    def racing(out, r):
        real(final, r)                   # the "other process" completes first
        (final / "winner").write_text("1")
        return real(out, r)

    monkeypatch.setattr(pretrain, "train_base", racing)
    assert pretrained_base(tmp_path, recipe=SMALL) == final
    assert (final / "winner").exists()
    assert sorted(os.listdir(tmp_path)) == [final.name]


def test_ladder_runs(tmp_path):
    path = pretrained_base(tmp_path, recipe=SMALL)
    out = ladder(path, n_prompts=3, n=2, max_new_tokens=4, levels=(1, 5))
    assert set(out) == {1, 5}
    assert all(0.0 <= v <= 1.0 for m in out.values() for v in m.values()) and "avg@2" in out[1]


@pytest.mark.slow
def test_full_base_gives_every_rung_its_role():
    """The real recipe (about 7 CPU-minutes to build) on 64 held-out prompts per level, 8 samples each:
    easy rungs greedy >= 0.8, middle rungs avg@8 in [0.1, 0.5], hard rungs all-8-fail > 0.9.
    Measured (README): easy greedy 1.00 / 0.98; middle avg@8 0.22 / 0.22; hard all-fail 0.94 / 0.97."""
    from toy.world import ROLES

    out = ladder(pretrained_base())
    assert all(out[lv]["greedy"] >= 0.8 for lv in ROLES["easy"]), out
    assert all(0.1 <= out[lv]["avg@8"] <= 0.5 for lv in ROLES["middle"]), out
    assert all(out[lv]["all_fail"] > 0.9 for lv in ROLES["hard"]), out


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="kernels are pinned on x86-64")
def test_the_base_trains_with_the_pinned_kernels_whatever_this_process_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    info = pretrain.train_base(tmp_path / "base", SMALL)
    assert info["cpu_kernels"] == pretrain.CPU_KERNELS.upper()
    assert pretrain.pinned_kernel_env({"A": "1"}) == {"A": "1", "ATEN_CPU_CAPABILITY": pretrain.CPU_KERNELS}
