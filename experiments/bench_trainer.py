"""Step time and peak memory of ptlab's trainer against TRL's, side by side, on CPU: the tiny model or a ~100M one.

    python -m experiments.bench_trainer [--steps 12] [--rounds 5] [--threads 1] [--methods grpo sft]
        [--size tiny|100m] [--lengths world|varied] [--runs LABEL ...]

Identical settings on both sides: the same local tiny Qwen2 (toy.tiny) and data (toy.tasks), one process,
fp32, no gradient checkpointing, the same optimizer (AdamW, constant lr; fused, as transformers' Trainer
defaults to), batch, lengths and reward.
- GRPO: 8 prompts x 4 samples, max 32 new tokens, temperature 1, top-p 1, no top-k, no KL (beta 0), TRL
  loss_type="grpo" (== preset grpo: per-sequence token mean), one update per generation batch. ptlab runs
  four times, all against the same TRL run (TRL: model.generate): `ptlab[hf]` generates with
  model.generate as TRL does; `ptlab[ptlab]` with ptlab's own sampling loop (scale/sampling.py: the same
  distribution, tested against generate), the same n / max_new_tokens / temperature / top_p; `ptlab[shared]`
  with that sampler and a padding-free, length-grouped update that holds each prompt once per micro-batch
  (run.share_prefix); `ptlab[lean]` the same with run.fused_mlp (gated MLPs keep fewer activations);
  `ptlab[skip]` that with run.skip_zero_advantage (no forward or backward for samples whose advantage is
  exactly 0: the same step; the table's zero-adv column is their share, groups whose parity rewards were all
  equal). lr 1e-6 on both sides (see SETTINGS), and each side's mean completion length is printed.
- SFT: 16 prompt/completion examples per step, loss on the completion tokens, max length 128.
Each (run, method) is its own subprocess; every run goes once per round and the order flips each round (A/B
interleaving, so a drift in machine load hits both sides). Per run: median step time after 2 warm-up steps,
wall clock and process CPU time (one thread: CPU time is the work done, the more robust number when other
jobs share the cores); memory is the peak resident set size (ru_maxrss) and its growth from just before
training. Ratios are paired by round: TRL's time / ptlab's, median [min-max] over rounds.
TRL is not a ptlab dependency: `pip install trl` for this benchmark only. Goal: ptlab >= 1.5x faster, no more
memory.

Measured (2-core shared CPU, torch 2.13, transformers 5.23, TRL 1.16, 5 rounds x 12 steps):
  run                 wall s/step  CPU s/step  peak RSS MB  RSS growth MB  rows s/step
  grpo ptlab[hf]           0.0583      0.0583        531.8           39.0       0.0374
  grpo ptlab[ptlab]        0.0474      0.0474        531.2           38.8       0.0259
  grpo trl                 0.0716      0.0713        558.8           54.6          nan
  sft ptlab                0.0081      0.0081        516.0           23.2       0.0000
  sft trl                  0.0123      0.0123        531.3           29.1          nan
  grpo ptlab[hf]     speed wall 1.24x [1.20-1.25], CPU 1.24x [1.20-1.26]; peak memory ptlab/TRL 0.95
  grpo ptlab[ptlab]  speed wall 1.52x [1.48-1.54], CPU 1.52x [1.48-1.54]; peak memory ptlab/TRL 0.95
  sft ptlab          speed wall 1.52x [1.28-1.66], CPU 1.52x [1.28-1.66]; peak memory ptlab/TRL 0.97
(`rows s/step`: building the step's rows, i.e. generation + decoding + rewards for GRPO.) Two more runs of
the same harness gave GRPO[hf] 1.21x / 1.23x, GRPO[ptlab] 1.51x / 1.54x, SFT 1.41x / 1.60x: GRPO with ptlab's
sampler and SFT are at the 1.5x goal, SFT with a wide spread between rounds; GRPO with model.generate is not
(1.2x), since generation, the same code on both sides, is about 60% of its step. Before this round of work
(the trainer at commit b18eab2, interleaved in the same harness) the ratios were GRPO 1.14x / 1.18x and
SFT 1.25x / 1.13x, memory 0.97-0.98.

At about 100M parameters, SFT only (`--methods sft --size 100m --lengths varied --steps 4 --rounds 3 --threads 2`;
lengths mean 110 tokens, median 110, p10 59, p90 160, max 263; 440 s):
  sft ptlab           wall 10.88 s/step, peak RSS 4192 MB; speed 1.07x [0.92-1.16], peak memory ptlab/TRL 0.87
  sft ptlab[packed]   wall  6.57 s/step, peak RSS 3137 MB; speed 1.73x [1.70-1.77], peak memory ptlab/TRL 0.65
  sft trl             wall 11.39 s/step, peak RSS 4826 MB
(`ptlab[packed]`: run.padding_free and run.group_by_length; TRL's SFTTrainer with its default padded batches.)
DPO at the same size (`--methods dpo`, otherwise the same; rows mean 107 tokens, median 103, p10 56, p90 160, max
241; 8 pairs per step, beta 0.1; 511 s):
  dpo ptlab           wall 11.28 s/step, peak RSS 4574 MB; speed 1.07x [1.03-1.07], peak memory ptlab/TRL 0.94
  dpo ptlab[packed]   wall  7.25 s/step, peak RSS 3345 MB; speed 1.65x [1.52-1.66], peak memory ptlab/TRL 0.69
  dpo trl             wall 11.97 s/step, peak RSS 4810 MB
GRPO at the same size (`--methods grpo --size 100m --steps 4 --rounds 3 --threads 2`; 354 s; lr 1e-4 then):
  grpo ptlab[hf]      wall 7.65 s/step (rows 2.89), peak RSS 2763 MB; speed 0.98x [0.89-1.00], memory 0.95
  grpo ptlab[ptlab]   wall 6.62 s/step (rows 2.32), peak RSS 2764 MB; speed 1.10x [1.03-1.15], memory 0.94
  grpo trl            wall 7.38 s/step, peak RSS 2922 MB
The same at lr 1e-6 with the shared-prompt run (commit 07f89bf; completions 31.0-31.4 tokens on average on every
side):
  grpo ptlab[hf]      wall 7.20 s/step (rows 2.80), peak RSS 2761 MB; speed 0.97x [0.96-1.03], memory 0.94
  grpo ptlab[ptlab]   wall 6.41 s/step (rows 2.39), peak RSS 2765 MB; speed 1.09x [1.08-1.11], memory 0.94
  grpo ptlab[shared]  wall 5.89 s/step (rows 2.22), peak RSS 2465 MB; speed 1.26x [0.95-1.34], memory 0.84
  grpo trl            wall 7.07 s/step, peak RSS 2948 MB
Again with more rounds (`--steps 6 --rounds 5`, the same trainer code; completions 30.8-31.4):
  grpo ptlab[hf]      wall 7.29 s/step (rows 2.68), peak RSS 2793 MB; speed 0.99x [0.89-1.04], memory 0.94
  grpo ptlab[ptlab]   wall 7.21 s/step (rows 2.49), peak RSS 2739 MB; speed 0.99x [0.68-1.07], memory 0.92
  grpo ptlab[shared]  wall 6.00 s/step (rows 2.30), peak RSS 2463 MB; speed 1.18x [1.08-1.30], memory 0.83
  grpo trl            wall 7.26 s/step, peak RSS 2964 MB
With run.fused_mlp (commit 1c7315b; `--runs "grpo ptlab[shared]" "grpo ptlab[lean]" "grpo trl"`, 5 rounds x 6 steps;
completions 30.8 on every side):
  grpo ptlab[shared]  wall 6.26 s/step (rows 2.58), peak RSS 2437 MB; speed 1.23x [1.14-1.31], memory 0.82
  grpo ptlab[lean]    wall 6.29 s/step (rows 2.57), peak RSS 2325 MB; speed 1.23x [1.14-1.30], memory 0.78
  grpo trl            wall 7.55 s/step, peak RSS 2986 MB
With ptlab's sampler on oneDNN (scale.sampling.cpu_packed_linears; commit 2570f0b, 5 rounds x 6 steps; zero-adv: the
share of samples with advantage exactly 0, 0.031 in every ptlab run):
  grpo ptlab[lean]    wall 4.58 s/step (rows 1.08), peak RSS 2309 MB; speed 1.48x [1.31-1.63], memory 0.78
  grpo trl            wall 6.84 s/step, peak RSS 2971 MB
and again with `--runs "grpo ptlab[lean]" "grpo ptlab[skip]" "grpo trl"`:
  grpo ptlab[lean]    wall 4.67 s/step (rows 1.07), peak RSS 2296 MB; speed 1.42x [1.32-1.58], memory 0.78
  grpo ptlab[skip]    wall 4.75 s/step (rows 1.14), peak RSS 2308 MB; speed 1.49x [1.28-1.53], memory 0.78
  grpo trl            wall 6.97 s/step, peak RSS 2950 MB
Before it, at c07468d / 30bc156 in the same session, ptlab[lean] was 1.14x [1.05-1.17] and 1.14x [1.11-1.43]
(rows 2.21 / 2.55 s), ptlab[skip] 1.16x [1.02-1.47] (README, "GRPO at the same size").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = dict(prompts=8, n=4, max_new_tokens=32, sft_batch=16, dpo_batch=8, max_length=128, lr=1e-4, beta=0.1,
                grpo_lr=1e-6)
# GRPO's step time follows the sampled lengths, and at lr 1e-4 they drifted within a few steps, differently in each
# run (the total tokens of a step fell from ~1300 to ~700 in one ptlab run at 100M, not in another): at 1e-6 both
# sides keep sampling from (nearly) the initial model, and each reports its mean completion length


def parity_reward(completions, answers=None, **_):
    """The same cheap reward on both sides (grading cost is not what is measured)."""
    return [float(len(c if isinstance(c, str) else str(c)) % 2 == 0) for c in completions]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    return float("nan")


# --size 100m: a random Qwen2 of about 100M parameters on the tiny tokenizer (hidden 768, 12 layers, 12 heads,
# 4 KV heads, MLP 2048), the size of the comparison; --lengths varied: SFT completions and DPO answers of
# varied length (each world completion repeated 1 + Poisson(4) times, seeded), cut at max_length 512
SIZES = {"tiny": {}, "100m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                                  intermediate_size=2048, max_positions=1024)}


def _world(root: Path, size: str = "tiny", lengths: str = "world") -> dict:
    import random

    from toy.tasks import write_datasets
    from toy.tiny import save_tiny_model

    paths = dict(write_datasets(root / "data", n_train=256, n_test=4))
    paths["model"] = save_tiny_model(root / "model", **SIZES[size])
    paths["max_length"] = SETTINGS["max_length"]
    if lengths == "varied":
        import numpy as np

        rng = np.random.default_rng(0)
        for kind, cols in (("sft", ("completion",)), ("dpo", ("chosen", "rejected"))):
            rows = []
            for line in Path(paths[kind]).read_text().splitlines():
                ex = json.loads(line)
                ex.update({c: " ".join([ex[c]] * (1 + int(rng.poisson(4)))) for c in cols})
                rows.append(ex)
            random.Random(0).shuffle(rows)
            paths[kind] = root / "data" / f"{kind}_varied.jsonl"
            paths[kind].write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths["max_length"] = 512
    return {k: str(v) if isinstance(v, Path) else v for k, v in paths.items()}


# each ptlab run's keys, one layer on the one before: padding-free length-grouped micro-batches; each prompt held
# once per micro-batch; MLPs that keep fewer activations; no forward / backward for zero-advantage samples
RUN_KEYS = {"packed": ["run.padding_free=true", "run.group_by_length=true"]}
RUN_KEYS["shared"] = RUN_KEYS["packed"] + ["run.share_prefix=true"]
RUN_KEYS["lean"] = RUN_KEYS["shared"] + ["run.fused_mlp=true"]
RUN_KEYS["skip"] = RUN_KEYS["lean"] + ["run.skip_zero_advantage=true"]


def run_ptlab(method: str, world: dict, steps: int, out: Path, backend: str = "hf") -> dict:
    from scale.config import load_config
    from scale.train import Trainer

    s = SETTINGS
    ov = [f"model.path={world['model']}", "run.cpu=true", f"run.output_dir={out}", f"run.max_steps={steps}",
          "run.progress=false", "run.save_model=false", f"run.lr={s['grpo_lr' if method == 'grpo' else 'lr']}",
          "run.tensorboard=false",
          f"data.max_length={world['max_length']}", "data.shuffle=false"]
    if method == "grpo":
        ov += ["method.name=rl", "method.rl.estimator=grpo", f"data.path={world['rl']}",
               "method.rl.reward=experiments.bench_trainer:parity_reward", f"run.batch_size={s['prompts']}",
               f"generation.n={s['n']}", f"generation.max_new_tokens={s['max_new_tokens']}",
               "generation.temperature=1.0", "generation.top_p=1.0",
               f"generation.backend={'hf' if backend == 'hf' else 'ptlab'}"]
    else:
        ov += [f"method.name={method}", f"data.path={world[method]}", f"run.batch_size={s[method + '_batch']}"]
        if method == "dpo":
            ov += [f"method.dpo.beta={s['beta']}"]
    ov += RUN_KEYS.get(backend, [])
    tr = Trainer(load_config(None, ov))
    lengths = []   # mean completion tokens per step (RL: what the sampler drew)
    zero = []      # RL: the fraction of samples with advantage exactly 0 (groups whose rewards were all equal)
    rows_fn = tr.method.rows

    def rows(t, step, info):
        out = rows_fn(t, step, info)
        lengths.append(statistics.mean(len(r.input_ids) - r.prompt_len for r in out))
        zero.append(statistics.mean(r.kind == "rl" and r.advantage == 0.0 for r in out))
        return out

    tr.method.rows = rows
    base = _current_rss_mb()
    times, cpu, gen = [], [], []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        m = tr.train_step(step)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        gen.append(m.get("generation_time", 0.0))  # build_rows: generation, decoding, rewards (SFT: the batch's rows)
    return {"times": times, "cpu": cpu, "gen": gen, "rss_before": base, "peak_rss": _rss_mb(), "lengths": lengths,
            "zero_adv": zero}


def run_trl(method: str, world: dict, steps: int, out: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    s = SETTINGS
    times: list[float] = []
    cpu: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)
            cpu.append(time.process_time() - self.c0)
            if method == "grpo":   # read before the trainer's final log clears its metrics
                lengths.append(trainer._metrics["train"]["completions/mean_length"][-1])

    tok = AutoTokenizer.from_pretrained(world["model"])
    model = AutoModelForCausalLM.from_pretrained(world["model"], dtype="float32")
    common = dict(output_dir=str(out), max_steps=steps, learning_rate=s["grpo_lr" if method == "grpo" else "lr"],
                  lr_scheduler_type="constant",
                  use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=10**6, save_strategy="no",
                  gradient_checkpointing=False, seed=0, dataloader_num_workers=0, max_grad_norm=1.0,
                  weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999)
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        ds = datasets.load_dataset("json", data_files=world["rl"], split="train").select_columns(["prompt", "answer"])
        cfg = GRPOConfig(**common, per_device_train_batch_size=s["prompts"] * s["n"], num_generations=s["n"],
                         max_completion_length=s["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                         loss_type="grpo", num_iterations=1, shuffle_dataset=False)
        trainer = GRPOTrainer(model=model, reward_funcs=parity_reward, args=cfg, train_dataset=ds,
                              processing_class=tok, callbacks=[Timer()])
    elif method == "dpo":
        from trl import DPOConfig, DPOTrainer

        ds = datasets.load_dataset("json", data_files=world["dpo"], split="train")
        cfg = DPOConfig(**common, per_device_train_batch_size=s["dpo_batch"], max_length=world["max_length"],
                        beta=s["beta"], loss_type="sigmoid")
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    else:
        from trl import SFTConfig, SFTTrainer

        ds = datasets.load_dataset("json", data_files=world["sft"], split="train")
        cfg = SFTConfig(**common, per_device_train_batch_size=s["sft_batch"], max_length=world["max_length"],
                        packing=False, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    base = _current_rss_mb()
    trainer.train()
    return {"times": times, "cpu": cpu, "rss_before": base, "peak_rss": _rss_mb(), "lengths": lengths}


def _worker(which: str, method: str, world: dict, steps: int, threads: int, backend: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        if which == "ptlab":
            return run_ptlab(method, world, steps, Path(d), backend)
        return run_trl(method, world, steps, Path(d))


# (label, trainer, method, ptlab generation backend)
RUNS = [("grpo ptlab[hf]", "ptlab", "grpo", "hf"), ("grpo ptlab[ptlab]", "ptlab", "grpo", "ptlab"),
        ("grpo ptlab[shared]", "ptlab", "grpo", "shared"), ("grpo ptlab[lean]", "ptlab", "grpo", "lean"),
        ("grpo ptlab[skip]", "ptlab", "grpo", "skip"),
        ("grpo trl", "trl", "grpo", ""),
        ("sft ptlab", "ptlab", "sft", ""),
        ("sft ptlab[packed]", "ptlab", "sft", "packed"), ("sft trl", "trl", "sft", ""),
        ("dpo ptlab", "ptlab", "dpo", ""), ("dpo ptlab[packed]", "ptlab", "dpo", "packed"),
        ("dpo trl", "trl", "dpo", "")]
PAIRS = [("grpo", "grpo ptlab[hf]", "model.generate on both sides"),
         ("grpo", "grpo ptlab[ptlab]", "ptlab's sampler (scale/sampling.py) vs TRL's model.generate"),
         ("grpo", "grpo ptlab[shared]", "ptlab's sampler, padding-free update holding each prompt once"),
         ("grpo", "grpo ptlab[lean]", "the same with run.fused_mlp"),
         ("grpo", "grpo ptlab[skip]", "the same with run.skip_zero_advantage"),
         ("sft", "sft ptlab", "padded micro-batches on both sides"),
         ("sft", "sft ptlab[packed]", "ptlab padding-free and length-grouped vs TRL's padded batches"),
         ("dpo", "dpo ptlab", "padded micro-batches on both sides; reference log-probs computed every step on both"),
         ("dpo", "dpo ptlab[packed]", "ptlab padding-free and length-grouped vs TRL's padded batches")]


def _one(run, world, a) -> dict:
    label, which, method, backend = run
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-m", "experiments.bench_trainer", "--steps", str(a.steps), "--threads",
                        str(a.threads), "--worker", which, method, json.dumps(world), backend or "hf"],
                       capture_output=True, text=True, env=env)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"{label} failed:\n{p.stderr[-3000:]}")
    r = json.loads(line[0][7:])
    r["step_s"] = statistics.median(r["times"][2:] or r["times"])
    r["cpu_s"] = statistics.median(r["cpu"][2:] or r["cpu"])
    r["gen_s"] = statistics.median(r["gen"][2:] or r["gen"]) if "gen" in r else float("nan")
    r["len"] = statistics.mean(r["lengths"][2:] or r["lengths"]) if r["lengths"] else float("nan")
    r["zero"] = statistics.mean(r["zero_adv"][2:] or r["zero_adv"]) if r.get("zero_adv") else float("nan")
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds: every run once per round")
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny", help="model size (default tiny)")
    ap.add_argument("--lengths", choices=("world", "varied"), default="world", help="SFT completion lengths")
    ap.add_argument("--methods", nargs="+", choices=("grpo", "sft", "dpo"), default=["grpo", "sft"])
    ap.add_argument("--runs", nargs="+", choices=[r[0] for r in RUNS], help="only these runs (default: every run "
                    "of the methods; a ptlab run is compared with its method's TRL run, which must be among them)")
    ap.add_argument("--worker", nargs=4, metavar=("WHICH", "METHOD", "WORLD_JSON", "BACKEND"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        which, method, world, backend = a.worker
        print("RESULT " + json.dumps(_worker(which, method, json.loads(world), a.steps, a.threads, backend)))
        return 0
    runs = [run for run in RUNS if run[2] in a.methods and (not a.runs or run[0] in a.runs)]
    res: dict[str, list[dict]] = {run[0]: [] for run in runs}
    with tempfile.TemporaryDirectory() as root:
        world = _world(Path(root), a.size, a.lengths)
        if a.lengths == "varied":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(world["model"])
            for kind, cols in (("sft", ("completion",)), ("dpo", ("chosen", "rejected"))):
                exs = [json.loads(x) for x in Path(world[kind]).read_text().splitlines()]
                n = sorted(min(len(tok(e["prompt"] + e[c])["input_ids"]), world["max_length"]) for e in exs
                           for c in cols)
                print(f"{kind} row lengths (tokens, cut at {world['max_length']}): mean {statistics.mean(n):.0f}, "
                      f"median {n[len(n) // 2]}, p10 {n[len(n) // 10]}, p90 {n[9 * len(n) // 10]}, max {n[-1]}")
        for k in range(a.rounds):  # A/B interleaved; the order flips each round so drift in load cancels
            for run in (runs if k % 2 == 0 else runs[::-1]):
                try:
                    res[run[0]].append(_one(run, world, a))
                except RuntimeError as e:
                    print(e)
                    return 1
    print(f"{a.size} model on CPU, one process, {a.threads} thread(s), {a.steps} steps per run (median after 2 "
          f"warm-up), {a.rounds} interleaved rounds; settings {SETTINGS}, max_length {world['max_length']}")
    print(f"{'run':18s} {'wall s/step':>12s} {'CPU s/step':>11s} {'peak RSS MB':>12s} {'RSS growth MB':>14s} "
          f"{'rows s/step':>12s} {'completion':>10s} {'zero-adv':>8s}")
    for label, rs in res.items():
        med = {k: statistics.median(f(r) for r in rs) for k, f in (("wall", lambda r: r["step_s"]),
               ("cpu", lambda r: r["cpu_s"]), ("peak", lambda r: r["peak_rss"]),
               ("grow", lambda r: r["peak_rss"] - r["rss_before"]), ("gen", lambda r: r["gen_s"]),
               ("len", lambda r: r["len"]), ("zero", lambda r: r["zero"]))}
        print(f"{label:18s} {med['wall']:12.4f} {med['cpu']:11.4f} {med['peak']:12.1f} {med['grow']:14.1f} "
              f"{med['gen']:12.4f} {med['len']:10.1f} {med['zero']:8.3f}")
    print("speed = TRL step time / ptlab step time, per round (paired), median [min-max]; goal >= 1.5x, memory <= 1")
    for method, ours, note in [q for q in PAIRS if q[1] in res and f"{q[0]} trl" in res]:
        trl = f"{method} trl"
        out = []
        for key, name in (("step_s", "wall"), ("cpu_s", "CPU")):
            sp = [t[key] / p[key] for p, t in zip(res[ours], res[trl])]
            out.append(f"{name} {statistics.median(sp):.2f}x [{min(sp):.2f}-{max(sp):.2f}]")
        mm = statistics.median(p["peak_rss"] / t["peak_rss"] for p, t in zip(res[ours], res[trl]))
        print(f"{ours:18s} speed {', '.join(out)}; peak memory ptlab/TRL {mm:.2f}"
              f"{'  (' + note + ')' if note else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
