"""torch.compile(fullgraph=True) routes exactly as eager mode with inductor's default settings.

CPU inductor (torch 2.13) lets a ``torch.cat`` write its inputs' producers straight into the
cat's buffer (the inputs become views of it) and may reuse that buffer once the cat itself is
dead, while those views are still read: the water level's breakpoints were once such a cat of
the starting loads, and compiled LASER then routed up to a fifth of the tokens differently.
These tests compile the policies (each in this process, a few seconds) and compare decisions,
compiling first: a compiled call may come before any eager one.
"""

from __future__ import annotations

import pytest
import torch

from moebalance.config import RoutingContext
from moebalance.policies import get_policy
from moebalance.policies.laser_routing import laser_plan, noise, price_assign
from moebalance.workloads import generate_logits, get_preset

TOKENS = 256


@pytest.fixture
def case(monkeypatch):
    """Mixtral-like gate logits, and LASER's noise tables emptied: each test compiles before
    any eager call has drawn them (the tracer must not meet their lock)."""
    monkeypatch.setattr(noise, "_NOISE", {})
    preset = get_preset("mixtral")
    return preset.gate(), generate_logits(preset, TOKENS, preset.layers[0])


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True)


@pytest.mark.slow
def test_laser_plan_then_price_assignment_compiles_to_the_eager_decisions(case):
    """The smallest graph that showed the reuse: loads computed in the graph, the water level
    over them, then the loads read again by the price pass."""
    gate, logits = case
    params = get_policy("laser_fast").params()

    def chosen(logits):
        _, flexible, pool_idx, valid, load, _ = laser_plan(logits, gate, params, RoutingContext())
        return price_assign(pool_idx, None, flexible, load, gate.topk, params.price_rounds)

    with torch.no_grad():
        assert torch.equal(_compiled(chosen)(logits), chosen(logits))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["laser_fast", "token_drop", "expanded_drop"])
def test_policy_compiles_fullgraph_to_the_eager_decisions(case, name):
    gate, logits = case
    policy = get_policy(name)
    params, ctx = policy.params(), RoutingContext()
    with torch.no_grad():
        eager = policy.fn(logits, gate, params, ctx)
        compiled = _compiled(policy.fn)(logits, gate, params, ctx)
    assert torch.equal(compiled.routing_map, eager.routing_map)
    torch.testing.assert_close(compiled.probs, eager.probs)
