"""GGUF checkpoints (llama.cpp's single-file format) -> HF-style config, HF state dict and tokenizer.

This file owns everything GGUF-specific: parsing (`gguf.GGUFReader`, memory-mapped), dequantizing
tensors (vectorised torch for F32/F16/BF16/Q8_0/Q4_0/Q4_1, gguf's numpy reference for anything
else, K-quants included) or keeping Q8_0/Q4_0/Q4_1 tensors in their blocks (`BlockQuant`, for
`quantize="gguf"`), undoing llama.cpp's q/k row permutation, renaming tensors to Hugging Face
keys, and rebuilding the tokenizer from the vocabulary in the metadata exactly as transformers does
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`). Everything downstream (config, model
building) sees the same dicts a transformers checkpoint directory would give. Problems raise
`GGUFError`, whose message names the file and what to do about it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType

from .hf import CheckpointError


class GGUFError(CheckpointError):
    """A GGUF file we cannot load; the message names the file, the problem and the fix."""


# general.architecture -> (HF model_type, HF architecture). llama.cpp converts Mistral models as
# "llama" too (same graph, tensor names and q/k permutation), so those load as LlamaForCausalLM.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
}
_FIX = "re-download it or re-convert it with llama.cpp's convert_hf_to_gguf.py"

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Present in llama.cpp files but not weights of the HF model: rope_freqs becomes config (rope_scaling).
_NOT_WEIGHTS = {"rope_freqs.weight"}


@dataclass
class GGUFCheckpoint:
    """What a GGUF file holds, in the shapes a Hugging Face checkpoint directory would give them.

    hf_config: config.json-style dict; state_dict: HF keys, (out, in) tensors in the requested dtype
    (no lm_head.weight when the head is tied to the embedding), or `BlockQuant` for Q8_0/Q4_0/Q4_1
    tensors read with keep_packed=True; tokenizer: a `tokenizers.Tokenizer`;
    tokenizer_config: tokenizer_config.json-style dict (special tokens, chat_template, add_bos/eos);
    eos_token_ids: ids that end generation; metadata: the file's non-array fields as plain values.
    """

    hf_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor | BlockQuant]
    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_config: dict[str, Any]
    eos_token_ids: list[int]
    metadata: dict[str, Any]


# --------------------------------------------------------------------------------------------- reading


def _open(path: str | Path) -> tuple[Path, GGUFReader]:
    p = Path(path)
    if not p.exists():
        raise GGUFError(f"no such GGUF file: {p}")
    if not p.is_file():
        raise GGUFError(f"{p} is not a file; pass the path of a .gguf file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{p} is corrupt or truncated: it does not start with the GGUF magic b'GGUF' "
                        f"(found {magic!r}); {_FIX}")
    try:
        reader = GGUFReader(p)
    except Exception as e:  # noqa: BLE001  (the reader fails with whatever numpy raises on offsets past the end)
        raise GGUFError(
            f"{p} is corrupt or truncated: its header or tensor data ends early or is malformed "
            f"({p.stat().st_size} bytes; {type(e).__name__}: {e}); {_FIX}"
        ) from None
    if (parts := _value(reader, "split.count", 1)) > 1:
        raise GGUFError(f"{p} is one part of a {parts}-part split GGUF; merge the parts first with "
                        f"llama.cpp's `llama-gguf-split --merge {p.name} merged.gguf`")
    if reader.byte_order == "S":
        raise GGUFError(f"{p} is a big-endian GGUF file, which is not supported; {_FIX} (little-endian)")
    end = len(reader.data)
    for t in reader.tensors:
        if t.data_offset + int(t.n_bytes) > end:
            raise GGUFError(f"{p} is corrupt or truncated (tensor {t.name} runs past the end of the file); {_FIX}")
    return p, reader


def _value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None or not field.types:
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def _metadata(reader: GGUFReader) -> dict[str, Any]:
    return {
        key: _value(reader, key)
        for key, field in reader.fields.items()
        if field.types and field.types[0] != GGUFValueType.ARRAY
    }


def _architecture(path: Path, reader: GGUFReader) -> str:
    arch = _value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{path}: unsupported architecture {arch!r} (general.architecture); supported: {', '.join(ARCHITECTURES)}. "
            "For other models, load the original Hugging Face checkpoint directory instead"
        )
    return arch


# -------------------------------------------------------------------------------------------- config


def _rope_scaling(path: Path, reader: GGUFReader, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    get = lambda k, d=None: _value(reader, f"{arch}.rope.scaling.{k}", d)
    kind = get("type") or ("linear" if _value(reader, f"{arch}.rope.scale_linear") else "none")
    factor = get("factor") or _value(reader, f"{arch}.rope.scale_linear")
    if kind == "linear" and factor and factor != 1.0:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor or 1.0)}
        if (orig := get("original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (("attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                                 ("yarn_beta_slow", "beta_slow")):
            if (v := get(gguf_key)) is not None:
                scaling[hf_key] = float(v)
        return scaling
    if kind not in ("none", "linear"):
        raise GGUFError(f"{path}: unsupported rope scaling {kind!r} ({arch}.rope.scaling.type); "
                        "supported: linear, yarn")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return None if freqs is None else _llama3_scaling(path, torch.from_numpy(np.array(freqs.data, np.float32)),
                                                        head_dim, theta)


def _llama3_scaling(path: Path, factors: torch.Tensor, head_dim: int, theta: float) -> dict[str, Any] | None:
    # llama.cpp bakes Llama 3.x's rope scaling into a `rope_freqs` tensor of per-frequency divisors and
    # drops the parameters; recognise the ones Meta published (3.1: factor 8, 3.2: factor 32).
    if torch.all(factors == 1):
        return None
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    for factor, low, high, orig in ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 1.0, 4.0, 8192)):
        smooth = (orig / wavelen - low) / (high - low)
        mid = 1 / ((1 - smooth) / factor + smooth)
        expected = torch.where(wavelen < orig / high, 1.0, torch.where(wavelen > orig / low, factor, mid))
        if expected.shape == factors.shape and torch.allclose(expected.float(), factors.float(), rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": orig}
    raise GGUFError(f"{path}: rope_freqs.weight holds rope scaling factors that match no known Llama 3 setting; "
                    "load the original Hugging Face checkpoint directory instead")


def _hf_config(path: Path, reader: GGUFReader, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    arch = _architecture(path, reader)
    model_type, hf_arch = ARCHITECTURES[arch]

    def need(key: str) -> Any:
        value = _value(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path} has no {arch}.{key} in its metadata; {_FIX}")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = _value(reader, f"{arch}.attention.key_length") or _value(reader, f"{arch}.rope.dimension_count")
    head_dim = head_dim or hidden // heads
    theta = float(_value(reader, f"{arch}.rope.freq_base", 10000.0))
    names = {t.name for t in reader.tensors}
    vocab = _value(reader, f"{arch}.vocab_size")
    if vocab is None:  # older files: the vocabulary length, as transformers does
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = int(embd.shape[-1]) if embd is not None else need("vocab_size")
    return {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _value(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(path, reader, arch, head_dim, theta),
        "max_position_embeddings": _value(reader, f"{arch}.context_length", 4096),
        # llama.cpp writes output.weight only when the head is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _value(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def read_gguf_config(source: str | Path | GGUFCheckpoint) -> dict[str, Any]:
    """The HF-style config dict of a GGUF file (a path; no tensor data is read) or of a loaded checkpoint."""
    if isinstance(source, GGUFCheckpoint):
        return dict(source.hf_config)
    path, reader = _open(source)
    return _hf_config(path, reader)


# ----------------------------------------------------------------------------------------- tensors

_TORCH_BLOCKS = (Q.Q8_0, Q.Q4_0, Q.Q4_1)
BLOCK = 32  # weights per Q8_0 / Q4_0 / Q4_1 block


@dataclass
class BlockQuant:
    """A Q8_0, Q4_0 or Q4_1 tensor unpacked from its blocks but not dequantized (llama.cpp's ggml-quants.c).

    Along the last dim, each run of 32 weights shares a scale d (and, for Q4_1, a minimum m):
    Q8_0: w = d * q, q int8;  Q4_0: w = d * (q - 8), q in 0..15;  Q4_1: w = d * q + m, q in 0..15.
    q: (..., K) int8 (Q8_0) or uint8 (Q4); d, m: (..., K / 32) float16, exactly as stored in the file.
    """

    qtype: str  # "Q8_0" | "Q4_0" | "Q4_1"
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:
        """float32 weights, bit for bit what gguf's reference dequantizer gives."""
        d = self.d.float().unsqueeze(-1)  # (..., K/32, 1)
        q = self.q.unflatten(-1, (-1, BLOCK)).float()  # (..., K/32, 32)
        if self.qtype == "Q8_0":
            w = q * d
        elif self.qtype == "Q4_0":
            w = (q - 8) * d
        else:
            w = d * q + self.m.float().unsqueeze(-1)
        return w.flatten(-2)

    def map_rows(self, fn) -> BlockQuant:
        """The same blocks with `fn` (a permutation or reshape of the leading dim) applied to q, d and m alike."""
        return BlockQuant(self.qtype, fn(self.q), fn(self.d), None if self.m is None else fn(self.m))


def unpack_blocks(data: torch.Tensor, ggml_type: Q | int, shape: tuple[int, ...]) -> BlockQuant:
    """Raw bytes (uint8) of a Q8_0 / Q4_0 / Q4_1 tensor -> its quants and scales, shaped like `shape`."""
    qtype = Q(int(ggml_type))
    if qtype not in _TORCH_BLOCKS:
        raise GGUFError(f"{qtype.name} is not a Q8_0, Q4_0 or Q4_1 tensor; only those can be kept packed")
    block_bytes = _check_size(data, qtype, shape)
    blocks = data.reshape(-1, block_bytes)  # (n_blocks, block_bytes)
    lead = (*shape[:-1], shape[-1] // BLOCK)
    d = blocks[:, :2].contiguous().view(torch.float16).reshape(lead)
    if qtype == Q.Q8_0:
        return BlockQuant("Q8_0", blocks[:, 2:].contiguous().view(torch.int8).reshape(shape), d)
    qs = blocks[:, -16:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).reshape(shape)  # low nibbles: elements 0..15, high: 16..31
    if qtype == Q.Q4_0:
        return BlockQuant("Q4_0", q, d)
    return BlockQuant("Q4_1", q, d, blocks[:, 2:4].contiguous().view(torch.float16).reshape(lead))


def _check_size(data: torch.Tensor, qtype: Q, shape: tuple[int, ...]) -> int:
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    if (shape[-1] if shape else 1) % block_elems or data.numel() != n // block_elems * block_bytes:
        raise GGUFError(f"{data.numel()} bytes do not hold a {qtype.name} tensor of shape {tuple(shape)}")
    return block_bytes


def dequantize(data: torch.Tensor, ggml_type: Q | int, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw bytes (uint8) of one ggml tensor -> float32 tensor of `shape`.

    `shape` is the torch shape, i.e. GGUF's `ne` reversed: the last dim is the one blocks run along.
    """
    qtype = Q(int(ggml_type))
    _check_size(data, qtype, shape)
    raw = data.reshape(-1).contiguous()
    if qtype == Q.F32:
        out = raw.view(torch.float32)
    elif qtype == Q.F16:
        out = raw.view(torch.float16).float()
    elif qtype == Q.BF16:
        out = raw.view(torch.bfloat16).float()
    elif qtype in _TORCH_BLOCKS:
        out = unpack_blocks(raw, qtype, (raw.numel() // gguf.GGML_QUANT_SIZES[qtype][1] * BLOCK,)).dequantize()
    else:
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows = raw.numpy().reshape(-1, shape[-1] // block_elems * block_bytes)
        try:
            out = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows, qtype), np.float32))
        except NotImplementedError:
            raise GGUFError(f"cannot dequantize ggml type {qtype.name}; re-quantize the model to e.g. Q8_0, "
                            "Q4_K_M or Q4_0 with llama.cpp's llama-quantize") from None
    return out.reshape(shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py interleaves each head's rotary halves for ggml's rope:
    # w.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2); this swaps them back.
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_key(path: Path, name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m is None or m.group(2) not in _LAYER_TENSORS:
        raise GGUFError(
            f"{path}: unexpected tensor {name!r} for a dense llama model (mixture-of-experts and multimodal "
            "GGUF files are not supported); load the original Hugging Face checkpoint directory instead"
        )
    return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}.{m.group(3)}"


def _state_dict(path: Path, reader: GGUFReader, cfg: dict[str, Any], dtype: torch.dtype,
                progress: bool, keep_packed: bool = False) -> dict[str, torch.Tensor | BlockQuant]:
    from tqdm.auto import tqdm

    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out: dict[str, torch.Tensor | BlockQuant] = {}
    for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", disable=not progress):
        if t.name in _NOT_WEIGHTS:
            continue
        key = _hf_key(path, t.name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        try:
            # a private copy: the memory map is read-only and must not be aliased by model parameters
            raw = torch.from_numpy(np.array(reader.data[t.data_offset : t.data_offset + int(t.n_bytes)]))
            packed = keep_packed and t.tensor_type in _TORCH_BLOCKS and len(shape) == 2
            w = unpack_blocks(raw, t.tensor_type, shape) if packed else dequantize(raw, t.tensor_type, shape)
        except GGUFError as e:
            raise GGUFError(f"{path}: tensor {t.name}: {e}") from None
        except (ValueError, RuntimeError, OSError) as e:
            raise GGUFError(f"{path} is corrupt or truncated (tensor {t.name}: {e}); {_FIX}") from None
        # the permutation moves whole rows, and blocks run along a row, so packed tensors take it as they are
        n_head = heads if ".attn_q." in t.name else kv_heads if ".attn_k." in t.name else None
        if isinstance(w, BlockQuant):
            out[key] = w if n_head is None else w.map_rows(lambda x: _unpermute(x, n_head).contiguous())
        else:
            out[key] = (w if n_head is None else _unpermute(w, n_head)).to(dtype).contiguous()
    return out


# --------------------------------------------------------------------------------------- tokenizer

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers' table); any other
# value (e.g. "smollm", "default") keeps GPT-2's byte-level regex.
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte alphabet: printable bytes stand for themselves, the others are shifted past 255
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 bytes are printable
    return dict(zip(bs, map(chr, cs)))


def _generate_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    # transformers' generate_merges: a sentencepiece file lists no merges, so every split of a token
    # into two vocabulary pieces is a merge, ranked by the token's score (ties: shorter pieces first).
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _tokenizer(path: Path, reader: GGUFReader) -> tuple[Any, dict[str, Any]]:
    """The `tokenizers.Tokenizer` and tokenizer_config transformers builds for this file's vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _value(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise GGUFError(f"{path}: unsupported tokenizer.ggml.model {kind!r}; supported: gpt2 (byte-level BPE), "
                        "llama (sentencepiece BPE)")
    tokens: list[str] | None = _value(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFError(f"{path} has no vocabulary (tokenizer.ggml.tokens); {_FIX}")
    types: list[int] = _value(reader, "tokenizer.ggml.token_type") or []
    merges = _value(reader, "tokenizer.ggml.merges")
    merges = [tuple(m.split(" ")) for m in merges] if merges is not None else None

    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges or [], dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
        split = _PRE_SPLITS.get(_value(reader, "tokenizer.ggml.pre"))
        if split is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
        # a control token spelled outside the byte alphabet is a llama.cpp mislabel; transformers skips it
        control_ok = lambda t: set(t) <= alphabet
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges is None:
            merges = _generate_merges(tokens, _value(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens))
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        # transformers' LlamaTokenizer (legacy=False): prepend "▁" to the first word only, whatever
        # tokenizer.ggml.add_space_prefix says
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        control_ok = lambda t: True

    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == _CONTROL and control_ok(t)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])

    def token(key: str) -> str | None:
        i = _value(reader, f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "chat_template": _value(reader, "tokenizer.chat_template"),
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise
        "add_bos_token": bool(_value(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(_value(reader, "tokenizer.ggml.add_eos_token", False)),
    }
    # named special tokens that are not control tokens (e.g. sentencepiece's <unk>) become special too
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    named = [config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in dict.fromkeys(named) if t is not None and t not in added])

    bos, eos = config["bos_token"], config["eos_token"]
    add_bos, add_eos = config["add_bos_token"] and bos is not None, config["add_eos_token"] and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = [(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok, config


# ---------------------------------------------------------------------------------------------- API


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
              keep_packed: bool = False) -> GGUFCheckpoint:
    """Load a llama-architecture GGUF file: HF config, HF state dict, tokenizer, metadata.

    Tensors are dequantized to `dtype`, except, with keep_packed=True, 2-D Q8_0/Q4_0/Q4_1 tensors,
    which come back as `BlockQuant` (quants and scales as stored; `quantize.build_packed_model`
    turns them into packed linear layers)."""
    p, reader = _open(path)
    cfg = _hf_config(p, reader, dtype)
    try:
        tokenizer, tok_config = _tokenizer(p, reader)
    except GGUFError:
        raise
    except Exception as e:  # noqa: BLE001  (a malformed vocabulary or merge list fails deep inside `tokenizers`)
        raise GGUFError(
            f"{p}: cannot rebuild the tokenizer from its metadata ({type(e).__name__}: {e}); {_FIX}"
        ) from None
    state_dict = _state_dict(p, reader, cfg, dtype, progress, keep_packed)
    eos_ids = [_value(reader, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return GGUFCheckpoint(
        hf_config=cfg,
        state_dict=state_dict,
        tokenizer=tokenizer,
        tokenizer_config=tok_config,
        eos_token_ids=list(dict.fromkeys(i for i in eos_ids if i is not None)),
        metadata=_metadata(reader),
    )
