"""moebalance.telemetry: the per-rank recorder (steps, layers, warm-up, NVTX ranges) and the
gather to rank 0."""

from __future__ import annotations

import pytest
import torch

from moebalance import telemetry
from moebalance.telemetry import MoERecorder, gather_to_rank0

from mp_utils import init_gloo, run_workers


# ----------------------------------------------------------------------------- recorder


def test_recorder_records_steps_layers_and_excludes_warmup():
    rec = MoERecorder("cpu", rank=1, ep_rank=1, ep_group=0, nvtx_ranges=False)
    rec.begin_step("prefill", warmup=True)
    with rec.range("experts", 0):
        pass
    rec.end_step()
    rec.begin_step("decode")
    for name in telemetry.RANGES:
        with rec.range(name, 2):
            sum(range(1000))
    with rec.range("experts", 2):  # a second call of the same layer adds up
        pass
    rec.add_tokens_per_expert(2, torch.tensor([3, 0]), [2, 3])
    rec.add_tokens_per_expert(2, torch.tensor([1, 1]), [2, 3])
    rec.add_routing(2, 4, torch.tensor(6), torch.tensor(2))
    rec.add_capacity(2, torch.tensor(7))  # two calls of the layer: the larger buffer is kept
    rec.add_capacity(2, 5)
    rec.end_step()
    with rec.range("router", 5):  # outside a step: nothing recorded
        pass
    rec.add_routing(5, 1, 1)
    rec.add_capacity(5, 3)

    (row,) = rec.records()
    assert row["step"] == 1 and row["phase"] == "decode" and row["layer"] == 2
    assert row["rank"] == 1 and row["ep_rank"] == 1 and not row["warmup"]
    assert all(row[f"{n}_ms"] > 0 for n in telemetry.RANGES)
    assert row["tokens_per_expert"] == [4, 1] and row["local_experts"] == [2, 3]
    assert (row["tokens"], row["assignments"], row["dropped"]) == (4, 6, 2)
    assert row["capacity"] == 7
    assert [r["warmup"] for r in rec.records(include_warmup=True)] == [True, False]
    assert rec.records(include_warmup=True)[0]["capacity"] is None  # nothing padded recorded
    rec.clear()
    assert rec.records(include_warmup=True) == []


def test_recorder_rejects_misuse():
    rec = MoERecorder("cpu", nvtx_ranges=False)
    with pytest.raises(ValueError):
        rec.begin_step("training")
    with pytest.raises(RuntimeError):
        rec.end_step()
    rec.begin_step("prefill")
    with pytest.raises(RuntimeError):
        rec.begin_step("decode")
    with pytest.raises(ValueError):
        with rec.range("attention", 0):
            pass


def test_recorder_emits_nvtx_ranges_balanced(monkeypatch):
    calls = []
    monkeypatch.setattr(
        telemetry, "_nvtx_backend", lambda device: (calls.append, lambda: calls.append("pop"))
    )
    rec = MoERecorder("cpu")
    rec.begin_step("prefill")
    with pytest.raises(KeyError):
        with rec.range("dispatch", 7):
            raise KeyError("boom")  # the range is still popped
    rec.end_step()
    assert calls == ["moe/dispatch layer=7", "pop"]


# ----------------------------------------------------------------------------- gather


def test_gather_to_rank0_without_process_group():
    assert gather_to_rank0({"a": 1}) == [{"a": 1}]


def _gather_worker(rank: int, world: int):
    import torch.distributed as dist

    init_gloo()
    try:
        return gather_to_rank0({"rank": rank, "tokens": [rank] * (rank + 1)})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_to_rank0_on_gloo():
    results = run_workers(_gather_worker, 2, timeout_s=120)
    assert results[0] == [{"rank": 0, "tokens": [0]}, {"rank": 1, "tokens": [1, 1]}]
    assert results[1] is None
