"""The compiled decode step (static cache, reduction-form gemv, math attention) matches eager decoding."""

from __future__ import annotations

import pytest
import torch

from opengpt.engine.generate import CompiledDecoder, Generation
from opengpt.engine.kv_cache import KVCache
from opengpt.engine.sampler import SamplingParams
from tests.model.test_transformer import build

GREEDY = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("variant", ["dense", "moe-shared", "sliding-mixed"])
def test_compiled_greedy_equals_eager(variant):
    model = build(variant)
    prompt = list(range(3, 17))
    eager = list(Generation(model, prompt, GREEDY))
    compiled = list(Generation(model, prompt, GREEDY, compiled=CompiledDecoder(model, bucket=64)))
    assert compiled == eager


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_compiled_step_logits_close(dtype, atol):
    """fp32: equal to rounding. bf16: eager rounds every intermediate to bf16 while inductor keeps
    fused intermediates in fp32, so logits differ by a few bf16 ulps (bound: 0.1 on logits of ~O(10))."""
    model = build("moe-shared", dtype)
    dec = CompiledDecoder(model, bucket=32)
    ids = torch.randint(3, 80, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits[:, -1]
        cache = KVCache(model.config, 1, 32, dtype, static=True)
        model(ids[:, :8], positions=torch.arange(8)[None], cache=cache)
        out = dec.step(ids[:, 8:], torch.tensor([[8]]), cache)[:, -1]
    assert ref.abs().max() > 1.0  # a meaningful scale for the bound
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)


def test_cache_buckets_grow_by_powers_of_two():
    dec = CompiledDecoder(build("dense"), bucket=256)
    assert [dec.cache_len(n) for n in (1, 256, 257, 700, 1025)] == [256, 256, 512, 1024, 2048]
