"""``--memory-budget same``: with replicas, store the least important experts int8 so that each
rank's expert bytes do not exceed the unreplicated model's, counted from the real tensors.

Importance is Wanda-style (``moebalance.quantize.expert_importance``): with the calibration
activations' input norms when the run has them (``Run.importance``: ``--replicate auto``, or a
plan file whose provenance carries them), else on the first-layer weights alone (unit input
norms), gathered once from the ranks that hold each expert. Every rank computes the same int8
plan.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..quantize import expert_importance, int8_plan_for_budget, int8_weight_bytes, module_weight_bytes
from ..placement import unreplicated_bytes_per_rank
from .config import Run
from .framework import Framework

__all__ = ["apply_memory_budget"]


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def apply_memory_budget(framework: Framework, model: torch.nn.Module, run: Run) -> dict:
    """Quantize the slots ``int8_plan_for_budget`` picks (collective: every rank calls it).
    Returns {"expert_bytes_per_rank_before": [...], "after": [...], "budget_per_rank",
    "int8_slots": {layer: [P] bools}, "importance": "activations" or "weights"} (bytes)."""
    experts = framework.expert_modules(model)
    before = framework.expert_bytes(model)
    E = run.model.num_experts
    local_scores, sizes = {}, None
    for layer, slots in experts.items():
        phy2log = run.plans[layer].phy2log
        for slot, module in slots.items():
            local_scores[(layer, int(phy2log[slot]))] = expert_importance([module.linear_fc1.weight])
            sizes = sizes or (module_weight_bytes(module), int8_weight_bytes(module))
    importance = run.importance
    if importance is None:  # weights only
        scores: dict = {}
        for part in _gather(local_scores):
            scores.update(part)
        importance = {
            layer: torch.tensor([scores[(layer, e)] for e in range(E)], dtype=torch.float64)
            for layer in run.plans
        }
    full, int8 = (torch.full((E,), float(b)) for b in sizes)
    int8_slots = int8_plan_for_budget(run.plans, importance, full, int8)
    framework.quantize_slots(model, int8_slots)
    after = framework.expert_bytes(model)
    per_rank = _gather((before, after))
    return {
        "expert_bytes_per_rank_before": [b for b, _ in per_rank],
        "expert_bytes_per_rank_after": [a for _, a in per_rank],
        "budget_per_rank": unreplicated_bytes_per_rank(full, run.ep) * len(run.plans),
        "int8_slots": {layer: mask.tolist() for layer, mask in int8_slots.items()},
        "importance": "weights" if run.importance is None else "activations",
    }
