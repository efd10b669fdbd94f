"""Tool calling: tools into the prompt, tool calls out of the model's text, and the schemas that force them.

Prompt side: a chat template that knows tools (Qwen2.5, Llama 3.1, SmolLM3, Hermes ...) gets them
as transformers passes them (`tools=[...]`, assistant `tool_calls` with dict arguments). A template
that does not (SmolLM2's) gets the Hermes / Qwen2.5 convention written into the system message,
with earlier tool calls and results rendered as text in the same convention, so any ChatML-style
model sees one consistent format.

Output side: calls are recognised in the two styles open models use:
  * Hermes / Qwen / SmolLM: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks,
  * Llama 3.x and others: the whole answer is bare JSON, `{"name": ..., "parameters": {...}}` or a
    list of such objects (optionally after `<|python_tag|>` or inside a ```json fence).
A call only counts when it names one of the request's tools, so ordinary JSON answers stay content.
`ToolCallStream` does the same on a stream: content streams through, text that may start a call is
held back, and each call is released once its JSON is complete.

Forced calls (`tool_choice` "required" or a named function) are not parsed from free text: decoding
is constrained by `forced_call_schema`, so the output always parses and matches the tool's schema.
"""

from __future__ import annotations

import json
import re
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)

SYSTEM_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def template_supports_tools(template: str | dict[str, str] | None) -> bool:
    """Whether a chat template renders a `tools` list itself (it reads the variable)."""
    if template is None:
        return False
    texts = template.values() if isinstance(template, dict) else [template]
    return any(re.search(r"\btools\b", t) for t in texts)


def _text(content: Any) -> str | None:
    """OpenAI content (a string or content parts) as the plain string templates expect."""
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type == "text":
            parts.append(part.text or "")
        elif part.type == "refusal":
            parts.append(part.refusal or "")
        else:
            raise ValueError(f"content parts of type {part.type!r} are not supported: this model reads text only; "
                             "send text parts ({'type': 'text', 'text': ...})")
    return "".join(parts)


def _arguments(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # templates print it as given


def chat_messages(messages: list, tools: list[dict] | None, template_has_tools: bool) -> list[dict]:
    """OpenAI messages (protocol.Message) as the dicts a chat template reads; without template tool
    support, tools, earlier calls and results are written in the Hermes convention."""
    out: list[dict] = []
    for m in messages:
        role = "system" if m.role == "developer" else "tool" if m.role == "function" else m.role
        msg: dict[str, Any] = {"role": role, "content": _text(m.content)}
        if m.name is not None and role != "tool":
            msg["name"] = m.name
        if m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls and template_has_tools:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        elif m.tool_calls:
            blocks = [f"{OPEN}\n{json.dumps({'name': c.function.name, 'arguments': _arguments(c.function.arguments)}, ensure_ascii=False)}\n{CLOSE}"
                      for c in m.tool_calls]
            msg["content"] = "\n".join(([msg["content"]] if msg["content"] else []) + blocks)
        if role == "tool":
            if template_has_tools:
                msg["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    msg["name"] = m.name
            else:  # Qwen2.5's rendering of a result: a user turn with the result in tags
                msg = {"role": "user", "content": f"<tool_response>\n{msg['content'] or ''}\n</tool_response>"}
        if msg.get("content") is None and role != "assistant":
            msg["content"] = ""
        if role == "assistant" and msg.get("content") is None and not template_has_tools:
            msg["content"] = ""
        out.append(msg)
    if tools and not template_has_tools:
        prompt = SYSTEM_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# -- parsing ---------------------------------------------------------------------------------------
def _call(obj: Any, names: set[str]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one call object, or None when it is not a call of a known tool."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _bare_calls(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    s = text.strip().removeprefix(_PYTHON_TAG).strip()
    if (m := _FENCE.match(s)) is not None:
        s = m.group(1)
    obj = _json(s)
    objs = obj if isinstance(obj, list) and obj else [obj]
    calls = [_call(o, names) for o in objs]
    return None if any(c is None for c in calls) else calls


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """(content, calls) of a finished answer; calls are (name, JSON arguments). Text that is not a
    well-formed call of a known tool stays content."""
    if OPEN in text:
        calls = [_call(_json(m.group(1).strip()), names) for m in _BLOCK.finditer(text)]
        if calls and all(c is not None for c in calls):
            content = _BLOCK.sub("", text).strip()
            return content or None, calls
        return text, []
    calls = _bare_calls(text, names)
    return (None, calls) if calls else (text, [])


class ToolCallStream:
    """Incremental `parse_tool_calls`: push text deltas, get ("content", text) and ("call", name,
    arguments) events; `finish()` releases what is held back."""

    def __init__(self, names: set[str]):
        self.names = names
        self.mode = "start"  # start -> text | block | bare
        self.buf = ""

    def push(self, text: str) -> list[tuple]:
        self.buf += text
        events: list[tuple] = []
        while True:
            if self.mode == "start":
                s = self.buf.lstrip()
                if not s:
                    return events
                if s[0] in "{[" or s.startswith((_PYTHON_TAG, "```")):
                    self.mode = "bare"  # the whole answer may be a JSON call: decided at the end
                elif _PYTHON_TAG.startswith(s) or "```".startswith(s):
                    return events  # may still become one of those openings
                else:
                    self.mode = "text"
                continue
            if self.mode == "bare":
                return events
            if self.mode == "text":
                i = self.buf.find(OPEN)
                if i < 0:
                    hold = next((n for n in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                                 if self.buf.endswith(OPEN[:n])), 0)
                    cut = len(self.buf) - hold
                    if cut:
                        events.append(("content", self.buf[:cut]))
                    self.buf = self.buf[cut:]
                    return events
                if i:
                    events.append(("content", self.buf[:i]))
                self.buf, self.mode = self.buf[i + len(OPEN):], "block"
                continue
            # block: wait for the closing tag
            j = self.buf.find(CLOSE)
            if j < 0:
                return events
            events += self._block(self.buf[:j], closed=True)
            self.buf, self.mode = self.buf[j + len(CLOSE):].lstrip("\n"), "text"

    def _block(self, body: str, closed: bool) -> list[tuple]:
        call = _call(_json(body.strip()), self.names)
        if call is None:
            return [("content", OPEN + body + (CLOSE if closed else ""))]
        return [("call", *call)]

    def finish(self) -> list[tuple]:
        buf, self.buf = self.buf, ""
        if self.mode == "block":
            return self._block(buf, closed=False)
        if self.mode == "bare":
            calls = _bare_calls(buf, self.names)
            return [("call", *c) for c in calls] if calls else [("content", buf)]
        return [("content", buf)] if buf else []


# -- forced calls ----------------------------------------------------------------------------------
def parameters(tool: dict) -> dict:
    return tool["function"].get("parameters") or NO_PARAMETERS


def forced_call_schema(tools: list[dict], parallel: bool) -> dict:
    """`tool_choice="required"`: a JSON array of one or more calls of the given tools."""
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "arguments": parameters(t)},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def forced_schema(tools: list[dict], choice: str, parallel: bool) -> dict:
    """The JSON schema a forced turn is decoded under: `choice` "required" (any tool) or a tool's name
    (its parameters); a name that is not among `tools` is a ValueError."""
    if choice == "required":
        return forced_call_schema(tools, parallel)
    tool = next((t for t in tools if t["function"]["name"] == choice), None)
    if tool is None:
        raise ValueError(f"tool_choice names {choice!r}, which is not among the tools")
    return parameters(tool)


def forced_calls(text: str, choice: str) -> list[tuple[str, str]]:
    """The calls of a turn decoded under `forced_schema(tools, choice, ...)`: for a named tool the whole
    output is its arguments."""
    return parse_forced_calls(text) if choice == "required" else [(choice, text)]


def parse_forced_calls(text: str) -> list[tuple[str, str]]:
    """The calls of a `forced_call_schema` output (empty when generation was cut before the JSON ended)."""
    obj = _json(text)
    if not isinstance(obj, list):
        return []
    return [(o["name"], json.dumps(o["arguments"], ensure_ascii=False)) for o in obj
            if isinstance(o, dict) and isinstance(o.get("name"), str) and "arguments" in o]
