"""toy.pretrain: the cached base is built once, atomically, keyed by the recipe; the tiny tokenizer
reloads unchanged; and (slow) the full recipe gives non-zero sampled accuracy on level-1 prompts."""

import json
import os

import pytest

import toy.pretrain as pretrain
from toy.pretrain import Recipe, pretrained_base, sampled_accuracy

SMALL = Recipe(n_examples=64, steps=3, batch_size=8, hidden_size=32, intermediate_size=64)


def test_tokenizer_roundtrip(tmp_path):
    """The in-memory tokenizer and the one AutoTokenizer rebuilds next to a qwen2 config split alike."""
    from transformers import AutoTokenizer

    from toy.tasks import make_mixed
    from toy.tiny import make_tokenizer, save_tiny_model

    path = save_tiny_model(tmp_path / "m", hidden_size=16, intermediate_size=32)
    a, b = make_tokenizer(), AutoTokenizer.from_pretrained(path)
    texts = [r["prompt"] + r["completion"] + r["rejected"] for r in make_mixed(200, (1, 2, 3, 4, 5), seed=0)]
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


def test_sampled_accuracy_runs(tmp_path):
    path = pretrained_base(tmp_path, recipe=SMALL)
    acc = sampled_accuracy(path, level=1, n_prompts=4, max_new_tokens=4)
    assert 0.0 <= acc <= 1.0


@pytest.mark.slow
def test_full_base_solves_level_one_sometimes():
    """The real recipe (about 30 s to build on one CPU thread) must give RL something to reinforce:
    sampled accuracy at temperature 1 on 100 held-out level-1 prompts above 10% (measured: 0.43)."""
    path = pretrained_base()
    assert sampled_accuracy(path, level=1, n_prompts=100, temperature=1.0) > 0.10
