#!/usr/bin/env python
"""Replication against balancing routers, end to end: what replicas of the hot experts buy in
per-rank load, LIS and straggler time, alone and with LASER or expanded drop, and what they cost
in quality, on the shipped trained models at several EP sizes.

    python scripts/bench_replicas.py                       # tiny-moe and fine-moe, EP 2 and 4
    python scripts/bench_replicas.py --models fine-moe --ep 2 --redundant 1

For every (model, EP): a calibration run (vanilla top-k, prompts of ``--calibrate-on``, one
domain) records the routing; ``scripts/plan_placement.py`` plans ``--redundant`` extra slots per
rank from its loads; then every router runs twice on prompts of ``--evaluate-on`` (default the
other domain: a static placement must survive the domain shift), without and with the placement (``--placement``,
``--replica-policy``), each launch a ``scripts/infer.py --compare`` job (vanilla top-k, then the
router, same prompts). With ``--rebalance-every N`` vanilla top-k also runs with the placement
adapting online (``infer.py --rebalance-every N``: re-planned every N steps from the served
domain's loads during the warm-up generations). Rank 0 of each job writes its JSON under
``--work``; this script reads them and writes ``--out`` (JSON, every figure) and a markdown
table beside it.

Figures per run (prefill, p50 over (step, layer) samples): rank imbalance (max / mean tokens
per rank), LIS (the busiest slot's tokens over the mean logical expert's T k / E), straggler
(ms; noise on shared CPU cores), dropped fraction, and held-out perplexity change against the
unreplicated vanilla run of the same (model, EP).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance.config import ConfigError, parse_key_values  # noqa: E402
from moebalance.corpus import DEFAULT_DOMAINS  # noqa: E402
from moebalance.harness.cli import OneLineParser, run_step  # noqa: E402
from moebalance.harness.report import git_commit, utc_now, write_json  # noqa: E402
from moebalance.files import write_text_atomic  # noqa: E402
from moebalance.model_config import trained_checkpoints  # noqa: E402

PROG = "bench_replicas.py"
#: the routers compared, each with its parameters (LASER with its quality-safe thresholds)
ROUTERS = {
    "laser": ["eps_high=0.5", "min_score_ratio=0.5"],
    "expanded_drop": [],
}


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(trained_checkpoints()),
                   help="trained models (default: %(default)s)")
    p.add_argument("--ep", default="2,4", help="EP sizes (default: %(default)s)")
    p.add_argument("--redundant", type=int, default=1, help="extra slots per rank (%(default)s)")
    p.add_argument("--replica-policy", default="least_loaded")
    p.add_argument("--calibrate-on", default="prose", choices=DEFAULT_DOMAINS)
    p.add_argument("--evaluate-on", default=None, choices=DEFAULT_DOMAINS,
                   help="prompt domain of the measured runs (default: the other one)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--eval-seqs", type=int, default=4)
    p.add_argument("--rebalance-every", type=int, default=2,
                   help="also run vanilla top-k rebalancing online every N steps (0: no)")
    p.add_argument("--work", default="/tmp/bench_replicas", help="folder for the runs' JSON")
    p.add_argument("--out", default=str(ROOT / "results" / "replicas_cpu.json"))
    args = p.parse_args(argv)
    try:
        args.models = [m for m in args.models.split(",") if m]
        unknown = sorted(set(args.models) - set(trained_checkpoints()))
        if unknown or not args.models:
            raise ConfigError(f"--models must name trained models {trained_checkpoints()}, got {unknown}")
        args.ep = [int(e) for e in args.ep.split(",")]
        if any(e < 1 for e in args.ep):
            raise ConfigError(f"--ep sizes must be >= 1, got {args.ep}")
        if args.rebalance_every < 0:
            raise ConfigError(f"--rebalance-every must be >= 0, got {args.rebalance_every}")
        for name in ("redundant", "batch", "prompt_len", "eval_seqs"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        parse_key_values(ROUTERS["laser"], "routers")
    except (ConfigError, ValueError) as err:
        p.error(str(err))
    if args.evaluate_on is None:
        args.evaluate_on = next(d for d in DEFAULT_DOMAINS if d != args.calibrate_on)
    return args


def _run(command: list[str], what: str) -> None:
    run_step(PROG, command, what, cwd=ROOT)


def _infer(args, model: str, ep: int, out: Path, *extra: str) -> dict:
    _run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(ep), str(ROOT / "scripts" / "infer.py"), "--config", model, "--batch",
        str(args.batch), "--prompt-len", str(args.prompt_len), "--gen-len", "2", "--warmup",
        "1", "--out", str(out), "--overwrite", *extra,  # a later --warmup overrides
    ], f"infer.py {' '.join(extra)} on {model} at EP {ep}")
    return json.loads(out.read_text())


def _figures(run: dict, base_quality: dict) -> dict:
    s = run["summary"]["prefill"]
    q = run["quality"]["all"] if run["quality"] else None
    return {
        "router": run["router"],
        "rank_imbalance_p50": s["rank_imbalance"]["p50"],
        "lis_p50": s["lis"]["p50"],
        "straggler_ms_p50": s["straggler_ms"]["p50"],
        "dropped_fraction": s["dropped_fraction"],
        "perplexity": q["perplexity"] if q else None,
        "perplexity_change": q["perplexity"] / base_quality["perplexity"] - 1 if q else None,
        "prefill_ms": run["end_to_end"]["prefill_ms"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for model in args.models:
        for ep in args.ep:
            tag = f"{model}_ep{ep}"
            calib = _infer(args, model, ep, work / f"{tag}_calibrate.json", "--router", "topk",
                           "--prompt-domain", args.calibrate_on, "--eval-seqs", "0")
            plan = work / f"{tag}_plan.json"
            _run([sys.executable, str(ROOT / "scripts" / "plan_placement.py"), "--loads",
                  str(work / f"{tag}_calibrate.json"), "--ep", str(ep), "--redundant",
                  str(args.redundant * ep), "--out", str(plan)], f"planning {tag}")
            del calib
            base = None
            for router, router_args in ROUTERS.items():
                for replicas in (False, True):
                    extra = ["--router", router, "--compare", "--prompt-domain", args.evaluate_on,
                             "--eval-seqs", str(args.eval_seqs)]
                    if router_args:
                        extra += ["--router-args", *router_args]
                    if replicas:
                        extra += ["--placement", str(plan), "--replica-policy", args.replica_policy]
                    name = f"{tag}_{router}{'_replicas' if replicas else ''}.json"
                    report = _infer(args, model, ep, work / name, *extra)
                    if base is None:  # the unreplicated vanilla run of this (model, EP)
                        base = report["runs"][0]["quality"]["all"]
                    for run in report["runs"]:
                        if run["router"] == "topk" and any(
                            r["model"] == model and r["ep"] == ep and r["replicas"] == replicas
                            and r["router"] == "topk" for r in rows
                        ):
                            continue  # vanilla once per (model, EP, replicas)
                        rows.append({"model": model, "ep": ep, "replicas": replicas,
                                     **_figures(run, base)})
            if args.rebalance_every:  # the placement adapts online to the served domain
                report = _infer(
                    args, model, ep, work / f"{tag}_topk_rebalanced.json", "--router", "topk",
                    "--prompt-domain", args.evaluate_on, "--eval-seqs", str(args.eval_seqs),
                    "--placement", str(plan), "--replica-policy", args.replica_policy,
                    "--rebalance-every", str(args.rebalance_every), "--rebalance-window", "4",
                    "--warmup", "2",
                )
                row = {"model": model, "ep": ep, "replicas": "rebalanced",
                       **_figures(report["runs"][0], base)}
                events = report["runs"][0]["per_rank"][0]["rebalancing"]
                row["rebalancing"] = {
                    "events": len(events),
                    "slots_moved": sum(e["slots_moved"] for e in events),
                    "bytes_moved_rank0": sum(e["sent_bytes"] + e["received_bytes"] for e in events),
                    "ms_rank0": sum(e["ms"] for e in events),
                }
                rows.append(row)
            print(f"{PROG}: {tag} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    command = "python scripts/bench_replicas.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(Path(args.out), {
        "command": command.strip(), "time": utc_now(), "git_commit": git_commit(),
        "calibrated_on": args.calibrate_on, "evaluated_on": args.evaluate_on,
        "redundant_slots_per_rank": args.redundant, "replica_policy": args.replica_policy,
        "cpu_count": os.cpu_count(), "rows": rows,
    })
    lines = [
        "# Replicas against balancing routers: trained models, CPU (gloo)",
        "",
        f"`{command.strip()}`. Placement planned from vanilla routing on {args.calibrate_on} "
        f"prompts ({args.redundant} extra slot(s) per rank, `moebalance.placement`), evaluated on "
        f"{args.evaluate_on} prompts; replica choice {args.replica_policy}. Prefill p50 over "
        "(step, layer) samples. Perplexity change against the unreplicated vanilla run of the "
        "same model and EP (held-out text of both domains). Straggler times are noise on "
        "shared CPU cores; the loads are exact.",
        "",
        "| model | EP | replicas | router | rank imbalance | LIS | dropped | Δppl | straggler ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = f"{100 * r['perplexity_change']:+.2f}%" if r["perplexity_change"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['ep']} | "
            f"{r['replicas'] if isinstance(r['replicas'], str) else ('yes' if r['replicas'] else 'no')} | "
            f"{r['router']} | "
            f"{r['rank_imbalance_p50']:.3f} | {r['lis_p50']:.3f} | "
            f"{100 * r['dropped_fraction']:.2f}% | {ppl} | {r['straggler_ms_p50']:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    write_text_atomic(Path(args.out).with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
