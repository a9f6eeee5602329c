#!/usr/bin/env python
"""Routing locality of recorded runs: SRP, the segment cache (SCH) and LRU / LFU / Belady hit rates
per MoE layer, with bootstrap intervals, and the simulated expert-offloading time per token.

    python scripts/locality.py results/routing_topk.safetensors --out results/locality.json
    python scripts/locality.py run.topk.safetensors run.laser.safetensors --out cmp.json --by-domain
    python scripts/locality.py run.safetensors --out loc.json --bandwidth pcie5 25e9 \
        --expert-bytes 1048576

RECORD files are written by ``infer.py --record-routing FILE`` (``moebalance.routing_record``).
Several records are compared router by router; they must share the model and the prompts.
Definitions: ``moebalance.locality`` and docs/locality.md. Writes ``--out`` (JSON), the same
tables as Markdown beside it (.md) and PNG plots (``<out stem>_hit_rate.png``: hit rate
against cache size per policy; ``<out stem>_srp.png``: SRP against m), unless ``--no-plots``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance import locality as lc  # noqa: E402
from moebalance.config import ConfigError  # noqa: E402
from moebalance.files import write_text_atomic  # noqa: E402
from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.cli import fail as cli_fail  # noqa: E402
from moebalance.routing_record import PHASES, RoutingRecord  # noqa: E402

PROG = "locality.py"


def fail(message: str) -> None:
    """Exit 2 with one line on stderr (``moebalance.harness.cli.fail``)."""
    cli_fail(PROG, message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _bandwidth(text: str) -> tuple[str, float, str]:
    """A link name of ``locality.LINKS`` or a figure in bytes/s."""
    if text in lc.LINKS:
        link = lc.LINKS[text]
        return link.name, link.bytes_per_s, link.source
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected bytes/s > 0 or one of {sorted(lc.LINKS)}, got {text}"
        )
    return f"{value / 1e9:g} GB/s", value, "given on the command line"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("records", nargs="+", metavar="RECORD", help="routing record files (.safetensors)")
    add("--out", required=True, help="JSON path (Markdown beside it, .md)")
    add("--overwrite", action="store_true", help="replace existing output files")
    add("--windows", nargs="+", type=_positive_int, default=list(lc.DEFAULT_WINDOWS),
        metavar="M", help="window lengths m of SRP and SCH (default: 4 16 64 256)")
    add("--rhos", nargs="+", type=_float, default=list(lc.DEFAULT_RHOS), metavar="RHO",
        help="cache sizes in multiples of k (default: 1 1.5 2 3 4)")
    add("--policies", nargs="+", choices=lc.POLICIES, default=list(lc.POLICIES),
        help="cache policies (default: all)")
    add("--phases", nargs="+", choices=PHASES, default=None,
        help="analyse only these tokens (default: every token of the record)")
    add("--by-domain", action="store_true", help="also analyse each text domain on its own")
    add("--sample-len", type=_positive_int, default=lc.SAMPLE_LEN,
        help="tokens per sample: windows, caches and resampling stay inside one (default: 512)")
    add("--resamples", type=int, default=lc.RESAMPLES,
        help="bootstrap resamples (default: 1000; 0: none)")
    add("--confidence", type=_float, default=lc.CONFIDENCE,
        help="interval confidence (default: 0.95)")
    add("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    add("--first-use-hits", action="store_true",
        help="count an expert's first use as a hit while the cache has a free slot (the "
        "paper's code); default: a miss (a cold cache)")
    add("--expert-bytes", type=_positive_int, default=None,
        help="bytes of one expert (default: the record's header)")
    add("--bandwidth", nargs="+", type=_bandwidth, default=None, metavar="LINK|BYTES_PER_S",
        help=f"host-to-device links: {', '.join(sorted(lc.LINKS))} or bytes/s "
        "(default: pcie4 pcie5)")
    add("--per-load-us", type=_float, default=0.0,
        help="fixed cost of one expert load, microseconds (default: 0)")
    add("--no-plots", action="store_true", help="write no PNG")
    args = parser.parse_args(argv)
    if args.bandwidth is None:
        args.bandwidth = [_bandwidth(name) for name in ("pcie4", "pcie5")]
    if args.per_load_us < 0:
        fail(f"--per-load-us must be >= 0, got {args.per_load_us}")
    if args.resamples < 0:
        fail(f"--resamples must be >= 0, got {args.resamples}")
    if not 0 < args.confidence < 1:
        fail(f"--confidence must be in (0, 1), got {args.confidence}")
    if any(r < 1 for r in args.rhos):
        fail(f"--rhos must be >= 1 (a token's experts must fit), got {args.rhos}")
    return args


# --------------------------------------------------------------------------------- analysis


def _labels(records: list[tuple[Path, RoutingRecord]]) -> list[str]:
    """One label per record: the router, with the file's stem where routers repeat."""
    routers = [r.header["router"] for _, r in records]
    return [
        router if routers.count(router) == 1 else f"{router} ({path.stem})"
        for (path, _), router in zip(records, routers)
    ]


def _check_comparable(records: list[tuple[Path, RoutingRecord]]) -> None:
    """Records compared side by side must route the same model over the same prompts."""
    (first_path, first), *rest = records
    for path, rec in rest:
        for field in ("model", "num_experts", "topk", "layers", "prompts", "domains"):
            a, b = first.header.get(field), rec.header.get(field)
            if a != b:
                fail(
                    f"{path} and {first_path} differ in header field {field!r} ({json.dumps(b)} "
                    f"vs {json.dumps(a)}): compare records of one model on the same prompts"
                )
        if not np.array_equal(first.offsets, rec.offsets) or not np.array_equal(
                first.phase, rec.phase):
            fail(f"{path} and {first_path} hold different sequences: compare records of the "
                 "same prompts")


def _analyse(rec: RoutingRecord, args: argparse.Namespace, domain: Optional[str] = None,
             count_decode: bool = False) -> Optional[dict]:
    """``locality.analyse`` of the record's selected tokens (None when there are none).
    ``count_decode``: hit rates only, counting decoded tokens alone (the cache still sees the
    prompt before them)."""
    layers, offsets = rec.select(phases=args.phases, domain=domain)
    if offsets[-1] == 0:
        return None
    count = None
    if count_decode:
        count = rec.phase[rec.token_index(args.phases, domain)] == PHASES.index("decode")
        if not count.any():
            return None
    return lc.analyse(
        layers, offsets, num_experts=rec.num_experts, k=rec.topk, windows=args.windows,
        rhos=args.rhos, policies=args.policies, sample_len=args.sample_len,
        resamples=0 if count_decode else args.resamples, confidence=args.confidence,
        seed=args.seed, compulsory_misses=not args.first_use_hits, count=count,
        srp=not count_decode,
    )


def _offload(result: dict, expert_bytes: Optional[int], links: list, per_load_s: float,
             per: str) -> list[dict]:
    """Seconds per token spent loading experts, per policy, cache size and link."""
    if expert_bytes is None:
        return []
    rows = []
    for policy, by_rho in result["mean"]["hit_rate"].items():
        for rho, entry in by_rho.items():
            misses = entry["misses_per_token"]
            for name, bandwidth, _ in links:
                seconds = lc.offload_seconds_per_token(misses, expert_bytes, bandwidth, per_load_s)
                rows.append({
                    "policy": policy, "rho": rho, "capacity": entry["capacity"], "link": name,
                    "loads_per_token": misses, "ms_per_token": round(seconds * 1e3, 6),
                    "per": per,
                })
    return rows


# --------------------------------------------------------------------------------- output


def _fmt(entry: Optional[dict]) -> str:
    if not entry or entry.get("value") is None:
        return "-"
    lo, hi = entry["ci"]
    if lo is None or hi is None:
        return f"{entry['value']:.1f}"
    return f"{entry['value']:.1f} [{lo:.1f}, {hi:.1f}]"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Routing locality",
        "",
        f"Command: `{' '.join(report['command'])}`",
        "",
        f"Samples of at most {s['sample_len']} tokens (windows and caches stay inside one); "
        f"{s['resamples']} bootstrap resamples of the samples, {s['confidence']:.0%} basic "
        f"intervals in brackets; first use of an expert "
        f"{'a hit while the cache has room' if s['first_use_hits'] else 'a miss (cold cache)'}. "
        "Values in percent, averaged over MoE layers (definitions: docs/locality.md).",
        "",
    ]
    if len(report["results"]) > 1:
        lines += _comparison(report)
    for name, res in report["results"].items():
        h = res["header"]
        lines += [
            f"## {name}",
            "",
            f"{h['model']}, router {h['router']} {json.dumps(h.get('router_params') or {})}, "
            f"{h.get('framework') or '?'} EP {h.get('ep') or '?'}, {res['all']['tokens']} tokens "
            f"in {res['all']['samples']} samples, phases {', '.join(h['phases'])}, "
            f"E = {h['num_experts']}, k = {h['topk']}.",
            "",
        ]
        scopes = [("all", res["all"])] + sorted(res.get("domains", {}).items())
        windows = [str(m) for m in s["windows"]]
        lines += ["| scope | " + " | ".join(f"SRP(m={m})" for m in windows) + " | rho_hat(m=16) |",
                  "|---" * (len(windows) + 2) + "|"]
        for scope, r in scopes:
            if r is None:
                continue
            rho16 = r["mean"]["srp"].get("16", {}).get("rho_hat")
            srp = " | ".join(_fmt(r["mean"]["srp"].get(m)) for m in windows)
            lines.append(f"| {scope} | {srp}"
                         + f" | {rho16 if rho16 is not None else '-'} |")
        rhos = list(res["all"]["capacities"])
        lines += ["", "| scope | policy | " + " | ".join(
            f"rho={r} (C={res['all']['capacities'][r]})" for r in rhos) + " |",
            "|---" * (len(rhos) + 2) + "|"]
        for scope, r in scopes:
            if r is None:
                continue
            for policy, by_rho in r["mean"]["hit_rate"].items():
                cells = " | ".join(_fmt(by_rho.get(x)) for x in rhos)
                lines.append(f"| {scope} | {policy} | {cells} |")
        lines.append("")
        layers = sorted(res["all"]["layers"], key=int)
        m_show = "16" if "16" in windows else windows[0] if windows else None
        if m_show is not None:
            lines += [f"Per layer, SRP(m={m_show}) and hit rate at rho=2 (where given):", "",
                      "| layer | SRP | " + " | ".join(res["all"]["mean"]["hit_rate"]) + " |",
                      "|---" * (len(res["all"]["mean"]["hit_rate"]) + 2) + "|"]
            rho2 = "2" if "2" in rhos else rhos[0]
            for layer in layers:
                per = res["all"]["layers"][layer]
                lines.append(f"| {layer} | {_fmt(per['srp'].get(m_show))} | " + " | ".join(
                    _fmt(per["hit_rate"][p].get(rho2)) for p in per["hit_rate"]) + " |")
            lines.append("")
    if report["offload"]:
        lines += [
            "## Simulated offloading time",
            "",
            f"Expert loads a token waits for (misses summed over MoE layers) x (expert bytes / "
            f"bandwidth + {s['per_load_us']} us); no overlap with compute. Links: " + "; ".join(
                f"{name} = {bw / 1e9:.2f} GB/s ({src})" for name, bw, src in s["links"]) + ".",
            "",
            "| router | per | expert bytes | policy | rho | C | loads/token | " + " | ".join(
                f"ms/token {name}" for name, _, _ in s["links"]) + " |",
            "|---" * (7 + len(s["links"])) + "|",
        ]
        for name, res in report["results"].items():
            rows = report["offload"].get(name) or []
            grouped: dict = {}
            for row in rows:
                grouped.setdefault((row["policy"], row["rho"]), []).append(row)
            for (policy, rho), group in grouped.items():
                first = group[0]
                lines.append(
                    f"| {name} | {first['per']} | {res['expert_bytes']} | {policy} | {rho} | "
                    f"{first['capacity']} | {first['loads_per_token']:.3f} | "
                    + " | ".join(f"{g['ms_per_token']:.4f}" for g in group) + " |"
                )
        lines.append("")
    return "\n".join(lines)


def _comparison(report: dict) -> list[str]:
    """One row per router: SRP at every m and each policy's hit rate at rho = 2 (or the
    largest rho below it), then the loads and time per token of LRU at that rho."""
    names = list(report["results"])
    first = report["results"][names[0]]["all"]
    windows = [str(m) for m in report["settings"]["windows"]]
    rhos = list(first["capacities"])
    rho = "2" if "2" in rhos else rhos[len(rhos) // 2]
    policies = list(first["mean"]["hit_rate"])
    link = report["settings"]["links"][0][0]
    lines = [
        f"## Routers compared (rho = {rho}, C = {first['capacities'][rho]})",
        "",
        "| router | " + " | ".join(f"SRP(m={m})" for m in windows) + " | "
        + " | ".join(f"{p} hit" for p in policies) + f" | LRU ms/token ({link}) |",
        "|---" * (1 + len(windows) + len(policies) + 1) + "|",
    ]
    for name in names:
        r = report["results"][name]["all"]["mean"]
        ms = next((row["ms_per_token"] for row in report["offload"].get(name, [])
                   if row["policy"] == "lru" and row["rho"] == rho and row["link"] == link), None)
        lines.append(
            f"| {name} | " + " | ".join(_fmt(r["srp"].get(m)) for m in windows) + " | "
            + " | ".join(_fmt(r["hit_rate"][p].get(rho)) for p in policies) + " | "
            + (f"{ms:.4f}" if ms is not None else "-") + " |"
        )
    return lines + [""]


def _error_bars(entries: list[dict]) -> list[list[float]]:
    """[below, above] distances of the intervals from the values (0 where none)."""
    below, above = [], []
    for e in entries:
        lo, hi = e["ci"]
        below.append(e["value"] - lo if lo is not None else 0.0)
        above.append(hi - e["value"] if hi is not None else 0.0)
    return [below, above]


def plots(report: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = list(report["results"])
    policies = list(next(iter(report["results"].values()))["all"]["mean"]["hit_rate"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.6), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes[0], names):
        res = report["results"][name]["all"]
        for policy in policies:
            by_rho = res["mean"]["hit_rate"][policy]
            caps = [by_rho[r]["capacity"] for r in by_rho]
            vals = [by_rho[r]["value"] for r in by_rho]
            err = _error_bars([by_rho[r] for r in by_rho])
            ax.errorbar(caps, vals, yerr=err, marker="o", capsize=2, label=policy)
        ax.set_title(name)
        ax.set_xlabel(f"cache size C (experts; k = {res['k']})")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("hit rate (%), mean over layers")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = stem.with_name(stem.name + "_hit_rate.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    windows = [str(m) for m in report["settings"]["windows"]]
    if windows:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for name in names:
            srp = report["results"][name]["all"]["mean"]["srp"]
            ms = [int(m) for m in windows if srp[m]["value"] is not None]
            vals = [srp[str(m)]["value"] for m in ms]
            err = _error_bars([srp[str(m)] for m in ms])
            ax.errorbar(ms, vals, yerr=err, marker="o", capsize=2, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("segment length m (tokens)")
        ax.set_ylabel("SRP (%), mean over layers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(stem.name + "_srp.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    command = [PROG, *(sys.argv[1:] if argv is None else argv)]
    out = Path(args.out)
    md = out.with_suffix(".md")
    outputs = [out, md] + ([] if args.no_plots else [
        out.with_name(out.stem + "_hit_rate.png"), out.with_name(out.stem + "_srp.png")])
    for path in outputs:
        if path.exists() and not args.overwrite:
            fail(f"{path} exists; pass --overwrite to replace it")
        if path.is_dir():
            fail(f"--out {path} is a directory; give a file path")
    records = []
    for name in args.records:
        try:
            records.append((Path(name), RoutingRecord.load(name)))
        except ConfigError as err:
            fail(str(err))
    if len(records) > 1:
        _check_comparable(records)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": command,
        "settings": {
            "windows": args.windows, "rhos": args.rhos, "policies": args.policies,
            "phases": args.phases, "sample_len": args.sample_len, "resamples": args.resamples,
            "confidence": args.confidence, "seed": args.seed,
            "first_use_hits": args.first_use_hits, "per_load_us": args.per_load_us,
            "links": [list(link) for link in args.bandwidth],
        },
        "results": {},
        "offload": {},
    }
    try:
        for (path, rec), label in zip(records, _labels(records)):
            entry: dict[str, Any] = {"file": str(path), "header": rec.header}
            entry["all"] = _analyse(rec, args)
            if entry["all"] is None:
                fail(f"{path}: no token of phases {args.phases}")
            if args.by_domain:
                entry["domains"] = {d: _analyse(rec, args, domain=d) for d in rec.domains}
            expert_bytes = args.expert_bytes or rec.header.get("expert_bytes")
            entry["expert_bytes"] = expert_bytes
            has_decode = "decode" in rec.header["phases"] and (
                args.phases is None or "decode" in args.phases)
            if has_decode:
                decode = _analyse(rec, args, count_decode=True)
                entry["decode_only"] = decode
                source, per = decode, "decoded token"
            else:
                source, per = entry["all"], "token"
            report["offload"][label] = _offload(
                source, expert_bytes, args.bandwidth, args.per_load_us * 1e-6, per
            ) if source is not None else []
            report["results"][label] = entry
    except ConfigError as err:
        fail(str(err))
    report["seconds"] = round(time.perf_counter() - started, 2)
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    write_text_atomic(md, markdown(report) + "\n")
    written = [out, md]
    if not args.no_plots:
        written += plots(report, out.with_name(out.stem))
    print(f"{PROG}: wrote {', '.join(str(p) for p in written)} ({report['seconds']} s)",
          file=sys.stderr)
    missing = [name for name, rows in report["offload"].items() if not rows]
    if missing:
        print(f"{PROG}: no offloading time for {', '.join(missing)}: the record has no "
              "expert_bytes; pass --expert-bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
