"""The decoder-only Transformer: one class tree whose variants all come from ModelConfig.

Transformer -> Block -> (Attention, MLP | MoE). Pre-norm residual blocks with RMSNorm (Llama,
Touvron et al. 2023); attention with RoPE (Su et al. 2021), grouped-query / multi-query heads
(Ainslie et al. 2023), optional q/k/v bias (Qwen2), optional q/k RMSNorm per head (Qwen3) or over
the whole projection (OLMoE), optional QKV clipping (OLMoE) and sliding windows for all or some
layers (Mistral, Qwen2); SwiGLU feed-forward or a sparse MoE layer (see moe.py).

The model knows nothing of tokenizers or files. Its forward takes token ids, their positions and a
KV cache view, and returns logits plus the router logits of MoE layers.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP, Linear, RMSNorm, linear
from .moe import MoE
from .rope import RopeParams, RotaryEmbedding, apply_rope


class KVCacheView(Protocol):
    """What attention needs from a cache; the engine owns the memory behind it."""

    length: int  # tokens already stored (the same for every sequence of the batch)
    static: bool  # True: fixed-size buffers written at `positions` (compilable); the caller tracks length
    keys_all_valid: bool  # every returned key slot holds a token at or before the queries (no padding)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, T, hd) for `positions` (B, T); return the key/value slots attention reads,
        (B, n_kv, L, hd), whose positions `key_positions` gives (unwritten slots are masked by position)."""
        ...

    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions of the key slots `update` returns for queries at `positions` (B, T): (L,) shared by
        the batch, or (B, L) per sequence; slots that hold nothing carry a position no query reaches."""
        ...

    def advance(self, n: int) -> None: ...

    # A view whose `packed` is True owns attention instead: the batch is one row (1, N) of every
    # sequence's new tokens, and `attend(layer, q, k, v, window)` stores k, v (1, n_kv, N, hd) and
    # returns each query's attention over its own sequence, (1, n_heads, N, hd). No mask is built.
    packed: bool


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab) float
    router_logits: tuple[torch.Tensor, ...]  # one (B*T, E) tensor per MoE layer; empty for dense


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.window = layer, cfg.window(layer)
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps), RMSNorm(self.hd, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_head * self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.hd, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv

    def forward(self, x, cos, sin, mask, cache: KVCacheView | None, positions: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, nh*hd), (B, T, nkv*hd) x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_head, self.hd)
        k = k.view(B, T, self.n_kv, self.hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, nh, T, hd)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        if cache is not None and cache.packed:
            y = cache.attend(self.layer, q, k, v, self.window)
        else:
            if cache is not None:
                k, v = cache.update(self.layer, k, v, positions)  # (B, nkv, L, hd)
            y = attention(q, k, v, mask)  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))  # (B, T, H)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with grouped KV heads: q (B, nh, T, hd), k/v (B, nkv, L, hd).

    PyTorch's fused kernel serves prompts. One query per row (decode) takes the plain formula: the
    fused CPU kernel costs ~0.1 ms a call for a single query (a third of a compiled decode step of
    the default model; 0.9 ms a layer for a masked batch of 16), and inductor fuses the formula into
    a few loops.
    """
    if q.shape[2] > 1 and not torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    # Query heads grouped by the KV head they share, as extra query rows: (B, nkv, g*T, hd).
    keep = None if mask is None else mask[:, :, None].expand(B, 1, nh // nkv, T, -1).flatten(2, 3)
    return plain_attention(q.reshape(B, nkv, -1, hd), k, v, keep).view(B, nh, T, hd)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over any leading batch dims: q (..., M, hd), k/v (..., L, hd), keep a
    boolean mask broadcastable to (..., M, L) (True = attend). Softmax in fp32."""
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (..., M, L)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.window = cfg.window(layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        if self.is_moe:
            self.mlp: nn.Module = MoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)

    def forward(self, x, cos, sin, masks, cache, positions):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks.get(self.window), cache, positions)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, router_logits = self.mlp(h)
            return x + h, router_logits
        return x + self.mlp(h), None


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None, full: bool = True
                   ) -> torch.Tensor | None:
    """Boolean (B, 1, T, L) mask, True where the query at q_pos (B, T) may see the key at k_pos (L,) or (B, L).
    `full`: every key slot is written (a growing cache), so one new token without a window needs no mask."""
    T = q_pos.shape[-1]
    if window is None and T == 1 and full:
        return None
    qp = q_pos[:, None, :, None]  # (B, 1, T, 1)
    if k_pos.dim() == 2:
        k_pos = k_pos[:, None, None, :]  # (B, 1, 1, L)
    mask = k_pos <= qp  # causal
    if window is not None:
        mask = mask & (k_pos > qp - window)  # the token itself and window-1 before it
    return mask


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(
            RopeParams.from_hf(cfg.rope_scaling, cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        )
        self.windows = sorted({cfg.window(i) for i in range(cfg.num_hidden_layers)}, key=lambda w: w or 0)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCacheView | None = None,
        num_logits_to_keep: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids (B, T); positions (B, T) default cached_len + arange(T); num_logits_to_keep > 0
        computes logits for only the last n positions (generation needs one); logits_at (B,) or (B, K)
        computes them at those indices of each row instead (a batch: each sequence's last new token)."""
        B, T = input_ids.shape
        static = cache is not None and cache.static
        if positions is None:
            if static:
                raise ValueError("a static KV cache needs explicit positions")
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = self.rotary(positions, x.dtype)  # (B, T, hd) each
        # Keys: cache slot j holds position j; without a cache the keys are the queries themselves.
        k_pos = cache.key_positions(positions) if cache is not None and not cache.packed else positions[0]
        full = cache is None or cache.keys_all_valid
        packed = cache is not None and cache.packed  # the cache view masks per sequence itself
        masks = {} if packed else {w: attention_mask(positions, k_pos, w, full=full) for w in self.windows}
        router_logits = []
        for block in self.layers:
            x, r = block(x, cos, sin, masks, cache, positions)
            if r is not None:
                router_logits.append(r)
        if cache is not None and not static:
            cache.advance(T)
        if logits_at is not None:
            at = logits_at if logits_at.dim() == 2 else logits_at[:, None]  # (B, K)
            x = x[torch.arange(B, device=x.device)[:, None], at]  # (B, K, H)
        elif num_logits_to_keep:
            x = x[:, -num_logits_to_keep:]
        x = self.norm(x)
        logits = linear(x, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(x)  # (B, T, V)
        return ModelOutput(logits.float(), tuple(router_logits))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> None:
        """Random initialisation for training from scratch (normal(0, std), norms at one)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
        self.rotary.reset_parameters()

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or the ones a token uses (MoE: top-k of the routed experts)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            cfg = self.config
            for block in self.layers:
                if block.is_moe:
                    per_expert = sum(p[0].numel() for p in block.mlp.experts.parameters())
                    total -= per_expert * (cfg.num_experts - cfg.num_experts_per_tok)
        return total
