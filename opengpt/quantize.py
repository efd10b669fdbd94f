"""Weight-only quantization as module swaps, and the checkpoints that store it.

Follows gpt-fast's WeightOnlyInt8Linear / WeightOnlyInt4Linear: weights are stored quantized and
multiplied by PyTorch's packed CPU kernels (`torch._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`), activations stay in the model's dtype. Decode reads each
weight once per token, so fewer bytes per weight is the speed lever on a bandwidth-bound CPU.

Layers:
* `Int8Linear`: symmetric, w ~= q * scale, one scale per output row.
* `Int4Linear`: asymmetric per group of `group_size` input columns, w ~= (q - 8) * scale + zero,
  q in 0..15 (the kernel's convention), which keeps the full [min, max] range of every group.
* `BlockInt8Linear` / `BlockInt8Embedding`: GGUF Q8_0 kept as stored, int8 with one fp16 scale per
  32 weights (llama.cpp's block format); the embedding and a tied output head share one copy.

GGUF Q4_0 / Q4_1 blocks map exactly onto `Int4Linear` with group 32: Q4_1's w = d*q + m is
(q - 8)*d + (m + 8d), Q4_0's w = d*(q - 8) has zero 0 (checked bit for bit against gguf's
dequantizer on the default model). `build_packed_model` builds a model that way (`quantize="gguf"`).

Precision: the packed kernels are fast with bf16 activations and ~35x slower with fp32 ones (their
fp32 path is a scalar loop), so they compute in bf16, with scales and zeros rounded to bf16, and
return the input dtype. Q8_0's compiled single-row path and its many-row path compute in the input
dtype with the file's exact weights.

Checkpoints written by `opengpt quantize` (`quantize_checkpoint`): config.json carries
`"quantization_config": {"quant_method": "opengpt", "mode", "group_size", "format_version": 1}`;
model.safetensors holds opengpt's module names. A quantized layer `name` stores `name.qweight`
(int8 (N, K), or for int4 uint8 (N, K/2) with two 4-bit values a byte, the even column in the low
nibble), `name.scales` and, for int4, `name.zeros` ((N,) or (N, K/group), bf16); every other tensor
is stored in float. The kernels' own packed layouts are built at load time, so the files do not
depend on a PyTorch version.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model.layers import Linear

log = logging.getLogger(__name__)
MODES = ("int8", "int4")
LOAD_MODES = (*MODES, "gguf")  # what LLM.load(quantize=...) takes
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel supports
COMPUTE_DTYPE = torch.bfloat16
QUANT_METHOD = "opengpt"
FORMAT_VERSION = 1
Q8_BLOCK = 32


class QuantizeError(ValueError):
    pass


def check_mode(mode: str, group_size: int = 32, load: bool = False) -> None:
    modes = LOAD_MODES if load else MODES
    if mode not in modes:
        raise QuantizeError(f"unknown quantization {mode!r}; choose one of: {', '.join(modes)}")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


# ------------------------------------------------------------------------------------------ the math


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


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in 0..15 -> uint8 (N, K/2): column 2j in the low nibble of byte j, 2j+1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> (N, K) uint8 values in 0..15 (the inverse of `pack_nibbles`)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def kernel_accepts(mode: str, weight_shape: tuple[int, int] | torch.Size | torch.Tensor, group_size: int = 32) -> bool:
    """Shapes PyTorch's packed CPU kernels take (found by probing torch 2.13: other shapes crash
    the process, so they must never reach the kernel)."""
    N, K = weight_shape.shape if isinstance(weight_shape, torch.Tensor) else weight_shape
    if mode == "int8":
        return K % 16 == 0
    return N % 16 == 0 and K % group_size == 0


# ---------------------------------------------------------------------------------------- the layers


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, contiguous, copied to fresh memory unless its data is 64-byte aligned.

    torch 2.13's int8 kernel reads with aligned vector loads and crashes the process on tensors
    that are not (found with weights read from a safetensors file, 4 bytes off, and activations 16
    bytes off); PyTorch's own allocations are 64-byte aligned. Skipped under torch.compile, whose
    buffers are aligned too (and whose graphs cannot read data pointers)."""
    t = t.contiguous()
    if torch.compiler.is_compiling() or t.data_ptr() % 64 == 0:
        return t
    return t.clone()



class _QuantLinear(nn.Module):
    """Shared shape handling: flatten to (M, K), run the packed kernel in bf16, restore shape and dtype."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x.reshape(-1, self.in_features).to(COMPUTE_DTYPE))  # (M, N)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinear):
    """int8 weights (N, K), one bf16 scale per output row."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        if not kernel_accepts("int8", qweight.shape):
            raise QuantizeError(f"int8 kernel needs in_features % 16 == 0, got weight shape {tuple(qweight.shape)}")
        super().__init__(*qweight.shape, bias)
        self.register_buffer("qweight", _aligned(qweight.to(torch.int8)))  # (N, K)
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE).contiguous())  # (N,)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        if not kernel_accepts("int8", weight.shape):
            raise QuantizeError(f"int8 kernel needs in_features % 16 == 0, got weight shape {tuple(weight.shape)}")
        return cls(*quantize_int8(weight), bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(_aligned(x), self.qweight, self.scales)


class Int4Linear(_QuantLinear):
    """4-bit weights in the kernel's packed layout; (scale, zero) per group of input columns, bf16."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None = None):
        """q: (N, K) integers in 0..15; scales, zeros: (N, K / group_size)."""
        N, K = q.shape
        group_size = K // scales.shape[1]
        if scales.shape != zeros.shape or scales.shape[0] != N or group_size * scales.shape[1] != K:
            raise QuantizeError(f"int4 scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} do not fit "
                                f"weights of shape {(N, K)}")
        if group_size not in GROUP_SIZES or not kernel_accepts("int4", (N, K), group_size):
            raise QuantizeError(f"int4 kernel needs out_features % 16 == 0 and in_features % {group_size} == 0 "
                                f"(group size one of {GROUP_SIZES}), got weight shape {(N, K)}")
        super().__init__(N, K, bias)
        self.group_size = group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        self.register_buffer("qweight", packed)  # uint8, the kernel's tiled layout
        # (K/g, N, 2): the kernel's layout of (scale, zero) pairs
        sz = torch.stack([scales.float(), zeros.float()], -1).transpose(0, 1).contiguous()
        self.register_buffer("scales_and_zeros", sz.to(COMPUTE_DTYPE))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32) -> Int4Linear:
        if not kernel_accepts("int4", weight.shape, group_size):
            raise QuantizeError(f"int4 kernel needs out_features % 16 == 0 and in_features % {group_size} == 0, "
                                f"got weight shape {tuple(weight.shape)}")
        return cls(*quantize_int4(weight, group_size), bias)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group_size, self.scales_and_zeros)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


# Rows at or below which BlockInt8Linear runs the int8 kernel once per block (decode: ~5x faster
# than a dense fp32 matmul on the default model's head); above it, dequantizing a chunk of rows at
# a time and multiplying in the input dtype is faster (the kernel's bf16 partial sums would have to
# be added up 32 weights at a time) and uses the file's exact weights.
BLOCK_KERNEL_MAX_ROWS = 8
_DEQUANT_CHUNK_ROWS = 2048


class BlockInt8Linear(nn.Module):
    """GGUF Q8_0 weights as stored: w[n, 32 b + i] = d[n, b] * q[n, 32 b + i], q int8, d fp16.

    Kept block-major, `qweight` (K/32, N, 32) and `scales` (K/32, N), so that each block's (N, 32)
    slice is contiguous for the int8 kernel (which takes one scale per row: a block at a time).
    """

    def __init__(self, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None):
        """q: (N, K) int8; d: (N, K/32) float16 (a `BlockQuant`'s fields)."""
        super().__init__()
        N, K = q.shape
        if K % Q8_BLOCK or d.shape != (N, K // Q8_BLOCK):
            raise QuantizeError(f"Q8_0 weights {(N, K)} need K % 32 == 0 and scales of shape {(N, K // Q8_BLOCK)}, "
                                f"got {tuple(d.shape)}")
        self.out_features, self.in_features = N, K
        # a fresh copy, so 64-byte aligned; each block's slice starts 32 N bytes further (aligned enough)
        self.register_buffer("qweight", q.to(torch.int8).view(N, -1, Q8_BLOCK).transpose(0, 1).clone(
            memory_format=torch.contiguous_format))
        self.register_buffer("scales", d.to(torch.float16).t().contiguous())  # (K/32, N), the file's values
        self.register_buffer("kernel_scales", self.scales.to(COMPUTE_DTYPE), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def dequantize(self, rows: slice = slice(None), dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weights of output rows `rows`: (n, K), exact in float32 (int8 * fp16 fits its mantissa)."""
        w = self.qweight[:, rows].float() * self.scales[:, rows, None].float()  # (K/32, n, 32)
        return w.transpose(0, 1).reshape(-1, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        M = x2.shape[0]
        if torch.compiler.is_compiling():
            if M == 1:  # decode: inductor fuses this into one pass over the int8 weights (exact weights)
                xb = x2.float().view(-1, 1, Q8_BLOCK)  # (K/32, 1, 32)
                y = ((self.qweight.float() * xb).sum(-1) * self.scales.float()).sum(0)[None]  # (1, N)
            else:
                y = F.linear(x2, self.dequantize(dtype=x.dtype))
        elif M <= BLOCK_KERNEL_MAX_ROWS:
            xb = _aligned(x2.to(COMPUTE_DTYPE))  # each block's columns then start at a multiple of 64 bytes
            y = torch.zeros(M, self.out_features, dtype=torch.float32, device=x.device)
            for b in range(self.qweight.shape[0]):
                part = xb[:, b * Q8_BLOCK : (b + 1) * Q8_BLOCK].contiguous()
                y += torch._weight_int8pack_mm(part, self.qweight[b], self.kernel_scales[b])
        else:
            y = torch.empty(M, self.out_features, dtype=x.dtype, device=x.device)
            for s in range(0, self.out_features, _DEQUANT_CHUNK_ROWS):
                rows = slice(s, min(s + _DEQUANT_CHUNK_ROWS, self.out_features))
                y[:, rows] = F.linear(x2, self.dequantize(rows, x.dtype))
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0"


class BlockInt8Embedding(nn.Module):
    """A Q8_0 embedding table: looks up int8 rows and their block scales, dequantizes just those rows.

    Shares its tensors with a `BlockInt8Linear` (the tied output head reads the same copy). The rows
    are computed in float32 and then cast, so they equal the dequantized table's rows exactly.
    """

    def __init__(self, table: BlockInt8Linear, dtype: torch.dtype):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        # A 0-d tensor of the compute dtype, broadcast by `weight`; moves with the module.
        self.register_buffer("_dtype_probe", torch.full((), float("nan"), dtype=dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """A storage-free stand-in (one NaN broadcast to (vocab, hidden)) carrying the table's shape, the
        model's compute dtype and its device, for code that reads those from `embed_tokens.weight` (the
        engines size their KV caches so). Arithmetic with it gives NaN; the weights are in `table`."""
        return self._dtype_probe.expand(self.num_embeddings, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.table.qweight[:, ids].float()  # (K/32, *ids, 32)
        d = self.table.scales[:, ids, None].float()  # (K/32, *ids, 1)
        return (q * d).movedim(0, -2).flatten(-2).to(self._dtype_probe.dtype)  # (*ids, K)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, Q8_0"


# ------------------------------------------------------------------------------------- the module swap


def quantize_weight(weight: torch.Tensor, mode: str, group_size: int = 32) -> dict[str, torch.Tensor]:
    """A float (N, K) weight -> the tensors a checkpoint stores for it (see the module docstring)."""
    if mode == "int8":
        q, s = quantize_int8(weight)
        return {"qweight": q, "scales": s.to(COMPUTE_DTYPE)}
    q, s, z = quantize_int4(weight, group_size)
    return {"qweight": pack_nibbles(q), "scales": s.to(COMPUTE_DTYPE), "zeros": z.to(COMPUTE_DTYPE)}


def quantized_linear(state: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> _QuantLinear:
    """The layer for tensors that `quantize_weight` made (int4 when they include zeros)."""
    if "zeros" in state:
        return Int4Linear(unpack_nibbles(state["qweight"]), state["scales"], state["zeros"], bias)
    return Int8Linear(state["qweight"], state["scales"], bias)


def _untie_head(model: nn.Module) -> None:
    """A tied model reads its head from the embedding; give it a head Linear over the same matrix, so
    that the head can be quantized while the embedding lookup stays in float."""
    if getattr(model, "lm_head", "absent") is None:
        cfg = model.config
        model.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
        model.lm_head.weight = model.embed_tokens.weight


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_states(model: nn.Module, mode: str, group_size: int = 32) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize every Linear the kernel takes: {layer name: tensors from `quantize_weight`}.

    Covers attention, MLP, shared expert and the output head (a tied head gets its own quantized
    copy of the embedding; the lookup stays float). Stacked MoE expert weights stay float. Layers
    whose shape the kernels cannot take (see `kernel_accepts`) stay float, with a log line.
    """
    check_mode(mode, group_size)
    _untie_head(model)
    states, kept = {}, []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if not kernel_accepts(mode, module.weight.shape, group_size):
            kept.append(name)
            continue
        states[name] = quantize_weight(module.weight.detach(), mode, group_size)
    if kept:
        log.info("%s: %d linear layers keep float weights (shapes the kernel does not take): %s",
                 mode, len(kept), ", ".join(kept[:5]) + (" ..." if len(kept) > 5 else ""))
    return states


def quantize_model(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Swap every Linear the kernels take for its quantized version, in place (see `quantize_states`)."""
    check_mode(mode, group_size)
    if next(model.parameters()).device.type != "cpu":
        raise QuantizeError("weight-only quantization uses PyTorch's CPU kernels; load the model on the CPU")
    for name, state in quantize_states(model, mode, group_size).items():
        _set_module(model, name, quantized_linear(state, model.get_submodule(name).bias))
    model.quantization = mode
    return model


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the weights a model holds: parameters and persistent buffers, each storage counted once."""
    seen, total = set(), 0
    for t in model.state_dict(keep_vars=True).values():
        storage = t.untyped_storage()
        if t.device.type != "meta" and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# -------------------------------------------------------------------------------- GGUF blocks, packed


def gguf_int4_params(blocks: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 `BlockQuant` -> (q, scales, zeros) in Int4Linear's convention, group 32, float32:
    Q4_1's d*q + m = (q - 8)*d + (m + 8d); Q4_0's d*(q - 8) has zero 0. In float32 this reproduces
    gguf's dequantized weights bit for bit (tests/weights/test_gguf.py checks it, kernel included)."""
    if blocks.qtype not in ("Q4_0", "Q4_1"):
        raise QuantizeError(f"{blocks.qtype} blocks are not 4-bit; only Q4_0 and Q4_1 map onto the int4 kernel")
    d = blocks.d.float()
    zeros = blocks.m.float() + 8 * d if blocks.qtype == "Q4_1" else torch.zeros_like(d)
    return blocks.q, d, zeros


def packed_linear(blocks: Any, bias: torch.Tensor | None = None) -> nn.Module | None:
    """A GGUF `BlockQuant` (Q8_0, Q4_0, Q4_1) -> its packed layer, or None when the kernel cannot take the shape."""
    if blocks.qtype == "Q8_0":
        return BlockInt8Linear(blocks.q, blocks.d, bias)
    if not kernel_accepts("int4", blocks.shape, Q8_BLOCK):
        return None
    return Int4Linear(*gguf_int4_params(blocks), bias)


def build_packed_model(cfg: Any, state_dict: dict[str, Any], dtype: torch.dtype, device: str = "cpu",
                       source: str = "checkpoint") -> nn.Module:
    """A model whose GGUF Q8_0 / Q4_0 / Q4_1 tensors (`BlockQuant` values of `state_dict`, as
    `read_gguf(keep_packed=True)` gives them) stay packed; other tensors load in `dtype`.

    Linear layers become `Int4Linear` (Q4_0, Q4_1) or `BlockInt8Linear` (Q8_0). A Q8_0 embedding
    becomes a `BlockInt8Embedding`, shared with the head when the model ties them; a Q4 embedding is
    dequantized for lookups, its tied head packed. Layers the kernel cannot take are dequantized,
    with a log line.
    """
    from .model.transformer import Transformer
    from .weights.gguf import BlockQuant
    from .weights.hf import CheckpointError, check_state_dict

    if torch.device(device).type != "cpu":
        raise QuantizeError("packed GGUF weights use PyTorch's CPU kernels; load the model on the CPU, or load "
                            "without quantize='gguf' to dequantize them")
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state_dict(state_dict, model.state_dict(), source)
    sd = dict(state_dict)
    kept = []
    for key in [k for k, v in sd.items() if isinstance(v, BlockQuant)]:
        name = key.removesuffix(".weight")
        blocks = sd.pop(key)
        if name == "embed_tokens":
            if blocks.qtype == "Q8_0":
                table = BlockInt8Linear(blocks.q, blocks.d)
                model.embed_tokens = BlockInt8Embedding(table, dtype)
                if cfg.tie_word_embeddings:
                    model.lm_head = table
                continue
            sd[key] = blocks.dequantize()
            head = packed_linear(blocks) if cfg.tie_word_embeddings else None
            if head is not None:
                model.lm_head = head
            continue
        bias = sd.pop(f"{name}.bias", None)
        layer = packed_linear(blocks, None if bias is None else bias.to(dtype))
        if layer is None:
            kept.append(name)
            sd[key] = blocks.dequantize()
            if bias is not None:
                sd[f"{name}.bias"] = bias
            continue
        _set_module(model, name, layer)
    if kept:
        log.info("gguf: %d layers dequantized (shapes the int4 kernel does not take): %s",
                 len(kept), ", ".join(kept[:5]) + (" ..." if len(kept) > 5 else ""))
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=False, assign=True)
    _finish(model, device, source, CheckpointError)
    model.quantization = "gguf"
    return model


def _finish(model: nn.Module, device: str, source: str, error: type[Exception]) -> None:
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise error(f"{source}: missing tensor keys: {', '.join(missing[:10])}")
    model.rotary.to_empty(device=device)
    model.rotary.reset_parameters()
    model.eval()


# ---------------------------------------------------------------------------- quantized checkpoints


def read_quantization_config(path: Path) -> dict[str, Any] | None:
    """The `quantization_config` of a checkpoint directory's config.json (None when it has none).

    Only opengpt's own format loads; other methods (GPTQ, AWQ, bitsandbytes, ...) are refused by name."""
    from .weights.hf import CheckpointError

    cfg_file = Path(path) / "config.json"
    try:
        qcfg = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file.is_file() else None
    except json.JSONDecodeError:
        return None  # read_config reports it
    if qcfg is None:
        return None
    method = qcfg.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(
            f"{cfg_file} declares quantization_config.quant_method {method!r}, which opengpt cannot load; load the "
            "unquantized checkpoint (with quantize='int8' or 'int4' if you like), or its GGUF file")
    if qcfg.get("format_version") != FORMAT_VERSION or qcfg.get("mode") not in MODES:
        raise CheckpointError(f"{cfg_file}: quantization_config {qcfg} is not one this opengpt writes "
                              f"(format_version {FORMAT_VERSION}, mode int8 or int4); re-run `opengpt quantize`")
    return qcfg


def load_quantized(path: Path, cfg: Any, qcfg: dict[str, Any], dtype: torch.dtype, device: str = "cpu",
                   progress: bool = False) -> nn.Module:
    """Build the model of a checkpoint written by `quantize_checkpoint`, quantized layers as stored."""
    from .model.transformer import Transformer
    from .weights.hf import CheckpointError, check_state_dict, iter_safetensors, safetensors_files

    if torch.device(device).type != "cpu":
        raise QuantizeError(f"{path} is quantized for PyTorch's CPU kernels; load it on the CPU")
    tensors = dict(iter_safetensors(safetensors_files(path), progress))
    with torch.device("meta"):
        model = Transformer(cfg)
    names = sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight"))
    if "lm_head" in names:
        _untie_head(model)
    for name in names:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{path}: {name}.qweight names no linear layer of {cfg.architecture}")
        state = {k: tensors.pop(f"{name}.{k}") for k in ("qweight", "scales", "zeros") if f"{name}.{k}" in tensors}
        bias = tensors.pop(f"{name}.bias", None)
        try:
            layer = quantized_linear(state, None if bias is None else bias.to(dtype))
        except (QuantizeError, RuntimeError, KeyError, IndexError) as e:
            raise CheckpointError(f"{path}: tensors of quantized layer {name} are malformed ({e}); re-run "
                                  "`opengpt quantize`") from None
        if (layer.out_features, layer.in_features) != tuple(linear.weight.shape):
            raise CheckpointError(f"{path}: quantized layer {name} holds a {layer.out_features}x{layer.in_features} "
                                  f"weight, the config implies {tuple(linear.weight.shape)}")
        _set_module(model, name, layer)
    expected = {k: v for k, v in model.state_dict().items() if not any(k.startswith(n + ".") for n in names)}
    check_state_dict(tensors, expected, str(path))
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=False,
                          assign=True)
    _finish(model, device, str(path), CheckpointError)
    model.quantization = qcfg["mode"]
    return model


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
                    "chat_template.jinja", "generation_config.json")


def quantize_checkpoint(src: str | Path, out: str | Path, mode: str, group_size: int = 32,
                        dtype: str | torch.dtype = "float32", progress: bool = False) -> dict[str, Any]:
    """Quantize a checkpoint (HF directory, .gguf file or "default") and write it to the directory `out`.

    Weights are quantized from float32, exactly as `LLM.load(src, quantize=mode)` does in memory;
    tensors left in float are stored in `dtype`. Returns a summary (layer counts, bytes)."""
    from safetensors.torch import save_file

    from .weights.hf import CheckpointError
    from .weights.load import load_model, resolve_dtype

    check_mode(mode, group_size)
    dt = resolve_dtype(dtype)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizeError(f"{out} already exists and is not an empty directory; choose a new output directory")
    cfg, model, tok, p = load_model(src, dtype="float32", progress=progress)
    if getattr(model, "quantization", None):
        raise QuantizeError(f"{p} is already quantized ({model.quantization}); quantize the original checkpoint")
    if p.is_dir():
        hf = json.loads((p / "config.json").read_text())
    else:
        from .weights.gguf import read_gguf_config

        hf = read_gguf_config(p)
    states = quantize_states(model, mode, group_size)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key.removesuffix(".weight") in states and key.endswith(".weight"):
            continue  # stored quantized below
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a tied head the kernel did not take: the embedding it reads is stored already
        tensors[key] = t.detach().to(dt).contiguous().clone()  # own storage: safetensors refuses shared tensors
    for name, state in states.items():
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in state.items()})
    out.mkdir(parents=True, exist_ok=True)
    try:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        hf.update(torch_dtype=str(dt).removeprefix("torch."),
                  quantization_config={"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "mode": mode,
                                       "group_size": group_size if mode == "int4" else None,
                                       "quantized_layers": len(states)})
        (out / "config.json").write_text(json.dumps(hf, indent=2))
        if p.is_dir():
            for f in _TOKENIZER_FILES:
                if (p / f).is_file():
                    shutil.copy2(p / f, out / f)
            if (p / "additional_chat_templates").is_dir():
                shutil.copytree(p / "additional_chat_templates", out / "additional_chat_templates")
        else:
            _write_tokenizer(tok, out)
    except OSError as e:
        raise CheckpointError(f"cannot write the quantized checkpoint to {out}: {e}") from e
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    return {"path": str(out), "source": str(p), "mode": mode, "group_size": group_size if mode == "int4" else None,
            "quantized_layers": len(states), "float_layers": linears - len(states),
            "bytes": (out / "model.safetensors").stat().st_size}


def _write_tokenizer(tok: Any, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and generation_config.json for a tokenizer rebuilt from
    a GGUF file's metadata, in the form `Tokenizer.from_dir` reads."""
    tok._tok.save(str(out / "tokenizer.json"))  # the `tokenizers.Tokenizer` it wraps, special tokens registered
    config = {k: v for k, v in tok.config.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(tok.eos_token_ids)}))
