"""Benchmark: padded positions the decoder computes with plain, length-grouped and packed micro-batches.

Run: `python -m experiments.bench_padding [--rows 4000] [--steps 50] [--time]`. Built here, nothing downloaded:

* SFT: synthetic arithmetic demonstrations (`experiments.bench_data_memory.write_data`: the number of worked
  steps per row is geometric with mean 12, so lengths have a long tail), tokenised by `prepare_data` with the
  repo's tiny BPE tokenizer; global batch 64 examples, 8 micro-batches (run.grad_accum);
* DPO: pairs of those rows' prompts with their own completion (chosen) and another row's (rejected); batch 32
  pairs, 8 micro-batches;
* RL: the same prompts with 8 rollouts each whose completion lengths are drawn log-normally (median 1024
  tokens, sigma 0.9 in log space) and cut at 8192, the budget of the long-context RL configs; batch 32 prompts
  (256 rows), 16 micro-batches.

Each step takes the rows the trainer would (`Trainer.local_indices`: a seeded permutation per epoch, one
process), splits them with `scale.loss.split_rows` as the trainer does, and counts the positions the decoder
runs: micro-batch rows x its longest row (padded, plain or grouped), the real tokens (padding-free), or the
length of the packed row `scale.logprobs.pack` builds with shared prefixes (run.share_prefix: a prompt held once
per micro-batch however many of its rows are there). The length distributions are printed with the results.

With --time, the same for wall time: `Trainer.update` (forward + backward + AdamW) of one SFT step on a
randomly initialised Qwen2 (hidden 256, 4 layers, float32, one thread), each mode in turn, interleaved over
several rounds; the median per mode is printed. Packed micro-batches are timed twice: with sdpa under
transformers' block-diagonal mask ("packed, sdpa mask"), and with the per-row attention the trainer switches an
sdpa model to under run.padding_free (`scale.logprobs.use_packed_attention`).
"""

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

MODES = ("plain", "grouped", "packed", "grouped+packed", "shared", "grouped+shared")
SHARED_MODE = {"plain": "shared", "grouped": "grouped+shared"}   # the same split, packed with shared prefixes
TIMED = ("plain", "grouped", "packed, sdpa mask", "packed", "grouped+packed")


@functools.lru_cache(maxsize=8)
def _perm(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _order(n: int, size: int, step: int, seed: int) -> list[int]:
    """The examples of `step` as `Trainer.local_indices` picks them on one process (data.shuffle=true)."""
    return [int(_perm(n, seed, k // n)[k % n]) for k in range(step * size, (step + 1) * size)]


def positions(steps: list, k: int) -> dict[str, int]:
    """Decoder positions computed over `steps` (lists of Rows) per mode, and the real tokens."""
    from scale.loss import split_rows

    out = dict.fromkeys(("tokens", *MODES), 0)
    for rows in steps:
        out["tokens"] += sum(len(r.input_ids) for r in rows)
        for mode, group in (("plain", False), ("grouped", True)):
            mbs = split_rows(rows, k, group)
            out[mode] += sum(len(mb) * max(len(r.input_ids) for r in mb) for mb in mbs)
            out[SHARED_MODE[mode]] += sum(map(_shared, mbs))
    out["packed"] = out["grouped+packed"] = out["tokens"]
    return out


def _shared(rows) -> int:
    """Positions of a micro-batch's packed row with shared prefixes, as the trainer builds it."""
    from scale.logprobs import pack
    from scale.loss import collate

    return pack(collate(rows, pad_id=0), share_prefix=True)["input_ids"].shape[1]


def _dist(lengths) -> str:
    a = np.asarray(lengths)
    return (f"mean {a.mean():.0f}, median {np.median(a):.0f}, p10 {np.percentile(a, 10):.0f}, "
            f"p90 {np.percentile(a, 90):.0f}, max {a.max()}")


def build(rows: int, steps: int, seed: int, tmp: Path):
    from experiments.bench_data_memory import write_data
    from scale.config import Config
    from scale.data import prepare_data
    from scale.loss import Row
    from toy.tiny import make_tokenizer

    tok = make_tokenizer()
    write_data(tmp / "d.jsonl", rows, seed)
    cfg = Config()
    cfg.data.path, cfg.data.max_length = str(tmp / "d.jsonl"), 8192 + 512
    os.environ["PTLAB_DATA_CACHE"] = str(tmp / "cache")
    data = prepare_data(cfg.data.path, cfg, tok, "sft", 8192 + 512)
    n = len(data)
    exs = [data[i] for i in range(n)]
    sft = [[Row(e["completion"]["input_ids"], e["completion"]["prompt_len"], "sft")
            for e in (exs[i] for i in _order(n, 64, s, seed))] for s in range(steps)]
    other = np.random.default_rng([seed, 1]).permutation(n)
    dpo = []
    for s in range(steps):
        rows_ = []
        for i in _order(n, 32, s, seed):
            p, plen = exs[i]["prompt_ids"], exs[i]["completion"]["prompt_len"]
            rej = exs[int(other[i])]["completion"]
            rows_ += [Row(exs[i]["completion"]["input_ids"], plen, "chosen"),
                      Row(p + rej["input_ids"][rej["prompt_len"]:], plen, "rejected")]
        dpo.append(rows_)
    rng = np.random.default_rng([seed, 2])
    rl, comp_lens = [], []
    for s in range(steps):
        rows_ = []
        for i in _order(n, 32, s, seed):
            p = exs[i]["prompt_ids"]
            for _ in range(8):
                m = int(min(8192, max(1, round(rng.lognormal(np.log(1024), 0.9)))))
                comp_lens.append(m)
                rows_.append(Row(p + [0] * m, len(p), "rl"))
        rl.append(rows_)
    dists = {"sft": _dist([len(r.input_ids) for st in sft for r in st]),
             "dpo": _dist([len(r.input_ids) for st in dpo for r in st]),
             "rl": _dist([len(r.input_ids) for st in rl for r in st]) +
             f" (completions: {_dist(comp_lens)}, {np.mean(np.asarray(comp_lens) == 8192):.1%} at the cap)"}
    return {"sft": (sft, 8), "dpo": (dpo, 8), "rl": (rl, 16)}, dists, tok, data


def timing(tmp: Path, rounds: int, seed: int) -> dict[str, float]:
    """Median seconds of one SFT `Trainer.update` per mode (module doc)."""
    import torch

    from scale.config import load_config
    from scale.logprobs import use_packed_attention
    from scale.train import Trainer
    from toy.tiny import make_model, make_tokenizer

    torch.set_num_threads(1)
    tok = make_tokenizer()
    model = make_model(tok, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
                       max_positions=8192 + 512)
    model.save_pretrained(tmp / "m")
    tok.save_pretrained(tmp / "m")
    cfg = load_config(None, [f"model.path={tmp / 'm'}", f"data.path={tmp / 'd.jsonl'}", "method.name=sft",
                             "run.cpu=true", "run.batch_size=32", "run.grad_accum=4", "run.progress=false",
                             f"run.output_dir={tmp / 'out'}", "data.max_length=8704", f"run.seed={seed}",
                             "run.save_model=false", "run.tensorboard=false"])
    tr = Trainer(cfg)
    model = tr._model()
    times = {m: [] for m in TIMED}
    for r in range(rounds):
        rows = tr.method.rows(tr, r, {})
        for mode in TIMED:
            tr.cfg.run.group_by_length = "grouped" in mode
            tr.cfg.run.padding_free = "packed" in mode
            use_packed_attention(model) if "mask" not in mode else model.set_attn_implementation("sdpa")
            t0 = time.perf_counter()
            tr.update(rows)
            times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets, dists, _, _ = build(args.rows, args.steps, args.seed, tmp)
        for name, (steps, k) in sets.items():
            c = positions(steps, k)
            print(f"{name}: {args.steps} steps of {len(steps[0])} rows, {k} micro-batches; row tokens {dists[name]}")
            for mode in MODES:   # shared prefixes run fewer positions than the rows' real tokens
                print(f"  {mode:15s} positions {c[mode]:>11,d}  vs real tokens {c[mode] / c['tokens']:6.3f}  "
                      f"vs plain {c[mode] / c['plain']:6.3f}")
        if args.time:
            t = timing(tmp, args.rounds, args.seed)
            print(f"SFT update, hidden 256 x 4 layers, 32 rows in 4 micro-batches, median of {args.rounds} rounds:")
            for mode in TIMED:
                print(f"  {mode:17s} {t[mode]:7.3f} s  vs plain {t[mode] / t['plain']:6.3f}")


if __name__ == "__main__":
    main()
