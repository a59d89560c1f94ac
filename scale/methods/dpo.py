"""DPO: -log sigmoid(beta * margin) over preference pairs, against a frozen reference (TRL's sigmoid loss)."""

from __future__ import annotations

from scale.loss import Row, Terms
from scale.methods import Method, register


def pair_rows(tr, idx: list[int], weight: float = 1.0, data: list[dict] | None = None) -> list[Row]:
    """A `chosen` and a `rejected` row per pair index (adjacent), each with its sequence log-prob under the
    reference: precomputed in the data (`ref_*_logp`), else computed now by `tr.reference`."""
    data = tr.pref if data is None else data
    rows = []
    for i in idx:
        ex = data[i]
        for kind in ("chosen", "rejected"):
            t = ex[kind]
            rows.append(Row(list(t["input_ids"]), t["prompt_len"], kind, weight=weight,
                            ref_logp=ex.get(f"ref_{kind}_logp", 0.0), meta={"ex": i}))
    if idx and "ref_chosen_logp" not in data[idx[0]]:
        tr.reference.fill_sequence_logps(rows)
    return rows


@register("dpo")
class DPO(Method):
    data = "dpo"

    def needs_reference(self) -> bool:
        return True

    def terms(self, tr) -> Terms:
        return Terms(dpo_beta=self.cfg.method.dpo.beta)

    def rows(self, tr, step, info):
        return pair_rows(tr, tr.local_indices(step, len(tr.pref), self.cfg.run.batch_size))
