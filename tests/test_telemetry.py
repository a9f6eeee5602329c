"""moebalance.telemetry: the per-rank recorder (steps, layers, warm-up, NVTX and profiler
ranges, the clocks of the phases) and the gather to rank 0."""

from __future__ import annotations

import threading
import time

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
    rec = MoERecorder("cpu", rank=3, ep_group=1, label="laser")
    rec.begin_step("prefill")
    with pytest.raises(KeyError):
        with rec.range("dispatch", 7):
            raise KeyError("boom")  # the range is still popped
    rec.end_step()
    rec.begin_step("decode", warmup=True)
    rec.end_step()
    assert calls == [
        "moe/step router=laser step=0 phase=prefill rank=3 ep_group=1", "moe/dispatch layer=7",
        "pop", "pop",
        "moe/step router=laser step=1 phase=decode rank=3 ep_group=1 warmup", "pop",
    ]


def test_recorder_opens_profiler_ranges_of_the_same_names_only_while_profiling():
    rec = MoERecorder("cpu", nvtx_ranges=False, label="topk")

    def one_step():
        rec.begin_step("prefill")
        with rec.range("experts", 3):
            torch.ones(8).sum()
        rec.end_step()

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        one_step()
    by_name = {e.name: e.time_range for e in prof.events()}
    step = by_name["moe/step router=topk step=0 phase=prefill rank=0 ep_group=0"]
    phase = by_name["moe/experts layer=3"]
    assert step.start <= phase.start and phase.end <= step.end  # nested as the NVTX ranges
    # no profiler: nothing opened (record_function costs ~10 us a call; the check far less)
    calls = []
    original = torch.profiler.record_function
    torch.profiler.record_function = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        one_step()
    finally:
        torch.profiler.record_function = original
    assert calls == []


# ----------------------------------------------------------------------------- clocks


def _spin(stop: threading.Event) -> None:
    """Keep a core busy in this process (the matmul releases the GIL)."""
    x = torch.ones(128, 128)
    while not stop.is_set():
        x @ x


def test_cpu_compute_phases_count_only_the_threads_own_cpu_time():
    """router and experts are the CPU time of the thread that runs them: another busy thread of
    the process (gloo's, the profiler's) adds nothing, where process CPU time would add its
    whole run. dispatch and combine stay wall time (they include the wait)."""
    rec = MoERecorder("cpu", nvtx_ranges=False, cpu_clock="thread")
    assert rec.compute_clock == "thread_time"
    stop = threading.Event()
    other = threading.Thread(target=_spin, args=(stop,))
    other.start()
    try:
        time.sleep(0.05)  # the other thread is running
        rec.begin_step("prefill")
        process_ms = time.process_time()
        with rec.range("experts", 0):
            time.sleep(0.3)  # this thread idle, the other one busy
        process_ms = (time.process_time() - process_ms) * 1e3
        with rec.range("router", 0):
            end = time.thread_time() + 0.05
            while time.thread_time() < end:  # 50 ms of this thread's own work
                pass
        with rec.range("combine", 0):
            time.sleep(0.1)
        rec.end_step()
    finally:
        stop.set()
        other.join()
    (row,) = rec.records()
    # the process burned CPU during the experts range (what process_time would have shown)
    assert process_ms > 50
    assert row["experts_ms"] < min(10.0, process_ms / 5)
    assert row["router_ms"] >= 49
    assert row["combine_ms"] >= 100


def test_cpu_clock_follows_the_intra_op_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert MoERecorder("cpu").compute_clock == "thread_time"
        torch.set_num_threads(2)  # the pool's work would escape the thread's clock
        assert MoERecorder("cpu").compute_clock == "process_time"
    finally:
        torch.set_num_threads(threads)
    assert MoERecorder("cpu", cpu_clock="process").compute_clock == "process_time"
    with pytest.raises(ValueError, match="cpu_clock"):
        MoERecorder("cpu", cpu_clock="wall")


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
