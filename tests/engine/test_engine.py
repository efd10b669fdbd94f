"""LLMEngine: batched and paged decoding equals single-request decoding, token for token."""

from __future__ import annotations

import pytest
import torch

from opengpt.engine.engine import LLMEngine
from opengpt.engine.generate import Generation
from opengpt.engine.sampler import SamplingParams
from tests.model.test_transformer import build

G = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 80, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def single(model, p, params=G) -> list[int]:
    return list(Generation(model, p, params))


def drain(engine: LLMEngine, outputs: dict) -> None:
    for out in engine.step():
        outputs.setdefault(out.request_id, []).extend(out.new_token_ids)


@pytest.mark.parametrize("variant", ["dense", "moe-shared", "sliding-mixed"])
def test_batched_paged_equals_single_with_requests_joining_mid_flight(variant):
    model = build(variant)
    ps = prompts(6)
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_batch_tokens=24)  # chunked prefill
    outputs: dict = {}
    for i, p in enumerate(ps):
        engine.add_request(str(i), p, G)
        drain(engine, outputs)  # a step between arrivals: new requests join a running batch
    while engine.has_unfinished():
        drain(engine, outputs)
    for i, p in enumerate(ps):
        assert outputs[str(i)] == single(model, p), f"request {i}"
    assert all(b.ref_count == 0 for b in engine.kv.pool.blocks)


def test_preemption_under_a_tiny_block_budget():
    model = build("dense")
    ps = prompts(5, seed=1)
    engine = LLMEngine(model, num_blocks=14, block_size=4, max_batch_tokens=64)
    out = engine.generate(ps, G)
    assert engine.num_preemptions > 0
    assert out == [single(model, p) for p in ps]
    assert engine.kv.pool.num_free == 14


def test_prefix_cache_hits_give_identical_outputs():
    model = build("moe-shared")
    system = list(range(3, 23))  # 20 shared tokens = 5 full blocks
    ps = [system + [40, 41], system + [50, 51, 52], system + [60]]
    engine = LLMEngine(model, num_blocks=64, block_size=4)
    first = engine.generate(ps[:1], G)
    hits_before = len(engine.kv.computed_prefix(ps[1]))
    rest = engine.generate(ps[1:], G)
    assert hits_before == 5
    assert first + rest == [single(model, p) for p in ps]
    assert all(b.ref_count == 0 for b in engine.kv.pool.blocks)


@pytest.mark.parametrize("variant", ["dense", "sliding-mixed"])
def test_chunked_prefill_in_the_engine_equals_one_pass(variant):
    model = build(variant)
    prompt = torch.randint(3, 80, (90,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True, logprobs=3)

    def run(budget):
        engine = LLMEngine(model, num_blocks=64, block_size=4, max_batch_tokens=budget)
        engine.add_request("r", prompt, params)
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        return [t for o in outs for t in o.new_token_ids], [lp for o in outs for lp in o.logprobs]

    (tok_a, lp_a), (tok_b, lp_b) = run(512), run(7)  # one pass vs 13 chunks of at most 7 tokens
    assert tok_a == tok_b == single(model, prompt, SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True))
    for (a, top_a), (b, top_b) in zip(lp_a, lp_b):
        assert a == pytest.approx(b, abs=1e-5)
        assert [i for i, _ in top_a] == [i for i, _ in top_b]


def test_abort_frees_blocks_at_once():
    model = build("dense")
    engine = LLMEngine(model, num_blocks=32, block_size=4)
    engine.add_request("a", list(range(3, 20)), G)
    engine.add_request("b", list(range(3, 9)), G)
    engine.step()
    engine.step()
    used = 32 - engine.kv.pool.num_free
    engine.abort("a")
    assert 32 - engine.kv.pool.num_free < used
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.pool.num_free == 32 and "a" not in engine.requests


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = build("dense")
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=42, ignore_eos=True)
    alone = LLMEngine(model, num_blocks=64, block_size=4).generate([[5, 6, 7]], params)[0]
    crowd = LLMEngine(model, num_blocks=64, block_size=4).generate([[9, 9, 9, 9], [5, 6, 7], [11, 12]], params)[1]
    assert alone == crowd


def test_async_engine_streams_concurrent_requests_and_aborts():
    import asyncio

    from opengpt.engine.engine import AsyncLLMEngine

    model = build("dense")
    ps = prompts(3, seed=5)

    async def main():
        front = AsyncLLMEngine(LLMEngine(model, num_blocks=64, block_size=4))

        async def collect(rid, p):
            return [t async for out in front.generate(rid, p, G) for t in out.new_token_ids]

        async def abort_early():
            got = []
            async for out in front.generate("x", list(range(3, 40)), G):
                got.extend(out.new_token_ids)
                if len(got) == 2:
                    front.abort("x")
            return got

        results = await asyncio.gather(*(collect(str(i), p) for i, p in enumerate(ps)), abort_early())
        return front, results

    front, results = asyncio.run(main())
    assert results[:3] == [single(model, p) for p in ps]
    assert len(results[3]) == 2
    assert front.engine.kv.pool.num_free == 64 and not front.engine.requests


def test_async_engine_adds_and_aborts_do_not_wait_for_the_step_in_flight():
    """While a step runs in the worker thread, the event loop can still add and abort requests: they
    are queued and applied right after that step (before, each waited on the step's lock, freezing the
    loop). The first step is held open by an event, so this checks order of events, not timing."""
    import asyncio
    import threading

    from opengpt.engine.engine import AsyncLLMEngine

    model = build("dense")
    ps = prompts(2, seed=6)
    engine = LLMEngine(model, num_blocks=64, block_size=4)
    gate, entered, first_done = threading.Event(), threading.Event(), threading.Event()
    step = engine.step

    def held_step():
        if not first_done.is_set():
            entered.set()
            gate.wait(30)
            try:
                return step()
            finally:
                first_done.set()
        return step()

    engine.step = held_step

    async def main():
        front = AsyncLLMEngine(engine)

        async def collect(rid, p):
            return [t async for out in front.generate(rid, p, G) for t in out.new_token_ids]

        a = asyncio.create_task(collect("a", ps[0]))
        while not entered.is_set():  # the first step (request a) is now running in the worker
            await asyncio.sleep(0.01)
        b = asyncio.create_task(collect("b", ps[1]))
        await asyncio.sleep(0.05)  # b's generator has started and queued its add
        front.abort("a")
        got_a = await a  # ends on the abort output, while the step is still held
        assert not first_done.is_set()
        ops = [op[:2] for op in front.pending]  # a's generator, closing, aborts it once more: harmless
        assert ops[0] == ("add", "b") and set(ops[1:]) == {("abort", "a")}
        gate.set()
        return got_a, await b, front

    got_a, got_b, front = asyncio.run(main())
    assert got_a == [] and got_b == single(model, ps[1])
    assert front.engine.kv.pool.num_free == 64 and not front.engine.requests and not front.pending


def test_a_failing_request_fails_alone():
    model = build("dense")

    def broken(output_ids, logits):
        raise RuntimeError("processor bug")

    engine = LLMEngine(model, num_blocks=64, block_size=4)
    engine.add_request("bad", [5, 6, 7], SamplingParams(max_new_tokens=4, temperature=0, logits_processors=[broken]))
    engine.add_request("good", [5, 6, 7], G)
    outputs: dict = {}
    errors = []
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.error:
                errors.append((out.request_id, out.finish_reason, out.error))
    assert errors == [("bad", "error", "RuntimeError: processor bug")]
    assert outputs["good"] == single(model, [5, 6, 7])
    assert engine.kv.pool.num_free == 64


def test_pool_is_capped_by_what_max_num_seqs_can_use():
    model = build("dense")
    ctx = model.config.max_position_embeddings
    engine = LLMEngine(model, block_size=4, kv_cache_bytes=1 << 30, max_num_seqs=2)
    assert engine.num_blocks == 2 * -(-ctx // 4)
    for i, p in enumerate(prompts(5, seed=2)):
        engine.add_request(str(i), p, G)
    while engine.has_unfinished():
        engine.step()
        assert len(engine.running) <= 2
