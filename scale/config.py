"""The training config: a typed, nested dataclass schema, loaded from YAML plus `key=value` overrides.

    cfg = load_config("experiments/configs/tiny_hpt_paper.yaml", ["run.max_steps=4", "method.hpt.gamma=0.25"])

Sections: `model`, `data`, `method` (its `name` and one option block per method family), `generation`
and `run`. Every key is checked against the schema and every value against its type before anything
heavy happens, so a typo (`run.max_step`) or a wrong type (`run.lr=fast`) fails at once with the key
named. Every numeric key has a range in `RANGES` (floats must also be finite), checked by `check_ranges`;
semantic checks across keys (e.g. batch divisibility) are in `Config.validate`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULES = ("sequential", "mix", "alright", "maxright")   # method.joint.schedule


@dataclass
class LoraConfig:
    enabled: bool = False         # train LoRA adapters instead of all weights (peft)
    r: int = 8                    # LoRA rank
    alpha: int = 16               # LoRA scaling alpha
    dropout: float = 0.0          # LoRA dropout
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])   # module names that get adapters


@dataclass
class ModelConfig:
    path: str = ""                    # local Hugging Face folder or hub name
    dtype: str = "auto"               # auto (bf16 where supported, else fp32) | float32 | bfloat16 | float16 | float64
    gradient_checkpointing: bool = False   # recompute activations in the backward (less memory, more time)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ref_path: str = ""                # reference model for DPO / KL; "" = a frozen copy of the initial model


@dataclass
class DataConfig:
    path: str = ""                    # JSONL / JSON / parquet file, or a local dataset folder
    pref_path: str = ""               # sft_dpo only: preference data when it is a separate set ("" = `path`)
    split: str = "train"          # split of a dataset folder (train.jsonl, test.parquet, ...)
    columns: dict[str, str] = field(default_factory=dict)   # ptlab name -> source column (dotted for nested)
    prompt_template: str = "{prompt}"  # applied to string prompts, e.g. "User: {prompt}\nAssistant: "
    chat_template: bool = False       # wrap string prompts as one user message and apply the tokenizer's template
    max_prompt_length: int = 512      # a longer prompt is an error (named), not silently truncated
    max_length: int = 1024            # prompt + completion; completions are truncated to fit
    limit: int = 0                    # use the first `limit` rows (0: all)
    pref_limit: int = 0               # the same for pref_path
    pref_columns: dict[str, str] = field(default_factory=dict)   # the same for pref_path
    shuffle: bool = True          # shuffle the examples every epoch (seeded by run.seed)
    cache_dir: str = ""               # token cache folder ("" = $PTLAB_DATA_CACHE or ~/.cache/ptlab/tokens)


@dataclass
class GenerationConfig:
    backend: str = "hf"               # hf (model.generate) | ptlab (scale/sampling.py, same sampling) | vllm
    n: int = 8                        # samples per prompt (the group size)
    temperature: float = 1.0          # also divides the logits of the training log-probs
    top_p: float = 1.0            # nucleus sampling mass (1: no cut)
    top_k: int = 0                    # 0: no top-k cut (transformers' generate would default to 50)
    max_new_tokens: int = 256     # completion budget of rollouts and evaluation (TRL's max_completion_length)
    vllm_gpu_memory_utilization: float = 0.3   # vllm backend: share of GPU memory for vLLM
    vllm_sleep: bool = True           # vllm backend: free vLLM's weights and KV cache while training


@dataclass
class SftOptions:
    aggregation: str = "global_token_mean"   # global_token_mean (TRL) | seq_mean_token_mean (per-demo mean)


@dataclass
class DpoOptions:
    beta: float = 0.1             # DPO's inverse temperature
    precompute_ref: bool = False      # compute the reference log-probs once, then free the reference model


@dataclass
class RlOptions:
    estimator: str = "grpo"           # any theory.estimator preset
    estimator_options: dict[str, Any] = field(default_factory=dict)   # preset field overrides, e.g. {eps_high: 0.28}
    reward: str | list[str] = "math"  # math | exact | module:function, or a list of them (summed with weights)
    reward_weights: list[float] = field(default_factory=list)   # one per reward (TRL's); [] = all 1
    entropy_coef: float = 0.0         # loss -= entropy_coef * (global token-mean entropy)
    kl_coef: float = 0.0              # beta of the KL to the reference model (0: none, no reference loaded)
    kl_estimator: str = "k3"          # k1 | k2 | k3 | low_var_kl (k3 capped at 10 per token, verl's)
    kl_placement: str = "loss"        # loss: + beta * KL in the loss | reward: R - beta * sum_t KL (verl in-reward)
    kl_aggregation: str = "global_token_mean"   # or policy: the RL loss's own aggregation (TRL, verl)
    kl_bias_correction: bool = False  # TRL: per-token KL times the ratio pi_theta / pi_old
    mini_batches: int = 1             # optimizer steps per generation batch (PPO mini-batches)
    epochs: int = 1                   # passes over each generation batch (PPO epochs)


@dataclass
class HptOptions:
    variant: str = "paper"            # paper (Eq. 9-13, preset hpt_paper) | code (released code, preset hpt_code)
    gamma: float = 0.0                # gate threshold on the rollout accuracy P: SFT iff P <= gamma
    switch_gate: int = -1             # code variant: SFT iff (number correct) <= switch_gate; -1: round(gamma * n)
    gate_mode: str = "switch"         # switch | smooth [ours]
    gate_temperature: float = 0.05   # smooth gate: temperature of its sigmoid
    sft_coef: float = 1.0             # the code's sft_loss_coef (0.3 for Qwen2.5-Math-1.5B)
    offline: str = "sft"              # what a gated prompt's demonstration trains (HPT Table 5): sft (HPT) |
    #                                   off_policy (OFF/ON: LUFFY's shaped off-policy term, A = its reward) |
    #                                   sft_off_policy (Mix/ON: sft_coef x SFT + off_coef x off-policy; 0.1 : 1)
    off_coef: float = 1.0             # weight of the off-policy demonstration term (the code's off_loss_coef)


@dataclass
class JointOptions:
    schedule: str = "mix"             # sequential | mix | alright | maxright
    lam: float = 0.5                  # DPO weight (XRIGHT's lambda)
    order: list[str] = field(default_factory=lambda: ["sft", "dpo"])   # sequential
    split: float = 0.5                # sequential: fraction of max_steps for the first stage
    reset_optimizer: bool = True      # sequential: fresh optimizer state at each stage (the code's separate runs)
    f_star_sft: float = 0.0           # maxright: optimum values (0 if unknown, as the XRIGHT README says)
    f_star_dpo: float = 0.0       # maxright: optimum of f_dpo (0 if unknown)
    k: int = 1                        # maxright: refresh both values every k steps (the code: 10)
    seed: int = 0                     # alright
    dpo_batch_size: int = 0           # pairs per step when it differs from run.batch_size (0: the same)


@dataclass
class MethodConfig:
    name: str = "sft"                 # a method of scale/methods/ (`ptlab train --help` lists them) or module:Class
    options: dict[str, Any] = field(default_factory=dict)   # a user's own method's options (free-form)
    sft: SftOptions = field(default_factory=SftOptions)
    dpo: DpoOptions = field(default_factory=DpoOptions)
    rl: RlOptions = field(default_factory=RlOptions)
    hpt: HptOptions = field(default_factory=HptOptions)
    joint: JointOptions = field(default_factory=JointOptions)


@dataclass
class RunConfig:
    output_dir: str = "runs/ptlab"   # the run's folder: one run per folder (scale/rundir.py)
    seed: int = 0                 # seed of data order, sampling and initialisation of random draws
    max_steps: int = 10               # optimizer steps (RL: generation batches)
    batch_size: int = 8               # GLOBAL per step: prompts (RL family), examples (sft), pairs (dpo)
    grad_accum: int = 1               # micro-batches per process per optimizer step
    lr: float = 1e-5              # peak learning rate (AdamW)
    weight_decay: float = 0.0     # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])   # AdamW betas
    lr_scheduler: str = "constant"    # constant | linear | cosine
    warmup_ratio: float = 0.0     # share of the optimizer updates spent in linear warm-up
    max_grad_norm: float = 1.0        # clip; 0 disables
    skip_grad_norm: float = 0.0       # skip the update when the norm exceeds this (HPT code: 80); 0 disables
    mixed_precision: str = "no"       # no | bf16 | fp16 (accelerate autocast)
    cpu: bool = False             # run on CPU even when a GPU is present
    threads: int = 0                  # CPU threads per process (torch.set_num_threads); 0: torch's default
    logprob_chunk: int = 0            # completion tokens per lm_head chunk; 0: from logprob_memory_mb
    logprob_memory_mb: float = 512    # the head's working memory: chunk = this / (3 x V x 4 bytes), at least 1
    #                                   (5 x V x 4 with an entropy bonus; README, "The log-prob head")
    entropy_every: int = 1            # compute and log the token entropy every k steps (an entropy bonus:
    #                                   every step); k > 1 saves the head that work on the other steps
    group_by_length: bool = False     # sort a step's rows by length before splitting them into micro-batches
    #                                   (less padding; the same loss and gradient: losses use global counts)
    padding_free: bool = False        # each micro-batch as one packed row, position ids restarting per example
    #                                   (no pad tokens at all; needs a model whose attention follows position ids)
    share_prefix: bool = False        # with padding_free: rows that start with the same context (an RL prompt's
    #                                   samples, a DPO pair) hold it once in the packed row (scale.logprobs)
    fused_mlp: bool = False           # gated SiLU MLPs keep 2 of their 4 [tokens, intermediate] activations for
    #                                   the backward and recompute the rest (scale.mlp; the same gradients)
    skip_zero_advantage: bool = False  # RL samples whose advantage is exactly 0 skip the forward and backward:
    #                                   their gradient is exactly 0 (refused where a KL or entropy term acts on them)
    save_every: int = 100             # checkpoint every k steps (0: only at the end and on SIGTERM / SIGINT)
    resume: bool | str = False        # false: a new run | true: continue from the newest checkpoint | auto: either
    overwrite: bool = False           # a new run may replace another run's files in output_dir (removed first)
    stop_after: int = 0               # stop after this many steps as if interrupted (tests); 0 disables
    log_every: int = 1            # write metrics.jsonl every k steps (eval and last steps always)
    progress: bool = True         # show a progress bar
    tensorboard: bool = True          # when tensorboard is installed
    report_to: list[str] = field(default_factory=list)   # more trackers through accelerate: wandb, trackio, mlflow, ...
    save_model: bool = True           # save the final model (save_pretrained) into output_dir/final

    @property
    def packing(self) -> str:
        """The micro-batch layout scale.logprobs.policy_logps takes: none | rows | prefix."""
        return "prefix" if self.share_prefix else "rows" if self.padding_free else "none"


RULES = ("full", "target_only", "global_subset", "blockwise_subset", "layerwise_subset", "projection")
GROUPINGS = ("layer", "sublayer", "block", "global", "custom")
SELECTIONS = ("topk", "released", "negative_filtering", "random")
SCORINGS = ("exact", "ghost", "matrix", "sketched", "auto")
SUBSET_MODES = ("one_pass", "two_pass")
PROJECTION_SETS = ("hull", "cone", "span", "gem", "agem", "subset", "point")
DEFAULT_GROUPS = {"global_subset": "global", "blockwise_subset": "block", "layerwise_subset": "layer",
                  "projection": "layer"}


@dataclass
class DataRegConfig:
    """The options of a data-regularised update (the ``datareg:`` config section mirrors these)."""

    update_rule: str = "full"        # full | target_only | {global,blockwise,layerwise}_subset | projection
    k: int = 0                       # samples kept per group; 0: floor(fraction * n)
    fraction: float = 0.5         # samples kept per group when k = 0: floor(fraction * n)
    selection: str = "topk"          # topk (exact lmo) | released (top-k of raw scores) | negative_filtering | random
    filter_frac: float = 1.0         # negative_filtering: drop this fraction of the negative-score samples
    groups: str = ""                 # "" (from the rule) | layer | sublayer | block | global | custom
    custom_groups: list[list[str]] = field(default_factory=list)   # lists of fnmatch patterns over hooked module names
    subset_mode: str = "one_pass"    # one_pass | two_pass (GREATS: score, then a pass on the subset alone)
    scoring: str = "exact"           # exact (cheaper of ghost / matrix) | ghost | matrix | sketched | auto
    sketch_rank: int = 64         # sketched scoring: rank of the random sketch
    projection_set: str = "hull"     # projection rule: hull | cone | span | gem | agem | subset | point
    seed: int = 0                 # seed of the random selection and sketches

    def validate(self) -> DataRegConfig:
        for key, allowed in (("update_rule", RULES), ("selection", SELECTIONS), ("scoring", SCORINGS),
                             ("subset_mode", SUBSET_MODES), ("projection_set", PROJECTION_SETS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"datareg.{key}: expected one of {allowed}, got {getattr(self, key)!r}")
        if self.groups not in ("",) + GROUPINGS:
            raise ValueError(f"datareg.groups: expected one of {GROUPINGS} (or empty), got {self.groups!r}")
        if self.groups == "custom" and not self.custom_groups:
            raise ValueError("datareg.custom_groups: groups=custom needs at least one list of module patterns")
        check_ranges(self, "datareg.")
        if self.subset_mode == "two_pass" and self.update_rule != "global_subset":
            raise ValueError("datareg.subset_mode: two_pass is the GREATS rule and needs update_rule=global_subset")
        return self

    @property
    def grouping(self) -> str:
        return self.groups or DEFAULT_GROUPS.get(self.update_rule, "layer")

    def k_for(self, n: int) -> int:
        k = self.k if self.k else max(1, int(math.floor(self.fraction * n)))
        if k > n:
            raise ValueError(f"datareg.k: {k} is larger than the general batch of {n} samples")
        return k


@dataclass
class DataregConfig(DataRegConfig):
    """The `datareg:` section: a DataRegConfig (scale/datareg.py's options) plus where the target comes from."""

    target: str = "file"              # file (target_path, cycled) | batch (the batch's own gradient)
    target_path: str = ""         # target: file: the JSONL of target examples (prompt, completion)
    target_batch_size: int = 1        # target examples (RL targets: prompts) per step (the released SFT code: 1)
    target_size: int = 0              # 0: every example of target_path; n: n of them drawn by run.seed (n_val)
    merged_target: bool = False       # append the target rows to the general batch: one forward and backward
    target_loss: str = "nll"          # nll (target completions' token-mean NLL) | RL methods, on rollouts of the
    #                                   target prompts: reward | pg | train_loss (scale/datareg_hook.py)


EVAL_KINDS = ("generate", "sft", "dpo")
TARGET_LOSSES = ("nll", "reward", "pg", "train_loss")


@dataclass
class EvalSet:
    name: str = ""                    # metrics are logged as eval/<name>/<metric>
    path: str = ""                    # JSONL / parquet / folder
    kind: str = "generate"            # generate (prompt, answer) | sft (prompt, completion) |
    #                                   dpo (prompt, chosen, rejected)
    limit: int = 0                    # first `limit` rows (0: all)
    every: int = -1                   # this set's own interval (-1: eval.every; 0: only at the end), e.g.
    #                                   a small probe set evaluated more often than the full test set
    reward: str = ""                  # generate sets: this set's own reward ("": eval.reward), e.g. a
    #                                   task metric that grades the style of an answer, not only its value


@dataclass
class EvalConfig:
    """Held-out evaluation inside the trainer (scale/heldout.py): every `every` steps and at the end."""

    sets: list[EvalSet] = field(default_factory=list)   # held-out sets (name, path, kind, limit)
    every: int = 0                    # 0: only at the end
    at_start: bool = True             # also evaluate the initial model, logged as step 0
    n: int = 8                        # samples per prompt (generate sets), drawn with the generation: settings
    ks: list[int] = field(default_factory=list)   # pass@k values (empty: powers of two up to n)
    greedy: bool = True               # also greedy accuracy (one decode per prompt)
    max_new_tokens: int = 0           # 0: generation.max_new_tokens
    batch_size: int = 64              # prompts per generate call / rows per forward
    reward: str = ""                  # "" = method.rl.reward (and its reward_weights)
    records: bool = True              # per-prompt correct counts to eval_records.jsonl

    def validate(self) -> EvalConfig:
        names = [s.name for s in self.sets]
        for i, s in enumerate(self.sets):
            if not s.name or "/" in s.name:
                raise ValueError(f"eval.sets[{i}].name: expected a non-empty name without '/', got {s.name!r}")
            if not s.path:
                raise ValueError(f"eval.sets[{i}].path: required (a JSONL / parquet file or a dataset folder)")
            _choice(f"eval.sets[{i}].kind", s.kind, EVAL_KINDS)
        if len(set(names)) != len(names):
            raise ValueError(f"eval.sets: names must be distinct, got {names}")
        check_ranges(self, "eval.")
        if any(not 1 <= k <= self.n for k in self.ks):
            raise ValueError(f"eval.ks: expected values in 1..eval.n={self.n}, got {self.ks}")
        return self


# ------------------------------------------------------------------------------------------ ranges
@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: an interval, closed unless `lo_open` / `hi_open`."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def describe(self, integer: bool) -> str:
        noun = "an integer" if integer else "a number"
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo == -math.inf and self.hi == math.inf:
            return noun if integer else "a finite number"
        if self.hi == math.inf:
            return f"{noun if integer else 'a finite number'} {'>' if self.lo_open else '>='} {lo}"
        return f"{noun} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


def _num(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) else f"{x:g}"


FINITE = Range()
POSITIVE = Range(0, lo_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
UNIT = Range(0, 1)                        # [0, 1]
UNIT_HALF_OPEN = Range(0, 1, hi_open=True)   # [0, 1)
FRACTION = Range(0, 1, lo_open=True)      # (0, 1]
SEED = Range(0, 2**31 - 1)                # numpy takes seeds < 2**32; a process index is added to it

# Every int / float / list-of-numbers field of the schema, by class (a subclass inherits its base's entries);
# tests/scale/test_bad_configs.py checks that none is missing.
RANGES: dict[type, dict[str, Range]] = {
    LoraConfig: {"r": AT_LEAST_1, "alpha": AT_LEAST_1, "dropout": UNIT_HALF_OPEN},
    DataConfig: {"max_prompt_length": AT_LEAST_1, "max_length": Range(2),  # a prompt token + a completion token
                 "limit": NON_NEGATIVE, "pref_limit": NON_NEGATIVE},
    GenerationConfig: {"n": AT_LEAST_1, "temperature": POSITIVE, "top_p": FRACTION, "top_k": NON_NEGATIVE,
                       "max_new_tokens": AT_LEAST_1, "vllm_gpu_memory_utilization": FRACTION},
    DpoOptions: {"beta": POSITIVE},
    RlOptions: {"entropy_coef": FINITE,   # negative: an entropy penalty
                "reward_weights": FINITE,   # negative: a penalty
                "kl_coef": NON_NEGATIVE, "mini_batches": AT_LEAST_1, "epochs": AT_LEAST_1},
    HptOptions: {"gamma": UNIT, "switch_gate": Range(-1), "gate_temperature": POSITIVE, "sft_coef": NON_NEGATIVE,
                 "off_coef": NON_NEGATIVE},
    JointOptions: {"lam": UNIT, "split": UNIT, "f_star_sft": FINITE, "f_star_dpo": FINITE, "k": AT_LEAST_1,
                   "seed": SEED, "dpo_batch_size": NON_NEGATIVE},
    RunConfig: {"seed": SEED, "max_steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1,
                "lr": POSITIVE, "weight_decay": NON_NEGATIVE, "betas": UNIT_HALF_OPEN, "warmup_ratio": UNIT_HALF_OPEN,
                "max_grad_norm": NON_NEGATIVE, "skip_grad_norm": NON_NEGATIVE, "logprob_chunk": NON_NEGATIVE,
                "logprob_memory_mb": POSITIVE, "entropy_every": AT_LEAST_1,
                "save_every": NON_NEGATIVE, "stop_after": NON_NEGATIVE, "log_every": AT_LEAST_1,
                "threads": NON_NEGATIVE},
    DataRegConfig: {"k": NON_NEGATIVE, "fraction": FRACTION, "filter_frac": UNIT, "sketch_rank": AT_LEAST_1,
                    "seed": SEED},
    DataregConfig: {"target_batch_size": AT_LEAST_1, "target_size": NON_NEGATIVE},
    EvalSet: {"limit": NON_NEGATIVE, "every": Range(-1)},
    EvalConfig: {"every": NON_NEGATIVE, "n": AT_LEAST_1, "ks": AT_LEAST_1, "max_new_tokens": NON_NEGATIVE,
                 "batch_size": AT_LEAST_1},
}


def numeric_type(tp) -> type | None:
    """int or float for a numeric field (list[int] / list[float]: its items), else None."""
    if typing.get_origin(tp) is list:
        tp = typing.get_args(tp)[0]
    return tp if tp in (int, float) else None


def ranges_of(cls) -> dict[str, Range]:
    out: dict[str, Range] = {}
    for base in reversed(cls.__mro__):
        out.update(RANGES.get(base, {}))
    return out


def check_ranges(obj, prefix: str = "") -> None:
    """Type, finiteness and range of every numeric field of the dataclass `obj`, its sections and lists of
    sections included (ValueError naming the key). Objects built in Python are checked as strictly as YAML."""
    hints, ranges = typing.get_type_hints(type(obj)), ranges_of(type(obj))
    for f in dataclasses.fields(obj):
        key, v = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            check_ranges(v, key + ".")
        elif isinstance(v, list) and v and all(dataclasses.is_dataclass(x) for x in v):
            for i, x in enumerate(v):
                check_ranges(x, f"{key}[{i}].")
        elif (tp := numeric_type(hints[f.name])) is not None:
            if isinstance(v, list):
                for i, x in enumerate(v):
                    _check_number(f"{key}[{i}]", x, tp, ranges[f.name])
            else:
                _check_number(key, v, tp, ranges[f.name])


def _check_number(key: str, v, tp: type, rng: Range) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral if tp is int else numbers.Real):
        ok = False
    else:
        ok = (tp is int or math.isfinite(v)) and v in rng
    if not ok:
        raise ValueError(f"{key}: expected {rng.describe(tp is int)}, got {v!r}")


def check_template(key: str, template: str, names: tuple[str, ...]) -> None:
    """A str.format template uses exactly the placeholders `names` (each at least once, nothing else)."""
    braces = "write {{ and }} for literal braces"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # a stray brace
        raise ValueError(f"{key}: not a valid template ({e}); {braces}") from None
    unknown = [f for f in fields if f not in names]
    if unknown:
        raise ValueError(f"{key}: unknown placeholder {{{unknown[0]}}} in {template!r}; the only placeholder is "
                         f"{{{names[0]}}} ({braces})")
    for n in names:
        if n not in fields:
            raise ValueError(f"{key}: {template!r} lacks the placeholder {{{n}}}, so the {n} would be dropped")
    try:
        template.format(**dict.fromkeys(names, ""))
    except (ValueError, TypeError) as e:  # a bad conversion or format spec, e.g. {prompt:d}
        raise ValueError(f"{key}: not a valid template ({e})") from None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    datareg: DataregConfig = field(default_factory=DataregConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Every key's type and range (`check_ranges`), then the checks across keys; each error names the key."""
        check_ranges(self)
        self._check_choices()
        self._check_text()
        m, r, g = self.method, self.run, self.generation
        if g.top_k and g.backend == "ptlab":
            raise ValueError("generation.top_k: the ptlab sampler has no top-k; use backend hf or top_k=0")
        if r.batch_size % m.rl.mini_batches:
            raise ValueError(f"method.rl.mini_batches: must divide run.batch_size={r.batch_size}, "
                             f"got {m.rl.mini_batches}")
        if len(r.betas) != 2:
            raise ValueError(f"run.betas: expected two numbers, got {r.betas}")
        if self.model.lora.enabled and not self.model.lora.target_modules:
            raise ValueError("model.lora.target_modules: LoRA needs at least one module name")
        _validate_datareg(self)
        if r.share_prefix and not r.padding_free:
            raise ValueError("run.share_prefix: packs shared prefixes into padding-free rows; "
                             "set run.padding_free=true")
        if self.datareg.update_rule != "full":
            for key in ("group_by_length", "padding_free", "skip_zero_advantage"):
                if getattr(r, key):
                    raise ValueError(f"run.{key}: not available with datareg.update_rule={self.datareg.update_rule}, "
                                     "which scores and selects samples within each micro-batch with its own forward")
        self.eval.validate()
        return self

    def _check_choices(self) -> None:
        m, g, r = self.method, self.generation, self.run
        from scale.methods import get_method

        get_method(m.name).check(self)  # an unknown name fails naming method.name; then the method's own keys
        _choice("method.sft.aggregation", m.sft.aggregation, ("global_token_mean", "seq_mean_token_mean"))
        from theory.estimator import KL_AGGREGATIONS, KL_ESTIMATORS, KL_PLACEMENTS
        _choice("method.rl.kl_estimator", m.rl.kl_estimator, KL_ESTIMATORS)
        _choice("method.rl.kl_placement", m.rl.kl_placement, KL_PLACEMENTS)
        _choice("method.rl.kl_aggregation", m.rl.kl_aggregation, KL_AGGREGATIONS)
        _choice("method.hpt.variant", m.hpt.variant, ("paper", "code"))
        _choice("method.hpt.gate_mode", m.hpt.gate_mode, ("switch", "smooth"))
        _choice("method.hpt.offline", m.hpt.offline, ("sft", "off_policy", "sft_off_policy"))
        _choice("method.joint.schedule", m.joint.schedule, SCHEDULES)
        _choice("generation.backend", g.backend, ("hf", "ptlab", "vllm"))
        _choice("model.dtype", self.model.dtype, ("auto", "float32", "bfloat16", "float16", "float64"))
        _choice("run.lr_scheduler", r.lr_scheduler, ("constant", "linear", "cosine"))
        if r.resume not in (True, False, "auto"):
            raise ValueError(f"run.resume: expected true, false or auto, got {r.resume!r}")
        _choice("run.mixed_precision", r.mixed_precision, ("no", "bf16", "fp16"))

    def _check_text(self) -> None:
        """Required paths, and the prompt template's placeholders (a KeyError at formatting time otherwise)."""
        for key, v, what in (("model.path", self.model.path, "a local model folder or a hub name"),
                             ("data.path", self.data.path, "a JSONL / parquet file or a dataset folder"),
                             ("run.output_dir", self.run.output_dir, "the folder the run writes into")):
            if not v.strip():
                raise ValueError(f"{key}: required ({what})")
        check_template("data.prompt_template", self.data.prompt_template, ("prompt",))


def _validate_datareg(cfg: Config) -> None:
    d = cfg.datareg
    if d.update_rule == "full":
        return
    d.validate()
    _choice("datareg.target", d.target, ("file", "batch"))
    if d.target == "file" and not d.target_path:
        raise ValueError("datareg.target_path: required with datareg.target=file (a JSONL of target examples)")
    if d.target == "batch" and d.update_rule == "target_only":
        raise ValueError("datareg.target: target_only needs a target set (target=file)")
    if d.merged_target and (d.target != "file" or d.update_rule == "target_only" or d.subset_mode == "two_pass"):
        raise ValueError("datareg.merged_target: needs target=file and a one-pass subset or projection rule")
    _choice("datareg.target_loss", d.target_loss, TARGET_LOSSES)
    if d.target_loss != "nll" and (d.target != "file" or d.merged_target):
        raise ValueError(f"datareg.target_loss: {d.target_loss} scores rollouts of the target prompts: it needs "
                         "target=file and merged_target=false")


def _choice(key, value, valid):
    if value not in valid:
        raise ValueError(f"{key}: unknown value {value!r}; valid: {list(valid)}")


# ------------------------------------------------------------------------------------------ loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + `a.b.c=value` overrides (values parsed as YAML) -> a validated Config."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: file not found: {path}")
        raw = _yaml(read_utf8(path, "config"), f"config: {path}") or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config: {path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. run.max_steps=4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key}: {p!r} is not a section")
        node[parts[-1]] = _yaml(value, f"override {item!r}", one_line=True) if value.strip() else ""
    return from_dict(raw).validate()


def read_utf8(path: Path, what: str) -> str:
    """The text of a UTF-8 file; otherwise a ValueError naming the file, the line and the byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{what}: {path} line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}); "
                         "save it as UTF-8") from None


def _yaml(text: str, where: str, one_line: bool = False):
    """yaml.safe_load with a one-line error: where, line and column (for a file), and the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark, pos = getattr(e, "problem_mark", None), getattr(e, "position", None)  # a ReaderError has a position
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = ""
        if mark is not None and not one_line:
            at = f" at line {mark.line + 1}, column {mark.column + 1}"
        elif pos is not None and not one_line:
            at = f" at line {text.count(chr(10), 0, pos) + 1}"
        hint = "; quote a value that is meant as a string" if one_line else ""
        raise ValueError(f"{where}: YAML syntax error{at}: {problem}{hint}") from None


def from_dict(raw: dict) -> Config:
    """Build a Config from nested dicts, checking every key and type (unknown key -> ValueError naming it)."""
    return _build(Config, raw, "")


def _build(cls, raw, prefix):
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key; valid keys in "
                         f"{prefix.rstrip('.') or 'the config'}: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _coerce(tp, value, key):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(arm, value, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(kt, k, f"{key}.{k}"): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is False and key.endswith("mixed_precision"):   # YAML 1.1 reads the choice `no` as false
            return "no"
        if isinstance(value, (dict, list)):  # `key={question}` on a command line is a YAML mapping
            raise ValueError(f"{key}: expected a string, got the YAML {type(value).__name__} {value!r}; "
                             "quote a value that starts with { or [ (e.g. 'key=\"{...}\"')")
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise ValueError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


# ------------------------------------------------------------------------------------------ schema
def field_docs(cls) -> dict[str, str]:
    """{field: its one-line doc}: the comment after the field in the class's source (continued on the
    following comment-only lines), the config's single source of documentation."""
    docs: dict[str, str] = {}
    last = None
    for cls_ in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(cls_):
            continue
        for line in inspect.getsource(cls_).splitlines():
            m = re.match(r"\s{4}(\w+): [^=]+=.*?\s#\s?(.*)$", line)
            if m:
                last = m.group(1)
                docs[last] = m.group(2).strip()
            elif re.match(r"\s+#\s{2,}", line) and last:   # a continuation of the previous field's comment
                docs[last] += " " + line.strip().lstrip("#").strip()
            elif re.match(r"\s{4}\w+:", line):
                last = None
    return docs


def schema_rows(cls=None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) of every config key; a list of sections as key[].field."""
    cls = cls or Config
    rows = []
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows += schema_rows(tp, key + ".")
            continue
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if inner is not None and dataclasses.is_dataclass(inner):
            rows.append((key, f"list of {inner.__name__}", "[]", docs.get(f.name, "")))
            rows += schema_rows(inner, key + "[].")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        name = str(tp).replace("typing.", "") if typing.get_origin(tp) else tp.__name__
        rows.append((key, name, json.dumps(default), docs.get(f.name, "")))
    return rows


def schema() -> str:
    """Every key of the config with its type, default and meaning, one per line (`ptlab config schema`)."""
    from scale.methods import method_names

    rows = schema_rows()
    w = max(len(k) for k, *_ in rows)
    lines = [f"{k:{w}s}  {t:16s}  {d:12s}  {doc}" for k, t, d, doc in rows]
    return "\n".join(lines) + f"\n\nmethod.name: {', '.join(method_names())}, or module:Class (scale.methods.Method)"
