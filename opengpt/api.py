"""LLM: the Python face of opengpt. Load a checkpoint, then generate, chat, stream or score.

    llm = LLM.load("default")                       # or a HF directory, or a .gguf file
    llm.generate("Once upon a time", max_new_tokens=32, temperature=0.0)
    llm.chat([{"role": "user", "content": "Hi"}])
    for piece in llm.stream("Tell me a story"): ...
    llm.logits(torch.tensor([[1, 2, 3]]))

Text concerns live here (prompt encoding, UTF-8-safe streaming, stop strings); token generation
is the engine's single loop.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .engine.generate import CompiledDecoder, Generation
from .engine.sampler import SamplingParams
from .model.transformer import Transformer
from .tokenizer import StreamDecoder, Tokenizer
from .weights.hf import CheckpointError
from .weights.load import load_model


class StopMatcher:
    """Cuts a text stream at the first stop string, holding back text that may begin one."""

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        if not self.stop:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0  # longest suffix of pending that is a proper prefix of some stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """Token ids -> text deltas for one request: UTF-8-safe decoding, EOS and special tokens hidden,
    cut before the first stop string. The single-stream loop, the batch and the server all use it."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str]):
        self.decoder: StreamDecoder = tokenizer.stream_decoder(skip_special_tokens=True, prompt_ids=prompt_ids)
        self.stops = StopMatcher(stop)
        self.eos_ids = tokenizer.eos_token_ids

    def push(self, tok: int) -> tuple[str, bool]:
        """Text that is safe to show after `tok`, and whether a stop string was reached."""
        if tok in self.eos_ids:
            return "", False  # generation ends after EOS; its text is never shown
        return self.stops.push(self.decoder.add(tok))

    def flush(self) -> str:
        """The held-back rest, once generation has ended without a stop string."""
        text, _ = self.stops.push(self.decoder.flush())
        return text + self.stops.flush()


@dataclass
class Completion:
    text: str = ""
    prompt_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    logprobs: list = field(default_factory=list)  # per token: (logprob, [(id, logprob), ...]) if asked for


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, path: Path | str = "", config: ModelConfig | None = None,
                 compile: bool = False, proposer: Any = None, kv_cache_bytes: int = 1 << 30,
                 max_batch_tokens: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.config = config or model.config
        self.compiled = CompiledDecoder(model) if compile else None
        self.proposer = proposer  # speculative decoding, used for greedy requests
        self.engine_args = dict(kv_cache_bytes=kv_cache_bytes, max_batch_tokens=max_batch_tokens)
        self._engine = None  # the continuous-batching engine, built on first batched use

    @classmethod
    def load(cls, path: str | Path = "default", dtype: str | torch.dtype = "float32", device: str = "cpu",
             compile: bool = False, quantize: str | None = None, speculative: str | None = None,
             kv_cache_bytes: int = 1 << 30, max_batch_tokens: int = 512, progress: bool = False) -> LLM:
        """Load a HF checkpoint directory, a .gguf file, or "default" (the embedded SmolLM2-135M-Instruct).

        compile: run the decode step through torch.compile (faster decode after a one-time compile).
        quantize: "int8" (per channel) or "int4" (group-wise) weight-only quantization of the linear layers;
            "gguf": keep a GGUF file's Q8_0 / Q4_0 / Q4_1 tensors packed as stored instead of dequantizing
            them. A directory written by `opengpt quantize` loads quantized without it.
        speculative: "ngram" (prompt lookup) or the path of a smaller draft model with the same vocabulary;
            greedy requests then verify drafted tokens in one forward (same output, fewer forwards).
        kv_cache_bytes, max_batch_tokens: the paged KV pool and the per-step token budget of the batching
            engine that runs lists of prompts."""
        cfg, model, tok, p = load_model(path, dtype=dtype, device=device, progress=progress, quantize=quantize)
        proposer = None
        if speculative:
            from .engine.speculative import DraftModelProposer, NgramProposer

            if speculative == "ngram":
                proposer = NgramProposer()
            else:
                dcfg, draft, dtok, _ = load_model(speculative, dtype=dtype, device=device, progress=progress)
                if dcfg.vocab_size != cfg.vocab_size:
                    raise CheckpointError(f"draft model {speculative} has vocabulary {dcfg.vocab_size}, the target "
                                     f"{cfg.vocab_size}; a draft model must share the target's tokenizer")
                proposer = DraftModelProposer(draft)
        return cls(model, tok, p, cfg, compile=compile, proposer=proposer, kv_cache_bytes=kv_cache_bytes,
                   max_batch_tokens=max_batch_tokens)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    # -- generation ------------------------------------------------------------------------------
    def run(self, prompt_ids: list[int], completion: Completion | None = None, **sampling: Any) -> Iterator[str]:
        """Generate from token ids, yielding UTF-8-safe text deltas; fills `completion` as it goes."""
        params = sampling.pop("params", None) or SamplingParams(**sampling)
        c = completion if completion is not None else Completion()
        c.prompt_tokens = len(prompt_ids)
        if self.proposer is not None and params.greedy and params.logprobs is None:
            from .engine.speculative import SpeculativeGeneration

            gen = SpeculativeGeneration(self.model, prompt_ids, params, self.proposer, self.tokenizer.eos_token_ids)
        else:
            gen = Generation(self.model, prompt_ids, params, self.tokenizer.eos_token_ids, compiled=self.compiled)
        out = TextStream(self.tokenizer, prompt_ids, params.stop)
        c.logprobs = gen.logprobs  # filled as tokens are generated
        for tok in gen:
            c.token_ids.append(tok)
            text, stopped = out.push(tok)
            if text:
                c.text += text
                yield text
            if stopped:
                c.finish_reason = "stop"
                return
        text = out.flush()
        if text:
            c.text += text
            yield text
        c.finish_reason = gen.finish_reason

    def complete(self, prompt: str | list[int], **sampling: Any) -> Completion:
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        c = Completion()
        for _ in self.run(ids, c, **sampling):
            pass
        return c

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Text deltas of a raw completion of `prompt`."""
        return self.run(self.tokenizer.encode(prompt), **sampling)

    def generate(self, prompt: str | list[str], **sampling: Any) -> str | list[str]:
        """Raw completion; a list of prompts runs as one continuously batched workload and gives a
        list of completions, in order."""
        if isinstance(prompt, list):
            return self.generate_batch([self.tokenizer.encode(p) for p in prompt], SamplingParams(**sampling))
        return self.complete(prompt, **sampling).text

    @property
    def engine(self):
        """The continuous-batching engine over this model (built on first use)."""
        from .engine.engine import LLMEngine

        if self._engine is None:
            self._engine = LLMEngine(self.model, self.tokenizer.eos_token_ids, **self.engine_args)
        return self._engine

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[str]:
        """Completions of token-id prompts through the engine, in order; a request that reaches a stop
        string is aborted there (its blocks freed) instead of running on to max_new_tokens."""
        from .engine.engine import RequestFailed

        engine = self.engine
        batch = uuid.uuid4().hex[:12]
        ids = [f"batch-{batch}-{i}" for i in range(len(prompts))]
        streams = {rid: TextStream(self.tokenizer, p, params.stop) for rid, p in zip(ids, prompts)}
        texts = dict.fromkeys(ids, "")
        for rid, p in zip(ids, prompts):
            engine.add_request(rid, p, params)
        try:
            while any(rid in engine.requests for rid in ids):
                for o in engine.step():
                    stream = streams.get(o.request_id)
                    if stream is None:
                        continue  # another caller's request
                    if o.error:
                        raise RequestFailed(f"prompt {ids.index(o.request_id)}: {o.error}")
                    for tok in o.new_token_ids:
                        text, stopped = stream.push(tok)
                        texts[o.request_id] += text
                        if stopped:
                            engine.abort(o.request_id)
                            del streams[o.request_id]
                            break
                    else:
                        if o.finished:
                            texts[o.request_id] += stream.flush()
        finally:
            for rid in ids:  # an exception (e.g. Ctrl-C) must not leave requests holding blocks
                engine.abort(rid)
        return [texts[rid] for rid in ids]

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools)

    def stream_chat(self, messages: list[dict], **sampling: Any) -> Iterator[str]:
        return self.run(self.encode_chat(messages), **sampling)

    def chat(self, messages: list[dict], **sampling: Any) -> str:
        """The assistant's reply to a conversation, rendered with the model's chat template."""
        return "".join(self.stream_chat(messages, **sampling))

    # -- scoring ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float logits (batch, seq, vocab) of a full forward over `input_ids` (batch, seq)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        return self.model(input_ids.to(self.model.embed_tokens.weight.device)).logits

    def info(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "path": str(self.path),
            "architecture": cfg.architecture,
            "parameters": self.model.num_parameters(),
            "active_parameters_per_token": self.model.num_parameters(active=True),
            "layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            "heads": f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value, head_dim {cfg.head_dim}",
            "experts": f"{cfg.num_experts} (top-{cfg.num_experts_per_tok})" if cfg.num_experts else "dense",
            "context_length": cfg.max_position_embeddings,
            "sliding_window": cfg.sliding_window,
            "rope": {"theta": cfg.rope_theta, "scaling": cfg.rope_scaling},
            "vocab_size": cfg.vocab_size,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantization": getattr(self.model, "quantization", None),
            "chat_template": self.tokenizer.has_chat_template,
        }
