"""The water level: the least possible maximum load, and the load-only router's closed form.

``capped_water_level`` is the target both LASER assignments aim at (the least possible maximum
load if every flexible token could take any k of its candidates); ``load_only_indices`` deals
the load-only router's slots exactly at that level.
"""

from __future__ import annotations

import torch

from ...config import GateConfig
from .indexing import pick

__all__ = ["capped_water_level", "load_only_indices", "layout_tie_order"]


def capped_water_level(base: torch.Tensor, need: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Smallest integer L with sum_e clamp(L - base_e, 0, limit_e) >= need.

    base, limit: [E] float (integer-valued); need: 0-dim float, at most sum(limit). Returns a
    0-dim float. The sum is piecewise linear in L with breakpoints base_e and base_e + limit_e:
    it is evaluated at all 2E breakpoints at once, every segment between two breakpoints is
    solved for the level it would give, and the segment that crosses ``need`` is picked with
    a tensor index (no loop, no host synchronisation: about 30 small tensor ops).
    """
    # [2E] breakpoints as one broadcast op, not a cat of base: CPU inductor (torch 2.13) lets
    # a cat's output alias its inputs and then reuses that buffer while base is still read
    step = torch.arange(2, dtype=base.dtype, device=base.device).unsqueeze(1)  # [[0], [1]]
    bp = torch.sort((base + step * limit).reshape(-1))[0]
    fill = (bp.unsqueeze(1) - base).clamp_(min=0)
    fill = torch.minimum(fill, limit).sum(dim=1)  # [2E] the sum at each breakpoint
    lo, hi, fill_lo = bp[:-1], bp[1:], fill[:-1]
    # segment s = [bp_s, bp_s+1]: slope = experts filling inside it (an exact integer ratio)
    slope = (fill[1:] - fill_lo) / (hi - lo).clamp_(min=1)
    inside = torch.minimum(lo + ((need - fill_lo) / slope.clamp_(min=1)).ceil_(), hi)
    first = (fill < need).sum().clamp_(max=bp.numel() - 1)  # first breakpoint reaching need
    # first = 0: need <= 0, the lowest breakpoint; else the level inside segment first - 1
    return pick(torch.cat([bp[:1], inside]), first)


def load_only_indices(
    num_tokens: int,
    gate: GateConfig,
    base: torch.Tensor,
    first_expert: int = 0,
    tie_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, k] experts of the load-only router: every token k distinct experts, maximum load minimal.

    Water-filling: with starting loads ``base`` [E], the smallest integer level L whose room
    (each expert at most T more, one per token) holds the T k assignments; every expert is
    filled to L - 1 and just enough of them to L (the least loaded first; ties from expert
    ``first_expert`` onwards, the calling EP rank's first local expert, so that ranks spread
    the extra ones; ``tie_order``, an [E] permutation of the experts, gives that order instead
    when the layout is not contiguous: ``layout_tie_order``). The T k slots are then laid out
    expert by expert and dealt to tokens
    column by column (McNaughton's wrap-around): slot j of token t is position j T + t, so a
    token never gets an expert twice because no expert holds more than T slots. The maximum
    load is the least possible, which the sequential greedy can only match. Scores are
    ignored, as the load-only lower bound prescribes.
    """
    k, E = gate.topk, gate.num_experts
    dev = base.device
    base = base.float()
    limit = torch.full_like(base, float(num_tokens))
    need = torch.tensor(float(num_tokens * k), device=dev)
    level = capped_water_level(base, need, limit)
    counts = torch.minimum((level - 1 - base).clamp(min=0), limit)
    short = need - counts.sum()
    # experts that can take one more at ``level``: least loaded first, ties from this rank's
    # first local expert onwards (EP ranks spread their extra slots, each over its own experts)
    if tie_order is None:
        rotated = (torch.arange(E, device=dev) + first_expert) % E
    else:
        rotated = tie_order.to(dev)
    order = rotated[torch.argsort(base[rotated], stable=True)]
    can_sorted = ((base <= level - 1) & (counts < limit))[order]
    extra_sorted = can_sorted & (torch.cumsum(can_sorted.long(), 0) <= short)
    extra = torch.zeros_like(can_sorted).scatter_(0, order, extra_sorted)
    counts = (counts + extra.float()).long()
    slots = torch.repeat_interleave(
        torch.arange(E, device=dev), counts, output_size=num_tokens * k
    )
    return slots.view(k, num_tokens).t()


def layout_tie_order(
    local_experts: torch.Tensor, expert_group: torch.Tensor, ep_rank: int, ep_size: int
) -> torch.Tensor:
    """[E] int64, the experts in load-only's tie order for an expert layout: this rank's local
    experts first, then the groups of the following ranks in turn ((group - ep_rank) mod
    ep_size), by index within each. For the contiguous layout (group e // (E/EP), local = own
    group) it is the rotation from this rank's first expert, which ``load_only_indices`` uses
    without a layout.

    local_experts: [E] bool; expert_group: [E] int64 in [0, ep_size) (``RoutingContext``).
    """
    E = expert_group.shape[0]
    distance = torch.where(local_experts, 0, (expert_group - ep_rank) % ep_size)
    experts = torch.arange(E, device=expert_group.device)
    return torch.argsort(distance * E + experts)  # unique keys: a deterministic order
