"""Step time of a tiny GRPO run with `run.threads=1` against torch's default thread count, on this machine as
it is (other jobs included: the case the setting is for).

    python -m experiments.bench_threads [--steps 8] [--rounds 3]

Each run is its own `ptlab train` process (the local tiny Qwen2 of toy.tiny, 8 prompts x 4 samples, 32 new
tokens, CPU); OMP_NUM_THREADS is removed from the environment so that `run.threads=0` means torch's default
(one thread per core). Rounds alternate the order (A B, B A, ...). Per run: the median step time after two
warm-up steps; the ratio default / one thread is paired by round: median [min-max].

Measured (2 cores, load average 8.1 from other jobs, 3 rounds x 8 steps): run.threads=1 median step 0.498 s
(per round 1.385, 0.498, 0.458); torch default 1.859 s (1.850, 1.859, 1.952); default / one thread 3.73x
[1.34-4.26].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(world: dict, out: Path, threads: int, steps: int) -> float:
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = out.parent / "c.yaml"
    cfg.write_text("{}\n")
    ov = [f"model.path={world['model']}", f"data.path={world['rl']}", "method.name=rl", "run.cpu=true",
          f"run.output_dir={out}", f"run.max_steps={steps}", "run.batch_size=8", "generation.n=4",
          "generation.max_new_tokens=32", "run.progress=false", "run.save_model=false", "run.save_every=0",
          "run.tensorboard=false", "method.rl.reward=experiments.bench_trainer:parity_reward", f"run.threads={threads}"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([sys.executable, "-m", "experiments.cli", "train", str(cfg), *ov], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    return statistics.median(r["step_time"] for r in rows[2:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    from experiments.bench_trainer import _world

    with tempfile.TemporaryDirectory() as tmp:
        world = _world(Path(tmp))
        times: dict[int, list[float]] = {1: [], 0: []}
        for r in range(a.rounds):
            for threads in ((1, 0) if r % 2 == 0 else (0, 1)):
                times[threads].append(one_run(world, Path(tmp) / f"r{r}_t{threads}" / "run", threads, a.steps))
    ratios = [d / o for d, o in zip(times[0], times[1])]
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}, {a.rounds} rounds x {a.steps} steps")
    for t, name in ((1, "run.threads=1"), (0, "torch default")):
        print(f"  {name:14s} median step {statistics.median(times[t]):.3f} s  (per round: "
              f"{', '.join(f'{x:.3f}' for x in times[t])})")
    print(f"  default / one thread: {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
