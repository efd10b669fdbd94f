"""End to end: the `opengpt` command on the embedded default model."""

from __future__ import annotations

import subprocess
import sys

import pytest


def opengpt(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opengpt", *args], capture_output=True, text=True, timeout=timeout)


def test_chat_one_shot_answers():
    r = opengpt("chat", "What is the capital of France?", "--max-new-tokens", "24", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip(), "empty answer"
    assert "Paris" in r.stdout  # SmolLM2-135M-Instruct knows this one greedily


def test_generate_and_info():
    r = opengpt("generate", "--max-new-tokens", "8", "--temperature", "0", "Once upon a time")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = opengpt("info", "--json")
    assert r.returncode == 0, r.stderr
    assert '"architecture": "LlamaForCausalLM"' in r.stdout
    assert '"parameters": 134515008' in r.stdout


@pytest.mark.parametrize("cmd", ["chat", "generate", "info"])
def test_help_explains_flags(cmd):
    r = opengpt(cmd, "--help")
    assert r.returncode == 0
    assert "--model" in r.stdout and "checkpoint" in r.stdout


def test_bad_model_path_is_a_clear_error():
    r = opengpt("info", "--model", "/does/not/exist")
    assert r.returncode == 2
    assert "no such file or directory: /does/not/exist" in r.stderr
    assert "Traceback" not in r.stderr
