"""Memory: peak RSS while the engine serves 16 concurrent requests, vs weights + the configured KV budget.

Each configuration (dtype, kv_cache_bytes) runs in a fresh subprocess of this script, so one
configuration's peak cannot hide another's. The child loads the default model with
`LLM.load(..., kv_cache_bytes=...)`, builds its engine, and serves 16 requests (128-token prompts,
128 new tokens, greedy, EOS ignored, all added at once) through `LLMEngine.step`. It reads the
resident set (VmRSS) and its high-water mark (VmHWM) from /proc at each stage, resetting the mark
(`/proc/self/clear_refs`) between stages, so the report splits the process into:

    runtime         the interpreter, torch and its libraries, before the model
    weights         parameter and buffer bytes of the model
    load residue    what loading leaves resident beyond the weights: buffers freed during loading
                    (dequantized GGUF tensors before the dtype cast) that glibc's malloc keeps for
                    reuse (mallinfo2 sees its main arena only), the tokenizer, Python objects and
                    other threads' malloc arenas
    KV pool         the engine's key/value blocks, as configured
    serving peak    the high-water mark above the loaded, allocated state while requests run
                    (activations, logits, per-step gathered keys/values, allocator caching)

and compares the serving peak with weights + KV pool. `load_peak` (the transient of loading) is
reported separately. Linux only (/proc). Writes benchmarks/results/memory.json.

    python benchmarks/memory.py [--configs float32:1024 bfloat16:1024 bfloat16:128] [--requests 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20


def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024  # kB
    return out


def reset_peak() -> None:
    """Start a new high-water mark at the current RSS (Linux >= 4.0: `5` resets VmHWM)."""
    Path("/proc/self/clear_refs").write_text("5")


def malloc_free_bytes() -> int | None:
    """Bytes glibc's malloc holds freed but not returned to the OS (mallinfo2 `fordblks`): resident
    memory that no tensor uses, which later allocations reuse. None without glibc >= 2.33."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                         "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    return fn().fordblks


def child(args: argparse.Namespace) -> dict:
    import torch

    from opengpt import LLM
    from opengpt.engine.sampler import SamplingParams

    torch.set_num_threads(args.threads)
    runtime = proc_status()["VmRSS"]
    reset_peak()
    llm = LLM.load("default", dtype=args.dtype, kv_cache_bytes=args.kv_cache_bytes,
                   max_batch_tokens=args.max_batch_tokens)
    model = llm.model
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    loaded = proc_status()
    loaded_malloc_free = malloc_free_bytes()
    reset_peak()
    engine = llm.engine
    kv_pool = sum(t.numel() * t.element_size() for t in engine.k_pool + engine.v_pool)
    allocated = proc_status()["VmRSS"]

    words = Path(__file__).read_text().split()
    prompts = [llm.tokenizer.encode(" ".join(words[i * 7 :] + words))[: args.prompt_tokens]
               for i in range(args.requests)]  # different prompts: no shared prefix blocks
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    reset_peak()
    for i, p in enumerate(prompts):
        engine.add_request(f"mem-{i}", p, params)
    most_blocks = steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        most_blocks = max(most_blocks, engine.num_blocks - engine.kv.pool.num_free)
    serving = proc_status()
    per_block = kv_pool // engine.num_blocks
    return {
        "dtype": args.dtype, "kv_cache_bytes": args.kv_cache_bytes, "requests": args.requests,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "steps": steps,
        "preemptions": engine.num_preemptions, "threads": args.threads,
        "runtime_rss": runtime, "weights": weights, "load_residue": loaded["VmRSS"] - runtime - weights,
        "load_residue_freed_kept_by_malloc": loaded_malloc_free,
        "load_peak": loaded["VmHWM"], "kv_pool": kv_pool, "kv_pool_blocks": engine.num_blocks,
        "kv_used_at_most": most_blocks * per_block, "engine_build_rss_increase": allocated - loaded["VmRSS"],
        "serving_peak_rss": serving["VmHWM"], "serving_transient": serving["VmHWM"] - allocated,
        "rss_after_serving": serving["VmRSS"],
    }


def summarize(r: dict) -> dict:
    """The comparisons the issue asks for, in MiB."""
    budget = r["weights"] + r["kv_pool"]
    peak = max(r["serving_peak_rss"], r["load_peak"])
    return {
        "weights_plus_kv_mib": budget / MiB,
        "peak_rss_mib": peak / MiB,
        "serving_peak_rss_mib": r["serving_peak_rss"] / MiB,
        "overhead_beyond_weights_plus_kv_mib": (r["serving_peak_rss"] - budget) / MiB,
        "overhead_without_runtime_mib": (r["serving_peak_rss"] - r["runtime_rss"] - budget) / MiB,
        "overhead_breakdown_mib": {
            "runtime (python, torch, libraries)": r["runtime_rss"] / MiB,
            "load residue": r["load_residue"] / MiB,
            # negative where the pool took pages that loading had freed and malloc still held
            "engine build beyond the KV pool": (r["engine_build_rss_increase"] - r["kv_pool"]) / MiB,
            "serving transient": r["serving_transient"] / MiB,
        },
        "load_residue_freed_kept_by_malloc_mib": (r["load_residue_freed_kept_by_malloc"] or 0) / MiB,
        "within_budget_excluding_runtime": r["serving_peak_rss"] - r["runtime_rss"] <= budget,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["float32:1024", "bfloat16:1024", "bfloat16:128"],
                    help="DTYPE:KV_MIB pairs, one fresh process each (KV_MIB: the engine's kv_cache_bytes in MiB)")
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of each request")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--max-batch-tokens", type=int, default=512, help="engine token budget per step")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in each child")
    ap.add_argument("--out", default="benchmarks/results/memory.json", help="where to write the JSON")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("memory.py reads /proc/self/status and resets its peak through /proc/self/clear_refs: Linux only")

    from common import conditions, write_json

    runs = []
    for spec in args.configs:
        dtype, _, mib = spec.partition(":")
        if not mib.isdigit():
            sys.exit(f"--configs entries are DTYPE:KV_MIB, e.g. bfloat16:1024; got {spec!r}")
        cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--kv-cache-bytes", str(int(mib) * MiB),
               "--requests", str(args.requests), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--max-batch-tokens", str(args.max_batch_tokens),
               "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"the {spec} child failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        r.update(summarize(r))
        runs.append(r)
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r["overhead_breakdown_mib"].items())
        print(f"{dtype} KV {mib} MiB: serving peak RSS {r['serving_peak_rss_mib']:.0f} MiB vs weights + KV "
              f"{r['weights_plus_kv_mib']:.0f} MiB (weights {r['weights'] / MiB:.0f}, KV pool {r['kv_pool'] / MiB:.0f}, "
              f"KV used {r['kv_used_at_most'] / MiB:.0f}): {r['overhead_beyond_weights_plus_kv_mib']:+.0f} MiB "
              f"({r['overhead_without_runtime_mib']:+.0f} without the runtime); {parts}; "
              f"(load residue freed but kept by malloc {r['load_residue_freed_kept_by_malloc_mib']:.0f}); "
              f"load peak {r['load_peak'] / MiB:.0f} MiB", flush=True)
    write_json({"conditions": conditions(), "runs": runs}, args.out)


if __name__ == "__main__":
    main()
