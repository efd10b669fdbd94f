"""Retrieval-augmented generation: index documents into one SQLite file, search it, answer with citations.

    from opengpt.assist.rag import Store, index_paths, answer
    store = Store.open("docs.db")                      # the bundled all-MiniLM-L6-v2 embedder
    index_paths(store, ["README.md", "docs/"])         # md / txt / rst / py / pdf
    store.search("how do I run on a GPU?", k=4)        # hybrid: BM25 + vectors, fused by rank
    answer("how do I run on a GPU?", store, LocalBackend(llm)).cited

The modules: chunking (overlapping chunks along headings / paragraphs / defs), embed (the BERT
encoder), store (SQLite + FTS5 + FAISS, the `VectorStore` protocol), qdrant (a server store),
answer (prompt, citations), index (walking paths). Importing this package costs nothing beyond
opengpt itself: FAISS, tokenizers and the model load when first needed.
"""

from __future__ import annotations

# Every module here imports only the standard library and numpy at import time (FAISS, tokenizers,
# safetensors, pypdf, qdrant-client and the weights load when first used), so eager imports are cheap.
# `answer` is both a submodule and the function; the from-import below binds the function, and a
# later `import opengpt.assist.rag.answer` finds the module in sys.modules without rebinding it.
from .answer import Citation, RagAnswer, answer, format_answer
from .chunking import Chunk, chunk_document, chunk_text
from .embed import DEFAULT_EMBEDDER, BertEmbedder, Embedder, EmbedderMissing, load_embedder
from .index import IndexStats, index_paths, iter_files
from .qdrant import QdrantStore
from .store import AddResult, DocumentInfo, DocumentNotFound, EmbedderMismatch, Hit, Store, VectorStore, fts_query

__all__ = ["DEFAULT_EMBEDDER", "AddResult", "BertEmbedder", "Chunk", "Citation", "DocumentInfo", "DocumentNotFound",
           "Embedder", "EmbedderMismatch", "EmbedderMissing", "Hit", "IndexStats", "QdrantStore", "RagAnswer",
           "Store", "VectorStore", "answer", "chunk_document", "chunk_text", "format_answer", "fts_query",
           "index_paths", "iter_files", "load_embedder"]
