"""DeepSpeed behind the harness's ``Framework`` interface (``moebalance.harness.framework``):
``FRAMEWORK`` starts DeepSpeed's process group (the accelerator's backend), builds the GPT-MoE
with DeepSpeed ``MoE`` layers (``deepspeed_patch.model``: the same architecture, canonical
checkpoints and deterministic initialisation as the Megatron model), swaps gates, sets the
decode flag, makes the KV cache and instruments the MoE layers.
DeepSpeed is imported only when a method is called; Megatron never is.
"""

from __future__ import annotations

from typing import Any, Optional

from moebalance.harness.framework import AdapterFramework

__all__ = ["DISPATCHERS", "FRAMEWORK", "DeepSpeedFramework"]

DISPATCHERS = ("alltoall",)  # DeepSpeed's MOELayer: all-to-all of the padded [E, C, M] buffer


class DeepSpeedFramework(AdapterFramework):
    """The DeepSpeed adapter of the harness (see ``moebalance.harness.framework``)."""

    package = "deepspeed_patch"
    name = "deepspeed"
    dispatchers = DISPATCHERS

    def build_model(
        self, cfg, setup, *, router: str, router_params: Any, load_scope: str, dispatcher: str,
        checkpoint: Optional[str], placement: Optional[dict] = None, replicas: Any = None,
    ):
        from moebalance.config import ConfigError

        from .model import build_model

        if dispatcher not in DISPATCHERS:
            raise ConfigError(f"DeepSpeed's MoE layer has one dispatcher, {DISPATCHERS[0]!r}")
        return build_model(
            cfg, ep_size=setup.ep_size, router=router, router_params=router_params,
            load_scope=load_scope, checkpoint=checkpoint, device=setup.device,
            placement=placement, replicas=replicas,
        )

    def swap_router(self, model, router: str, params: Any, load_scope: str) -> int:
        from .model import swap_gates

        return swap_gates(model, router, params, load_scope)

    def set_decode(self, model, decode: bool) -> int:
        from .install import set_decode

        return set_decode(model, decode)

    def inference_context(self, max_batch: int, max_sequence_length: int):
        from .model import InferenceContext

        return InferenceContext(max_batch, max_sequence_length)


FRAMEWORK = DeepSpeedFramework()
