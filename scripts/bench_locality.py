#!/usr/bin/env python
"""What each balancing router costs (or buys) in routing locality, on the shipped models.

For each model (``--models``) and router (vanilla top-k, LASER with the paper's parameters
and, where the model ships a calibrated file, with its calibrated ones, token drop and
expanded drop at gamma 1.5, top-k with replicas) one ``scripts/infer.py --record-routing`` run
at EP ``--ep`` records every MoE layer's expert choices (prefill, decode and the held-out text
of both domains, same prompts for every router); ``scripts/locality.py --by-domain`` then
computes SRP, SCH, LRU, LFU and Belady hit rates per record. ``--out`` (JSON, and Markdown
beside it) holds per (model, router, scope) the prefill MV and perplexity change of the run
beside SRP(16), the hit rates at rho = 2 (cache of 2k experts) and the simulated
expert-loading time per decoded token (LRU, PCIe 4.0 x16). Each run's own JSON, record and
locality report stay under ``--work``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance.config import ConfigError  # noqa: E402
from moebalance.harness.config import PAPER_ARGS  # noqa: E402
from moebalance.harness.cli import OneLineParser, run_step  # noqa: E402
from moebalance.harness.report import cpu_name, git_commit, utc_now, write_json  # noqa: E402
from moebalance.files import write_text_atomic  # noqa: E402

PROG = "bench_locality.py"


def routers(model: str) -> dict[str, list[str]]:
    """{label: infer.py options}: top-k, LASER with the paper's parameters and (where the model
    ships a calibrated file, ``moebalance/checkpoints/<model>/laser.yaml``) with its calibrated
    ones, token drop and expanded drop at gamma 1.5, and top-k with replicas planned on a
    calibration pass (``--replicate auto``: the record holds logical experts, so its locality
    is top-k's; its MV is over physical slots)."""
    out = {"topk": ["--router", "topk"],
           "laser (paper)": ["--router", "laser", "--router-args-file", PAPER_ARGS]}
    if (ROOT / "moebalance" / "checkpoints" / model / "laser.yaml").is_file():
        out["laser (calibrated)"] = ["--router", "laser", "--router-args-file", "calibrated"]
    out["token_drop g=1.5"] = ["--router", "token_drop", "--router-args", "capacity_factor=1.5"]
    out["expanded_drop g=1.5"] = ["--router", "expanded_drop", "--router-args",
                                  "capacity_factor=1.5"]
    out["topk + replicas"] = ["--router", "topk", "--replicate", "auto"]
    return out


RHO = "2"
WINDOW = "16"


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny-moe,fine-moe", help="comma-separated (%(default)s)")
    p.add_argument("--ep", type=int, default=2, help="processes per run (%(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=16)
    p.add_argument("--eval-seqs", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--work", default="/tmp/bench_locality", help="folder for runs and records")
    p.add_argument("--out", default=str(ROOT / "results" / "locality_cpu.json"))
    args = p.parse_args(argv)
    try:
        args.models = [m for m in args.models.split(",") if m]
        if not args.models:
            raise ConfigError("--models must name at least one model")
        for name in ("ep", "batch", "prompt_len", "gen_len", "eval_seqs", "eval_len"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
    except ConfigError as err:
        p.error(str(err))
    return args


def _run(command: list[str], what: str) -> None:
    run_step(PROG, command, what, cwd=ROOT)


def _locality_rows(path: Path) -> dict:
    """{scope: figures} of one record's locality report (scope "all" or "domain:<d>")."""
    report = json.loads(path.read_text())
    (result,) = report["results"].values()
    offload = next(iter(report["offload"].values()))
    lru_ms = next(o["ms_per_token"] for o in offload
                  if o["policy"] == "lru" and o["rho"] == RHO and o["link"] == "PCIe 4.0 x16")
    scopes = {"all": result["all"], **{f"domain:{d}": f for d, f in result.get("domains", {}).items()}}
    rows = {}
    for scope, figures in scopes.items():
        mean = figures["mean"]
        rows[scope] = {
            "srp16": mean["srp"][WINDOW]["value"],
            **{f"{policy}_hit": mean["hit_rate"][policy][RHO]["value"]
               for policy in ("sch_m16", "lru", "lfu", "belady")},
        }
    rows["all"]["lru_ms_per_decoded_token"] = lru_ms
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for model in args.models:
        base_ppl = None
        for label, options in routers(model).items():
            tag = f"{model}_{label.replace(' ', '_').replace('(', '').replace(')', '')}"
            out, record = work / f"{tag}.json", work / f"{tag}.safetensors"
            _run([
                sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(args.ep), str(ROOT / "scripts" / "infer.py"), "--config", model, *options,
                "--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--gen-len",
                str(args.gen_len), "--eval-seqs", str(args.eval_seqs), "--eval-len",
                str(args.eval_len), "--record-routing", str(record), "--out", str(out),
                "--overwrite",
            ], f"infer.py {' '.join(options)} on {model}")
            _run([sys.executable, str(ROOT / "scripts" / "locality.py"), str(record), "--by-domain",
                  "--no-plots", "--overwrite", "--out", str(work / f"{tag}.locality.json")],
                 f"locality.py on {tag}")
            run = json.loads(out.read_text())["runs"][0]
            ppl = run["quality"]["all"]["perplexity"]
            base_ppl = base_ppl or ppl  # top-k runs first
            for scope, figures in _locality_rows(work / f"{tag}.locality.json").items():
                rows.append({
                    "model": model, "router": label, "scope": scope,
                    "mv_prefill_p50": run["summary"]["prefill"]["max_violation"]["p50"],
                    "perplexity_change": ppl / base_ppl - 1, **figures,
                })
            print(f"{PROG}: {tag} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    command = "python scripts/bench_locality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    write_json(out, {"command": command, "time": utc_now(), "git_commit": git_commit(),
                     "cpu": cpu_name(), "ep": args.ep, "rho": float(RHO), "window": int(WINDOW),
                     "rows": rows})
    lines = [
        "# Routing locality against balance: trained models, CPU (gloo)", "",
        f"`{command}`. EP {args.ep}; each router's prefill MV (p50) and held-out perplexity "
        f"change against top-k beside the locality of its recorded routing (prefill, decode and "
        f"held-out text; `scripts/locality.py`, definitions in docs/locality.md): SRP(m = "
        f"{WINDOW}) and cache hit rates at rho = {RHO} (2k experts cached), means over MoE "
        f"layers, %; scope `all` or one text domain. Loading ms: LRU misses per decoded token "
        f"x expert bytes over PCIe 4.0 x16.", "",
        "| model | router | scope | MV | Δppl | SRP(16) | SCH(16) hit | LRU hit | LFU hit | "
        "Belady hit | loading ms / token |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = r.get("lru_ms_per_decoded_token")
        lines.append(
            f"| {r['model']} | {r['router']} | {r['scope']} | {r['mv_prefill_p50']:.3f} | "
            f"{100 * r['perplexity_change']:+.2f}% | {r['srp16']:.1f} | {r['sch_m16_hit']:.1f} | "
            f"{r['lru_hit']:.1f} | {r['lfu_hit']:.1f} | {r['belady_hit']:.1f} | "
            f"{'' if ms is None else f'{ms:.4f}'} |"
        )
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"{PROG}: wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
