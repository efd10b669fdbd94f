"""The assistant commands end to end: `opengpt index add/ls/rm` on a real store, `ask --rag` errors,
and `code`, `ask --cot` and `ask --rag` against a live server whose scripted model gives fixed replies."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from opengpt.__main__ import app


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_index_add_ls_rm_and_errors(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "resume.md").write_text("# Resuming\n\nPass --resume RUN_DIR to continue a killed training run.\n")
    (docs / "serve.txt").write_text("The server listens on port 8000 and speaks the OpenAI API.\n")
    (docs / "blob.bin").write_bytes(b"\0\1\2" * 100)
    store = str(tmp_path / "ix" / "index.db")
    out = invoke("index", "add", str(docs), "--store", store)
    assert out.exit_code == 0, out.output
    assert "2 added" in out.stdout
    again = invoke("index", "add", str(docs), "--store", store)
    assert "2 unchanged" in again.stdout and "0 chunks written" in again.stdout
    ls = invoke("index", "ls", "--store", store)
    assert ls.exit_code == 0 and "resume.md" in ls.stdout and "serve.txt" in ls.stdout and "blob.bin" not in ls.stdout
    rm = invoke("index", "rm", str(docs / "resume.md"), "--store", store)
    assert rm.exit_code == 0 and "removed" in rm.stdout
    assert "resume.md" not in invoke("index", "ls", "--store", store).stdout
    bad = invoke("index", "rm", str(docs / "resume.md"), "--store", store)
    assert bad.exit_code == 2 and "resume.md" in bad.stderr
    missing = invoke("index", "add", str(tmp_path / "nothing"), "--store", store)
    assert missing.exit_code == 2 and "no such file or directory" in missing.stderr
    nostore = invoke("ask", "--rag", str(tmp_path / "none.db"), "how?")
    assert nostore.exit_code == 2 and "build one with `opengpt index add" in nostore.stderr
    notastore = tmp_path / "x.db"
    notastore.write_text("not sqlite")
    assert invoke("index", "ls", "--store", str(notastore)).exit_code == 2


def _server(tmp_path, pieces):
    from opengpt.server.app import ServerConfig, create_app
    from tests.server.conftest import CHATML, live_server
    from tests.server.test_tools import scripted_llm

    return live_server(create_app(scripted_llm(tmp_path, CHATML, pieces), ServerConfig()))


def test_code_command_through_a_server(tmp_path):
    pieces = ["```python\n", "def add(a, b):\n", "    return a + b\n", "```"]
    tests = tmp_path / "t.py"
    tests.write_text("assert add(2, 3) == 5\n")
    with _server(tmp_path, pieces) as url:
        out = invoke("code", "a function add(a, b)", "--base-url", url + "/v1", "--tests", str(tests), "--json",
                     "--out", str(tmp_path / "gen.py"))
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["clean"] and result["code"].strip() == "def add(a, b):\n    return a + b"
    assert (tmp_path / "gen.py").read_text() == result["code"]
    nofile = invoke("code", "x", "--tests", str(tmp_path / "missing.py"))
    assert nofile.exit_code == 2 and "missing.py" in nofile.stderr


def test_ask_cot_through_a_server_checks_and_flags(tmp_path):
    with _server(tmp_path, ["Each box has 3 * 4 = 13 pens.\n", "Answer: 13"]) as url:
        out = invoke("ask", "--cot", "3 boxes of 4 pens?", "--base-url", url + "/v1", "--repairs", "1", "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # the scripted model repeats its wrong step whatever it is told: one repair, then flagged
    assert not r["verified"] and r["repairs"] == 1 and r["flag"] == "unverified: 3 * 4 = 13 is wrong: 3 * 4 = 12"
    assert "✗ 3 * 4 = 13 is wrong" in out.stderr


def test_ask_rag_through_a_server_cites_real_chunks(tmp_path):
    doc = tmp_path / "resume.md"
    doc.write_text("# Resuming\n\nPass --resume RUN_DIR to continue a killed training run from its last checkpoint.\n")
    store = str(tmp_path / "index.db")
    assert invoke("index", "add", str(doc), "--store", store).exit_code == 0
    with _server(tmp_path, ["Use --resume RUN_DIR [1]."]) as url:
        out = invoke("ask", "--rag", store, "How do I resume training?", "--base-url", url + "/v1", "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["answer"] == "Use --resume RUN_DIR [1]." and r["invalid_citations"] == []
    assert [c["source"] for c in r["cited"]] and "--resume RUN_DIR" in r["cited"][0]["text"]


def test_summarize_command_through_a_server(tmp_path):
    doc = tmp_path / "report.md"
    doc.write_text("\n\n".join(f"# Section {i}\n\n" + f"Fact {i}: the lamp in room {i} is green. " * 30
                               for i in range(1, 21)))
    with _server(tmp_path, ["Rooms have green lamps."]) as url:
        out = invoke("summarize", str(doc), "--base-url", url + "/v1", "--window", "512",
                     "--max-summary-tokens", "32", "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["summary"] == "Rooms have green lamps." and r["levels"] >= 2
    assert r["pieces_per_level"] == sorted(r["pieces_per_level"], reverse=True) and r["pieces_per_level"][0] > 1
    missing = invoke("summarize", str(tmp_path / "none.txt"))
    assert missing.exit_code == 2 and "none.txt" in missing.stderr
    (tmp_path / "bin.txt").write_bytes(b"\0\1binary")
    assert invoke("summarize", str(tmp_path / "bin.txt")).exit_code == 2
