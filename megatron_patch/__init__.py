"""Megatron-Core adapter: routers that run the moebalance policies, spec/model injection, and
the CPU shims for gloo runs. Framework code only translates; the policies live in moebalance.

Typical use::

    from megatron_patch import apply_cpu_shims, make_router_class, prepare_config, with_router

    apply_cpu_shims()                      # no-op on a CUDA machine
    config = prepare_config(config, "token_drop")
    spec = with_router(layer_spec, make_router_class("token_drop", {"capacity_factor": 1.2}))
"""

from .cpu_shims import apply_cpu_shims, cpu_shims_applied
from .inject import moe_layers, set_decode, swap_routers, with_router
from .routers import (
    LOAD_SCOPES,
    ROUTER_CLASSES,
    BalancedRouter,
    ExpandedDropRouter,
    LaserFastRouter,
    LaserRouter,
    LoadOnlyRouter,
    TokenDropRouter,
    VanillaRouter,
    gate_config,
    make_router_class,
    needs_dynamic_capacity,
    prepare_config,
)

__all__ = [
    "LOAD_SCOPES",
    "ROUTER_CLASSES",
    "BalancedRouter",
    "ExpandedDropRouter",
    "LaserRouter",
    "LaserFastRouter",
    "LoadOnlyRouter",
    "TokenDropRouter",
    "VanillaRouter",
    "apply_cpu_shims",
    "cpu_shims_applied",
    "gate_config",
    "make_router_class",
    "moe_layers",
    "needs_dynamic_capacity",
    "prepare_config",
    "set_decode",
    "swap_routers",
    "with_router",
]
