"""Sparse Mixture-of-Experts feed-forward: top-k router, stacked experts, optional shared expert.

Follows the Switch/GShard family as used by Mixtral (Jiang et al. 2024), Qwen2-MoE/Qwen3-MoE and
OLMoE (Muennighoff et al. 2024). The router takes a softmax over all experts, keeps the top k and
optionally renormalises them. Experts are stored as stacked weights (E, out, in). Many tokens are
dispatched by sorting the (token, slot) pairs by expert, so each expert runs one matmul over exactly
the tokens routed to it: no dense all-experts compute and no per-expert mask over every token. A
single token (decode) skips the dispatch and runs its k experts directly on the stacked weights, and
a compiled decode step indexes them: decode costs about what a dense MLP with the same active
parameters costs (benchmarks/moe.py). The training losses (Switch load balancing, ST-MoE router
z-loss) live here beside the router that produces them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP, Linear, activation


class Router(nn.Module):
    """Linear gate -> softmax -> top-k (-> renormalise)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k, self.normalize = top_k, normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)  # softmax in fp32, as the reference models do
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(x.dtype), experts


class Experts(nn.Module):
    """E SwiGLU experts as three stacked weight tensors, HF (out, in) layout per expert."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act = activation(act)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H); experts, weights (N, k): each token's chosen experts and their router weights."""
        if torch.compiler.is_compiling():
            return self._gathered(x, experts, weights)
        if x.shape[0] == 1:
            return self._direct(x, experts, weights)
        return self._grouped(x, experts, weights)

    def _expert(self, e: int, h: torch.Tensor) -> torch.Tensor:
        """Expert e on rows h (n, H) -> (n, H), straight from the stacked weights (views, no copy)."""
        return F.linear(self.act(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]), self.down_proj[e])

    def _grouped(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Many tokens (prefill, a batch): sort the (token, slot) pairs by expert, one matmul per expert
        over exactly its tokens, then scatter-add the weighted rows back to their tokens."""
        k = experts.shape[1]
        flat = experts.flatten()  # (N*k,) expert of each (token, slot)
        order = torch.argsort(flat, stable=True)  # group slots by expert
        token = order // k  # (N*k,) token of each grouped slot
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        xs = x[token]  # (N*k, H) tokens sorted by expert
        outs = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            outs.append(self._expert(e, xs[start : start + n]))  # (n, H)
            start += n
        ys = torch.cat(outs) * weights.flatten()[order, None]  # (N*k, H) weighted by router
        return torch.zeros_like(x).index_add_(0, token, ys)

    def _direct(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token (a decode step): its k experts as 3k matrix-vector products on the stacked weights.

        The grouped dispatch adds eight small ops a layer (sort, count, gather, concatenate, scatter),
        each an OpenMP region that stalls when the CPU is shared: on a 30-layer, 8-expert top-2 model
        they made bf16 eager decode 1.27x slower than the dense twin, 1.08x without them. Experts are
        summed in increasing id, the order `_grouped` adds them in, so a token rounds the same way
        whether it is decoded alone or in a batch (up to the matmul kernels' own rounding)."""
        y = None
        for e, j in sorted(zip(experts[0].tolist(), range(experts.shape[1]))):
            ye = self._expert(e, x) * weights[:, j, None]  # (1, H)
            y = ye if y is None else y + ye
        return y

    def _gathered(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Compilable form for the few tokens of a decode step: group sizes are data-dependent, which
        tracing cannot follow, so gather the k chosen experts' weights per token instead (the same
        bytes a grouped matmul would read when each token goes to its own experts)."""
        gate, up, down = self.gate_proj[experts], self.up_proj[experts], self.down_proj[experts]  # (N, k, ., .)
        h = self.act(torch.einsum("nh,nkih->nki", x, gate)) * torch.einsum("nh,nkih->nki", x, up)  # (N, k, I)
        y = torch.einsum("nki,nkhi->nkh", h, down)  # (N, k, H)
        return (y * weights[..., None]).sum(1)  # (N, H)


class MoE(nn.Module):
    """Router + experts (+ sigmoid-gated shared expert). Returns (output, router_logits)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, cfg.hidden_act, cfg.mlp_bias)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H = x.shape
        x = x.reshape(-1, H)  # (N, H)
        logits, weights, experts = self.router(x)
        y = self.experts(x, experts, weights)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.view(B, T, H), logits


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss: E * sum_e (fraction routed to e) * (mean prob of e)."""
    logits = torch.cat(router_logits)  # (layers*N, E)
    E = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, E).sum(1).float()  # (M, E)
    return E * (chosen.mean(0) / top_k * probs.mean(0)).sum()


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits, keeps them small and stable."""
    logits = torch.cat(router_logits).float()
    return torch.logsumexp(logits, dim=-1).square().mean()
