"""DeepSpeed's gate output from a moebalance ``Routing``: the sparse 7-tuple and the dense
4-tuple that ``deepspeed.moe.sharded_moe.MOELayer`` consumes, and back.

Formats (deepspeed 0.19.8, ``sharded_moe``), S local tokens, E experts, C capacity:

- sparse 7-tuple (``sparse_routes=True``, what ``MOELayer.forward`` asks for since 0.19.4):
  ``(l_aux, C, E, indices [R, S] int32, locations [R, S] int32, gates [R, S] fp32,
  exp_counts [E])``. Row r holds every token's r-th route: its expert (-1 = no route),
  its position in that expert's capacity buffer, and its combine weight (0 when dropped).
- dense 4-tuple (``sparse_routes=False``: DeepSpeed <= 0.19.3 and ``DeepSpeedMoEInference``):
  ``(l_aux, combine_weights [S, E, C] fp32, dispatch_mask [S, E, C] bool, exp_counts [E])``.

Encoding, in DeepSpeed's terms:

- Rows R of the sparse format: R = k for policies that never give a token more than k experts
  (top-k, LASER, token drop: rows with fewer routes are padded with -1). For policies that may
  give more (``Policy.variable_experts_per_token``, e.g. expanded drop), R = max(k, the largest
  number of experts any local token got), one host sync. ``MOELayer`` reads R from the tensor
  (``slots.size(0)``), never from ``gate.k``, and the rows never leave the rank (only the
  [E, C, M] buffer is exchanged), so R need not agree across EP ranks. Nothing is cut: to bound
  R, bound the policy (``ExpandedDropParams.max_experts_per_token``).
- Row order: each token's routes by decreasing combine weight (ties: lower expert first), so row
  0 is the top-1 choice. Locations are assigned row-major (all row-0 routes of an expert, in
  token order, then row 1, ...), exactly as DeepSpeed's ``top2gating``; vanilla top-2 therefore
  reproduces ``TopKGate(k=2, drop_tokens=False, use_rts=False)`` tuple for tuple.
- Capacity C = the largest number of tokens this rank sends to one expert, all-reduced with MAX
  over the EP group on every call (a mismatch aborts gloo's all-to-all and hangs NCCL's), at
  least 1, rounded up to the tensor-parallel size when DeepSpeed has an ``mpu`` (``MOELayer``
  splits the capacity dimension over TP ranks). It is the buffer size the routing needs, not a
  drop threshold: the policy alone drops. Collective: every EP rank must encode the same number
  of times (lockstep).
- ``exp_counts`` = tokens this rank sends to each expert after the policy (the built-in gates
  count before their capacity drop); int64 [E]. ``l_aux`` = 0 (inference only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from moebalance.routing import Routing

from .checker import GateOutputError

__all__ = [
    "agree_capacity",
    "dense_gate_tensors",
    "gate_output",
    "gate_output_routing",
    "route_locations",
    "sparse_routes",
]


def sparse_routes(routing: Routing, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routes of ``routing`` as DeepSpeed rows: ([R, S] int64 experts, -1 = none;
    [R, S] fp32 weights, 0 where none), each token's routes by decreasing weight.

    routing: S tokens x E experts with at most ``rows`` experts per token (R = ``rows``).
    """
    idx, probs = routing.topk_indices(rows)  # [S, R], slot order, -1 padding last
    key = torch.where(idx >= 0, probs.float(), torch.full_like(probs, -1.0, dtype=torch.float32))
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    idx = torch.gather(idx, 1, order)
    probs = torch.gather(probs, 1, order).float()
    return idx.t().contiguous(), probs.t().contiguous()


def route_locations(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacity-buffer positions of routes ([R, S] experts, -1 = none), row-major.

    Returns (locations [R, S] int64: how many earlier routes in row-major order go to the same
    expert, 0 where there is no route; counts [E] int64: routes per expert). Sort-based, so
    O(R S log(R S)) with no [R S, E] one-hot.
    """
    flat = indices.reshape(-1).long()
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))  # no route -> bin E
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(flat.numel(), device=flat.device) - starts[key[order]]
    locations = torch.empty_like(flat).scatter_(0, order, position)
    locations = torch.where(flat >= 0, locations, torch.zeros_like(locations))
    return locations.view_as(indices), counts[:num_experts]


def agree_capacity(need: torch.Tensor, ep_group: Any = None) -> torch.Tensor:
    """0-dim int64 capacity C shared by the EP group: MAX over ranks of ``need`` (0-dim), at
    least 1, rounded up to DeepSpeed's tensor-parallel size. Collective when the group has more
    than one rank."""
    capacity = need.reshape(()).to(torch.int64).clone()
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=ep_group)
    capacity = capacity.clamp(min=1)
    tp = bwc_tensor_model_parallel_world_size(groups.mpu)
    if tp > 1:  # MOELayer splits the capacity dimension over the TP ranks
        capacity = (capacity + tp - 1) // tp * tp
    return capacity


def dense_gate_tensors(
    indices: torch.Tensor,
    locations: torch.Tensor,
    gates: torch.Tensor,
    num_experts: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense pair (combine_weights [S, E, C] fp32, dispatch_mask [S, E, C] bool) of routes
    given as [R, S] experts (-1 = none), locations and fp32 weights. Any R works."""
    R, S = indices.shape
    kept = indices >= 0
    token = torch.arange(S, device=indices.device).expand(R, S)[kept]
    expert, slot = indices[kept].long(), locations[kept].long()
    combine = torch.zeros(S, num_experts, capacity, dtype=torch.float32, device=gates.device)
    combine.index_put_((token, expert, slot), gates[kept].float())
    dispatch = torch.zeros(S, num_experts, capacity, dtype=torch.bool, device=gates.device)
    dispatch.index_put_((token, expert, slot), torch.ones_like(token, dtype=torch.bool))
    return combine, dispatch


def gate_output(
    routing: Routing,
    topk: int,
    *,
    ep_group: Any = None,
    sparse: bool = True,
    variable_experts_per_token: bool = True,
) -> tuple:
    """DeepSpeed's gate output for ``routing`` (S tokens x E experts): the sparse 7-tuple when
    ``sparse`` else the dense 4-tuple (see the module docstring). Collective over ``ep_group``
    (the capacity). ``variable_experts_per_token=False`` promises at most ``topk`` experts per
    token, which saves the host sync that sizes the rows."""
    S, E = routing.routing_map.shape
    rows = topk
    if variable_experts_per_token and S:
        rows = max(topk, int(routing.routing_map.sum(dim=1).max()))
    indices, gates = sparse_routes(routing, rows)
    locations, exp_counts = route_locations(indices, E)
    capacity = agree_capacity(exp_counts.max(), ep_group)
    l_aux = torch.zeros((), dtype=torch.float32, device=gates.device)
    if sparse:
        return (
            l_aux,
            capacity,
            E,
            indices.to(torch.int32),
            locations.to(torch.int32),
            gates,
            exp_counts,
        )
    combine, dispatch = dense_gate_tensors(indices, locations, gates, E, int(capacity))
    return l_aux, combine, dispatch, exp_counts


def gate_output_routing(output: tuple, num_experts: int) -> Routing:
    """The routing a DeepSpeed gate output (7- or 4-tuple) encodes: probs [S, E] fp32 (combine
    weights summed per token and expert), routing_map [S, E] bool (dispatched pairs)."""
    if len(output) == 7:
        indices, gates = output[3].long(), output[5].float()
        R, S = indices.shape
        kept = indices >= 0
        token = torch.arange(S, device=indices.device).expand(R, S)[kept]
        probs = torch.zeros(S, num_experts, dtype=torch.float32, device=gates.device)
        probs.index_put_((token, indices[kept]), gates[kept], accumulate=True)
        routing_map = torch.zeros(S, num_experts, dtype=torch.bool, device=gates.device)
        routing_map[token, indices[kept]] = True
        return Routing(probs, routing_map)
    if len(output) == 4:
        combine, dispatch = output[1].float(), output[2]
        return Routing(combine.sum(dim=2), dispatch.any(dim=2))
    raise GateOutputError(
        f"a gate output is a 7-tuple (sparse) or a 4-tuple (dense), got {len(output)} items"
    )
