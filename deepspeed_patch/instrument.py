"""Per-layer, per-rank telemetry of DeepSpeed ``MoE`` layers into a ``moebalance.telemetry``
recorder: the same ranges, NVTX names and ``LayerStep`` records as ``megatron_patch.instrument``.

``MOELayer.forward`` (deepspeed 0.19.8, ``sharded_moe.py``) runs gate -> sparse encode into
the [E, C, M] buffer -> first ``_AllToAll`` -> ``experts`` -> second ``_AllToAll`` -> sparse
decode. Its seams are the gate and the experts (both submodules), so the four ranges are
chained at those seams without copying DeepSpeed's code:

- ``router`` = the gate's forward (gate linear + the routing policy + the capacity all-reduce);
- ``dispatch`` = from the gate's return to the experts' call: slot computation, the encode
  into the padded buffer and the first all-to-all;
- ``experts`` = the local experts' forward over the [EP, local, C, M] buffer (DeepSpeed computes
  every capacity slot, filled or not: work grows with C, which is agreed across the EP group);
- ``combine`` = from the experts' return to the end of ``MOELayer.forward``: the second
  all-to-all and the weighted decode.

Loads: tokens received per local expert = the gate's ``exp_counts`` (tokens each rank sends to
each expert) summed over the EP group (one all-reduce of E integers per layer call, outside
the timed ranges); tokens routed = used tokens (padding excluded), assignments and dropped
top-k routes from the gate's ``last_routing``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from moebalance.telemetry import Instrumentation, MoERecorder, shadow_method

__all__ = ["Instrumentation", "instrument"]


class _Chain:
    """The range open between two seams of one layer call (dispatch, then combine)."""

    def __init__(self, recorder: MoERecorder, layer: int) -> None:
        self.recorder, self.layer = recorder, layer
        self.open: Optional[Any] = None

    def start(self, name: str) -> None:
        self.close()
        self.open = self.recorder.range(name, self.layer)
        self.open.__enter__()

    def close(self) -> None:
        if self.open is not None:
            ctx, self.open = self.open, None
            ctx.__exit__(None, None, None)


def _received_per_local_expert(moe_layer, exp_counts: torch.Tensor) -> torch.Tensor:
    """[local] tokens this rank's experts receive: ``exp_counts`` [E] summed over the EP group."""
    counts = exp_counts.detach().to(torch.int64).clone()
    group = moe_layer.ep_group
    ep_rank = 0
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
        ep_rank = dist.get_rank(group)
    local = moe_layer.num_local_experts
    return counts[ep_rank * local : (ep_rank + 1) * local]


def instrument(model: torch.nn.Module, recorder: MoERecorder) -> Instrumentation:
    """Record every DeepSpeed MoE layer of ``model`` (``deepspeed_patch.model.MoEBlock``: layer
    id = its 0-based decoder index) into ``recorder``. The gate is read from the layer at each
    call, so a gate swapped in later (``swap_gates``) is measured too. Returns a handle whose
    ``remove()`` undoes it; raises ValueError when the model has no MoE layer."""
    from .model import MoEBlock

    handle = Instrumentation(recorder)
    for block in model.modules():
        if not isinstance(block, MoEBlock):
            continue
        layer, moe_layer = block.layer, block.moe.deepspeed_moe
        handle.layers.append(layer)
        chain = _Chain(recorder, layer)

        def layer_factory(original, moe_layer=moe_layer, layer=layer, chain=chain):
            def forward(*inputs, **kwargs):
                gate = moe_layer.gate
                gate_forward = gate.forward

                def timed_gate(x, used_token=None, *args, **kw):
                    with recorder.range("router", layer):
                        out = gate_forward(x, used_token, *args, **kw)
                    decision = getattr(gate, "last_routing", None)
                    tokens = x.shape[0] if used_token is None else (used_token != 0).sum()
                    if decision is None:  # a stock gate: nothing dropped
                        recorder.add_routing(layer, tokens, out[-1].sum(), 0)
                    else:
                        dropped = decision.num_dropped if decision.num_dropped is not None else 0
                        recorder.add_routing(layer, tokens, decision.routing_map.sum(), dropped)
                    # C of the [E, C, M] buffer: the 7-tuple carries it, the 4-tuple's shape does
                    recorder.add_capacity(layer, out[1] if len(out) == 7 else out[1].shape[-1])
                    recorder.add_tokens_per_expert(
                        layer,
                        _received_per_local_expert(moe_layer, out[-1]),
                        range(
                            _ep_rank(moe_layer) * moe_layer.num_local_experts,
                            (_ep_rank(moe_layer) + 1) * moe_layer.num_local_experts,
                        ),
                    )
                    chain.start("dispatch")
                    return out

                object.__setattr__(gate, "forward", timed_gate)
                try:
                    return original(*inputs, **kwargs)
                finally:
                    object.__delattr__(gate, "forward")
                    chain.close()

            return forward

        def experts_factory(original, layer=layer, chain=chain):
            def forward(*args, **kwargs):
                chain.close()
                with recorder.range("experts", layer):
                    out = original(*args, **kwargs)
                chain.start("combine")
                return out

            return forward

        shadow_method(moe_layer, "forward", layer_factory, handle._restore)
        shadow_method(moe_layer.experts, "forward", experts_factory, handle._restore)
    if not handle.layers:
        raise ValueError(f"no DeepSpeed MoE layer found in {type(model).__name__}")
    return handle


def _ep_rank(moe_layer) -> int:
    group = moe_layer.ep_group
    return dist.get_rank(group) if group is not None else 0
