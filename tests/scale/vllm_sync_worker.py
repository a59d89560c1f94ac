"""Worker for tests/scale/test_vllm_sync.py: `torchrun --nproc_per_node 2 tests/scale/vllm_sync_worker.py ENGINE OUT`.

ENGINE: fsdp2 (torch's fully_shard on each decoder layer and the root, gloo) or zero3 (a DeepSpeed ZeRO-3 engine
with an optimizer, DS_ACCELERATOR=cpu). In one launch, the tiny Qwen2 (tied embeddings, float32) without and with
LoRA (adapters initialised non-trivially), each sharded for real (checked: DTensors / empty ZeRO-3 partitions).
Rank 0 writes what `scale.vllm_sync.weight_stream` yields (every rank runs the stream: its gathers are
collective) to OUT/<case>.safetensors, and the unsharded model's own checkpoint (merged under LoRA) to
OUT/<case>.ref.safetensors.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(engine: str, out: str) -> None:
    for lora in (False, True):
        case(engine, lora, Path(out) / f"{engine}{'-lora' if lora else ''}")


def case(engine: str, lora: bool, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from scale.vllm_sync import weight_stream
    from toy.tiny import make_model, make_tokenizer

    model = make_model(make_tokenizer(), hidden_size=32, intermediate_size=64)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    whole = copy.deepcopy(model)
    root = acc = None
    if engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        inner = model.base_model.model if lora else model
        for layer in inner.model.layers:
            fully_shard(layer)
        fully_shard(model)
        root, acc = model, _FsdpAcc()
        assert all(isinstance(p, DTensor) for p in model.parameters()), "not sharded"
    else:
        import deepspeed

        os.environ["DS_ACCELERATOR"] = "cpu"
        deepspeed.init_distributed(dist_backend="gloo")
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
               "zero_allow_untested_optimizer": True}   # a plain torch optimizer is enough to partition
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        root, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        assert all(p.data.numel() == 0 for p in model.parameters()), "not partitioned"
    streamed = {n: t.detach().clone().contiguous() for n, t in weight_stream(model, root, acc)}
    if dist.get_rank() == 0:
        ref = whole.merge_and_unload() if lora else whole
        save_file(streamed, f"{out}.safetensors")
        save_file({k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"},
                  f"{out}.ref.safetensors")
    dist.barrier()


class _FsdpAcc:
    """What `scale.gather.gathered` reads from accelerate's state under FSDP2: the reshard setting."""

    class state:   # noqa: N801
        class fsdp_plugin:   # noqa: N801
            reshard_after_forward = True


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
