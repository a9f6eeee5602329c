"""Routing policies by name. Each is a pure function
``policy(logits [T, E], gate: GateConfig, params, ctx: RoutingContext) -> Routing``
running unchanged on CPU and CUDA tensors, with no Python loop over tokens.

Several routers share one function and parameter dataclass (``laser``, ``laser_fast`` and
``load_only`` all run ``laser`` with ``LaserParams``); each fixes the fields that make it what
it is (``Policy.preset``: ``laser_fast`` runs ``assignment="price"``). ``resolve_params``, used
by ``route`` and by the framework adapters, fills those fields in for dict parameters and
rejects any parameters, dict or dataclass, that set them otherwise: a router's name always
says what runs.
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
from .laser_routing import laser
from .topk_routing import topk

__all__ = [
    "Policy",
    "POLICIES",
    "get_policy",
    "make_params",
    "resolve_params",
    "route",
    "topk",
    "laser",
    "token_drop",
    "expanded_drop",
    "expert_capacity",
]


@dataclass(frozen=True)
class Policy:
    """A registered routing policy.

    Attributes:
        name: the router's name (``route(name, ...)``, ``--router``).
        fn: the policy function.
        params_cls: its parameter dataclass.
        variable_experts_per_token: whether it may route a token to other than k experts
            (adapters then size dispatch buffers dynamically).
        summary: one line for listings.
        preset: (field, value) pairs this router fixes: filled in for dict parameters, and a
            ConfigError for any parameters that set them otherwise (``resolve_params``).
        uses_expert_load: reads ``RoutingContext.expert_load`` (EP-global loads).
    """

    name: str
    fn: Callable[..., Routing]
    params_cls: type
    variable_experts_per_token: bool
    summary: str
    preset: tuple[tuple[str, Any], ...] = ()
    uses_expert_load: bool = False

    def params(self, overrides: dict[str, Any] | None = None) -> Any:
        """Validated parameters from a dict (YAML / command line) over this router's preset."""
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(
                f"parameters of router {self.name!r} must be a mapping of "
                f"{self.params_cls.__name__} fields, got {type(overrides).__name__}"
            )
        params = from_dict(self.params_cls, {**dict(self.preset), **(overrides or {})})
        self.check_preset(params)
        return params

    def check_preset(self, params: Any) -> None:
        """ConfigError, in one line, when ``params`` (its ``per_layer`` overrides included) set
        a field this router fixes to another value."""
        conflicts = self.preset_conflicts(params)
        if conflicts:
            fixed = ", ".join(f"{n}={v!r}" for n, v in self.preset)
            fits = sorted(  # the routers these parameters agree with, most specific first
                (p for p in POLICIES.values()
                 if p.params_cls is self.params_cls and not p.preset_conflicts(params)),
                key=lambda p: -len(p.preset),
            )
            fits = [p.name for p in fits]
            hint = f" (router {fits[0]!r} runs these)" if fits else ""
            raise ConfigError(
                f"router {self.name!r} runs {fixed}; got {self.params_cls.__name__}"
                f"({', '.join(conflicts)}){hint}: leave these fields out of a dict, or give "
                f"them the router's values"
            )

    def preset_conflicts(self, params: Any) -> list[str]:
        """The fields of ``params`` that contradict this router's preset, as "field=value"."""
        got = [f"{n}={getattr(params, n)!r}" for n, v in self.preset if getattr(params, n) != v]
        for layer, over in (getattr(params, "per_layer", None) or {}).items():
            got += [
                f"per_layer[{layer}][{n!r}]={over[n]!r}"
                for n, v in self.preset
                if n in over and over[n] != v
            ]
        return got


# the LASER routers fix load_only (and laser_fast its assignment), so that a LaserParams object
# cannot turn one into another unseen
POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("topk", topk, TopKParams, False, "vanilla top-k (Megatron-identical baseline)"),
        Policy(
            "laser",
            laser,
            LaserParams,
            False,
            "LASER: adaptive pool, k of c candidates toward the least possible peak (Hall levels, blocked pricing, augmenting rounds)",
            (("load_only", False),),
            uses_expert_load=True,
        ),
        Policy(
            "laser_fast",
            laser,
            LaserParams,
            False,
            "LASER with one price pass over all tokens: fewer ops, looser balance",
            (("assignment", "price"), ("load_only", False)),
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
        Policy(
            "token_drop",
            token_drop,
            TokenDropParams,
            True,
            "capacity-aware token drop (cap gamma x mean)",
        ),
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


def resolve_params(policy: Policy | str, params: Any = None) -> Any:
    """The parameters ``policy`` (a Policy or its name) runs with: its defaults for None, its
    dataclass built from a dict, or the dataclass itself. ConfigError for another type, or for
    parameters that contradict the router's preset (``Policy.check_preset``)."""
    if isinstance(policy, str):
        policy = get_policy(policy)
    if params is None or isinstance(params, dict):
        return policy.params(params)
    if not isinstance(params, policy.params_cls):
        raise ConfigError(
            f"params for router {policy.name!r} must be {policy.params_cls.__name__} or a dict, "
            f"got {type(params).__name__}"
        )
    policy.check_preset(params)
    return params


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
    params = resolve_params(policy, params)
    check_logits(logits, gate, check_finite=check_finite)
    ctx.validate(gate)
    resolved = params.for_layer(ctx.layer) if hasattr(params, "for_layer") else params
    resolved.validate(gate)
    return policy.fn(logits, gate, params, ctx)
