"""Whole parameters of a sharded model for a while: what generation and the vLLM weight push need under FSDP2
and ZeRO-3 (`gathered`, `zero3_engine`). One process, DDP and ZeRO-1/2 hold whole parameters already."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def gathered(root, acc):
    """Under FSDP2 and ZeRO-3, the full parameters for the length of a generation: every sharded unit is
    gathered once and kept (not re-gathered at each decoding step), then sharded again. FSDP2: `generate`
    runs the inner model, whose embedding and head belong to the root unit that its forward would otherwise
    skip (a mix of plain tensors and DTensors). Elsewhere (one process, DDP, ZeRO-2) nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if zero3_engine(root):
        with _zero3_gathered(root):
            yield
        return
    units = [m for m in root.modules() if isinstance(m, FSDPModule)] if root is not None else []
    if not units:
        yield
        return
    root._get_fsdp_state()._lazy_init()   # what the root's first forward does; generate may come first
    after = acc.state.fsdp_plugin.reshard_after_forward
    for u in units:
        u.set_reshard_after_forward(False)
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(after)


def zero3_engine(module) -> bool:
    """A DeepSpeed engine whose parameters are partitioned (ZeRO-3)."""
    return getattr(module, "zero_optimization_stage", lambda: 0)() == 3


@contextlib.contextmanager
def _zero3_gathered(engine):
    """ZeRO-3: gather every parameter once and lift the engine's per-module fetch / release hooks for the
    generation (with them each decoding step would gather and release every layer again, and ranks that stop
    at different lengths would wait on each other), then put the hooks back and partition again."""
    import deepspeed

    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()
