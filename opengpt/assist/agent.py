"""The tool loop: ask the model, run the tools it calls, feed the results back, until it answers.

`Agent(backend, registry).run(question)` keeps an OpenAI-format conversation: a system prompt
(use the calculator for arithmetic, answer from the results), the question, then per step the
model's turn and one `tool` message per call. It ends
* on a turn without tool calls: that turn is the answer (stopped_reason "answer");
* after `max_steps` turns with tool calls: the model is asked once more, without tools, to answer
  from what it has ("max_steps"); an empty reply gives a plain "step limit reached" answer;
* `first_tool_choice="required"` (or a tool's name) makes the first turn a call, decoded under its
  JSON schema, for models too small to decide to call a tool;
* on repetition: a call with the same name and arguments as an earlier one is not run again, the
  model is told it already has that result; a second repetition ends the loop the same way
  ("repeated_call"). So a model stuck on one call costs at most two extra turns, never a loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from ..server.tools import parse_tool_calls
from .backend import AssistantMessage, ChatBackend, ToolCall
from .tools.registry import ToolRegistry

SYSTEM_PROMPT = "You are a helpful assistant that answers questions, calling tools when they help."
TOOL_HINTS = {
    # no example numbers here: small models copy them into their calls instead of the question's numbers
    "calculator": "For any arithmetic, call the calculator tool with the expression written as in the question "
                  "(it understands percentages written 'N% of M', powers written with ^, and thousands separators); "
                  "never compute numbers in your head.",
    "python": "For anything that needs a program, call the python tool with a complete script that prints its result.",
}
ANSWER_HINT = "When you have the tool results you need, reply with the final answer in one short sentence, without tool calls."
FINAL_REQUEST = ("Stop calling tools now. Using the tool results above, answer the original question in one short "
                 "sentence.")


def system_prompt(registry: ToolRegistry) -> str:
    """The default system message: the role, a hint per known tool, and how to finish."""
    return " ".join([SYSTEM_PROMPT, *(TOOL_HINTS[n] for n in registry.names if n in TOOL_HINTS), ANSWER_HINT])


def check_tool_choice(choice: str, registry: ToolRegistry) -> None:
    """A ValueError unless `choice` is auto, required or one of the registry's tools."""
    if choice not in ("auto", "required", *registry.names):
        raise ValueError(f"first_tool_choice must be auto, required or a tool name ({', '.join(registry.names)})")


@dataclass(slots=True)
class Step:
    tool: str
    arguments: str  # JSON text, as the model wrote it
    result: str
    repeated: bool = False  # the same call was made before: not run again, the model was told so


@dataclass
class AgentResult:
    answer: str
    steps: list[Step]
    stopped_reason: str  # "answer" | "max_steps" | "repeated_call"
    messages: list[dict] = field(default_factory=list)  # the whole conversation, for inspection


def _key(call: ToolCall) -> tuple[str, str]:
    try:
        return call.name, json.dumps(json.loads(call.arguments), sort_keys=True)
    except json.JSONDecodeError:
        return call.name, call.arguments.strip()


class Agent:
    def __init__(self, backend: ChatBackend, registry: ToolRegistry, max_steps: int = 6, system: str | None = None,
                 first_tool_choice: str = "auto"):
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        check_tool_choice(first_tool_choice, registry)
        # "required" (or a tool's name) decodes the first turn under the call's JSON schema: for small models
        # that answer arithmetic from memory instead of calling the calculator; later turns are the model's own
        self.first_tool_choice = first_tool_choice
        self.backend = backend
        self.registry = registry
        self.max_steps = max_steps
        self.system = system if system is not None else system_prompt(registry)

    def run(self, question: str, on_step: Callable[[Step], None] | None = None) -> AgentResult:
        """Answer `question`; `on_step` sees each tool call as soon as its result is known."""
        messages: list[dict] = [{"role": "system", "content": self.system}, {"role": "user", "content": question}]
        steps: list[Step] = []
        results: dict[tuple[str, str], str] = {}
        tools = self.registry.schemas()
        repeats = 0
        for turn in range(self.max_steps):
            if turn == 0 and self.first_tool_choice != "auto":
                reply = self.backend.chat(messages, tools, tool_choice=self.first_tool_choice)
            else:
                reply = self.backend.chat(messages, tools)
            if not reply.tool_calls:
                return AgentResult((reply.content or "").strip(), steps, "answer", messages + [reply.to_dict()])
            messages.append(reply.to_dict())
            for call in reply.tool_calls:
                key = _key(call)
                if key in results:
                    repeats += 1
                    step = Step(call.name, call.arguments, f"You already called {call.name} with these arguments; "
                                f"the result was: {results[key]}\nUse it; do not call it again.", repeated=True)
                else:
                    step = Step(call.name, call.arguments, self.registry.call(call.name, call.arguments))
                    results[key] = step.result
                steps.append(step)
                messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": step.result})
                if on_step is not None:
                    on_step(step)
            if repeats >= 2:
                return self._final(messages, steps, "repeated_call")
        return self._final(messages, steps, "max_steps")

    def _final(self, messages: list[dict], steps: list[Step], reason: str) -> AgentResult:
        """One last turn without tools, so the model answers from the results it has."""
        messages = messages + [{"role": "user", "content": FINAL_REQUEST}]
        reply: AssistantMessage = self.backend.chat(messages, None)
        # a model that still writes a call gets no tools to run it: only its text around the call counts
        answer = (parse_tool_calls(reply.content or "", set(self.registry.names))[0] or "").strip()
        if not answer:
            why = "step limit reached" if reason == "max_steps" else "the model kept repeating the same tool call"
            last = next((s.result for s in reversed(steps) if not s.repeated), None)
            answer = f"No final answer: {why} ({len(steps)} tool calls)." + (f" Last tool result: {last}" if last else "")
        return AgentResult(answer, steps, reason, messages + [reply.to_dict()])
