"""The update does not depend on how a global batch is split: 1 process x 1 micro-batch, 1 x 4, and
2 processes (torchrun, Accelerator(cpu=True), gloo) x 1 and x 2 give the same gradient to 1e-6 (float64
tiny model), for batches that mix every loss term: RL rows (GRPO's per-sequence mean, LUFFY's global token
mean with demonstrations, HPT's paper normalisers, Dr. GRPO's constant length, verl's seq-mean-token-sum-norm
with empty completions left out of S), SFT rows (token mean and
per-sequence mean), DPO pairs and the entropy bonus.

This file is also the worker: `torchrun --nproc_per_node 2 tests/scale/test_invariance.py WORLD OUT`.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _cases(tr):
    """(name, global units, Terms, extra norms); a unit is the rows one prompt / pair / example brings."""
    from scale.loss import Row, Terms, rl_estimator, sft_estimator
    from theory.estimator import KL_STYLES

    rng = random.Random(0)
    G = 4
    units_a, units_b = [], []
    for ex in tr.data[:8]:
        t = ex["completion"]
        p, full = t["prompt_len"], t["input_ids"]
        group = []
        for _ in range(G):
            cut = rng.randint(p + 2, len(full))
            group.append(Row(list(full[:cut]), p, "rl", meta={"reward": float(rng.random() < 0.5)}))
        demo = Row(list(full), p, "demo", meta={"reward": 1.0})
        units_a.append(group[:G - 1] + [demo])            # LUFFY: demonstration inside the group
        units_b.append(group)                              # GRPO / HPT rollouts
    for units in (units_a, units_b):
        rewards = torch.tensor([r.meta["reward"] for u in units for r in u], dtype=torch.float64)
        adv = rl_estimator("grpo").advantages(rewards, G).tolist()
        for r, a in zip([r for u in units for r in u], adv):
            r.advantage = a
    # GRPO groups in which some completions have no token (verl's S counts only the others)
    units_c = [[Row(list(r.input_ids[:r.prompt_len]), r.prompt_len, "rl", advantage=r.advantage) if k == j % G
                else r for k, r in enumerate(u)] if j % 2 == 0 else u for j, u in enumerate(units_b)]
    sft = [[Row(list(ex["completion"]["input_ids"]), ex["completion"]["prompt_len"], "sft", weight=0.7)]
           for ex in tr.data[8:16]]
    pairs = [[Row(list(ex["chosen"]["input_ids"]), ex["chosen"]["prompt_len"], "chosen", ref_logp=-30.0 - i),
              Row(list(ex["rejected"]["input_ids"]), ex["rejected"]["prompt_len"], "rejected", ref_logp=-31.0)]
             for i, ex in enumerate(tr.pref[16:24])]
    # KL to a reference: the reference's token log-probs, made up (the loss only reads them)
    units_k = [[Row(r.input_ids, r.prompt_len, "rl", advantage=r.advantage,
                    ref_token_logp=[-rng.random() * 3 for _ in range(r.n_scored)]) for r in u] for u in units_b]
    mixed_a = [u + s + d for u, s, d in zip(units_a, sft, pairs)]
    mixed_b = [u + s for u, s in zip(units_b, sft)]
    return [
        ("luffy+sft_seq+dpo+entropy", mixed_a,
         Terms(rl=rl_estimator("luffy"), sft=sft_estimator("seq_mean_token_mean"), dpo_beta=0.1, entropy_coef=0.01),
         {}),
        ("hpt_paper+sft_token", mixed_b,
         Terms(rl=rl_estimator("hpt_paper"), sft=sft_estimator("global_token_mean")),
         {"rl_seqs": 32.0, "sft_seqs": 8.0}),
        ("grpo", units_b, Terms(rl=rl_estimator("grpo")), {}),
        # constant-length normaliser: the completion budget, not the padded micro-batch width (issue 14.1)
        ("dr_grpo", units_b, Terms(rl=rl_estimator("dr_grpo", max_new_tokens=16)), {}),
        # verl 0.9.1's seq-mean-token-sum-norm with S = rows that have a token (count_empty_rows=False)
        ("verl_norm_nonempty", units_c, Terms(rl=rl_estimator(
            "grpo", {"aggregation": "seq_mean_token_sum_norm", "count_empty_rows": False}, max_new_tokens=16)), {}),
        # the KL term in the policy loss's own aggregation (TRL's and verl's), issue 14 item 4
        ("grpo+kl_trl", units_k, Terms(rl=rl_estimator("grpo").replace(kl_coef=0.1, **KL_STYLES["trl"])), {}),
        ("dapo+kl_verl", units_k, Terms(rl=rl_estimator("dapo").replace(kl_coef=0.1, **KL_STYLES["verl"])), {}),
    ]


def run_worker(world: dict, grad_accums: list[int], out: Path | None = None, cases=None) -> dict:
    """Build a float64 trainer, apply each case's global batch (this process's contiguous share) with
    each accumulation count; return {(case, gas): gradient vector}."""
    from accelerate import Accelerator

    from scale.config import load_config
    from scale.train import Trainer

    results = {}
    for gas in grad_accums:
        cfg = load_config(None, [f"model.path={world['model']}", f"data.path={world['joint']}", "method.name=sft_dpo",
                                 "model.dtype=float64", "run.cpu=true", "run.batch_size=2", f"run.grad_accum={gas}",
                                 "run.max_grad_norm=0", "run.progress=false", "data.shuffle=false",
                                 f"run.output_dir={out or '/tmp/unused'}"])
        tr = Trainer(cfg, accelerator=Accelerator(cpu=True, gradient_accumulation_steps=gas))
        init = {k: v.detach().clone() for k, v in tr.policy.named_parameters()}
        grads = {}
        tr.opt.optimizer.step = _recording(tr, grads, tr.opt.optimizer.step)
        for name, units, terms, extra in (cases or _cases)(tr):
            with torch.no_grad():
                for k, v in tr.policy.named_parameters():
                    v.copy_(init[k])
            tr.terms = terms
            P, r = tr.acc.num_processes, tr.acc.process_index
            share = [row for u in units[r * len(units) // P:(r + 1) * len(units) // P] for row in u]
            tr.update(share, extra)
            results[(name, gas)] = grads.pop("g")
    return results


def _recording(tr, box, step):
    def wrapped(*a, **k):
        box["g"] = torch.cat([p.grad.reshape(-1) for p in tr.policy.parameters()]).clone()
        return step(*a, **k)
    return wrapped


def test_update_invariant_to_split(world, tmp_path):
    single = run_worker(world, [1, 4])
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    import socket

    with socket.socket() as sock:  # a free port: parallel test runs must not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__)), str(world["model"]), str(world["joint"]), str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ddp = torch.load(out)
    assert ddp.pop("num_processes") == 2
    for name in {k[0] for k in single}:
        ref = single[(name, 1)]
        assert ref.abs().max() > 1e-4, f"{name}: zero gradient, the test could not fail"
        scale = float(ref.abs().max())
        for key, g in [(("single", 4), single[(name, 4)]), (("ddp", 1), ddp[(name, 1)]), (("ddp", 2), ddp[(name, 2)])]:
            err = float((g - ref).abs().max())
            assert err <= 1e-6 * max(1.0, scale), (name, key, err, scale)


def test_split_detects_a_local_normaliser(world):
    """Control: the per-micro-batch token mean (TRL's bnpo, not converted to a global count) changes with
    the split, so the comparison above can fail."""
    from scale.loss import Terms
    from theory.estimator import preset

    def local_cases(tr):
        name, units, _, _ = _cases(tr)[2]
        return [(name, units, Terms(rl=preset("bnpo")), {})]

    res = run_worker(world, [1, 4], cases=local_cases)
    err = float((res[("grpo", 1)] - res[("grpo", 4)]).abs().max())
    assert err > 1e-4, err


if __name__ == "__main__":
    world = {"model": sys.argv[1], "joint": sys.argv[2]}
    torch.set_num_threads(1)
    res = run_worker(world, [1, 2])
    from accelerate import PartialState

    res["num_processes"] = PartialState().num_processes
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(res, sys.argv[3])
    from scale.train import _end_distributed

    _end_distributed()
