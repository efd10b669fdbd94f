"""Code generation with the repair loop: ruff and compile findings, autofix, code extraction, the loop
with scripted backends (repair, round limit, best candidate, tests in the sandbox, hostile code), the
CLI function, and the default model end to end."""

from __future__ import annotations

import json
import os
import sys

import pytest

from opengpt.assist import codegen
from opengpt.assist.backend import AssistantMessage
from opengpt.assist.codegen import (CodeResult, RuffMissing, check_code, extract_code, generate_code, ruff_check,
                                    run_cli, syntax_findings)

BAD_NAME = "def area(r):\n    return pi * r * r\n"
GOOD = "import math\n\n\ndef area(r):\n    return math.pi * r * r\n"


def fenced(code: str) -> str:
    return f"Here is the module:\n```python\n{code}```\nIt computes the area."


class Scripted:
    """A backend replying with the given texts in turn (the last one forever); records every conversation."""

    def __init__(self, *replies: str):
        self.replies, self.calls = list(replies), []

    def chat(self, messages, tools=None):
        self.calls.append([dict(m) for m in messages])
        return AssistantMessage(self.replies[min(len(self.calls), len(self.replies)) - 1])


# -- the checks ----------------------------------------------------------------------------------------
def test_ruff_findings_from_known_bad_code():
    found = ruff_check("import os\n\n\ndef f():\n    return x\n")
    assert [(f.code, f.row, f.col) for f in found] == [("F401", 1, 8), ("F821", 5, 12)]
    assert found[0].fixable and not found[1].fixable
    assert str(found[1]) == "gen.py:5:12: F821 Undefined name `x`"


def test_autofix_removes_unused_import_and_leaves_the_rest():
    r = check_code("import os\nimport sys\n\n\ndef f():\n    return x\n")
    assert [f.code for f in r.autofixed] == ["F401", "F401"]
    assert "import" not in r.code and [(f.code, f.row) for f in r.findings] == [("F821", 4)]  # rows of the fixed code
    off = check_code("import os\n", autofix=False)
    assert off.code == "import os\n" and [f.code for f in off.findings] == ["F401"]


def test_noqa_in_generated_code_does_not_silence_ruff():
    assert [f.code for f in ruff_check("def f():\n    return x  # noqa\n")] == ["F821"]


def test_syntax_error_reported_with_line():
    assert syntax_findings("x = 1\n") == []
    [f] = syntax_findings("x = 1\ndef f(:\n    pass\n")
    assert f.code == "SyntaxError" and f.row == 2 and str(f).startswith("gen.py:2:")
    r = check_code("x = 1\ndef f(:\n    pass\n")  # ruff is not asked: it would only repeat the error
    assert [x.code for x in r.findings] == ["SyntaxError"] and r.score()[0]


def test_default_selection_ignores_style_only_rules():
    long_line = "X = " + " + ".join(["1"] * 60) + "\n"
    assert ruff_check(long_line) == []  # E501
    assert [f.code for f in ruff_check("def f(a=[]):\n    return a\n")] == ["B006"]
    assert [f.code for f in ruff_check(long_line, ignore=())] == ["E501"]


def test_ruff_missing_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "ruff.__main__", None)  # makes the import fail
    monkeypatch.setattr(codegen.shutil, "which", lambda name: None)
    with pytest.raises(RuffMissing, match="pip install ruff"):
        codegen.ruff_bin()
    with pytest.raises(RuffMissing):
        generate_code("x", Scripted(fenced(GOOD)))
    assert generate_code("x", Scripted(fenced(GOOD)), lint=False).clean  # no ruff needed without lint


# -- extraction ------------------------------------------------------------------------------------------
def test_extract_code_fenced_unfenced_multi_block():
    assert extract_code(fenced(GOOD)) == GOOD
    assert extract_code(GOOD.strip()) == GOOD  # no fence: the whole reply
    assert extract_code("```\nx = 1\n```") == "x = 1\n"  # an untagged fence
    multi = ("```python\nimport math\n```\nThe module:\n```python\n" + GOOD + "```\nUsage:\n```py\nprint(area(2))\n```\n"
             "```bash\npip install nothing-needed-at-all-here-just-a-long-line-of-shell\n```")
    assert extract_code(multi) == GOOD  # the largest python block; a longer bash block does not count
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1\n"  # cut off at max tokens
    assert extract_code(None) == "" and extract_code("  \n") == ""


def test_empty_reply_is_a_finding():
    r = generate_code("x", Scripted(""), max_rounds=1)
    assert not r.clean and r.rounds == 1 and r.history[0].findings[0].code == "empty"


# -- the loop ------------------------------------------------------------------------------------------
def test_repair_loop_feeds_findings_back():
    backend = Scripted(fenced(BAD_NAME), fenced(GOOD))
    r = generate_code("area of a circle", backend, max_rounds=3)
    assert r.clean and r.rounds == 1 and r.code == GOOD and len(backend.calls) == 2
    assert [f.code for f in r.history[0].findings] == ["F821"] and r.history[1].findings == []
    second = backend.calls[1]
    assert second[-2] == {"role": "assistant", "content": f"```python\n{BAD_NAME}```"}
    assert "gen.py:2:12: F821 Undefined name `pi`" in second[-1]["content"]
    assert "return pi * r * r" in second[-1]["content"]  # the offending source line is quoted
    assert "area of a circle" in second[1]["content"] and len(second) == 4  # only the latest candidate goes back


def test_round_limit_keeps_the_best_candidate():
    two_bad = "def f():\n    return a + b\n"
    backend = Scripted(fenced("def f(:\n"), fenced(BAD_NAME), fenced(two_bad))
    r = generate_code("x", backend, max_rounds=2)
    assert not r.clean and r.rounds == 2 and len(backend.calls) == 3
    assert r.best_round == 1 and r.code == BAD_NAME  # compiles beats syntax error, 1 finding beats 2
    assert [len(h.findings) for h in r.history] == [1, 1, 2]
    assert generate_code("x", Scripted(fenced(BAD_NAME)), max_rounds=0).rounds == 0
    with pytest.raises(ValueError):
        generate_code("x", Scripted(""), max_rounds=-1)


def test_lint_off_checks_syntax_only():
    assert generate_code("x", Scripted(fenced(BAD_NAME)), lint=False).clean
    r = generate_code("x", Scripted(fenced("def f(:\n"), fenced(BAD_NAME)), lint=False)
    assert r.clean and r.rounds == 1


def test_tests_run_in_the_sandbox_and_failures_are_repaired():
    wrong, right = "def add(a, b):\n    return a - b\n", "def add(a, b):\n    return a + b\n"
    tests = "import gen\n\nassert add(2, 3) == 5\nassert gen.add(-1, 1) == 0\n"
    backend = Scripted(fenced(wrong), fenced(right))
    r = generate_code("add", backend, tests=tests)
    assert r.clean and r.rounds == 1 and r.tests is not None and r.tests.passed
    first = r.history[0]
    assert not first.tests.passed and first.tests.exit_code == 1 and "AssertionError" in first.tests.output
    assert first.findings[-1].code == "tests"
    assert "tests.py\", line 3" in backend.calls[1][-1]["content"]  # the traceback's tail, with the tests' own lines


def test_hostile_code_runs_only_in_the_sandbox(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("OPENGPT_CODEGEN_SECRET", "hunter2")
    hostile = (f"import os\n\nos.system('touch {marker}')\ntry:\n    open({str(marker)!r}, 'w').close()\n"
               "except OSError:\n    pass\nprint('secret=' + repr(os.environ.get('OPENGPT_CODEGEN_SECRET')))\n")
    r = generate_code("x", Scripted(fenced(hostile)))  # no tests: only static checks, nothing executes
    assert r.clean and not marker.exists()
    r = generate_code("x", Scripted(fenced(hostile)), tests="pass\n")
    assert r.clean and "secret=None" in r.tests.output  # the parent's environment is not the code's
    assert os.environ["OPENGPT_CODEGEN_SECRET"] == "hunter2"
    if r.tests.mode in ("ns", "userns"):  # a private /tmp: the host's stays untouched
        assert not marker.exists()


def test_result_serialises():
    r = generate_code("x", Scripted(fenced(BAD_NAME), fenced(GOOD)))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["clean"] and d["history"][0]["findings"][0]["code"] == "F821" and isinstance(r, CodeResult)


def test_run_cli(tmp_path, capsys):
    tests = tmp_path / "t.py"
    tests.write_text("assert area(1) > 3.14\n")
    out = tmp_path / "gen.py"
    assert run_cli("area", Scripted(fenced(BAD_NAME), fenced(GOOD)), tests_file=str(tests), out=str(out)) == 0
    cap = capsys.readouterr()
    assert cap.out == GOOD and out.read_text() == GOOD
    assert "[first draft] 2 problem(s)" in cap.err and "F821" in cap.err and "NameError" in cap.err and "[repair 1] no problem(s); tests passed" in cap.err
    assert run_cli("area", Scripted(fenced(BAD_NAME)), rounds=1, json_out=True) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out)["clean"] is False and "not clean after 1 repair round(s)" in cap.err
    with pytest.raises(OSError):
        run_cli("area", Scripted(fenced(GOOD)), tests_file=str(tmp_path / "missing.py"))


# -- the default model ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_end_to_end(default_llm):
    from opengpt.assist.backend import LocalBackend

    r = generate_code("a function add(a, b) that returns the sum", LocalBackend(default_llm, max_new_tokens=256),
                      max_rounds=2)
    assert r.rounds <= 2 and len(r.history) == r.rounds + 1
    if r.history[r.best_round].score()[0]:
        pytest.fail(f"no syntactically valid candidate in {len(r.history)} rounds: {r.code!r}")
    compile(r.code, "gen.py", "exec")
    assert r.code.strip()
