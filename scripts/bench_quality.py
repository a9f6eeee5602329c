#!/usr/bin/env python
"""Quality against balance on the trained tiny MoE at EP 4: what each balancing router costs in
held-out perplexity, and what it buys in MV, dropped fraction and straggler time.

    python scripts/bench_quality.py            # launches torchrun --nproc-per-node 4 itself
    python scripts/bench_quality.py --framework deepspeed --ep 2 --out results/quality_ds.json

Every router of the grid (``--grid``, default ``moebalance/configs/grids/quality.yaml``: label, router,
parameters per row) runs on the same model (``moebalance/checkpoints/tiny-moe``, routers swapped in,
weights unchanged) over the same held-out sequences of every domain of the default corpus
(``moebalance.corpus``), teacher-forced, with expert parallelism over ``--ep`` ranks: each rank
evaluates its own ``--seqs`` sequences per domain through the EP model in lockstep, ``--chunk``
sequences per forward call, under ``torch.inference_mode``.

Per router: perplexity and its change against the first row (vanilla top-k), overall and per
domain, next-token accuracy, dropped fraction (of token-expert assignments), MV (max / mean - 1
of the EP-global expert loads) and straggler time (max - mean over ranks of expert compute
time, ms) as p50 / mean over the (forward call, layer) samples
(``moebalance.telemetry_stats.summarize``). Rank 0 writes ``--out`` (JSON) and a markdown table beside
it (.md), atomically. On a 2-core box 4 ranks share 2 cores, so straggler times are indicative
only; the routing figures are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance.config import ConfigError, read_yaml_mapping  # noqa: E402
from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.config import FRAMEWORKS  # noqa: E402
from moebalance.model_config import load_model_config, trained_checkpoint  # noqa: E402
from moebalance.policies import make_params  # noqa: E402

PROG = "bench_quality.py"
DEFAULT_GRID = ROOT / "moebalance" / "configs" / "grids" / "quality.yaml"


def load_grid(path: str | Path) -> list[tuple[str, str, object]]:
    """[(label, router, params dataclass)] from a grid file (``routers``: a list of mappings
    with ``label``, ``router`` and optional ``args``). ConfigError on anything else."""
    data = read_yaml_mapping(path, "--grid")
    rows = data.get("routers")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"--grid {path}: expected a non-empty list under 'routers'")
    grid = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) - {"label", "router", "args"} or "router" not in row:
            raise ConfigError(
                f"--grid {path}: row {i} must be a mapping with router, optional label and args"
            )
        try:
            params = make_params(row["router"], row.get("args") or {})
        except ConfigError as err:
            raise ConfigError(f"--grid {path}: row {i}: {err}") from None
        grid.append((str(row.get("label", row["router"])), row["router"], params))
    return grid


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
        args.grid_rows = load_grid(args.grid)
    except ConfigError as err:
        p.error(str(err))
    return args


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this script under torchrun with ``--ep`` ranks."""
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

    results = []
    started = time.perf_counter()
    for label, policy, params in args.grid_rows:
        framework.swap_router(model, policy, params, "local")
        recorder.clear()
        quality = heldout_quality(
            model, sequences, setup.device, chunk=args.chunk, recorder=recorder
        )
        parts = gather_to_rank0(recorder.records())
        if rank == 0:
            records = [r for part in parts for r in part]
            summary = summarize(records, cfg.topk)["prefill"]
            results.append({
                "label": label,
                "router": policy,
                "router_params": dataclasses.asdict(params),
                "quality": quality,
                "dropped_fraction": summary["dropped_fraction"],
                "max_violation": summary["max_violation"],
                "rank_imbalance": summary["rank_imbalance"],
                "straggler_ms": summary["straggler_ms"],
            })
            print(f"{PROG}: {label:<26} done ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    if rank == 0:
        write_outputs(args, results, time.perf_counter() - started, world)
    framework.destroy_distributed()
    return 0


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
    checkpoint = Path(args.checkpoint)
    report = {
        "command": command.strip(),
        "checkpoint": str(checkpoint.relative_to(ROOT)) if checkpoint.is_relative_to(ROOT) else str(checkpoint),
        "framework": args.framework,
        "grid": args.grid,
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
        f"# Quality against balance, trained tiny MoE ({cfg.num_experts} experts, top-{cfg.topk}, "
        f"{cfg.num_layers} MoE layers), EP {world} on {args.framework}, CPU",
        "",
        f"`{report['command']}`; held-out text of the default corpus, {args.seqs * world} x "
        f"{args.seq_len} tokens per domain, teacher-forced. Perplexity change against vanilla "
        "top-k; dropped = fraction of token-expert assignments dropped; MV = max/mean - 1 of "
        "the EP-global expert loads and straggler = max - mean expert time over ranks, p50 over "
        f"(forward, layer) samples. {world} ranks share {os.cpu_count()} cores: straggler times "
        "are indicative only.",
        "",
        "| router | ppl | Δppl | " + " | ".join(f"Δppl {d}" for d in domains)
        + " | accuracy | dropped | MV p50 | rank imbalance p50 | straggler ms p50 | straggler ms mean |",
        "|---|" + "---|" * (len(domains) + 8),
    ]
    for r in results:
        q, ch = r["quality"], r["perplexity_change"]
        lines.append(
            f"| {r['label']} | {q['all']['perplexity']:.3f} | {100 * ch['all']:+.2f}% | "
            + " | ".join(f"{100 * ch[d]:+.2f}%" for d in domains)
            + f" | {100 * q['all']['accuracy']:.2f}% | {100 * r['dropped_fraction']:.2f}% | "
            f"{r['max_violation']['p50']:.3f} | {r['rank_imbalance']['p50']:.3f} | "
            f"{r['straggler_ms']['p50']:.3f} | {r['straggler_ms']['mean']:.3f} |"
        )
    md = out.with_suffix(".md")
    write_text_atomic(md, "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    print(f"{PROG}: wrote {out} and {md} in {wall_s:.0f} s", file=sys.stderr)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    if "WORLD_SIZE" not in os.environ:
        return launch(args, argv)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
