"""The chat result cache: how often a paraphrase hits, how often a near miss is served, lookup latency.

Pairs: benchmarks/data/cache_pairs.jsonl, one group per line, written by hand: a question `q`, two
paraphrases `p` (same meaning, reworded) and two near misses `n` (negation, changed number, changed
entity, antonym, swapped order, same words asking something else), each with its kind. A group gives
3 true pairs (q/p1, q/p2, p1/p2) and 3 near-miss pairs (q/n1, q/n2, p1/n1). For each pair the first
question is put into an empty cache and the second looked up.

Modes, at cosine thresholds 0.80 / 0.85 / 0.90 / 0.95: `raw` serves the best candidate on cosine
alone (what GPTCache-style caches do); `verified` is `Cache`, whose candidates pass `mismatch` first;
`align` / `pair` add the contextual check; `cross` is the rules then the trained cross-encoder
(opengpt/assist/cross_check.py, benchmarks/train_cross_check.py), `pair_cross` the rules, the pair
classifier, then the cross-encoder (Cache's default). The old modes run with cross_check=None.
Reported: hit rate on true pairs, and false hits as a share of all hits (near-miss pairs that hit).
Groups are split in two (alternating, groups marked `blind` left out): the threshold is chosen on the
first half (the lowest with false hits < 1% of hits there) and the figures at that threshold are
reported on the second half. Groups marked `"blind": true` (appended later, written before any rule
was run on them) are reported on their own at the same threshold. The
verification rules were written by the author of the pairs, who saw them: the held-out half guards
the threshold, not the rules. `--fit` trains the pair classifier on every group of FIT_FILES (the
held-out half and the spent blind files included), so the one test of it is a blind file written
after the fit (`--blind FILE`).

Latency: 100k entries in one context (the worst case: every lookup searches all of them), of which
the pair questions carry their real embeddings and the rest random unit vectors (embedding 100k texts
takes too long on this CPU); lookup = `Cache.get` on a paraphrase with its embedding precomputed.
The embedding of one query (all-MiniLM-L6-v2 on CPU) is timed on its own.

    python benchmarks/cache.py [--entries 100000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import conditions, group_texts, percentile, read_pair_groups, shown_path, write_json

ROOT = Path(__file__).resolve().parent.parent
THRESHOLDS = (0.80, 0.85, 0.90, 0.95)


class TableEmbedder:
    """Precomputed vectors by text; texts not in the table get a random unit vector fixed by a counter."""

    def __init__(self, table: dict[str, np.ndarray], dim: int, seed: int = 0, tokens: dict | None = None):
        self.table, self.dim, self.name = table, dim, "table"
        self.rng = np.random.default_rng(seed)
        self.tokens = tokens or {}

    def token_vectors(self, texts):
        return [self.tokens.get(t, np.zeros((0, self.dim), np.float32)) for t in texts]

    def embed_with_tokens(self, texts):
        return self.embed(texts), self.token_vectors(texts)

    def embed(self, texts):
        out = []
        for t in texts:
            v = self.table.get(t)
            if v is None:
                v = self.rng.standard_normal(self.dim).astype(np.float32)
                v /= np.linalg.norm(v)
            out.append(v)
        return np.stack(out)


def pairs(groups: list[dict]) -> tuple[list[tuple], list[tuple]]:
    true, near = [], []
    for g in groups:
        (p1, p2), (n1, n2) = g["p"], g["n"]
        true += [(g["q"], p1), (g["q"], p2), (p1, p2)]
        near += [(g["q"], n1[0], n1[1]), (g["q"], n2[0], n2[1]), (p1, n1[0], n1[1])]
    return true, near


MODES = {"raw": {"verify": False}, "verified": {"verify": True, "contextual": "off"},
         "align": {"verify": True, "contextual": "align"}, "pair": {"verify": True, "contextual": "pair"},
         # the trained cross-encoder (opengpt/assist/cross_check.safetensors) as the last stage: after the
         # rules alone ("cross"), or after the rules and the pair classifier ("pair_cross", Cache's default)
         "cross": {"verify": True, "contextual": "off", "cross_check": "default"},
         "pair_cross": {"verify": True, "contextual": "pair", "cross_check": "default"}}
FIT_COSINE = 0.70  # the pair classifier is trained on tune pairs at least this close (the candidate regime)
FIT_HIT_FLOOR = 0.31  # contextual thresholds: the strictest keeping this out-of-fold hit rate (target 30% + margin)
P_GRID = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
ALIGN_GRID = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55)


def features(cv, rows, table, tokens):
    """(X, y, group, cosine, rules pass) for (new, cached, label, group) rows."""
    X, y, g, cos, ok = [], [], [], [], []
    for new, cached, label, grp in rows:
        c = float(table[new] @ table[cached])
        rule = cv.mismatch(new, cached)
        X.append(cv.pair_features(new, cached, c, tokens[new], tokens[cached], rule))
        y.append(label), g.append(grp), cos.append(c), ok.append(rule is None)
    return np.array(X), np.array(y, float), np.array(g), np.array(cos), np.array(ok)


def fit_logistic(X, y, lam: float = 1.0):
    """L2-regularised logistic regression on standardised features (Newton's method)."""
    mu, sd = X.mean(0), X.std(0) + 1e-9
    Z = np.c_[(X - mu) / sd, np.ones(len(X))]
    w = np.zeros(Z.shape[1])
    reg = lam * np.r_[np.ones(X.shape[1]), 0.0]
    for _ in range(50):
        p = 1 / (1 + np.exp(-Z @ w))
        H = Z.T @ (Z * (p * (1 - p))[:, None]) + np.diag(reg)
        w -= np.linalg.solve(H, Z.T @ (p - y) + reg * w)
    return {"mean": mu.tolist(), "scale": sd.tolist(), "coef": w[:-1].tolist(), "intercept": float(w[-1])}


# The pair files `--fit` trains on, every group. blind5 (spent as a test, its figures under "blind5") is
# left out: with its free paraphrases in the pool no p on the grid keeps FIT_HIT_FLOOR and the fit falls
# to the loosest (0.5), and the shipped model stays the one blind5 measured.
FIT_FILES = ("cache_pairs", "cache_pairs_blind2", "cache_pairs_blind3", "cache_pairs_blind4")


def tune_rows(groups):
    """(new, cached, label, group) for every pair of the groups, new looked up against cached."""
    rows = []
    for i, g in enumerate(groups):
        (p1, p2), (n1, n2) = g["p"], g["n"]
        rows += [(b, a, 1, i) for a, b in ((g["q"], p1), (g["q"], p2), (p1, p2))]
        rows += [(b, a, 0, i) for a, b in ((g["q"], n1[0]), (g["q"], n2[0]), (p1, n1[0]))]
    return rows


def fit_contextual(cv, fit_groups, table, tokens, cosine_th: float = 0.80) -> dict:
    """Choose ALIGN_MIN and fit the pair classifier on `fit_groups` (every group of FIT_FILES). Both
    thresholds: the strictest on their grid whose hit rate (rules + contextual check, at `cosine_th`) stays
    >= FIT_HIT_FLOOR; the classifier's is read off out-of-fold probabilities (5 folds by group)."""
    X, y, g, cos, ok = features(cv, tune_rows(fit_groups), table, tokens)
    n_true = (y == 1).sum()
    hit = lambda acc: float((acc & (y == 1)).sum() / n_true)
    false = lambda acc: int((acc & (y == 0)).sum())
    base = (cos >= cosine_th) & ok
    align = {a: hit(base & (X[:, 1] >= a)) for a in ALIGN_GRID}
    align_min = max([a for a, h in align.items() if h >= FIT_HIT_FLOOR] or [min(ALIGN_GRID)])
    cand = cos >= FIT_COSINE
    oof = np.zeros(len(y))
    for f in range(5):
        te = (g % 5) == f
        m = fit_logistic(X[cand & ~te], y[cand & ~te])
        oof[te] = [cv.pair_probability(list(x), m) for x in X[te]]
    pair = {p: hit(base & (oof >= p)) for p in P_GRID}
    p_min = max([p for p, h in pair.items() if h >= FIT_HIT_FLOOR] or [min(P_GRID)])
    model = {"features": list(cv.FEATURES), **fit_logistic(X[cand], y[cand]), "p_min": p_min,
             "trained_on": f"every group of benchmarks/data/{{{','.join(FIT_FILES)}}}.jsonl ({len(fit_groups)}), "
                           f"pairs at cosine >= {FIT_COSINE}",
             "p_min_chosen": f"strictest of {list(P_GRID)} keeping the out-of-fold hit rate (rules + classifier, "
                             f"cosine {cosine_th}) >= {FIT_HIT_FLOOR}"}
    # Without the rules (how much each check catches on its own, at the chosen thresholds), on tune.
    alone = {"align_alone": {"hit_rate_true": hit((cos >= cosine_th) & (X[:, 1] >= align_min)),
                             "near_miss_hits": false((cos >= cosine_th) & (X[:, 1] >= align_min))},
             "pair_alone_oof": {"hit_rate_true": hit((cos >= cosine_th) & (oof >= p_min)),
                                "near_miss_hits": false((cos >= cosine_th) & (oof >= p_min))}}
    return {"align_min": align_min, "align_tune_hit_by_threshold": align, "p_min": p_min,
            "pair_tune_oof_hit_by_p": pair, "tune_without_rules": alone, "model": model}


def evaluate(Cache, emb, true, near, threshold: float, verify: bool = True, contextual: str = "off",
             cross_check=None) -> dict:
    req = lambda q: {"model": "m", "messages": [{"role": "user", "content": q}]}
    resp = {"choices": [{"message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}]}

    def hit(a: str, b: str) -> bool:
        c = Cache(embedder=emb, threshold=threshold, verify=verify, contextual=contextual, cross_check=cross_check)
        c.put(req(a), resp)
        h = c.get(req(b))
        rejected = {k: v for k, v in c.stats()["rejected"].items() if v}
        c.close()
        return h is not None, rejected

    true_hits = sum(hit(a, b)[0] for a, b in true)
    near_hit_kinds: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for a, b, kind in near:
        h, rej = hit(a, b)
        if h:
            near_hit_kinds[kind] = near_hit_kinds.get(kind, 0) + 1
        for k, v in rej.items():
            rejected[k] = rejected.get(k, 0) + v
    near_hits = sum(near_hit_kinds.values())
    hits = true_hits + near_hits
    return {"threshold": threshold, "true_pairs": len(true), "near_miss_pairs": len(near),
            "hit_rate_true": true_hits / len(true), "near_miss_hits": near_hits,
            "false_hits_pct_of_hits": 100 * near_hits / hits if hits else 0.0,
            "near_miss_hits_by_kind": near_hit_kinds, "near_miss_rejections_by_reason": rejected}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=str(ROOT / "benchmarks/data/cache_pairs.jsonl"))
    ap.add_argument("--entries", type=int, default=100_000, help="entries in the cache for the latency run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cache.json"))
    ap.add_argument("--fit", action="store_true", help="refit the pair classifier and ALIGN_MIN on every group of "
                    f"benchmarks/data/{{{','.join(FIT_FILES)}}}.jsonl "
                    "and write opengpt/assist/cache_verify_pair.json (ALIGN_MIN is printed; set it in cache_verify.py)")
    ap.add_argument("--blind", default=None, metavar="FILE",
                    help="only evaluate this blind file (every group blind, e.g. benchmarks/data/cache_pairs_blind3.jsonl) "
                         "at the thresholds already chosen (stored in --out) and write its figures in --out under "
                         "the file name's last part (\"blind3\")")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cond = conditions()
    sys.path.insert(0, str(ROOT))
    from opengpt.assist.cache import Cache
    from opengpt.assist.rag import load_embedder

    from opengpt.assist import cache_verify as cv

    groups = read_pair_groups(args.blind or args.pairs)
    fit_groups = [g for f in FIT_FILES for g in read_pair_groups(ROOT / f"benchmarks/data/{f}.jsonl")] if args.fit else []
    texts = sorted(set(group_texts(groups)))
    minilm = load_embedder()
    minilm.embed(["warm up"])
    t = time.perf_counter()
    vecs = minilm.embed(texts)
    embed_all_s = time.perf_counter() - t
    table = dict(zip(texts, vecs))
    tokens = dict(zip(texts, minilm.token_vectors(texts)))
    extra = sorted(set(group_texts(fit_groups)) - set(table))  # the other files' questions, untimed
    if extra:
        table.update(zip(extra, minilm.embed(extra)))
        tokens.update(zip(extra, minilm.token_vectors(extra)))
    emb = TableEmbedder(table, minilm.dim, tokens=tokens)
    if args.blind:
        blind_file(args, Cache, emb, groups, cond)
        return
    base = [g for g in groups if not g.get("blind")]
    fitted = None
    if args.fit:
        fitted = fit_contextual(cv, fit_groups, table, tokens)
        path = Path(cv.__file__).with_name(cv.PAIR_MODEL)
        path.write_text(json.dumps(fitted["model"], indent=1) + "\n")
        cv.pair_model.cache_clear()
        print(f"fitted on {len(fit_groups)} groups: ALIGN_MIN {fitted['align_min']} (in code: {cv.ALIGN_MIN}), p_min {fitted['p_min']}; "
              f"wrote {path}")
    embed_one = []
    for q in texts[:100]:
        t = time.perf_counter()
        minilm.embed([q])
        embed_one.append(time.perf_counter() - t)

    blind = [g for g in groups if g.get("blind")]
    halves = {"tune": pairs(base[0::2]), "holdout": pairs(base[1::2])}
    if blind:
        halves["blind"] = pairs(blind)
    quality = {}
    for split, (true, near) in halves.items():
        quality[split] = {mode: [evaluate(Cache, emb, true, near, th, **MODES[mode]) for th in THRESHOLDS]
                          for mode in MODES}
    chosen = {}
    for mode in MODES:
        ok = [r["threshold"] for r in quality["tune"][mode] if r["false_hits_pct_of_hits"] < 1 and r["hit_rate_true"] > 0]
        th = min(ok) if ok else max(THRESHOLDS)
        held = next(r for r in quality["holdout"][mode] if r["threshold"] == th)
        chosen[mode] = {"threshold_chosen_on_tune": th, "holdout": held}
        if blind:
            chosen[mode]["blind"] = next(r for r in quality["blind"][mode] if r["threshold"] == th)

    # -- latency at `entries` entries, one context ---------------------------------------------------
    cache = Cache(embedder=emb, threshold=chosen["pair"]["threshold_chosen_on_tune"], ttl=None,
                  max_entries=args.entries + 1, cross_check=None)
    resp = {"choices": [{"message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}]}
    req = lambda q: {"model": "m", "messages": [{"role": "user", "content": q}]}
    cached_q = [g["q"] for g in base]
    t = time.perf_counter()
    for q in cached_q:
        cache.put(req(q), resp)
    for i in range(args.entries - len(cached_q)):
        cache.put(req(f"filler question {i}"), resp)
    fill_s = time.perf_counter() - t
    lookups, found = [], 0
    queries = [p for g in base for p in g["p"]]
    for q in queries:
        t = time.perf_counter()
        h = cache.get(req(q))
        lookups.append(time.perf_counter() - t)
        found += h is not None
    bucket = next(iter(cache._buckets.values()))
    search = []
    for q in queries:
        v = table[q]
        t = time.perf_counter()
        bucket.search(v, 4)
        search.append(time.perf_counter() - t)
    size = cache.stats()["size"]
    cache.close()

    # -- get() end to end with the real embedder (embedding + word-piece vectors + lookup + checks) -----
    def timed_gets(cross_check):
        real = Cache(embedder=minilm, threshold=chosen["pair"]["threshold_chosen_on_tune"], ttl=None,
                     cross_check=cross_check)
        for q in cached_q:
            real.put(req(q), resp)
        times, n_found = [], 0
        for q in queries:
            t = time.perf_counter()
            n_found += real.get(req(q)) is not None
            times.append(time.perf_counter() - t)
        real.close()
        return times, n_found

    get_real, real_found = timed_gets(None)
    get_cross, cross_found = timed_gets("default")
    from opengpt.assist.cross_check import default_cross_check

    cc = default_cross_check()
    pair_times = []
    if cc is not None:
        for q in queries[:100]:
            t = time.perf_counter()
            cc.probability(q, cached_q[0])
            pair_times.append(time.perf_counter() - t)

    result = {
        "conditions": cond, "embedder": minilm.name, "pairs_file": str(Path(args.pairs).relative_to(ROOT)),
        "groups": len(groups), "pairs_per_split": {k: {"true": len(v[0]), "near_miss": len(v[1])} for k, v in halves.items()},
        "split": "groups without `blind` alternate: the 1st, 3rd, ... tune the threshold, the 2nd, 4th, ... report "
                 "(held out); groups marked `blind` (written before any rule was run on them) report separately",
        "caveat": "the verification rules were written by the author of the pairs; the held-out half guards the threshold "
                  "only (its failures were seen and rules written for them); the blind groups were written before "
                  "any rule ran on them, and their first figures are in `notes`; the pair classifier is trained on "
                  f"every group of {', '.join(FIT_FILES)} (contextual.pair_model.trained_on), so the pair modes' "
                  "figures on those files are in-sample: only a blind file evaluated after the fit tests it",
        "chosen": chosen, "quality": quality,
        "latency": {
            "entries": size, "contexts": 1, "index": "HNSW (FAISS, M=32, efSearch=64) past FLAT_MAX entries per context",
            "vectors": f"{len(cached_q)} real embeddings of pair questions + {size - len(cached_q)} random unit vectors "
                       "(embedding 100k texts would take too long on this CPU)",
            "fill_s": fill_s, "lookup_ms_p50": 1e3 * percentile(lookups, 50), "lookup_ms_p95": 1e3 * percentile(lookups, 95),
            "lookup_includes": "Cache.get: exact SQLite lookup, index search, candidate rows, verification; not the embedding",
            "index_search_ms_p95": 1e3 * percentile(search, 95),
            "paraphrase_lookups": len(queries), "paraphrase_hits_at_100k": found,
            "embed_one_query_ms_p50": 1e3 * percentile(embed_one, 50),
            "embed_one_query_ms_p95": 1e3 * percentile(embed_one, 95), "embed_all_pair_texts_s": embed_all_s,
            "get_with_embedder": {"entries": len(cached_q), "lookups": len(queries), "hits": real_found,
                                  "ms_p50": 1e3 * percentile(get_real, 50), "ms_p95": 1e3 * percentile(get_real, 95),
                                  "includes": "embedding + word-piece vectors of the new question (one forward "
                                              "pass), search, rules, contextual check (pair classifier); "
                                              "cross_check=None"},
            "get_with_embedder_cross": {"entries": len(cached_q), "lookups": len(queries), "hits": cross_found,
                                        "ms_p50": 1e3 * percentile(get_cross, 50), "ms_p95": 1e3 * percentile(get_cross, 95),
                                        "includes": "as get_with_embedder, then the cross-encoder on each candidate "
                                                    "the rules and pair classifier passed (Cache's default)"},
            "cross_check_one_pair_ms_p50": 1e3 * percentile(pair_times, 50) if pair_times else None,
            "cross_check_one_pair_ms_p95": 1e3 * percentile(pair_times, 95) if pair_times else None,
        },
        "contextual": {"align_min": cv.ALIGN_MIN, "pair_model": cv.pair_model(), "fit": fitted},
        "cross_check": cc.info() if cc is not None else None,
        "cross_check_caveat": "the cross-encoder was trained on synthetic pairs and on tune groups 1, 2, 4, 5, ... "
                              "of the tune half (its figures on the tune split are not held out; its cosine "
                              "threshold, chosen there, is 0.80 either way); its p_min was chosen on tune groups "
                              "3, 6, ... and a synthetic slice; held-out and blind were never trained on",
    }
    print(f"{len(groups)} groups; threshold chosen on the tune half, figures on the held-out half")
    print(f"{'mode':9} {'split':8} {'thr':>5} {'hit%':>6} {'false%':>7} {'nearhits':>8}")
    for split in quality:
        for mode in quality[split]:
            for r in quality[split][mode]:
                print(f"{mode:9} {split:8} {r['threshold']:5.2f} {100 * r['hit_rate_true']:6.1f} "
                      f"{r['false_hits_pct_of_hits']:7.2f} {r['near_miss_hits']:8d}")
    for mode, c in chosen.items():
        for split in ("holdout", "blind"):
            if split in c:
                h = c[split]
                print(f"chosen {mode}: threshold {c['threshold_chosen_on_tune']}, {split}: hit "
                      f"{100 * h['hit_rate_true']:.1f}% false {h['false_hits_pct_of_hits']:.2f}% of hits")
    lat = result["latency"]
    print(f"get() with the embedder: p50 {lat['get_with_embedder']['ms_p50']:.1f} ms p95 "
          f"{lat['get_with_embedder']['ms_p95']:.1f} ms; with the cross-check p50 "
          f"{lat['get_with_embedder_cross']['ms_p50']:.1f} ms p95 {lat['get_with_embedder_cross']['ms_p95']:.1f} ms")
    print(f"{size} entries: fill {fill_s:.0f} s, lookup p50 {lat['lookup_ms_p50']:.2f} ms p95 {lat['lookup_ms_p95']:.2f} ms, "
          f"index p95 {lat['index_search_ms_p95']:.2f} ms; hits {found}/{len(queries)}; embed one p95 "
          f"{lat['embed_one_query_ms_p95']:.1f} ms")
    old = Path(args.out)
    if old.is_file():  # keep what was recorded by hand or by --blind
        prev = json.loads(old.read_text())
        for k in prev:
            if k == "notes" or re.fullmatch(r"blind\d+", k):
                result[k] = prev[k]
    write_json(result, args.out)


def blind_file(args, Cache, emb, groups, cond) -> None:
    """Evaluate a blind file at the thresholds already chosen (read from --out), once."""
    key = Path(args.blind).stem.rsplit("_", 1)[-1]
    out = Path(args.out)
    result = json.loads(out.read_text())
    true, near = pairs(groups)
    figures = {}
    for mode in MODES:
        th = result["chosen"][mode]["threshold_chosen_on_tune"]
        figures[mode] = evaluate(Cache, emb, true, near, th, **MODES[mode])
        h = figures[mode]
        print(f"{key} {mode}: threshold {th}, hit {100 * h['hit_rate_true']:.1f}% false "
              f"{h['false_hits_pct_of_hits']:.2f}% of hits ({h['near_miss_hits']} near-miss hits)")
    from opengpt.assist import cache_verify as cv
    from opengpt.assist.cross_check import default_cross_check

    cc = default_cross_check()
    result[key] = {"pairs_file": shown_path(args.blind),
                        "groups": len(groups), "conditions": cond, "align_min": cv.ALIGN_MIN,
                        "pair_p_min": (cv.pair_model() or {}).get("p_min"),
                        "cross_check_p_min": cc.p_min if cc is not None else None,
                        "note": "evaluated once at the thresholds chosen on the tune half; nothing tuned on it",
                        "figures": figures}
    write_json(result, out, conditions=cond)


if __name__ == "__main__":
    main()
