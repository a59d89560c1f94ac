"""Benchmark: `project` onto Cone and HalfSpaces with n = 64 general gradients in d = 10^6, one CPU core.

Run: `python -m experiments.bench_projection [--n 64] [--d 1000000] [--repeats 3]`. The issue asks for
under 1 second per projection. BLAS is pinned to one thread before numpy loads. Timings include forming
the Gram matrix (the sets are rebuilt each repeat), so they are the full cost of one call.
"""

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from theory.projection import Cone, HalfSpaces, project  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    # partly aligned rows: a shared direction plus noise, so some constraints bind and some do not
    base = rng.standard_normal(a.d)
    G = 0.3 * base + rng.standard_normal((a.n, a.d))
    G[: a.n // 4] *= -1
    g = base + 0.5 * rng.standard_normal(a.d)
    print(f"project onto Cone / HalfSpaces, n={a.n}, d={a.d}, float64, 1 BLAS thread")
    for cls in (Cone, HalfSpaces):
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            z = project(g, cls(G))
            times.append(time.perf_counter() - t0)
        if cls is Cone:
            what = f"rows with positive coefficient {int(np.sum(Cone(G).coefficients(g) > 0))}"
        else:
            what = f"binding constraints {int(np.sum(np.abs(G @ z) < 1e-9 * np.abs(G @ g).max()))}"
        print(f"  {cls.__name__:10s} best {min(times):.3f} s  median {np.median(times):.3f} s  "
              f"(|P(g)| = {np.linalg.norm(z):.1f}, |g| = {np.linalg.norm(g):.1f}, {what})")


if __name__ == "__main__":
    main()
