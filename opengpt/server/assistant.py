"""The assistant services around the chat route: safety layers, result cache, cost router and the
feedback store (`opengpt serve --safety F --cache semantic --route F --feedback-db F`).

A chat request goes through, in this order:
1. the safety input layer (assist.safety.Pipeline.check_input): a block is answered at once with
   the policy's refusal (finish_reason "content_filter", the decision under "safety"); PII found
   in the prompt is redacted before anything else sees it, so neither the cache nor the model nor
   the feedback store ever holds it;
2. the cache (assist.cache.Cache): an exact or verified semantic hit is served without generating
   (streamed requests get it replayed as chunks);
3. generation: by the router (assist.router.Router) when one is configured, else by this server's
   engine, where the safety monitor watches every chunk as it is produced and the output layer
   runs at the end (serving.OpenAIServing.chat);
4. the answer is stored in the cache (complete answers only) and in the feedback store, under its
   response id, so `POST /v1/feedback` can rate it.
Streamed answers are stored from the chunks as they pass (`tap`), without delaying any of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..assist.messages import content_text, last_user_text
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, FeedbackRequest, Message
from .serving import EventStream, OpenAIServing, _now, _sse

log = logging.getLogger("opengpt.server")
ROUTE, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
DONE = "data: [DONE]\n\n"


def user_scope(body_user: str | None, authorization: str | None) -> str | None:
    """Whose cache entries and feedback these are: the request's `user`, else the API key (hashed,
    never stored in clear), else nobody in particular (one shared anonymous scope)."""
    if body_user:
        return f"user:{body_user}"
    token = (authorization or "").partition(" ")[2].strip()
    return f"key:{hashlib.sha256(token.encode()).hexdigest()[:16]}" if token else None


def sources_of(messages: list[dict]) -> list[str]:
    """What an answer's facts may rest on: tool results and system turns (where retrieved context goes)."""
    return [content_text(m["content"]) for m in messages
            if m.get("role") in ("tool", "function", "system", "developer") and m.get("content")]


async def _lines(lines: list[str]) -> AsyncIterator[str]:
    for line in lines:
        yield line


def replay(resp: dict, include_usage: bool) -> AsyncIterator[str]:
    """A complete chat.completion as the chunks of a stream (refusals, cache hits, routed answers)."""
    base = {k: resp[k] for k in ("id", "created", "model") if k in resp}
    usage = {"usage": None} if include_usage else {}

    def chunk(i: int, delta: dict, finish: str | None = None) -> str:
        return _sse({**base, "object": "chat.completion.chunk", **usage,
                     "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    async def events() -> AsyncIterator[str]:
        for c in resp["choices"]:
            msg = c["message"]
            yield chunk(c["index"], {"role": "assistant", "content": ""})
            if msg.get("content"):
                yield chunk(c["index"], {"content": msg["content"]})
            for k, call in enumerate(msg.get("tool_calls") or []):
                yield chunk(c["index"], {"tool_calls": [{"index": k, **call}]})
            yield chunk(c["index"], {}, c.get("finish_reason"))
        if include_usage:
            yield _sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": resp.get("usage")})
        yield DONE

    return events()


class Assembler:
    """Rebuilds the chat.completion of a stream from its chunks, to store it once the stream ends."""

    def __init__(self):
        self.resp: dict[str, Any] | None = None
        self.choices: dict[int, dict] = {}
        self.failed = False

    def push(self, line: str) -> None:
        if not line.startswith("data: {"):
            return
        obj = json.loads(line[6:])
        if "error" in obj:
            self.failed = True
            return
        if self.resp is None:
            self.resp = {k: obj.get(k) for k in ("id", "created", "model")}
        if obj.get("usage"):
            self.resp["usage"] = obj["usage"]
        for c in obj.get("choices", []):
            ch = self.choices.setdefault(c["index"], {"index": c["index"], "finish_reason": None,
                                                      "message": {"role": "assistant", "content": ""}})
            delta = c.get("delta") or {}
            ch["message"]["content"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                calls = ch["message"].setdefault("tool_calls", [])
                if call["index"] >= len(calls):
                    calls.append({"id": call.get("id"), "type": "function",
                                  "function": {"name": call.get("function", {}).get("name"), "arguments": ""}})
                calls[call["index"]]["function"]["arguments"] += call.get("function", {}).get("arguments") or ""
            ch["finish_reason"] = c.get("finish_reason") or ch["finish_reason"]

    def response(self) -> dict | None:
        if self.failed or self.resp is None or any(c["finish_reason"] is None for c in self.choices.values()):
            return None  # cut short (error, timeout, disconnect): nothing to store
        return {**self.resp, "object": "chat.completion",
                "choices": [self.choices[i] for i in sorted(self.choices)]}


class Assistant:
    def __init__(self, serving: OpenAIServing, safety=None, cache=None, feedback=None, router=None):
        self.serving, self.safety, self.cache, self.feedback, self.router = serving, safety, cache, feedback, router

    def refusal(self, req: ChatCompletionRequest, verdict) -> dict:
        msg = {"role": "assistant", "content": verdict.refusal, "refusal": verdict.refusal}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": _now(),
                "model": req.model, "system_fingerprint": None,
                "choices": [{"index": i, "message": dict(msg), "finish_reason": "content_filter", "logprobs": None}
                            for i in range(req.n)],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                "safety": {"input": verdict.to_dict()}}

    @staticmethod
    def answer(req: ChatCompletionRequest, resp: dict):
        """A complete chat.completion as the client asked for it: the dict, or replayed as a stream."""
        if not req.stream:
            return resp
        return EventStream(replay(resp, bool(req.stream_options and req.stream_options.include_usage)), lambda: None)

    async def chat(self, req: ChatCompletionRequest, user: str | None = None):
        body = req.model_dump(exclude_none=True)
        messages = body["messages"]
        verdict = None
        if self.safety is not None:
            verdict = self.safety.check_input(messages, route=ROUTE)
            if verdict.action == "block":
                resp = self.refusal(req, verdict)  # kept for feedback (a wrong refusal is worth a thumbs down)
                await self.record(resp, {**body, "messages": verdict.messages}, user, cache=False)
                return self.answer(req, resp)
            if verdict.messages != messages:  # PII redacted
                messages = verdict.messages
                body["messages"] = messages
                req = req.model_copy(update={"messages": [Message.model_validate(m) for m in messages]})
        if self.cache is not None:
            hit = await asyncio.to_thread(self.cache.get, body, user)
            if hit is not None:
                resp = {**hit.response, "id": f"chatcmpl-{uuid.uuid4().hex}", "created": _now(),
                        "cache": {"kind": hit.kind, "score": round(float(hit.score), 4)}}
                await self.record(resp, body, user, cache=False)
                return self.answer(req, resp)
        question = last_user_text(messages)
        if self.router is not None:
            result = await self.routed(req, body, question)
        else:
            result = await self.serving.chat(req, self.safety, ROUTE, sources_of(messages), question)
        if verdict is not None and verdict.decisions and isinstance(result, dict):
            result.setdefault("safety", {})["input"] = verdict.to_dict()
        if isinstance(result, EventStream):
            return EventStream(self.tap(result.events, body, user), result.close)
        await self.record(result, body, user)
        return result

    async def completions(self, req: CompletionRequest):
        """Raw completions get the input layer on their text prompts and the monitor on every choice
        (no cache: raw prompts are rarely repeated, and no router: backends are chat models)."""
        if self.safety is None:
            return await self.serving.completions(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        texts = [p for p in prompts if isinstance(p, str)]
        for text in texts:
            verdict = self.safety.check_input(text, route=COMPLETIONS)
            if verdict.action == "block":
                resp = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": _now(),
                        "model": req.model, "system_fingerprint": None,
                        "choices": [{"index": i, "text": verdict.refusal, "finish_reason": "content_filter",
                                     "logprobs": None} for i in range(len(prompts) * req.n)],
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                        "safety": {"input": verdict.to_dict()}}
                if req.stream:
                    chunks = [_sse({**resp, "choices": [c]}) for c in resp["choices"]]
                    return EventStream(_lines(chunks + [DONE]), lambda: None)
                return resp
        return await self.serving.completions(req, self.safety, COMPLETIONS)

    async def routed(self, req: ChatCompletionRequest, body: dict, question: str | None):
        from ..assist.router import RouterError

        try:
            resp, decision = await asyncio.to_thread(self.router.chat, {**body, "stream": False})
        except RouterError as e:
            raise APIError(502, str(e), code="backend_error") from None
        resp = {**resp, "router": dataclasses.asdict(decision)}  # which backend, why, fallbacks, cost
        if self.safety is not None:  # a remote answer is complete when it arrives: the output layer checks it whole
            for c in resp.get("choices", []):
                text = c.get("message", {}).get("content")
                if text:
                    v = self.safety.check_output(text, sources_of(body["messages"]), ROUTE, question=question)
                    c["message"]["content"] = v.text
                    if v.refusal:
                        c["finish_reason"] = "content_filter"
                    if v.decisions:
                        resp.setdefault("safety", {}).setdefault("output", []).extend(d.to_dict() for d in v.decisions)
        return self.answer(req, resp)

    async def tap(self, events: AsyncIterator[str], body: dict, user: str | None) -> AsyncIterator[str]:
        asm = Assembler()
        try:
            async for line in events:
                yield line
                asm.push(line)
        finally:
            await events.aclose()
        resp = asm.response()
        if resp is not None:
            await self.record(resp, body, user)

    async def record(self, resp: dict, body: dict, user: str | None, cache: bool = True) -> None:
        """Store a finished answer: in the cache (unless it came from there) and the feedback store;
        in a worker thread, since SQLite and the embedder would hold up the event loop."""
        await asyncio.to_thread(self._store, resp, body, user, cache)

    def _store(self, resp: dict, body: dict, user: str | None, cache: bool) -> None:
        t = time.perf_counter()
        try:
            if cache and self.cache is not None:
                self.cache.put(body, resp, user)
            if self.feedback is not None:
                self.feedback.record_response(resp["id"], body, resp, user=user, model=resp.get("model"))
        except Exception:  # noqa: BLE001 - storing is best effort: the answer is already the client's
            log.exception("could not store the answer %s", resp.get("id"))
        if time.perf_counter() - t > 0.05:
            log.info("storing %s took %.0f ms", resp.get("id"), (time.perf_counter() - t) * 1e3)

    async def rate(self, fb: FeedbackRequest, user: str | None) -> dict:
        from ..assist.feedback import FeedbackError

        if self.feedback is None:
            raise APIError(404, "this server keeps no feedback; start it with --feedback-db FILE", code="not_found")
        try:
            if fb.chosen_id is not None or fb.rejected_id is not None:
                if not (fb.chosen_id and fb.rejected_id):
                    raise APIError(400, "a preference needs both chosen_id and rejected_id", param="chosen_id")
                fid = self.feedback.prefer(fb.chosen_id, fb.rejected_id, user=user, comment=fb.comment)
                return {"object": "feedback", "id": fid, "kind": "preference"}
            if fb.response_id is None or fb.rating is None:
                raise APIError(400, 'send {"response_id": ..., "rating": "up"|"down"} or '
                                    '{"chosen_id": ..., "rejected_id": ...}', param="response_id")
            fid = self.feedback.rate(fb.response_id, fb.rating, user=user, comment=fb.comment, choice=fb.choice)
            return {"object": "feedback", "id": fid, "kind": "rating"}
        except FeedbackError as e:
            raise APIError(404 if "not a recorded response" in str(e) else 400, str(e)) from None
