"""How the assistant layer talks to a model: one `chat(messages, tools)` call, two implementations.

`ChatBackend` is the protocol: OpenAI-format messages (dicts, assistant `tool_calls` with JSON-text
arguments, `tool` results) and tools in, an `AssistantMessage` (content, tool calls) out.
* `LocalBackend(llm)` runs an `opengpt.LLM` in process, formatting the prompt and parsing the calls
  exactly as the server does (`opengpt.server.tools`: a template that reads `tools` gets them, any
  other gets the Hermes / Qwen2.5 convention in the system message).
* `OpenAIBackend(base_url, api_key, model)` talks to any OpenAI-compatible endpoint (`opengpt serve`,
  vLLM, llama.cpp, a hosted API) through the `openai` client, imported when first used.
Both also have `batch_chat(conversations, max_tokens)`: plain replies (no tools) to many conversations,
in order; locally one continuously batched engine workload, remotely concurrent requests.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..server import tools as T
from ..server.protocol import Message


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=new_call_id)

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class AssistantMessage:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The message as it goes back into the conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        return msg


class ChatBackend(Protocol):
    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str = "auto") -> AssistantMessage:
        """The model's next turn; `tools` in OpenAI's form, None for an answer without tools; `tool_choice`
        "auto" (the model decides), "required" (at least one call) or a tool's name (a call of that tool)."""
        ...


class LocalBackend:
    """An `opengpt.LLM` in this process; `sampling` are LLM sampling arguments (greedy, 512 tokens by default)."""

    def __init__(self, llm, **sampling: Any):
        self.llm = llm
        self.sampling = {"temperature": 0.0, "max_new_tokens": 512, **sampling}
        self.template_has_tools = T.template_supports_tools(llm.tokenizer.chat_template)

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the conversation, tools rendered as the server renders them."""
        msgs = T.chat_messages([Message.model_validate(m) for m in messages], tools, self.template_has_tools)
        return self.llm.encode_chat(msgs, tools=tools if self.template_has_tools else None)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str = "auto") -> AssistantMessage:
        ids = self.prompt(messages, tools)
        if tools and tool_choice != "auto":
            return self._forced(ids, tools, tool_choice)
        text = self.llm.complete(ids, **self.sampling).text
        if not tools:
            return AssistantMessage(text)
        content, calls = T.parse_tool_calls(text, {t["function"]["name"] for t in tools})
        return AssistantMessage(content, [ToolCall(name, args) for name, args in calls])

    def _forced(self, ids: list[int], tools: list[dict], tool_choice: str) -> AssistantMessage:
        """A call decoded under the JSON schema of the call(s), as the server serves `tool_choice`."""
        from ..engine.guided import json_processor

        schema = T.forced_schema(tools, tool_choice, parallel=False)
        max_new = self.sampling["max_new_tokens"]
        proc = json_processor(schema, self.llm.tokenizer, self.llm.config.vocab_size, max(max_new - 1, 1))
        text = self.llm.complete(ids, **self.sampling, logits_processors=[proc]).text
        calls = T.forced_calls(text, tool_choice)
        return AssistantMessage(None if calls else text, [ToolCall(name, args) for name, args in calls])

    def batch_chat(self, conversations: list[list[dict]], max_tokens: int | None = None,
                   on_result: Callable[[int], None] | None = None) -> list[str]:
        """Replies to `conversations` (no tools), in order, from one `generate_batch` call: the engine
        runs them as one continuously batched workload. It returns them together, so `on_result(i)`
        is called for every reply at the end."""
        from ..engine.sampler import SamplingParams

        sampling = {**self.sampling, **({"max_new_tokens": max_tokens} if max_tokens else {})}
        texts = self.llm.generate_batch([self.prompt(m) for m in conversations], SamplingParams(**sampling))
        for i in range(len(texts) if on_result else 0):
            on_result(i)
        return texts


class OpenAIBackend:
    """An OpenAI-compatible chat completions endpoint; `params` go with every request (max_tokens, temperature, ...)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str = "default",
                 **params: Any):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none")
        self.model = model
        self.params = {"temperature": 0.0, **params}

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str = "auto") -> AssistantMessage:
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        if tools and tool_choice != "auto":
            extra["tool_choice"] = (tool_choice if tool_choice == "required"
                                    else {"type": "function", "function": {"name": tool_choice}})
        r = self.client.chat.completions.create(model=self.model, messages=messages, **extra, **self.params)
        msg = r.choices[0].message
        calls = [ToolCall(c.function.name, c.function.arguments or "{}", c.id or new_call_id())
                 for c in msg.tool_calls or [] if getattr(c, "function", None) is not None]
        return AssistantMessage(msg.content, calls)

    def batch_chat(self, conversations: list[list[dict]], max_tokens: int | None = None,
                   on_result: Callable[[int], None] | None = None, max_workers: int = 8) -> list[str]:
        """Replies to `conversations` (no tools), in order, at most `max_workers` requests in flight (the
        endpoint batches them); `on_result(i)` as each arrives. The first failure is raised and the
        requests not yet sent are dropped."""
        params = {**self.params, **({"max_tokens": max_tokens} if max_tokens else {})}

        def one(messages: list[dict]) -> str:
            r = self.client.chat.completions.create(model=self.model, messages=messages, **params)
            return r.choices[0].message.content or ""

        out: list[str] = [""] * len(conversations)
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(conversations)))) as pool:
            futures = {pool.submit(one, m): i for i, m in enumerate(conversations)}
            try:
                for f in as_completed(futures):
                    out[futures[f]] = f.result()
                    if on_result:
                        on_result(futures[f])
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return out
