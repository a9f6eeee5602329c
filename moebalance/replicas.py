"""Replica choice: a routing over logical experts becomes a routing over physical slots.

Routers decide over the E logical experts (``Routing`` [T, E]). With replicas, a placement puts
P >= E physical slots on the EP ranks: ``phy2log`` [P] (the logical expert each slot hosts),
``log2phy`` [E, R] (the slots of each expert, -1 padded; EPLB's layout), ``logcnt`` [E] (its
replica count) and ``slot_rank`` [P] (the EP rank each slot lives on). ``choose_replicas`` sends
each routed (token, expert) pair to exactly one slot hosting that expert, weight unchanged:

- ``"round_robin"``: the expert's tokens in position order take its replicas in turn, from
  replica ``token_offset mod logcnt[e]`` (vLLM's rule; the offset, e.g. the global index of
  this rank's first token, makes EP ranks start at different replicas). Per expert, the
  replicas' counts differ by at most one.
- ``"least_loaded"``: per expert, its tokens fill its replicas by water-filling from the given
  EP-global slot loads (zero by default), so that the largest final slot load is the least
  possible; the tokens are dealt to replicas in position order, in blocks.
- ``"local_first"``: a replica on this EP rank when the expert has one here and this rank is
  not the most loaded one (by the given slot loads); otherwise round-robin over the replicas
  on ranks that are not the most loaded (over all replicas if each is on such a rank).

Everything is tensor arithmetic over [T, E] and [E, R] (cumsum, searchsorted, gather,
scatter): no host synchronisation, no loop over tokens, the same on CPU and CUDA tensors. The
layout is static; ``check_layout`` checks it once (the planner or the adapter at load).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RoutingContext, _is_int, _require, _require_choice
from .routing import Routing

__all__ = [
    "REPLICA_POLICIES",
    "ReplicaParams",
    "choose_replicas",
    "check_layout",
    "replica_maps",
    "layout_for_rank",
    "logical_routing",
    "logical_loads",
    "replica_quotas",
]

REPLICA_POLICIES = ("round_robin", "least_loaded", "local_first")

# sentinel load of a padding replica (-1 in log2phy): above any real load, no overflow when added
_NO_REPLICA = 1 << 62


@dataclass(frozen=True)
class ReplicaParams:
    """How a logical (token, expert) pair picks one of the expert's physical slots.

    Attributes:
        policy: "round_robin" (by token position, as vLLM), "least_loaded" (water-filling over
            the replicas from the EP-global slot loads) or "local_first" (a replica on the
            token's own rank unless that rank is the most loaded). See the module docstring.
    """

    policy: str = "round_robin"

    def __post_init__(self) -> None:
        _require_choice("policy", self.policy, REPLICA_POLICIES)


def replica_maps(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2phy [E, R] int64, -1 padded; logcnt [E] int64) from phy2log [P] int64.

    The slots of each expert are listed in increasing slot order; R = the largest replica
    count. R is a shape read from the data: one host synchronisation (a plan-time helper).
    """
    _require(
        isinstance(phy2log, torch.Tensor) and phy2log.dim() == 1 and phy2log.dtype == torch.int64,
        f"phy2log must be an int64 tensor of shape [num_slots], got {_describe(phy2log)}",
    )
    if phy2log.numel():
        lo, hi = (int(x) for x in phy2log.aminmax())
        _require(
            0 <= lo and hi < num_experts,
            f"phy2log must hold logical experts in [0, {num_experts}), got min {lo} and max {hi}",
        )
    logcnt = torch.bincount(phy2log, minlength=num_experts)
    R = max(int(logcnt.max()), 1)
    order = torch.argsort(phy2log, stable=True)  # slots grouped by expert, slot order within
    expert = phy2log[order]
    first = torch.cumsum(logcnt, 0) - logcnt
    replica = torch.arange(phy2log.numel(), device=phy2log.device) - first[expert]
    log2phy = torch.full((num_experts, R), -1, dtype=torch.int64, device=phy2log.device)
    log2phy[expert, replica] = order
    return log2phy, logcnt


def check_layout(
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    slot_rank: torch.Tensor,
    ep_size: int,
    *,
    check_values: bool | None = None,
) -> None:
    """ConfigError, in one line, unless the replica layout is well formed.

    Shapes and dtypes always: log2phy [E, R] int64, logcnt [E] int64, slot_rank [P] int64 with
    P >= E. Values (as ``RoutingContext.validate``: None = only for CPU tensors, True =
    anywhere, one host synchronisation each, False = never): every expert has 1 <= logcnt[e]
    <= R replicas, listed first in its row and -1 after; every slot hosts exactly one expert;
    slot ranks in [0, ep_size).
    """
    _check_shapes(log2phy, logcnt, slot_rank)
    _require(_is_int(ep_size) and ep_size >= 1, f"ep_size must be an integer >= 1, got {ep_size!r}")
    if not (check_values or (check_values is None and log2phy.device.type == "cpu")):
        return
    E, R = log2phy.shape
    P = slot_rank.shape[0]
    lo, hi = (int(x) for x in logcnt.aminmax())
    _require(
        1 <= lo and hi <= R,
        f"logcnt must hold replica counts in [1, R={R}], got min {lo} and max {hi}",
    )
    listed = log2phy >= 0
    expected = torch.arange(R, device=log2phy.device) < logcnt.unsqueeze(1)
    bad = (listed != expected).any(1)
    _require(
        not bool(bad.any()),
        f"log2phy must list logcnt[e] slots first in row e and -1 after; rows {_first(bad)} do not",
    )
    _require(
        int(log2phy.max()) < P,
        f"log2phy must hold slots in [0, num_slots={P}) or -1, got {int(log2phy.max())}",
    )
    uses = torch.bincount(log2phy[listed], minlength=P)
    _require(
        bool((uses == 1).all()),
        f"every slot must host exactly one logical expert; slots {_first(uses != 1)} do not",
    )
    lo, hi = (int(x) for x in slot_rank.aminmax())
    _require(
        0 <= lo and hi < ep_size,
        f"slot_rank must hold EP ranks in [0, ep_size={ep_size}), got min {lo} and max {hi}",
    )


def layout_for_rank(
    log2phy: torch.Tensor, logcnt: torch.Tensor, slot_rank: torch.Tensor, ep_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout a policy sees on EP rank ``ep_rank`` (``RoutingContext.local_experts`` and
    ``expert_group``): ([E] bool, experts with a replica on this rank; [E] int64, the rank of
    each expert's first replica)."""
    _check_shapes(log2phy, logcnt, slot_rank)
    rank = slot_rank[log2phy.clamp(min=0)]  # [E, R] the rank of each replica
    valid = _valid(log2phy, logcnt)
    return (valid & (rank == ep_rank)).any(1), rank[:, 0].clone()


def choose_replicas(
    routing: Routing,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    slot_rank: torch.Tensor,
    params: ReplicaParams | None = None,
    ctx: RoutingContext | None = None,
    *,
    slot_load: torch.Tensor | None = None,
    token_offset: int | torch.Tensor = 0,
) -> Routing:
    """Logical routing [T, E] -> physical routing [T, P]: each routed (token, expert) pair to
    exactly one slot hosting that expert, with its weight unchanged; ``capacity`` and
    ``num_dropped`` carried over.

    routing: probs / routing_map [T, E]; log2phy [E, R] int64 (-1 padded), logcnt [E] int64,
    slot_rank [P] int64 (a layout ``check_layout`` accepts; only shapes are checked here);
    params: the replica policy (round-robin by default); ctx: this rank (``ep_rank``,
    ``ep_size``; local-first reads them); slot_load: optional [P] tokens already on each slot,
    EP-global (integer-valued, >= 0; least-loaded and local-first read it, zero if None);
    token_offset: int or 0-dim int64 tensor, where the round-robin turn starts (e.g. the global
    index of this rank's first token, or a step counter in decode).
    """
    params = params or ReplicaParams()
    ctx = ctx or RoutingContext()
    _require(
        isinstance(params, ReplicaParams),
        f"params must be ReplicaParams or None, got {type(params).__name__}",
    )
    _check_shapes(log2phy, logcnt, slot_rank)
    E, R = log2phy.shape
    P = slot_rank.shape[0]
    T = routing.routing_map.shape[0]
    _require(
        routing.routing_map.dim() == 2 and routing.routing_map.shape[1] == E,
        f"routing must be over the {E} logical experts of log2phy, got "
        f"{tuple(routing.routing_map.shape)}",
    )
    _require(
        _is_int(token_offset) or (isinstance(token_offset, torch.Tensor) and token_offset.dim() == 0
                                  and not token_offset.is_floating_point()),
        f"token_offset must be an integer or a 0-dim integer tensor, got {_describe(token_offset)}",
    )
    if slot_load is not None:
        _require(
            isinstance(slot_load, torch.Tensor) and slot_load.shape == (P,)
            and slot_load.dtype != torch.bool and not slot_load.is_complex(),
            f"slot_load must be a real tensor of shape [num_slots={P}] or None, got "
            f"{_describe(slot_load)}",
        )
    dev = routing.routing_map.device
    log2phy, logcnt, slot_rank = log2phy.to(dev), logcnt.to(dev), slot_rank.to(dev)
    if isinstance(token_offset, torch.Tensor):
        token_offset = token_offset.to(dev)
    valid = _valid(log2phy, logcnt)
    load = torch.zeros(P, dtype=torch.int64, device=dev)
    if slot_load is not None:
        load = slot_load.to(dev)
        load = load.round().long() if load.is_floating_point() else load.long()
    routed = routing.routing_map.t().contiguous()  # [E, T]
    # seen[e, t]: tokens before t routed to e (the pair's position in its expert's queue)
    seen = torch.cumsum(routed, dim=1, dtype=torch.int64) - routed.long()
    if params.policy == "least_loaded":
        quota = replica_quotas(routed.sum(1), load[log2phy.clamp(min=0)], valid, token_offset)
        replica = torch.searchsorted(torch.cumsum(quota, 1), seen, right=True)
        replica = torch.minimum(replica, (logcnt - 1).unsqueeze(1))  # off-map pairs: any replica
    else:
        candidates = valid
        if params.policy == "local_first":
            candidates = _local_first_candidates(log2phy, valid, slot_rank, load, ctx)
        replica = _take_turns(seen, candidates, token_offset)
    slot = log2phy.gather(1, replica).t()  # [T, E]: one slot per pair, distinct along a row
    probs = torch.zeros(T, P, dtype=routing.probs.dtype, device=dev)
    probs.scatter_(1, slot, routing.probs)
    routing_map = torch.zeros(T, P, dtype=torch.bool, device=dev)
    routing_map.scatter_(1, slot, routing.routing_map)
    return Routing(probs, routing_map, capacity=routing.capacity, num_dropped=routing.num_dropped)


def replica_quotas(
    need: torch.Tensor, base: torch.Tensor, valid: torch.Tensor, token_offset: int | torch.Tensor = 0
) -> torch.Tensor:
    """[E, R] int64 tokens per replica: water-filling of ``need`` [E] tokens per expert over its
    replicas, starting from ``base`` [E, R] int64 loads (``valid`` [E, R] bool marks real
    replicas), so that the largest final load max_j(base + quota) is the least possible.

    Per expert, the level L is the least integer with sum_j max(L - base_j, 0) >= need: with
    the replicas sorted by load, L = min over i of max(b_(i-1), ceil((need + b_0 + .. +
    b_(i-1)) / i)). Every replica is filled to L - 1, and the few tokens left raise some of
    those at L - 1 to L, in replica order from ``token_offset`` mod logcnt (ranks that share a
    base spread them). Quotas sum to ``need`` exactly.
    """
    E, R = base.shape
    b = torch.where(valid, base, _NO_REPLICA)
    b_sorted, order = torch.sort(b, dim=1, stable=True)
    v_sorted = valid.gather(1, order)
    prefix = torch.cumsum(torch.where(v_sorted, b_sorted, 0), dim=1)
    i = torch.arange(1, R + 1, device=base.device)
    fill = need.unsqueeze(1) + prefix
    level = torch.maximum(b_sorted, (fill + i - 1).div(i, rounding_mode="floor"))
    level = torch.where(v_sorted, level, _NO_REPLICA).amin(1, keepdim=True)  # [E, 1]
    quota = torch.where(valid, (level - 1 - base).clamp(min=0), 0)
    short = need - quota.sum(1)  # < the replicas that can still rise to L
    can = valid & (base <= level - 1)
    count = valid.sum(1, keepdim=True).clamp(min=1)
    turn = torch.where(valid, (i - 1 - token_offset) % count, R + i)  # order of the extra tokens
    before = (can.unsqueeze(1) & (turn.unsqueeze(1) < turn.unsqueeze(2))).sum(2)  # [E, R]
    return quota + (can & (before < short.unsqueeze(1))).long()


def logical_routing(routing_phys: Routing, phy2log: torch.Tensor, num_experts: int) -> Routing:
    """Physical routing [T, P] -> its logical projection [T, E]: each slot's column added to
    its expert's (phy2log [P] int64). The inverse of ``choose_replicas``: probs equal to the
    bit (each pair sits on one slot, the others add zeros), ``capacity`` and ``num_dropped``
    carried over."""
    T = routing_phys.routing_map.shape[0]
    dev = routing_phys.routing_map.device
    phy2log = phy2log.to(dev)
    probs = torch.zeros(T, num_experts, dtype=routing_phys.probs.dtype, device=dev)
    probs.index_add_(1, phy2log, routing_phys.probs)
    hits = torch.zeros(T, num_experts, dtype=torch.int32, device=dev)
    hits.index_add_(1, phy2log, routing_phys.routing_map.int())
    return Routing(
        probs, hits > 0, capacity=routing_phys.capacity, num_dropped=routing_phys.num_dropped
    )


def logical_loads(routing_phys: Routing, phy2log: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 tokens routed to each logical expert, summed over its slots (phy2log [P])."""
    load = routing_phys.expert_load()
    out = torch.zeros(num_experts, dtype=torch.int64, device=load.device)
    return out.index_add_(0, phy2log.to(load.device), load)


def _take_turns(
    seen: torch.Tensor, candidates: torch.Tensor, token_offset: int | torch.Tensor
) -> torch.Tensor:
    """[E, T] replica index: the pair at queue position ``seen`` [E, T] takes candidate number
    (token_offset + seen) mod (candidates of its expert), candidates [E, R] bool in row order."""
    R = candidates.shape[1]
    rank = torch.cumsum(candidates, dim=1, dtype=torch.int64)  # [E, R] candidates up to j
    turn = (seen + token_offset) % rank[:, -1:].clamp(min=1)
    # the first replica with rank > turn: the (turn + 1)-th candidate
    return torch.searchsorted(rank, turn, right=True).clamp_(max=R - 1)


def _local_first_candidates(
    log2phy: torch.Tensor,
    valid: torch.Tensor,
    slot_rank: torch.Tensor,
    load: torch.Tensor,
    ctx: RoutingContext,
) -> torch.Tensor:
    """[E, R] bool: the replicas local-first chooses among (see the module docstring). A rank
    is the most loaded when its slot load is the maximum and not every rank's is equal (zero
    loads keep every token local)."""
    rank_load = torch.zeros(ctx.ep_size, dtype=torch.int64, device=load.device)
    rank_load.index_add_(0, slot_rank, load)
    top, bottom = rank_load.max(), rank_load.min()
    hot = (rank_load == top) & (top > bottom)  # [EP]
    rank = slot_rank[log2phy.clamp(min=0)]  # [E, R]
    local = valid & (rank == ctx.ep_rank)
    cool = valid & ~hot[rank]
    stay = local.any(1, keepdim=True) & ~hot[ctx.ep_rank]
    return torch.where(stay, local, torch.where(cool.any(1, keepdim=True), cool, valid))


def _valid(log2phy: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """[E, R] bool: the real replicas (the first logcnt[e] of each row)."""
    R = log2phy.shape[1]
    return torch.arange(R, device=log2phy.device) < logcnt.to(log2phy.device).unsqueeze(1)


def _check_shapes(log2phy: torch.Tensor, logcnt: torch.Tensor, slot_rank: torch.Tensor) -> None:
    """One-line ConfigErrors for the layout's types, dtypes and shapes (metadata only)."""
    for name, x, dim in (
        ("log2phy", log2phy, 2), ("logcnt", logcnt, 1), ("slot_rank", slot_rank, 1)
    ):
        _require(
            isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.dim() == dim,
            f"{name} must be a {dim}-D int64 tensor, got {_describe(x)}",
        )
    E, R = log2phy.shape
    P = slot_rank.shape[0]
    _require(E >= 1 and R >= 1, f"log2phy must have shape [num_experts >= 1, R >= 1], got {(E, R)}")
    _require(
        logcnt.shape[0] == E, f"logcnt must have shape [num_experts={E}], got {tuple(logcnt.shape)}"
    )
    _require(P >= E, f"slot_rank must cover num_slots >= num_experts={E} slots, got {P}")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__


def _first(mask: torch.Tensor, n: int = 8) -> list[int]:
    """The first ``n`` indices where ``mask`` [N] is True (for error messages)."""
    return mask.nonzero().flatten()[:n].tolist()
