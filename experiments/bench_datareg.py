"""Benchmark: step time and peak memory of the Dr. Post-Training rules (scale/datareg.py) against `full`.

Run: `python -m experiments.bench_datareg [--hidden 512 --layers 8 --inter 1536 --n 8 --T 128 --reps 5]`.

Model: a random-init Qwen2 from toy.tiny.make_model (float32, about 25M parameters at the defaults, vocab 320),
a general batch of n rows of T tokens (the last 3/4 scored, global token mean NLL), one target row of T
tokens (m = 1, as the released SFT code), k = n/2, AdamW. A step = the rule's gradients + the optimizer step;
for the subset rules it includes the target's cost, which `full` does not have: a separate target pass
(forward + backward on the target row; "target ms", and the step without it in "-target"), or, for the
`_merged` rows, the target row appended to the general batch (one forward and backward, the released SFT
code's default).

Timing: all configurations in one process, repetitions interleaved (one step of each in turn), median of
`--reps` steps after one warm-up each. Peak memory: one subprocess per configuration that builds the same
model, runs one ordinary step (AdamW's state), resets the resident-set high-water mark and runs two steps
of the configuration; peak = VmHWM (resident set: it includes Python, torch, the weights and the optimizer
state, the same for all), and the increment = peak minus the resident set before those two steps
(activations, gradients and the rule's buffers).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

CONFIGS = {
    "full": dict(update_rule="full"),
    "layerwise_exact": dict(update_rule="layerwise_subset", scoring="exact"),
    "layerwise_sketched": dict(update_rule="layerwise_subset", scoring="sketched"),
    "layerwise_exact_merged": dict(update_rule="layerwise_subset", scoring="exact", merged=True),
    "layerwise_sketched_merged": dict(update_rule="layerwise_subset", scoring="sketched", merged=True),
    "global_1pass_exact": dict(update_rule="global_subset", scoring="exact"),
    "global_1pass_sketched": dict(update_rule="global_subset", scoring="sketched"),
    "global_2pass_exact": dict(update_rule="global_subset", scoring="exact", subset_mode="two_pass"),
    "global_2pass_sketched": dict(update_rule="global_subset", scoring="sketched", subset_mode="two_pass"),
}


def build(a):
    from toy.tiny import make_model, make_tokenizer

    tok = make_tokenizer()
    model = make_model(tok, hidden_size=a.hidden, num_layers=a.layers, num_heads=8, num_kv_heads=4,
                       intermediate_size=a.inter, max_positions=max(256, a.T), seed=0)
    g = torch.Generator().manual_seed(0)
    V = len(tok)
    gen = torch.randint(0, V, (a.n, a.T), generator=g)
    tgt = torch.randint(0, V, (1, a.T), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, gen, tgt, opt


def nll_rows(model, ids):
    """Per row: -log p summed over its scored tokens (the last 3/4)."""
    logits = model(input_ids=ids).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -lp[:, ids.shape[1] // 4:].sum(1)


def nll(model, ids, norm):
    return nll_rows(model, ids).sum() / norm


_ENGINES: dict = {}


def step(model, gen, tgt, opt, name, a) -> tuple[float, float]:
    """One optimizer step of configuration `name`: (seconds, seconds of the engine's target pass). One engine
    per configuration, re-attached each step (as the trainer keeps one), so its sketch matrices are reused."""
    from scale.datareg import DataReg, DataRegConfig

    scored = gen.shape[1] - 1 - gen.shape[1] // 4
    W = float(scored * gen.shape[0])
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    info = {}
    if name == "full":
        nll(model, gen, W).backward()
    else:
        opts = dict(CONFIGS[name])
        merged = opts.pop("merged", False)
        eng = _ENGINES.get(name)
        if eng is None:
            eng = _ENGINES[name] = DataReg(model, DataRegConfig(k=a.n // 2, sketch_rank=a.rank, **opts))
        else:
            eng.attach()
        try:
            w = torch.full((a.n,), float(scored))
            if merged:  # one forward over the general rows and the target row
                def loss(sel):
                    per = nll_rows(model, torch.cat([gen, tgt]))
                    return per[:a.n].sum() / W + per[a.n:].sum() / float(scored)

                info = eng.step(loss, w, None, merged=tgt.shape[0])
            else:
                info = eng.step(lambda sel: nll(model, gen if sel is None else gen[sel], W), w,
                                lambda: nll(model, tgt, float(scored)))
        finally:
            eng.close()
    opt.step()
    return time.perf_counter() - t0, info.get("target_seconds", 0.0)


def memory_child(a, name):
    """Peak resident set of two steps of `name`: the high-water mark is reset after the model is built
    (Linux: writing 5 to /proc/self/clear_refs), so the build's own transient peak does not count."""
    model, gen, tgt, opt = build(a)
    step(model, gen, tgt, opt, "full", a)  # allocate AdamW's state, the same for every configuration
    model.zero_grad(set_to_none=True)
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(2):
        step(model, gen, tgt, opt, name, a)
    print(json.dumps({"base_mb": base, "peak_mb": _status_mb("VmHWM")}))


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-child", default="")
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_child:
        memory_child(a, a.memory_child)
        return
    model, gen, tgt, opt = build(a)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"bench_datareg: Qwen2 random init, {n_params / 1e6:.1f}M parameters, float32, n={a.n} rows x T={a.T}, "
          f"k={a.n // 2}, sketch rank {a.rank}, {a.threads} threads, AdamW")
    times = {k: [] for k in CONFIGS}
    tpass = {k: [] for k in CONFIGS}
    for name in CONFIGS:  # warm-up
        step(model, gen, tgt, opt, name, a)
    for _ in range(a.reps):
        for name in CONFIGS:
            t, tt = step(model, gen, tgt, opt, name, a)
            times[name].append(t)
            tpass[name].append(tt)
    med = {k: float(np.median(v)) for k, v in times.items()}
    t_target = {k: float(np.median(v)) for k, v in tpass.items()}
    mem = {}
    if not a.skip_memory:
        for name in CONFIGS:
            args = [sys.executable, "-m", "experiments.bench_datareg", "--memory-child", name] + [
                f"--{k}={getattr(a, k)}" for k in ("hidden", "layers", "inter", "n", "T", "rank", "threads")]
            out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            mem[name] = json.loads(out)
    print(f"{'configuration':24s} {'step ms':>9s} {'x full':>7s} {'target ms':>9s} {'-target':>8s} {'peak MB':>9s} "
          f"{'x full':>7s} "
          f"{'incr MB':>8s} {'x full':>7s}")
    for name in CONFIGS:
        ratio = med[name] / med["full"]
        no_t = (med[name] - t_target[name]) / med["full"]
        line = f"{name:24s} {med[name] * 1e3:9.0f} {ratio:7.3f} {t_target[name] * 1e3:9.0f} {no_t:8.3f}"
        if mem:
            m, f = mem[name], mem["full"]
            inc, finc = m["peak_mb"] - m["base_mb"], f["peak_mb"] - f["base_mb"]
            line += f" {m['peak_mb']:9.0f} {m['peak_mb'] / f['peak_mb']:7.3f} {inc:8.0f} {inc / finc:7.3f}"
        print(line)
    g1, g2 = med["global_1pass_exact"], med["global_2pass_exact"]
    print(f"global one-pass / two-pass (exact): {g1 / g2:.3f}; (sketched): "
          f"{med['global_1pass_sketched'] / med['global_2pass_sketched']:.3f}")
    goals = [("layer-wise sketched <= 1.10x full (separate target pass)",
              med["layerwise_sketched"] / med["full"] <= 1.10),
             ("layer-wise sketched <= 1.10x full (merged target row)",
              med["layerwise_sketched_merged"] / med["full"] <= 1.10),
             ("layer-wise exact <= 1.25x full (separate)", med["layerwise_exact"] / med["full"] <= 1.25),
             ("layer-wise exact <= 1.25x full (merged)", med["layerwise_exact_merged"] / med["full"] <= 1.25),
             ("global one-pass faster than two-pass", g1 < g2)]
    if mem:
        for k in ("layerwise_exact", "layerwise_sketched", "layerwise_exact_merged", "layerwise_sketched_merged"):
            goals.append((f"{k} peak memory <= 1.10x full", mem[k]["peak_mb"] / mem["full"]["peak_mb"] <= 1.10))
    for what, ok in goals:
        print(f"  goal {what}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
