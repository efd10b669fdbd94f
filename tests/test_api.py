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
