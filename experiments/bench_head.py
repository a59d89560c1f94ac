"""Benchmark: peak memory and time of the log-prob head (forward + backward) against the plain path.

Run: `python -m experiments.bench_head [--sizes 512,1024,4096] [--vocabs 32768,151936] [--hidden 64]
[--ref GITREF]`. For each (scored tokens N, vocabulary V) and each case, a fresh process builds the head
input (hidden states [1, N + 1, H] that require grad, an nn.Linear(H, V) head, float32, one thread), then
runs the forward and the backward of sum_t w_t logp_t once. Cases:

* plain: the full logits [N, V], log_softmax, gather (what the head avoids);
* head: `scale.logprobs.selected_logprobs` as the trainer calls it when no entropy is wanted;
* head+entropy: the same on a step that logs the entropy (a statistic, no graph);
* head+bonus: an entropy bonus in the loss (entropy with its graph);
* ref (with --ref): that commit's `selected_logprobs` as its trainer called it with no entropy bonus
  (its defaults then: chunk 1024, the entropy computed every step).

Memory is the process's peak resident set while the head runs: the kernel's high-water mark (VmHWM) is
reset through /proc/self/clear_refs just before, and the resident set (VmRSS) at that moment is subtracted,
so the figure is everything the forward and the backward allocate (the [chunk, V] temporaries and the
head's weight gradient [V, H]), measured by the kernel, with no instrumentation inside torch. glibc's
malloc is told to mmap every block above 64 KB (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the
resident set at once and the peak is that of live tensors; with its default (a threshold that rises to
32 MB) freed blocks below 32 MB stay resident and add up across chunks (an entropy bonus at N = 1024,
V = 32768 measured 692 MB that way against 522 MB live). H is small so the run fits a CPU: the [N, V]
tensors dominate at any H; a real H adds [N, H] and [V, H] terms to every case alike.
"""

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = ("plain", "head", "head+entropy", "head+bonus")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def one(case: str, N: int, V: int, H: int) -> dict:
    """Peak extra resident memory (MB) and seconds of one forward + backward of `case`, in this process."""
    import torch

    torch.set_num_threads(1)
    import scale.logprobs as L

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(H, V, bias=False)

    def make(n: int, chunk: int = 0):
        hidden = torch.randn(1, n + 1, H, generator=g, requires_grad=True)
        ids = torch.randint(0, V, (1, n + 1), generator=g)
        score = torch.ones(1, n + 1, dtype=torch.bool)
        score[:, 0] = False
        w = torch.randn(1, n + 1, generator=g)

        def loss():
            if case == "plain":
                lsm = torch.log_softmax(head(hidden[:, :-1]).float(), -1)
                return (lsm.gather(-1, ids[:, 1:, None]).squeeze(-1) * w[:, 1:]).sum()
            if case == "ref":   # the old trainer with entropy_coef = 0: chunk 1024, a detached entropy every step
                lp, ent = L.selected_logprobs(hidden, head, ids, score, chunk=chunk or 1024, entropy_grad=False)
                return (lp * w).sum()
            kw = {"head": dict(with_entropy=False), "head+entropy": dict(with_entropy=True, entropy_grad=False),
                  "head+bonus": dict(with_entropy=True, entropy_grad=True)}[case]
            lp, ent = L.selected_logprobs(hidden, head, ids, score, chunk=chunk, **kw)
            return (lp * w).sum() + (0.01 * ent.sum() if case == "head+bonus" else 0.0)
        return loss

    # warm-up on 8 tokens in 2 checkpointed chunks: the first checkpoint loads code (about 2 s and 70 MB)
    small, L.SMALL_CHUNK = L.SMALL_CHUNK, 0
    make(8, chunk=4)().backward()
    L.SMALL_CHUNK = small
    head.zero_grad(set_to_none=True)
    loss = make(N)
    Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM to the current resident set
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    loss().backward()
    seconds = time.perf_counter() - t0
    return {"peak_mb": (_status_kb("VmHWM") - rss0) / 1024, "seconds": seconds,
            "logprobs": str(Path(L.__file__))}


def run_case(case: str, N: int, V: int, H: int, cwd: str) -> dict:
    cmd = [sys.executable, "-m", "experiments.bench_head", "--one", case, str(N), str(V), str(H)]
    # `python -m` puts cwd first: it picks `scale`; the mmap threshold: the module doc
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{case} N={N} V={V} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,1024,4096", help="scored tokens N, comma-separated")
    ap.add_argument("--vocabs", default="32768,151936", help="vocabulary sizes V, comma-separated")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ref", help="also run this commit's scale/logprobs.py (its defaults then)")
    ap.add_argument("--one", nargs=4, help=argparse.SUPPRESS)   # a single measurement, in this process
    a = ap.parse_args(argv)
    if a.one:
        case, N, V, H = a.one
        print(json.dumps(one(case, int(N), int(V), int(H))))
        return
    import scale.logprobs as L

    cases = [*CASES, *(["ref"] if a.ref else [])]
    with tempfile.TemporaryDirectory() as tmp:
        if a.ref:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.ref, "scale/__init__.py",
                                      "scale/logprobs.py"], check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        print(f"head forward + backward, float32, H={a.hidden}, 1 thread; peak = extra resident MB "
              f"(VmHWM - VmRSS before); one [N, V] float32 copy shown for scale")
        print(f"{'V':>7} {'N':>5} {'chunk':>5} {'[N,V] MB':>8}  " + "  ".join(f"{c:>17}" for c in cases))
        for V in map(int, a.vocabs.split(",")):
            for N in map(int, a.sizes.split(",")):
                res = {c: run_case(c, N, V, a.hidden, tmp if c == "ref" else str(ROOT)) for c in cases}
                chunk = L.head_chunk(V, 4)   # without an entropy bonus
                print(f"{V:>7} {N:>5} {min(chunk, N):>5} {N * V * 4 / 2**20:>8.0f}  " + "  ".join(
                    f"{res[c]['peak_mb']:>7.0f} MB {res[c]['seconds']:>5.2f} s" for c in cases), flush=True)


if __name__ == "__main__":
    main()
