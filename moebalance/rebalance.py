"""Online rebalancing: re-plan a layer's replica placement from recent loads and move the
changed slots' expert weights between EP ranks, between model steps, in lockstep.

- ``align_placement(old, new)``: the new plan with its slots permuted within each rank so that
  an expert the rank already holds keeps its slot (slot order within a rank is free), so that
  only slots whose expert really changes move.
- ``slot_moves(old, new)``: for every slot whose expert changes, where its new expert's
  weights come from: a slot holding that expert under the old plan, on the destination rank
  itself when it has one (a local copy), else the first replica.
- ``move_expert_weights``: every rank snapshots the source slots it serves, then the moves run
  in one global order, each a local copy or a ``send`` / ``recv`` pair between its two ranks
  (every rank walks the same list, so no pair can wait on another). Returns the bytes this
  rank sent and received.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .placement import Placement, _log2phy

__all__ = ["SlotMove", "align_placement", "slot_moves", "move_expert_weights"]


class SlotMove(NamedTuple):
    slot: int  # the destination slot (its new expert)
    source: int  # a slot holding that expert under the old plan
    src_rank: int
    dst_rank: int


def align_placement(old: Placement, new: Placement) -> Placement:
    """``new`` with each rank's slots reordered so that experts the rank held under ``old``
    stay in their old slots. Same replicas per rank, same maps otherwise."""
    per_rank = old.slots_per_rank
    phy2log = []
    for r in range(old.num_ranks):
        lo, hi = r * per_rank, (r + 1) * per_rank
        before = old.phy2log[lo:hi].tolist()
        wanted = new.phy2log[new.slot_rank == r].tolist()
        slots: list[int | None] = [None] * per_rank
        for i, expert in enumerate(before):  # keep what stays
            if expert in wanted:
                wanted.remove(expert)
                slots[i] = expert
        for i in range(per_rank):  # the rest fill the freed slots in order
            if slots[i] is None:
                slots[i] = wanted.pop(0)
        phy2log += slots
    phy2log = torch.tensor(phy2log, dtype=torch.int64)
    return Placement(
        phy2log=phy2log,
        log2phy=_log2phy(phy2log, old.num_experts),
        logcnt=torch.bincount(phy2log, minlength=old.num_experts),
        slot_rank=old.slot_rank.clone(),
        num_ranks=old.num_ranks,
    )


def slot_moves(old: Placement, new: Placement) -> list[SlotMove]:
    """The moves that turn ``old`` into ``new`` (same slots per rank), in slot order."""
    moves = []
    for slot in range(new.num_slots):
        expert = int(new.phy2log[slot])
        if int(old.phy2log[slot]) == expert:
            continue
        dst = int(new.slot_rank[slot])
        holders = [int(s) for s in old.log2phy[expert] if int(s) >= 0]
        local = [s for s in holders if int(old.slot_rank[s]) == dst]
        source = local[0] if local else holders[0]
        moves.append(SlotMove(slot, source, int(old.slot_rank[source]), dst))
    return moves


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The expert's weights, in a fixed order (parameters by name)."""
    return [p for _, p in sorted(module.named_parameters())]


@torch.no_grad()
def move_expert_weights(
    experts: Mapping[int, torch.nn.Module],
    moves: list[SlotMove],
    ep_rank: int,
    group: Any = None,
) -> dict[str, int]:
    """Carry out ``moves`` on this rank: ``experts`` = {global slot: expert module} of this
    rank's slots (one layer). Collective over ``group`` (the EP group, whose rank i is EP rank
    i): every rank calls it with the same moves. Returns {"sent_bytes", "received_bytes",
    "copied_bytes"} of this rank."""
    snapshot = {
        m.source: [t.detach().clone() for t in _tensors(experts[m.source])]
        for m in moves if m.src_rank == ep_rank
    }
    out = {"sent_bytes": 0, "received_bytes": 0, "copied_bytes": 0}
    for m in moves:
        if m.src_rank == ep_rank and m.dst_rank == ep_rank:
            for dst, src in zip(_tensors(experts[m.slot]), snapshot[m.source]):
                dst.copy_(src)
                out["copied_bytes"] += src.numel() * src.element_size()
        elif m.src_rank == ep_rank:
            peer = dist.get_global_rank(group, m.dst_rank) if group is not None else m.dst_rank
            for src in snapshot[m.source]:
                dist.send(src.contiguous(), peer, group=group)
                out["sent_bytes"] += src.numel() * src.element_size()
        elif m.dst_rank == ep_rank:
            peer = dist.get_global_rank(group, m.src_rank) if group is not None else m.src_rank
            for dst in _tensors(experts[m.slot]):
                buffer = torch.empty_like(dst)
                dist.recv(buffer, peer, group=group)
                dst.copy_(buffer)
                out["received_bytes"] += buffer.numel() * buffer.element_size()
    return out
