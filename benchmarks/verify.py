"""The chain-of-thought verifier: catch rate on injected arithmetic errors, false-flag rate on correct solutions.

Part 1, synthetic (`opengpt.eval.worked_solutions`): N correct GSM8K-style worked solutions in four
styles (annotations, prose equations, operator words, chains) and, for each, a copy with one step's
result made wrong (six kinds of slip, the wrong value carried into later steps). Reported:
* catch rate: corrupted solutions the verifier flags, overall and per error kind and style;
* localisation: flagged at the corrupted step (its first wrong claim lies on that step's line);
* false-flag rate: correct solutions flagged; coverage: the share of steps whose claim was checked.

Part 2, the model's own reasoning (`--model`, default the embedded SmolLM2-135M-Instruct, greedy):
`VerifiedSolver` on the first M problems: how many calculations the model writes, how many are
wrong, and final-answer accuracy before and after repair from the first wrong step.

    python benchmarks/verify.py                      # 1000 solutions, 20 problems through the model
    python benchmarks/verify.py --model-problems 0   # the synthetic part only
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from fractions import Fraction

from common import conditions, write_json

from opengpt.assist.verify import VerifiedSolver, check, final_answer
from opengpt.eval.worked_solutions import ERRORS, STYLES, corrupt, make_set


def _flagged_at(sol, v) -> bool:
    w = v.first_wrong
    if w is None:
        return False
    start = sol.text.index(sol.lines[sol.wrong_step])
    return start <= w.claim.start < start + len(sol.lines[sol.wrong_step])


def synthetic(n: int, seed: int) -> dict:
    sols = make_set(n, seed)
    rng = random.Random(seed + 1)
    bad = [corrupt(s, rng, ERRORS[i % len(ERRORS)]) for i, s in enumerate(sols)]
    t = time.perf_counter()
    good_v = [check(s.text) for s in sols]
    bad_v = [check(s.text) for s in bad]
    per_solution_ms = (time.perf_counter() - t) / (2 * n) * 1e3
    caught, at, flags = Counter(), Counter(), Counter()
    for s, v in zip(bad, bad_v):
        caught[s.error] += not v.ok
        caught[s.style] += not v.ok
        at[s.error] += _flagged_at(s, v)
    for s, v in zip(sols, good_v):
        flags[s.style] += not v.ok
    steps = sum(len(s.lines) for s in sols)
    kinds = Counter(s.error for s in bad)
    styles = Counter(s.style for s in bad)
    return {
        "solutions": n, "corrupted": len(bad),
        "catch_rate": sum(not v.ok for v in bad_v) / n,
        "localised_rate": sum(_flagged_at(s, v) for s, v in zip(bad, bad_v)) / n,
        "false_flag_rate": sum(not v.ok for v in good_v) / n,
        "claims_checked_per_step": sum(v.checked for v in good_v) / steps,
        "catch_rate_by_error": {k: caught[k] / kinds[k] for k in ERRORS},
        "localised_by_error": {k: at[k] / kinds[k] for k in ERRORS},
        "catch_rate_by_style": {k: caught[k] / styles[k] for k in STYLES},
        "false_flags_by_style": {k: flags[k] for k in STYLES},
        "check_ms_per_solution": per_solution_ms,
    }


def _same(answer: str, truth: str) -> bool:
    def num(s):
        s = s.replace("$", "").replace(",", "").strip().rstrip(".")
        return Fraction(s)
    try:
        return abs(num(final_answer(answer)) - num(truth)) < Fraction(1, 100)
    except (ValueError, ZeroDivisionError):
        return False


def with_model(model: str, n: int, seed: int, max_new_tokens: int) -> dict:
    from opengpt import LLM
    from opengpt.assist.backend import LocalBackend

    llm = LLM.load(model)
    backend = LocalBackend(llm, max_new_tokens=max_new_tokens)
    problems = make_set(n, seed + 2)
    rows, t = [], time.perf_counter()
    for p in problems:
        r = VerifiedSolver(backend, max_repairs=2).solve(p.question)
        first = check(r.attempts[0])
        rows.append({"question": p.question, "truth": p.answer, "first_reply": r.attempts[0],
                     "first_claims": len(first.checks), "first_checked": first.checked, "first_wrong": len(first.wrong),
                     "first_correct": _same(r.attempts[0], p.answer), "repairs": r.repairs, "verified": r.verified,
                     "final_answer": r.answer, "final_correct": _same(r.answer, p.answer), "flag": r.flag})
    claims = sum(r["first_checked"] for r in rows)
    return {
        "model": model, "problems": n, "max_new_tokens": max_new_tokens, "seconds": time.perf_counter() - t,
        "claims_checked": claims, "claims_wrong": sum(r["first_wrong"] for r in rows),
        "replies_with_a_wrong_claim": sum(r["first_wrong"] > 0 for r in rows),
        "accuracy_without_verification": sum(r["first_correct"] for r in rows) / n,
        "accuracy_with_repair": sum(r["final_correct"] for r in rows) / n,
        "verified_share": sum(r["verified"] for r in rows) / n,
        "repairs": sum(r["repairs"] for r in rows),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="synthetic worked solutions (each also corrupted once)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the numbers and the injected errors")
    ap.add_argument("--model", default="default", help="model whose own reasoning is checked (part 2)")
    ap.add_argument("--model-problems", type=int, default=20, help="problems for part 2; 0 skips it")
    ap.add_argument("--max-new-tokens", type=int, default=200, help="tokens per model reply in part 2")
    ap.add_argument("--out", default="benchmarks/results/verify.json", help="where the JSON goes")
    args = ap.parse_args()
    result = {"conditions": conditions(), "synthetic": synthetic(args.n, args.seed)}
    s = result["synthetic"]
    print(f"synthetic: catch {s['catch_rate']:.3f}, localised {s['localised_rate']:.3f}, "
          f"false flags {s['false_flag_rate']:.3f}, {s['check_ms_per_solution']:.2f} ms/solution")
    if args.model_problems:
        m = result["model"] = with_model(args.model, args.model_problems, args.seed, args.max_new_tokens)
        print(f"model: {m['claims_checked']} claims, {m['claims_wrong']} wrong; accuracy "
              f"{m['accuracy_without_verification']:.2f} -> {m['accuracy_with_repair']:.2f} with repair")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
