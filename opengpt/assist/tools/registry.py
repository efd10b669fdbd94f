"""Tools a model can call: a typed Python function becomes a JSON-schema'd tool, a registry runs calls.

`Tool.from_function(fn)` (or the `@tool` decorator) reads the schema from the signature and the
docstring, as OpenAI's function-calling format wants it:
* type hints: str, int, float, bool, list[X], dict, Literal[...], Optional[X] / X | None;
  a parameter without a default is required; a JSON-serialisable default is written as "default"
* docstring: the first paragraph is the tool's description; an "Args:" section (Google style) or
  `name: text` lines describe the parameters, continuation lines indented deeper.

`ToolRegistry.call(name, arguments_json)` is what an agent runs for each call a model makes: the
arguments are checked against the schema here (required, types, enums, unknown names; a small
check, so the core needs no jsonschema), and every failure -- bad JSON, a bad argument, the tool's
own exception -- comes back as text starting "error:", for the model to read and correct.

Built-in tools: `calculator` (exact arithmetic, calculator.py) and `python` (the sandbox, sandbox.py).
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Union

from .calculator import calculate
from .sandbox import run_python

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Raises|Yields|Examples?|Notes?)\s*:\s*$")
_PARAM_LINE = re.compile(r"^(\s*)\*?\*?(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


class ToolError(TypeError):
    """A function that cannot be declared as a tool (an unsupported type hint, a missing hint)."""


def _schema_of(hint: Any, where: str) -> dict:
    """JSON schema of one type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if origin is Literal:
        kinds = {_SIMPLE.get(type(a)) for a in args}
        schema: dict[str, Any] = {"enum": list(args)}
        if len(kinds) == 1 and None not in kinds:
            schema = {"type": kinds.pop(), **schema}
        return schema
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:  # Optional[X]: X or null
            schema = dict(_schema_of(rest[0], where))
            if "type" in schema:
                schema["type"] = [schema["type"], "null"]
            if "enum" in schema:
                schema["enum"] = [*schema["enum"], None]
            return schema
        raise ToolError(f"{where}: unions other than Optional[X] are not supported as tool parameters ({hint})")
    if origin is list:
        return {"type": "array", "items": _schema_of(args[0], where)} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    raise ToolError(f"{where}: type {hint!r} has no JSON schema here; use str, int, float, bool, list[...], dict, "
                    "Literal[...] or Optional[...]")


def parse_docstring(doc: str | None, names: Iterable[str] = ()) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) of a docstring: its first paragraph (which a
    `name: text` line of one of `names` also ends), and the `name: text` lines of an Args: section
    or of the rest of the text."""
    lines = inspect.cleandoc(doc or "").splitlines()
    names = set(names)
    first: list[str] = []
    i = 0

    def param_line(line: str) -> bool:
        m = _PARAM_LINE.match(line)
        return m is not None and m.group(2) in names

    while i < len(lines) and lines[i].strip() and not _SECTION.match(lines[i]) and not param_line(lines[i]):
        first.append(lines[i].strip())
        i += 1
    params: dict[str, str] = {}
    current, indent, section = None, 0, None
    for line in lines[i:]:
        if (m := _SECTION.match(line)) is not None:
            section, current = m.group(1).lower(), None
            continue
        if section not in (None, "args", "arguments", "parameters"):
            continue
        m = _PARAM_LINE.match(line)
        if m is not None and (current is None or len(m.group(1)) <= indent):
            current, indent = m.group(2), len(m.group(1))
            params[current] = m.group(3).strip()
        elif current is not None and line.strip() and len(line) - len(line.lstrip()) > indent:
            params[current] = f"{params[current]} {line.strip()}".strip()
        else:
            current = None
    return " ".join(first), params


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., Any]

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None, description: str | None = None) -> Tool:
        """A tool whose schema comes from `fn`'s type hints and docstring (module docstring says how)."""
        tool_name = name or fn.__name__
        signature = inspect.signature(fn)
        doc, param_docs = parse_docstring(fn.__doc__, signature.parameters)
        try:
            hints = typing.get_type_hints(fn)
        except NameError as e:
            raise ToolError(f"tool {tool_name}: cannot resolve its type hints ({e})") from None
        properties: dict[str, dict] = {}
        required: list[str] = []
        for p in signature.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ToolError(f"tool {tool_name}: *args / **kwargs cannot be declared; name each parameter")
            if p.name not in hints:
                raise ToolError(f"tool {tool_name}: parameter {p.name!r} needs a type hint")
            schema = _schema_of(hints[p.name], f"tool {tool_name}, parameter {p.name!r}")
            if p.name in param_docs:
                schema["description"] = param_docs[p.name]
            if p.default is p.empty:
                required.append(p.name)
            elif p.default is not None and _jsonable(p.default):
                schema["default"] = p.default
            properties[p.name] = schema
        parameters: dict[str, Any] = {"type": "object", "properties": properties}
        if required:
            parameters["required"] = required
        parameters["additionalProperties"] = False
        return cls(tool_name, description or doc, parameters, fn)

    def schema(self) -> dict:
        """The tool in OpenAI's `tools` form."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """Decorator: `@tool` or `@tool(name=...)` turns a typed function into a `Tool`."""
    if fn is None:
        return lambda f: Tool.from_function(f, name=name, description=description)
    return Tool.from_function(fn, name=name, description=description)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# -- argument check --------------------------------------------------------------------------------
_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer(),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def check_value(value: Any, schema: dict, where: str) -> list[str]:
    """Problems of `value` against the subset of JSON schema that `Tool.from_function` writes
    (type, enum, items, properties, required, additionalProperties); empty when it conforms."""
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds and not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
        return [f"{where} must be {' or '.join(kinds)}, not {json.dumps(value)}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where} must be one of {', '.join(json.dumps(e) for e in schema['enum'])}, not {json.dumps(value)}"]
    problems: list[str] = []
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            problems += check_value(v, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict) and ("properties" in schema or "required" in schema):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                problems.append(f"missing required argument {key!r}")
        if schema.get("additionalProperties") is False:
            for key in value:
                if key not in props:
                    problems.append(f"unknown argument {key!r} (expected: {', '.join(props) or 'none'})")
        for key, v in value.items():
            if key in props:
                problems += check_value(v, props[key], f"argument {key!r}")
    return problems


def _coerce(value: Any, schema: dict) -> Any:
    """JSON gives 2.0 for an integer the model wrote as 2.0: hand the function an int."""
    kinds = schema.get("type")
    if isinstance(value, float) and value.is_integer() and (kinds == "integer" or isinstance(kinds, list)
                                                             and "integer" in kinds and "number" not in kinds):
        return int(value)
    if isinstance(value, list) and "items" in schema:
        return [_coerce(v, schema["items"]) for v in value]
    return value


# -- registry --------------------------------------------------------------------------------------
class ToolRegistry:
    """Tools by name; `call` runs one from a model's JSON arguments and always returns text."""

    def __init__(self, tools: Iterable[Tool | Callable] = ()):
        self.tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, t: Tool | Callable) -> Tool:
        t = t if isinstance(t, Tool) else Tool.from_function(t)
        if t.name in self.tools:
            raise ValueError(f"a tool named {t.name!r} is already registered")
        self.tools[t.name] = t
        return t

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __getitem__(self, name: str) -> Tool:
        return self.tools[name]

    def __iter__(self):
        return iter(self.tools.values())

    def __len__(self) -> int:
        return len(self.tools)

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self) -> list[dict]:
        return [t.schema() for t in self.tools.values()]

    def call(self, name: str, arguments: str | dict) -> str:
        """The tool's result as text, or "error: ..." saying what was wrong (never raises for the model's mistakes)."""
        t = self.tools.get(name)
        if t is None:
            return f"error: there is no tool named {name!r}; the tools are: {', '.join(self.tools) or 'none'}"
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                return f"error: the arguments of {name} are not valid JSON ({e.msg} at position {e.pos})"
        if not isinstance(arguments, dict):
            return f"error: the arguments of {name} must be a JSON object, not {json.dumps(arguments)}"
        problems = check_value(arguments, t.parameters, "arguments")
        if problems:
            return f"error: {name}: " + "; ".join(problems)
        props = t.parameters.get("properties", {})
        kwargs = {k: _coerce(v, props.get(k, {})) for k, v in arguments.items()}
        try:
            result = t.fn(**kwargs)
        except Exception as e:  # the model reads the failure and may correct its call
            return f"error: {type(e).__name__}: {e}" if str(e) else f"error: {type(e).__name__}"
        if isinstance(result, str):
            return result
        return json.dumps(result, ensure_ascii=False) if _jsonable(result) else str(result)


# -- built-in tools --------------------------------------------------------------------------------
MAX_TOOL_OUTPUT = 4000  # characters of sandbox output shown to the model, each stream


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return its value. Use it for every calculation.

    Args:
        expression: The expression, e.g. "17.5% of 2,480 - 3^4" or "sqrt(2) * (1 + 1/3)". Supports
            + - * / // % ^ **, parentheses, "N% of X", pi, e, and functions such as sqrt, log, exp, sin,
            cos, tan, floor, ceil, round, abs, factorial, binomial.
    """
    return calculate(expression)


def python(code: str) -> str:
    """Run a Python 3 script in a sandbox (no network, no files kept, a few seconds of CPU) and return
    its exit code, stdout and stderr. Print whatever you want to see.

    Args:
        code: The complete script to run; use print() for the results.
    """
    r = run_python(code)
    return format_sandbox_result(r)


def format_sandbox_result(r) -> str:
    """A `SandboxResult` as the text a model reads: exit code, why it was stopped, stdout, stderr."""
    def cut(text: str) -> str:
        if len(text) <= MAX_TOOL_OUTPUT:
            return text
        return text[:MAX_TOOL_OUTPUT] + f"\n[... {len(text) - MAX_TOOL_OUTPUT} more characters cut]"

    lines = [f"exit_code: {r.exit_code}"]
    if r.stopped:
        lines.append(f"stopped: {r.stopped}")
    lines.append("stdout:\n" + cut(r.stdout.rstrip("\n")) if r.stdout else "stdout: (empty)")
    if r.stderr:
        lines.append("stderr:\n" + cut(r.stderr.rstrip("\n")))
    return "\n".join(lines)


BUILTIN_TOOLS: dict[str, Tool] = {t.name: t for t in (Tool.from_function(calculator), Tool.from_function(python))}


def builtin_registry(names: Iterable[str] = ("calculator",)) -> ToolRegistry:
    """A registry of built-in tools by name (calculator, python)."""
    names = list(names)
    unknown = [n for n in names if n not in BUILTIN_TOOLS]
    if unknown:
        raise ValueError(f"unknown tool {unknown[0]!r}; built-in tools: {', '.join(BUILTIN_TOOLS)}")
    return ToolRegistry(BUILTIN_TOOLS[n] for n in dict.fromkeys(names))
