"""The semantic-hash index of known attack prompts: MinHash signatures with LSH banding.

A prompt is reduced to a set of shingles of its normalized text (normalize.py: NFKC, homoglyphs,
leetspeak, casefold, ...): word 3-shingles, which see sentence structure, and character 5-shingles,
which survive a few changed words and broken-up tokens. MinHash (Broder 1997) turns the set into
`num_perm` minima of independent hash functions; the fraction of positions where two signatures
agree is an unbiased estimate of the sets' Jaccard similarity. For lookup the signature is cut
into `bands` bands of `rows` rows (Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3):
two prompts become candidates when one whole band agrees, which happens with probability
1 - (1 - J^rows)^bands, so with 32 bands of 4 rows a pair at J = 0.4 is found 56% of the time and
one at J = 0.6 99.4% of the time; only candidates get the full signature comparison.

Hashing is numpy throughout (a rolling polynomial hash over code points for character shingles,
CRC32 per word for word shingles, multiply-xorshift hashing for the permutations), so a 512-token
prompt costs well under a millisecond to sign and hashes are stable across processes (Python's
`hash` is salted).

The shipped index (models/attacks.npz) holds the TRAIN split's attack prompts only (data.py), so
the benchmark on the held-out split is honest.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parent / "models"
_WORD = re.compile(r"\w+")
_M61 = np.uint64(0x9E3779B97F4A7C15)


def _norm(text: str) -> str:
    from .normalize import normalize

    return normalize(text)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a good 64-bit mixer, applied elementwise (uint64, wrapping)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def char_ngram_hashes(text: str, n: int) -> np.ndarray:
    """Stable uint64 hashes of every character n-gram of `text` (polynomial over code points)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cp) < n:
        return np.zeros(0, np.uint64)
    h = np.zeros(len(cp) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(1000003) + cp[k:len(cp) - n + 1 + k]
        return _mix(h + np.uint64(n))


def word_hashes(text: str) -> np.ndarray:
    """Stable uint64 hash per word token."""
    return np.array([zlib.crc32(w.encode()) for w in _WORD.findall(text)], np.uint64)


def word_ngram_hashes(words: np.ndarray, n: int) -> np.ndarray:
    if len(words) < n:
        return words[:0]
    h = np.zeros(len(words) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * np.uint64(0x100000001B3) + words[k:len(words) - n + 1 + k]
        return _mix(h + np.uint64(100 + n))


def shingles(norm_text: str) -> np.ndarray:
    """The shingle set of already-normalized text: word 3-shingles + char 5-shingles (whitespace folded)."""
    folded = " ".join(norm_text.split())
    w = word_hashes(folded)
    parts = [word_ngram_hashes(w, 3), char_ngram_hashes(folded, 5)]
    if len(w) < 3:  # very short prompts: the words themselves
        parts.append(_mix(w + np.uint64(7)))
    return np.unique(np.concatenate(parts))


class MinHasher:
    """`num_perm` hash functions h_i(x) = mix(x ^ seed_i); the signature is their minima over a set."""

    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.seeds = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """(num_perm,) uint64; all-ones for the empty set."""
        if len(hashes) == 0:
            return np.full(self.num_perm, np.iinfo(np.uint64).max, np.uint64)
        out = np.empty(self.num_perm, np.uint64)
        step = max(1, 4096 // max(1, len(hashes) // 256 + 1))  # bound the temporary (perms x shingles)
        with np.errstate(over="ignore"):
            for i in range(0, self.num_perm, step):
                out[i:i + step] = _mix(hashes[None, :] ^ self.seeds[i:i + step, None]).min(axis=1)
        return out


@dataclass(slots=True)
class Match:
    score: float  # estimated Jaccard similarity of the shingle sets
    label: str
    source: str
    text_preview: str


class AttackIndex:
    """Known attack prompts by MinHash signature, with LSH buckets for candidate lookup."""

    def __init__(self, num_perm: int = 128, bands: int = 32, seed: int = 1):
        if num_perm % bands:
            raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
        self.hasher = MinHasher(num_perm, seed)
        self.bands, self.rows, self.seed = bands, num_perm // bands, seed
        self.sigs: list[np.ndarray] = []
        self.labels: list[str] = []
        self.sources: list[str] = []
        self.previews: list[str] = []
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._matrix: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sigs)

    def signature(self, text: str, normalized: bool = False) -> np.ndarray:
        return self.hasher.signature(shingles(text if normalized else _norm(text)))

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [sig[b * self.rows:(b + 1) * self.rows].tobytes() for b in range(self.bands)]

    def add(self, text: str, label: str, source: str, signature: np.ndarray | None = None) -> int:
        sig = self.signature(text) if signature is None else signature
        i = len(self.sigs)
        self.sigs.append(sig)
        self.labels.append(label)
        self.sources.append(source)
        self.previews.append(" ".join(text.split())[:120])
        for b, key in enumerate(self._band_keys(sig)):
            self.buckets[b].setdefault(key, []).append(i)
        self._matrix = None
        return i

    def candidates(self, sig: np.ndarray) -> list[int]:
        found: set[int] = set()
        for b, key in enumerate(self._band_keys(sig)):
            found.update(self.buckets[b].get(key, ()))
        return sorted(found)

    def matrix(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = np.stack(self.sigs) if self.sigs else np.zeros((0, self.hasher.num_perm), np.uint64)
        return self._matrix

    def match(self, text: str, threshold: float = 0.6, signature: np.ndarray | None = None) -> Match | None:
        """The most similar indexed prompt among the LSH candidates, if its estimated Jaccard >= threshold."""
        sig = self.signature(text) if signature is None else signature
        cand = self.candidates(sig)
        if not cand:
            return None
        scores = (self.matrix()[cand] == sig).mean(axis=1)
        j = int(scores.argmax())
        if scores[j] < threshold:
            return None
        i = cand[j]
        return Match(float(scores[j]), self.labels[i], self.sources[i], self.previews[i])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, sigs=self.matrix(), labels=np.array(self.labels), sources=np.array(self.sources),
                            previews=np.array(self.previews),
                            meta=np.array([self.hasher.num_perm, self.bands, self.seed], np.int64))

    @classmethod
    def load(cls, path: str | Path) -> AttackIndex:
        with np.load(path, allow_pickle=False) as z:
            num_perm, bands, seed = (int(x) for x in z["meta"])
            index = cls(num_perm, bands, seed)
            for sig, label, source, preview in zip(z["sigs"], z["labels"], z["sources"], z["previews"]):
                i = len(index.sigs)
                index.sigs.append(sig)
                index.labels.append(str(label))
                index.sources.append(str(source))
                index.previews.append(str(preview))
                for b, key in enumerate(index._band_keys(sig)):
                    index.buckets[b].setdefault(key, []).append(i)
        return index

    @classmethod
    def load_default(cls) -> AttackIndex:
        return _load_default()


@lru_cache(maxsize=1)
def _load_default() -> AttackIndex:
    path = MODELS / "attacks.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: build it with `opengpt safety train`")
    return AttackIndex.load(path)
