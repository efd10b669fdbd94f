"""Cost routing over N chat backends: send each request to the cheapest backend likely to answer it well.

Follows RouteLLM (Ong et al., 2024, "RouteLLM: Learning to Route LLMs with Preference Data"): a small
learned scorer estimates how hard a request is, a threshold calibrated on sample traffic turns that
score into a choice. RouteLLM routes between two models; here there are N tiers ordered by price.

* `BackendSpec` / `RouterConfig` / `load_router_config(path)`: the YAML file (configs/router.yaml
  documents every key); errors name the file, line and key and say how to fix it.
* `ComplexityScorer`: hand-made features of the conversation (see `FEATURES`) plus optional hashed
  word unigrams, into a logistic regression; `score(messages)` is the estimated probability that the
  cheapest backend answers wrongly (0 easy .. 1 hard). The shipped model (router_scorer.json) is
  trained by benchmarks/router.py on whether SmolLM2-135M answered each prompt correctly.
* `Router.choose(messages)`: backends sorted by price (cost_per_1k_prompt + cost_per_1k_completion,
  config order breaks ties); the first whose threshold ("max difficulty") covers the score takes the
  request, the most expensive takes everything else. A backend without a threshold is never chosen
  first; it only serves as a fallback.
* `Router.chat(body)`: an OpenAI chat body in, a chat.completion dict out (non-streaming). On any
  backend error (connection refused, timeout, an HTTP error status, an exception in a local model) the
  next backend up the price order is tried, then the ones below the choice; every attempt is recorded
  in `Decision.fallbacks`, and a `RouterError` listing each backend's error is raised when all fail.
* `Router.calibrate(prompts, strong_share)`: thresholds from the scores of sample prompts so that
  ~strong_share of them go to the strongest backend; the rest is split in equal shares over the
  cheaper tiers, cheapest taking the easiest (so with tiers A < B < C and strong_share 0.2: A gets
  the easiest 40%, B the next 40%, C the hardest 20%). Prompts with equal scores cannot be split, so
  each cut goes to the boundary between different scores nearest to its target; the report gives the
  real shares next to the targets.
* Clients: `LocalClient` (an `opengpt.LLM`, loaded on first use; optionally the tool loop) and
  `OpenAIClient` (httpx to `{base_url}/chat/completions`); anything with `chat(body) -> dict` that raises
  `BackendError` on failure can be passed in `clients`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

DEFAULT_SCORER = Path(__file__).with_name("router_scorer.json")
KINDS = ("local", "openai")


class RouterError(ValueError):
    """A bad router config, or a request that no backend could answer (`errors`: backend name -> message)."""

    def __init__(self, message: str, errors: dict[str, BackendError] | None = None):
        super().__init__(message)
        self.errors = errors or {}

    @property
    def status(self) -> int:
        """The HTTP status a server should answer with: a client error every backend agreed on
        (e.g. 400 for a bad request), else 503 (no backend available)."""
        codes = {e.status for e in self.errors.values()}
        if len(codes) == 1 and (code := codes.pop()) is not None and 400 <= code < 500 and code not in (408, 429):
            return code
        return 503


class BackendError(Exception):
    """One backend failed to answer; `status` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


# -- config ----------------------------------------------------------------------------------------
@dataclass
class BackendSpec:
    name: str
    kind: str  # "local" | "openai"
    model: str = "default"  # local: a checkpoint path or "default"; openai: the model name sent upstream
    base_url: str | None = None  # openai: the endpoint up to /v1
    api_key: str | None = None
    api_key_env: str | None = None  # openai: read the key from this environment variable at request time
    cost_per_1k_prompt: float = 0.0
    cost_per_1k_completion: float = 0.0
    max_difficulty: float | None = None  # from `thresholds`; None: only a fallback (or the strongest)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def price(self) -> float:
        """What the tiers are ordered by."""
        return self.cost_per_1k_prompt + self.cost_per_1k_completion

    def cost(self, usage: dict | None) -> float:
        usage = usage or {}
        return (usage.get("prompt_tokens", 0) * self.cost_per_1k_prompt
                + usage.get("completion_tokens", 0) * self.cost_per_1k_completion) / 1000


@dataclass
class RouterConfig:
    backends: list[BackendSpec]
    scorer: str = "default"  # "default" (the shipped model) or a path to a trained scorer
    timeout_s: float = 60.0  # per request to an "openai" backend
    path: Path | None = None  # the file it was read from

    def __post_init__(self) -> None:
        if not self.backends:
            raise RouterError("a router needs at least one backend")
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            raise RouterError(f"backend names must be unique: {names}")

    @property
    def by_price(self) -> list[BackendSpec]:
        """Cheapest first; equal prices keep config order."""
        return sorted(self.backends, key=lambda b: b.price)  # sorted is stable

    @property
    def strongest(self) -> BackendSpec:
        return self.by_price[-1]

    @property
    def thresholds(self) -> dict[str, float]:
        return {b.name: b.max_difficulty for b in self.by_price if b.max_difficulty is not None}

    def set_thresholds(self, thresholds: dict[str, float]) -> None:
        for b in self.backends:
            b.max_difficulty = thresholds.get(b.name)


TOP_KEYS = {"backends": "the list of backends", "scorer": "default or a path to a trained scorer",
            "thresholds": "{backend: max difficulty}", "timeout_s": "seconds per remote request"}
BACKEND_KEYS = {"name", "kind", "model", "base_url", "api_key", "api_key_env", "cost_per_1k_prompt",
                "cost_per_1k_completion", "options"}


def _lines(node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """1-based line of every mapping key and list item of a composed YAML node, by path."""
    import yaml

    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            out[path + (key,)] = k.start_mark.line + 1
            _lines(v, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[path + (i,)] = v.start_mark.line + 1
            _lines(v, path + (i,), out)
    return out


def _dotted(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def _unknown(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + f"allowed keys: {', '.join(sorted(allowed))}"


def load_router_config(path: str | Path) -> RouterConfig:
    """Read and check a router YAML file; unknown keys and bad values raise RouterError naming the line."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise RouterError(f"cannot read router config {p}: {e.strerror or e}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RouterError(f"{p}: not valid YAML: {e}") from None
    lines = _lines(node) if node is not None else {}

    def fail(where: tuple, message: str):
        line = lines.get(where) or lines.get(where[:-1]) or 1
        raise RouterError(f"{p}:{line}: {_dotted(where) or 'config'}: {message}")

    if not isinstance(data, dict):
        fail((), "the file must be a mapping with a `backends:` list")
    for k in data:
        if k not in TOP_KEYS:
            fail((k,), f"unknown key; {_unknown(str(k), TOP_KEYS)}")
    raw = data.get("backends")
    if not isinstance(raw, list) or not raw:
        fail(("backends",), "must be a non-empty list of backends (each with name, kind, model and costs)")
    backends, names = [], set()
    for i, b in enumerate(raw):
        at = ("backends", i)
        if not isinstance(b, dict):
            fail(at, "each backend must be a mapping (name: ..., kind: ..., ...)")
        for k in b:
            if k == "max_difficulty":
                fail(at + (k,), "set it in the top-level `thresholds: {name: value}` (or run calibration)")
            if k not in BACKEND_KEYS:
                fail(at + (k,), f"unknown key; {_unknown(str(k), BACKEND_KEYS)}")
        name = b.get("name")
        if not isinstance(name, str) or not name:
            fail(at + ("name",) if "name" in b else at, "every backend needs a `name:` (a non-empty string)")
        if name in names:
            fail(at + ("name",), f"duplicate backend name {name!r}; names must be unique")
        names.add(name)
        kind = b.get("kind")
        if kind not in KINDS:
            fail(at + ("kind",) if "kind" in b else at, f"`kind:` must be one of {', '.join(KINDS)}, not {kind!r}")
        for k in ("model", "base_url", "api_key", "api_key_env"):
            if k in b and not isinstance(b[k], str):
                fail(at + (k,), f"must be a string, not {b[k]!r}")
        if kind == "openai" and "model" not in b:
            fail(at, "an openai backend needs `model:` (the model name the endpoint serves)")
        if kind == "openai" and "base_url" not in b:
            fail(at, "an openai backend needs `base_url:` (e.g. http://localhost:8000/v1)")
        if kind == "local" and ({"base_url", "api_key", "api_key_env"} & set(b)):
            fail(at + (next(k for k in ("base_url", "api_key", "api_key_env") if k in b),),
                 "only openai backends take base_url / api_key / api_key_env; remove it or use kind: openai")
        if "api_key" in b and "api_key_env" in b:
            fail(at + ("api_key",), "give api_key or api_key_env, not both")
        for k in ("cost_per_1k_prompt", "cost_per_1k_completion"):
            v = b.get(k, 0.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                fail(at + (k,), f"must be a number >= 0 (price per 1000 tokens), not {v!r}")
        options = b.get("options", {})
        if not isinstance(options, dict):
            fail(at + ("options",), "must be a mapping (dtype: ..., quantize: ..., sampling: {...}, tools: [...])")
        backends.append(BackendSpec(name=name, kind=kind, model=b.get("model", "default"), base_url=b.get("base_url"),
                                    api_key=b.get("api_key"), api_key_env=b.get("api_key_env"),
                                    cost_per_1k_prompt=float(b.get("cost_per_1k_prompt", 0.0)),
                                    cost_per_1k_completion=float(b.get("cost_per_1k_completion", 0.0)),
                                    options=options))
    scorer = data.get("scorer", "default")
    if not isinstance(scorer, str):
        fail(("scorer",), "must be `default` or the path of a trained scorer file (.json / .npz)")
    if scorer != "default":
        sp = Path(scorer) if Path(scorer).is_absolute() else p.parent / scorer
        if not sp.exists():
            fail(("scorer",), f"no scorer file at {sp}; train one with benchmarks/router.py or use `default`")
        scorer = str(sp)
    timeout = data.get("timeout_s", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        fail(("timeout_s",), f"must be a number of seconds > 0, not {timeout!r}")
    config = RouterConfig(backends, scorer=scorer, timeout_s=float(timeout), path=p)
    thresholds = data.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        fail(("thresholds",), "must be a mapping {backend name: max difficulty in [0, 1]}")
    strongest = config.strongest.name
    for k, v in thresholds.items():
        if k not in names:
            fail(("thresholds", k), f"no backend named {k!r}; backends: {', '.join(sorted(names))}")
        if k == strongest and len(names) > 1:
            fail(("thresholds", k), f"{k!r} is the strongest (most expensive) backend: it takes every request "
                                    "the others do not, so it has no threshold; remove it")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            fail(("thresholds", k), f"must be a number in [0, 1] (the hardest score this backend takes), not {v!r}")
    config.set_thresholds({k: float(v) for k, v in thresholds.items()})
    return config


# -- scorer ----------------------------------------------------------------------------------------
CUE_WORDS = ("then", "step", "steps", "total", "each", "after", "altogether", "remaining", "left", "per", "first",
             "next", "finally")
CONSTRAINT_WORDS = ("must", "exactly", "prove", "explain why", "at least", "at most", "only", "without", "precisely",
                    "show that", "justify")
MATH_WORDS = ("sum", "product", "percent", "average", "multiply", "multiplied", "divide", "divided", "times", "plus",
              "minus", "equation", "calculate", "compute", "square", "root", "cost", "costs", "price", "discount",
              "interest", "ratio", "remainder", "how many", "how much")
REASONING_VERBS = ("explain", "why", "compare", "analyze", "analyse", "derive", "deduce", "evaluate", "reason",
                   "solve", "determine", "estimate", "design", "implement")
CODE_MARKERS = ("```", "def ", "class ", "import ", "return ", "{", "};", "=>")
# name -> what it counts; features are log1p of counts so a long prompt does not swamp the rest
FEATURES = {
    "words": "word-ish tokens (\\w+ or a punctuation mark) in user/assistant text: a tokenizer-free prompt length",
    "chars": "characters",
    "numbers": "numbers (123, 1,234, 4.5)",
    "digits": "digits in all the numbers",
    "max_digits": "digits of the longest number (big operands are what small models get wrong)",
    "decimals_percents": "numbers with a decimal point or followed by %",
    "operators": "arithmetic operators between operands: + - * / ^ × ÷ and 'N% of'",
    "cue_words": f"multi-step cues: {', '.join(CUE_WORDS)}",
    "code_markers": "code markers: ``` def class import return { }; =>",
    "questions": "question marks",
    "constraint_words": f"constraints: {', '.join(CONSTRAINT_WORDS)}",
    "math_words": f"math words: {', '.join(MATH_WORDS)}",
    "reasoning_verbs": f"reasoning verbs: {', '.join(REASONING_VERBS)}",
    "turns": "user turns in the conversation",
}
_WORD = re.compile(r"\w+|[^\w\s]")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_OPERATOR = re.compile(r"(?<=[\d)\s])[-+*/^×÷](?=[\s\d(])|\d\s*%\s*of\b")


def _text(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        if m.get("role") not in ("user", "assistant"):
            continue
        c = m.get("content")
        if isinstance(c, list):  # content parts
            c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
        parts.append(c or "")
    return "\n".join(parts)


def _count(text: str, phrases: Iterable[str]) -> int:
    return sum(len(re.findall(rf"\b{re.escape(p)}\b", text)) for p in phrases)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(z, -40, 40)))


class ComplexityScorer:
    """Features (FEATURES, then `n_hash` hashed lowercase word unigrams) -> logistic regression.

    Weights act on standardized features (mean / std of the training set, kept with the model)."""

    def __init__(self, n_hash: int = 0, l2: float = 1.0):
        self.n_hash = n_hash
        self.l2 = l2
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.weights: np.ndarray | None = None
        self.bias = 0.0
        self.meta: dict[str, Any] = {}

    @property
    def feature_names(self) -> list[str]:
        return list(FEATURES) + [f"hash_{i}" for i in range(self.n_hash)]

    def features(self, messages: list[dict]) -> np.ndarray:
        text = _text(messages)
        low = text.lower()
        numbers = _NUMBER.findall(text)
        counts = [
            len(_WORD.findall(text)), len(text), len(numbers), sum(ch.isdigit() for ch in "".join(numbers)),
            max((sum(ch.isdigit() for ch in n) for n in numbers), default=0),
            sum("." in m.group() or text[m.end():].lstrip().startswith("%") for m in _NUMBER.finditer(text)),
            len(_OPERATOR.findall(text)),
            _count(low, CUE_WORDS), sum(low.count(m) for m in CODE_MARKERS), text.count("?"),
            _count(low, CONSTRAINT_WORDS), _count(low, MATH_WORDS), _count(low, REASONING_VERBS),
            sum(m.get("role") == "user" for m in messages),
        ]
        x = np.log1p(np.asarray(counts, dtype=np.float64))
        if not self.n_hash:
            return x
        h = np.zeros(self.n_hash)
        for w in re.findall(r"[a-z]+", low):  # a stable hash: Python's hash() changes per process
            h[int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little") % self.n_hash] += 1
        return np.concatenate([x, np.log1p(h)])

    def fit(self, X: np.ndarray, y: np.ndarray, steps: int = 50) -> ComplexityScorer:
        """L2-regularised logistic regression by Newton's method; y = 1 where the cheap backend failed."""
        X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names) or len(y) != len(X):
            raise ValueError(f"X must be (n, {len(self.feature_names)}) and y (n,), got {X.shape} and {y.shape}")
        self.mean, self.std = X.mean(0), X.std(0)
        self.std[self.std < 1e-9] = 1.0  # a feature constant in training: weight 0, and no blow-up when it moves
        Z = np.hstack([(X - self.mean) / self.std, np.ones((len(X), 1))])
        w = np.zeros(Z.shape[1])
        reg = np.full(Z.shape[1], self.l2)
        reg[-1] = 0.0  # the bias is not shrunk
        for _ in range(steps):
            p = _sigmoid(Z @ w)
            grad = Z.T @ (p - y) + reg * w
            hess = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(reg + 1e-9)
            delta = np.linalg.solve(hess, grad)
            w -= delta
            if np.abs(delta).max() < 1e-8:
                break
        self.weights, self.bias = w[:-1], float(w[-1])
        return self

    def score_features(self, X: np.ndarray) -> np.ndarray:
        if self.weights is None:
            raise RuntimeError("the scorer is not trained: fit() it or load() a saved one")
        return _sigmoid(((np.atleast_2d(X) - self.mean) / self.std) @ self.weights + self.bias)

    def score(self, messages: list[dict]) -> float:
        """0 (easy) .. 1 (hard): the estimated probability that the cheapest backend fails."""
        return float(self.score_features(self.features(messages))[0])

    def save(self, path: str | Path) -> None:
        p = Path(path)
        state = {"n_hash": self.n_hash, "l2": self.l2, "feature_names": self.feature_names,
                 "mean": self.mean.tolist(), "std": self.std.tolist(), "weights": self.weights.tolist(),
                 "bias": self.bias}
        if p.suffix == ".npz":
            np.savez(p, **{k: np.asarray(v) for k, v in state.items()}, meta=json.dumps(self.meta))
        else:
            p.write_text(json.dumps({**state, "meta": self.meta}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path = "default") -> ComplexityScorer:
        p = DEFAULT_SCORER if str(path) == "default" else Path(path)
        if p.suffix == ".npz":
            with np.load(p) as z:
                state = {k: z[k] for k in z.files}
            state = {k: (v.item() if v.ndim == 0 else v) for k, v in state.items()}
            state["meta"] = json.loads(state.get("meta", "{}"))
            state["feature_names"] = list(state["feature_names"])
        else:
            state = json.loads(p.read_text())
        s = cls(n_hash=int(state["n_hash"]), l2=float(state["l2"]))
        if list(state["feature_names"]) != s.feature_names:
            raise ValueError(f"{p}: the scorer was trained on other features ({state['feature_names'][:3]}...); "
                             "retrain it with benchmarks/router.py")
        s.mean, s.std = np.asarray(state["mean"], float), np.asarray(state["std"], float)
        s.weights, s.bias = np.asarray(state["weights"], float), float(state["bias"])
        s.meta = dict(state.get("meta") or {})
        return s


# -- clients -----------------------------------------------------------------------------------------
class ChatClient(Protocol):
    def chat(self, body: dict) -> dict:
        """An OpenAI chat body in, a chat.completion dict (with usage) out; BackendError on failure."""
        ...


class _CountingLLM:
    """An LLM whose complete() adds each call's prompt and generated tokens to `usage`, so a tool loop's
    cost is every model call it made."""

    def __init__(self, llm):
        self._llm = llm
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.finish_reason = "stop"  # the last call's

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def complete(self, prompt, **sampling):
        c = self._llm.complete(prompt, **sampling)
        self.usage["prompt_tokens"] += c.prompt_tokens
        self.usage["completion_tokens"] += len(c.token_ids)
        self.finish_reason = c.finish_reason or "stop"
        return c


def completion(model: str, message: dict, finish_reason: str, usage: dict) -> dict:
    """A chat.completion object as the OpenAI API returns it."""
    usage = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": message, "finish_reason": finish_reason,
                                         "logprobs": None}], "usage": usage}


class LocalClient:
    """A model in this process, loaded on first use with LLM.load(spec.model, dtype=, quantize=) from
    spec.options (or given as `llm`). options.sampling: defaults under the request's own sampling
    fields; options.tools (e.g. [calculator]): answer the last user message with the tool loop
    (`Agent`, options.first_tool_choice, options.max_steps), usage summed over all its model calls.
    Requests run one at a time (the server's own engine is the batched path for a local model)."""

    def __init__(self, spec: BackendSpec, llm=None):
        self.spec = spec
        self._llm = llm
        self._lock = threading.Lock()  # the lazy load
        self._busy = threading.Lock()  # one generation at a time on this model

    @property
    def llm(self):
        with self._lock:
            if self._llm is None:
                from ..api import LLM

                o = self.spec.options
                self._llm = LLM.load(self.spec.model, dtype=o.get("dtype", "float32"), quantize=o.get("quantize"))
            return self._llm

    def sampling(self, body: dict) -> dict:
        s = {"temperature": 1.0, "max_new_tokens": 512, **self.spec.options.get("sampling", {})}
        for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"),
                         ("seed", "seed"), ("max_tokens", "max_new_tokens"),
                         ("max_completion_tokens", "max_new_tokens"), ("presence_penalty", "presence_penalty"),
                         ("frequency_penalty", "frequency_penalty"), ("repetition_penalty", "repetition_penalty")):
            if body.get(src) is not None:
                s[dst] = body[src]
        if body.get("stop"):
            s["stop"] = [body["stop"]] if isinstance(body["stop"], str) else list(body["stop"])
        return s

    def chat(self, body: dict) -> dict:
        from .backend import LocalBackend

        try:
            llm = _CountingLLM(self.llm)
            backend = LocalBackend(llm, **self.sampling(body))
            tools = self.spec.options.get("tools")
            with self._busy:
                if tools:
                    return self._agent(backend, llm, body, tools)
                choice = body.get("tool_choice") or "auto"
                if isinstance(choice, dict):
                    choice = choice["function"]["name"]
                req_tools = body.get("tools") if choice != "none" else None
                reply = backend.chat(body["messages"], req_tools, tool_choice=choice)
        except BackendError:
            raise
        except Exception as e:  # a local failure is a reason to fall back, like a remote one
            raise BackendError(f"{type(e).__name__}: {e}") from e
        finish = "tool_calls" if reply.tool_calls else llm.finish_reason
        return completion(self.spec.model, reply.to_dict(), finish, llm.usage)

    def _agent(self, backend, llm: _CountingLLM, body: dict, tools: list[str]) -> dict:
        from .agent import Agent
        from .tools.registry import builtin_registry

        o = self.spec.options
        question = next((m.get("content") for m in reversed(body["messages"]) if m.get("role") == "user"), None)
        if not isinstance(question, str):
            raise BackendError("a tool-loop backend needs a user message with text content")
        result = Agent(backend, builtin_registry(tools), max_steps=int(o.get("max_steps", 2)),
                       first_tool_choice=o.get("first_tool_choice", "required")).run(question)
        return completion(self.spec.model, {"role": "assistant", "content": result.answer}, "stop", llm.usage)


# vLLM-style fields an opengpt server fills in with these defaults; hosted APIs reject them as unknown
EXTENSION_DEFAULTS = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": False}


class OpenAIClient:
    """An OpenAI-compatible endpoint: the body goes to `{base_url}/chat/completions` with spec.model as
    the model (options.extra_body merged in), through httpx with the router's timeout."""

    def __init__(self, spec: BackendSpec, timeout_s: float = 60.0):
        import httpx

        self.spec = spec
        self.http = httpx.Client(timeout=timeout_s)

    def api_key(self) -> str | None:
        if self.spec.api_key_env:
            key = os.environ.get(self.spec.api_key_env)
            if not key:
                raise BackendError(f"environment variable {self.spec.api_key_env} is not set")
            return key
        return self.spec.api_key

    def chat(self, body: dict) -> dict:
        import httpx

        key = self.api_key()
        url = self.spec.base_url.rstrip("/") + "/chat/completions"
        payload = {k: v for k, v in body.items() if k != "stream_options" and EXTENSION_DEFAULTS.get(k, ...) != v}
        payload.update(self.spec.options.get("extra_body", {}), model=self.spec.model, stream=False)
        try:
            r = self.http.post(url, json=payload, headers={"Authorization": f"Bearer {key}"} if key else {})
        except httpx.TimeoutException as e:
            raise BackendError(f"timed out after {self.http.timeout.read}s ({type(e).__name__}) at {url}") from e
        except httpx.HTTPError as e:
            raise BackendError(f"{type(e).__name__}: {e} ({url})") from e
        if r.status_code >= 400:
            raise BackendError(f"HTTP {r.status_code} from {url}: {r.text[:300]}", status=r.status_code)
        try:
            out = r.json()
            out["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise BackendError(f"not a chat.completion from {url}: {r.text[:200]}") from e
        return out


def make_client(spec: BackendSpec, timeout_s: float = 60.0) -> ChatClient:
    return LocalClient(spec) if spec.kind == "local" else OpenAIClient(spec, timeout_s)


# -- router ------------------------------------------------------------------------------------------
@dataclass
class Attempt:
    backend: str
    error: str
    status: int | None = None


@dataclass
class Decision:
    backend: str  # the one chosen by score; after chat(), the one that answered
    score: float
    reason: str
    candidates: list[str]  # the order chat() tries them in
    chosen: str = ""  # the first choice, before any fallback
    fallbacks: list[Attempt] = field(default_factory=list)  # failed attempts, in order
    cost: float = 0.0  # of the answer, from its usage and the backend's prices
    usage: dict = field(default_factory=dict)


class Router:
    def __init__(self, config: RouterConfig, scorer: ComplexityScorer | None = None,
                 clients: dict[str, ChatClient] | None = None):
        self.config = config
        self.scorer = scorer or ComplexityScorer.load(config.scorer)
        self.clients = {b.name: (clients or {}).get(b.name) or make_client(b, config.timeout_s) for b in config.backends}
        self._lock = threading.Lock()
        self._stats = {b.name: {"requests": 0, "errors": 0, "cost": 0.0, "prompt_tokens": 0, "completion_tokens": 0}
                       for b in config.backends}

    def _pick(self, score: float) -> tuple[BackendSpec, str]:
        tiers = self.config.by_price
        for b in tiers[:-1]:
            if b.max_difficulty is not None and score <= b.max_difficulty:
                return b, f"score {score:.3f} <= {b.name}'s threshold {b.max_difficulty:.3f}"
        above = [b for b in tiers[:-1] if b.max_difficulty is not None]
        why = "above every cheaper backend's threshold" if above else "no cheaper backend has a threshold"
        return tiers[-1], f"score {score:.3f}: {why}; the strongest takes it"

    def choose(self, messages: list[dict]) -> Decision:
        score = self.scorer.score(messages)
        spec, reason = self._pick(score)
        tiers = [b.name for b in self.config.by_price]
        i = tiers.index(spec.name)
        return Decision(spec.name, score, reason, tiers[i:] + tiers[:i][::-1], chosen=spec.name)

    def chat(self, request: dict) -> tuple[dict, Decision]:
        """Answer an OpenAI chat body (non-streaming) with the chosen backend, falling back on errors."""
        if request.get("stream"):
            raise RouterError("Router.chat does not stream: call choose() and stream from that backend yourself")
        if not isinstance(request.get("messages"), list) or not request["messages"]:
            raise RouterError("the request needs a non-empty `messages` list")
        d = self.choose(request["messages"])
        for name in d.candidates:
            try:
                out = self.clients[name].chat(request)
            except BackendError as e:
                d.fallbacks.append(Attempt(name, str(e), e.status))
                with self._lock:
                    self._stats[name]["errors"] += 1
                continue
            spec = next(b for b in self.config.backends if b.name == name)
            d.backend, d.usage = name, dict(out.get("usage") or {})
            d.cost = spec.cost(d.usage)
            if d.fallbacks:
                d.reason += f"; fell back to {name} after {', '.join(a.backend for a in d.fallbacks)} failed"
            out.setdefault("router", {"backend": name, "score": d.score, "cost": d.cost})
            with self._lock:
                s = self._stats[name]
                s["requests"] += 1
                s["cost"] += d.cost
                s["prompt_tokens"] += d.usage.get("prompt_tokens", 0)
                s["completion_tokens"] += d.usage.get("completion_tokens", 0)
            return out, d
        errors = {a.backend: BackendError(a.error, a.status) for a in d.fallbacks}
        raise RouterError("every backend failed: " + "; ".join(f"{a.backend}: {a.error}" for a in d.fallbacks), errors)

    def stats(self) -> dict:
        """Answered requests, errors, tokens and cost per backend, and the totals."""
        with self._lock:
            per = {k: dict(v) for k, v in self._stats.items()}
        n = sum(v["requests"] for v in per.values())
        return {"backends": per, "requests": n, "cost": sum(v["cost"] for v in per.values()),
                "share": {k: (v["requests"] / n if n else 0.0) for k, v in per.items()}}

    def calibrate(self, prompts: list[list[dict]], strong_share: float) -> dict:
        """Thresholds that send ~strong_share of `prompts` to the strongest backend and split the rest in
        equal shares over the cheaper ones (cheapest = easiest). Sets them on the config (in memory only)
        and returns {target_share, real_share, thresholds, prompts}, the real shares measured by choose()."""
        if not 0 <= strong_share <= 1:
            raise RouterError(f"strong_share must be in [0, 1], not {strong_share}")
        if not prompts:
            raise RouterError("calibration needs at least one prompt")
        tiers = self.config.by_price
        scores = np.sort([self.scorer.score(m) for m in prompts])
        n, k = len(scores), len(tiers) - 1
        target = {b.name: (1 - strong_share) / k if k else 0.0 for b in tiers[:-1]} | {tiers[-1].name: strong_share if k else 1.0}
        # a threshold can only fall between two different scores: the cut points, nearest to the target wins
        cuts = np.concatenate([[0], np.flatnonzero(scores[1:] > scores[:-1]) + 1, [n]])
        thresholds, prev = {}, 0
        for j, b in enumerate(tiers[:-1], 1):
            want = (1 - strong_share) * j / k * n  # prompts taken by this tier and the cheaper ones
            m = int(max(prev, cuts[np.argmin(np.abs(cuts - want))]))
            if m <= 0:
                t = float(np.nextafter(scores[0], -np.inf))
            elif m >= n:
                t = 1.0
            else:
                t = float((scores[m - 1] + scores[m]) / 2)
            thresholds[b.name], prev = t, m
        self.config.set_thresholds(thresholds)
        chosen = [self._pick(float(s))[0].name for s in scores]
        real = {b.name: chosen.count(b.name) / n for b in tiers}
        return {"target_share": target, "real_share": real, "thresholds": thresholds, "prompts": n}


# -- calibration from files -------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[list[dict]]:
    """A .jsonl of {"messages": [...]} (or {"prompt": "..."}) objects, or plain text: one user prompt a line."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RouterError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if isinstance(obj.get("messages"), list):
                out.append(obj["messages"])
            elif isinstance(obj.get("prompt"), str):
                out.append([{"role": "user", "content": obj["prompt"]}])
            else:
                raise RouterError(f'{path}:{i}: expected {{"messages": [...]}} or {{"prompt": "..."}}')
        else:
            out.append([{"role": "user", "content": line.strip()}])
    return out


def write_thresholds(config_path: str | Path, thresholds: dict[str, float], out_path: str | Path) -> None:
    """The YAML file with its `thresholds:` line replaced (or appended), comments elsewhere kept."""
    text = Path(config_path).read_text()
    line = "thresholds: {" + ", ".join(f"{k}: {v:.6g}" for k, v in thresholds.items()) + "}"
    lines = text.splitlines()
    at = next((i for i, s in enumerate(lines) if re.match(r"thresholds\s*:", s)), None)
    if at is None:
        lines.append(line)
    else:  # drop a block-style mapping under the key too
        end = at + 1
        while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
            end += 1
        comment = re.search(r"\s#.*$", lines[at]) if "{" in lines[at] or lines[at].rstrip().endswith(":") else None
        lines[at:end] = [line + (comment.group(0) if comment else "")]
    Path(out_path).write_text("\n".join(lines) + "\n")


def calibrate_cli(config_path: str | Path, prompts_path: str | Path, strong_share: float,
                  out: str | Path | None = None, in_place: bool = False, write: bool | None = None) -> dict:
    """Calibrate the config's thresholds on the prompts (scoring only: no model loads, no request is sent)
    and write the YAML with them: by default to NAME.calibrated.yaml next to the config, to `out` if
    given, into the config itself with in_place=True or write=True (`opengpt route calibrate --write`);
    write=False only reports. Returns the calibration report with `written` (the path, or None)."""
    config = load_router_config(config_path)
    router = Router(config, clients=dict.fromkeys((b.name for b in config.backends), _Unused()))
    report = router.calibrate(read_prompts(prompts_path), strong_share)
    if write is False:
        return {**report, "written": None}
    p = Path(config_path)
    dest = p if in_place or write else Path(out) if out else p.with_name(p.stem + ".calibrated" + p.suffix)
    write_thresholds(p, report["thresholds"], dest)
    load_router_config(dest)  # what was written reads back
    return {**report, "written": str(dest)}


class _Unused:
    """Stands in for a client where only scoring happens (calibration loads no model, opens no connection)."""

    def chat(self, body: dict) -> dict:
        raise BackendError("this router was built for calibration only")
