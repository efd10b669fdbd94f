"""Guided JSON decoding: the automaton agrees with a JSON-schema validator (jsonschema) on generated
documents, the token masks equal a brute-force check of every token, and generation from a random
model always yields JSON that validates, within its token budget."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opengpt.engine.engine import LLMEngine
from opengpt.engine.guided import MAX_WS, GuidedError, compile_schema, grammar, json_processor, token_vocab
from opengpt.engine.sampler import SamplingParams
from tests.server.conftest import tiny_llm

SCHEMAS = {
    "any-object": {"type": "object"},
    "weather": {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer"},
        "hourly": {"type": "array", "items": {"type": "number"}, "maxItems": 3}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["user", "tags"], "properties": {
        "user": {"type": "object", "additionalProperties": False, "required": ["id"], "properties": {
            "id": {"type": "integer"}, "name": {"type": ["string", "null"], "minLength": 2, "maxLength": 5},
            "admin": {"type": "boolean"}}},
        "tags": {"type": "array", "minItems": 1, "items": {"anyOf": [{"type": "string"}, {"const": 7}]}},
        "extra": {"type": "object", "additionalProperties": {"type": "integer"}}}},
    "tree": {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "additionalProperties": False, "required": ["v"],
        "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}},
    "array": {"type": "array", "items": {"type": ["integer", "string"]}, "minItems": 2, "maxItems": 4},
}


def accepts(schema, text: str) -> bool:
    g = grammar(schema)
    sid = g.advance_text(g.start, text)
    return sid >= 0 and g.complete[sid]


# -- the automaton against jsonschema --------------------------------------------------------------
# Floats with a zero fraction are left out: JSON Schema counts 2.0 as an integer, the grammar writes
# integers as digits only (a stricter choice, still valid).
floats = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())
scalars = st.none() | st.booleans() | st.integers(-10**15, 10**15) | st.text(max_size=6) | floats
any_json = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids,
                                                                                             max_size=3), max_leaves=8)


def instances(s: dict, defs: dict) -> st.SearchStrategy:
    """Values of a schema (the subset used above), so accepting documents are tested too."""
    if "$ref" in s:
        return st.deferred(lambda: instances(defs[s["$ref"].split("/")[-1]], defs))
    if "const" in s:
        return st.just(s["const"])
    if "enum" in s:
        return st.sampled_from(s["enum"])
    if "anyOf" in s:
        return st.one_of([instances(a, defs) for a in s["anyOf"]])
    t = s.get("type")
    if isinstance(t, list):
        return st.one_of([instances({**s, "type": x}, defs) for x in t])
    if t == "object":
        props = s.get("properties", {})
        if not props:
            extra = s.get("additionalProperties", True)
            return st.dictionaries(st.text(max_size=4), any_json if extra is True else instances(extra, defs),
                                   max_size=3)
        req = {k: instances(props[k], defs) for k in s.get("required", [])}
        opt = {k: instances(v, defs) for k, v in props.items() if k not in req}
        return st.fixed_dictionaries(req, optional=opt)
    if t == "array":
        return st.lists(instances(s.get("items", {}), defs), min_size=s.get("minItems", 0),
                        max_size=s.get("maxItems", 3))
    if t == "string":
        return st.text(min_size=s.get("minLength", 0), max_size=s.get("maxLength", 8))
    if t == "integer":
        return st.integers(-10**15, 10**15)
    if t == "number":
        return floats | st.integers(-10**6, 10**6)
    return {"boolean": st.booleans(), "null": st.none()}[t]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_automaton_agrees_with_jsonschema(name):
    schema = SCHEMAS[name]
    validator = jsonschema.Draft202012Validator(schema)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(value=instances(schema, schema.get("$defs", {})) | any_json,
           style=st.sampled_from([{}, {"separators": (",", ":")}, {"indent": 1}, {"ensure_ascii": False}]))
    def check(value, style):
        text = json.dumps(value, **style)
        if accepts(schema, text):
            assert validator.is_valid(value), text  # sound: whatever the grammar allows validates
        elif max(map(len, re.findall(r"\n *", text)), default=0) <= MAX_WS:
            assert not validator.is_valid(value), text  # complete, within the whitespace limit

    check()


def test_every_float_repr_and_int64_is_a_number():
    # Python writes floats under 1e-4 with 3 zeros and up to 17 significant digits: 20 after the point
    schema = {"type": "array", "items": {"type": "number"}}
    for value in (0.00032053913462827386, -0.00012345678901234567, 2**63 - 1, -(2**63), 1.7976931348623157e308):
        assert accepts(schema, json.dumps([value])), value
    assert not accepts(schema, "[0." + "1" * 21 + "]") and not accepts(schema, "[" + "1" * 21 + "]")


def test_automaton_rejects_what_is_not_json():
    schema = SCHEMAS["weather"]
    for text in ['{"city": "Paris", "unit": "kelvin"}', '{"city": "Paris"}', '{"city": "P\naris", "unit": "celsius"}',
                 '{"city": "Paris", "unit": "celsius",}', '{"city": "Paris", "unit": "celsius", "days": 1.5}',
                 '{"city": "Paris", "unit": "celsius", "days": 01}', '{"city": "\\x", "unit": "celsius"}',
                 '{"city": "Paris", "unit": "celsius"} ', '{"city": "Paris", "unit": "celsius", "hourly": [1,2,3,4]}',
                 '{"city": "Paris", "city": "Rome", "unit": "celsius"}', '{"city": "a"' + " " * 20 + ', "unit": "celsius"}']:
        assert not accepts(schema, text), text
    assert accepts(schema, '{"unit":"celsius","city":"\\u00e9\\n\\"","hourly":[-0.5e-3,1E+2,0]}')


def test_schemas_that_cannot_be_enforced_are_refused():
    for schema, word in [({"type": "integer", "minimum": 0}, "minimum"), ({"type": "string", "pattern": "a+"}, "pattern"),
                         ({"not": {"type": "null"}}, "not"), (False, "false"), ({"type": "date"}, "date"),
                         ({"$ref": "https://example.com/s.json"}, "local"), ({"$ref": "#/$defs/x"}, "nothing"),
                         ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "object", "required": ["a"],
                                                               "properties": {"a": {"$ref": "#/$defs/a"}}}}}, "finite"),
                         ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems")]:
        with pytest.raises(GuidedError, match=word):
            compile_schema(schema)


# -- tokens ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return tiny_llm(tmp_path_factory.mktemp("guided"), ctx=1024)


def brute_force_mask(tables, sid: int) -> torch.Tensor:
    g, v = tables.g, tables.vocab
    mask = torch.zeros(v.size, dtype=torch.bool)
    for i, text in enumerate(v.text):
        if text is not None and g.advance_text(sid, text) >= 0:
            mask[i] = True
    if g.complete[sid]:
        mask[v.eos] = True
    return mask


def generate(llm, schema, budget: int, seed: int, engine=None) -> tuple[str, list[int], object]:
    proc = json_processor(schema, llm.tokenizer, llm.config.vocab_size, budget)
    engine = engine or LLMEngine(llm.model, llm.tokenizer.eos_token_ids, num_blocks=256)
    params = SamplingParams(max_new_tokens=budget, temperature=1.0, seed=seed, logits_processors=[proc])
    ids = engine.generate([llm.tokenizer.encode("The weather in Paris")], params)[0]
    text = llm.tokenizer.decode([t for t in ids if t not in llm.tokenizer.eos_token_ids])
    return text, ids, proc


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_masks_equal_brute_force_along_a_generation(llm, name):
    text, ids, proc = generate(llm, SCHEMAS[name], 40, seed=3)
    tables, sid = proc.tables, proc.tables.g.start
    for tok in ids:
        fast = tables.mask(sid, tokens_left=10**6)
        assert torch.equal(fast, brute_force_mask(tables, sid)), (name, text)
        assert fast[tok]
        sid = tables.step(sid, tok)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_model_output_always_validates(llm, name):
    schema = SCHEMAS[name]
    engine = LLMEngine(llm.model, llm.tokenizer.eos_token_ids, num_blocks=256)
    shortest = int(grammar(schema).rest[grammar(schema).start])
    for seed, budget in enumerate([shortest, shortest + 3, 24, 64, 64]):
        text, ids, _ = generate(llm, schema, budget, seed, engine)
        assert len(ids) <= budget
        jsonschema.validate(json.loads(text), schema)


def test_vocab_excludes_special_and_partial_tokens(llm):
    v = token_vocab(llm.tokenizer, llm.config.vocab_size + 8)  # a model vocabulary padded past the tokenizer's
    im_end = llm.tokenizer.token_to_id("<|im_end|>")
    assert v.text[im_end] is None and v.eos == [im_end]
    assert all(t is None for t in v.text[llm.tokenizer.vocab_size:])
    assert all(t is None or "\ufffd" not in t for t in v.text)
    assert v.text[llm.tokenizer.encode(" the", add_special_tokens=False)[0]].startswith(" ")


@pytest.mark.slow
def test_real_vocabulary_masks_equal_brute_force(default_gguf):
    """SmolLM2's 49k-token vocabulary: the trie walk with the string shortcut misses nothing."""
    from opengpt.tokenizer import Tokenizer
    from opengpt.weights.gguf import read_gguf

    ckpt = read_gguf(default_gguf)
    tok = Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config, ckpt.eos_token_ids)
    schema = SCHEMAS["weather"]
    proc = json_processor(schema, tok, 49152, 100)
    tables = proc.tables
    sid = tables.g.start
    prefixes = ['{', '{"city"', '{"city": "Par', '{"city": "Paris", "u', '{"city": "Paris", "unit": "celsius"',
                '{"city": "Paris", "unit": "celsius", "hourly": [1.', '{"city": "Paris", "unit": "celsius"}']
    for prefix in prefixes:
        sid = tables.g.advance_text(tables.g.start, prefix)
        assert sid >= 0, prefix
        assert torch.equal(tables.mask(sid, tokens_left=10**6), brute_force_mask(tables, sid)), prefix
