"""Server fixtures: a tiny random model with a real byte-level BPE tokenizer and ChatML template,
and a live uvicorn server on a free loopback port."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from opengpt.api import LLM
from opengpt.config import ModelConfig
from opengpt.model.transformer import Transformer
from opengpt.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's template: ChatML, knows nothing of tools (the server then writes them into the system message)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2.5's way of rendering tools, cut down: the template itself lists them
CHATML_TOOLS = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    '{"city": "Paris", "unit": "celsius", "days": [1, 2, 3], "ok": true, "note": null}',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "The quick brown fox jumps over the lazy dog. Hello world! What is the weather in Paris today?",
    "Numbers 0123456789 -1.5e10 and words: alpha beta gamma delta, the end.",
]


def bpe_tokenizer(path: Path, template: str = CHATML, vocab_size: int = 500, added: list[str] = ()) -> Tokenizer:
    """A byte-level BPE (GPT-2 / SmolLM2 style) trained on a few lines; every string encodes.
    `added`: extra (non-special) tokens, each then encoded as one token."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "chat_template": template}))
    return Tokenizer.from_dir(path)


def tiny_model(vocab_size: int, seed: int = 0, ctx: int = 256) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ctx)
    model = Transformer(cfg)
    model.init_weights(std=0.5, seed=seed)  # peaked logits: greedy picks are robust to float noise
    return model.eval()


def tiny_llm(path: Path, template: str = CHATML, ctx: int = 256) -> LLM:
    tok = bpe_tokenizer(path, template)
    return LLM(tiny_model(tok.vocab_size, ctx=ctx), tok, path=path, kv_cache_bytes=4 << 20, max_batch_tokens=256)


@pytest.fixture(scope="session")
def llm(tmp_path_factory) -> LLM:
    return tiny_llm(tmp_path_factory.mktemp("tiny"))


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released): a server can take it, a client is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
