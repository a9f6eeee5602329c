"""Attach a ``moebalance.telemetry.MoERecorder`` to every MoELayer of a built Megatron-Core model.

Nothing in Megatron is forked or subclassed: ``instrument`` shadows a few bound methods on each
MoELayer *instance* (``MoELayer.forward`` calls them through ``self``), and ``remove`` restores
them. The seams, in megatron-core 0.19.2 ``transformer/moe/moe_layer.py``
(``forward`` -> ``custom_forward``: route -> preprocess -> dispatch -> routed_experts_compute ->
combine -> postprocess):

- ``router`` = ``layer.route`` (gate linear + the routing policy). Its output routing map gives
  the assignments; a ``BalancedRouter``'s ``last_routing`` gives the valid token count and
  ``Routing.num_dropped`` (a stock router: all rows, no drops). Read from ``layer.router`` at
  each call, so a router swapped in later (``swap_routers``) is measured too.
- ``dispatch`` = ``layer.preprocess`` + ``layer.dispatch``: dispatch metadata (the alltoall
  dispatcher all-gathers tokens per expert here) and the token all-to-all / all-gather.
- ``experts`` = ``layer.routed_experts_compute``: local permutation, the local experts' MLPs
  and unpermutation, i.e. all work between the two collectives, proportional to the tokens
  this rank received. ``layer.experts.forward`` is wrapped only to read ``tokens_per_expert``.
- ``combine`` = ``layer.combine``: the return all-to-all / reduce-scatter. A rank with little
  expert work waits here for the slowest one.
Shared experts, the latent projections and ``postprocess`` are outside the four ranges.

On CPU the gloo collectives are synchronous: communication ranges are wall time, compute ranges
the model thread's CPU time (see ``moebalance.telemetry``); on GPU the recorder times with CUDA events on
the current stream.
"""

from __future__ import annotations

import torch

from moebalance.telemetry import Instrumentation, MoERecorder, shadow_method

from .inject import moe_layers

__all__ = ["Instrumentation", "instrument"]


def _timed(recorder: MoERecorder, range_name: str, layer: int):
    def factory(original):
        def wrapper(*args, **kwargs):
            with recorder.range(range_name, layer):
                return original(*args, **kwargs)

        return wrapper

    return factory


def instrument(model: torch.nn.Module, recorder: MoERecorder) -> Instrumentation:
    """Record every MoELayer of ``model`` into ``recorder`` (layer ids: 0-based decoder layer
    index, ``layer_number - 1``). Returns a handle whose ``remove()`` undoes it. Raises
    ValueError when the model has no MoE layer."""
    handle = Instrumentation(recorder)
    for moe in moe_layers(model):
        layer = moe.layer_number - 1
        handle.layers.append(layer)

        def route_factory(original, moe=moe, layer=layer):
            def route(hidden_states, padding_mask=None):
                router = moe.router
                if hasattr(router, "last_routing"):
                    router.last_routing = None
                with recorder.range("router", layer):
                    probs, routing_map = original(hidden_states, padding_mask)
                decision = getattr(router, "last_routing", None)
                if decision is None:  # a stock router: every row routed, nothing dropped
                    recorder.add_routing(layer, routing_map.shape[0], routing_map.sum(), 0)
                else:
                    dropped = decision.num_dropped if decision.num_dropped is not None else 0
                    recorder.add_routing(layer, decision.num_tokens, routing_map.sum(), dropped)
                return probs, routing_map

            return route

        def experts_forward_factory(original, moe=moe, layer=layer):
            def forward(dispatched_input, tokens_per_expert, *args, **kwargs):
                recorder.add_tokens_per_expert(layer, tokens_per_expert, moe.local_expert_indices)
                return original(dispatched_input, tokens_per_expert, *args, **kwargs)

            return forward

        shadow_method(moe, "route", route_factory, handle._restore)
        shadow_method(moe, "preprocess", _timed(recorder, "dispatch", layer), handle._restore)
        shadow_method(moe, "dispatch", _timed(recorder, "dispatch", layer), handle._restore)
        shadow_method(
            moe, "routed_experts_compute", _timed(recorder, "experts", layer), handle._restore
        )
        shadow_method(moe, "combine", _timed(recorder, "combine", layer), handle._restore)
        shadow_method(moe.experts, "forward", experts_forward_factory, handle._restore)
    if not handle.layers:
        raise ValueError(f"no MoELayer found in {type(model).__name__}")
    return handle
