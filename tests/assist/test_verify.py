"""The chain-of-thought verifier: claims found in prose and annotations, checked exactly; injected errors
caught at their step and correct solutions never flagged (synthetic and hand-written); the repair loop
re-prompts from the first wrong step, with scripted backends and with the default model."""

from __future__ import annotations

import random

import pytest

from opengpt.assist.backend import AssistantMessage, LocalBackend
from opengpt.assist.verify import VerifiedSolver, check, extract_claims, final_answer
from opengpt.eval.worked_solutions import ERRORS, STYLES, corrupt, make_set


def claims(text: str) -> list[tuple[str, str]]:
    return [(c.expression.replace(" ", ""), c.claimed.replace(" ", "")) for c in extract_claims(text)]


def statuses(text: str) -> list[str]:
    return [c.status for c in check(text).checks]


def test_claims_in_prose_annotations_chains_and_words():
    assert claims("Natalia sold 48/2 = <<48/2=24>>24 clips in May.") == [("48/2", "24")]  # one claim, not two
    assert claims("17.5% of $2,480 = $434, then 434 - 3^4 = 434 - 81 = 353.") == [
        ("17.5%of2480", "434"), ("434-3**4", "434-81"), ("434-81", "353")]
    assert claims("5 apples × 3 = 15 apples") == [("5*3", "15")]
    assert claims("He had 12 times 4 = 48 cards, 48 divided by 6 = 8 each") == [("12*4", "48"), ("48/6", "8")]
    assert claims("1/2 of 24 = 12 and 25% * 80 = 20 and 3 x 4 = 12") == [
        ("1/2*24", "12"), ("(25/100)*80", "20"), ("3*4", "12")]
    assert claims("-5 + 3 = -2") == [("-5+3", "-2")]
    assert claims("Total: 12 + 8 = 20 = 4 * 5") == [("12+8", "20"), ("20", "4*5")]


@pytest.mark.parametrize("text", [
    "Step 1: x = 5. On 2024-01-02 at 10:30, 3 people came.",
    "2x + 3 = 7, so x = 2",  # algebra: a variable, not a unit
    "Area = 5 * 4 = 20 m^2",  # the unit's exponent is not arithmetic: only 5 * 4 = 20 is a claim
    "It runs at 60 km/h * 2 h = 120 km",
    "2:30 + 1:15 = 3:45",
    "Items 1. 2. 3. cost 5-10 dollars",
    "10 / 4 = 2.5 = 3",  # "2.5 = 3" has no operator: a person rounding, not a calculation
])
def test_no_false_claims_in_dates_algebra_units_and_times(text):
    assert "wrong" not in statuses(text)


def test_rounding_truncation_and_approximation():
    assert statuses("10 / 3 = 3.33") == ["ok"]
    assert statuses("10 / 3 = 3.3") == ["ok"]
    assert statuses("10 / 3 = 3.34") == ["wrong"]  # rounded 3.33, not 3.34
    assert statuses("50 / 8 = 6 boxes") == ["ok"]  # whole boxes: truncation
    assert statuses("50 / 8 = 7") == ["wrong"]
    assert statuses("9 / 3 = 2.99") == ["wrong"]  # an integer result must be exact
    assert statuses("100 / 7 ≈ 14.3") == ["ok"]
    assert statuses("1/4 = 25%") == ["ok"]
    v = check("12 * 3 = 36 = 6 * 6 = 37")
    assert [c.status for c in v.checks] == ["ok", "ok", "wrong"]
    assert v.first_wrong.value == "36" and "6 * 6 = 37 is wrong" in v.first_wrong.describe()


def test_unsupported_sides_are_unchecked_never_wrong():
    v = check("2(3+4) = 14 and sqrt(-4) + 1 = 3 and f(3) + 1 = 5")  # f is no function the calculator knows
    assert [c.status for c in v.checks] == ["unchecked", "unchecked"]
    assert v.ok and v.checked == 0
    assert statuses("sqrt(16) + 1 = 5, gcd(12, 18) = 6, max(2, 3) * 4 = 11") == ["ok", "ok", "wrong"]


def test_final_answer():
    assert final_answer("So 3 + 4 = 7.\n#### 72") == "72"
    assert final_answer("3 + 4 = 7\nAnswer: $1,250.") == "$1,250"
    assert final_answer("The answer is 12 apples and 3 pears") == "3"  # no Answer line: the last number


def test_synthetic_set_all_errors_caught_at_their_step_and_no_false_flags():
    sols = make_set(120, seed=3)
    assert {s.style for s in sols} == set(STYLES)
    for s in sols:
        v = check(s.text)
        assert v.ok, (s.text, [c.describe() for c in v.wrong])
        assert v.checked >= len(s.lines)  # every step's calculation was found and checked
    rng = random.Random(4)
    for i, s in enumerate(sols):
        bad = corrupt(s, rng, ERRORS[i % len(ERRORS)])
        assert bad.text != s.text
        v = check(bad.text)
        line = bad.lines[bad.wrong_step]
        start = bad.text.index(line)
        assert v.first_wrong is not None, (bad.error, bad.text)
        assert start <= v.first_wrong.claim.start < start + len(line), (bad.error, bad.text)
        # the wrong value carried forward is used consistently; a chain restates the wrong step once more
        assert len(v.wrong) == 1 or bad.style == "chain" and len(v.wrong) == 2


# Hand-written solutions as models write them, each with the calculation that a slip is injected into
HANDWRITTEN = [
    ("Weng earns $12 an hour. For 50 minutes she earns 12 / 60 = 0.2 per minute, and 0.2 * 50 = 10.\nAnswer: 10",
     "0.2 * 50 = 10", "0.2 * 50 = 12"),
    ("Betty has half of $100, which is 100 / 2 = $50. Her parents give $15 and her grandparents 15 * 2 = $30. "
     "She still needs 100 - 50 - 30 - 15 = $5.\n#### 5", "15 * 2 = $30", "15 * 2 = $25"),
    ("Julie read 12 pages yesterday and 12 x 2 = 24 pages today, so 12 + 24 = 36 in all.\n"
     "Remaining: 120 - 36 = 84 pages; half of that is 84 / 2 = 42.\nAnswer: 42", "120 - 36 = 84", "120 - 36 = 94"),
    ("First, 3 boxes of 24 pencils is 3 × 24 = 72 pencils. Sharing among 5 kids: 72 / 5 = 14.4, so each gets "
     "14 whole pencils.\nAnswer: 14", "72 / 5 = 14.4", "72 / 5 = 15.4"),
    ("The discount is 15% of $240 = $36, so the price is $240 - $36 = $204. With 8% tax: 8% of 204 = 16.32, "
     "total 204 + 16.32 = $220.32.\nAnswer: 220.32", "8% of 204 = 16.32", "8% of 204 = 16.23"),
    ("Step 1: 7 days * 3 hours = 21 hours.\nStep 2: 21 hours × $15 = $315.\nStep 3: $315 - $40 = $275.\n"
     "Answer: $275", "$315 - $40 = $275", "$315 - $40 = $285"),
    ("The tank loses 2.5 litres a day, so in 2 weeks it loses 2.5 * 14 = 35 litres; 200 - 35 = 165 remain.\n"
     "Answer: 165", "2.5 * 14 = 35", "2.5 * 14 = 3.5"),
    ("Let x be the number of apples. Then 2x + 3 = 11 gives x = 4. Check: 2 * 4 + 3 = 11.\nAnswer: 4",
     "2 * 4 + 3 = 11", "2 * 4 + 3 = 14"),
]


@pytest.mark.parametrize("text,step,slip", HANDWRITTEN)
def test_handwritten_solutions_correct_pass_and_slips_are_caught(text, step, slip):
    v = check(text)
    assert v.ok and v.checked >= 1, [c.describe() for c in v.checks]
    bad = text.replace(step, slip)
    assert bad != text
    w = check(bad).first_wrong
    assert w is not None
    assert bad.index(slip) <= w.claim.start < bad.index(slip) + len(slip)


class Scripted:
    """A backend replying with the given texts in turn, recording every conversation it was sent."""

    def __init__(self, *replies: str):
        self.replies, self.seen = list(replies), []

    def chat(self, messages, tools=None):
        self.seen.append(messages)
        return AssistantMessage(self.replies.pop(0) if len(self.replies) > 1 else self.replies[0])


def test_solver_repairs_from_the_first_wrong_step():
    backend = Scripted("He buys 3 * 4 = 12 apples and 12 + 5 = 18 pears in all.\nAnswer: 18",
                       "Then 12 + 5 = 17.\nAnswer: 17")
    r = VerifiedSolver(backend, max_repairs=2).solve("3 bags of 4 apples and 5 pears: how many fruits?")
    assert r.verified and r.repairs == 1 and r.answer == "17" and r.flag is None
    follow_up = backend.seen[1][-1]["content"]
    # the model is given its reasoning up to the wrong step, with that step corrected, and asked to go on
    assert "He buys 3 * 4 = 12 apples and 12 + 5 = 17" in follow_up and "18" not in follow_up
    assert r.reasoning.startswith("He buys 3 * 4 = 12 apples and 12 + 5 = 17\nThen 12 + 5 = 17.")


def test_solver_flags_an_answer_it_cannot_repair():
    backend = Scripted("7 * 8 = 54\nAnswer: 54")
    r = VerifiedSolver(backend, max_repairs=2).solve("What is 7 times 8?")
    assert not r.verified and r.repairs == 2 and len(backend.seen) == 3
    assert r.flag == "unverified: 7 * 8 = 54 is wrong: 7 * 8 = 56"
    r0 = VerifiedSolver(Scripted("7 * 8 = 54"), max_repairs=0).solve("What is 7 times 8?")
    assert not r0.verified and r0.repairs == 0
    none = VerifiedSolver(Scripted("It is fifty-six.")).solve("What is 7 times 8?")
    assert not none.verified and none.flag == "unverified: no calculation could be checked"


@pytest.mark.slow
def test_solver_runs_the_default_model_end_to_end(default_llm):
    backend = LocalBackend(default_llm, max_new_tokens=64)
    r = VerifiedSolver(backend, max_repairs=1).solve("A pen costs $3. How much do 4 pens cost?")
    assert r.attempts and r.repairs <= 1 and r.reasoning
    assert r.verified == (r.verification.ok and r.verification.checked > 0)
    assert r.verified or r.flag.startswith("unverified")
