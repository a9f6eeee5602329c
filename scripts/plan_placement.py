#!/usr/bin/env python
"""Plan replica placements per layer from expert loads, and compare them with EPLB's greedy.

    python scripts/plan_placement.py --loads loads.json --ep 4 --redundant 4 --out plan.json
    python scripts/plan_placement.py --shared-data olmoe-1b-7b --domain github,arxiv --ep 8 \\
        --redundant 8 --out 'results/placement_olmoe_{domain}.json' --table results/placement_olmoe.md

Loads: a JSON file ``{layer: [E loads]}`` (``--loads``), or the real per-expert counts of
``../shared/data/routing-stats/expert_counts.json`` (``--shared-data MODEL --domain D``; MODEL is
"olmoe-1b-7b" or "mixtral-8x7b" or the full key). Each layer is planned on P slots over ``--ep``
ranks (``--slots-per-rank S``: P = EP * S; or ``--redundant N``: P = E + N) with ``--method``
(``moebalance.placement.plan_placement``: eplb, search, exact), ``--nodes`` for node-then-GPU
packing. ``--out`` receives the plan (``save_plan``: JSON with provenance; ``{domain}`` in the
path is required with several domains). Printed per layer: peak/mean rank load of the plan, of
EPLB's greedy plan and of the lower bound. ``--table`` also writes that table as markdown, with
the command, and the same rows as JSON beside it (.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance import placement as pl  # noqa: E402
from moebalance.config import ConfigError  # noqa: E402
from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.cli import fail as cli_fail  # noqa: E402
from moebalance.harness.report import write_text_atomic  # noqa: E402
from moebalance.workloads import DEFAULT_COUNTS_PATH, load_expert_counts  # noqa: E402

PROG = "plan_placement.py"
MODEL_KEYS = {"olmoe-1b-7b": "olmoe-1b-7b-0924", "mixtral-8x7b": "mixtral-8x7b-v0.1"}
MAX_RANKS = 4096  # far past any EP size in use; keeps a typo from planning for hours


def fail(message: str) -> None:
    """Exit 2 with one line on stderr (``moebalance.harness.cli.fail``)."""
    cli_fail(PROG, message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= MAX_RANKS * 64:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..{MAX_RANKS * 64}, got {text}")
    return value


def _non_negative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--loads", type=Path,
                        help="JSON file {layer: [E loads]}, or an infer.py report (its first run)")
    source.add_argument("--shared-data", metavar="MODEL",
                        help=f"real counts of MODEL ({', '.join(MODEL_KEYS)}) from {DEFAULT_COUNTS_PATH}")
    parser.add_argument("--domain", help="with --shared-data: comma-separated text domains")
    slots = parser.add_mutually_exclusive_group(required=True)
    slots.add_argument("--slots-per-rank", type=_positive, help="physical slots per rank")
    slots.add_argument("--redundant", type=_non_negative, help="slots beyond the E logical experts")
    parser.add_argument("--ep", type=_positive, required=True, help="expert-parallel ranks")
    parser.add_argument("--nodes", type=_positive, default=1, help="nodes (EP divisible by it)")
    parser.add_argument("--method", choices=pl.METHODS, default="search")
    parser.add_argument("--out", required=True, help="plan JSON ({domain} with several domains)")
    parser.add_argument("--table", type=Path, help="markdown table (and .json rows beside it)")
    args = parser.parse_args(argv)
    if args.ep > MAX_RANKS:
        fail(f"--ep {args.ep} exceeds {MAX_RANKS}")
    if args.ep % args.nodes:
        fail(f"--nodes {args.nodes} must divide --ep {args.ep}")
    if args.shared_data is not None:
        if not args.domain:
            fail("--shared-data needs --domain (e.g. github)")
        domains = [d.strip() for d in args.domain.split(",") if d.strip()]
        if not domains or len(set(domains)) != len(domains):
            fail(f"--domain needs distinct comma-separated domains, got {args.domain!r}")
        args.domains = domains
    else:
        if args.domain:
            fail("--domain goes with --shared-data, not --loads")
        args.domains = [None]
    if len(args.domains) > 1 and "{domain}" not in args.out:
        fail("--out must contain {domain} when several domains are planned")
    if args.table is not None and args.table.suffix != ".md":
        fail(f"--table {args.table}: expected a .md path")
    if args.table is not None and args.table.with_suffix(".json").resolve() == Path(
        str(args.out)
    ).resolve():
        fail(f"--table {args.table}: its rows go to {args.table.with_suffix('.json')}, the "
             "plan's --out; choose another name for one of them")
    return args


def read_loads(args: argparse.Namespace, domain: str | None) -> dict[int, list[float]]:
    """{layer: [E] loads} from --loads or the shared data; ConfigError on bad content."""
    if domain is not None:
        model = MODEL_KEYS.get(args.shared_data, args.shared_data)
        try:
            counts = load_expert_counts(model=model, domain=domain)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
        return {layer: c.double().tolist() for layer, c in counts.items()}
    try:
        data = json.loads(args.loads.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--loads {args.loads} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--loads {args.loads}: not readable JSON ({err})") from None
    if isinstance(data, dict) and "runs" in data:  # an infer.py report: calibrate on its run
        data = loads_from_report(data, args.loads)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--loads {args.loads}: expected a non-empty object {{layer: [E loads]}}")
    loads = {}
    for key, values in data.items():
        if not str(key).isdigit():
            raise ConfigError(f"--loads {args.loads}: layer key {key!r} is not a layer index")
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise ConfigError(f"--loads {args.loads}: layer {key} must be a list of numbers")
        loads[int(key)] = [float(v) for v in values]
    if len({len(v) for v in loads.values()}) != 1:
        raise ConfigError(f"--loads {args.loads}: layers have different numbers of experts")
    return loads


def loads_from_report(report: dict, path: Path) -> dict[str, list[float]]:
    """{layer: [E] tokens per expert} of the first run of an ``scripts/infer.py`` report: the
    prefill steps' tokens received per expert, summed over steps and ranks (warm-up excluded
    by the report). The run must be unreplicated (its slots are the experts)."""
    run = report["runs"][0] if report.get("runs") else None
    if run is None or not run.get("records"):
        raise ConfigError(f"--loads {path}: the infer.py report holds no finished run")
    E = report["config"]["model"]["num_experts"]
    loads: dict[str, list[float]] = {}
    for record in run["records"]:
        if record["phase"] != "prefill":
            continue
        row = loads.setdefault(str(record["layer"]), [0.0] * E)
        for expert, tokens in zip(record["local_experts"], record["tokens_per_expert"]):
            if expert >= E:
                raise ConfigError(f"--loads {path}: its run had replicas; calibrate on one without")
            row[expert] += tokens
    return loads


def plan_domain(args: argparse.Namespace, domain: str | None, command: str) -> list[dict]:
    """Plan every layer of one load source, save the plan, return the table rows."""
    import torch

    loads = read_loads(args, domain)
    num_experts = len(next(iter(loads.values())))
    num_slots = (args.ep * args.slots_per_rank if args.slots_per_rank is not None
                 else num_experts + args.redundant)
    plans, rows = {}, []
    for layer, values in sorted(loads.items()):
        load = torch.tensor(values, dtype=torch.float64)
        plan = pl.plan_placement(load, num_slots, args.ep, args.method, num_nodes=args.nodes)
        eplb = pl.eplb_placement(load, num_slots, args.ep, args.nodes)
        mean = float(load.sum()) / args.ep
        bound = pl.lower_bound(load, num_slots, args.ep)
        plans[layer] = plan
        rows.append({
            "domain": domain, "layer": layer, "experts": num_experts, "slots": num_slots,
            "ep": args.ep, "nodes": args.nodes, "method": args.method,
            "expert_max_over_mean": float(load.max() / load.mean()) if float(load.sum()) else 1.0,
            "plan_peak_over_mean": pl.peak_over_mean(plan, load),
            "eplb_peak_over_mean": pl.peak_over_mean(eplb, load),
            "lower_bound_over_mean": bound / mean if mean else 1.0,
            "max_replicas": int(plan.logcnt.max()),
        })
    out = Path(args.out.replace("{domain}", domain or ""))
    provenance = {
        "model": MODEL_KEYS.get(args.shared_data, args.shared_data) if domain else None,
        "data": f"{DEFAULT_COUNTS_PATH.name} domain {domain}" if domain else str(args.loads),
        "command": command,
        "method": args.method,
        "num_nodes": args.nodes,
    }
    pl.save_plan(out, plans, provenance)
    for row in rows:
        row["plan_file"] = str(out)
    return rows


def format_table(rows: list[dict], command: str) -> str:
    lines = [
        "# Replica placement: peak / mean rank load per layer",
        "",
        f"Command: `{command}`",
        "",
        "Peak / mean of the per-rank loads (1 = perfect balance) assuming each replica receives "
        "its expert's load / replica count; `expert max/mean` is the unreplicated expert "
        "imbalance. `eplb` is DeepSeek EPLB's greedy (replicate, then pack) reimplemented in "
        "`moebalance/placement.py`; `bound` is `lower_bound` (no plan can go below it).",
        "",
        "| domain | layer | E | P | EP | expert max/mean | plan | eplb | bound | max replicas |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['domain'] or '-'} | {r['layer']} | {r['experts']} | {r['slots']} | {r['ep']} | "
            f"{r['expert_max_over_mean']:.3f} | {r['plan_peak_over_mean']:.4f} | "
            f"{r['eplb_peak_over_mean']:.4f} | {r['lower_bound_over_mean']:.4f} | "
            f"{r['max_replicas']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python scripts/plan_placement.py",
                        *(sys.argv[1:] if argv is None else argv)])
    rows = []
    try:
        for domain in args.domains:
            rows += plan_domain(args, domain, command)
    except ConfigError as err:
        fail(str(err))
    except OSError as err:
        fail(f"cannot write the plan: {err}")
    table = format_table(rows, command)
    print(table, end="")
    if args.table is not None:
        try:
            write_text_atomic(args.table, table)
            write_text_atomic(args.table.with_suffix(".json"),
                              json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
        except OSError as err:
            fail(f"--table {args.table}: cannot write ({err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
