"""Profiling: ``infer.py --profile DIR`` (torch.profiler traces carrying the recorder's ranges),
``scripts/trace_report.py`` (the per-layer, per-rank phase table and the straggler, from those
traces or from an Nsight Systems export), ``scripts/nsys.sh``, and core pinning.

One multi-process launch (about 20 s on 2 cores): ``torchrun --nproc-per-node 2 infer.py
--compare --profile DIR`` on the random-init tiny model with small shapes; its traces are read
back and compared with the same run's JSON report. The Nsight Systems readers are checked on
files built here in nsys's documented CSV and SQLite layouts (from the real run's ranges, and
from small cases with known answers); no nsys runs here.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from moebalance.telemetry import RANGES, step_range_name
from moebalance.telemetry_stats import combine_wait_ms

from test_infer import INFER, NPROC, ROOT, _env, _torchrun

TRACE_REPORT = ROOT / "scripts" / "trace_report.py"
NSYS_SH = ROOT / "scripts" / "nsys.sh"
RUN = ["--config", "tiny", "--router", "expanded_drop", "--compare", "--batch", "2",
       "--prompt-len", "16", "--gen-len", "3", "--warmup", "1", "--eval-seqs", "0"]
STEPS = 3  # gen_len: one prefill and two decode steps
#: trace_report's communication phases (wall time on both sides) against the report's, summed
#: over every layer, rank and step of a router: the profiler's range encloses the recorder's
#: clock, so the trace can only be longer, by the profiler's own bookkeeping at each end
COMM_TOLERANCE = (0.10, 2.0)  # relative, plus ms


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trace_report():
    return _load(TRACE_REPORT, "trace_report_script")


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    out, traces = tmp / "run.json", tmp / "traces"
    _torchrun(*RUN, "--profile", str(traces), "--out", str(out))
    report = json.loads(out.read_text())
    table = tmp / "table.json"
    done = subprocess.run(
        [sys.executable, str(TRACE_REPORT), str(traces), "--out", str(table)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return report, traces, json.loads(table.read_text()), done.stdout


def _events(path: Path) -> list[dict]:
    return [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]


# ----------------------------------------------------------------------------- the run


def test_one_trace_per_rank_and_router_with_every_range(profiled):
    report, traces, _, _ = profiled
    model = report["config"]["model"]
    moe_layers = range(model["first_dense_layers"], model["num_layers"])
    for run in report["runs"]:
        router = run["router"]
        for rank in range(NPROC):
            path = traces / router / f"rank{rank}.pt.trace.json"
            assert run["per_rank"][rank]["profile"] == str(path)
            events = [e for e in _events(path) if e.get("cat") == "user_annotation"]
            steps = [e for e in events if e["name"].startswith("moe/step")]
            # the measured generation only (no warm-up step), named as the NVTX ranges are
            assert [e["name"] for e in steps] == [
                step_range_name(router, s, "prefill" if s == 0 else "decode", rank, 0, False)
                for s in range(STEPS)
            ]
            for step in steps:
                inside = {
                    e["name"] for e in events
                    if e["tid"] == step["tid"] and step["ts"] <= e["ts"]
                    and e["ts"] + e["dur"] <= step["ts"] + step["dur"]
                }
                for layer in moe_layers:
                    for phase in RANGES:
                        assert f"moe/{phase} layer={layer}" in inside, (router, rank, step["name"])


def test_trace_report_recovers_the_reports_phase_times(profiled):
    report, _, table, stdout = profiled
    assert table["source"] == "torch.profiler" and table["time_base"] == "cpu"
    assert set(table["routers"]) == {"topk", "expanded_drop"}
    for run in report["runs"]:
        mine = table["routers"][run["router"]]
        assert mine["ranks"] == list(range(NPROC)) and mine["steps"] == STEPS
        assert mine["steps_per_phase"] == {"prefill": 1, "decode": STEPS - 1}
        want: dict = defaultdict(float)
        for r in run["records"]:
            for phase in RANGES:
                want[(r["layer"], r["rank"], phase)] += r[f"{phase}_ms"]
        got = {
            (int(layer), int(rank), phase): times[f"{phase}_ms"]
            for layer, entry in mine["per_layer"].items()
            for rank, times in entry["per_rank"].items() for phase in RANGES
        }
        assert set(got) == set(want)  # every (layer, rank) of the report, nothing else
        for key, value in got.items():
            assert value["mean_per_step"] == pytest.approx(value["sum"] / STEPS)
            # the profiler range encloses the recorder's clock: wall time for dispatch and
            # combine, and wall >= the thread's CPU time for router and experts
            assert value["sum"] >= want[key] - 1e-3, key
        for phase in ("dispatch", "combine"):
            traced = sum(v["sum"] for k, v in got.items() if k[2] == phase)
            recorded = sum(v for k, v in want.items() if k[2] == phase)
            rel, abs_ms = COMM_TOLERANCE
            assert traced <= recorded * (1 + rel) + abs_ms, (run["router"], phase)
        # the combine wait of each sample, from the trace and from the report's records
        by_sample: dict = defaultdict(dict)
        for r in run["records"]:
            by_sample[(r["step"], r["layer"])][r["rank"]] = r["combine_ms"]
        import torch

        differences = []
        for sample in mine["samples"]:
            times = by_sample[(sample["step"], sample["layer"])]
            recorded = float(combine_wait_ms(
                torch.tensor([times[r] for r in sorted(times)], dtype=torch.float64)
            ))
            differences.append(abs(sample["combine_wait_ms"] - recorded))
            # and the straggler is max - mean of the trace's experts times (the report's rule)
            experts = sample["experts_ms"]
            want = max(experts) - sum(experts) / len(experts)
            assert sample["straggler_ms"] == pytest.approx(want)
        assert len(differences) == len(by_sample)
        assert statistics.median(differences) < 0.5, differences
    assert "| layer | rank | router | dispatch | experts | combine |" in stdout


def test_each_rank_is_pinned_to_its_own_core_and_times_compute_in_thread_time(profiled):
    report, _, _, _ = profiled
    for run in report["runs"]:
        pins = [p["pinning"] for p in run["per_rank"]]
        allowed = pins[0]["allowed"]
        if len(allowed) >= NPROC:
            assert [p["core"] for p in pins] == allowed[:NPROC]  # LOCAL_RANK-th allowed core
            assert all(p["reason"] is None for p in pins)
        else:
            assert all(p["core"] is None and "ranks on this node" in p["reason"] for p in pins)
        # torchrun's OMP_NUM_THREADS=1: one compute thread per rank
        assert {p["compute_clock"] for p in run["per_rank"]} == {"thread_time"}
    spread = report["runs"][0]["summary"]["all"]
    assert {"p5", "p25", "p75"} <= set(spread["straggler_ms"]) <= set(spread["combine_wait_ms"])
    assert len(spread["ep_rank_ms"]["experts_ms"]) == NPROC


# ----------------------------------------------------------------------------- nsys formats

PUSH_POP = ("Start (ns),End (ns),Duration (ns),DurChild (ns),DurNonChild (ns),Name,PID,TID,"
            "Lvl,NumChild,RangeId,ParentId,RangeStack,NameTree")
GPU_PROJ = ("Name,Projected Start (ns),Projected Duration (ns),Orig Start (ns),"
            "Orig Duration (ns),Style,PID,TID,NumGPUOps,Lvl,NumChild,RangeId,ParentId,RangeStack")


def _push_pop_csv(path: Path, ranges: list[tuple[str, int, int, int, int]]) -> None:
    """(name, start ns, end ns, pid, tid) rows as ``nsys stats --report nvtx_pushpop_trace
    --format csv`` writes them (a banner line first; default-domain names shown as ``:name``)."""
    with path.open("w", newline="") as f:
        f.write("Processing [report.sqlite] with [nvtx_pushpop_trace.py]... \n\n")
        f.write(PUSH_POP + "\n")
        writer = csv.writer(f)
        for i, (name, start, end, pid, tid) in enumerate(ranges):
            writer.writerow([start, end, end - start, 0, end - start, f":{name}", pid, tid, 0, 0,
                             i + 1, "", f":{i + 1}", f":{name}"])


def _sqlite(path: Path, ranges, kernels=()) -> None:
    """An ``nsys export --type sqlite`` subset: NVTX_EVENTS (push/pop, names in StringIds),
    ENUM_NSYS_EVENT_TYPE and, with ``kernels`` [(launch ns, pid, tid, kernel ns)], the CUPTI
    runtime and kernel tables (globalTid = pid * 2**24 + tid)."""
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT);"
        "CREATE TABLE ENUM_NSYS_EVENT_TYPE (id INTEGER, name TEXT);"
        "CREATE TABLE NVTX_EVENTS (start INTEGER, end INTEGER, eventType INTEGER, rangeId INTEGER,"
        " category INTEGER, color INTEGER, text TEXT, globalTid INTEGER, endGlobalTid INTEGER,"
        " textId INTEGER, domainId INTEGER);"
        "INSERT INTO ENUM_NSYS_EVENT_TYPE VALUES (59, 'NvtxPushPopRange'), (34, 'NvtxMark');"
    )
    for i, (name, start, end, pid, tid) in enumerate(ranges):
        gtid = pid * 2**24 + tid
        if i % 2:  # both ways nsys stores a name: inline text, or a StringIds entry
            db.execute("INSERT INTO StringIds VALUES (?, ?)", (i + 1, name))
            db.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, globalTid, textId) "
                       "VALUES (?, ?, 59, ?, ?)", (start, end, gtid, i + 1))
        else:
            db.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, globalTid, text) "
                       "VALUES (?, ?, 59, ?, ?)", (start, end, gtid, name))
    db.execute("INSERT INTO NVTX_EVENTS (start, end, eventType, globalTid, text) "
               "VALUES (5, NULL, 34, 1, 'moe/a mark')")
    if kernels:
        db.executescript(
            "CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER, end INTEGER, "
            " globalTid INTEGER, correlationId INTEGER, nameId INTEGER);"
            "CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER, end INTEGER, "
            " globalPid INTEGER, correlationId INTEGER, deviceId INTEGER);"
        )
        for corr, (launch, pid, tid, ns) in enumerate(kernels):
            db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, ?, ?, 0)",
                       (launch, launch + 10, pid * 2**24 + tid, corr))
            db.execute("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (?, ?, ?, ?, 0)",
                       (launch + 100_000, launch + 100_000 + ns, pid * 2**24, corr))
    db.commit()
    db.close()


def _ranges_of(traces: Path) -> list[tuple[str, int, int, int, int]]:
    """The moe/* ranges of the run's traces as (name, start ns, end ns, pid, tid)."""
    out = []
    for path in sorted(traces.rglob("*.pt.trace.json")):
        for e in _events(path):
            if e.get("cat") == "user_annotation" and e["name"].startswith("moe/"):
                start = round(e["ts"] * 1e3)
                out.append((e["name"], start, start + round(e["dur"] * 1e3), e["pid"], e["tid"]))
    return out


def _per_layer(table: dict) -> dict:
    return {router: {layer: {rank: {p: t[p]["sum"] for p in t} for rank, t in e["per_rank"].items()}
                     for layer, e in entry["per_layer"].items()}
            for router, entry in table["routers"].items()}


def _close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _close(a[key], b[key], tol)
        else:
            assert a[key] == pytest.approx(b[key], abs=tol), key


def test_nsys_csv_and_sqlite_give_the_torch_traces_table(profiled, trace_report, tmp_path, capsys):
    """The run's ranges written in nsys's CSV and SQLite layouts read back to the same table."""
    _, traces, table, _ = profiled
    ranges = _ranges_of(traces)
    _push_pop_csv(tmp_path / "r_nvtx_pushpop_trace.csv", ranges)
    _sqlite(tmp_path / "r.sqlite", ranges)
    for option, path in (("--nsys-csv", "r_nvtx_pushpop_trace.csv"), ("--nsys-sqlite", "r.sqlite")):
        out = tmp_path / f"{option[2:]}.json"
        assert trace_report.main([option, str(tmp_path / path), "--out", str(out)]) == 0
        got = json.loads(out.read_text())
        assert got["source"] == option[2:] and got["time_base"] == "cpu"
        _close(_per_layer(got), _per_layer(table), tol=2e-6 * 40)  # ns-rounded ranges
    capsys.readouterr()


def _tiny_case() -> tuple[list, dict]:
    """2 ranks, 2 steps, MoE layer 1, with known GPU and CPU phase times (ns); and the
    expected table. Rank 1's experts are 3 ms longer in step 0, so its partner waits 3 ms."""
    ranges, gpu = [], {}
    ms = 1_000_000
    for rank in (0, 1):
        pid, tid = 100 + rank, 7
        for step in (0, 1):
            t = step * 100 * ms
            phase = "prefill" if step == 0 else "decode"
            experts = (4 if rank == 1 and step == 0 else 1) * ms
            combine = (1 + 3 * (rank == 0 and step == 0)) * ms
            ranges.append((step_range_name("laser", step, phase, rank, 0, False), t, t + 50 * ms,
                           pid, tid))
            at = t + ms
            for name, length in (("router", ms), ("dispatch", 2 * ms), ("experts", experts),
                                 ("combine", combine)):
                ranges.append((f"moe/{name} layer=1", at, at + length, pid, tid))
                gpu[(rank, step, name)] = length // 2  # the GPU: half of each range's CPU time
                at += length
        # a warm-up step and a range outside any step: both left out
        ranges.append((step_range_name("laser", 9, "decode", rank, 0, True), 500 * ms, 600 * ms,
                       pid, tid))
        ranges.append(("moe/experts layer=1", 510 * ms, 590 * ms, pid, tid))
        ranges.append(("moe/experts layer=1", 700 * ms, 800 * ms, pid, tid))
    return ranges, gpu


def test_nsys_readers_on_a_case_with_known_answers(trace_report, tmp_path, capsys):
    ranges, gpu = _tiny_case()
    # CPU push/pop times
    _push_pop_csv(tmp_path / "pp.csv", ranges)
    assert trace_report.main(["--nsys-csv", str(tmp_path / "pp.csv"), "--out",
                              str(tmp_path / "pp.json")]) == 0
    t = json.loads((tmp_path / "pp.json").read_text())["routers"]["laser"]
    assert t["steps"] == 2 and t["ranks"] == [0, 1]
    rank1 = t["per_layer"]["1"]["per_rank"]["1"]
    assert rank1["experts_ms"] == {"sum": pytest.approx(5.0), "mean_per_step": pytest.approx(2.5)}
    step0 = next(s for s in t["samples"] if s["step"] == 0)
    assert step0["straggler_ms"] == pytest.approx(4 - 2.5)  # max - mean of (1, 4)
    assert step0["combine_wait_ms"] == pytest.approx(2.5 - 1)  # mean - min of (4, 1)
    assert t["all"]["straggler_ms"]["max"] == pytest.approx(1.5)
    assert t["all"]["combine_wait_ms"]["p50"] == pytest.approx(0.75)  # samples 1.5 and 0
    # the GPU projection of the same ranges: half the time, nesting from the CPU times
    with (tmp_path / "proj.csv").open("w", newline="") as f:
        f.write(GPU_PROJ + "\n")
        writer = csv.writer(f)
        for name, start, end, pid, tid in ranges:
            rank = pid - 100
            step = 0 if start < 100_000_000 else 1
            kind = name.split()[0].removeprefix("moe/")
            projected = gpu.get((rank, step, kind), (end - start) // 2)
            writer.writerow([f":{name}", start + 10, projected, start, end - start, "PushPop",
                             pid, tid, 1, 0, 0, 1, "", ""])
    assert trace_report.main(["--nsys-csv", str(tmp_path / "proj.csv"), "--out",
                              str(tmp_path / "proj.json")]) == 0
    g = json.loads((tmp_path / "proj.json").read_text())
    assert g["time_base"] == "gpu"
    rank1 = g["routers"]["laser"]["per_layer"]["1"]["per_rank"]["1"]
    assert rank1["experts_ms"]["sum"] == pytest.approx(2.5)
    # SQLite with CUPTI kernels: each range launches one kernel of its GPU time
    kernels = []
    for name, start, end, pid, tid in ranges:
        if not name.startswith("moe/step"):
            step = 0 if start < 100_000_000 else 1
            ns = gpu.get((pid - 100, step, name.split()[0].removeprefix("moe/")), 1)
            kernels.append((start + 1000, pid, tid, ns))
    _sqlite(tmp_path / "k.sqlite", ranges, kernels)
    assert trace_report.main(["--nsys-sqlite", str(tmp_path / "k.sqlite"), "--out",
                              str(tmp_path / "k.json")]) == 0
    k = json.loads((tmp_path / "k.json").read_text())
    assert k["time_base"] == "gpu"
    _close(_per_layer(k), _per_layer(g), 1e-9)
    sample = next(s for s in k["routers"]["laser"]["samples"] if s["step"] == 0)
    assert sample["straggler_ms"] == pytest.approx((2 - 1.25))  # GPU experts 0.5 and 2 ms
    capsys.readouterr()


def test_cuda_kernel_time_of_a_torch_trace(trace_report, tmp_path, capsys):
    """A Chrome trace with CUDA activity (Kineto's categories): each phase's time is the GPU
    time of the kernels its CUDA runtime calls launched, correlated by id."""
    ranges, gpu = _tiny_case()
    events, corr = [], 0
    for name, start, end, pid, tid in ranges:
        events.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": pid, "tid": tid,
                       "ts": start / 1e3, "dur": (end - start) / 1e3})
        if not name.startswith("moe/step"):
            step = 0 if start < 100_000_000 else 1
            ns = gpu.get((pid - 100, step, name.split()[0].removeprefix("moe/")), 1)
            corr += 1
            events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel",
                           "pid": pid, "tid": tid, "ts": (start + 500) / 1e3, "dur": 1,
                           "args": {"correlation": corr}})
            events.append({"ph": "X", "cat": "kernel", "name": "gemm", "pid": 0, "tid": 7,
                           "ts": (start + 90_000) / 1e3, "dur": ns / 1e3,
                           "args": {"correlation": corr}})
    folder = tmp_path / "gpu"
    folder.mkdir()
    (folder / "rank0.pt.trace.json.gz").write_bytes(
        gzip.compress(json.dumps({"traceEvents": events}).encode())
    )
    assert trace_report.main([str(folder), "--out", str(tmp_path / "t.json")]) == 0
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["time_base"] == "gpu"
    per_rank = t["routers"]["laser"]["per_layer"]["1"]["per_rank"]
    assert per_rank["1"]["experts_ms"]["sum"] == pytest.approx(2.5)
    assert per_rank["0"]["combine_ms"]["sum"] == pytest.approx(2.5)  # (4 + 1) / 2
    capsys.readouterr()


# ----------------------------------------------------------------------------- bad input


def _one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err


def test_trace_report_bad_input_is_a_one_line_error(trace_report, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "rank0.pt.trace.json").write_text(json.dumps({"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 5}
    ]}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "rank0.pt.trace.json").write_text("{not json")
    steps_only = tmp_path / "steps_only"
    steps_only.mkdir()
    (steps_only / "rank0.pt.trace.json").write_text(json.dumps({"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "pid": 1, "tid": 1, "ts": 0, "dur": 5,
         "name": step_range_name("x", 0, "prefill", 0, 0, False)}
    ]}))
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    (tmp_path / "columns.csv").write_text("Start (ns),End (ns),Name\n1,2,:moe/router layer=0\n")
    (tmp_path / "bad.sqlite").write_text("not a database")
    cases = [
        ([str(tmp_path / "missing")], "no such file or directory"),
        ([str(empty)], "no traces"),
        ([str(other)], "no moe/step ranges"),
        ([str(broken)], "not a readable Chrome trace"),
        ([str(steps_only)], "no measured moe/<phase> layer=L range"),
        (["--nsys-csv", str(tmp_path / "missing.csv")], "--nsys-csv"),
        (["--nsys-csv", str(tmp_path / "bad.csv")], "nvtx_pushpop_trace"),
        (["--nsys-csv", str(tmp_path / "columns.csv")], "missing column(s) ['PID', 'TID']"),
        (["--nsys-sqlite", str(tmp_path / "bad.sqlite")], "--nsys-sqlite"),
        ([], "give one input"),
        ([str(empty), "--nsys-csv", "x.csv"], "give one input"),
        ([str(other), "--out", str(tmp_path / "t.md")], "--out"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            trace_report.main(argv)
        assert exc.value.code == 2, argv
        assert message in _one_line(capsys, "trace_report.py"), (argv, message)


def _infer():
    return _load(INFER, "infer_profile_cli")


def test_profile_directory_is_checked_before_any_process_group(tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    infer = _infer()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("RANK", raising=False)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exc:  # resolve: a file is no directory
        infer.parse_args(["--config", "tiny", "--profile", str(a_file)])
    assert exc.value.code == 2 and "--profile" in _one_line(capsys, "infer.py")
    out = str(tmp_path / "r.json")
    for profile, message in [(a_file / "sub", "cannot write there"),
                             ("/proc/traces", "cannot write there")]:
        run = infer.parse_args(["--config", "tiny", "--profile", str(profile), "--out", out,
                                "--overwrite"])
        with pytest.raises(SystemExit) as exc:
            infer.claim(run, ["infer.py"])
        assert exc.value.code == 2
        line = _one_line(capsys, "infer.py")
        assert "--profile" in line and message in line
    # another run's traces: refused, then replaced with --overwrite
    old = tmp_path / "traces" / "topk" / "rank0.pt.trace.json"
    old.parent.mkdir(parents=True)
    old.write_text("{}")
    run = infer.parse_args(["--config", "tiny", "--profile", str(old.parents[1]), "--out", out])
    with pytest.raises(SystemExit):
        infer.claim(run, ["infer.py"])
    assert "pass --overwrite" in _one_line(capsys, "infer.py") and old.exists()
    run = infer.parse_args(["--config", "tiny", "--profile", str(old.parents[1]), "--out", out,
                            "--overwrite", "--no-pin"])
    infer.claim(run, ["infer.py"])
    assert not old.exists() and run.config.pin_cores is False
    with pytest.raises(SystemExit):
        infer.parse_args(["--config", "tiny", "--set", "pin_cores=maybe"])
    assert "pin_cores must be true or false" in _one_line(capsys, "infer.py")
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------- pinning

PIN_CHECK = """
import json, os, threading
from moebalance.harness.startup import pin_to_core, release_helper_threads
allowed = sorted(os.sched_getaffinity(0))
out = {"allowed": allowed}
out["off"] = pin_to_core(False, local_rank=0, local_world_size=1)
out["too_many"] = pin_to_core(True, local_rank=0, local_world_size=len(allowed) + 1)
out["pinned"] = pin_to_core(True, local_rank=len(allowed) - 1, local_world_size=len(allowed))
out["main_after"] = sorted(os.sched_getaffinity(0))
started, stop = threading.Event(), threading.Event()
tid = []
def helper():
    tid.append(threading.get_native_id()); started.set(); stop.wait()
thread = threading.Thread(target=helper); thread.start(); started.wait()
out["helper_inherits"] = sorted(os.sched_getaffinity(tid[0]))
out["released"] = release_helper_threads(out["pinned"])
out["helper_after"] = sorted(os.sched_getaffinity(tid[0]))
out["main_still"] = sorted(os.sched_getaffinity(0))
stop.set(); thread.join()
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_pin_to_core_pins_the_model_thread_and_releases_helpers():
    done = subprocess.run([sys.executable, "-c", PIN_CHECK], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    allowed = out["allowed"]
    assert out["off"] == {"core": None, "allowed": allowed, "reason": "disabled (--no-pin)"}
    assert out["too_many"]["core"] is None and "ranks on this node" in out["too_many"]["reason"]
    assert out["pinned"] == {"core": allowed[-1], "allowed": allowed, "reason": None}
    assert out["main_after"] == out["helper_inherits"] == [allowed[-1]]
    assert out["released"] >= 1 and out["helper_after"] == allowed
    assert out["main_still"] == [allowed[-1]]


# ----------------------------------------------------------------------------- nsys.sh


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_nsys_sh_without_nsys_points_to_profile_and_splits_its_arguments(tmp_path):
    env = _env()
    if shutil.which("nsys", path=env.get("PATH")):  # keep nsys out of reach
        env["PATH"] = os.pathsep.join(
            d for d in env["PATH"].split(os.pathsep) if not (Path(d) / "nsys").exists()
        )
    args = ["--", "--nproc-per-node", "2", "scripts/infer.py", "--run-config", "demo"]
    done = subprocess.run(["bash", str(NSYS_SH), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("nsys.sh: error: nsys") and "--profile" in line
    # the commands it would run: nsys options before "--", torchrun's after, the exports, the table
    env.update(NSYS_DRY_RUN="1", NSYS_OUT=str(tmp_path / "cap"), TORCHRUN="torchrun --standalone")
    done = subprocess.run(["bash", str(NSYS_SH), "--delay", "5", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line.strip() for line in done.stdout.strip().splitlines()]
    profile = next(line for line in lines if line.startswith("nsys profile"))
    assert "--trace=cuda\\,nvtx\\,osrt\\,cublas" in profile
    assert "--delay 5 torchrun --standalone" in profile
    assert profile.endswith("--nproc-per-node 2 scripts/infer.py --run-config demo")
    assert any("--report nvtx_pushpop_trace --format csv" in line for line in lines)
    assert lines[-1].endswith(
        f"--nsys-csv {tmp_path}/cap_nvtx_pushpop_trace.csv --out {tmp_path}/cap_moe.json"
    )
