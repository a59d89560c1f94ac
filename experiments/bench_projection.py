"""Benchmark: `project` onto Cone and HalfSpaces with n = 64 general gradients in d = 10^6, one CPU core.

Run: `python -m experiments.bench_projection [--n 64] [--d 1000000] [--repeats 7]`. The goal (issue 19) is
a median under 0.5 s per projection. BLAS is pinned to one thread before numpy loads. Timings include
building the set (input checks, Gram matrix), so they are the full cost of one call.

`--ref GITREF` compares against the `theory` package of another commit, interleaved: each round runs one
fresh process per version (the order alternating between rounds), each timing one projection per set, so
both versions see the same background load. Each process prints the `theory` it imported.
"""

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def problem(n: int, d: int):
    """Partly aligned rows: a shared direction plus noise, so some constraints bind and some do not."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal(d)
    G = 0.3 * base + rng.standard_normal((n, d))
    G[: n // 4] *= -1
    return G, base + 0.5 * rng.standard_normal(d)


def time_sets(n: int, d: int, repeats: int) -> dict:
    import theory.projection as tp

    G, g = problem(n, d)
    out = {"theory": str(Path(tp.__file__).parent)}
    for cls in (tp.Cone, tp.HalfSpaces):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            z = tp.project(g, cls(G))
            times.append(time.perf_counter() - t0)
        out[cls.__name__] = {"times": times, "norm": float(np.linalg.norm(z))}
    return out


def compare(ref: str, n: int, d: int, rounds: int) -> None:
    """Interleaved rounds: the working tree's `theory` against `ref`'s, one process per version per round."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "theory"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        # `python -m` puts the working directory first on sys.path: it decides which `theory` is imported
        where = {"new": str(ROOT), ref: tmp}
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        times: dict = {v: {"Cone": [], "HalfSpaces": []} for v in where}
        for r in range(rounds):
            for v in (list(where) if r % 2 == 0 else list(where)[::-1]):
                cmd = [sys.executable, "-m", "experiments.bench_projection", "--n", str(n), "--d", str(d),
                       "--repeats", "1", "--json"]
                res = json.loads(subprocess.run(cmd, cwd=where[v], env=env, check=True, capture_output=True,
                                                text=True).stdout)
                for k in ("Cone", "HalfSpaces"):
                    times[v][k] += res[k]["times"]
                print(f"round {r + 1}: {v:8s} Cone {res['Cone']['times'][0]:.3f} s  HalfSpaces "
                      f"{res['HalfSpaces']['times'][0]:.3f} s  (|P(g)| {res['Cone']['norm']:.6f}, "
                      f"{res['HalfSpaces']['norm']:.6f}; theory from {res['theory']})", flush=True)
    for k in ("Cone", "HalfSpaces"):
        m_new, m_ref = np.median(times["new"][k]), np.median(times[ref][k])
        print(f"{k:10s} median {m_ref:.3f} s ({ref}) -> {m_new:.3f} s (working tree): {m_ref / m_new:.2f}x faster; "
              f"range {min(times['new'][k]):.3f}-{max(times['new'][k]):.3f} s over {rounds} rounds")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--ref", help="a git commit to compare against, interleaved (--repeats rounds)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one process of --ref's rounds
    a = ap.parse_args(argv)
    if a.ref:
        return compare(a.ref, a.n, a.d, a.repeats)
    res = time_sets(a.n, a.d, a.repeats)
    if a.json:
        print(json.dumps(res))
        return
    print(f"project onto Cone / HalfSpaces, n={a.n}, d={a.d}, float64, 1 BLAS thread")
    for k in ("Cone", "HalfSpaces"):
        t = res[k]["times"]
        print(f"  {k:10s} best {min(t):.3f} s  median {np.median(t):.3f} s  (|P(g)| = {res[k]['norm']:.1f})")


if __name__ == "__main__":
    main()
