"""moebalance: training-free inference-time load balancing for Mixture-of-Experts routers.

Framework-agnostic core (torch only): the routing contract, the policies, metrics and workloads.
The Megatron-Core and DeepSpeed adapters live in ``megatron_patch`` and ``deepspeed_patch``.
"""

from .config import (
    ConfigError,
    ExpandedDropParams,
    GateConfig,
    LaserParams,
    RoutingContext,
    TokenDropParams,
    TopKParams,
)
from .policies import POLICIES, get_policy, make_params, route
from .routing import Routing, RoutingInvariantError, check_routing

__all__ = [
    "ConfigError",
    "ExpandedDropParams",
    "GateConfig",
    "LaserParams",
    "POLICIES",
    "Routing",
    "RoutingContext",
    "RoutingInvariantError",
    "TokenDropParams",
    "TopKParams",
    "check_routing",
    "get_policy",
    "make_params",
    "route",
]
