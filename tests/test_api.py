"""Text-level pieces of the API: stop strings across token boundaries."""

from __future__ import annotations

from opengpt.api import StopMatcher


def feed(stop, pieces):
    m = StopMatcher(stop)
    out, stopped = "", False
    for p in pieces:
        text, stopped = m.push(p)
        out += text
        if stopped:
            return out, True
    return out + m.flush(), False


def test_stop_string_split_across_pieces():
    assert feed(["\nUser:"], ["Hello", " there\nUs", "er: more"]) == ("Hello there", True)


def test_partial_prefix_released_when_not_a_stop():
    assert feed(["STOP"], ["a ST", "OCK b"]) == ("a STOCK b", False)


def test_earliest_of_several_stops():
    assert feed(["bb", "a"], ["xxbba"]) == ("xx", True)


def test_no_stops_passes_through():
    assert feed([], ["a", "b"]) == ("ab", False)


def test_completion_carries_logprobs(tmp_path):
    import transformers

    from opengpt import LLM
    from tests.conftest import save_hf_checkpoint

    save_hf_checkpoint(transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                num_attention_heads=4, num_key_value_heads=2), tmp_path)
    c = LLM.load(tmp_path).complete("t3 t4 t5", max_new_tokens=4, temperature=0, logprobs=2, ignore_eos=True)
    assert len(c.logprobs) == len(c.token_ids) == 4
    assert all(len(top) == 2 and top[0][0] == tok for (lp, top), tok in zip(c.logprobs, c.token_ids))
