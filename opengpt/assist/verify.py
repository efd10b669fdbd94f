"""Verified chain of thought: find the arithmetic claims in a model's reasoning and check each exactly.

`extract_claims(text)` finds two kinds of claim:
* GSM8K-style annotations `<<48/2=24>>`: the expression and the value the writer says it has;
* equations in prose, `48 / 2 = 24`, `17.5% of $2,480 = $434`, `3 x 4 = 12 = 2 * 6` (each adjacent
  pair of a chain is one claim), `5 apples × 3 = 15` (one unit word after a number is dropped),
  with `times`, `plus`, `minus`, `divided by`, `multiplied by`, and `of` after a percentage or a fraction
  (`1/2 of 24 = 12`) read as operators.
A prose claim stays on one line and needs an operator on one side, so `x = 5`, `Step 1: 3` or
a date are not claims. Where a prose equation spans an annotation (`48/2 = <<48/2=24>>24`), the annotation is kept.

`check(text)` evaluates both sides of every claim with the calculator (`tools.calculator.evaluate`,
exact SymPy arithmetic, no eval) and marks each claim
* "ok": the sides are equal, or the claimed value is the exact one rounded to the decimals it shows
  (10 / 3 = 3.33), or for an integer claim of a non-integer result, rounded or truncated to an
  integer (50 / 8 = 6 full boxes); `≈` also accepts 1% relative error;
* "wrong": anything else, with the exact value;
* "unchecked": the calculator refused a side (a variable, a construct outside its whitelist).
Unchecked claims never make reasoning wrong: the check flags only what it can disprove.

`VerifiedSolver(backend).solve(question)` asks for step-by-step reasoning with every calculation
written as an equation, checks it, and on the first wrong step re-prompts the model with its
reasoning up to that step, corrected, to continue from there; after `max_repairs` such rounds the
answer is returned flagged unverified (`verified=False`, the wrong step named). `backend` is any
`ChatBackend` (`LocalBackend(opengpt.LLM)` or `OpenAIBackend(url)`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy

from .backend import ChatBackend
from .tools.calculator import FUNCTIONS, CalculatorError, evaluate, format_value

_CURRENCY = "$€£¥"
# one token of reasoning text; numbers keep their thousands separators, currency sign and percent
_TOKEN = re.compile(r"""
    (?P<ann><<[^<>\n]*>>)
  | (?P<num>[$€£¥]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|[$€£¥]?\.\d+%?)
  | (?P<wop>\b(?:divided\s+by|multiplied\s+by|times|plus|minus|of)\b)
  | (?P<op>\*\*|//|[-+*/×÷^·−])
  | (?P<eq>==|=|≈)
  | (?P<paren>[()])
  | (?P<word>[A-Za-z]+)
  | (?P<nl>\n)
  | (?P<space>[ \t]+)
  | (?P<other>.)
""", re.VERBOSE)
_WORD_OPS = {"times": "*", "plus": "+", "minus": "-", "divided by": "/", "multiplied by": "*"}
_OPS = {"×": "*", "·": "*", "÷": "/", "−": "-", "^": "**", "x": "*", "X": "*"}
_ANSWER = re.compile(r"(?:^|\n)\s*(?:####|(?:final\s+)?answer\s*(?:is)?\s*[:=]?)\s*(.+)", re.IGNORECASE)
_LAST_NUMBER = re.compile(r"-?[$€£¥]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?")


@dataclass(slots=True)
class Claim:
    expression: str  # the left side, as written
    claimed: str  # the right side, as written
    start: int  # character span of the claim in the text
    end: int
    kind: str  # "annotation" | "equation"
    approximate: bool = False  # written with ≈


@dataclass(slots=True)
class ClaimCheck:
    claim: Claim
    status: str  # "ok" | "wrong" | "unchecked"
    value: str | None = None  # the exact value of the expression, formatted
    reason: str = ""

    def describe(self) -> str:
        c = self.claim
        if self.status == "wrong":
            return f"{c.expression} = {c.claimed} is wrong: {c.expression} = {self.value}"
        if self.status == "unchecked":
            return f"{c.expression} = {c.claimed} was not checked: {self.reason}"
        return f"{c.expression} = {c.claimed} checked"


@dataclass
class Verification:
    checks: list[ClaimCheck]

    @property
    def wrong(self) -> list[ClaimCheck]:
        return [c for c in self.checks if c.status == "wrong"]

    @property
    def first_wrong(self) -> ClaimCheck | None:
        return next((c for c in self.checks if c.status == "wrong"), None)

    @property
    def ok(self) -> bool:
        """No claim is disproved (unchecked claims are not counted against the text)."""
        return self.first_wrong is None

    @property
    def checked(self) -> int:
        return sum(c.status != "unchecked" for c in self.checks)


def _python(parts: list[tuple[str, str]]) -> str:
    """Calculator syntax for the tokens (kind, text) of one side: currency dropped, notations rewritten."""
    out: list[str] = []
    for i, (kind, text) in enumerate(parts):
        if kind == "num":
            text = text.lstrip(_CURRENCY).replace(",", "")
            # "17.5% of 2480" is the calculator's own notation; "25% * 8" and "= 25%" are percentages.
            # (A % between operands, modulo, is not a number suffix: `_TOKEN` ends the claim there.)
            if text.endswith("%") and (i + 1 == len(parts) or parts[i + 1] != ("wop", "of")):
                text = f"({text[:-1]}/100)"
        elif kind == "wop":
            if text == "of":  # kept after a percentage (the calculator reads "N% of"); after a fraction, times
                text = "of" if i and parts[i - 1][1].endswith("%") else "*"
            else:
                text = _WORD_OPS[" ".join(text.split())]
        elif kind in ("op", "word"):
            text = _OPS.get(text, text)

        out.append(text)
    return " ".join(out)


def _side(text: str) -> str:
    """One side of an annotation, `48/2` or `$1,200*0.2`, in calculator syntax."""
    toks = [(m.lastgroup, m[0]) for m in _TOKEN.finditer(text) if m.lastgroup != "space"]
    return _python(toks)


def _has_operator(parts: list[tuple[str, str]]) -> bool:
    """A binary operator between operands: a leading minus alone (-3) does not make a claim."""
    return any(k in ("op", "wop") or (k == "word" and t in "xX") for k, t in parts[1:]) or any(k == "fn" for k, _ in parts)


def _runs(text: str) -> list[list[tuple[str, str, int, int]]]:
    """Maximal runs of math tokens on one line, with a unit word after a number dropped."""
    toks = [(m.lastgroup, m[0], m.start(), m.end()) for m in _TOKEN.finditer(text)]
    toks = [t for t in toks if t[0] != "space"]
    runs, cur = [], []
    depth, fn_depth, skip_depth = 0, [], None  # open parens; those of calculator functions; of a group skipped

    def end_run():
        nonlocal cur
        if cur:
            runs.append(cur)
        cur = []

    for i, (kind, tok, s, e) in enumerate(toks):
        prev = cur[-1] if cur else None
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if skip_depth is not None:  # inside f(...) of a function the calculator lacks: no claim there
            depth += (tok == "(") - (tok == ")")
            if depth <= skip_depth:
                skip_depth = None
            continue
        if kind == "word" and nxt is not None and nxt[1] == "(":
            if tok in FUNCTIONS:  # sqrt(16) + 1 = 5
                cur.append(("fn", tok, s, e))
                fn_depth.append(depth + 1)
            else:
                end_run()
                skip_depth = depth
            continue
        if kind == "paren":
            depth += 1 if tok == "(" else -1
            cur.append((kind, tok, s, e))
            if tok == ")" and fn_depth and depth < fn_depth[-1]:
                fn_depth.pop()
            continue
        if kind in ("num", "op", "eq") or tok == "," and fn_depth and depth == fn_depth[-1]:
            cur.append((kind, tok, s, e))
            continue
        if kind == "wop" and prev is not None and prev[0] in ("num", "paren"):
            # "of" is an operator only after a percentage or a fraction: "15% of 80", "1/2 of 24"
            if tok != "of" or prev[1].endswith("%") or len(cur) >= 2 and cur[-2][1] == "/":
                cur.append((kind, tok, s, e))
                continue
        if kind == "word" and prev is not None and prev[0] in ("num", "paren") and nxt is not None:
            if tok in ("x", "X") and nxt[0] in ("num", "paren"):
                cur.append((kind, tok, s, e))
                continue
            # a unit: "5 apples × 3", "15 apples = ..."; but a one-letter word is a variable ("2x + 3 = 7")
            # and a unit with an exponent ("20 m^2") ends the claim, lest "^2" be read as arithmetic
            if len(tok) > 1 and nxt[0] in ("op", "eq", "wop") and nxt[1] not in ("^", "**"):
                continue
        end_run()
        depth, fn_depth = 0, []
    end_run()
    return runs


def _equations(text: str) -> list[Claim]:
    claims = []
    for run in _runs(text):
        sides, side = [], []
        for tok in run:
            if tok[0] == "eq":
                sides.append((side, tok[1]))
                side = []
            else:
                side.append(tok)
        sides.append((side, ""))
        for (lhs, eq), (rhs, _) in zip(sides, sides[1:]):
            # a run can start mid-sentence ("... and 3) + 4 = 7"): drop an unbalanced leading part
            while lhs and (lhs[0][0] in ("op", "wop") and lhs[0][1] not in "-−" or lhs[0][1] == ")"
                           or lhs[0][1] == "(" and sum(t[1] == "(" for t in lhs) > sum(t[1] == ")" for t in lhs)):
                lhs = lhs[1:]
            # a claim needs an operator on one side: "3 + 4 = 7", "36 = 6 * 6"; not "x = 5" or "2024 = 2024"
            if not lhs or not rhs or not (_has_operator([(k, t) for k, t, *_ in lhs])
                                          or _has_operator([(k, t) for k, t, *_ in rhs])):
                continue
            # the claimed value: the right side's first operand, unless it is itself an expression
            if not _has_operator([(k, t) for k, t, *_ in rhs]):
                rhs = rhs[:1] if rhs[0][0] == "num" else rhs[:2] if rhs[0][1] in "-−" else rhs
            claims.append(Claim(_python([(k, t) for k, t, *_ in lhs]), _python([(k, t) for k, t, *_ in rhs]),
                                lhs[0][2], rhs[-1][3], "equation", approximate=eq == "≈"))
    return claims


def extract_claims(text: str) -> list[Claim]:
    """The arithmetic claims in `text`, in order (see the module docstring for what counts)."""
    claims: list[Claim] = []
    masked = list(text)
    for m in re.finditer(r"<<([^<>=\n]+)=([^<>\n]+)>>", text):
        claims.append(Claim(_side(m[1]), _side(m[2]), m.start(), m.end(), "annotation"))
        masked[m.start():m.end()] = " " * (m.end() - m.start())
    annotations = list(claims)
    for c in _equations("".join(masked)):
        # GSM8K writes "48/2 = <<48/2=24>>24": the prose equation spans its annotation and says the same
        if not any(c.start <= a.start and a.end <= c.end for a in annotations):
            claims.append(c)
    return sorted(claims, key=lambda c: c.start)


def _decimals(claimed: str) -> int | None:
    """Decimal places shown by a plain number ("3.33" -> 2, "6" -> 0); None for an expression."""
    m = re.fullmatch(r"\(?-?\s*(\d+)(?:\.(\d+))?(?:/100\))?", claimed.replace(" ", ""))
    if m is None:
        return None
    return len(m[2] or "") + (2 if claimed.endswith("/100)") else 0)


def check_claim(claim: Claim) -> ClaimCheck:
    try:
        exact = evaluate(claim.expression)
        said = evaluate(claim.claimed)
    except (CalculatorError, ValueError, TypeError, ZeroDivisionError, RecursionError) as e:
        return ClaimCheck(claim, "unchecked", reason=str(e).splitlines()[0][:200])
    value = format_value(exact)
    diff = abs(sympy.N(exact - said, 30))
    if diff == 0:
        return ClaimCheck(claim, "ok", value)
    places = _decimals(claim.claimed)
    if places is not None and not exact.is_integer:
        half = sympy.Rational(1, 2 * 10**places)
        if diff <= half * (1 + sympy.Rational(1, 10**6)):
            return ClaimCheck(claim, "ok", value, "rounded")
        if places == 0 and said == sympy.floor(exact):  # truncation: whole boxes, full weeks
            return ClaimCheck(claim, "ok", value, "truncated")
    if claim.approximate and diff <= abs(sympy.N(exact, 30)) / 100:
        return ClaimCheck(claim, "ok", value, "approximately")
    return ClaimCheck(claim, "wrong", value)


def check(text: str) -> Verification:
    """Every arithmetic claim in `text`, checked."""
    return Verification([check_claim(c) for c in extract_claims(text)])


def final_answer(text: str) -> str:
    """The answer a solution ends on: its last `Answer: ...` / `#### ...` line, else its last number."""
    found = _ANSWER.findall(text)
    if found:
        return found[-1].strip().rstrip(".")
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


SOLVE_PROMPT = ("Solve the problem step by step. Write every calculation on its own line as an equation with "
                "its result, like `12 * 3 = 36`. End with a line `Answer: <the final number>`.")
CONTINUE_PROMPT = ("Here is your solution up to its first wrong calculation, which a calculator has corrected:\n\n"
                   "{prefix}\n\nThe correct result of `{expression}` is {value}. Continue the solution from exactly "
                   "this point using the corrected value, writing each remaining calculation as an equation, and "
                   "end with a line `Answer: <the final number>`. Do not repeat the steps above.")


@dataclass
class VerifiedAnswer:
    answer: str
    reasoning: str  # the whole reasoning, repaired steps included
    verified: bool  # every checkable claim holds (and at least one was checked)
    verification: Verification
    repairs: int  # re-prompts from a wrong step
    attempts: list[str] = field(default_factory=list)  # each model reply, in order

    @property
    def flag(self) -> str | None:
        """Why the answer is unverified, or None."""
        if self.verified:
            return None
        w = self.verification.first_wrong
        return f"unverified: {w.describe()}" if w else "unverified: no calculation could be checked"


class VerifiedSolver:
    """Chain of thought whose arithmetic is checked, repaired from the first wrong step up to `max_repairs` times."""

    def __init__(self, backend: ChatBackend, max_repairs: int = 2, system: str = SOLVE_PROMPT):
        if max_repairs < 0:
            raise ValueError("max_repairs must be >= 0")
        self.backend, self.max_repairs, self.system = backend, max_repairs, system

    def solve(self, question: str) -> VerifiedAnswer:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": question}]
        reply = (self.backend.chat(messages).content or "").strip()
        attempts, reasoning, repairs = [reply], reply, 0
        result = check(reasoning)
        while not result.ok and repairs < self.max_repairs:
            wrong = result.first_wrong
            # keep the text before the wrong claim and restate the claim with the calculator's value
            prefix = f"{reasoning[:wrong.claim.start]}{wrong.claim.expression} = {wrong.value}".strip()
            prompt = CONTINUE_PROMPT.format(prefix=prefix, expression=wrong.claim.expression, value=wrong.value)
            reply = (self.backend.chat(messages + [{"role": "user", "content": prompt}]).content or "").strip()
            attempts.append(reply)
            reasoning, repairs = f"{prefix}\n{reply}", repairs + 1
            result = check(reasoning)
        verified = result.ok and result.checked > 0
        return VerifiedAnswer(final_answer(reasoning), reasoning, verified, result, repairs, attempts)
