"""The reference policy's log-probs: a frozen copy of the initial model, `model.ref_path`, or (LoRA) the
policy with its adapter disabled. DPO needs sequence log-probs of its pairs (computed per batch, or once
for the whole set with `method.dpo.precompute_ref`), the KL term per-token log-probs of the rollouts."""

from __future__ import annotations

import torch

from scale.logprobs import policy_logps
from scale.loss import collate


class Reference:
    def __init__(self, tr, model):
        """`model`: a frozen `scale.logprobs.Policy`, or None to disable the policy's LoRA adapter."""
        self.tr, self.model = tr, model

    @torch.no_grad()
    def token_logps(self, rows) -> list[torch.Tensor]:
        """Per-row token log-probs [T_i] of the scored tokens (float64, on the CPU)."""
        tr, out = self.tr, []
        r = tr.cfg.run
        B = max(1, r.batch_size // tr.P // r.grad_accum) * 2
        temp = tr.method.logprob_temperature
        for s in range(0, len(rows), B):
            chunk = rows[s:s + B]
            mb = collate(chunk, tr.tok.pad_token_id, tr.acc.device)
            kw = dict(temperature=temp, with_entropy=False)
            if self.model is None:
                with tr._model().disable_adapter():
                    lp, _ = policy_logps(tr.acc.unwrap_model(tr.policy), mb, r.packing, **kw)
            else:
                lp, _ = policy_logps(self.model, mb, r.packing, **kw)
            out += [lp[i, rw.prompt_len:len(rw.input_ids)].double().cpu() for i, rw in enumerate(chunk)]
        return out

    def fill_sequence_logps(self, rows) -> None:
        for rw, lp in zip(rows, self.token_logps(rows)):
            rw.ref_logp = float(lp.sum())

    def precompute(self, pref) -> None:   # pref: a scale.token_store.TokenData
        """Store each pair's reference log-probs in the examples, then free the reference model."""
        from scale.methods.dpo import pair_rows

        for i in range(len(pref)):
            rows = pair_rows(self.tr, [i], data=pref)
            pref.set_ref_logps(i, rows[0].ref_logp, rows[1].ref_logp)   # kept beside the mapped arrays
        self.model = None
