"""Personal data and secrets in text: detection, reversible redaction, and redaction of a stream.

`find_pii(text, kinds)` finds, by pattern plus a checksum or validity rule where one exists:
* `email`;
* `phone`: international `+CC ...` (8 to 15 digits, E.164), North American `(555) 123-4567`,
  `555-123-4567`, `555.123.4567`, `1-800-555-0199` (one separator used throughout; with plain spaces,
  `555 123 4567`, only after a word such as "call" or "phone"), and national trunk-0 numbers
  `020 7946 0958`. Bare digit runs, dates, times, versions, IPs, counts and ids in log lines are not
  phones, and a number right after "order", "invoice", "ticket", "id", "ref", "#" is an id, not a phone;
* `credit_card`: 13-19 digits, one separator kind, a known IIN prefix and length, valid Luhn digit;
* `iban`: country code, check digits, valid mod-97 (ISO 13616) and the country's length where known;
* `us_ssn`: AAA-GG-SSSS under the SSA rules (area not 000, 666 or 9xx; group not 00; serial not 0000);
* `ip_address`: IPv4 with valid octets, IPv6 (validated by `ipaddress`, with at least one digit);
* `api_key`: OpenAI/Anthropic `sk-...`, AWS `AKIA`/`ASIA`, GitHub `ghp_`..., Slack `xox[bp]-`,
  Google `AIza`, Stripe `sk_live_`, GitLab `glpat-`.
Person names are deliberately not detected: without a NER model, name detection is capitalised-word
guessing, which flags "PERSON" on log lines, numbers and product names, the false hits that make
users switch redaction off. Overlapping hits keep the longest (then the most specific kind).

`redact(text)` replaces each value by a placeholder `[EMAIL_1]`, `[PHONE_2]`, ... (one per distinct
value, numbered per kind in order of first appearance); `restore(text, mapping)` puts them back. So
that the round trip is exact even for a text that already contains a placeholder-shaped string, such
a literal is itself replaced (by `[LITERAL_n]`) and restored.

`StreamRedactor` redacts streamed output: `push(chunk)` returns what is safe to emit now and holds
back only the tail that could still be part of a value. Every pattern is built from a small set of
characters (letters, digits, `._%+-@():[]` and a single space between digit groups), so a cut right
after any other character, after a non-space whitespace, or at a space not between two digit/
upper-case groups can never split a match; the redactor emits up to the last such cut and keeps
the last 64 emitted characters as left context (the longest look-behind, "call me at", is 24). The
result equals `redact(whole text).text` for any chunking, unless one unbroken run of pattern
characters exceeds `max_hold` (256), where it is force-cut to bound latency.
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass, field

KINDS = ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "api_key")
# equal-length overlaps: the more specific kind wins
_PRIORITY = {k: i for i, k in enumerate(("literal", "api_key", "email", "credit_card", "iban", "us_ssn",
                                          "ip_address", "phone"))}


@dataclass(frozen=True)
class PIISpan:
    kind: str
    start: int
    end: int
    text: str


@dataclass
class Redaction:
    text: str  # the redacted text
    spans: list[PIISpan]  # what was replaced, in the original text's offsets
    mapping: dict[str, str]  # placeholder -> original value


_NOT_AFTER = r"(?![\w])(?![.-]\d)"  # the end of a number: not followed by a digit group
_PATTERNS: dict[str, re.Pattern] = {
    "email": re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                        r"[A-Za-z]{2,}(?![\w-])"),
    "phone": re.compile(rf"""(?:
        (?P<intl>(?<![\w+])\+\d{{1,3}}(?:[ .-]?\(\d{{1,4}}\))?(?:[ .-]?\d{{1,5}}){{1,6}})
      | (?<![\w+.\#-])(?:1[ .-]?)?(?:\([2-9]\d\d\)[ .-]?\d{{3}}[ .-]|(?P<area>[2-9]\d\d)(?P<sep>[.-])\d{{3}}(?P=sep))\d{{4}}
      | (?P<spaced>(?<![\w+.\#-])[2-9]\d\d[ ]\d{{3}}[ ]\d{{4}})
      | (?P<trunk>(?<![\w+.\#-])0\d{{2,4}}[ -]\d{{3,4}}[ -]?\d{{3,4}})
    ){_NOT_AFTER}""", re.VERBOSE),
    "credit_card": re.compile(rf"(?<![\w.-])\d(?:[ -]?\d){{12,18}}{_NOT_AFTER}"),
    # the look-behind comes after the first letter so that `re` can skip to upper-case letters
    "iban": re.compile(r"[A-Z](?<![\w][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![\w])"),
    "us_ssn": re.compile(rf"(?<![\w.-])(\d{{3}})-(\d{{2}})-(\d{{4}}){_NOT_AFTER}"),
    "ip_address": re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                             r"(?![\w])(?!\.\d)"),  # IPv4; IPv6 below
    "api_key": re.compile(r"""(?<![\w-])(?:
        sk-[A-Za-z0-9_-]{20,}                       # OpenAI, Anthropic (sk-ant-...), sk-proj-...
      | (?:AKIA|ASIA)[0-9A-Z]{16}                   # AWS access key id
      | gh[pousr]_[A-Za-z0-9]{36,} | github_pat_[A-Za-z0-9_]{22,}
      | xox[baprs]-[A-Za-z0-9-]{10,}                # Slack
      | AIza[0-9A-Za-z_-]{35}                       # Google
      | (?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}     # Stripe
      | glpat-[0-9A-Za-z_-]{20,}                    # GitLab
    )(?![\w-])""", re.VERBOSE),
}
_IPV6 = re.compile(r"""(?<![\w:.])(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){7}
    |(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?)(?![\w:])""", re.VERBOSE)
# Speed: phones, cards, SSNs and IPv4s are made of digits and " ().+-" only, so they are searched
# for inside the runs of those characters (found by a pattern `re` scans at C speed from its first
# character set), with two characters past the run for the look-aheads; the other kinds are searched
# only when a character they need is present.
_NUMERIC_RUN = re.compile(r"[\d+(][\d ().+-]{6,}")
_MIN_CHARS = {"phone": 9, "credit_card": 13, "us_ssn": 11, "ip_address": 7}  # the shortest match of each
_V6_HINT = re.compile(r"(?::[0-9A-Fa-f]{1,4}){6}:")  # an uncompressed IPv6 address; else it holds "::"
_LOCAL = string.ascii_letters + string.digits + "._%+-"
_KEY_HINTS = ("sk-", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "AIza", "sk_", "rk_",
              "glpat-")
_PLACEHOLDER_KINDS = "|".join(k.upper() for k in (*KINDS, "literal"))
_LITERAL = re.compile(rf"\[(?:{_PLACEHOLDER_KINDS})_\d+\]")
_PHONE_WORD = re.compile(r"\b(?:phone|tel|telephone|call|mobile|cell|fax|ph|contact|whatsapp|text|sms|reach|"
                         r"number)\b[^\d\n]{0,16}\Z", re.IGNORECASE)
_ID_WORD = re.compile(r"(?:\b(?:order|invoice|ticket|tracking|ref|reference|account|acct|id|serial|sku|case|po|"
                      r"pid|port|build|job|run|issue|pr)\b\s*(?:#|no\.?|number|num)?\s*[:#]?\s*|#)\Z", re.IGNORECASE)
_CONTEXT = 24  # characters of left context the phone rules read

_IBAN_LENGTH = {"DE": 22, "GB": 22, "FR": 27, "ES": 24, "IT": 27, "NL": 18, "BE": 16, "CH": 21, "AT": 20, "IE": 22,
                "PL": 28, "PT": 25, "SE": 24, "NO": 15, "DK": 18, "FI": 18, "LU": 20, "CZ": 24, "GR": 27, "HU": 28}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _iin_ok(d: str) -> bool:
    """A known issuer prefix with a length it issues (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro)."""
    n, p2, p3, p4 = len(d), int(d[:2]), int(d[:3]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16
    if p2 in (34, 37):
        return n == 15
    if p4 == 6011 or p2 == 65 or 644 <= p3 <= 649 or 3528 <= p4 <= 3589 or p2 in (62, 81):
        return 16 <= n <= 19
    if 300 <= p3 <= 305 or p2 in (36, 38, 39) or p4 == 3095:
        return 14 <= n <= 19
    if p2 == 50 or 56 <= p2 <= 69:  # Maestro
        return 12 <= n <= 19
    return False


def _card_ok(s: str) -> bool:
    seps = set(s) - set(string.digits)
    if len(seps) > 1 or any(len(g) < 3 for g in re.split("[ -]", s)):
        return False  # mixed separators, or digit groups too small to be a card's (4-4-4-4, 4-6-5)
    d = s.replace(" ", "").replace("-", "")
    return luhn_ok(d) and _iin_ok(d)


def iban_ok(s: str) -> bool:
    c = s.replace(" ", "")
    if not 15 <= len(c) <= 34 or _IBAN_LENGTH.get(c[:2], len(c)) != len(c):
        return False
    return int("".join(str(int(ch, 36)) for ch in c[4:] + c[:4])) % 97 == 1


def _ssn_ok(m: re.Match) -> bool:
    area, group, serial = m[1], m[2], m[3]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _phone_ok(m: re.Match, text: str) -> bool:
    s = m.start()
    before = text[max(0, s - _CONTEXT):s]
    if _ID_WORD.search(before):
        return False  # "order 555-123-4567", "#0201 234 5678": an id
    digits = sum(c.isdigit() for c in m[0])
    if m["intl"]:
        return 8 <= digits <= 15
    if m["spaced"]:
        return _PHONE_WORD.search(before) is not None  # "555 123 4567" alone could be three counts
    if m["trunk"]:
        return 10 <= digits <= 11
    return True


def _valid(kind: str, m: re.Match, text: str) -> bool:
    if kind == "phone":
        return _phone_ok(m, text)
    if kind == "credit_card":
        return _card_ok(m[0])
    if kind == "iban":
        return iban_ok(m[0])
    if kind == "us_ssn":
        return _ssn_ok(m)
    return True


def _ipv6_ok(m: re.Match) -> bool:
    if not any(c.isdigit() for c in m[0]):
        return False  # "a::b", "dead::beef": code, not an address
    try:
        ipaddress.IPv6Address(m[0])
    except ValueError:
        return False
    return True


def _kinds(kinds: set[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown PII kind(s) {sorted(unknown)}; known: {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)


def _find(text: str, kinds: tuple[str, ...], literals: bool = False) -> list[PIISpan]:
    cands = []
    runs = [(m.start(), m.end()) for m in _NUMERIC_RUN.finditer(text)]
    n = len(text)
    for kind in kinds:
        pat = _PATTERNS[kind]
        if kind in _MIN_CHARS:
            least = _MIN_CHARS[kind]
            found = [m for s, e in runs if e - s >= least for m in pat.finditer(text, s, min(n, e + 2))]
            if kind == "ip_address" and ("::" in text or _V6_HINT.search(text)):
                found += [m for m in _IPV6.finditer(text) if _ipv6_ok(m)]
        elif kind == "email":  # from the start of the local part before each "@" (at most 64 characters)
            found, at = [], text.find("@")
            while at >= 0:
                before = text[max(0, at - 64):at]
                m = pat.search(text, at - (len(before) - len(before.rstrip(_LOCAL))), min(n, at + 256))
                if m is not None and m.start() < at < m.end() and (not found or found[-1].end() <= m.start()):
                    found.append(m)
                at = text.find("@", at + 1)
        elif kind == "api_key":
            found = list(pat.finditer(text)) if any(h in text for h in _KEY_HINTS) else []
        else:
            found = list(pat.finditer(text))
        cands += [PIISpan(kind, m.start(), m.end(), m[0]) for m in found if _valid(kind, m, text)]
    if literals:
        cands += [PIISpan("literal", m.start(), m.end(), m[0]) for m in _LITERAL.finditer(text)]
    if len(cands) < 2:
        return cands
    # overlaps: the longest wins, then the most specific kind, then the earliest
    cands.sort(key=lambda s: (s.start - s.end, _PRIORITY[s.kind], s.start))
    kept: list[PIISpan] = []
    for s in cands:
        if all(s.end <= k.start or k.end <= s.start for k in kept):
            kept.append(s)
    return sorted(kept, key=lambda s: s.start)


def find_pii(text: str, kinds: set[str] | None = None) -> list[PIISpan]:
    """The PII spans in `text`, in order, of the given kinds (default: all of `KINDS`)."""
    return _find(text, _kinds(kinds))


@dataclass
class _Placeholders:
    """Placeholder per distinct (kind, value), numbered per kind in order of first appearance."""
    by_value: dict[tuple[str, str], str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    mapping: dict[str, str] = field(default_factory=dict)

    def get(self, kind: str, value: str) -> str:
        ph = self.by_value.get((kind, value))
        if ph is None:
            n = self.counts[kind] = self.counts.get(kind, 0) + 1
            ph = self.by_value[(kind, value)] = f"[{kind.upper()}_{n}]"
            self.mapping[ph] = value
        return ph


def _substitute(text: str, spans: list[PIISpan], names: _Placeholders, offset: int = 0) -> str:
    out, last = [], offset
    for s in spans:
        out += [text[last:s.start], names.get(s.kind, s.text)]
        last = s.end
    out.append(text[last:])
    return "".join(out)


def redact(text: str, kinds: set[str] | None = None) -> Redaction:
    """`text` with each PII value replaced by its placeholder; `restore` undoes it."""
    names = _Placeholders()
    spans = _find(text, _kinds(kinds), literals=True)
    red = _substitute(text, spans, names)
    return Redaction(red, [s for s in spans if s.kind != "literal"], names.mapping)


def restore(text: str, mapping: dict[str, str]) -> str:
    """Put the original values back for the placeholders of `mapping` (in one pass, so a restored
    value is never itself rewritten)."""
    if not mapping:
        return text
    pat = re.compile("|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True)))
    return pat.sub(lambda m: mapping[m[0]], text)


_MATCH_CHARS = frozenset(string.ascii_letters + string.digits + "._%+-@():[]")  # what any pattern is made of
_INNER_LEFT = frozenset(string.digits + string.ascii_uppercase + ")")  # around a space inside a match
_INNER_RIGHT = frozenset(string.digits + string.ascii_uppercase + "(")
_LEFT_CONTEXT = 64


class StreamRedactor:
    """Redacts text as it streams; `"".join(push(c) for c in chunks) + flush() == redact(text).text`."""

    def __init__(self, kinds: set[str] | None = None, max_hold: int = 256):
        self.kinds = _kinds(kinds)
        self.max_hold = max_hold
        self._names = _Placeholders()
        self._ctx = ""  # the last emitted characters, unredacted: left context for the patterns
        self._buf = ""  # received, not yet emitted
        self._pos = 0  # offset of _buf in the whole stream
        self.spans: list[PIISpan] = []  # what was redacted so far, in stream offsets

    @property
    def mapping(self) -> dict[str, str]:
        return self._names.mapping

    def _safe_cut(self) -> int:
        """The largest p such that no match of any pattern can contain both buf[p-1] and buf[p]."""
        buf = self._buf
        for i in range(len(buf) - 1, -1, -1):
            c = buf[i]
            if c == " ":
                if i + 1 == len(buf):
                    continue  # what follows the space decides
                prev = buf[i - 1] if i else self._ctx[-1:]
                if not (prev in _INNER_LEFT and buf[i + 1] in _INNER_RIGHT):
                    return i + 1
            elif c not in _MATCH_CHARS:
                return i + 1
        return 0

    def _emit(self, p: int) -> str:
        if p <= 0:
            return ""
        part, ctx = self._buf[:p], self._ctx
        window = ctx + part
        spans = [s for s in _find(window, self.kinds, literals=True) if s.start >= len(ctx)]
        out = _substitute(window, spans, self._names, offset=len(ctx))
        shift = self._pos - len(ctx)
        self.spans += [PIISpan(s.kind, s.start + shift, s.end + shift, s.text) for s in spans if s.kind != "literal"]
        self._ctx = window[-_LEFT_CONTEXT:]
        self._buf = self._buf[p:]
        self._pos += p
        return out

    def push(self, chunk: str) -> str:
        """Add streamed text; returns the redacted text that can be emitted now."""
        self._buf += chunk
        p = self._safe_cut()
        if len(self._buf) - p > self.max_hold:  # one unbroken run of pattern characters: bound the delay
            p = len(self._buf) - _LEFT_CONTEXT
        return self._emit(p)

    def flush(self) -> str:
        """The end of the stream: the held-back rest, redacted."""
        return self._emit(len(self._buf))
