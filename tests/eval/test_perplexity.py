"""Strided perplexity against a token-by-token reference, window coverage, and the KL / agreement
comparison, on tiny random models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from opengpt.eval.perplexity import evaluate, perplexity, windows
from tests.model.test_transformer import build

IDS = torch.randint(0, 80, (61,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n,window,stride", [(61, 16, 8), (61, 16, 15), (61, 16, 1), (10, 32, 16), (17, 16, 5), (2, 2, 1)])
def test_windows_score_every_token_once_with_its_predecessor_in_view(n, window, stride):
    spans = windows(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, n))  # every prediction once, in order
    for i, (begin, end, first) in enumerate(spans):
        assert end - begin <= window and begin < first  # the token before the first target is in the window
        assert begin % stride == 0
        if i:
            assert first - begin >= window - stride  # context of at least window - stride


def _reference_nll(model, ids: torch.Tensor, window: int, stride: int) -> list[float]:
    """-log p(token t | the window that scores it), one forward per token."""
    out = []
    with torch.no_grad():
        for begin, end, first in windows(len(ids), window, stride):
            for t in range(first, end):
                logits = model(ids[begin:t][None]).logits[0, -1]
                out.append(-F.log_softmax(logits, -1)[ids[t]].item())
    return out


@pytest.mark.parametrize("window,stride", [(64, 32), (16, 8), (16, 15), (12, 3)])
def test_strided_perplexity_equals_token_by_token_reference(window, stride):
    model = build("sliding-mixed")  # a sliding window inside the model too
    expected = _reference_nll(model, IDS, window, stride)
    got = perplexity(model, IDS, window=window, stride=stride)
    assert got.tokens == 60 and got.windows == len(windows(61, window, stride))
    assert got.nll == pytest.approx(sum(expected) / 60, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(sum(expected) / 60), rel=1e-5)
    assert got.top1_agreement is None and got.kl is None


def test_one_window_is_the_plain_cross_entropy():
    model = build("dense")
    with torch.no_grad():
        ce = F.cross_entropy(model(IDS[None]).logits[0, :-1], IDS[1:]).item()
    assert perplexity(model, IDS, window=128, stride=64).nll == pytest.approx(ce, rel=1e-5)


def test_agreement_and_kl_against_a_reference():
    ref = build("dense")
    other = copy.deepcopy(ref)
    with torch.no_grad():
        other.layers[0].mlp.down_proj.weight.mul_(1.5)
        a, b = ref(IDS[None]).logits[0, :-1], other(IDS[None]).logits[0, :-1]
    res = evaluate({"ref": ref, "same": copy.deepcopy(ref), "other": other}, IDS, window=128, stride=64,
                   reference="ref")
    assert res["ref"].top1_agreement == 1.0 and res["ref"].kl == 0.0
    assert res["same"].top1_agreement == 1.0 and res["same"].kl == pytest.approx(0.0, abs=1e-6)
    kl = (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean().item()  # KL(ref || other)
    assert res["other"].kl == pytest.approx(kl, rel=1e-4) and res["other"].kl > 1e-3
    assert res["other"].top1_agreement == pytest.approx((a.argmax(-1) == b.argmax(-1)).float().mean().item())
    assert res["other"].nll == pytest.approx(perplexity(other, IDS, 128, 64).nll, rel=1e-6)


def test_progress_bar_and_errors(capsys):
    model = build("dense")
    perplexity(model, IDS, window=32, stride=16, progress=True)
    assert "perplexity" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stride must be in 1..window-1"):
        perplexity(model, IDS, window=16, stride=16)
    with pytest.raises(ValueError, match="exceeds the context window of model 'model' \\(128 tokens\\)"):
        perplexity(model, IDS, window=256, stride=128)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, IDS[:1], window=16, stride=8)
    with pytest.raises(ValueError, match="reference 'fp32' is not one of the models: a"):
        evaluate({"a": model}, IDS, 16, 8, reference="fp32")
