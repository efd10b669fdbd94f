"""A result cache for chat-completion requests: exact hits, and semantic hits that are verified first.

Exact: the key is the SHA-256 of the request in canonical form (`canonical_request`): messages NFC,
whitespace collapsed, content-part lists of text flattened to one string; fields equal to their
default dropped, so `{"temperature": 1}` and no temperature are one request; `stream`,
`stream_options`, `user`, `metadata` and `store` dropped (they do not change the answer); the
user scope hashed in. A hit never crosses users, and the anonymous scope (user None or "") never sees
a user's entries.

Semantic: everything but the text of the last user message (model, sampling, earlier messages,
user scope) hashes to a *context*; candidates come only from entries with the same context, ranked by
cosine of the last user message's embeddings (all-MiniLM-L6-v2 by default). Embedding caches like
GPTCache serve a candidate on cosine alone, and a question and its negation sit at cosine ~0.9, so
about one hit in ten is a wrong answer. Here each candidate above the threshold is checked by
`mismatch(new, cached)` (opengpt.assist.cache_verify) first, and every rejection is counted by its reason:
  negation   a negation cue (not / n't / no / never / without / except; "X-free" is "without X", "stop
             ... from doing" is "not doing") in one and not the other, or a thing negated in one ("without
             yeast") and said plainly in the other ("with yeast")
  antonym    both use words of one antonym group, and not the same side (more/less, before/after, max/min,
             landlord/tenant ...)
  number     the multisets of numbers differ (`1,000` = `1000`, `two` = `2`, `pair` = `2`, "second
             largest" has a 2; 1 is left out: "a pound" = "1 lb"), or one number is stated in another
             unit ("5 kilometers in miles" / "5 miles to km")
  entity     names, quoted strings or code identifiers differ (case-insensitive, "Mexico" ~ "Mexican"), or
             both name units and they differ
  order      the same words swapped around a directional word ("string to int" vs "int to string";
             "between A and B" reads as "from A to B" against a "from B to A"; "before", "behind"), two
             shared words trading places around the same words, or two runs of words trading places
             around the same middle with all else equal ("Is a square a rectangle" / "Is a rectangle a
             square")
  question_type the question frames differ (who / when / where / why / how / how many ~ number of /
                what year ~ when / yes-no); a bare "what" or a statement agrees with any frame
  substitution  the questions are the same but for one or two content words replaced by others
  unaligned     after aligning content words (same stem, prefix variant, or a synonym: cosine >= WORD_SIM
                of the MiniLM static input embeddings, word-pieces averaged), at most SWAP_MAX words are
                left on each side and a pair of them is related but not the same (cosine in
                [SWAP_SIM, WORD_SIM)): a co-hyponym swap (cat / dog, square / cube root); or words are
                left on one side only and one is specific (rarer than GENERIC_ZIPF on wordfreq's Zipf
                scale): "sort a dict" / "... in descending order", "a stain" / "a red wine stain"
  contextual    after the rules pass, with an embedder that gives word-piece vectors (`token_vectors`):
                `contextual="pair"` (default) asks the logistic-regression pair classifier of
                cache_verify_pair.json (sentence cosine, BERTScore-style min / mean alignment of content
                words both ways, rare unaligned words, rule flag) and serves only at p >= its p_min;
                `"align"` rejects when a content word's best contextual match in the other question is
                below ALIGN_MIN (cat / dog; not fly / take the train, at 0.36); `"off"` uses the rules alone. The new
                question's word-piece vectors come from the forward pass of its sentence embedding; a
                cached question's are kept from its `put` (LRU of TOKEN_CACHE) or computed once when it
                is first a candidate after a restart.
  cross_check   the last stage, `cross_check(new_question, cached_question) -> bool`, said no: off by
                default (None); "default" is the trained cross-encoder of opengpt.assist.cross_check (MiniLM
                reading the pair "[CLS] new [SEP] cached [SEP]", its top layers fine-tuned; serves at
                probability >= the p_min stored with it), or any callable (an LLM judge). Off by default
                because on the blind2 pairs it cut false hits only from 17% to 14% of hits while adding
                ~25-35 ms per candidate on this CPU (benchmarks/results/cache.json)
A rejected candidate costs a model call; a wrong hit costs a wrong answer, so every rule errs towards
rejecting. Requests whose last message is not a plain-text user message are cached exactly only.

Not stored (documented for callers): responses with an `error`, or any choice whose finish_reason is
"length" (cut off) or "content_filter". Requests with n > 1, tools or forced tool_choice are cached
like any other; those fields are part of the key. A request with temperature > 0 gets the sample
that was cached: that is what a cache does, and callers who want fresh samples should not use one.

Storage: SQLite (WAL, one file or ":memory:") holds every entry with its float32 embedding; TTL is
counted from creation (an expired entry is never served and is purged lazily), LRU eviction keeps at
most `max_entries`. The vector index lives in memory, rebuilt from the BLOBs on a restart and brought
up to date with rows other processes added (by rowid) before each semantic lookup: one numpy matrix
per context, switched to a FAISS HNSW graph past `FLAT_MAX` entries so a lookup stays under 5 ms at
100k entries in one context. Several servers share one Redis through `RedisCache` instead.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cache_verify
from .cache_verify import mismatch, numbers, question_type  # noqa: F401 - re-exported

DROPPED_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store"})
# A field equal to its default is dropped, so leaving it out and spelling it out give one key.
DEFAULTS: dict[str, object] = {
    "temperature": 1, "top_p": 1, "n": 1, "presence_penalty": 0, "frequency_penalty": 0, "stop": None,
    "seed": None, "max_tokens": None, "logprobs": False, "top_logprobs": None, "logit_bias": None,
    "parallel_tool_calls": True, "response_format": {"type": "text"}, "tools": None,
}
UNSAFE_FINISH = frozenset({"length", "content_filter"})
REASONS = ("negation", "antonym", "number", "entity", "order", "question_type", "substitution", "unaligned",
           "contextual", "cross_check")
CONTEXTUAL = ("pair", "align", "off")
TOKEN_CACHE = 4096  # cached questions whose word-piece vectors are kept in memory (LRU)
FLAT_MAX = 4096  # a context with more entries is searched through HNSW (numpy: 0.4 ms at 4k, 20 ms at 100k)
CANDIDATES = 4  # candidates above the threshold verified per lookup, best first
# The cosine a candidate needs: what benchmarks/cache.py chooses for the verified modes (the lowest on
# its grid with under 1% false hits on the tune half); a lower one lets more near misses reach the checks.
THRESHOLD = 0.80


@dataclass
class CacheHit:
    response: dict
    kind: str  # "exact" | "semantic"
    score: float  # 1.0 for an exact hit, the cosine for a semantic one
    key: str  # the key of the entry served
    question: str | None = None  # the cached question a semantic hit was matched to


# -- canonical requests ----------------------------------------------------------------------------
def normalize_text(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def _canon_value(v):
    """Integral floats as ints (1.0 == 1), recursively; bools stay bools."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _canon_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_canon_value(x) for x in v]
    return v


def _canon_content(content):
    if isinstance(content, str):
        return normalize_text(content)
    if isinstance(content, list):
        parts = [{**p, "text": normalize_text(p.get("text", ""))} if isinstance(p, dict) and p.get("type") == "text"
                 else p for p in content]
        if all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
            return normalize_text(" ".join(p["text"] for p in parts))
        return _canon_value(parts)
    return _canon_value(content)


def canonical_request(request: dict) -> dict:
    """The request with what does not change the answer taken out; see the module docstring."""
    out = {}
    req = dict(request)
    if "max_completion_tokens" in req and req.get("max_tokens") is None:
        req["max_tokens"] = req.pop("max_completion_tokens")
    for k, v in req.items():
        if k in DROPPED_FIELDS or v is None or k == "messages":
            continue
        v = _canon_value(v)
        if k == "stop":
            v = [v] if isinstance(v, str) else v
            if not v:
                continue
        default = ("auto" if req.get("tools") else "none") if k == "tool_choice" else DEFAULTS.get(k, object())
        if v == default or (k == "tools" and not v):
            continue
        out[k] = v
    out["messages"] = [{k: (_canon_content(v) if k == "content" else _canon_value(v))
                        for k, v in m.items() if v is not None} for m in req.get("messages", [])]
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


def split_question(canon: dict, user: str) -> tuple[str | None, str | None]:
    """(context hash, question) of a canonical request, or (None, None) when the last message is not a
    plain-text user message (tool results, images): such requests are cached exactly only."""
    msgs = canon["messages"]
    if not msgs or msgs[-1].get("role") != "user" or not isinstance(msgs[-1].get("content"), str):
        return None, None
    question = msgs[-1]["content"]
    ctx = {**canon, "messages": [*msgs[:-1], {**msgs[-1], "content": None}]}
    return _digest({"context": ctx, "user": user}), question


def cacheable(response: dict) -> bool:
    """Whether a response may be stored: no error, no choice cut off by length or by a content filter."""
    if not isinstance(response, dict) or response.get("error"):
        return False
    return not any(isinstance(c, dict) and c.get("finish_reason") in UNSAFE_FINISH
                   for c in response.get("choices") or [])


# -- the vector index ------------------------------------------------------------------------------
class _Bucket:
    """The vectors of one context: a numpy matrix, and past FLAT_MAX an HNSW graph; removals are tombstones."""

    def __init__(self, dim: int):
        self.dim = dim
        self.ids: list[int] = []  # position -> row id (-1: removed)
        self.pos: dict[int, int] = {}
        self.vecs = np.zeros((16, dim), dtype=np.float32)
        self.hnsw = None
        self.dead = 0

    def __len__(self) -> int:
        return len(self.ids) - self.dead

    def add(self, rid: int, vec: np.ndarray) -> None:
        n = len(self.ids)
        if n == len(self.vecs):
            self.vecs = np.concatenate([self.vecs, np.zeros_like(self.vecs)])
        self.vecs[n] = vec
        self.ids.append(rid)
        self.pos[rid] = n
        if self.hnsw is not None:
            self.hnsw.add(vec[None])
        elif n + 1 > FLAT_MAX:
            self._build_hnsw()

    def _build_hnsw(self) -> None:
        try:
            import faiss
        except ImportError as e:
            raise ImportError(f"a cache context past {FLAT_MAX} entries needs FAISS: pip install faiss-cpu") from e
        index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 40, 64
        index.add(self.vecs[:len(self.ids)])
        self.hnsw = index

    def remove(self, rid: int) -> None:
        p = self.pos.pop(rid, None)
        if p is None:
            return
        self.ids[p] = -1
        self.vecs[p] = 0  # scores 0 in the flat search, below any threshold
        self.dead += 1
        if self.dead > 64 and self.dead > len(self.ids) // 2:  # compact
            keep = [i for i, r in enumerate(self.ids) if r >= 0]
            self.vecs = np.ascontiguousarray(self.vecs[keep]) if keep else np.zeros((16, self.dim), np.float32)
            self.ids = [self.ids[i] for i in keep]
            self.pos = {r: i for i, r in enumerate(self.ids)}
            self.dead, self.hnsw = 0, None
            if len(self.ids) > FLAT_MAX:
                self._build_hnsw()

    def search(self, q: np.ndarray, k: int) -> list[tuple[int, float]]:
        n = len(self.ids)
        if n == 0:
            return []
        if self.hnsw is not None:
            scores, pos = self.hnsw.search(q[None], k + min(self.dead, 32))
            hits = [(int(p), float(s)) for p, s in zip(pos[0], scores[0]) if p >= 0]
        else:
            s = self.vecs[:n] @ q  # (n,)
            top = np.argpartition(-s, k)[:k] if n > k else np.arange(n)
            hits = [(int(p), float(s[p])) for p in top]
        hits = [(self.ids[p], s) for p, s in sorted(hits, key=lambda x: -x[1]) if self.ids[p] >= 0]
        return hits[:k]


# -- the cache -------------------------------------------------------------------------------------
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, context TEXT, user TEXT NOT NULL, question TEXT,
    embedding BLOB, response TEXT NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS entries_created ON entries(created);
CREATE INDEX IF NOT EXISTS entries_last_used ON entries(last_used);
CREATE INDEX IF NOT EXISTS entries_user ON entries(user);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
_COLS = "id, key, context, user, question, embedding, response, created, last_used, hits"


@dataclass
class _Row:
    id: int
    key: str
    context: str | None
    user: str
    question: str | None
    embedding: bytes | None
    response: str
    created: float
    last_used: float
    hits: int


class Cache:
    """A chat-completion result cache in one SQLite file; see the module docstring."""

    def __init__(self, path: str | Path = ":memory:", mode: str = "semantic", ttl: float | None = 3600,
                 max_entries: int = 100_000, threshold: float = THRESHOLD, embedder=None,
                 cross_check: Callable[[str, str], bool] | str | None = None, now: Callable[[], float] = time.time,
                 verify: bool = True, contextual: str = "pair"):
        if mode not in ("semantic", "exact"):
            raise ValueError(f"mode must be 'semantic' or 'exact', not {mode!r}")
        self.path, self.mode, self.ttl, self.max_entries = str(path), mode, ttl, max_entries
        if isinstance(cross_check, str):
            if cross_check != "default":
                raise ValueError(f"cross_check must be 'default', a callable or None, not {cross_check!r}")
            from .cross_check import default_cross_check

            cross_check = default_cross_check()  # None without cross_check.safetensors: the rules alone
        self.threshold, self.cross_check, self.now = threshold, cross_check, now
        self.verify = verify  # False: serve on cosine alone (what GPTCache does); for benchmarks only
        if contextual not in CONTEXTUAL:
            raise ValueError(f"contextual must be one of {CONTEXTUAL}, not {contextual!r}")
        if contextual == "pair" and cache_verify.pair_model() is None:
            contextual = "align"  # no weights file: the threshold check instead
        self.contextual = contextual
        self._tokvecs: OrderedDict[str, np.ndarray] = OrderedDict()
        self._embedder = embedder
        self._lock = threading.RLock()
        self._buckets: dict[str, _Bucket] = {}
        self._loaded = 0  # the highest row id in the vector index
        self._count: int | None = None  # entries, counted in memory between recounts
        self._puts = 0
        self._stats = {"hits": {"exact": 0, "semantic": 0}, "misses": 0,
                       "rejected": dict.fromkeys(REASONS, 0), "stored": 0, "not_stored": 0, "expired": 0, "evicted": 0}
        self._open()

    # -- storage (RedisCache overrides these) --------------------------------------------------------
    def _open(self) -> None:
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if self.path != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def _row(self, where: str, args: tuple) -> _Row | None:
        r = self.db.execute(f"SELECT {_COLS} FROM entries WHERE {where}", args).fetchone()
        return _Row(*r) if r else None

    def _by_key(self, key: str) -> _Row | None:
        return self._row("key = ?", (key,))

    def _by_ids(self, ids: list[int]) -> dict[int, _Row]:
        rows = self.db.execute(f"SELECT {_COLS} FROM entries WHERE id IN ({','.join('?' * len(ids))})", ids)
        return {r[0]: _Row(*r) for r in rows}

    def _insert(self, row: _Row) -> tuple[int, list[int]]:
        """Store a row (replacing one with the same key); (its id, ids of rows it replaced)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            old = [r[0] for r in self.db.execute("SELECT id FROM entries WHERE key = ?", (row.key,))]
            self.db.execute("DELETE FROM entries WHERE key = ?", (row.key,))
            rid = self.db.execute("INSERT INTO entries(key, context, user, question, embedding, response, created, "
                                  "last_used, hits) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                                  (row.key, row.context, row.user, row.question, row.embedding, row.response,
                                   row.created, row.last_used)).lastrowid
        return rid, old

    def _touch(self, row: _Row, now: float) -> None:
        with self.db:
            self.db.execute("UPDATE entries SET last_used = ?, hits = hits + 1 WHERE id = ?", (now, row.id))

    def _delete(self, ids: list[int]) -> None:
        if ids:
            with self.db:
                self.db.execute(f"DELETE FROM entries WHERE id IN ({','.join('?' * len(ids))})", ids)

    def _rows_since(self, last: int) -> Iterable[tuple[int, str, bytes]]:
        return self.db.execute("SELECT id, context, embedding FROM entries WHERE id > ? AND embedding IS NOT NULL "
                               "ORDER BY id", (last,))

    def _expired_ids(self, now: float) -> list[int]:
        if self.ttl is None:
            return []
        return [r[0] for r in self.db.execute("SELECT id FROM entries WHERE created <= ?", (now - self.ttl,))]

    def _lru_excess(self) -> list[int]:
        # count(*) scans the table (ms at 100k rows): count in memory, recount every 1024 puts and
        # whenever the bound looks reached (other processes share the file).
        self._puts += 1
        if self._count is None or self._puts % 1024 == 0 or self._count + 1 > self.max_entries:
            self._count = self._size()
        else:
            self._count += 1
        n = self._count
        if n <= self.max_entries:
            return []
        self._count = self.max_entries
        return [r[0] for r in self.db.execute("SELECT id FROM entries ORDER BY last_used, id LIMIT ?",
                                              (n - self.max_entries,))]

    def _user_ids(self, user: str | None) -> list[int]:
        if user is None:
            return [r[0] for r in self.db.execute("SELECT id FROM entries")]
        return [r[0] for r in self.db.execute("SELECT id FROM entries WHERE user = ?", (user,))]

    def _size(self) -> int:
        return self.db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self.db.close()
            self._buckets.clear()

    # -- embedding and the index ---------------------------------------------------------------------
    @property
    def embedder(self):
        if self._embedder is None:
            from opengpt.assist.rag.embed import load_embedder

            self._embedder = load_embedder("default")
        return self._embedder

    def _embed(self, text: str) -> np.ndarray:
        return np.ascontiguousarray(self.embedder.embed([text])[0], dtype=np.float32)

    def _embed_full(self, text: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The sentence vector and, when the contextual check is on and the embedder has them, the
        word-piece vectors, from one forward pass."""
        e = self.embedder
        if self.verify and self.contextual != "off" and hasattr(e, "embed_with_tokens"):
            v, t = e.embed_with_tokens([text])
            return np.ascontiguousarray(v[0], dtype=np.float32), t[0]
        return self._embed(text), None

    def _remember_tokens(self, question: str, tv: np.ndarray) -> None:
        self._tokvecs[question] = tv
        self._tokvecs.move_to_end(question)
        while len(self._tokvecs) > TOKEN_CACHE:
            self._tokvecs.popitem(last=False)

    def _tokens_of(self, question: str) -> np.ndarray:
        tv = self._tokvecs.get(question)
        if tv is None:
            tv = self.embedder.token_vectors([question])[0]
        self._remember_tokens(question, tv)
        return tv

    def _contextual_ok(self, new: str, tv_new: np.ndarray | None, cached: str, score: float) -> bool:
        if tv_new is None or self.contextual == "off":
            return True
        tv_c = self._tokens_of(cached)
        if self.contextual == "align":
            return cache_verify.alignment(new, cached, tv_new, tv_c) >= cache_verify.ALIGN_MIN
        model = cache_verify.pair_model()
        f = cache_verify.pair_features(new, cached, score, tv_new, tv_c, rule=None)  # rules passed already
        return cache_verify.pair_probability(f, model) >= model["p_min"]

    def _index_add(self, rid: int, ctx: str, vec: np.ndarray) -> None:
        if ctx not in self._buckets:
            self._buckets[ctx] = _Bucket(len(vec))
        self._buckets[ctx].add(rid, vec)

    def _index_remove(self, ids: Iterable[int]) -> None:
        ids = set(ids)
        if ids:
            for b in self._buckets.values():
                for rid in ids & b.pos.keys():
                    b.remove(rid)

    def _sync(self) -> None:
        """Add rows stored since the index was last brought up to date (by us, another process, a restart)."""
        for rid, ctx, blob in self._rows_since(self._loaded):
            if rid not in getattr(self._buckets.get(ctx), "pos", ()):
                self._index_add(rid, ctx, np.frombuffer(blob, dtype=np.float32).copy())
            self._loaded = max(self._loaded, rid)

    def _forget(self, ids: list[int]) -> None:
        if not ids:
            return
        self._delete(ids)
        self._index_remove(ids)
        self._count = None  # recounted at the next put

    # -- the API -------------------------------------------------------------------------------------
    @staticmethod
    def _scope(user: str | None) -> str:
        return user or ""

    def key(self, request: dict, user: str | None = None) -> str:
        """SHA-256 hex of the canonical request and the user scope."""
        return _digest({"request": canonical_request(request), "user": self._scope(user)})

    def get(self, request: dict, user: str | None = None) -> CacheHit | None:
        scope, canon = self._scope(user), canonical_request(request)
        key = _digest({"request": canon, "user": scope})
        with self._lock:
            now = self.now()
            row = self._by_key(key)
            if row is not None and row.user == scope:
                if self._expired(row, now):
                    self._stats["expired"] += 1
                    self._forget([row.id])
                else:
                    self._touch(row, now)
                    self._stats["hits"]["exact"] += 1
                    return CacheHit(json.loads(row.response), "exact", 1.0, row.key, row.question)
            if self.mode == "semantic":
                hit = self._semantic(canon, scope, now)
                if hit is not None:
                    return hit
            self._stats["misses"] += 1
            return None

    def _expired(self, row: _Row, now: float) -> bool:
        return self.ttl is not None and now - row.created >= self.ttl

    def _semantic(self, canon: dict, scope: str, now: float) -> CacheHit | None:
        ctx, question = split_question(canon, scope)
        if ctx is None:
            return None
        self._sync()
        bucket = self._buckets.get(ctx)
        if not bucket:
            return None
        qvec, qtok = self._embed_full(question)
        cands = [(rid, s) for rid, s in bucket.search(qvec, CANDIDATES) if s >= self.threshold]
        if not cands:
            return None
        rows = self._by_ids([rid for rid, _ in cands])
        for rid, score in cands:
            row = rows.get(rid)
            if row is None:  # evicted or replaced, by us or another process
                self._index_remove([rid])
                continue
            if row.context != ctx or row.user != scope:  # cannot happen by construction; never trust it
                continue
            if self._expired(row, now):
                self._stats["expired"] += 1
                self._forget([rid])
                continue
            if self.verify:
                reason = mismatch(question, row.question)
                if reason is None and not self._contextual_ok(question, qtok, row.question, score):
                    reason = "contextual"
                if reason is None and self.cross_check is not None and not self.cross_check(question, row.question):
                    reason = "cross_check"
                if reason is not None:
                    self._stats["rejected"][reason] += 1
                    continue
            self._touch(row, now)
            self._stats["hits"]["semantic"] += 1
            return CacheHit(json.loads(row.response), "semantic", score, row.key, row.question)
        return None

    def put(self, request: dict, response: dict, user: str | None = None) -> None:
        """Store a response, unless it is unsafe to serve again (see `cacheable`)."""
        if not cacheable(response):
            self._stats["not_stored"] += 1
            return
        scope, canon = self._scope(user), canonical_request(request)
        key = _digest({"request": canon, "user": scope})
        ctx, question = split_question(canon, scope) if self.mode == "semantic" else (None, None)
        vec, tv = self._embed_full(question) if question is not None else (None, None)  # before the lock: the slow part
        with self._lock:
            now = self.now()
            row = _Row(0, key, ctx, scope, question, vec.tobytes() if vec is not None else None,
                       json.dumps(response, ensure_ascii=False), now, now, 0)
            self._sync()
            rid, replaced = self._insert(row)
            self._index_remove(replaced)
            if vec is not None:
                self._index_add(rid, ctx, vec)
            if tv is not None:
                self._remember_tokens(question, tv)
            self._loaded = max(self._loaded, rid)
            self._stats["stored"] += 1
            expired = self._expired_ids(now)
            self._stats["expired"] += len(expired)
            self._forget(expired)
            excess = self._lru_excess()
            self._stats["evicted"] += len(excess)
            self._forget(excess)

    def stats(self) -> dict:
        """Hits by kind, misses, rejected semantic candidates by reason, stored / not stored, size."""
        with self._lock:
            s = json.loads(json.dumps(self._stats))
            s["size"] = self._size()
            s["indexed"] = sum(len(b) for b in self._buckets.values())
            return s

    def clear(self, user: str | None = None) -> None:
        """Remove every entry, or with `user` only that user's ("" is the anonymous scope)."""
        with self._lock:
            self._forget(self._user_ids(user))

    def __enter__(self) -> Cache:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RedisCache(Cache):
    """The same cache on a Redis server, for several server processes: one hash per entry
    (`{prefix}e:{id}`, EXPIRE = ttl), `{prefix}k:{key}` -> id, a sorted set `{prefix}lru` (id by last
    use) for eviction, `{prefix}seq` numbering entries so each process's vector index catches up on
    what the others stored. Needs the `redis` package: pip install redis."""

    def __init__(self, url: str = "redis://localhost:6379/0", prefix: str = "opengpt:cache:", **kwargs):
        self.url, self.prefix = url, prefix
        super().__init__(path=url, **kwargs)

    def _open(self) -> None:
        try:
            import redis
        except ImportError as e:
            raise ImportError("RedisCache needs the redis package: pip install redis") from e
        self.r = redis.Redis.from_url(self.url)

    _FIELDS = ("key", "context", "user", "question", "embedding", "response", "created", "last_used", "hits")

    def _decode(self, rid: int, h: dict) -> _Row | None:
        if not h:
            return None
        g = {k.decode(): v for k, v in h.items()}
        text = lambda f: g[f].decode() if g.get(f) not in (None, b"") else None
        return _Row(rid, text("key"), text("context"), text("user") or "", text("question"), g.get("embedding") or None,
                    text("response"), float(g["created"]), float(g["last_used"]), int(g.get("hits", 0)))

    def _by_key(self, key: str) -> _Row | None:
        rid = self.r.get(self.prefix + "k:" + key)
        return self._by_ids([int(rid)]).get(int(rid)) if rid else None

    def _by_ids(self, ids: list[int]) -> dict[int, _Row]:
        p = self.r.pipeline()
        for rid in ids:
            p.hgetall(f"{self.prefix}e:{rid}")
        rows = {rid: self._decode(rid, h) for rid, h in zip(ids, p.execute())}
        missing = [rid for rid, row in rows.items() if row is None]
        if missing:  # expired through EXPIRE: drop them from the LRU set too
            self.r.zrem(self.prefix + "lru", *missing)
        return {rid: row for rid, row in rows.items() if row is not None}

    def _insert(self, row: _Row) -> tuple[int, list[int]]:
        rid = int(self.r.incr(self.prefix + "seq"))
        old = self.r.getset(self.prefix + "k:" + row.key, rid)
        fields = {"key": row.key, "context": row.context or "", "user": row.user, "question": row.question or "",
                  "embedding": row.embedding or b"", "response": row.response, "created": row.created,
                  "last_used": row.last_used, "hits": 0}
        p = self.r.pipeline()
        p.hset(f"{self.prefix}e:{rid}", mapping=fields)
        p.zadd(self.prefix + "lru", {rid: row.last_used})
        if self.ttl is not None:
            p.expire(f"{self.prefix}e:{rid}", int(self.ttl) + 1)
            p.expire(self.prefix + "k:" + row.key, int(self.ttl) + 1)
        p.execute()
        replaced = [int(old)] if old else []
        self._delete(replaced, keep_key=True)
        return rid, replaced

    def _touch(self, row: _Row, now: float) -> None:
        p = self.r.pipeline()
        p.hset(f"{self.prefix}e:{row.id}", "last_used", now)
        p.hincrby(f"{self.prefix}e:{row.id}", "hits", 1)
        p.zadd(self.prefix + "lru", {row.id: now})
        p.execute()

    def _delete(self, ids: list[int], keep_key: bool = False) -> None:
        if not ids:
            return
        rows = self._by_ids(ids) if not keep_key else {}
        p = self.r.pipeline()
        for rid in ids:
            p.delete(f"{self.prefix}e:{rid}")
        p.zrem(self.prefix + "lru", *ids)
        for row in rows.values():  # the key mapping, unless it points at a newer entry already
            p.eval("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
                   1, self.prefix + "k:" + row.key, str(row.id))
        p.execute()

    def _rows_since(self, last: int) -> Iterable[tuple[int, str, bytes]]:
        top = int(self.r.get(self.prefix + "seq") or 0)
        for start in range(last + 1, top + 1, 512):
            p = self.r.pipeline()
            ids = list(range(start, min(start + 512, top + 1)))
            for rid in ids:
                p.hmget(f"{self.prefix}e:{rid}", "context", "embedding")
            for rid, (ctx, emb) in zip(ids, p.execute()):
                if ctx and emb:
                    yield rid, ctx.decode(), emb

    def _expired_ids(self, now: float) -> list[int]:
        return []  # EXPIRE removes entries; `get` checks `created` as well, so none is served late

    def _lru_excess(self) -> list[int]:
        n = self.r.zcard(self.prefix + "lru")
        if n <= self.max_entries:
            return []
        return [int(x) for x in self.r.zrange(self.prefix + "lru", 0, n - self.max_entries - 1)]

    def _user_ids(self, user: str | None) -> list[int]:
        ids = [int(x) for x in self.r.zrange(self.prefix + "lru", 0, -1)]
        if user is None:
            return ids
        p = self.r.pipeline()
        for rid in ids:
            p.hget(f"{self.prefix}e:{rid}", "user")
        return [rid for rid, u in zip(ids, p.execute()) if u is not None and u.decode() == user]

    def _size(self) -> int:
        return int(self.r.zcard(self.prefix + "lru"))

    def close(self) -> None:
        with self._lock:
            self.r.close()
            self._buckets.clear()
