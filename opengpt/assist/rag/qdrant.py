"""`QdrantStore`: the `VectorStore` protocol on a Qdrant server, for corpora that outgrow one SQLite file.

Same chunking and embedders as `Store`; documents are points carrying their chunk as payload, one
collection per store, the embedder's name checked against the collection's first point. Vector search
only: BM25 and hybrid modes belong to the SQLite store (Qdrant's own sparse vectors would be the way
to add them). Needs `qdrant-client` (pip install qdrant-client), imported when a store is made.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

from .chunking import chunk_text, kind_of, read_document
from .embed import Embedder, load_embedder
from .store import AddResult, DocumentInfo, EmbedderMismatch, Hit, _embed_text


class QdrantStore:
    def __init__(self, url: str = "http://localhost:6333", collection: str = "opengpt",
                 embedder: str | Embedder = "default", chunk_size: int = 160, overlap: int = 32, **client_kwargs):
        try:
            from qdrant_client import QdrantClient, models
        except ImportError as e:
            raise ImportError("QdrantStore needs the Qdrant client: pip install qdrant-client") from e
        self.models = models
        self.client = QdrantClient(url=url, **client_kwargs)
        self.collection = collection
        self.embedder = load_embedder(embedder) if isinstance(embedder, str) else embedder
        self.chunk_size, self.overlap = chunk_size, overlap
        if not self.client.collection_exists(collection):
            self.client.create_collection(collection, vectors_config=models.VectorParams(
                size=self.embedder.dim, distance=models.Distance.COSINE))
        points, _ = self.client.scroll(collection, limit=1, with_payload=True)
        if points and points[0].payload.get("embedder") != self.embedder.name:
            raise EmbedderMismatch(f"collection {collection!r} was indexed with {points[0].payload.get('embedder')!r}, "
                                   f"not {self.embedder.name!r}")

    def _filter(self, **match):
        m = self.models
        return m.Filter(must=[m.FieldCondition(key=k, match=m.MatchValue(value=v)) for k, v in match.items()])

    def _doc_points(self, source: str) -> list:
        points, _ = self.client.scroll(self.collection, scroll_filter=self._filter(source=source), limit=100_000,
                                       with_payload=True)
        return points

    def add_document(self, path_or_text: str | Path, source: str | None = None, *, kind: str | None = None
                     ) -> AddResult:
        is_file = isinstance(path_or_text, Path) or ("\n" not in path_or_text and Path(path_or_text).is_file())
        text, marks = read_document(path_or_text) if is_file else (path_or_text, [])
        source = source or (str(Path(path_or_text).resolve()) if is_file else f"text:{uuid.uuid4().hex[:12]}")
        digest = hashlib.sha256(text.encode()).hexdigest()
        old = self._doc_points(source)
        if old and old[0].payload.get("hash") == digest:
            return AddResult(source, "unchanged", len(old))
        if old:
            self.delete_document(source)
        chunks = chunk_text(text, source, kind or kind_of(source if not is_file else path_or_text),
                            self.chunk_size, self.overlap, marks)
        vectors = self.embedder.embed([_embed_text(c) for c in chunks])
        now = time.time()
        self.client.upsert(self.collection, points=[self.models.PointStruct(
            id=str(uuid.uuid4()), vector=v.tolist(),
            payload={"source": source, "hash": digest, "chars": len(text), "added_at": now, "embedder": self.embedder.name,
                     "index": c.index, "start": c.start, "end": c.end, "title": c.title, "text": c.text})
            for c, v in zip(chunks, vectors)])
        return AddResult(source, "replaced" if old else "added", len(chunks))

    def delete_document(self, source: str) -> int:
        n = len(self._doc_points(source))
        self.client.delete(self.collection, points_selector=self.models.FilterSelector(filter=self._filter(source=source)))
        return n

    def documents(self) -> list[DocumentInfo]:
        points, _ = self.client.scroll(self.collection, limit=1_000_000, with_payload=True)
        docs: dict[str, DocumentInfo] = {}
        for p in points:
            d = docs.setdefault(p.payload["source"], DocumentInfo(p.payload["source"], p.payload["hash"], 0,
                                                                  p.payload["chars"], p.payload["added_at"]))
            d.chunks += 1
        return sorted(docs.values(), key=lambda d: d.source)

    def search(self, query: str, k: int = 4, mode: str = "vector") -> list[Hit]:
        if mode != "vector":
            raise ValueError("QdrantStore searches by vector only (mode='vector'); bm25 and hybrid need the SQLite Store")
        res = self.client.query_points(self.collection, query=self.embedder.embed([query])[0].tolist(), limit=k,
                                       with_payload=True).points
        # Qdrant ids are UUIDs; the chunk id handed out is a stable integer hash of it.
        return [Hit(int(uuid.UUID(str(p.id))) >> 65, p.payload["source"], p.payload["index"], p.payload["start"],
                    p.payload["end"], p.payload["title"], p.payload["text"], float(p.score), vector_rank=r)
                for r, p in enumerate(res, 1)]

    def close(self) -> None:
        self.client.close()
