"""FeedbackStore: recording, votes, the dpo / kto / sft exports, and that TRL and our trainer read them."""

from __future__ import annotations

import copy
import io
import json
import sqlite3
import threading

import pytest

from opengpt.assist.feedback import SCHEMA_VERSION, FeedbackError, FeedbackStore

SYSTEM = {"role": "system", "content": "Answer briefly."}
ASK = {"role": "user", "content": "What is 2 + 2?"}
PROMPT = [SYSTEM, ASK]
OTHER = [{"role": "user", "content": "Say hi."}]
WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def answer(text: str) -> dict:
    return {"role": "assistant", "content": text}


def completion(rid: str, *messages: dict) -> dict:
    """A chat.completion as the server returns it."""
    return {"id": rid, "object": "chat.completion", "created": 0, "model": "default",
            "choices": [{"index": i, "message": m, "finish_reason": "stop", "logprobs": None}
                        for i, m in enumerate(messages)],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def record(store: FeedbackStore, rid: str, messages: list[dict], *texts: str, tools: list | None = None) -> None:
    body = {"model": "default", "messages": messages, "temperature": 0.7, **({"tools": tools} if tools else {})}
    store.record_response(rid, body, completion(rid, *(answer(t) for t in texts)))


def records(store: FeedbackStore, fmt: str, **kwargs) -> list[dict]:
    buf = io.StringIO()
    n = store.export(fmt, buf, **kwargs)
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert n == len(lines)
    return lines


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(tmp_path / "feedback.db")
    yield s
    s.close()


@pytest.fixture
def rated(store):
    """Prompt P: a "4" (up), b "5" (down), c "Four." (up), and c preferred over a; prompt Q: d "Hi!" (up)."""
    record(store, "a", PROMPT, "4")
    record(store, "b", PROMPT, "5")
    record(store, "c", PROMPT, "Four.")
    record(store, "d", OTHER, "Hi!")
    store.rate("a", "up", user="alice")
    store.rate("b", "down", user="bob", comment="wrong")
    store.rate("c", 1, user="carol")
    store.rate("d", "up", user="alice")
    store.prefer("c", "a", user="dave", comment="full sentence")
    return store


@pytest.fixture(scope="module")
def default_checkpoint():
    from opengpt.weights.default import DefaultModelMissing, default_model_path
    from opengpt.weights.gguf import read_gguf

    try:
        return read_gguf(default_model_path())
    except DefaultModelMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tokenizer(default_checkpoint):
    """The default model's tokenizer: SmolLM2's ChatML template."""
    from opengpt.tokenizer import Tokenizer

    c = default_checkpoint
    return Tokenizer(copy.deepcopy(c.tokenizer), c.tokenizer_config, c.eos_token_ids)


# ---------------------------------------------------------------------------------------------- exports
def test_exports_exact_records(rated):
    assert records(rated, "dpo") == [
        {"prompt": PROMPT, "chosen": [answer("Four.")], "rejected": [answer("4")]},  # explicit preference first
        {"prompt": PROMPT, "chosen": [answer("4")], "rejected": [answer("5")]},  # then every (up, down) pair
        {"prompt": PROMPT, "chosen": [answer("Four.")], "rejected": [answer("5")]},
    ]
    assert records(rated, "kto") == [
        {"prompt": PROMPT, "completion": [answer("4")], "label": True},
        {"prompt": PROMPT, "completion": [answer("5")], "label": False},
        {"prompt": PROMPT, "completion": [answer("Four.")], "label": True},
        {"prompt": OTHER, "completion": [answer("Hi!")], "label": True},
    ]
    assert records(rated, "sft") == [
        {"messages": PROMPT + [answer("4")]},
        {"messages": PROMPT + [answer("Four.")]},
        {"messages": OTHER + [answer("Hi!")]},
    ]
    assert rated.stats() == {"responses": 4, "prompts": 2, "ratings": 4, "up": 3, "down": 1, "preferences": 1,
                             "rated_responses": 4, "dpo_records": 3, "kto_records": 4, "sft_records": 3}


def test_export_to_a_path_and_bad_arguments(rated, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert rated.export("dpo", out) == 3
    assert [json.loads(line) for line in out.read_text().splitlines()] == records(rated, "dpo")
    assert list(tmp_path.glob(".*tmp")) == []
    with pytest.raises(FeedbackError, match="unknown export format 'orpo'; use one of dpo, kto, sft"):
        rated.export("orpo", out)
    with pytest.raises(FeedbackError, match="min_rating_gap must be a non-negative integer"):
        rated.export("dpo", out, min_rating_gap=-1)


def test_same_answer_pools_votes_and_is_exported_once(store):
    record(store, "a1", PROMPT, "4")
    record(store, "a2", PROMPT, "4")  # a greedy regeneration: same prompt, same text, another id
    record(store, "b", PROMPT, "5")
    store.rate("a1", "up", user="u1")
    store.rate("a2", "up", user="u2")
    store.rate("b", "down", user="u1")
    store.rate("b", "up", user="u2")
    store.rate("b", "down", user="u3")
    assert records(store, "dpo") == [{"prompt": PROMPT, "chosen": [answer("4")], "rejected": [answer("5")]}]
    assert records(store, "kto") == [{"prompt": PROMPT, "completion": [answer("4")], "label": True},
                                     {"prompt": PROMPT, "completion": [answer("5")], "label": False}]
    # votes 4: +2, 5: -1 -> the derived pair's gap is 3
    assert len(records(store, "dpo", min_rating_gap=3)) == 1
    assert records(store, "dpo", min_rating_gap=4) == []


def test_normalised_prompts_match(store):
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]
    record(store, "a", [{"role": "developer", "content": "Answer briefly.", "name": None},
                        {"role": "user", "content": parts}], "4")
    record(store, "b", PROMPT, "5")
    store.prefer("a", "b")
    assert records(store, "dpo") == [{"prompt": PROMPT, "chosen": [answer("4")], "rejected": [answer("5")]}]


def test_several_choices_are_rated_separately(store):
    record(store, "n2", PROMPT, "4", "5")
    store.rate("n2", "up", choice=0)
    store.rate("n2", "down", choice=1)
    assert records(store, "dpo") == [{"prompt": PROMPT, "chosen": [answer("4")], "rejected": [answer("5")]}]
    store.prefer("n2", "n2", chosen_choice=1, rejected_choice=0, user="x")  # an explicit vote outranks the thumbs
    assert records(store, "dpo") == [{"prompt": PROMPT, "chosen": [answer("5")], "rejected": [answer("4")]}]
    with pytest.raises(FeedbackError, match=r"choice 2 is out of range: response 'n2' has 2 .*numbered 0..1"):
        store.rate("n2", "up", choice=2)


def test_tool_calls_and_tools_are_exported_for_chat_templates(store):
    call = {"id": "call_123", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    body = {"model": "default", "messages": ask, "tools": [WEATHER]}
    store.record_response("t", body, completion("t", {"role": "assistant", "content": None, "tool_calls": [call]}))
    store.rate("t", "up")
    fn = {"name": "weather", "arguments": {"city": "Paris"}}  # a dict, and no random call id
    want = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": fn}]}
    assert records(store, "kto") == [{"prompt": ask, "tools": [WEATHER], "completion": [want], "label": True}]
    assert records(store, "sft") == [{"messages": ask + [want], "tools": [WEATHER]}]
    record(store, "plain", ask, "It is sunny.")  # same messages, no tools: another prompt
    with pytest.raises(FeedbackError, match="answer different prompts"):
        store.prefer("plain", "t")


# ---------------------------------------------------------------------------------------------- votes
def test_rating_by_the_same_user_replaces_the_first(store):
    record(store, "a", PROMPT, "4")
    first = store.rate("a", "up", user="alice")
    assert store.rate("a", "down", user="alice", comment="changed my mind") == first
    assert store.stats()["ratings"] == 1
    assert records(store, "kto") == [{"prompt": PROMPT, "completion": [answer("4")], "label": False}]
    assert store.rate("a", "up", user="bob") != first
    assert store.rate("a", "up") == store.rate("a", "up")  # the anonymous voter votes once too
    assert store.stats()["ratings"] == 3


def test_majority_vote_and_ties(store):
    record(store, "a", PROMPT, "4")
    record(store, "b", PROMPT, "5")
    record(store, "c", PROMPT, "6")
    for user, rating in (("u1", "up"), ("u2", "up"), ("u3", "down")):
        store.rate("a", rating, user=user)
    store.rate("b", "up", user="u1")
    store.rate("b", "down", user="u2")  # a tie: no label, in no export
    for user in ("u1", "u2"):
        store.rate("c", "down", user=user)
    store.rate("c", "up", user="u3")
    assert records(store, "kto") == [{"prompt": PROMPT, "completion": [answer("4")], "label": True},
                                     {"prompt": PROMPT, "completion": [answer("6")], "label": False}]
    assert records(store, "sft") == [{"messages": PROMPT + [answer("4")]}]
    assert records(store, "dpo") == [{"prompt": PROMPT, "chosen": [answer("4")], "rejected": [answer("6")]}]


def test_explicit_preferences_majority_and_precedence(store):
    record(store, "a", PROMPT, "4")
    record(store, "b", PROMPT, "5")
    store.rate("a", "down", user="u1")
    store.rate("b", "up", user="u1")  # the thumbs alone say b > a ...
    store.prefer("a", "b", user="u1")
    store.prefer("a", "b", user="u2")
    store.prefer("b", "a", user="u3")  # ... two of three comparisons say a > b, and comparisons win
    assert records(store, "dpo") == [{"prompt": PROMPT, "chosen": [answer("4")], "rejected": [answer("5")]}]
    store.prefer("b", "a", user="u2")  # u2 changes their mind: replaces the earlier vote, so b > a by 2 to 1
    assert store.stats()["preferences"] == 3
    assert records(store, "dpo") == [{"prompt": PROMPT, "chosen": [answer("5")], "rejected": [answer("4")]}]
    store.prefer("a", "b", user="u4")  # 2 to 2: a tie is left out, and the thumbs do not decide it either
    assert records(store, "dpo") == []


# ---------------------------------------------------------------------------------------------- errors
def test_unknown_ids_and_malformed_feedback(rated):
    with pytest.raises(FeedbackError, match="response_id 'nope' is not a recorded response"):
        rated.rate("nope", "up")
    with pytest.raises(FeedbackError, match="rejected_id 'nope' is not a recorded response"):
        rated.prefer("a", "nope")
    for bad in ("meh", 2, 0, True, None, [1]):
        with pytest.raises(FeedbackError, match='rating must be "up" / "down" or 1 / -1'):
            rated.rate("a", bad)
    with pytest.raises(FeedbackError, match="response_id must be a non-empty string"):
        rated.rate("", "up")
    with pytest.raises(FeedbackError, match="comment must be a string"):
        rated.rate("a", "up", comment=5)
    with pytest.raises(FeedbackError, match="give the same answer"):
        rated.prefer("a", "a")
    assert rated.stats()["ratings"] == 4  # nothing half-written


def test_preference_across_prompts_is_refused(rated):
    with pytest.raises(FeedbackError, match="responses 'a' and 'd' answer different prompts"):
        rated.prefer("a", "d")
    assert rated.stats()["preferences"] == 1


def test_malformed_responses_are_refused(store):
    good = completion("r", answer("4"))
    with pytest.raises(FeedbackError, match=r'request must be the chat body, \{"messages"'):
        store.record_response("r", {"messages": []}, good)
    with pytest.raises(FeedbackError, match=r"request messages\[1\] has role 'robot'"):
        store.record_response("r", {"messages": [ASK, {"role": "robot", "content": "x"}]}, good)
    with pytest.raises(FeedbackError, match=r"request messages\[0\] must be a message"):
        store.record_response("r", {"messages": ["hi"]}, good)
    with pytest.raises(FeedbackError, match="response must be a chat.completion"):
        store.record_response("r", {"messages": [ASK]}, {"choices": [{"text": "4"}]})
    with pytest.raises(FeedbackError, match="indices 0..n-1"):
        store.record_response("r", {"messages": [ASK]}, {"choices": [{"index": 1, "message": answer("4")}]})
    with pytest.raises(FeedbackError, match="must be JSON data"):
        store.record_response("r", {"messages": [{"role": "user", "content": "x", "extra": object()}]}, good)
    assert store.stats()["responses"] == 0
    record(store, "r", [ASK], "4")
    record(store, "r", [ASK], "4")  # a retry with the same content is fine
    with pytest.raises(FeedbackError, match="already recorded with a different prompt or answer"):
        record(store, "r", [ASK], "5")


# ---------------------------------------------------------------------------------------------- storage
def test_restart_keeps_everything(rated, tmp_path):
    before = {fmt: records(rated, fmt) for fmt in ("dpo", "kto", "sft")}, rated.stats()
    rated.close()
    with FeedbackStore(tmp_path / "feedback.db") as again:
        assert ({fmt: records(again, fmt) for fmt in ("dpo", "kto", "sft")}, again.stats()) == before
        again.rate("b", "up", user="bob")  # still replaces bob's earlier vote
        assert again.stats()["ratings"] == 4
    db = sqlite3.connect(tmp_path / "feedback.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_foreign_files_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a database " * 100)
    with pytest.raises(FeedbackError, match="cannot be opened as a feedback database"):
        FeedbackStore(tmp_path / "notes.txt")
    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE t (x)")
    other.commit()
    with pytest.raises(FeedbackError, match="an SQLite database of something else"):
        FeedbackStore(tmp_path / "other.db")
    other.execute("PRAGMA user_version = 99")
    other.close()
    with pytest.raises(FeedbackError, match="schema version 99, newer than this opengpt reads"):
        FeedbackStore(tmp_path / "other.db")


def test_concurrent_writers(tmp_path):
    """Many server threads on one store, and a second store (another process's connection) on the same file."""
    first, second = FeedbackStore(tmp_path / "f.db"), FeedbackStore(tmp_path / "f.db")
    errors: list[BaseException] = []

    def worker(store: FeedbackStore, w: int) -> None:
        try:
            for i in range(20):
                rid = f"w{w}-{i}"
                record(store, rid, PROMPT, f"answer {w} {i}")
                store.rate(rid, "up" if i % 2 else "down", user=f"user{w}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(first if w % 2 else second, w)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stats = first.stats()
    assert (stats["responses"], stats["ratings"], stats["up"], stats["down"]) == (160, 160, 80, 80)
    assert stats["dpo_records"] == 80 * 80  # every liked answer against every disliked one, one prompt
    first.close()
    second.close()


# ---------------------------------------------------------------------------------------------- consumers
def test_sft_export_is_opengpt_finetune_data(rated, tmp_path, tokenizer):
    from opengpt.train.data import read_chat_jsonl, sft_example

    out = tmp_path / "sft.jsonl"
    assert rated.export("sft", out) == 3
    convs = read_chat_jsonl(out)
    assert convs == [PROMPT + [answer("4")], PROMPT + [answer("Four.")], OTHER + [answer("Hi!")]]
    ex = sft_example(tokenizer, convs[1])
    assert tokenizer.decode(ex.tokens[ex.targets].tolist(), skip_special_tokens=False) == "Four.<|im_end|>\n"


def assert_trl_shape(record: dict) -> None:
    """TRL's conversational types: lists of {"role", "content"} messages under its column names."""
    keys = set(record) - {"tools"}
    assert keys in ({"prompt", "chosen", "rejected"}, {"prompt", "completion", "label"}), keys
    assert record["prompt"][-1]["role"] in ("user", "tool")  # so TRL adds the generation prompt
    for key in keys - {"label"}:
        assert isinstance(record[key], list) and record[key]
        assert all(isinstance(m, dict) and isinstance(m["role"], str) and isinstance(m["content"], str)
                   for m in record[key])
    for key in keys & {"chosen", "rejected", "completion"}:
        assert [m["role"] for m in record[key]] == ["assistant"]
    if "label" in record:
        assert isinstance(record["label"], bool)


def test_records_have_trl_shapes_and_render_with_our_chat_template(rated, tokenizer):
    for record in records(rated, "dpo") + records(rated, "kto"):
        assert_trl_shape(record)
        for key in ("chosen", "rejected", "completion"):
            if key in record:
                prompt = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True)
                full = tokenizer.apply_chat_template(record["prompt"] + record[key], add_generation_prompt=False)
                assert full.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
                assert full[len(prompt):] == record[key][0]["content"] + "<|im_end|>\n"


def test_trl_reads_the_records(rated, tokenizer, default_checkpoint):
    trl_data = pytest.importorskip("trl.data_utils", reason="trl is not installed (pip install trl)")
    transformers = pytest.importorskip("transformers")

    # a real transformers tokenizer over the same vocabulary and template, as TRL's trainers get one
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(default_checkpoint.tokenizer),
                                              chat_template=default_checkpoint.tokenizer_config["chat_template"])
    dpo, kto = records(rated, "dpo"), records(rated, "kto")
    assert all(trl_data.is_conversational(r) for r in dpo + kto)
    out = trl_data.maybe_apply_chat_template(dpo[0], hf)
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    assert out == {"prompt": prompt, "chosen": "Four.<|im_end|>\n", "rejected": "4<|im_end|>\n"}
    out = trl_data.maybe_apply_chat_template(kto[1], hf)
    assert out == {"prompt": prompt, "completion": "5<|im_end|>\n", "label": False}
