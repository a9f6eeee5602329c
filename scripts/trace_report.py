#!/usr/bin/env python
"""Per-layer, per-rank MoE phase times and the straggler, read back from profiler traces.

    python scripts/trace_report.py results/profile      # infer.py --profile results/profile
    python scripts/trace_report.py results/profile/topk --out topk_trace.json
    python scripts/trace_report.py --nsys-csv run_nvtx_pushpop_trace.csv   # scripts/nsys.sh
    python scripts/trace_report.py --nsys-sqlite run.sqlite      # nsys export --type sqlite

Inputs: the torch.profiler traces ``infer.py --profile DIR`` writes (every ``*.pt.trace.json``
under the folders or files given: Chrome trace JSON, ``.gz`` too), or an Nsight Systems capture
exported as ``nsys stats --report nvtx_pushpop_trace`` or ``nvtx_gpu_proj_trace`` CSV
(``--nsys-csv``) or as SQLite (``--nsys-sqlite``). Each holds the ranges of
``moebalance.telemetry.MoERecorder``: ``moe/step router=R step=N phase=P rank=K ep_group=G`` around
each model step, and inside it ``moe/<phase> layer=L`` for the router, dispatch, experts and
combine phases. Warm-up steps, and ranges outside any step (held-out quality evaluation), are
left out, as in infer.py's report.

Time base: a range's wall time on the CPU (``time_base: cpu``), or, where the capture holds GPU
activity, the GPU time of the work the range launched (``gpu``): the summed durations of the
kernels, memory copies and memsets whose launch (CUDA runtime call on the range's thread) falls
inside the range, for torch.profiler traces with CUDA activity and SQLite exports with CUPTI
tables; the projected GPU duration of the range for ``nvtx_gpu_proj_trace`` CSV. Busy time
leaves out the idle gaps that infer.py's CUDA events (elapsed stream time) include.

Output, per router: per layer and rank the sum over the measured steps and the mean per step
(ms) of each phase; per (EP group, step, layer) sample the straggler and the combine wait, as
``moebalance.telemetry_stats`` defines them for infer.py's report:

- straggler (ms) = max over the EP group's ranks of experts time - mean over them;
- combine wait (ms) = mean over the ranks of combine time - min over them (the time spent at
  the combine beyond the shortest one, which is the transfer itself);

with their spread over the samples (p5, p25, p50, p75, p95, mean, max), per layer and overall.
A markdown table goes to stdout, the JSON to ``--out``. Bad input exits 2 with one line.
"""

from __future__ import annotations

import bisect
import csv
import gzip
import json
import re
import sqlite3
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.cli import fail as cli_fail  # noqa: E402
from moebalance.harness.report import TRACE_SUFFIX, write_text_atomic  # noqa: E402
from moebalance.telemetry import PHASES, RANGES  # noqa: E402
from moebalance.telemetry_stats import combine_wait_ms, straggler_ms, timing_stats  # noqa: E402

PROG = "trace_report.py"
STEP_RE = re.compile(
    r"moe/step router=(?P<router>\S+) step=(?P<step>\d+) phase=(?P<phase>\w+) "
    r"rank=(?P<rank>\d+) ep_group=(?P<ep_group>\d+)(?P<warmup> warmup)?$"
)
PHASE_RE = re.compile(r"moe/(?P<name>" + "|".join(RANGES) + r") layer=(?P<layer>\d+)$")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
PUSH_POP_HEADER = "Start (ns)"
GPU_PROJ_HEADER = "Name"
_TID_SHIFT = 0x1000000  # nsys: globalTid = (... pid) * 2**24 + tid


class TraceError(Exception):
    """Bad input: the message is the one-line error."""


@dataclass
class Range:
    """One NVTX / profiler range: its name (from ``moe/``), CPU start and end (ns), the thread
    it ran on, and the GPU time of the work it launched (ns; None when the capture has no GPU
    activity)."""

    name: str
    start: float
    end: float
    thread: Any
    gpu_ns: Optional[float] = None


def fail(message: str) -> None:
    cli_fail(PROG, message)


def _moe_name(name: str) -> Optional[str]:
    """The range's name from ``moe/`` on (nsys prefixes a domain: ``:moe/...``), else None."""
    at = name.find("moe/")
    return name[at:] if at >= 0 else None


# ----------------------------------------------------------------------------- torch.profiler


def find_traces(paths: list[Path]) -> list[Path]:
    """Every torch.profiler trace under ``paths`` (folders searched recursively)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.name.endswith((TRACE_SUFFIX, TRACE_SUFFIX + ".gz"))
            )
        elif path.is_file():
            found.append(path)
        else:
            raise TraceError(f"{path}: no such file or directory")
    if not found:
        raise TraceError(
            f"no traces (*{TRACE_SUFFIX}) under {', '.join(map(str, paths))}; record them with "
            "infer.py --profile DIR"
        )
    return found


def _load_chrome_trace(path: Path) -> list[dict]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        data = json.loads(raw)
    except (OSError, ValueError, EOFError) as err:
        raise TraceError(f"{path}: not a readable Chrome trace JSON ({err})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise TraceError(f"{path}: not a Chrome trace (no traceEvents list)")
    return [e for e in events if isinstance(e, dict)]


def _gpu_time_per_launch(events: list[dict]) -> dict[Any, tuple[list[float], list[float]]]:
    """{thread: (sorted launch times in ns, cumulative GPU ns of what they launched)} from the
    CUDA runtime calls and the GPU ops that share their correlation id."""
    gpu_ns: dict[Any, float] = defaultdict(float)
    for e in events:
        if e.get("cat") in GPU_CATEGORIES and e.get("ph") == "X":
            correlation = (e.get("args") or {}).get("correlation")
            if correlation is not None:
                gpu_ns[correlation] += float(e.get("dur", 0)) * 1e3
    if not gpu_ns:
        return {}
    launches: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e.get("cat") in LAUNCH_CATEGORIES and e.get("ph") == "X":
            correlation = (e.get("args") or {}).get("correlation")
            if correlation in gpu_ns:
                launches[(e.get("pid"), e.get("tid"))].append(
                    (float(e["ts"]) * 1e3, gpu_ns[correlation])
                )
    return {thread: _cumulative(items) for thread, items in launches.items()}


def _cumulative(items: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    items.sort()
    times, totals, total = [], [0.0], 0.0
    for at, ns in items:
        times.append(at)
        total += ns
        totals.append(total)
    return times, totals


def _launched_within(launches, thread, start: float, end: float) -> float:
    times, totals = launches.get(thread, ([], [0.0]))
    lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
    return totals[hi] - totals[lo]


def chrome_ranges(path: Path) -> tuple[list[Range], bool]:
    """The ``moe/*`` ranges of one torch.profiler trace and whether it holds GPU activity."""
    events = _load_chrome_trace(path)
    launches = _gpu_time_per_launch(events)
    out = []
    for e in events:
        if e.get("cat") != "user_annotation" or e.get("ph") != "X":
            continue
        name = _moe_name(str(e.get("name", "")))
        if name is None:
            continue
        start = float(e["ts"]) * 1e3
        end = start + float(e.get("dur", 0)) * 1e3
        thread = (e.get("pid"), e.get("tid"))
        gpu = _launched_within(launches, thread, start, end) if launches else None
        out.append(Range(name, start, end, (str(path), thread), gpu))
    return out, bool(launches)


# ----------------------------------------------------------------------------- nsys


def nsys_csv_ranges(path: Path) -> tuple[list[Range], bool]:
    """Ranges of an ``nsys stats --format csv`` export: ``nvtx_pushpop_trace`` (CPU push/pop
    times) or ``nvtx_gpu_proj_trace`` (GPU projection; nesting from the original CPU times)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        raise TraceError(f"--nsys-csv {path}: cannot read ({err.strerror or err})") from None
    header_at = next(
        (i for i, line in enumerate(lines)
         if line.startswith(PUSH_POP_HEADER) or line.startswith(GPU_PROJ_HEADER + ",")),
        None,
    )
    if header_at is None:
        raise TraceError(
            f"--nsys-csv {path}: no nvtx_pushpop_trace or nvtx_gpu_proj_trace header "
            f"('Start (ns),End (ns),...' or 'Name,Projected Start (ns),...')"
        )
    rows = list(csv.DictReader(lines[header_at:]))
    fields = set(rows[0]) if rows else set(next(csv.reader([lines[header_at]])))
    projected = "Projected Duration (ns)" in fields
    need = (
        {"Name", "Orig Start (ns)", "Orig Duration (ns)", "Projected Duration (ns)", "PID", "TID"}
        if projected else {"Name", "Start (ns)", "End (ns)", "PID", "TID"}
    )
    if not need <= fields:
        raise TraceError(f"--nsys-csv {path}: missing column(s) {sorted(need - fields)}")
    out = []
    try:
        for row in rows:
            name = _moe_name(row["Name"])
            if name is None:
                continue
            thread = (row["PID"], row["TID"])
            if projected:
                start = float(row["Orig Start (ns)"])
                end = start + float(row["Orig Duration (ns)"])
                gpu = float(row["Projected Duration (ns)"] or 0)
            else:
                start, end, gpu = float(row["Start (ns)"]), float(row["End (ns)"]), None
            out.append(Range(name, start, end, thread, gpu))
    except (TypeError, ValueError) as err:
        raise TraceError(f"--nsys-csv {path}: a row with a bad number ({err})") from None
    return out, projected


def nsys_sqlite_ranges(path: Path) -> tuple[list[Range], bool]:
    """Push/pop ranges of an ``nsys export --type sqlite`` database (table NVTX_EVENTS, names in
    ``text`` or StringIds), with the GPU time of what each launched when the CUPTI kernel /
    memcpy / memset and runtime tables are there."""
    if not path.is_file():
        raise TraceError(f"--nsys-sqlite {path}: no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise TraceError(f"--nsys-sqlite {path}: not an SQLite database ({err})") from None
    if "NVTX_EVENTS" not in tables:
        raise TraceError(
            f"--nsys-sqlite {path}: no NVTX_EVENTS table (captured with --trace=nvtx?)"
        )
    try:
        push_pop = 59  # NvtxPushPopRange, unless the file's enum says otherwise
        if "ENUM_NSYS_EVENT_TYPE" in tables:
            row = db.execute(
                "SELECT id FROM ENUM_NSYS_EVENT_TYPE WHERE name = 'NvtxPushPopRange'"
            ).fetchone()
            push_pop = row[0] if row else push_pop
        join = "LEFT JOIN StringIds s ON s.id = n.textId" if "StringIds" in tables else ""
        text = "COALESCE(n.text, s.value)" if join else "n.text"
        nvtx = db.execute(
            f"SELECT n.start, n.end, {text}, n.globalTid FROM NVTX_EVENTS n {join} "
            "WHERE n.eventType = ? AND n.end IS NOT NULL",
            (push_pop,),
        ).fetchall()
        launches: dict[Any, tuple[list[float], list[float]]] = {}
        if "CUPTI_ACTIVITY_KIND_RUNTIME" in tables:
            gpu_ns: dict[tuple[int, int], float] = defaultdict(float)
            for table in ("CUPTI_ACTIVITY_KIND_KERNEL", "CUPTI_ACTIVITY_KIND_MEMCPY",
                          "CUPTI_ACTIVITY_KIND_MEMSET"):
                if table in tables:
                    for pid, start, end, correlation in db.execute(
                        f"SELECT globalPid, start, end, correlationId FROM {table}"
                    ):
                        gpu_ns[(pid // _TID_SHIFT, correlation)] += end - start
            if gpu_ns:
                per_thread: dict[Any, list[tuple[float, float]]] = defaultdict(list)
                for start, tid, correlation in db.execute(
                    "SELECT start, globalTid, correlationId FROM CUPTI_ACTIVITY_KIND_RUNTIME"
                ):
                    ns = gpu_ns.get((tid // _TID_SHIFT, correlation))
                    if ns is not None:
                        per_thread[tid].append((float(start), ns))
                launches = {t: _cumulative(items) for t, items in per_thread.items()}
    except sqlite3.DatabaseError as err:
        raise TraceError(f"--nsys-sqlite {path}: unexpected schema ({err})") from None
    finally:
        db.close()
    out = []
    for start, end, name, tid in nvtx:
        name = _moe_name(name or "")
        if name is not None:
            gpu = _launched_within(launches, tid, start, end) if launches else None
            out.append(Range(name, float(start), float(end), tid, gpu))
    return out, bool(launches)


# ----------------------------------------------------------------------------- the table


def collect(ranges: Iterable[Range], source: str) -> dict[str, list[dict]]:
    """{router: records}, one record per (rank, measured step, layer) like a ``LayerStep``:
    rank, ep_group, step, phase, layer and ``<phase>_ms`` (summed over the ranges of that
    phase, as the recorder sums the calls of a layer in a step)."""
    steps: dict[Any, list[tuple[float, float, Optional[dict]]]] = defaultdict(list)
    phases: list[tuple[Range, re.Match]] = []
    for r in ranges:
        if match := STEP_RE.match(r.name):
            info = None if match["warmup"] else match.groupdict()
            steps[r.thread].append((r.start, r.end, info))
        elif match := PHASE_RE.match(r.name):
            phases.append((r, match))
    if not steps:
        raise TraceError(
            f"{source}: no moe/step ranges (traces of infer.py --profile DIR, or of a run under "
            "nsys with NVTX tracing, hold them)"
        )
    starts = {}
    for thread, items in steps.items():
        items.sort(key=lambda item: item[0])
        starts[thread] = [item[0] for item in items]
    records: dict[tuple, dict] = {}
    seen_steps: set[tuple] = set()
    for thread, items in steps.items():
        for _, _, info in items:
            if info is not None:
                key = (info["router"], int(info["rank"]), int(info["step"]))
                if key in seen_steps:
                    raise TraceError(
                        f"{source}: rank {key[1]}'s step {key[2]} of router {key[0]} appears "
                        "twice; give the traces of one run"
                    )
                seen_steps.add(key)
    for r, match in phases:
        items = steps.get(r.thread)
        if not items:
            continue
        at = bisect.bisect_right(starts[r.thread], r.start) - 1
        if at < 0:
            continue
        start, end, info = items[at]
        if info is None or r.end > end + 1.0:  # a warm-up step, or outside every step
            continue
        layer = int(match["layer"])
        key = (info["router"], int(info["rank"]), int(info["step"]), layer)
        record = records.get(key)
        if record is None:
            record = records[key] = {
                "router": info["router"], "rank": int(info["rank"]),
                "ep_group": int(info["ep_group"]), "step": int(info["step"]),
                "phase": info["phase"], "layer": layer, **{f"{n}_ms": 0.0 for n in RANGES},
            }
        ns = r.gpu_ns if r.gpu_ns is not None else r.end - r.start
        record[f"{match['name']}_ms"] += ns / 1e6
    if not records:
        raise TraceError(
            f"{source}: moe/step ranges but no measured moe/<phase> layer=L range inside them"
        )
    by_router: dict[str, list[dict]] = defaultdict(list)
    for key in sorted(records):
        by_router[key[0]].append(records[key])
    return dict(by_router)


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def samples_of(records: list[dict]) -> list[dict]:
    """One sample per (EP group, step, layer): per-rank phase times (rank order) and its
    straggler and combine wait (``moebalance.telemetry_stats``)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["ep_group"], r["step"], r["layer"])].append(r)
    size: dict[int, int] = defaultdict(int)
    for (group, _, _), rows in groups.items():
        size[group] = max(size[group], len(rows))
    out = []
    for (group, step, layer), rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["rank"])
        times = {f"{n}_ms": [r[f"{n}_ms"] for r in rows] for n in RANGES}
        complete = len(rows) == size[group]
        out.append({
            "ep_group": group, "step": step, "phase": rows[0]["phase"], "layer": layer,
            "ranks": [r["rank"] for r in rows], **times,
            # a sample missing a rank (a trace not given) has no cross-rank figure
            "straggler_ms": float(straggler_ms(_tensor(times["experts_ms"]))) if complete else None,
            "combine_wait_ms": float(combine_wait_ms(_tensor(times["combine_ms"])))
            if complete else None,
        })
    return out


def _spread(samples: list[dict]) -> dict[str, Any]:
    return {
        "samples": len(samples),
        **{k: timing_stats([s[k] for s in samples if s[k] is not None])
           for k in ("straggler_ms", "combine_wait_ms")},
    }


def router_table(records: list[dict]) -> dict[str, Any]:
    """The per-layer, per-rank phase times and the straggler figures of one router."""
    ranks = sorted({r["rank"] for r in records})
    steps_of_rank = {rank: {r["step"] for r in records if r["rank"] == rank} for rank in ranks}
    step_phase = {r["step"]: r["phase"] for r in records}
    per_layer: dict[str, Any] = {}
    samples = samples_of(records)
    for layer in sorted({r["layer"] for r in records}):
        rows = {r["rank"]: [] for r in records}
        for r in records:
            if r["layer"] == layer:
                rows[r["rank"]].append(r)
        per_rank = {}
        for rank, mine in sorted(rows.items()):
            if not mine:
                continue
            n = len(steps_of_rank[rank])
            per_rank[str(rank)] = {
                f"{p}_ms": {"sum": sum(r[f"{p}_ms"] for r in mine),
                            "mean_per_step": sum(r[f"{p}_ms"] for r in mine) / n}
                for p in RANGES
            }
        per_layer[str(layer)] = {
            "per_rank": per_rank, **_spread([s for s in samples if s["layer"] == layer]),
        }
    return {
        "ranks": ranks,
        "steps": len(step_phase),
        "steps_per_phase": {p: sum(1 for v in step_phase.values() if v == p) for p in PHASES},
        "per_layer": per_layer,
        "all": _spread(samples),
        **{p: _spread([s for s in samples if s["phase"] == p]) for p in PHASES},
        "samples": samples,
    }


def build_report(ranges: list[Range], gpu: bool, source: str, inputs: list[str]) -> dict:
    return {
        "source": source,
        "inputs": inputs,
        "time_base": "gpu" if gpu else "cpu",
        "definitions": {
            "phase_ms": "per rank, the sum over the measured steps (sum) and that sum / the "
            "rank's measured steps (mean_per_step) of the phase's ranges in the layer",
            "straggler_ms": "per (EP group, step, layer): max over ranks of experts ms - mean "
            "over ranks (moebalance.telemetry_stats.straggler_ms)",
            "combine_wait_ms": "per (EP group, step, layer): mean over ranks of combine ms - "
            "min over ranks (moebalance.telemetry_stats.combine_wait_ms)",
        },
        "routers": {router: router_table(records)
                    for router, records in collect(ranges, source).items()},
    }


def _fmt(value: Optional[float], spec: str = ".3f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def markdown(report: dict) -> str:
    """Per router: the per-layer, per-rank phase table, then the straggler per layer."""
    base = "GPU time of launched work" if report["time_base"] == "gpu" else "CPU wall time"
    lines = []
    for router, t in report["routers"].items():
        counts = ", ".join(f"{n} {p}" for p, n in t["steps_per_phase"].items() if n)
        lines += [
            f"## {router}: ranks {', '.join(map(str, t['ranks']))}; {t['steps']} measured "
            f"steps ({counts}); {base} ({report['source']})",
            "",
            "ms per layer and rank: sum over the steps (mean per step)",
            "",
            "| layer | rank | " + " | ".join(RANGES) + " |",
            "|---:|---:|" + "---:|" * len(RANGES),
        ]
        for layer, entry in t["per_layer"].items():
            for rank, times in entry["per_rank"].items():
                cells = " | ".join(
                    f"{_fmt(times[f'{p}_ms']['sum'])} ({_fmt(times[f'{p}_ms']['mean_per_step'])})"
                    for p in RANGES
                )
                lines.append(f"| {layer} | {rank} | {cells} |")
        lines += [
            "",
            "straggler = max - mean over ranks of experts ms; combine wait = mean - min over "
            "ranks of combine ms (per step, ms)",
            "",
            "| layer | straggler p5 | p50 | p95 | combine wait p5 | p50 | p95 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for layer, entry in [*t["per_layer"].items(), ("all", t["all"])]:
            s, w = entry["straggler_ms"], entry["combine_wait_ms"]
            lines.append(
                f"| {layer} | {_fmt(s['p5'])} | {_fmt(s['p50'])} | {_fmt(s['p95'])} | "
                f"{_fmt(w['p5'])} | {_fmt(w['p50'])} | {_fmt(w['p95'])} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def parse_args(argv: Optional[list[str]] = None):
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("traces", nargs="*", type=Path,
                        help="folders (searched recursively) or files of infer.py --profile traces")
    parser.add_argument("--nsys-csv", type=Path, metavar="FILE",
                        help="nsys stats --report nvtx_pushpop_trace (or nvtx_gpu_proj_trace) "
                        "--format csv output")
    parser.add_argument("--nsys-sqlite", type=Path, metavar="FILE",
                        help="nsys export --type sqlite output")
    parser.add_argument("--out", type=Path, metavar="FILE.json", help="write the JSON here")
    args = parser.parse_args(argv)
    given = [bool(args.traces), args.nsys_csv is not None, args.nsys_sqlite is not None]
    if sum(given) != 1:
        fail("give one input: trace folders / files, --nsys-csv FILE or --nsys-sqlite FILE")
    if args.out is not None and (args.out.suffix != ".json" or args.out.is_dir()):
        fail(f"--out {args.out}: expected a .json file path")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.nsys_csv is not None:
            if not args.nsys_csv.is_file():
                raise TraceError(f"--nsys-csv {args.nsys_csv}: no such file")
            ranges, gpu = nsys_csv_ranges(args.nsys_csv)
            source, inputs = "nsys-csv", [str(args.nsys_csv)]
        elif args.nsys_sqlite is not None:
            ranges, gpu = nsys_sqlite_ranges(args.nsys_sqlite)
            source, inputs = "nsys-sqlite", [str(args.nsys_sqlite)]
        else:
            files = find_traces(args.traces)
            ranges, kinds = [], set()
            for path in files:
                found, has_gpu = chrome_ranges(path)
                ranges += found
                kinds.add(has_gpu)
            if len(kinds) > 1:
                raise TraceError("the traces mix captures with and without GPU activity")
            gpu = kinds == {True}
            source, inputs = "torch.profiler", [str(p) for p in files]
        report = build_report(ranges, gpu, source, inputs)
    except TraceError as err:
        fail(str(err))
    print(markdown(report), end="")
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.out, json.dumps(report, indent=1) + "\n")
        except OSError as err:
            fail(f"--out {args.out}: cannot write there ({err.strerror or err})")
        print(f"{PROG}: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
