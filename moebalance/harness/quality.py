"""Teacher-forced quality on held-out text: next-token negative log-likelihood (perplexity) and
accuracy, per domain, summed over every rank.

Framework-free: the model is called as both adapters' GPT models are,
``model(ids [B, S], positions [B, S], mask [B, 1, S, S] bool (True = masked)) -> logits
[B, S, V]``. ``evaluate`` is collective at EP > 1: every rank must call it with the same number
of sequences and the same ``chunk``, so that every rank runs the same number of forward calls.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from ..runner import check_router_logits
from ..telemetry import MoERecorder

__all__ = ["evaluate", "quality_from_sums", "heldout_quality"]


def evaluate(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    chunk: int = 8,
    recorder: Optional[MoERecorder] = None,
) -> dict:
    """Sums over ``sequences`` [N, S + 1] int64 (input [:, :-1], target [:, 1:]), ``chunk``
    sequences per forward call (full causal attention, no KV cache), under
    ``torch.inference_mode``; with a ``recorder`` each forward call is one "prefill" step of
    it. Returns this rank's {"nll": nats, "correct": argmax hits, "tokens": targets}."""
    device = next(model.parameters()).device
    S = sequences.shape[1] - 1
    with torch.inference_mode():
        mask = torch.ones(S, S, dtype=torch.bool, device=device).triu(1)[None, None]
        positions = torch.arange(S, device=device).unsqueeze(0)
        nll, correct, tokens = 0.0, 0, 0
        for part in sequences.to(device).split(chunk):
            B = part.shape[0]
            if recorder is not None:
                recorder.begin_step("prefill")
            logits = model(part[:, :-1], positions.expand(B, S), mask.expand(B, 1, S, S)).float()
            if recorder is not None:
                recorder.end_step()
            check_router_logits(model, "held-out evaluation")
            target = part[:, 1:]
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                )
            )
            correct += int((logits.argmax(dim=-1) == target).sum())
            tokens += target.numel()
    return {"nll": nll, "correct": correct, "tokens": tokens}


def quality_from_sums(sums: dict) -> dict:
    """{"perplexity", "accuracy", "nll_per_token", "tokens"} from summed ``evaluate`` results."""
    tokens = max(1, sums["tokens"])
    nll = sums["nll"] / tokens
    return {
        "perplexity": math.exp(nll),
        "nll_per_token": nll,
        "accuracy": sums["correct"] / tokens,
        "tokens": sums["tokens"],
    }


def heldout_quality(
    model: torch.nn.Module,
    sequences: dict[str, torch.Tensor],
    device: torch.device,
    *,
    chunk: int = 8,
    recorder: Optional[MoERecorder] = None,
) -> dict:
    """{domain: quality_from_sums, ..., "all": ...} over every rank's ``sequences`` ({domain:
    [N, S + 1]}), summed with one all-reduce per domain; {} without sequences. Collective:
    every rank calls it with the same domains and counts. ``chunk`` and ``recorder``: as
    ``evaluate``."""
    out = {}
    total = {"nll": 0.0, "correct": 0, "tokens": 0}
    for domain, seqs in sorted(sequences.items()):
        sums = evaluate(model, seqs, chunk, recorder)
        vec = torch.tensor([sums["nll"], sums["correct"], sums["tokens"]], dtype=torch.float64)
        vec = vec.to(device)
        if dist.is_initialized():
            dist.all_reduce(vec)
        sums = {"nll": float(vec[0]), "correct": int(vec[1]), "tokens": int(vec[2])}
        out[domain] = quality_from_sums(sums)
        total = {k: total[k] + sums[k] for k in total}
    if out:
        out["all"] = quality_from_sums(total)
    return out
