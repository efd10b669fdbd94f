"""A trained cross-encoder that says whether two questions ask the same thing: the cache's last check.

The bundled all-MiniLM-L6-v2 encoder reads the pair as one sequence, "[CLS] a [SEP] b [SEP]" with
token types 0 / 1 (`BertEmbedder.pair_hidden`, the same forward code as `embed`), so every word of one
question attends to every word of the other: cat / dog, "while pregnant", "from X to Y" are seen in
context, which cosine of two separate sentence vectors cannot do. Its top two layers (`TUNED_LAYERS`)
were fine-tuned, the rest is the bundled model unchanged; a logistic head reads
[cls, u, v, |u - v|, u * v] where u / v are the mean last-layer states of the tokens of a / b.
The score is symmetrised: the mean logit of (a, b) and (b, a), one batch of two.

The weights (the tuned layers in float16, the head in float32) and the acceptance probability
`p_min` live in cross_check.safetensors next to this file (its metadata says how they were trained);
`benchmarks/train_cross_check.py` writes it. Loading is lazy and happens once per `CrossCheck`;
`default_cross_check()` is the shared instance, None when the file is missing.

    cc = default_cross_check()
    cc.probability("How do I wash a cat?", "How do I wash a dog?")   # low
    cc("How do I wash a cat?", "How do I wash a dog?")               # False: reject the candidate
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import numpy as np

MODEL_FILE = Path(__file__).with_name("cross_check.safetensors")
TUNED_LAYERS = (4, 5)  # fine-tuned encoder layers (0-based, of 6); the layers below are the bundled ones


def pair_features(x, tokens):
    """[cls, u, v, |u - v|, u * v] from last-layer states x (batch, tokens, dim) of pairs; u / v the mean
    state over the tokens of type 0 / type 1 (the separators included)."""
    import torch

    m = tokens["attention_mask"].float()
    ta = (tokens["type_ids"] == 0).float() * m
    tb = (tokens["type_ids"] == 1).float() * m
    u = (x * ta[..., None]).sum(1) / ta.sum(1, keepdim=True).clamp(min=1.0)
    v = (x * tb[..., None]).sum(1) / tb.sum(1, keepdim=True).clamp(min=1.0)
    return torch.cat([x[:, 0], u, v, (u - v).abs(), u * v], dim=-1)


class CrossCheck:
    """`cc(new, cached) -> bool`: serve only if the cross-encoder's probability is >= p_min."""

    def __init__(self, path: str | Path = MODEL_FILE, embedder=None, p_min: float | None = None):
        self.path = Path(path)
        self._embedder = embedder
        self._p_min = p_min
        self._weights: dict | None = None
        self._head = None
        self.meta: dict = {}
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._weights is not None:
                return
            from safetensors import safe_open

            from .rag.embed import BertEmbedder, default_model_dir

            tensors, meta = {}, {}
            with safe_open(str(self.path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():
                    tensors[k] = f.get_tensor(k).float()
            self.meta = meta
            self._head = (tensors.pop("head.weight"), tensors.pop("head.bias"))
            if self._embedder is None:
                self._embedder = BertEmbedder(default_model_dir(), name="sentence-transformers/all-MiniLM-L6-v2")
            if self._p_min is None:
                self._p_min = float(meta["p_min"])
            self._weights = tensors

    @property
    def p_min(self) -> float:
        self._load()
        return float(self._p_min)

    def logits(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Symmetrised logits, one per pair: the mean over (a, b) and (b, a)."""
        import torch

        self._load()
        both = [p for a, b in pairs for p in ((a, b), (b, a))]
        with torch.inference_mode():
            x, t = self._embedder.pair_hidden(both, weights=self._weights)
            z = torch.nn.functional.linear(pair_features(x, t), *self._head)[:, 0]
        return z.view(-1, 2).mean(1).cpu().numpy().astype(np.float64)

    def probabilities(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits(pairs)))

    def probability(self, a: str, b: str) -> float:
        return float(self.probabilities([(a, b)])[0])

    def __call__(self, new: str, cached: str) -> bool:
        return self.probability(new, cached) >= self.p_min

    def info(self) -> dict:
        self._load()
        return {"path": str(self.path), "p_min": self.p_min,
                **{k: (json.loads(v) if k == "training" else v) for k, v in self.meta.items() if k != "p_min"}}


@functools.lru_cache(maxsize=1)
def default_cross_check() -> CrossCheck | None:
    """The shared cross-check of cross_check.safetensors (loaded on first use), None without the file."""
    return CrossCheck() if MODEL_FILE.is_file() else None
