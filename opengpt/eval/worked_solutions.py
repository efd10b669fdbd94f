"""Synthetic GSM8K-style worked solutions, correct and with one injected arithmetic error, to measure a verifier.

`make_set(n, seed)` builds `n` word problems from the templates in `TEMPLATES`: each is a small
computation (named inputs, then steps that combine inputs and earlier results) rendered as a
solution in one of four styles, mixed evenly:
* "gsm8k": prose with calculator annotations, `She sold 48 / 2 = <<48/2=24>>24 clips.` ending `#### 72`;
* "prose": `48 / 2 = 24` equations ending `Answer: 72`;
* "words": `48 divided by 2 = 24`;
* "chain": the last two steps written as one chain, `434 - 3^4 = 434 - 81 = 353`.
Money carries `$` and thousands separators, divisions that do not come out even are shown rounded to
two decimals (later steps use the rounded value, as a person would), and percentages appear as
`15% of $2,480`.

`corrupt(solution, rng)` rewrites one step with a wrong result, of one of the kinds in `ERRORS`
(off by one, off by ten, a digit transposed, a factor of ten, the wrong operation, a rounding slip
in the second decimal), and carries the wrong value into the later steps, so exactly one
calculation is wrong and the rest are consistent with it: the case a checker must localise.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from fractions import Fraction

ERRORS = ("off_by_one", "off_by_ten", "transposed", "factor_ten", "wrong_operation", "rounding")
STYLES = ("gsm8k", "prose", "words", "chain")
_WORDS = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}


@dataclass(frozen=True)
class Step:
    a: str  # an input name or an earlier step's name
    op: str  # + - * / or % (a percentage of b)
    b: str
    name: str
    phrase: str  # what the step computes, "clips sold in May"


@dataclass(frozen=True)
class Template:
    question: str  # with {name} placeholders for the inputs
    inputs: dict[str, tuple[int, int]]  # name -> inclusive range
    steps: tuple[Step, ...]
    money: tuple[str, ...] = ()  # the inputs and steps that are amounts of money (written $1,234)


S = Step
TEMPLATES = (
    Template("Natalia sold clips to {a} of her friends in April, and then she sold half as many clips in May. "
             "How many clips did she sell altogether in April and May?", {"a": (20, 96), "two": (2, 2)},
             (S("a", "/", "two", "may", "clips sold in May"), S("a", "+", "may", "total", "clips sold in total"))),
    Template("A shop sells pens at ${p} each. Sam buys {n} pens and pays with ${bill}. How much change does he get?",
             {"p": (2, 9), "n": (3, 12), "bill": (120, 150)},
             (S("p", "*", "n", "cost", "the pens cost"), S("bill", "-", "cost", "change", "his change is")),
             ("p", "bill", "cost", "change")),
    Template("A laptop costs ${price}. It is on sale for {pct}% off, and the tax on the sale price is ${tax}. "
             "What does it cost in the end?", {"price": (1200, 4800), "pct": (5, 35), "tax": (40, 90)},
             (S("pct", "%", "price", "off", "the discount is"), S("price", "-", "off", "sale", "the sale price is"),
              S("sale", "+", "tax", "final", "with tax it costs")),
             ("price", "tax", "off", "sale", "final")),
    Template("A train travels {d} km in {h} hours, then {d2} km more at the same speed. How many hours does the "
             "whole trip take?", {"d": (120, 480), "h": (2, 6), "d2": (60, 300)},
             (S("d", "/", "h", "speed", "its speed in km per hour is"),
              S("d2", "/", "speed", "extra", "the extra hours are"), S("h", "+", "extra", "hours", "the trip takes"))),
    Template("A farmer has {rows} rows of {per} apple trees. Each tree gives {kg} kg of apples and he sells them at "
             "${price} per kg. How much does he earn?", {"rows": (4, 25), "per": (6, 30), "kg": (12, 60),
                                                          "price": (2, 5)},
             (S("rows", "*", "per", "trees", "the number of trees is"), S("trees", "*", "kg", "kgs", "the apples weigh"),
              S("kgs", "*", "price", "earn", "he earns")), ("price", "earn")),
    Template("Maria reads {p} pages a day for {d} days, then {q} pages a day for {e} days. The book has {total} "
             "pages. How many pages are left?", {"p": (12, 45), "d": (3, 9), "q": (20, 60), "e": (2, 7),
                                                  "total": (900, 1400)},
             (S("p", "*", "d", "first", "pages in the first days"), S("q", "*", "e", "second", "pages after that"),
              S("first", "+", "second", "read", "pages read"), S("total", "-", "read", "left", "pages left"))),
    Template("{n} friends share a bill of ${bill} and add a {tip}% tip. How much does each friend pay?",
             {"n": (3, 7), "bill": (85, 420), "tip": (10, 20)},
             (S("tip", "%", "bill", "tipamt", "the tip is"), S("bill", "+", "tipamt", "all", "the total is"),
              S("all", "/", "n", "each", "each friend pays")),
             ("bill", "tipamt", "all", "each")),
    Template("A tank holds {cap} litres. It is filled at {rate} litres a minute for {m} minutes, and {leak} litres "
             "leak out. How many more litres fit?", {"cap": (2000, 5000), "rate": (15, 45), "m": (20, 60),
                                                     "leak": (30, 200)},
             (S("rate", "*", "m", "filled", "litres filled"), S("filled", "-", "leak", "inside", "litres inside"),
              S("cap", "-", "inside", "room", "litres that still fit"))),
    Template("A school orders {boxes} boxes of {per} pencils and gives them out equally to {classes} classes. "
             "How many pencils does each class get?", {"boxes": (12, 60), "per": (12, 48), "classes": (3, 9)},
             (S("boxes", "*", "per", "pencils", "the pencils number"),
              S("pencils", "/", "classes", "each", "each class gets"))),
    Template("Tom earns ${wage} an hour and works {h} hours a week. He saves {pct}% of what he earns. How much does "
             "he save in {w} weeks?", {"wage": (14, 38), "h": (15, 40), "pct": (10, 30), "w": (4, 12)},
             (S("wage", "*", "h", "week", "he earns each week"), S("week", "*", "w", "earned", "in all he earns"),
              S("pct", "%", "earned", "saved", "he saves")),
             ("wage", "week", "earned", "saved")),
)


@dataclass
class Solution:
    question: str
    text: str
    answer: str
    style: str
    lines: list[str]  # one per step, so a corrupted step can be located
    wrong_step: int | None = None  # the injected error's step, or None for a correct solution
    error: str | None = None
    template: Template | None = field(default=None, repr=False)
    values: dict[str, int] = field(default_factory=dict, repr=False)


def _num(x: Fraction, money: bool) -> str:
    """A value as written in a solution: integers plain (thousands separated for money), else 2 decimals."""
    if x.denominator == 1:
        return f"${x.numerator:,}" if money else str(x.numerator)
    return f"${float(x):,.2f}" if money else f"{float(x):.2f}"


def _shown(x: Fraction) -> Fraction:
    """The value a later step uses: what was written, 2 decimals for an uneven division."""
    return x if x.denominator == 1 else Fraction(f"{float(x):.2f}")


def _apply(a: Fraction, op: str, b: Fraction) -> Fraction:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b, "%": a * b / 100}[op]


def _wrong(value: Fraction, kind: str, a: Fraction, op: str, b: Fraction, rng: random.Random) -> Fraction:
    if kind == "off_by_one":
        return value + rng.choice((-1, 1))
    if kind == "off_by_ten":
        return value + rng.choice((-10, 10))
    if kind == "factor_ten":
        return value * 10 if rng.random() < 0.5 or value.denominator != 1 else value / 10
    if kind == "wrong_operation":
        other = {"+": "-", "-": "+", "*": "+", "/": "*", "%": "*"}[op]
        return _apply(a, other, b)
    if kind == "rounding":
        return _shown(value) + Fraction(rng.choice((-2, 2, 3)), 100)
    digits = str(abs(_shown(value).numerator))  # transposed: swap two adjacent different digits
    pairs = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1]]
    if not pairs:
        return value + 9
    i = rng.choice(pairs)
    swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
    return Fraction(int(swapped) * (1 if value >= 0 else -1), _shown(value).denominator)


def _render(t: Template, values: dict[str, int], style: str, wrong: tuple[int, str, random.Random] | None):
    env: dict[str, Fraction] = {k: Fraction(v) for k, v in values.items()}
    lines, error = [], None
    for i, st in enumerate(t.steps):
        a, b = env[st.a], env[st.b]
        value = _apply(a, st.op, b)
        if wrong is not None and wrong[0] == i:
            bad = _wrong(value, wrong[1], a, st.op, b, wrong[2])
            if _shown(bad) == _shown(value) or bad < 0:
                bad = _shown(value) + 7  # the chosen slip happened to give the right (or a negative) number
            value, error = bad, wrong[1]
        env[st.name] = _shown(value)
        sa, sb = _num(a, st.a in t.money), _num(b, st.b in t.money)
        if st.op == "%":
            expr, plain = f"{_num(a, False)}% of {sb}", f"{_num(a, False)}/100*{_num(b, False)}"
        else:
            expr = f"{sa} {_WORDS[st.op] if style == 'words' else '×' if st.op == '*' else st.op} {sb}"
            plain = f"{_num(a, False)}{st.op}{_num(b, False)}"
        out = _num(value, st.name in t.money)
        if style == "gsm8k":
            lines.append(f"So {st.phrase} {expr} = <<{plain}={_num(value, False)}>>{out}.")
        else:
            lines.append(f"{st.phrase.capitalize()} {expr} = {out}.")
    if style == "chain" and len(t.steps) >= 2:  # "x op (y op z) = x op w = v": the last step restates the one before
        prev, last = t.steps[-2], t.steps[-1]
        if last.b == prev.name and last.op in "+-*" and prev.op in "+-*":
            a_prev, b_prev = env[prev.a], env[prev.b]
            lines[-1] = (f"{last.phrase.capitalize()} {_num(env[last.a], False)} {last.op} ({_num(a_prev, False)} "
                         f"{prev.op} {_num(b_prev, False)}) = {_num(env[last.a], False)} {last.op} "
                         f"{_num(env[prev.name], False)} = {_num(env[last.name], False)}.")
    answer = _num(env[t.steps[-1].name], False)
    tail = f"#### {answer}" if style == "gsm8k" else f"Answer: {answer}"
    return lines, tail, answer, error


def make_set(n: int, seed: int = 0) -> list[Solution]:
    """`n` correct worked solutions, styles and templates cycled, numbers drawn with `seed`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = TEMPLATES[i % len(TEMPLATES)]
        style = STYLES[(i // len(TEMPLATES)) % len(STYLES)]
        values = {k: rng.randint(lo, hi) for k, (lo, hi) in t.inputs.items()}
        lines, tail, answer, _ = _render(t, values, style, None)
        out.append(Solution(t.question.format(**values), "\n".join(lines + [tail]), answer, style, lines,
                            template=t, values=values))
    return out


def corrupt(sol: Solution, rng: random.Random, kind: str | None = None) -> Solution:
    """A copy of `sol` with one step's result wrong (error `kind`, random by default), carried forward."""
    t, values = sol.template, sol.values
    step = rng.randrange(len(t.steps))
    kind = kind or rng.choice(ERRORS)
    lines, tail, answer, error = _render(t, values, sol.style, (step, kind, rng))
    return replace(sol, text="\n".join(lines + [tail]), answer=answer, lines=lines, wrong_step=step, error=error)
