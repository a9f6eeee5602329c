"""Vanilla top-k against Megatron-Core's own ``topk_routing_with_score_function``: bit-identical
probs and routing map for every gate setting, dtype and autograd mode.

Needs megatron-core (skipped whole without it); everything else about the policies is tested
without any framework (test_policies.py, test_laser.py, test_capacity.py).
"""

from __future__ import annotations

import pytest
import torch
from routing_cases import GATES, gate_id, logits_for

from moebalance import GateConfig, RoutingContext, route

megatron_moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")


@pytest.mark.parametrize("spec", GATES, ids=gate_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
def test_topk_is_bit_identical_to_megatron(spec, dtype, grad):
    spec = dict(spec)
    use_bias = spec.pop("bias", False)
    E, k = 32, 4
    gate = GateConfig(num_experts=E, topk=k, **spec)
    for seed in range(3):
        logits = logits_for(300, E, seed, dtype=dtype)
        bias = torch.randn(E, generator=torch.Generator().manual_seed(99)) * 0.1 if use_bias else None
        with torch.set_grad_enabled(grad):
            want_p, want_m = megatron_moe_utils.topk_routing_with_score_function(
                logits,
                k,
                use_pre_softmax=gate.pre_softmax,
                num_groups=gate.num_groups,
                group_topk=gate.group_topk,
                scaling_factor=gate.scaling_factor,
                score_function=gate.score_function,
                expert_bias=bias,
            )
            got = route("topk", logits, gate, ctx=RoutingContext(expert_bias=bias))
        assert got.probs.dtype == want_p.dtype
        assert torch.equal(got.probs, want_p)
        assert torch.equal(got.routing_map, want_m)
