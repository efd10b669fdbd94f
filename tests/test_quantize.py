"""Weight-only INT8 / INT4: kernels equal their dequantized reference, error bounds, and the default model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opengpt import LLM
from opengpt.quantize import (Int4Linear, Int8Linear, QuantizeError, dequantize_int4, quantize_int4, quantize_int8,
                              quantize_model)
from tests.model.test_transformer import build

W = torch.randn(192, 128, generator=torch.Generator().manual_seed(0))
X = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(1))


def test_int8_rounding_error_at_most_half_a_step():
    q, s = quantize_int8(W)
    assert ((q.float() * s[:, None] - W).abs() <= s[:, None] / 2 + 1e-6).all()


def test_int4_rounding_error_at_most_half_a_step():
    q, s, z = quantize_int4(W, 32)
    assert q.min() >= 0 and q.max() <= 15
    err = (dequantize_int4(q, s, z) - W).reshape(192, 4, 32).abs()
    assert (err <= s[..., None] / 2 + 1e-5).all()


@pytest.mark.parametrize("layer", ["int8", "int4"])
def test_kernel_equals_dequantized_reference(layer):
    """The packed kernels compute x @ dequant(W)^T (in bf16: bound 1% of the output scale)."""
    if layer == "int8":
        lin = Int8Linear(W, bias=torch.ones(192))
        q, s = quantize_int8(W)
        deq = q.float() * s.bfloat16().float()[:, None]
    else:
        lin = Int4Linear(W, bias=torch.ones(192), group_size=32)
        q, s, z = quantize_int4(W, 32)
        deq = dequantize_int4(q, s.bfloat16().float(), z.bfloat16().float())
    ref = X.bfloat16().float() @ deq.t() + 1
    out = lin(X)
    assert out.dtype == X.dtype and out.shape == (3, 5, 192)
    torch.testing.assert_close(out, ref, atol=0.01 * ref.abs().max().item(), rtol=0)


def test_kernel_shape_limits_are_refused_not_crashed():
    with pytest.raises(QuantizeError, match="in_features % 16"):
        Int8Linear(torch.randn(32, 40))
    with pytest.raises(QuantizeError, match="out_features % 16"):
        Int4Linear(torch.randn(24, 64))


def test_swap_covers_attention_mlp_shared_expert_and_tied_head():
    model = build("moe-shared")  # hidden 48; the shared expert's down_proj (K=40) stays float
    ids = torch.randint(0, 80, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids).logits
        quantize_model(model, "int8")
        out = model(ids).logits
    names = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert "lm_head" in names and "layers.0.self_attn.q_proj" in names and "layers.0.mlp.shared_expert.up_proj" in names
    floats = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert floats == {f"layers.{i}.mlp.shared_expert.down_proj" for i in (0, 2)}
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_unknown_mode():
    with pytest.raises(QuantizeError, match="unknown quantization 'int3'"):
        quantize_model(build("dense"), "int3")


@pytest.fixture(scope="module")
def default_fp32():
    return LLM.load("default")


@pytest.mark.parametrize("mode,min_agree,max_nll_increase", [("int8", 0.93, 0.03), ("int4", 0.83, 0.08)])
def test_default_model_quality(default_fp32, mode, min_agree, max_nll_increase):
    """Top-1 agreement with fp32 and next-token loss on a held text (this repo's README)."""
    from pathlib import Path

    text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text()
    ids = torch.tensor([default_fp32.tokenizer.encode(text)[:160]])
    base = default_fp32.logits(ids)
    q = LLM.load("default", quantize=mode)
    out = q.logits(ids)
    agree = (out.argmax(-1) == base.argmax(-1)).float().mean().item()
    nll = F.cross_entropy(out[0, :-1], ids[0, 1:]).item()
    base_nll = F.cross_entropy(base[0, :-1], ids[0, 1:]).item()
    assert agree >= min_agree
    assert nll - base_nll <= max_nll_increase
    assert q.generate("The capital of France is", max_new_tokens=6, temperature=0).strip()
