#!/usr/bin/env python
"""Run a grid of ``scripts/infer.py`` jobs and summarise them: CSV, Markdown, JSON and plots.

    python scripts/sweep.py sweep-cpu --out results/sweep_cpu
    python scripts/sweep.py my-grid.yaml --out runs/ep-sweep --launcher "srun --ntasks=1 \
        python -m torch.distributed.run --standalone --nproc-per-node {nproc}"

The grid (``moebalance.harness.sweep``: a preset name in ``moebalance/configs/grids`` or a
YAML path) is validated whole before the first run. Each run is one launch of infer.py
(``--launcher``, default a standalone torchrun with the run's ``nproc`` processes) reading
``OUT/runs/<id>.yaml`` and writing ``OUT/runs/<id>.json``; its output goes to
``OUT/logs/<id>.log``. A run whose finished JSON is already there is skipped (a rerun resumes;
``--rerun`` runs everything again); a failed run (non-zero exit, ``--run-timeout``) is recorded
with the tail of its log and the sweep goes on. After every run ``OUT/summary.{json,csv,md}``
are rewritten (atomically), so a sweep stopped half way leaves a valid summary of what
finished; the plots (``moebalance.harness.plots``) go to ``OUT/plots/`` at the end. Exit
status: 0 when every run finished, 1 when any failed, 2 on bad input.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from moebalance.config import ConfigError  # noqa: E402
from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.report import check_writable, cpu_name, git_commit, utc_now  # noqa: E402
from moebalance.harness.report import run_config_dict, write_json  # noqa: E402
from moebalance.files import write_text_atomic  # noqa: E402
from moebalance.harness.sweep import CSV_COLUMNS, Cell, load_grid, summary_rows  # noqa: E402

PROG = "sweep.py"
GRID_DIR = ROOT / "moebalance" / "configs" / "grids"
DEFAULT_LAUNCHER = f"{sys.executable} -m torch.distributed.run --standalone --nproc-per-node {{nproc}}"


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("grid", help=f"a grid preset ({', '.join(sorted(x.stem for x in GRID_DIR.glob('sweep*.yaml')))}) or a YAML path")
    p.add_argument("--out", required=True, help="the sweep's folder (runs/, logs/, summary.*, plots/)")
    p.add_argument("--launcher", default=DEFAULT_LAUNCHER,
                   help="command that starts one run's processes; {nproc} is replaced "
                        "(default: a standalone torchrun)")
    p.add_argument("--run-timeout", type=float, default=1800.0,
                   help="seconds before a run is stopped and recorded as failed (%(default)s)")
    p.add_argument("--rerun", action="store_true", help="run every cell again, even finished ones")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    try:
        preset = GRID_DIR / f"{args.grid}.yaml"
        args.grid_path = preset if preset.is_file() else Path(args.grid)
        if not args.grid_path.is_file():
            raise ConfigError(f"grid {args.grid!r} not found (a YAML file, or a preset in {GRID_DIR})")
        args.base, args.cells = load_grid(args.grid_path)
        if not math.isfinite(args.run_timeout) or args.run_timeout <= 0:
            raise ConfigError(f"--run-timeout must be a number of seconds > 0, got {args.run_timeout}")
        if "{nproc}" not in args.launcher:
            raise ConfigError("--launcher must contain {nproc} (the run's process count)")
        args.launcher_argv = shlex.split(args.launcher)
        args.out = Path(args.out).resolve()
        if not args.dry_run:
            check_writable(args.out / "runs" / "probe.json")
            check_writable(args.out / "logs" / "probe.log")
    except ConfigError as err:
        p.error(str(err))
    except (OSError, ValueError) as err:
        p.error(f"--out {args.out}: cannot write there ({getattr(err, 'strerror', None) or err})"
                if isinstance(err, OSError) else f"--launcher: {err}")
    return args


def finished(path: Path) -> dict | None:
    """The run's report when ``path`` holds a complete one (not partial), else None."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("partial") is False else None


def launch(args, cell: Cell) -> tuple[bool, str]:
    """Run one cell; (ok, a one-line reason when not)."""
    runs, logs = args.out / "runs", args.out / "logs"
    run_file = runs / f"{cell.id}.yaml"
    config = run_config_dict(cell.config(args.base))
    config.pop("out")
    config.pop("overwrite")
    write_text_atomic(run_file, yaml.safe_dump(config, sort_keys=False))
    command = [a.replace("{nproc}", str(cell.nproc)) for a in args.launcher_argv] + [
        str(ROOT / "scripts" / "infer.py"), "--run-config", str(run_file),
        "--out", str(runs / f"{cell.id}.json"), "--overwrite",
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a sweep started inside a torchrun or srun task
    with open(logs / f"{cell.id}.log", "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        try:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as err:
            return False, f"could not start the launcher: {err}"
        try:
            returncode = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            return False, f"stopped after --run-timeout {args.run_timeout:g} s"
    if returncode != 0:
        tail = (logs / f"{cell.id}.log").read_text(errors="replace").strip().splitlines()[-1:]
        return False, f"exit {returncode}: {tail[0][:300] if tail else ''}"
    if finished(runs / f"{cell.id}.json") is None:
        return False, "exit 0 but no complete JSON report"
    return True, ""


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the launcher's process group (torchrun stops its workers, srun cancels its
    step and frees the cores), SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def markdown(rows: list[dict], failures: list[dict]) -> str:
    lines = [
        "| run | router | procs | rank imbalance | max/mean load | LIS | straggler ms p50 | "
        "dropped | prefill ms | decode ms/tok | perplexity | vs top-k |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        change = "n/a" if math.isnan(r["perplexity_change"]) else f"{100 * r['perplexity_change']:+.2f}%"
        lines.append(
            f"| {r['label']} | {r['router_label']} | {r['nproc']} | {_fmt(r['rank_imbalance_p50'], '.3f')} | "
            f"{_fmt(r['max_mean_load_p50'], '.3f')} | {_fmt(r['lis_p50'], '.3f')} | "
            f"{_fmt(r['straggler_ms_p50'], '.3f')} | {100 * r['dropped_fraction']:.2f}% | "
            f"{_fmt(r['prefill_ms'], '.1f')} | {_fmt(r['decode_ms_per_token'], '.1f')} | "
            f"{_fmt(r['perplexity'], '.3f')} | {change} |"
        )
    for f in failures:
        lines.append(f"\nFailed: {f['label']} ({f['id']}): {f['reason']}")
    return "\n".join(lines) + "\n"


def write_summary(args, done: list[tuple[Cell, dict]], failures: list[dict], command: str,
                  started: float, final: bool) -> list[dict]:
    rows = summary_rows(done)
    out = args.out
    write_json(out / "summary.json", {
        "command": command,
        "grid": str(args.grid_path),
        "grid_text": args.grid_path.read_text(),
        "environment": {"git_commit": git_commit(), "time": utc_now(), "cpu": cpu_name(),
                        "cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
        "partial": not final,
        "runs_planned": len(args.cells),
        "runs_finished": len(done),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "failures": failures,
        "rows": rows,
    })
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "summary.csv", buffer.getvalue())
    header = (f"# Sweep {args.grid_path.name}\n\n`{command}`\n\n{len(done)} of "
              f"{len(args.cells)} runs finished{'' if final else ' (in progress)'}; "
              f"figures: prefill p50 over (step, layer) samples; perplexity change against "
              f"vanilla top-k of the same cell. Per-run JSON under runs/, logs under logs/.\n\n")
    write_text_atomic(out / "summary.md", header + markdown(rows, failures))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python scripts/sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        for i, cell in enumerate(args.cells, 1):
            print(f"{i:3d}  {cell.nproc} proc  {cell.label}  ({cell.id})")
        return 0
    from tqdm import tqdm

    started = time.perf_counter()
    done: list[tuple[Cell, dict]] = []
    failures: list[dict] = []
    todo = []
    for cell in args.cells:
        report = None if args.rerun else finished(args.out / "runs" / f"{cell.id}.json")
        if report is not None:
            done.append((cell, report))
        else:
            todo.append(cell)
    if done:
        print(f"{PROG}: {len(done)} of {len(args.cells)} runs already finished in {args.out} "
              f"(skipped; --rerun to run them again)", file=sys.stderr, flush=True)
    # a live bar on a terminal; one line per run in a log (SLURM output, CI)
    bar = tqdm(todo, desc=PROG, unit="run", file=sys.stderr, dynamic_ncols=True,
               disable=not sys.stderr.isatty(),
               bar_format="{desc}: run {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")
    for i, cell in enumerate(bar, 1):
        bar.set_postfix_str(cell.label)
        t0 = time.perf_counter()
        ok, reason = launch(args, cell)
        if ok:
            done.append((cell, finished(args.out / "runs" / f"{cell.id}.json")))
        else:
            failures.append({"id": cell.id, "label": cell.label, "reason": reason,
                             "log": str(Path("logs") / f"{cell.id}.log")})
        elapsed = time.perf_counter() - started
        left = elapsed / i * (len(todo) - i)
        bar.write(f"{PROG}: run {i}/{len(todo)} {'done' if ok else 'FAILED'}: {cell.label} "
                  f"({time.perf_counter() - t0:.0f} s; {elapsed:.0f} s elapsed, about {left:.0f} s "
                  f"left){'' if ok else ': ' + reason}", file=sys.stderr)
        write_summary(args, done, failures, command, started, final=False)
    bar.close()
    done.sort(key=lambda item: args.cells.index(item[0]))
    rows = write_summary(args, done, failures, command, started, final=True)
    if not args.no_plots and rows:
        from moebalance.harness.plots import write_plots

        for path in write_plots(rows, args.out / "plots"):
            print(f"{PROG}: wrote {path}", file=sys.stderr)
    print(f"{PROG}: {len(done)} of {len(args.cells)} runs finished, {len(failures)} failed; "
          f"summary in {args.out / 'summary.md'}", file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
