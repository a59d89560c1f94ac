"""SFT and DPO together (XRIGHT): a schedule (`theory.schedules`) weights the two objectives each step.

`method.joint.schedule`: sequential (one objective per stage, optimizer state reset at a stage change as
the released code's separate runs), mix (both, weights 1-lam and lam), alright (one drawn per step),
maxright (the one with the larger weighted gap to its optimum, refreshed every k steps on the step's
batches). SFT rows come from data.path, preference pairs from data.pref_path (or data.path).
"""

from __future__ import annotations

import torch

from scale.logprobs import policy_logps
from scale.loss import Terms, micro_loss, sft_estimator, split_rows
from scale.methods import Method, register
from scale.methods.dpo import pair_rows
from scale.methods.sft import sft_rows


@register("sft_dpo")
class Joint(Method):
    data = "sft"
    pref_data = True

    @classmethod
    def check(cls, cfg) -> None:
        j = cfg.method.joint
        if j.schedule == "sequential" and len(j.order) != 2:
            raise ValueError(f"method.joint.order: expected two objective names, got {j.order}")

    def needs_reference(self) -> bool:
        return True

    def terms(self, tr) -> Terms:
        return Terms(sft=sft_estimator(self.cfg.method.sft.aggregation), dpo_beta=self.cfg.method.dpo.beta)

    def schedule(self):
        from theory import schedules

        j = self.cfg.method.joint
        try:
            if j.schedule == "sequential":
                return schedules.Sequential(order=tuple(j.order), split=j.split, total_steps=self.cfg.run.max_steps)
            if j.schedule == "mix":
                return schedules.Mix(j.lam)
            if j.schedule == "alright":
                return schedules.Alright(j.lam, seed=j.seed)
            return schedules.Maxright(j.lam, {"sft": j.f_star_sft, "dpo": j.f_star_dpo}, k=j.k)
        except ValueError as e:  # theory.schedules names its argument, not the config key
            raise ValueError(f"method.joint: {e}") from None

    def rows(self, tr, step, info):
        from theory.schedules import Sequential

        r, j = self.cfg.run, self.cfg.method.joint
        i_sft = tr.local_indices(step, len(tr.data), r.batch_size)
        i_dpo = tr.local_indices(step, len(tr.pref), j.dpo_batch_size or r.batch_size)
        stats = None
        if getattr(tr.schedule, "needs_values", None) and tr.schedule.needs_values(step):
            stats = self.objective_values(tr, i_sft, i_dpo)
        w = tr.schedule.weights(step, stats)
        info.update(w_sft=w["sft"], w_dpo=w["dpo"])
        if isinstance(tr.schedule, Sequential) and tr.schedule.stage_start(step) and step > 0 and j.reset_optimizer:
            tr.opt.optimizer.state.clear()
        rows = []
        if w["sft"]:
            rows += sft_rows(tr.data, i_sft, w["sft"])
        if w["dpo"]:
            rows += pair_rows(tr, i_dpo, w["dpo"])
        return rows

    def update(self, tr, rows, info):
        from theory.schedules import Maxright

        metrics = tr.update(rows)
        if isinstance(tr.schedule, Maxright):  # MAXRIGHT caches the value of the objective it trained on
            chosen = "sft" if info.get("w_sft") else "dpo"
            tr.schedule.observe(chosen, metrics[f"{chosen}_loss"])
        return metrics

    @torch.no_grad()
    def objective_values(self, tr, i_sft, i_dpo) -> dict:
        """Global f_sft and f_dpo on this step's batches at the current parameters (MAXRIGHT's refresh)."""
        vals = {}
        for key, rows, terms in (("f_sft", sft_rows(tr.data, i_sft), Terms(sft=tr.terms.sft)),
                                 ("f_dpo", pair_rows(tr, i_dpo), Terms(dpo_beta=tr.terms.dpo_beta))):
            norms = tr.global_counts(rows)
            total = 0.0
            r = self.cfg.run
            for mb_rows in split_rows(rows, r.grad_accum, r.group_by_length):
                mb = tr.collate(mb_rows)
                lp, ent = policy_logps(tr.policy, mb, r.packing, with_entropy=False)
                total += float(micro_loss(lp, ent, mb, terms, norms)[0])
            t = torch.tensor(float(total), dtype=torch.float64, device=tr.acc.device)
            vals[key] = float(tr.acc.reduce(t, "sum"))
        return vals
