"""moebalance.runner: the router runner both adapters hold, without a framework (world 1).

- ``route`` with a valid-row mask gives the policy's decision on the valid rows, scattered
  back: invalid rows routed nowhere, or vanilla top-k with ``invalid_rows_topk``; capacity and
  dropped count are the policy's; ``last_routing`` is the valid-row decision;
- the context carries the decode flag, seed, layer and expert bias; decode makes a
  prefill-only policy route vanilla;
- "global" load scope at EP 1 is the local one (no collective); bad scopes and parameters are
  ConfigErrors.
"""

from __future__ import annotations

import pytest
import torch

from moebalance import ConfigError, GateConfig, LaserParams, route
from moebalance.policies import get_policy
from moebalance.runner import LOAD_SCOPES, RouterRunner, check_load_scope, resolve_params

GATE = GateConfig(num_experts=8, topk=2)


def _logits(tokens=40, seed=0):
    return torch.randn(tokens, 8, generator=torch.Generator().manual_seed(seed))


POLICY_CASES = [
    ("topk", None),
    ("laser", None),
    ("token_drop", {"capacity_factor": 1.0}),
    ("expanded_drop", {"capacity_factor": 1.0}),
]


@pytest.mark.parametrize("name, params", POLICY_CASES)
@pytest.mark.parametrize("invalid_rows_topk", [False, True])
def test_valid_rows_see_the_policy_and_invalid_rows_are_filled(name, params, invalid_rows_topk):
    runner = RouterRunner(name, params, GATE)
    logits = _logits()
    valid = torch.ones(40, dtype=torch.bool)
    valid[::3] = False
    ctx = runner.context(0, 1, layer=0)
    got = runner.route(logits, ctx, None, valid, invalid_rows_topk=invalid_rows_topk)
    want = route(name, logits[valid], GATE, runner.params, ctx)
    assert torch.equal(got.routing_map[valid], want.routing_map)
    assert torch.equal(got.probs[valid], want.probs)
    assert got.capacity == want.capacity
    assert torch.equal(torch.as_tensor(got.num_dropped), torch.as_tensor(want.num_dropped))
    assert runner.last_routing.num_tokens == int(valid.sum())  # the valid rows' decision
    if invalid_rows_topk:
        vanilla = route("topk", logits, GATE)
        assert torch.equal(got.routing_map[~valid], vanilla.routing_map[~valid])
        assert torch.equal(got.probs[~valid], vanilla.probs[~valid])
    else:
        assert not got.routing_map[~valid].any() and not got.probs[~valid].any()


def test_without_a_mask_route_is_the_policy():
    runner = RouterRunner("laser", None, GATE)
    logits = _logits(seed=1)
    ctx = runner.context(0, 1)
    got = runner.route(logits, ctx, None)
    want = route("laser", logits, GATE, LaserParams(), ctx)
    assert torch.equal(got.routing_map, want.routing_map) and torch.equal(got.probs, want.probs)
    assert runner.last_routing is got


def test_context_carries_the_runner_state_and_decode_routes_vanilla():
    runner = RouterRunner("token_drop", {"capacity_factor": 0.5}, GATE)
    runner.seed = 7
    bias = torch.zeros(8)
    ctx = runner.context(1, 2, layer=3, expert_bias=bias)
    assert (ctx.ep_rank, ctx.ep_size, ctx.layer, ctx.seed, ctx.decode) == (1, 2, 3, 7, False)
    assert ctx.expert_bias is bias
    logits = _logits(seed=2)
    prefill = runner.route(logits, runner.context(0, 1), None)
    assert int(prefill.num_dropped) > 0  # capacity 0.5 drops
    runner.decode = True
    decode = runner.route(logits, runner.context(0, 1), None)
    assert torch.equal(decode.routing_map, route("topk", logits, GATE).routing_map)


def test_global_scope_at_ep_1_is_local():
    logits = _logits(seed=3)
    decisions = {}
    for scope in LOAD_SCOPES:
        runner = RouterRunner("laser", None, GATE, load_scope=scope)
        decisions[scope] = runner.route(logits, runner.context(0, 1), None).routing_map
    assert torch.equal(decisions["global"], decisions["local"])


def test_errors_are_config_errors():
    assert LOAD_SCOPES == ("local", "global")
    with pytest.raises(ConfigError, match="load_scope must be one of"):
        RouterRunner("laser", None, GATE, load_scope="world")
    with pytest.raises(ConfigError, match="needs a policy that reads expert loads"):
        check_load_scope("global", "token_drop")
    with pytest.raises(ConfigError, match="must be LaserParams or a dict"):
        resolve_params(get_policy("laser"), 3)
    with pytest.raises(ConfigError, match="unknown router"):
        RouterRunner("bogus", None, GATE)
    assert resolve_params(get_policy("laser"), {"pool_size": 3}).pool_size == 3
