"""``--rebalance-every N``: online rebalancing while serving, as vLLM's EPLB does.

Every N model steps (prefill and decode steps alike, warm-up included: the server is
serving), the logical expert loads of the last ``rebalance_window`` steps (each step's slot
loads folded with the placement in force then) are summed over the EP group (one
all-reduce), and each MoE layer is re-planned with the
same slots (``moebalance.placement.plan_placement``), aligned so that experts a rank keeps stay
in their slots (``moebalance.rebalance.align_placement``); the changed slots' weights move
between ranks (``move_expert_weights``: local copies or send / recv pairs, every rank in the
same order) and the routers switch to the new layout. Every rank runs it at the same step:
lockstep. Each event is recorded: step, slots moved, bytes sent and received by this rank, ms.
"""

from __future__ import annotations

import collections
import time

import torch
import torch.distributed as dist

from ..placement import plan_placement
from ..rebalance import align_placement, move_expert_weights, slot_moves
from ..telemetry import MoERecorder
from .config import Run
from .framework import Framework

__all__ = ["Rebalancer"]


class Rebalancer:
    """Call ``after_step()`` after every model step (``generate``'s ``on_step``)."""

    def __init__(self, framework: Framework, model: torch.nn.Module, run: Run, setup,
                 recorder: MoERecorder) -> None:
        self.framework, self.model, self.recorder = framework, model, recorder
        self.every, self.ep_rank = run.config.rebalance_every, setup.ep_rank
        self.plans = dict(run.plans)
        self.layers = sorted(self.plans)
        self.num_slots = run.num_slots
        self.window: collections.deque = collections.deque(maxlen=run.config.rebalance_window)
        self.steps = 0
        self.events: list[dict] = []

    def after_step(self) -> None:
        # logical loads, folded with the placement in force at this step (the window spans
        # earlier re-plans: a slot may have held another expert then)
        E = self.plans[self.layers[0]].num_experts
        loads = torch.zeros(len(self.layers), E, dtype=torch.float64)
        for row in self.recorder.last_step:
            i = self.layers.index(row.layer)
            experts = self.plans[row.layer].phy2log[row.local_experts]
            loads[i].index_add_(0, experts, torch.tensor(row.tokens_per_expert, dtype=torch.float64))
        self.window.append(loads)
        self.steps += 1
        if self.steps % self.every == 0:
            self.rebalance()

    def rebalance(self) -> None:
        start = time.perf_counter()
        logical_loads = torch.stack(list(self.window)).sum(dim=0)  # [layers, E]
        if dist.is_initialized():
            dist.all_reduce(logical_loads)
        experts = self.framework.expert_modules(self.model)
        moved, traffic = 0, {"sent_bytes": 0, "received_bytes": 0, "copied_bytes": 0}
        for i, layer in enumerate(self.layers):
            old = self.plans[layer]
            plan = plan_placement(logical_loads[i], self.num_slots, old.num_ranks)
            new = align_placement(old, plan)
            moves = slot_moves(old, new)
            if not moves:
                continue
            cost = move_expert_weights(experts[layer], moves, self.ep_rank)
            traffic = {k: traffic[k] + cost[k] for k in traffic}
            self.framework.set_placement(self.model, layer, new)
            self.plans[layer] = new
            moved += len(moves)
        self.events.append({
            "step": self.steps, "slots_moved": moved, **traffic,
            "ms": (time.perf_counter() - start) * 1e3,
        })
