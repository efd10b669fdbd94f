"""The three safety layers around a request, driven by one Policy (policy.py).

    pipe = Pipeline.load("configs/safety.yaml")          # or Pipeline() for the default policy
    verdict = pipe.check_input(messages, route="/v1/chat/completions")
    if verdict.action == "block": answer verdict.refusal
    monitor = pipe.monitor(route)                        # one per generated choice
    for chunk in generation: out = monitor.push(chunk); emit out.text; if out.stop: abort the request
    tail = monitor.finish(sources)                       # output layer: the held-back text, a disclaimer

1. **Input**: the prompt is normalised (Unicode, leetspeak, spacing: normalize.py), then matched
   against the MinHash index of known attack prompts (attacks.py), the pattern rules (rules.py) and
   the intent classifier (classifier.py); PII in user messages is redacted (pii.py) before the model
   sees it.
2. **Monitor**: runs on every new chunk of generated text, inside the request's decode loop, not on
   the finished answer. Every `every_chars` new characters it scores the last `window_chars` with the
   toxicity model and the n-gram intent model's `harmful` head; past the threshold
   the generation stops there with the policy's message, and the caller aborts the engine request,
   so no more tokens are spent. PII is redacted as it streams (a StreamRedactor holds back only the
   few characters that could still be the start of an e-mail, phone or card number).
3. **Output**: when the answer is complete, a whole-answer toxicity check (for non-streamed answers
   it can still replace the answer), and the fact check (factcheck.py): numbers and names that the
   retrieved context or tool results do not support get a disclaimer.

Every decision is a `Decision(layer, check, action, reason, score)`, logged on the
`opengpt.safety` logger as one JSON object, and returned, so `opengpt safety check` can explain
why a prompt would be blocked. Classifier scores are microseconds (hashed n-gram linear models);
the whole input layer is a few milliseconds on a 512-token prompt (benchmarks/safety.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from ..messages import content_text
from .policy import Check, Policy

log = logging.getLogger("opengpt.safety")
MIN_CLASSIFY = 96  # characters of answer before the classifiers' scores count (about 20 tokens)
SEVERITY = {"off": 0, "log": 1, "disclaim": 2, "redact": 3, "block": 4}


@dataclass
class Decision:
    layer: str  # input | monitor | output
    check: str  # attacks | rules | classifier | pii | toxicity | harmful | factcheck
    action: str  # block | redact | disclaim | log
    reason: str
    score: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Verdict:
    """What one layer decided: the strongest action among its decisions, and the text to use."""

    layer: str
    decisions: list[Decision] = field(default_factory=list)
    messages: list[dict] | None = None  # input layer: the messages to generate from (PII redacted)
    text: str | None = None  # output layer: the text to send
    refusal: str | None = None  # set when action == "block"

    @property
    def action(self) -> str:
        return max((d.action for d in self.decisions), key=SEVERITY.__getitem__, default="allow")

    @property
    def blocking(self) -> Decision | None:
        return next((d for d in self.decisions if d.action == "block"), None)

    def to_dict(self) -> dict:
        b = self.blocking
        top = b or max(self.decisions, key=lambda d: SEVERITY[d.action], default=None)
        return {"action": self.action, "layer": self.layer, "check": top.check if top else None,
                "reason": top.reason if top else None, "score": top.score if top else None,
                "decisions": [d.to_dict() for d in self.decisions]}


@dataclass
class Step:
    """What the monitor lets out after one chunk."""

    text: str  # safe to emit now
    stop: bool = False  # the generation must end here (text already holds the policy's message)
    decision: Decision | None = None


def _threshold(check: Check, default: float) -> float:
    """The check's threshold from the policy; `threshold: null` there means `default` (a model's own)."""
    return check.threshold if check.threshold is not None else default


def _abuse(text: str) -> str | None:
    """The first `abuse` rule (rules.py) that `text` matches: short directed threats and insults that
    the toxicity model scores too low."""
    from .normalize import normalize
    from .rules import match_rules

    return next((h.rule for h in match_rules(normalize(text)) if h.category == "abuse"), None)


def _emit(d: Decision, route: str | None, request_id: str | None) -> Decision:
    if d.action != "off":
        log.info(json.dumps({"event": "safety", "route": route, "request_id": request_id, **d.to_dict()}))
    return d


class Pipeline:
    def __init__(self, policy: Policy | None = None):
        self.policy = policy or Policy.from_dict({})
        self._routes: dict[str | None, Policy] = {}

    @classmethod
    def load(cls, path: str | Path) -> Pipeline:
        return cls(Policy.load(path))

    def policy_for(self, route: str | None) -> Policy:
        if route not in self._routes:
            self._routes[route] = self.policy.for_route(route)
        return self._routes[route]

    # The models load on first use and are shared by every request (read-only numpy arrays).
    @cached_property
    def intent(self):
        from .classifier import load_default

        return load_default("intent_dense")  # the n-gram-only intent.npz, with a warning, without the embedder

    @cached_property
    def answer_intent(self):
        """The monitor's harmful-instructions model: the n-gram intent.npz. It scores a window every 128
        characters of every answer; the input layer's ensemble (one call per request) there made the whole
        pipeline on a 512-word answer 51 ms instead of 41 at the median, 74 instead of 56 at p95
        (benchmarks/safety.py, interleaved in one run: safety.json's pipeline_latency)."""
        from .classifier import load_default

        return load_default("intent")

    @cached_property
    def toxicity(self):
        from .classifier import load_default

        return load_default("toxicity")

    @cached_property
    def attacks(self):
        from .attacks import AttackIndex

        return AttackIndex.load_default()

    def warm(self) -> Pipeline:
        """Load every model now (the server does this at startup, not on the first request)."""
        self.intent, self.answer_intent, self.toxicity, self.attacks  # noqa: B018 - cached_property loads
        return self

    # -- layer 1 ------------------------------------------------------------------------------
    def check_input(self, prompt: str | list[dict], route: str | None = None,
                    request_id: str | None = None) -> Verdict:
        """Check a prompt (a string, or chat messages: user, system and tool turns are all read,
        since injected instructions arrive through documents and tool results too)."""
        from .normalize import normalize
        from .rules import match_rules

        policy = self.policy_for(route)
        layer = policy.input
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        read = [i for i, m in enumerate(messages) if m.get("role") != "assistant"]
        text = "\n".join(content_text(messages[i].get("content")) for i in read)
        norm = normalize(text)
        out = Verdict("input", messages=messages)

        def decide(check: Check, reason: str, score: float | None = None) -> None:
            out.decisions.append(_emit(Decision("input", check.name, check.action, reason, score), route, request_id))

        c = layer.get("attacks")
        if c.on:
            m = self.attacks.match(norm, threshold=_threshold(c, 0.6),
                                   signature=self.attacks.signature(norm, normalized=True))  # normalised above
            if m is not None:
                decide(c, f"near-duplicate of a known {m.label} prompt ({m.source}, similarity {m.score:.2f}): "
                          f"{m.text_preview!r}", round(float(m.score), 4))
        c = layer.get("rules")
        if c.on:
            hits = [h for h in match_rules(norm) if not c.categories or h.category in c.categories]
            if hits:
                names = ", ".join(dict.fromkeys(f"{h.category}/{h.rule}" for h in hits))
                decide(c, f"matches the pattern rule(s) {names}: {norm[hits[0].start:hits[0].end]!r}", 1.0)
        c = layer.get("classifier")
        if c.on:
            scores = self.intent.scores(text)
            thresholds = c.thresholds or {label: self.intent.threshold for label in self.intent.labels}
            for label, thr in thresholds.items():
                s = scores.get(label)
                if s is not None and s >= thr:
                    decide(c, f"the intent classifier scores it {label} ({s:.2f} >= {thr:.2f})", round(float(s), 4))
        c = layer.get("pii")
        if c.on:
            from .pii import redact

            kinds = set(c.kinds) if c.kinds else None
            found: list[str] = []
            for i in read:
                content = messages[i].get("content")
                if not isinstance(content, str):
                    content = content_text(content)
                r = redact(content, kinds)
                if r.spans:
                    found += [s.kind for s in r.spans]
                    if c.action == "redact":
                        messages[i]["content"] = r.text
            if found:
                counts = ", ".join(f"{found.count(k)} {k}" for k in dict.fromkeys(found))
                decide(c, f"personal data in the prompt: {counts}" + (" (redacted)" if c.action == "redact" else ""))
        if out.action == "block":
            out.refusal = policy.refusal
        return out

    # -- layers 2 and 3 -----------------------------------------------------------------------
    def monitor(self, route: str | None = None, request_id: str | None = None, question: str | None = None) -> Monitor:
        """A monitor for one generated choice; `question` (the user's last message) keeps the fact
        check from flagging numbers and names the user gave."""
        return Monitor(self, self.policy_for(route), route, request_id, question)

    def check_output(self, text: str, sources: list[str] | None = None, route: str | None = None,
                     request_id: str | None = None, question: str | None = None) -> Verdict:
        """The output layer on a finished answer (not streamed): the monitor's checks over the whole
        text, then the output checks."""
        m = self.monitor(route, request_id, question)
        step = m.push(text)
        if step.stop:
            return Verdict("output", decisions=m.decisions, text=m.policy.refusal, refusal=m.policy.refusal)
        return m.finish(sources, whole=True)


class Monitor:
    """The in-generation check of one choice: `push` each new chunk, emit what it returns, stop
    when it says so; `finish` at the end returns the output layer's verdict and the held-back tail."""

    def __init__(self, pipe: Pipeline, policy: Policy, route: str | None, request_id: str | None,
                 question: str | None = None):
        from .pii import StreamRedactor

        self.pipe, self.policy, self.route, self.request_id = pipe, policy, route, request_id
        self.question = question
        layer = policy.monitor
        self.layer = layer
        self.tox, self.harm, self.pii = layer.get("toxicity"), layer.get("harmful"), layer.get("pii")
        kinds = set(self.pii.kinds) if self.pii.kinds else None
        self.redactor = StreamRedactor(kinds) if self.pii.on and self.pii.action == "redact" else None
        self.text = ""  # everything the model wrote so far (unredacted; never sent as such)
        self.sent = ""  # what was let out
        self.checked = 0  # len(self.text) at the last classifier pass
        self.stopped = False
        self.decisions: list[Decision] = []

    def _decide(self, layer: str, check: Check, reason: str, score: float | None = None) -> Decision:
        d = _emit(Decision(layer, check.name, check.action, reason, score), self.route, self.request_id)
        self.decisions.append(d)
        return d

    def _scan(self, layer: str = "monitor") -> Decision | None:
        """The value classifiers on the text so far; returns the decision that stops it, if any."""
        self.checked = len(self.text)
        stop = None
        window = self.text[-self.layer.window_chars:]  # a window, so a long answer costs O(n), not O(n^2)
        if self.tox.on:
            # Under MIN_CLASSIFY characters the classifier is not trusted ("I'm sorry to hea" scores as
            # toxic): the abuse rules alone watch the first words.
            abuse = _abuse(window)
            s = (self.pipe.toxicity.scores(window).get("toxic", 0.0)
                 if not abuse and len(window) >= MIN_CLASSIFY else 0.0)
            if abuse:
                d = self._decide(layer, self.tox, f"abusive phrase aimed at the reader ({abuse})", 1.0)
                stop = d if d.action == "block" else None
            elif s >= _threshold(self.tox, self.pipe.toxicity.threshold):
                d = self._decide(layer, self.tox, f"toxic text in the answer ({s:.2f})", round(float(s), 4))
                stop = d if d.action == "block" else None
        if self.harm.on and stop is None and len(window) >= MIN_CLASSIFY:
            s = self.pipe.answer_intent.scores(window).get("harmful", 0.0)
            if s >= _threshold(self.harm, 0.9):
                d = self._decide(layer, self.harm, f"the answer reads as harmful instructions ({s:.2f})",
                                 round(float(s), 4))
                stop = d if d.action == "block" else None
        return stop

    def push(self, chunk: str) -> Step:
        if self.stopped:
            return Step("", True)
        self.text += chunk
        # Dense at the start, where windows are short and cheap, then every `every_chars`: the gaps
        # run 16, 16, 16, 24, 36, ... up to every_chars, so the opening words are checked within a few
        # tokens and a long answer still costs one scan per every_chars.
        due = max(16, min(self.layer.every_chars, self.checked // 2))
        stop = self._scan() if len(self.text) - self.checked >= due else None
        if stop is not None:
            self.stopped = True
            return Step(self.policy.stopped, True, stop)
        out = self.redactor.push(chunk) if self.redactor else chunk
        self.sent += out
        return Step(out)

    def finish(self, sources: list[str] | None = None, whole: bool = False) -> Verdict:
        """End of the answer: the held-back tail, a last monitor pass over what was not scanned yet,
        then the output layer. `Verdict.text` is what to send after everything already sent (streams)
        or, with whole=True, the whole answer to send."""
        out = Verdict("output", decisions=self.decisions)
        if self.stopped:
            out.text = ""
            return out
        tail = self.redactor.flush() if self.redactor else ""
        self.sent += tail
        def refused() -> Verdict:  # a whole answer is replaced; a stream ends with the stop message
            out.refusal = self.policy.refusal
            out.text = self.policy.refusal if whole else self.policy.stopped
            return out

        if len(self.text) > self.checked and self._scan() is not None:
            self.stopped = True
            return refused()
        layer = self.policy.output
        c = layer.get("toxicity")
        if c.on:
            s = self.pipe.toxicity.scores(self.text).get("toxic", 0.0)
            if s >= _threshold(c, self.pipe.toxicity.threshold):
                d = self._decide("output", c, f"the answer is toxic ({s:.2f})", round(float(s), 4))
                if d.action == "block":
                    return refused()
        final = self.sent
        c = layer.get("pii")
        if c.on and self.redactor is None:  # the monitor did not redact as it streamed
            from .pii import redact

            r = redact(final, set(c.kinds) if c.kinds else None)
            if r.spans:
                self._decide("output", c, f"personal data in the answer: {len(r.spans)} span(s)")
                if c.action == "redact" and whole:
                    final = r.text
        note = ""
        c = layer.get("factcheck")
        if c.on and sources:
            from .factcheck import disclaimer, unsupported_claims

            bad = unsupported_claims(self.text, sources, question=self.question)
            if bad:
                self._decide("output", c, "claims not supported by the sources or tool results: "
                             + ", ".join(u.text for u in bad[:8]), float(len(bad)))
                if c.action == "disclaim":
                    note = disclaimer(bad)
        out.text = (final if whole else tail) + note
        return out
