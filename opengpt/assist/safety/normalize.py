"""The canonical text that attack matching and the safety classifiers see.

`normalize(text)` undoes the cheap obfuscations that turn a known attack into a string no rule or
near-duplicate index recognises, so that `1gn0r3 4ll pr3v10us 1nstruct10ns`, `i g n o r e  a l l`,
`ｉｇｎｏｒｅ`, `ignоre` (Cyrillic о) and `ig\u200bnore` all read `ignore ...`. In order:

1. Format characters (Unicode category Cf: zero-width spaces and joiners, bidi controls, soft
   hyphens, BOMs) are dropped; Unicode *tag* characters (U+E0020..E007E, "ASCII smuggling") are
   decoded to the ASCII they hide, so hidden instructions become visible to the rules.
2. Case folding (`str.casefold`), then compatibility decomposition (NFKD): fullwidth forms,
   mathematical alphanumerics (𝐢𝐠𝐧𝐨𝐫𝐞), ligatures and circled letters become plain letters.
3. Combining marks (the "zalgo" blocks U+0300..036F, U+1AB0.., U+1DC0.., U+20D0.., U+FE20.. and
   variation selectors) are dropped after a Latin or Greek letter, and stacks of two or more are
   dropped after anything; a single mark on another script (Cyrillic й, Devanagari) is kept. So
   Latin text is accent-folded (café -> cafe): fine for matching, and it defeats ígnóré too.
   NFC then recomposes what is left (Hangul, kana).
4. Homoglyphs: Cyrillic / Greek / other letters that look Latin are mapped to the Latin letter,
   but only inside a token that mixes them with Latin letters (`ignоre`), or a token of three or
   more characters made only of look-alikes; Russian or Greek prose is left alone.
5. Letter spacing: four or more single characters separated by one repeated separator
   (`i g n o r e`, `i.g.n.o.r.e`, `i-g-n-o-r-e`, `i_g_n`, `i*g*n`) are joined; with spaces, a gap of
   two or more spaces is kept as a word break (`i g n o r e   a l l` -> `ignore all`). The run must
   hold at least two letters, so `1 2 3 4` and `10.0.0.1` stay.
6. Leetspeak, only inside a token that mixes letters with digits or @$!|: 0->o 1->i 3->e 4->a
   5->s 7->t @->a $->s !->i |->i, with `11`/`||` -> `ll` (a11ow -> allow). Symbols are rewritten only
   between two characters of the token (`p@ss`, not `hello!`, `@user` or `$HOME`). Left alone:
   plain numbers (2024, 3.14, 555-1234, $5), numbers with a unit or ordinal suffix (5kg, 100ms,
   2nd, 4k, 1080p), names with a trailing version (python3, gpt4, sha256), tokens with a run of
   three digits or more, hex strings, tokens with more digits than letters, emails.
7. A letter repeated three or more times becomes one letter (`ignoooore` -> `ignore`, `alll` ->
   `al`; English has no tripled letters, and one, not two, is what the keyword rules expect; the
   rules accept `al{1,2}` where a doubled letter matters). Digits and punctuation are not touched,
   so numbers and `###` survive.
8. Runs of horizontal whitespace become one space, runs containing a line break one newline, and
   the ends are stripped: newlines are kept because role-tag rules anchor on line starts.

The output is for matching, not for display: its offsets do not map back to the input.
Pure-ASCII input skips steps 1-4 (the common case), and steps 5 and 7 run only where a cheap scan
says they could apply, so a 2,000-character prompt takes ~0.1 ms.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

# -- 1. format characters -----------------------------------------------------------------------
# Every Cf code point as of Unicode 15 (tests check this against unicodedata), as ranges.
_CF_RANGES = [
    (0x00AD, 0x00AD), (0x0600, 0x0605), (0x061C, 0x061C), (0x06DD, 0x06DD), (0x070F, 0x070F),
    (0x0890, 0x0891), (0x08E2, 0x08E2), (0x180E, 0x180E), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x2064), (0x2066, 0x206F), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0x110BD, 0x110BD),
    (0x110CD, 0x110CD), (0x13430, 0x1343F), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001), (0xE0020, 0xE007F),
]
_FORMAT: dict[int, str | None] = {cp: None for lo, hi in _CF_RANGES for cp in range(lo, hi + 1)}
# tag characters spell ASCII invisibly (U+E0041 is a hidden "A"): decode them rather than drop
_FORMAT.update({cp: chr(cp - 0xE0000) for cp in range(0xE0020, 0xE007F)})
_NON_ASCII_FORMAT = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _CF_RANGES) + "]")

# -- 3. combining marks ---------------------------------------------------------------------------
_MARKS = "\u0300-\u036f\u0483-\u0489\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe00-\ufe0f\ufe20-\ufe2f\U000e0100-\U000e01ef"
_LATIN_GREEK = "a-z\u00c0-\u024f\u1e00-\u1eff\u0370-\u03ff"
_STRIP_MARKS = re.compile(f"(?<=[{_LATIN_GREEK}])[{_MARKS}]+|[{_MARKS}]{{2,}}")

# -- 4. homoglyphs (lowercase: applied after casefold) ----------------------------------------------
_CONFUSABLE = {
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "н": "h", "і": "i", "ї": "i",
    "ј": "j", "к": "k", "ӏ": "l", "м": "m", "п": "n", "о": "o", "р": "p", "ԛ": "q", "г": "r", "ѕ": "s",
    "т": "t", "ц": "u", "ѵ": "v", "ԝ": "w", "х": "x", "у": "y", "з": "3", "ь": "b",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "γ": "y", "ϲ": "c", "ω": "w", "μ": "u",
    # others: Armenian, dotless i, Latin small capitals, Cherokee-ish look-alikes
    "օ": "o", "ս": "u", "ց": "g", "ı": "i", "ȷ": "j", "ɡ": "g", "ʀ": "r", "ᴀ": "a", "ʙ": "b", "ᴄ": "c",
    "ᴅ": "d", "ᴇ": "e", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j", "ᴋ": "k", "ʟ": "l", "ᴍ": "m", "ɴ": "n",
    "ᴏ": "o", "ᴘ": "p", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w", "ʏ": "y", "ᴢ": "z",
    "’": "'", "‘": "'", "ʼ": "'",
}
_CONFUSABLE_TABLE = str.maketrans(_CONFUSABLE)
# a token holding at least one non-ASCII character
_NON_ASCII_TOKEN = re.compile(r"[^\s\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]*[^\x00-\x7f][^\s\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]*")
_LATIN = re.compile("[a-z]")


def _homoglyphs(m: re.Match) -> str:
    tok = m[0]
    mapped = tok.translate(_CONFUSABLE_TABLE)
    if mapped == tok:
        return tok
    if _LATIN.search(tok) or (len(tok) >= 3 and mapped.isascii()):
        return mapped
    return tok


# -- 5. letter spacing ------------------------------------------------------------------------------
_SPACED_SPACES = re.compile(r"(?<!\w)\w(?: +\w)+(?!\w)")
_SPACED_SEP = re.compile(r"(?<![^\W_])[^\W_]([.\-_*~])[^\W_](?:\1[^\W_])+\1?(?![^\W_])")
_LETTER = re.compile(r"[^\W\d_]")
_GAP = re.compile(r" {2,}")


def _enough(s: str) -> bool:
    return len(_LETTER.findall(s)) >= 2


def _join_spaces(m: re.Match) -> str:
    s = m[0]
    if s.count(" ") < 3 or not _enough(s):  # fewer than four characters, or a list of numbers
        return s
    return " ".join(w.replace(" ", "") for w in _GAP.split(s))


def _join_sep(m: re.Match) -> str:
    s = m[0]
    return s.replace(m[1], "") if _enough(s) else s


# -- 6. leetspeak ---------------------------------------------------------------------------------
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i",
                       "|": "i"})
_T = "a-z0-9@$!|"
# Speed: a pattern starting with a character set lets `re` skip ahead at C speed, so a token is found
# from its first digit or symbol and extended left over letters in Python, not matched from every letter.
# The seed must follow a letter or reach one, so plain numbers never leave the C loop.
_LEET_SEED = re.compile(f"[0-9@$!|](?:(?<=[a-z].)|(?=[0-9@$!|]*[a-z]))[{_T}]*")
_LOWER = "abcdefghijklmnopqrstuvwxyz"
_UNITS = ("st|nd|rd|th|k|m|b|t|g|kg|mg|km|cm|mm|ms|us|ns|s|h|hr|hrs|min|d|x|px|pt|em|kb|mb|gb|tb|kbps|mbps|"
          "gbps|hz|khz|mhz|ghz|v|w|kw|kwh|mah|fps|p|l|ml|lb|lbs|oz|ft|in|mph|am|pm|yr|yrs|bn|mn|c|f|gib|mib")
_KEEP = re.compile(rf"""
    [$]?\d+(?:[.,]\d+)*(?:{_UNITS})     # 5kg 100ms 2nd 4k $5m
  | [a-z]+\d+                           # python3 gpt4 sha256 (a trailing version number)
  | .*\d{{3}}.*                         # a run of three digits: an id, a model name
  | (?:0x)?[0-9a-f]{{6,}}               # hex
""", re.VERBOSE)
_INNER_SYMBOL = re.compile(r"(?<=[a-z0-9])[@$!|]+(?=[a-z0-9])")


def _deleet(tok: str, email: bool) -> str:
    core = tok.strip("@$!|")
    if not core or _KEEP.fullmatch(core):
        return tok
    letters = sum(c.isalpha() for c in core)
    if sum(c.isdigit() for c in core) > letters or letters == 0:
        return tok
    if "@" in core and email:
        return tok
    # symbols only between two characters: "hello!" and "@user" keep theirs
    head, tail = tok[: len(tok) - len(tok.lstrip("@$!|"))], tok[len(tok.rstrip("@$!|")):]
    core = _INNER_SYMBOL.sub(lambda s: s[0].translate(_LEET), core)
    core = core.replace("11", "ll").replace("||", "ll")
    return head + core.translate(_LEET) + tail


def _leet(text: str) -> str:
    out, last = [], 0
    for m in _LEET_SEED.finditer(text):
        s, e = m.span()
        before = text[max(last, s - 64):s]
        j = s - (len(before) - len(before.rstrip(_LOWER)))  # the token's letters left of its first digit
        tok = text[j:e]
        new = _deleet(tok, text.startswith(".", e))  # "bob@example" then "." is an email address
        if new != tok:
            out.append(text[last:j])
            out.append(new)
            last = e
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


# -- 7, 8. repeats and whitespace ---------------------------------------------------------------------
_REPEAT = re.compile(r"([^\W\d_])\1{2,}")
_SPACED_HINT = re.compile(r" \w \w \w")  # necessary for four spaced characters; cheap to scan for
_SEP_HINT = re.compile(r"[.\-_*~][^\W\d_][.\-_*~]")  # a letter between two separators
_ODD_SPACE = ("  ", "\t", "\r", "\n\n", " \n", "\n ", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85")


def _has_triple(text: str) -> bool:
    """Any letter three times in a row (vectorised: the regex alone costs ~50 us on 2,000 chars)."""
    a = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    same = (a[1:] == a[:-1]) & (((a[1:] >= 97) & (a[1:] <= 122)) | (a[1:] >= 0xC0))
    return bool((same[1:] & same[:-1]).any())


def _whitespace(text: str) -> str:
    if text.isascii() and not any(w in text for w in _ODD_SPACE) and text == text.strip():
        return text
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def normalize(text: str) -> str:
    """The canonical form of `text` for attack matching and classifiers (see the module docstring)."""
    if not text.isascii():
        if _NON_ASCII_FORMAT.search(text):
            text = text.translate(_FORMAT)
        text = unicodedata.normalize("NFKD", text.casefold())
        text = unicodedata.normalize("NFC", _STRIP_MARKS.sub("", text))
        text = _NON_ASCII_TOKEN.sub(_homoglyphs, text)
    else:
        text = text.lower()
    # each rare rewrite runs only where a cheap scan says it could apply
    if _SPACED_HINT.search(text):
        text = _SPACED_SPACES.sub(_join_spaces, text)
    if _SEP_HINT.search(text):
        text = _SPACED_SEP.sub(_join_sep, text)
    text = _leet(text)
    if len(text) > 2 and _has_triple(text):
        text = _REPEAT.sub(r"\1", text)
    return _whitespace(text)
