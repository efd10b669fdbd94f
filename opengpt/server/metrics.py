"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters and histograms are updated on the event loop only (one thread), so they need no locks.
Gauges that mirror engine state (queue length, KV blocks in use) are read at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(dict(key))} {v:g}")
        if not self.values:
            lines.append(f"{self.name} 0")
        return lines


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for le, c in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cum += c
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cum}')
        lines += [f"{self.name}_sum {self.sum:g}", f"{self.name}_count {self.count}"]
        return lines


class Gauge:
    """A value read when scraped."""

    def __init__(self, name: str, help: str, read: Callable[[], float]):
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.read():g}"]


class ServerMetrics:
    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]):
        p = "opengpt_"
        self.requests = Counter(p + "requests_total", "HTTP requests answered, by route and status code.")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = Counter(p + "generation_tokens_total", "Tokens generated.")
        self.rejected = Counter(p + "requests_rejected_total", "Requests refused because the queue was full.")
        self.ttft = Histogram(p + "time_to_first_token_seconds", "From request arrival to the first generated token.")
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Between consecutive generated tokens of a request.")
        self.e2e = Histogram(p + "request_duration_seconds", "From request arrival to the last generated token.")
        self.gauges = [Gauge(p + name, help, read) for name, (help, read) in gauges.items()]

    def render(self) -> str:
        lines: list[str] = []
        for m in (self.requests, self.prompt_tokens, self.generation_tokens, self.rejected, *self.gauges,
                  self.ttft, self.tpot, self.e2e):
            lines += m.render()
        return "\n".join(lines) + "\n"
