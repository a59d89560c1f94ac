"""Figure: the Dr. Post-Training SFT setting (docs/drpt.md section 1.6) on the tiny model, with scale.datareg's rules.

General pool: toy.tasks general.jsonl (levels 1-4: additions, a*b+c, a*b-c); target task: target.jsonl
(level 5, two-digit subtraction, which the pool never shows as such). Model: the cached pretrained tiny base
(toy.pretrain). As in the released SFT code: general batch n = 8, k = 4 (fraction 0.5), n_val = 16 target
examples cycled one per step for the target gradient, AdamW with linear decay, the same step budget for
every rule. Target-only trains on the 16 target examples (batch 8, cycled). The curve is the perplexity of
64 held-out target examples (completion tokens) against steps, mean over seeds.

Step budget: 400 steps (Target-only sees each of its 16 examples 200 times; the paper's 2600 steps of batch 8
are 1300 times). A first version ran 150 steps (75 times), where Target-only had not yet turned upward
(final/min 1.00); the longer budget was chosen after seeing that, to come closer to the paper's protocol,
and the held rule (final/min > 1.1 for Target-only) was kept as it was.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from experiments.registry import FigureResult, figure, save_figure  # noqa: E402

RULES = {"Full-Training": "full", "Target-only": "target_only", "Global Subset": "global_subset",
         "Layer-Wise Subset": "layerwise_subset"}
COLORS = {"Full-Training": "black", "Target-only": "tab:blue", "Global Subset": "tab:green",
          "Layer-Wise Subset": "tab:red"}


def _rows(tok, exs):
    out = []
    for e in exs:
        p = tok(e["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(e["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((p + c, len(p)))
    return out


def _batch(rows, pad):
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    sc = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (x, p) in enumerate(rows):
        ids[i, :len(x)], att[i, :len(x)], sc[i, p:len(x)] = torch.tensor(x), 1, True
    return ids, att, sc


def _nll_sum(model, rows, pad):
    ids, att, sc = _batch(rows, pad)
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
    return -(lp.gather(-1, ids[:, 1:, None]).squeeze(-1) * sc[:, 1:]).sum()


def run(rule: str, seed: int, steps: int, eval_every: int, lr: float = 2e-3, n: int = 8, k: int = 4,
        n_val: int = 16, n_eval: int = 64) -> tuple[list[int], list[float]]:
    """Target perplexity curve of one rule and seed."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scale.datareg import DataReg, DataRegConfig
    from toy.pretrain import pretrained_base
    from toy.tasks import write_datasets

    torch.manual_seed(seed)
    base = pretrained_base()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pad = tok.pad_token_id
    with tempfile.TemporaryDirectory() as d:
        paths = write_datasets(d, n_train=512, n_test=4, seed=0)
        general = _rows(tok, [json.loads(x) for x in paths["general"].read_text().splitlines()])
        target = _rows(tok, [json.loads(x) for x in paths["target"].read_text().splitlines()])
    rng = np.random.default_rng(seed)
    val, held = target[:n_val], target[n_val:n_val + n_eval]
    held_tokens = float(sum(len(x) - p for x, p in held))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    eng = DataReg(model, DataRegConfig(update_rule=rule, k=k))
    xs, ppl = [], []
    for step in range(steps + 1):
        if step % eval_every == 0:
            with torch.no_grad():
                ppl.append(float(np.exp(float(_nll_sum(model, held, pad)) / held_tokens)))
            xs.append(step)
        if step == steps:
            break
        if rule == "target_only":
            gen = [val[(step * n + j) % n_val] for j in range(n)]
        else:
            gen = [general[i] for i in rng.choice(len(general), n, replace=False)]
        w = torch.tensor([float(len(x) - p) for x, p in gen], dtype=torch.float64)
        one = [val[step % n_val]]
        opt.zero_grad(set_to_none=True)
        W = float(w.sum())

        def general_loss(sel, gen=gen, W=W):
            return _nll_sum(model, gen if sel is None else [gen[i] for i in sel.tolist()], pad) / W

        def target_loss(one=one):
            return _nll_sum(model, one, pad) / float(len(one[0][0]) - one[0][1])

        eng.step(general_loss, w, target_loss)
        opt.step()
        sched.step()
    eng.close()
    return xs, ppl


def build(out: Path, seeds=(0, 1), steps: int = 400, eval_every: int = 20) -> FigureResult:
    torch.set_num_threads(1)
    curves = {}
    for label, rule in RULES.items():
        runs = [run(rule, s, steps, eval_every) for s in seeds]
        curves[label] = (runs[0][0], np.mean([r[1] for r in runs], 0))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, y) in curves.items():
        ax.semilogy(xs, y, "-", color=COLORS[label], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("target-set perplexity (held out)")
    ax.set_title("tiny SFT: general pool (levels 1-4) -> subtraction")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "datareg_sft_ppl.png", dpi=120)
    plt.close(fig)
    final = {k: float(v[1][-1]) for k, v in curves.items()}
    best = {k: float(v[1].min()) for k, v in curves.items()}
    overfit = final["Target-only"] / best["Target-only"]
    order_ok = final["Layer-Wise Subset"] <= final["Global Subset"] <= final["Full-Training"]
    lw_best_pool = final["Layer-Wise Subset"] <= min(final["Global Subset"], final["Full-Training"])
    held = "yes" if order_ok and overfit > 1.1 else ("partly" if lw_best_pool or overfit > 1.1 else "no")
    finding = ("final perplexity " + ", ".join(f"{k} {final[k]:.2f} (min {best[k]:.2f})" for k in RULES)
               + f"; Target-only final/min = {overfit:.2f} (overfitting threshold 1.1) over {len(seeds)} seeds, "
               f"{steps} steps")
    caption = ("Held-out target perplexity against steps for the four update rules of the paper's SFT setting on "
               "the tiny model (general arithmetic pool -> subtraction, n=8, k=4, one target example per step). "
               "The paper (Llama-3.2-1B, docs/drpt.md section 1.6) finds Layer-Wise Subset lowest, Global Subset next, "
               "Full-Training highest among the pool-based rules, and Target-only dropping first then rising "
               "(overfitting its 16 examples). Here: " + finding + ". Target-only is the same run for every seed "
               "(the same 16 examples in the same order from the same base; seeds change only the general-pool "
               "draws), so its rise is one deterministic curve. History: the rule (held), the 400-step budget and "
               "the seeds were fixed on 21 Nov; on 2 Dec the cached base changed to the miniature world's "
               "(toy/pretrain.py), which was pretrained on levels 1-4 and so has seen subtraction; the numbers "
               "above come from that base under the unchanged rule, and the figure's premise, a base that has not "
               "learned the target task, no longer holds (issue 13 revisits it).")
    return FigureResult(files=["datareg_sft_ppl.png"], caption=caption, held=held, finding=finding,
                        extra={"final": final, "min": best})


@figure("datareg_sft",
        reproduces="Dr. Post-Training SFT eval-perplexity curves (docs/drpt.md section 1.6): Layer-Wise Subset "
                   "< Global Subset < Full-Training; Target-only overfits",
        slow=True)  # 386 s (experiments/registry.py, 'Slow figures')
def fig_datareg_sft(out: Path) -> FigureResult:
    return build(out)
