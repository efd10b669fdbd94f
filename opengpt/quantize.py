"""Weight-only quantization as a module swap: INT8 per output channel, INT4 group-wise.

Follows gpt-fast's WeightOnlyInt8Linear / WeightOnlyInt4Linear: weights are stored quantized and
multiplied by PyTorch's packed CPU kernels (`torch._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`), activations stay in the model's dtype. Decode reads each
weight once per token, so fewer bytes per weight is the speed lever on a bandwidth-bound CPU.

The packed kernels are fast with bf16 activations and several times slower with fp32 ones, so
fp32 inputs are multiplied in bf16 (the result is returned in the input dtype).

INT8: symmetric, w ~= q * scale, one scale per output row.
INT4: asymmetric per group of `group_size` input columns, w ~= (q - 8) * scale + zero, q in 0..15
(the kernel's convention), which keeps the full [min, max] range of every group.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .model.layers import Linear

log = logging.getLogger(__name__)
MODES = ("int8", "int4")


class QuantizeError(ValueError):
    pass


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K), scales (N,) float32."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> q int32 in 0..15 (N, K), scales (N, K/g), zeros (N, K/g)."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)  # (N, groups, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    zeros = lo + 8 * scales  # the kernel computes (q - 8) * scale + zero
    q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(N, K), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    g = K // scales.shape[1]
    return ((q.reshape(N, -1, g).float() - 8) * scales[..., None] + zeros[..., None]).reshape(N, K)


COMPUTE_DTYPE = torch.bfloat16


class _QuantLinear(nn.Module):
    """Shared shape handling: flatten to (M, K), run the packed kernel in bf16, restore shape and dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x.reshape(-1, self.in_features).to(COMPUTE_DTYPE))  # (M, N)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int8Linear(_QuantLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if not kernel_accepts("int8", weight):
            raise QuantizeError(f"int8 kernel needs in_features % 16 == 0, got weight shape {tuple(weight.shape)}")
        super().__init__(weight, bias)
        q, scales = quantize_int8(weight)
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))  # (N,)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight, self.scales)


class Int4Linear(_QuantLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32):
        if not kernel_accepts("int4", weight, group_size):
            raise QuantizeError(f"int4 kernel needs out_features % 16 == 0 and in_features % {group_size} == 0, "
                                f"got weight shape {tuple(weight.shape)}")
        super().__init__(weight, bias)
        q, scales, zeros = quantize_int4(weight, group_size)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # packed uint8
        # (K/g, N, 2): the kernel's layout of (scale, zero) pairs
        sz = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(COMPUTE_DTYPE))
        self.group_size = group_size

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)


def kernel_accepts(mode: str, weight: torch.Tensor, group_size: int = 32) -> bool:
    """Shapes PyTorch's packed CPU kernels take (found by probing torch 2.13: other shapes crash
    the process, so they must never reach the kernel)."""
    N, K = weight.shape
    if mode == "int8":
        return K % 16 == 0
    return N % 16 == 0 and K % group_size == 0


def quantize_model(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Swap every Linear (attention, MLP, shared expert, output head) for its quantized version, in place.

    A tied output head gets its own quantized copy of the embedding (the embedding lookup stays in
    float). Stacked MoE expert weights stay in float for now. Layers whose shape the kernels cannot
    take (see `kernel_accepts`) stay in float, with a log line.
    """
    if mode not in MODES:
        raise QuantizeError(f"unknown quantization {mode!r}; choose one of: {', '.join(MODES)}")
    if next(model.parameters()).device.type != "cpu":
        raise QuantizeError("weight-only quantization uses PyTorch's CPU kernels; load the model on the CPU")
    if getattr(model, "lm_head", "absent") is None:  # tied: quantize a copy of the embedding as the head
        model.lm_head = Linear(model.config.hidden_size, model.config.vocab_size, bias=False, device="meta")
        model.lm_head.weight = model.embed_tokens.weight
    kept = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            w, b = child.weight.detach(), child.bias
            if not kernel_accepts(mode, w, group_size):
                kept.append(full)
                continue
            setattr(module, child_name, Int8Linear(w, b) if mode == "int8" else Int4Linear(w, b, group_size))
    if kept:
        log.info("%s: %d linear layers keep float weights (shapes the kernel does not take): %s",
                 mode, len(kept), ", ".join(kept[:5]))
    model.quantization = mode
    return model
