"""Bad input, keys, limits, overload, timeouts and disconnects: every error in OpenAI's shape with the
right status, and no request ever leaves KV blocks behind."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from opengpt.server.app import ServerConfig, create_app, read_api_keys
from tests.server.conftest import live_server, tiny_llm

LONG = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "ignore_eos": True}


@pytest.fixture(scope="module")
def long_llm(tmp_path_factory):
    """Context 4096, so a request can run long enough to be cut off."""
    return tiny_llm(tmp_path_factory.mktemp("long"), ctx=4096)


@pytest.fixture(scope="module")
def server(long_llm):
    app = create_app(long_llm, ServerConfig(max_body_bytes=64 << 10))
    with live_server(app) as url:
        yield app, url


def idle(app, timeout: float = 30.0) -> bool:
    """Wait until the engine holds no request, every KV block is free and every admission slot returned."""
    engine = app.state.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        admission = app.state.serving.admission
        if (not engine.requests and engine.kv.pool.num_free == engine.num_blocks and not engine.kv.requests
                and admission.used == 0 and not admission.queue):
            return True
        time.sleep(0.02)
    return False


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"model": "default", "messages": []}, "messages"),
    ({"model": "default"}, "messages"),
    ({"model": "default", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"model": "default", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "default", "messages": [{"role": "user", "content": "hi"}], "n": 0}, "n"),
    ({"model": "default", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ({"model": "default", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": "default", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    ({"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
])
def test_bad_fields_are_400_naming_the_field(server, body, param):
    _, url = server
    err = error(httpx.post(url + "/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param.split(".")[0])


def test_malformed_json_unknown_routes_and_models(server):
    _, url = server
    err = error(httpx.post(url + "/v1/chat/completions", content=b'{"model": "default", "messages": [',
                           headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in err["message"]
    error(httpx.post(url + "/v1/chat/completions", content=b"\xff\xfe", headers={"Content-Type": "application/json"}), 400)
    error(httpx.post(url + "/v1/nothing", json={}), 404)
    error(httpx.get(url + "/v1/chat/completions"), 405)
    err = error(httpx.post(url + "/v1/chat/completions", json={**LONG, "model": "gpt-4o", "max_tokens": 1}), 404)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    error(httpx.post(url + "/v1/embeddings", json={"model": "nope", "input": "x"}), 404)
    error(httpx.post(url + "/v1/completions", json={"model": "default", "prompt": [99999999]}), 400)
    error(httpx.post(url + "/v1/completions", json={"model": "default", "prompt": "x", "suffix": "y"}), 400)


def test_prompt_over_context_is_400(server):
    _, url = server
    long_prompt = "the quick brown fox " * 2000  # > 4096 tokens
    err = error(httpx.post(url + "/v1/chat/completions",
                           json={"model": "default", "messages": [{"role": "user", "content": long_prompt}]}), 400)
    assert err["code"] == "context_length_exceeded" and "4096" in err["message"]
    err = error(httpx.post(url + "/v1/chat/completions", json={**LONG, "max_tokens": 5000}), 400)
    assert err["param"] == "max_tokens"
    error(httpx.post(url + "/v1/completions", json={"model": "default", "prompt": long_prompt}), 400)
    error(httpx.post(url + "/v1/embeddings", json={"model": "default", "input": long_prompt}), 400)


def test_body_size_limit_is_413(server):
    _, url = server
    big = json.dumps({**LONG, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}).encode()
    assert error(httpx.post(url + "/v1/chat/completions", content=big,
                            headers={"Content-Type": "application/json"}), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is counted while reading
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    error(httpx.post(url + "/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"}), 413)
    assert httpx.get(url + "/health").status_code == 200


def test_api_keys(long_llm, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# local keys\nsk-one\n\nsk-two\n")
    assert read_api_keys(keyfile) == ["sk-one", "sk-two"]
    app = create_app(long_llm, ServerConfig(api_keys=read_api_keys(keyfile)))
    body = {**LONG, "max_tokens": 2}
    with live_server(app) as url:
        assert error(httpx.post(url + "/v1/chat/completions", json=body), 401)["type"] == "authentication_error"
        for bad in ("Bearer sk-three", "Bearer sk-on", "Basic sk-one", "sk-one"):
            error(httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": bad}), 401)
        error(httpx.get(url + "/v1/models"), 401)
        # 401 comes before the body is even parsed
        error(httpx.post(url + "/v1/chat/completions", content=b"{", headers={"Authorization": "Bearer x"}), 401)
        for key in ("sk-one", "sk-two"):
            r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert httpx.get(url + "/health").status_code == 200


async def _stream_and_drop(client: httpx.AsyncClient, url: str, events: int) -> int:
    """Open a streaming request, read a few events, hang up; returns the events seen."""
    seen = 0
    async with client.stream("POST", url + "/v1/chat/completions", json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen >= events:
                    break
    return seen


def test_twenty_clients_disconnecting_mid_stream_free_every_kv_block(server):
    app, url = server

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*(_stream_and_drop(client, url, 3 + i % 5) for i in range(20)))

    assert all(n >= 3 for n in asyncio.run(main()))
    assert idle(app), "aborted streams left engine requests or KV blocks behind"
    assert httpx.get(url + "/health").status_code == 200


def test_non_streaming_client_disconnect_aborts(server):
    app, url = server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=LONG, timeout=0.3)
    assert idle(app)


def test_request_timeout(long_llm):
    app = create_app(long_llm, ServerConfig(request_timeout=0.3))
    with live_server(app) as url:
        err = error(httpx.post(url + "/v1/chat/completions", json=LONG, timeout=60), 504)
        assert err["code"] == "timeout"
        events = [line for line in httpx.post(url + "/v1/chat/completions", json={**LONG, "stream": True},
                                              timeout=60).text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "timeout"
        # raw completions, streamed with usage: the 504 event, then the usage chunk, then [DONE]
        body = {"model": "default", "prompt": "hi", "max_tokens": 3000, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = [line for line in httpx.post(url + "/v1/completions", json=body, timeout=60).text.splitlines()
                  if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[-3][6:])["error"]["code"] == "timeout"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] > 0
        assert idle(app)


def test_full_queue_answers_429_with_retry_after(long_llm):
    app = create_app(long_llm, ServerConfig(max_concurrency=1, max_queue=1))
    body = {**LONG, "max_tokens": 400}

    async def main(url):
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=body) for _ in range(6)))

    with live_server(app) as url:
        responses = asyncio.run(main(url))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert error(r, 429)["type"] == "rate_limit_error"
            else:
                assert r.json()["usage"]["completion_tokens"] == 400
        metrics = httpx.get(url + "/metrics").text
        assert 'status="429"' in metrics
        assert idle(app)
