"""The assistant services of the server (server/assistant.py) through real HTTP and the real
`openai` client: the result cache (scoped by user and sampling parameters, kept across a restart,
replayed to streams), POST /v1/feedback into the store and out as TRL records, and routing with
fallback when a backend is down."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import yaml

from opengpt.assist.cache import Cache
from opengpt.assist.feedback import FeedbackStore
from opengpt.assist.router import Router, load_router_config
from opengpt.server.app import ServerConfig, create_app
from tests.server.conftest import free_port, live_server
from tests.server.test_tools import CHATML, scripted_llm

PIECES = ["The", " answer", " is", " forty", "-two."]
ASK = [{"role": "user", "content": "What is the answer to everything?"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return scripted_llm(tmp_path_factory.mktemp("scripted"), CHATML, PIECES)


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, **kw)


def generated(app) -> float:
    return sum(app.state.metrics.generation_tokens.values.values())


def test_cache_scopes_and_restart(llm, tmp_path):
    db = tmp_path / "cache.db"
    app = create_app(llm, ServerConfig(), cache=Cache(db, mode="exact"))
    with live_server(app) as url:
        c = client(url)
        first = c.chat.completions.create(model="default", messages=ASK, temperature=0, user="alice")
        assert first.choices[0].message.content == "The answer is forty-two." and "cache" not in first.model_extra
        spent = generated(app)
        again = c.chat.completions.create(model="default", messages=ASK, temperature=0, user="alice")
        assert again.model_extra["cache"]["kind"] == "exact" and again.id != first.id
        assert again.choices[0].message.content == first.choices[0].message.content and generated(app) == spent
        # never across users, never across sampling parameters
        assert "cache" not in c.chat.completions.create(model="default", messages=ASK, temperature=0,
                                                        user="bob").model_extra
        assert "cache" not in c.chat.completions.create(model="default", messages=ASK, temperature=0.5,
                                                        user="alice").model_extra
        assert "cache" not in c.chat.completions.create(model="default", messages=ASK, temperature=0,
                                                        max_tokens=3, user="alice").model_extra
        # a streamed request is answered from the cache as chunks
        chunks = list(c.chat.completions.create(model="default", messages=ASK, temperature=0, user="alice",
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "The answer is forty-two."
        assert chunks[-1].choices[0].finish_reason == "stop"
    app.state.assistant.cache.close()
    # a restart keeps the entries
    app2 = create_app(llm, ServerConfig(), cache=Cache(db, mode="exact"))
    with live_server(app2) as url:
        r = client(url).chat.completions.create(model="default", messages=ASK, temperature=0, user="alice")
        assert r.model_extra["cache"]["kind"] == "exact" and generated(app2) == 0


def test_streamed_answer_is_cached_from_its_chunks(llm, tmp_path):
    app = create_app(llm, ServerConfig(), cache=Cache(tmp_path / "c.db", mode="exact"))
    with live_server(app) as url:
        c = client(url)
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="default", messages=ASK, temperature=0, stream=True) if ch.choices)
        deadline = time.monotonic() + 10  # stored after [DONE] went out, so the client never waits for it
        while app.state.assistant.cache.stats()["size"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = c.chat.completions.create(model="default", messages=ASK, temperature=0)
        assert r.model_extra["cache"]["kind"] == "exact" and r.choices[0].message.content == text


def test_feedback_api_store_and_export(llm, tmp_path):
    db = tmp_path / "fb.db"
    app = create_app(llm, ServerConfig(), feedback=FeedbackStore(db))
    with live_server(app) as url:
        c = client(url)
        a = c.chat.completions.create(model="default", messages=ASK, temperature=0)
        b = c.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=2)
        other = c.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hello?"}])
        post = lambda body: httpx.post(url + "/v1/feedback", json=body, timeout=10)
        assert post({"response_id": a.id, "rating": "up"}).json()["kind"] == "rating"
        assert post({"response_id": b.id, "rating": "down"}).status_code == 200
        assert post({"chosen_id": a.id, "rejected_id": b.id}).json()["kind"] == "preference"
        r = post({"response_id": "chatcmpl-nope", "rating": "up"})
        assert r.status_code == 404 and "chatcmpl-nope" in r.json()["error"]["message"]
        assert post({"chosen_id": a.id, "rejected_id": other.id}).status_code == 400  # different prompts
        assert post({"response_id": a.id}).status_code == 400
        assert post({"response_id": a.id, "rating": "sideways"}).status_code == 400
    app.state.assistant.feedback.close()
    store = FeedbackStore(db)  # a restart keeps everything
    out = tmp_path / "dpo.jsonl"
    assert store.export("dpo", out) == 1
    rec = json.loads(out.read_text())
    assert rec["prompt"] == ASK
    assert rec["chosen"] == [{"role": "assistant", "content": "The answer is forty-two."}]
    assert rec["rejected"] == [{"role": "assistant", "content": "The answer"}]


def test_feedback_endpoint_without_a_store_says_how_to_enable_it(llm):
    app = create_app(llm, ServerConfig(), cache=Cache(":memory:", mode="exact"))
    with live_server(app) as url:
        r = httpx.post(url + "/v1/feedback", json={"response_id": "x", "rating": "up"}, timeout=10)
        assert r.status_code == 404 and "--feedback-db" in r.json()["error"]["message"]


def test_router_falls_back_when_a_backend_is_down(llm, tmp_path):
    upstream = create_app(llm, ServerConfig())
    with live_server(upstream) as up:
        cfg = {"backends": [
            {"name": "cheap", "kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "default",
             "cost_per_1k_prompt": 0.1, "cost_per_1k_completion": 0.1},
            {"name": "strong", "kind": "openai", "base_url": up + "/v1", "model": "default",
             "cost_per_1k_prompt": 1.0, "cost_per_1k_completion": 2.0}],
            "thresholds": {"cheap": 1.0}}
        path = tmp_path / "router.yaml"
        path.write_text(yaml.safe_dump(cfg))
        gateway = create_app(llm, ServerConfig(), router=Router(load_router_config(path)))
        with live_server(gateway) as url:
            r = client(url).chat.completions.create(model="anything", messages=ASK, temperature=0)
            assert r.choices[0].message.content == "The answer is forty-two."
            route = r.model_extra["router"]
            assert route["chosen"] == "cheap" and route["backend"] == "strong"
            assert [a["backend"] for a in route["fallbacks"]] == ["cheap"] and route["cost"] > 0
            chunks = list(client(url).chat.completions.create(model="anything", messages=ASK, stream=True))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
