"""The safety policy: one YAML file says which checks run in which layer, their thresholds and
what each one does when it fires; per-route overrides change any of it for one API route or model.

    refusal: "I can't help with that."
    input:
      attacks:    {threshold: 0.6, action: block}        # near-duplicates of known attack prompts
      rules:      {action: block}                        # injection / jailbreak / exfiltration patterns
      classifier: {thresholds: {injection: 0.7, jailbreak: 0.7, harmful: 0.7}, action: block}
      pii:        {action: redact, kinds: [email, phone, credit_card, iban, us_ssn, api_key]}
    monitor:
      toxicity:   {threshold: 0.8, action: block}        # checked on each new chunk while the model writes
    output:
      factcheck:  {action: disclaim}
    routes:
      /v1/completions: {input: {classifier: {action: log}}}

Actions: `block` (refuse with the policy's compliant message; in the monitor: stop the generation
there), `redact` (PII replaced by placeholders), `disclaim` (the answer goes out with a note),
`log` (the decision is logged, nothing changes), `off` (the check does not run). Every check is a
`Check`: enabled by being present with an action other than `off`; a missing layer or check runs
with the defaults below, so `opengpt serve --safety` with an empty file is the default policy.
Unknown keys are errors that name the key and the valid ones, so a typo never silently disables a
check.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACTIONS = ("block", "redact", "disclaim", "log", "off")
DEFAULT_REFUSAL = ("I can't help with that request. If you think this is a mistake, rephrase it or contact "
                   "the operator of this service.")
STOPPED = "\n\n[The rest of this answer was withheld by the content policy.]"

# Each layer's checks and their defaults. Thresholds were set on the validation slice of the
# training data (benchmarks/safety.py), never on the held-out split the benchmark reports.
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "input": {
        "attacks": {"action": "block", "threshold": 0.6},
        "rules": {"action": "block", "categories": ["injection", "jailbreak", "exfiltration"]},
        # thresholds None: the one stored with the model (chosen for FPR <= 2% on validation data)
        "classifier": {"action": "block", "thresholds": None},
        "pii": {"action": "redact", "kinds": None},
    },
    "monitor": {
        # 0.9, not the model's stored threshold (0.72, FPR 2% on validation): on the default model's own
        # answers to everyday questions, streamed, 0.72 stopped 2 of 24 (empathetic second-person prose
        # scores high); directed abuse scores 0.98+ and short abuse is caught by the abuse rules.
        "toxicity": {"action": "block", "threshold": 0.9},
        "harmful": {"action": "block", "threshold": 0.9},
        "pii": {"action": "redact", "kinds": None},
    },
    "output": {
        "toxicity": {"action": "block", "threshold": 0.9},  # see the monitor's
        "pii": {"action": "redact", "kinds": None},
        "factcheck": {"action": "disclaim"},
    },
}
CHECK_KEYS = {"action", "threshold", "thresholds", "categories", "kinds", "every_chars", "window_chars"}
# Cadence and window of the in-generation checks: at most every 128 new characters (about 30 tokens;
# denser at the start, see Monitor.push) the last 320 are scored, so each stretch of the answer is seen
# in at least two windows with context and a 512-token answer costs about 30 scans, not one per token
# (benchmarks/safety.py: whole pipeline).
MONITOR_KEYS = {"every_chars": 128, "window_chars": 320}


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Check:
    name: str
    action: str = "log"
    threshold: float | None = None
    thresholds: dict[str, float] | None = None
    categories: list[str] | None = None
    kinds: list[str] | None = None

    @property
    def on(self) -> bool:
        return self.action != "off"


@dataclass(frozen=True)
class Layer:
    name: str
    checks: dict[str, Check]
    every_chars: int = MONITOR_KEYS["every_chars"]
    window_chars: int = MONITOR_KEYS["window_chars"]

    def get(self, name: str) -> Check:
        return self.checks.get(name) or Check(name, "off")


@dataclass(frozen=True)
class Policy:
    input: Layer
    monitor: Layer
    output: Layer
    refusal: str = DEFAULT_REFUSAL
    stopped: str = STOPPED
    raw: dict = field(default_factory=dict, repr=False)  # the merged document, for per-route overrides

    @classmethod
    def from_dict(cls, doc: dict | None, where: str = "the safety policy") -> Policy:
        doc = doc or {}
        if not isinstance(doc, dict):
            raise PolicyError(f"{where}: the top level must be a mapping with input / monitor / output / routes")
        unknown = set(doc) - {"refusal", "stopped", "input", "monitor", "output", "routes"}
        if unknown:
            raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}; valid: refusal, stopped, input, monitor, "
                              "output, routes")
        layers = {}
        for lname, checks in DEFAULTS.items():
            given = doc.get(lname) or {}
            if not isinstance(given, dict):
                raise PolicyError(f"{where}: {lname} must be a mapping of check name to settings")
            extra = set(given) - set(checks) - set(MONITOR_KEYS)
            if extra:
                raise PolicyError(f"{where}: {lname} has unknown check(s) {sorted(extra)}; valid: {sorted(checks)}")
            built = {}
            for cname, default in checks.items():
                spec = given.get(cname, {})
                if spec is False or spec == "off":
                    spec = {"action": "off"}
                if not isinstance(spec, dict):
                    raise PolicyError(f"{where}: {lname}.{cname} must be a mapping like {{action: block}}, or off")
                bad = set(spec) - CHECK_KEYS
                if bad:
                    raise PolicyError(f"{where}: {lname}.{cname} has unknown key(s) {sorted(bad)}; "
                                      f"valid: {sorted(CHECK_KEYS - set(MONITOR_KEYS))}")
                merged = {**default, **spec}
                if merged["action"] not in ACTIONS:
                    raise PolicyError(f"{where}: {lname}.{cname}.action is {merged['action']!r}; use one of {ACTIONS}")
                for key in ("threshold",):
                    v = merged.get(key)
                    if v is not None and not (isinstance(v, (int, float)) and 0 <= v <= 1):
                        raise PolicyError(f"{where}: {lname}.{cname}.threshold must be a number in [0, 1], got {v!r}")
                for label, v in (merged.get("thresholds") or {}).items():
                    if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                        raise PolicyError(f"{where}: {lname}.{cname}.thresholds.{label} must be in [0, 1], got {v!r}")
                built[cname] = Check(cname, merged["action"], merged.get("threshold"), merged.get("thresholds"),
                                     merged.get("categories"), merged.get("kinds"))
            cadence = {k: int(given.get(k, v)) for k, v in MONITOR_KEYS.items()}
            if min(cadence.values()) < 1:
                raise PolicyError(f"{where}: {lname}.every_chars and window_chars must be >= 1")
            layers[lname] = Layer(lname, built, **cadence)
        routes = doc.get("routes") or {}
        if not isinstance(routes, dict):
            raise PolicyError(f"{where}: routes must map a route (e.g. /v1/chat/completions) or model name to "
                              "overrides")
        for route, override in routes.items():  # validated now, so a bad override fails at startup
            cls.from_dict(_merge({k: v for k, v in doc.items() if k != "routes"}, override or {}),
                          f"{where}, route {route!r}")
        return cls(layers["input"], layers["monitor"], layers["output"], str(doc.get("refusal", DEFAULT_REFUSAL)),
                   str(doc.get("stopped", STOPPED)), copy.deepcopy(doc))

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        import yaml

        p = Path(path)
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as e:
            raise PolicyError(f"cannot read the safety policy {p}: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise PolicyError(f"the safety policy {p} is not valid YAML: {e}") from None
        return cls.from_dict(doc, str(p))

    def for_route(self, route: str | None) -> Policy:
        """This policy with the overrides of `route` (an API path or a model name) applied."""
        routes = self.raw.get("routes") or {}
        if not route or route not in routes:
            return self
        base = {k: v for k, v in self.raw.items() if k != "routes"}
        return Policy.from_dict(_merge(base, routes[route] or {}), f"route {route!r}")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out
