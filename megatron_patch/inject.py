"""Put a router class into Megatron-Core layer specs, or into the MoE layers of a built model.

In megatron-core 0.19.2 a GPT layer spec is ``ModuleSpec(TransformerLayer,
submodules=TransformerLayerSubmodules(mlp=partial(MoELayer, submodules=MoESubmodules(...))))``
and ``MoELayer`` builds ``submodules.router(config=..., pg_collection=..., is_mtp_layer=...)``.
``with_router`` rewrites that ``MoESubmodules.router`` (with ``dataclasses.replace``, leaving
the input spec untouched); ``swap_routers`` replaces ``layer.router`` in a built model and
copies the gate's state (weight, bias, expert_bias), so checkpoints and outputs carry over.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection
from megatron.core.transformer.spec_utils import ModuleSpec

__all__ = ["with_router", "swap_routers", "moe_layers", "set_decode"]


def _is_moe_layer_cls(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, MoELayer)


def _replace_router(spec: Any, router_cls: Callable[..., Any], found: list[int]) -> Any:
    """A copy of ``spec`` with every MoESubmodules.router set to ``router_cls``."""
    if isinstance(spec, MoESubmodules):
        found[0] += 1
        return dataclasses.replace(spec, router=router_cls)
    if isinstance(spec, functools.partial):
        if "submodules" not in spec.keywords:
            return spec
        submodules = _replace_router(spec.keywords["submodules"], router_cls, found)
        keywords = {**spec.keywords, "submodules": submodules}
        return functools.partial(spec.func, *spec.args, **keywords)
    if isinstance(spec, ModuleSpec):
        submodules = _replace_router(spec.submodules, router_cls, found)
        return dataclasses.replace(spec, submodules=submodules)
    if isinstance(spec, (list, tuple)):
        return type(spec)(_replace_router(item, router_cls, found) for item in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        # TransformerLayerSubmodules, TransformerBlockSubmodules, ...: recurse into the fields.
        changes = {}
        for f in dataclasses.fields(spec):
            if not f.init:
                continue
            value = getattr(spec, f.name)
            new = _replace_router(value, router_cls, found)
            if new is not value:
                changes[f.name] = new
        return dataclasses.replace(spec, **changes) if changes else spec
    return spec


def with_router(layer_spec: Any, router_cls: Callable[..., Any]) -> Any:
    """A copy of ``layer_spec`` whose MoE layers build ``router_cls`` as their router.

    ``layer_spec``: a GPT layer ``ModuleSpec``, a block spec (``TransformerBlockSubmodules``
    with ``layer_specs``), a ``partial(MoELayer, submodules=MoESubmodules(...))``, a list of
    these, or an ``MoESubmodules``. Dense layers pass through unchanged. Raises ValueError
    when the spec holds no MoE layer.
    """
    found = [0]
    new_spec = _replace_router(layer_spec, router_cls, found)
    if not found[0]:
        raise ValueError(f"no MoESubmodules found in the spec {type(layer_spec).__name__}")
    return new_spec


def moe_layers(model: torch.nn.Module) -> Iterator[MoELayer]:
    """Every MoELayer in ``model`` (any wrapper depth)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            yield module


def _router_pg_collection(layer: MoELayer) -> ProcessGroupCollection:
    """The process groups the layer's router was built with (Router keeps tp/cp, the layer ep)."""
    old = layer.router
    return ProcessGroupCollection(
        tp=old.tp_group,
        cp=old.cp_group,
        tp_cp=old.tp_cp_group,
        tp_dp_cp=old.tp_dp_cp_group,
        ep=layer.ep_group,
    )


def swap_routers(model: torch.nn.Module, router_factory: Callable[..., Any]) -> int:
    """Replace the router of every MoELayer in ``model``; returns how many were replaced.

    ``router_factory(config=..., pg_collection=..., is_mtp_layer=...)`` builds the new router
    (a router class works). The old router's state dict is loaded into the new one (strict:
    same keys), the layer number, device, dtype and train/eval mode carry over, and the global
    RNG state is left as it was (building a router runs its init_method). Raises ValueError if
    the model has no MoE layer.
    """
    count = 0
    for layer in moe_layers(model):
        old = layer.router
        with torch.random.fork_rng(devices=[]):
            new = router_factory(
                config=old.config,
                pg_collection=_router_pg_collection(layer),
                is_mtp_layer=old.is_mtp_layer,
            )
        new.load_state_dict(old.state_dict(), strict=True)
        new.to(device=old.weight.device)
        if old.layer_number is not None:
            new.set_layer_number(old.layer_number)
        new.train(old.training)
        layer.router = new
        count += 1
    if not count:
        raise ValueError(f"no MoELayer found in {type(model).__name__}")
    return count


def set_decode(model: torch.nn.Module, decode: bool) -> int:
    """Set ``router.decode`` on every MoE router that has it (BalancedRouter); returns the count.

    Call with True before single-token decode steps and False before a prefill."""
    count = 0
    for layer in moe_layers(model):
        if hasattr(layer.router, "decode"):
            layer.router.decode = bool(decode)
            count += 1
    return count
