"""Guided decoding: JSON and JSON-schema constrained generation, as a logits processor.

    proc = json_processor({"type": "object", "properties": {...}}, tokenizer, vocab_size, max_new_tokens)
    SamplingParams(..., logits_processors=[proc])

Three parts, in the spirit of Outlines (Willard & Louf 2023) and llguidance, kept small:

1. `compile_schema` turns a JSON schema into grammar nodes (object / array / string / number /
   literal set / union). Supported: type (and type lists), properties, required,
   additionalProperties, items, minItems, maxItems, minLength, maxLength, enum, const, anyOf,
   oneOf, allOf of one schema, $ref into $defs / definitions (recursion allowed); annotations
   (title, description, default, examples, format ...) are ignored. Keywords that would need
   arithmetic or regexes to enforce (minimum, pattern, ...) are refused with a GuidedError, since
   the promise is that every output validates.
2. `Grammar` is a character-level pushdown automaton over those nodes. A state is a set of
   alternative stacks of immutable frames (a set because anyOf / enum / numbers are ambiguous until
   later characters decide); states are interned to ints and every transition is memoised, so the
   automaton is built lazily, once per schema, and shared by all requests with that schema.
3. `TokenVocab` holds, once per tokenizer, each token's decoded text and a trie over those texts.
   The allowed tokens of a state are found by walking the trie with the automaton and pruning dead
   branches. Inside a string, where almost every token is allowed, tokens without a quote,
   backslash or control character cannot change the state: they come from one precomputed mask,
   and only the few hundred others are walked (from their first special character on).

Insignificant whitespace is limited to MAX_WS characters per gap, so a model cannot stall in it.
The processor also keeps the output finishable: knowing its token budget, it allows only tokens
after which the shortest completion of the JSON (in characters, each at most one token) still fits,
so generation closes the JSON before `max_new_tokens` instead of being cut in the middle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

MAX_WS = 16  # whitespace characters in one gap between tokens of the JSON
MAX_DIGITS = 20  # digits of an integer part or a fraction: int64 has 19, a float's repr up to 20 (0.000 + 17)
MAX_EXP_DIGITS = 3
WS = " \t\n\r"
DIGITS = "0123456789"
HEX = "0123456789abcdefABCDEF"

IGNORED = {"title", "description", "default", "examples", "format", "$schema", "$id", "$comment", "deprecated",
           "readOnly", "writeOnly", "strict", "contentMediaType", "contentEncoding", "$defs", "definitions",
           "additionalProperties", "properties", "required", "items", "type", "enum", "const", "anyOf", "oneOf",
           "allOf", "$ref", "minItems", "maxItems", "minLength", "maxLength", "name", "nullable"}


class GuidedError(ValueError):
    """A schema this module cannot enforce; the message names the keyword."""


# -- grammar nodes ---------------------------------------------------------------------------------
class Str:
    __slots__ = ("max_len", "min_len", "plain", "shortest")

    def __init__(self, min_len: int = 0, max_len: int | None = None):
        self.min_len, self.max_len = min_len, max_len
        self.plain = min_len == 0 and max_len is None  # length is not tracked: every plain char keeps the state


class Num:
    __slots__ = ("integer", "shortest")

    def __init__(self, integer: bool):
        self.integer = integer


class Lit:
    """A set of exact JSON texts (true / false / null / enum / const)."""

    __slots__ = ("shortest", "texts")

    def __init__(self, values: list):
        self.texts = tuple(dict.fromkeys(json.dumps(v, ensure_ascii=False) for v in values))


class Obj:
    __slots__ = ("extra", "keys", "props", "required", "shortest")

    def __init__(self, props: dict[str, Any], required: list[str], extra: Any):
        self.props = props  # name -> node
        self.keys = tuple((json.dumps(k, ensure_ascii=False), k) for k in props)  # (quoted key, name)
        self.required = tuple(required)
        self.extra = extra  # free keys with values of this node, only when no properties are declared


class Arr:
    __slots__ = ("items", "max_items", "min_items", "shortest")

    def __init__(self, items: Any, min_items: int, max_items: int | None):
        self.items, self.min_items, self.max_items = items, min_items, max_items


class Union:
    __slots__ = ("alts", "shortest")

    def __init__(self, alts: list):
        self.alts = alts


def _any() -> Union:
    """Any JSON value (json_object mode, and schemas that say nothing)."""
    node = Union([])
    node.alts += [Obj({}, [], node), Arr(node, 0, None), Str(), Num(False), Lit([True, False, None])]
    return node


ANY = _any()
FREE_KEY = Str()
FREE_KEY.shortest = 2


def compile_schema(schema: Any) -> Any:
    """A JSON schema as grammar nodes; GuidedError for what cannot be enforced."""
    refs: dict[str, Any] = {}

    def resolve(ref: str) -> Any:
        if ref in refs:
            return refs[ref]
        if ref != "#" and not ref.startswith("#/"):
            raise GuidedError(f"$ref {ref!r}: only local references (#/$defs/...) are supported")
        target: Any = schema
        for part in [p for p in ref[2:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise GuidedError(f"$ref {ref!r} points at nothing in the schema")
            target = target[part]
        refs[ref] = placeholder = Union([])  # filled below; recursive references land here
        placeholder.alts.append(build(target))
        return placeholder

    def build(s: Any) -> Any:
        if s is True or s == {}:
            return ANY
        if s is False:
            raise GuidedError("the schema `false` admits no value")
        if not isinstance(s, dict):
            raise GuidedError(f"a schema must be an object or a boolean, got {type(s).__name__}")
        unknown = sorted(k for k in s if k not in IGNORED)
        if unknown:
            raise GuidedError(f"schema keyword(s) {', '.join(unknown)} cannot be enforced by guided decoding; "
                              "supported: type, properties, required, additionalProperties, items, minItems, maxItems, "
                              "minLength, maxLength, enum, const, anyOf, oneOf, allOf (one schema), $ref")
        if "$ref" in s:
            return resolve(s["$ref"])
        if "const" in s:
            return Lit([s["const"]])
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise GuidedError("enum must be a non-empty list")
            return Lit(s["enum"])
        for key in ("anyOf", "oneOf"):
            if key in s:
                if not isinstance(s[key], list) or not s[key]:
                    raise GuidedError(f"{key} must be a non-empty list of schemas")
                rest = {k: v for k, v in s.items() if k != key}
                return Union([build({**rest, **alt} if isinstance(alt, dict) else alt) for alt in s[key]])
        if "allOf" in s:
            if not isinstance(s["allOf"], list) or len(s["allOf"]) != 1:
                raise GuidedError("allOf is supported with exactly one schema")
            return build({**{k: v for k, v in s.items() if k != "allOf"}, **s["allOf"][0]})
        t = s.get("type")
        if isinstance(t, list):
            if not t:
                raise GuidedError("type must not be an empty list")
            return Union([build({**s, "type": one}) for one in t])
        if t is None:
            t = "object" if "properties" in s else "array" if "items" in s else None
        if s.get("nullable") is True and t is not None:
            return Union([build({**s, "nullable": False}), Lit([None])])
        if t is None:
            return ANY
        if t == "object":
            props = s.get("properties") or {}
            if not isinstance(props, dict):
                raise GuidedError("properties must be an object")
            required = s.get("required") or []
            missing = [r for r in required if r not in props]
            if missing and props:
                raise GuidedError(f"required names {missing} that are not in properties")
            extra = s.get("additionalProperties", True)
            free = None if props or extra is False else ANY if extra is True else build(extra)
            return Obj({k: build(v) for k, v in props.items()}, [r for r in required if r in props], free)
        if t == "array":
            lo, hi = s.get("minItems", 0), s.get("maxItems")
            if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                raise GuidedError("minItems/maxItems must be integers with 0 <= minItems <= maxItems")
            return Arr(build(s.get("items", True)), lo, hi)
        if t == "string":
            lo, hi = s.get("minLength", 0), s.get("maxLength")
            if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
                raise GuidedError("minLength/maxLength must be integers with 0 <= minLength <= maxLength")
            return Str(lo, hi)
        if t in ("number", "integer"):
            return Num(t == "integer")
        if t == "boolean":
            return Lit([True, False])
        if t == "null":
            return Lit([None])
        raise GuidedError(f"unknown type {t!r}")

    root = build(schema)
    _set_shortest(root)
    if min_len(root) == INF:
        raise GuidedError("the schema admits no finite JSON value (a required property refers to itself)")
    return root


INF = float("inf")


def _children(node: Any) -> list:
    if isinstance(node, Obj):
        return list(node.props.values()) + ([node.extra] if node.extra is not None else [])
    if isinstance(node, Arr):
        return [node.items]
    return list(node.alts) if isinstance(node, Union) else []


def _set_shortest(root: Any) -> None:
    """Store on every node the characters of the shortest JSON text it accepts (INF if none): a
    fixpoint over the node graph, so recursive schemas ($ref cycles) come out exact."""
    nodes, todo, seen = [], [root], set()
    while todo:
        node = todo.pop()
        if id(node) not in seen and getattr(node, "shortest", None) is None:  # shared nodes (ANY) are done
            seen.add(id(node))
            nodes.append(node)
            todo += _children(node)
    for node in nodes:
        node.shortest = INF
    changed = True
    while changed:
        changed = False
        for node in nodes:
            if isinstance(node, Str):
                n = node.min_len + 2
            elif isinstance(node, Num):
                n = 1
            elif isinstance(node, Lit):
                n = min(map(len, node.texts))
            elif isinstance(node, Obj):
                n = 2 + _pairs_len(node, list(node.required))
            elif isinstance(node, Arr):
                k = node.min_items
                n = 2 + (k * node.items.shortest + k - 1 if k else 0)
            else:
                n = min((a.shortest for a in node.alts), default=INF)
            if n < node.shortest:
                node.shortest, changed = n, True
    # Parts with no finite value could be entered but never finished: remove them, so that every
    # state the automaton reaches can still be completed.
    for node in nodes:
        if isinstance(node, Obj) and any(v.shortest == INF for v in node.props.values()):
            node.props = {k: v for k, v in node.props.items() if v.shortest != INF}
            node.keys = tuple(k for k in node.keys if k[1] in node.props)
        elif isinstance(node, Union):
            node.alts = [a for a in node.alts if a.shortest != INF]
        elif isinstance(node, Arr) and node.items.shortest == INF:
            node.max_items = 0


def min_len(node: Any) -> float:
    return node.shortest


# -- the automaton ---------------------------------------------------------------------------------
# Frames (tuples, so states hash): a stack's top consumes the next character.
VAL, STR, NUM, LIT, OBJ, ARR = range(6)
# object phases                                    array phases
O_OPEN, O_KEY, O_FREEKEY, O_COLON, O_VALUE, O_CHILD, O_AFTER, O_COMMA = range(8)
A_OPEN, A_VALUE, A_CHILD, A_AFTER = range(4)
# number phases (after: "-", "0", digits, ".", fraction digits, "e", exponent sign, exponent digits)
N_SIGN, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
N_DONE = {N_ZERO, N_INT, N_FRAC, N_EXP}


def _start(node: Any, c: str) -> list[tuple]:
    """Frames that begin a value of `node` with character c (one per way c can start it)."""
    if isinstance(node, Union):
        return [f for a in node.alts for f in _start(a, c)]
    if isinstance(node, Str):
        return [(STR, node, 0, 0, 0, False)] if c == '"' else []
    if isinstance(node, Num):
        if c == "-":
            return [(NUM, node.integer, N_SIGN, 0)]
        if c == "0":
            return [(NUM, node.integer, N_ZERO, 1)]
        return [(NUM, node.integer, N_INT, 1)] if c in DIGITS else []
    if isinstance(node, Lit):
        texts = tuple(t for t in node.texts if t[0] == c)
        return [(LIT, texts, 1)] if texts else []
    if isinstance(node, Obj):
        return [(OBJ, node, frozenset(), O_OPEN, (), 0, None, 0)] if c == "{" else []
    if isinstance(node, Arr):
        return [(ARR, node, 0, A_OPEN, 0)] if c == "[" else []
    return []


def _missing(node: Obj, seen: frozenset) -> list[str]:
    return [r for r in node.required if r not in seen]


def _child_done(frame: tuple) -> tuple:
    """The parent frame once the value its child frame parsed is complete."""
    if frame[0] == OBJ:
        _, node, seen, phase, _, _, cur, _ = frame
        if phase == O_FREEKEY:
            return (OBJ, node, seen, O_COLON, (), 0, None, 0)
        return (OBJ, node, seen | {cur} if cur is not None else seen, O_AFTER, (), 0, None, 0)
    _, node, count, _, _ = frame
    return (ARR, node, count + 1, A_AFTER, 0)


def _done(rest: tuple) -> tuple:
    return rest[:-1] + (_child_done(rest[-1]),) if rest else ()


def _step(stack: tuple, c: str) -> list[tuple]:
    """Every stack the automaton can be in after character c; [] if c is not allowed."""
    if not stack:
        return []  # the value is complete: nothing may follow
    top, rest = stack[-1], stack[:-1]
    kind = top[0]
    if kind == VAL:
        return [rest + (f,) for f in _start(top[1], c)]
    if kind == STR:
        return _str(top, rest, c)
    if kind == NUM:
        out = [rest + (f,) for f in _num(top, c)]
        if top[2] in N_DONE and rest:  # the number may also have ended before c
            out += _step(_done(rest), c)
        return out
    if kind == LIT:
        _, texts, pos = top
        out = []
        nxt = tuple(t for t in texts if len(t) > pos and t[pos] == c)
        if nxt:
            out.append(rest + ((LIT, nxt, pos + 1),))
        if rest and any(len(t) == pos for t in texts):
            out += _step(_done(rest), c)
        return out
    if kind == OBJ:
        return _obj(top, rest, c)
    return _arr(top, rest, c)


def _str(top: tuple, rest: tuple, c: str) -> list[tuple]:
    # (STR, node, n, esc, code, high): n code points so far; esc 0 (none), -1 (after a backslash) or
    # the hex digits a \u escape still needs; code its value so far; high: the last character was a
    # high surrogate. Only length-limited strings track n, code and high, so a free string has one state.
    _, node, n, esc, code, high = top
    track = not node.plain
    if esc == 0:
        if c == '"':
            return [_done(rest)] if n >= node.min_len else []
        if c < " ":
            return []
        if c == "\\":
            if track and node.max_len is not None and n >= node.max_len and not high:
                return []  # an escape adds a character, unless it completes a surrogate pair
            return [rest + ((STR, node, n, -1, 0, high if track else False),)]
        if not track:
            return [rest + (top,)]
        return [rest + ((STR, node, n + 1, 0, 0, False),)] if node.max_len is None or n < node.max_len else []
    if esc == -1:
        if c == "u":
            return [rest + ((STR, node, n, 4, 0, high if track else False),)]
        if c not in '"\\/bfnrt':
            return []
        if not track:
            return [rest + ((STR, node, 0, 0, 0, False),)]
        return [rest + ((STR, node, n + 1, 0, 0, False),)] if node.max_len is None or n < node.max_len else []
    if c not in HEX:
        return []
    if not track:
        return [rest + ((STR, node, 0, esc - 1, 0, False),)]
    if node.max_len is not None and n >= node.max_len and (esc == 4 and c not in "dD" or esc == 3 and c not in "cdefCDEF"):
        return []  # at the length limit only a low surrogate (DC00-DFFF), completing a pair, fits
    code = code * 16 + int(c, 16)
    if esc > 1:
        return [rest + ((STR, node, n, esc - 1, code, high),)]
    # JSON Schema counts code points: a \uD8xx\uDCxx surrogate pair is one character
    pair = high and 0xDC00 <= code <= 0xDFFF
    n = n if pair else n + 1
    if node.max_len is not None and n > node.max_len:
        return []
    return [rest + ((STR, node, n, 0, 0, not pair and 0xD800 <= code <= 0xDBFF),)]


def _num(top: tuple, c: str) -> list:
    _, integer, phase, nd = top
    if c in DIGITS:
        if phase == N_SIGN:
            return [(NUM, integer, N_ZERO if c == "0" else N_INT, 1)]
        if phase == N_INT and nd < MAX_DIGITS:
            return [(NUM, integer, N_INT, nd + 1)]
        if phase == N_DOT or (phase == N_FRAC and nd < MAX_DIGITS):
            return [(NUM, integer, N_FRAC, nd + 1 if phase == N_FRAC else 1)]
        if phase in (N_E, N_ESIGN) or (phase == N_EXP and nd < MAX_EXP_DIGITS):
            return [(NUM, integer, N_EXP, nd + 1 if phase == N_EXP else 1)]
        return []
    if integer:
        return []
    if c == "." and phase in (N_ZERO, N_INT):
        return [(NUM, integer, N_DOT, 0)]
    if c in "eE" and phase in (N_ZERO, N_INT, N_FRAC):
        return [(NUM, integer, N_E, 0)]
    if c in "+-" and phase == N_E:
        return [(NUM, integer, N_ESIGN, 0)]
    return []


def _obj(top: tuple, rest: tuple, c: str) -> list[tuple]:
    _, node, seen, phase, cands, kpos, cur, ws = top
    if c in WS and phase in (O_OPEN, O_COLON, O_VALUE, O_AFTER, O_COMMA):
        return [rest + ((OBJ, node, seen, phase, cands, kpos, cur, ws + 1),)] if ws < MAX_WS else []
    if phase in (O_OPEN, O_COMMA):
        if c == "}" and phase == O_OPEN and not _missing(node, seen):
            return [_done(rest)]
        if c != '"':
            return []
        if node.props:
            open_keys = tuple(k for k in node.keys if k[1] not in seen)
            return [rest + ((OBJ, node, seen, O_KEY, open_keys, 1, None, 0),)] if open_keys else []
        if node.extra is not None:
            return [rest + ((OBJ, node, seen, O_FREEKEY, (), 0, None, 0), (STR, FREE_KEY, 0, 0, 0, False))]
        return []
    if phase == O_KEY:
        nxt = tuple(k for k in cands if k[0][kpos] == c)
        if not nxt:
            return []
        done = next((k for k in nxt if len(k[0]) == kpos + 1), None)
        if done is not None:  # the closing quote: keys cannot be prefixes of one another once quoted
            return [rest + ((OBJ, node, seen, O_COLON, (), 0, done[1], 0),)]
        return [rest + ((OBJ, node, seen, O_KEY, nxt, kpos + 1, None, 0),)]
    if phase == O_COLON:
        return [rest + ((OBJ, node, seen, O_VALUE, (), 0, cur, 0),)] if c == ":" else []
    if phase == O_VALUE:
        value = node.props[cur] if cur is not None else node.extra
        parent = (OBJ, node, seen, O_CHILD, (), 0, cur, 0)
        return [rest + (parent, f) for f in _start(value, c)]
    if phase == O_AFTER:
        if c == "}" and not _missing(node, seen):
            return [_done(rest)]
        if c == "," and (node.extra is not None or any(k[1] not in seen for k in node.keys)):
            return [rest + ((OBJ, node, seen, O_COMMA, (), 0, None, 0),)]
    return []


def _arr(top: tuple, rest: tuple, c: str) -> list[tuple]:
    _, node, count, phase, ws = top
    if c in WS and phase != A_CHILD:
        return [rest + ((ARR, node, count, phase, ws + 1),)] if ws < MAX_WS else []
    if phase == A_AFTER:
        if c == "]" and count >= node.min_items:
            return [_done(rest)]
        if c == "," and (node.max_items is None or count < node.max_items):
            return [rest + ((ARR, node, count, A_VALUE, 0),)]
        return []
    if phase == A_OPEN and c == "]" and node.min_items == 0:
        return [_done(rest)]
    if phase in (A_OPEN, A_VALUE) and (node.max_items is None or count < node.max_items):
        parent = (ARR, node, count, A_CHILD, 0)
        return [rest + (parent, f) for f in _start(node.items, c)]
    return []


def _pairs_len(node: Obj, names: list[str]) -> float:
    """Characters of `"k":v` pairs at their shortest, joined by commas."""
    keys = {name: quoted for quoted, name in node.keys}
    return sum(len(keys[n]) + 1 + min_len(node.props[n]) for n in names) + max(len(names) - 1, 0)


def _frame_rest(f: tuple) -> float:
    """Characters that finish frame f from its current phase (its child, if any, already done)."""
    kind = f[0]
    if kind == VAL:
        return min_len(f[1])
    if kind == STR:
        _, node, n, esc, _, _ = f
        pending = 1 if esc == -1 else max(esc, 0)  # characters that finish an escape, which then counts one
        return pending + max(node.min_len - n - (1 if esc else 0), 0) + 1
    if kind == NUM:
        return 0 if f[2] in N_DONE else 1
    if kind == LIT:
        return min(len(t) for t in f[1]) - f[2]
    if kind == ARR:
        _, node, count, phase, _ = f
        item = min_len(node.items)
        if phase == A_OPEN:
            k = node.min_items
            return 1 + (k * item + k - 1 if k else 0)
        if phase == A_VALUE:
            k = max(1, node.min_items - count)
            return k * item + k - 1 + 1
        k = max(0, node.min_items - count)  # A_AFTER
        return k * (1 + item) + 1
    _, node, seen, phase, cands, kpos, cur, _ = f
    missing = _missing(node, seen)
    if phase == O_OPEN:
        return _pairs_len(node, missing) + 1
    if phase == O_AFTER:
        return (1 + _pairs_len(node, missing) if missing else 0) + 1
    if phase == O_COMMA:  # a pair must follow the comma
        if missing:
            return _pairs_len(node, missing) + 1
        if node.extra is not None:
            return 2 + 1 + min_len(node.extra) + 1
        return min(_pairs_len(node, [n]) for _, n in node.keys if n not in seen) + 1
    if phase == O_KEY:
        best = INF
        for quoted, name in cands:
            others = [m for m in missing if m != name]
            best = min(best, len(quoted) - kpos + 1 + min_len(node.props[name])
                       + (1 + _pairs_len(node, others) if others else 0) + 1)
        return best
    value = node.props[cur] if cur is not None else node.extra
    others = [m for m in missing if m != cur]
    tail = (1 + _pairs_len(node, others) if others else 0) + 1
    return (1 if phase == O_COLON else 0) + min_len(value) + tail  # O_COLON | O_VALUE


def _stack_rest(stack: tuple) -> float:
    if not stack:
        return 0
    return _frame_rest(stack[-1]) + sum(_frame_rest(_child_done(f)) for f in stack[:-1])


class Grammar:
    """The automaton of one schema: interned states (ints) and memoised transitions."""

    def __init__(self, root: Any):
        self.states: list[tuple] = []
        self.index: dict[tuple, int] = {}
        self.trans: list[dict[str, int]] = []
        self.rest: list[float] = []  # characters of the shortest completion, per state
        self.complete: list[bool] = []
        self.plain: list[bool] = []  # inside free strings only: plain characters keep the state
        self.start = self.intern((((VAL, root),),))  # one stack holding one frame
        self.tables: dict[TokenVocab, GuidedTables] = {}

    def intern(self, alts: tuple) -> int:
        sid = self.index.get(alts)
        if sid is None:
            sid = self.index[alts] = len(self.states)
            self.states.append(alts)
            self.trans.append({})
            self.rest.append(min((_stack_rest(s) for s in alts), default=INF))
            self.complete.append(() in alts)
            self.plain.append(bool(alts) and all(s and s[-1][0] == STR and s[-1][3] == 0 and s[-1][1].plain
                                                  for s in alts))
        return sid

    def advance(self, sid: int, c: str) -> int:
        """The state after character c, or -1."""
        nxt = self.trans[sid].get(c)
        if nxt is None:
            alts = tuple(dict.fromkeys(s for stack in self.states[sid] for s in _step(stack, c)))
            nxt = self.intern(alts) if alts else -1
            self.trans[sid][c] = nxt
        return nxt

    def advance_text(self, sid: int, text: str) -> int:
        for c in text:
            sid = self.advance(sid, c)
            if sid < 0:
                return -1
        return sid

    def tables_for(self, vocab: TokenVocab) -> GuidedTables:
        t = self.tables.get(vocab)
        if t is None:
            t = self.tables[vocab] = GuidedTables(self, vocab)
        return t


# -- tokens ----------------------------------------------------------------------------------------
def _is_special(c: str) -> bool:
    return c in '"\\' or c < " "


class _Trie:
    __slots__ = ("children", "ids")

    def __init__(self):
        self.children: dict[str, _Trie] = {}
        self.ids: list[int] = []

    def add(self, text: str, tid: int) -> None:
        node = self
        for c in text:
            node = node.children.setdefault(c, _Trie())
        node.ids.append(tid)


class TokenVocab:
    """Every token's text as it appears inside decoded output, and tries over those texts."""

    def __init__(self, tokenizer, vocab_size: int):
        self.size = vocab_size
        self.eos = sorted(i for i in tokenizer.eos_token_ids if i < vocab_size)
        # A token's text is what it adds after a plain prefix (SentencePiece drops a leading space
        # at the start of a text); special tokens decode to "" and partial UTF-8 bytes to U+FFFD:
        # neither can be part of JSON text, so both are left out.
        prefix = tokenizer.encode("a", add_special_tokens=False)
        base = tokenizer.decode(prefix)
        self.text: list[str | None] = [None] * vocab_size
        self.trie, self.special = _Trie(), _Trie()
        plain = torch.zeros(vocab_size, dtype=torch.bool)
        for i in range(min(vocab_size, tokenizer.vocab_size)):
            s = tokenizer.decode(prefix + [i])
            if not s.startswith(base):
                continue
            s = s[len(base):]
            if not s or "\ufffd" in s:
                continue
            self.text[i] = s
            self.trie.add(s, i)
            k = next((j for j, c in enumerate(s) if _is_special(c)), None)
            if k is None:
                plain[i] = True
            else:
                self.special.add(s[k:], i)
        self.plain = plain


@lru_cache(maxsize=8)
def token_vocab(tokenizer, vocab_size: int) -> TokenVocab:
    return TokenVocab(tokenizer, vocab_size)


class GuidedTables:
    """Per (grammar, vocabulary): the allowed tokens of each state and the state each leads to."""

    def __init__(self, grammar: Grammar, vocab: TokenVocab):
        self.g, self.vocab = grammar, vocab
        self.allowed: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        self.next: dict[tuple[int, int], int] = {}

    def walk(self, sid: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(token ids, shortest-completion length after each, whether all plain tokens are allowed)."""
        hit = self.allowed.get(sid)
        if hit is not None:
            return hit
        g = self.g
        plain = g.plain[sid]
        ids: list[int] = []
        rests: list[float] = []
        todo = [(self.vocab.special if plain else self.vocab.trie, sid)]
        while todo:
            node, s = todo.pop()
            for c, child in node.children.items():
                ns = g.advance(s, c)
                if ns < 0:
                    continue
                if child.ids:
                    ids += child.ids
                    rests += [g.rest[ns]] * len(child.ids)
                    for t in child.ids:
                        self.next[(sid, t)] = ns
                if child.children:
                    todo.append((child, ns))
        out = (torch.tensor(ids, dtype=torch.long), torch.tensor(rests, dtype=torch.float64), plain)
        if len(self.allowed) > 65536:  # a schema with very many states: keep memory bounded
            self.allowed.clear()
        self.allowed[sid] = out
        return out

    def step(self, sid: int, token: int) -> int:
        nxt = self.next.get((sid, token))
        if nxt is None:
            text = self.vocab.text[token] if 0 <= token < self.vocab.size else None
            nxt = -1 if text is None else self.g.advance_text(sid, text)
        return nxt

    def mask(self, sid: int, tokens_left: int) -> torch.Tensor:
        """Allowed tokens (bool, vocab) in state sid with `tokens_left` tokens to go, this one included."""
        g, v = self.g, self.vocab
        if sid < 0:  # off the grammar (cannot happen through this processor): only ending is allowed
            mask = torch.zeros(v.size, dtype=torch.bool)
        else:
            ids, rests, plain = self.walk(sid)
            room = tokens_left - 1  # tokens after this one, each at least one character
            mask = v.plain.clone() if plain and g.rest[sid] <= room else torch.zeros(v.size, dtype=torch.bool)
            if len(ids):
                mask[ids[rests <= room]] = True
            if not g.complete[sid] and not mask.any() and len(ids):
                mask[ids[rests.argmin()]] = True  # over budget already: head for the end by the shortest way
        if sid < 0 or g.complete[sid] or not mask.any():
            mask[v.eos] = True
        return mask


@lru_cache(maxsize=64)
def _grammar(key: str) -> Grammar:
    return Grammar(compile_schema(json.loads(key)))


def grammar(schema: Any) -> Grammar:
    """The (cached) automaton of a schema."""
    try:
        key = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise GuidedError(f"the schema is not JSON: {e}") from None
    return _grammar(key)


class JsonLogitsProcessor:
    """A SamplingParams logits processor that keeps one request's output inside a JSON schema.

    Stateful per request: it follows the tokens appended to `output_ids` since its last call."""

    def __init__(self, tables: GuidedTables, max_new_tokens: int):
        self.tables, self.budget = tables, max_new_tokens
        self.state = tables.g.start
        self.seen = 0

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        for tok in output_ids[self.seen:]:
            self.state = self.tables.step(self.state, int(tok)) if self.state >= 0 else -1
        self.seen = len(output_ids)
        mask = self.tables.mask(self.state, self.budget - self.seen)
        n = logits.shape[-1]
        if n != mask.numel():  # the model's vocabulary may be padded beyond the tokenizer's
            full = torch.zeros(n, dtype=torch.bool)
            k = min(n, mask.numel())
            full[:k] = mask[:k]
            mask = full
        return logits.masked_fill(~mask.to(logits.device), float("-inf"))


def json_processor(schema: Any, tokenizer, vocab_size: int, max_new_tokens: int) -> JsonLogitsProcessor:
    """A fresh processor for one request whose output must be JSON matching `schema`."""
    g = grammar(schema)
    vocab = token_vocab(tokenizer, vocab_size)
    return JsonLogitsProcessor(g.tables_for(vocab), max_new_tokens)


_set_shortest(ANY)
