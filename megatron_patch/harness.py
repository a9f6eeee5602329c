"""What ``scripts/infer.py`` needs from Megatron-Core, behind the same names as
``deepspeed_patch.harness`` so one generation loop serves both frameworks: process groups, the
model, instrumentation, router swapping, the decode flag and the KV-cache context."""

from __future__ import annotations

from typing import Any, Optional

from megatron.core.inference.contexts import StaticInferenceContext as InferenceContext

from .inject import set_decode, swap_routers
from .instrument import instrument
from .model import ParallelSetup, destroy_distributed, init_distributed
from .model import build_model as _build_model
from .routers import make_router_class

__all__ = [
    "InferenceContext",
    "build_model",
    "destroy_distributed",
    "init_distributed",
    "instrument",
    "set_decode",
    "swap_router",
]


def build_model(
    cfg,
    setup: ParallelSetup,
    *,
    router: str,
    router_params: Any,
    load_scope: str,
    dispatcher: str,
    checkpoint: Optional[str],
):
    """``megatron_patch.model.build_model`` at the EP size of ``setup``."""
    return _build_model(
        cfg,
        ep_size=setup.ep_size,
        router=router,
        router_params=router_params,
        load_scope=load_scope,
        dispatcher=dispatcher,
        checkpoint=checkpoint,
    )


def swap_router(model, router: str, params: Any, load_scope: str) -> int:
    """Swap ``router`` into every MoE layer of the built model (state copied)."""
    return swap_routers(model, make_router_class(router, params, load_scope=load_scope))
