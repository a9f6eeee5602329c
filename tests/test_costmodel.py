"""The MoE-layer cost model (moebalance.costmodel) against hand-computed cases, its parameter
checks, the projection's routing counts (scripts/project.py), and the model against real EP 2
runs: a skewed placement whose straggler the model predicts, a balanced one where it vanishes."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moebalance import costmodel as cm
from moebalance.config import ConfigError
from moebalance.placement import rank_loads
from moebalance.telemetry_stats import straggler_ms
from moebalance.workloads import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


project = _script("project")

# 1 GB/s = 1e6 bytes per ms: hand arithmetic stays in round numbers
GBPS_1 = cm.Link("one", latency_us=10.0, bandwidth_gbps=1.0)
SHAPE = cm.ExpertShape(128, 512, "gelu", 4)


# ---------------------------------------------------------------------------- GEMM tables


def test_gemm_table_is_piecewise_linear_with_the_stated_ends():
    table = cm.GemmTable(SHAPE, (2, 4, 8), (1.0, 3.0, 4.0))
    got = table.time_ms([0, 1, 2, 3, 4, 6, 8, 12])
    # 0 tokens: no call; below the first count: its time; between: linear; beyond: last slope
    assert got.tolist() == pytest.approx([0.0, 1.0, 1.0, 2.0, 3.0, 3.5, 4.0, 5.0])


def test_gemm_table_never_extrapolates_a_falling_last_segment_downwards():
    table = cm.GemmTable(SHAPE, (1, 2), (2.0, 1.0))  # a noisy measurement
    assert table.time_ms([4]).tolist() == [1.0]


def test_roofline_table_hand_computed():
    shape = cm.ExpertShape(1000, 1000, "gelu", 2)  # 4e6 flops and 4e6 weight bytes per call
    chip = cm.Accelerator("toy", peak_tflops=1.0, memory_tbps=1.0, compute_efficiency=1.0,
                          memory_efficiency=1.0, launch_us=5.0)
    table = cm.roofline_table(shape, chip, tokens=(1, 1000))
    # n = 1: memory bound, (4e6 + 12e3 activation bytes) / 1e12 s = 4.012 us, + 5 us launch
    # n = 1000: compute bound, 4e9 flops / 1e12 = 4 ms, + 5 us
    assert table.ms == pytest.approx((0.009012, 4.005))
    assert "not measured" in table.source


def test_load_gemm_tables_reads_bench_gemm_files(tmp_path):
    path = tmp_path / "gemm.json"
    path.write_text(json.dumps({"device_name": "toy", "command": "python x", "tables": [
        {"name": "tiny", "hidden": 128, "ffn_hidden": 512, "activation": "gelu", "dtype_bytes": 4,
         "tokens": [1, 2], "ms": [0.5, 0.75]}]}))
    table = cm.load_gemm_tables(path)["tiny"]
    assert (table.shape, table.tokens, table.ms, table.device) == (SHAPE, (1, 2), (0.5, 0.75), "toy")
    path.write_text(json.dumps({"tables": [{"name": "bad", "hidden": 128}]}))
    with pytest.raises(ConfigError, match="table 0"):
        cm.load_gemm_tables(path)
    with pytest.raises(ConfigError, match="not found"):
        cm.load_gemm_tables(tmp_path / "missing.json")


# ---------------------------------------------------------------------------- all-to-all


def test_all_to_all_one_node_hand_computed():
    rows = torch.tensor([[7.0, 100.0], [300.0, 9.0]])  # the diagonal never leaves the rank
    total, per_rank = cm.all_to_all_ms(rows, 1000, GBPS_1)
    # each rank: 10 us + max(sent, received) = 300 kB at 1e6 B/ms
    assert per_rank.tolist() == pytest.approx([0.31, 0.31])
    assert total == pytest.approx(0.31)
    assert cm.all_to_all_ms(torch.zeros(1, 1), 1000, GBPS_1)[0] == 0.0


def test_all_to_all_two_nodes_hand_computed():
    inter = cm.Link("slow", latency_us=20.0, bandwidth_gbps=0.5)
    rows = torch.zeros(4, 4)
    rows[0, 1], rows[0, 2] = 100, 200  # rank 1 shares rank 0's node, rank 2 does not
    total, per_rank = cm.Network(GBPS_1, inter, ranks_per_node=2).all_to_all_ms(rows, 1000)
    # rank 0: intra 0.01 + 0.1, inter 0.02 + 200 kB / 5e5 B/ms = 0.42 -> 0.42
    # rank 1: intra 0.11 received, inter 0.02 (peers, no bytes); rank 2: inter 0.42 received;
    # rank 3: intra 0.01, inter 0.02
    assert per_rank.tolist() == pytest.approx([0.42, 0.11, 0.42, 0.02])
    assert total == pytest.approx(0.42)


def test_ranks_across_nodes_need_an_inter_node_link():
    with pytest.raises(ConfigError, match="inter-node link"):
        cm.all_to_all_ms(torch.ones(4, 4), 10, GBPS_1, None, ranks_per_node=2)


def test_fit_link_recovers_latency_and_bandwidth():
    num_bytes = [0, 1e6, 4e6, 9e6]
    ms = [0.1 + b / 2e6 for b in num_bytes]  # 100 us + bytes / 2 GB/s
    link = cm.fit_link(num_bytes, ms)
    assert (link.latency_us, link.bandwidth_gbps) == (pytest.approx(100.0), pytest.approx(2.0))
    with pytest.raises(ConfigError, match="two samples"):
        cm.fit_link([5, 5], [1, 2])


def test_send_rows_from_received_splits_by_tokens_routed():
    rows = cm.send_rows_from_received(torch.tensor([30, 90]), torch.tensor([1, 2]))
    assert rows.flatten().tolist() == pytest.approx([10, 30, 20, 60])


# ---------------------------------------------------------------------------- one layer


def _toy_model(**fields) -> cm.CostModel:
    table = cm.GemmTable(SHAPE, (1, 101), (0.5, 1.5))  # 0.5 ms + 0.01 ms per token above 1
    return cm.CostModel(table, cm.Network(GBPS_1), dispatch_row_bytes=1000, combine_row_bytes=1000,
                        **fields)


def test_layer_time_hand_computed():
    model = _toy_model(router_ms=0.2, expert_overhead_ms=0.1, permute_ms_per_row=0.001)
    tokens = torch.tensor([[100, 50], [10, 0]])
    rows = torch.tensor([[100, 10], [50, 0]])
    t = model.layer(tokens, rows)
    # rank 0: 1.49 + 0.99 GEMM, 2 x 0.1 slots, 150 rows x 0.001; rank 1: 0.59 + 0.2 + 0.01
    assert t.expert_ms.tolist() == pytest.approx([2.83, 0.80])
    # each rank sends or receives at most 50 rows = 50 kB: 0.01 + 0.05 per collective
    assert (t.dispatch_ms, t.combine_ms) == (pytest.approx(0.06), pytest.approx(0.06))
    assert t.layer_ms == pytest.approx(0.2 + 0.06 + 2.83 + 0.06)
    assert t.straggler_ms == pytest.approx(2.83 - (2.83 + 0.80) / 2)
    assert t.straggler_share == pytest.approx(1.015 / 3.15)
    assert t.alltoall_wait_ms == pytest.approx(0.0)


def test_straggler_is_telemetry_stats_definition_and_layer_minus_mean_rank():
    gen = torch.Generator().manual_seed(3)
    model = _toy_model(router_ms=0.3)
    for _ in range(5):
        tokens = torch.randint(0, 300, (4, 3), generator=gen)
        rows = torch.randint(0, 100, (4, 4), generator=gen)
        t = model.layer(tokens, rows)
        assert t.straggler_ms == pytest.approx(float(straggler_ms(t.expert_ms)))
        assert t.straggler_ms == pytest.approx(t.layer_ms - float(t.rank_ms.mean()))


def test_alltoall_wait_counts_the_rank_with_the_most_bytes():
    rows = torch.zeros(3, 3)
    rows[0, 1] = 100  # ranks 0 and 1 move 100 kB, rank 2 none
    t = _toy_model().layer(torch.zeros(3, 1, dtype=torch.long), rows)
    per_collective = 0.11 - (0.11 + 0.11 + 0.01) / 3
    assert t.alltoall_wait_ms == pytest.approx(2 * per_collective)
    assert t.straggler_ms == 0.0


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, name", [
    (lambda: cm.ExpertShape(0, 512), "hidden"),
    (lambda: cm.ExpertShape(128, 512, "relu"), "activation"),
    (lambda: cm.ExpertShape(128, 512, "gelu", 3), "dtype_bytes"),
    (lambda: cm.GemmTable(SHAPE, (4, 2), (1.0, 2.0)), "tokens"),
    (lambda: cm.GemmTable(SHAPE, (1, 2), (1.0, -2.0)), "ms"),
    (lambda: cm.GemmTable(SHAPE, (1, 2), (1.0,)), "ms"),
    (lambda: cm.GemmTable(SHAPE, (0,), (1.0,)), "tokens"),
    (lambda: cm.Link("nvl", latency_us=-1, bandwidth_gbps=1), "nvl.latency_us"),
    (lambda: cm.Link("ib", latency_us=1, bandwidth_gbps=0), "ib.bandwidth_gbps"),
    (lambda: cm.Link("ib", latency_us=math.nan, bandwidth_gbps=1), "ib.latency_us"),
    (lambda: cm.Network(GBPS_1, GBPS_1, ranks_per_node=0), "ranks_per_node"),
    (lambda: cm.Accelerator("x", 1.0, 1.0, compute_efficiency=1.5), "compute_efficiency"),
    (lambda: cm.Accelerator("x", 0.0, 1.0), "peak_tflops"),
    (lambda: cm.ExpertOverheads("x", expert_overhead_ms=-0.1), "expert_overhead_ms"),
    (lambda: _toy_model(router_ms=math.inf), "router_ms"),
    (lambda: _toy_model(permute_ms_per_row=-1), "permute_ms_per_row"),
    (lambda: _toy_model().layer(torch.ones(2), torch.ones(2, 2)), "tokens"),
    (lambda: _toy_model().layer(torch.ones(2, 1), torch.ones(2, 3)), "rows"),
    (lambda: _toy_model().layer(torch.ones(2, 1), torch.ones(3, 3)), "rows"),
    (lambda: _toy_model().expert_ms(-torch.ones(2, 1)), "tokens per expert"),
])
def test_bad_parameters_raise_one_line_naming_them(make, name):
    with pytest.raises(ConfigError) as err:
        make()
    assert name in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------- projection


def _logits_choosing(pairs: list[tuple[int, int]], num_experts: int = 8) -> torch.Tensor:
    logits = torch.zeros(len(pairs), num_experts)
    for t, (a, b) in enumerate(pairs):
        logits[t, a], logits[t, b] = 5.0, 4.0
    return logits


def test_route_layer_counts_slots_and_rows_by_hand():
    preset = PRESETS["mixtral"]  # 8 experts, top-2: at EP 2 experts 0-3 on rank 0, 4-7 on 1
    shards = [_logits_choosing([(0, 1), (0, 5)]), _logits_choosing([(4, 5), (1, 4)])]
    tokens, rows, dropped, per_token, logical = project.route_layer(
        shards, preset, 0, project.ROUTERS[0], None, "local_first")
    assert tokens.tolist() == [[2, 2, 0, 0], [2, 2, 0, 0]]
    assert rows.tolist() == [[3, 1], [1, 3]]  # rank 0 sends e5 to rank 1; rank 1 sends e1 back
    assert (dropped, per_token) == (0.0, 2.0)
    assert logical.tolist() == [2, 2, 0, 0, 2, 2, 0, 0]


def test_uniform_replication_above_the_expert_count():
    placement = project.uniform_placement(8, 16)
    assert placement.phy2log.tolist() == list(range(8)) * 2
    assert placement.slot_rank.tolist() == list(range(16))
    assert project.uniform_placement(8, 4) is None


def test_expanded_drop_with_replicas_keeps_its_expansion_on_the_rank():
    preset = PRESETS["mixtral"]
    placement = project.uniform_placement(8, 16)  # rank r hosts expert r % 8
    # every token of every rank picks experts 0 and 1: capacity drops most, expansion adds
    # the rank's own expert, whose replica is the rank's own slot
    shards = [_logits_choosing([(0, 1)] * 8) for _ in range(16)]
    spec = ("expanded_drop g=1.0", "expanded_drop", {"capacity_factor": 1.0}, False)
    tokens, rows, dropped, _, _ = project.route_layer(shards, preset, 0, spec, placement,
                                                      "local_first")
    assert dropped > 0
    # rows kept on a rank: its expansion (expert r % 8) lands on its own slot
    for r in range(2, 16):
        if r % 8 not in (0, 1):
            assert rows[r, r] > 0


def test_skewed_placement_puts_the_hottest_half_on_rank_zero():
    load = torch.tensor([1.0, 5.0, 3.0, 7.0])
    plan = project.skewed_placement(load, 2)
    assert rank_loads(plan, load).tolist() == [12.0, 4.0]


@pytest.mark.parametrize("script, args, name", [
    ("project", ["--ep", "2,x"], "--ep"),
    ("project", ["--workloads", "olmoe:poetry"], "--workloads"),
    ("project", ["--link-args", "intra.speed=3"], "--link-args"),
    ("project", ["--runs", "a.json"], "--runs"),
    ("bench_gemm", ["--max-tokens", "100"], "--max-tokens"),
    ("bench_gemm", ["--shapes", "nope"], "--shapes"),
])
def test_scripts_refuse_bad_options_in_one_line(script, args, name, capsys):
    module = project if script == "project" else _script("bench_gemm")
    with pytest.raises(SystemExit) as done:
        module.parse_args(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(lines) == 1 and name in lines[0]


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def validation(tmp_path_factory):
    """``project.py --validate`` once (EP 2: calibration, skewed, balanced; one repeat of
    32 x 256 prompt tokens per rank, twice the script's default, so that one repeat's
    straggler stands well above this shared machine's timing noise), with a GEMM table of
    fine-moe measured here for the purpose."""
    work = tmp_path_factory.mktemp("validate")
    table = work / "gemm.json"
    done = _cli("bench_gemm.py", "--shapes", "fine-moe", "--min-time", "0.05", "--rounds", "1",
                "--out", str(table))
    assert done.returncode == 0, done.stderr
    out = work / "validation.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "project.py"), "--validate", "--repeats", "1",
         "--batch", "32", "--gemm-cpu", str(table), "--work", str(work / "runs"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), work, table


@pytest.mark.slow
def test_skewed_placement_straggler_matches_the_model_and_balanced_vanishes(validation):
    doc, _, _ = validation
    verdict, summary = doc["verdict"], doc["summary"]
    assert verdict["token_counts_as_known"]
    skewed, balanced = summary["skewed"], summary["balanced"]
    # the skewed plan moves most rows to rank 0, the balanced one evens them
    assert all(a > 2 * b for a, b in skewed["rank_tokens"].values())
    assert all(abs(a - b) <= 0.01 * (a + b) for a, b in balanced["rank_tokens"].values())
    assert skewed["straggler_ms_predicted_p50"] > 50 * balanced["straggler_ms_predicted_p50"]
    # One repeat against a GEMM table measured in seconds on a shared 2-core machine: both
    # sides carry that machine's timing noise (seen here from -38% to +67%), so the test holds
    # the model to a factor of two of the measurement. The stated tolerance
    # (project.VALIDATION_TOLERANCE) is the script's verdict over three repeats with the
    # shipped table, recorded in results/straggler_validation_cpu.json.
    ratio = skewed["straggler_ms_measured_p50"] / skewed["straggler_ms_predicted_p50"]
    assert 0.5 <= ratio <= 2.0, verdict
    assert verdict["balanced_below_share"], verdict


@pytest.mark.slow
def test_check_reproduces_measured_ep2_expert_time_and_straggler(validation, tmp_path):
    _, work, table = validation
    runs = sorted(str(p) for p in (work / "runs").glob("*.json"))
    out = tmp_path / "check.json"
    done = _cli("project.py", "--check", "--runs", *runs, "--gemm-cpu", str(table),
                "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    errors = doc["errors_preset"]["ep2_prefill"]  # the shipped CPU preset, not refitted
    assert errors["samples"] == 4 * len(runs)
    # The validation's single repeat against a table measured in seconds on a shared machine
    # (expert-time medians seen here 0.16-0.18 against the stated 0.25): the test allows
    # twice the stated bounds; the stated bounds are the script's verdict on the shipped
    # runs (results/projection_check_cpu.md).
    assert errors["expert_time_rel_error_abs_p50"] <= 2 * project.EXPERT_TIME_TOLERANCE, errors
    assert errors["straggler_error_of_expert_time_p50"] <= 2 * project.STRAGGLER_TOLERANCE, errors
