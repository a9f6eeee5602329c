"""moebalance.telemetry_stats: straggler time, combine wait, per-rank imbalance, percentiles and
the spread of timings, the cross-rank join and the summary, against numbers computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from moebalance.telemetry_stats import (
    combine_wait_ms,
    join_ranks,
    percentile,
    rank_imbalance,
    straggler_ms,
    summarize,
    timing_stats,
)


def test_straggler_is_max_minus_mean_over_ranks():
    # ranks took 3, 1 and 2 ms: max 3, mean 2 -> 1 ms; a balanced step -> 0
    got = straggler_ms(torch.tensor([[3.0, 1.0, 2.0], [5.0, 5.0, 5.0], [0.0, 0.0, 9.0]]))
    assert got.tolist() == pytest.approx([1.0, 0.0, 6.0])


def test_rank_imbalance_is_max_over_mean():
    got = rank_imbalance(torch.tensor([[4, 2, 0], [3, 3, 3], [10, 30, 20]]))
    assert got.tolist() == pytest.approx([2.0, 1.0, 1.5])


@pytest.mark.parametrize(
    "values, q, want",
    [
        ([1, 2, 3, 4], 50, 2.5),
        ([1, 2, 3, 4], 95, 3.85),  # position 0.95 * 3 = 2.85: 3 + 0.85 * (4 - 3)
        ([4, 1, 3, 2], 0, 1.0),
        ([4, 1, 3, 2], 100, 4.0),
        ([7], 95, 7.0),
        ([1, float("nan"), 3], 50, 2.0),  # NaN ignored
        (list(range(101)), 95, 95.0),
    ],
)
def test_percentile_linear_interpolation(values, q, want):
    assert percentile(values, q) == pytest.approx(want)


def test_percentile_of_nothing_is_nan_and_q_is_checked():
    assert math.isnan(percentile([], 50))
    assert math.isnan(percentile([float("nan")], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _record(rank, step, layer, experts_ms, tokens_per_expert, *, phase="prefill", tokens=0,
            assignments=0, dropped=0, ep_group=0, n_local=2):
    return {
        "rank": rank, "ep_rank": rank, "ep_group": ep_group, "step": step, "phase": phase,
        "warmup": False, "layer": layer, "router_ms": 0.5, "dispatch_ms": 1.0,
        "experts_ms": experts_ms, "combine_ms": 2.0,
        "local_experts": list(range(rank * n_local, (rank + 1) * n_local)),
        "tokens_per_expert": tokens_per_expert, "tokens": tokens,
        "assignments": assignments, "dropped": dropped,
    }


def test_summarize_against_hand_computed_figures():
    # 2 EP ranks x 2 local experts, top-2; one layer, two prefill steps and one decode step.
    records = [
        # step 0: rank 0 got 6 + 2 = 8 tokens, rank 1 got 3 + 1 = 4 -> imbalance 8 / 6 = 4/3;
        # global load [6, 2, 3, 1], mean 3 -> MV 1; expert ms 4 and 2 -> straggler 4 - 3 = 1
        _record(0, 0, 0, 4.0, [6, 2], tokens=5, assignments=6, dropped=4),
        _record(1, 0, 0, 2.0, [3, 1], tokens=5, assignments=6, dropped=0),
        # step 1: balanced, [2, 2, 2, 2]: imbalance 1, MV 0; 3 ms and 3 ms -> straggler 0
        _record(0, 1, 0, 3.0, [2, 2], tokens=4, assignments=4),
        _record(1, 1, 0, 3.0, [2, 2], tokens=4, assignments=4),
        # step 2 (decode): [1, 0, 0, 1]: per rank 1 and 1 -> 1; MV 1 / 0.5 - 1 = 1; 1 and 3 ms -> 1
        _record(0, 2, 0, 1.0, [1, 0], phase="decode", tokens=1, assignments=2),
        _record(1, 2, 0, 3.0, [0, 1], phase="decode", tokens=0, assignments=0),
    ]
    s = summarize(records, topk=2)
    prefill, decode, overall = s["prefill"], s["decode"], s["all"]
    assert prefill["samples"] == 2 and decode["samples"] == 1 and overall["samples"] == 3
    assert prefill["straggler_ms"]["p50"] == pytest.approx(0.5)  # median of {1, 0}
    assert prefill["straggler_ms"]["p95"] == pytest.approx(0.95)
    assert prefill["straggler_ms"]["max"] == pytest.approx(1.0)
    assert prefill["rank_imbalance"]["p50"] == pytest.approx((4 / 3 + 1) / 2)
    assert prefill["max_violation"]["mean"] == pytest.approx(0.5)
    # dropped fraction = 4 dropped / ((5 + 5 + 4 + 4) tokens x 2)
    assert prefill["dropped_fraction"] == pytest.approx(4 / 36)
    assert decode["straggler_ms"]["p50"] == pytest.approx(1.0)
    assert decode["rank_imbalance"]["p50"] == pytest.approx(1.0)
    assert decode["max_violation"]["p50"] == pytest.approx(1.0)
    assert overall["straggler_ms"]["p50"] == pytest.approx(1.0)  # median of {1, 0, 1}
    assert overall["experts_ms"]["mean"] == pytest.approx((3 + 3 + 2) / 3)  # per-sample rank mean
    assert overall["tokens"] == 19 and overall["assignments"] == 22
    assert s["per_layer"][0]["samples"] == 3
    assert "capacity" not in overall and "buffer_fill" not in overall  # dropless: no padding
    # LIS = E x busiest slot / (T k): step 0: 4 x 6 / 20 = 1.2; step 1: 4 x 2 / 16 = 0.5
    assert prefill["lis"]["max"] == pytest.approx(1.2) and prefill["lis"]["p50"] == pytest.approx(0.85)
    # with replicas the 4 slots hold 2 logical experts: normalised by the logical mean
    assert summarize(records, topk=2, num_experts=2)["prefill"]["lis"]["max"] == pytest.approx(0.6)


def test_summarize_reports_the_padded_buffer():
    """DeepSpeed pads: each expert computes C slots per sending rank (2 ranks here), so the
    buffer has E x 2 x C slots; report C and the share of slots holding a token."""
    records = [
        {**_record(0, 0, 0, 1.0, [6, 2]), "capacity": 6},  # received [6, 2, 3, 1] of 4 x 2 x 6
        {**_record(1, 0, 0, 1.0, [3, 1]), "capacity": 6},
        {**_record(0, 1, 0, 1.0, [2, 2]), "capacity": 1},  # [2, 2, 2, 2] of 4 x 2 x 1: all full
        {**_record(1, 1, 0, 1.0, [2, 2]), "capacity": 1},
    ]
    s = summarize(records, topk=2)["all"]
    assert s["capacity"]["max"] == 6 and s["capacity"]["mean"] == pytest.approx(3.5)
    assert s["buffer_fill"]["p50"] == pytest.approx((12 / 48 + 1) / 2)
    assert s["buffer_fill"]["max"] == pytest.approx(1.0)


def test_join_ranks_orders_ranks_and_rejects_missing_ones():
    records = [_record(1, 0, 3, 2.0, [0, 5]), _record(0, 0, 3, 1.0, [1, 2])]
    (sample,) = join_ranks(records)
    assert sample["experts_ms"] == [1.0, 2.0]
    assert sample["expert_load"] == [1, 2, 0, 5]
    assert sample["tokens_per_rank"] == [3, 5]
    with pytest.raises(ValueError, match="EP ranks"):
        join_ranks(records + [_record(1, 1, 3, 2.0, [0, 5])])  # step 1 lacks rank 0


def test_join_ranks_keeps_ep_groups_apart():
    records = [
        _record(r % 2, 0, 0, 1.0, [1, 1], ep_group=g) | {"rank": r}
        for g, ranks in ((0, (0, 1)), (2, (2, 3)))
        for r in ranks
    ]
    samples = join_ranks(records)
    assert [s["ep_group"] for s in samples] == [0, 2]
    assert all(len(s["experts_ms"]) == 2 for s in samples)


def test_combine_wait_is_mean_minus_min_over_ranks():
    # combine took 5, 1 and 3 ms: the fastest rank's 1 ms is the transfer; the ranks waited
    # 4, 0 and 2 ms beyond it -> mean 2
    got = combine_wait_ms(torch.tensor([[5.0, 1.0, 3.0], [2.0, 2.0, 2.0]]))
    assert got.tolist() == pytest.approx([2.0, 0.0])


def test_timing_figures_carry_their_spread_and_routing_figures_keep_theirs():
    # one layer, five steps on 2 ranks; rank 0's experts take 1..5 ms, rank 1's always 1 ms
    records = []
    for step in range(5):
        records.append({**_record(0, step, 0, 1.0 + step, [2, 2]), "combine_ms": 1.0})
        records.append({**_record(1, step, 0, 1.0, [2, 2]), "combine_ms": 1.0 + step})
    s = summarize(records, topk=2)["all"]
    straggler = s["straggler_ms"]  # max - mean: 0, 0.5, 1, 1.5, 2
    assert list(straggler) == ["p5", "p25", "p50", "p75", "p95", "mean", "max", "n"]
    assert straggler["p5"] == pytest.approx(0.1) and straggler["p25"] == pytest.approx(0.5)
    assert straggler["p50"] == pytest.approx(1.0) and straggler["p75"] == pytest.approx(1.5)
    wait = s["combine_wait_ms"]  # rank 1 waits step ms at the combine: mean - min = step / 2
    assert wait["p50"] == pytest.approx(1.0) and wait["max"] == pytest.approx(2.0)
    for phase in ("router_ms", "dispatch_ms", "experts_ms", "combine_ms"):
        assert "p25" in s[phase]
    # each EP rank's own times over the steps
    rank0, rank1 = s["ep_rank_ms"]["experts_ms"]
    assert rank0["p50"] == pytest.approx(3.0) and rank0["p5"] == pytest.approx(1.2)
    assert rank1["p5"] == rank1["p95"] == pytest.approx(1.0) and rank1["n"] == 5
    assert s["ep_rank_ms"]["combine_ms"][1]["max"] == pytest.approx(5.0)
    # routing figures keep exactly the keys they had
    for figure in ("rank_imbalance", "max_violation", "lis"):
        assert list(s[figure]) == ["p50", "p95", "mean", "max", "n"]


def test_timing_stats_of_nothing_is_nan():
    stats = timing_stats([float("nan")])
    assert stats["n"] == 0 and math.isnan(stats["p5"]) and math.isnan(stats["p75"])
