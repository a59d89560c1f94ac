"""ptlab's estimators against the installed TRL 1.16.0 and verl 0.9.1, in float64: the README's parity table.

    python -m experiments.parity_table      # prints the table (ptlab, TRL, verl, max |difference|)

Each case builds one ragged batch (two groups of four rows, one row with no valid token), runs ptlab and
the library's own function on it, and returns the largest absolute difference in the loss and in its
gradient with respect to the log-probs (or in the advantages / weights). tests/theory/test_parity_libs.py
asserts every case is below 1e-12.

TRL's loss lives in a method, `GRPOTrainer._compute_loss`; it is called unchanged on a stand-in object
that carries only the attributes that method reads and returns the batch's log-probs and entropies in
place of a model's forward pass (`TrlStandIn`). verl's functions are called directly. Where a library
computes a quantity outside a callable function (TRL's vLLM importance ratio, verl's `apply_kl_penalty`
on a DataProto), the case says which few lines the test writes itself.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch

from theory.estimator import KL_STYLES, preset

F64 = torch.float64
G, B, T = 4, 8, 6


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=0)
    old[0::2, 1] = logp[0::2, 1] - 1.5            # ratio e^1.5 > 3 on a token of the even rows: the dual clip acts
    old[1::2, 2] = (logp[1::2, 2] + 1.5).clamp(max=0)   # pi_old above pi on the odd rows: the off-policy mask acts
    ref = (logp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=0)
    # the sampler a little more confident than pi_old: the off-policy mask then drops some A < 0 rows
    roll = (old + 0.15 + 0.4 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=0)
    M = torch.rand(B, T, generator=g) > 0.3
    M[:, 0] = True
    M[1::2, 2] = True                              # the token the off-policy mask needs (below)
    M[3] = False                                   # a row with no valid token
    rewards = torch.tensor([1., 0, 1, 1, 0, 0, 1, 0], dtype=F64)
    # random magnitudes, signs fixed so that both A < 0 on even rows (dual clip) and on odd rows (mask) occur
    A = torch.randn(B, generator=g, dtype=F64).abs() * torch.tensor([-1., 1, -1, -1, 1, -1, 1, 1], dtype=F64)
    H = torch.rand(B, T, generator=g, dtype=F64) * 2
    return dict(logp=logp, old=old, ref=ref, roll=roll, M=M, rewards=rewards, A=A, H=H)


def _grad(fn, logp):
    x = logp.clone().requires_grad_()
    loss = fn(x)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


def _diff(a, b):
    (la, ga), (lb, gb) = a, b
    return max(float((la - lb).abs()), float((ga - gb).abs().max()))


def ptlab_loss(est, b, **kw):
    args = dict(old_logp=b["old"], advantages=b["A"], mask=b["M"], ref_logp=b["ref"], rollout_logp=b["roll"],
                entropy=b["H"])
    args.update(kw)
    return lambda x: est.loss(x, **args)


# ---------------------------------------------------------------------------------------------- TRL
class _OneProcess:
    """accelerate's collective calls on one process: identities."""
    num_processes, sync_gradients = 1, True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class TrlStandIn:
    """The attributes `GRPOTrainer._compute_loss` reads; the policy's forward pass is the given log-probs."""

    def __init__(self, logp, entropy, loss_type, beta=0.0, eps_low=0.2, eps_high=0.2, level="token",
                 max_completion_length=None, bias_correction=True, opsm=None, top_entropy=1.0, vllm_is=False):
        from trl.trainer.grpo_trainer import GRPOTrainer
        self._lp, self._H = logp, entropy
        self.get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask.__get__(self)
        self.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
        self.get_gamma_weights = GRPOTrainer.get_gamma_weights
        self.loss_type, self.beta, self.epsilon_low, self.epsilon_high = loss_type, beta, eps_low, eps_high
        self.importance_sampling_level, self.max_completion_length = level, max_completion_length
        self.off_policy_mask_threshold, self.top_entropy_quantile = opsm, top_entropy
        self.use_vllm = self.vllm_importance_sampling_correction = vllm_is
        self.args = SimpleNamespace(use_bias_correction_kl=bias_correction, delta=None, sapo_temperature_pos=1.0,
                                    sapo_temperature_neg=1.05, steps_per_generation=1, vespo_k_pos=2.0,
                                    vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0)
        self.accelerator, self.model = _OneProcess(), SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.aux_loss_enabled = self._entropy_bonus_enabled = False
        self._metrics = defaultdict(lambda: defaultdict(list))

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        return self._lp, self._H, None


def trl_loss(b, loss_type, is_ratio=None, sampling=False, **opts):
    from trl.trainer.grpo_trainer import GRPOTrainer

    def fn(x):
        Mi = b["M"].long()
        inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
                  "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": Mi,
                  "advantages": b["A"], "old_per_token_logps": b["old"], "ref_per_token_logps": b["ref"],
                  "num_items_in_batch": Mi.sum().to(F64)}
        if is_ratio is not None:
            inputs["importance_sampling_ratio"] = is_ratio
        if sampling:
            inputs["sampling_per_token_logps"] = b["roll"]
        return GRPOTrainer._compute_loss(TrlStandIn(x, b["H"], loss_type, **opts), None, inputs)
    return fn


def trl_vllm_ratio(b, mode, lo, hi):
    """TRL 1.16 `_generate_and_score_completions`' importance ratio exp(old - sampling), written here (that
    method needs a vLLM engine): per token or per sequence (sum over the row), clamped ('truncate') or zeroed
    outside [lo, hi] ('mask')."""
    d = (b["old"] - b["roll"]) * b["M"]
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    r = torch.exp(d)
    if mode.endswith("truncate"):
        return r.clamp(min=lo, max=hi)
    lo, hi = lo if lo is not None else -np.inf, hi if hi is not None else np.inf
    return r.masked_fill((r < lo) | (r > hi), 0.0)


def trl_case(ptlab_est, loss_type, ptlab_kw=None, **trl_opts):
    def run(b):
        return _diff(_grad(ptlab_loss(ptlab_est, b, **(ptlab_kw or {})), b["logp"]),
                     _grad(trl_loss(b, loss_type, **trl_opts), b["logp"]))
    return run


def trl_vllm_case(mode, lo, hi, name="grpo"):
    est = preset(name, rollout_correction=mode, rollout_is_min=lo, rollout_is_max=hi)

    def run(b):
        r = trl_vllm_ratio(b, mode, lo, hi)
        return _diff(_grad(ptlab_loss(est, b), b["logp"]), _grad(trl_loss(b, name, is_ratio=r, vllm_is=True),
                                                                 b["logp"]))
    return run


class TrlDpoStandIn:
    """The attributes `DPOTrainer._compute_loss` reads (sigmoid loss, reference log-probs precomputed); the model
    returns the batch's per-token log-probs (0 off the completion, as with labels -100) and zero statistics."""

    def __init__(self, beta):
        self.beta, self.loss_types, self.loss_weights = beta, ["sigmoid"], [1.0]
        self.ld_alpha, self.precompute_ref_logps, self.f_divergence_type = None, True, "reverse_kl"
        self.use_weighting = self.aux_loss_enabled = False
        self.label_smoothing, self._total_train_tokens, self._tp_size = 0.0, 0, 1
        self.accelerator, self.model = _OneProcess(), SimpleNamespace(training=True)
        self.accelerator.device = torch.device("cpu")
        self._metrics = defaultdict(lambda: defaultdict(list))


def dpo_case(beta=0.1):
    """TRL's DPO sigmoid loss against ptlab's DPO term (scale/loss.py `micro_loss`): P pairs, ragged."""
    def run(b):
        from trl.trainer.dpo_trainer import DPOTrainer

        from scale.loss import Terms, micro_loss
        P = B // 2
        M = b["M"].clone()
        M[3, 0] = True                         # every completion keeps a token (a DPO pair has two answers)
        ref_seq = (b["ref"] * M).sum(-1)
        order = [k for i in range(P) for k in (i, P + i)]   # TRL: [chosen..., rejected...]; ptlab: pairs

        def ptlab(x):
            mb = {"score_mask": M[order], "kind": ["chosen", "rejected"] * P, "ref_logp": ref_seq[order],
                  "weight": torch.ones(B, dtype=F64), "advantage": torch.zeros(B, dtype=F64), "old_logp": None,
                  "ref_token_logp": None}
            norms = {"pairs": float(P), "all_tokens": float(M.sum()), "rl_tokens": 0.0, "sft_tokens": 0.0}
            return micro_loss(x[order], torch.zeros(B, T, dtype=F64), mb, Terms(dpo_beta=beta), norms)[0]

        def trl(x):
            z = torch.zeros(B, T, dtype=F64)
            out = SimpleNamespace(log_probs=torch.where(M, x, z), entropy=z, mean_logits=z,
                                  is_top1=torch.zeros(B, T, dtype=torch.bool))
            inputs = {"input_ids": torch.zeros(B, T + 1, dtype=torch.long),
                      "attention_mask": torch.ones(B, T + 1, dtype=torch.long),
                      "completion_mask": torch.cat([torch.zeros(B, 1, dtype=torch.long), M.long()], 1),
                      "ref_chosen_logps": ref_seq[:P], "ref_rejected_logps": ref_seq[P:]}
            return DPOTrainer._compute_loss(TrlDpoStandIn(beta), lambda **kw: out, inputs, False)
        return _diff(_grad(ptlab, b["logp"]), _grad(trl, b["logp"]))
    return run


# ---------------------------------------------------------------------------------------------- verl
def _ca():
    import verl.trainer.ppo.core_algos as ca
    return ca


def verl_config(mode, count_empty_rows, **kw):
    from verl.workers.config import ActorConfig
    info = {"global_batch_size": B} if count_empty_rows else {}
    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False, ppo_mini_batch_size=2,
                       rollout_n=1, loss_agg_mode=mode, global_batch_info=info, **kw)


VERL_EPS = {"seq-mean-token-mean": 1e-8}   # agg_loss adds 1e-8 to each row's token count there
VERL_MODES = {"token_mean": "token-mean", "seq_mean_token_mean": "seq-mean-token-mean",
              "seq_mean_token_sum": "seq-mean-token-sum", "seq_mean_token_sum_norm": "seq-mean-token-sum-norm"}


def verl_policy_loss(b, name, mode, count_empty_rows=True, kl=None, kl_coef=0.0, is_weights=None, **cfg):
    """verl's registered policy loss `name`, plus (with `kl`) its actor KL term: kl_penalty, then agg_loss with
    the actor's loss_agg_mode, times kl_loss_coef (verl/workers/utils/losses.py's three lines)."""
    ca = _ca()
    c = verl_config(mode, count_empty_rows, **cfg)
    Mf = b["M"].to(F64)
    A = b["A"][:, None].expand(B, T)

    def fn(x):
        loss, _ = ca.get_policy_loss_fn(name)(b["old"], x, A, Mf, loss_agg_mode=mode, config=c,
                                               rollout_is_weights=is_weights)
        if kl is not None:
            kld = ca.kl_penalty(logprob=x, ref_logprob=b["ref"], kl_penalty=kl)
            loss = loss + ca.agg_loss(loss_mat=kld, loss_mask=Mf, loss_agg_mode=mode, **c.global_batch_info) * kl_coef
        return loss
    return fn


def verl_case(est, name, mode, count_empty_rows=True, **kw):
    def run(b):
        e = est.replace(count_empty_rows=count_empty_rows, seq_len_eps=VERL_EPS.get(mode, 0.0))
        return _diff(_grad(ptlab_loss(e, b), b["logp"]), _grad(verl_policy_loss(b, name, mode, count_empty_rows,
                                                                                   **kw), b["logp"]))
    return run


def verl_agg_case(agg, count_empty_rows):
    """agg_loss itself on a per-token loss -A * logp (its gradient is -A * agg weight)."""
    def run(b):
        ca = _ca()
        est = preset("reinforce", advantage="given", aggregation=agg, count_empty_rows=count_empty_rows,
                     max_length=T, seq_len_eps=VERL_EPS.get(VERL_MODES[agg], 0.0))
        info = {"global_batch_size": B} if count_empty_rows else {}
        extra = {"loss_scale_factor": T} if agg.endswith("_norm") else {}

        def ref(x):
            return ca.agg_loss(-b["A"][:, None] * x, b["M"].to(F64), VERL_MODES[agg], **info, **extra)
        return _diff(_grad(ptlab_loss(est, b), b["logp"]), _grad(ref, b["logp"]))
    return run


def verl_rollout_case(level, threshold, ptlab_mode, lo, hi):
    def run(b):
        ca = _ca()
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights
        Mf = b["M"].to(F64)
        w, _ = compute_rollout_correction_weights(b["old"] - b["roll"], Mf, rollout_is=level,
                                                  rollout_is_threshold=threshold)
        est = preset("ppo", advantage="given", mask="dual_clip", clamp_gradient="zero",
                     rollout_correction=ptlab_mode, rollout_is_min=lo, rollout_is_max=hi)
        del ca
        return _diff(_grad(ptlab_loss(est, b), b["logp"]),
                     _grad(verl_policy_loss(b, "vanilla", "token-mean", is_weights=w), b["logp"]))
    return run


def verl_advantage_case(ptlab_name, verl_fn, kl_in_reward=False, **kw):
    """Advantages per row (verl's are per token: read at each valid token; 0 on the empty row in both)."""
    def run(b):
        ca = _ca()
        Mf = b["M"].to(F64)
        idx = np.repeat(np.arange(B // G), G)
        scores = torch.zeros(B, T, dtype=F64)
        last = (b["M"].long().cumsum(-1).argmax(-1))
        scores[torch.arange(B), last] = b["rewards"] * b["M"].any(-1)
        est = preset("grpo", advantage=ptlab_name)
        rewards = b["rewards"] * b["M"].any(-1)
        if kl_in_reward:  # verl's apply_kl_penalty: token rewards minus beta * kl_penalty(old, ref) on valid tokens
            est = est.replace(kl_coef=0.1, **KL_STYLES["verl_in_reward"])
            scores = scores - 0.1 * ca.kl_penalty(b["old"], b["ref"], kl_penalty="kl") * Mf
            rewards = est.kl_rewards(rewards, b["old"], b["ref"], b["M"])
        got = est.advantages(rewards, G, lengths=Mf.sum(-1))
        want, _ = getattr(ca, verl_fn)(token_level_rewards=scores, response_mask=Mf, index=idx, **kw)
        return float(((got[:, None] - want) * Mf).abs().max())
    return run


def _cases():
    ptl = lambda name, **o: preset(name, **o)  # noqa: E731
    trl_kl = dict(kl_coef=0.04, **KL_STYLES["trl"])
    verl_kl = dict(kl_coef=0.01, **KL_STYLES["verl"])
    c = [
        ("grpo", "grpo", "", trl_case(ptl("grpo"), "grpo")),
        ("bnpo", "bnpo", "", trl_case(ptl("bnpo"), "bnpo")),
        ("dr_grpo (max_length=16)", "dr_grpo (max_completion_length=16)", "",
         trl_case(ptl("dr_grpo", max_length=16), "dr_grpo", max_completion_length=16)),
        ("dapo", "dapo", "", trl_case(ptl("dapo"), "dapo", eps_high=0.28)),
        ("cispo", "cispo (epsilon_high=5)", "", trl_case(ptl("cispo"), "cispo", eps_high=5.0)),
        ("gspo", "grpo, importance_sampling_level='sequence'", "",
         trl_case(ptl("gspo"), "grpo", eps_low=3e-4, eps_high=4e-4, level="sequence")),
        # TRL builds the temperatures with torch.where on Python floats: float32, so tau_neg = float32(1.05)
        ("sapo, sapo_tau_neg=float32(1.05)", "sapo", "",
         trl_case(ptl("sapo", sapo_tau_neg=float(np.float32(1.05))), "sapo")),
        ("luspo", "luspo, importance_sampling_level='sequence'", "",
         trl_case(ptl("luspo"), "luspo", eps_low=3e-4, eps_high=4e-4, level="sequence")),
        ("vespo", "vespo", "", trl_case(ptl("vespo"), "vespo")),
        ("grpo + KL_STYLES['trl'] (beta 0.04)", "grpo, beta=0.04 (use_bias_correction_kl=True)", "",
         trl_case(ptl("grpo", **trl_kl), "grpo", beta=0.04)),
        ("grpo + k3, policy aggregation, no bias correction", "grpo, beta=0.04, use_bias_correction_kl=False", "",
         trl_case(ptl("grpo", **{**trl_kl, "kl_bias_correction": False}), "grpo", beta=0.04,
                  bias_correction=False)),
        ("dapo + KL_STYLES['trl']", "dapo, beta=0.04", "", trl_case(ptl("dapo", **trl_kl), "dapo", beta=0.04,
                                                                   eps_high=0.28)),
        ("dr_grpo + KL_STYLES['trl']", "dr_grpo, beta=0.04", "",
         trl_case(ptl("dr_grpo", max_length=16, **trl_kl), "dr_grpo", beta=0.04, max_completion_length=16)),
        ("gspo + KL_STYLES['trl']", "grpo, sequence level, beta=0.04", "",
         trl_case(ptl("gspo", **trl_kl), "grpo", beta=0.04, eps_low=3e-4, eps_high=4e-4, level="sequence")),
        ("grpo, off_policy_mask_threshold=0", "off_policy_mask_threshold=0 (pi_old)", "",
         trl_case(ptl("grpo", off_policy_mask_threshold=0.0), "grpo", ptlab_kw={"rollout_logp": None}, opsm=0.0)),
        ("grpo, off_policy_mask_threshold=0.05, rollout_logp", "the same, vLLM sampling log-probs", "",
         trl_case(ptl("grpo", off_policy_mask_threshold=0.05), "grpo", opsm=0.05, sampling=True)),
        ("grpo, top_entropy_quantile=0.4", "top_entropy_quantile=0.4", "",
         trl_case(ptl("grpo", top_entropy_quantile=0.4), "grpo", top_entropy=0.4)),
        ("DPO term (scale/loss.py), beta 0.1", "DPOTrainer, loss_type='sigmoid', beta 0.1", "", dpo_case(0.1)),
    ]
    for mode, lo, hi in (("token_truncate", None, 3.0), ("token_mask", 0.5, 2.0), ("sequence_truncate", None, 3.0),
                         ("sequence_mask", None, 3.0)):
        c.append((f"grpo, rollout_correction='{mode}' [{lo}, {hi}]",
                  f"vllm_importance_sampling_mode='{mode}' (ratio: test-written)", "", trl_vllm_case(mode, lo, hi)))
    for mode, lo, hi in (("token_truncate", None, 3.0), ("token_mask", 0.5, 2.0)):
        c.append((f"vespo, rollout_correction='{mode}' [{lo}, {hi}]",
                  f"vespo, vllm_importance_sampling_mode='{mode}' (ratio: test-written)", "",
                  trl_vllm_case(mode, lo, hi, "vespo")))
    for agg, mode in VERL_MODES.items():
        for empty in (True, False):
            c.append((f"aggregation {agg}, count_empty_rows={empty}", "",
                      f"agg_loss '{mode}'" + ("" if empty else ", no global_batch_size"), verl_agg_case(agg, empty)))
    dual = ptl("ppo", advantage="given", mask="dual_clip", clamp_gradient="zero")
    c += [
        ("ppo, mask='dual_clip', clamp_gradient='zero'", "", "vanilla (default)",
         verl_case(dual, "vanilla", "token-mean", clip_ratio=0.2)),
        ("ppo, clamp_gradient='zero'", "", "vanilla, clip_ratio_c=1e9 (the dual clip never acts)",
         verl_case(ptl("ppo", clamp_gradient="zero"), "vanilla", "token-mean", clip_ratio_c=1e9)),
        ("gspo, sequence_log_ratio_max=10, clamp_gradient='zero'", "", "gspo",
         verl_case(ptl("gspo", advantage="given", sequence_log_ratio_max=10.0, clamp_gradient="zero"), "gspo",
                   "seq-mean-token-mean", clip_ratio_low=3e-4, clip_ratio_high=4e-4)),
        ("cispo (global token mean)", "", "cispo, token-mean",
         verl_case(ptl("cispo", advantage="given", aggregation="token_mean"), "cispo", "token-mean",
                   clip_ratio_low=1.0, clip_ratio_high=4.0)),
        ("sapo", "", "sapo", verl_case(ptl("sapo", advantage="given"), "sapo", "seq-mean-token-mean")),
        ("ppo dual clip + KL_STYLES['verl'] (coef 0.01)", "", "use_kl_loss, low_var_kl, coef 0.01",
         verl_case(dual.replace(**verl_kl), "vanilla", "token-mean", kl="low_var_kl", kl_coef=0.01)),
        ("ppo dual clip + k1 / k2 / low_var_kl KL, seq-mean-token-mean", "", "kl_loss_type k1 / k2 / low_var_kl",
         _all(*[verl_case(dual.replace(aggregation="seq_mean_token_mean", **{**verl_kl, "kl_estimator": k}),
                          "vanilla", "seq-mean-token-mean", kl=k, kl_coef=0.01)
                for k in ("k1", "k2", "low_var_kl")])),
        ("ppo dual clip + k1+ / k3+ / low_var_kl+ KL (straight-through)", "", "kl_loss_type k1+ / k3+ / low_var_kl+",
         _all(*[verl_case(dual.replace(**{**verl_kl, "kl_estimator": k if k != "k3+" else "low_var_kl+"}),
                          "vanilla", "token-mean", kl=k, kl_coef=0.01) for k in ("k1+", "k3+", "low_var_kl+")])),
        ("rollout_correction token_truncate, max 2", "", "rollout_is='token', threshold 2.0 (TIS)",
         verl_rollout_case("token", 2.0, "token_truncate", None, 2.0)),
        ("rollout_correction sequence_truncate, max 2", "", "rollout_is='sequence', threshold 2.0",
         verl_rollout_case("sequence", 2.0, "sequence_truncate", None, 2.0)),
        ("rollout_correction token_mask [0.5, 2]", "", "rollout_is='token', threshold '0.5_2.0' (IcePop)",
         verl_rollout_case("token", "0.5_2.0", "token_mask", 0.5, 2.0)),
        ("rollout_correction sequence_mask [0.5, 2]", "", "rollout_is='sequence', threshold '0.5_2.0'",
         verl_rollout_case("sequence", "0.5_2.0", "sequence_mask", 0.5, 2.0)),
        ("reinforce (given advantages)", "", "gpg, seq-mean-token-sum",
         verl_case(ptl("reinforce", advantage="given"), "gpg", "seq-mean-token-sum")),
        ("advantage group_norm", "", "grpo", verl_advantage_case("group_norm", "compute_grpo_outcome_advantage")),
        ("advantage group_mean", "", "grpo, norm_adv_by_std_in_grpo=False",
         verl_advantage_case("group_mean", "compute_grpo_outcome_advantage", norm_adv_by_std_in_grpo=False)),
        ("advantage rloo", "", "rloo", verl_advantage_case("rloo", "compute_rloo_outcome_advantage")),
        ("advantage group_center_token_whiten_verl", "", "reinforce_plus_plus_baseline",
         verl_advantage_case("group_center_token_whiten_verl",
                             "compute_reinforce_plus_plus_baseline_outcome_advantage")),
        ("group_norm after kl_rewards, KL_STYLES['verl_in_reward'] (0.1)", "", "use_kl_in_reward, kl_penalty 'kl'",
         verl_advantage_case("group_norm", "compute_grpo_outcome_advantage", kl_in_reward=True)),
    ]
    return c


def _all(*runs):
    return lambda b: max(r(b) for r in runs)


CASES = _cases()


def measure(seeds=(0, 1, 2)) -> list[tuple[str, str, str, float]]:
    out = []
    for ptlab_name, trl_name, verl_name, run in CASES:
        out.append((ptlab_name, trl_name, verl_name, max(run(batch(s)) for s in seeds)))
    return out


def main() -> None:
    import trl
    import verl
    print(f"TRL {trl.__version__}, verl {verl.__version__}, torch {torch.__version__}; float64, "
          f"B={B} rows in groups of {G}, T={T}, ragged, one empty row; seeds 0, 1, 2; max |difference| in loss "
          "and gradient (advantages for the advantage rows)\n")
    print("| ptlab | TRL 1.16.0 | verl 0.9.1 | max difference |")
    print("|---|---|---|---|")
    for p, t, v, d in measure():
        print(f"| {p} | {t or '-'} | {v or '-'} | {d:.1e} |")


if __name__ == "__main__":
    main()
