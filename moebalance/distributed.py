"""EP-group helpers shared by the framework adapters (torch.distributed only).

A policy never talks to the network; what is EP-global is computed here by the adapter and passed
to the policy through ``RoutingContext``. Both ``megatron_patch`` and ``deepspeed_patch`` use these.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError, GateConfig, RoutingContext
from .policies import Policy, get_policy, route
from .routing import Routing

__all__ = ["LOAD_SCOPES", "check_load_scope", "resolve_params", "other_ranks_load", "route_in_group"]

#: "local": LASER balances each rank's tokens on their own; "global": against the loads the
#: other EP ranks would put on each expert (one all-reduce of E floats per layer call).
LOAD_SCOPES = ("local", "global")


def check_load_scope(load_scope: str, name: str) -> None:
    """ConfigError unless ``load_scope`` is known and fits policy ``name``."""
    if load_scope not in LOAD_SCOPES:
        raise ConfigError(f"load_scope must be one of {LOAD_SCOPES}, got {load_scope!r}")
    if load_scope == "global" and not get_policy(name).uses_expert_load:
        raise ConfigError(
            f"load_scope='global' needs a policy that reads expert loads (laser, load_only); "
            f"router {name!r} does not"
        )


def resolve_params(policy: Policy, params: Any) -> Any:
    """The policy's params dataclass from None (defaults), a dict, or the dataclass itself."""
    if params is None or isinstance(params, dict):
        return policy.params(params)
    if not isinstance(params, policy.params_cls):
        raise ConfigError(
            f"params for router {policy.name!r} must be {policy.params_cls.__name__} or a dict, "
            f"got {type(params).__name__}"
        )
    return params


def other_ranks_load(
    logits: torch.Tensor, gate: GateConfig, ctx: RoutingContext, group: Any
) -> torch.Tensor | None:
    """[E] float32: vanilla top-k counts of the other EP ranks' tokens (None at EP = 1).

    Collective over ``group``: every EP rank must call it in every layer call (lockstep), also
    with zero local tokens.
    """
    if ctx.ep_size == 1:
        return None
    vanilla = route("topk", logits, gate, None, ctx, check_finite=False)
    local = vanilla.routing_map.sum(dim=0).to(torch.float32)
    total = local.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total - local


def route_in_group(
    name: str,
    logits: torch.Tensor,
    gate: GateConfig,
    params: Any,
    ctx: RoutingContext,
    *,
    load_scope: str,
    group: Any,
) -> Routing:
    """Run policy ``name`` on this rank's ``logits`` [T, E], adding EP-global loads first when
    ``load_scope == "global"`` (collective at EP > 1)."""
    if load_scope == "global":
        ctx = dataclasses.replace(ctx, expert_load=other_ranks_load(logits, gate, ctx, group))
    return route(name, logits, gate, params, ctx, check_finite=False)
