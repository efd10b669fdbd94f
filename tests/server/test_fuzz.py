"""Fuzzing the live server from its own OpenAPI schema (schemathesis: valid and invalid bodies):
no request may produce a 5xx, every error is in OpenAI's shape, and the server stays healthy."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from opengpt.server.app import ServerConfig, create_app
from tests.server.conftest import live_server, tiny_llm


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    # a short context bounds every generation the fuzzer can ask for
    llm = tiny_llm(tmp_path_factory.mktemp("fuzz"), ctx=48)
    app = create_app(llm, ServerConfig(max_concurrency=4, max_queue=64, request_timeout=30))
    with live_server(app) as url:
        yield app, url


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_server, mode):
    _, url = fuzz_server
    ops = operations(url)
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}
    for op in ops:
        if mode == schemathesis.GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to get wrong in a GET without parameters

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            if mode == schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict):
                case.body["model"] = "default"  # a random name only ever meets the 404 check
            response = case.call(base_url=url, timeout=60)
            assert response.status_code < 500, (case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()


@pytest.mark.slow
def test_healthy_after_fuzzing(fuzz_server):
    app, url = fuzz_server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    r = httpx.post(url + "/v1/chat/completions", json={"model": "default", "max_tokens": 3,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    metrics = httpx.get(url + "/metrics").text
    assert 'status="5' not in metrics  # no 5xx was ever answered
    engine = app.state.engine
    assert not engine.requests and engine.kv.pool.num_free == engine.num_blocks
