"""Server overhead: time to first token and requests/s through the HTTP server vs the engine in-process.

The same requests two ways, at each concurrency (1, 8, 32, 64 clients):
  server      C clients stream POST /v1/completions (httpx, one keep-alive connection each) to the real
              app (create_app + uvicorn, as `opengpt serve` runs it) on 127.0.0.1; TTFT is the time from
              sending the request to the first SSE chunk with text in it, latency to the end of the stream.
  in-process  C asyncio tasks call AsyncLLMEngine.generate directly (an engine built as create_app
              builds it: same weights, dtype, KV budget, token budget), same prompt token ids, same
              sampling; TTFT is the time to the first output token.
Overhead = server minus in-process, for the p50 and p99 of TTFT and of latency. Target: p50 TTFT
overhead under 5 ms at concurrency 1 ("target_met"; every level is reported in "target_met_at").

The server runs in a child process (multiprocessing, spawn) and the clients in this one, so the
client's HTTP and JSON work does not hold the server's GIL; the in-process baseline runs here while the
server sits idle. On a 2-core VM the clients still take CPU from the server, so the overhead is an upper
bound that includes the client's own cost. Requests ignore EOS so every one generates exactly
--max-tokens tokens (checked). Each level runs its --requests per path in up to --rounds rounds (at least
one request per client a round, at least 2 rounds), alternating which path goes first (ABBA), samples
pooled. Past concurrency 1, TTFT also reflects scheduling: in-process all C requests reach the engine
at once, through HTTP they arrive spread out and join later steps. Connections are kept alive between requests as far as
uvicorn's 5 s keep-alive allows (so a round that follows an in-process round opens its connections
inside the measurement, as real clients do after an idle pause). Writes benchmarks/results/serve.json.

    python benchmarks/serve.py [--concurrency 1 8 32 64] [--requests 32] [--rounds 4] [--max-tokens 8]
    python benchmarks/serve.py --quick     # concurrency 1 and 8, 16 requests each
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import time

from common import conditions, write_json

PROMPT = "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz"
HOST = "127.0.0.1"  # loopback only


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, linearly interpolated between closest ranks."""
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(samples: list[tuple[float, float, int]], wall: float) -> dict:
    """samples: (ttft s, latency s, tokens) per request; wall: seconds the level's requests took."""
    ttft, lat = [s[0] for s in samples], [s[1] for s in samples]
    return {"requests": len(samples), "requests_per_s": len(samples) / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 0.5), "ttft_p99_ms": 1e3 * pct(ttft, 0.99),
            "latency_p50_ms": 1e3 * pct(lat, 0.5), "latency_p99_ms": 1e3 * pct(lat, 0.99)}


def serve_child(pipe, dtype: str, max_concurrency: int) -> None:
    """Child process: load the model, bind a free loopback port, send it up the pipe, serve until the
    parent sends "stop" or goes away (then a graceful uvicorn shutdown)."""
    import socket
    import threading

    import uvicorn

    from opengpt import LLM
    from opengpt.server.app import ServerConfig, create_app

    app = create_app(LLM.load("default", dtype=dtype), ServerConfig(max_concurrency=max_concurrency))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))

    def stop_when_told() -> None:
        try:
            pipe.recv()
        except EOFError:
            pass
        server.should_exit = True

    threading.Thread(target=stop_when_told, daemon=True).start()
    pipe.send(sock.getsockname()[1])
    server.run(sockets=[sock])


async def wait_healthy(client, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.is_alive():
            raise RuntimeError("the server process exited")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the server did not answer /health within {timeout:g} s")


async def run_level(one, concurrency: int, per_client: int) -> tuple[list, float]:
    """`concurrency` clients, each sending `per_client` requests one after another."""
    samples: list = []

    async def client() -> None:
        for _ in range(per_client):
            samples.append(await one())

    t = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return samples, time.perf_counter() - t


async def bench(args, llm, proc, port: int) -> dict:
    import httpx

    from opengpt.engine.engine import AsyncLLMEngine, LLMEngine
    from opengpt.engine.sampler import SamplingParams

    ids = llm.tokenizer.encode(args.prompt)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    aengine = AsyncLLMEngine(LLMEngine(llm.model, llm.tokenizer.eos_token_ids, **llm.engine_args))
    body = {"model": "default", "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    texts: dict[str, set] = {"server": set(), "in_process": set()}
    serial = iter(range(1 << 62))

    async def in_process():
        t0, ttft, toks = time.perf_counter(), None, []
        async for out in aengine.generate(f"bench-{next(serial)}", ids, params):
            if out.new_token_ids and ttft is None:
                ttft = time.perf_counter() - t0
            toks += out.new_token_ids
        texts["in_process"].add(llm.tokenizer.decode(toks, skip_special_tokens=True))
        return ttft, time.perf_counter() - t0, len(toks)

    def via_server(client):
        async def one():
            t0, ttft, text, toks = time.perf_counter(), None, "", 0
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        toks = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        text += chunk["choices"][0]["text"]
            texts["server"].add(text)
            return ttft, time.perf_counter() - t0, toks
        return one

    levels = []
    for c in args.concurrency:
        limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=600, limits=limits) as client:
            await wait_healthy(client, proc)
            paths = {"server": via_server(client), "in_process": in_process}
            for one in paths.values():  # warm-up: one request down each path
                await one()
            rounds = min(args.rounds, max(2, args.requests // c))  # high concurrency: fewer, wider rounds
            per_client = max(1, -(-args.requests // (c * rounds)))
            got = {name: ([], 0.0) for name in paths}
            for r in range(rounds):
                order = list(paths) if r % 2 == 0 else list(reversed(paths))
                for name in order:
                    samples, wall = await run_level(paths[name], c, per_client)
                    got[name] = (got[name][0] + samples, got[name][1] + wall)
        bad = [n for n, (s, _) in got.items() if any(t is None or k != args.max_tokens for t, _, k in s)]
        if bad:
            raise RuntimeError(f"concurrency {c}: {bad} requests did not stream {args.max_tokens} tokens")
        srv, inp = summary(*got["server"]), summary(*got["in_process"])
        over = {k: srv[f"{k}_ms"] - inp[f"{k}_ms"] for k in ("ttft_p50", "ttft_p99", "latency_p50", "latency_p99")}
        levels.append({"concurrency": c, "rounds": rounds, "requests_per_client": per_client * rounds, "server": srv,
                       "in_process": inp, "overhead_ms": over})
        print(f"C={c:3d}: TTFT p50 {srv['ttft_p50_ms']:7.1f} vs {inp['ttft_p50_ms']:7.1f} ms in-process "
              f"({over['ttft_p50']:+.1f}), p99 {srv['ttft_p99_ms']:7.1f} vs {inp['ttft_p99_ms']:7.1f} "
              f"({over['ttft_p99']:+.1f}); {srv['requests_per_s']:.2f} vs {inp['requests_per_s']:.2f} req/s",
              flush=True)
    return {"levels": levels, "prompt_tokens": len(ids),
            "distinct_outputs": {k: len(v) for k, v in texts.items()},
            "outputs_agree": texts["server"] == texts["in_process"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64], help="concurrent clients")
    ap.add_argument("--requests", type=int, default=32,
                    help="requests per level and path, split over rounds and clients (each client sends at "
                         "least one a round, so a level takes at least concurrency x rounds)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="most rounds per level, alternating which path goes first (high concurrency gets fewer, "
                         "down to 2, since each client sends at least one request a round)")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens generated per request (EOS ignored)")
    ap.add_argument("--prompt", default=PROMPT, help="the fixed prompt of every request")
    ap.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16")
    ap.add_argument("--target-ms", type=float, default=5.0, help="p50 TTFT overhead a level must stay under")
    ap.add_argument("--quick", action="store_true", help="concurrency 1 and 8, 16 requests, 2 rounds (a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/serve.json", help="where to write the JSON")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.requests, args.rounds = [1, 8], 16, 2
    if min(args.concurrency) < 1 or args.requests < 1 or args.rounds < 1 or args.max_tokens < 1:
        ap.error("--concurrency, --requests, --rounds and --max-tokens must be >= 1")

    ctx = mp.get_context("spawn")
    pipe, child_end = ctx.Pipe()
    proc = ctx.Process(target=serve_child, args=(child_end, args.dtype, max(64, *args.concurrency)), daemon=True)
    proc.start()  # the child loads its copy of the model while this process loads its own
    try:
        from opengpt import LLM

        cond = conditions()
        llm = LLM.load("default", dtype=args.dtype)
        if not pipe.poll(300):
            raise RuntimeError("the server process did not report its port within 300 s")
        port = pipe.recv()
        result = asyncio.run(bench(args, llm, proc, port))
    finally:
        if proc.is_alive():
            pipe.send("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    over = {lv["concurrency"]: lv["overhead_ms"]["ttft_p50"] for lv in result["levels"]}
    result = {"model": "default", "dtype": args.dtype, "endpoint": "/v1/completions (stream)",
              "max_tokens": args.max_tokens, "requests_per_level": args.requests,
              "server": "uvicorn in a child process on 127.0.0.1; httpx clients in the parent", **result,
              "target": f"p50 TTFT overhead < {args.target_ms:g} ms at concurrency 1",
              "target_met": over.get(1, math.inf) < args.target_ms,
              "target_met_at": {str(c): o < args.target_ms for c, o in over.items()}, "conditions": cond}
    write_json(result, args.out)


if __name__ == "__main__":
    main()
