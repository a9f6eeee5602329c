"""Megatron-Core adapter: routers that run the moebalance policies, spec/model injection, and
the CPU shims for gloo runs. Framework code only translates; the policies live in moebalance.

Typical use::

    from megatron_patch import apply_cpu_shims, make_router_class, prepare_config, with_router

    apply_cpu_shims()                      # no-op on a CUDA machine
    router_cls = make_router_class("token_drop", {"capacity_factor": 1.2})
    config = prepare_config(config, router_cls)
    spec = with_router(layer_spec, router_cls)

``make_router_class(name, params, load_scope=...)`` is the one way to get a router class
(``make_router_class("topk")`` is identical to the stock ``TopKRouter`` at inference).
``megatron_patch.model`` builds the GPT-MoE of a ``moebalance.model_config.ModelConfig``;
``megatron_patch.instrument`` records its MoE layers into ``moebalance.telemetry``;
``megatron_patch.harness`` is the harness's Megatron framework.

The names below are imported on first use, so importing this package (or
``megatron_patch.model`` for ``DISPATCHERS``) does not import Megatron-Core.
"""

from __future__ import annotations

from moebalance.lazy import lazy_exports

# public name -> the module that defines it (relative to this package, or absolute)
_EXPORTS = {
    "DISPATCHERS": ".model",
    "LOAD_SCOPES": "moebalance.runner",
    "BalancedRouter": ".routers",
    "apply_cpu_shims": ".cpu_shims",
    "cpu_shims_applied": ".cpu_shims",
    "gate_config": ".routers",
    "make_router_class": ".routers",
    "moe_layers": ".inject",
    "needs_dynamic_capacity": ".routers",
    "prepare_config": ".routers",
    "set_decode": ".inject",
    "swap_routers": ".inject",
    "with_router": ".inject",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
