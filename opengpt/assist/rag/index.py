"""Indexing files and directories into a store, as `opengpt index add PATH...` does.

Directories are walked for md / markdown / txt / rst / py / pdf files, skipping hidden directories,
virtual environments, caches and dependency trees; a file named explicitly is indexed whatever its
suffix, as long as it is text. A file whose first 8 KiB hold a NUL byte or are not UTF-8 is binary and
skipped (pdf excepted: pypdf reads it). Paths are visited in sorted order so two runs add in the
same order and give the same chunk ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .chunking import TEXT_KINDS

SKIP_DIRS = frozenset({".venv", "venv", "env", "__pycache__", "node_modules", "site-packages", "build", "dist"})


@dataclass
class IndexStats:
    added: int = 0
    unchanged: int = 0
    replaced: int = 0
    chunks: int = 0  # chunks written by this run (unchanged documents write none)
    skipped: list[str] = field(default_factory=list)  # binary or unreadable files, with the reason

    def __str__(self) -> str:
        s = f"{self.added} added, {self.replaced} replaced, {self.unchanged} unchanged, {self.chunks} chunks written"
        return s + (f", {len(self.skipped)} skipped" if self.skipped else "")


def is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8192)
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a multi-byte character cut by the 8 KiB boundary is still text
    return False


def iter_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """The files `index add` would index under `paths`, in sorted order."""
    for p in map(Path, paths):
        if p.is_file():
            yield p
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS
                                 and not d.endswith(".egg-info"))
                for name in sorted(files):
                    if not name.startswith(".") and Path(name).suffix.lower() in TEXT_KINDS:
                        yield Path(root) / name
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")


def index_paths(store, paths: Iterable[str | Path], progress: bool = True) -> IndexStats:
    """Add every file under `paths` to `store` (see the module docstring); counts of what happened."""
    from tqdm import tqdm

    files = list(iter_files(paths))
    stats = IndexStats()
    for path in tqdm(files, desc="indexing", unit="file", disable=not progress):
        if path.suffix.lower() != ".pdf" and is_binary(path):
            stats.skipped.append(f"{path} (binary)")
            continue
        try:
            r = store.add_document(path)
        except (UnicodeDecodeError, OSError, ImportError) as e:
            stats.skipped.append(f"{path} ({e})")
            continue
        setattr(stats, r.status, getattr(stats, r.status) + 1)
        if r.status != "unchanged":
            stats.chunks += r.chunks
    return stats
