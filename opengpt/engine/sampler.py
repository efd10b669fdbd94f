"""Sampling parameters and the per-step token choice.

The processing order follows transformers' `generate` so that seeded runs are comparable:
repetition penalty (Keskar et al. 2019), then temperature, top-k, top-p (nucleus, Holtzman et al.
2020) and min-p (Nguyen et al. 2024). Temperature 0 is greedy. Each request owns a seeded
torch.Generator, so its samples do not depend on anything else the process does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

# A logits processor sees the ids generated so far and the next token's logits (vocab,) and returns
# the logits to sample from (guided decoding masks with -inf; it must not modify its input in place).
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


class SamplingError(ValueError):
    """An invalid sampling parameter; the message names it and its valid range."""


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from the logit of every generated token
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence among generated tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    logprobs: int | None = None  # None: off; n >= 0: the chosen token's logprob and the n most likely
    logits_processors: list[LogitsProcessor] = field(default_factory=list)  # applied first, in order

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_new_tokens", self.max_new_tokens, isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_k", self.top_k, isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0 (0 disables it)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1 disables it)"),
            ("min_p", self.min_p, 0 <= self.min_p < 1, "in [0, 1) (0 disables it)"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0 (1 disables it)"),
            ("presence_penalty", self.presence_penalty, -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", self.frequency_penalty, -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("logprobs", self.logprobs, self.logprobs is None or 0 <= self.logprobs <= 20, "None or 0..20"),
        ]
        for name, value, ok, valid in checks:
            if not ok:
                raise SamplingError(f"invalid {name}={value!r}: must be {valid}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError(f"invalid stop={self.stop!r}: must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def token_logprobs(logits: torch.Tensor, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` and the `top_n` most likely (id, logprob), under the model's own
    distribution (before penalties, temperature and truncation), as the OpenAI API reports them."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, top_n) if top_n else None
    return float(lp[token]), ([] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))


class Sampler:
    """Chooses the next token of one sequence; holds the request's generator."""

    def __init__(self, params: SamplingParams, device="cpu"):
        self.p = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None, output_ids: Sequence[int] = ()) -> int:
        """logits (vocab,) float; history (n,) the prompt and generated ids (for the repetition
        penalty); output_ids the generated ids (for logits processors and OpenAI's penalties)."""
        p = self.p
        for proc in p.logits_processors:
            logits = proc(output_ids, logits)
        if (p.presence_penalty or p.frequency_penalty) and len(output_ids):
            ids, counts = torch.tensor(list(output_ids), device=logits.device).unique(return_counts=True)
            logits = logits.clone()
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
        if p.repetition_penalty != 1.0 and history is not None and history.numel():
            logits = logits.clone()
            seen = logits[history]
            logits[history] = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove = cum <= 1 - p.top_p
            remove[-1] = False  # always keep the most likely token
            logits = logits.masked_fill(remove.scatter(0, idx, remove), float("-inf"))
        probs = logits.softmax(-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if not bool(torch.isfinite(probs).all()) or not bool(probs.sum() > 0):
            raise SamplingError("the sampling distribution is not finite (every token masked, or an extreme "
                                "temperature/penalty overflowed); check the request's sampling parameters")
        return int(torch.multinomial(probs, 1, generator=self.generator))
