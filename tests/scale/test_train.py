"""Every method runs a few steps on the tiny model through the CLI; the trainer's losses equal
theory.estimator on the same tensors; schedule decisions equal theory.schedules'; bad input fails early."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.cli import main as cli
from tests.scale.conftest import base_overrides, read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
RUNS = [  # (config, data set, extra overrides)
    ("tiny_sft.yaml", "sft", {}),
    ("tiny_dpo.yaml", "dpo", {}),
    ("tiny_grpo.yaml", "rl", {}),
    ("tiny_hpt_paper.yaml", "rl", {"method.hpt.gamma": 0.5}),
    ("tiny_hpt_code.yaml", "rl", {"method.rl.entropy_coef": 0.001, "run.skip_grad_norm": 80.0}),
    ("tiny_luffy.yaml", "rl", {}),
    ("tiny_srft.yaml", "rl", {}),
    ("tiny_grpo.yaml", "rl", {"method.rl.estimator": "dapo", "method.rl.mini_batches": 2, "method.rl.kl_coef": 0.1}),
    ("tiny_grpo.yaml", "rl", {"method.rl.kl_coef": 0.05, "method.rl.kl_aggregation": "policy",   # TRL's KL
                              "method.rl.kl_bias_correction": True, "method.rl.mini_batches": 2}),
    ("tiny_grpo.yaml", "rl", {"method.rl.kl_coef": 0.05, "method.rl.kl_placement": "reward",     # verl in-reward
                              "method.rl.kl_estimator": "k1"}),
    ("tiny_sequential.yaml", "joint", {}),
    ("tiny_mix.yaml", "joint", {}),
    ("tiny_alright.yaml", "joint", {}),
    ("tiny_maxright.yaml", "joint", {"method.joint.k": 1}),
]


def _params(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("config,data,extra", RUNS, ids=[f"{c[:-5]}-{i}" for i, (c, _, _) in enumerate(RUNS)])
def test_method_runs_through_cli(world, tmp_path, config, data, extra):
    out = tmp_path / "run"
    ov = base_overrides(world, "", data, out, **{"run.save_model": True, **extra})
    ov = [o for o in ov if not o.startswith("method.name=")]
    assert cli(["train", str(CONFIGS / config), *ov]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "grad_norm", "entropy", "tokens_per_s", "lr", "peak_rss_mb"):
            assert math.isfinite(r[k]), (k, r)
    if data == "rl":   # sampling methods only: what a row of SFT / DPO does not have (issue 16 item 10)
        for k in ("reward", "accuracy", "response_length", "clip_fraction", "kl", "offline_ratio", "generation_time"):
            assert math.isfinite(rows[-1][k]), k
        if extra.get("method.rl.kl_placement") == "reward":
            assert math.isfinite(rows[-1]["kl_reward"])
    else:
        assert not {"offline_ratio", "generation_time"} & set(rows[-1]), rows[-1]
    before, after = _params(world["model"]), _params(out / "final")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no parameter changed"
    assert (out / "checkpoints" / "LATEST").is_file()


def test_cli_subprocess_sft(world, tmp_path):
    """The installed entry point path: `python -m experiments.cli train ...` in a fresh process."""
    out = tmp_path / "run"
    ov = base_overrides(world, "sft", "sft", out, **{"run.max_steps": 1})
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    p = subprocess.run([sys.executable, "-m", "experiments.cli", "train", str(CONFIGS / "tiny_sft.yaml"), *ov],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(read_metrics(out)) == 1


# ---------------------------------------------------------------------------- losses equal theory.estimator
def _trainer(world, tmp_path, method="hpt", data="rl", **extra):
    from scale.config import load_config
    from scale.train import Trainer

    ov = base_overrides(world, method, data, tmp_path / "o", **{"model.dtype": "float64", "run.cpu": True,
                                                                "run.logprob_chunk": 5, **extra})
    return Trainer(load_config(None, ov))


@pytest.mark.parametrize("name", ["grpo", "dapo", "dr_grpo", "gspo", "hpt_code", "sft"])
def test_trainer_loss_equals_estimator(world, tmp_path, name):
    """Trainer path (chunked log-probs at temperature T, global normalisers, Row batches) == the estimator
    applied to full-logit log-probs of the same tokens; values and parameter gradients."""
    from scale.logprobs import reference_logprobs
    from scale.loss import Row, Terms, collate, local_counts, micro_loss, rl_estimator, sft_estimator
    from theory.estimator import preset

    T = 0.7
    tr = _trainer(world, tmp_path, **{"generation.temperature": T})
    g = torch.Generator().manual_seed(0)
    rows = []
    for ex in tr.data[:6]:
        t = ex["completion"]
        cut = int(torch.randint(t["prompt_len"] + 2, len(t["input_ids"]) + 1, (1,), generator=g))
        rows.append(Row(list(t["input_ids"][:cut]), t["prompt_len"], "sft" if name == "sft" else "rl",
                        advantage=float(torch.randn(1, generator=g))))
    est = sft_estimator() if name == "sft" else rl_estimator(name)
    terms = Terms(sft=est) if name == "sft" else Terms(rl=est)
    mb = collate(rows, tr.tok.pad_token_id)
    model = tr._model()
    lp, ent = tr.policy(mb["input_ids"], mb["attention_mask"], mb["score_mask"], temperature=T)
    got, _ = micro_loss(lp, ent, mb, terms, local_counts(rows))
    g1 = torch.autograd.grad(got, [p for p in model.parameters()])

    ref_lp = reference_logprobs(model, mb["input_ids"], mb["attention_mask"], mb["score_mask"], temperature=T)
    ref_est = preset(name) if name != "sft" else preset("sft")
    A = mb["advantage"] if name != "sft" else None
    want = ref_est.loss(ref_lp, advantages=A, mask=mb["score_mask"])
    g2 = torch.autograd.grad(want, [p for p in model.parameters()])
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), (float(got), float(want))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    assert torch.allclose(lp, ref_lp, atol=1e-12)


def test_dpo_loss_matches_formula(world, tmp_path):
    """DPO term == mean over pairs of -log sigmoid(beta * ((c - c_ref) - (r - r_ref))), sums of token log-probs."""
    from scale.logprobs import reference_logprobs
    from scale.loss import Terms, collate, local_counts, micro_loss

    tr = _trainer(world, tmp_path, method="dpo", data="dpo")
    from scale.methods.dpo import pair_rows

    rows = pair_rows(tr, list(range(4)))
    mb = collate(rows, tr.tok.pad_token_id)
    lp, ent = tr.policy(mb["input_ids"], mb["attention_mask"], mb["score_mask"])
    got, _ = micro_loss(lp, ent, mb, Terms(dpo_beta=0.1), local_counts(rows))
    seq = reference_logprobs(tr._model(), mb["input_ids"], mb["attention_mask"], mb["score_mask"]).sum(-1)
    ref = torch.tensor([r.ref_logp for r in rows], dtype=torch.float64)
    d = (seq - ref)
    want = -torch.nn.functional.logsigmoid(0.1 * (d[0::2] - d[1::2])).mean()
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(ref, seq.detach(), atol=1e-10)  # reference = frozen copy of the initial model


# ---------------------------------------------------------------------------- schedules equal theory.schedules
def test_joint_weights_equal_schedule(world, tmp_path):
    from theory.schedules import Alright, Maxright, Sequential

    for sched, extra in [("alright", {"method.joint.lam": 0.3, "method.joint.seed": 7}),
                         ("sequential", {"method.joint.split": 0.5}),
                         ("maxright", {"method.joint.k": 2, "method.joint.f_star_sft": 1.0})]:
        tr = _trainer(world, tmp_path, method="sft_dpo", data="joint",
                      **{"method.joint.schedule": sched, "run.max_steps": 6, **extra})
        seen = []
        real = tr.method.objective_values

        def spy(trainer, a, b, seen=seen, real=real):
            v = real(trainer, a, b)
            seen.append(v)
            return v

        tr.method.objective_values = spy
        logs = [tr.train_step(s) for s in range(6)]
        got = [(m["w_sft"], m["w_dpo"]) for m in logs]
        if sched == "alright":
            want = [tuple(Alright(0.3, seed=7).weights(s)[k] for k in ("sft", "dpo")) for s in range(6)]
        elif sched == "sequential":
            want = [tuple(Sequential(order=("sft", "dpo"), split=0.5, total_steps=6).weights(s)[k]
                          for k in ("sft", "dpo")) for s in range(6)]
        else:  # replay MAXRIGHT on the statistics the trainer measured, observing the losses it trained on
            mr, want, it = Maxright(0.5, {"sft": 1.0, "dpo": 0.0}, k=2), [], iter(seen)
            for s, m in enumerate(logs):
                w = mr.weights(s, next(it) if mr.needs_values(s) else None)
                want.append((w["sft"], w["dpo"]))
                chosen = "sft" if w["sft"] else "dpo"
                mr.observe(chosen, m[f"{chosen}_loss"])
            assert len(seen) == 3
        assert got == want, (sched, got, want)


def test_hpt_gate_equals_schedule(world, tmp_path):
    """Which prompts the trainer sends to SFT / RL (and with what weight) is HptGate's decision."""
    import numpy as np

    from scale.loss import Row
    from theory.schedules import HptGate

    n = 4
    for variant, extra in [("paper", {"method.hpt.gamma": 0.25}), ("code", {"method.hpt.switch_gate": 1}),
                           ("paper", {"method.hpt.gamma": 0.5, "method.hpt.gate_mode": "smooth"})]:
        tr = _trainer(world, tmp_path, method="hpt", **{"method.hpt.variant": variant, "generation.n": n, **extra})
        exs = tr.data[:5]
        correct = [0, 1, 2, 3, 4]
        rows = [Row([1, 2, 3], 1, "rl", meta={"group": q, "reward": float(k < c)})
                for q, c in enumerate(correct) for k in range(n)]
        out = tr.method.select(tr, rows, exs, {})
        gate = HptGate.from_code(1, n) if variant == "code" else HptGate(
            extra["method.hpt.gamma"], mode=extra.get("method.hpt.gate_mode", "switch"))
        alpha, beta = gate.count_weights(np.array(correct)) if variant == "code" else \
            gate.prompt_weights(np.array(correct) / n)
        for q in range(5):
            rl_w = [r.weight for r in out if r.kind == "rl" and r.meta["group"] == q]
            sft_w = [r.weight for r in out if r.kind == "sft" and r.meta["group"] == q]
            assert rl_w == ([alpha[q]] * n if alpha[q] > 0 else [])
            assert sft_w == ([beta[q]] if beta[q] > 0 else [])


@pytest.mark.parametrize("offline", ["off_policy", "sft_off_policy"])
def test_hpt_offline_branches_of_table5(world, tmp_path, offline):
    """method.hpt.offline: a gated prompt's demonstration becomes an off-policy `demo` row (advantage = its
    reward, weight beta * off_coef), with (Mix/ON) or without (OFF/ON) its SFT row; its gradient is that of
    -A * w * sum_t f(pi_t) / L with LUFFY's f(p) = p / (p + 0.1) and L = generation.max_new_tokens."""
    from scale.loss import Row

    n = 4
    tr = _trainer(world, tmp_path, method="hpt", **{"method.hpt.variant": "code", "generation.n": n,
                                                    "method.hpt.offline": offline, "method.hpt.sft_coef": 0.1,
                                                    "method.hpt.off_coef": 0.7})
    exs = tr.data[:2]
    rows = [Row([1, 2, 3], 1, "rl", meta={"group": q, "reward": float(q == 1)}) for q in range(2) for _ in range(n)]
    out = tr.method.select(tr, rows, exs, {}, idx=[0, 1], step=0)
    demo = [r for r in out if r.kind == "demo"]
    sft = [r for r in out if r.kind == "sft"]
    assert [r.meta["group"] for r in demo] == [0] and demo[0].weight == pytest.approx(0.7)
    assert demo[0].advantage == demo[0].meta["reward"]             # the released code's singleton group: A = R
    assert [r.weight for r in sft] == ([pytest.approx(0.1)] if offline == "sft_off_policy" else [])
    assert sum(r.kind == "rl" for r in out) == n                   # prompt 1 (all right) stays in RL

    torch.manual_seed(0)
    T, L = 6, tr.cfg.generation.max_new_tokens
    lp = (-torch.rand(1, T, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.tensor([[True] * 5 + [False]])
    A = torch.tensor([1.3 * demo[0].weight], dtype=torch.float64)   # a non-zero advantage, whatever R is
    tr.terms.rl.loss(lp, advantages=A, mask=mask, num_items=5.0, num_seqs=1.0,
                     is_demo=torch.tensor([True])).backward()
    ref = lp.detach().clone().requires_grad_()
    p = ref.exp()
    (-(A[0] * (p / (p + 0.1)) * mask).sum() / L).backward()
    torch.testing.assert_close(lp.grad, ref.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("config,data", [("tiny_dpo.yaml", "dpo"), ("tiny_grpo.yaml", "rl")])
def test_lora_trains_only_the_adapter_and_saves_it(world, tmp_path, config, data):
    """LoRA through peft: the base weights stay fixed, the adapter moves; DPO's reference is the
    adapter-free base (no copy of the model)."""
    out = tmp_path / "run"
    ov = base_overrides(world, "", data, out, **{"run.save_model": True, "model.lora.enabled": True,
                                                  "model.lora.r": 4, "run.lr": 5e-2})
    ov = [o for o in ov if not o.startswith("method.name=")]
    assert cli(["train", str(CONFIGS / config), *ov]) == 0
    from safetensors.torch import load_file

    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(bool(v.abs().sum() > 0) for k, v in adapter.items() if "lora_B" in k)  # B starts at 0
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out))


def test_gradient_checkpointing_gives_the_same_update(world, tmp_path):
    """Activation checkpointing recomputes the forward in the backward: same parameters after 2 steps."""
    finals = []
    for gc in (False, True):
        out = tmp_path / f"gc{int(gc)}"
        ov = base_overrides(world, "sft", "sft", out, **{"run.save_model": True,
                                                          "model.gradient_checkpointing": gc})
        assert cli(["train", str(CONFIGS / "tiny_sft.yaml"), *ov]) == 0
        finals.append(_params(out / "final"))
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-5, atol=1e-6)



def test_entropy_is_logged_every_k_steps_and_never_made_up(world, tmp_path):
    """run.entropy_every=2: step 1 computes no entropy and logs none (no 0 in its place), step 2 logs it;
    the default (1) logs it every step, as the committed sweeps read it."""
    for every, want in ((2, [False, True]), (1, [True, True])):
        out = tmp_path / f"every{every}"
        ov = base_overrides(world, "sft", "sft", out, **{"run.entropy_every": every})
        assert cli(["train", str(CONFIGS / "tiny_sft.yaml"), *ov]) == 0
        rows = read_metrics(out)
        assert ["entropy" in r for r in rows] == want, rows
        assert all(r["entropy"] > 0 for r in rows if "entropy" in r)


def test_entropy_is_computed_when_the_loss_or_the_log_needs_it(world, tmp_path):
    """An entropy bonus computes it with its graph on every step whatever run.entropy_every says; a statistic
    is computed only on the logged steps; a loss with a bonus refuses a missing entropy."""
    from scale.loss import Row, Terms, collate, local_counts, micro_loss, sft_estimator

    def args_by_step(tr) -> list[dict]:
        out = []
        for tr.step in range(3):
            out.append(tr.entropy_args())
        return out

    tr = _trainer(world, tmp_path / "a", method="sft", data="sft", **{"run.entropy_every": 3})
    statistic = {"with_entropy": True, "entropy_grad": False}
    assert args_by_step(tr) == [{"with_entropy": False, "entropy_grad": False}] * 2 + [statistic]
    tr = _trainer(world, tmp_path / "b", method="rl", data="rl",
                  **{"run.entropy_every": 3, "method.rl.entropy_coef": 0.01})
    assert args_by_step(tr) == [{"with_entropy": True, "entropy_grad": True}] * 3
    rows = [Row([1, 2, 3, 4], 2, "sft")]
    mb = collate(rows, 0)
    lp = torch.zeros(mb["input_ids"].shape, dtype=torch.float64)
    assert "entropy_sum" not in micro_loss(lp, None, mb, Terms(sft=sft_estimator()), local_counts(rows))[1]
    with pytest.raises(ValueError, match="^entropy: "):
        micro_loss(lp, None, mb, Terms(sft=sft_estimator(), entropy_coef=0.01), local_counts(rows))

def test_constant_length_aggregation_uses_the_completion_budget():
    """Dr. GRPO's L is generation.max_new_tokens in the trainer (not the padded prompt + completion width),
    unless the estimator options set it; other aggregations are left alone."""
    from scale.loss import rl_estimator

    assert rl_estimator("dr_grpo", max_new_tokens=16).max_length == 16
    assert rl_estimator("dr_grpo", {"max_length": 64}, max_new_tokens=16).max_length == 64
    assert rl_estimator("grpo", max_new_tokens=16).max_length is None
    assert rl_estimator("hpt_code", max_new_tokens=16).max_length == 16   # the code's 8192 was its budget
    assert rl_estimator("hpt_code").aggregation == "token_sum_norm"        # verl's old norm mode: no 1/S
    for agg in ("seq_mean_token_sum_norm", "token_sum_norm", "batch_token_sum_norm"):  # every *_norm aggregation
        assert rl_estimator("grpo", {"aggregation": agg}, max_new_tokens=16).max_length == 16
    lp = torch.zeros(2, 40, dtype=torch.float64, requires_grad=True)
    short, long = torch.zeros(2, 40, dtype=torch.bool), torch.zeros(2, 40, dtype=torch.bool)
    short[:, 6:12] = True                      # 6-token prompts
    long[:, 30:36] = True                      # the same completions after 30-token prompts
    est, A = rl_estimator("dr_grpo", max_new_tokens=16), torch.tensor([1.0, -0.5], dtype=torch.float64)
    g1 = torch.autograd.grad(est.loss(lp, advantages=A, mask=short), lp)[0]
    g2 = torch.autograd.grad(est.loss(lp, advantages=A, mask=long), lp)[0]
    assert torch.equal(g1[:, 6:12], g2[:, 30:36]) and float(g1[0, 6]) == pytest.approx(-1.0 / (2 * 16))


@pytest.mark.parametrize("count_empty_rows", [True, False])
def test_trainer_counts_rows_as_the_estimator_option_says(count_empty_rows):
    """A completion with no scored token: S counts it (TRL, verl's trainer) or not (count_empty_rows=False,
    verl's agg_loss), from the global counts, so one micro-batch or two give the estimator's gradient."""
    from scale.loss import Row, Terms, collate, local_counts, micro_loss, rl_estimator
    from theory.estimator import preset

    rows = [Row([1, 2, 3, 4, 5], 2, "rl", advantage=1.0), Row([1, 2], 2, "rl", advantage=-0.5),
            Row([1, 2, 3, 4], 2, "rl", advantage=0.25), Row([1, 2, 3, 4, 5, 6], 2, "rl", advantage=-1.0)]
    norms = local_counts(rows)
    assert (norms["rl_rows"], norms["rl_nonempty_rows"]) == (4.0, 3.0)
    for agg in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        opts = {"aggregation": agg, "count_empty_rows": count_empty_rows}
        terms = Terms(rl=rl_estimator("grpo", opts, max_new_tokens=8))
        mb = collate(rows, 0)
        g = torch.Generator().manual_seed(0)
        lp = (-torch.rand(mb["input_ids"].shape, generator=g, dtype=torch.float64)).requires_grad_()
        ent = torch.zeros_like(lp)
        whole = micro_loss(lp, ent, mb, terms, norms)[0]
        want = preset("grpo", max_length=8, **opts).loss(lp, advantages=mb["advantage"], mask=mb["score_mask"])
        torch.testing.assert_close(whole, want, rtol=1e-14, atol=0)
        split = 0.0
        for i in (0, 2):  # two micro-batches (right-padded: a half's columns are the whole's first ones)
            part = collate(rows[i:i + 2], 0)
            w = part["input_ids"].shape[1]
            split = split + micro_loss(lp[i:i + 2, :w], ent[i:i + 2, :w], part, terms, norms)[0]
        torch.testing.assert_close(split, want, rtol=1e-14, atol=0)


def test_rollout_advantages_get_the_completion_lengths():
    """rollout_rows passes each completion's token count, so verl's token-whitened advantage
    (group_center_token_whiten_verl) works in the trainer."""
    from types import SimpleNamespace

    from scale.loss import Terms, rl_estimator
    from scale.methods.rl import rollout_rows
    from theory import advantages as adv

    comps = [[7] * k for k in (1, 4, 2, 6, 3, 3)]
    acc = SimpleNamespace(device="cpu", process_index=0, gather=lambda t: t, reduce=lambda t, op: t)
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    tr = SimpleNamespace(
        cfg=SimpleNamespace(generation=SimpleNamespace(n=3)), acc=acc,
        generate=lambda prompts, n: comps, generator=SimpleNamespace(rollout_logprobs=None),   # hf: none recorded
        tok=SimpleNamespace(batch_decode=lambda c, **_: ["x"] * len(c)),
        rewards=lambda *a, **k: rewards,
        terms=Terms(rl=rl_estimator("grpo", {"advantage": "group_center_token_whiten_verl"})))
    exs = [{"prompt_ids": [1, 2], "answer": "a"}, {"prompt_ids": [3], "answer": "b"}]
    rows = rollout_rows(tr, exs, [0, 1], 0, {})
    want = adv.compute("group_center_token_whiten_verl", torch.tensor(rewards, dtype=torch.float64), 3,
                       lengths=torch.tensor([1.0, 4.0, 2.0, 6.0, 3.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(torch.tensor([r.advantage for r in rows], dtype=torch.float64), want,
                               rtol=0, atol=0)
