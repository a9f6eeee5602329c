"""A debugging checker for DeepSpeed's gate contract: ``check_gate_output`` raises
``GateOutputError`` naming the broken invariant of a sparse 7-tuple or dense 4-tuple (see
``deepspeed_patch.encoding`` for the formats), from ``BalancedGate`` or DeepSpeed's own gates.
A test and debug helper: it synchronises with the device and, at EP > 1, runs a collective.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from moebalance.routing import RoutingInvariantError

__all__ = ["GateOutputError", "check_gate_output"]


class GateOutputError(RoutingInvariantError):
    """A gate output broke DeepSpeed's contract; the message names the broken invariant."""


def _fail(message: str) -> None:
    raise GateOutputError(message)


def _capacity_of(output: tuple) -> int:
    try:
        return int(output[1]) if len(output) == 7 else int(output[1].shape[2])
    except Exception:  # malformed: reported by the local checks after the collective
        return -1


def check_gate_output(
    output: tuple,
    *,
    num_tokens: int,
    num_experts: int,
    ep_group: Any = None,
    max_routes_per_token: Optional[int] = None,
) -> int:
    """Raise GateOutputError unless ``output`` keeps DeepSpeed's gate contract; returns C.

    Works for the sparse 7-tuple and the dense 4-tuple, from this gate or DeepSpeed's own.
    Checks: tuple layout, shapes ([R, S] / [S, E, C]), dtypes (int32 routes, fp32 gates, bool
    mask); C identical on every rank of ``ep_group`` (a collective, run before any local check
    can raise, so a failing rank never leaves the others waiting); expert indices in [-1, E);
    0 <= location < C for kept routes; every (expert, location) slot used at most once; no
    token routed twice to one expert; gates finite, >= 0, and 0 on dropped routes;
    ``exp_counts`` [E] at least the routes kept per expert (the built-in gates count before
    their drops); at most ``max_routes_per_token`` kept routes per token when given.
    A test/debug helper: it synchronises with the device.
    """
    C = _capacity_of(output)
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        device = output[-1].device if isinstance(output[-1], torch.Tensor) else "cpu"
        mine = torch.tensor([C], dtype=torch.int64, device=device)  # NCCL needs device tensors
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(ep_group))]
        dist.all_gather(every, mine, group=ep_group)
        capacities = [int(c) for c in every]
        if len(set(capacities)) != 1:
            _fail(f"capacity C differs across EP ranks: {capacities} (rank order of the EP group)")
    if len(output) == 7:
        _check_sparse(output, num_tokens, num_experts, C, max_routes_per_token)
    elif len(output) == 4:
        _check_dense(output, num_tokens, num_experts, C, max_routes_per_token)
    else:
        _fail(f"a gate output is a 7-tuple (sparse) or a 4-tuple (dense), got {len(output)} items")
    return C


def _check_counts(exp_counts: Any, kept_per_expert: torch.Tensor, num_experts: int) -> None:
    if not isinstance(exp_counts, torch.Tensor) or tuple(exp_counts.shape) != (num_experts,):
        _fail(f"exp_counts must be a tensor of shape [E={num_experts}], got {exp_counts!r}")
    if exp_counts.is_floating_point():
        _fail(f"exp_counts must be integer counts, got {exp_counts.dtype}")
    short = exp_counts.long().cpu() < kept_per_expert.cpu()
    if short.any():
        e = int(torch.nonzero(short)[0, 0])
        _fail(
            f"exp_counts[{e}] = {int(exp_counts[e])} is below the {int(kept_per_expert[e])} "
            "routes kept"
        )


def _check_per_token(per_token: torch.Tensor, limit: Optional[int]) -> None:
    if limit is not None and per_token.numel() and int(per_token.max()) > limit:
        t = int(torch.argmax(per_token))
        _fail(f"token {t} has {int(per_token[t])} routes, more than {limit}")


def _check_sparse(output, S, E, C, max_routes) -> None:
    _, capacity, num_experts, indices, locations, gates, exp_counts = output
    if not isinstance(capacity, (int, torch.Tensor)) or C < 1:
        _fail(f"capacity C must be an int or 0-dim integer tensor >= 1, got {capacity!r}")
    if int(num_experts) != E:
        _fail(f"E = {num_experts} in the output, expected {E}")
    for name, t, dtype in (
        ("indices", indices, torch.int32),
        ("locations", locations, torch.int32),
        ("gates", gates, torch.float32),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != S or t.shape[0] < 1:
            _fail(f"{name} must be [R >= 1, S={S}], got {getattr(t, 'shape', t)!r}")
        if t.dtype != dtype:
            _fail(f"{name} must be {dtype}, got {t.dtype}")
    if indices.shape != locations.shape or indices.shape != gates.shape:
        _fail(f"indices {tuple(indices.shape)}, locations {tuple(locations.shape)}, gates "
              f"{tuple(gates.shape)} differ in shape")
    idx, loc, g = indices.long().cpu(), locations.long().cpu(), gates.cpu()
    if ((idx < -1) | (idx >= E)).any():
        _fail(f"expert indices must be in [-1, {E}); got values {idx.unique().tolist()}")
    kept = idx >= 0
    bad_loc = kept & ((loc < 0) | (loc >= C))
    if bad_loc.any():
        r, s = (int(v) for v in torch.nonzero(bad_loc)[0])
        _fail(f"route {r} of token {s} (expert {int(idx[r, s])}) has location {int(loc[r, s])} "
              f"outside [0, C={C})")
    slots = (idx * C + loc)[kept]
    if slots.unique().numel() != slots.numel():
        _fail(
            "two kept routes share an (expert, location) slot: one token would get another's "
            "output"
        )
    token = torch.arange(S).expand_as(idx)
    pairs = (token * E + idx)[kept]
    if pairs.unique().numel() != pairs.numel():
        _fail("a token is routed twice to the same expert")
    if not torch.isfinite(g).all() or (g < 0).any():
        _fail("gates must be finite and >= 0")
    if (g[~kept] != 0).any():
        _fail("dropped routes (index -1) must carry gate 0")
    _check_counts(exp_counts, torch.bincount(idx[kept], minlength=E)[:E], E)
    _check_per_token(kept.sum(dim=0), max_routes)


def _check_dense(output, S, E, C, max_routes) -> None:
    _, combine, dispatch, exp_counts = output
    for name, t, dtype in (
        ("combine_weights", combine, torch.float32),
        ("dispatch_mask", dispatch, torch.bool),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape[:2]) != (S, E) or t.dim() != 3:
            _fail(f"{name} must be [S={S}, E={E}, C], got {getattr(t, 'shape', t)!r}")
        if t.dtype != dtype:
            _fail(f"{name} must be {dtype}, got {t.dtype}")
    if combine.shape != dispatch.shape or C < 1:
        _fail(f"combine_weights {tuple(combine.shape)} and dispatch_mask {tuple(dispatch.shape)} "
              "must agree, with C >= 1")
    w, d = combine.cpu(), dispatch.cpu()
    if not torch.isfinite(w).all() or (w < 0).any():
        _fail("combine_weights must be finite and >= 0")
    if (w[~d] != 0).any():
        _fail("combine_weights must be 0 where dispatch_mask is False")
    if (d.sum(dim=0) > 1).any():
        _fail("an (expert, location) slot holds more than one token")
    if (d.sum(dim=2) > 1).any():
        _fail("a token is routed twice to the same expert")
    _check_counts(exp_counts, d.sum(dim=(0, 2)), E)
    _check_per_token(d.any(dim=2).sum(dim=1), max_routes)
