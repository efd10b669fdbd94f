"""Answering from the store: retrieve, number the chunks in the prompt, ask the model to cite, check the citations.

`answer(question, store, backend)` retrieves `k` chunks, shows them to the model as `[n] (source#chunk)`
blocks and asks for an answer that cites them as `[n]`. The citations in the reply are parsed
(`[2]`, `[1][3]`, `[1, 3]`, `[1-3]`) and mapped back to the retrieved chunks, so every entry of
`cited` is a real chunk of the store, with its source, chunk id, offsets and text; a number the model
made up (outside 1..k) is dropped and reported in `invalid`. A reply without citations leaves
`cited` empty; `sources` always lists what the model was shown. The backend is any
`opengpt.assist.backend.ChatBackend` (`LocalBackend(llm)`, `OpenAIBackend(...)`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .store import Hit

SYSTEM_PROMPT = ("You are a helpful assistant. Answer in one or two sentences using only the sources, and cite "
                 "the number of each source you use in square brackets, like [1] or [2][3]. If the sources do not "
                 "contain the answer, say that you don't know.")
_CITE = re.compile(r"\[(\d+(?:\s*[,;\-–]\s*\d+)*)\]")


@dataclass(slots=True)
class Citation:
    number: int  # the [n] the model was shown
    source: str
    chunk_id: int  # row id in the store
    index: int  # chunk index within the document
    start: int  # character offsets of `text` in the document
    end: int
    title: str | None
    text: str

    @property
    def label(self) -> str:
        return f"{display_source(self.source)}#{self.index}"


@dataclass
class RagAnswer:
    question: str
    text: str  # the model's answer, citations as it wrote them
    cited: list[Citation]  # the chunks the answer cites, in order of first citation
    sources: list[Citation]  # every chunk the model was shown, numbered as in the prompt
    invalid: list[int] = field(default_factory=list)  # cited numbers that matched no source


def display_source(source: str) -> str:
    """A source as shown to the model and the user: relative to the working directory when under it."""
    try:
        rel = os.path.relpath(source)
    except ValueError:
        return source
    return rel if Path(source).is_absolute() and not rel.startswith("..") else source


def format_sources(sources: list[Citation]) -> str:
    """The numbered context blocks: `[n] (source#chunk) title` then the chunk text."""
    blocks = []
    for c in sources:
        head = f"[{c.number}] ({c.label})" + (f" {c.title}" if c.title else "")
        blocks.append(f"{head}\n{c.text.strip()}")
    return "\n\n".join(blocks)


def build_messages(question: str, sources: list[Citation], system: str = SYSTEM_PROMPT) -> list[dict]:
    # The question comes last, right before the model's turn; a trailing "Answer:" cue made SmolLM2-135M
    # loop on "The answer is:", so there is none.
    user = f"Sources:\n\n{format_sources(sources)}\n\nQuestion: {question}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_citations(text: str) -> list[int]:
    """Cited numbers in order of first appearance: [2], [1][3], [1, 3], [1-3] (a range counts each number)."""
    out: list[int] = []
    for group in _CITE.findall(text or ""):
        for part in re.split(r"\s*[,;]\s*", group):
            ends = [int(x) for x in re.split(r"\s*[\-–]\s*", part)]
            lo, hi = ends[0], ends[-1]
            # A reversed or huge range is a typo, not a request to cite 100 sources: keep its two ends.
            nums = range(lo, hi + 1) if 0 <= hi - lo < 20 else (lo, hi)
            out.extend(n for n in nums if n not in out)
    return out


def to_citation(number: int, hit: Hit) -> Citation:
    return Citation(number, hit.source, hit.chunk_id, hit.index, hit.start, hit.end, hit.title, hit.text)


def answer(question: str, store, backend, k: int = 4, mode: str | None = None,
           system: str = SYSTEM_PROMPT) -> RagAnswer:
    """Answer `question` from the `k` chunks `store` retrieves for it (`mode`: the store's default search
    when None), citing them; see the module docstring for what `cited`, `sources` and `invalid` hold."""
    hits = store.search(question, k=k) if mode is None else store.search(question, k=k, mode=mode)
    sources = [to_citation(n, h) for n, h in enumerate(hits, 1)]
    if not sources:
        return RagAnswer(question, "I don't know: the document store has nothing on this question.", [], [])
    reply = backend.chat(build_messages(question, sources, system))
    text = (reply.content or "").strip()
    numbers = parse_citations(text)
    cited = [sources[n - 1] for n in numbers if 1 <= n <= len(sources)]
    invalid = [n for n in numbers if not 1 <= n <= len(sources)]
    return RagAnswer(question, text, cited, sources, invalid)


def format_answer(result: RagAnswer) -> str:
    """The answer and, below it, the cited chunks (or every source shown, when none is cited), for a terminal."""
    listed = result.cited or result.sources
    head = "Sources:" if result.cited else "Sources shown to the model (none cited):"
    lines = [result.text, "", head] if listed else [result.text]
    for c in listed:
        lines.append(f"  [{c.number}] {c.label}" + (f" ({c.title})" if c.title else "") + f" chars {c.start}-{c.end}")
    return "\n".join(lines)
