"""Benchmark: exact moments for X = 16 contexts, K = 64 actions, G = 64, binary rewards (closed form),
and the cost of enumeration. Run: python -m experiments.bench_moments

Prints the best of 5 wall-clock times per preset/scheme on one CPU thread (torch and BLAS limited to
one thread), and enumeration's outcome count C(K + G - 1, G) per context with a measured time per
outcome on small sizes.
"""

from __future__ import annotations

import math
import os
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from theory.estimator import preset  # noqa: E402
from theory.moments import GateRule, exact_moments  # noqa: E402
from toy.bandit import make_problem  # noqa: E402


def _best(fn, *args, repeats=5, **kw):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kw)
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    torch.set_num_threads(1)
    X, K, G = 16, 64, 64
    prob, theta = make_problem(X, K, n_correct=8, demo_quality=0.8, seed=0)
    old = theta + np.random.default_rng(0).normal(scale=0.3, size=theta.shape)
    print(f"closed form, X={X} K={K} G={G}, binary rewards, one thread (best of 5):")
    cases = [("grpo", "on_policy", {}), ("grpo", "on_policy", {"old_logits": old}), ("rloo", "on_policy", {}),
             ("sft", "demonstration", {}), ("luffy", "mixed", {}),
             ("hpt_code", "hpt_gate", {"gate": GateRule("code", 0)})]
    worst = 0.0
    for name, scheme, kw in cases:
        t = _best(exact_moments, preset(name), prob, theta, G, scheme, method="closed_form", **kw)
        worst = max(worst, t)
        label = f"{name} / {scheme}" + (" (off-policy)" if "old_logits" in kw else "")
        print(f"  {label:<36s} {t * 1e3:8.1f} ms")
    print(f"  worst case: {worst:.3f} s (target < 1 s): {'met' if worst < 1 else 'NOT met'}")

    print("enumeration (reference): outcomes per context = C(K + G - 1, G)")
    print(f"  at X={X} K={K} G={G}: {math.comb(K + G - 1, G):.3e} outcomes per context: infeasible")
    for k, g in ((3, 4), (4, 8), (6, 8)):
        small, th = make_problem(2, k, seed=1)
        n = math.comb(k + g - 1, g)
        t = _best(exact_moments, preset("grpo"), small, th, g, method="enumeration", repeats=3)
        print(f"  K={k} G={g}: {n} outcomes per context, {t * 1e3:.1f} ms for X=2 "
              f"({t / (2 * n) * 1e6:.1f} us per outcome)")


if __name__ == "__main__":
    main()
