"""The paper's sequential LASER assignment (arXiv 2510.03293): the reference the vectorised
``moebalance.policies.laser`` is tested and benchmarked against.

A Python loop over tokens, so it lives with the tests, not in the package. Imported by the
tests as ``from laser_reference import laser_reference`` (pytest puts ``tests/`` on sys.path)
and by ``scripts/bench_routers.py``, which times it as a row.
"""

from __future__ import annotations

import torch

from moebalance.config import GateConfig, LaserParams, RoutingContext
from moebalance.policies.laser_routing import finish_routing, laser_plan
from moebalance.routing import Routing

__all__ = ["laser_reference"]


def laser_reference(
    logits: torch.Tensor,
    gate: GateConfig,
    params: LaserParams | None = None,
    ctx: RoutingContext | None = None,
) -> Routing:
    """The paper's sequential greedy, one token at a time: slow, for tests and benchmarks only.

    Flexible tokens in order each take the k least-loaded valid candidates (ties: better score,
    i.e. earlier in the pool), incrementing loads as they go.
    """
    ctx = ctx or RoutingContext()
    params = (params or LaserParams()).for_layer(ctx.layer)
    k = gate.topk
    vanilla_idx, flexible, pool_idx, valid, load, dist = laser_plan(logits, gate, params, ctx)
    load = load.tolist()
    pools, valids, flex = pool_idx.tolist(), valid.tolist(), flexible.tolist()
    chosen_idx = vanilla_idx.clone()
    for t in range(len(pools)):
        if not flex[t]:
            continue
        cands = [(load[e], j, e) for j, e in enumerate(pools[t]) if valids[t][j]]
        picked = sorted(cands)[:k]
        for _, _, e in picked:
            load[e] += 1
        in_pool_order = sorted(picked, key=lambda x: x[1])
        chosen_idx[t] = torch.tensor([e for _, _, e in in_pool_order])
    return finish_routing(logits, gate, vanilla_idx, flexible, chosen_idx, dist)
