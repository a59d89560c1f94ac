"""Benchmark: generation under FSDP2 and ZeRO-3 with the parameters gathered once per generation batch
(`scale.gather.gathered`, what the trainer does) against the engines' own per-forward gathering.

Run: `python -m experiments.bench_gather [--reps 10] [--new 32] [--hidden 256] [--layers 8] [--engines
fsdp2,zero3] [--out FILE.json]`. For each engine, 2 CPU processes (torchrun, gloo, one thread each) build the
trainer on a random Qwen2 model of the given size through the test-only shim of tests/scale/engine_worker.py
(accelerate's FSDP2 / DeepSpeed paths on CPU processes), then time one generation batch (4 prompts of 8
tokens, 4 samples each, exactly `--new` new tokens: EOS is held back so every rank runs the same number of
forwards) in two ways, alternating which goes first in each repetition:

* once: inside `scale.gather.gathered`: FSDP2 unshards every unit once and keeps it unsharded for the
  batch; ZeRO-3 gathers every parameter once and lifts the engine's per-module fetch / release hooks;
* per-forward: what the engine does by itself. FSDP2: only the root unit (embedding, final norm, head, which
  `generate` on the inner model would otherwise meet sharded) is unsharded for the batch; every decoder block
  all-gathers its weights in its pre-forward hook and frees them after, at every decoding step. ZeRO-3: no
  context; its hooks fetch each module's parameters before its forward and release them after.

Both ways draw from the same seed and must return the same tokens (checked). Each repetition's time is the
wall time between two barriers on rank 0; the ratio per-forward / once is taken per repetition (the two
measurements of a pair run back to back, so a slower moment of a shared machine affects both), and the
median, minimum and maximum ratio over the repetitions are reported with their count. Python's
`time.perf_counter` is the only timer.
"""

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@contextlib.contextmanager
def per_forward(root, engine: str):
    """The engine's own gathering: FSDP2 unshards the root unit only (the inner model's generate skips the
    root's hooks), the blocks gather per forward; ZeRO-3 keeps its per-module hooks."""
    if engine != "fsdp2":
        yield
        return
    root._get_fsdp_state()._lazy_init()
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def worker(engine: str, args) -> None:
    import torch
    import torch.distributed as dist

    from scale.config import load_config
    from scale.gather import gathered
    from scale.train import Trainer, _end_distributed
    from tests.scale.engine_worker import deepspeed_accelerator, fsdp2_accelerator

    cfg = load_config(None, [f"model.path={args.model}", f"data.path={args.data}", "method.name=sft",
                             f"run.output_dir={args.tmp}/{engine}", "run.cpu=true", "run.batch_size=4",
                             "run.progress=false", "model.dtype=float32", "eval.sets=[]", "data.max_length=96"])
    acc = fsdp2_accelerator() if engine == "fsdp2" else deepspeed_accelerator(3)
    tr = Trainer(cfg, accelerator=acc)
    model = tr._model()
    model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (4, 8), generator=g)   # the same prompts on every rank
    mask = torch.ones_like(ids)
    pad = tr.tok.pad_token_id

    def generate(ctx, seed):
        torch.manual_seed(seed + 1000 * tr.acc.process_index)
        dist.barrier()
        t0 = time.perf_counter()
        with ctx, torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                                 do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=4,
                                 pad_token_id=pad)
        dist.barrier()
        return time.perf_counter() - t0, out

    ways = {"once": lambda: gathered(tr.policy, tr.acc), "per_forward": lambda: per_forward(tr.policy, engine)}
    generate(ways["once"](), -1)   # warm-up (lazy initialisation, first allocations), not timed
    generate(ways["per_forward"](), -1)
    times = {k: [] for k in ways}
    same = True
    for rep in range(args.reps):
        order = ("once", "per_forward") if rep % 2 == 0 else ("per_forward", "once")
        outs = {}
        for k in order:
            dt, outs[k] = generate(ways[k](), rep)
            times[k].append(dt)
        same &= bool(torch.equal(outs["once"], outs["per_forward"]))
    if tr.acc.is_main_process:
        n_params = sum(p.numel() for p in tr._model().parameters())   # the local shard's size under sharding
        Path(args.result).write_text(json.dumps({"engine": engine, "times": times, "same_tokens": same,
                                                 "local_params": n_params}))
    _end_distributed()


def launch(engine: str, args, tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp / f"{engine}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).resolve()), "--worker", engine, "--model", str(args.model), "--data", str(args.data),
           "--tmp", str(tmp), "--result", str(result), "--reps", str(args.reps), "--new", str(args.new)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{engine}: the workers failed\n{p.stderr[-4000:]}")
    return json.loads(result.read_text())


def summary(r: dict) -> dict:
    a, b = r["times"]["once"], r["times"]["per_forward"]
    ratios = [y / x for x, y in zip(a, b)]
    return {"engine": r["engine"], "reps": len(a), "once_s": statistics.median(a),
            "per_forward_s": statistics.median(b),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "same_tokens": r["same_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--new", type=int, default=32, help="new tokens per sample")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--engines", default="fsdp2,zero3")
    ap.add_argument("--out", default="", help="write the summary as JSON here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    for k in ("model", "data", "tmp", "result"):
        ap.add_argument(f"--{k}", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args)
    from toy.tasks import write_datasets
    from toy.tiny import save_tiny_model

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        args.data = dict(write_datasets(tmp / "data", n_train=8, n_test=2, seed=0))["sft"]
        args.model = save_tiny_model(tmp / "model", hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                     num_layers=args.layers, num_heads=4, num_kv_heads=2, max_positions=256)
        rows = [summary(launch(e, args, tmp)) for e in args.engines.split(",")]
    print(f"model: hidden {args.hidden}, {args.layers} layers; 4 prompts x 4 samples x {args.new} new tokens; "
          "2 CPU processes (gloo), 1 thread each")
    print(f"{'engine':7s} {'reps':>4s} {'once s':>8s} {'per-fwd s':>9s} {'ratio med':>9s} {'min':>6s} {'max':>6s}"
          "  same")
    for r in rows:
        print(f"{r['engine']:7s} {r['reps']:4d} {r['once_s']:8.3f} {r['per_forward_s']:9.3f} {r['ratio_median']:9.2f} "
              f"{r['ratio_min']:6.2f} {r['ratio_max']:6.2f}  {r['same_tokens']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k in
                                                       ("reps", "new", "hidden", "layers")}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
