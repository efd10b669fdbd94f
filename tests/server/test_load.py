"""Load: 64 concurrent streaming clients through the `openai` async client all get complete, correct
answers (each equal to the single-request generation of its prompt), and the engine ends idle."""

from __future__ import annotations

import asyncio

import openai

from opengpt.api import Completion
from opengpt.server.app import ServerConfig, create_app
from tests.server.conftest import live_server

N = 64
WORDS = ["alpha", "beta", "gamma", "delta", "fox", "dog", "Paris", "weather", "world", "quick"]


def prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"{WORDS[i % 10]} {WORDS[i // 10 % 10]} {i}"}]


def test_64_concurrent_streaming_clients(llm):
    expected = []
    for i in range(N):
        c = Completion()
        for _ in llm.run(llm.tokenizer.encode_chat(prompt(i)), c, max_new_tokens=24, temperature=0, ignore_eos=True):
            pass
        expected.append(c.text)
    app = create_app(llm, ServerConfig(max_concurrency=N))

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
        text, finish, usage = "", None, 0
        stream = await client.chat.completions.create(model="default", messages=prompt(i), max_tokens=24,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True},
                                                      stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, finish, usage

    async def main(url: str):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(N)))

    with live_server(app) as url:
        results = asyncio.run(main(url))
    assert [r[0] for r in results] == expected
    assert all(finish == "length" and usage == 24 for _, finish, usage in results)
    engine = app.state.engine
    assert not engine.requests and engine.kv.pool.num_free == engine.num_blocks
