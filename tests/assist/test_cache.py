"""The chat result cache: exact keys (whitespace, key order, defaults, users, sampling parameters),
semantic hits with the bundled all-MiniLM-L6-v2 and their verification (negation, numbers, entities,
word order, each counted), TTL with an injected clock, LRU eviction, a restart from the SQLite file,
responses that must not be stored, the HNSW path of a large context, and Redis when it is here."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from opengpt.assist.cache import Cache, RedisCache, canonical_request, mismatch, numbers
from opengpt.assist.rag.embed import EmbedderMissing, load_embedder


@pytest.fixture(scope="module")
def minilm():
    try:
        e = load_embedder()
        e.embed(["load"])
        return e
    except EmbedderMissing as e:
        pytest.skip(str(e))


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def req(q: str, **kw) -> dict:
    return {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}], **kw}


def resp(text: str, finish: str = "stop") -> dict:
    return {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}


def answer(hit) -> str | None:
    return hit.response["choices"][0]["message"]["content"] if hit else None


# -- exact -----------------------------------------------------------------------------------------
def test_exact_hit_ignores_whitespace_key_order_defaults_and_dropped_fields():
    c = Cache(mode="exact")
    c.put(req("What is  the capital\nof France?"), resp("Paris"))
    same = {"messages": [{"content": " Be   brief. ", "role": "system"},
                         {"role": "user", "content": [{"type": "text", "text": "What is the"},
                                                      {"type": "text", "text": "capital of France?"}]}],
            "temperature": 1.0, "top_p": 1, "n": 1, "stream": True, "user": "ignored", "model": "m"}
    hit = c.get(same)
    assert hit is not None and hit.kind == "exact" and hit.score == 1.0 and answer(hit) == "Paris"
    assert c.key(same) == c.key(req("What is the capital of France?")) == hit.key
    assert len(hit.key) == 64 and int(hit.key, 16) >= 0
    assert c.stats()["hits"]["exact"] == 1


@pytest.mark.parametrize("change", [{"temperature": 0.2}, {"max_tokens": 10}, {"seed": 3}, {"model": "other"},
                                    {"top_p": 0.5}, {"stop": ["\n"]}, {"n": 2},
                                    {"response_format": {"type": "json_object"}}])
def test_exact_miss_across_sampling_parameters(change):
    c = Cache(mode="exact")
    c.put(req("What is the capital of France?"), resp("Paris"))
    assert c.get({**req("What is the capital of France?"), **change}) is None
    assert c.stats()["misses"] == 1


def test_canonical_request_fills_defaults_and_keeps_what_matters():
    a = canonical_request({"model": "m", "messages": [], "temperature": 1, "stream": True, "metadata": {"a": 1},
                           "max_completion_tokens": 5, "stop": "x", "tool_choice": "none"})
    assert a == {"model": "m", "messages": [], "max_tokens": 5, "stop": ["x"]}
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert canonical_request({"messages": [], "tools": tools, "tool_choice": "auto"}) == {"messages": [], "tools": tools}
    forced = canonical_request({"messages": [], "tools": tools, "tool_choice": "required"})
    assert forced["tool_choice"] == "required"


def test_no_hit_crosses_users(minilm):
    c = Cache(embedder=minilm, threshold=0.8)
    c.put(req("What is the capital of France?"), resp("Paris (alice)"), user="alice")
    for user in ("bob", None):
        assert c.get(req("What is the capital of France?"), user=user) is None, user
        assert c.get(req("Which city is the capital of France?"), user=user) is None, user
    assert answer(c.get(req("What is the capital of France?"), user="alice")) == "Paris (alice)"
    c.put(req("What is the capital of France?"), resp("Paris (anon)"))
    assert answer(c.get(req("What is the capital of France?"))) == "Paris (anon)"
    assert answer(c.get(req("What is the capital of France?"), user="alice")) == "Paris (alice)"
    c.clear(user="alice")
    assert c.get(req("What is the capital of France?"), user="alice") is None
    assert c.stats()["size"] == 1


# -- semantic --------------------------------------------------------------------------------------
def test_semantic_hit_on_a_paraphrase(minilm):
    c = Cache(embedder=minilm, threshold=0.8)
    c.put(req("How do I reverse a list in Python?"), resp("lst[::-1]"))
    hit = c.get(req("What's the way to reverse a Python list?"))
    assert hit is not None and hit.kind == "semantic" and 0.8 <= hit.score < 1
    assert answer(hit) == "lst[::-1]" and hit.question == "How do I reverse a list in Python?"
    # Another system prompt is another context: no candidate at all.
    other = req("What's the way to reverse a Python list?")
    other["messages"][0]["content"] = "Answer in French."
    assert c.get(other) is None
    assert c.stats()["hits"]["semantic"] == 1


@pytest.mark.parametrize("cached, new, reason", [
    ("Which Python versions support pattern matching?", "Which Python versions don't support pattern matching?", "negation"),
    ("How do I install numpy on Windows?", "How do I install numpy without pip on Windows?", "negation"),
    ("What is the largest planet in the solar system?", "What is the smallest planet in the solar system?", "antonym"),
    ("How many grams of sugar are in 100 ml of cola?", "How many grams of sugar are in 330 ml of cola?", "number"),
    ("Convert 1,000 dollars to euros", "Convert 10,000 dollars to euros", "number"),
    ("What is the population of Canada?", "What is the population of Australia?", "entity"),
    ("How do I convert a string to an int in Python?", "How do I convert an int to a string in Python?", "order"),
    ("In Java, how do I parse a String into an int?", "How do I convert an integer to a string in Java?", "order"),
    ("Who invented the telephone?", "When was the telephone invented?", "question_type"),
    ("What is the square root of 2?", "What is the cube root of 2?", "unaligned"),
    ("Why is my cat not eating?", "Why is my dog not eating?", "unaligned"),
])
def test_semantic_candidates_rejected_and_counted(minilm, cached, new, reason):
    c = Cache(embedder=minilm, threshold=0.6)  # low: the candidate is found, verification alone must reject it
    c.put(req(cached), resp("cached answer"))
    assert c.get(req(new)) is None
    assert c.stats()["rejected"][reason] == 1
    raw = Cache(embedder=minilm, threshold=0.6, verify=False)  # cosine alone serves the wrong answer
    raw.put(req(cached), resp("cached answer"))
    assert answer(raw.get(req(new))) == "cached answer"


def test_mismatch_rules_accept_paraphrases():
    assert numbers("It costs 1,000 or 1000.0, two or 2") == numbers("1000 1000 2 2")
    for a, b in [("Why doesn't my code compile?", "Why is my code not compiling?"),
                 ("What's the capital of France?", "What is France's capital city?"),
                 ("how do I sort a dict by value in python", "In Python, what's the way to sort a dictionary by its values?"),
                 ("Convert 5 km to miles", "How many miles are 5 kilometres?")]:
        assert mismatch(a, b) is None, (a, b)
    assert mismatch("Is Rust faster than Go?", "Is Go faster than Rust?") == "order"


def test_question_type_and_word_swaps():
    from opengpt.assist.cache import question_type
    assert question_type("How many days are in a leap year?") == question_type("Number of days in a leap year?") == "quantity"
    assert question_type("What year did World War II end?") == question_type("When did WWII end?") == "time"
    assert question_type("In what way can I do X?") == "manner" and question_type("What is X?") is None
    assert mismatch("When was the telephone invented?", "Who invented the telephone?") == "question_type"
    assert mismatch("Why is my dog not eating?", "Why is my cat not eating?") == "unaligned"  # co-hyponyms
    assert mismatch("Why is my kitty not eating?", "Why is my cat not eating?") is None  # synonyms align


def test_cross_check_hook_is_called_last(minilm):
    calls = []
    c = Cache(embedder=minilm, threshold=0.8, cross_check=lambda new, old: calls.append((new, old)) or False)
    c.put(req("How do I reverse a list in Python?"), resp("lst[::-1]"))
    assert c.get(req("How can I reverse a list in python")) is None
    assert calls == [("How can I reverse a list in python", "How do I reverse a list in Python?")]
    assert c.stats()["rejected"]["cross_check"] == 1
    assert c.get(req("How do I not reverse a list in Python?")) is None and len(calls) == 1  # negation first


# -- lifetime --------------------------------------------------------------------------------------
def test_ttl_expiry_with_an_injected_clock(minilm):
    clock = Clock()
    c = Cache(embedder=minilm, ttl=60, threshold=0.8, now=clock)
    c.put(req("How do I reverse a list in Python?"), resp("lst[::-1]"))
    clock.t += 59
    assert c.get(req("How do I reverse a list in Python?")).kind == "exact"
    assert c.get(req("How can I reverse a list in python")).kind == "semantic"
    clock.t += 1
    assert c.get(req("How can I reverse a list in python")) is None
    assert c.get(req("How do I reverse a list in Python?")) is None
    assert c.stats()["size"] == 0 and c.stats()["expired"] == 1
    c.put(req("a"), resp("a"))
    clock.t += 100
    c.put(req("b"), resp("b"))  # a put purges what has expired
    assert c.stats()["size"] == 1


def test_size_bound_evicts_least_recently_used():
    clock = Clock()
    c = Cache(mode="exact", max_entries=3, now=clock)
    for q in "abc":
        clock.t += 1
        c.put(req(q), resp(q))
    clock.t += 1
    assert c.get(req("a")) is not None  # a is now the most recent
    clock.t += 1
    c.put(req("d"), resp("d"))
    assert [q for q in "abcd" if c.get(req(q)) is not None] == ["a", "c", "d"]
    assert c.stats()["size"] == 3 and c.stats()["evicted"] == 1


def test_restart_keeps_exact_and_semantic_entries(tmp_path, minilm):
    path = tmp_path / "cache.db"
    with Cache(path, embedder=minilm, threshold=0.8) as c:
        c.put(req("How do I reverse a list in Python?"), resp("lst[::-1]"))
        c.put(req("What is the capital of France?"), resp("Paris"), user="alice")
    with Cache(path, embedder=minilm, threshold=0.8) as c:
        assert c.stats()["size"] == 2
        assert c.get(req("How do I reverse a list in Python?")).kind == "exact"
        hit = c.get(req("Which city is the capital of France?"), user="alice")
        assert hit.kind == "semantic" and answer(hit) == "Paris"
        assert c.get(req("Which city is the capital of France?")) is None


def test_two_caches_on_one_file_see_each_other(tmp_path, minilm):
    a, b = Cache(tmp_path / "c.db", embedder=minilm, threshold=0.8), Cache(tmp_path / "c.db", embedder=minilm, threshold=0.8)
    assert b.get(req("How can I reverse a list in python")) is None
    a.put(req("How do I reverse a list in Python?"), resp("lst[::-1]"))
    assert answer(b.get(req("How can I reverse a list in python"))) == "lst[::-1]"


@pytest.mark.parametrize("bad", [resp("cut off", "length"), resp("filtered", "content_filter"),
                                 {"error": {"message": "overloaded"}}])
def test_unsafe_responses_are_not_stored(bad):
    c = Cache(mode="exact")
    c.put(req("Tell me a story"), bad)
    assert c.get(req("Tell me a story")) is None
    assert c.stats()["size"] == 0 and c.stats()["not_stored"] == 1


def test_tool_results_and_images_are_cached_exactly_only(minilm):
    c = Cache(embedder=minilm, threshold=0.5)
    img = [{"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": "data:x"}}]
    c.put({"model": "m", "messages": [{"role": "user", "content": img}]}, resp("a cat"))
    assert c.get({"model": "m", "messages": [{"role": "user", "content": img}]}).kind == "exact"
    img2 = [img[0], {"type": "image_url", "image_url": {"url": "data:y"}}]
    assert c.get({"model": "m", "messages": [{"role": "user", "content": img2}]}) is None


# -- a large context goes through HNSW -------------------------------------------------------------
class TableEmbedder:
    """Vectors looked up by text; unknown texts get a random unit vector fixed by their hash."""

    name, dim = "table", 32

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def embed(self, texts):
        out = []
        for t in texts:
            if t not in self.table:
                v = np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim).astype(np.float32)
                self.table[t] = v / np.linalg.norm(v)
            out.append(self.table[t])
        return np.stack(out)


def test_large_context_searches_through_hnsw(monkeypatch):
    pytest.importorskip("faiss")
    import opengpt.assist.cache as cache_mod

    monkeypatch.setattr(cache_mod, "FLAT_MAX", 64)
    target = np.ones(32, dtype=np.float32) / np.sqrt(32)
    near = target + 0.05 * np.random.default_rng(0).standard_normal(32).astype(np.float32)
    emb = TableEmbedder({"the question": target, "the same question": near / np.linalg.norm(near)})
    c = Cache(embedder=emb, threshold=0.9, ttl=None)
    for i in range(200):
        c.put(req(f"filler {i}"), resp(str(i)))
    c.put(req("the question"), resp("found"))
    assert c._buckets and max(len(b) for b in c._buckets.values()) == 201
    assert next(iter(c._buckets.values())).hnsw is not None
    hit = c.get(req("the same question"))
    assert hit is not None and hit.kind == "semantic" and answer(hit) == "found"


# -- Redis -----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    if importlib.util.find_spec("redis") is None:
        pytest.skip("the redis package is not installed (pip install redis)")
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_cache_exact_semantic_lru_and_restart(redis_url, minilm):
    clock = Clock()
    a = RedisCache(redis_url, embedder=minilm, threshold=0.8, max_entries=2, now=clock)
    a.put(req("How do I reverse a list in Python?"), resp("lst[::-1]"))
    b = RedisCache(redis_url, embedder=minilm, threshold=0.8, max_entries=2, now=clock)  # another server
    assert b.get(req("How do I reverse a list in Python?")).kind == "exact"
    assert answer(b.get(req("How can I reverse a list in python"))) == "lst[::-1]"
    assert b.get(req("How do I not reverse a list in Python?")) is None and b.stats()["rejected"]["negation"] == 1
    assert b.get(req("How do I reverse a list in Python?"), user="alice") is None
    clock.t += 1
    a.put(req("What is the capital of France?"), resp("Paris"))
    clock.t += 1
    assert b.get(req("How do I reverse a list in Python?")) is not None  # used after France
    clock.t += 1
    a.put(req("What is the capital of Spain?"), resp("Madrid"))  # evicts the least recently used
    assert a.stats()["size"] == 2 and a.get(req("What is the capital of France?")) is None
    assert answer(a.get(req("How do I reverse a list in Python?"))) == "lst[::-1]"
    clock.t += 4000
    assert a.get(req("How do I reverse a list in Python?")) is None  # past the TTL


def test_redis_cache_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match="pip install redis"):
        RedisCache("redis://127.0.0.1:1/0")


@pytest.mark.parametrize("cached, new, reason", [
    # a specific word on one side only, nothing left over on the other (wordfreq: rarer than GENERIC_ZIPF)
    ("How do I sort a dictionary by value in Python?", "How do I sort a dictionary by value in descending order in Python?",
     "unaligned"),
    ("How do I get a stain out of a white shirt?", "How do I get a red wine stain out of a white shirt?", "unaligned"),
    ("How do I change my default shell to zsh?", "How do I change my default shell from zsh to bash?", "unaligned"),
    ("How do I delete a branch in git?", "How do I delete a remote branch in git?", "unaligned"),
    # outside ~ except; good / harm; soft / hard; catch / raise; join (into one) / split; keep / discard
    ("What is the tallest mountain in Africa?", "What is the tallest mountain outside Africa?", "negation"),
    ("Does drinking coffee harm heart health?", "Is coffee good for your heart?", "antonym"),
    ("How long should I boil an egg for a soft yolk?", "How long should I boil an egg for a hard yolk?", "antonym"),
    ("How can I grow tomato plants indoors?", "How do I grow tomatoes outdoors?", "antonym"),
    ("What's the way to catch errors in Python code?", "How do I raise errors in Python code?", "antonym"),
    ("Python: turn a list of strings into one string", "How do I split a string into a list in Python?", "antonym"),
    ("Undo my last commit in git but keep the changes", "Undo my last commit in git and discard the changes", "antonym"),
    # "between A and B" against "from B to A"
    ("What's the flight time between London and New York?", "How long does it take to fly from New York to London?",
     "order"),
    # "format" is specific, "get" a stopword: format added on one side only
    ("How do I get the current date in JavaScript?", "How do I format the current date in JavaScript?", "unaligned"),
    # "what's the best time" asks when
    ("What's the best time to plant tulip bulbs?", "Where should I plant tulip bulbs?", "question_type"),
    # "non-" negates; an arrow is "to"; "how often" is not "how much"
    ("How do I keep only matching rows in a SQL join?", "How do I keep only non-matching rows in a SQL join?",
     "negation"),
    ("Cheapest train Lyon → Milan?", "What's the cheapest train from Milan to Lyon?", "order"),
    ("How much should I water a young olive tree?", "How often should I water a young olive tree?", "question_type"),
    # two shared words trade places around the same words; "3pm" is not "3am"; "all but" excepts; a
    # constraint clause of common words added on one side only
    ("How many grams are in an ounce?", "How many ounces are in a gram?", "order"),
    ("Can I swap honey for sugar in bread?", "Can I swap sugar for honey in bread?", "order"),
    ("The meeting is at 9am in Berlin; what time is that in Tokyo?",
     "The meeting is at 9pm in Berlin; what time is that in Tokyo?", "number"),
    ("How do I delete all rows of a table?", "How do I delete all but the first rows of a table?", "negation"),
    ("What happens to the yield when bond prices go up?", "What happens to the yield when bond prices go down?",
     "antonym"),
    ("What should I bring to a job interview?", "What should I bring to a job interview with my kids?", "unaligned"),
    # two runs of words trade places around the same middle (a thin word, a multi-word name, numbers);
    # before / after are directions; "Canadians ... Mexico" against "Mexicans ... Canada"; the US is no "us"
    ("Is a tomato a fruit?", "Is a fruit a tomato?", "order"),
    ("Is San Diego north of Los Angeles?", "Is Los Angeles north of San Diego?", "order"),
    ("If it's noon in Denver, what time is it in New York?", "If it's noon in New York, what time is it in Denver?",
     "order"),
    ("forward port 80 to 8080", "forward port 8080 to 80", "order"),
    ("Did the French Revolution happen before the American Revolution?",
     "Was the American Revolution before the French Revolution?", "order"),
    ("Do Canadians need a visa to visit Mexico?", "Do Mexicans need a visa to visit Canada?", "order"),
    ("What's the country code for calling France from the US?",
     "What's the country code for calling the US from France?", "order"),
    # a number stated in another unit; "second largest" is a number; X-free is "without X" and a word
    # negated on one side only; "stop ... from doing" negates
    ("What is 30 euros in dollars?", "What is $30 in euros?", "number"),
    ("What is the largest ocean?", "What is the second largest ocean?", "number"),
    ("nut-free egg-free cookie recipe", "egg-free cookie recipe with nuts", "negation"),
    ("How do I make Word autocorrect my spelling?", "How do I stop Word from autocorrecting my spelling?", "negation"),
    # opposite roles, under / over, built / fell; a definition is not a place; a trailing clause after
    # a word the other question says in another form ("drive" / "driving")
    ("How do I let apps use my location on Android?", "How do I block apps from using my location on Android?",
     "negation"),
    ("Is tipping expected in the US?", "Is tipping expected in South America?", "entity"),  # not the US
    ("Can a landlord end a lease early?", "Can a tenant end a lease early?", "antonym"),
    ("Is ibuprofen safe for children under 12?", "Is ibuprofen safe for children over 12?", "antonym"),
    ("In what year were the Twin Towers built?", "In what year did the Twin Towers fall?", "antonym"),
    ("What does 'per se' mean?", "Where does the phrase 'per se' come from?", "question_type"),
    ("Is it legal to drive barefoot in Germany?", "Is it legal to drive barefoot in Germany during a driving test?",
     "unaligned"),
])
def test_new_rules_reject(cached, new, reason):
    assert mismatch(new, cached) == reason


@pytest.mark.parametrize("a, b", [
    ("Is Mexican tap water safe to drink?", "Is it safe to drink tap water in Mexico?"),  # name prefix variants
    ("How many days are in a leap year?", "Number of days in a leap year?"),  # how many ~ number of
    ("How many ounces are in a pound?", "How many ounces are in 1 pound?"),  # a pound = 1 pound
    ("Combine a pair of Python dicts into one", "How do I merge two dicts in Python?"),  # pair = 2
    ("How much sleep does a teenager need?", "How many hours of sleep does a teenager need?"),  # unit on one side
    ("Convert 5 km to miles", "How many miles are 5 kilometres?"),  # task verbs may float
    ("What makes the sky blue?", "Why does the sky look really blue?"),  # generic added words float
    ("Cheapest train Lyon -> Milan?", "What's the cheapest train from Lyon to Milan?"),  # arrow = to
    ("How often should I water a cactus?", "How many times a week should I water a cactus?"),  # both frequency
    ("What should I pack for a week in Lisbon?", "What should I pack for one week in Lisbon?"),  # no clause added
    ("What's the difference between tea and coffee caffeine?", "What's the difference between coffee and tea caffeine?"),  # and is symmetric
    ("When was the radio invented?", "In what year was the radio invented?"),  # adjacent words, no swap
    ("How do I sort a list in Python?", "In Python, how do I sort a list?"),  # a block moved, no middle
    ("Is tap water safe to drink in Mexico?", "In Mexico, is tap water safe to drink?"),
    ("Which is bigger, a lemon or a lime?", "Which is bigger, a lime or a lemon?"),  # "or" is symmetric
    ("gluten-free bread recipe", "recipe for gluten free bread"),  # both "without gluten"
    ("How do I stop my cat from scratching the sofa?", "How can I keep my cat from scratching the sofa?"),
    ("Can I use a 45W charger for a 65W laptop?", "Is a 45W charger fine for a 65W laptop?"),  # no swap
    ("Who is the president of the US?", "Who is the U.S. president?"),  # US = U.S. = United States = American
    ("Is tipping expected in the United States?", "Is tipping expected in the U.S.?"),
    ("Do US citizens need a visa for Japan?", "Do American citizens need a visa for Japan?"),
    ("What makes bread rise?", "Why does bread rise?"),  # both ask for a reason
    ("What does 'per se' mean?", "What is the meaning of 'per se'?"),  # both ask for a definition
])
def test_new_rules_keep_paraphrases(a, b):
    assert mismatch(a, b) is None and mismatch(b, a) is None, (mismatch(a, b), mismatch(b, a))


def test_question_frame_of_a_wh_word_inside_a_clause():
    from opengpt.assist.cache import question_type
    assert question_type("Can I drink the tap water when traveling in Mexico?") == "yesno"  # "when" mid-clause
    assert question_type("The first human to step onto the moon was who?") == "person"  # at the clause's end
    assert question_type("What's the best time to plant tulip bulbs?") == "time"


def test_specific_words_by_frequency():
    pytest.importorskip("wordfreq")
    from opengpt.assist.cache_verify import specific
    assert specific("descending") and specific("zsh") and not specific("really") and not specific("make")


# -- contextual (BERTScore-style) alignment and the pair classifier ---------------------------------
def _align(minilm, a, b):
    from opengpt.assist import cache_verify as cv

    (va, vb), (ta, tb) = minilm.embed_with_tokens([a, b])
    return cv.alignment(a, b, ta, tb), cv.pair_features(a, b, float(va @ vb), ta, tb, rule=None)


def test_token_vectors_share_the_forward_pass(minilm):
    import numpy as np

    texts = ["How do I feed my cat?", "Which foods contain a lot of iron?"]
    v, t = minilm.embed_with_tokens(texts)
    assert np.allclose(v, minilm.embed(texts), atol=1e-6)
    tv = minilm.token_vectors(texts)
    assert [x.shape for x in tv] == [x.shape for x in t] and tv[0].shape == (7, 384)  # no [CLS] / [SEP]
    assert np.allclose(np.linalg.norm(tv[0], axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("cached, new", [
    ("Is it cheaper to fly to Paris?", "Is it cheaper to take the train to Paris?"),  # the rules miss it
])
def test_contextual_alignment_rejects_a_swapped_key_word(minilm, cached, new, monkeypatch):
    from opengpt.assist import cache_verify as cv

    # The mechanism at 0.40: the shipped ALIGN_MIN (0.30, chosen on the pooled pair files to keep 31% of
    # true pairs) lets this pair through, at 0.36.
    monkeypatch.setattr(cv, "ALIGN_MIN", 0.40)
    score, _ = _align(minilm, new, cached)
    assert 0.30 < score < cv.ALIGN_MIN
    c = Cache(embedder=minilm, threshold=0.6, contextual="align")
    c.put(req(cached), resp("a"))
    assert c.get(req(new)) is None
    assert sum(c.stats()["rejected"].values()) == 1


def test_pair_classifier_rejects_cat_for_dog(minilm):
    from opengpt.assist import cache_verify as cv

    (va, vb), (ta, tb) = minilm.embed_with_tokens(["How do I feed my dog?", "How do I feed my cat?"])
    f = cv.pair_features("How do I feed my dog?", "How do I feed my cat?", float(va @ vb), ta, tb)
    assert cv.pair_probability(f, cv.pair_model()) < cv.pair_model()["p_min"]
    c = Cache(embedder=minilm, threshold=0.6)  # default: rules, then the pair classifier
    c.put(req("How do I feed my cat?"), resp("a"))
    assert c.get(req("How do I feed my dog?")) is None


@pytest.mark.parametrize("contextual", ["pair", "align"])
def test_contextual_check_keeps_a_heavy_paraphrase(minilm, contextual):
    from opengpt.assist import cache_verify as cv

    a, b = "How do I reverse a list in Python?", "What is the way to reverse a Python list?"
    score, f = _align(minilm, b, a)
    assert score >= cv.ALIGN_MIN and cv.pair_probability(f, cv.pair_model()) >= cv.pair_model()["p_min"]
    c = Cache(embedder=minilm, threshold=0.8, contextual=contextual)
    c.put(req(a), resp("reversed()"))
    hit = c.get(req(b))
    assert hit is not None and hit.kind == "semantic"


def test_contextual_mode_is_validated_and_can_be_off(minilm):
    with pytest.raises(ValueError):
        Cache(embedder=minilm, contextual="bogus")
    c = Cache(embedder=minilm, threshold=0.6, contextual="off", cross_check=None)
    c.put(req("Is it cheaper to fly to Paris?"), resp("a"))
    assert c.get(req("Is it cheaper to take the train to Paris?")) is not None  # the rules alone miss it


# -- the trained cross-encoder cross-check (opengpt/assist/cross_check.py) -------------------------
@pytest.fixture(scope="module")
def cross(minilm):
    from opengpt.assist.cross_check import MODEL_FILE, CrossCheck

    if not MODEL_FILE.is_file():
        pytest.skip("opengpt/assist/cross_check.safetensors is missing (benchmarks/train_cross_check.py writes it)")
    return CrossCheck(embedder=minilm)


def test_cross_check_loads_and_is_deterministic(cross, minilm):
    from opengpt.assist.cross_check import CrossCheck, default_cross_check

    a, b = "How do I wash my cat?", "How do I wash my dog?"
    p = cross.probability(a, b)
    assert 0.0 <= p <= 1.0 and cross.probability(a, b) == p
    assert abs(CrossCheck(embedder=minilm).probability(a, b) - p) < 1e-6  # a fresh load scores the same
    assert abs(cross.probability(b, a) - p) < 1e-6  # symmetrised
    assert 0.0 < cross.p_min < 1.0 and cross.info()["training"]["train_pairs"] > 0
    assert default_cross_check() is default_cross_check()  # loaded once
    assert minilm.embed(["How do I wash my cat?"]).shape == (1, minilm.dim)  # embed() is unchanged by pair runs


@pytest.mark.parametrize("a, b", [
    ("How do I wash my cat?", "How do I wash my dog?"),
    ("How do I boil an egg?", "How do I boil an egg while pregnant?"),
])
def test_cross_check_rejects_cat_for_dog(cross, a, b):
    assert cross.probability(a, b) < cross.p_min and not cross(a, b)


def test_cross_check_keeps_a_heavy_paraphrase(cross, minilm):
    a, b = "How do I reverse a list in Python?", "What is the way to reverse a Python list?"
    assert cross(b, a)
    c = Cache(embedder=minilm, threshold=0.8, cross_check="default")  # rules, pair classifier, cross-check
    assert c.cross_check is not None
    c.put(req(a), resp("reversed()"))
    hit = c.get(req(b))
    assert hit is not None and hit.kind == "semantic"


def test_cross_check_option_is_validated_and_can_be_off(minilm):
    with pytest.raises(ValueError):
        Cache(embedder=minilm, cross_check="bogus")
    assert Cache(embedder=minilm).cross_check is None  # off by default (see the Cache docstring)
