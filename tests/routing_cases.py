"""Inputs shared by the policy tests: gate logits, the gate settings, hypothesis settings.

Imported as ``from routing_cases import ...`` (pytest puts ``tests/`` on sys.path). Neither
megatron-core nor DeepSpeed: the framework-free tests must run without them.
"""

from __future__ import annotations

import os

import torch
from hypothesis import settings

__all__ = ["SETTINGS", "GATES", "gate_id", "logits_for"]

#: hypothesis settings of the property tests; HYP_EXAMPLES lowers the examples for quick runs
SETTINGS = settings(max_examples=int(os.environ.get("HYP_EXAMPLES", 40)), deadline=None)


def logits_for(T: int, E: int, seed: int, skew: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """[T, E] gate logits: standard normal plus a ramp of ``skew`` over the experts (popular
    experts at the end), deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    bias = torch.linspace(0, skew, E)
    return (torch.randn(T, E, generator=g) + bias).to(dtype)


# the gate settings every policy is checked under (``bias``: a ``RoutingContext.expert_bias``)
GATES = [
    dict(score_function="softmax"),
    dict(score_function="softmax", pre_softmax=True),
    dict(score_function="softmax", scaling_factor=2.5),
    dict(score_function="sigmoid"),
    dict(score_function="sigmoid", bias=True),
    dict(score_function="sqrtsoftplus", bias=True, scaling_factor=1.5),
    dict(score_function="softmax", num_groups=4, group_topk=2),
    dict(score_function="sigmoid", num_groups=8, group_topk=4, bias=True, scaling_factor=2.0),
]


def gate_id(spec: dict) -> str:
    """A test id for one entry of ``GATES``."""
    return "-".join(f"{k}={v}" for k, v in spec.items())
