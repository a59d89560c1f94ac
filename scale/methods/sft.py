"""SFT: the token-level negative log-likelihood of demonstrations (TRL's SFTTrainer loss)."""

from __future__ import annotations

from scale.loss import Row, Terms, sft_estimator
from scale.methods import Method, register


def sft_rows(examples: list[dict], idx: list[int], weight: float = 1.0) -> list[Row]:
    """One `sft` row per example index: its prompt + completion, the completion scored."""
    return [Row(list(examples[i]["completion"]["input_ids"]), examples[i]["completion"]["prompt_len"], "sft",
                weight=weight) for i in idx]


@register("sft")
class SFT(Method):
    data = "sft"

    def terms(self, tr) -> Terms:
        return Terms(sft=sft_estimator(self.cfg.method.sft.aggregation))

    def rows(self, tr, step, info):
        return sft_rows(tr.data, tr.local_indices(step, len(tr.data), self.cfg.run.batch_size))
