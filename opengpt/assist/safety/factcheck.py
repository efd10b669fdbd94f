"""Output post-check: numbers and names in an answer that the retrieved context or tool results do not support.

`unsupported_claims(answer, sources, question=None)` returns the claims it could not ground:
* **numbers** (kind "number"): every number in the answer, read as a value (`1,000` = `1000`,
  `12.50` = `12.5`, `$4.2 million` = 4.2 and 4,200,000, `35%` = 35; sign ignored), must be a number
  of some source, equal a source number rounded to the digits the answer shows (`12.5` for 12.47;
  only with two significant digits or more, so `3` is not "supported" by 3.14), or be derived: an
  arithmetic claim that `opengpt.assist.verify.check` finds correct and whose operands are all
  supported (sources say 12 and 3, answer says `12 * 3 = 36`) makes every number of that claim
  supported, results included, in order, so a chain of steps stays grounded. A wrong claim's
  result is not supported. Dates, times, versions and ranges (`2024-01-15`, `12:30`, `1.2.3`, `10-20`)
  are one token: supported if written the same in a source or if each part is supported.
  Not checked: list numbering (`1.` / `2)` at a line start), small counters after "step", "part",
  "option", "item", ... (up to 20), digits inside words (`Q3`, `GPT-4`, `H200`), and numbers that
  appear in the question. Years are numbers like any other: "founded in 1998" needs a source.
* **entities** (kind "entity"), conservatively (a false "unsupported" note on a correct answer costs
  more than a missed one): runs of two or more capitalised words (`Acme Corp`, `New York`, `Bank of
  America`, with of/de/von/van/der/la/& inside), and single words with an inner capital (`OpenAI`,
  `PyTorch`). A leading common word ("The", "However", "In") is dropped; Markdown headings and bold
  text are skipped (title case there is style, not a name); generic words (Inc, Corp, Ltd, University,
  Company, ...) do not count. An entity is supported if each remaining word occurs in a source or in
  the question (case-insensitive, as a word or a word prefix of four letters or more: "Acme Corp" is
  supported by "Acme Corporation").

No sources at all means nothing can be checked: `[]`, and the caller decides (the pipeline only
runs the check when a retrieval or tool step produced sources).

`disclaimer(unsupported)` is the short note to append to the answer.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from ..verify import check


@dataclass
class Unsupported:
    text: str
    kind: str  # "number" | "entity"
    start: int
    end: int


_SCALES = {"thousand": 10**3, "k": 10**3, "million": 10**6, "m": 10**6, "mn": 10**6, "bn": 10**9, "billion": 10**9,
           "b": 10**9, "trillion": 10**12, "tn": 10**12}
_NUMBER = re.compile(r"""
    (?<![\w.,])(?<![A-Za-z]-)                      # not inside a word: Q3, GPT-4, H200, 1.2.3's parts
    (?:
      (?P<compound>\d+(?:[-:/]\d+)+|\d+(?:\.\d+){2,})  # dates, times, versions, ranges
    | (?:(?P<cur>[$€£¥])\s?)?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)
      (?:\s?(?:%|percent\b))?
      (?:\s?(?P<scale>thousand|million|billion|trillion|bn|mn|tn|[kmb])\b)?
    )
    (?!\d)""", re.VERBOSE | re.IGNORECASE)
_LIST_NUMBER = re.compile(r"(?:^|\n)[ \t]*(?:[-*+][ \t]+)?\Z")
_COUNTER_WORD = re.compile(r"\b(?:step|steps|part|option|item|point|phase|stage|method|approach|tip|reason|rule|"
                           r"chapter|section|question|example|case|no\.?|#)\s*\Z", re.IGNORECASE)


def _value(num: str) -> Decimal:
    return Decimal(num.replace(",", "")).normalize()


def _scale(m: re.Match) -> str | None:
    s = m["scale"]
    if s and len(s) == 1 and not m["cur"]:
        return None  # "5m" is five metres; "$5m" is five million
    return s


def _values(m: re.Match) -> list[Decimal]:
    """The values a number token stands for: as written, and scaled (4.2 million -> 4.2, 4200000)."""
    v = _value(m["num"])
    scale = _scale(m)
    return [v, (v * _SCALES[scale.lower()]).normalize()] if scale else [v]


def _numbers(text: str) -> list[re.Match]:
    return list(_NUMBER.finditer(text))


class _Known:
    """The numbers of the sources (and derived ones): exact values, and for rounding, all of them."""

    def __init__(self, texts: list[str]):
        self.values: set[Decimal] = set()
        self.compounds: set[str] = set()
        for t in texts:
            for m in _numbers(t):
                if m["compound"]:
                    self.compounds.add(m["compound"])
                    self.values.update(_value(p) for p in re.split(r"[-:/.]", m["compound"]) if p)
                else:
                    self.values.update(_values(m))

    def has(self, value: Decimal, shown: str) -> bool:
        if value in self.values:
            return True
        digits = shown.replace(",", "").lstrip("0.")
        if len(digits.replace(".", "")) < 2:
            return False  # one significant digit: rounding would support almost anything
        places = len(shown.split(".")[1]) if "." in shown else 0
        q = Decimal(1).scaleb(-places)
        return any(v.quantize(q, rounding=ROUND_HALF_UP) == value for v in self.values
                   if abs(v - value) < 1 and v.as_tuple().exponent < -places)

    def supports(self, m: re.Match) -> bool:
        if m["compound"]:
            c = m["compound"]
            return c in self.compounds or all(self.has(_value(p), p) for p in re.split(r"[-:/.]", c) if p)
        scale = _scale(m)
        v = _value(m["num"])
        if scale:  # "4.2 million" vs a source's "4,200,000" or "4.2 million"; shown digits are the written ones
            return self.has(v, m["num"]) or (v * _SCALES[scale.lower()]).normalize() in self.values
        return self.has(v, m["num"])


def _skipped(answer: str, m: re.Match) -> bool:
    before = answer[:m.start()]
    after = answer[m.end():m.end() + 2]
    if _LIST_NUMBER.search(before[-40:]) and after[:1] in (".", ")") and m["num"] and m["num"].isdigit():
        return True  # "1." / "2)" list numbering
    if m["num"] and m["num"].isdigit() and int(m["num"]) <= 20 and _COUNTER_WORD.search(before[-20:]):
        return True  # "step 2", "option 3"
    return False


def _unsupported_numbers(answer: str, known: _Known) -> list[Unsupported]:
    derived: list[tuple[int, int]] = []  # spans of correct claims on supported operands
    for c in check(answer).checks:
        if c.status != "ok":
            continue
        # the calculator writes 25% as (25/100): the 100 is notation, not an operand
        operands = _numbers(re.sub(r"\((\d[\d.]*)/100\)", r"\1%", c.claim.expression))
        results = _numbers(re.sub(r"\((\d[\d.]*)/100\)", r"\1%", c.claim.claimed))
        # "36 = 6 * 6" restates a supported 36: its side with the operator is grounded by the other side
        if all(known.supports(m) for m in operands) or (len(operands) == 1 and results and known.supports(operands[0])):
            derived.append((c.claim.start, c.claim.end))
            for m in operands + results:  # later steps may build on this one
                if m["num"]:
                    known.values.update(_values(m))
    out = []
    for m in _numbers(answer):
        if _skipped(answer, m) or any(s <= m.start() and m.end() <= e for s, e in derived):
            continue
        if not known.supports(m):
            out.append(Unsupported(m[0].strip(), "number", m.start(), m.end()))
    return out


# -- entities ----------------------------------------------------------------------------------------
_CAP = r"(?:[A-Z][a-z]+(?:[-'][A-Z]?[a-z]+)?|[A-Z]{2,}|[A-Z][a-z]*[A-Z][A-Za-z]*)"
_ENTITY = re.compile(rf"(?<![\w-])(?:{_CAP}(?:\s+(?:(?:of|de|von|van|der|la|du|&)\s+)?{_CAP})+|[A-Z][a-z]+[A-Z][A-Za-z]*"
                     rf"|[a-z][A-Z][A-Za-z]+)(?![\w-])")
_LEADING = set("""the a an this that these those it its in on at for from by with to as of and or but however
    according based yes no note here there we you they he she i if when while after before since because so
    also then thus therefore overall finally first second third next today yesterday tomorrow our your their
    my his her each every all some many most both either neither such what which who why how where sure
    unlike like although though given per via""".split())
_GENERIC = set("""inc corp corporation ltd llc plc co company group holdings university college institute
    department ministry agency bank the of de von van der la du and mr mrs ms dr prof sir st saint""".split())
_SKIP_REGION = re.compile(r"(?m)^[ \t]*#{1,6}[^\n]*$|\*\*[^*\n]+\*\*|__[^_\n]+__")
_WORD = re.compile(r"[a-z0-9]+")


def _words_of(texts: list[str]) -> tuple[set[str], list[str]]:
    words = set()
    for t in texts:
        words.update(_WORD.findall(t.lower()))
    return words, sorted(words)


def _supported_word(w: str, words: set[str], ordered: list[str]) -> bool:
    if w in words:
        return True
    # a word prefix of four letters or more: "corp" of "corporation"
    i = bisect.bisect_left(ordered, w)
    return len(w) >= 4 and i < len(ordered) and ordered[i].startswith(w)


def _unsupported_entities(answer: str, sources: list[str], question: str | None) -> list[Unsupported]:
    skip = [(m.start(), m.end()) for m in _SKIP_REGION.finditer(answer)]
    words, ordered = _words_of(sources + ([question] if question else []))
    out = []
    for m in _ENTITY.finditer(answer):
        if any(s <= m.start() < e for s, e in skip):
            continue
        parts = [(p.start(), p[0]) for p in re.finditer(r"[A-Za-z][\w'&-]*", m[0])]
        while parts and parts[0][1].lower() in _LEADING:
            parts.pop(0)  # "The Acme Corp" -> "Acme Corp"; "However" at a sentence start
        names = [w for _, w in parts if w.lower() not in _GENERIC]
        if not names or (len(parts) < 2 and not re.search(r"[a-z][A-Z]|^[a-z]", parts[0][1] if parts else "")):
            continue  # one plain capitalised word: a sentence start or a common noun, too noisy to flag
        if all(_supported_word(w.lower().replace("'s", ""), words, ordered) for w in names):
            continue
        start = m.start() + parts[0][0]
        out.append(Unsupported(answer[start:m.end()], "entity", start, m.end()))
    return out


def unsupported_claims(answer: str, sources: list[str], question: str | None = None) -> list[Unsupported]:
    """Numbers and entities in `answer` not supported by `sources` (see the module docstring), in order."""
    sources = [s for s in sources if s and s.strip()]
    if not sources:
        return []  # nothing to check against: the caller decides
    known = _Known(sources + ([question] if question else []))
    out = _unsupported_numbers(answer, known) + _unsupported_entities(answer, sources, question)
    return sorted(out, key=lambda u: u.start)


def disclaimer(unsupported: list[Unsupported]) -> str:
    """A short note for the user naming the unsupported claims ("" when there are none)."""
    if not unsupported:
        return ""
    names = list(dict.fromkeys(u.text for u in unsupported))
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return (f"\n\nNote: these claims are not supported by the sources or tool results: {shown}. "
            "Check them before relying on them.")
