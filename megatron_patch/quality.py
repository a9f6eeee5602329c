"""Expert loads of a Megatron-Core GPT-MoE while it runs: ``record_expert_loads`` sums each MoE
layer's routing map over every forward inside a ``with`` block (``scripts/train_tiny.py``
reports them per domain beside the held-out quality of ``moebalance.harness.quality``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["record_expert_loads"]


@contextmanager
def record_expert_loads(model: torch.nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Yields {0-based layer: [E] float64 tokens routed to each expert}, summed over every
    forward inside the ``with`` (this rank's tokens; routing_map column sums)."""
    from .inject import moe_layers

    loads: dict[int, torch.Tensor] = {}
    handles = []
    for layer in moe_layers(model):
        index = layer.layer_number - 1

        def hook(module, args, output, index=index):
            routing_map = output[1]
            add = routing_map.reshape(-1, routing_map.shape[-1]).sum(dim=0).double().cpu()
            loads[index] = loads[index] + add if index in loads else add

        handles.append(layer.router.register_forward_hook(hook))
    try:
        yield loads
    finally:
        for h in handles:
            h.remove()
