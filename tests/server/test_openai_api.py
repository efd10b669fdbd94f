"""The server through the official `openai` client, against a live uvicorn server on loopback.

Expected outputs come from the single-request generation loop (`LLM.run`), so these tests check
that the server (engine batching, streaming, stop strings, n, seeds, usage) changes nothing.
"""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
import torch

from opengpt.api import Completion
from opengpt.server.app import ServerConfig, create_app
from tests.server.conftest import live_server

HI = [{"role": "user", "content": "What is the weather in Paris today?"}]


@pytest.fixture(scope="module")
def server(llm):
    app = create_app(llm, ServerConfig(model_names=["tiny", "default"]))
    with live_server(app) as url:
        yield app, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def reference(llm, ids: list[int], **sampling) -> Completion:
    c = Completion()
    for _ in llm.run(ids, c, **sampling):
        pass
    return c


def chat_ids(llm, messages) -> list[int]:
    return llm.tokenizer.encode_chat(messages)


def test_chat_matches_single_request_generation(server, llm):
    _, client = server
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=24, temperature=0)
    ref = reference(llm, chat_ids(llm, HI), max_new_tokens=24, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(chat_ids(llm, HI))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")


def test_stream_equals_non_stream_with_usage(server):
    _, client = server
    full = client.chat.completions.create(model="tiny", messages=HI, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    # without include_usage no usage is sent
    plain = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, stream=True))
    assert all(c.usage is None for c in plain)


def test_length_and_stop_finish_reasons(server, llm):
    _, client = server
    ids = chat_ids(llm, HI)
    ref = reference(llm, ids, max_new_tokens=40, temperature=0, ignore_eos=True)
    assert len(ref.text) > 12
    stop = ref.text[6:9]  # a stop string in the middle of the greedy answer
    expected = ref.text[: ref.text.find(stop)]
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=40, temperature=0, stop=[stop, "\x00zz"],
                                       extra_body={"ignore_eos": True})
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected, "stop")
    assert r.usage.completion_tokens <= len(ref.token_ids)
    streamed = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=40, temperature=0,
                                                   stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=7, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 7


def test_n_choices_and_seed_reproducibility(server):
    _, client = server
    kw = {"model": "tiny", "messages": HI, "max_tokens": 16, "temperature": 1.0, "seed": 1234, "n": 3,
          "extra_body": {"ignore_eos": True}}
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # same seed, same answers
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert a.usage.completion_tokens == 3 * 16
    other = client.chat.completions.create(**{**kw, "seed": 99, "n": 1})
    assert other.choices[0].message.content != texts[0]
    # streamed choices interleave but reassemble to the same answers
    parts = ["", "", ""]
    for c in client.chat.completions.create(**kw, stream=True):
        for ch in c.choices:
            parts[ch.index] += ch.delta.content or ""
    assert parts == texts


def test_logprobs(server, llm):
    _, client = server
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    ref = reference(llm, chat_ids(llm, HI), max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=3)
    for entry, (lp, top) in zip(content, ref.logprobs):
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.token == llm.tokenizer.decode([top[0][0]], skip_special_tokens=False)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=6, temperature=0, logprobs=True, top_logprobs=1, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert [e.logprob for lp in streamed for e in lp.content] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_penalties_and_content_parts_and_system_roles(server):
    _, client = server
    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is the weather"},
                                         {"type": "text", "text": " in Paris today?"}]}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                       presence_penalty=1.5, frequency_penalty=1.0, user="alice")
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.chat.completions.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


def test_completions(server, llm):
    _, client = server
    prompts = ["Hello world", "The quick brown"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=0, n=2, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for k, p in enumerate(prompts):
        ref = reference(llm, llm.tokenizer.encode(p), max_new_tokens=10, temperature=0)
        assert r.choices[2 * k].text == r.choices[2 * k + 1].text == ref.text
        assert len(r.choices[2 * k].logprobs.tokens) == len(r.choices[2 * k].logprobs.token_logprobs)
    assert r.usage.prompt_tokens == sum(len(llm.tokenizer.encode(p)) for p in prompts)  # once per prompt, as vLLM
    echo = client.completions.create(model="tiny", prompt="Hello world", max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hello world")
    ids = llm.tokenizer.encode("Hello world")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    chunks = list(client.completions.create(model="tiny", prompt="Hello world", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage == by_ids.usage


def test_embeddings(server, llm):
    _, client = server
    r = client.embeddings.create(model="tiny", input=["hello world", "the lazy dog", "hello world"])
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, llm.config.hidden_size) and [d.index for d in r.data] == [0, 1, 2]
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vecs[0], vecs[2], rtol=1e-6)
    assert not np.allclose(vecs[0], vecs[1])
    assert r.usage.prompt_tokens == 2 * len(llm.tokenizer.encode("hello world")) + len(llm.tokenizer.encode("the lazy dog"))
    # One token: the pooled state is the final (normed) hidden state, so the LM head maps it onto
    # the model's logits up to the normalisation scale.
    tok = llm.tokenizer.encode("hello")[:1]
    one = torch.tensor(client.embeddings.create(model="tiny", input=[tok]).data[0].embedding)
    with torch.no_grad():
        logits = llm.model(torch.tensor([tok])).logits[0, -1]
        projected = llm.model.lm_head(one)
    torch.testing.assert_close(projected * (logits.norm() / projected.norm()), logits, atol=1e-4, rtol=1e-4)
    b64 = client.embeddings.create(model="tiny", input="hello world", encoding_format="base64")
    raw = b64.data[0].embedding
    decoded = np.frombuffer(base64.b64decode(raw), dtype="<f4") if isinstance(raw, str) else np.array(raw)
    np.testing.assert_allclose(decoded, vecs[0], rtol=1e-5)


def test_models_and_health(server):
    _, client = server
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    import httpx

    base = str(client.base_url).removesuffix("/v1/")
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    metrics = httpx.get(base + "/metrics").text
    for name in ("opengpt_requests_total", "opengpt_generation_tokens_total", "opengpt_kv_blocks_in_use",
                 "opengpt_time_to_first_token_seconds_bucket", "opengpt_time_per_output_token_seconds_count",
                 "opengpt_requests_waiting"):
        assert name in metrics
    assert 'route="/v1/chat/completions",status="200"' in metrics
