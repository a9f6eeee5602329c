#!/usr/bin/env python
"""Benchmark the routing policies on calibrated synthetic workloads (CPU).

For each preset (mixtral, olmoe, deepseek; see ``moebalance.workloads``), batch size T and
profiled layer, the gate logits are generated once and every policy in
``moebalance.policies.POLICIES`` routes them with its default parameters. Reported per
(preset, T, router):

- MV per layer = max_e L_e / mean_e L_e - 1, and I_agg = mean over the layers of max / mean;
- dropped fraction (top-k assignments removed / T k) and experts per token, means over layers;
- routing time: the median over ``--repeats`` of the policy function called directly under
  ``torch.no_grad()`` (no input validation), summed over the layers, also as a multiple of
  vanilla top-k timed in the same run on the same logits. Repeats are interleaved across the
  routers so a noisy machine slows all of them alike; the first, validated ``route()`` call of
  each router is the warm-up. Wall time is the headline; process CPU time (all threads) is
  recorded beside it because it is less disturbed by other jobs sharing the machine.

``topk`` (the control the "x top-k" columns divide by) runs Megatron-Core's routing op for op;
``megatron_topk`` times Megatron's own ``topk_routing_with_score_function`` beside it, to show
the control costs what Megatron costs. ``topk_int_keys`` is vanilla top-k with the same
decisions and weights computed as the balancing policies compute theirs (``topk_nonnegative``,
dense outputs built in place): a faster control, for what those two tricks alone buy.

``laser_reference`` (the paper's sequential greedy, a Python loop over tokens, kept in
``tests/laser_reference.py``) is run once at T <= 8192 for the balance comparison with the
vectorised ``laser`` (and ``laser_fast``, the same pools with the price assignment).

Expert parallelism is simulated with EP = 8: T is the number of tokens *per rank*; each of the 8
ranks routes its own T tokens with its own ``RoutingContext(ep_rank=r, ep_size=8)`` (LASER with
per-rank loads, capacities from the rank's T, expanded drop adding that rank's local experts),
and the balance figures are over the summed global expert load (8 T tokens). Times are for one
rank's call on its T tokens.

Usage:
    python scripts/bench_routers.py            # T in {1024, 8192, 65536} (make bench)
    python scripts/bench_routers.py --quick    # T in {1024, 8192}, 2 repeats (make demo)
    python scripts/bench_routers.py --domain github --laser-args repair_rounds=8
    python scripts/bench_routers.py --threads 1  # one rank's share under torchrun's default
Writes ``--out`` (JSON: config, environment, every figure) and the same path with ``.md`` (the
table printed to stdout). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout even without `pip install -e .`
# the paper's sequential greedy is test code (a Python loop over tokens): tests/laser_reference.py
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))

from laser_reference import laser_reference  # noqa: E402
from moebalance import metrics  # noqa: E402
from moebalance.config import ConfigError, RoutingContext, parse_key_values  # noqa: E402
from moebalance.harness import cli  # noqa: E402
from moebalance.harness.report import check_writable, cpu_name, write_text_atomic  # noqa: E402
from moebalance.policies import POLICIES, get_policy, route  # noqa: E402
from moebalance.policies.gate import gate_weights, score_distribution  # noqa: E402
from moebalance.policies.topk_routing import topk_indices  # noqa: E402
from moebalance.routing import Routing, check_routing, routing_from_indices  # noqa: E402
from moebalance.workloads import PRESETS, WorkloadPreset, generate_logits, get_preset  # noqa: E402

FULL_TOKENS = (1024, 8192, 65536)
QUICK_TOKENS = (1024, 8192)
FULL_REPEATS = 15
QUICK_REPEATS = 2
REFERENCE = "laser_reference"
INT_TOPK = "topk_int_keys"  # vanilla top-k selecting like the policies do: a faster control
MEGATRON = "megatron_topk"  # Megatron-Core's own topk_routing_with_score_function
REFERENCE_MAX_TOKENS = 8192  # the sequential greedy is a Python loop over tokens
PROG = "bench_routers.py"
EP_RANK, EP_SIZE = 0, 8


# Upper bounds on the options, far past any useful value, so that a typo is a one-line error
# rather than a run that exhausts memory or never ends. T tokens per rank make [8 T, E] float32
# logits (E = 64: 2 KiB per T, 0.5 GiB at the maximum) and several tensors of that size per router.
MAX_TOKENS = 262144  # 4 times the full benchmark's largest T
MAX_REPEATS = 1000
MAX_THREADS = 1024  # torch.set_num_threads crashes the process far above this


def fail(message: str) -> None:
    """Exit 2 with one line on stderr (``moebalance.harness.cli.fail``)."""
    cli.fail(PROG, message)


def _names(option: str, text: str) -> list[str]:
    """The comma-separated items of ``option``, each at most once, at least one."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        fail(f"{option} needs at least one comma-separated value, got {text!r}")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        fail(f"{option} lists {', '.join(repeated)} more than once, got {text!r}")
    return items


def _check_laser_params(params, presets: list[str]) -> None:
    """The LASER parameters against every benchmarked gate, layer by layer (as ``route``
    checks them), before anything runs; per_layer keys must be profiled layers."""
    layers = sorted({layer for name in presets for layer in PRESETS[name].layers})
    unused = sorted(set(params.per_layer) - set(layers))
    if unused:
        fail(
            f"--laser-args: per_layer has layer(s) {unused} that no benchmarked preset profiles; "
            f"allowed layers: {layers}"
        )
    for name in presets:
        preset = PRESETS[name]
        for layer in preset.layers:
            try:
                params.for_layer(layer).validate(preset.gate())
            except ConfigError as err:
                where = f"preset {name}" + (f" layer {layer}" if layer in params.per_layer else "")
                fail(f"--laser-args: {err} (for {where}: E={preset.num_experts}, k={preset.topk})")


def _check_out(out: Path) -> None:
    """Exit 2 unless the JSON and the markdown beside it can be written (checked before any
    work: the results are written only at the end)."""
    md = out.with_suffix(".md")
    if md == out:
        fail(f"--out {out}: the markdown table goes to the same path with suffix .md; "
             "give the JSON another suffix (e.g. .json)")
    for path in (out, md):
        if path.is_dir():
            fail(f"--out {out}: {path} is a directory; --out must name a file")
        if path.exists() and not os.access(path, os.W_OK):
            fail(f"--out {out}: {path} exists and is not writable")
    blocked = next((d for d in out.parents if d.exists() and not d.is_dir()), None)
    if blocked is not None:
        fail(f"--out {out}: {blocked} is a file, not a directory")
    try:
        check_writable(out)  # creates the folder if missing
    except OSError as err:
        fail(f"--out {out}: cannot write there ({err.strerror or err})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, validated before any work (exit 2 with one line on stderr on bad input)."""
    parser = cli.OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"T in {QUICK_TOKENS}, {QUICK_REPEATS} repeats"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "results" / "routers_cpu.json",
        help="JSON output; the markdown table goes next to it with suffix .md (both checked "
        "writable before any work)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per router and layer, 1 to {MAX_REPEATS} "
        f"(default {FULL_REPEATS}, --quick {QUICK_REPEATS})",
    )
    parser.add_argument(
        "--presets",
        default=",".join(PRESETS),
        help=f"comma-separated workload presets (default all: {','.join(PRESETS)})",
    )
    parser.add_argument(
        "--tokens",
        default=None,
        help=f"comma-separated batch sizes T per rank, 1 to {MAX_TOKENS} "
        "(default 1024,8192,65536; --quick 1024,8192)",
    )
    parser.add_argument(
        "--domain", default="c4", help="text domain of the load profiles (c4, github, arxiv)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic logits")
    parser.add_argument(
        "--laser-args",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="LaserParams overrides for the laser router and its sequential reference "
        "(e.g. repair_rounds=8); values are YAML scalars; checked against every preset's gate",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"intra-op threads while timing, 1 to {MAX_THREADS} (default: torch's, here the "
        "machine's cores); 1 is what each rank of a torchrun job gets unless OMP_NUM_THREADS "
        "says otherwise",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        fail(f"--threads must be >= 1 and <= {MAX_THREADS}, got {args.threads}")
    try:
        args.presets = [get_preset(name).name for name in _names("--presets", args.presets)]
    except ConfigError as err:
        fail(f"--presets: {err}")
    try:
        for name in args.presets:
            PRESETS[name].profile(None, args.domain)
    except ConfigError as err:
        fail(f"--domain: {err}")
    try:
        overrides = parse_key_values(args.laser_args, "--laser-args")
        args.laser_params = get_policy("laser").params(overrides)
    except ConfigError as err:
        fail(f"--laser-args: {err}")
    _check_laser_params(args.laser_params, args.presets)
    if args.tokens is None:
        args.tokens = list(QUICK_TOKENS if args.quick else FULL_TOKENS)
    else:
        try:
            args.tokens = [int(t) for t in _names("--tokens", args.tokens)]
        except ValueError:
            fail(f"--tokens must be comma-separated integers, got {args.tokens!r}")
        if not all(1 <= t <= MAX_TOKENS for t in args.tokens):
            fail(f"--tokens: each batch size must be >= 1 and <= {MAX_TOKENS}, got {args.tokens}")
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else FULL_REPEATS
    if not 1 <= args.repeats <= MAX_REPEATS:
        fail(f"--repeats must be >= 1 and <= {MAX_REPEATS}, got {args.repeats}")
    _check_out(args.out)
    return args


def _git(*command: str) -> str:
    return subprocess.run(
        ["git", *command], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def _load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment() -> dict:
    """Where the numbers were measured."""
    try:
        commit, dirty = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": _load_average(),  # other jobs on the machine skew timings
        "git_commit": commit,
        "git_dirty": dirty,
    }


def check(routing: Routing, router: str, num_tokens: int, preset: WorkloadPreset) -> None:
    """The routing contract each router promises (a benchmark of wrong routings is worthless)."""
    k = preset.topk
    exact_k = router in ("topk", INT_TOPK, MEGATRON, "laser", "laser_fast", "load_only", REFERENCE)
    check_routing(
        routing,
        num_tokens=num_tokens,
        num_slots=preset.num_experts,
        capacity=routing.capacity,
        min_per_token=k if exact_k else None,
        max_per_token=k if exact_k or router == "token_drop" else None,
    )


def layer_figures(routing: Routing, topk: int) -> dict:
    load = routing.expert_load()
    return {
        "load": load,
        "max_violation": float(metrics.max_violation(load)),
        "dropped_fraction": float(metrics.dropped_fraction(routing, topk)),
        "experts_per_token": float(routing.experts_per_token().double().mean()),
    }


def topk_int_keys(logits, gate, params=None, ctx=None) -> Routing:
    """Vanilla top-k, same decisions and weights, but computing the softmax once and selecting
    with ``topk_nonnegative`` as the balancing policies do (pre-softmax gates; otherwise the
    same ops as ``topk``). Timed as a second, faster control."""
    ctx = ctx or RoutingContext()
    if not (gate.score_function == "softmax" and gate.pre_softmax):
        return POLICIES["topk"].fn(logits, gate, None, ctx)  # nothing to gain
    dist = score_distribution(logits, gate)
    idx = topk_indices(logits, gate, ctx, dist)
    probs, routing_map = routing_from_indices(
        idx, gate_weights(logits, idx, gate, dist), gate.num_experts, like=logits
    )
    return Routing(
        probs, routing_map, num_dropped=torch.zeros((), dtype=torch.int64, device=logits.device)
    )


def megatron_topk(logits, gate, params=None, ctx=None) -> Routing:
    """Megatron-Core 0.19.2's ``topk_routing_with_score_function`` itself (timed only when
    megatron-core imports)."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    ctx = ctx or RoutingContext()
    probs, routing_map = topk_routing_with_score_function(
        logits,
        gate.topk,
        use_pre_softmax=gate.pre_softmax,
        num_groups=gate.num_groups,
        group_topk=gate.group_topk,
        scaling_factor=gate.scaling_factor,
        score_function=gate.score_function,
        expert_bias=ctx.expert_bias,
    )
    return Routing(
        probs, routing_map, num_dropped=torch.zeros((), dtype=torch.int64, device=logits.device)
    )


def _have_megatron() -> bool:
    try:
        import megatron.core.transformer.moe.moe_utils  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: time without this control
        return False
    return True


def _ep_routing(fn, shards, gate, params, layer, router, preset) -> Routing:
    """Route every EP rank's shard with its own rank and stack the decisions (global loads)."""
    decisions = []
    for rank, shard in enumerate(shards):
        ctx = RoutingContext(ep_rank=rank, ep_size=EP_SIZE, layer=layer)
        routing = fn(shard, gate, params, ctx)
        check(routing, router, shard.shape[0], preset)
        decisions.append(routing)
    return Routing(
        torch.cat([d.probs for d in decisions]),
        torch.cat([d.routing_map for d in decisions]),
        num_dropped=sum(d.num_dropped for d in decisions),
    )


def bench_layer(
    preset: WorkloadPreset, num_tokens: int, layer: int, args: argparse.Namespace
) -> dict[str, dict]:
    """{router: figures and timings} for one layer: T = ``num_tokens`` per EP rank."""
    gate = preset.gate()
    all_logits = generate_logits(
        preset, num_tokens * EP_SIZE, layer, seed=args.seed, domain=args.domain
    )
    shards = all_logits.chunk(EP_SIZE)
    logits, ctx = shards[0], RoutingContext(ep_rank=EP_RANK, ep_size=EP_SIZE, layer=layer)
    params = {name: get_policy(name).params() for name in POLICIES}
    params["laser"] = args.laser_params
    fns = {name: policy.fn for name, policy in POLICIES.items()}
    fns[INT_TOPK], params[INT_TOPK] = topk_int_keys, None
    controls = [INT_TOPK]
    if _have_megatron():
        fns[MEGATRON], params[MEGATRON] = megatron_topk, None
        controls.append(MEGATRON)
    out: dict[str, dict] = {}
    with torch.no_grad():
        for name in POLICIES:  # validated calls: correctness, figures, and the warm-up
            validated = lambda x, g, p, c, n=name: route(n, x, g, p, c)  # noqa: E731
            routing = _ep_routing(validated, shards, gate, params[name], layer, name, preset)
            out[name] = {**layer_figures(routing, preset.topk), "times": [], "cpu_times": []}
        vanilla = _ep_routing(POLICIES["topk"].fn, shards, gate, None, layer, "topk", preset)
        for name in controls:  # the same routing as topk, bit for bit
            routing = _ep_routing(fns[name], shards, gate, None, layer, name, preset)
            if not (torch.equal(routing.routing_map, vanilla.routing_map)
                    and torch.equal(routing.probs, vanilla.probs)):
                raise AssertionError(f"{name} routed differently from topk")
            out[name] = {**layer_figures(routing, preset.topk), "times": [], "cpu_times": []}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn(logits, gate, params[name], ctx)
                out[name]["times"].append(time.perf_counter() - wall)
                out[name]["cpu_times"].append(time.process_time() - cpu)
        if num_tokens <= REFERENCE_MAX_TOKENS:
            wall, cpu = time.perf_counter(), time.process_time()
            laser_reference(logits, gate, args.laser_params, ctx)
            times = [time.perf_counter() - wall], [time.process_time() - cpu]
            routing = _ep_routing(
                laser_reference, shards, gate, args.laser_params, layer, REFERENCE, preset
            )
            figures = layer_figures(routing, preset.topk)
            out[REFERENCE] = {**figures, "times": times[0], "cpu_times": times[1]}
    return out


def summarize(
    preset: WorkloadPreset, num_tokens: int, per_layer: list[dict[str, dict]]
) -> list[dict]:
    """One record per router: per-layer figures and their aggregates over the preset's layers."""
    def median_ms(rows: list[dict], key: str) -> list[float]:  # per layer
        return [statistics.median(r[key]) * 1e3 for r in rows]

    topk_ms = sum(median_ms([layer["topk"] for layer in per_layer], "times"))
    topk_cpu_ms = sum(median_ms([layer["topk"] for layer in per_layer], "cpu_times"))
    records = []
    for router in per_layer[0]:
        rows = [layer[router] for layer in per_layer]
        time_ms, cpu_ms = median_ms(rows, "times"), median_ms(rows, "cpu_times")
        loads = torch.stack([r["load"] for r in rows])
        records.append({
            "preset": preset.name,
            "num_tokens": num_tokens,
            "router": router,
            "layers": list(preset.layers),
            "max_violation": [r["max_violation"] for r in rows],
            "i_agg": float(metrics.aggregated_imbalance(loads)),
            "dropped_fraction": statistics.fmean(r["dropped_fraction"] for r in rows),
            "experts_per_token": statistics.fmean(r["experts_per_token"] for r in rows),
            "time_ms": time_ms,
            "time_ms_total": sum(time_ms),
            "time_vs_topk": sum(time_ms) / topk_ms,
            "cpu_time_ms": cpu_ms,
            "cpu_time_vs_topk": sum(cpu_ms) / max(topk_cpu_ms, 1e-9),
            "timed_runs": len(rows[0]["times"]),
            "expert_load": loads.tolist(),
        })
    return records


def _per_layer(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def markdown(records: list[dict], config: dict, env: dict) -> str:
    """The results as markdown: one row per (preset, T, router), then LASER vs its reference."""
    head = [
        "# Router benchmark (CPU)",
        "",
        f"`{config.get('command', 'python scripts/bench_routers.py')}`. "
        f"Synthetic logits calibrated to real loads (`moebalance.workloads`, domain "
        f"{config['domain']}, seed {config['seed']}); median of {config['repeats']} timed repeats; "
        f"torch {env['torch']}, {env['torch_threads']} intra-op thread(s), {env['cpu_model']}.",
        "MV per layer = max/mean - 1 (the preset's layers); I_agg = mean over layers of max/mean; "
        "time = sum over layers of the median routing time, and as a multiple of vanilla top-k "
        "on the same logits (wall; CPU = process CPU time, all threads). "
        f"laser_reference (sequential greedy) runs once, T <= {REFERENCE_MAX_TOKENS}. "
        "The × columns divide by topk, which runs Megatron-Core's routing op for op "
        f"({MEGATRON}: Megatron's own function, timed beside it); {INT_TOPK}: vanilla top-k's "
        "decisions computed as the policies compute theirs (int32-key top-k, dense outputs "
        "built in place), a faster control. "
        f"T = tokens per rank; EP = {EP_SIZE} simulated: each rank routes its own T tokens with "
        "its own rank (capacities from its T, LASER with per-rank loads, expanded drop adding its "
        "local experts) and balance is over the summed global load; times are one rank's call. "
        "deepseek's skew is assumed (OLMoE's profiles).",
        "",
        "| preset | T | router | MV per layer | I_agg | dropped | experts/token | time ms "
        "| × top-k | × top-k (CPU) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        head.append(
            f"| {r['preset']} | {r['num_tokens']} | {r['router']} | "
            f"{_per_layer(r['max_violation'])} | {r['i_agg']:.3f} | "
            f"{100 * r['dropped_fraction']:.2f}% | {r['experts_per_token']:.2f} | "
            f"{r['time_ms_total']:.1f} | {r['time_vs_topk']:.2f} | {r['cpu_time_vs_topk']:.2f} |"
        )
    by_key = {(r["preset"], r["num_tokens"], r["router"]): r for r in records}
    pairs = [
        (by_key[(preset, tokens, "laser")], by_key.get((preset, tokens, "laser_fast")), ref)
        for (preset, tokens, router), ref in by_key.items()
        if router == REFERENCE
    ]
    if pairs:
        head += [
            "",
            "## LASER: vectorised vs sequential reference (balance)",
            "",
            "Worst layer = the largest laser − reference MV over the layers (negative: the "
            "vectorised LASER balances better on every layer). laser_fast (price assignment) "
            "for comparison.",
            "",
            "| preset | T | laser MV per layer | reference MV per layer | laser I_agg "
            "| reference I_agg | worst layer laser − reference MV | laser_fast MV per layer |",
            "|---|---:|---|---|---:|---:|---:|---|",
        ]
        for vec, fast, ref in pairs:
            worst = max(a - b for a, b in zip(vec["max_violation"], ref["max_violation"]))
            fast_mv = _per_layer(fast["max_violation"]) if fast else "n/a"
            head.append(
                f"| {vec['preset']} | {vec['num_tokens']} | "
                f"{_per_layer(vec['max_violation'])} | {_per_layer(ref['max_violation'])} | "
                f"{vec['i_agg']:.3f} | {ref['i_agg']:.3f} | {worst:+.4f} | {fast_mv} |"
            )
    return "\n".join(head) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    env = environment()
    config = {
        "command": " ".join(["python scripts/bench_routers.py", *(sys.argv[1:] if argv is None else argv)]),
        "presets": args.presets,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "quick": args.quick,
        "threads": args.threads,
        "domain": args.domain,
        "seed": args.seed,
        "ep_rank": EP_RANK,
        "ep_size": EP_SIZE,
        "reference_max_tokens": REFERENCE_MAX_TOKENS,
        "routers": {
            name: dataclasses.asdict(args.laser_params if name == "laser" else get_policy(name).params())
            for name in POLICIES
        },
        "reference_params": dataclasses.asdict(args.laser_params),
        "timing": "median of repeats of policy.fn under torch.no_grad (no validation), "
        "interleaved across routers, summed over layers; laser_reference timed once",
        "metrics": "MV = max/mean - 1 per layer; I_agg = mean over layers of max/mean; "
        "dropped = removed top-k assignments / (T*k); experts/token = mean routed experts",
    }
    started = time.perf_counter()
    records = []
    for name in args.presets:
        preset = PRESETS[name]
        preset_start = time.perf_counter()
        for num_tokens in args.tokens:
            per_layer = [bench_layer(preset, num_tokens, layer, args) for layer in preset.layers]
            records.extend(summarize(preset, num_tokens, per_layer))
        print(
            f"[bench_routers] {name}: E={preset.num_experts} k={preset.topk} "
            f"layers={list(preset.layers)} T={args.tokens} "
            f"done in {time.perf_counter() - preset_start:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    env["load_average_at_end"] = _load_average()
    env["wall_s"] = round(time.perf_counter() - started, 2)
    report = markdown(records, config, env)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "environment": env,
        "results": records,
    }
    write_text_atomic(args.out, json.dumps(document, indent=1) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), report)
    print(f"[bench_routers] wrote {args.out} and {args.out.with_suffix('.md')} "
          f"in {env['wall_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
