"""`ptlab eval`: pass@k (unbiased estimator) and avg@n of a model on JSONL benchmark files.

Benchmark format: a JSONL file (or parquet / a folder, anything `scale.data.load_data` reads), one
object per line with

    prompt    the question as text (used as is) or a list of {"role", "content"} messages
    messages  instead of prompt: a conversation; rendered with the tokenizer's chat template and the
              generation prompt (a trailing assistant message, if any, is dropped)
    answer    the ground truth, compared with the last \\boxed{...} of each completion
    id        optional; defaults to the line number

for example `{"id": "q1", "prompt": "What is 3 + 4?\\n", "answer": "7"}`. With `chat_template=True`
(`--chat-template`) text prompts are wrapped as one user message and rendered with the chat template.

For each prompt n completions are sampled (temperature, top_p, max_new_tokens; temperature 0 is
greedy) and graded by the reward (`scale.rewards.load_rewards`: "math", "exact", "module:function" or a
list of them, called as TRL calls reward functions: with the prompt, the row's other columns and the
completions' token ids, re-tokenised from the text); a completion is correct when its reward is at least
`threshold` (0.5). With c correct of n,

    pass@k = 1 - C(n - c, k) / C(n, k)     (the unbiased estimator of Chen et al. 2021, for k <= n)
    avg@n  = c / n

each averaged over prompts (also per level and role when the rows have `level` / `role` columns, e.g.
"L3/avg@8"), and all_fail, the fraction of prompts with no correct sample. The results JSON holds the
settings (sampling included: temperature, top_p, top_k), `metrics` ({"pass@k": ..., "avg@n": ...}),
and `per_prompt` ([{"id", "n", "correct"}]); `samples` (a JSONL path) also writes every completion.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from c correct of n samples: 1 - C(n-c, k)/C(n, k), computed as the product
    prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomials."""
    for name, v in (("n", n), ("c", c), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{name}: expected an int, got {v!r}")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"n, c: expected n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k: expected 1 <= k <= n={n}, got {k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def grade(rows: list[dict], completions: list[list[str]], reward_fn, n: int,
          threshold: float = 0.5, completion_ids: list[list[list[int]]] | None = None,
          trainer_state=None) -> list[dict]:
    """Grade n completions per row -> per_prompt [{"id", "n", "correct", "rewards", and the row's "level" /
    "role" when it has them}]. `reward_fn`: a `scale.rewards.Rewards` or what `load_rewards` takes; it gets
    the row's "answer", "prompt" and other "columns" (when the row has them), and the completions' token ids
    (`completion_ids`, one list per row) when given. A reward that fails names the row's id."""
    from scale.rewards import RewardError, load_rewards

    reward_fn = load_rewards(reward_fn)
    per_prompt = []
    for j, (r, comps) in enumerate(zip(rows, completions)):
        k = len(comps)
        try:
            rewards = reward_fn(comps, [r["answer"]] * k, prompts=[r.get("prompt", "")] * k,
                                completion_ids=None if completion_ids is None else completion_ids[j],
                                columns={c: [v] * k for c, v in r.get("columns", {}).items()},
                                trainer_state=trainer_state)
        except RewardError as e:
            raise ValueError(f"{e} [prompt {r['id']!r}]") from e
        p = {"id": r["id"], "n": n, "correct": sum(x >= threshold for x in rewards), "rewards": rewards}
        per_prompt.append({**p, **{k: r[k] for k in GROUPS if k in r}})
    return per_prompt


GROUPS = {"level": "L", "role": ""}   # optional row columns that metrics are also reported by, with a prefix


def metrics_of(per_prompt: list[dict], n: int, ks: list[int]) -> dict[str, float]:
    """"pass@k" for each k, "avg@n", "all_fail" (no correct sample), "greedy" when the records carry a greedy
    result, each over all prompts and, when records carry them, per level ("L3/avg@8") and role ("middle/...")."""
    def one(ps):
        m = {f"pass@{k}": sum(pass_at_k(n, p["correct"], k) for p in ps) / len(ps) for k in ks}
        m[f"avg@{n}"] = sum(p["correct"] / n for p in ps) / len(ps)
        m["all_fail"] = sum(p["correct"] == 0 for p in ps) / len(ps)
        if all("greedy" in p for p in ps):
            m["greedy"] = sum(p["greedy"] for p in ps) / len(ps)
        return m

    out = one(per_prompt)
    for col, prefix in GROUPS.items():
        for v in sorted({p[col] for p in per_prompt if col in p}, key=str):
            out.update({f"{prefix}{v}/{k}": x for k, x in one([p for p in per_prompt if p.get(col) == v]).items()})
    return out


def load_benchmark(path: str | Path, tokenizer, chat_template: bool = False, limit: int | None = None) -> list[dict]:
    """Rows {"id", "prompt" (text), "answer", "columns" (the file's other columns, for the reward)} from a
    benchmark file (format in the module docstring)."""
    from scale.data import OWN_COLUMNS, check_text_columns, load_data, render_prompt, require_columns

    ds = load_data(path)
    require_columns(ds, "eval", source=str(path))
    check_text_columns(ds, str(path))   # a row without an answer would be graded against the text "None"
    rows = []
    for i, ex in enumerate(ds):
        if limit is not None and i >= limit:
            break
        prompt = ex.get("prompt")
        if prompt is None:  # a `messages` conversation: the prompt is everything before an assistant reply
            msgs = ex["messages"]
            prompt = msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
        elif chat_template and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        row = {"id": i if ex.get("id") is None else ex["id"], "prompt": render_prompt(prompt, tokenizer),
               "answer": str(ex["answer"])}
        row.update({k: ex[k] for k in GROUPS if ex.get(k) is not None})  # optional: metrics also per group
        row["columns"] = {k: v for k, v in ex.items() if k not in OWN_COLUMNS}
        rows.append(row)
    return rows


def generate(model, tokenizer, prompts: list[str], n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             max_new_tokens: int = 256, batch_size: int = 8, top_k: int = 0) -> list[list[str]]:
    """n sampled completions per prompt (decoded new tokens, special tokens dropped), batch_size prompts
    per `model.generate` call with left padding. temperature 0 means greedy decoding; top_k 0 means none."""
    import torch

    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"n, batch_size, max_new_tokens: expected >= 1, got {n}, {batch_size}, {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"temperature, top_p, top_k: expected temperature >= 0, 0 < top_p <= 1 and top_k >= 0, "
                         f"got {temperature}, {top_p}, {top_k}")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # top_k=0 explicitly: transformers' default (50) would cut the tail that pass@k at large k depends on,
    # and the trainer's rollouts use no top-k either
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out: list[list[str]] = []
    try:
        for s in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[s: s + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(model.device)
            reps = n if temperature > 0 else 1  # greedy: one decode per prompt, repeated n times
            with torch.no_grad():
                ids = model.generate(**enc, num_return_sequences=reps, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad, **sampling)
            texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            out += [texts[j * reps: (j + 1) * reps] * (n // reps) for j in range(len(texts) // reps)]
    finally:
        tokenizer.padding_side = side
    return out


def _vllm_engine(model, seed: int):
    """vLLM's offline engine on a model folder (it needs a GPU: not run on ptlab's CPU machines)."""
    if not isinstance(model, (str, Path)):
        raise ValueError("backend: 'vllm' loads the model itself: pass a model folder, not a loaded model")
    try:
        from vllm import LLM
    except ImportError:
        raise ValueError("backend: 'vllm' is not installed (pip install vllm, on a GPU machine); use 'hf'") from None
    return LLM(model=str(model), seed=seed)


def generate_vllm(llm, tokenizer, prompts: list[str], n: int, temperature: float, top_p: float,
                  max_new_tokens: int, top_k: int = 0) -> list[list[str]]:
    """What `generate` returns, sampled by vLLM: the prompts go in as the same token ids (no special tokens
    added), greedy (temperature 0) decodes once per prompt and repeats it n times."""
    from vllm import SamplingParams

    reps = n if temperature > 0 else 1
    sp = SamplingParams(n=reps, temperature=temperature, top_p=top_p, top_k=top_k or -1, max_tokens=max_new_tokens)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    outs = llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)
    return [[o.text for o in out.outputs] * (n // reps) for out in outs]


def _load_model(model, tokenizer):
    """(model, tokenizer) from a path / hub name, or a loaded model with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(model, (str, Path)):
        if tokenizer is None:
            raise ValueError("tokenizer: required when model is an already loaded model")
        return model, tokenizer
    path = str(model)
    is_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not path.startswith(".")
    if not Path(path).expanduser().exists() and not is_hub_id:
        raise ValueError(f"model: path {path!r} does not exist")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    try:
        tok = tokenizer or AutoTokenizer.from_pretrained(path)
        mdl = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise ValueError(f"model: cannot load {path!r} ({e})") from e
    return mdl.to("cuda" if cuda else "cpu").eval(), tok


def evaluate(model, data: str | Path, *, tokenizer=None, n: int = 1, ks: list[int] | None = None,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
             batch_size: int = 8,
             reward: str | list = "math", reward_weights: list[float] | None = None, threshold: float = 0.5,
             chat_template: bool = False, limit: int | None = None, backend: str = "hf",
             seed: int = 0, out: str | Path | None = None, samples: str | Path | None = None) -> dict:
    """Sample, grade and score a benchmark; returns the results dict (written to `out` if given).

    `model` is a folder / hub name or a loaded model (then pass `tokenizer`); `ks` defaults to the
    powers of two up to n. `backend`: hf (`model.generate`) or vllm (vLLM's offline engine on a model folder).
    """
    import torch

    from scale.rewards import load_rewards

    ks = sorted(set(ks or [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]))
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"ks: expected values in 1..n={n}, got {ks}")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend: expected 'hf' or 'vllm', got {backend!r}")
    reward_fn = load_rewards(reward, reward_weights, key="reward")
    if backend == "vllm":
        llm = _vllm_engine(model, seed)
        from transformers import AutoTokenizer

        tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
    else:
        model, tokenizer = _load_model(model, tokenizer)
    rows = load_benchmark(data, tokenizer, chat_template=chat_template, limit=limit)
    if rows:
        reward_fn.check(rows[0]["columns"])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    prompts = [r["prompt"] for r in rows]
    completions = generate_vllm(llm, tokenizer, prompts, n, temperature, top_p, max_new_tokens, top_k) \
        if backend == "vllm" else generate(model, tokenizer, prompts, n=n, temperature=temperature, top_p=top_p,
                                           max_new_tokens=max_new_tokens, batch_size=batch_size, top_k=top_k)
    ids = [tokenizer(comps, add_special_tokens=False)["input_ids"] for comps in completions]
    per_prompt = grade(rows, completions, reward_fn, n, threshold, completion_ids=ids)
    metrics = metrics_of(per_prompt, n, ks)
    sample_rows = [{**{k: v for k, v in r.items() if k != "columns"}, "completions": comps, "rewards": p["rewards"]}
                   for r, comps, p in zip(rows, completions, per_prompt)]
    for p in per_prompt:
        del p["rewards"]
    results = {"model": str(getattr(model, "name_or_path", "")), "data": str(data), "num_prompts": len(rows),
               "n": n, "temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_new_tokens,
               "reward": reward if isinstance(reward, (str, list)) else reward_fn.__name__,
               **({"reward_weights": list(reward_weights)} if reward_weights else {}),
               "threshold": threshold, "seed": seed, "seconds": time.perf_counter() - t0,
               "metrics": metrics, "per_prompt": per_prompt}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1))
    if samples is not None:
        Path(samples).parent.mkdir(parents=True, exist_ok=True)
        Path(samples).write_text("".join(json.dumps(s) + "\n" for s in sample_rows))
    return results
