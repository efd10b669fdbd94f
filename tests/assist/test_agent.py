"""Tool registry and the agent loop: schemas from typed functions (checked by jsonschema as the
reference), argument errors as text, the loop with scripted backends, a scripted LLM through
LocalBackend and through the server with OpenAIBackend, the `ask` command, and the default model."""

from __future__ import annotations

import json
from typing import Literal, Optional

import jsonschema
import pytest
from typer.testing import CliRunner

from opengpt.assist.agent import Agent, system_prompt
from opengpt.assist.backend import AssistantMessage, LocalBackend, OpenAIBackend, ToolCall
from opengpt.assist.tools.registry import Tool, ToolError, ToolRegistry, builtin_registry, check_value, tool

QUESTION = "What is 17.5% of 2,480, minus 3^4?"
CALL = '{"expression": "17.5% of 2,480 - 3^4"}'


def weather(city: str, days: int, unit: Literal["celsius", "fahrenheit"] = "celsius", hourly: bool = False,
            tags: Optional[list[str]] = None, scale: float | None = 1.5) -> str:
    """Forecast for a city.

    Spans several lines.

    Args:
        city: Name of the city.
        days (int): How many days,
            counted from today.
        unit: Temperature unit.
    Returns:
        text
    """
    return f"{city}: {days} days in {unit}"


WEATHER_SCHEMA = {"type": "function", "function": {
    "name": "weather", "description": "Forecast for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "Name of the city."},
        "days": {"type": "integer", "description": "How many days, counted from today."},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit.",
                 "default": "celsius"},
        "hourly": {"type": "boolean", "default": False},
        "tags": {"type": ["array", "null"], "items": {"type": "string"}},
        "scale": {"type": ["number", "null"], "default": 1.5},
    }, "required": ["city", "days"], "additionalProperties": False}}}


# -- registry ---------------------------------------------------------------------------------------
def test_schema_from_typed_function():
    t = Tool.from_function(weather)
    assert t.schema() == WEATHER_SCHEMA
    jsonschema.Draft202012Validator.check_schema(t.parameters)


def test_decorator_and_plain_param_lines():
    @tool(name="add_up")
    def add(a: int, b: int = 2) -> int:
        """Add two numbers.
        a: the first
        b: the second
        """
        return a + b

    assert add.name == "add_up" and add.description == "Add two numbers."
    assert add.parameters["properties"]["a"] == {"type": "integer", "description": "the first"}
    assert ToolRegistry([add]).call("add_up", '{"a": 3}') == "5"  # non-string results come back as JSON
    with pytest.raises(ToolError, match="needs a type hint"):
        Tool.from_function(lambda x: x)  # no hints
    def bad(x: set) -> str:
        return ""
    with pytest.raises(ToolError, match="parameter 'x'"):
        Tool.from_function(bad)


@pytest.mark.parametrize("args", [
    {"city": "Paris", "days": 3}, {"city": "Paris"}, {"city": 3, "days": 3}, {"city": "Oslo", "days": 2.0},
    {"city": "Oslo", "days": 2.5}, {"city": "Oslo", "days": True}, {"city": "Oslo", "days": 1, "unit": "kelvin"},
    {"city": "Oslo", "days": 1, "tags": ["a", 1]}, {"city": "Oslo", "days": 1, "tags": None, "scale": 2},
    {"city": "Oslo", "days": 1, "wind": True}, {"city": "Oslo", "days": 1, "hourly": "yes"},
])
def test_argument_check_agrees_with_jsonschema(args):
    schema = Tool.from_function(weather).parameters
    assert (check_value(args, schema, "arguments") == []) == jsonschema.Draft202012Validator(schema).is_valid(args)


def test_registry_returns_errors_as_text():
    reg = ToolRegistry([weather, *builtin_registry()])
    assert reg.call("weather", '{"city": "Paris", "days": 2.0}') == "Paris: 2 days in celsius"  # 2.0 -> int
    assert reg.call("weather", '{"city": "Paris"}') == "error: weather: missing required argument 'days'"
    assert reg.call("weather", '{"city": 1, "days": 1}') == "error: weather: argument 'city' must be string, not 1"
    assert "must be one of" in reg.call("weather", '{"city": "X", "days": 1, "unit": "kelvin"}')
    assert "unknown argument 'wind'" in reg.call("weather", '{"city": "X", "days": 1, "wind": 1}')
    assert reg.call("weather", '{"city": ').startswith("error: the arguments of weather are not valid JSON")
    assert reg.call("weather", "[1]").startswith("error: the arguments of weather must be a JSON object")
    assert reg.call("nope", "{}") == "error: there is no tool named 'nope'; the tools are: weather, calculator"
    assert reg.call("calculator", CALL) == "353"
    err = reg.call("calculator", '{"expression": "__import__(\'os\')"}')
    assert err.startswith("error: CalculatorError: ")
    with pytest.raises(ValueError, match="already registered"):
        reg.add(weather)
    with pytest.raises(ValueError, match="unknown tool 'shell'"):
        builtin_registry(["shell"])


def test_python_tool_runs_in_the_sandbox():
    reg = builtin_registry(["python"])
    assert reg.call("python", json.dumps({"code": "print(17.5 / 100 * 2480 - 3**4)"})) == "exit_code: 0\nstdout:\n353.0"
    out = reg.call("python", json.dumps({"code": "import sys; print('x'); sys.exit('boom')"}))
    assert out == "exit_code: 1\nstdout:\nx\nstderr:\nboom"


# -- the loop with scripted backends ----------------------------------------------------------------
class Scripted:
    """A backend that answers from a function of the conversation; records what it was sent."""

    def __init__(self, turn):
        self.turn, self.sent = turn, []

    def chat(self, messages, tools=None):
        self.sent.append((json.loads(json.dumps(messages)), tools))
        return self.turn(messages, tools)


def _last_tool_result(messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "tool")


def test_tool_result_reaches_the_answer():
    def turn(messages, tools):
        if messages[-1]["role"] == "user":
            return AssistantMessage("Let me compute.", [ToolCall("calculator", CALL)])
        return AssistantMessage(f"The answer is {_last_tool_result(messages)}.")

    backend = Scripted(turn)
    r = Agent(backend, builtin_registry()).run(QUESTION)
    assert r.answer == "The answer is 353." and r.stopped_reason == "answer"
    assert [(s.tool, s.arguments, s.result) for s in r.steps] == [("calculator", CALL, "353")]
    first, tools = backend.sent[0]
    assert tools == builtin_registry().schemas() and first[0]["content"] == system_prompt(builtin_registry())
    assert "calculator" in first[0]["content"] and first[1] == {"role": "user", "content": QUESTION}
    second, _ = backend.sent[1]
    call_id = second[2]["tool_calls"][0]["id"]
    assert second[3] == {"role": "tool", "tool_call_id": call_id, "name": "calculator", "content": "353"}


def test_step_limit_enforced():
    n = iter(range(100))

    def turn(messages, tools):  # always another (different) call while it has tools
        if tools is None:
            return AssistantMessage(f"Best guess: {_last_tool_result(messages)}")
        return AssistantMessage(None, [ToolCall("calculator", json.dumps({"expression": f"{next(n)} + 1"}))])

    backend = Scripted(turn)
    r = Agent(backend, builtin_registry(), max_steps=3).run("count")
    assert r.stopped_reason == "max_steps" and len(r.steps) == 3 and r.answer == "Best guess: 3"
    assert len(backend.sent) == 4 and backend.sent[-1][1] is None  # one last turn, without tools
    # a model that gives nothing then still ends with a clear answer
    silent = Scripted(lambda m, t: AssistantMessage(None, [ToolCall("calculator", CALL)] if t else []))
    r = Agent(silent, builtin_registry(), max_steps=1).run("x")
    assert r.answer == "No final answer: step limit reached (1 tool calls). Last tool result: 353"


def test_repeated_identical_calls_stop():
    runs = []

    def count(expression: str) -> str:
        """Counts its runs."""
        runs.append(expression)
        return "353"

    def turn(messages, tools):
        if tools is None:
            return AssistantMessage('<tool_call>{"name": "calculator", "arguments": {}}</tool_call>')
        return AssistantMessage(None, [ToolCall("calculator", '{"expression":  "1+1"}')])  # spacing differs: same call

    r = Agent(Scripted(turn), ToolRegistry([Tool.from_function(count, name="calculator")]), max_steps=10).run("x")
    assert runs == ["1+1"] and r.stopped_reason == "repeated_call"
    assert [s.repeated for s in r.steps] == [False, True, True]
    assert "already called calculator" in r.steps[1].result and "353" in r.steps[1].result
    assert r.answer.startswith("No final answer: the model kept repeating")  # a call without tools is no answer


# -- real models -----------------------------------------------------------------------------------
CALL_PIECES = ["Let me compute.", "<tool_call>", '{"name": "calculator", ',
               '"arguments": {"expression": "17.5% of 2,480 - 3^4"}}', "</tool_call>"]


@pytest.fixture(scope="module", params=["template-without-tools", "template-with-tools"])
def scripted_llm(request, tmp_path_factory):
    from tests.server.conftest import CHATML, CHATML_TOOLS
    from tests.server.test_tools import scripted_llm

    template = CHATML if request.param == "template-without-tools" else CHATML_TOOLS
    return scripted_llm(tmp_path_factory.mktemp("agent"), template, CALL_PIECES)


def _check_scripted_run(r):
    # the scripted model calls the calculator every turn: run once, refused once, then the loop ends
    assert [(s.tool, json.loads(s.arguments), s.result, s.repeated) for s in r.steps] == [
        ("calculator", json.loads(CALL), "353", False), ("calculator", json.loads(CALL), r.steps[1].result, True),
        ("calculator", json.loads(CALL), r.steps[2].result, True)]
    assert r.stopped_reason == "repeated_call" and r.answer == "Let me compute."


def test_local_backend_with_scripted_llm(scripted_llm):
    backend = LocalBackend(scripted_llm, max_new_tokens=40)
    r = Agent(backend, builtin_registry()).run(QUESTION)
    _check_scripted_run(r)
    prompt = scripted_llm.tokenizer.decode(backend.prompt(r.messages[:-1], builtin_registry().schemas()))
    assert '"name": "calculator"' in prompt and "353" in prompt  # the tools and the result reached the model


def test_openai_backend_and_cli_through_the_server(scripted_llm):
    from opengpt.__main__ import app
    from opengpt.server.app import ServerConfig, create_app
    from tests.server.conftest import live_server

    with live_server(create_app(scripted_llm, ServerConfig())) as url:
        _check_scripted_run(Agent(OpenAIBackend(url + "/v1", "x", max_tokens=40), builtin_registry()).run(QUESTION))
        out = CliRunner().invoke(app, ["ask", QUESTION, "--base-url", url + "/v1", "--max-new-tokens", "40",
                                       "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["answer"] == "Let me compute." and result["steps"][0]["result"] == "353"
    assert "[calculator]" in out.stderr and "stopped: repeated_call" in out.stderr


def test_cli_rejects_unknown_tool():
    from opengpt.__main__ import app

    out = CliRunner().invoke(app, ["ask", "hi", "--tools", "shell"])
    assert out.exit_code == 2 and "unknown tool 'shell'" in out.stderr


@pytest.mark.slow
def test_default_model_loop_terminates(default_llm):
    r = Agent(LocalBackend(default_llm, max_new_tokens=64), builtin_registry(), max_steps=3).run(QUESTION)
    assert isinstance(r.answer, str) and r.answer
    assert r.stopped_reason in ("answer", "max_steps", "repeated_call") and len(r.steps) <= 3 * 4
    for s in r.steps:  # whatever the model computes, a calculator call it makes carries the calculator's result
        if s.tool == "calculator" and not s.repeated:
            assert s.result == builtin_registry().call("calculator", s.arguments)


def test_forced_first_call_only_on_the_first_turn():
    sent = []

    class Recording:
        def chat(self, messages, tools=None, tool_choice="auto"):
            sent.append(tool_choice)
            if tool_choice == "required":
                return AssistantMessage(None, [ToolCall("calculator", CALL)])
            return AssistantMessage(f"It is {_last_tool_result(messages)}.")

    r = Agent(Recording(), builtin_registry(), first_tool_choice="required").run(QUESTION)
    assert sent == ["required", "auto"] and r.answer == "It is 353." and r.steps[0].result == "353"
    with pytest.raises(ValueError, match="first_tool_choice must be auto, required or a tool name"):
        Agent(Recording(), builtin_registry(), first_tool_choice="shell")


@pytest.mark.slow
def test_default_model_with_a_forced_first_call_answers_from_the_calculator(default_llm):
    """The embedded model never calls a tool on its own; decoding its first turn under the call's schema
    (as `opengpt ask` does for it) gets the calculator's exact result into the final answer."""
    r = Agent(LocalBackend(default_llm, max_new_tokens=64), builtin_registry(), max_steps=3,
              first_tool_choice="required").run(QUESTION)
    first = r.steps[0]
    assert first.tool == "calculator" and "expression" in json.loads(first.arguments)
    assert first.result == builtin_registry().call("calculator", first.arguments)  # a real calculator result
    assert first.result in r.answer, (r.answer, first)
