"""The pretrained tiny base model of the miniature world (`toy.world`): the random Qwen2 of `toy.tiny`,
trained with next-token cross-entropy on solutions (worked, or terse with probability `terse_prob`) of the
world's easy levels (clean) and middle levels (noisy: the final value right with probability
`correct_prob`); the hard levels are never shown.

`pretrained_base()` returns a cached Hugging Face model folder, built on first use. The cache lives under
$PTLAB_CACHE (default ~/.cache/ptlab) in a folder named by a hash of the recipe, so changing the recipe
builds a new base. The folder is built in a temporary directory and moved into place with one
`os.replace`, so concurrent test processes never see a half-written model.

This is a plain torch loop on purpose: the base must not depend on the scale trainer it is used to test.
Run `python -m toy.pretrain` to build it and print the build time and the sampled accuracy per level.

The kernels are pinned. This training is chaotic enough that torch's choice of CPU kernels changes the model it
ends at, not only its last digits: the same recipe trained with torch's AVX-512 kernels (an AMD EPYC machine)
gave a base whose middle rungs are far weaker (greedy 0.094 / 0.109 on levels 3 / 4, against 0.719 / 0.797 with
the AVX2 kernels, measured with the ladder below). So on x86-64 the base is always trained with torch's AVX2
kernels, in a child process when the current one runs others (torch reads ATEN_CPU_CAPABILITY once, at start).
Machines of another architecture build their own base; README "The miniature world" says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE_VERSION = 4         # 4: trained with the pinned kernels (CPU_KERNELS)
CPU_KERNELS = "avx2"       # torch's ATEN_CPU_CAPABILITY for the base's training on x86-64 (module docstring)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the base model; its hash names the cache folder."""
    levels: tuple[int, ...] = (1, 2, 3, 4)
    level_weights: tuple[float, ...] = (0.3, 0.3, 0.2, 0.2)
    noisy_levels: tuple[int, ...] = (3, 4)     # the middle rungs
    correct_prob: float = 0.35                 # on noisy levels: P(final value right)
    terse_prob: float = 0.25                   # P(a completion is terse rather than worked)
    n_examples: int = 40000
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    hidden_size: int = 128
    num_layers: int = 3
    intermediate_size: int = 256
    num_heads: int = 4
    seed: int = 0

    def key(self) -> str:
        import transformers

        blob = json.dumps({"recipe": dataclasses.asdict(self), "version": RECIPE_VERSION,
                           "transformers": transformers.__version__.split(".")[0]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("PTLAB_CACHE") or Path.home() / ".cache" / "ptlab")


def _training_texts(recipe: Recipe) -> list[tuple[str, str]]:
    from toy.world import pretraining_pairs

    if len(recipe.levels) != len(recipe.level_weights):
        raise ValueError("level_weights: expected one weight per level")
    return pretraining_pairs(recipe.n_examples, dict(zip(recipe.levels, recipe.level_weights)),
                             recipe.noisy_levels, recipe.correct_prob, recipe.terse_prob, seed=recipe.seed)


def train_base(out_dir: str | Path, recipe: Recipe = Recipe(), log_every: int = 0) -> dict:
    """Build the tokenizer and model, train them per `recipe` and save both to `out_dir`.

    Loss: mean next-token cross-entropy over the completion tokens (and the closing eos) of each
    batch; the prompt tokens are context only. Returns {"seconds", "final_loss", "recipe", "cpu_kernels"}
    (also written to ptlab_recipe.json).
    """
    if _needs_pinned_kernels():
        return _train_in_child(out_dir, recipe, log_every)
    import torch

    from toy.tiny import make_model, make_tokenizer

    t0 = time.perf_counter()
    tok = make_tokenizer()
    model = make_model(tok, hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                       num_heads=recipe.num_heads, num_kv_heads=max(1, recipe.num_heads // 2),
                       intermediate_size=recipe.intermediate_size, max_positions=128, seed=recipe.seed)
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
            print(f"step {step:4d} loss {loss.item():.4f}", flush=True)
    torch.set_num_threads(threads)
    model.eval()
    out_dir = Path(out_dir)
    tok.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    info = {"seconds": time.perf_counter() - t0, "final_loss": loss.item(), "recipe": dataclasses.asdict(recipe),
            "cpu_kernels": torch.backends.cpu.get_cpu_capability()}
    (out_dir / "ptlab_recipe.json").write_text(json.dumps(info, indent=1))
    return info


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _needs_pinned_kernels() -> bool:
    return _x86() and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() != CPU_KERNELS


def pinned_kernel_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default os.environ) in which a child's torch uses the pinned kernels on x86-64; the
    sweep runner starts the world's training runs with it too, so they run the kernels the results were made with."""
    env = dict(os.environ if env is None else env)
    if _x86():
        env["ATEN_CPU_CAPABILITY"] = CPU_KERNELS
    return env


def _train_in_child(out_dir: str | Path, recipe: Recipe, log_every: int) -> dict:
    """`train_base` in a fresh interpreter whose torch uses the pinned kernels."""
    code = ("import json, sys; from toy.pretrain import Recipe, train_base; "
            "r = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[1]).items()}; "
            "train_base(sys.argv[2], Recipe(**r), int(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(recipe)), str(out_dir), str(log_every)],
                   env=pinned_kernel_env(), check=True)
    return json.loads((Path(out_dir) / "ptlab_recipe.json").read_text())


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


def ladder(model_dir: str | Path, n_prompts: int = 64, n: int = 8, max_new_tokens: int = 40, seed: int = 0,
           levels: tuple[int, ...] | None = None) -> dict[int, dict]:
    """Measure each level's rung on `n_prompts` held-out (test-split) problems: {level: {"greedy": greedy
    accuracy, "avg@n": mean correct fraction of n samples at temperature 1 (top_k 0, top_p 1), "all_fail":
    fraction of problems with none of the n samples correct}}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scale.evaluate import generate, grade, metrics_of
    from scale.rewards import load_reward
    from toy.world import LEVELS, examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    reward = load_reward("math")
    out = {}
    for lv in levels or tuple(LEVELS):
        exs = examples(lv, "test", n_prompts)
        rows, prompts = [{"id": i, "answer": r["answer"]} for i, r in enumerate(exs)], [r["prompt"] for r in exs]
        torch.manual_seed(seed)
        sampled = generate(model, tok, prompts, n=n, temperature=1.0, max_new_tokens=max_new_tokens, batch_size=64)
        greedy = generate(model, tok, prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=64)
        per_prompt = grade(rows, sampled, reward, n)
        for p, g in zip(per_prompt, grade(rows, greedy, reward, 1)):
            p["greedy"] = g["correct"]
        m = metrics_of(per_prompt, n, [])
        out[lv] = {k: m[k] for k in ("greedy", f"avg@{n}", "all_fail")}
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="build the tiny base model and measure its difficulty ladder")
    ap.add_argument("--out", type=Path, help="train into this folder instead of the cache")
    a = ap.parse_args()
    if a.out:
        info = train_base(a.out, log_every=100)
        path = a.out
    else:
        t = time.perf_counter()
        path = pretrained_base()
        info = json.loads((path / "ptlab_recipe.json").read_text())
        print(f"cache: {path} (this call {time.perf_counter() - t:.1f} s)")
    print(f"build time {info['seconds']:.1f} s, final loss {info['final_loss']:.4f}")
    for lv, m in ladder(path).items():
        print(f"level {lv}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
