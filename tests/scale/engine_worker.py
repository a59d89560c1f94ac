"""Worker for the engine tests: `torchrun --nproc_per_node N tests/scale/engine_worker.py ENGINE OVERRIDES_JSON`.

OVERRIDES_JSON: one run's key=value list, or a list of such lists: several runs one after the other in the
same processes (the tests amortise the start-up of torch, transformers and DeepSpeed over their cases);
accelerate's per-run state is reset between them, the process group is kept.

ENGINE: ddp (accelerate's CPU path), fsdp2, zero2 or zero3. accelerate takes its FSDP and DeepSpeed paths only
for GPU-like process types. For FSDP2 this test-only shim marks the CPU process group as such before the
Accelerator is built, then builds the FSDP2 plugin from the shipped scale/accelerate_configs/fsdp2.yaml, so
the trainer runs the real FSDP2 code (torch's fully_shard over gloo) on CPU processes. For ZeRO-2/3 it sets
the variables `accelerate launch --config_file scale/accelerate_configs/zero{2,3}.yaml` sets, selects
DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu: gloo, no compiled ops) and builds the Accelerator without
`cpu=True` (accelerate's DeepSpeed branch is skipped under that flag) on a gloo process group (without a
GPU accelerate would pick no backend and each rank would think it is alone); written against accelerate
1.15 and deepspeed 0.19.8.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def fsdp2_accelerator(mixed_precision: str = "no"):
    """The Accelerator `accelerate launch --config_file scale/accelerate_configs/fsdp2.yaml` would build: the
    launcher turns the file's fsdp_config into FSDP_* variables, which the plugin reads."""
    import os

    import yaml
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    shipped = yaml.safe_load((ROOT / "scale" / "accelerate_configs" / "fsdp2.yaml").read_text())["fsdp_config"]
    os.environ.update({k.upper(): str(v).lower() if isinstance(v, bool) else str(v) for k, v in shipped.items()})
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU   # the shim (module doc)
    return Accelerator(cpu=True, mixed_precision=mixed_precision)


def deepspeed_accelerator(stage: int, mixed_precision: str = "no"):
    """The Accelerator `accelerate launch --config_file scale/accelerate_configs/zero{stage}.yaml` would build,
    with the run's mixed precision (the file's bf16 is what a launch on GPUs gets; the parity tests compare
    float32 runs)."""
    import os

    import yaml
    from accelerate import Accelerator
    from accelerate.state import PartialState

    shipped = yaml.safe_load((ROOT / "scale" / "accelerate_configs" / f"zero{stage}.yaml").read_text())
    ds = shipped["deepspeed_config"]
    os.environ.update({"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true",
                       "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(ds["zero_stage"]),
                       "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": ds["offload_optimizer_device"],
                       "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": ds["offload_param_device"]})
    for key in ("zero3_init_flag", "zero3_save_16bit_model"):
        if key in ds:
            name = "ZERO3_INIT" if key == "zero3_init_flag" else "ZERO3_SAVE_16BIT_MODEL"
            os.environ[f"ACCELERATE_DEEPSPEED_{name}"] = str(ds[key]).lower()
    PartialState(backend="gloo")   # the shim: without a GPU and without cpu=True accelerate picks no backend
    return Accelerator(mixed_precision=mixed_precision)


def run(engine: str, overrides: list[str]) -> None:
    from scale.config import load_config
    from scale.train import Trainer

    cfg = load_config(None, overrides)
    mp = cfg.run.mixed_precision
    acc = fsdp2_accelerator(mp) if engine == "fsdp2" else \
        deepspeed_accelerator(int(engine[-1]), mp) if engine.startswith("zero") else None
    tr = Trainer(cfg, accelerator=acc)
    tr.train()
    # what the policy returns to the losses (PPO ratios, DPO margins); a sharded forward runs on every rank
    mb = tr.collate(tr.method.rows(tr, 0, {})[:1])
    lp, _ = tr.policy(mb["input_ids"], mb["attention_mask"], mb["score_mask"])
    if tr.acc.is_main_process:
        (Path(cfg.run.output_dir) / "logp_dtype.txt").write_text(str(lp.dtype))


def main(engine: str, overrides: list) -> None:
    from accelerate.state import AcceleratorState, GradientState

    from scale.train import _end_distributed

    runs = overrides if overrides and isinstance(overrides[0], list) else [overrides]
    try:
        for i, ov in enumerate(runs):
            if i:   # a fresh accelerate state (engine plugin, mixed precision) for the next run, same processes
                AcceleratorState._reset_state()
                GradientState._reset_state()
            run(engine, ov)
    finally:
        _end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
