"""The routing contract shared by every policy and both framework adapters.

A routing decision for T tokens over P physical expert slots is Megatron-Core's pair
``(probs[T, P] float, routing_map[T, P] bool)`` with ``probs == 0`` wherever the map is False.
P equals the number of logical experts E unless replicas exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Routing", "RoutingInvariantError", "check_routing", "routing_from_indices", "megatron_dense"]


class RoutingInvariantError(ValueError):
    """A routing decision broke the contract; the message names the broken invariant."""


@dataclass(frozen=True)
class Routing:
    """One routing decision.

    Attributes:
        probs: [T, P] float, the combine weight of each (token, slot); zero off the map.
        routing_map: [T, P] bool, True where the token is sent to the slot.
        capacity: per-expert capacity the policy enforced (tokens), or None when uncapped.
        num_dropped: 0-dim int64 tensor, top-k assignments the policy removed (0 for top-k and
            LASER). Kept as a tensor so no host sync is needed; ``dropped_fraction`` reads it.
    """

    probs: torch.Tensor
    routing_map: torch.Tensor
    capacity: int | None = None
    num_dropped: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.routing_map.shape[0]

    @property
    def num_slots(self) -> int:
        return self.routing_map.shape[1]

    def expert_load(self) -> torch.Tensor:
        """[P] int64: tokens routed to each slot."""
        return self.routing_map.sum(dim=0)

    def experts_per_token(self) -> torch.Tensor:
        """[T] int64: slots each token is routed to."""
        return self.routing_map.sum(dim=1)

    def topk_indices(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense view ([T, k] indices, [T, k] probs) of a routing with at most k slots per row.

        Rows with fewer than k slots are padded with index -1 and prob 0 (DeepSpeed's convention
        for dropped routes). Slots are listed in increasing slot order.
        """
        T, P = self.routing_map.shape
        pos = torch.arange(P, 0, -1, device=self.routing_map.device)
        key = self.routing_map * pos  # larger for smaller slot index, 0 when off the map
        vals, idx = torch.topk(key, k=k, dim=1, sorted=True)
        valid = vals > 0
        probs = torch.gather(self.probs, 1, idx) * valid
        idx = torch.where(valid, idx, torch.full_like(idx, -1))
        return idx, probs


def routing_from_indices(
    indices: torch.Tensor, weights: torch.Tensor, num_slots: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter [T, k] slot indices and weights into dense ([T, P] probs, [T, P] bool map).

    ``like`` gives the dtype and device of ``probs``. Built in place on fresh zeros: the same
    values as Megatron's out-of-place ``zeros_like(logits).scatter(...)`` (``megatron_dense``),
    which on CPU costs several times more (an extra [T, P] copy for each output and an int32
    map converted to bool).
    """
    T = indices.shape[0]
    probs = torch.zeros(T, num_slots, dtype=like.dtype, device=like.device)
    probs.scatter_(1, indices, weights.to(like.dtype))
    routing_map = torch.zeros(T, num_slots, dtype=torch.bool, device=like.device)
    routing_map.scatter_(1, indices, True)
    return probs, routing_map


def megatron_dense(
    indices: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``routing_from_indices`` with Megatron-Core 0.19's own ops (``topk_routing_with_score_
    function``, non-deterministic mode): vanilla top-k keeps them, so that it costs what
    Megatron's routing costs."""
    probs = torch.zeros_like(logits).scatter(1, indices, weights.to(logits.dtype))
    routing_map = torch.zeros_like(logits).int().scatter(1, indices, 1).bool()
    return probs, routing_map


def check_routing(
    routing: Routing,
    *,
    num_tokens: int | None = None,
    num_slots: int | None = None,
    capacity: int | None = None,
    min_per_token: int | None = None,
    max_per_token: int | None = None,
) -> None:
    """Raise RoutingInvariantError unless ``routing`` satisfies the contract.

    Checks: 2-D shapes that agree (and equal ``num_tokens`` x ``num_slots`` when given), floating
    ``probs``, bool ``routing_map``, finite non-negative probs, probs zero off the map, every column
    count <= ``capacity``, every row count within [``min_per_token``, ``max_per_token``].
    This is a test/debug helper: it synchronises with the device.
    """
    probs, rmap = routing.probs, routing.routing_map
    if probs.dim() != 2 or rmap.dim() != 2:
        raise RoutingInvariantError(
            f"probs and routing_map must be 2-D [tokens, slots]; got {tuple(probs.shape)} and "
            f"{tuple(rmap.shape)}"
        )
    if probs.shape != rmap.shape:
        raise RoutingInvariantError(
            f"probs {tuple(probs.shape)} and routing_map {tuple(rmap.shape)} differ in shape"
        )
    T, P = rmap.shape
    if num_tokens is not None and T != num_tokens:
        raise RoutingInvariantError(f"expected {num_tokens} tokens (rows), got {T}")
    if num_slots is not None and P != num_slots:
        raise RoutingInvariantError(f"expected {num_slots} expert slots (columns), got {P}")
    if rmap.dtype != torch.bool:
        raise RoutingInvariantError(f"routing_map must be torch.bool, got {rmap.dtype}")
    if not probs.is_floating_point():
        raise RoutingInvariantError(f"probs must be a floating dtype, got {probs.dtype}")
    if not torch.isfinite(probs).all():
        raise RoutingInvariantError("probs contain NaN or Inf")
    if (probs < 0).any():
        raise RoutingInvariantError("probs contain negative weights")
    off = probs.masked_select(~rmap)
    if off.numel() and (off != 0).any():
        n = int((off != 0).sum())
        raise RoutingInvariantError(f"probs must be zero off the routing map; {n} entries are not")
    if capacity is not None:
        load = rmap.sum(dim=0)
        over = load > capacity
        if over.any():
            e = int(torch.nonzero(over)[0, 0])
            raise RoutingInvariantError(
                f"expert slot {e} holds {int(load[e])} tokens, more than capacity {capacity}"
            )
    per_row = rmap.sum(dim=1)
    if min_per_token is not None and T and int(per_row.min()) < min_per_token:
        t = int(torch.argmin(per_row))
        raise RoutingInvariantError(
            f"token {t} is routed to {int(per_row[t])} slots, fewer than {min_per_token}"
        )
    if max_per_token is not None and T and int(per_row.max()) > max_per_token:
        t = int(torch.argmax(per_row))
        raise RoutingInvariantError(
            f"token {t} is routed to {int(per_row[t])} slots, more than {max_per_token}"
        )
