"""LLMEngine: continuous batching over a paged KV cache, with prefix caching and chunked prefill.

vLLM's v1 model of scheduling: there is no prefill phase and no decode phase. Each request has
`num_computed` tokens catching up to its `num_tokens` (prompt + output so far); every step the
scheduler hands each running request, then each waiting one, as many of its missing tokens as the
token budget allows (one for a decoding request, a chunk for a prompt), so requests join and leave
the batch at every step. When the block pool runs dry, the newest running request is preempted (its
blocks freed, to be recomputed later) instead of failing. A new request first takes the longest
cached prefix of full blocks (`KVCacheManager.computed_prefix`).

The KV tensors live here: one (num_blocks * block_size, n_kv, hd) pool per layer for keys and one
for values; `PagedBatch` is the model's cache view for one step: it writes each new token to its
slot and gathers each sequence's keys through its block table (padded to the longest, masked by
position). Sampling is per request with its own seeded generator, so a request's output does not
depend on what else is in the batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.transformer import Transformer
from .block_pool import BlockPool, KVCacheManager
from .generate import ContextLengthError
from .sampler import Sampler, SamplingParams, token_logprobs

_FAR = 1 << 40  # key position of an empty slot: after every query, so always masked


@dataclass(slots=True, eq=False)  # identity, not field-wise equality
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    eos_ids: frozenset[int]
    max_new: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    num_computed: int = 0
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    logprobs: list = field(default_factory=list)  # per new token, if asked for: (logprob, [(id, logprob)])


class PagedBatch:
    """The model's KVCacheView for one engine step over the paged pools."""

    static = False
    keys_all_valid = False  # rows are padded to the longest sequence

    def __init__(self, k_pool: list[torch.Tensor], v_pool: list[torch.Tensor], write_slots: torch.Tensor,
                 read_slots: torch.Tensor, key_pos: torch.Tensor):
        self.k_pool, self.v_pool = k_pool, v_pool
        self.write_slots = write_slots  # (B, T) slot of each new token, -1 for padding
        self.read_slots = read_slots  # (B, L) slot of each key a row reads (padding -> slot 0, masked)
        self.key_pos = key_pos  # (B, L) position of each key, _FAR for padding
        self.length = 0

    def update(self, layer, k, v, positions):
        valid = self.write_slots >= 0  # (B, T)
        slots = self.write_slots[valid]
        self.k_pool[layer][slots] = k.transpose(1, 2)[valid]  # (n, nkv, hd)
        self.v_pool[layer][slots] = v.transpose(1, 2)[valid]
        keys = self.k_pool[layer][self.read_slots]  # (B, L, nkv, hd)
        values = self.v_pool[layer][self.read_slots]
        return keys.transpose(1, 2), values.transpose(1, 2)  # (B, nkv, L, hd)

    def key_positions(self, positions):
        return self.key_pos

    def advance(self, n: int) -> None:
        pass


class LLMEngine:
    def __init__(self, model: Transformer, eos_ids: frozenset[int] | set[int] = frozenset(), num_blocks: int | None = None,
                 block_size: int = 16, kv_cache_bytes: int = 1 << 30, max_batch_tokens: int = 512,
                 enable_prefix_caching: bool = True):
        cfg = model.config
        w = model.embed_tokens.weight
        per_block = 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * w.element_size()
        self.num_blocks = num_blocks or max(1, kv_cache_bytes // per_block)
        self.model, self.eos_ids, self.block_size = model, frozenset(eos_ids), block_size
        self.max_batch_tokens = max_batch_tokens
        shape = (self.num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_pool = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.num_hidden_layers)]
        self.v_pool = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.num_hidden_layers)]
        self.kv = KVCacheManager(BlockPool(self.num_blocks, enable_prefix_caching), block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        ctx = self.model.config.max_position_embeddings
        if not prompt_ids or len(prompt_ids) >= ctx:
            raise ContextLengthError(f"the prompt has {len(prompt_ids)} tokens; it must have 1 to {ctx - 1} "
                                     f"(the model's context window is {ctx})")
        if self.kv.blocks_needed(len(prompt_ids) + 1) > self.num_blocks:
            raise ContextLengthError(f"the prompt needs {self.kv.blocks_needed(len(prompt_ids) + 1)} KV blocks; "
                                     f"the cache has {self.num_blocks}; raise kv_cache_bytes")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, list(prompt_ids), params, Sampler(params, self.model.embed_tokens.weight.device),
                      frozenset() if params.ignore_eos else self.eos_ids,
                      min(params.max_new_tokens, ctx - len(prompt_ids)))
        self.requests[request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> None:
        """Drop a request at once and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- scheduling ----------------------------------------------------------------------------
    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.id)
        req.num_computed = 0  # recompute prompt + outputs when it runs again
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def schedule(self) -> list[tuple[Request, int]]:
        budget, out = self.max_batch_tokens, []
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running:  # preempted below as a victim
                continue
            n = min(len(req.tokens) - req.num_computed, budget)
            while not self.kv.allocate(req.id, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            else:
                out.append((req, n))
                budget -= n
        while self.waiting and budget > 0:
            req = self.waiting[0]
            prefix = self.kv.computed_prefix(req.tokens)
            computed = len(prefix) * self.block_size
            n = min(len(req.tokens) - computed, budget)
            if not self.kv.allocate(req.id, computed + n, prefix):
                break
            req.num_computed = computed
            self.waiting.popleft()
            self.running.append(req)
            out.append((req, n))
            budget -= n
        return out

    # -- one step ------------------------------------------------------------------------------
    def _batch(self, scheduled: list[tuple[Request, int]]):
        device = self.model.embed_tokens.weight.device
        B, T = len(scheduled), max(n for _, n in scheduled)
        L = max(r.num_computed + n for r, n in scheduled)
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        write = torch.full((B, T), -1, dtype=torch.long)
        read = torch.zeros(B, L, dtype=torch.long)
        key_pos = torch.full((B, L), _FAR, dtype=torch.long)
        for b, (req, n) in enumerate(scheduled):
            start, end = req.num_computed, req.num_computed + n
            ids[b, :n] = torch.tensor(req.tokens[start:end])
            pos[b, :n] = torch.arange(start, end)
            write[b, :n] = torch.tensor(self.kv.slots(req.id, range(start, end)))
            read[b, :end] = torch.tensor(self.kv.slots(req.id, range(end)))
            key_pos[b, :end] = torch.arange(end)
        view = PagedBatch(self.k_pool, self.v_pool, write.to(device), read.to(device), key_pos.to(device))
        last = torch.tensor([n - 1 for _, n in scheduled], device=device)
        return ids.to(device), pos.to(device), view, last

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        scheduled = self.schedule()
        if not scheduled:
            return []
        ids, pos, view, last = self._batch(scheduled)
        logits = self.model(ids, positions=pos, cache=view, logits_at=last).logits[:, 0]  # (B, V)
        outputs = []
        for b, (req, n) in enumerate(scheduled):
            req.num_computed += n
            self.kv.register_full_blocks(req.id, req.tokens, req.num_computed)
            if req.num_computed < len(req.tokens):
                continue  # a prompt chunk (or a recomputation) with more to come: no token yet
            history = torch.tensor(req.tokens) if req.params.repetition_penalty != 1.0 else None
            tok = req.sampler(logits[b], history, req.output_ids)
            lp = None
            if req.params.logprobs is not None:
                lp = token_logprobs(logits[b], tok, req.params.logprobs)
                req.logprobs.append(lp)
            req.output_ids.append(tok)
            if tok in req.eos_ids:
                req.finish_reason = "stop"
            elif len(req.output_ids) >= req.max_new:
                req.finish_reason = "length"
            outputs.append(RequestOutput(req.id, [tok], req.finish_reason is not None, req.finish_reason,
                                         [] if lp is None else [lp]))
            if req.finish_reason is not None:
                self.running.remove(req)
                self.kv.free(req.id)
                del self.requests[req.id]
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion as one continuously batched workload; outputs in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        base = len(self.requests)
        ids = [f"gen-{base}-{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {i: [] for i in ids}
        for rid, p, sp in zip(ids, prompts, plist):
            self.add_request(rid, p, sp)
        while any(r in self.requests for r in ids):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]


class AsyncLLMEngine:
    """asyncio front of one LLMEngine: add a request, iterate its outputs as they come, abort it.

    One background task runs engine steps in a worker thread (a step is a blocking model forward),
    so the event loop stays free for the server; each request's outputs go to its own queue.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.queues: dict[str, asyncio.Queue] = {}
        self.loop_task: asyncio.Task | None = None
        self.wakeup = asyncio.Event()
        self.lock = threading.Lock()  # add/abort must not interleave with a step in the worker thread

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        """Yield RequestOutputs of one request until it finishes; closing the iterator aborts it."""
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            self.engine.add_request(request_id, prompt_ids, params)
        self.queues[request_id] = queue
        self._ensure_loop()
        self.wakeup.set()
        try:
            while True:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            self.queues.pop(request_id, None)
            if request_id in self.engine.requests:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self.lock:
            self.engine.abort(request_id)
        queue = self.queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(RequestOutput(request_id, [], True, "abort"))

    def _ensure_loop(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run())

    def _step(self) -> list[RequestOutput]:
        with self.lock:
            return self.engine.step()

    async def _run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self._step)
            except Exception as e:  # a failed step fails its requests, not the loop
                for rid in list(self.queues):
                    self.queues[rid].put_nowait(e)
                    self.abort(rid)
                continue
            for out in outputs:
                queue = self.queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
