"""Load-balance metrics (``moebalance.metrics``) on loads worked out by hand."""

from __future__ import annotations

import math

import torch

from moebalance.metrics import (
    aggregated_imbalance,
    dropped_fraction,
    imbalance_ratio,
    max_violation,
)
from moebalance.routing import Routing


def test_imbalance_metrics_on_known_loads():
    loads = torch.tensor([[4, 2, 2, 0], [2, 2, 2, 2]])  # two (layer, batch) pairs, E = 4
    assert imbalance_ratio(loads).tolist() == [2.0, 1.0]
    assert max_violation(loads).tolist() == [1.0, 0.0]
    assert float(aggregated_imbalance(loads)) == 1.5
    assert math.isnan(float(imbalance_ratio(torch.zeros(4))))  # no load: undefined


def test_dropped_fraction_counts_removed_topk_assignments():
    routing_map = torch.tensor([[True, False, True], [False, False, True]])  # T = 2
    probs = routing_map.float()
    dropped = Routing(probs, routing_map, num_dropped=torch.tensor(1))
    assert float(dropped_fraction(dropped, topk=2)) == 0.25  # 1 of T k = 4
    assert float(dropped_fraction(Routing(probs, routing_map), topk=2)) == 0.0
    no_tokens = torch.zeros(0, 3, dtype=torch.bool)
    empty = Routing(no_tokens.float(), no_tokens, num_dropped=torch.tensor(0))
    assert float(dropped_fraction(empty, topk=2)) == 0.0
