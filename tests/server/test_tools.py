"""Tools and JSON mode: prompt rendering, tool-call parsing (whole and streamed), forced calls and
response formats constrained by their JSON schema, end to end through the `openai` client."""

from __future__ import annotations

import json
from typing import ClassVar

import jsonschema
import openai
import pytest
import torch

from opengpt.api import LLM
from opengpt.model.transformer import ModelOutput, Transformer
from opengpt.server import tools as T
from opengpt.server.app import ServerConfig, create_app
from opengpt.server.protocol import Message
from tests.server.conftest import CHATML, CHATML_TOOLS, bpe_tokenizer, live_server, tiny_llm, tiny_model

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                            "days": {"type": "integer"}},
           "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMES = {"get_weather", "get_time"}


# -- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me look.\n<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}</tool_call>\n<tool_call>'
     + '{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>', "Let me look.",
     [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Rome"})]),
    ('<tool_call>{"name": "get_time", "arguments": {"tz": "UTC"}}', None, [("get_time", {"tz": "UTC"})]),  # EOS, no tag
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),  # Llama 3
    ('<|python_tag|>[{"name": "get_time", "arguments": {}}, {"name": "get_time", "arguments": {"tz": "X"}}]', None,
     [("get_time", {}), ("get_time", {"tz": "X"})]),
    ('```json\n{"name": "get_time", "arguments": {"tz": "CET"}}\n```', None, [("get_time", {"tz": "CET"})]),
    ('{"name": "launch_rockets", "arguments": {}}', '{"name": "launch_rockets", "arguments": {}}', []),  # unknown tool
    ('{"city": "Paris"}', '{"city": "Paris"}', []),  # ordinary JSON answer
    ('<tool_call>{"name": "get_time", "arguments": {"tz": </tool_call>',
     '<tool_call>{"name": "get_time", "arguments": {"tz": </tool_call>', []),  # broken JSON stays content
    ("It is sunny.", "It is sunny.", []),
])
def test_parse_tool_calls(text, content, calls):
    got_content, got_calls = T.parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(n, json.loads(a)) for n, a in got_calls] == calls
    # the same text streamed a few characters at a time gives the same content and calls
    for step in (1, 3, 7):
        stream, events = T.ToolCallStream(NAMES), []
        for i in range(0, len(text), step):
            events += stream.push(text[i:i + step])
        events += stream.finish()
        streamed = "".join(e[1] for e in events if e[0] == "content")
        assert [(e[1], json.loads(e[2])) for e in events if e[0] == "call"] == calls
        assert streamed.strip() == (content or "").strip()


def test_stream_holds_back_only_what_may_open_a_call():
    stream = T.ToolCallStream(NAMES)
    assert stream.push("Hello <tool_c") == [("content", "Hello ")]
    assert stream.push("hair>") == [("content", "<tool_chair>")]


def test_template_tool_support_and_fallback_rendering():
    assert T.template_supports_tools(CHATML_TOOLS) and not T.template_supports_tools(CHATML)
    assert not T.template_supports_tools(None)
    history = [Message(role="developer", content="Be brief."), Message(role="user", content="Weather?"),
               Message(role="assistant", content=None, tool_calls=[{"id": "c1", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]),
               Message(role="tool", tool_call_id="c1", content="sunny")]
    msgs = T.chat_messages(history, TOOLS, template_has_tools=False)
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.")
    assert "<tools>" in msgs[0]["content"] and '"get_time"' in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                       '{"city": "Paris"}}\n</tool_call>'}
    assert msgs[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    native = T.chat_messages(history, TOOLS, template_has_tools=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # dicts, as templates expect
    assert native[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


# -- end to end ----------------------------------------------------------------------------------
class ScriptedModel(Transformer):
    """A tiny model whose next token is fixed by the current one where `script` says so: the
    engine, KV cache and sampler run as usual, only the logits are overridden."""

    script: ClassVar[dict[int, int]] = {}  # replaced per instance by scripted_llm

    def forward(self, input_ids, positions=None, cache=None, num_logits_to_keep=0, logits_at=None) -> ModelOutput:
        out = super().forward(input_ids, positions, cache, num_logits_to_keep, logits_at)
        B = input_ids.shape[0]
        if logits_at is not None:
            at = logits_at if logits_at.dim() == 2 else logits_at[:, None]
            current = input_ids[torch.arange(B)[:, None], at]
        else:
            current = input_ids[:, -out.logits.shape[1]:]
        logits = out.logits.clone()
        for idx in zip(*torch.nonzero(torch.ones_like(current)).T.tolist()):
            nxt = self.script.get(int(current[idx]))
            if nxt is not None:
                logits[idx] = -1e4
                logits[idx][nxt] = 1e4
        return ModelOutput(logits, out.router_logits)


def scripted_llm(path, template: str, answer: list[str]) -> LLM:
    """An LLM that answers every chat prompt with the pieces of `answer` (added as single tokens)."""
    tok = bpe_tokenizer(path, template, added=answer)  # each piece one distinct token
    model = tiny_model(tok.vocab_size, ctx=2048)
    scripted = ScriptedModel(model.config)
    scripted.load_state_dict(model.state_dict())
    chain = [tok.encode("\n", add_special_tokens=False)[-1]] + [tok.token_to_id(p) for p in answer]
    scripted.script = dict(zip(chain, chain[1:] + [tok.token_to_id("<|im_end|>")]))
    return LLM(scripted.eval(), tok, path=path, kv_cache_bytes=8 << 20)


CALL_PIECES = ["Let me check.", "<tool_call>", '{"name": "get_weather", ', '"arguments": {"city": "Paris", ',
               '"unit": "celsius"}}', "</tool_call>"]


@pytest.fixture(scope="module", params=["template-without-tools", "template-with-tools"])
def scripted(request, tmp_path_factory):
    template = CHATML if request.param == "template-without-tools" else CHATML_TOOLS
    llm = scripted_llm(tmp_path_factory.mktemp("scripted"), template, CALL_PIECES)
    with live_server(create_app(llm, ServerConfig())) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_auto_tool_call(scripted):
    r = scripted.chat.completions.create(model="default", messages=ASK, tools=TOOLS, max_tokens=20)
    msg, choice = r.choices[0].message, r.choices[0]
    assert choice.finish_reason == "tool_calls" and msg.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert msg.tool_calls[0].id.startswith("call_") and msg.tool_calls[0].type == "function"
    # the call goes back into the conversation with its result
    follow = ASK + [msg.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": msg.tool_calls[0].id,
                                                        "content": "sunny"}]
    assert scripted.chat.completions.create(model="default", messages=follow, tools=TOOLS, max_tokens=20).choices


def test_auto_tool_call_streamed(scripted):
    content, calls, finish = "", {}, None
    for chunk in scripted.chat.completions.create(model="default", messages=ASK, tools=TOOLS, max_tokens=20,
                                                  stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            call["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check." and finish == "tool_calls"
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris", "unit": "celsius"}


def test_tool_choice_none_returns_text(scripted):
    r = scripted.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=20)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "".join(CALL_PIECES)


@pytest.fixture(scope="module", params=["template-without-tools", "template-with-tools"])
def random_server(request, tmp_path_factory):
    """A random model: left alone its output is noise, so only constrained decoding makes it valid."""
    template = CHATML if request.param == "template-without-tools" else CHATML_TOOLS
    llm = tiny_llm(tmp_path_factory.mktemp("random"), template, ctx=2048)
    with live_server(create_app(llm, ServerConfig())) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_calls_always_match_their_schema(random_server, seed):
    named = random_server.chat.completions.create(
        model="default", messages=ASK, tools=TOOLS, max_tokens=40, temperature=1.0, seed=seed,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and named.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    required = random_server.chat.completions.create(model="default", messages=ASK, tools=TOOLS, max_tokens=60,
                                                      temperature=1.0, seed=seed, tool_choice="required")
    calls = required.choices[0].message.tool_calls
    assert calls and required.choices[0].finish_reason == "tool_calls"
    for c in calls:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == c.function.name)
        jsonschema.validate(json.loads(c.function.arguments), schema)
    single = random_server.chat.completions.create(model="default", messages=ASK, tools=TOOLS, max_tokens=60,
                                                   temperature=1.0, seed=seed, tool_choice="required",
                                                   parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


def test_forced_call_streams_argument_deltas(random_server):
    pieces, names = [], []
    for chunk in random_server.chat.completions.create(
            model="default", messages=ASK, tools=TOOLS, max_tokens=40, temperature=1.0, seed=5, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}):
        for tc in chunk.choices[0].delta.tool_calls or []:
            assert tc.index == 0
            names += [tc.function.name] if tc.function.name else []
            pieces.append(tc.function.arguments or "")
    assert names == ["get_weather"] and len([p for p in pieces if p]) > 3  # arguments arrive as many deltas
    jsonschema.validate(json.loads("".join(pieces)), WEATHER)


def test_json_modes(random_server):
    for seed in range(3):
        r = random_server.chat.completions.create(model="default", messages=ASK, max_tokens=30, temperature=1.0,
                                                  seed=seed, response_format={"type": "json_object"})
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "tags": {"type": "array", "items": {"type": "string"},
                                                             "minItems": 1, "maxItems": 2},
        "score": {"type": "number"}, "ok": {"type": ["boolean", "null"]},
        "owner": {"$ref": "#/$defs/person"}},
        "required": ["name", "tags", "score", "owner"], "additionalProperties": False,
        "$defs": {"person": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    for seed in range(3):
        r = random_server.chat.completions.create(model="default", messages=ASK, max_tokens=60, temperature=1.0,
                                                  seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    text = "".join(c.choices[0].delta.content or "" for c in random_server.chat.completions.create(
        model="default", messages=ASK, max_tokens=60, temperature=1.0, seed=7, response_format=fmt, stream=True))
    jsonschema.validate(json.loads(text), schema)
    with pytest.raises(openai.BadRequestError, match="pattern"):
        random_server.chat.completions.create(model="default", messages=ASK, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^a$"}}})
    with pytest.raises(openai.BadRequestError, match="get_nothing"):
        random_server.chat.completions.create(model="default", messages=ASK, max_tokens=5, tools=TOOLS,
                                              tool_choice={"type": "function", "function": {"name": "get_nothing"}})
