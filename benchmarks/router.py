"""Cost routing (opengpt.assist.router) on a mixed easy / hard set, with real backends built from the one
model there is offline (SmolLM2-135M-Instruct).

Tiers, cheapest first (prices per 1k prompt / completion tokens are stand-ins for a small and a large
model, in the ratio of gpt-4o-mini to gpt-4o):
* `direct`: the model answers the question itself, greedy, 32 new tokens. 0.15 / 0.6.
* `calculator`: the same model plus the exact calculator: a few-shot prompt asks it to rewrite the
  question as one arithmetic expression (copying numbers is within a 135M model's reach, multiplying
  them is not), the calculator evaluates it and the reply is "The answer is X."; when the expression does
  not evaluate (a factual question, a garbled copy) it answers directly, as `direct` does (greedy on the
  same prompt gives the same text, so that reply is reused and its tokens are charged to this tier
  too). More tokens (the few-shot prompt) at a higher price: 2.5 / 10.
  The tool loop (`Agent` with a forced calculator call) was tried first: this model fills the forced
  call with text like "347 * 29 = 844.22, ..." and the calculator rejects it, so that tier is no
  stronger than `direct` here.
* with --int8: `int8`, the model with int8 weights (`LLM.load(quantize="int8")`) answering directly,
  as the cheapest of three tiers (0.075 / 0.3), to exercise the N-tier split.

Tasks (exact, checkable answers): arithmetic of graded difficulty (one-digit sums up to 3-digit
products, percentages, divisions, two-operator expressions), one-step word problems, and easy
factual / chit-chat questions. A reply is correct when the expected number is among the numbers it
writes (thousands separators folded), or for words when one of the accepted words occurs in it.

Labels: 1 where the cheapest tier answered wrongly. The scorer (hand-made features, no hashed words:
the set is too small for them) is trained on the train split and written to
opengpt/assist/router_scorer.json; thresholds are calibrated on the train split for --strong-share;
everything reported is on the held-out split. Per-tier answers are cached in the results JSON:
--reuse skips generation and reruns only the scorer and routing.

    python benchmarks/router.py [--strong-share 0.5] [--int8] [--reuse] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import conditions, write_json

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks/results/router.json"
PRICES = {"int8": (0.075, 0.3), "direct": (0.15, 0.6), "calculator": (2.5, 10.0)}
MAX_TOKENS = 32
FEW_SHOT = [("What is 23 + 58?", "23 + 58"), ("A book costs $7. What do 6 books cost?", "7 * 6"),
            ("What is 12% of 350?", "12% of 350"), ("What is 144 divided by 12?", "144 / 12"),
            ("Tom has 40 apples and gives away 15. How many are left?", "40 - 15"),
            ("What is 9 times 8 minus 4?", "9 * 8 - 4")]
FACTS = [("What is the capital of France?", ["paris"]), ("What is the capital of Japan?", ["tokyo"]),
         ("What is the capital of Italy?", ["rome"]), ("What is the capital of Germany?", ["berlin"]),
         ("What is the capital of Spain?", ["madrid"]), ("What is the capital of England?", ["london"]),
         ("What color is the sky on a clear day?", ["blue"]), ("What color is grass?", ["green"]),
         ("How many days are there in a week?", ["7", "seven"]), ("How many legs does a spider have?", ["8", "eight"]),
         ("What is the opposite of hot?", ["cold"]), ("What is the opposite of up?", ["down"]),
         ("What animal says meow?", ["cat"]), ("What animal barks?", ["dog"]),
         ("What do bees make?", ["honey"]), ("What is frozen water called?", ["ice"]),
         ("Which planet do we live on?", ["earth"]), ("What is the largest ocean on Earth?", ["pacific"]),
         ("Say hello to me.", ["hello", "hi"]), ("How many hours are in a day?", ["24", "twenty-four"]),
         ("What language is spoken in Brazil?", ["portuguese"]), ("What gas do humans breathe in to live?", ["oxygen"]),
         ("Who wrote Romeo and Juliet?", ["shakespeare"]), ("What is the color of snow?", ["white"])]


def tasks(seed: int) -> list[dict]:
    """The mixed set, shuffled; each {id, kind, question, answer: [accepted strings], numeric}."""
    rng = random.Random(seed)
    out = []

    def add(kind, q, a, numeric=True):
        out.append({"kind": kind, "question": q, "answer": [a] if isinstance(a, str) else a, "numeric": numeric})

    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    for _ in range(10):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        add("add_1digit", f"What is {a} + {b}?", fmt(a + b))
    for _ in range(8):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        add("add_2digit", f"What is {a} + {b}?", fmt(a + b))
    for _ in range(6):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        add("mul_1digit", f"What is {a} times {b}?", fmt(a * b))
    for _ in range(8):
        a, b = rng.randint(100, 999), rng.randint(11, 99)
        add("mul_3x2", f"What is {a} * {b}?", fmt(a * b))
    for _ in range(6):
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        add("add_4digit", f"What is {a} + {b}?", fmt(a + b))
    for _ in range(6):
        p, n = rng.choice((5, 10, 15, 20, 25, 30)), rng.randint(2, 40) * 20
        add("percent", f"What is {p}% of {n}?", fmt(p * n / 100))
    for _ in range(6):
        b, q = rng.randint(3, 19), rng.randint(12, 60)
        add("divide", f"What is {b * q} divided by {b}?", fmt(q))
    for _ in range(6):
        a, b, c = rng.randint(11, 40), rng.randint(3, 12), rng.randint(5, 99)
        add("two_ops", f"What is {a} * {b} + {c}?", fmt(a * b + c))
    items = [("pen", "pens"), ("ticket", "tickets"), ("cake", "cakes"), ("shirt", "shirts")]
    for _ in range(8):
        (one, many), p, n = rng.choice(items), rng.randint(3, 19), rng.randint(6, 48)
        add("word_problem", f"A {one} costs ${p}. What do {n} {many} cost?", fmt(p * n))
    for q, a in FACTS:
        add("fact", q, a, numeric=False)
    rng.shuffle(out)
    for i, t in enumerate(out):
        t["id"] = i
    return out


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def correct(task: dict, reply: str) -> bool:
    if task["numeric"]:
        got = {n.replace(",", "").rstrip(".") for n in _NUM.findall(reply)}
        got |= {f"{float(n):g}" for n in got if n not in ("-",)}
        return any(a in got for a in task["answer"])
    low = reply.lower()
    return any(re.search(rf"\b{re.escape(a)}\b", low) for a in task["answer"])


def messages(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def direct_answers(llm, questions: list[str]) -> list[dict]:
    """The model's own replies, one batched engine run; token counts as charged."""
    from opengpt.assist.backend import LocalBackend
    from opengpt.engine.sampler import SamplingParams

    b = LocalBackend(llm, temperature=0.0, max_new_tokens=MAX_TOKENS)
    prompts = [b.prompt(messages(q)) for q in questions]
    texts = llm.generate_batch(prompts, SamplingParams(temperature=0.0, max_new_tokens=MAX_TOKENS))
    tok = llm.tokenizer
    return [{"text": t, "prompt_tokens": len(p), "completion_tokens": min(MAX_TOKENS, len(tok.encode(t)) + 1)}
            for p, t in zip(prompts, texts)]


def calculator_answers(llm, questions: list[str], direct: list[dict]) -> list[dict]:
    """Expression by few-shot prompt (batched), value by the calculator; direct reply where it fails."""
    from opengpt.assist.backend import LocalBackend
    from opengpt.assist.tools.calculator import calculate
    from opengpt.engine.sampler import SamplingParams

    system = ("Rewrite the question as one arithmetic expression using the numbers in the question. "
              "Reply with the expression only. If the question has no arithmetic, reply NONE.")
    shots = []
    for q, e in FEW_SHOT + [("What is the capital of Peru?", "NONE")]:
        shots += [{"role": "user", "content": q}, {"role": "assistant", "content": e}]
    b = LocalBackend(llm, temperature=0.0, max_new_tokens=24)
    prompts = [b.prompt([{"role": "system", "content": system}, *shots, *messages(q)]) for q in questions]
    texts = llm.generate_batch(prompts, SamplingParams(temperature=0.0, max_new_tokens=24, stop=["\n"]))
    out = []
    for p, t, d in zip(prompts, texts, direct):
        used = {"prompt_tokens": len(p), "completion_tokens": len(llm.tokenizer.encode(t)) + 1}
        expr = t.strip().rstrip("?.=").strip()
        try:
            value = calculate(expr) if expr and expr.upper() != "NONE" else None
        except Exception:  # noqa: BLE001 - any failure to evaluate means: answer directly
            value = None
        if value is not None and "≈" not in value:
            text = f"{expr} = {value}. The answer is {value}."
        else:
            text = d["text"]
            used = {k: used[k] + d[k] for k in used}
        out.append({"text": text, "expression": t.strip(), **used})
    return out


def auc(scores: np.ndarray, y: np.ndarray) -> float | None:
    pos, neg = scores[y == 1], scores[y == 0]
    if not len(pos) or not len(neg):
        return None
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


class CachedClient:
    """A router client that answers from the cached replies of one tier (keyed by question)."""

    def __init__(self, replies: dict[str, dict], model: str):
        self.replies, self.model = replies, model

    def chat(self, body: dict) -> dict:
        from opengpt.assist.router import completion

        r = self.replies[body["messages"][-1]["content"]]
        return completion(self.model, {"role": "assistant", "content": r["text"]}, "stop",
                          {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"]})


def evaluate(tiers: list[str], answers: dict, train: list[dict], test: list[dict], strong_share: float,
             save_scorer: Path | None) -> dict:
    from opengpt.assist.router import BackendSpec, ComplexityScorer, Router, RouterConfig

    cheap, strong = tiers[0], tiers[-1]
    ok = {t: {int(k): v["correct"] for k, v in answers[t].items()} for t in tiers}
    scorer = ComplexityScorer(n_hash=0)
    X = np.stack([scorer.features(messages(t["question"])) for t in train])
    y = np.array([0.0 if ok[cheap][t["id"]] else 1.0 for t in train])
    scorer.fit(X, y)
    scorer.meta = {"trained_by": "benchmarks/router.py", "label": f"1 = the {cheap} tier (SmolLM2-135M-Instruct "
                   "answering directly) got the answer wrong", "train_prompts": len(train),
                   "train_failure_rate": float(y.mean())}
    if save_scorer:
        scorer.save(save_scorer)
    specs = [BackendSpec(t, "local", "default", cost_per_1k_prompt=PRICES[t][0], cost_per_1k_completion=PRICES[t][1])
             for t in tiers]
    by_q = {t: {next(x["question"] for x in train + test if x["id"] == int(k)): v for k, v in answers[t].items()}
            for t in tiers}
    router = Router(RouterConfig(specs), scorer, clients={t: CachedClient(by_q[t], t) for t in tiers})
    calib = router.calibrate([messages(t["question"]) for t in train], strong_share)
    routed_ok, cost, chosen = [], 0.0, []
    for t in test:
        _, d = router.chat({"model": "router", "messages": messages(t["question"])})
        routed_ok.append(ok[d.backend][t["id"]])
        cost += d.cost
        chosen.append(d.backend)

    def tier_cost(name: str, items: list[dict]) -> float:
        p, c = PRICES[name]
        return sum(answers[name][str(t["id"])]["prompt_tokens"] * p + answers[name][str(t["id"])]["completion_tokens"] * c
                   for t in items) / 1000

    acc = {f"always_{n}": float(np.mean([ok[n][t["id"]] for t in test])) for n in tiers}
    oracle = [ok[cheap][t["id"]] or ok[strong][t["id"]] for t in test]
    strong_cost = tier_cost(strong, test)
    test_scores = np.array([scorer.score(messages(t["question"])) for t in test])
    y_test = np.array([0 if ok[cheap][t["id"]] else 1 for t in test])
    sweep = []
    for share in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        router.calibrate([messages(t["question"]) for t in train], share)
        picks = [router.choose(messages(t["question"])).backend for t in test]
        got = float(np.mean([ok[b][t["id"]] for b, t in zip(picks, test)]))
        real = {n: picks.count(n) / len(test) for n in tiers}
        # random routing with the same shares: the share-weighted mean of each tier's accuracy and cost
        rand_acc = sum(real[n] * acc[f"always_{n}"] for n in tiers)
        rand_cost = sum(real[n] * tier_cost(n, test) for n in tiers)
        sweep.append({"target_strong_share": share, "real_share": real, "accuracy": got,
                      "random_routing_accuracy": rand_acc,
                      "quality_kept": got / acc[f"always_{strong}"],
                      "cost_ratio": sum(tier_cost(b, [t]) for b, t in zip(picks, test)) / strong_cost,
                      "random_routing_cost_ratio": rand_cost / strong_cost})
    return {
        "tiers": tiers, "prices_per_1k": {t: PRICES[t] for t in tiers}, "held_out_sweep": sweep,
        "calibration_on_train": calib,
        "held_out": {
            "prompts": len(test),
            "share": {n: chosen.count(n) / len(test) for n in tiers},
            "accuracy": {"routed": float(np.mean(routed_ok)), **acc, "oracle_cheap_or_strong": float(np.mean(oracle))},
            "quality_kept_vs_always_strong": float(np.mean(routed_ok)) / acc[f"always_{strong}"],
            "cost": {"routed": cost, **{f"always_{n}": tier_cost(n, test) for n in tiers}},
            "cost_ratio_vs_always_strong": cost / strong_cost,
            "scorer_auc_cheap_failure": auc(test_scores, y_test),
            "stats": router.stats(),
        },
        "scorer_weights": dict(zip(scorer.feature_names, map(float, scorer.weights))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strong-share", type=float, default=0.5, help="target share of the strongest tier")
    ap.add_argument("--train-share", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--int8", action="store_true", help="add the int8 model as a third, cheapest tier")
    ap.add_argument("--reuse", action="store_true", help="reuse the cached per-tier answers in --out")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--scorer-out", default=str(ROOT / "opengpt/assist/router_scorer.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cond = conditions()
    sys.path.insert(0, str(ROOT))
    from opengpt.api import LLM

    items = tasks(args.seed)
    questions = [t["question"] for t in items]
    cached = json.loads(Path(args.out).read_text()).get("answers", {}) if args.reuse and Path(args.out).exists() else {}
    answers = dict(cached)
    timing = json.loads(Path(args.out).read_text()).get("generation_s", {}) if cached else {}
    if "direct" not in answers or "calculator" not in answers:
        llm = LLM.load("default")
        t0 = time.perf_counter()
        direct = direct_answers(llm, questions)
        timing["direct_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        calc = calculator_answers(llm, questions, direct)
        timing["calculator_s"] = time.perf_counter() - t0
        answers["direct"] = {str(t["id"]): r for t, r in zip(items, direct)}
        answers["calculator"] = {str(t["id"]): r for t, r in zip(items, calc)}
    if args.int8 and "int8" not in answers:
        llm8 = LLM.load("default", quantize="int8")
        t0 = time.perf_counter()
        answers["int8"] = {str(t["id"]): r for t, r in zip(items, direct_answers(llm8, questions))}
        timing["int8_s"] = time.perf_counter() - t0
    for per in answers.values():
        for t in items:
            per[str(t["id"])]["correct"] = correct(t, per[str(t["id"])]["text"])

    n_train = int(len(items) * args.train_share)
    train, test = items[:n_train], items[n_train:]
    two = evaluate(["direct", "calculator"], answers, train, test, args.strong_share, Path(args.scorer_out))
    three = (evaluate(["int8", "direct", "calculator"], answers, train, test, args.strong_share, None)
             if "int8" in answers else None)
    kinds = sorted({t["kind"] for t in items})
    by_kind = {k: {n: float(np.mean([answers[n][str(t["id"])]["correct"] for t in items if t["kind"] == k]))
                   for n in answers} for k in kinds}
    result = {"conditions": cond, "model": "SmolLM2-135M-Instruct (default)", "max_tokens": MAX_TOKENS,
              "prompts": len(items), "train": len(train), "held_out": len(test), "strong_share_target": args.strong_share,
              "generation_s": timing, "accuracy_by_kind_all_prompts": by_kind, "two_tiers": two, "three_tiers": three,
              "tasks": items, "answers": answers}
    h = two["held_out"]
    print(f"{len(items)} prompts, train {len(train)}, held out {len(test)}")
    print("accuracy by kind:", json.dumps(by_kind))
    print(f"held out: share {h['share']}, accuracy {h['accuracy']}")
    print(f"quality kept {h['quality_kept_vs_always_strong']:.3f}, cost ratio {h['cost_ratio_vs_always_strong']:.3f}, "
          f"AUC {h['scorer_auc_cheap_failure']}")
    print("sweep (held out): target strong share -> real strong share, accuracy (random routing), cost ratio (random)")
    for r in two["held_out_sweep"]:
        print(f"  {r['target_strong_share']:.1f} -> {r['real_share']['calculator']:.2f}  acc {r['accuracy']:.3f} "
              f"({r['random_routing_accuracy']:.3f})  cost {r['cost_ratio']:.3f} ({r['random_routing_cost_ratio']:.3f})")
    print(f"calibration (train): target {two['calibration_on_train']['target_share']} "
          f"real {two['calibration_on_train']['real_share']}")
    if three:
        print(f"3 tiers held out: share {three['held_out']['share']}, accuracy {three['held_out']['accuracy']}, "
              f"cost ratio {three['held_out']['cost_ratio_vs_always_strong']:.3f}")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
