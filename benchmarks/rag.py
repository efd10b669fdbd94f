"""Retrieval quality of the RAG store on this project's own docs: BM25 vs vectors vs hybrid (RRF).

Corpus: README.md (markdown), the module docstring of every opengpt/**/*.py, and configs/*.yaml, each
under its repository-relative path. Questions: benchmarks/data/rag_questions.json, written as a
user would ask them (paraphrased), each with the passages that answer it as (source, distinctive
phrase) pairs. A retrieved chunk is relevant when it comes from an expected source and contains that
source's phrase (case and whitespace folded); an entry without a phrase accepts any chunk of the
source. Expected passages that are no longer in the corpus (the docs changed) are reported, and a
question left with none is skipped rather than counted as a miss.

Measures, per mode: hit rate @1 and @4 (a relevant chunk among the first k), MRR@10, and query
latency p50 / p95 (embedding the query included for vector and hybrid); plus ingest time (chunking
and embedding every document into a fresh store). Writes benchmarks/results/rag.json.

    python benchmarks/rag.py [--chunk-size 160] [--overlap 32] [--threads N]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import conditions, percentile, write_json

ROOT = Path(__file__).resolve().parent.parent
MODES = ("bm25", "vector", "hybrid")


def corpus(root: Path) -> dict[str, tuple[str, str]]:
    """source -> (text, chunking kind)."""
    docs = {"README.md": ((root / "README.md").read_text(), "md")}
    for p in sorted((root / "opengpt").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(p.read_text()))
        if doc:
            docs[str(p.relative_to(root))] = (doc, "txt")
    for p in sorted((root / "configs").glob("*.yaml")):
        docs[str(p.relative_to(root))] = (p.read_text(), "txt")
    return docs


def fold(text: str) -> str:
    return " ".join(text.lower().split())


def relevant(hit, expected: list[dict]) -> bool:
    return any(hit.source == e["source"] and ("phrase" not in e or fold(e["phrase"]) in fold(hit.text))
               for e in expected)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", default=str(ROOT / "benchmarks/data/rag_questions.json"))
    ap.add_argument("--chunk-size", type=int, default=160, help="words per chunk")
    ap.add_argument("--overlap", type=int, default=32, help="words shared by consecutive chunks")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/rag.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cond = conditions()  # before the run: its load average is the one at the start
    sys.path.insert(0, str(ROOT))
    from opengpt.assist.rag import Store, load_embedder

    docs = corpus(ROOT)
    questions = json.loads(Path(args.questions).read_text())
    stale, usable = [], []
    for q in questions:
        ok = [e for e in q["expected"] if e["source"] in docs
              and ("phrase" not in e or fold(e["phrase"]) in fold(docs[e["source"]][0]))]
        stale += [f"{q['question']!r}: {e['source']} / {e.get('phrase')!r}" for e in q["expected"] if e not in ok]
        if ok:
            usable.append({**q, "expected": ok})
    for s in stale:
        print(f"stale expected passage: {s}", file=sys.stderr)

    embedder = load_embedder()
    embedder.embed(["warm up: load the weights before timing"])
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "rag.db", embedder, chunk_size=args.chunk_size, overlap=args.overlap)
        t = time.perf_counter()
        for source, (text, kind) in docs.items():
            store.add_document(text, source=source, kind=kind)
        ingest_s = time.perf_counter() - t
        n_chunks = store.chunk_count()
        store.search("warm up", k=10, mode="hybrid")  # builds the vector index (part of the first query)

        results, per_question = {}, []
        ranks = {m: [] for m in MODES}
        for mode in MODES:
            latencies = []
            for q in usable:
                t = time.perf_counter()
                hits = store.search(q["question"], k=10, mode=mode)
                latencies.append(time.perf_counter() - t)
                ranks[mode].append(next((r for r, h in enumerate(hits, 1) if relevant(h, q["expected"])), None))
            r = ranks[mode]
            results[mode] = {
                "hit_at_1": sum(x == 1 for x in r if x) / len(r),
                "hit_at_4": sum(1 for x in r if x and x <= 4) / len(r),
                "mrr_at_10": sum(1 / x for x in r if x) / len(r),
                "latency_ms_p50": 1e3 * percentile(latencies, 50),
                "latency_ms_p95": 1e3 * percentile(latencies, 95),
            }
        for i, q in enumerate(usable):
            per_question.append({"question": q["question"], **{f"rank_{m}": ranks[m][i] for m in MODES}})
        store.close()

    result = {"conditions": cond, "embedder": embedder.name, "chunk_size_words": args.chunk_size,
              "overlap_words": args.overlap, "documents": len(docs), "chunks": n_chunks,
              "questions": len(usable), "questions_skipped_stale": len(questions) - len(usable),
              "stale_expected_passages": stale, "ingest_s": ingest_s, "ingest_chunks_per_s": n_chunks / ingest_s,
              "modes": results, "per_question": per_question}
    print(f"{len(docs)} documents, {n_chunks} chunks, ingest {ingest_s:.1f} s; {len(usable)} questions")
    print(f"{'mode':8} {'hit@1':>6} {'hit@4':>6} {'MRR@10':>7} {'p50 ms':>7} {'p95 ms':>7}")
    for m, r in results.items():
        print(f"{m:8} {r['hit_at_1']:6.3f} {r['hit_at_4']:6.3f} {r['mrr_at_10']:7.3f} "
              f"{r['latency_ms_p50']:7.1f} {r['latency_ms_p95']:7.1f}")
    write_json(result, args.out)


if __name__ == "__main__":
    main()
