"""Helpers shared by the benchmark scripts: run conditions, timing, one generation's speed, JSON output,
the cache pair files.

Every script measures side by side in one process (bandwidth on these VMs drifts ±20% between runs,
more while other work shares the CPU), so each result records the conditions it was taken under:
threads, versions and the load average before and after. Decode speed is read off one generation's
token timestamps: the first token arrives after the prefill, the rest each after one decode step.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch


def cpu() -> dict:
    """The processor and the vector ISA torch's CPU kernels can use. Machines of one kind here have
    come with different processors (AMD Zen 3 with AVX2 only, Zen 4 with AVX-512 BF16/VNNI); bf16 and
    the packed int8/int4 kernels run several times faster with AVX-512, so a figure means little without it."""
    info: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update({"model_name": fields.get("model name"), "family": fields.get("cpu family"), "model": fields.get("model"),
                 "avx512_bf16": "avx512_bf16" in flags, "avx512_vnni": "avx512_vnni" in flags, "avx2": "avx2" in flags})
    return info


def conditions() -> dict:
    """What a figure depends on besides the code: machine, processor, threads, versions, current CPU load."""
    return {"machine": platform.processor() or platform.machine(), "cpu": cpu(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average_1min_at_start": os.getloadavg()[0]}


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@dataclass
class TokenTimes:
    """One generation's tokens and when they came: the first after the prefill, each later one after
    one decode step (sampling included)."""

    tokens: list[int]
    first_token_s: float  # prefill + first sample
    steps_s: list[float]  # each decode step

    @property
    def decode_tok_s(self) -> float:
        """Decode throughput over the whole run."""
        return len(self.steps_s) / sum(self.steps_s)

    @property
    def median_step_tok_s(self) -> float:
        """1 / the median step: the per-token speed, robust to bursts of load from other processes."""
        return 1 / statistics.median(self.steps_s)


def time_tokens(tokens: Iterable[int]) -> TokenTimes:
    """Drain a token iterator, stamping each token."""
    out, stamps = [], [time.perf_counter()]
    for tok in tokens:
        stamps.append(time.perf_counter())
        out.append(tok)
    if len(out) < 2:
        raise ValueError("decode speed needs at least 2 generated tokens; raise the number of new tokens")
    return TokenTimes(out, stamps[1] - stamps[0], [b - a for a, b in itertools.pairwise(stamps[1:])])


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (linear between closest ranks, as numpy's default)."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def write_json(result: dict, path: str | Path, conditions: dict | None = None) -> None:
    """Write a result with the load average at its end (the start is in `conditions()`), stamped into
    `conditions` (default: the result's own; a run that adds one entry to an older file stamps its entry's)."""
    (result.setdefault("conditions", {}) if conditions is None else conditions)["load_average_1min_at_end"] = os.getloadavg()[0]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def shown_path(path: str | Path) -> str:
    """A data file's path as results name it: relative to the repository when it is inside."""
    p, root = Path(path).resolve(), Path(__file__).resolve().parent.parent
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(path)


def read_pair_groups(path: str | Path) -> list[dict]:
    """The groups of a cache pair file (benchmarks/data/cache_pairs*.jsonl), one JSON object per line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def group_texts(groups: list[dict]) -> list[str]:
    """Every question of the groups: q, its paraphrases p and its near misses n, in file order."""
    return [t for g in groups for t in [g["q"], *g["p"], *(n[0] for n in g["n"])]]
