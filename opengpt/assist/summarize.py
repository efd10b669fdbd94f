"""Hierarchical summarization of documents longer than the model's context window.

This file owns cutting a document into chunks whose prompts fit the window, the level-by-level
map / merge loop, the result tree, and `summarize_file` (what `opengpt summarize FILE` runs).

    r = Summarizer(LLM.load("default")).summarize(text)   # or LocalBackend(llm), OpenAIBackend(url, model=...)
    r.summary, r.levels, r.pieces_per_level, r.tree

* Split: sections start at heading lines (markdown `#`, `2.1 Title`, `Section 3` / `Chapter IV`, not
  inside code fences). Sections that fit are packed together into one chunk; a section that does not
  is cut at paragraphs, then lines, sentences, words and, for pathological input (a 100k-character
  line), at a token budget found by binary search. Cutting is lossless: the chunks joined are the text.
* Levels: level 0 summarizes every chunk (a chunk that starts inside a section is told which one);
  each later level summarizes groups of consecutive summaries, until all of them fit one prompt, which
  gives the final summary. A level's prompts go out as one batch: an `opengpt.LLM` runs them in one
  `generate_batch` call through the continuous-batching engine, an OpenAI-compatible endpoint gets
  them as concurrent requests (a bounded thread pool). Replies keep input order, so section order
  survives every level.
* Fit: every prompt is counted before it is sent (prompt + max_summary_tokens <= window); for a local
  model exactly, through the chat template. For a remote endpoint the tokenizer is unknown, so
  counts are estimates: UTF-8 bytes / 3 (over-counts English, about right for CJK) plus a per-message
  allowance; pass `count_tokens` (e.g. a tiktoken encoder's length) and `window` for exact budgets.
* Termination: see `Summarizer.__init__` and `_run`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .backend import LocalBackend, OpenAIBackend

SYSTEM = "You write faithful, concise summaries and never add facts that are not in the text."
INSTRUCTIONS = {
    "document": "Summarize the following document in at most {words} words. Keep its section titles or numbers "
                "and its key facts, names and figures, in the order they appear.",
    "chunk": "Summarize the following part of a longer document in at most {words} words. Keep the section titles "
             "or numbers it contains and its key facts, names and figures, in the order they appear.",
    "merge": "Below are summaries of consecutive parts of a longer document, in order. Combine them into one summary "
             "of at most {words} words that keeps their order, the section titles or numbers and the key facts.",
    "final": "Below are summaries of consecutive parts of a document, in order. Write one summary of the whole "
             "document in at most {words} words that follows its order and keeps the section titles or numbers "
             "and the key facts.",
}
CONTINUES = 'This part continues the section "{title}".'
SEPARATOR = "\n\n"
REMOTE_WINDOW = 4096  # an endpoint does not say its context length; pass window= for another
TITLE_CHARS = 80  # a heading longer than this is cut in prompts, so the prompt overhead stays bounded


def approx_tokens(text: str) -> int:
    """A conservative token estimate without a tokenizer: UTF-8 bytes / 3, rounded up."""
    return -(-len(text.encode("utf-8")) // 3)


# -- splitting (lossless: the pieces joined are always the input) ---------------------------------------
_MD_HEADING = re.compile(r"#{1,6}\s+\S")
_NUMBERED = re.compile(r"\d+(?:\.\d+)*\.?\s+[A-Z]")  # "3 Results", "2.1. Setup"; not "1. buy milk."
_NAMED = re.compile(r"(?i:section|chapter|part|article|appendix)\s+[0-9IVXLC]+\b")
_FENCE = ("```", "~~~")
# cut points, coarse to fine: paragraphs, lines, sentences, words; a piece ends after its separator
_SEPARATORS = [re.compile(r"\n[ \t]*\n\s*"), re.compile(r"\n"), re.compile(r"(?<=[.!?;。！？])\s+"),
               re.compile(r"\s+")]


def is_heading(line: str) -> bool:
    line = line.strip()
    if _MD_HEADING.match(line):
        return True
    # numbered / named headings are short and are not sentences (a list item "1. Buy milk." is not one)
    return 0 < len(line) <= 100 and line[-1] not in ".,;:!?" and bool(_NUMBERED.match(line) or _NAMED.match(line))


def split_sections(text: str) -> list[tuple[str | None, str]]:
    """(title, text) per section, cut before each heading line outside code fences; the text before the
    first heading is a section titled None."""
    sections: list[tuple[str | None, str]] = []
    title, start, pos, fence = None, 0, 0, False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(_FENCE):
            fence = not fence
        elif not fence and is_heading(line):
            if pos > start:
                sections.append((title, text[start:pos]))
                start = pos
            title = line.strip().lstrip("#").strip()[:TITLE_CHARS]
        pos += len(line)
    if pos > start:
        sections.append((title, text[start:]))
    return sections


def _cut(text: str, pattern: re.Pattern) -> list[str]:
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if start < m.end() < len(text):
            pieces.append(text[start:m.end()])
            start = m.end()
    return pieces + [text[start:]]


def fit_prefix(text: str, budget: int, count: Callable[[str], int]) -> int:
    """Length of a prefix of `text` counted within `budget` tokens and at least 90% full (or all of it); at
    least 1, so cutting always advances. Proportional steps from 4 characters a token take a few counts
    of budget-sized prefixes; bisection finishes if they stall."""
    n, lo, hi = len(text), 0, len(text) + 1  # count(text[:lo]) <= budget < count(text[:hi]); hi = n + 1: unknown
    k = min(n, max(1, 4 * budget))
    for _ in range(6):
        if hi - lo <= 1 or lo == n:
            break
        c = count(text[:k])
        if c <= budget:
            lo = k
            if c >= 0.9 * budget:
                return k
        else:
            hi = k
        k = min(max(int(k * 0.95 * budget / max(c, 1)), lo + 1), hi - 1, n)
    while hi - lo > 1 and lo < n:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(text[:mid]) <= budget else (lo, mid)
    return max(lo, 1)


def pack(pieces: list[str], budget: int, count: Callable[[str], int]) -> list[str]:
    """Join consecutive pieces greedily up to `budget`, by the sum of their counts (the count of a join
    is rarely more; the prompt itself is counted exactly later)."""
    out, cur, n = [], "", 0
    for p in pieces:
        c = count(p)
        if cur and n + c > budget:
            out.append(cur)
            cur, n = "", 0
        cur, n = cur + p, n + c
    return out + ([cur] if cur else [])


def split_text(text: str, budget: int, count: Callable[[str], int], level: int = 0) -> list[str]:
    """Cut `text` into pieces of at most `budget` tokens at the coarsest separator that works."""
    if count(text) <= budget:
        return [text]
    for lv in range(level, len(_SEPARATORS)):
        parts = _cut(text, _SEPARATORS[lv])
        if len(parts) > 1:
            return pack([p for part in parts for p in split_text(part, budget, count, lv + 1)], budget, count)
    out = []  # no separator left (a long line without spaces): hard cuts at the token budget
    while text:
        n = fit_prefix(text, budget, count)
        out.append(text[:n])
        text = text[n:]
    return out


# -- results --------------------------------------------------------------------------------------------
@dataclass
class Chunk:
    text: str
    titles: list[str]  # the sections it covers, in order
    continues: str | None = None  # the section it starts inside of, named in its prompt
    messages: list[dict] = field(default_factory=list, repr=False)
    prompt_tokens: int = 0


@dataclass
class SummaryLevel:
    kind: str  # "document" (it fit one prompt), "chunk", "merge" or "final"
    prompt_tokens: list[int]  # per prompt, as counted before sending; each + max_summary_tokens <= window
    summaries: list[str]  # the outputs in document order (empty with keep_tree=False)


@dataclass
class SummaryResult:
    summary: str
    tokens_in: int  # the document's tokens, by the summarizer's counter
    window: int
    max_summary_tokens: int
    tree: list[SummaryLevel]  # level 0 first

    @property
    def levels(self) -> int:
        return len(self.tree)

    @property
    def pieces_per_level(self) -> list[int]:
        """Prompts (model calls) per level: chunks at level 0, groups later, 1 at the top."""
        return [len(lv.prompt_tokens) for lv in self.tree]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "levels": self.levels, "pieces_per_level": self.pieces_per_level}


# -- the summarizer ---------------------------------------------------------------------------------------
class Summarizer:
    """Summarize text of any length with `model`: an `opengpt.LLM`, a `LocalBackend`, an `OpenAIBackend`,
    or any object with `batch_chat(conversations, max_tokens=...) -> list[str]` (or only `chat`, run
    one by one).

    window: the context length (a local model's by default, else 4096). max_summary_tokens: the cap on
    every summary (default window // 8, at most 256). count_tokens: text -> tokens (the local
    tokenizer by default, else the bytes / 3 estimate). sampling: LLM sampling arguments for a bare
    LLM (greedy by default). concurrency: requests in flight for an OpenAIBackend. keep_tree: keep
    every level's summaries in the result. progress: a tqdm bar per level.
    """

    def __init__(self, model: Any, window: int | None = None, max_summary_tokens: int | None = None,
                 count_tokens: Callable[[str], int] | None = None, sampling: dict | None = None,
                 concurrency: int = 8, keep_tree: bool = True, progress: bool = True):
        if hasattr(model, "generate_batch") and hasattr(model, "encode_chat"):  # an opengpt.LLM
            model = LocalBackend(model, **(sampling or {}))
        self.backend = model
        local = isinstance(model, LocalBackend)
        if count_tokens is None and local:
            tok = model.llm.tokenizer
            count_tokens = lambda t: len(tok.encode(t, add_special_tokens=False))
        self.count = count_tokens or approx_tokens
        # exact for a local model: the very ids the engine will get
        self.prompt_tokens: Callable[[list[dict]], int] = (lambda m: len(model.prompt(m))) if local else \
            (lambda m: sum(self.count(x["content"]) + 8 for x in m) + 8)
        self.window = window or (model.llm.config.max_position_embeddings if local else REMOTE_WINDOW)
        self.max_summary_tokens = max_summary_tokens or min(256, self.window // 8)
        self.concurrency, self.keep_tree, self.progress = concurrency, keep_tree, progress
        self.margin = max(8, self.window // 64)  # for the few tokens a join or a changed number may add
        # Termination: every summary is cut to max_summary_tokens (see _run), and a merge prompt must hold
        # two of them, so each merge level at least halves the number of pieces and one piece always fits.
        overhead = max(self.prompt_tokens(self._messages(k, "")) for k in ("merge", "final"))
        self.group_budget = self.window - self.max_summary_tokens - overhead - self.margin
        sep = self.count(SEPARATOR)
        if self.max_summary_tokens < 1 or self.group_budget < 2 * self.max_summary_tokens + sep:
            need = overhead + 3 * self.max_summary_tokens + sep + self.margin
            raise ValueError(f"window {self.window} is too small for max_summary_tokens {self.max_summary_tokens}: "
                             f"a merge prompt needs {need} tokens (instructions {overhead}, two summaries, the "
                             "summary itself and a margin); raise window or lower max_summary_tokens")

    # -- prompts ------------------------------------------------------------------------------------------
    def _messages(self, kind: str, text: str, continues: str | None = None) -> list[dict]:
        head = INSTRUCTIONS[kind].format(words=max(8, self.max_summary_tokens * 2 // 3))
        if continues:
            head += " " + CONTINUES.format(title=continues)
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{head}\n\n---\n{text}"}]

    def _fits(self, messages: list[dict]) -> int | None:
        """The prompt's tokens if it leaves room for a summary in the window, else None."""
        n = self.prompt_tokens(messages)
        return n if n + self.max_summary_tokens <= self.window else None

    def _budget(self, kind: str, continues: str | None = None) -> int:
        """Tokens of text that fit one prompt of this kind."""
        return self.window - self.max_summary_tokens - self.prompt_tokens(self._messages(kind, "", continues)) \
            - self.margin

    # -- level 0 ------------------------------------------------------------------------------------------
    def split(self, text: str) -> list[Chunk]:
        """Chunks of `text`, in order, each with the messages that summarize it; every prompt is counted
        and fits the window. Joined, the chunk texts are `text`."""
        base = self._budget("chunk")
        chunks: list[Chunk] = []
        cur, cur_tokens = None, 0
        for title, body in split_sections(text):
            n = self.count(body)
            if n <= base:  # whole sections pack together
                if cur is None or cur_tokens + n > base:
                    cur, cur_tokens = Chunk("", []), 0
                    chunks.append(cur)
                cur.text += body
                cur.titles += [title] if title else []
                cur_tokens += n
                continue
            cur = None  # a long section gets chunks of its own, the later ones told which section they continue
            budget = max(1, self._budget("chunk", title))
            for i, piece in enumerate(split_text(body, budget, self.count)):
                chunks.append(Chunk(piece, [title] if title else [], title if i else None))
        return [c for chunk in chunks for c in self._fit(chunk)]

    def _fit(self, c: Chunk) -> list[Chunk]:
        c.messages = self._messages("chunk", c.text, c.continues)
        n = self._fits(c.messages)
        if n is not None:
            c.prompt_tokens = n
            return [c]
        # the estimate (sum of piece counts, margin) missed: cut this chunk in two and check again
        tokens = self.count(c.text)
        if tokens <= 1:
            raise ValueError(f"window {self.window} leaves no room for text in a prompt")
        halves = split_text(c.text, max(1, min(tokens - 1, (tokens + 1) // 2)), self.count)
        cont = c.continues or (c.titles[-1] if c.titles else None)
        return [x for i, h in enumerate(halves) for x in self._fit(Chunk(h, c.titles, c.continues if i == 0 else cont))]

    # -- levels -------------------------------------------------------------------------------------------
    def _group(self, pieces: list[str]) -> list[list[str]]:
        """Consecutive pieces, greedily, into groups whose merge prompt fits."""
        sep, groups, i = self.count(SEPARATOR), [], 0
        sizes = [self.count(p) for p in pieces]
        while i < len(pieces):
            j, n = i + 1, sizes[i]
            while j < len(pieces) and n + sep + sizes[j] <= self.group_budget:
                n += sep + sizes[j]
                j += 1
            while j - i > 1 and self._fits(self._messages("merge", SEPARATOR.join(pieces[i:j]))) is None:
                j -= 1  # the exact count is over: hand the last piece to the next group
            groups.append(pieces[i:j])
            i = j
        return groups

    def _run(self, kind: str, prompts: list[list[dict]], tokens: list[int], tree: list[SummaryLevel]) -> list[str]:
        """One level: all prompts as one batch; replies in prompt order, each cut to max_summary_tokens."""
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc=f"summarize level {len(tree)} ({kind})", unit="prompt",
                   disable=not self.progress, leave=False)
        try:
            if hasattr(self.backend, "batch_chat"):
                extra = {"max_workers": self.concurrency} if isinstance(self.backend, OpenAIBackend) else {}
                outs = self.backend.batch_chat(prompts, max_tokens=self.max_summary_tokens,
                                               on_result=lambda _: bar.update(), **extra)
            else:  # a plain ChatBackend: one at a time (it may not be thread-safe)
                outs = []
                for p in prompts:
                    outs.append(self.backend.chat(p).content or "")
                    bar.update()
        finally:
            bar.close()
        if len(outs) != len(prompts):
            raise RuntimeError(f"the model returned {len(outs)} replies for {len(prompts)} prompts")
        # The cut is what guarantees termination: a model (or endpoint) that ignores max_tokens and
        # returns long text must not stop the levels from shrinking.
        outs = [self._truncate(o.strip()) for o in outs]
        tree.append(SummaryLevel(kind, tokens, outs if self.keep_tree else []))
        return outs

    def _truncate(self, text: str) -> str:
        while text and self.count(text) > self.max_summary_tokens:  # loops only if a cut re-counts higher
            text = text[:min(len(text) - 1, fit_prefix(text, self.max_summary_tokens, self.count))]
        return text

    def summarize(self, text: str) -> SummaryResult:
        """The summary of `text` and the tree of levels that produced it."""
        if not text.strip():
            raise ValueError("the document is empty: nothing to summarize")
        tree: list[SummaryLevel] = []
        result = lambda s: SummaryResult(s, self.count(text), self.window, self.max_summary_tokens, tree)
        whole = self._messages("document", text)
        if (n := self._fits(whole)) is not None:
            return result(self._run("document", [whole], [n], tree)[0])
        chunks = self.split(text)
        pieces = self._run("chunk", [c.messages for c in chunks], [c.prompt_tokens for c in chunks], tree)
        while True:
            final = self._messages("final", SEPARATOR.join(pieces))
            if (n := self._fits(final)) is not None:
                return result(self._run("final", [final], [n], tree)[0])
            groups = self._group(pieces)
            if len(groups) >= len(pieces):  # ruled out by the window check in __init__; never loop forever
                raise RuntimeError(f"merge level {len(tree)} did not reduce {len(pieces)} summaries")
            prompts = [self._messages("merge", SEPARATOR.join(g)) for g in groups]
            pieces = self._run("merge", prompts, [self.prompt_tokens(p) for p in prompts], tree)


# -- files and the CLI ------------------------------------------------------------------------------------
class SummarizeError(ValueError):
    """A file that cannot be summarized; the message says which and why."""


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file (a BOM is dropped), or a SummarizeError that says what is wrong."""
    p = Path(path)
    if not p.exists():
        raise SummarizeError(f"{p}: no such file")
    if p.is_dir():
        raise SummarizeError(f"{p}: is a directory, not a text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise SummarizeError(f"{p}: cannot be read ({e.strerror or e})") from None
    if b"\x00" in data:
        raise SummarizeError(f"{p}: contains NUL bytes, so it is a binary file (or UTF-16 text), not UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SummarizeError(f"{p}: is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                             "convert it first, e.g. with iconv -t UTF-8") from None
    if not text.strip():
        raise SummarizeError(f"{p}: is empty, nothing to summarize")
    return text


def summarize_file(path: str | Path, model: Any = "default", *, base_url: str | None = None,
                   api_key: str | None = None, **opts: Any) -> SummaryResult:
    """Summarize a UTF-8 text file: `opengpt summarize FILE [--model M] [--base-url URL] [--window N]
    [--max-summary-tokens N] [--json]`. `model`: a checkpoint for LLM.load ("default", a directory, a
    .gguf), an LLM or a backend; with `base_url` it is the endpoint's model name. `opts` go to
    Summarizer (window, max_summary_tokens, progress, ...). The file is checked before a model loads."""
    text = read_text(path)
    if base_url is not None:
        model = OpenAIBackend(base_url, api_key, model=model if isinstance(model, str) else "default")
    elif isinstance(model, (str, Path)):
        from .. import LLM

        model = LLM.load(model)
    return Summarizer(model, **opts).summarize(text)
