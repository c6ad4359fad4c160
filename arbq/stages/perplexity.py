"""Perplexity exactly as the GPTQ / BiLLM / ARB-LLM papers measure it.

The whole text is tokenized as one stream `ids` [T]; it is cut into n = T // L non-overlapping
windows of L = seqlen tokens (the tail of T mod L tokens is dropped). Window i is fed alone
(no context carried over); its loss is the mean next-token NLL over positions 1..L-1:

    nll_i = -1/(L-1) * sum_{t=1}^{L-1} log p(x_{i,t} | x_{i,<t})

and, as in GPTQ's `llama_eval` (`neg_log_likelihood = loss * seqlen`),

    ppl = exp( sum_i nll_i * L / (n * L) ) = exp(mean_i nll_i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from arbq.errors import ArbqError

PROTOCOL = "GPTQ non-overlapping windows"


@dataclass(frozen=True)
class PplResult:
    """Perplexity of one text: `nlls` [windows] holds each window's mean token NLL (nats)."""

    ppl: float
    windows: int
    tokens: int          # windows * seqlen: the tokens fed to the model
    seqlen: int
    nlls: tuple[float, ...]


def n_windows(total: int, seqlen: int, max_windows: int | None = None) -> int:
    """Number of windows evaluated: T // L, capped at `max_windows`."""
    n = total // seqlen
    return n if max_windows is None else min(n, max_windows)


def window_nll(model: nn.Module, window: torch.Tensor) -> float:
    """Mean NLL (nats) of tokens 1..L-1 of one window [L] given their prefixes (shifted labels)."""
    inp = window.unsqueeze(0)                                   # [1, L]
    logits = model(input_ids=inp, use_cache=False).logits       # [1, L, V]
    shift_logits = logits[0, :-1, :].float()                    # [L-1, V] predicts x_1..x_{L-1}
    shift_labels = inp[0, 1:]                                   # [L-1]
    return F.cross_entropy(shift_logits, shift_labels, reduction="mean").item()


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               progress=None) -> PplResult:
    """GPTQ-protocol perplexity of the token stream `ids` [T] (int64) with windows of `seqlen`.

    `progress(i, n)` is called after each window when given. The model runs in eval mode on the
    device of its parameters; inputs are moved there.
    """
    if seqlen < 2:
        raise ArbqError(f"--seqlen must be at least 2 (got {seqlen})")
    total = int(ids.numel())
    if total < seqlen:
        raise ArbqError(f"text is shorter than one window: {total} tokens < --seqlen {seqlen}")
    n = n_windows(total, seqlen, max_windows)
    if n < 1:
        raise ArbqError(f"--max-windows must be at least 1 (got {max_windows})")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nlls = []
    try:
        for i in range(n):
            window = ids[i * seqlen: (i + 1) * seqlen].to(device)
            nll = window_nll(model, window)
            if not math.isfinite(nll):
                raise ArbqError(f"non-finite loss in window {i} (the model produces inf/nan logits)")
            nlls.append(nll)
            if progress is not None:
                progress(i + 1, n)
    finally:
        model.train(was_training)
    neg_log_likelihood = sum(nll * seqlen for nll in nlls)     # GPTQ: loss * seqlen per window
    ppl = math.exp(neg_log_likelihood / (n * seqlen))
    return PplResult(ppl=ppl, windows=n, tokens=n * seqlen, seqlen=seqlen, nlls=tuple(nlls))
