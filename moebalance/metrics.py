"""Load-balance metrics. Loads are token counts; tensors may live on any device.

Definitions (L_e = tokens routed to expert e, T tokens, k experts per token):
- imbalance ratio  = max_e L_e / mean_e L_e (1 = perfect balance).
- max violation MV = max_e L_e / mean_e L_e - 1 (MaxVio of arXiv 2408.15664; LASER's metric).
- I_agg           = mean over (layer, batch) of max_e L_e / mean_e L_e (LASER's aggregate).
- dropped fraction = top-k assignments removed / (T * k).
"""

from __future__ import annotations

import torch

from .routing import Routing

__all__ = [
    "imbalance_ratio",
    "max_violation",
    "aggregated_imbalance",
    "dropped_fraction",
]


def imbalance_ratio(load: torch.Tensor) -> torch.Tensor:
    """[..., E] -> [...] float: max / mean load (nan when there is no load)."""
    load = load.double()
    return load.max(dim=-1)[0] / load.mean(dim=-1)


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """[..., E] -> [...] float: max / mean - 1."""
    return imbalance_ratio(load) - 1


def aggregated_imbalance(loads: torch.Tensor) -> torch.Tensor:
    """[N, E] loads of N (layer, batch) pairs -> 0-dim float I_agg = mean of max/mean."""
    return imbalance_ratio(loads).mean()


def dropped_fraction(routing: Routing, topk: int) -> torch.Tensor:
    """0-dim float: share of the T * k top-k assignments the policy removed."""
    total = routing.num_tokens * topk
    if routing.num_dropped is None or total == 0:
        return torch.zeros((), dtype=torch.float64)
    return routing.num_dropped.double() / total
