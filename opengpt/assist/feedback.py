"""User feedback on served chat completions, stored in SQLite and exported as preference data.

This file owns the feedback database and its three exports:

    store = FeedbackStore("feedback.db")
    store.record_response(resp["id"], request_body, resp)    # the server, for every chat completion
    store.rate(resp["id"], "up", user="alice")                # thumbs up / down (POST /v1/feedback)
    store.prefer(id_a, id_b, user="bob")                      # A is better than B, same prompt
    store.export("dpo", "pairs.jsonl")                        # also "kto" and "sft"

Export formats are TRL's conversational dataset types, so `trl.DPOTrainer` / `KTOTrainer` read them as
they are, and `sft` is what `opengpt finetune` reads (`opengpt.train.data.read_chat_jsonl`):
* dpo (preference): {"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}
  - DPO, Rafailov et al. 2023, "Direct Preference Optimization".
* kto (unpaired preference): {"prompt": [messages], "completion": [assistant], "label": bool}
  - KTO, Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization".
* sft: {"messages": prompt + [assistant]} for every answer the raters liked.
A record also carries "tools" (the request's tool schemas) when the request had tools; TRL's trainers
pass a per-example "tools" column to the chat template.

How votes become data:
* Votes are about text, not ids: two responses with the same prompt and the same answer (a greedy
  regeneration) pool their votes, and every export is deduplicated by content.
* One voter, one vote: a second rating by the same user on the same answer replaces the first; the
  same holds for a user's preference on the same pair, in either order. `user=None` is one anonymous
  voter, so an unauthenticated client cannot stack votes; the server should pass the caller's identity.
* An answer's label is the majority of its votes (sum of +1 / -1); a tie has no label and is left out.
* dpo pairs: explicit preferences first (majority per pair, ties left out), then, per prompt, every
  (liked, disliked) pair of answers, unless the pair was compared explicitly: a direct comparison
  outranks two separate thumbs. `min_rating_gap` keeps only derived pairs whose vote sums differ by at
  least that much (with single votes the gap is 2).
* "Same prompt" means the same messages and the same tools, after normalisation (None-valued keys
  dropped, text-only content parts joined, `developer` -> system, `function` -> tool).
Messages are exported the way chat templates read them (transformers' convention): assistant tool-call
arguments as dicts rather than JSON text, and no tool-call ids on the answers (they are random).

Concurrency: one connection in WAL mode behind a lock serves every thread; other processes on the same
file wait for the write lock (busy timeout). The schema version is SQLite's `PRAGMA user_version`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import IO, Any

SCHEMA_VERSION = 1
FORMATS = ("dpo", "kto", "sft")
RATINGS = {1: 1, -1: -1, "up": 1, "down": -1}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "function": "tool"}

SCHEMA = """
CREATE TABLE prompts (
    key TEXT PRIMARY KEY,              -- sha256 of the canonical JSON of [messages, tools]
    messages TEXT NOT NULL,            -- JSON, normalised OpenAI messages
    tools TEXT                         -- JSON, the request's tools, or NULL
);
CREATE TABLE responses (
    id TEXT PRIMARY KEY,               -- the chat.completion id
    prompt_key TEXT NOT NULL REFERENCES prompts(key),
    choices TEXT NOT NULL,             -- JSON, one assistant message per choice, in index order
    model TEXT,
    user TEXT,
    created REAL NOT NULL
);
CREATE INDEX responses_prompt ON responses(prompt_key);
CREATE TABLE ratings (
    id INTEGER PRIMARY KEY,
    response_id TEXT NOT NULL REFERENCES responses(id),
    choice INTEGER NOT NULL,
    user TEXT NOT NULL,                -- '' is the anonymous voter
    rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
    comment TEXT,
    created REAL NOT NULL,
    UNIQUE (response_id, choice, user)
);
CREATE TABLE preferences (
    id INTEGER PRIMARY KEY,
    chosen_id TEXT NOT NULL REFERENCES responses(id),
    chosen_choice INTEGER NOT NULL,
    rejected_id TEXT NOT NULL REFERENCES responses(id),
    rejected_choice INTEGER NOT NULL,
    user TEXT NOT NULL,
    comment TEXT,
    created REAL NOT NULL
);
"""


class FeedbackError(ValueError):
    """Feedback that cannot be stored or exported; the message says what is wrong and how to fix it."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _json_obj(value: Any, what: str) -> Any:
    try:  # a JSON round trip: plain types only, and a copy the caller cannot change afterwards
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise FeedbackError(f"{what} must be JSON data (dicts, lists, strings, numbers): {e}") from None


def _content(content: Any, where: str) -> Any:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise FeedbackError(f"{where}: content must be a string, null or a list of content parts")
    if all(p.get("type") == "text" for p in content):  # text-only parts read the same as one string
        return "".join(str(p.get("text") or "") for p in content)
    return content


def _message(m: Any, where: str) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise FeedbackError(f'{where} must be a message like {{"role": "user", "content": "..."}}')
    if m["role"] not in ROLES:
        raise FeedbackError(f"{where} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
    msg = {k: v for k, v in m.items() if v is not None}
    msg["role"] = ROLES[m["role"]]
    if "content" in msg:
        msg["content"] = _content(msg["content"], where)
    calls = msg.get("tool_calls")
    if calls is not None and (not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            for c in calls)):
        raise FeedbackError(f'{where}: tool_calls must be a list of {{"type": "function", "function": '
                            '{"name": ..., "arguments": ...}}')
    return msg


def _template_message(msg: dict, keep_call_ids: bool = True) -> dict:
    """A stored message as chat templates read it: tool-call arguments as dicts."""
    out = dict(msg)
    if out.get("tool_calls"):
        calls = []
        for c in out["tool_calls"]:
            fn = dict(c["function"])
            if isinstance(fn.get("arguments"), str):
                with contextlib.suppress(json.JSONDecodeError):  # not JSON: templates print it as given
                    fn["arguments"] = json.loads(fn["arguments"])
            call = {"type": "function", "function": fn}
            if keep_call_ids and c.get("id") is not None:
                call["id"] = c["id"]
            calls.append(call)
        out["tool_calls"] = calls
    return out


class FeedbackStore:
    """Chat completions and the feedback on them, in one SQLite file; safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise FeedbackError(f"cannot create the feedback database {self.path} ({e}); pass a writable file path") \
                from None
        try:
            self._create_or_check_schema()
        except BaseException as e:
            self._db.close()
            if isinstance(e, sqlite3.DatabaseError):
                raise FeedbackError(f"{self.path} cannot be opened as a feedback database ({e}); pass a new file or "
                                    "a database this store created") from None
            raise

    def _create_or_check_schema(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("BEGIN IMMEDIATE")  # two processes creating the file at once: one creates the schema
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise FeedbackError(f"{self.path} is an SQLite database of something else (it has tables but no "
                                "feedback schema version); pass a new file for the feedback store")
        if version > SCHEMA_VERSION:
            raise FeedbackError(f"{self.path} has feedback schema version {version}, newer than this opengpt "
                                f"reads ({SCHEMA_VERSION}); upgrade opengpt")
        if version == 0:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeedbackStore:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ writes
    def record_response(self, response_id: str, request: dict, response: dict, user: str | None = None,
                        model: str | None = None) -> None:
        """Store a chat completion: the request's messages (and tools) and each choice's assistant message.

        `request` is the OpenAI chat body, `response` the chat.completion dict (for a stream, the one
        assembled from its chunks). Recording the same id again with the same content does nothing."""
        rid = self._id(response_id, "response_id")
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list) or not request["messages"]:
            raise FeedbackError('request must be the chat body, {"messages": [{"role": ..., "content": ...}, ...]}')
        messages = [_message(m, f"request messages[{i}]") for i, m in enumerate(request["messages"])]
        tools = request.get("tools") or None
        if tools is not None and not isinstance(tools, list):
            raise FeedbackError("request tools must be a list of tool schemas")
        messages, tools = _json_obj(messages, "request messages"), _json_obj(tools, "request tools")
        choices = response.get("choices") if isinstance(response, dict) else None
        if not isinstance(choices, list) or not choices or not all(
                isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices):
            raise FeedbackError('response must be a chat.completion, {"choices": [{"index": 0, "message": '
                                '{"role": "assistant", "content": ...}}, ...]}')
        ordered = sorted(choices, key=lambda c: c.get("index", 0))
        if [c.get("index", i) for i, c in enumerate(ordered)] != list(range(len(ordered))):
            raise FeedbackError("response choices must have the indices 0..n-1, each once")
        answers = []
        for c in ordered:
            m = _message({**c["message"], "role": c["message"].get("role", "assistant")},
                         f"response choices[{c.get('index', 0)}].message")
            if m["role"] != "assistant":
                raise FeedbackError("response choices must hold assistant messages")
            answer = {"role": "assistant", "content": m.get("content") or ""}
            if m.get("tool_calls"):
                answer["tool_calls"] = m["tool_calls"]
            answers.append(answer)
        answers = _json_obj(answers, "response choices")
        key = hashlib.sha256(_canonical([messages, tools]).encode()).hexdigest()
        user = user if user is not None else request.get("user")
        model = model if model is not None else response.get("model")
        with self._lock, self._db:
            old = self._db.execute("SELECT prompt_key, choices FROM responses WHERE id = ?", (rid,)).fetchone()
            if old is not None:
                if old[0] == key and json.loads(old[1]) == answers:
                    return
                raise FeedbackError(f"response {rid!r} is already recorded with a different prompt or answer; "
                                    "response ids must be unique (use the chat.completion id)")
            self._db.execute("INSERT OR IGNORE INTO prompts VALUES (?, ?, ?)",
                             (key, _canonical(messages), None if tools is None else _canonical(tools)))
            self._db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                             (rid, key, _canonical(answers), model, user, time.time()))

    def rate(self, response_id: str, rating: int | str, user: str | None = None, comment: str | None = None,
             choice: int = 0) -> int:
        """Thumbs up (1, "up") or down (-1, "down") on one choice of a recorded response; returns the
        rating's id. The same user rating the same choice again replaces the earlier rating."""
        rid = self._id(response_id, "response_id")
        value = None
        if isinstance(rating, str):
            value = RATINGS.get(rating.strip().lower())
        elif isinstance(rating, int) and not isinstance(rating, bool):  # True == 1, but is not a thumb
            value = RATINGS.get(rating)
        if value is None:
            raise FeedbackError(f'rating must be "up" / "down" or 1 / -1, not {rating!r}')
        comment = self._comment(comment)
        with self._lock, self._db:
            self._choice(rid, choice, "response_id")
            row = self._db.execute(
                "INSERT INTO ratings (response_id, choice, user, rating, comment, created) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (response_id, choice, user) DO UPDATE SET rating = excluded.rating, "
                "comment = excluded.comment, created = excluded.created RETURNING id",
                (rid, choice, self._user(user), value, comment, time.time())).fetchone()
        return row[0]

    def prefer(self, chosen_id: str, rejected_id: str, user: str | None = None, comment: str | None = None,
               chosen_choice: int = 0, rejected_choice: int = 0) -> int:
        """Record that `chosen_id`'s answer is better than `rejected_id`'s; both must answer the same prompt.
        Returns the preference's id; the same user comparing the same pair again replaces the earlier one."""
        cid, rid = self._id(chosen_id, "chosen_id"), self._id(rejected_id, "rejected_id")
        comment, voter = self._comment(comment), self._user(user)
        with self._lock, self._db:
            c_key, c_answer = self._choice(cid, chosen_choice, "chosen_id")
            r_key, r_answer = self._choice(rid, rejected_choice, "rejected_id")
            if c_key != r_key:
                raise FeedbackError(f"responses {cid!r} and {rid!r} answer different prompts (messages or tools "
                                    "differ); a preference compares two answers to the same prompt")
            if _canonical(c_answer) == _canonical(r_answer):
                raise FeedbackError(f"responses {cid!r} and {rid!r} give the same answer, so neither can be preferred")
            self._db.execute(
                "DELETE FROM preferences WHERE user = ? AND ((chosen_id = ? AND chosen_choice = ? AND rejected_id = ? "
                "AND rejected_choice = ?) OR (chosen_id = ? AND chosen_choice = ? AND rejected_id = ? AND "
                "rejected_choice = ?))",
                (voter, cid, chosen_choice, rid, rejected_choice, rid, rejected_choice, cid, chosen_choice))
            cur = self._db.execute(
                "INSERT INTO preferences (chosen_id, chosen_choice, rejected_id, rejected_choice, user, comment, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (cid, chosen_choice, rid, rejected_choice, voter, comment, time.time()))
        return cur.lastrowid

    @staticmethod
    def _id(value: Any, name: str) -> str:
        if not isinstance(value, str) or not value:
            raise FeedbackError(f"{name} must be a non-empty string (the chat.completion id), not {value!r}")
        return value

    @staticmethod
    def _user(user: Any) -> str:
        if user is not None and not isinstance(user, str):
            raise FeedbackError(f"user must be a string or None, not {user!r}")
        return user or ""

    @staticmethod
    def _comment(comment: Any) -> str | None:
        if comment is not None and not isinstance(comment, str):
            raise FeedbackError(f"comment must be a string or None, not {comment!r}")
        return comment

    def _choice(self, rid: str, choice: Any, name: str) -> tuple[str, dict]:
        """(prompt key, answer) of a recorded response's choice; the caller holds the lock."""
        row = self._db.execute("SELECT prompt_key, choices FROM responses WHERE id = ?", (rid,)).fetchone()
        if row is None:
            raise FeedbackError(f"{name} {rid!r} is not a recorded response; feedback can only be given on responses "
                                "this server returned (the chat.completion id)")
        answers = json.loads(row[1])
        if isinstance(choice, bool) or not isinstance(choice, int) or not 0 <= choice < len(answers):
            raise FeedbackError(f"choice {choice!r} is out of range: response {rid!r} has {len(answers)} choice(s), "
                                f"numbered 0..{len(answers) - 1}")
        return row[0], answers[choice]

    # ------------------------------------------------------------------------------------------ reads
    def stats(self) -> dict:
        """Counts of what is stored, and of the records each export would write now."""
        with self._lock:
            q = lambda sql: self._db.execute(sql).fetchone()[0]
            out = {
                "responses": q("SELECT count(*) FROM responses"),
                "prompts": q("SELECT count(*) FROM prompts"),
                "ratings": q("SELECT count(*) FROM ratings"),
                "up": q("SELECT count(*) FROM ratings WHERE rating = 1"),
                "down": q("SELECT count(*) FROM ratings WHERE rating = -1"),
                "preferences": q("SELECT count(*) FROM preferences"),
                "rated_responses": q("SELECT count(DISTINCT response_id) FROM ratings"),
            }
        records = self._records()
        return {**out, **{f"{fmt}_records": len(records[fmt]) for fmt in FORMATS}}

    def export(self, fmt: str, out: str | Path | IO[str], min_rating_gap: int = 0) -> int:
        """Write the `dpo`, `kto` or `sft` dataset as JSONL to a path or a text stream; returns the record count.

        `min_rating_gap` drops dpo pairs derived from thumbs whose vote sums differ by less (explicit
        preferences are always kept)."""
        if fmt not in FORMATS:
            raise FeedbackError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
        if isinstance(min_rating_gap, bool) or not isinstance(min_rating_gap, int) or min_rating_gap < 0:
            raise FeedbackError(f"min_rating_gap must be a non-negative integer, not {min_rating_gap!r}")
        records = self._records(min_rating_gap)[fmt]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if isinstance(out, (str, Path)):
            out = Path(out)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(out)  # readers never see half a file
        else:
            out.write(text)
        return len(records)

    def _records(self, min_rating_gap: int = 0) -> dict[str, list[dict]]:
        with self._lock:  # one consistent snapshot of everything that has feedback
            responses = self._db.execute(
                "SELECT r.id, r.prompt_key, r.choices, p.messages, p.tools FROM responses r JOIN prompts p "
                "ON p.key = r.prompt_key WHERE r.id IN (SELECT response_id FROM ratings UNION SELECT chosen_id FROM "
                "preferences UNION SELECT rejected_id FROM preferences) ORDER BY r.rowid").fetchall()
            ratings = self._db.execute("SELECT response_id, choice, rating FROM ratings ORDER BY id").fetchall()
            prefs = self._db.execute("SELECT chosen_id, chosen_choice, rejected_id, rejected_choice FROM preferences "
                                     "ORDER BY id").fetchall()
        prompts: dict[str, tuple[list, Any]] = {}
        answers: dict[tuple[str, int], tuple[str, str]] = {}  # (response id, choice) -> item (prompt key, answer key)
        texts: dict[tuple[str, str], dict] = {}  # item -> answer message, in first-seen order
        for rid, key, choices, messages, tools in responses:
            prompts[key] = ([_template_message(m) for m in json.loads(messages)], json.loads(tools) if tools else None)
            for i, a in enumerate(json.loads(choices)):
                a = _template_message(a, keep_call_ids=False)
                item = (key, _canonical(a))
                answers[rid, i] = item
                texts.setdefault(item, a)
        votes: dict[tuple[str, str], int] = defaultdict(int)
        for rid, choice, rating in ratings:
            votes[answers[rid, choice]] += rating
        label = {item: v > 0 for item, v in votes.items() if v != 0}

        def base(key: str, column: str = "prompt", answer: str | None = None) -> dict:
            messages, tools = prompts[key]
            messages = messages + [texts[key, answer]] if answer is not None else messages
            return {column: messages, **({"tools": tools} if tools else {})}

        explicit: dict[tuple, int] = defaultdict(int)  # (prompt, answer a, answer b) with a < b -> votes for a
        for cid, cc, rid, rc in prefs:
            (key, a), (_, b) = answers[cid, cc], answers[rid, rc]
            if a != b:
                explicit[(key, *sorted((a, b)))] += 1 if a < b else -1
        # (prompt, chosen, rejected); explicit majorities first, a tie (v == 0) is left out
        pairs = [(k, a, b) if v > 0 else (k, b, a) for (k, a, b), v in explicit.items() if v]
        by_prompt: dict[str, list[str]] = defaultdict(list)
        for key, a in label:
            by_prompt[key].append(a)
        for key, items in by_prompt.items():
            for good in items:
                for bad in items:
                    if (label[key, good] and not label[key, bad] and (key, *sorted((good, bad))) not in explicit
                            and votes[key, good] - votes[key, bad] >= min_rating_gap):
                        pairs.append((key, good, bad))
        return {
            "dpo": [{**base(k), "chosen": [texts[k, a]], "rejected": [texts[k, b]]} for k, a, b in pairs],
            "kto": [{**base(k), "completion": [texts[k, a]], "label": good} for (k, a), good in label.items()],
            "sft": [base(k, "messages", a) for (k, a), good in label.items() if good],
        }
