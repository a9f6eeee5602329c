"""Routing policies by name. Each is a pure function
``policy(logits [T, E], gate: GateConfig, params, ctx: RoutingContext) -> Routing``
running unchanged on CPU and CUDA tensors, with no Python loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import (
    ConfigError,
    ExpandedDropParams,
    GateConfig,
    LaserParams,
    RoutingContext,
    TokenDropParams,
    TopKParams,
    check_logits,
    from_dict,
)
from ..routing import Routing
from .capacity import expanded_drop, expert_capacity, token_drop
from .laser_routing import laser, laser_reference
from .topk_routing import topk

__all__ = [
    "Policy",
    "POLICIES",
    "get_policy",
    "make_params",
    "route",
    "topk",
    "laser",
    "laser_reference",
    "token_drop",
    "expanded_drop",
    "expert_capacity",
]


@dataclass(frozen=True)
class Policy:
    """A registered routing policy: its function, its parameter dataclass, and whether it may
    change the number of experts per token (adapters then size dispatch buffers dynamically)."""

    name: str
    fn: Callable[..., Routing]
    params_cls: type
    variable_experts_per_token: bool
    summary: str
    defaults: tuple[tuple[str, Any], ...] = ()
    uses_expert_load: bool = False  # reads RoutingContext.expert_load (EP-global loads)

    def params(self, overrides: dict[str, Any] | None = None) -> Any:
        return from_dict(self.params_cls, {**dict(self.defaults), **(overrides or {})})


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("topk", topk, TopKParams, False, "vanilla top-k (Megatron-identical baseline)"),
        Policy(
            "laser",
            laser,
            LaserParams,
            False,
            "LASER: adaptive pool, least-loaded of c candidates (blocked pricing + repair)",
            uses_expert_load=True,
        ),
        Policy(
            "laser_fast",
            laser,
            LaserParams,
            False,
            "LASER with one price pass: ~1.6x top-k time, looser balance",
            (("assignment", "price"),),
            uses_expert_load=True,
        ),
        Policy(
            "load_only",
            laser,
            LaserParams,
            False,
            "least-loaded over all experts, scores ignored (imbalance lower bound)",
            (("load_only", True),),
            uses_expert_load=True,
        ),
        Policy("token_drop", token_drop, TokenDropParams, True, "capacity-aware token drop (cap gamma x mean)"),
        Policy(
            "expanded_drop",
            expanded_drop,
            ExpandedDropParams,
            True,
            "capacity-aware expanded drop (top-k + rank-local experts, cap gamma x mean)",
        ),
    )
}


def get_policy(name: str) -> Policy:
    """The policy registered as ``name``; ConfigError lists the known names otherwise."""
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown router {name!r}; choose one of {sorted(POLICIES)}") from None


def make_params(name: str, overrides: dict[str, Any] | None = None) -> Any:
    """Validated parameters of policy ``name`` from a dict (YAML / command line)."""
    return get_policy(name).params(overrides)


def route(
    name: str,
    logits: torch.Tensor,
    gate: GateConfig,
    params: Any = None,
    ctx: RoutingContext | None = None,
    *,
    check_finite: bool = True,
) -> Routing:
    """Validate inputs and run policy ``name``. ``check_finite`` costs a host sync."""
    policy = get_policy(name)
    ctx = ctx or RoutingContext()
    if params is None:
        params = policy.params()
    elif isinstance(params, dict):
        params = policy.params(params)
    elif not isinstance(params, policy.params_cls):
        raise ConfigError(
            f"params for router {name!r} must be {policy.params_cls.__name__} or a dict, "
            f"got {type(params).__name__}"
        )
    check_logits(logits, gate, check_finite=check_finite)
    ctx.validate(gate)
    resolved = params.for_layer(ctx.layer) if hasattr(params, "for_layer") else params
    resolved.validate(gate)
    return policy.fn(logits, gate, params, ctx)
