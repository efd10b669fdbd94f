"""Perplexity of causal language models over a token stream, by strided sliding windows.

A model sees at most `window` tokens at once, so a long text is scored window by window (the
strided evaluation of Hugging Face's "Perplexity of fixed-length models" guide): windows start
every `stride` tokens, and each scores only the tokens that no earlier window scored. Every token
but the first is predicted exactly once, and, after the first window, with at least
`window - stride` tokens of context. stride = window - 1 gives nearly disjoint chunks (fewest
forwards, least context); a smaller stride costs about window/stride forwards per window of text
and gives the lower, truer figure. (Windows overlap by at least one token so that the first token
a window scores has its predecessor in the window.)

`evaluate` runs several models over the same windows in lockstep and compares each with a
reference model on the same predictions: top-1 agreement (how often both pick the same next token)
and mean KL(reference || model) in nats per token, the usual measures of what quantization costs.
Forwards are the model's own: `model(ids, num_logits_to_keep=n)`, logits of the last n positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PerplexityResult:
    tokens: int  # predictions scored (the stream's length minus one)
    nll: float  # mean negative log-likelihood, nats per token
    perplexity: float  # exp(nll)
    windows: int  # forwards run
    top1_agreement: float | None = None  # with the reference model; None without one
    kl: float | None = None  # mean KL(reference || this model), nats per token

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first target) of each window over a stream of n_tokens: the window's tokens are
    [begin, end), and it scores the predictions of tokens [first target, end)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    if not 1 <= stride < window:
        raise ValueError(f"stride must be in 1..window-1 ({window - 1}): a window must overlap the previous one "
                         f"by a token to predict its first new token; got {stride}")
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    out, scored, begin = [], 1, 0  # token 0 has no prediction
    while scored < n_tokens:
        end = min(begin + window, n_tokens)
        if end > scored:
            out.append((begin, end, scored))
            scored = end
        begin += stride
    return out


def _window_logprobs(model: nn.Module, ids: torch.Tensor, begin: int, end: int, first: int) -> torch.Tensor:
    """Log-probabilities (n, vocab) of the predictions of tokens [first, end), n = end - first."""
    n = end - first
    x = ids[begin:end][None].to(model.embed_tokens.weight.device)  # (1, T)
    logits = model(x, num_logits_to_keep=n + 1).logits[0, :-1]  # positions first-1 .. end-2 predict first .. end-1
    return F.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def evaluate(models: Mapping[str, nn.Module], ids: Sequence[int] | torch.Tensor, window: int = 1024,
             stride: int = 512, reference: str | None = None, progress: bool = False) -> dict[str, PerplexityResult]:
    """Perplexity of each model over the token stream `ids`, windows run in lockstep.

    reference: the name of one of `models`; the others are also scored by top-1 agreement and mean
    KL against its predictions (the reference holds agreement 1 and KL 0)."""
    from tqdm.auto import tqdm

    if reference is not None and reference not in models:
        raise ValueError(f"reference {reference!r} is not one of the models: {', '.join(models)}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    for name, model in models.items():
        ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if ctx is not None and window > ctx:
            raise ValueError(f"window {window} exceeds the context window of model {name!r} ({ctx} tokens)")
    spans = windows(len(ids), window, stride)
    nll = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(models, 0)
    kl = dict.fromkeys(models, 0.0)
    order = ([reference] if reference else []) + [m for m in models if m != reference]
    for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
        targets = ids[first:end]
        ref_lp = None
        for name in order:
            lp = _window_logprobs(models[name], ids, begin, end, first)  # (n, V)
            nll[name] -= lp.gather(1, targets[:, None].to(lp.device)).sum().item()
            if name == reference:
                ref_lp = lp
            elif ref_lp is not None:
                agree[name] += (lp.argmax(-1) == ref_lp.argmax(-1)).sum().item()
                kl[name] += F.kl_div(lp, ref_lp, log_target=True, reduction="sum").item()
    n = len(ids) - 1
    results = {}
    for name in models:
        compared = reference is not None
        results[name] = PerplexityResult(
            tokens=n, nll=nll[name] / n, perplexity=math.exp(nll[name] / n), windows=len(spans),
            top1_agreement=(1.0 if name == reference else agree[name] / n) if compared else None,
            kl=(0.0 if name == reference else kl[name] / n) if compared else None,
        )
    return results


def perplexity(model: nn.Module, ids: Sequence[int] | torch.Tensor, window: int = 1024, stride: int = 512,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of one model over the token stream `ids` (see `evaluate`)."""
    return evaluate({"model": model}, ids, window, stride, progress=progress)["model"]
