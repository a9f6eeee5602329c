"""Gate arithmetic shared by all policies: scores, top-k selection and combine weights.

Each step mirrors Megatron-Core 0.19.2 ``topk_routing_with_score_function`` (moe_utils.py) op for
op, so that composing them reproduces it bit for bit:

- ``selection_scores``: what the top-k runs on (logits for softmax-post, the fp32 softmax for
  pre-softmax, fp32 sigmoid/sqrt-softplus scores plus ``expert_bias`` otherwise);
- ``select_topk``: plain ``torch.topk`` (sorted only when autograd is on, as Megatron) or the
  group-limited variant;
- ``gate_weights``: the combine weights at given indices, cast to the logits' dtype.

``topk_nonnegative`` is the balancing policies' faster top-k for fp32 values known to be >= 0
(a softmax, shifted keys); vanilla top-k itself keeps Megatron's ``torch.topk`` on floats.
"""

from __future__ import annotations

import torch

from ..config import GateConfig

__all__ = [
    "score_distribution",
    "selection_scores",
    "group_mask",
    "select_topk",
    "select_topk_values",
    "topk_nonnegative",
    "gate_weights",
]


def _raw_scores(logits: torch.Tensor, gate: GateConfig) -> torch.Tensor:
    """[T, E] fp32 per-expert scores before any normalisation over experts (non-softmax gates)."""
    if gate.score_function == "sigmoid":
        return torch.sigmoid(logits.float())
    return torch.nn.functional.softplus(logits.float()).sqrt()


def score_distribution(logits: torch.Tensor, gate: GateConfig) -> torch.Tensor:
    """S[T, E] fp32: each token's score distribution over all E experts (rows sum to 1).

    Softmax over all experts for softmax gates; sigmoid (sqrt-softplus) scores normalised per
    token otherwise, as Megatron's ``compute_routing_scores_for_aux_loss``. This is the S of the
    capacity-aware papers (per-expert ranking of tokens) and LASER's shape measure.
    """
    if gate.score_function == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    s = _raw_scores(logits, gate)
    return s / (s.sum(dim=-1, keepdim=True) + 1e-20)


def selection_scores(
    logits: torch.Tensor, gate: GateConfig, expert_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """[T, E]: the values top-k selection ranks (higher = preferred), before group masking."""
    if gate.score_function == "softmax":
        if gate.pre_softmax:
            return torch.softmax(logits, dim=-1, dtype=torch.float32)
        return logits
    s = _raw_scores(logits, gate)
    if expert_bias is not None:
        s = s + expert_bias.float()
    return s


def group_mask(scores: torch.Tensor, gate: GateConfig) -> torch.Tensor:
    """[T, E] bool: experts inside each token's ``group_topk`` best groups (all True without
    groups). Groups are ranked by the sum of their top ``topk // group_topk`` scores (Megatron's
    ``group_limited_topk``)."""
    if not gate.group_topk:
        return torch.ones_like(scores, dtype=torch.bool)
    T, E = scores.shape
    G = gate.num_groups
    group_scores = scores.view(T, G, -1).topk(gate.topk // gate.group_topk, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=gate.group_topk, dim=-1, sorted=False)[1]
    chosen = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    return chosen.unsqueeze(-1).expand(T, G, E // G).reshape(T, E).bool()


def select_topk_values(
    scores: torch.Tensor, gate: GateConfig, n: int, *, sorted: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [T, n] of the n best experts per token (group-limited when
    configured): Megatron's ``compute_topk``, values taken from the masked scores.

    ``sorted=None`` follows Megatron: the plain path sorts only when autograd is enabled, the
    group-limited path always sorts. Pass ``sorted=True`` to get candidates best-first.
    """
    if gate.group_topk:
        masked = scores.masked_fill(~group_mask(scores, gate), float("-inf"))
        return torch.topk(masked, k=n, dim=-1)
    if sorted is None:
        sorted = torch.is_grad_enabled()
    return torch.topk(scores, k=n, dim=1, sorted=sorted)


def select_topk(
    scores: torch.Tensor, gate: GateConfig, n: int, *, sorted: bool | None = None
) -> torch.Tensor:
    """[T, n] int64 indices of ``select_topk_values``."""
    return select_topk_values(scores, gate, n, sorted=sorted)[1]


def topk_nonnegative(
    x: torch.Tensor, n: int, *, largest: bool = True, sorted: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, n, dim=1)`` for fp32 ``x`` holding no negative numbers (no -0.0) and no
    NaN, such as a softmax: (values, indices), the same as the float call, ties included.

    Runs on the int32 view: for such floats the bit patterns order exactly as the values, so
    every comparison the selection makes has the same outcome; the integer kernel skips the
    float path's NaN handling, which makes it cheaper on CPU. CUDA's radix selection maps both
    dtypes to the same keys. Other dtypes take the plain call.
    """
    if x.dtype != torch.float32:
        return torch.topk(x, n, dim=1, largest=largest, sorted=sorted)
    values, indices = torch.topk(x.view(torch.int32), n, dim=1, largest=largest, sorted=sorted)
    return values.view(torch.float32), indices


def gate_weights(
    logits: torch.Tensor,
    indices: torch.Tensor,
    gate: GateConfig,
    dist: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, n] combine weights of the experts in ``indices`` [T, n], in the logits' dtype.

    softmax-post: softmax over the chosen logits; pre-softmax: the full softmax at the indices;
    sigmoid / sqrt-softplus: scores at the indices normalised over them (when topk > 1). Then
    ``scaling_factor``. Identical arithmetic to Megatron's ``precomputed_indices`` path.
    ``dist``: ``score_distribution(logits, gate)`` when the caller has it already (pre-softmax
    gates read the weights from it instead of computing the same softmax again).
    """
    if gate.score_function == "softmax":
        if gate.pre_softmax:
            full = dist if dist is not None else torch.softmax(logits, dim=-1, dtype=torch.float32)
            probs = torch.gather(full, 1, indices)
        else:
            probs = torch.softmax(torch.gather(logits, 1, indices), dim=-1, dtype=torch.float32)
    else:
        s = torch.gather(_raw_scores(logits, gate), 1, indices)
        probs = s / (s.sum(dim=-1, keepdim=True) + 1e-20) if gate.topk > 1 else s
    if gate.scaling_factor:
        probs = probs * gate.scaling_factor
    return probs.type_as(logits)
