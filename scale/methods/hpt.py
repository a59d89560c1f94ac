"""HPT (Hybrid Post-Training): per prompt, a gate on its rollout accuracy (`theory.schedules.HptGate`)
keeps its n rollouts for RL (weight alpha) and / or its demonstration for SFT (weight beta times
`method.hpt.sft_coef`). Variants: `paper` (Eq. 9-13, preset hpt_paper: the RL term averages over Q prompts
x n rollouts and the SFT term over Q demonstrations, Q every prompt of the batch) and `code` (the released
code: preset hpt_code, a count gate, a global token mean for SFT).

What the gated demonstration trains (`method.hpt.offline`, the paper's Table 5): `sft` (HPT); `off_policy`
(OFF/ON: the demonstration joins the RL term as an off-policy row, LUFFY's shaped likelihood
f(pi) = pi / (pi + 0.1) with pi_ref = 1, and advantage = its own reward, as the released code's singleton
group gives it: mean 0, std 1); `sft_off_policy` (Mix/ON: both, weighted sft_coef and off_coef; the paper's
0.1 : 1 is sft_coef=0.1, off_coef=1)."""

from __future__ import annotations

import numpy as np
import torch

from scale.loss import Row, Terms, sft_estimator
from scale.methods import register
from scale.methods.rl import RL, demo_row, rl_preset


@register("hpt")
class HPT(RL):
    data = "demo"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        h, n = cfg.method.hpt, cfg.generation.n
        if h.switch_gate > n:
            raise ValueError(f"method.hpt.switch_gate: expected -1 or an integer in [0, generation.n={n}], "
                             f"got {h.switch_gate}")

    @property
    def paper(self) -> bool:
        return self.cfg.method.hpt.variant == "paper"

    def terms(self, tr) -> Terms:
        t = super().terms(tr)
        # demonstrations in the RL term (Table 5's OFF/ON, Mix/ON): LUFFY's off-policy part
        off = {} if self.cfg.method.hpt.offline == "sft" else {"demo_reference": "one", "demo_shaping": "luffy"}
        t.rl = rl_preset(self.cfg, "hpt_paper" if self.paper else "hpt_code", **off)
        t.sft = sft_estimator("seq_mean_token_mean" if self.paper else "global_token_mean")
        return t

    def schedule(self):
        from theory.schedules import HptGate

        h, n = self.cfg.method.hpt, self.cfg.generation.n
        try:
            if not self.paper:
                return HptGate.from_code(h.switch_gate if h.switch_gate >= 0 else int(round(h.gamma * n)), n)
            return HptGate(h.gamma, mode=h.gate_mode, temperature=h.gate_temperature)
        except ValueError as e:  # theory.schedules names its argument, not the config key
            raise ValueError(f"method.hpt: {e}") from None

    def select(self, tr, rows, exs, info, idx=None, step=0):
        """The gate: per prompt, its rollouts (weight alpha) and / or its demonstration (weight beta)."""
        h, n, gate = self.cfg.method.hpt, self.cfg.generation.n, tr.schedule
        idx = list(range(len(exs))) if idx is None else idx
        correct = np.array([sum(rw.meta["reward"] > 0.5 for rw in rows[q * n:(q + 1) * n]) for q in range(len(exs))])
        alpha, beta = gate.count_weights(correct) if gate.switch_gate is not None else gate.prompt_weights(correct / n)
        out = []
        for q, e in enumerate(exs):
            if alpha[q] > 0:
                for rw in rows[q * n:(q + 1) * n]:
                    rw.weight = float(alpha[q])
                    out.append(rw)
            if beta[q] > 0 and h.offline != "off_policy":
                t = e["completion"]
                out.append(Row(list(t["input_ids"]), t["prompt_len"], "sft", weight=float(beta[q]) * h.sft_coef,
                               meta={"group": q, "offline": True}))
            if beta[q] > 0 and h.offline != "sft":
                d = demo_row(tr, e, idx[q], step, group=q)
                d.advantage, d.weight = d.meta["reward"], float(beta[q]) * h.off_coef
                out.append(d)
        n_sft = tr.acc.reduce(torch.tensor(float((beta > 0).sum()), dtype=torch.float64, device=tr.acc.device), "sum")
        info["sft_prompt_fraction"] = float(n_sft) / self.cfg.run.batch_size
        return out

    def extra_norms(self, prompts, tr):
        if not self.paper:
            return None
        Q = float(prompts * tr.P)
        return {"rl_seqs": Q * self.cfg.generation.n, "sft_seqs": Q}
