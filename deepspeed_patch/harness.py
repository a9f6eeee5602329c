"""What ``scripts/infer.py`` needs from DeepSpeed, behind the same names as
``megatron_patch.harness`` so one generation loop serves both frameworks: process groups (the
accelerator's backend), the model (``deepspeed_patch.model``: the Megatron model's weights),
instrumentation, gate swapping, the decode flag and the KV-cache context."""

from __future__ import annotations

from typing import Any, Optional

from moebalance.config import ConfigError

from .install import set_decode
from .instrument import instrument
from .model import InferenceContext, destroy_distributed, init_distributed, swap_gates
from .model import build_model as _build_model

__all__ = [
    "DISPATCHER",
    "InferenceContext",
    "build_model",
    "destroy_distributed",
    "init_distributed",
    "instrument",
    "set_decode",
    "swap_router",
]

DISPATCHER = "alltoall"  # DeepSpeed's MOELayer: all-to-all of the padded [E, C, M] buffer


def build_model(
    cfg,
    setup,
    *,
    router: str,
    router_params: Any,
    load_scope: str,
    dispatcher: str,
    checkpoint: Optional[str],
):
    """``deepspeed_patch.model.build_model`` at the EP size of ``setup``, on its device."""
    if dispatcher != DISPATCHER:
        raise ConfigError(f"DeepSpeed's MoE layer has one dispatcher, {DISPATCHER!r}")
    return _build_model(
        cfg,
        ep_size=setup.ep_size,
        router=router,
        router_params=router_params,
        load_scope=load_scope,
        checkpoint=checkpoint,
        device=setup.device,
    )


def swap_router(model, router: str, params: Any, load_scope: str) -> int:
    """Swap a gate running ``router`` into every MoE layer (same ``wg``)."""
    return swap_gates(model, router, params, load_scope)
