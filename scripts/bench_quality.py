#!/usr/bin/env python
"""Quality against balance on a trained MoE at EP 4: what each balancing router costs in
held-out perplexity, and what it buys in MV, dropped fraction and straggler time.

    python scripts/bench_quality.py            # launches torchrun --nproc-per-node 4 itself
    python scripts/bench_quality.py --framework deepspeed --ep 2 --out results/quality_ds.json
    python scripts/bench_quality.py --rows 'laser' --reuse-calibration   # a subset of the rows

Every router of the grid (``--grid``, default ``moebalance/configs/grids/quality.yaml``; rows in
``load_rows``) runs on the same model (``--checkpoint``, default ``moebalance/checkpoints/tiny-moe``,
routers swapped in, weights unchanged) over the same held-out sequences of every domain of the
default corpus (``moebalance.corpus``), teacher-forced, with expert parallelism over ``--ep``
ranks: each rank evaluates its own ``--seqs`` sequences per domain through the EP model in
lockstep, ``--chunk`` sequences per forward call, under ``torch.inference_mode``.

LASER's parameters in a row: ``args``, over ``args_file`` (a YAML file, ``paper`` for the
paper's defaults, ``calibrated`` for the model's shipped ``laser.yaml``); a ``laser`` row with
neither runs what ``infer.py --router laser`` runs (the calibrated file of a shipped model).
Rows with ``calibrate`` ({ppl_budget: B} or {kl_budget: B}) are calibrated first, before the
EP job, by ``scripts/calibrate_laser.py`` on ``--calibration-domain`` (one run per budget kind,
its files in ``<out>.calibration/``; ``--reuse-calibration`` keeps files already there).

Per router: perplexity and its change against the first row (vanilla top-k), overall and per
domain, next-token accuracy, dropped fraction (of token-expert assignments), MV (max / mean - 1
of the EP-global expert loads, overall and per domain) and straggler time (max - mean over
ranks of expert compute time, ms) as p50 / mean over the (forward call, layer) samples
(``moebalance.telemetry_stats.summarize``). Rank 0 writes ``--out`` (JSON), a markdown table
beside it (.md) with LASER's trade-off (MV against perplexity, rows grouped by their ``curve``)
and, with matplotlib, the trade-off plot (.png), atomically. On a 2-core box 4 ranks share 2
cores, so straggler times are indicative only; the routing figures are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance.config import ConfigError, read_yaml_mapping  # noqa: E402
from moebalance.corpus import DEFAULT_DOMAINS  # noqa: E402
from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.config import FRAMEWORKS  # noqa: E402
from moebalance.model_config import load_model_config, trained_checkpoint  # noqa: E402
from moebalance.policies import make_params  # noqa: E402

PROG = "bench_quality.py"
DEFAULT_GRID = ROOT / "moebalance" / "configs" / "grids" / "quality.yaml"


class Row(NamedTuple):
    """One grid row: ``label``, ``router``, its parameters (``params``: None for a
    ``calibrate`` row until its file exists), where LASER's came from (``source``: "args",
    "paper", "calibrated: <file>", a file path, or "calibrate <kind> <budget>"), the
    trade-off ``curve`` it belongs to (None: none) and ``calibrate`` ((kind, budget) or None)."""

    label: str
    router: str
    params: Any
    source: str
    curve: Optional[str] = None
    calibrate: Optional[tuple[str, float]] = None


ROW_KEYS = {"label", "router", "args", "args_file", "calibrate", "models", "curve"}


def calibration_file(work: Path, kind: str, budget: float) -> Path:
    """Where the calibration of a ``calibrate`` row is written (``{budget}`` of calibrate_laser)."""
    return work / f"laser_{kind}{budget:g}.yaml"


def load_rows(
    path: str | Path,
    *,
    checkpoint: Optional[str] = None,
    model_name: Optional[str] = None,
    work: Optional[Path] = None,
) -> tuple[list[Row], list[str]]:
    """(rows, labels left out) from a grid file: ``routers``, a list of mappings with
    ``router`` and optional ``label``, ``args`` (parameters), ``args_file`` (LASER routers: a
    YAML path, relative to the repository root or absolute, ``paper`` or ``calibrated``),
    ``calibrate`` (LASER routers: {ppl_budget: B} or {kl_budget: B}), ``models`` (the model
    names the row is for; others leave it out) and ``curve`` (its trade-off series). A
    ``calibrate`` row's parameters are read from ``work`` when its file is there.
    ConfigError on anything else."""
    from moebalance.harness.config import (
        CALIBRATED_ARGS, CALIBRATED_BY_DEFAULT, CALIBRATED_ROUTERS, PAPER_ARGS,
        calibrated_laser_file,
    )

    if checkpoint is None:
        checkpoint = str(trained_checkpoint()[0])
    data = read_yaml_mapping(path, "--grid")
    rows = data.get("routers")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"--grid {path}: expected a non-empty list under 'routers'")
    out, left_out = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) - ROW_KEYS or "router" not in row:
            raise ConfigError(
                f"--grid {path}: row {i} must be a mapping with router and optional "
                f"{sorted(ROW_KEYS - {'router'})}"
            )
        where = f"--grid {path}: row {i}"
        label = str(row.get("label", row["router"]))
        models = row.get("models")
        if models is not None and (not isinstance(models, list)
                                   or not all(isinstance(m, str) for m in models)):
            raise ConfigError(f"{where}: models must be a list of model names")
        curve = row.get("curve")
        if curve is not None and not isinstance(curve, str):
            raise ConfigError(f"{where}: curve must be a string")
        if not isinstance(row.get("args") or {}, dict):
            raise ConfigError(f"{where}: args must be a mapping")
        args = dict(row.get("args") or {})
        args_file, calibrate = row.get("args_file"), row.get("calibrate")
        lasers = row["router"] in CALIBRATED_ROUTERS
        source = "args" if args else (PAPER_ARGS if lasers else "defaults")
        if (args_file is not None or calibrate is not None) and not lasers:
            raise ConfigError(f"{where}: args_file and calibrate are for {CALIBRATED_ROUTERS}")
        if args_file is not None and calibrate is not None:
            raise ConfigError(f"{where}: give args_file or calibrate, not both")
        if calibrate is not None:
            if not (isinstance(calibrate, dict) and len(calibrate) == 1
                    and set(calibrate) <= {"ppl_budget", "kl_budget"}):
                raise ConfigError(f"{where}: calibrate must be {{ppl_budget: B}} or {{kl_budget: B}}")
            (key, budget), = calibrate.items()
            if not (isinstance(budget, (int, float)) and not isinstance(budget, bool)
                    and math.isfinite(budget) and budget >= 0):
                raise ConfigError(f"{where}: calibrate {key} must be a finite number >= 0")
            calibrate = (key.split("_")[0], float(budget))
            source = f"calibrate {calibrate[0]} {calibrate[1]:g}"
        if models is not None and model_name is not None and model_name not in models:
            left_out.append(label)
            continue
        if args_file is None and calibrate is None and not args and (
                row["router"] in CALIBRATED_BY_DEFAULT):
            args_file = CALIBRATED_ARGS if calibrated_laser_file(checkpoint) else PAPER_ARGS
        file_args: dict = {}
        if args_file == PAPER_ARGS:
            source = PAPER_ARGS
        elif args_file == CALIBRATED_ARGS:
            found = calibrated_laser_file(checkpoint)
            if found is None:
                raise ConfigError(f"{where}: the model has no calibrated LASER file (laser.yaml)")
            file_args = read_yaml_mapping(found, f"{where}: args_file")
            source = f"calibrated: {_shown(found)}"
        elif args_file is not None:
            found = Path(args_file) if Path(args_file).is_absolute() else ROOT / args_file
            file_args = read_yaml_mapping(found, f"{where}: args_file")
            source = str(args_file)
        elif calibrate is not None and work is not None:
            found = calibration_file(work, *calibrate)
            if found.is_file():
                file_args = read_yaml_mapping(found, f"{where}: calibration")
            else:
                file_args = None
        elif calibrate is not None:
            file_args = None
        params = None
        if file_args is not None:
            try:
                params = make_params(row["router"], {**file_args, **args})
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
        out.append(Row(label, row["router"], params, source, curve, calibrate))
    return out, left_out


def load_grid(path: str | Path, **kwargs) -> list[tuple[str, str, object]]:
    """[(label, router, params dataclass)] of ``load_rows`` (params None for a ``calibrate``
    row not calibrated yet)."""
    rows, _ = load_rows(path, **kwargs)
    return [(r.label, r.router, r.params) for r in rows]


def parse_args(argv=None) -> argparse.Namespace:
    """Options, validated before anything starts (exit 2 with one line on bad input)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    # --nproc is read here only: the relaunch passes it on as --ep, since torchrun would take
    # "--nproc" for its own --nproc-per-node
    p.add_argument("--ep", "--nproc", dest="ep", type=int, default=4,
                   help="ranks = EP size (default: %(default)s)")
    p.add_argument("--seqs", type=int, default=16, help="sequences per domain and rank (%(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (%(default)s)")
    p.add_argument("--chunk", type=int, default=8, help="sequences per forward (%(default)s)")
    p.add_argument("--checkpoint", default=None, help="default: moebalance/checkpoints/tiny-moe")
    p.add_argument("--grid", default=str(DEFAULT_GRID), help="router grid YAML (%(default)s)")
    p.add_argument("--framework", default="megatron", choices=FRAMEWORKS)
    p.add_argument("--out", default=str(ROOT / "results" / "quality_cpu.json"))
    p.add_argument("--rows", default=None, metavar="REGEX",
                   help="only the grid rows whose label matches (the first row, the baseline, "
                   "always runs)")
    p.add_argument("--calibration-domain", default="prose", choices=DEFAULT_DOMAINS,
                   help="held-out text the grid's calibrate rows are calibrated on (%(default)s)")
    p.add_argument("--reuse-calibration", action="store_true",
                   help="keep calibration files already in <out>.calibration/")
    args = p.parse_args(argv)
    for name in ("ep", "seqs", "seq_len", "chunk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        checkpoint, config = trained_checkpoint()
        if args.checkpoint:
            checkpoint = Path(args.checkpoint)
            config = checkpoint.parent / "config.yaml"
        args.checkpoint, args.model = str(checkpoint), load_model_config(config)
        if args.seq_len + 1 > args.model.max_sequence_length:
            raise ConfigError(
                f"--seq-len must be < the model's max_sequence_length {args.model.max_sequence_length}"
            )
        if args.model.num_experts % args.ep:
            raise ConfigError(f"--ep {args.ep} must divide num_experts {args.model.num_experts}")
        if args.rows is not None:
            try:
                pattern = re.compile(args.rows)
            except re.error as err:
                raise ConfigError(f"--rows {args.rows!r} is not a regular expression ({err})") from None
        out = Path(args.out)  # the worker runs in the repository root: paths from there
        args.work = (out if out.is_absolute() else ROOT / out).with_suffix(".calibration")
        rows, args.left_out = load_rows(
            args.grid, checkpoint=args.checkpoint, model_name=args.model.name, work=args.work
        )
        if args.rows is not None:
            rows = rows[:1] + [r for r in rows[1:] if pattern.search(r.label)]
        labels = [r.label for r in rows]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--grid {args.grid}: labels must be distinct")
        args.grid_rows = rows
    except ConfigError as err:
        p.error(str(err))
    return args


def _shown(path) -> str:
    """``path`` relative to the repository root when it lies inside (commands run from there,
    and their records then read the same on every machine), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def calibrate_rows(args: argparse.Namespace) -> int:
    """Run scripts/calibrate_laser.py for the rows with ``calibrate``: one run per budget kind,
    all its budgets in one sweep, files in ``args.work``. Returns its exit status (0: done)."""
    wanted: dict[str, set] = {}
    for row in args.grid_rows:
        if row.calibrate is not None:
            kind, budget = row.calibrate
            if not (args.reuse_calibration and calibration_file(args.work, kind, budget).is_file()):
                wanted.setdefault(kind, set()).add(budget)
    for kind, budgets in sorted(wanted.items()):
        command = [
            sys.executable, str(ROOT / "scripts" / "calibrate_laser.py"),
            "--checkpoint", _shown(args.checkpoint), "--domain", args.calibration_domain,
            "--seq-len", str(args.seq_len), "--chunk", str(args.chunk),
            f"--{kind}-budget", ",".join(f"{b:g}" for b in sorted(budgets)),
            "--out", _shown(args.work / f"laser_{kind}{{budget}}.yaml"), "--overwrite",
        ]
        print(f"{PROG}: calibrating LASER ({kind} budgets {sorted(budgets)}) on "
              f"{args.calibration_domain}", file=sys.stderr, flush=True)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        env.pop("WORLD_SIZE", None)
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        if done.returncode:
            return done.returncode
    return 0


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Calibrate the grid's calibrate rows, then re-run this script under torchrun with
    ``--ep`` ranks."""
    status = calibrate_rows(args)
    if status:
        return status
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    argv = ["--ep" + a[len("--nproc"):] if a == "--nproc" or a.startswith("--nproc=") else a
            for a in argv]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(args.ep), __file__, *argv,
    ]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def worker(args: argparse.Namespace) -> int:
    from moebalance.corpus import default_corpus, heldout_sequences
    from moebalance.harness import get_framework
    from moebalance.harness.framework import quiet_import_warnings
    from moebalance.harness.quality import heldout_quality
    from moebalance.telemetry import MoERecorder, gather_to_rank0
    from moebalance.telemetry_stats import summarize

    missing = [r.label for r in args.grid_rows if r.params is None]
    if missing:
        raise ConfigError(f"rows {missing} are not calibrated (run without torchrun)")
    quiet_import_warnings()
    framework = get_framework(args.framework)
    setup = framework.init_distributed(None, 300.0)
    rank, world = setup.rank, setup.world_size
    cfg = args.model
    model = framework.build_model(
        cfg, setup, router="topk", router_params=None, load_scope="local",
        dispatcher=framework.dispatchers[0], checkpoint=args.checkpoint,
    )
    recorder = MoERecorder(setup.device, rank=rank, ep_rank=setup.ep_rank, ep_group=setup.ep_group)
    framework.instrument(model, recorder)
    corpus = default_corpus()
    sequences = {
        d: heldout_sequences(corpus, d, args.seqs * world, args.seq_len)[rank::world]
        for d in corpus.domains
    }
    # heldout_quality evaluates the domains in sorted order, one recorder step per forward call
    steps, first = {}, 0
    for d in sorted(sequences):
        calls = math.ceil(len(sequences[d]) / args.chunk)
        steps[d] = range(first, first + calls)
        first += calls

    results = []
    started = time.perf_counter()
    for row in args.grid_rows:
        framework.swap_router(model, row.router, row.params, "local")
        recorder.clear()
        quality = heldout_quality(
            model, sequences, setup.device, chunk=args.chunk, recorder=recorder
        )
        parts = gather_to_rank0(recorder.records())
        if rank == 0:
            records = [r for part in parts for r in part]
            summary = summarize(records, cfg.topk)
            by_domain = {
                d: summarize([r for r in records if r["step"] in span], cfg.topk)["prefill"]
                for d, span in steps.items()
            }
            summary = summary["prefill"]
            results.append({
                "label": row.label,
                "router": row.router,
                "router_params": dataclasses.asdict(row.params),
                "params_source": row.source,
                "curve": row.curve,
                "quality": quality,
                "dropped_fraction": summary["dropped_fraction"],
                "max_violation": summary["max_violation"],
                "max_violation_by_domain": {d: s["max_violation"] for d, s in by_domain.items()},
                "rank_imbalance": summary["rank_imbalance"],
                "straggler_ms": summary["straggler_ms"],
            })
            print(f"{PROG}: {row.label:<26} done ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    if rank == 0:
        write_outputs(args, results, time.perf_counter() - started, world)
    framework.destroy_distributed()
    return 0


def calibration_record(args: argparse.Namespace) -> dict:
    """{file name: text} of the calibration files the rows used (their provenance included)."""
    out = {}
    for row in args.grid_rows:
        if row.calibrate is not None:
            path = calibration_file(args.work, *row.calibrate)
            out[_shown(path)] = path.read_text()
    return out


def write_outputs(args, results, wall_s, world) -> None:
    from moebalance.harness.report import cpu_name, git_commit, utc_now, write_json, write_text_atomic

    cfg = args.model
    base = results[0]["quality"]
    for r in results:
        r["perplexity_change"] = {
            d: r["quality"][d]["perplexity"] / base[d]["perplexity"] - 1 for d in r["quality"]
        }
    domains = [d for d in base if d != "all"]
    out = Path(args.out)
    command = "python scripts/bench_quality.py " + " ".join(args.argv)
    report = {
        "command": command.strip(),
        "checkpoint": _shown(args.checkpoint),
        "framework": args.framework,
        "grid": _shown(args.grid),
        "rows_left_out": args.left_out,
        "calibration_domain": args.calibration_domain,
        "calibration_files": calibration_record(args),
        "model": dataclasses.asdict(cfg),
        "ep_size": world,
        "sequences_per_domain": args.seqs * world,
        "seq_len": args.seq_len,
        "wall_s": wall_s,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_name(),
        "time": utc_now(),
        "git_commit": git_commit(),
        "results": results,
    }
    write_json(out, report)
    lines = [
        f"# Quality against balance, trained {cfg.name} ({cfg.num_experts} experts, "
        f"top-{cfg.topk}, {cfg.num_layers} MoE layers), EP {world} on {args.framework}, CPU",
        "",
        f"`{report['command']}`; held-out text of the default corpus, {args.seqs * world} x "
        f"{args.seq_len} tokens per domain, teacher-forced. Perplexity change against vanilla "
        "top-k; dropped = fraction of token-expert assignments dropped; MV = max/mean - 1 of "
        "the EP-global expert loads and straggler = max - mean expert time over ranks, p50 over "
        f"(forward, layer) samples. {world} ranks share {os.cpu_count()} cores: straggler times "
        "are indicative only. LASER's parameters: `paper` = the paper's defaults (eps_high 0.9, "
        "no score floor), `calibrated` = the model's shipped per-layer file, `calibrate` rows = "
        f"calibrated by this command on held-out {args.calibration_domain} (in-domain: its "
        f"Δppl {args.calibration_domain} is optimistic; the other domain is the test).",
        "",
        "| router | params | ppl | Δppl | " + " | ".join(f"Δppl {d}" for d in domains)
        + " | accuracy | dropped | MV p50 | MV mean | " + " | ".join(f"MV p50 {d}" for d in domains)
        + " | rank imbalance p50 | straggler ms p50 | straggler ms mean |",
        "|---|---|" + "---|" * (2 * len(domains) + 9),
    ]
    for r in results:
        q, ch = r["quality"], r["perplexity_change"]
        lines.append(
            f"| {r['label']} | {r['params_source']} | {q['all']['perplexity']:.3f} | "
            f"{100 * ch['all']:+.2f}% | "
            + " | ".join(f"{100 * ch[d]:+.2f}%" for d in domains)
            + f" | {100 * q['all']['accuracy']:.2f}% | {100 * r['dropped_fraction']:.2f}% | "
            f"{r['max_violation']['p50']:.3f} | {r['max_violation']['mean']:.3f} | "
            + " | ".join(f"{r['max_violation_by_domain'][d]['p50']:.3f}" for d in domains)
            + f" | {r['rank_imbalance']['p50']:.3f} | "
            f"{r['straggler_ms']['p50']:.3f} | {r['straggler_ms']['mean']:.3f} |"
        )
    curves = tradeoff(results)
    if curves:
        lines += [
            "",
            "## Trade-off: MV against perplexity",
            "",
            "Rows of each `curve` by perplexity change; every curve starts at the first row "
            f"({results[0]['label']}).",
            "",
            "| curve | router | Δppl | " + " | ".join(f"Δppl {d}" for d in domains)
            + " | MV p50 | MV mean | " + " | ".join(f"MV mean {d}" for d in domains) + " |",
            "|---|---|---|" + "---|" * (2 * len(domains) + 2),
        ]
        for name, rows in [("(baseline)", [results[0]]), *curves.items()]:
            for r in rows:
                ch = r["perplexity_change"]
                lines.append(
                    f"| {name} | {r['label']} | {100 * ch['all']:+.2f}% | "
                    + " | ".join(f"{100 * ch[d]:+.2f}%" for d in domains)
                    + f" | {r['max_violation']['p50']:.3f} | {r['max_violation']['mean']:.3f} | "
                    + " | ".join(f"{r['max_violation_by_domain'][d]['mean']:.3f}" for d in domains)
                    + " |"
                )
    if args.left_out:
        lines += ["", f"Grid rows for other models, left out: {', '.join(args.left_out)}."]
    md = out.with_suffix(".md")
    write_text_atomic(md, "\n".join(lines) + "\n")
    png = plot_tradeoff(results, curves, out.with_suffix(".png"), cfg.name)
    print("\n".join(lines), flush=True)
    print(f"{PROG}: wrote {out}, {md}" + (f" and {png}" if png else "") + f" in {wall_s:.0f} s",
          file=sys.stderr)


def tradeoff(results: list[dict]) -> dict[str, list[dict]]:
    """{curve: its rows by overall perplexity change}, in the grid's order of curves."""
    curves: dict[str, list[dict]] = {}
    for r in results:
        if r.get("curve"):
            curves.setdefault(r["curve"], []).append(r)
    return {name: sorted(rows, key=lambda r: r["perplexity_change"]["all"])
            for name, rows in curves.items()}


def plot_tradeoff(results, curves, path: Path, model_name: str) -> Optional[Path]:
    """MV p50 against the overall perplexity change, one line per curve (each starting at
    vanilla), to ``path``; None without matplotlib or curves."""
    if not curves:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG}: matplotlib not installed: no trade-off plot", file=sys.stderr)
        return None
    base = results[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in curves.items():
        points = [base] + rows
        ax.plot([100 * r["perplexity_change"]["all"] for r in points],
                [r["max_violation"]["p50"] for r in points], marker="o", label=name)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("perplexity change against vanilla top-k, % (symlog)")
    ax.set_ylabel("MV p50 (max/mean - 1 of expert loads)")
    ax.set_title(f"{model_name}: balance against quality ({len(results[0]['quality']) - 1} domains)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")  # atomic: written beside, then renamed
    try:
        fig.savefig(tmp, format="png", dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    if "WORLD_SIZE" not in os.environ:
        return launch(args, argv)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
