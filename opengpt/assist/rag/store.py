"""The document store: documents, chunks, BM25 and vectors in one SQLite file, searched three ways.

Why this layout. sqlite-vec would keep the vectors inside SQLite too, but Python's sqlite3 here (and
in many distributions) is built without `enable_load_extension`, so it would need apsw as a second
SQLite binding on top of a pre-1.0 extension. LanceDB brings a columnar format and a second file
tree. Instead one SQLite file (stdlib sqlite3, FTS5 built in) holds everything that persists:
* `meta`: schema version, the embedder's name and dimension, chunk size and overlap. A store refuses
  to open with a different embedder: vectors of two models are not comparable (`EmbedderMismatch`).
* `documents`: one row per source (absolute path, or a name given with text) and its content hash,
  so re-adding an unchanged document is a no-op and a changed one has its chunks replaced.
* `chunks`: text, offsets, section title and the vector as a float32 BLOB.
* `chunks_fts`: an external-content FTS5 index over chunk title and text (porter stemming), kept in
  step with `chunks` by triggers, ranked with FTS5's `bm25()`.
Vector search runs on FAISS (`faiss-cpu`, maintained by Meta): an exact inner-product index
(IndexFlatIP in an IndexIDMap2, ids = chunk row ids) built from the BLOBs at the first vector query
after opening and kept in step with adds and deletes. A flat index needs no training and gives exact
results; rebuilding it costs one read of the vectors (about 150 MB and well under a second for 100k
chunks of MiniLM). Vectors are L2-normalised, so inner product is cosine similarity.

Search modes: "bm25" (the question sanitised into an OR of quoted terms: user questions are full of
quotes, `?`, `-`, `:` that are FTS5 syntax), "vector", and "hybrid" (the default): Reciprocal Rank
Fusion, score = sum over both lists of 1 / (60 + rank), over the top candidates of each. A rare
identifier that embeddings blur and a paraphrase that shares no words with the text each fail one
method; the fused list keeps both.

Outgrowing one machine: code against the `VectorStore` protocol below; `QdrantStore` (opengpt.assist.rag.qdrant,
qdrant-client) implements it on a Qdrant server, vector search only, with the same embedders.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .chunking import Chunk, chunk_text, kind_of, read_document
from .embed import Embedder, load_embedder

SCHEMA_VERSION = "1"
RRF_K = 60
MODES = ("hybrid", "vector", "bm25")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
    id INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE, hash TEXT NOT NULL, chars INTEGER NOT NULL,
    added_at REAL NOT NULL);
-- AUTOINCREMENT: a chunk id is never reused, so a citation kept from an old answer cannot point at a new chunk.
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, start INTEGER NOT NULL, "end" INTEGER NOT NULL, title TEXT, text TEXT NOT NULL,
    vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    title, text, content='chunks', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, title, text) VALUES (new.id, coalesce(new.title, ''), new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, title, text) VALUES ('delete', old.id, coalesce(old.title, ''), old.text);
END;
"""

# Words that match nearly every chunk: dropped from BM25 queries so they don't dilute the OR.
STOPWORDS = frozenset({"a", "an", "and", "are", "as", "at", "be", "by", "can", "could", "do", "does", "for",
    "from", "has", "have", "how", "i", "if", "in", "into", "is", "it", "its", "me", "my", "of", "on", "or",
    "should", "so", "than", "that", "the", "their", "them", "then", "there", "these", "this", "to", "was", "we",
    "what", "when", "where", "which", "who", "why", "will", "with", "would", "you", "your"})
_TERM = re.compile(r"\w+(?:[.\-_/:']\w+)*")


class EmbedderMismatch(ValueError):
    pass


class DocumentNotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "document not found"


@dataclass(slots=True)
class Hit:
    chunk_id: int  # the row id in the store: stable, never reused
    source: str
    index: int  # chunk index within the document
    start: int
    end: int
    title: str | None
    text: str
    score: float  # higher is better: RRF score, cosine similarity, or -bm25
    bm25_rank: int | None = None  # 1-based rank in each list, None where the chunk was not a candidate
    vector_rank: int | None = None


@dataclass(slots=True)
class AddResult:
    source: str
    status: str  # "added" | "unchanged" | "replaced"
    chunks: int


@dataclass(slots=True)
class DocumentInfo:
    source: str
    hash: str
    chunks: int
    chars: int
    added_at: float


class VectorStore(Protocol):
    """What the assistant needs from a store; `Store` (SQLite, one file) and `QdrantStore` (a server)."""

    def add_document(self, path_or_text: str | Path, source: str | None = None, *, kind: str | None = None
                     ) -> AddResult: ...
    def delete_document(self, source: str) -> int: ...
    def documents(self) -> list[DocumentInfo]: ...
    def search(self, query: str, k: int = 4, mode: str = "hybrid") -> list[Hit]: ...
    def close(self) -> None: ...


def fts_query(text: str) -> str:
    """A user's question as a safe FTS5 query: each word (identifiers and dotted names kept whole) quoted
    as a phrase, stopwords dropped, joined with OR. Quotes, `?`, `-`, `:`, `*`, `^` etc. never reach FTS5."""
    terms: list[str] = []
    for t in _TERM.findall(text.lower()):
        if t not in STOPWORDS and t not in terms:
            terms.append(t)
    return " OR ".join(f'"{t}"' for t in terms)


def rrf(*rankings: list[int], k: int = RRF_K) -> dict[int, float]:
    """Reciprocal Rank Fusion of lists of ids, best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, cid in enumerate(ranking, 1):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (k + rank)
    return scores


def _embed_text(c: Chunk) -> str:
    """What a chunk's vector is computed from: its section title leads, unless the text starts with it."""
    if c.title and not c.text.lstrip("#= \n").startswith(c.title.split(" > ")[-1]):
        return f"{c.title}\n{c.text}"
    return c.text


class Store:
    """A document store in one SQLite file; open it with `Store.open(path, embedder)`."""

    def __init__(self, db: sqlite3.Connection, path: Path, embedder: Embedder, dim: int, name: str,
                 chunk_size: int, overlap: int):
        self.db, self.path = db, path
        self._embedder = embedder  # BertEmbedder loads its weights at the first embed: `ls` / `rm` need no model
        self.embedder_name, self.dim = name, dim
        self.chunk_size, self.overlap = chunk_size, overlap
        self._index = None  # the FAISS index, built at the first vector search

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, embedder: str | Embedder | None = None, *, create: bool = True,
             chunk_size: int = 160, overlap: int = 32) -> Store:
        """Open (or with `create`, make) the store at `path`. `embedder` defaults to the one the store was
        built with (the bundled all-MiniLM-L6-v2 for a new one); a different one raises EmbedderMismatch.
        `chunk_size` / `overlap` (words) apply to a new store; an existing one keeps its own."""
        path = Path(path)
        if not path.exists() and not create:
            raise FileNotFoundError(f"no document store at {path}; create one with `opengpt index add PATH --store {path}`")
        created = not path.exists()
        db = sqlite3.connect(path)
        try:
            db.execute("PRAGMA foreign_keys = ON")
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall()) if cls._has_meta(db) else {}
            if meta.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
                raise ValueError(f"{path} has store schema {meta['schema_version']}, this opengpt reads {SCHEMA_VERSION}")
            emb = embedder if embedder is not None else meta.get("embedder", "default")
            emb = load_embedder(emb) if isinstance(emb, str | Path) else emb
            if meta and (meta["embedder"] != emb.name or int(meta["dim"]) != emb.dim):
                raise EmbedderMismatch(
                    f"{path} was indexed with embedder {meta['embedder']!r} ({meta['dim']} dimensions), not "
                    f"{emb.name!r} ({emb.dim}); open it with that embedder, or index into a new store file")
            if not meta:
                with db:
                    db.executescript(SCHEMA)
                    db.executemany("INSERT INTO meta VALUES (?, ?)", [
                        ("schema_version", SCHEMA_VERSION), ("embedder", emb.name), ("dim", str(emb.dim)),
                        ("chunk_size", str(chunk_size)), ("overlap", str(overlap))])
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except BaseException:
            db.close()
            if created:  # a failed open (no embedder, say) leaves no empty file behind
                path.unlink(missing_ok=True)
            raise
        return cls(db, path, emb, int(meta["dim"]), meta["embedder"], int(meta["chunk_size"]), int(meta["overlap"]))

    @staticmethod
    def _has_meta(db: sqlite3.Connection) -> bool:
        """Whether the file is one of our stores; another SQLite database is refused, never written into."""
        try:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as e:
            raise ValueError(f"not a document store (SQLite says: {e})") from e
        if names and "meta" not in names:
            raise ValueError(f"not a document store: an SQLite database with other tables ({', '.join(sorted(names)[:5])})")
        return "meta" in names

    @property
    def embedder(self) -> Embedder:
        return self._embedder

    def close(self) -> None:
        self.db.close()
        self._index = None

    def __enter__(self) -> Store:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- documents -----------------------------------------------------------------------------------
    def _source_of(self, source: str | Path) -> str:
        """The stored name for a source: the name itself if stored, else the absolute path it names."""
        s = str(source)
        if self.db.execute("SELECT 1 FROM documents WHERE source = ?", (s,)).fetchone():
            return s
        return str(Path(s).expanduser().resolve())

    def add_document(self, path_or_text: str | Path, source: str | None = None, *, kind: str | None = None
                     ) -> AddResult:
        """Index a file (a Path, or a str naming an existing file) or a text (then `source` names it).
        Unchanged content (same hash) is a no-op; changed content replaces the document's chunks."""
        is_file = isinstance(path_or_text, Path) or (
            "\n" not in path_or_text and len(path_or_text) < 4096 and Path(path_or_text).is_file())
        if is_file:
            path = Path(path_or_text)
            raw = path.read_bytes()
            source = source or str(path.expanduser().resolve())
            kind = kind or kind_of(path)
        else:
            raw = path_or_text.encode("utf-8")
            source = source or f"text:{hashlib.sha256(raw).hexdigest()[:12]}"
            kind = kind or kind_of(source)
        digest = hashlib.sha256(raw).hexdigest()
        old = self.db.execute("SELECT id, hash FROM documents WHERE source = ?", (source,)).fetchone()
        if old and old[1] == digest:
            n = self.db.execute("SELECT count(*) FROM chunks WHERE doc_id = ?", (old[0],)).fetchone()[0]
            return AddResult(source, "unchanged", n)
        text, marks = read_document(path) if is_file else (path_or_text, [])
        chunks = chunk_text(text, source, kind, self.chunk_size, self.overlap, marks)
        # Embed before opening the write transaction: the slow part holds no lock on the file.
        vectors = self._embed([_embed_text(c) for c in chunks])
        with self.db:
            if old:
                removed = self._delete_rows(old[0])
                self.db.execute("UPDATE documents SET hash = ?, chars = ?, added_at = ? WHERE id = ?",
                                (digest, len(text), time.time(), old[0]))
                doc_id = old[0]
            else:
                doc_id = self.db.execute("INSERT INTO documents(source, hash, chars, added_at) VALUES (?, ?, ?, ?)",
                                         (source, digest, len(text), time.time())).lastrowid
            # RETURNING would need SQLite 3.35; lastrowid works with the SQLite of older distributions too.
            ids = [self.db.execute('INSERT INTO chunks(doc_id, idx, start, "end", title, text, vector) '
                                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                   (doc_id, c.index, c.start, c.end, c.title, c.text, v.tobytes())).lastrowid
                   for c, v in zip(chunks, vectors)]
        if self._index is not None:
            if old:
                self._index.remove_ids(np.asarray(removed, dtype=np.int64))
            if ids:
                self._index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        return AddResult(source, "replaced" if old else "added", len(chunks))

    def _delete_rows(self, doc_id: int) -> list[int]:
        """Delete a document's chunks (the trigger removes their FTS rows); their ids, for the vector index."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        return ids

    def delete_document(self, source: str | Path) -> int:
        """Remove a document, its chunks, their FTS rows and vectors; the number of chunks removed."""
        name = self._source_of(source)
        row = self.db.execute("SELECT id FROM documents WHERE source = ?", (name,)).fetchone()
        if row is None:
            raise DocumentNotFound(f"no document {str(source)!r} in {self.path}")
        with self.db:
            ids = self._delete_rows(row[0])
            self.db.execute("DELETE FROM documents WHERE id = ?", (row[0],))
        if self._index is not None and ids:
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))
        return len(ids)

    def documents(self) -> list[DocumentInfo]:
        rows = self.db.execute("SELECT d.source, d.hash, count(c.id), d.chars, d.added_at FROM documents d "
                               "LEFT JOIN chunks c ON c.doc_id = d.id GROUP BY d.id ORDER BY d.source")
        return [DocumentInfo(*r) for r in rows]

    def chunk_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def get_chunks(self, ids: Iterable[int]) -> dict[int, Hit]:
        """Chunks by row id (score 0); ids not in the store are left out."""
        ids = list(ids)
        if not ids:
            return {}
        rows = self.db.execute(
            f'SELECT c.id, d.source, c.idx, c.start, c."end", c.title, c.text FROM chunks c '
            f"JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({','.join('?' * len(ids))})", ids)
        return {r[0]: Hit(*r, score=0.0) for r in rows}

    # -- search --------------------------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(self._embedder.embed(texts), dtype=np.float32)

    def _vector_index(self):
        if self._index is None:
            try:
                import faiss
            except ImportError as e:
                raise ImportError("vector search needs FAISS: pip install faiss-cpu") from e
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
            rows = self.db.execute("SELECT id, vector FROM chunks").fetchall()
            if rows:
                vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
                index.add_with_ids(vecs, np.asarray([r[0] for r in rows], dtype=np.int64))
            self._index = index
        return self._index

    def vector_search(self, query: str, n: int) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity), best first."""
        index = self._vector_index()
        if index.ntotal == 0:
            return []
        scores, ids = index.search(self._embed([query]), min(n, index.ntotal))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def bm25_search(self, query: str, n: int) -> list[tuple[int, float]]:
        """(chunk id, -bm25) best first; a question without searchable words gives no results."""
        q = fts_query(query)
        if not q:
            return []
        rows = self.db.execute("SELECT rowid, bm25(chunks_fts) AS s FROM chunks_fts WHERE chunks_fts MATCH ? "
                               "ORDER BY s LIMIT ?", (q, n)).fetchall()
        return [(int(i), -float(s)) for i, s in rows]

    def search(self, query: str, k: int = 4, mode: str = "hybrid", candidates: int | None = None) -> list[Hit]:
        """The `k` best chunks for `query`; `candidates` per list feed the fusion (max(50, 5k) by default)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        n = candidates or max(50, 5 * k)
        bm = self.bm25_search(query, n if mode == "hybrid" else k) if mode != "vector" else []
        vec = self.vector_search(query, n if mode == "hybrid" else k) if mode != "bm25" else []
        bm_rank = {cid: r for r, (cid, _) in enumerate(bm, 1)}
        vec_rank = {cid: r for r, (cid, _) in enumerate(vec, 1)}
        if mode == "hybrid":
            fused = rrf([c for c, _ in bm], [c for c, _ in vec])
            # Ties (same ranks swapped) go to the vector side, then to the lower id: a stable order.
            ranked = sorted(fused.items(), key=lambda kv: (-kv[1], vec_rank.get(kv[0], n + 1), kv[0]))[:k]
        else:
            ranked = bm if mode == "bm25" else vec
        rows = self.get_chunks(c for c, _ in ranked)
        hits = []
        for cid, score in ranked:
            if cid in rows:  # a chunk another process deleted since this one read the index
                h = rows[cid]
                h.score, h.bm25_rank, h.vector_rank = score, bm_rank.get(cid), vec_rank.get(cid)
                hits.append(h)
        return hits
