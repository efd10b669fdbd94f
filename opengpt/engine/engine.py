"""LLMEngine: continuous batching over a paged KV cache, with prefix caching and chunked prefill.

vLLM's v1 model of scheduling: there is no prefill phase and no decode phase. Each request has
`num_computed` tokens catching up to its `num_tokens` (prompt + output so far); every step the
scheduler hands each running request, then each waiting one, as many of its missing tokens as the
token budget allows (one for a decoding request, a chunk for a prompt), so requests join and leave
the batch at every step. When the block pool runs dry, the newest running request is preempted (its
blocks freed, to be recomputed later) instead of failing. A new request first takes the longest
cached prefix of full blocks (`KVCacheManager.computed_prefix`).

The KV tensors live here: one (n_kv, num_blocks, block_size, hd) pool per layer for keys and one
for values; `PagedBatch` is the model's cache view for one step: the step's new tokens of every
request packed into one row (no padding), written to their slots, each attending over its own blocks.
Sampling is per request with its own seeded generator, so a request's output does not depend on
what else is in the batch.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.transformer import Transformer, attention, attention_mask, plain_attention
from .block_pool import BlockPool, KVCacheManager
from .generate import ContextLengthError
from .sampler import Sampler, SamplingParams, token_logprobs

@dataclass(slots=True, eq=False)  # identity, not field-wise equality
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    eos_ids: frozenset[int]
    max_new: int
    output_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # prompt + outputs, kept in step with output_ids
    logprobs: list = field(default_factory=list)
    num_computed: int = 0
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self.tokens = self.prompt_ids + self.output_ids


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    logprobs: list = field(default_factory=list)  # per new token, if asked for: (logprob, [(id, logprob)])
    error: str | None = None  # finish_reason "error": why this request failed (the others go on)


class RequestFailed(RuntimeError):
    """One request failed inside an engine step (its sampling raised); the batch went on without it."""


class PagedBatch:
    """The model's KVCacheView for one engine step: every scheduled request's new tokens packed into
    one row (1, N), so no token is padding; attention per request through its block table.

    Pools are (n_kv, num_blocks, block_size, hd) per layer, so gathering a batch's blocks yields keys
    already laid out for batched matmuls over (KV head, request), with no further copy. Requests with
    one new token (decoding) attend together with the plain formula; each prompt chunk attends on its
    own with PyTorch's fused kernel. Masks are built once per step and window, not per layer.
    """

    static = False
    keys_all_valid = False
    packed = True
    length = 0

    def __init__(self, engine: LLMEngine, scheduled: list[tuple[Request, int]], device):
        bs = engine.block_size
        self.k_pool, self.v_pool, self.bs = engine.k_pool, engine.v_pool, bs
        ids: list[int] = []
        write: list[int] = []
        self.positions: list[int] = []
        self.chunks: list[tuple[int, int, int, list[int]]] = []  # prompt chunks: (offset, n, start, table)
        dec_rows, dec_tables, dec_lens = [], [], []
        for req, n in scheduled:
            start, offset = req.num_computed, len(ids)
            table = engine.kv.block_table(req.id)
            ids += req.tokens[start : start + n]
            self.positions += range(start, start + n)
            write += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if n == 1:
                dec_rows.append(offset)
                dec_tables.append(table[: -(-(start + 1) // bs)])
                dec_lens.append(start + 1)
            else:
                self.chunks.append((offset, n, start, table[: -(-(start + n) // bs)]))
        self.device = device
        self.ids = torch.tensor([ids], device=device)
        self.pos = torch.tensor([self.positions], device=device)
        self.write = torch.tensor(write, device=device)
        self.dec_rows = torch.tensor(dec_rows, device=device) if dec_rows else None
        if dec_rows:
            width = max(len(t) for t in dec_tables)
            self.dec_tables = torch.tensor([t + [0] * (width - len(t)) for t in dec_tables], device=device)
            self.dec_lens = torch.tensor(dec_lens, device=device)[:, None]  # (Bd, 1)
            self.dec_kpos = torch.arange(width * bs, device=device)[None]  # (1, L)
        self.keep: dict = {}  # (row kind, window) -> boolean mask, shared by the layers

    def _keep(self, key, window: int | None) -> torch.Tensor:
        mask = self.keep.get((key, window))
        if mask is None:
            if key == "decode":  # the query sits at position len-1
                mask = self.dec_kpos < self.dec_lens
                if window is not None:
                    mask = mask & (self.dec_kpos >= self.dec_lens - window)
                mask = mask[None, :, None, :]  # (1, Bd, 1, L): broadcast over KV heads and grouped queries
            else:
                offset, n, start, _ = self.chunks[key]
                q_pos = torch.arange(start, start + n, device=self.device)[None]
                mask = attention_mask(q_pos, torch.arange(start + n, device=self.device), window)
            self.keep[(key, window)] = mask
        return mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
               ) -> torch.Tensor:
        k_pool, v_pool = self.k_pool[layer], self.v_pool[layer]  # (nkv, blocks, bs, hd)
        nkv, _, bs, hd = k_pool.shape
        k_pool.view(nkv, -1, hd)[:, self.write] = k[0]
        v_pool.view(nkv, -1, hd)[:, self.write] = v[0]
        q = q[0]  # (nh, N, hd)
        nh = q.shape[0]
        out = torch.empty_like(q)
        if self.dec_rows is not None:
            Bd = self.dec_rows.shape[0]
            qd = q[:, self.dec_rows].view(nkv, nh // nkv, Bd, hd).transpose(1, 2)  # (nkv, Bd, g, hd)
            keys = k_pool[:, self.dec_tables].view(nkv, Bd, -1, hd)  # (nkv, Bd, L, hd)
            values = v_pool[:, self.dec_tables].view(nkv, Bd, -1, hd)
            y = plain_attention(qd, keys, values, self._keep("decode", window))  # (nkv, Bd, g, hd)
            out[:, self.dec_rows] = y.transpose(1, 2).reshape(nh, Bd, hd)
        for i, (offset, n, start, table) in enumerate(self.chunks):
            blocks = torch.tensor(table, device=q.device)
            keys = k_pool[:, blocks].view(nkv, -1, hd)[None, :, : start + n]  # (1, nkv, L, hd)
            values = v_pool[:, blocks].view(nkv, -1, hd)[None, :, : start + n]
            out[:, offset : offset + n] = attention(q[None, :, offset : offset + n], keys, values,
                                                    self._keep(i, window))[0]
        return out[None]

    def update(self, layer, k, v, positions):
        raise NotImplementedError("a packed view attends itself (see attend)")

    def key_positions(self, positions):
        raise NotImplementedError("a packed view builds its own masks")

    def advance(self, n: int) -> None:
        pass


class LLMEngine:
    def __init__(self, model: Transformer, eos_ids: frozenset[int] | set[int] = frozenset(), num_blocks: int | None = None,
                 block_size: int = 16, kv_cache_bytes: int = 1 << 30, max_batch_tokens: int = 512,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 256):
        """kv_cache_bytes: the pool's budget, or num_blocks exactly. The pool never takes more than
        max_num_seqs full-context sequences need (a tiny model must not allocate a GiB of blocks).
        max_batch_tokens: tokens computed per step (decode tokens + prompt chunks); max_num_seqs:
        requests running at once."""
        cfg = model.config
        w = model.embed_tokens.weight
        per_block = 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * w.element_size()
        most_useful = max_num_seqs * -(-cfg.max_position_embeddings // block_size)
        self.num_blocks = num_blocks or max(1, min(kv_cache_bytes // per_block, most_useful))
        self.model, self.eos_ids, self.block_size = model, frozenset(eos_ids), block_size
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        shape = (cfg.num_key_value_heads, self.num_blocks, block_size, cfg.head_dim)
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
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
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
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        scheduled = self.schedule()
        if not scheduled:
            return []
        device = self.model.embed_tokens.weight.device
        view = PagedBatch(self, scheduled, device)
        # Logits only where a token is sampled: each request whose computed tokens catch up this step.
        ends = itertools.accumulate(n for _, n in scheduled)
        sampling = [(b, end - 1) for b, ((req, n), end) in enumerate(zip(scheduled, ends))
                    if req.num_computed + n == len(req.tokens)]
        logits = None
        if sampling:
            at = torch.tensor([[i for _, i in sampling]], device=device)
            logits = self.model(view.ids, positions=view.pos, cache=view, logits_at=at).logits[0]  # (K, V)
        else:
            self.model(view.ids, positions=view.pos, cache=view, num_logits_to_keep=1)
        row = {b: k for k, (b, _) in enumerate(sampling)}
        outputs = []
        for b, (req, n) in enumerate(scheduled):
            req.num_computed += n
            self.kv.register_full_blocks(req.id, req.tokens, req.num_computed)
            if req.num_computed < len(req.tokens):
                continue  # a prompt chunk (or a recomputation) with more to come: no token yet
            history = torch.tensor(req.tokens) if req.params.repetition_penalty != 1.0 else None
            try:
                tok = req.sampler(logits[row[b]], history, req.output_ids)
            except Exception as e:  # e.g. a logits processor that raised: fail this request, not the batch
                outputs.append(RequestOutput(req.id, [], True, "error", error=f"{type(e).__name__}: {e}"))
                self.abort(req.id)
                continue
            lp = None
            if req.params.logprobs is not None:
                lp = token_logprobs(logits[row[b]], tok, req.params.logprobs)
                req.logprobs.append(lp)
            req.output_ids.append(tok)
            req.tokens.append(tok)
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
                if out.error and out.request_id in results:
                    raise RequestFailed(f"request {out.request_id}: {out.error}")
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]


class AsyncLLMEngine:
    """asyncio front of one LLMEngine: add a request, iterate its outputs as they come, abort it.

    One background task runs engine steps in a worker thread (a step is a blocking model forward),
    so the event loop stays free for the server; each request's outputs go to its own queue.
    Adds and aborts never wait for a step: while one is in flight they are queued and applied, in
    order, by the loop task as soon as it returns, before the next step starts (vLLM's engine core
    does the same). Waiting on the step instead froze the whole event loop for a step per add, so
    64 clients arriving together were admitted one per step.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.queues: dict[str, asyncio.Queue] = {}
        self.loop_task: asyncio.Task | None = None
        self.wakeup = asyncio.Event()
        self.lock = threading.Lock()  # engine steps (worker thread) vs other users of the model (embeddings)
        self.pending: deque[tuple] = deque()  # ("add", id, prompt, params) | ("abort", id), applied between steps
        self.stepping = False  # a step is running in the worker thread

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        """Yield RequestOutputs of one request until it finishes; closing the iterator aborts it."""
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        self.pending.append(("add", request_id, prompt_ids, params))
        try:
            if not self.stepping:  # no step in flight: add now, so a refused request raises here
                for rid, error in self._apply_pending():
                    if rid == request_id:
                        raise error
                    self._deliver(rid, error)
            self._ensure_loop()
            self.wakeup.set()
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
        """Stop a request: its blocks are freed now, or right after the step in flight."""
        self.pending.append(("abort", request_id))
        if not self.stepping:
            for rid, error in self._apply_pending():
                self._deliver(rid, error)
        queue = self.queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(RequestOutput(request_id, [], True, "abort"))

    def _apply_pending(self) -> list[tuple[str, BaseException]]:
        """Apply queued adds and aborts in order; never called while a step runs. Returns the adds the
        engine refused, with their errors. An add whose caller has gone (no queue) is skipped."""
        failed = []
        with self.lock:
            while self.pending:
                op = self.pending.popleft()
                if op[0] == "abort":
                    self.engine.abort(op[1])
                elif op[1] in self.queues:
                    try:
                        self.engine.add_request(*op[1:])
                    except Exception as e:  # a refused request fails alone
                        failed.append((op[1], e))
        return failed

    def _deliver(self, request_id: str, item) -> None:
        queue = self.queues.get(request_id)
        if queue is not None:
            queue.put_nowait(item)

    def _ensure_loop(self) -> None:
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.get_running_loop().create_task(self._run())

    def _step(self) -> list[RequestOutput]:
        with self.lock:
            return self.engine.step()

    async def _run(self) -> None:
        while True:
            for rid, error in self._apply_pending():
                self._deliver(rid, error)
            if not self.engine.has_unfinished():
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            self.stepping = True
            try:
                outputs = await asyncio.to_thread(self._step)
            except Exception as e:  # a failed step fails its requests, not the loop
                self.stepping = False
                for rid in list(self.queues):
                    self.queues[rid].put_nowait(e)
                    self.abort(rid)
                continue
            finally:
                self.stepping = False
            for out in outputs:
                queue = self.queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(RequestFailed(out.error) if out.error else out)
