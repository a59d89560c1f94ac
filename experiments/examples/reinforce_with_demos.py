"""A method written outside ptlab's tree: REINFORCE with a leave-one-out baseline (the `rloo` preset) on
n sampled completions per prompt, plus the prompt's demonstration as an SFT row of weight
`method.options.demo_coef` (default 0.1). Use it with

    method:
      name: experiments.examples.reinforce_with_demos:ReinforceWithDemos
      options: {demo_coef: 0.1}

on data with prompt, answer and completion columns (e.g. runs/tiny/data/rl.jsonl of `toy.world`).
"""

from __future__ import annotations

from scale.loss import Row, Terms, sft_estimator
from scale.methods import Method
from scale.methods.rl import rl_preset, rollout_rows


class ReinforceWithDemos(Method):
    data = "demo"      # prompt, answer (for the reward) and a demonstration
    rollouts = True    # samples n completions per prompt: a reward function, the sampler, rollout metrics

    @classmethod
    def check(cls, cfg) -> None:
        coef = cfg.method.options.get("demo_coef", 0.1)
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0:
            raise ValueError(f"method.options.demo_coef: expected a number >= 0, got {coef!r}")
        if cfg.generation.n < 2:
            raise ValueError("generation.n: a leave-one-out baseline needs at least 2 samples per prompt")

    def terms(self, tr) -> Terms:
        return Terms(rl=rl_preset(self.cfg, "rloo"), sft=sft_estimator("global_token_mean"))

    def rows(self, tr, step, info):
        idx = tr.local_indices(step, len(tr.data), self.cfg.run.batch_size)
        exs = [tr.data[i] for i in idx]
        rows = rollout_rows(tr, exs, idx, step, info)   # n graded samples per prompt, with advantages
        coef = float(self.cfg.method.options.get("demo_coef", 0.1))
        for q, e in enumerate(exs):
            demo = e["completion"]
            rows.append(Row(list(demo["input_ids"]), demo["prompt_len"], "sft", weight=coef,
                            meta={"group": q, "offline": True}))
        return rows
