"""moebalance.harness.rebalance.Rebalancer on one process (EP 1, every move a local copy): the
window keeps logical loads folded with the placement in force at each step, re-plans follow
the load, and the expert weights follow their experts."""

from __future__ import annotations

import types

import torch

from moebalance.harness.rebalance import Rebalancer
from moebalance.placement import plan_placement
from moebalance.telemetry import LayerStep

E, P = 8, 12


class _Framework:
    """The two adapter calls the rebalancer makes, over plain modules."""

    def __init__(self, plan):
        self.experts = {0: {}}
        for slot in range(P):
            module = torch.nn.Linear(2, 1, bias=False)
            module.weight.data.fill_(float(plan.phy2log[slot]))  # expert e's weights hold e
            self.experts[0][slot] = module
        self.placements = []

    def expert_modules(self, model):
        return self.experts

    def set_placement(self, model, layer, placement):
        self.placements.append(placement)


def _step(recorder, plan, hot: int):
    """One step whose tokens all went to expert ``hot`` (spread over its replicas)."""
    tokens = [10 if int(plan.phy2log[s]) == hot else 1 for s in range(P)]
    recorder.last_step = [LayerStep(rank=0, ep_rank=0, ep_group=0, step=0, phase="prefill",
                                    warmup=False, layer=0, local_experts=list(range(P)),
                                    tokens_per_expert=tokens)]


def test_rebalancer_folds_each_step_with_its_own_placement_and_moves_weights():
    first = plan_placement(torch.ones(E, dtype=torch.float64), P, 1)
    framework = _Framework(first)
    run = types.SimpleNamespace(
        config=types.SimpleNamespace(rebalance_every=2, rebalance_window=4),
        plans={0: first}, num_slots=P,
    )
    recorder = types.SimpleNamespace(last_step=[])
    rebalancer = Rebalancer(framework, None, run, types.SimpleNamespace(ep_rank=0), recorder)
    for _ in range(2):  # expert 3 is hot: the re-plan gives it the most replicas
        _step(recorder, rebalancer.plans[0], hot=3)
        rebalancer.after_step()
    second = rebalancer.plans[0]
    assert int(second.logcnt[3]) == int(second.logcnt.max()) > 1
    for _ in range(2):  # now expert 5, recorded under the second placement
        _step(recorder, second, hot=5)
        rebalancer.after_step()
    # every window entry holds the logical loads of its step, whatever the slots held then
    hot_of = [int(torch.argmax(w[0])) for w in rebalancer.window]
    assert hot_of == [3, 3, 5, 5]
    # each hot expert's load is 10 tokens per replica it had when the step ran
    window = list(rebalancer.window)
    assert [float(w[0][3]) for w in window[:2]] == [10.0 * int(first.logcnt[3])] * 2
    assert [float(w[0][5]) for w in window[2:]] == [10.0 * int(second.logcnt[5])] * 2
    # weights followed the moves: every slot holds the weights of the expert the plan says
    final = rebalancer.plans[0]
    assert len(rebalancer.events) == 2 and framework.placements[-1] is final
    for slot, module in framework.experts[0].items():
        assert float(module.weight[0, 0]) == float(final.phy2log[slot])
