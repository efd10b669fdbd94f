"""The calculator tool: exact arithmetic over a whitelisted subset of Python expression syntax.

`calculate(expr)` returns the result as text; `evaluate(expr)` returns the exact SymPy value, for
checks that compare values. The text is parsed with `ast.parse(mode="eval")` and walked here node
by node: numbers, + - * / // % **, unary + and -, parentheses, the constants pi and e, and the
functions in `FUNCTIONS` with positional arguments. Anything else is refused with a
`CalculatorError` naming the construct and listing what is allowed. Values are SymPy objects built
from that walk alone, never by eval, exec or sympify (which runs eval on strings), so 0.1 + 0.2 is
exactly 3/10 and sqrt(2) stays sqrt(2).

Human notation rewritten before parsing (`normalise`):
* "^" -> "**";  "×" and "·" -> "*";  "÷" -> "/";  "−" (U+2212) -> "-"
* "N% of " -> "(N/100)*", binding like a product: "17.5% of 2480" is 434; any other % is modulo
* thousands separators, "2,480" -> 2480, only where every group after a comma has three digits and
  the text would otherwise be a tuple; "max(2,480)" keeps its two arguments

Semantics are Python's where Python is exact (// and % floor: -7 // 2 == -4, -7 % 2 == 1; round()
ties to even, on the exact value) and exact mathematics where Python would use floats (1/3 is 1/3,
decimal literals are exact). Results must be real and finite: sqrt(-1), log(0), tan(pi/2) are refused.

Output (`format_value`):
* an integer: "434"; a rational whose decimal ends within 50 places: "0.3", "-2.125"
* another rational: "1/3 ≈ 0.333333333333333" (15 significant digits)
* anything else: SymPy's exact form and an approximation, "sqrt(2) ≈ 1.41421356237310" (e prints as E),
  or the approximation alone, "≈ -0.775621886937053", where the form holds an integer too long to print

Bounds against resource attacks: input <= 1000 characters, <= 1000 syntax nodes nested <= 200 deep
(function calls <= 20 deep: symbolic towers like sin(sin(...)) cost quadratically to check), number
literals <= 500 digits, |exponent| <= 10000 with the result's size estimated by log10 before a
power is computed (2**10**10 is refused at once), factorial(n) n <= 1000, exp(x) |x| <= 23025, every
intermediate result <= 10000 digits; and two limits on SymPy's own work: the numbers under roots
<= 200 digits in all (it factors them; an exact root of a larger one is taken directly), and
floor/ceil/round/ // / % of an irrational value <= 100 digits.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

import mpmath
import sympy
from sympy.core.evalf import PrecisionExhausted

MAX_CHARS, MAX_NODES, MAX_DEPTH, MAX_CALL_DEPTH = 1000, 1000, 200, 20
MAX_LITERAL_DIGITS, MAX_EXPONENT, MAX_DIGITS, MAX_FACTORIAL = 500, 10_000, 10_000, 1000
MAX_RADICAND_DIGITS = 200  # SymPy factors the numbers under roots to simplify them
MAX_INTEGER_PART_DIGITS = 100  # floor and friends of an irrational x evaluate x to this many digits
MAX_DECIMALS = 50  # a longer terminating decimal prints as a fraction instead
APPROX_DIGITS = 15
_LOG10_2 = math.log10(2)
_CHUNK_DIGITS = 4000  # str(int) refuses more than 4300 digits (Python 3.11+); results may have 10000
_CHUNK = 10**_CHUNK_DIGITS


class CalculatorError(ValueError):
    """The expression was refused or has no real, finite value; the message says why."""


def _ints(name: str, args: list[sympy.Expr]) -> list[int]:
    if not all(a.is_Integer for a in args):
        raise CalculatorError(f"{name} needs integer arguments")
    return [int(a) for a in args]


def _factorial(n: sympy.Expr) -> sympy.Expr:
    (k,) = _ints("factorial", [n])
    if not 0 <= k <= MAX_FACTORIAL:
        raise CalculatorError(f"factorial needs an integer n with 0 <= n <= {MAX_FACTORIAL}")
    return sympy.Integer(math.factorial(k))


def _binomial(n: sympy.Expr, k: sympy.Expr) -> sympy.Expr:
    n_, k_ = _ints("binomial", [n, k])
    if n_ < 0 or k_ < 0:
        raise CalculatorError("binomial needs non-negative integers")
    small = max(0, min(k_, n_ - k_))  # the result has about small * log10(n) digits
    if small * math.log10(max(n_, 2)) > MAX_DIGITS:
        raise CalculatorError(f"binomial result would have more than {MAX_DIGITS} digits")
    return sympy.Integer(math.comb(n_, k_))


def _digits(r: sympy.Rational) -> float:
    return max(abs(r.p).bit_length(), r.q.bit_length()) * _LOG10_2


def _floor(x: sympy.Expr, up: bool = False) -> sympy.Expr:
    """floor(x), or ceil(x) with up=True, refused where SymPy cannot settle it exactly."""
    if x.is_Rational:
        return sympy.Integer(-(-x.p // x.q) if up else x.p // x.q)
    if _log10_abs(x) > MAX_INTEGER_PART_DIGITS:
        raise CalculatorError(f"the integer part of an irrational number is limited to {MAX_INTEGER_PART_DIGITS} "
                              "digits")
    result = sympy.ceiling(x) if up else sympy.floor(x)
    if not result.is_Integer:  # SymPy gives up (an unevaluated floor) on values very close to an integer
        raise CalculatorError("could not settle the integer part: the value is too close to an integer")
    return result


def _round(x: sympy.Expr, ndigits: sympy.Expr = sympy.Integer(0)) -> sympy.Expr:
    (places,) = _ints("round's second argument", [ndigits])
    if abs(places) > MAX_DIGITS:
        raise CalculatorError(f"round keeps at most {MAX_DIGITS} digits")
    scale = sympy.Integer(10) ** places
    r = _floor(x * scale)
    rest = x * scale - r  # an irrational value is never exactly halfway: == only matters for rationals
    if bool(rest > sympy.Rational(1, 2)) or (rest == sympy.Rational(1, 2) and r % 2 == 1):
        r += 1
    return r / scale


def _log(x: sympy.Expr, base: sympy.Expr | None = None) -> sympy.Expr:
    # Checked here, not left to SymPy: log(8, 0) comes back from it as 0 (log(8) / zoo).
    if x.is_positive is False:
        raise CalculatorError("log needs a positive argument")
    if base is not None and (base.is_positive is False or base == 1):
        raise CalculatorError("the base of a log must be positive and not 1")
    return sympy.log(x) if base is None else sympy.log(x, base)


def _exp(x: sympy.Expr) -> sympy.Expr:
    if _log10_abs(x) > math.log10(MAX_DIGITS * math.log(10)):
        raise CalculatorError(f"exp(x) needs |x| <= {int(MAX_DIGITS * math.log(10))}")
    return sympy.exp(x)


# name -> (fewest arguments, most arguments or None for any number, implementation)
FUNCTIONS: dict[str, tuple[int, int | None, Callable[..., sympy.Expr]]] = {
    "sqrt": (1, 1, lambda x: _power(x, sympy.Rational(1, 2))),
    "cbrt": (1, 1, lambda x: sympy.sign(x) * _power(abs(x), sympy.Rational(1, 3))),  # real: cbrt(-8) == -2
    "abs": (1, 1, sympy.Abs), "round": (1, 2, _round),
    "floor": (1, 1, _floor), "ceil": (1, 1, lambda x: _floor(x, up=True)),
    "exp": (1, 1, _exp), "log": (1, 2, _log), "ln": (1, 1, _log),
    "log10": (1, 1, lambda x: _log(x, sympy.Integer(10))), "log2": (1, 1, lambda x: _log(x, sympy.Integer(2))),
    **{name: (1, 1, getattr(sympy, name)) for name in ("sin", "cos", "tan", "asin", "acos", "atan")},
    "factorial": (1, 1, _factorial), "binomial": (2, 2, _binomial),
    "gcd": (1, None, lambda *a: sympy.Integer(math.gcd(*_ints("gcd", list(a))))),
    "lcm": (1, None, lambda *a: sympy.Integer(math.lcm(*_ints("lcm", list(a))))),
    "min": (1, None, sympy.Min), "max": (1, None, sympy.Max),
}
CONSTANTS: dict[str, sympy.Expr] = {"pi": sympy.pi, "e": sympy.E}
ALLOWED = (
    "allowed are numbers, + - * / // % ** (^ also means **), parentheses, the constants pi and e, "
    f"and the functions {', '.join(FUNCTIONS)}"
)
_REFUSED = {
    ast.Attribute: "attribute access", ast.Subscript: "indexing",
    ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension", ast.GeneratorExp: "a comprehension", ast.List: "a list",
    ast.Tuple: "a tuple (a comma outside a function call; thousands separators need groups of 3 digits)",
    ast.Set: "a set", ast.Dict: "a dict", ast.Compare: "a comparison", ast.BoolOp: "and/or",
    ast.NamedExpr: "assignment (:=)", ast.IfExp: "a conditional expression",
    ast.Starred: "a starred argument", ast.JoinedStr: "an f-string",
}
_CONSTANT_KINDS = {str: "a string", bytes: "bytes", bool: "True/False", complex: "a complex number"}
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_SYMBOLS = {ast.BitAnd: "&", ast.BitOr: "|", ast.BitXor: "^", ast.LShift: "<<", ast.RShift: ">>",
            ast.MatMult: "@", ast.Not: "not", ast.Invert: "~"}
_TRANSLATE = str.maketrans({"^": "**", "×": "*", "·": "*", "÷": "/", "−": "-"})
_PERCENT_OF = re.compile(r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)\s*%\s*of\b", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<![\w.])\d{1,3}(?:,\d{3})+(?!\w)")
_FLOAT = re.compile(r"(\d*)(?:\.(\d*))?(?:e([+-]?\d+))?")
_PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError)


def _refuse(what: str) -> CalculatorError:
    return CalculatorError(f"{what} is not allowed; {ALLOWED}")


def normalise(expr: str) -> str:
    """Rewrite the human notations listed in the module docstring into Python syntax."""
    text = _PERCENT_OF.sub(lambda m: f"({m[1].replace(',', '')}/100)*", expr.translate(_TRANSLATE))
    joined = _THOUSANDS.sub(lambda m: m[0].replace(",", ""), text)
    if joined != text:
        try:
            if isinstance(ast.parse(text, mode="eval").body, ast.Tuple):
                return joined
        except _PARSE_ERRORS:
            pass
    return text


def _check(node: ast.AST, depth: int, calls: int, seen: list[int]) -> None:
    """Refuse every construct outside the whitelist before anything is computed."""
    seen[0] += 1
    if depth > MAX_DEPTH or calls > MAX_CALL_DEPTH:
        raise CalculatorError(f"the expression is nested too deeply (at most {MAX_DEPTH} levels, "
                              f"{MAX_CALL_DEPTH} for function calls)")
    if seen[0] > MAX_NODES:
        raise CalculatorError(f"the expression has too many parts (more than {MAX_NODES})")
    children: list[ast.AST] = []
    match node:
        case ast.Expression(body=body):
            children = [body]
        case ast.Constant(value=value):
            if type(value) not in (int, float):  # type(), not isinstance: bool is an int
                raise _refuse(_CONSTANT_KINDS.get(type(value), repr(value)))
        case ast.BinOp(op=op, left=left, right=right) if isinstance(op, _BINOPS):
            children = [left, right]
        case ast.UnaryOp(op=ast.UAdd() | ast.USub(), operand=operand):
            children = [operand]
        case ast.BinOp(op=op) | ast.UnaryOp(op=op):
            raise _refuse(f"the operator {_SYMBOLS.get(type(op), type(op).__name__)}")
        case ast.Name(id=name) if name not in CONSTANTS:
            if name in FUNCTIONS:
                raise CalculatorError(f"{name} is a function; call it as {name}(x)")
            raise CalculatorError(f"unknown name {name!r} (there are no variables); {ALLOWED}")
        case ast.Name():
            pass
        case ast.Call(func=func, args=args, keywords=keywords):
            if not isinstance(func, ast.Name):
                _check(func, depth + 1, calls, seen)
                raise _refuse("calling anything but a named function")
            if func.id not in FUNCTIONS:
                raise CalculatorError(f"unknown function {func.id!r}; {ALLOWED}")
            if keywords:
                raise _refuse("a keyword argument")
            for arg in args:
                _check(arg, depth + 1, calls + 1, seen)
            low, high, _ = FUNCTIONS[func.id]
            if not low <= len(args) <= (high or len(args)):
                counts = f"{low}" if low == high else f"{low} or {high}" if high else f"at least {low}"
                raise CalculatorError(f"{func.id} takes {counts} argument(s), got {len(args)}")
        case _:
            raise _refuse(_REFUSED.get(type(node), type(node).__name__))
    for child in children:
        _check(child, depth + 1, calls, seen)


def _log10_abs(x: sympy.Expr) -> float:
    if x.is_zero:
        return -math.inf
    if x.is_Rational:
        return math.log10(abs(x.p)) - math.log10(x.q)
    approx = abs(sympy.N(x, APPROX_DIGITS))
    return -math.inf if approx == 0 else float(mpmath.log10(approx))


def _literal(source: str, value: int | float) -> sympy.Expr:
    too_long = CalculatorError(f"number literals are limited to {MAX_LITERAL_DIGITS} digits")
    if isinstance(value, int):
        if value.bit_length() * _LOG10_2 > MAX_LITERAL_DIGITS:
            raise too_long
        return sympy.Integer(value)
    # The float node has already lost digits (0.1 is 0.1000000000000000055...), so a decimal is
    # read again from its source text, as an exact rational.
    whole, frac, exp_text = _FLOAT.fullmatch(source.replace("_", "").lower()).groups("")
    exponent = int(exp_text[:7] or 0)  # [:7]: never int() a huge exponent text
    if len(whole + frac) > MAX_LITERAL_DIGITS or abs(exponent) > MAX_LITERAL_DIGITS:
        raise too_long
    return sympy.Integer(int(whole + frac or "0")) * sympy.Integer(10) ** (exponent - len(frac))


def _radicand_digits(x: sympy.Expr) -> float:
    # SymPy simplifies a root by factoring the number under it, and a product of roots by factoring
    # the product of those numbers: minutes at a few thousand digits. Hence a bound on their total.
    return sum(_digits(p.base) for p in x.atoms(sympy.Pow) if p.base.is_Rational and not p.exp.is_Integer)


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    if base.is_zero and exponent.is_negative:
        raise CalculatorError("division by zero")
    if _log10_abs(exponent) > math.log10(MAX_EXPONENT):
        raise CalculatorError(f"exponent too large: |exponent| must be at most {MAX_EXPONENT}")
    if base.is_Rational:  # (p/q)**n writes out both p**n and q**n
        weight = max(_log10_abs(sympy.Integer(base.p)), math.log10(base.q), 0.0)
    else:
        weight = abs(_log10_abs(base))
    if abs(float(exponent)) * weight > MAX_DIGITS:
        raise CalculatorError(f"the power would have more than {MAX_DIGITS} digits")
    if exponent.is_Integer:
        return base**exponent
    if base.is_Rational and base > 0 and exponent.is_Rational:  # an exact root needs no factoring
        (p, p_exact), (q, q_exact) = (sympy.integer_nthroot(n, exponent.q) for n in (base.p, base.q))
        if p_exact and q_exact:
            return sympy.Rational(p, q) ** exponent.p
    if sum(_digits(r) for r in base.atoms(sympy.Rational)) > MAX_RADICAND_DIGITS:
        raise CalculatorError(f"the numbers under roots are limited to {MAX_RADICAND_DIGITS} digits in all")
    return base**exponent


def _binop(op: ast.operator, a: sympy.Expr, b: sympy.Expr) -> sympy.Expr:
    if isinstance(op, ast.Pow):
        return _power(a, b)
    if isinstance(op, (ast.Mult, ast.Div)) and _radicand_digits(a) + _radicand_digits(b) > MAX_RADICAND_DIGITS:
        raise CalculatorError(f"the numbers under roots are limited to {MAX_RADICAND_DIGITS} digits in all")
    if isinstance(op, (ast.Add, ast.Sub, ast.Mult)):
        return {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}[type(op)](a, b)
    if b.is_zero:
        raise CalculatorError("division by zero")
    if isinstance(op, ast.Div):
        return a / b
    quotient = _floor(a / b)
    return quotient if isinstance(op, ast.FloorDiv) else a - b * quotient  # Python's %: sign of the divisor


def _checked(value: sympy.Expr, text: str, node: ast.AST) -> sympy.Expr:
    where = ast.get_source_segment(text, node) or "the expression"
    where = where if len(where) <= 60 else where[:57] + "..."
    if value.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo):
        raise CalculatorError(f"{where} is undefined")
    # SymPy often cannot say whether a power like (-3)**pi is real; the numeric value can.
    if value.is_extended_real is False or (not value.is_Rational and sympy.N(value, APPROX_DIGITS).has(sympy.I)):
        raise CalculatorError(f"{where} is not a real number")
    if (_digits(value) if value.is_Rational else _log10_abs(value)) > MAX_DIGITS:
        raise CalculatorError(f"{where} is too large (more than {MAX_DIGITS} digits)")
    return value


def _value(node: ast.AST, text: str) -> sympy.Expr:
    match node:
        case ast.Expression(body=body):
            return _value(body, text)
        case ast.Constant(value=value):
            return _literal(ast.get_source_segment(text, node) or "", value)
        case ast.Name(id=name):
            return CONSTANTS[name]
        case ast.UnaryOp(op=op, operand=operand):
            inner = _value(operand, text)
            return -inner if isinstance(op, ast.USub) else inner
        case ast.BinOp(op=op, left=left, right=right):
            result = _binop(op, _value(left, text), _value(right, text))
        case ast.Call(func=ast.Name(id=name), args=args):
            result = FUNCTIONS[name][2](*(_value(a, text) for a in args))
    return _checked(result, text, node)


def evaluate(expr: str) -> sympy.Expr:
    """The exact value of `expr` as a SymPy number, or CalculatorError saying why there is none."""
    if not isinstance(expr, str):
        raise CalculatorError("the expression must be a string")
    if len(expr) > MAX_CHARS:
        raise CalculatorError(f"the expression is too long ({len(expr)} characters, at most {MAX_CHARS})")
    text = normalise(expr)
    try:
        tree = ast.parse(text, mode="eval")
    except _PARSE_ERRORS as err:
        reason = getattr(err, "msg", None) or str(err) or type(err).__name__
        hint = "; '%' is modulo, write a percentage as N/100 or 'N% of X'" if "%" in text else ""
        raise CalculatorError(f"could not parse the expression ({reason}){hint}; {ALLOWED}") from None
    _check(tree, 0, 0, [0])
    try:
        return _value(tree, text)
    except CalculatorError:
        raise
    except PrecisionExhausted:
        raise CalculatorError("could not decide the result: it is too close to an integer or a tie "
                              "to settle at the precision available") from None
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply to evaluate") from None
    except (ArithmeticError, TypeError, ValueError) as err:  # SymPy unable to decide, say
        raise CalculatorError(f"could not evaluate the expression ({str(err) or type(err).__name__})") from None


def _int_str(n: int) -> str:
    if abs(n) < _CHUNK:
        return str(n)
    high, low = divmod(abs(n), _CHUNK)
    return ("-" if n < 0 else "") + _int_str(high) + str(low).zfill(_CHUNK_DIGITS)


def _decimal(p: int, q: int) -> str | None:
    """p/q written out as a decimal if it ends within MAX_DECIMALS places, else None."""
    twos = (q & -q).bit_length() - 1
    rest, fives = q >> twos, 0
    while rest % 5 == 0 and fives <= MAX_DECIMALS:
        rest, fives = rest // 5, fives + 1
    places = max(twos, fives)
    if rest != 1 or places > MAX_DECIMALS:
        return None
    digits = _int_str(abs(p) * 10**places // q).rjust(places + 1, "0")
    return f"{'-' if p < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def format_value(value: sympy.Expr) -> str:
    """The text `calculate` returns for an exact value (formats in the module docstring)."""
    if value.is_Integer:
        return _int_str(value.p)
    if value.is_Rational and (decimal := _decimal(value.p, value.q)) is not None:
        return decimal
    approx = sympy.N(value, APPROX_DIGITS)
    try:
        exact = f"{_int_str(value.p)}/{_int_str(value.q)}" if value.is_Rational else sympy.sstr(value)
    except ValueError:  # a symbolic form holding an integer too long for str()
        return f"≈ {approx}"
    return f"{exact} ≈ {approx}"


def calculate(expr: str) -> str:
    """Evaluate an arithmetic expression exactly; the result as text, or CalculatorError."""
    return format_value(evaluate(expr))
