"""The generation loop: chunked prefill, then one token at a time through the KV cache.

Token-only: it sees ids, never text (stop strings are matched by the API's text stream). This is
the single loop of the codebase; the continuous-batching engine replaces its cache and batching
behind the same `Generation` iterator.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model.transformer import Transformer
from .kv_cache import KVCache
from .sampler import Sampler, SamplingParams


class ContextLengthError(ValueError):
    """A prompt that does not fit the model's context window."""


class Generation:
    """Iterate to get new token ids; `finish_reason` is "stop" (EOS) or "length" afterwards."""

    def __init__(self, model: Transformer, prompt_ids: list[int], params: SamplingParams,
                 eos_ids: frozenset[int] | set[int] = frozenset(), prefill_chunk: int = 512):
        ctx = model.config.max_position_embeddings
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= ctx:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context window is {ctx} tokens "
                f"(prompt + at least one new token must fit); shorten the prompt"
            )
        self.model, self.params = model, params
        self.prompt_ids = prompt_ids
        self.eos_ids = frozenset() if params.ignore_eos else frozenset(eos_ids)
        self.max_new = min(params.max_new_tokens, ctx - len(prompt_ids))
        self.prefill_chunk = prefill_chunk
        self.finish_reason: str | None = None
        self.output_ids: list[int] = []

    def __iter__(self) -> Iterator[int]:
        model = self.model
        device = model.embed_tokens.weight.device
        dtype = model.embed_tokens.weight.dtype
        sampler = Sampler(self.params, device)
        cache = KVCache(model.config, 1, len(self.prompt_ids) + self.max_new, dtype, device)
        history = torch.tensor(self.prompt_ids, device=device)
        penalize = self.params.repetition_penalty != 1.0
        with torch.inference_mode():
            ids = history[None]  # (1, T)
            for s in range(0, ids.shape[1], self.prefill_chunk):
                logits = model(ids[:, s : s + self.prefill_chunk], cache=cache, num_logits_to_keep=1).logits
            for _ in range(self.max_new):
                tok = sampler(logits[0, -1], history if penalize else None)
                self.output_ids.append(tok)
                yield tok
                if tok in self.eos_ids:
                    self.finish_reason = "stop"
                    return
                if len(self.output_ids) == self.max_new:
                    break
                nxt = torch.tensor([[tok]], device=device)
                if penalize:
                    history = torch.cat([history, nxt[0]])
                logits = model(nxt, cache=cache, num_logits_to_keep=1).logits
        self.finish_reason = "length"
