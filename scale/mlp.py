"""Gated MLPs that keep less for the backward (`run.fused_mlp`; ours, the idea of Liger-Kernel's fused SwiGLU).

A Llama / Qwen / Mistral-style MLP computes down(silu(gate(x)) * up(x)). Autograd keeps four [tokens,
intermediate] tensors per layer for its backward: silu's input (gate), silu's output, up, and down's input
(the product h). They are the largest activations of a training step. `GatedMLP` keeps only gate and up (and
down's weight, which is a parameter anyway) and recomputes silu(gate) and h in the backward, elementwise work
that is small next to the matrix products; `SiluMul`, used where down_proj cannot be taken over (a LoRA layer,
a bias, weights sharded by FSDP or ZeRO-3, which must stay with their engine), keeps gate and up for silu(gate)
* up and leaves down_proj as it is: three tensors instead of four.

The values and gradients are those of the plain module up to rounding (tested in float64 to 1e-12 against
autograd through the original module, and under bf16 autocast). Under autocast the product with down's weight
runs in the dtype of h, as autocast would run it, and the weight's gradient is returned in the weight's dtype.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _silu_parts(gate: torch.Tensor):
    """sigmoid(gate) and silu(gate), the latter by the forward's own kernel so that h is recomputed bit for bit."""
    return torch.sigmoid(gate), F.silu(gate)


def _silu_grad_(act: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """silu'(x) = s (1 + x (1 - s)) = s + act (1 - s), written over `act` (act = silu(x), s = sigmoid(x)): two
    passes over the [tokens, intermediate] tensor and no new one: each pass is a trip through memory, and a
    fresh tensor of that size also costs page faults on CPU."""
    return act.addcmul_(act, s, value=-1).add_(s)


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g_h):
        gate, up = ctx.saved_tensors
        s, act = _silu_parts(gate)
        g_up = g_h * act
        return torch.mul(g_h, up).mul_(_silu_grad_(act, s)), g_up   # g_h is autograd's: not written to


class GatedMLP(torch.autograd.Function):
    """(silu(gate) * up) @ weight.T, keeping gate, up and the weight only."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        h = F.silu(gate) * up
        return F.linear(h, weight.to(h.dtype))

    @staticmethod
    def backward(ctx, g):
        gate, up, weight = ctx.saved_tensors
        s, act = _silu_parts(gate)
        h = act * up
        g = g.to(h.dtype)
        w = weight.to(h.dtype)
        g_h = g @ w
        g_w = None
        if ctx.needs_input_grad[2]:   # a frozen down_proj (LoRA elsewhere) costs no weight gradient
            g_w = (g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1])).to(weight.dtype)
        del h
        g_up = g_h * act
        return g_h.mul_(up).mul_(_silu_grad_(act, s)), g_up, g_w   # g_h is ours: the gate's gradient overwrites it


def _gated_parts(module: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    act = getattr(module, "act_fn", None)
    return (all(isinstance(getattr(module, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(act, (nn.SiLU, SiLUActivation)))


def _fused_forward(self, x):
    if not torch.is_grad_enabled():   # nothing is kept for a backward: the plain module's path (down_proj's forward)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
    return GatedMLP.apply(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)


def _silu_mul_forward(self, x):
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_gated_mlps(model: nn.Module, take_down_proj: bool = True) -> dict[str, int]:
    """Switch every gated SiLU MLP of `model` to the lean forward (module doc); returns how many got each kind.
    `take_down_proj=False` (weights sharded by an engine): SiluMul only."""
    counts = {"fused": 0, "silu_mul": 0}
    for module in model.modules():
        if not _gated_parts(module):
            continue
        down = module.down_proj
        whole = take_down_proj and type(down) is nn.Linear and down.bias is None
        module.forward = types.MethodType(_fused_forward if whole else _silu_mul_forward, module)
        counts["fused" if whole else "silu_mul"] += 1
    return counts
