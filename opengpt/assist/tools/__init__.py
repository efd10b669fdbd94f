"""Tools an assistant can call: each takes text from a model and returns text or a clear error."""

from .calculator import CalculatorError, calculate, evaluate
from .sandbox import SandboxResult, run_python
from .registry import BUILTIN_TOOLS, Tool, ToolError, ToolRegistry, builtin_registry, tool
