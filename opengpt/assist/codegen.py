"""Code generation with a static-analysis repair loop: the model writes a module, the compiler, ruff and
optional tests judge it, the findings go back to the model, until it is clean or the rounds run out.

`generate_code(task, backend)` owns the loop (round 0 generates, each further round repairs) and
`run_cli` the `opengpt code TASK` command around it. Per candidate module, `check_code` runs, in order:
* `compile()` in process: it only parses and emits bytecode, never executes anything, so it is as safe
  as `python -m py_compile` (which calls the same function) without a subprocess per round;
* `ruff check` (ruff never imports or runs what it analyses), safe autofixes applied first so the model
  is only asked about what ruff cannot fix itself; skipped with `lint=False`;
* the user's tests, if any: the only step that executes generated code, and it does so only in
  `opengpt.assist.tools.sandbox.run_python`, with the module as `gen.py` next to the test script.
Every round is kept (code, findings, what ruff fixed, the test run), so a user sees what was fixed; if
the rounds run out, the best candidate is returned, marked not clean.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .backend import ChatBackend
from .tools.sandbox import run_python

# pycodestyle errors/warnings, pyflakes and bugbear: what catches real bugs (undefined names, unused
# imports and variables, mutable defaults, invalid escapes). Ignored, as taste rather than correctness:
# E501 line length (a model cannot count columns, and long lines work), E731 lambda assignment, E741
# names like `l`, B905 zip() without strict= (a choice, not a bug). Ruff's E1-E3 layout rules are
# preview-only, so formatting noise stays out without listing it.
DEFAULT_SELECT = ("E", "F", "W", "B")
DEFAULT_IGNORE = ("E501", "E731", "E741", "B905")
FILENAME = "gen.py"
MAX_LISTED = 20  # findings quoted back per round: a flood of them would crowd out the code in a small context
OUTPUT_TAIL = 2000  # characters of a failing test run's output shown to the model (the traceback's end)

SYSTEM_PROMPT = ("You are an expert Python programmer. Reply with one complete, self-contained Python module "
                 "(standard library only) in a single ```python code block, with no explanations before or after.")
REPAIR_REQUEST = "Fix these problems. Reply with the whole corrected module in a single ```python block, no explanations."


class RuffMissing(RuntimeError):
    """`ruff` (the linter) is neither importable nor on PATH."""


@dataclass(slots=True)
class Finding:
    code: str  # a ruff rule ("F821"), "SyntaxError", "empty" or "tests"
    message: str
    row: int = 0  # 1-based; 0 when the finding is about the whole module or its tests
    col: int = 0
    fixable: bool = False  # ruff has a safe fix for it (what autofix applies)

    def __str__(self) -> str:
        where = f"{FILENAME}:{self.row}:{self.col}" if self.row else FILENAME
        return f"{where}: {self.code} {self.message}"


@dataclass(slots=True)
class TestRun:
    __test__ = False  # not a pytest test class, whatever its name
    passed: bool
    exit_code: int | None
    stopped: str | None  # why the sandbox ended it early ("timeout", "memory", ...), else None
    output: str  # the tail of stdout then stderr
    duration_s: float
    mode: str  # the sandbox's isolation mode


@dataclass
class Round:
    code: str  # the candidate as checked (after ruff's safe fixes)
    findings: list[Finding]
    autofixed: list[Finding] = field(default_factory=list)  # what ruff fixed before the check
    tests: TestRun | None = None
    index: int = 0  # 0: the first generation, n: the n-th repair
    reply: str = ""  # the model's raw reply

    @property
    def clean(self) -> bool:
        return not self.findings

    def score(self) -> tuple[bool, bool, int]:
        """Lower is better: code that compiles beats code that does not, passing tests beat lint silence."""
        broken = any(f.code in ("SyntaxError", "empty") for f in self.findings)
        return broken, self.tests is not None and not self.tests.passed, len(self.findings)


@dataclass
class CodeResult:
    code: str  # the best candidate: the clean one, else the best-scoring one (earliest on ties)
    clean: bool
    rounds: int  # repair rounds used (0: the first generation was clean)
    history: list[Round]
    best_round: int = 0
    tests: TestRun | None = None  # the best candidate's test run

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- the checks --------------------------------------------------------------------------------------

def ruff_bin() -> str:
    """The ruff executable: the one the `ruff` package ships (the venv's), else one on PATH."""
    try:
        from ruff.__main__ import find_ruff_bin

        return str(find_ruff_bin())
    except (ImportError, FileNotFoundError):
        pass
    if found := shutil.which("ruff"):
        return found
    raise RuffMissing("linting needs ruff, which is not installed: pip install ruff (or run with --no-lint)")


def _ruff(code: str, args: list[str], select: Sequence[str], ignore: Sequence[str]) -> subprocess.CompletedProcess:
    # --isolated: no pyproject/ruff.toml of the cwd decides the rules; --ignore-noqa: a generated noqa comment
    # cannot silence a finding; the target version is ours, because this interpreter runs the code.
    cmd = [ruff_bin(), "check", *args, "--no-cache", "--isolated", "--ignore-noqa",
           f"--target-version=py{sys.version_info[0]}{sys.version_info[1]}",
           f"--select={','.join(select)}", *([f"--ignore={','.join(ignore)}"] if ignore else []),
           "--stdin-filename", FILENAME, "-"]
    p = subprocess.run(cmd, check=False, input=code, capture_output=True, text=True, timeout=60)
    if p.returncode not in (0, 1):  # 1 means findings; anything else is ruff failing (bad rule name, ...)
        raise RuntimeError(f"ruff failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    return p


def ruff_check(code: str, select: Sequence[str] = DEFAULT_SELECT, ignore: Sequence[str] = DEFAULT_IGNORE) -> list[Finding]:
    """Ruff's findings on `code`, in source order."""
    out = _ruff(code, ["--output-format=json"], select, ignore).stdout
    findings = []
    for d in json.loads(out or "[]"):
        rule = d.get("code") or "invalid-syntax"
        findings.append(Finding("SyntaxError" if rule == "invalid-syntax" else rule, d["message"],
                                d["location"]["row"], d["location"]["column"],
                                (d.get("fix") or {}).get("applicability") == "safe"))
    return findings


def ruff_fix(code: str, select: Sequence[str] = DEFAULT_SELECT, ignore: Sequence[str] = DEFAULT_IGNORE) -> str:
    """`code` with ruff's safe fixes applied (unsafe ones can change behaviour: those the model decides)."""
    return _ruff(code, ["--fix-only", "--exit-zero"], select, ignore).stdout


def syntax_findings(code: str) -> list[Finding]:
    """What `python -m py_compile` would report, from `compile()`: it parses and never executes the code."""
    try:
        with warnings.catch_warnings():  # SyntaxWarnings (invalid escapes) are ruff's W605, not failures
            warnings.simplefilter("ignore")
            compile(code, FILENAME, "exec", dont_inherit=True)  # dont_inherit: not our __future__ imports
    except SyntaxError as e:
        return [Finding("SyntaxError", e.msg, e.lineno or 1, e.offset or 0)]
    except ValueError as e:  # source with NUL bytes
        return [Finding("SyntaxError", str(e), 1, 0)]
    return []


# The tests run as a script that sees every name of the module (as asserts written against it expect)
# and the module itself as `gen`; exec with the file's own name keeps traceback line numbers the user's.
_TEST_RUNNER = """import gen
_ns = {k: v for k, v in vars(gen).items() if not k.startswith("__")}
_ns.update(__name__="__main__", gen=gen)
with open("tests.py", encoding="utf-8") as _f:
    exec(compile(_f.read(), "tests.py", "exec"), _ns)
"""


def run_tests(code: str, tests: str, timeout: float = 10.0) -> TestRun:
    """Run `tests` (asserts, or a script importing `gen`) against `code` in the sandbox: passed iff exit 0."""
    r = run_python(_TEST_RUNNER, timeout=timeout, cpu_seconds=timeout, max_output_bytes=1 << 16,
                   files={FILENAME: code, "tests.py": tests})
    # stdout first: the traceback, at the end of stderr, is what the tail must keep
    output = (r.stdout + ("\n" if r.stderr and r.stdout else "") + r.stderr)[-OUTPUT_TAIL:]
    return TestRun(r.exit_code == 0 and r.stopped is None, r.exit_code, r.stopped, output, r.duration_s, r.mode)


def check_code(code: str, *, lint: bool = True, autofix: bool = True, tests: str | None = None,
               select: Sequence[str] = DEFAULT_SELECT, ignore: Sequence[str] = DEFAULT_IGNORE,
               test_timeout: float = 10.0) -> Round:
    """One candidate through compile, (autofix and) ruff, and the tests; the Round holds the fixed code."""
    if not code.strip():
        return Round(code, [Finding("empty", "the reply contained no code")])
    if findings := syntax_findings(code):  # ruff would only repeat it, and tests cannot import it
        return Round(code, findings)
    autofixed: list[Finding] = []
    if lint:
        findings = ruff_check(code, select, ignore)
        if autofix and any(f.fixable for f in findings):
            code = ruff_fix(code, select, ignore)
            autofixed = [f for f in findings if f.fixable]
            findings = ruff_check(code, select, ignore)
    run = run_tests(code, tests, test_timeout) if tests is not None else None
    if run is not None and not run.passed:
        last = next((ln for ln in reversed(run.output.strip().splitlines()) if ln.strip()), "")
        why = f"stopped: {run.stopped}" if run.stopped else f"exit code {run.exit_code}"
        findings = [*findings, Finding("tests", f"failed ({why}): {last.strip()}"[:300])]
    return Round(code, findings, autofixed, run)


# ---- the model's side ------------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*```[ \t]*$|\Z)", re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def extract_code(reply: str | None) -> str:
    """The module in a reply: the largest ```python block (else the largest untagged one, else any), or,
    with no fence, the whole reply. Largest rather than concatenated: models follow the module with a
    usage example or a shell line, and joining those in would duplicate or break the module. An
    unterminated fence (the reply was cut at max tokens) runs to the end of the reply."""
    reply = reply or ""
    blocks = [(m[1].lower(), m[2]) for m in _FENCE.finditer(reply)]
    for wanted in (lambda t: t in _PYTHON_TAGS, lambda t: t == "", lambda t: True):
        if chosen := [body for tag, body in blocks if wanted(tag)]:
            return max(chosen, key=len).strip("\n") + "\n"  # max keeps the first of equal sizes
    return reply.strip() + "\n" if reply.strip() else ""


def feedback(r: Round) -> str:
    """The repair request for a round: each finding as `gen.py:ROW:COL: CODE message` with its source line,
    then the end of the failing test output."""
    lines = r.code.splitlines()
    parts = [f"Checking {FILENAME} (the module above) found {len(r.findings)} problem(s):"]
    for f in r.findings[:MAX_LISTED]:
        parts.append(str(f))
        if 0 < f.row <= len(lines) and lines[f.row - 1].strip():
            parts.append(f"    {lines[f.row - 1].strip()}")
    if len(r.findings) > MAX_LISTED:
        parts.append(f"... and {len(r.findings) - MAX_LISTED} more")
    if r.tests is not None and not r.tests.passed:
        parts.append(f"The tests failed; the end of their output:\n```\n{r.tests.output.strip()}\n```")
    return "\n".join([*parts, REPAIR_REQUEST])


def generate_code(task: str, backend: ChatBackend, *, lint: bool = True, max_rounds: int = 3,
                  tests: str | None = None, autofix: bool = True, select: Sequence[str] = DEFAULT_SELECT,
                  ignore: Sequence[str] = DEFAULT_IGNORE, test_timeout: float = 10.0, system: str | None = None,
                  on_round: Callable[[Round], None] | None = None) -> CodeResult:
    """Write a module for `task`, then repair it up to `max_rounds` times until compile, ruff (with `lint`)
    and `tests` (run in the sandbox) find nothing. `on_round` sees each round as soon as it is checked."""
    if max_rounds < 0:
        raise ValueError("max_rounds must be at least 0")
    if lint:
        ruff_bin()  # fail before the first generation, not after it
    base = [{"role": "system", "content": system or SYSTEM_PROMPT},
            {"role": "user", "content": f"Write a Python module: {task.strip()}"}]
    messages, history = base, []
    for index in range(max_rounds + 1):
        reply = backend.chat(messages).content or ""
        r = check_code(extract_code(reply), lint=lint, autofix=autofix, tests=tests, select=select,
                       ignore=ignore, test_timeout=test_timeout)
        r.index, r.reply = index, reply
        history.append(r)
        if on_round is not None:
            on_round(r)
        if r.clean:
            break
        # Only the latest candidate goes back, as the assistant's turn (the checked, autofixed code, so line
        # numbers match the findings): earlier broken versions would only fill a small model's context.
        messages = [*base, {"role": "assistant", "content": f"```python\n{r.code}```"},
                    {"role": "user", "content": feedback(r)}]
    best = min(history, key=Round.score)
    return CodeResult(best.code, best.clean, len(history) - 1, history, best.index, best.tests)


# ---- `opengpt code TASK` ---------------------------------------------------------------------------

def run_cli(task: str, backend: ChatBackend, *, lint: bool = True, rounds: int = 3, tests_file: str | None = None,
            out: str | None = None, json_out: bool = False) -> int:
    """The command: progress per round on stderr; the code (or, with `json_out`, the whole CodeResult) on
    stdout, the code also to `out`. Returns the exit status: 0 clean, 1 not clean after `rounds` repairs.
    Raises RuffMissing (lint without ruff) and OSError (unreadable tests file) before generating."""
    tests = Path(tests_file).read_text(encoding="utf-8") if tests_file else None
    if lint:
        ruff_bin()

    def show(r: Round) -> None:
        what = "first draft" if r.index == 0 else f"repair {r.index}"
        fixed = f"; ruff fixed {', '.join(sorted({f.code for f in r.autofixed}))}" if r.autofixed else ""
        passed = "" if r.tests is None else "; tests passed" if r.tests.passed else ""
        print(f"[{what}] {len(r.findings) or 'no'} problem(s){fixed}{passed}", file=sys.stderr)
        for f in r.findings[:MAX_LISTED]:
            print(f"  {f}", file=sys.stderr)

    result = generate_code(task, backend, lint=lint, max_rounds=rounds, tests=tests, on_round=show)
    if not result.clean:
        print(f"not clean after {result.rounds} repair round(s); the best candidate (round {result.best_round}) "
              f"follows", file=sys.stderr)
    if out:
        Path(out).write_text(result.code, encoding="utf-8")
    if json_out:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write(result.code)
    return 0 if result.clean else 1
