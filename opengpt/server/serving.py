"""OpenAI semantics over the AsyncLLMEngine: requests become prompts and SamplingParams, engine
outputs become choices, chunks, usage and logprobs.

One choice is one engine request. Text is produced per choice with the tokenizer's UTF-8-safe
StreamDecoder and cut at stop strings (api.TextStream: the engine is token-only); a choice that
reaches a stop string is aborted at once, so its KV blocks are freed. Every path that leaves a
generation early (stop string, timeout, client gone, error) closes the engine iterator, and closing
it aborts the request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from ..api import LLM, TextStream
from ..engine.engine import AsyncLLMEngine
from ..engine.generate import ContextLengthError
from ..engine.sampler import SamplingError, SamplingParams
from ..tokenizer import TokenizerError
from . import tools as T
from .metrics import ServerMetrics
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest


@dataclass
class EventStream:
    """A streamed response: its server-sent events, and what to call once it is over (started or not)."""

    events: AsyncIterator[str]
    close: Callable[[], None]


@dataclass
class Delta:
    """What one engine step added to one choice."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token, engine logprob tuple) of the tokens shown
    finish_reason: str | None = None


class Admission:
    """A bounded FIFO in front of the engine: at most `capacity` sequences generate at once, at most
    `max_waiting` requests wait for a slot; past that a request is refused (429) at once."""

    def __init__(self, capacity: int, max_waiting: int):
        self.capacity, self.max_waiting = capacity, max_waiting
        self.used = 0
        self.queue: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, n: int) -> int:
        n = min(n, self.capacity)  # a request wider than the server runs when it is alone
        if not self.queue and self.used + n <= self.capacity:
            self.used += n
            return n
        if len(self.queue) >= self.max_waiting:
            raise APIError(429, f"the server is at capacity ({self.capacity} running, {len(self.queue)} waiting); "
                                "retry later", code="server_overloaded", headers={"Retry-After": "1"})
        fut = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self.queue.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled: hand it back
                self.release(n)
            else:
                self.queue.remove(entry)
            raise
        return n

    def release(self, n: int) -> None:
        self.used -= n
        while self.queue and self.used + self.queue[0][0] <= self.capacity:
            m, fut = self.queue.popleft()
            if not fut.done():
                self.used += m
                fut.set_result(None)


MIN_TEMPERATURE = 1e-5  # below this, logits / temperature overflow: sample greedily (as vLLM does)


def _now() -> int:
    return int(time.time())


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class OpenAIServing:
    def __init__(self, llm: LLM, aengine: AsyncLLMEngine, config, metrics: ServerMetrics):
        self.llm, self.aengine, self.config, self.metrics = llm, aengine, config, metrics
        self.tokenizer = llm.tokenizer
        self.ctx = llm.config.max_position_embeddings
        self.vocab = llm.config.vocab_size
        self.admission = Admission(config.max_concurrency, config.max_queue)
        self.template_has_tools = T.template_supports_tools(llm.tokenizer.chat_template)
        self.token_str = lru_cache(maxsize=1 << 16)(
            lambda i: self.tokenizer.decode([i], skip_special_tokens=False))

    # -- shared pieces ---------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in self.config.model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.config.model_names))} (see GET /v1/models)",
                           param="model", code="model_not_found")

    def budget(self, n_prompt: int, max_tokens: int | None, param: str = "max_tokens") -> int:
        """New tokens a choice may generate; a prompt or request over the context window is a 400."""
        if n_prompt >= self.ctx:
            raise APIError(400, f"this model's maximum context length is {self.ctx} tokens; the prompt has "
                                f"{n_prompt} tokens. Shorten the prompt.", param="messages",
                           code="context_length_exceeded")
        kv = self.aengine.engine.kv
        if kv.blocks_needed(n_prompt + 1) > self.aengine.engine.num_blocks:
            raise APIError(400, f"the prompt has {n_prompt} tokens, more than this server's KV cache holds "
                                f"({self.aengine.engine.num_blocks * kv.block_size} tokens); shorten the prompt",
                           param="messages", code="context_length_exceeded")
        if max_tokens is not None and n_prompt + max_tokens > self.ctx:
            raise APIError(400, f"this model's maximum context length is {self.ctx} tokens; you requested "
                                f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} for the "
                                f"completion). Lower {param} or shorten the prompt.", param=param,
                           code="context_length_exceeded")
        return max_tokens if max_tokens is not None else self.ctx - n_prompt

    def sampling(self, req, max_new: int, choice: int, logprobs: int | None, processors: list) -> SamplingParams:
        bias = self._logit_bias(req.logit_bias)
        try:
            return SamplingParams(
                max_new_tokens=max_new, temperature=req.temperature if req.temperature >= MIN_TEMPERATURE else 0.0, top_p=req.top_p, top_k=req.top_k,
                min_p=req.min_p, repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, seed=None if req.seed is None else req.seed + choice,
                stop=self.stops(req), ignore_eos=req.ignore_eos, logprobs=logprobs,
                logits_processors=([bias] if bias else []) + processors)
        except SamplingError as e:
            raise APIError(400, str(e)) from None

    @staticmethod
    def stops(req) -> list[str]:
        return [req.stop] if isinstance(req.stop, str) else list(req.stop or [])

    def _logit_bias(self, bias: dict[str, float] | None):
        if not bias:
            return None
        try:
            ids = [int(k) for k in bias]
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
        if any(not 0 <= i < self.vocab for i in ids):
            raise APIError(400, f"logit_bias token ids must be in [0, {self.vocab})", param="logit_bias")
        idx, val = torch.tensor(ids), torch.tensor(list(bias.values()))

        def apply(_output_ids, logits: torch.Tensor) -> torch.Tensor:
            out = logits.clone()
            out[idx.to(out.device)] += val.to(out.device, out.dtype)
            return out

        return apply

    async def generate(self, rid: str, prompt_ids: list[int], params: SamplingParams, stops: list[str],
                       t0: float, monitor=None, sources: list[str] | None = None) -> AsyncIterator[Delta]:
        """Text deltas of one choice; the last one carries the finish reason. A safety `monitor`
        (assist.safety.Monitor) sees every delta before it is shown: it may hold back a possible PII
        tail, or stop the choice here ("content_filter", and the engine request is aborted)."""
        eos = self.tokenizer.eos_token_ids
        text = TextStream(self.tokenizer, prompt_ids, stops)
        last = None
        try:
            async with aclosing(self.aengine.generate(rid, prompt_ids, params)) as outputs:
                async for out in outputs:
                    now = time.perf_counter()
                    n = len(out.new_token_ids)
                    if n:
                        self.metrics.generation_tokens.inc(n)
                        if last is None:
                            self.metrics.ttft.observe(now - t0)
                        else:
                            self.metrics.tpot.observe((now - last) / n)
                        last = now
                    d = Delta(token_ids=list(out.new_token_ids))
                    for k, tok in enumerate(out.new_token_ids):
                        if out.logprobs and (tok not in eos or params.ignore_eos):  # EOS is not shown
                            d.logprobs.append((tok, out.logprobs[k]))
                        piece, stopped = text.push(tok)
                        d.text += piece
                        if stopped:
                            d.finish_reason = "stop"
                            break
                    if d.finish_reason is None and out.finished:
                        d.text += text.flush()
                        d.finish_reason = "stop" if out.finish_reason == "abort" else out.finish_reason
                    if monitor is not None:
                        step = monitor.push(d.text)
                        d.text = step.text
                        if step.stop:
                            d.finish_reason = "content_filter"
                        elif d.finish_reason is not None:  # the output layer: held-back tail, disclaimer
                            verdict = monitor.finish(sources)
                            d.text += verdict.text
                            d.finish_reason = "content_filter" if verdict.refusal else d.finish_reason
                    yield d
                    if d.finish_reason is not None:
                        return
        except ContextLengthError as e:  # the prompt does not fit the KV cache
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        finally:
            if last is not None:
                self.metrics.e2e.observe(time.perf_counter() - t0)

    async def until_deadline(self, streams: list[AsyncIterator[Delta]], deadline: float):
        """`merged(streams)` until they end, or until `deadline` (perf_counter time): then one last
        (None, the 504 timeout event) and the streams are closed, which aborts their requests."""
        async with aclosing(self.merged(streams)) as gen:
            while True:
                try:
                    yield await asyncio.wait_for(gen.__anext__(), max(deadline - time.perf_counter(), 0.001))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    yield None, _sse(APIError(504, f"the request ran past its {self.config.request_timeout:g} s "
                                                   "timeout", code="timeout").body())
                    return

    async def merged(self, streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) from several choices as they come."""
        if len(streams) == 1:
            async with aclosing(streams[0]) as s:
                async for d in s:
                    yield 0, d
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: AsyncIterator[Delta]) -> None:
            try:
                async with aclosing(s):
                    async for d in s:
                        queue.put_nowait((i, d))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises
                queue.put_nowait((i, e))
                return
            queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            live = len(tasks)
            while live:
                i, item = await queue.get()
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def chat_logprobs(self, lps: list) -> list[dict]:
        def entry(tok: int, lp: float) -> dict:
            s = self.token_str(tok)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return [{**entry(tok, lp), "top_logprobs": [entry(i, v) for i, v in top]} for tok, (lp, top) in lps]

    # -- chat ------------------------------------------------------------------------------------
    def chat_prompt(self, req: ChatCompletionRequest) -> tuple[list[int], list[dict] | None]:
        if not self.tokenizer.has_chat_template:
            raise APIError(400, "this model has no chat template, so it cannot format chat messages (it is probably "
                                "a base model); use /v1/completions with a raw prompt", param="messages")
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        if tools is not None and req.tool_choice == "none":
            tools = None  # the model is not to call tools: it is not shown them
        try:
            msgs = T.chat_messages(req.messages, tools, self.template_has_tools)
            ids = self.tokenizer.encode_chat(msgs, tools=tools if self.template_has_tools else None)
        except (TokenizerError, ValueError) as e:
            raise APIError(400, str(e), param="messages") from None
        return ids, tools

    def guided(self, req: ChatCompletionRequest, tools: list[dict] | None) -> tuple[dict | None, str]:
        """(JSON schema the output must follow, output kind: text | json | named | required)."""
        choice = req.tool_choice
        if tools is not None and choice is not None and choice not in ("auto", "none"):
            named = choice != "required"
            try:
                schema = T.forced_schema(tools, choice.function.name if named else choice, req.parallel_tool_calls)
                return schema, "named" if named else "required"
            except ValueError as e:
                raise APIError(400, str(e), param="tool_choice") from None
        if choice is not None and choice not in ("auto", "none") and tools is None:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return None, "text"
        if fmt.type == "json_object":
            return {"type": "object"}, "json"
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        return (fmt.json_schema.schema_ if fmt.json_schema.schema_ is not True else {}), "json"

    def processors(self, schema: dict | None, max_new: int) -> list:
        if schema is None:
            return []
        from ..engine.guided import GuidedError, json_processor

        try:  # one token of the budget is kept for EOS, so a complete JSON ends as "stop", not "length"
            return [json_processor(schema, self.tokenizer, self.vocab, max(max_new - 1, 1))]
        except GuidedError as e:
            raise APIError(400, str(e), param="response_format") from None

    async def chat(self, req: ChatCompletionRequest, safety=None, route: str | None = None,
                   sources: list[str] | None = None, question: str | None = None):
        """A full response dict, or an async iterator of SSE lines when req.stream. With a safety
        Pipeline, each text choice is watched by its monitor while it generates (server.assistant
        runs the input layer before this and passes the fact check's sources and question)."""
        t0 = time.perf_counter()
        self.check_model(req.model)
        prompt_ids, tools = self.chat_prompt(req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_new = self.budget(len(prompt_ids), req.max_completion_tokens or req.max_tokens, param)
        schema, kind = self.guided(req, tools)
        auto_tools = tools is not None and kind == "text" and req.tool_choice in (None, "auto")
        names = {t["function"]["name"] for t in tools or []}
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = [self.sampling(req, max_new, i, top, self.processors(schema, max_new)) for i in range(req.n)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        slots = await self.admission.acquire(req.n)
        self.metrics.prompt_tokens.inc(len(prompt_ids) * req.n)
        # Forced calls are JSON arguments, not prose: the monitor watches text answers only.
        monitors = [safety.monitor(route, f"{rid}-{i}", question) if safety is not None and kind == "text" else None
                    for i in range(req.n)]
        streams = [self.generate(f"{rid}-{i}", prompt_ids, p, p.stop, t0, monitors[i], sources)
                   for i, p in enumerate(params)]
        base = {"id": rid, "created": _now(), "model": req.model, "system_fingerprint": None}
        if req.stream:
            return EventStream(self._chat_stream(streams, base, len(prompt_ids), kind, auto_tools, names, req),
                               lambda: self.admission.release(slots))
        try:
            texts, finish, lps, counts = [""] * req.n, [None] * req.n, [[] for _ in params], [0] * req.n
            async for i, d in self.merged(streams):
                texts[i] += d.text
                lps[i] += d.logprobs
                counts[i] += len(d.token_ids)
                finish[i] = d.finish_reason or finish[i]
        finally:
            self.admission.release(slots)
        choices = []
        for i in range(req.n):
            message: dict[str, Any] = {"role": "assistant", "content": texts[i]}
            if monitors[i] is not None and any(d.action == "block" for d in monitors[i].decisions):
                texts[i] = message["content"] = monitors[i].policy.refusal  # nothing was shown yet: refuse whole
            calls = self._calls(texts[i], kind, auto_tools, names, req)
            if calls is not None:
                message["content"], calls = calls
                if calls:
                    message["tool_calls"] = [self._tool_call(n, a) for n, a in calls]
                    finish[i] = "tool_calls" if finish[i] == "stop" else finish[i]
            choices.append({"index": i, "message": message, "finish_reason": finish[i],
                            "logprobs": {"content": self.chat_logprobs(lps[i]), "refusal": None} if req.logprobs else None})
        out = {**base, "object": "chat.completion", "choices": choices,
               "usage": self._usage(len(prompt_ids) * 1, sum(counts))}
        decisions = [d.to_dict() for m in monitors if m is not None for d in m.decisions]
        if decisions:
            out["safety"] = {"output": decisions}
        return out

    def _calls(self, text: str, kind: str, auto_tools: bool, names: set[str], req) -> tuple | None:
        """(content, calls) when the output is to be read as tool calls, else None."""
        if kind in ("named", "required"):
            calls = T.forced_calls(text, req.tool_choice.function.name if kind == "named" else "required")
            return (None, calls) if calls else (text, [])
        if auto_tools:
            return T.parse_tool_calls(text, names)
        return None

    @staticmethod
    def _tool_call(name: str, arguments: str) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": arguments}}

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _chat_stream(self, streams, base: dict, n_prompt: int, kind: str, auto_tools: bool, names: set[str],
                           req: ChatCompletionRequest) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        usage_field = {"usage": None} if include_usage else {}
        completion = 0
        parsers = [T.ToolCallStream(names) if auto_tools else None for _ in streams]
        text = [""] * len(streams)  # the output of forced "required" calls, parsed at the end
        ncalls = [0] * len(streams)
        deadline = time.perf_counter() + self.config.request_timeout

        def chunk(i: int, delta: dict, finish: str | None = None, logprobs: list | None = None) -> str:
            choice = {"index": i, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                      "finish_reason": finish}
            return _sse({**base, "object": "chat.completion.chunk", "choices": [choice], **usage_field})

        def call_chunks(i: int, name: str, args: str) -> list[str]:
            c = self._tool_call(name, "")
            k, ncalls[i] = ncalls[i], ncalls[i] + 1
            return [chunk(i, {"tool_calls": [{"index": k, **c}]}),
                    chunk(i, {"tool_calls": [{"index": k, "function": {"arguments": args}}]})]

        try:
            for i in range(len(streams)):
                yield chunk(i, {"role": "assistant", "content": ""})
                if kind == "named":  # the whole output is the arguments: announce the call first
                    c = self._tool_call(req.tool_choice.function.name, "")
                    ncalls[i] = 1
                    yield chunk(i, {"tool_calls": [{"index": 0, **c}]})
            async with aclosing(self.until_deadline(streams, deadline)) as deltas:
                async for i, d in deltas:
                    if i is None:  # the deadline passed: d is the 504 event
                        yield d
                        break
                    completion += len(d.token_ids)
                    lp = self.chat_logprobs(d.logprobs) if req.logprobs else None
                    out: list[str] = []
                    if kind == "named":
                        if d.text or lp:
                            out.append(chunk(i, {"tool_calls": [{"index": 0, "function": {"arguments": d.text}}]},
                                             logprobs=lp))
                    elif kind == "required":
                        text[i] += d.text
                        if d.finish_reason is not None:
                            calls = T.parse_forced_calls(text[i])
                            for name, args in calls:
                                out += call_chunks(i, name, args)
                            if not calls and text[i]:
                                out.append(chunk(i, {"content": text[i]}))
                    elif parsers[i] is not None:
                        events = parsers[i].push(d.text) + (parsers[i].finish() if d.finish_reason else [])
                        for ev in events:
                            if ev[0] == "content":
                                out.append(chunk(i, {"content": ev[1]}))
                            else:
                                out += call_chunks(i, ev[1], ev[2])
                        if lp and not events:
                            out.append(chunk(i, {}, logprobs=lp))
                    elif d.text or lp:
                        out.append(chunk(i, {"content": d.text}, logprobs=lp))
                    for s in out:
                        yield s
                    if d.finish_reason is not None:
                        finish = "tool_calls" if ncalls[i] and d.finish_reason == "stop" else d.finish_reason
                        yield chunk(i, {}, finish)
            if include_usage:
                yield _sse({**base, "object": "chat.completion.chunk", "choices": [],
                            "usage": self._usage(n_prompt, completion)})
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    # -- completions -----------------------------------------------------------------------------
    def completion_prompts(self, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        if isinstance(p[0], int):
            p = [p]
        out = []
        for item in p:
            if isinstance(item, str):
                out.append((self.tokenizer.encode(item), item))
            else:
                if any(t >= self.vocab for t in item):
                    raise APIError(400, f"prompt token ids must be in [0, {self.vocab})", param="prompt")
                out.append((list(item), None))
        return out

    async def completions(self, req: CompletionRequest, safety=None, route: str | None = None):
        t0 = time.perf_counter()
        self.check_model(req.model)
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of must equal n (candidates are not ranked by this server)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
        prompts = self.completion_prompts(req)
        if len(prompts) * req.n > 4 * self.config.max_concurrency + 64:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} is more choices than this server takes at once",
                           param="prompt")
        budgets = [self.budget(len(ids), req.max_tokens) for ids, _ in prompts]
        rid = f"cmpl-{uuid.uuid4().hex}"
        jobs = [(k * req.n + j, ids, text, self.sampling(req, budgets[k], j, req.logprobs, []))
                for k, (ids, text) in enumerate(prompts) for j in range(req.n)]
        slots = await self.admission.acquire(len(jobs))
        self.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in prompts) * req.n)
        streams = [self.generate(f"{rid}-{idx}", ids, p, p.stop, t0,
                                 safety.monitor(route, f"{rid}-{idx}") if safety is not None else None)
                   for idx, ids, _, p in jobs]
        base = {"id": rid, "created": _now(), "model": req.model, "system_fingerprint": None}
        n_prompt = sum(len(ids) for ids, _ in prompts)
        echo = [(text if text is not None else self.tokenizer.decode(ids)) if req.echo else "" for _, ids, text, _ in jobs]
        if req.stream:
            return EventStream(self._completion_stream(streams, base, n_prompt, echo, req),
                               lambda: self.admission.release(slots))
        try:
            texts, finish, lps, counts = list(echo), [None] * len(jobs), [[] for _ in jobs], 0
            async for i, d in self.merged(streams):
                texts[i] += d.text
                lps[i] += d.logprobs
                counts += len(d.token_ids)
                finish[i] = d.finish_reason or finish[i]
        finally:
            self.admission.release(slots)
        choices = [{"index": i, "text": texts[i], "finish_reason": finish[i],
                    "logprobs": self.completion_logprobs(lps[i], len(echo[i])) if req.logprobs is not None else None}
                   for i in range(len(jobs))]
        return {**base, "object": "text_completion", "choices": choices, "usage": self._usage(n_prompt, counts)}

    def completion_logprobs(self, lps: list, offset: int = 0) -> dict:
        tokens = [self.token_str(t) for t, _ in lps]
        offsets = []
        for s in tokens:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for _, (lp, _) in lps],
                "top_logprobs": [{self.token_str(i): v for i, v in top} for _, (_, top) in lps], "text_offset": offsets}

    async def _completion_stream(self, streams, base, n_prompt, echo, req) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        usage_field = {"usage": None} if include_usage else {}
        completion, deadline = 0, time.perf_counter() + self.config.request_timeout

        def chunk(i, text, finish=None, lps=None):
            choice = {"index": i, "text": text, "finish_reason": finish,
                      "logprobs": self.completion_logprobs(lps) if lps is not None else None}
            return _sse({**base, "object": "text_completion", "choices": [choice], **usage_field})

        try:
            for i, e in enumerate(echo):
                if e:
                    yield chunk(i, e)
            async with aclosing(self.until_deadline(streams, deadline)) as deltas:
                async for i, d in deltas:
                    if i is None:  # the deadline passed: d is the 504 event
                        yield d
                        break
                    completion += len(d.token_ids)
                    if d.text or d.finish_reason or d.logprobs:
                        yield chunk(i, d.text, d.finish_reason, d.logprobs if req.logprobs is not None else None)
            if include_usage:
                yield _sse({**base, "object": "text_completion", "choices": [],
                            "usage": self._usage(n_prompt, completion)})
        except APIError as e:
            yield _sse(e.body())
        yield "data: [DONE]\n\n"

    # -- embeddings ------------------------------------------------------------------------------
    async def embeddings(self, req: EmbeddingRequest) -> dict:
        self.check_model(req.model)
        hidden = self.llm.config.hidden_size
        if req.dimensions is not None and req.dimensions != hidden:
            raise APIError(400, f"this model's embeddings have {hidden} dimensions; omit dimensions or pass {hidden}",
                           param="dimensions")
        inp = req.input
        items = [inp] if isinstance(inp, str) or isinstance(inp[0], int) else inp
        if len(items) > 2048:
            raise APIError(400, "at most 2048 inputs per request", param="input")
        batches = []
        for item in items:
            ids = self.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not ids:
                raise APIError(400, "an input is empty; every input needs at least one token", param="input")
            if len(ids) > self.ctx:
                raise APIError(400, f"an input has {len(ids)} tokens; the model's context is {self.ctx}",
                               param="input")
            if any(t >= self.vocab for t in ids):
                raise APIError(400, f"input token ids must be in [0, {self.vocab})", param="input")
            batches.append(ids)
        data = []
        for k, ids in enumerate(batches):
            vec = await asyncio.to_thread(self._embed, ids)
            emb: Any = vec.tolist()
            if req.encoding_format == "base64":
                emb = base64.b64encode(vec.numpy().astype("<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": k, "embedding": emb})
        n = sum(len(b) for b in batches)
        return {"object": "list", "data": data, "model": req.model, "usage": {"prompt_tokens": n, "total_tokens": n}}

    @torch.inference_mode()
    def _embed(self, ids: list[int]) -> torch.Tensor:
        """L2-normalised mean of the final hidden states (after the last norm), one forward of the model.

        The last block's output is caught by a forward hook (the model returns logits only), and
        the engine's lock keeps engine steps, which share the model, out meanwhile."""
        model = self.llm.model
        caught: list[torch.Tensor] = []
        with self.aengine.lock:
            handle = model.layers[-1].register_forward_hook(lambda _m, _i, out: caught.append(out[0]))
            try:
                model(torch.tensor([ids], device=model.embed_tokens.weight.device), num_logits_to_keep=1)
            finally:
                handle.remove()
            h = model.norm(caught[0])[0].float().mean(0)  # (H,)
        return torch.nn.functional.normalize(h, dim=0).cpu()
