"""Megatron-Core behind the harness's ``Framework`` interface (``moebalance.harness.framework``):
``FRAMEWORK`` starts Megatron's process groups, builds the GPT-MoE (``megatron_patch.model``),
swaps routers, sets the decode flag, makes the static KV cache and instruments the MoE layers.
Megatron is imported only when a method is called, so the harness validates options without it.
"""

from __future__ import annotations

from typing import Any, Optional

from moebalance.harness.framework import AdapterFramework

from .model import DISPATCHERS  # the token dispatchers the harness runs

__all__ = ["DISPATCHERS", "FRAMEWORK", "MegatronFramework"]


class MegatronFramework(AdapterFramework):
    """The Megatron-Core adapter of the harness (see ``moebalance.harness.framework``)."""

    package = "megatron_patch"
    name = "megatron"
    dispatchers = DISPATCHERS

    def build_model(
        self, cfg, setup, *, router: str, router_params: Any, load_scope: str, dispatcher: str,
        checkpoint: Optional[str], placement: Optional[dict] = None, replicas: Any = None,
    ):
        from .model import build_model

        return build_model(
            cfg, ep_size=setup.ep_size, router=router, router_params=router_params,
            load_scope=load_scope, dispatcher=dispatcher, checkpoint=checkpoint,
            placement=placement, replicas=replicas,
        )

    def swap_router(self, model, router: str, params: Any, load_scope: str) -> int:
        from .inject import moe_layers, swap_routers
        from .routers import make_router_class

        old = next(moe_layers(model)).router
        cls = make_router_class(
            router, params, load_scope=load_scope, placement=getattr(model, "placement", None),
            replicas=old.runner.replicas,
        )
        return swap_routers(model, cls)

    def set_decode(self, model, decode: bool) -> int:
        from .inject import set_decode

        return set_decode(model, decode)

    def inference_context(self, max_batch: int, max_sequence_length: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        return StaticInferenceContext(max_batch, max_sequence_length)


FRAMEWORK = MegatronFramework()
