"""Verification of a semantic cache candidate: `mismatch(new, cached)` says why the answer cached for one
question may not answer another (a reason of `opengpt.assist.cache.REASONS`), or None.

Two questions at cosine ~0.9 are often different questions: a negation, a swapped antonym, another
number, name, unit or half of the day, a number stated in another unit, swapped roles around "to" /
"from" / "than" / "before", two words or two runs of words trading places around the same words, another
question frame, one word replaced by a related one, or a specific word or a trailing condition ("... with
a baby") added on one side only. Every rule errs towards
rejecting: a rejected candidate costs a model call, a wrong hit a wrong answer.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from itertools import product

import numpy as np

# -- verification of a semantic candidate ----------------------------------------------------------
STOPWORDS = frozenset("""a an the and or but if of in on at to for from by with about as into onto over
under is are was were be been being am do does did doing have has had having i me my we our you your he
she it its they them their this that these those there here what which who whom whose when where why how
can could should would will shall may might must please tell explain show give me us let get got any
some all each every so than then too very just also s t whats what's hows how's whos who's there's
is it's im i'm way ways thing things one many much""".split())

NEGATION = {"not": "not", "no": "not", "never": "not", "none": "not", "nothing": "not", "nobody": "not",
            "nowhere": "not", "neither": "not", "nor": "not", "cannot": "not", "non": "not", "without": "without",
            "except": "except", "excluding": "except", "besides": "except", "outside": "except"}

# Antonym groups: each side lists its word forms; sides of one group present must agree.
_ANTONYMS = [
    ("more better", "less fewer"), ("soft softer runny", "hard harder firm"), ("most", "least fewest"), ("before", "after"), ("prior", "after"),
    ("increase increases increased increasing raise raises", "decrease decreases decreased decreasing reduce reduces reduced reducing lower lowers"),
    ("max maximum maximize maximise highest", "min minimum minimize minimise lowest"),
    ("largest biggest", "smallest"), ("larger bigger", "smaller"), ("above", "below"), ("true", "false"),
    ("add adds added adding append insert", "remove removes removed removing delete deletes deleting drop"),
    ("higher", "lower"), ("faster quicker", "slower"), ("fastest quickest", "slowest"), ("better", "worse"),
    ("best", "worst"), ("first", "last"), ("earliest", "latest"), ("oldest", "newest youngest"),
    ("older", "newer younger"), ("enable enabled enabling", "disable disabled disabling"),
    ("install installing installed", "uninstall uninstalling uninstalled"), ("start starting", "stop stopping"),
    ("open opening", "close closing"), ("import importing", "export exporting"),
    ("upload uploading", "download downloading"), ("encrypt encrypting encryption", "decrypt decrypting decryption"),
    ("encode encoding", "decode decoding"), ("compress compressing compression", "decompress decompressing decompression"),
    ("push", "pull"), ("up", "down"), ("rise rises rising", "fall falls falling"),
    ("buy buying buyer buyers", "sell selling seller sellers"), ("employer employers", "employee employees"),
    ("landlord landlords", "tenant tenants"), ("sender", "recipient receiver"), ("host", "guest"),
    ("hot hottest hotter", "cold coldest colder"),
    ("long longer longest", "short shorter shortest"), ("heavy heavier heaviest", "light lighter lightest"),
    ("north northern", "south southern"), ("east eastern", "west western"), ("left", "right"),
    ("input inputs", "output outputs"), ("win wins winning", "lose loses losing"), ("inside indoors indoor", "outside outdoors outdoor"),
    ("good beneficial healthy", "bad harm harms harmful damage damages unhealthy"),
    ("catch catching handle handling", "raise raising throw throwing"),
    ("join joining concatenate combine merge", "split splitting"),
    ("keep keeping kept preserve preserving retain", "discard discarding drop dropping remove removing delete deleting"),
    ("under", "over"), ("checked", "carry"),
    ("build builds built building construct constructed erect erected", "fall fell demolish demolished destroy destroyed"),
    ("ascending", "descending"), ("upper uppercase", "lower lowercase"), ("positive", "negative"),
    ("even", "odd"), ("allow allowed allowing", "deny denied block blocked blocking"), ("accept", "reject"),
    ("cheap cheaper cheapest", "expensive"), ("easy easier easiest", "hard harder hardest difficult"),
    ("rich richer", "poor poorer"), ("male", "female"), ("success successful", "failure failed"),
    ("advantages pros benefits", "disadvantages cons drawbacks"), ("safe safer", "unsafe dangerous"),
    ("legal", "illegal"), ("valid", "invalid"), ("visible", "hidden invisible"), ("sync synchronous", "async asynchronous"),
    ("wide wider widest", "narrow narrower narrowest"), ("deep deeper deepest", "shallow shallower"),
    ("big", "small"), ("high", "low"), ("fast quick", "slow"), ("early", "late"), ("inner", "outer"),
    ("internal", "external"), ("public", "private"), ("static", "dynamic"), ("mutable", "immutable"),
    ("lend", "borrow"), ("teacher", "student"), ("parent", "child"), ("client", "server"),
    ("horizontal horizontally", "vertical vertically"), ("maximum", "minimum"), ("top", "bottom"),
]
ANTONYMS: dict[str, list[tuple[int, int]]] = {}
for _g, _sides in enumerate(_ANTONYMS):
    for _s, _forms in enumerate(_sides):
        for _w in _forms.split():
            ANTONYMS.setdefault(_w, []).append((_g, _s))

NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split()) if w != "_"}
NUMBER_WORDS.update({"thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
                     "ninety": 90, "hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9,
                     "dozen": 12, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
                     "eighth": 8, "ninth": 9, "tenth": 10, "twice": 2, "double": 2, "triple": 3, "half": 0.5, "pair": 2})
UNITS = {}
for _canon_unit, _forms in {
        "km": "km kms kilometer kilometers kilometre kilometres", "m": "meter meters metre metres",
        "cm": "cm centimeter centimeters centimetre centimetres", "mm": "mm millimeter millimeters",
        "mi": "mi mile miles", "ft": "ft foot feet", "in": "inch inches", "kg": "kg kgs kilogram kilograms kilo kilos",
        "g": "gram grams", "lb": "lb lbs pound pounds", "oz": "oz ounce ounces", "l": "liter liters litre litres",
        "ml": "ml milliliter milliliters", "gal": "gallon gallons", "gb": "gb gigabyte gigabytes gib",
        "mb": "mb megabyte megabytes mib", "kb": "kb kilobyte kilobytes kib", "tb": "tb terabyte terabytes tib",
        "ms": "ms millisecond milliseconds", "s": "sec secs second seconds", "min": "minute minutes mins",
        "h": "hour hours hr hrs", "day": "day days", "week": "week weeks", "month": "month months",
        "year": "year years yr yrs", "c": "celsius °c", "f": "fahrenheit °f", "%": "% percent percentage",
        "usd": "$ usd dollar dollars", "eur": "€ eur euro euros", "gbp": "£ gbp", "jpy": "¥ yen jpy",
        "mph": "mph", "kmh": "kmh km/h", "w": "watt watts", "kw": "kw kilowatt kilowatts", "v": "volt volts",
        "hz": "hz hertz", "ghz": "ghz gigahertz", "mhz": "mhz megahertz", "cal": "calorie calories kcal"}.items():
    for _w in _forms.split():
        UNITS[_w] = _canon_unit
# Words across which swapping the two sides changes the question ("convert X to Y", "X faster than Y").
DIRECTIONAL = {"to": "to", "into": "to", "onto": "to", "than": "than", "from": "from", "off": "from", "over": "over",
               "instead": "over", "before": "before", "after": "after", "behind": "behind", "ahead": "ahead",
               "by": "by", "minus": "minus", "per": "per", "divided": "by", "versus": None}

_WORD = re.compile(r"[a-z0-9]+n't|[a-z0-9]+|[%$€£¥]")  # "doesn't" stays one word; "France's" is "france" "s"
_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.,])-?\d+(?:\.\d+)?")
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”|`([^`]+)`|(?<!\w)'([^']+)'(?!\w)")
_CODE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?|\w*_\w+(?:\(\))?|(?<!\w)[a-z]+[A-Z]\w*|\w+\(\)")
_CAP = re.compile(r"(?<![\w.])[A-Z][\w+#]*")
_CLOCK = re.compile(r"\b(\d{1,2}(?::\d\d)?)\s*([ap])\.?m\b\.?")


# Phrases read as the word they mean before any rule looks at the words.
_PHRASES = [(re.compile(r"\binto (?:one|a single)\b"), "join into"), (re.compile(r"\s*(?:→|->)\s*"), " to "),
            (re.compile(r"\ball but\b"), "except"),
            # "stop / keep / prevent X from doing" is "not doing"
            (re.compile(r"\b(?:stop|keep|prevent|block|ban)(?:s|ping|ped|ing|ed|ned|ning)?\b"
                        r"(?=(?:\s+[\w']+){0,4}\s+from\s+\w+ing\b)"), "not"),
            (re.compile(r"\b(?!(?:feel|set|break|for|is|are|be|a|the|and|or|totally|completely)\b)([a-z]+)[- ]free\b"),
             r"without \1")]


# The country is one name: "US", "U.S.", "USA", "the United States", "American(s)" (not North / South /
# Latin / Central America); "us" in lower case stays the pronoun.
_USA = re.compile(r"(?<![\w.])U\.?S\.?(?:A\.?)?(?![\w.])")
_USA_WORDS = re.compile(r"\bunited states\b|\b(?<!north )(?<!south )(?<!latin )(?<!central )america(?:ns?)?\b",
                        re.IGNORECASE)


def _country(text: str) -> str:
    return _USA_WORDS.sub("USA", _USA.sub("USA", text))


def _words(text: str) -> list[str]:
    return list(_word_tuple(text))


@functools.lru_cache(maxsize=16384)  # every rule reads the words of the same two questions
def _word_tuple(text: str) -> tuple[str, ...]:
    low = _country(text).lower().replace("’", "'")
    for rx, sub in _PHRASES:
        low = rx.sub(sub, low)
    return tuple(_WORD.findall(low))


def _negations(words: list[str]) -> set[str]:
    return {NEGATION.get(w, "not" if w.endswith("n't") else None) for w in words} - {None}


def _antonym_sides(words: list[str]) -> dict[int, set[int]]:
    sides: dict[int, set[int]] = {}
    for w in words:
        for g, s in ANTONYMS.get(w, ()):
            sides.setdefault(g, set()).add(s)
    return sides


def _number(s: str) -> str | None:
    """A number's canonical text: `1,000` = `1000` = `1000.0`; None when it is none."""
    try:
        return format(Decimal(s.replace(",", "")).normalize(), "f")
    except InvalidOperation:
        return None


def numbers(text: str) -> Counter:
    """The multiset of numbers in a text, normalised: `1,000` = `1000` = `1000.0`, `two` = `2`."""
    out: Counter = Counter(v for v in map(_number, _NUMBER.findall(text)) if v is not None)
    for w in _words(text):
        if w in NUMBER_WORDS:
            out[_number(str(NUMBER_WORDS[w]))] += 1
    low = text.lower()
    second = len(re.findall(r"\bsecond[- ](?:\w+est|most|least|worst)\b", low))  # "second tallest" = 2nd
    if second:
        out["2"] += second
    out.pop("1", None)  # "a pound" / "one pound" / "1 lb": "one" is no number word, so 1 says nothing
    for hour, half in _CLOCK.findall(low):  # 3pm is not 3am: the half of the day is part of the value
        out[hour + half] += 1
    return out


def entities(text: str) -> set[str]:
    """Names (capitalised, not at a sentence start unless all-caps or mixed-case), quoted strings and code
    identifiers, lower-cased."""
    text = _country(text)
    found = {next(g for g in m if g).lower() for m in _QUOTED.findall(text)}
    found |= {m.lower().rstrip("()") for m in _CODE.findall(text) if not re.fullmatch(r"(\w\.)+\w?", m)}
    for m in _CAP.finditer(text):
        w, before = m.group(), text[:m.start()].rstrip()
        initial = not before or before[-1] in ".?!:;\"'(“"
        if w.lower() in STOPWORDS or w in ("I",) or w.lower() in NEGATION or w.lower() in NUMBER_WORDS:
            continue
        if initial and not (w.isupper() and len(w) > 1 or any(c.isupper() for c in w[1:]) or any(c.isdigit() for c in w)):
            continue
        found.add(w.lower())
    return found


def units(text: str) -> set[str]:
    low = text.lower()
    found = {UNITS[w] for w in _words(low) if w in UNITS}
    found |= {UNITS[c] for c in "%$€£¥" if c in low}
    found |= {UNITS[u] for u in re.findall(r"\d\s*(km|m|cm|mm|g|kg|l|ml|s|h|ms|gb|mb|kb|tb|°c|°f)\b", low) if u in UNITS}
    if re.search(r"\d\s*m\b", low):
        found.add("m")
    return found


def bound_units(text: str) -> dict[str, set[str]]:
    """The unit each number is stated in: a unit word within the two words after it, or a currency sign
    before it ("5 kilometers" -> {"5": {"km"}}, "$100" -> {"100": {"usd"}})."""
    low = _country(text).lower()
    out: dict[str, set[str]] = {}
    for m in _NUMBER.finditer(low):
        value = _number(m.group())
        if value is None:
            continue
        unit = next((UNITS[c] for c in "$€£¥" if low[:m.start()].rstrip().endswith(c)), None)
        after = _WORD.findall(low[m.end():m.end() + 40])[:2]  # "5 km", "100 US dollars", not "30 in euros"
        if not unit and after:
            unit = UNITS.get(after[0]) or (UNITS.get(after[1]) if len(after) > 1 and after[0] not in STOPWORDS else None)
        if unit:
            out.setdefault(value, set()).add(unit)
    return out


_NOUN_NEGATIONS = frozenset("without no non except excluding".split())


def _negated(words: list[str]) -> set[str]:
    """Stems of the first content word after a negation of a thing ("without yeast", "no sugar"); "not" and
    "-n't" negate a verb somewhere after them ("doesn't my code compile"), so they are left out."""
    out = set()
    for i, w in enumerate(words):
        if w in _NOUN_NEGATIONS:
            nxt = next((x for x in words[i + 1:i + 4] if x not in STOPWORDS and x not in NEGATION), None)
            if nxt:
                out.add(_stem(nxt))
    return out


@functools.lru_cache(maxsize=65536)
def _stem(w: str) -> str:
    for suf in ("ing", "ed", "es", "s"):
        if len(w) > len(suf) + 2 and w.endswith(suf):
            return w[: -len(suf)]
    return w


def _content(words: list[str]) -> list[str]:
    return [_stem(w) for w in words if w not in STOPWORDS and w not in NEGATION and not w.endswith("n't")
            and not w[0].isdigit() and w not in NUMBER_WORDS]


ALIASES = {"integer": "int", "str": "string", "dictionary": "dict", "float": "float", "number": "int"}


def _directed_pairs(words: list[str]) -> set[tuple[str, str, str]]:
    """(marker, left word, right word) for content words up to 3 either side of each directional word."""
    pairs = set()
    for i, w in enumerate(words):
        marker = DIRECTIONAL.get(w)
        if marker is None:
            continue
        left, right = _content(words[max(0, i - 4):i])[-3:], _content(words[i + 1:i + 5])[:3]
        left, right = [ALIASES.get(a, a) for a in left], [ALIASES.get(b, b) for b in right]
        pairs |= {(marker, a, b) for a in left for b in right if a != b}
    return pairs


# Question frames: (phrase, frame); the first that matches the start of a clause wins. "what" / "which"
# alone say nothing (they are the generic frame and agree with anything).
_FRAMES = [
    ("how many", "quantity"), ("how much", "quantity"), ("number of", "quantity"), ("amount of", "quantity"),
    ("how long", "quantity"), ("how large", "quantity"), ("how big", "quantity"), ("how old", "quantity"),
    ("how far", "quantity"), ("how tall", "quantity"), ("how fast", "quantity"),
    ("how often", "frequency"), ("how many times", "frequency"), ("how frequently", "frequency"),
    ("what year", "time"), ("which year", "time"), ("in what year", "time"), ("what time", "time"),
    ("what date", "time"), ("best time", "time"), ("right time", "time"), ("when", "time"), ("who", "person"), ("whom", "person"), ("whose", "person"),
    ("which person", "person"), ("where", "place"), ("why", "reason"), ("what causes", "reason"), ("what makes", "reason"),
    ("mean", "definition"), ("meaning", "definition"), ("stand for", "definition"), ("definition", "definition"),
    ("reason", "reason"), ("in what way", "manner"), ("how", "manner"),
]
_FRAME_RE = re.compile(r"\b(" + "|".join(re.escape(p) for p, _ in sorted(_FRAMES, key=lambda x: -len(x[0]))) + r")\b")
_FRAME_OF = dict(_FRAMES)
_YESNO = frozenset("is are was were am do does did can could should would will shall may might must has have had".split())


def question_type(text: str) -> str | None:
    """The frame of a question: quantity, frequency, time, person, place, reason, manner, yesno; None
    when it has none that says anything (a bare "what", a statement). A frequency or quantity phrase
    counts anywhere; another wh-word at a clause's start (first three words) or end; then a yes/no
    question ("Can I drink the water when travelling?" is yes/no); then a wh-word anywhere."""
    low = " ".join(_words(text))
    found = [(m.group(1), m.start()) for m in _FRAME_RE.finditer(low)]
    for frame in ("frequency", "quantity"):  # "how often" is not "how much", wherever it stands
        if any(_FRAME_OF[phrase] == frame for phrase, _ in found):
            return frame
    for clause in re.split(r"[,;:?.!]", text.lower()):
        cw = " ".join(_words(clause))
        for m in _FRAME_RE.finditer(cw):
            if cw[:m.start()].count(" ") < 3 or m.end() == len(cw):
                return _FRAME_OF[m.group(1)]
    first = low.split(" ", 1)[0] if low else ""
    if first in _YESNO and text.rstrip().endswith("?"):
        return "yesno"
    return _FRAME_OF[found[0][0]] if found else None


# Words a rewording adds or drops without changing what is asked.
FILLER = frozenset("""name way ways easiest best simplest quickest good proper correct right recommended
recommend possible need needed want know find make made use using used go done doing happen happens
happened mean means meaning called call say says said kind type sort example examples number amount total
convert compute calculate equal equals appear appears command commands vs versus""".split())
# Two words left over, one in each question, whose static cosine is in [SWAP_SIM, WORD_SIM) are related
# but not the same: co-hyponyms (cat / dog, square / cube, laptop / phone). At WORD_SIM and above they
# are synonyms (kitty / cat), below SWAP_SIM unrelated rewording. Both tuned on the tune half.
SWAP_SIM = 0.3
SWAP_SIM_ONE = 0.2  # the band's floor where exactly one word was replaced by one
SWAP_MAX = 2  # at most this many words left over on each side
WORD_SIM = 0.5


@functools.lru_cache(maxsize=1)
def _static_embeddings():
    """(tokenizer, unit-norm word-piece matrix) of the bundled MiniLM, or None when it is not installed."""
    try:
        from safetensors import safe_open
        from tokenizers import Tokenizer

        from .rag.embed import default_model_dir
        d = default_model_dir()
        with safe_open(str(d / "model.safetensors"), "np") as f:
            w = f.get_tensor("embeddings.word_embeddings.weight").astype(np.float32)
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        tok.no_padding()
        tok.no_truncation()
        return tok, w
    except Exception:  # noqa: BLE001 - no model: words align by their stems only
        return None


@functools.lru_cache(maxsize=65536)
def word_vector(word: str) -> np.ndarray | None:
    """A word's static vector: the mean of its word-pieces' input embeddings, unit norm."""
    se = _static_embeddings()
    if se is None:
        return None
    tok, w = se
    ids = tok.encode(word, add_special_tokens=False).ids
    if not ids:
        return None
    v = w[ids].mean(0)
    n = float(np.linalg.norm(v))
    return v / n if n else None


@functools.lru_cache(maxsize=262144)
def word_similarity(a: str, b: str) -> float:
    if a == b:
        return 1.0
    va, vb = word_vector(a), word_vector(b)
    return float(va @ vb) if va is not None and vb is not None else 0.0


def _same_word(a: str, b: str) -> bool:
    """One stem, or one a prefix-variant of the other ("mexico" / "mexican", "invent" / "inventor")."""
    if a == b:
        return True
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k >= 4 and k >= 0.7 * min(len(a), len(b))


def unaligned(wn: list[str], wc: list[str], sim: float | None = None) -> tuple[set[str], set[str]]:
    """The content words of each question with no counterpart in the other: not the same stem and not a
    synonym (static word-embedding cosine >= `sim`). Filler words are left out."""
    sim = WORD_SIM if sim is None else sim
    cn = {w for w in _content(wn) if w not in FILLER}
    cc = {w for w in _content(wc) if w not in FILLER}
    raw_n = {w: _stem(w) for w in wn}
    raw_c = {w: _stem(w) for w in wc}
    inv_n: dict[str, str] = {}
    for w, st in raw_n.items():
        inv_n.setdefault(st, w)
    inv_c: dict[str, str] = {}
    for w, st in raw_c.items():
        inv_c.setdefault(st, w)

    def left(a: set[str], b: set[str], inv_a, inv_b) -> set[str]:
        out = set()
        for x in a:
            if any(_same_word(x, y) for y in b):
                continue
            if any(word_similarity(inv_a.get(x, x), inv_b.get(y, y)) >= sim for y in b):
                continue
            out.add(x)
        return out
    return left(cn, cc, inv_n, inv_c), left(cc, cn, inv_c, inv_n)


def swapped(wn: list[str], wc: list[str]) -> tuple[str, str] | None:
    """A word of one question replaced by a related but different word in the other (see SWAP_SIM)."""
    un, uc = unaligned(wn, wc)
    # Only where the rest agrees: a rewording that changes many words has chance pairs in the band.
    if not un or not uc or len(un) > SWAP_MAX or len(uc) > SWAP_MAX:
        return None
    inv_n = {_stem(w): w for w in reversed(wn)}
    inv_c = {_stem(w): w for w in reversed(wc)}
    lo = SWAP_SIM_ONE if len(un) == len(uc) == 1 else SWAP_SIM  # one word for one: a looser band
    for x in un:
        for y in uc:
            if lo <= word_similarity(inv_n.get(x, x), inv_c.get(y, y)) < WORD_SIM:
                return x, y
    return None


_THIN = frozenset("a an the my your our their his her its some".split())  # skipped between the swapped words
_SYMMETRIC = frozenset("and or vs versus nor".split())  # "X and Y" is "Y and X"


def role_swap(wn: list[str], wc: list[str]) -> tuple[str, str] | None:
    """Two content words both questions share that trade places around the same words: "A <mid> B" in one,
    "B <mid> A" in the other ("tablespoons in a cup" / "cups in a tablespoon", "replace butter with oil" /
    "replace oil with butter", "rebase my branch onto main" / "rebase main onto my branch"). A rewording
    moves words past each other with other words between ("tap water safe to drink" / "safe to drink tap
    water"); a symmetric "and" / "or" between them changes nothing."""
    key = lambda w: w[:-1] if w.endswith("s") and not w.endswith("ss") else w  # "ounces" / "ounce" (_stem: "ounc")
    sn, sc = [key(w) for w in wn], [key(w) for w in wc]
    keep = lambda w: w not in STOPWORDS and w not in NEGATION and not w[0].isdigit() and w not in FILLER
    in_c = {x for x, w in zip(sc, wc) if keep(w)}
    shared = [x for x in dict.fromkeys(x for x, w in zip(sn, wn) if keep(w)) if x in in_c]
    for i, x in enumerate(shared):
        for y in shared[i + 1:]:
            a, b, c, d = sn.index(x), sn.index(y), sc.index(x), sc.index(y)
            if (a - b) * (c - d) >= 0:
                continue
            (a, b), (c, d) = sorted((a, b)), sorted((c, d))
            mid = [w for w in wn[a + 1:b] if w not in _THIN]
            if mid and mid == [w for w in wc[c + 1:d] if w not in _THIN] and not set(mid) & _SYMMETRIC:
                return x, y
    return None


def _runs_equal(xs: list[str], ys: list[str], eq) -> bool:
    return len(xs) == len(ys) and all(eq(a, b) for a, b in zip(xs, ys))


def block_swap(wn: list[str], wc: list[str]) -> tuple[str, str] | None:
    """Two runs of words that trade places around the same middle, all else equal: "P A M B S" against
    "P B M A S" ("Is a square a rectangle" / "Is a rectangle a square", "Is Los Angeles 3 hours behind New
    York" / "Is New York 3 hours behind Los Angeles", "redirect http to https" / "https to http"). Words
    match exactly, then also by prefix variant, and with and without thin words ("a US citizen ... in
    Canada" / "a Canadian citizen ... in the US"). The two runs must differ and the middle must be more
    than a symmetric "and" / "or" ("tea and coffee"). A rewording that moves a block to the other end has
    no middle ("In Python, sort a list" / "sort a list in Python")."""
    thin = lambda ws: [w for w in ws if w not in _THIN]
    exact = lambda a, b: a == b
    for (tn, tc), eq in product(((wn, wc), (thin(wn), thin(wc))), (exact, _same_word)):
        if len(tn) != len(tc) or tn == tc:
            continue
        i = 0
        while i < len(tn) and eq(tn[i], tc[i]):
            i += 1
        j = 0
        while j < len(tn) - i and eq(tn[-1 - j], tc[-1 - j]):
            j += 1
        x, y = tn[i:len(tn) - j], tc[i:len(tc) - j]
        n = len(x)
        if n < 3:
            continue
        # B opens y and A closes it: only the lengths whose end words match are tried
        ends_a = [a for a in range(1, n - 1) if eq(x[a - 1], y[-1])]
        ends_b = [b for b in range(1, n - 1) if eq(x[n - b], y[0])]
        for a, b in product(ends_a, ends_b):
            if a + b < n:
                A, M, B = x[:a], x[a:n - b], x[n - b:]
                if set(M) & _SYMMETRIC and len(thin(M)) <= 1 or _runs_equal(A, B, eq):
                    continue
                if _runs_equal(y, B + M + A, eq):
                    return " ".join(A), " ".join(B)
    return None


GENERIC_ZIPF = 5.0  # a word this frequent (Zipf scale, wordfreq) may be added on one side only; tuned on the tune half


@functools.lru_cache(maxsize=1)
def _zipf():
    try:
        from wordfreq import zipf_frequency
    except ImportError:  # no frequencies: every added word counts as specific (rejects more)
        return None
    return functools.lru_cache(maxsize=65536)(lambda w: zipf_frequency(w, "en"))


def specific(word: str) -> bool:
    """Whether a word is specific (rarer than GENERIC_ZIPF) rather than generic (make, good, really)."""
    z = _zipf()
    return z is None or z(word) < GENERIC_ZIPF


CLAUSE_OPENERS = frozenset("with for if after as in on without while when during at by before under".split())


def added(wn: list[str], wc: list[str]) -> str | None:
    """A content word in one question with no counterpart in the other, where the other has no word left
    over at all (a rewording changes words on both sides), and the word is specific ("sort a dict by value"
    / "... in descending order", "a stain" / "a red wine stain") or sits in a clause of its own that a
    preposition or conjunction opens, however common its words ("... with a baby", "... for my whole
    team", "... if I'm married to one")."""
    un, uc = unaligned(wn, wc)
    inv = {_stem(w): w for w in reversed(wn + wc)}
    for extra, other, words, other_words in ((un, uc, wn, wc), (uc, un, wc, wn)):
        if not extra or other:
            continue
        if any(specific(inv.get(w, w)) for w in extra):
            return min(w for w in extra if specific(inv.get(w, w)))
        # a trailing clause: opened after the last word the two questions share ("in what year was it
        # invented" adds "year" inside the question, not a condition after it)
        # shared: the very stem in the other question ("driving" is aligned to "drive", not shared)
        shared = set(_content(other_words))
        first = min(i for i, w in enumerate(words) if _stem(w) in extra)
        shared_last = max((i for i, w in enumerate(words) if _stem(w) in shared and w not in STOPWORDS), default=-1)
        if any(words[j] in CLAUSE_OPENERS for j in range(max(shared_last + 1, first - 3), first + 1)):
            return min(extra)
    return None


def _reversed(pn: set[tuple[str, str, str]], pc: set[tuple[str, str, str]]) -> bool:
    """A directed pair of one question reversed in the other and not kept there too; words match by
    prefix variant ("Americans traveling to Japan" / "Japanese traveling to America")."""
    like = lambda p, q: p[0] == q[0] and _same_word(p[1], q[1]) and _same_word(p[2], q[2])
    return any(any(like((m, b, a), q) for q in pc) and not any(like((m, a, b), q) for q in pc) for m, a, b in pn)


def _between(words: list[str], other: list[str]) -> list[str]:
    """"between A and B" read as "from A to B" where the other question says "from ... to": the flight
    time between London and New York is not asked by "how long from New York to London"."""
    if "between" not in words or "from" not in other or "to" not in other:
        return words
    i = words.index("between")
    j = next((k for k in range(i + 1, min(i + 6, len(words))) if words[k] == "and"), None)
    if j is None:
        return words
    return [*words[:i], "from", *words[i + 1:j], "to", *words[j + 1:]]


def _name_in(name: str, low: str, words: list[str]) -> bool:
    parts = _words(name)
    if " " + " ".join(parts) + " " in low or parts == ["usa"] and " us " in low:  # "a us citizen"
        return True
    return len(parts) == 1 and len(parts[0]) >= 5 and any(_same_word(parts[0], w) for w in words)


def mismatch(new: str, cached: str) -> str | None:
    """Why the answer to `cached` may not answer `new` (one of REASONS but cross_check), or None."""
    wn, wc = _words(new), _words(cached)
    if _negations(wn) != _negations(wc):
        return "negation"
    # a word negated on one side and said plainly on the other ("yeast-free ... bread" / "bread with yeast")
    gn, gc = _negated(wn), _negated(wc)
    if (gn - gc) & set(map(_stem, wc)) or (gc - gn) & set(map(_stem, wn)):
        return "negation"
    an, ac = _antonym_sides(wn), _antonym_sides(wc)
    # Only a swap counts: a comparison word on one side only is usually rewording ("keep" / "without losing").
    if any(g in ac and an[g] != ac[g] for g in an):
        return "antonym"
    if numbers(new) != numbers(cached):
        return "number"
    bn, bc = bound_units(new), bound_units(cached)
    if any(v in bc and not bn[v] & bc[v] for v in bn):  # "5 kilometers in miles" / "5 miles to km"
        return "number"
    en, ec = entities(new), entities(cached)
    low_n, low_c = " " + " ".join(wn) + " ", " " + " ".join(wc) + " "
    # A name in one must appear in the other, capitalised or not ("Python" / "python"), or as a
    # prefix variant ("Mexico" / "Mexican"); units count where both questions name some.
    if any(not _name_in(e, low_c, wc) for e in en) or any(not _name_in(e, low_n, wn) for e in ec):
        return "entity"
    un_, uc_ = units(new), units(cached)
    if un_ and uc_ and un_ != uc_:
        return "entity"
    pn, pc = _directed_pairs(_between(wn, wc)), _directed_pairs(_between(wc, wn))
    if _reversed(pn, pc) or role_swap(wn, wc) or block_swap(wn, wc):
        return "order"
    tn, tc = question_type(new), question_type(cached)
    # "who invented" / "when was it invented": the same words asking for another kind of answer.
    if tn is not None and tc is not None and tn != tc:
        return "question_type"
    cn, cc = set(_content(wn)) - FILLER, set(_content(wc)) - FILLER
    only_n = {x for x in cn - cc if not any(_same_word(x, y) for y in cc - cn)}
    only_c = {y for y in cc - cn if not any(_same_word(x, y) for x in cn - cc)}
    # Same question but one or two words replaced: the replaced word is what the question is about.
    if only_n and only_c and len(only_n) <= 2 and len(only_c) <= 2 and len(cn & cc) >= 2 * max(len(only_n), len(only_c)):
        return "substitution"
    if swapped(wn, wc) or added(wn, wc):
        return "unaligned"
    return None


# -- contextual alignment (BERTScore-style) ---------------------------------------------------------
# Each content word of one question is matched to its closest word-piece of the other in the last layer
# of MiniLM (cosine of L2-normalised hidden states); a word swapped for a related one ("cat" / "dog",
# "fly" / "take the train", "a lot of iron" / "low in iron") finds no close match, while a reworded
# question keeps one for every word. `alignment` is the lowest such match over both questions' content
# words (a word's match: the mean over its word-pieces).
ALIGN_MIN = 0.30  # reject below this: the strictest keeping the out-of-fold hit >= 31% (benchmarks/cache.py --fit)
PAIR_MODEL = "cache_verify_pair.json"  # logistic-regression pair classifier (weights; optional)


@functools.lru_cache(maxsize=4096)
def _pieces(text: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(word index of each word-piece, with -1 for a non-content piece; rarity weight of each word)."""
    se = _static_embeddings()
    if se is None:
        return (), ()
    tok, _ = se
    enc = tok.encode(text, add_special_tokens=True)
    # The embedder's token vectors drop the special tokens: index by the pieces between them.
    keep = [k for k, s in enumerate(enc.special_tokens_mask) if not s]
    words: dict[int, int] = {}
    weights: list[float] = []
    out = []
    z = _zipf()
    for k in keep:
        wid = enc.word_ids[k]
        if wid is None:
            out.append(-1)
            continue
        if wid not in words:
            a, b = enc.word_to_chars(wid) or (0, 0)
            word = text[a:b].lower()
            content = word.isalnum() and word not in STOPWORDS and not word.isdigit()
            words[wid] = len(weights) if content else -1
            if content:
                weights.append(max(1.0, 8.0 - z(word)) if z is not None else 1.0)
        out.append(words[wid])
    return tuple(out), tuple(weights)


def _side(text: str, tv: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """(min, rarity-weighted mean) over the content words of `text` of their best match in `other`."""
    wid, weights = _pieces(text)
    n = min(len(wid), len(tv))
    if not weights or n == 0 or len(other) == 0:
        return 1.0, 1.0
    best = (tv[:n] @ other.T).max(1)  # each piece's closest piece of the other question
    wid_a = np.asarray(wid[:n])
    scores, ws = [], []
    for w in range(len(weights)):
        m = wid_a == w
        if m.any():
            scores.append(float(best[m].mean()))
            ws.append(weights[w])
    if not scores:
        return 1.0, 1.0
    return min(scores), float(np.average(scores, weights=ws))


def alignment_features(new: str, cached: str, tv_new: np.ndarray, tv_cached: np.ndarray) -> dict[str, float]:
    """min / weighted-mean contextual alignment of each question's content words to the other."""
    mn, an = _side(new, tv_new, tv_cached)
    mc, ac = _side(cached, tv_cached, tv_new)
    return {"align_min": min(mn, mc), "align_min_new": mn, "align_min_cached": mc,
            "align_mean_new": an, "align_mean_cached": ac}


def alignment(new: str, cached: str, tv_new: np.ndarray, tv_cached: np.ndarray) -> float:
    return alignment_features(new, cached, tv_new, tv_cached)["align_min"]


def rare_unaligned(new: str, cached: str) -> int:
    """How many content words (either side) are left unaligned by stems and static synonyms and are specific."""
    wn, wc = _words(new), _words(cached)
    un, uc = unaligned(wn, wc)
    inv = {_stem(w): w for w in reversed(wn + wc)}
    return sum(specific(inv.get(w, w)) for w in un | uc)


FEATURES = ("cosine", "align_min", "align_min_new", "align_min_cached", "align_mean_new", "align_mean_cached",
            "rare_unaligned", "rule")


def pair_features(new: str, cached: str, cosine: float, tv_new: np.ndarray, tv_cached: np.ndarray,
                  rule: str | None = "?") -> list[float]:
    """The pair classifier's features, in FEATURES order (`rule`: mismatch's answer, computed if "?")."""
    f = alignment_features(new, cached, tv_new, tv_cached)
    if rule == "?":
        rule = mismatch(new, cached)
    return [cosine, f["align_min"], f["align_min_new"], f["align_min_cached"], f["align_mean_new"],
            f["align_mean_cached"], float(rare_unaligned(new, cached)), float(rule is not None)]


@functools.lru_cache(maxsize=1)
def pair_model() -> dict | None:
    """{"features", "mean", "scale", "coef", "intercept", "p_min"} from PAIR_MODEL next to this file, or None."""
    from pathlib import Path

    p = Path(__file__).with_name(PAIR_MODEL)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def pair_probability(features: list[float], model: dict) -> float:
    x = (np.asarray(features, dtype=np.float64) - np.asarray(model["mean"])) / np.asarray(model["scale"])
    return float(1.0 / (1.0 + np.exp(-(x @ np.asarray(model["coef"]) + model["intercept"]))))
