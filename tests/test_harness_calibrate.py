"""The calibration pass's expert importance (``moebalance.harness.calibrate``) against a dense
float64 reference, and a plan file's stored importance checked when a run resolves."""

from __future__ import annotations

import json

import pytest
import torch

from moebalance.config import ConfigError
from moebalance.harness.calibrate import _input_square_sums
from moebalance.harness.config import importance_from_provenance
from moebalance.placement import plan_placement
from moebalance.quantize import expert_importance


class _Expert(torch.nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.linear_fc1 = torch.nn.Linear(hidden, ffn, bias=False)

    def forward(self, x):
        return self.linear_fc1(x)


def test_input_norm_hooks_match_the_dense_reference():
    torch.manual_seed(0)
    experts = {0: {0: _Expert(6, 4), 1: _Expert(6, 4)}, 3: {2: _Expert(6, 4)}}
    batches = {(0, 0): [torch.randn(5, 6), torch.randn(2, 3, 6)], (3, 2): [torch.randn(7, 6)]}
    sums, hooks = _input_square_sums(experts)
    for (layer, slot), xs in batches.items():
        for x in xs:
            experts[layer][slot](x)
    for hook in hooks:
        hook.remove()
    experts[0][0](torch.randn(4, 6))  # after removal: not counted
    assert set(sums) == {(0, 0), (3, 2)}  # expert (0, 1) received nothing
    for key, xs in batches.items():
        x = torch.cat([t.reshape(-1, 6) for t in xs]).double()
        norms = x.norm(dim=0)
        torch.testing.assert_close(sums[key].sqrt(), norms)
        w = experts[key[0]][key[1]].linear_fc1.weight.detach().double()
        reference = float((w.abs() * norms[None, :]).sum())
        assert expert_importance([w.float()], sums[key].sqrt()) == pytest.approx(reference, rel=1e-5)


def test_plan_importance_is_checked():
    plans = {0: plan_placement(torch.tensor([5.0, 1, 1, 1]), 6, 2),
             2: plan_placement(torch.tensor([1.0, 1, 1, 5]), 6, 2)}
    assert importance_from_provenance({}, plans, "p") is None
    good = {"importance": {"0": [1.0, 2.0, 0.0, 3], "2": [0.5, 0.5, 0.5, 0.5]}}
    got = importance_from_provenance(json.loads(json.dumps(good)), plans, "p")
    assert got[0].tolist() == [1.0, 2.0, 0.0, 3.0] and got[2].dtype == torch.float64
    for bad in ({"0": [1.0, 2.0, 0.0, 3]},                      # a layer missing
                {"0": [1.0, 2.0, 0.0], "2": [1.0] * 4},         # E values
                {"0": [1.0, -2.0, 0.0, 3], "2": [1.0] * 4},     # negative
                {"0": [1.0, "x", 0.0, 3], "2": [1.0] * 4},      # not a number
                {"0": [1.0, float("nan"), 0.0, 3], "2": [1.0] * 4},
                [1.0, 2.0]):
        with pytest.raises(ConfigError, match="^p: provenance 'importance' must map every planned layer to 4"):
            importance_from_provenance({"importance": bad}, plans, "p")
