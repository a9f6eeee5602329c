"""Vanilla top-k routing: the baseline, identical to Megatron-Core's routing."""

from __future__ import annotations

import torch

from ..config import GateConfig, RoutingContext, TopKParams
from ..routing import Routing, megatron_dense
from .gate import gate_weights, select_topk, selection_scores, topk_nonnegative

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

    Bit-identical to ``megatron.core.transformer.moe.moe_utils.topk_routing_with_score_function``
    with the same gate settings (softmax post/pre, sigmoid with expert bias, group-limited top-k,
    scaling factor).
    """
    ctx = ctx or RoutingContext()
    idx = topk_indices(logits, gate, ctx)
    probs, routing_map = megatron_dense(idx, gate_weights(logits, idx, gate), logits)
    return Routing(probs, routing_map, num_dropped=torch.zeros((), dtype=torch.int64, device=logits.device))
