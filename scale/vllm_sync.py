"""The trainer's weights as vLLM's loader takes them: one full tensor at a time, under Hugging Face checkpoint names.

vLLM loads a model at start from the checkpoint files that `save_pretrained` writes, and its `load_weights`
takes (name, tensor) pairs under those same names (it fuses q/k/v and gate/up itself, and drops a tied head).
`weight_stream` yields exactly those pairs from a model that is being trained, whatever wraps it:

- one process, DDP, ZeRO-1/2: the parameters as they are;
- FSDP2: each parameter is a DTensor shard; `full_tensor()` all-gathers that one parameter, so at most one
  full parameter is alive at a time beside the shards (not the whole model, as `state_dict()` would need);
- ZeRO-3: each parameter is gathered alone (`deepspeed.zero.GatheredParameters`) and released after its use;
- LoRA (PEFT): the adapters are merged into the base weights for the stream and unmerged after it, and the
  names lose PEFT's prefixes; adapter tensors are not sent (vLLM's model has no place for them). Merging needs
  whole weights, so under FSDP2 and ZeRO-3 the model is gathered once for the length of the stream
  (`scale.gather.gathered`).

Gathering is collective: every rank must run the whole stream, also ranks that do not push the weights.
A yielded tensor is valid until the next one is requested (ZeRO-3 releases it): copy it to keep it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def weight_stream(model, root=None, acc=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for every distinct parameter of the Hugging Face `model` (unwrapped; a
    PEFT model under LoRA), each tied weight once. `root` is the prepared module (a DeepSpeed engine, or the
    FSDP2 root) and `acc` the Accelerator; both may be None for a plain model."""
    from peft import PeftModel

    from scale.gather import gathered

    lora = isinstance(model, PeftModel)
    with gathered(root, acc) if lora else contextlib.nullcontext():   # merging needs whole weights
        if lora:
            model.merge_adapter()
        try:
            for name, p in model.named_parameters():
                name = _checkpoint_name(name, lora)
                if name is None:
                    continue
                with contextlib.nullcontext() if lora else _gathered([p], root):
                    yield name, _full(p.detach())
        finally:
            if lora:
                model.unmerge_adapter()


def _checkpoint_name(name: str, lora: bool) -> str | None:
    """A parameter's name in the saved checkpoint; None for what the checkpoint does not hold (adapters)."""
    if not lora:
        return name
    if ".lora_" in name or "modules_to_save" in name or "original_module" in name:
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _gathered(params: list, engine):
    """ZeRO-3: the full values of `params` for the length of the block; anything else: nothing to do."""
    from scale.gather import zero3_engine

    if engine is None or not zero3_engine(engine):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
