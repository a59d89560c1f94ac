"""Step time and peak memory of ptlab's trainer against TRL's, side by side, on the tiny model on CPU.

    python -m experiments.bench_trainer [--steps 8] [--threads 1]

Identical settings on both sides: the same local tiny Qwen2 (toy.tiny) and data (toy.tasks), one process,
fp32, no gradient checkpointing, the same optimizer (AdamW, constant lr), batch, lengths and reward.
- GRPO: 8 prompts x 4 samples, max 32 new tokens, temperature 1, top-p 1, no top-k, no KL (beta 0), TRL
  loss_type="grpo" (== preset grpo: per-sequence token mean), one update per generation batch.
- SFT: 16 prompt/completion examples per step, loss on the completion tokens, max length 128.
Each (trainer, method) runs in its own subprocess; the step time is the median after 2 warm-up steps; memory is
the peak resident set size of the process (ru_maxrss) and its growth from just before training.
TRL is not a ptlab dependency: `pip install trl` for this benchmark only. Goal: ptlab >= 1.5x faster, no more
memory. The ratios printed are whatever was measured on this machine.
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

SETTINGS = dict(prompts=8, n=4, max_new_tokens=32, sft_batch=16, max_length=128, lr=1e-4)


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


def _world(root: Path) -> dict:
    from toy.tasks import write_datasets
    from toy.tiny import save_tiny_model

    paths = dict(write_datasets(root / "data", n_train=256, n_test=4))
    paths["model"] = save_tiny_model(root / "model")
    return {k: str(v) for k, v in paths.items()}


def run_ptlab(method: str, world: dict, steps: int, out: Path) -> dict:
    from scale.config import load_config
    from scale.train import Trainer

    s = SETTINGS
    ov = [f"model.path={world['model']}", "run.cpu=true", f"run.output_dir={out}", f"run.max_steps={steps}",
          "run.progress=false", "run.save_model=false", f"run.lr={s['lr']}", "run.tensorboard=false",
          f"data.max_length={s['max_length']}", "data.shuffle=false"]
    if method == "grpo":
        ov += ["method.name=rl", "method.rl.estimator=grpo", f"data.path={world['rl']}",
               "method.rl.reward=experiments.bench_trainer:parity_reward", f"run.batch_size={s['prompts']}",
               f"generation.n={s['n']}", f"generation.max_new_tokens={s['max_new_tokens']}"]
    else:
        ov += ["method.name=sft", f"data.path={world['sft']}", f"run.batch_size={s['sft_batch']}"]
    tr = Trainer(load_config(None, ov))
    base = _current_rss_mb()
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        tr.train_step(step)
        times.append(time.perf_counter() - t0)
    return {"times": times, "rss_before": base, "peak_rss": _rss_mb()}


def run_trl(method: str, world: dict, steps: int, out: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    s = SETTINGS
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(world["model"])
    model = AutoModelForCausalLM.from_pretrained(world["model"], dtype="float32")
    common = dict(output_dir=str(out), max_steps=steps, learning_rate=s["lr"], lr_scheduler_type="constant",
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
    else:
        from trl import SFTConfig, SFTTrainer

        ds = datasets.load_dataset("json", data_files=world["sft"], split="train")
        cfg = SFTConfig(**common, per_device_train_batch_size=s["sft_batch"], max_length=s["max_length"],
                        packing=False, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()])
    base = _current_rss_mb()
    trainer.train()
    return {"times": times, "rss_before": base, "peak_rss": _rss_mb()}


def _worker(which: str, method: str, world: dict, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        fn = run_ptlab if which == "ptlab" else run_trl
        return fn(method, world, steps, Path(d))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=3, metavar=("WHICH", "METHOD", "WORLD_JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        which, method, world = a.worker
        print("RESULT " + json.dumps(_worker(which, method, json.loads(world), a.steps, a.threads)))
        return 0
    with tempfile.TemporaryDirectory() as root:
        world = _world(Path(root))
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        res = {}
        for method in ("grpo", "sft"):
            for which in ("ptlab", "trl"):
                p = subprocess.run([sys.executable, "-m", "experiments.bench_trainer", "--steps", str(a.steps),
                                    "--threads", str(a.threads), "--worker", which, method, json.dumps(world)],
                                   capture_output=True, text=True, env=env)
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode or not line:
                    print(f"{which} {method} failed:\n{p.stderr[-3000:]}")
                    return 1
                r = json.loads(line[0][7:])
                r["step_s"] = statistics.median(r["times"][2:] or r["times"])
                res[(which, method)] = r
    print(f"tiny model on CPU, one process, {a.threads} thread(s), {a.steps} steps, median after 2 warm-up; "
          f"settings {SETTINGS}")
    print(f"{'method':6s} {'trainer':6s} {'step s':>9s} {'peak RSS MB':>12s} {'RSS growth MB':>14s}")
    for method in ("grpo", "sft"):
        for which in ("ptlab", "trl"):
            r = res[(which, method)]
            grow = r["peak_rss"] - r["rss_before"]
            print(f"{method:6s} {which:6s} {r['step_s']:9.4f} {r['peak_rss']:12.1f} {grow:14.1f}")
    for method in ("grpo", "sft"):
        p, t = res[("ptlab", method)], res[("trl", method)]
        speed = t["step_s"] / p["step_s"]
        mem = p["peak_rss"] / t["peak_rss"]
        print(f"{method}: ptlab is {speed:.2f}x TRL's speed (goal >= 1.5: {'met' if speed >= 1.5 else 'NOT met'}); "
              f"peak memory ptlab/TRL = {mem:.2f} (goal <= 1: {'met' if mem <= 1 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
