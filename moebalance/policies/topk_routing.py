"""Vanilla top-k routing: the baseline, identical to Megatron-Core's routing."""

from __future__ import annotations

import torch

from ..config import GateConfig, RoutingContext, TopKParams
from ..routing import Routing, megatron_dense
from .gate import select_topk, select_topk_values, selection_scores, topk_nonnegative

__all__ = ["topk_indices", "topk"]


def topk_indices(
    logits: torch.Tensor, gate: GateConfig, ctx: RoutingContext, dist: torch.Tensor | None = None
) -> torch.Tensor:
    """[T, k] int64: the experts vanilla top-k picks, in Megatron's order. ``dist``: the
    caller's ``score_distribution(logits, gate)``, reused as the selection scores of
    pre-softmax gates (the same fp32 softmax) instead of computing it again, and selected
    from with ``topk_nonnegative`` (same result, faster). Without ``dist``: Megatron's ops."""
    if dist is not None and gate.score_function == "softmax" and gate.pre_softmax:
        if gate.group_topk:
            return select_topk(dist, gate, gate.topk)
        return topk_nonnegative(dist, gate.topk, sorted=torch.is_grad_enabled())[1]
    return select_topk(selection_scores(logits, gate, ctx.expert_bias), gate, gate.topk)


def topk(
    logits: torch.Tensor,
    gate: GateConfig,
    params: TopKParams | None = None,
    ctx: RoutingContext | None = None,
) -> Routing:
    """Vanilla top-k. logits [T, E] -> Routing(probs [T, E], routing_map [T, E]).

    Megatron-Core 0.19.2's ``topk_routing_with_score_function`` op for op (softmax post/pre,
    sigmoid / sqrt-softplus with expert bias, group-limited top-k, scaling factor, the dense
    outputs built out of place): bit-identical results, and the same cost, so that it is the
    control the benchmarks divide by.
    """
    ctx = ctx or RoutingContext()
    k = gate.topk
    if gate.score_function == "softmax":
        if gate.pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
            probs, idx = select_topk_values(scores, gate, k)
        else:
            scores, idx = select_topk_values(logits, gate, k)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    else:
        if gate.score_function == "sigmoid":
            scores = torch.sigmoid(logits.float())
        else:
            scores = torch.nn.functional.softplus(logits.float()).sqrt()
        if ctx.expert_bias is not None:
            idx = select_topk(scores + ctx.expert_bias.float(), gate, k)
            scores = torch.gather(scores, dim=1, index=idx)
        else:
            scores, idx = select_topk_values(scores, gate, k)
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if k > 1 else scores
    if gate.scaling_factor:
        probs = probs * gate.scaling_factor
    probs, routing_map = megatron_dense(idx, probs.type_as(logits), logits)
    zero = torch.zeros((), dtype=torch.int64, device=logits.device)
    return Routing(probs, routing_map, num_dropped=zero)
