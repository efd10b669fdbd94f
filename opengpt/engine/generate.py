"""The generation loop: chunked prefill, then one token at a time through the KV cache.

Token-only: it sees ids, never text (stop strings are matched by the API's text stream). This is
the single loop of the codebase; the continuous-batching engine replaces its cache and batching
behind the same `Generation` iterator. The decode step can run eagerly or compiled (`CompiledDecoder`):
prefill stays eager, since prompt lengths vary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..model.transformer import Transformer
from .kv_cache import KVCache
from .sampler import Sampler, SamplingParams, token_logprobs


class ContextLengthError(ValueError):
    """A prompt that does not fit the model's context window."""


class CompiledDecoder:
    """One model's single-token decode step under torch.compile (inductor) over a static KV cache.

    Cache sizes are rounded up to `bucket` times a power of two, so that a handful of graphs serve
    every request length (a growing chat crosses a bucket rarely, and attention never reads more
    than twice the slots it needs); each is compiled on first use (about a minute for a 30-layer
    model on 2 cores; inductor keeps compiled kernels in its on-disk cache, so later processes
    start faster).
    """

    def __init__(self, model: Transformer, bucket: int = 256):
        self.model, self.bucket = model, bucket
        # Guards on the parameters cost ~0.8 ms a step (~7% of a bf16 step of the default model);
        # torch.compiler.skip_guard_on_all_nn_modules_unsafe would remove them, but in torch 2.13 it
        # fails at run time (KeyError) on MoE models, so the guards stay.
        self.step = torch.compile(self._forward, dynamic=False)

    def _forward(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.model(token, positions=position, cache=cache, num_logits_to_keep=1).logits

    def cache_len(self, n: int) -> int:
        size = self.bucket
        while size < n:
            size *= 2
        return size


class Generation:
    """Iterate to get new token ids; `finish_reason` is "stop" (EOS) or "length" afterwards."""

    def __init__(self, model: Transformer, prompt_ids: list[int], params: SamplingParams,
                 eos_ids: frozenset[int] | set[int] = frozenset(), prefill_chunk: int = 512,
                 compiled: CompiledDecoder | None = None):
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
        self.compiled = compiled
        self.finish_reason: str | None = None
        self.output_ids: list[int] = []
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []  # per output token, if asked for

    def _record(self, tok: int) -> bool:
        """Append an emitted token; True, with `finish_reason` set, when generation ends with it."""
        self.output_ids.append(tok)
        if tok in self.eos_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.max_new:
            self.finish_reason = "length"
        return self.finish_reason is not None

    def __iter__(self) -> Iterator[int]:
        model = self.model
        device = model.embed_tokens.weight.device
        dtype = model.embed_tokens.weight.dtype
        sampler = Sampler(self.params, device)
        n_prompt = len(self.prompt_ids)
        compiled = self.compiled
        size = n_prompt + self.max_new
        cache = KVCache(model.config, 1, compiled.cache_len(size) if compiled else size, dtype, device,
                        static=compiled is not None)
        history = torch.tensor(self.prompt_ids, device=device)
        penalize = self.params.repetition_penalty != 1.0
        with torch.inference_mode():
            ids = history[None]  # (1, T)
            for s in range(0, n_prompt, self.prefill_chunk):
                chunk = ids[:, s : s + self.prefill_chunk]
                positions = torch.arange(s, s + chunk.shape[1], device=device)[None]
                logits = model(chunk, positions=positions, cache=cache, num_logits_to_keep=1).logits
            for i in range(self.max_new):
                tok = sampler(logits[0, -1], history if penalize else None, self.output_ids)
                if self.params.logprobs is not None:
                    self.logprobs.append(token_logprobs(logits[0, -1], tok, self.params.logprobs))
                done = self._record(tok)
                yield tok
                if done:
                    return
                nxt = torch.tensor([[tok]], device=device)
                if penalize:
                    history = torch.cat([history, nxt[0]])
                if compiled:
                    logits = compiled.step(nxt, torch.tensor([[n_prompt + i]], device=device), cache)
                else:
                    logits = model(nxt, cache=cache, num_logits_to_keep=1).logits
