"""Benchmark: host memory per token of the trainer's tokenised data, old Python lists against the mapped arrays.

Run: `python -m experiments.bench_data_memory [--rows 8000] [--seed 0]`. The data set is synthetic and built
here (nothing downloaded): SFT rows of arithmetic text whose completions run from a few to a few hundred
tokens under the repo's tiny byte-level BPE tokenizer (`toy.tiny.make_tokenizer`, saved to a temporary
folder; it splits digits one by one, so the text is token-dense). Every case runs in a fresh process that
first loads the tokenizer and the data file with `datasets` (so the libraries' own memory is already counted
before the measurement starts), then records /proc/self/status before and after preparing the data:

* lists: the former `prepare_data` (all rows as Python dicts, ids as lists of ints: `ds.to_list()`, one
  `tokenize_pairs` over the whole set);
* build: the current `prepare_data` in the process that writes the cache (tokenised CHUNK_ROWS at a time,
  written to flat arrays, then memory-mapped);
* mapped: the current `prepare_data` in a process that finds the cache built (what every other rank pays);
* mapped+read: the same after reading every example once (`data[i]` for all i, as an epoch does).

Reported per token (tokens = prompt + completion ids of every example): the resident-set growth (VmRSS), split
into private memory (RssAnon: this process's own) and file pages (RssFile: the page cache of the mapped
files, shared by every process that maps them), the peak growth (VmHWM, reset through /proc/self/clear_refs
before the step), and the size of the cache files (held once per machine).
"""

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ("lists", "build", "mapped", "mapped+read")
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def _status() -> dict[str, int]:
    """The /proc/self/status fields of FIELDS, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name = line.split(":")[0]
        if name in FIELDS:
            out[name] = int(line.split()[1]) * 1024
    return out


def write_data(path: Path, rows: int, seed: int) -> dict:
    """`rows` SFT examples; returns the length distribution in characters."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lens = []
    with path.open("w") as f:
        for i in range(rows):
            a, b = int(rng.integers(0, 1000)), int(rng.integers(0, 1000))
            k = int(rng.geometric(1 / 12))   # steps: mean 12, a long tail
            steps = " ".join(f"Then {a} + {j} * {b} = {a + j * b}." for j in range(k))
            comp = f"{steps} The answer is \\boxed{{{a + k * b}}}."
            prompt = f"Problem {i}: what is {a} + {k} * {b}? Think step by step."
            lens.append(len(prompt) + len(comp))
            f.write(json.dumps({"prompt": prompt, "completion": comp, "answer": str(a + k * b)}) + "\n")
    return {"chars_mean": float(np.mean(lens)), "chars_p50": float(np.median(lens)),
            "chars_p90": float(np.percentile(lens, 90)), "chars_max": int(max(lens))}


def _old_prepare(path: str, cfg, tok, context: int) -> list[dict]:
    """The former `prepare_data` for SFT data (commit 0b27d4d): every row a dict of Python lists."""
    from scale.data import load_data, require_columns, to_prompt_completion, tokenize_pairs

    d = cfg.data
    ds = load_data(path, d.split)
    require_columns(ds, "sft", source=path)
    ds = to_prompt_completion(ds, tok)
    rows = ds.to_list()
    prompts = [d.prompt_template.format(prompt=r["prompt"]) for r in rows]
    max_len = min(d.max_length, context)
    out = [{"prompt": p, "answer": str(r.get("answer", ""))} for p, r in zip(prompts, rows)]
    toks = tokenize_pairs(prompts, [str(r["completion"]) for r in rows], tok, max_len, d.max_prompt_length)
    for o, t in zip(out, toks):
        o["completion"] = t
        o["prompt_ids"] = t["input_ids"][: t["prompt_len"]]
    return out


def one(case: str, data: str, tok_dir: str, cache: str) -> dict:
    """Memory growth of preparing the data in this (fresh) process."""
    os.environ["PTLAB_DATA_CACHE"] = cache
    from transformers import AutoTokenizer

    from scale.config import Config
    from scale.data import load_data, prepare_data

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = Config()
    cfg.data.path, cfg.data.max_length, cfg.data.max_prompt_length = data, 4096, 512
    load_data(data)                      # the libraries' own memory, and the Arrow cache, before measuring
    tok(["warm up the tokenizer"], add_special_tokens=False)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current resident set
    before = _status()
    if case == "lists":
        out = _old_prepare(data, cfg, tok, 4096)
    else:
        out = prepare_data(data, cfg, tok, "sft", 4096)
        if case == "mapped+read":
            for i in range(len(out)):
                out[i]
    gc.collect()
    after = _status()
    tokens = sum(len(out[i]["completion"]["input_ids"]) for i in range(len(out)))
    res = {"case": case, "tokens": tokens, "rows": len(out)}
    for k in FIELDS:
        res[k] = (after[k] - before[k]) / tokens
    if case != "lists":
        res["file_bytes_per_token"] = out.nbytes() / tokens
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", nargs=4, metavar=("CASE", "DATA", "TOKENIZER", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    sys.path.insert(0, str(ROOT))
    from toy.tiny import make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_tokenizer().save_pretrained(tmp / "tok")
        dist = write_data(tmp / "data.jsonl", args.rows, args.seed)
        print(f"data: {args.rows} SFT rows, characters per row (prompt + completion) mean {dist['chars_mean']:.0f}, "
              f"median {dist['chars_p50']:.0f}, p90 {dist['chars_p90']:.0f}, max {dist['chars_max']}")
        print(f"{'case':12s} {'tokens':>9s} {'RSS B/tok':>9s} {'anon':>7s} {'file':>7s} {'peak':>7s} "
              f"{'cache file':>10s}")
        for case in CASES:
            cmd = [sys.executable, "-m", "experiments.bench_data_memory", "--one", case, str(tmp / "data.jsonl"),
                   str(tmp / "tok"), str(tmp / "cache")]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if p.returncode:
                sys.exit(p.stderr[-3000:])
            r = json.loads(p.stdout.strip().splitlines()[-1])
            fb = f"{r['file_bytes_per_token']:10.1f}" if "file_bytes_per_token" in r else f"{'-':>10s}"
            print(f"{case:12s} {r['tokens']:9d} {r['VmRSS']:9.1f} {r['RssAnon']:7.1f} {r['RssFile']:7.1f} "
                  f"{r['VmHWM']:7.1f} {fb}", flush=True)


if __name__ == "__main__":
    main()
