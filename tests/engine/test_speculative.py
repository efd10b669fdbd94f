"""Speculative decoding: with greedy sampling its output is identical to plain decoding."""

from __future__ import annotations

import pytest

from opengpt import LLM
from opengpt.engine.generate import Generation
from opengpt.engine.sampler import SamplingParams
from opengpt.engine.speculative import DraftModelProposer, NgramProposer, SpeculativeGeneration
from tests.model.test_transformer import build

REPEATS = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]


def greedy(n=30, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.mark.parametrize("variant", ["dense", "moe-shared", "sliding-mixed"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_ngram_speculation_equals_plain(variant, penalty):
    model = build(variant)
    params = greedy(repetition_penalty=penalty)
    spec = SpeculativeGeneration(model, REPEATS, params, NgramProposer(n=3, k=4))
    assert list(spec) == list(Generation(model, REPEATS, params))
    assert spec.stats["proposed"] > 0


@pytest.mark.parametrize("draft_variant", ["dense", "sliding-mixed"])
def test_draft_model_speculation_equals_plain(draft_variant):
    target = build("dense")
    draft = target if draft_variant == "dense" else build(draft_variant)  # perfect draft, then a poor one
    spec = SpeculativeGeneration(target, REPEATS, greedy(), DraftModelProposer(draft, k=3))
    assert list(spec) == list(Generation(target, REPEATS, greedy()))
    if draft is target:
        assert spec.stats["accepted"] == spec.stats["proposed"] > 0
        assert spec.stats["target_forwards"] <= 30 // 4 + 1  # k + 1 tokens per target forward


def test_stops_at_eos_and_at_max_tokens():
    model = build("dense")
    plain = list(Generation(model, REPEATS, greedy(12)))
    spec = SpeculativeGeneration(model, REPEATS, greedy(12), NgramProposer())
    assert list(spec) == plain and spec.finish_reason == "length"
    eos = plain[5]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    spec = SpeculativeGeneration(model, REPEATS, params, NgramProposer(), eos_ids={eos})
    assert list(spec) == plain[: plain.index(eos) + 1] and spec.finish_reason == "stop"


def test_sampling_is_refused():
    with pytest.raises(ValueError, match="greedy"):
        SpeculativeGeneration(build("dense"), REPEATS, SamplingParams(temperature=0.8), NgramProposer())


def test_ngram_proposals():
    p = NgramProposer(n=2, k=3)
    assert p.propose([1, 2, 3, 4, 1, 2]) == [3, 4, 1]
    assert p.propose([1, 2, 3]) == []


def test_default_model_prompt_lookup():
    llm = LLM.load("default")
    text = "def add(a, b):\n    return a + b\n\n\ndef add_three(a, b, c):\n    return"
    ids = llm.tokenizer.encode(text)
    spec = SpeculativeGeneration(llm.model, ids, greedy(40), NgramProposer())
    assert list(spec) == list(Generation(llm.model, ids, greedy(40)))
    assert spec.stats["accepted"] > 0


def test_llm_speculative_generate_equals_plain(tmp_path):
    plain = LLM.load("default")
    spec = LLM.load("default", speculative="ngram")
    prompt = "List: apple, banana, cherry. Again: apple, banana,"
    assert spec.generate(prompt, max_new_tokens=24, temperature=0) == plain.generate(prompt, max_new_tokens=24,
                                                                                      temperature=0)
