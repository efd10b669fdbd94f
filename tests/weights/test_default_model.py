"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF): ours vs transformers on the same file."""

from __future__ import annotations

import pytest
import torch
import transformers

from opengpt import LLM
from opengpt.engine.generate import Generation
from opengpt.engine.sampler import SamplingParams

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy? 答えて 🙂"},
]


@pytest.fixture(scope="module")
def both(default_gguf):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        default_gguf.parent, gguf_file=default_gguf.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    return hf, tok, LLM.load("default")


def test_logits_close(both):
    hf, tok, llm = both
    ids = torch.tensor([tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)])
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(llm.logits(ids), expected, atol=2e-4, rtol=1e-4)


def test_greedy_continuation_identical(both):
    hf, tok, llm = both
    ids = tok("The three primary colors are", return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_token_id)
    ours = list(Generation(llm.model, ids[0].tolist(), SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)))
    assert ours == out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_identical(both, gen_prompt):
    _, tok, llm = both
    expected = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen_prompt, tokenize=False)
    assert llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=gen_prompt) == expected
    assert llm.tokenizer.encode_chat(MESSAGES, add_generation_prompt=gen_prompt) == tok.apply_chat_template(
        MESSAGES, add_generation_prompt=gen_prompt, return_dict=False)


def test_chat_reply_stops_at_end_of_turn(both):
    _, _, llm = both
    reply = llm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=48, temperature=0)
    assert "Paris" in reply
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_bfloat16_generates_same_start(both):
    _, _, llm = both
    bf = LLM.load("default", dtype="bfloat16")
    assert bf.dtype == torch.bfloat16
    a = llm.generate("The capital of France is", max_new_tokens=4, temperature=0)
    b = bf.generate("The capital of France is", max_new_tokens=4, temperature=0)
    assert a.split()[0] == b.split()[0]


def test_stream_equals_generate_and_seed_reproducible(both):
    _, _, llm = both
    kw = dict(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=7)
    streamed = "".join(llm.stream("Once upon a time", **kw))
    assert streamed == llm.generate("Once upon a time", **kw)
    assert llm.generate(["Once upon a time", "Hello"], **kw)[0] == streamed  # seeded: independent of the batch


def test_batched_generate_equals_one_by_one(both):
    _, _, llm = both
    prompts = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,", "Roses are red,"]
    kw = dict(max_new_tokens=20, temperature=0, stop=["\n\n"])
    assert llm.generate(prompts, **kw) == [llm.generate(p, **kw) for p in prompts]


def test_stop_string(both):
    _, _, llm = both
    full = llm.generate("1, 2, 3, 4, 5,", max_new_tokens=16, temperature=0)
    assert " 7" in full
    cut = llm.generate("1, 2, 3, 4, 5,", max_new_tokens=16, temperature=0, stop=[" 7"])
    assert cut == full[: full.index(" 7")]
    # batched: the request is aborted at the stop string and its blocks are free at once
    assert llm.generate(["1, 2, 3, 4, 5,", "Hi"], max_new_tokens=16, temperature=0, stop=[" 7"])[0] == cut
    assert llm.engine.kv.pool.num_free == llm.engine.num_blocks and not llm.engine.requests
