"""Speculative decoding: propose a few tokens cheaply, verify them in one forward of the target model.

Draft-and-verify (Leviathan et al. 2023; Chen et al. 2023) with two proposers:
- `NgramProposer`: prompt lookup decoding (Saxena 2023): find the latest earlier occurrence of the
  last n tokens in the text so far and propose what followed it. Free, and strong on inputs that
  repeat (code edits, summaries, RAG answers quoting their context).
- `DraftModelProposer`: a smaller model with the same vocabulary decodes k tokens greedily.

Verification here is greedy: the target takes [last token] + draft in one forward, keeps the draft
up to its first disagreement with the target's own choice, and adds the target's token at that
point. The output is therefore identical to plain greedy decoding (repetition penalty included) in
fp32, while each target forward can yield up to k + 1 tokens. In bf16 a (k+1)-token forward rounds
differently from one-token steps, so a near-tie can flip and the texts diverge from there (as in
any batch-variant bf16 engine). Rejected positions are rolled back by
shortening the cache. Sampling with temperature > 0 (rejection sampling) is not implemented yet.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..model.transformer import Transformer
from .generate import Generation
from .kv_cache import KVCache
from .sampler import Sampler, SamplingParams


class NgramProposer:
    def __init__(self, n: int = 3, k: int = 4, min_n: int = 1):
        self.n, self.k, self.min_n = n, k, min_n

    def propose(self, tokens: Sequence[int]) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
        for n in range(min(self.n, len(tokens) - 1), self.min_n - 1, -1):
            suffix = list(tokens[-n:])
            for start in range(len(tokens) - n - 1, -1, -1):  # latest occurrence first
                if list(tokens[start : start + n]) == suffix:
                    return list(tokens[start + n : start + n + self.k])
        return []

    def accept(self, tokens: Sequence[int]) -> None:
        pass


class DraftModelProposer:
    """Greedy drafts from a smaller model; keeps its own cache in step with the accepted tokens."""

    def __init__(self, model: Transformer, k: int = 4):
        self.model, self.k = model, k
        self.cache: KVCache | None = None
        self.fed: list[int] = []  # tokens whose K/V are in the draft cache

    def reset(self, max_len: int) -> None:
        w = self.model.embed_tokens.weight
        self.cache = KVCache(self.model.config, 1, max_len, w.dtype, w.device)
        self.fed = []

    def _feed(self, tokens: list[int]) -> torch.Tensor:
        ids = torch.tensor([tokens], device=self.model.embed_tokens.weight.device)
        self.fed += tokens
        return self.model(ids, cache=self.cache, num_logits_to_keep=1).logits[0, -1]

    def propose(self, tokens: Sequence[int]) -> list[int]:
        common = 0  # roll the draft cache back to the longest prefix it shares with `tokens`
        while common < min(len(self.fed), len(tokens) - 1) and self.fed[common] == tokens[common]:
            common += 1
        self.cache.length, self.fed = common, self.fed[:common]
        room = self.cache.max_len - len(tokens)
        k = min(self.k, room)
        if k <= 0:
            return []
        logits = self._feed(list(tokens[common:]))
        out = []
        for i in range(k):
            out.append(int(torch.argmax(logits)))
            if i < k - 1:
                logits = self._feed([out[-1]])
        return out

    def accept(self, tokens: Sequence[int]) -> None:
        pass


class SpeculativeGeneration(Generation):
    """Like Generation (same arguments, same output under greedy decoding), plus `stats`."""

    def __init__(self, model: Transformer, prompt_ids: list[int], params: SamplingParams,
                 proposer: NgramProposer | DraftModelProposer, eos_ids=frozenset(), prefill_chunk: int = 512):
        if not params.greedy or params.logprobs is not None:
            raise ValueError("speculative decoding is implemented for greedy decoding (temperature=0) "
                             "without logprobs only")
        super().__init__(model, prompt_ids, params, eos_ids, prefill_chunk)
        self.proposer = proposer
        self.stats = {"target_forwards": 0, "proposed": 0, "accepted": 0}

    def __iter__(self) -> Iterator[int]:
        model, params = self.model, self.params
        device = model.embed_tokens.weight.device
        n_prompt = len(self.prompt_ids)
        # room for a full draft past the last token we may emit
        k_max = getattr(self.proposer, "k", 8)
        cache = KVCache(model.config, 1, n_prompt + self.max_new + k_max + 1, model.embed_tokens.weight.dtype, device)
        if isinstance(self.proposer, DraftModelProposer):
            self.proposer.reset(cache.max_len)
        sampler = Sampler(params, device)
        tokens = list(self.prompt_ids)
        penalize = params.repetition_penalty != 1.0
        ctx = model.config.max_position_embeddings
        with torch.inference_mode():
            ids = torch.tensor([tokens], device=device)
            for s in range(0, n_prompt - 1, self.prefill_chunk):  # all but the last prompt token
                model(ids[:, s : min(s + self.prefill_chunk, n_prompt - 1)], cache=cache)
            while True:
                budget = self.max_new - len(self.output_ids)
                draft = self.proposer.propose(tokens)[: max(0, min(budget - 1, ctx - len(tokens) - 1))]
                feed = torch.tensor([[tokens[-1]] + draft], device=device)  # (1, 1 + d)
                start = cache.length
                logits = model(feed, cache=cache).logits[0]  # (1 + d, V)
                self.stats["target_forwards"] += 1
                self.stats["proposed"] += len(draft)
                new = []
                for i in range(len(draft) + 1):
                    history = torch.tensor(tokens + new, device=device) if penalize else None
                    tok = sampler(logits[i], history, self.output_ids + new)
                    new.append(tok)
                    if i == len(draft) or tok != draft[i]:
                        break
                self.stats["accepted"] += len(new) - 1
                cache.length = start + len(new)  # K/V of rejected draft tokens are dropped
                for tok in new:
                    tokens.append(tok)
                    done = self._record(tok)
                    yield tok
                    if done:
                        return
