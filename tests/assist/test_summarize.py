"""Hierarchical summarization: lossless splitting whose prompts fit the window (counted with the default
model's real tokenizer), a scripted model on a document 100x the window (order kept, batch path,
several levels), termination against a model that ignores max_tokens, the concurrent OpenAI batch,
bad files, and the default model end to end (slow)."""

from __future__ import annotations

import random
import re
import string
import threading
import time
from types import SimpleNamespace

import pytest

from opengpt.assist.backend import OpenAIBackend
from opengpt.assist.summarize import (
    SummarizeError,
    Summarizer,
    fit_prefix,
    is_heading,
    read_text,
    split_sections,
    split_text,
    summarize_file,
)

WINDOW, MAX_SUMMARY = 512, 48
NOUNS = ["lamp", "river", "door", "kettle", "bridge", "violin", "garden", "ladder", "comet", "anchor"]
COLOURS = ["red", "teal", "amber", "violet", "green", "grey", "gold", "blue", "ochre", "white"]
FILLER = ["The committee reviewed the records carefully and found nothing unusual about them.",
          "Several witnesses described the afternoon as quiet, with little traffic on the road.",
          "Later that week the archive was reorganised so that older files could be found again.",
          "Nobody objected to the proposal, although a few people asked for more time to read it."]


@pytest.fixture(scope="module")
def llm(default_llm):
    return default_llm


def count_with(llm):
    return lambda t: len(llm.tokenizer.encode(t, add_special_tokens=False))


def fact_document(sections: int, filler: int, long_every: int = 0, seed: int = 0) -> str:
    """'## Section k' headings, each with three 'Fact n: the <noun> is <colour>.' lines between filler
    sentences; every `long_every`-th section is six times longer, so it must be cut inside."""
    rng, fact, out = random.Random(seed), 0, []
    for k in range(1, sections + 1):
        body = []
        for _ in range(6 if long_every and k % long_every == 0 else 1):
            for _ in range(3):
                fact += 1
                body.append(f"Fact {fact}: the {rng.choice(NOUNS)} is {rng.choice(COLOURS)}. "
                            + " ".join(rng.choice(FILLER) for _ in range(filler)))
        out.append(f"## Section {k}\n\n" + "\n\n".join(body) + "\n\n")
    return "".join(out)


NUM = re.compile(r"\b(?:Section |S)(\d+)(?:-(\d+))?")


def sections_in(text: str) -> list[int]:
    """Section numbers in order of first mention ('Section 7', 'S7', runs 'S3-9' expanded)."""
    seen: dict[int, None] = {}
    for m in NUM.finditer(text):
        a, b = int(m[1]), int(m[2] or m[1])
        seen.update(dict.fromkeys(range(a, b + 1)))
    return list(seen)


def runs(nums: list[int], prefix: str) -> str:
    out, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(f"{prefix}{nums[i]}" + (f"-{nums[j]}" if j > i else ""))
        i = j + 1
    return " ".join(out)


class ScriptedLLM:
    """What the summarizer uses of an opengpt.LLM (tokenizer, config, encode_chat, generate_batch) around
    the real tokenizer. Its 'summary' is the section and fact numbers the user message mentions, as runs,
    cut to max_new_tokens like a real model; it records every batch."""

    def __init__(self, tokenizer, window: int):
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(max_position_embeddings=window)
        self.batches: list[list[int]] = []  # per generate_batch call: each prompt's length
        self.max_new: list[int] = []

    def encode_chat(self, messages, tools=None):
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools)

    def generate_batch(self, prompts, params):
        self.batches.append([len(p) for p in prompts])
        self.max_new.append(params.max_new_tokens)
        out = []
        for p in prompts:
            user = self.tokenizer.decode(p, skip_special_tokens=False).split("<|im_start|>user")[-1]
            facts = [int(f) for f in re.findall(r"\b(?:Fact |F)(\d+)", user)]
            for a, b in re.findall(r"\bF(\d+)-(\d+)", user):
                facts += range(int(a), int(b) + 1)
            text = f"{runs(sections_in(user), 'S')} {runs(sorted(set(facts)), 'F')}"
            out.append(self.tokenizer.decode(self.tokenizer.encode(text, add_special_tokens=False)[:params.max_new_tokens]))
        return out


# -- splitting --------------------------------------------------------------------------------------------
def test_headings_and_sections():
    assert is_heading("# Intro") and is_heading("### 2.1 Methods") and is_heading("2.1 Methods")
    assert is_heading("Section 3") and is_heading("Chapter IV: The Return") and is_heading("3. Results")
    assert not is_heading("1. Buy milk and eggs.") and not is_heading("Section 3 describes the method.")
    assert not is_heading("#hashtag") and not is_heading("2024") and not is_heading("x" * 200 + " 1 A")
    text = "preamble\n# A\ntext\n```\n# not a heading\n```\n2 B\nmore\n"
    secs = split_sections(text)
    assert [t for t, _ in secs] == [None, "A", "2 B"] and "".join(s for _, s in secs) == text


def test_split_text_is_lossless_and_within_budget():
    count = lambda t: -(-len(t) // 4)
    text = "One. Two two. " * 300 + "\n\n" + "word " * 2000 + "y" * 9000
    pieces = split_text(text, 100, count)
    assert "".join(pieces) == text and all(count(p) <= 100 for p in pieces)
    ys = [p for p in pieces if set(p) == {"y"}]
    assert len(ys) >= 20 and all(count(p) >= 90 for p in ys[:-1])  # hard cuts, each at least 90% full
    assert fit_prefix("abc", 100, count) == 3 and fit_prefix("z" * 1000, 10, count) == 40


def test_chunks_fit_the_window_and_cover_the_input(llm):
    rnd = random.Random(1)
    blob = "".join(rnd.choices(string.ascii_letters + string.digits + "+/", k=100_000))  # a 100k-character line
    doc = ("Preamble line.\n\n# Intro\n\n" + " ".join(FILLER * 40) + "\n\n## 2.1 Methods\n\n" + blob + "\n\n"
           "```\n# not a heading\n```\n\n# 3 Results\n\n" + "no punctuation here " * 1500 + "\n\n"
           "# 4 东京\n\n" + "东京是日本的首都。" * 400 + "\n")
    s = Summarizer(llm, window=WINDOW, max_summary_tokens=MAX_SUMMARY, progress=False)
    chunks = s.split(doc)
    assert "".join(c.text for c in chunks) == doc
    for c in chunks:  # counted independently, through the model's chat template
        n = len(llm.encode_chat(c.messages))
        assert n == c.prompt_tokens and n + MAX_SUMMARY <= WINDOW
    inside_blob = [c for c in chunks if c.text and c.text.strip("\n") and c.text.strip("\n") in blob]
    assert len(inside_blob) >= 100_000 // (4 * WINDOW)  # the long line is cut in many pieces
    assert all(c.continues == "2.1 Methods" for c in inside_blob)
    assert all("not a heading" not in c.titles for c in chunks)
    assert [t for c in chunks for t in c.titles if t][:1] == ["Intro"] and any("4 东京" in c.titles for c in chunks)


def test_window_too_small_is_an_error(llm):
    with pytest.raises(ValueError, match="too small"):
        Summarizer(llm, window=160, max_summary_tokens=48, progress=False)


# -- the test: 100x the window, order kept, batched --------------------------------------------------
def test_hundred_windows_keeps_section_order_through_batched_levels(llm):
    model = ScriptedLLM(llm.tokenizer, WINDOW)
    doc = fact_document(sections=120, filler=5, long_every=7)
    s = Summarizer(model, max_summary_tokens=MAX_SUMMARY, progress=False)
    r = s.summarize(doc)
    assert r.tokens_in == len(llm.tokenizer.encode(doc, add_special_tokens=False)) >= 100 * WINDOW
    assert r.window == WINDOW and r.levels >= 3 and r.tree[0].kind == "chunk"
    assert r.tree[-1].kind == "final" and r.pieces_per_level[-1] == 1
    assert all(a > b for a, b in zip(r.pieces_per_level, r.pieces_per_level[1:]))
    # batch path: one generate_batch per level holding all of that level's prompts, each fitting the window
    assert [len(b) for b in model.batches] == r.pieces_per_level
    assert all(n + m <= WINDOW for b, m in zip(model.batches, model.max_new) for n in b) and set(model.max_new) == {48}
    assert [b for b in model.batches] == [lv.prompt_tokens for lv in r.tree]
    # order: every level mentions the sections in document order, and the top one all of them
    for lv in r.tree:
        assert sections_in(" ".join(lv.summaries)) == list(range(1, 121))
    assert sections_in(r.summary) == list(range(1, 121))
    assert re.search(r"\bF1-\d+", r.summary)


def test_a_model_that_ignores_max_tokens_still_terminates(llm):
    class Verbose:  # an endpoint that answers with three times its input, whatever max_tokens says
        calls = 0

        def batch_chat(self, conversations, max_tokens=None, on_result=None):
            Verbose.calls += 1
            return [m[-1]["content"] * 3 for m in conversations]

    count = count_with(llm)
    r = Summarizer(Verbose(), window=WINDOW, max_summary_tokens=MAX_SUMMARY, count_tokens=count,
                   progress=False).summarize(fact_document(sections=40, filler=5))
    assert r.levels >= 3 and Verbose.calls == r.levels
    assert all(a > b for a, b in zip(r.pieces_per_level, r.pieces_per_level[1:]))
    assert all(count(x) <= MAX_SUMMARY for lv in r.tree for x in lv.summaries)
    assert all(n + MAX_SUMMARY <= WINDOW for lv in r.tree for n in lv.prompt_tokens)


def test_openai_batch_is_concurrent_bounded_and_ordered():
    class Completions:
        def __init__(self):
            self.lock, self.active, self.peak, self.kwargs = threading.Lock(), 0, 0, []

        def create(self, model, messages, **kw):
            with self.lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
                self.kwargs.append(kw)
            i = int(messages[-1]["content"])
            time.sleep(0.01 * (10 - i))  # later requests finish first
            with self.lock:
                self.active -= 1
            return SimpleNamespace(choices=[SimpleNamespace(message=SimpleNamespace(content=f"reply {i}"))])

    backend = OpenAIBackend("http://127.0.0.1:9/v1", model="m")
    backend.client = SimpleNamespace(chat=SimpleNamespace(completions=(fake := Completions())))
    done = []
    out = backend.batch_chat([[{"role": "user", "content": str(i)}] for i in range(10)], max_tokens=5,
                             on_result=done.append, max_workers=4)
    assert out == [f"reply {i}" for i in range(10)] and sorted(done) == list(range(10))
    assert 2 <= fake.peak <= 4 and all(k["max_tokens"] == 5 for k in fake.kwargs)


# -- files ----------------------------------------------------------------------------------------------
def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(SummarizeError, match="no such file"):
        summarize_file(tmp_path / "missing.txt", model=object())
    (tmp_path / "bin").write_bytes(bytes(range(256)))
    with pytest.raises(SummarizeError, match="binary"):
        summarize_file(tmp_path / "bin", model=object())
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(SummarizeError, match=r"not UTF-8 text \(byte 0xe9 at offset 3\)"):
        read_text(tmp_path / "latin1.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(SummarizeError, match="empty"):
        read_text(tmp_path / "empty.txt")
    with pytest.raises(SummarizeError, match="directory"):
        read_text(tmp_path)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert read_text(tmp_path / "bom.txt") == "hello"


def test_summarize_file_short_document_is_one_level(tmp_path, llm):
    (tmp_path / "a.md").write_text("# Note\n\nSection 1 has one fact: the kettle is teal.\n")
    r = summarize_file(tmp_path / "a.md", ScriptedLLM(llm.tokenizer, WINDOW), progress=False)
    assert r.levels == 1 and r.tree[0].kind == "document" and r.summary == "S1"
    assert r.to_dict()["pieces_per_level"] == [1]


# -- the real default model ------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """torch on one thread for this test: on a shared 2-core machine two OpenMP threads contending with
    other processes made this run take over 600 s; one thread took about 40 s."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_default_model_end_to_end(llm, monkeypatch, one_thread):
    calls = []
    real = llm.generate_batch
    monkeypatch.setattr(llm, "generate_batch", lambda prompts, params: calls.append(len(prompts)) or real(prompts, params))
    doc = fact_document(sections=15, filler=3)  # 2720 tokens: 5.3 windows, 8 chunks
    r = Summarizer(llm, window=WINDOW, max_summary_tokens=MAX_SUMMARY, progress=False).summarize(doc)
    assert r.tokens_in >= 5 * WINDOW and r.levels >= 2 and r.summary.strip()
    assert calls == r.pieces_per_level and r.pieces_per_level[0] >= 5
    assert all(n + MAX_SUMMARY <= WINDOW for lv in r.tree for n in lv.prompt_tokens)
