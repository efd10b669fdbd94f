"""How the assistant layer talks to a model: one `chat(messages, tools)` call, two implementations.

`ChatBackend` is the protocol: OpenAI-format messages (dicts, assistant `tool_calls` with JSON-text
arguments, `tool` results) and tools in, an `AssistantMessage` (content, tool calls) out.
* `LocalBackend(llm)` runs an `opengpt.LLM` in process, formatting the prompt and parsing the calls
  exactly as the server does (`opengpt.server.tools`: a template that reads `tools` gets them, any
  other gets the Hermes / Qwen2.5 convention in the system message).
* `OpenAIBackend(base_url, api_key, model)` talks to any OpenAI-compatible endpoint (`opengpt serve`,
  vLLM, llama.cpp, a hosted API) through the `openai` client, imported when first used.
"""

from __future__ import annotations

import uuid
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
    def chat(self, messages: list[dict], tools: list[dict] | None = None) -> AssistantMessage:
        """The model's next turn; `tools` in OpenAI's form, None for an answer without tools."""
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

    def chat(self, messages: list[dict], tools: list[dict] | None = None) -> AssistantMessage:
        text = self.llm.complete(self.prompt(messages, tools), **self.sampling).text
        if not tools:
            return AssistantMessage(text)
        content, calls = T.parse_tool_calls(text, {t["function"]["name"] for t in tools})
        return AssistantMessage(content, [ToolCall(name, args) for name, args in calls])


class OpenAIBackend:
    """An OpenAI-compatible chat completions endpoint; `params` go with every request (max_tokens, temperature, ...)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, model: str = "default",
                 **params: Any):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none")
        self.model = model
        self.params = {"temperature": 0.0, **params}

    def chat(self, messages: list[dict], tools: list[dict] | None = None) -> AssistantMessage:
        extra = {"tools": tools} if tools else {}
        r = self.client.chat.completions.create(model=self.model, messages=messages, **extra, **self.params)
        msg = r.choices[0].message
        calls = [ToolCall(c.function.name, c.function.arguments or "{}", c.id or new_call_id())
                 for c in msg.tool_calls or [] if getattr(c, "function", None) is not None]
        return AssistantMessage(msg.content, calls)
