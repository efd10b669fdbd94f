"""Rotary position embeddings with every scaling kind we load, from one `rope_inv_freq` function.

RoFormer (Su et al. 2021) rotates query/key pairs by position-dependent angles. Scaling kinds for
longer contexts: linear position interpolation (Chen et al. 2023), dynamic NTK-aware scaling
(bloc97 / Rozière et al.), YaRN (Peng et al. 2023) and the Llama 3.1 frequency-band scaling. The
formulas follow transformers' `modeling_rope_utils` so that logits match to fp32 precision. The
rotate-half (non-interleaved) convention is used throughout; GGUF's interleaved q/k rows are
un-permuted at load time instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

KINDS = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeParams:
    head_dim: int  # rotary dim
    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    extra: dict = field(default_factory=dict)  # yarn: beta_fast, beta_slow, mscale, mscale_all_dim,
    # attention_factor, truncate; llama3: low_freq_factor, high_freq_factor

    @classmethod
    def from_hf(cls, rope: dict | None, head_dim: int, theta: float, max_position_embeddings: int) -> RopeParams:
        """From a HF scaling dict: old `rope_scaling` ({"type"|"rope_type": ...}) or v5 `rope_parameters`."""
        rope = dict(rope or {})
        kind = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        theta = rope.pop("rope_theta", theta)
        if kind not in KINDS:
            raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: {', '.join(KINDS)}")
        factor = float(rope.pop("factor", 1.0) or 1.0)
        orig = rope.pop("original_max_position_embeddings", None)
        rope.pop("partial_rotary_factor", None)
        return cls(head_dim, float(theta), kind, factor, max_position_embeddings, orig, rope)

    def to_dict(self) -> dict:
        return asdict(self)


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim/2,)


def rope_inv_freq(p: RopeParams, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq (head_dim/2,) fp32, attention scaling applied to cos/sin)."""
    dim, base = p.head_dim, p.theta
    if p.kind == "default":
        return _base_inv_freq(dim, base), 1.0
    if p.kind == "linear":
        return _base_inv_freq(dim, base) / p.factor, 1.0
    if p.kind == "dynamic":
        # NTK-aware: grow the base once the sequence outgrows the trained context. transformers keeps
        # the grown frequencies in a buffer until a sequence shorter than the original context resets
        # it; we recompute from the current length every call, which agrees on every growing sequence.
        L = max(seq_len or 0, p.max_position_embeddings)
        base = base * ((p.factor * L / p.max_position_embeddings) - (p.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(dim, base), 1.0
    if p.kind == "llama3":
        inv_freq = _base_inv_freq(dim, base)
        lo, hi = p.extra.get("low_freq_factor", 1.0), p.extra.get("high_freq_factor", 4.0)
        old = p.original_max_position_embeddings or 8192
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / lo, inv_freq / p.factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / p.factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate low frequencies, extrapolate high ones, linear ramp between; scale attention.
    x = p.extra
    factor = p.factor
    orig = p.original_max_position_embeddings or p.max_position_embeddings

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = x.get("attention_factor")
    if attn is None:
        if x.get("mscale") and x.get("mscale_all_dim"):
            attn = mscale(factor, x["mscale"]) / mscale(factor, x["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast, beta_slow = x.get("beta_fast") or 32, x.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if x.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) int -> cos, sin (B, T, head_dim), computed in fp32 then cast."""
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd); cos/sin (B, T, hd), broadcast over heads."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RotaryEmbedding(nn.Module):
    """Holds inv_freq as a non-persistent buffer; forward(positions, dtype) -> (cos, sin)."""

    def __init__(self, params: RopeParams):
        super().__init__()
        self.params = params
        inv_freq, self.attention_scaling = rope_inv_freq(params)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the buffer (after building on the meta device and `to_empty`)."""
        inv_freq, self.attention_scaling = rope_inv_freq(self.params)
        self.inv_freq = inv_freq.to(self.inv_freq.device if not self.inv_freq.is_meta else "cpu")

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self.inv_freq, self.attention_scaling
        if self.params.kind == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.params.max_position_embeddings:
                inv_freq, scaling = rope_inv_freq(self.params, seq_len)
                inv_freq = inv_freq.to(positions.device)
        return rope_cos_sin(inv_freq, positions, scaling, dtype)
