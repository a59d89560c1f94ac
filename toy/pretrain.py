"""A pretrained tiny base model: the random tiny Qwen2 of `toy.tiny`, trained briefly with next-token
cross-entropy on the arithmetic demonstrations of `toy.tasks`, so that RL from it gets non-zero reward.

`pretrained_base()` returns a cached Hugging Face model folder, built on first use. The cache lives under
$PTLAB_CACHE (default ~/.cache/ptlab) in a folder named by a hash of the recipe, so changing the recipe
builds a new base. The folder is built in a temporary directory and moved into place with one
`os.replace`, so concurrent test processes never see a half-written model.

This is a plain torch loop on purpose: the base must not depend on the scale trainer it is used to test.
Run `python -m toy.pretrain` to build it and print the build time and the sampled accuracy per level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

RECIPE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the base model; its hash names the cache folder."""
    levels: tuple[int, ...] = (1, 2, 3)
    level_weights: tuple[float, ...] = (0.5, 0.3, 0.2)  # level 1 dominates: RL tests start there
    n_examples: int = 6000
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 20
    hidden_size: int = 64
    num_layers: int = 2
    intermediate_size: int = 128
    seed: int = 0

    def key(self) -> str:
        import transformers

        blob = json.dumps({"recipe": dataclasses.asdict(self), "version": RECIPE_VERSION,
                           "transformers": transformers.__version__.split(".")[0]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("PTLAB_CACHE") or Path.home() / ".cache" / "ptlab")


def _training_texts(recipe: Recipe) -> list[tuple[str, str]]:
    import random

    from toy.tasks import make_examples

    rng = random.Random(recipe.seed)
    counts = [round(w * recipe.n_examples / sum(recipe.level_weights)) for w in recipe.level_weights]
    rows = [r for lv, n in zip(recipe.levels, counts) for r in make_examples(n, lv, seed=recipe.seed)]
    rng.shuffle(rows)
    return [(r["prompt"], r["completion"]) for r in rows]


def train_base(out_dir: str | Path, recipe: Recipe = Recipe(), log_every: int = 0) -> dict:
    """Build the tokenizer and model, train them per `recipe` and save both to `out_dir`.

    Loss: mean next-token cross-entropy over the completion tokens (and the closing eos) of each
    batch; the prompt tokens are context only. Returns {"seconds", "final_loss"}.
    """
    import torch

    from toy.tiny import make_model, make_tokenizer

    t0 = time.perf_counter()
    tok = make_tokenizer()
    model = make_model(tok, hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                       intermediate_size=recipe.intermediate_size, seed=recipe.seed)
    pairs = _training_texts(recipe)
    p_ids = tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    c_ids = tok([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    seqs = [(p + c + [tok.eos_token_id], len(p)) for p, c in zip(p_ids, c_ids)]

    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    # linear warm-up, then linear decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / recipe.warmup,
                                                                  max(0.0, (recipe.steps - s) / recipe.steps)))
    model.train()
    loss = torch.tensor(float("nan"))
    # One thread: this model is far too small to gain from more, and on a shared machine two
    # contending threads made each step ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for step in range(recipe.steps):
        idx = torch.randint(len(seqs), (recipe.batch_size,), generator=gen).tolist()
        width = max(len(seqs[i][0]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id)
        labels = torch.full((len(idx), width), -100)
        for row, i in enumerate(idx):
            s, plen = seqs[i]
            ids[row, : len(s)] = torch.tensor(s)
            labels[row, plen: len(s)] = torch.tensor(s[plen:])
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"step {step:4d} loss {loss.item():.4f}")
    torch.set_num_threads(threads)
    model.eval()
    out_dir = Path(out_dir)
    tok.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    info = {"seconds": time.perf_counter() - t0, "final_loss": loss.item(), "recipe": dataclasses.asdict(recipe)}
    (out_dir / "ptlab_recipe.json").write_text(json.dumps(info, indent=1))
    return info


def pretrained_base(cache_dir: str | Path | None = None, recipe: Recipe = Recipe()) -> Path:
    """The cached pretrained tiny base model folder, building it on first use (atomically)."""
    root = cache_root(cache_dir)
    final = root / f"tiny-base-{recipe.key()}"
    if (final / "ptlab_recipe.json").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=root))
    try:
        train_base(tmp, recipe)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: its folder is complete, use it
            if not (final / "ptlab_recipe.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def sampled_accuracy(model_dir: str | Path, level: int = 1, n_prompts: int = 100, temperature: float = 1.0,
                     max_new_tokens: int = 32, seed: int = 0) -> float:
    """Fraction of `n_prompts` level-`level` prompts (a held-out seed) whose one sampled completion ends
    in the right boxed answer. Temperature 0 means greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toy.tasks import make_examples

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = make_examples(n_prompts, level, seed=10_000 + seed)
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=temperature > 0, temperature=temperature or None, top_p=1.0,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    hits = [re.findall(r"\\boxed\{([^{}]*)\}", t)[-1:] == [r["answer"]] for t, r in zip(texts, rows)]
    return sum(hits) / len(hits)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build the tiny base model and report its sampled accuracy")
    ap.add_argument("--out", type=Path, help="train into this folder instead of the cache")
    a = ap.parse_args()
    if a.out:
        info = train_base(a.out, log_every=50)
        path = a.out
    else:
        t = time.perf_counter()
        path = pretrained_base()
        info = json.loads((path / "ptlab_recipe.json").read_text())
        print(f"cache: {path} (this call {time.perf_counter() - t:.1f} s)")
    print(f"build time {info['seconds']:.1f} s, final loss {info['final_loss']:.4f}")
    for lv in (1, 2, 3):
        for temp in (1.0, 0.0):
            print(f"level {lv} temperature {temp}: accuracy {sampled_accuracy(path, lv, temperature=temp):.2f}")
