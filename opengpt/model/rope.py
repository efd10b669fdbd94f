"""Rotary position embeddings (RoPE) with every scaling kind we load, from one `rope_inv_freq` function.

RoFormer (Su et al. 2021, arXiv:2104.09864) rotates query/key channel pairs by position-dependent
angles. Kinds for longer contexts: "linear" Position Interpolation (Chen et al. 2023, arXiv:2306.15595),
"dynamic" NTK-aware scaling (bloc97 / emozilla, Reddit 2023), "yarn" (Peng et al. 2023, arXiv:2309.00071)
and "llama3", the frequency-band scaling of Llama 3.1 (Meta, "The Llama 3 Herd of Models", 2024).
Formulas and float order follow transformers' `modeling_rope_utils`, so results are bit-identical.
The rotate-half (non-interleaved) convention is used throughout; GGUF's interleaved q/k rows are
un-permuted at load time instead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

KINDS = ("default", "linear", "dynamic", "yarn", "llama3")
_UNSUPPORTED = {"su": "Phi-3 LongRoPE", "longrope": "LongRoPE per-frequency factors",
                "mrope": "multimodal (Qwen-VL) RoPE"}


@dataclass(frozen=True)
class RopeParams:
    head_dim: int  # rotary dim (= head_dim * partial_rotary_factor)
    theta: float = 10000.0
    kind: str = "default"  # one of KINDS
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # yarn/llama3: pre-training context
    max_position_embeddings: int = 2048  # dynamic: the base grows past this length
    beta_fast: float = 32.0  # yarn: ramp bounds, in rotations over the original context
    beta_slow: float = 1.0
    mscale: float | None = None  # yarn (DeepSeek): attention factor = mscale(mscale) / mscale(mscale_all_dim)
    mscale_all_dim: float | None = None
    attention_factor: float | None = None  # yarn: explicit cos/sin scale; None = 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: floor/ceil the ramp bounds (gpt-oss sets False)
    low_freq_factor: float = 1.0  # llama3: wavelengths above orig/low are divided by factor,
    high_freq_factor: float = 4.0  # below orig/high kept, smooth in between

    @classmethod
    def from_hf(cls, rope: dict | None, head_dim: int, theta: float, max_position_embeddings: int) -> RopeParams:
        """From HF's old `rope_scaling` ({"type"|"rope_type": ..., no theta}) or v5 `rope_parameters` dict.

        `head_dim` is the attention head size; a `partial_rotary_factor` in the dict shrinks the rotary
        dim as transformers does. A `rope_theta` in the dict wins over `theta`. Missing values get
        transformers' defaults (original_max_position_embeddings = max_position_embeddings; yarn
        factor = max / original)."""
        r = dict(rope or {})
        kind = r.get("rope_type") or r.get("type") or "default"
        if kind in _UNSUPPORTED or "mrope_section" in r:
            what = _UNSUPPORTED.get(kind, _UNSUPPORTED["mrope"])
            raise ValueError(f"unsupported RoPE scaling {kind!r} ({what} is not implemented); "
                             f"supported: {', '.join(KINDS)}")
        if kind not in KINDS:
            raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: {', '.join(KINDS)}")
        orig = r.get("original_max_position_embeddings")
        if orig is None and kind in ("yarn", "llama3"):
            orig = max_position_embeddings
        factor = r.get("factor")
        if factor is None:
            factor = max_position_embeddings / orig if kind == "yarn" else 1.0
        opt = lambda k: None if r.get(k) is None else float(r[k])  # noqa: E731
        return cls(
            head_dim=int(head_dim * r.get("partial_rotary_factor", 1.0)), theta=float(r.get("rope_theta", theta)),
            kind=kind, factor=float(factor), original_max_position_embeddings=orig,
            max_position_embeddings=max_position_embeddings, beta_fast=float(r.get("beta_fast") or 32),
            beta_slow=float(r.get("beta_slow") or 1), mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
            attention_factor=opt("attention_factor"), truncate=bool(r.get("truncate", True)),
            low_freq_factor=float(r.get("low_freq_factor", 1.0)), high_freq_factor=float(r.get("high_freq_factor", 4.0)),
        )

    def to_dict(self) -> dict:
        """Plain field dict; `RopeParams(**p.to_dict()) == p`."""
        return asdict(self)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(p: RopeParams, seq_len: int | torch.Tensor | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq fp32 (head_dim//2,), attention_scaling for cos/sin). `seq_len` matters only for "dynamic":
    past max_position_embeddings the base grows to theta * (factor*L/max - (factor-1))^(d/(d-2)). A tensor
    seq_len follows transformers' in-module path (base computed as a float32 tensor), an int its functional one."""
    dim, base = p.head_dim, p.theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim  # (dim/2,)
    if p.kind == "dynamic":
        mp = p.max_position_embeddings
        if isinstance(seq_len, torch.Tensor):
            L = torch.maximum(seq_len, torch.tensor(mp, dtype=seq_len.dtype, device=seq_len.device))
        else:
            L = mp if seq_len is None else max(seq_len, mp)
        base = base * ((p.factor * L / mp) - (p.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)  # (dim/2,)
    if p.kind == "linear":
        return inv_freq / p.factor, 1.0
    if p.kind == "llama3":  # keep high frequencies, divide low ones by factor, interpolate the band between
        old, lo, hi = p.original_max_position_embeddings, p.low_freq_factor, p.high_freq_factor
        wavelen = 2 * math.pi / inv_freq  # (dim/2,)
        scaled = torch.where(wavelen > old / lo, inv_freq / p.factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / p.factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    if p.kind != "yarn":  # default, dynamic
        return inv_freq, 1.0
    # yarn: interpolate (divide by factor) dims rotating < beta_slow times over the original context,
    # extrapolate (keep) dims rotating > beta_fast times, linear ramp between; scale attention.
    attn = p.attention_factor
    if attn is None:
        attn = (_yarn_mscale(p.factor, p.mscale) / _yarn_mscale(p.factor, p.mscale_all_dim)
                if p.mscale and p.mscale_all_dim else _yarn_mscale(p.factor))
    correction_dim = lambda rot: dim * math.log(p.original_max_position_embeddings / (rot * 2 * math.pi)) / (  # noqa: E731
        2 * math.log(base))
    low, high = correction_dim(p.beta_fast), correction_dim(p.beta_slow)
    if p.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    pos_freqs = base**exponents  # (dim/2,)
    extrapolation = 1 - ramp  # (dim/2,) 1 = keep the original frequency
    inv_freq = (1.0 / (p.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (..., T) int -> cos, sin (..., T, head_dim), computed in fp32 then cast."""
    freqs = positions[..., None].float() * inv_freq.float()  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd); cos/sin (B or 1, T, rd), broadcast over heads. rd < hd (partial rotary)
    rotates the first rd channels and passes the rest through."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rd], cos, sin), x[..., rd:]), dim=-1)  # (B, nh, T, hd)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rd)
    x1, x2 = x[..., : rd // 2], x[..., rd // 2 :]  # (B, nh, T, rd/2) each
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, nh, T, rd)


class RotaryEmbedding(nn.Module):
    """Holds inv_freq as a non-persistent fp32 buffer; forward(positions, dtype) -> (cos, sin).

    "dynamic" copies transformers' `dynamic_rope_update` state machine: with L = max(positions)+1 over the
    whole batch, L > the cached length recomputes inv_freq for L and caches L (frequencies only grow, so
    a shorter sequence past max_position_embeddings keeps the longest one's); L < max_position_embeddings
    after growth resets to the original frequencies. L == max_position_embeddings resets nothing.
    Built on the meta device, call `to_empty(device=...)` then `reset_parameters()`."""

    def __init__(self, params: RopeParams):
        super().__init__()
        self.params = params
        self.register_buffer("inv_freq", torch.empty(params.head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, device: torch.device | str | None = None) -> None:
        """Recompute the original frequencies on the CPU (as transformers' init does), move them to `device`
        (default: the buffer's current device) and forget any dynamic growth."""
        inv_freq, self.attention_scaling = rope_inv_freq(self.params, device="cpu")
        self.inv_freq = inv_freq.to(device or self.inv_freq.device)  # (hd/2,)
        self.max_seq_len_cached = self.params.max_position_embeddings

    def _apply(self, fn, recurse=True):
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != inv_freq.dtype and not inv_freq.is_meta:  # model.to(bf16): keep fp32 frequencies
            self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin (B, T, rotary dim) in `dtype`."""
        if self.params.kind == "dynamic":
            seq_len, original = positions.max() + 1, self.params.max_position_embeddings  # 0-dim tensor
            if seq_len > self.max_seq_len_cached:  # growth
                self.inv_freq, self.attention_scaling = rope_inv_freq(self.params, seq_len, positions.device)
                self.max_seq_len_cached = int(seq_len)
            elif seq_len < original < self.max_seq_len_cached:  # reset
                self.reset_parameters()
        return rope_cos_sin(self.inv_freq, positions, self.attention_scaling, dtype)
