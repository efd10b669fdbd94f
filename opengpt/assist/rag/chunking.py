"""Splitting documents into overlapping chunks that follow the document's own structure.

A chunk is about `size` words (whitespace-separated; MiniLM truncates at 256 word pieces, and 160
English words make roughly 200 of them) and starts `overlap` words before the previous one ended, so
a passage cut in two is still whole in one of the chunks. Where to cut is chosen by a score per word
position: a section start (markdown / rst heading, top-level Python `def`/`class` with its decorators)
beats a blank line, which beats a line break or a sentence end, which beats any other word. A chunk
ends at the best-scoring position in the second half of its window, a section start forces a cut once
the chunk is long enough to stand alone, and the overlap never reaches back into the previous section
(it would only blur what the chunk is about).

Every chunk keeps its source, its index in the document, the character offsets of its text in the
document (`text == document[start:end]`) and the title of the section it starts in ("Setup > CUDA",
"class Store", "Store.search", "page 3").

Reading files: md / txt / rst / py as UTF-8 text; pdf through `pypdf` when it is installed (pages
joined by blank lines, one title per page), a clear error naming the install otherwise.
"""

from __future__ import annotations

import bisect
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

TEXT_KINDS = {".md": "md", ".markdown": "md", ".txt": "txt", ".rst": "rst", ".py": "py", ".pdf": "pdf"}
SECTION, PARAGRAPH, LINE = 3, 2, 1  # cut scores; 0 elsewhere

_WORD = re.compile(r"\S+")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_MD_FENCE = re.compile(r"^\s*(```|~~~)")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+:.])\1{2,}\s*$")
_PY_DEF = re.compile(r"^(\s*)(?:async\s+def|def|class)\s+(\w+)")
_PY_DECORATOR = re.compile(r"^\s*@")


class PdfSupportMissing(ImportError):
    pass


@dataclass(slots=True)
class Chunk:
    source: str
    index: int  # position in the document, from 0
    start: int  # character offsets into the document: text == document[start:end]
    end: int
    text: str
    title: str | None = None  # the section the chunk starts in, when the format has sections


def kind_of(path: str | Path) -> str:
    """The chunking rules a file gets, by suffix; anything unknown is plain text."""
    return TEXT_KINDS.get(Path(path).suffix.lower(), "txt")


def read_document(path: str | Path) -> tuple[str, list[tuple[int, str]]]:
    """A file's text and its (offset, title) marks known from the format itself (pdf pages)."""
    path = Path(path)
    if kind_of(path) != "pdf":
        return path.read_text(encoding="utf-8"), []
    try:
        import pypdf
    except ImportError as e:
        raise PdfSupportMissing(f"reading {path} needs pypdf: pip install pypdf") from e
    parts, marks, offset = [], [], 0
    for n, page in enumerate(pypdf.PdfReader(str(path)).pages, 1):
        text = (page.extract_text() or "").strip()
        if not text:
            continue
        marks.append((offset, f"page {n}"))
        parts.append(text)
        offset += len(text) + 2
    return "\n\n".join(parts), marks


def _lines(text: str):
    """(offset, line) for each line, the newline excluded."""
    offset = 0
    for line in text.split("\n"):
        yield offset, line
        offset += len(line) + 1


def _sections(text: str, kind: str) -> list[tuple[int, str, bool]]:
    """(char offset, title, hard) where a section starts; hard ones force a cut, soft ones only name it."""
    marks: list[tuple[int, str, bool]] = []
    lines = list(_lines(text))
    if kind == "md":
        stack: list[tuple[int, str]] = []
        fenced = False
        for off, line in lines:
            if _MD_FENCE.match(line):
                fenced = not fenced  # a '#' comment inside a code block is not a heading
            elif not fenced and (m := _MD_HEADING.match(line)):
                level = len(m.group(1))
                stack = [s for s in stack if s[0] < level] + [(level, m.group(2))]
                marks.append((off, " > ".join(t for _, t in stack), True))
    elif kind == "rst":
        for (off, line), (_, under) in itertools.pairwise(lines):
            if line.strip() and _RST_UNDERLINE.match(under) and len(under.rstrip()) >= len(line.rstrip()):
                marks.append((off, line.strip(), True))
    elif kind == "py":
        cls: str | None = None
        for i, (off, line) in enumerate(lines):
            m = _PY_DEF.match(line)
            if not m:
                continue
            top = not m.group(1)
            name = m.group(2)
            if top:
                cls = name if line.lstrip().startswith("class") else None
                title = f"{'class' if cls else 'def'} {name}"
            elif cls and len(m.group(1)) <= 4:
                title = f"{cls}.{name}"  # a method: named, but only a soft cut inside its class
            else:
                continue
            while i > 0 and _PY_DECORATOR.match(lines[i - 1][1]):
                i -= 1  # decorators belong to the definition below them
            marks.append((lines[i][0], title, top))
    return marks


def _cut_scores(text: str, words: list[re.Match], hard: set[int]) -> list[int]:
    """For each word, how good a place it is to start a chunk (see the module docstring)."""
    scores = [SECTION]
    for prev, word in itertools.pairwise(words):
        gap = text[prev.end():word.start()]
        if word.start() in hard:
            s = SECTION
        elif gap.count("\n") >= 2:
            s = PARAGRAPH
        elif "\n" in gap or prev.group()[-1] in ".!?:;":
            s = LINE
        else:
            s = 0
        scores.append(s)
    return scores


def chunk_text(text: str, source: str, kind: str = "txt", size: int = 160, overlap: int = 32,
               marks: list[tuple[int, str]] | None = None) -> list[Chunk]:
    """Split `text` into chunks of at most `size` words, `overlap` words shared with the previous chunk
    of the same section. `kind` is md / rst / py / txt / pdf; `marks` add soft (offset, title) marks."""
    if size < 2 or not 0 <= overlap < size // 2 + 1:
        raise ValueError("need size >= 2 and 0 <= overlap <= size / 2")
    words = list(_WORD.finditer(text))
    if not words:
        return []
    sections = sorted(_sections(text, kind) + [(o, t, False) for o, t in marks or []])
    # A section mark points at a line start; the word that starts the line is the cut position.
    starts = [w.start() for w in words]
    hard_chars = {words[i].start() for o, _, h in sections if h and (i := bisect.bisect_left(starts, o)) < len(words)}
    scores = _cut_scores(text, words, hard_chars)
    hard_words = [i for i, s in enumerate(scores) if s == SECTION]
    title_at = [(bisect.bisect_left(starts, o), t) for o, t, _ in sections]
    min_words = max(1, size // 4)  # a section start ends a chunk only once the chunk can stand alone

    chunks: list[Chunk] = []
    s, n = 0, len(words)
    while s < n:
        e_max = min(s + size, n)
        forced = [h for h in hard_words if s + min_words <= h < e_max]
        if forced:
            e = forced[0]
        elif e_max == n:
            e = n
        else:
            # Best cut in the second half of the window; ties go to the later position (fuller chunks).
            e = max(range(s + max(1, size // 2), e_max + 1), key=lambda i: (scores[i] if i < n else SECTION, i))
        titles = [t for i, t in title_at if i <= s]
        chunks.append(Chunk(source, len(chunks), words[s].start(), words[e - 1].end(),
                            text[words[s].start():words[e - 1].end()], titles[-1] if titles else None))
        if e >= n:
            break
        if scores[e] == SECTION or overlap == 0:
            s = e
            continue
        # Start the overlap at the best boundary among its first half, never before the current section.
        lo = max(e - overlap, s + 1, max((h for h in hard_words if h <= e), default=0))
        hi = max(lo, e - overlap // 2)
        s = max(range(lo, hi + 1), key=lambda i: (scores[i], -i))
    return chunks


def chunk_document(path: str | Path, source: str | None = None, size: int = 160, overlap: int = 32) -> list[Chunk]:
    """Read and chunk one file; `source` names it in the chunks (the path by default)."""
    text, marks = read_document(path)
    return chunk_text(text, source or str(path), kind_of(path), size, overlap, marks)
