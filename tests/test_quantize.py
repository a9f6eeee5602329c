"""moebalance.quantize: int8 weight-only round trip and its error bound, the on-the-fly
dequantization hooks, byte counts from the real tensors, Wanda importance and the memory-budget
plan (framework-free)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moebalance.config import ConfigError
from moebalance.placement import expert_bytes_per_rank, placement_from_ranks, plan_placement
from moebalance.quantize import (
    Int8Weight,
    dequantize_int8,
    expert_bytes,
    expert_importance,
    input_norms,
    int8_plan_for_budget,
    int8_weight_bytes,
    int8_weights,
    module_weight_bytes,
    quantize_expert_slots,
    quantize_int8,
    quantize_weights,
)


def _check_bound(w: torch.Tensor) -> None:
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == w.shape and scale.shape == (w.shape[0],)
    assert int(q.abs().max()) <= 127
    err = (w.double() - dequantize_int8(q, scale).double()).abs()
    # scale / 2 from rounding, plus float32 rounding of the product (relative 2^-24 of the row max)
    bound = scale.double()[:, None] / 2 * (1 + 1e-5) + 1e-300
    assert (err <= bound).all(), float((err - bound).max())


def test_round_trip_within_half_a_step_on_random_rows():
    gen = torch.Generator().manual_seed(0)
    for shape, spread in (((64, 128), 1.0), ((7, 3), 1e-4), ((32, 512), 30.0)):
        _check_bound(torch.randn(shape, generator=gen) * spread)


def test_round_trip_on_adversarial_rows():
    w = torch.zeros(5, 9)
    w[1] = torch.linspace(-1, 1, 9)
    w[2, 4] = 1e30  # one huge value: the others round to 0, still within scale / 2
    w[2, :4] = torch.tensor([1e-3, -2.0, 5.0, 7e3])
    w[3] = -torch.arange(1.0, 10.0)  # all negative: the largest magnitude maps to -127
    w[4, 0] = -3.0  # a negative maximum
    _check_bound(w)
    q, scale = quantize_int8(w)
    assert scale[0] == 0 and (q[0] == 0).all()  # a zero row stays exact, no division by zero
    assert (dequantize_int8(q, scale)[0] == 0).all()
    assert int(q[3, 8]) == -127 and int(q[4, 0]) == -127 and int(q[2, 4]) == 127
    assert (q[2, :3] == 0).all()
    # the largest magnitude of each row is exact up to float32 rounding
    assert torch.allclose(dequantize_int8(q, scale)[3, 8], torch.tensor(-9.0))


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(torch.tensor([[1.0, float("inf")]]))


def test_bfloat16_weights_dequantize_to_their_dtype():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    q, scale = quantize_int8(w)
    assert dequantize_int8(q, scale, torch.bfloat16).dtype == torch.bfloat16
    _check_bound(w.float())


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(12, 20, bias=False)
        self.linear_fc2 = nn.Linear(20, 12, bias=False)

    def forward(self, x):
        return self.linear_fc2(torch.nn.functional.gelu(self.linear_fc1(x)))


def _expert(seed: int = 0) -> _Expert:
    torch.manual_seed(seed)
    return _Expert()


def test_hooks_give_the_forward_the_exact_dequantized_weight_and_free_it_after():
    expert = _expert()
    full = {n: p.detach().clone() for n, p in expert.named_parameters()}
    seen = {}
    # a probe running after Int8Weight's pre-hook records what the forward sees
    expert.linear_fc1.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("fc1", m.weight.detach().clone()))
    attached = quantize_weights(expert)
    assert [w.name for w in attached] == ["weight", "weight"]
    for name in ("linear_fc1", "linear_fc2"):  # at rest: empty parameter, int8 + scales
        lin = getattr(expert, name)
        assert lin.weight.numel() == 0 and lin.weight.dtype == torch.float32
        assert lin.weight_int8.dtype == torch.int8 and lin.weight_scale.dtype == torch.float32
    x = torch.randn(5, 12)
    with torch.inference_mode():
        got = expert(x)
    deq = {n: dequantize_int8(*quantize_int8(full[n])) for n in full}
    assert torch.equal(seen["fc1"], deq["linear_fc1.weight"])
    hidden = torch.nn.functional.gelu(x @ deq["linear_fc1.weight"].T)
    want = hidden @ deq["linear_fc2.weight"].T
    assert torch.allclose(got, want, atol=1e-6)
    reference = _expert()  # the same weights, fake-quantized in place: bit-for-bit output
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(deq[n])
        assert torch.equal(expert(x), reference(x))  # outside inference mode too
    assert expert.linear_fc1.weight.numel() == 0 and expert.linear_fc2.weight.numel() == 0


def test_linear_output_error_within_the_analytic_bound():
    # y = W x: |y_i - y'_i| <= sum_j |W_ij - W'_ij| |x_j| <= scale_i / 2 * ||x||_1
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 256, generator=gen))
    x = torch.randn(32, 256, generator=gen)
    want = lin(x).detach()
    (handle,) = quantize_weights(lin, ["weight"])
    with torch.no_grad():
        got = lin(x)
    bound = handle.scale[None, :] / 2 * x.abs().sum(dim=1, keepdim=True)
    err = (got - want).abs()
    assert (err <= bound * (1 + 1e-4) + 1e-5).all()
    assert 0 < float(err.max()) < float(bound.max())


def test_weight_is_freed_when_the_forward_raises():
    expert = _expert()
    quantize_weights(expert, ["linear_fc1.weight"])
    with pytest.raises(RuntimeError):
        expert.linear_fc1(torch.randn(2, 7))  # wrong width
    assert expert.linear_fc1.weight.numel() == 0


def test_detach_restores_a_plain_module_with_the_dequantized_weight():
    expert = _expert()
    w = expert.linear_fc1.weight.detach().clone()
    (handle,) = quantize_weights(expert, ["linear_fc1.weight"])
    handle.detach()
    assert torch.equal(expert.linear_fc1.weight, dequantize_int8(*quantize_int8(w)))
    assert not hasattr(expert.linear_fc1, "weight_int8") and int8_weights(expert) == []
    Int8Weight(expert.linear_fc1)  # attachable again
    with pytest.raises(ValueError, match="already int8"):
        Int8Weight(expert.linear_fc1)


def test_buffers_follow_the_module_and_are_not_saved():
    expert = _expert()
    quantize_weights(expert)
    expert.to(torch.float64)  # .to() converts floating buffers: scales, and the (empty) weight
    assert expert.linear_fc1.weight_int8.dtype == torch.int8
    assert "linear_fc1.weight_int8" not in expert.state_dict()


def test_module_weight_bytes_counts_the_real_tensors():
    expert = _expert()
    full = 4 * (20 * 12 + 12 * 20)
    assert module_weight_bytes(expert) == full
    predicted = int8_weight_bytes(expert)
    assert predicted == (20 * 12 + 20 * 4) + (12 * 20 + 12 * 4)  # int8 + one float32 per row
    quantize_weights(expert, ["linear_fc1.weight"])
    assert module_weight_bytes(expert) == (20 * 12 + 20 * 4) + 4 * 12 * 20
    quantize_weights(expert, ["linear_fc2.weight"])
    assert module_weight_bytes(expert) == predicted == int8_weight_bytes(expert)
    lin = expert.linear_fc1  # counted from the tensors themselves
    assert predicted == sum(t.numel() * t.element_size() for m in (lin, expert.linear_fc2)
                            for t in (m.weight_int8, m.weight_scale))


def test_quantize_expert_slots_and_expert_bytes():
    experts = {0: {2: _expert(0), 3: _expert(1)}, 1: {2: _expert(2), 3: _expert(3)}}
    full = expert_bytes(experts)
    one = module_weight_bytes(experts[0][2])
    small = int8_weight_bytes(experts[0][2])
    mask = torch.tensor([True, False, False, True])
    assert quantize_expert_slots(experts, {0: mask}, 4) == 1  # slot 3 of layer 0 only
    assert int8_weights(experts[0][3]) and not int8_weights(experts[0][2])
    assert expert_bytes(experts) == full - one + small
    with pytest.raises(ConfigError, match="not MoE layers"):
        quantize_expert_slots(experts, {5: mask}, 4)
    with pytest.raises(ConfigError, match=r"shape \[4\]"):
        quantize_expert_slots(experts, {1: torch.ones(3, dtype=torch.bool)}, 4)


def test_importance_matches_a_hand_computation():
    w1 = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    w2 = torch.tensor([[-3.0, 1.0]])
    norm = torch.tensor([2.0, 10.0])
    # |W| * ||X||: (1*2 + 2*10 + 0.5*2 + 0) + (3*2 + 1*10) = 23 + 16
    assert expert_importance([w1, w2], norm) == pytest.approx(39.0)
    assert expert_importance([w1, w2]) == pytest.approx(3.5 + 4.0)  # weight-only fallback
    x = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert torch.allclose(input_norms(x), torch.tensor([5.0, 1.0]))
    with pytest.raises(ValueError, match="input_norm"):
        expert_importance([w1], torch.ones(3))


def test_importance_ranks_an_expert_by_the_inputs_it_uses():
    w_a = torch.tensor([[1.0, 0.0]])  # reads feature 0
    w_b = torch.tensor([[0.0, 1.0]])  # reads feature 1
    norm = torch.tensor([0.1, 5.0])  # feature 1 is large in the calibration activations
    assert expert_importance([w_a]) == expert_importance([w_b])
    assert expert_importance([w_b], norm) > expert_importance([w_a], norm)


def test_int8_plan_holds_the_unreplicated_budget():
    experts = {e: _expert(e) for e in range(8)}
    full = torch.tensor([module_weight_bytes(m) for m in experts.values()])
    small = torch.tensor([int8_weight_bytes(m) for m in experts.values()])
    load = torch.tensor([40.0, 5, 3, 25, 2, 1, 9, 15])
    plans = {0: plan_placement(load, 12, 2), 2: plan_placement(load.roll(3), 12, 2)}
    importance = {0: torch.arange(8.0), 2: torch.arange(8.0).flip(0)}
    flags = int8_plan_for_budget(plans, importance, full, small)
    assert sorted(flags) == [0, 2]
    budget = int(full.reshape(2, 4).sum(dim=1).max())
    for layer, plan in plans.items():
        assert flags[layer].shape == (12,) and flags[layer].any()
        assert (expert_bytes_per_rank(plan, full, flags[layer], small) <= budget).all()
        # whole experts: every replica of an expert alike
        for e in range(8):
            slots = plan.log2phy[e, : int(plan.logcnt[e])]
            assert flags[layer][slots].all() or not flags[layer][slots].any()
        # the least important experts go first: the most important one stays full
        assert not flags[layer][plan.log2phy[int(importance[layer].argmax()), 0]]
    # an unreplicated plan fits without int8
    plain = {0: placement_from_ranks(torch.arange(8), torch.arange(8) // 4, 8, 2)}
    assert not int8_plan_for_budget(plain, importance, full, small)[0].any()
    with pytest.raises(ConfigError, match="no importance for MoE layer 2"):
        int8_plan_for_budget(plans, {0: torch.arange(8.0)}, full, small)
    with pytest.raises(ConfigError, match="layer 0.*too small"):
        int8_plan_for_budget(plans, importance, full, small, budget=int(small.sum()) // 4)
