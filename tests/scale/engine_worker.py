"""Worker for the engine tests: `torchrun --nproc_per_node N tests/scale/engine_worker.py ENGINE OVERRIDES_JSON`.

ENGINE: ddp (accelerate's CPU path) or fsdp2. accelerate takes its FSDP path only for GPU-like process types;
this test-only shim marks the CPU process group as such before the Accelerator is built, then builds the
FSDP2 plugin from the shipped scale/accelerate_configs/fsdp2.yaml, so the trainer runs the real FSDP2 code
(torch's fully_shard over gloo) on CPU processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def fsdp2_accelerator():
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
    return Accelerator(cpu=True)


def main(engine: str, overrides: list[str]) -> None:
    from scale.config import load_config
    from scale.train import Trainer, _end_distributed

    acc = fsdp2_accelerator() if engine == "fsdp2" else None
    tr = Trainer(load_config(None, overrides), accelerator=acc)
    try:
        tr.train()
    finally:
        _end_distributed()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
