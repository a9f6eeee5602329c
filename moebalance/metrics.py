"""Load-balance metrics. Loads are token counts; tensors may live on any device.

Definitions (L_e = tokens routed to expert e, T tokens, k experts per token, EP ranks):
- imbalance ratio  = max_e L_e / mean_e L_e (1 = perfect balance).
- max violation MV = max_e L_e / mean_e L_e - 1 (MaxVio of arXiv 2408.15664; LASER's metric).
- I_agg           = mean over (layer, batch) of max_e L_e / mean_e L_e (LASER's aggregate).
- LIS             = E * max_e L_e / (T * k) (Replicate-and-Quantize's load-imbalance score; uses
                    the intended T * k, so dropping tokens lowers it).
- balancedness    = mean / max of the per-EP-rank loads (vLLM / SGLang; 1 = balanced).
- dropped fraction = top-k assignments removed / (T * k).
"""

from __future__ import annotations

import torch

from .routing import Routing

__all__ = [
    "expert_load",
    "rank_load",
    "imbalance_ratio",
    "max_violation",
    "aggregated_imbalance",
    "load_imbalance_score",
    "balancedness",
    "dropped_fraction",
    "summarize",
]


def expert_load(routing_map: torch.Tensor) -> torch.Tensor:
    """[..., T, E] bool -> [..., E] int64 tokens per expert."""
    return routing_map.sum(dim=-2)


def rank_load(load: torch.Tensor, ep_size: int) -> torch.Tensor:
    """[..., E] -> [..., EP] tokens per EP rank (experts placed contiguously)."""
    E = load.shape[-1]
    if E % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the number of experts {E}")
    return load.reshape(*load.shape[:-1], ep_size, E // ep_size).sum(dim=-1)


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


def load_imbalance_score(load: torch.Tensor, num_tokens: int, topk: int) -> torch.Tensor:
    """[..., E] -> [...] float LIS = E * max_e L_e / (T * k)."""
    return load.shape[-1] * load.double().max(dim=-1)[0] / (num_tokens * topk)


def balancedness(load: torch.Tensor, ep_size: int) -> torch.Tensor:
    """[..., E] -> [...] float: mean / max tokens per EP rank."""
    per_rank = rank_load(load, ep_size).double()
    return per_rank.mean(dim=-1) / per_rank.max(dim=-1)[0]


def dropped_fraction(routing: Routing, topk: int) -> torch.Tensor:
    """0-dim float: share of the T * k top-k assignments the policy removed."""
    total = routing.num_tokens * topk
    if routing.num_dropped is None or total == 0:
        return torch.zeros((), dtype=torch.float64)
    return routing.num_dropped.double() / total


def summarize(routing: Routing, topk: int, ep_size: int = 1) -> dict[str, float]:
    """Plain-float summary of one routing decision (synchronises; for reports, not hot paths)."""
    load = routing.expert_load()
    return {
        "max_violation": float(max_violation(load)),
        "imbalance_ratio": float(imbalance_ratio(load)),
        "lis": float(load_imbalance_score(load, routing.num_tokens, topk)),
        "balancedness": float(balancedness(load, ep_size)),
        "dropped_fraction": float(dropped_fraction(routing, topk)),
        "experts_per_token": float(routing.experts_per_token().double().mean()),
    }
