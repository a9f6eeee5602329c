"""Teacher-forced quality of a Megatron-Core GPT-MoE on held-out text: next-token negative
log-likelihood (perplexity), accuracy, and the expert loads the routers produced.

``evaluate`` is collective at EP > 1 (every rank must call it with the same number of
sequences and the same ``chunk``, so every rank runs the same number of forward calls) and
returns this rank's sums; ``quality_from_sums`` turns sums (added over ranks) into figures.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["evaluate", "quality_from_sums", "record_expert_loads"]


@contextmanager
def record_expert_loads(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Yields {0-based layer: [E] float64 tokens routed to each expert}, summed over every
    forward inside the ``with`` (this rank's tokens; routing_map column sums)."""
    from .inject import moe_layers

    loads: dict[int, torch.Tensor] = {}
    handles = []
    for layer in moe_layers(model):
        index = layer.layer_number - 1

        def hook(module, args, output, index=index):
            routing_map = output[1]
            add = routing_map.reshape(-1, routing_map.shape[-1]).sum(dim=0).double().cpu()
            loads[index] = loads[index] + add if index in loads else add

        handles.append(layer.router.register_forward_hook(hook))
    try:
        yield loads
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def evaluate(model: torch.nn.Module, sequences: torch.Tensor, chunk: int = 8) -> dict:
    """Teacher-forced next-token figures of ``sequences`` [N, S + 1] (int64; input [:, :-1],
    target [:, 1:]), ``chunk`` sequences per forward call (full causal attention, no cache).
    Returns sums for this rank: nll (nats), correct (argmax hits), tokens."""
    device = next(model.parameters()).device
    N, span = sequences.shape
    S = span - 1
    mask = torch.ones(S, S, dtype=torch.bool, device=device).triu(1)[None, None]
    positions = torch.arange(S, device=device).unsqueeze(0)
    nll, correct, tokens = 0.0, 0, 0
    for part in sequences.to(device).split(chunk):
        B = part.shape[0]
        logits = model(part[:, :-1], positions.expand(B, S), mask.expand(B, 1, S, S)).float()
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
