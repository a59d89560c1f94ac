"""ptlab against the real TRL 1.16.0 and verl 0.9.1 (their own loss, KL, aggregation, advantage and rollout
correction functions), float64, ragged masks with an empty row: every case of experiments/parity_table.py to
1e-12. `make setup` installs both libraries (Makefile); a missing or different version FAILS here, so CI runs
these comparisons instead of skipping them. Only with PTLAB_ALLOW_NO_PARITY_LIBS=1 (never set in CI) are
they skipped where the libraries are absent.
"""

import os
from importlib import metadata

import pytest
import torch

PINS = {"trl": "1.16.0", "verl": "0.9.1"}


def _require_libs():
    missing = []
    for name, version in PINS.items():
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{name}=={version} (not installed)")
            continue
        if got != version:
            missing.append(f"{name}=={version} (found {got})")
    if missing and os.environ.get("PTLAB_ALLOW_NO_PARITY_LIBS") == "1":
        pytest.skip(f"parity libraries absent: {missing}", allow_module_level=True)
    assert not missing, f"install the parity libraries with `make setup`: {missing}"


_require_libs()

from experiments import parity_table as pt  # noqa: E402  (after the check: it names what is missing)
from theory.estimator import KL_STYLES, preset  # noqa: E402


@pytest.mark.parametrize("case", pt.CASES, ids=[c[0] for c in pt.CASES])
def test_matches_the_library(case):
    name, trl_name, verl_name, run = case
    worst = max(run(pt.batch(seed)) for seed in (0, 1, 2))
    assert worst <= 1e-12, f"{name} vs TRL {trl_name!r} / verl {verl_name!r}: max difference {worst:.3e}"


def test_the_comparisons_can_fail():
    """Each knob the comparisons exercise changes the numbers by far more than 1e-12: a case that passed by
    ignoring an option would show up here."""
    trl_kl = dict(kl_coef=0.04, **KL_STYLES["trl"])
    wrong = [
        pt.trl_case(preset("grpo", **{**trl_kl, "kl_bias_correction": False}), "grpo", beta=0.04),
        pt.trl_case(preset("grpo", **{**trl_kl, "kl_aggregation": "global_token_mean"}), "grpo", beta=0.04),
        pt.trl_case(preset("grpo"), "grpo", beta=0.04),
        pt.trl_case(preset("grpo"), "grpo", ptlab_kw={"rollout_logp": None}, opsm=0.0),
        pt.trl_case(preset("grpo"), "grpo", opsm=0.05, sampling=True),
        pt.trl_case(preset("grpo"), "grpo", top_entropy=0.4),
        pt.trl_case(preset("grpo", mask="sapo"), "grpo"),
        pt.verl_case(preset("ppo", advantage="given", clamp_gradient="zero"), "vanilla", "token-mean"),
        pt.trl_case(preset("gspo"), "luspo", eps_low=3e-4, eps_high=4e-4, level="sequence"),
        pt.trl_case(preset("vespo", vespo_k_neg=2.0, vespo_k_pos=3.0), "vespo"),
        lambda b: pt._diff(pt._grad(pt.ptlab_loss(preset("vespo"), b), b["logp"]),   # the rollout weight matters
                           pt._grad(pt.trl_loss(b, "vespo", is_ratio=pt.trl_vllm_ratio(b, "token_truncate", None, 3.0),
                                                vllm_is=True), b["logp"])),
        pt.verl_case(preset("ppo", advantage="given", mask="dual_clip", kl_coef=0.01, **KL_STYLES["trl"]),
                     "vanilla", "token-mean", kl="low_var_kl", kl_coef=0.01),
        pt.verl_case(preset("ppo", advantage="given", mask="dual_clip", kl_coef=0.01, **KL_STYLES["verl"]),
                     "vanilla", "token-mean", kl="low_var_kl+", kl_coef=0.01),
    ]
    for i, run in enumerate(wrong):
        assert max(run(pt.batch(s)) for s in (0, 1, 2)) > 1e-6, f"comparison {i} cannot tell the options apart"


def test_trl_defaults_are_what_the_styles_say():
    """KL_STYLES['trl'] and the TRL presets follow TRL 1.16's own defaults, read from its config class."""
    from trl import GRPOConfig
    fields = GRPOConfig.__dataclass_fields__
    assert fields["use_bias_correction_kl"].default is True
    assert fields["sapo_temperature_pos"].default == preset("sapo").sapo_tau_pos
    assert fields["sapo_temperature_neg"].default == preset("sapo").sapo_tau_neg
    assert fields["vllm_importance_sampling_mode"].default == "sequence_mask"
    assert fields["vllm_importance_sampling_clip_max"].default == 3.0
    assert KL_STYLES["trl"]["kl_bias_correction"] is True


def test_verl_defaults_are_what_the_styles_say():
    from verl.trainer.config import AlgoConfig
    c = pt.verl_config("token-mean", True)
    assert (c.kl_loss_type, c.clip_ratio_c, c.tau_pos, c.tau_neg) == ("low_var_kl", 3.0, 1.0, 1.05)
    assert KL_STYLES["verl"]["kl_estimator"] == c.kl_loss_type
    algo = AlgoConfig()
    assert (algo.kl_penalty, algo.use_kl_in_reward) == ("kl", False)
    assert KL_STYLES["verl_in_reward"]["kl_estimator"] == "k1"   # verl's "kl" is k1


def test_verl_k3_cap_is_active_in_the_comparison():
    """low_var_kl's clamp at 10 is reached somewhere in the batches (so the cap is really compared)."""
    import verl.trainer.ppo.core_algos as ca
    b = pt.batch(0)
    far = b["ref"] - 14.0   # a reference policy far from the policy: k3 > 10 on every token
    k = ca.kl_penalty(b["logp"], far, "low_var_kl")
    assert float(k.max()) == 10.0
    v, _ = preset("grpo", kl_estimator="low_var_kl").kl_per_token(b["logp"], far)
    torch.testing.assert_close(v, k, rtol=0, atol=0)


def test_the_batches_reach_the_branches_compared():
    """Every batch has tokens where verl's dual clip acts, rows the off-policy mask drops (against pi_old and
    against the sampler), PPO-clipped tokens, an empty row, and rollout weights outside [0.5, 2]."""
    for seed in (0, 1, 2):
        b = pt.batch(seed)
        M, A = b["M"], b["A"][:, None]
        rho = torch.exp(b["logp"] - b["old"])
        assert bool(((rho > 3) & (A < 0) & M).any())
        assert bool(((rho > 1.2) & (A > 0) & M).any() or ((rho < 0.8) & (A < 0) & M).any())
        n = M.sum(-1).clamp(min=1)
        for base, delta in ((b["old"], 0.0), (b["roll"], 0.05)):
            kl = ((base - b["logp"]) * M).sum(-1) / n
            assert bool(((kl > delta) & (b["A"] < 0)).any())
        assert not bool(M.all(-1).all()) and bool((M.sum(-1) == 0).any())
        w = torch.exp(b["old"] - b["roll"])[M]
        assert bool(((w < 0.5) | (w > 2.0)).any())
