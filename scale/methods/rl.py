"""RL with verifiable rewards: n sampled completions per prompt, graded by the reward function, with
advantages and the policy-gradient loss of a `theory.estimator` preset (`method.rl.estimator`: grpo,
dr_grpo, dapo, gspo, ...). Several updates per generation batch (PPO mini-batches and epochs) reuse the
batch with its old log-probs. HPT and LUFFY / SRFT (`hpt.py`, `luffy.py`) are this method plus
demonstrations.
"""

from __future__ import annotations

import torch

from scale.loss import Row, Terms, rl_estimator
from scale.methods import Method, register

KL_KEYS = ("kl_coef", "kl_estimator", "kl_placement", "kl_aggregation", "kl_bias_correction")
# estimator options the trainer cannot feed: a quantile over the whole step
NOT_IN_TRAINER = {"top_entropy_quantile": 1.0}
SAMPLER_LOGPROBS = ("ptlab", "vllm")   # generation backends that record each sampled token's log-prob


def rl_preset(cfg, name: str, **fixed):
    """The estimator preset `name` with method.rl.estimator_options (and the method's own `fixed` options) and
    the method.rl.kl_* keys, in the trainer's aggregation (`scale.loss.rl_estimator`); errors name the config
    key."""
    from theory.estimator import PRESETS

    if name not in PRESETS:
        raise ValueError(f"method.rl.estimator: unknown preset {name!r}; valid: {sorted(PRESETS)}")
    opts = cfg.method.rl.estimator_options or {}
    clash = sorted(set(opts) & set(KL_KEYS))
    if clash:
        raise ValueError(f"method.rl.estimator_options: {clash} are set by method.rl.{clash[0]} and its kin "
                         "(method.rl.kl_*), not here")
    for key, off in NOT_IN_TRAINER.items():
        if key in opts and opts[key] != off:
            raise ValueError(f"method.rl.estimator_options: {key}={opts[key]!r} is not supported by the trainer "
                             "yet (it needs a quantile over the whole step); theory.estimator offers it")
    if opts.get("rollout_correction", "none") != "none" and cfg.generation.backend not in SAMPLER_LOGPROBS:
        raise ValueError(f"generation.backend: {cfg.generation.backend!r} does not record the sampled tokens' "
                         f"log-probs that method.rl.estimator_options rollout_correction needs; use one of "
                         f"{list(SAMPLER_LOGPROBS)}")
    try:
        est = rl_estimator(name, {**opts, **fixed}, cfg.generation.max_new_tokens)
    except (ValueError, TypeError) as e:
        raise ValueError(f"method.rl.estimator_options (preset {name!r}): {e}") from None
    o = cfg.method.rl
    try:
        return est.replace(**{k: getattr(o, k) for k in KL_KEYS})
    except (ValueError, TypeError) as e:
        raise ValueError(f"method.rl.{str(e).split(':')[0]}: {e}") from None


def kl_in_reward(tr, rows: list[Row], info: dict) -> list[float]:
    """verl's use_kl_in_reward: each row's reward minus kl_coef * the sum over its tokens of the KL estimate at
    the sampling policy's log-probs (the policy before this step's update) against the reference's. Logs the
    global token mean of that KL as `kl_reward`."""
    est = tr.terms.rl
    tr.fill_old_logps(rows)
    out, total, count = [], 0.0, 0.0
    for rw, ref in zip(rows, tr.reference.token_logps(rows)):
        old = torch.tensor(rw.old_logp, dtype=torch.float64)
        v, _ = est.kl_per_token(old, torch.as_tensor(ref, dtype=torch.float64).reshape(old.shape))
        out.append(rw.meta["reward"] - est.kl_coef * float(v.sum()))
        total, count = total + float(v.sum()), count + v.numel()
        rw.old_logp = None   # one update per batch stays on-policy (sg(logp)); several refill them in update()
    s = tr.acc.reduce(torch.tensor([total, count], dtype=torch.float64, device=tr.acc.device), "sum")
    info["kl_reward"] = float(s[0] / s[1].clamp(min=1))
    return out


def rollout_rows(tr, exs: list[dict], idx: list[int], step: int, info: dict, with_demo: bool = False) -> list[Row]:
    """Per prompt, its sampled completions (n, or n - 1 and its demonstration when `with_demo`) as `rl` /
    `demo` rows with rewards and advantages over the GLOBAL groups; reward, accuracy and length of the
    samples go into `info`, and with several reward functions each one's mean ("rewards/<name>/mean", over
    the completions it applies to, as TRL logs it). The reward functions get the examples' prompts and other
    columns (`tr.rewards`) and the completions' token ids."""
    n = tr.cfg.generation.n
    n_gen = n - 1 if with_demo else n
    comps = tr.generate([e["prompt_ids"] for e in exs], n_gen)
    texts = tr.tok.batch_decode(comps, skip_special_tokens=True)
    answers = [e["answer"] for e in exs for _ in range(n_gen)]
    parts: dict = {}
    rewards = tr.rewards(texts, answers, [i for i in idx for _ in range(n_gen)], f"step {step + 1}",
                         completion_ids=comps, parts=parts)
    # the sampler's log-probs: recorded only when the rollout correction reads them (Trainer, Generator)
    sampled_lp = tr.generator.rollout_logprobs or [None] * len(comps)
    rows: list[Row] = []
    for q, e in enumerate(exs):
        for k in range(n_gen):
            c = comps[q * n_gen + k]
            rows.append(Row(e["prompt_ids"] + c, len(e["prompt_ids"]), "rl", rollout_logp=sampled_lp[q * n_gen + k],
                            meta={"group": q, "reward": rewards[q * n_gen + k]}))
        if with_demo:
            rows.append(demo_row(tr, e, idx[q], step, group=q))
    acc = tr.acc
    est = tr.terms.rl
    shaped = kl_in_reward(tr, rows, info) if est.kl_coef > 0 and est.kl_placement == "reward" else \
        [rw.meta["reward"] for rw in rows]
    R_all = acc.gather(torch.tensor(shaped, dtype=torch.float64, device=acc.device))
    # completion lengths: verl's token-whitened advantage (group_center_token_whiten_verl) weighs by them
    L_all = acc.gather(torch.tensor([float(rw.n_scored) for rw in rows], dtype=torch.float64, device=acc.device))
    A_all = tr.terms.rl.advantages(R_all.cpu(), group_size=n, lengths=L_all.cpu())
    lo = acc.process_index * len(rows)
    for rw, a in zip(rows, A_all[lo:lo + len(rows)].tolist()):
        rw.advantage = a
    on = torch.tensor([rw.meta["reward"] for rw in rows if rw.kind == "rl"], dtype=torch.float64)
    lens = torch.tensor([float(rw.n_scored) for rw in rows if rw.kind == "rl"], dtype=torch.float64)
    s = acc.reduce(torch.stack([on.sum(), (on > 0.5).double().sum(), lens.sum(),
                                torch.tensor(float(len(on)), dtype=torch.float64)]).to(acc.device), "sum")
    info.update(reward=float(s[0] / s[3]), accuracy=float(s[1] / s[3]), response_length=float(s[2] / s[3]))
    if len(parts) > 1:
        sums = [x for vs in parts.values() for x in (sum(v for v in vs if v is not None),
                                                      sum(v is not None for v in vs))]
        s = acc.reduce(torch.tensor(sums, dtype=torch.float64, device=acc.device), "sum").tolist()
        info.update({f"rewards/{name}/mean": s[2 * j] / s[2 * j + 1] for j, name in enumerate(parts)
                     if s[2 * j + 1]})
    return rows


def demo_row(tr, e: dict, i: int, step: int, **meta) -> Row:
    """The example's demonstration as a `demo` row, graded by the reward like a rollout (meta: its reward)."""
    t = e["completion"]
    completion = list(t["input_ids"][t["prompt_len"]:])
    text = tr.tok.decode(completion, skip_special_tokens=True)
    reward = tr.rewards([text], [e["answer"]], [i], f"step {step + 1}", completion_ids=[completion])[0]
    return Row(list(t["input_ids"]), t["prompt_len"], "demo", meta={**meta, "reward": reward, "offline": True})


@register("rl")
class RL(Method):
    data = "rl"
    rollouts = True
    with_demo = False     # LUFFY / SRFT: the demonstration joins its prompt's group

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.generation.n < 2:
            raise ValueError(f"generation.n: method {cfg.method.name!r} needs at least 2 samples per prompt, "
                             f"got {cfg.generation.n}")

    def preset(self) -> str:
        return self.cfg.method.rl.estimator

    def needs_reference(self) -> bool:
        return self.cfg.method.rl.kl_coef > 0

    def terms(self, tr) -> Terms:
        o = self.cfg.method.rl
        return Terms(rl=rl_preset(self.cfg, self.preset()), entropy_coef=o.entropy_coef)

    def updates_per_step(self) -> int:
        return self.cfg.method.rl.mini_batches * self.cfg.method.rl.epochs

    def rows(self, tr, step, info):
        idx = tr.local_indices(step, len(tr.data), self.cfg.run.batch_size)
        exs = [tr.data[i] for i in idx]
        rows = self.select(tr, rollout_rows(tr, exs, idx, step, info, self.with_demo), exs, info, idx=idx, step=step)
        if tr.terms.rl.kl_coef and tr.terms.rl.kl_placement == "loss":
            for rw, lp in zip(rows, tr.reference.token_logps(rows)):
                rw.ref_token_logp = lp.tolist()
        return rows

    def select(self, tr, rows: list[Row], exs: list[dict], info: dict, idx=None, step: int = 0) -> list[Row]:
        """The rows that train (HPT's gate overrides this); all of them here. idx: the examples' data indices."""
        return rows

    def extra_norms(self, prompts: int, tr) -> dict | None:
        """Normalisers the global row counts do not give (HPT paper's), for `prompts` per process."""
        return None

    def update(self, tr, rows, info):
        per = self.cfg.run.batch_size // tr.P
        if self.updates_per_step() == 1:
            return tr.update(rows, self.extra_norms(per, tr))
        tr.fill_old_logps(rows)   # several updates on one generation batch: mini-batches of prompts
        k = self.cfg.method.rl.mini_batches
        per //= k
        metrics = {}
        for _ in range(self.cfg.method.rl.epochs):
            for j in range(k):
                sub = [rw for rw in rows if j * per <= rw.meta["group"] < (j + 1) * per]
                metrics = tr.update(sub, self.extra_norms(per, tr))
        return metrics
