"""Cost routing: the YAML config and its errors, the scorer's features and the shipped model, the choice
rule, calibration, and fallback through real failures (a closed port, a real HTTP server answering
500) to a real opengpt server and an in-process model."""

from __future__ import annotations

import http.server
import json
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from opengpt.assist.router import (
    FEATURES,
    BackendSpec,
    ComplexityScorer,
    LocalClient,
    Router,
    RouterConfig,
    RouterError,
    calibrate_cli,
    load_router_config,
    read_prompts,
)
from opengpt.server.app import ServerConfig, create_app
from tests.server.conftest import CHATML, free_port, live_server, tiny_llm
from tests.server.test_tools import scripted_llm

ROOT = Path(__file__).resolve().parents[2]
EASY = [{"role": "user", "content": "Say hello."}]
HARD = [{"role": "user", "content": "A shop sells 348 pens at $17.25 each, then gives a 15% discount on the total. "
                                    "After that, each of 7 friends pays an equal share. How much must each pay "
                                    "exactly? Explain why, step by step."}]
PROMPTS = [[{"role": "user", "content": q}] for q in [
    "Hi!", "What is the capital of France?", "What is 2 + 3?", "What is 48 * 37?", "Tell me a joke.",
    "What is 15% of 1,240?", "Explain why the sky is blue.", "What is 1234 + 5678?", "What color is grass?",
    "A pen costs $3. What do 14 pens cost?", "Prove that the square root of 2 is irrational.",
    "What is 17 * 23 + 41, then divided by 4?", "Who wrote Hamlet?", "How many legs does a cat have?",
    "Compute 987 * 654 exactly.", "What is 9 - 4?", "def f(x): return x * 2  # what does f(21) return?",
    "Each of 12 boxes holds 24 eggs; after 3 boxes break, how many eggs are left in total?",
    "Name a fruit.", "What is 3^4 - 17?"]]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "router.yaml"
    p.write_text(text)
    return p


@contextmanager
def failing_server(status: int = 500):
    """A real HTTP server that answers every POST with `status`; yields its /v1 base URL and the hit count."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hits.append(self.path)
            body = json.dumps({"error": {"message": "upstream exploded"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", hits
    finally:
        server.shutdown()
        server.server_close()


def spec(name: str, price: float, kind: str = "openai", base_url: str | None = None, **kw) -> BackendSpec:
    return BackendSpec(name, kind, "default", base_url=base_url, cost_per_1k_prompt=price,
                       cost_per_1k_completion=2 * price, **kw)


# -- config ----------------------------------------------------------------------------------------------
def test_shipped_config_loads():
    c = load_router_config(ROOT / "configs/router.yaml")
    assert [b.name for b in c.by_price] == ["small", "large"] and c.strongest.name == "large"
    assert c.thresholds == {"small": 0.5} and c.backends[1].api_key_env == "OPENAI_API_KEY"
    assert c.backends[0].options == {"dtype": "float32"} and c.timeout_s == 60


GOOD = """backends:
  - name: a
    kind: local
    cost_per_1k_prompt: 0.1
  - name: b
    kind: openai
    base_url: http://localhost:1/v1
    model: m
    cost_per_1k_prompt: 1
thresholds: {a: 0.4}
"""


@pytest.mark.parametrize("text, line, words", [
    (GOOD + "thresold: {a: 0.3}\n", 11, ["thresold", "did you mean 'thresholds'"]),
    (GOOD.replace("    model: m\n", "    model: m\n    temprature: 0\n"), 9, ["backends[1].temprature", "unknown key"]),
    (GOOD.replace("kind: openai", "kind: opena"), 6, ["backends[1].kind", "local, openai"]),
    (GOOD.replace("{a: 0.4}", "{a: 0.4, b: 0.9}"), 10, ["thresholds.b", "strongest"]),
    (GOOD.replace("{a: 0.4}", "{c: 0.4}"), 10, ["no backend named 'c'"]),
    (GOOD.replace("{a: 0.4}", "{a: 1.5}"), 10, ["thresholds.a", "[0, 1]"]),
    (GOOD.replace("    base_url: http://localhost:1/v1\n", ""), 5, ["backends[1]", "base_url"]),
    (GOOD.replace("cost_per_1k_prompt: 0.1", "cost_per_1k_prompt: -1"), 4, ["backends[0].cost_per_1k_prompt", ">= 0"]),
    (GOOD.replace("cost_per_1k_prompt: 0.1", "max_difficulty: 0.3"), 4, ["max_difficulty", "thresholds"]),
    (GOOD.replace("  - name: b\n", "  - name: a\n"), 5, ["duplicate backend name 'a'"]),
    (GOOD + "scorer: nowhere.json\n", 11, ["scorer", "no scorer file"]),
    ("backends: []\n", 1, ["backends", "non-empty list"]),
])
def test_config_errors_name_the_line_key_and_fix(tmp_path, text, line, words):
    with pytest.raises(RouterError) as e:
        load_router_config(write(tmp_path, text))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'router.yaml'}:{line}: "), msg
    for w in words:
        assert w in msg, msg


def test_config_good_and_relative_scorer(tmp_path):
    ComplexityScorer.load().save(tmp_path / "mine.npz")
    c = load_router_config(write(tmp_path, GOOD + "scorer: mine.npz\n"))
    assert c.scorer == str(tmp_path / "mine.npz") and c.thresholds == {"a": 0.4}
    assert c.backends[0].model == "default" and c.backends[1].model == "m"
    assert Router(c).scorer.score(EASY) == pytest.approx(ComplexityScorer.load().score(EASY))


# -- scorer ---------------------------------------------------------------------------------------------
def test_features_on_fixed_prompts():
    s = ComplexityScorer()
    msgs = [{"role": "system", "content": "ignored 99 + 1"},
            {"role": "user", "content": "What is 1,250 * 3? Then add 4.5% of it."},
            {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "```def f(): import os``` Explain why?"}]
    f = dict(zip(FEATURES, np.expm1(s.features(msgs)).round().astype(int)))
    text = "What is 1,250 * 3? Then add 4.5% of it.\nSure.\n```def f(): import os``` Explain why?"
    assert f["chars"] == len(text)
    assert f["numbers"] == 3 and f["digits"] == 7 and f["max_digits"] == 4 and f["decimals_percents"] == 1
    assert f["operators"] == 2  # "*" and "4.5% of"
    assert f["cue_words"] == 1 and f["questions"] == 2 and f["turns"] == 2
    assert f["code_markers"] == 4  # ```, ```, def, import
    assert f["constraint_words"] == 1 and f["reasoning_verbs"] == 2  # "explain why"; explain, why
    assert f["math_words"] == 0
    assert f["words"] == len(re.findall(r"\w+|[^\w\s]", text))
    hashed = ComplexityScorer(n_hash=16).features(msgs)
    assert hashed.shape == (len(FEATURES) + 16,) and np.expm1(hashed[len(FEATURES):]).sum().round() == len(re.findall("[a-z]+", text.lower()))


def test_shipped_scorer_orders_hard_above_easy():
    s = ComplexityScorer.load()
    assert 0 <= s.score(EASY) < s.score(HARD) <= 1
    assert s.score([{"role": "user", "content": "What is 4821 * 937?"}]) > s.score(
        [{"role": "user", "content": "What is the capital of France?"}])


def test_fit_learns_a_separable_rule_and_round_trips(tmp_path):
    s = ComplexityScorer(n_hash=8, l2=0.1)
    easy = [[{"role": "user", "content": f"Hello number {i}"}] for i in range(10)]
    hard = [[{"role": "user", "content": f"What is {100 + i} * {37 + i} + {i}? Then explain why."}] for i in range(10)]
    X = np.stack([s.features(m) for m in easy + hard])
    s.fit(X, np.array([0] * 10 + [1] * 10))
    assert max(map(s.score, easy)) < 0.2 and min(map(s.score, hard)) > 0.8
    for ext in ("json", "npz"):
        s.save(tmp_path / f"s.{ext}")
        back = ComplexityScorer.load(tmp_path / f"s.{ext}")
        assert back.score(HARD) == pytest.approx(s.score(HARD), abs=1e-12) and back.n_hash == 8


# -- choice and calibration -------------------------------------------------------------------------------
def test_choose_picks_the_cheapest_whose_threshold_covers_the_score():
    scorer = ComplexityScorer.load()
    x = scorer.score(HARD)
    # config order is not price order: the router sorts by price
    cfg = RouterConfig([spec("big", 10.0), spec("cheap", 0.0, max_difficulty=x - 0.01),
                        spec("mid", 1.0, max_difficulty=x + 0.01)])
    r = Router(cfg, scorer)
    d = r.choose(HARD)
    assert d.backend == "mid" and d.score == pytest.approx(x) and d.candidates == ["mid", "big", "cheap"]
    cfg.set_thresholds({"cheap": x, "mid": x + 0.01})
    assert r.choose(HARD).backend == "cheap" and r.choose(HARD).candidates == ["cheap", "mid", "big"]
    cfg.set_thresholds({"cheap": x - 0.02, "mid": x - 0.01})
    d = r.choose(HARD)
    assert d.backend == "big" and d.candidates == ["big", "mid", "cheap"] and "strongest" in d.reason
    cfg.set_thresholds({"mid": 1.0})  # a backend without a threshold is only a fallback
    assert r.choose(EASY).backend == "mid"


@pytest.mark.parametrize("n_tiers", [2, 3])
@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_calibration_hits_the_target_share_within_one_prompt(n_tiers, share):
    cfg = RouterConfig([spec(f"t{i}", float(i)) for i in range(n_tiers)])
    r = Router(cfg)
    report = r.calibrate(PROMPTS, share)
    n = len(PROMPTS)
    picks = [r.choose(m).backend for m in PROMPTS]
    for name, target in report["target_share"].items():
        assert report["real_share"][name] == picks.count(name) / n  # measured, not echoed
        assert abs(report["real_share"][name] - target) <= 1 / n + 1e-9, report
    assert report["target_share"][f"t{n_tiers - 1}"] == share
    assert cfg.thresholds == report["thresholds"] and len(report["thresholds"]) == n_tiers - 1
    ts = list(report["thresholds"].values())
    assert ts == sorted(ts)  # cheaper tiers take the easier prompts


def test_calibrate_cli_writes_a_copy_that_loads(tmp_path):
    cfg = tmp_path / "router.yaml"
    cfg.write_text((ROOT / "configs/router.yaml").read_text())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"messages": m}) for m in PROMPTS[:10]) + "\n"
                       + "\n".join(m[0]["content"] for m in PROMPTS[10:]) + "\n")
    assert len(read_prompts(prompts)) == len(PROMPTS)
    report = calibrate_cli(cfg, prompts, 0.3)
    out = Path(report["written"])
    assert out == tmp_path / "router.calibrated.yaml" and cfg.read_text() == (ROOT / "configs/router.yaml").read_text()
    assert report["real_share"]["large"] == pytest.approx(0.3, abs=1 / len(PROMPTS))
    back = load_router_config(out)
    assert back.thresholds == pytest.approx(report["thresholds"], rel=1e-5)
    assert "# max difficulty each backend takes" in out.read_text() and "# local: a checkpoint" in out.read_text()
    dry = calibrate_cli(cfg, prompts, 0.6, write=False)
    assert dry["written"] is None and load_router_config(cfg).thresholds == {"small": 0.5}
    assert calibrate_cli(cfg, prompts, 0.6, write=True)["written"] == str(cfg)  # `opengpt route calibrate --write`
    assert load_router_config(cfg).thresholds["small"] == pytest.approx(dry["thresholds"]["small"], rel=1e-5)
    assert dry["thresholds"]["small"] < back.thresholds["small"]


# -- chat and fallback ------------------------------------------------------------------------------------
ANSWER = ["All", " good", " here."]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A real opengpt server over a model that answers every chat with ANSWER."""
    llm = scripted_llm(tmp_path_factory.mktemp("router-upstream"), CHATML, ANSWER)
    with live_server(create_app(llm, ServerConfig())) as url:
        yield url + "/v1"


BODY = {"model": "router", "messages": EASY, "max_tokens": 8, "temperature": 0}


def test_chat_forwards_to_an_openai_backend_with_cost_and_stats(upstream):
    cfg = RouterConfig([spec("cheap", 1.0, base_url=upstream, max_difficulty=1.0), spec("big", 10.0, base_url=upstream)])
    r = Router(cfg)
    out, d = r.chat(BODY)
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"] == "".join(ANSWER)
    assert d.backend == d.chosen == "cheap" and not d.fallbacks
    u = out["usage"]
    assert u["completion_tokens"] > 0 and d.cost == pytest.approx((u["prompt_tokens"] * 1.0 + u["completion_tokens"] * 2.0) / 1000)
    r.chat(BODY)
    st = r.stats()
    assert st["backends"]["cheap"]["requests"] == 2 and st["backends"]["big"]["requests"] == 0
    assert st["cost"] == pytest.approx(2 * d.cost) and st["share"]["cheap"] == 1.0
    with pytest.raises(RouterError, match="does not stream"):
        r.chat({**BODY, "stream": True})


def test_connection_refused_falls_back_up_the_price_order(upstream):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    cfg = RouterConfig([spec("cheap", 0.0, base_url=dead, max_difficulty=1.0), spec("mid", 1.0, base_url=upstream,
                        max_difficulty=1.0), spec("big", 10.0, base_url=dead)])
    r = Router(cfg)
    out, d = r.chat(BODY)
    assert d.chosen == "cheap" and d.backend == "mid" and [a.backend for a in d.fallbacks] == ["cheap"]
    assert "ConnectError" in d.fallbacks[0].error and "fell back to mid" in d.reason
    assert out["choices"][0]["message"]["content"] == "".join(ANSWER)
    assert r.stats()["backends"]["cheap"]["errors"] == 1


def test_http_500_falls_back_then_down_the_price_order(upstream):
    with failing_server(500) as (broken, hits):
        # chosen: big (no thresholds); big answers 500, nothing above it, so the cheaper one answers
        cfg = RouterConfig([spec("cheap", 0.0, base_url=upstream), spec("big", 10.0, base_url=broken)])
        out, d = Router(cfg).chat(BODY)
    assert hits == ["/v1/chat/completions"]
    assert d.chosen == "big" and d.backend == "cheap" and d.fallbacks[0].status == 500
    assert "upstream exploded" in d.fallbacks[0].error and out["choices"][0]["message"]["content"] == "".join(ANSWER)


def test_all_down_raises_naming_every_backend():
    with failing_server(503) as (broken, _):
        cfg = RouterConfig([spec("alpha", 0.0, base_url=f"http://127.0.0.1:{free_port()}/v1", max_difficulty=1.0),
                            spec("beta", 1.0, base_url=broken)])
        with pytest.raises(RouterError) as e:
            Router(cfg).chat(BODY)
    msg = str(e.value)
    assert "alpha: ConnectError" in msg and "beta: HTTP 503" in msg and e.value.status == 503
    assert set(e.value.errors) == {"alpha", "beta"}


def test_agreeing_client_errors_keep_their_status():
    with failing_server(400) as (broken, hits):
        cfg = RouterConfig([spec("a", 0.0, base_url=broken, max_difficulty=1.0), spec("b", 1.0, base_url=broken)])
        with pytest.raises(RouterError) as e:
            Router(cfg).chat(BODY)
    assert e.value.status == 400 and len(hits) == 2


def test_local_backend_answers_and_falls_back_on_a_local_exception(tmp_path, upstream):
    llm = tiny_llm(tmp_path / "tiny", CHATML)
    local = BackendSpec("local", "local", "default", cost_per_1k_prompt=1.0, cost_per_1k_completion=1.0,
                        max_difficulty=1.0)
    cfg = RouterConfig([local, spec("remote", 5.0, base_url=upstream)])
    r = Router(cfg, clients={"local": LocalClient(local, llm)})
    out, d = r.chat({**BODY, "max_tokens": 5})
    prompt = llm.encode_chat(EASY)
    assert d.backend == "local" and out["usage"]["prompt_tokens"] == len(prompt)
    assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["finish_reason"] == "length"
    # the same greedy reply as the model's own chat()
    assert out["choices"][0]["message"]["content"] == llm.chat(EASY, temperature=0.0, max_new_tokens=5)
    assert d.cost == pytest.approx((len(prompt) + 5) / 1000)
    # a checkpoint that does not load is an exception inside the local backend: the remote one answers
    broken = BackendSpec("local", "local", str(tmp_path / "no-such-checkpoint"), max_difficulty=1.0)
    out, d = Router(RouterConfig([broken, spec("remote", 5.0, base_url=upstream)])).chat(BODY)
    assert d.backend == "remote" and d.fallbacks[0].backend == "local"
    assert "no-such-checkpoint" in d.fallbacks[0].error and out["choices"][0]["message"]["content"] == "".join(ANSWER)


def test_missing_api_key_env_is_a_backend_error(upstream, monkeypatch):
    monkeypatch.delenv("ROUTER_TEST_KEY", raising=False)
    cfg = RouterConfig([spec("keyed", 0.0, base_url=upstream, api_key_env="ROUTER_TEST_KEY", max_difficulty=1.0),
                        spec("open", 1.0, base_url=upstream)])
    _, d = Router(cfg).chat(BODY)
    assert d.backend == "open" and "ROUTER_TEST_KEY is not set" in d.fallbacks[0].error


def test_local_tool_loop_backend_counts_every_model_call(tmp_path):
    """options.tools: the tier answers with the Agent; its usage is the sum over the agent's model calls."""
    llm = scripted_llm(tmp_path / "scripted", CHATML, ANSWER)
    agent = BackendSpec("agent", "local", "default", cost_per_1k_prompt=1.0,
                        options={"tools": ["calculator"], "first_tool_choice": "auto"})
    r = Router(RouterConfig([agent]), clients={"agent": LocalClient(agent, llm)})
    out, d = r.chat({**BODY, "messages": [{"role": "user", "content": "What is 2 + 2?"}]})
    assert out["choices"][0]["message"]["content"] == "".join(ANSWER) and d.backend == "agent"
    # the agent's prompt carries its system message and the calculator's schema: longer than the bare question
    assert out["usage"]["prompt_tokens"] > len(llm.encode_chat([{"role": "user", "content": "What is 2 + 2?"}]))
    assert out["usage"]["completion_tokens"] == len(ANSWER) + 1  # the pieces and EOS
    assert d.cost == pytest.approx(out["usage"]["prompt_tokens"] / 1000)


def test_hosted_apis_get_no_default_extension_fields(upstream):
    """A body as an opengpt server dumps it (vLLM-style fields at their defaults) is sent without them."""
    seen = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = RouterConfig([spec("rec", 0.0, base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
                                 max_difficulty=1.0), spec("up", 1.0, base_url=upstream)])
        Router(cfg).chat({**BODY, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "ignore_eos": False,
                          "top_p": 0.9, "stream_options": {"include_usage": True}})
    finally:
        server.shutdown()
        server.server_close()
    assert seen and not {"top_k", "min_p", "repetition_penalty", "ignore_eos", "stream_options"} & set(seen[0])
    assert seen[0]["top_p"] == 0.9 and seen[0]["model"] == "default" and seen[0]["stream"] is False
