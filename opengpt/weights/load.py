"""Checkpoint dispatch: a path (HF directory, .gguf file or "default") -> (config, model, tokenizer).

The kind of file is told by its content (a directory with config.json, or the GGUF magic bytes),
the architecture by what the checkpoint declares. Models are built on the meta device and the
weights assigned after a strict key and shape check.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer
from .default import default_model_path
from .hf import CheckpointError, check_state_dict, read_config, read_hf_state_dict

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_path(path: str | Path) -> Path:
    if str(path) == "default":
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(
            f"no such file or directory: {path}; pass a Hugging Face checkpoint directory, a .gguf file, or 'default'"
        )
    return p


def build_model(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, device="cpu",
                source: str = "checkpoint") -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    check_state_dict(state_dict, model.state_dict(), source)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.rotary.to_empty(device=device)
    model.rotary.reset_parameters()
    return model.eval()


def release_freed_memory() -> None:
    """Hand memory that loading freed back to the OS.

    Loading frees large temporaries (dequantized float32 tensors before the dtype cast, raw tensor
    bytes). glibc's malloc keeps such chunks in its heap for reuse, where they stay resident: on the
    default model in bf16 that was 30-40 MiB of RSS that no tensor used (benchmarks/memory.py).
    `malloc_trim(0)` returns every free page; a no-op where the C library is not glibc."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return
    if trim is not None:
        trim(0)


def load_model(path: str | Path = "default", dtype: str | torch.dtype = "float32", device="cpu",
               progress: bool = False, quantize: str | None = None) -> tuple[ModelConfig, Transformer, Tokenizer, Path]:
    """quantize: None (float weights), "int8" / "int4" (weight-only quantization after loading), or
    "gguf" (a GGUF file's Q8_0 / Q4_0 / Q4_1 tensors stay in their blocks, see quantize.py). A
    checkpoint written by `opengpt quantize` loads quantized as stored, without `quantize`."""
    loaded = _load_model(path, dtype, device, progress, quantize)
    release_freed_memory()
    return loaded


def _load_model(path, dtype, device, progress, quantize) -> tuple[ModelConfig, Transformer, Tokenizer, Path]:
    p = resolve_path(path)
    dt = resolve_dtype(dtype)
    quantize = quantize or None
    if quantize is not None:
        from ..quantize import check_mode

        check_mode(quantize, load=True)
    if p.is_dir():
        from ..quantize import QuantizeError, load_quantized, read_quantization_config

        qcfg = read_quantization_config(p)
        cfg = read_config(p)
        tok = Tokenizer.from_dir(p)
        if qcfg is not None:
            if quantize is not None:
                raise QuantizeError(f"{p} is already quantized ({qcfg['mode']}, written by `opengpt quantize`); "
                                    "load it without quantize")
            return cfg, load_quantized(p, cfg, qcfg, dt, device, progress), tok, p
        if quantize == "gguf":
            raise QuantizeError(f"quantize='gguf' keeps the quantized blocks of a GGUF file packed, and {p} is a "
                                "checkpoint directory; use quantize='int8' or 'int4', or load a .gguf file")
        sd = read_hf_state_dict(p, cfg, progress)
    else:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CheckpointError(
                f"{p} is neither a checkpoint directory nor a GGUF file (it starts with {magic!r}, not b'GGUF')"
            )
        from .gguf import read_gguf

        ckpt = read_gguf(p, dtype=dt, progress=progress, keep_packed=quantize == "gguf")
        try:
            cfg = ModelConfig.from_hf_config(ckpt.hf_config)
        except ConfigError as e:
            raise CheckpointError(f"{p}: {e}") from e
        from .hf import convert_hf_state_dict

        sd = convert_hf_state_dict(ckpt.state_dict.items(), cfg)
        tok = Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config, ckpt.eos_token_ids)
    if quantize == "gguf":
        from ..quantize import build_packed_model

        return cfg, build_packed_model(cfg, sd, dt, device, source=str(p)), tok, p
    model = build_model(cfg, sd, dt, device, source=str(p))
    if quantize is not None:
        from ..quantize import quantize_model

        quantize_model(model, quantize)
    return cfg, model, tok, p
