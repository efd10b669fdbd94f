"""The `opengpt` command line: one subcommand per typed function; signatures and help are the flags.

    opengpt chat "What is the capital of France?"     # one-shot, streamed
    opengpt chat --model /path/to/checkpoint          # interactive
    opengpt generate --model M --max-new-tokens 64 --temperature 0 "Once upon a time"
    opengpt info --model M
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="opengpt: load an open checkpoint (HF safetensors directory or GGUF file), chat with it, generate text.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Options shared by several commands, declared once.
Model = Annotated[str, typer.Option(help="A Hugging Face checkpoint directory, a .gguf file, or 'default' (the embedded SmolLM2-135M-Instruct).")]
Dtype = Annotated[str, typer.Option(help="Weight and compute dtype: float32 or bfloat16.")]
MaxNew = Annotated[int, typer.Option(help="Most new tokens to generate (also capped by the context window).")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy (deterministic).")]
TopK = Annotated[int, typer.Option(help="Sample only among the k most likely tokens; 0 disables.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: smallest set of tokens with this total probability; 1 disables.")]
MinP = Annotated[float, typer.Option(help="Drop tokens less likely than min_p times the most likely one; 0 disables.")]
RepPenalty = Annotated[float, typer.Option(help="Penalty > 1 discourages repeating tokens already in the text; 1 disables.")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed for reproducible sampling.")]
Compile = Annotated[bool, typer.Option("--compile", help="Compile the decode step with torch.compile: about 2x faster decoding after a one-time compile of about a minute.")]
Quantize = Annotated[Optional[str], typer.Option(help="Weight-only quantization of the linear layers: int8 (per channel) or int4 (group-wise); faster decoding, slightly lower quality.")]
Speculative = Annotated[Optional[str], typer.Option(help="Speculative decoding for greedy requests (--temperature 0): 'ngram' (prompt lookup) or the path of a smaller draft model with the same tokenizer. Same output, fewer model forwards.")]
Stop = Annotated[Optional[list[str]], typer.Option(help="Stop before this string (repeatable).")]


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    sys.exit(2)


def _load(model: str, dtype: str, compile: bool = False, quantize: str | None = None, speculative: str | None = None):
    from .api import LLM

    typer.secho(f"loading {model} ({dtype}{', ' + quantize if quantize else ''}) ...", err=True, dim=True)
    t = time.perf_counter()
    llm = LLM.load(model, dtype=dtype, compile=compile, quantize=quantize, speculative=speculative, progress=True)
    if compile:
        typer.secho("decode step will be compiled on the first answer (about a minute, cached on disk)", err=True, dim=True)
    typer.secho(f"loaded {llm.config.architecture} from {llm.path} in {time.perf_counter() - t:.1f}s", err=True, dim=True)
    return llm


def _stream_out(pieces) -> str:
    text = ""
    for piece in pieces:
        text += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return text


@app.command()
def chat(
    prompt: Annotated[Optional[str], typer.Argument(help="Ask one question and exit; without it, start an interactive chat.")] = None,
    model: Model = "default",
    dtype: Dtype = "float32",
    system: Annotated[Optional[str], typer.Option(help="A system message placed before the conversation.")] = None,
    max_new_tokens: MaxNew = 512,
    temperature: Temperature = 0.7,
    top_k: TopK = 0,
    top_p: TopP = 0.9,
    min_p: MinP = 0.0,
    repetition_penalty: RepPenalty = 1.1,
    seed: Seed = None,
    compile: Compile = False,
    quantize: Quantize = None,
    speculative: Speculative = None,
) -> None:
    """Chat with a model through its chat template; the answer streams as it is generated.

    Interactive commands: /reset clears the history, /exit (or Ctrl-D) quits.
    """
    llm = _load(model, dtype, compile, quantize, speculative)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        _stream_out(llm.stream_chat(history + [{"role": "user", "content": prompt}], **sampling))
        return
    typer.secho("interactive chat: /reset clears the history, /exit quits", err=True, dim=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _stream_out(llm.stream_chat(history, **sampling))
        except KeyboardInterrupt:
            sys.stdout.write("\n[interrupted]\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The text to continue (raw completion, no chat template).")],
    model: Model = "default",
    dtype: Dtype = "float32",
    max_new_tokens: MaxNew = 128,
    temperature: Temperature = 0.7,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    min_p: MinP = 0.0,
    repetition_penalty: RepPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past the end-of-sequence token (for benchmarks).")] = False,
    compile: Compile = False,
    quantize: Quantize = None,
    speculative: Speculative = None,
) -> None:
    """Continue a prompt as raw text and stream it to stdout."""
    llm = _load(model, dtype, compile, quantize, speculative)
    _stream_out(llm.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop or [],
                           ignore_eos=ignore_eos))


@app.command()
def info(
    model: Model = "default",
    dtype: Dtype = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Architecture, parameters (total and active per token), context length and dtype of a checkpoint."""
    llm = _load(model, dtype)
    data = llm.info()
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return
    width = max(len(k) for k in data)
    for k, v in data.items():
        if isinstance(v, int) and k.endswith("parameters") or k == "active_parameters_per_token":
            v = f"{v:,} ({v / 1e6:.1f}M)"
        print(f"{k.replace('_', ' '):<{width}}  {v}")


def main() -> None:
    from .config import ConfigError
    from .engine.generate import ContextLengthError
    from .engine.sampler import SamplingError
    from .quantize import QuantizeError
    from .tokenizer import TokenizerError
    from .weights.default import DefaultModelMissing
    from .weights.hf import CheckpointError

    try:
        app()
    except (CheckpointError, ConfigError, ContextLengthError, SamplingError, TokenizerError, DefaultModelMissing,
            QuantizeError) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
