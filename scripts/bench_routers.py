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

Gap to the optimum: for every EP rank's call the least possible peak load of an assignment of
the same pools and starting loads (``moebalance.assignment_optimum``: max-flow, exact), and
each LASER router's (and the greedy's) peak above it, in tokens and relative to the optimum;
the worst rank and layer is reported per cell. Op count: the aten ops one call dispatches
(``TorchDispatchMode``; "kernels" leaves out views), per router, first layer, rank 0.

Workloads: the presets (``--presets``, domain ``--domain``), and, when the real OLMoE routing
counts are present (``../shared/data/routing-stats/expert_counts.json``; skipped with a note
when absent), strongly skewed ones derived from them for the domains of ``--skewed``
(github and arxiv reach max/mean 5-7.8): ``olmoe-<domain>`` (the counts of that domain, 64
experts, top-8, the default pool c = 16) and ``olmoe-top2-<domain> c=3`` / ``c=4`` (the same
per-expert counts routed top-2, LASER pools of 3 and 4: a few experts sit in the pools of
more than 20% of the tokens; the "max pool share" column gives the largest share per cell).
Their score concentration (median top-k mass per layer) is assumed, as the presets' is.

``--compile-check`` also tries ``torch.compile(fullgraph=True)`` on every policy function
(CPU, each in a fresh process): compiled or the reason it is not, and whether the compiled
call makes the same decisions.

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
    python scripts/bench_routers.py --skewed none  # the presets only
    python scripts/bench_routers.py --compile-check  # and torch.compile on every policy
Writes ``--out`` (JSON: config, environment, every figure) and the same path with ``.md`` (the
table printed to stdout). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple
from unittest import mock

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
from moebalance.workloads import (  # noqa: E402
    DEFAULT_COUNTS_PATH,
    PRESETS,
    WorkloadPreset,
    generate_logits,
    get_preset,
    load_expert_counts,
)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

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
LASER_ROUTERS = ("laser", "laser_fast", REFERENCE)  # the rows with a gap to the optimum
SKEWED_DOMAINS = ("github", "arxiv")  # OLMoE's most skewed domains (max/mean 5-7.8)
TOP2_POOLS = (3, 4)  # LASER pools of the top-2 skewed workloads
# Assumed median top-2 mass of the full softmax per profiled layer (0, 7, 15) for the top-2
# workloads (the counts have no scores): flatter in the middle, as the presets assume.
TOP2_MEDIAN_MASS = (0.40, 0.35, 0.45)
COMPILE_TOKENS = 256  # logits per compile check


# Upper bounds on the options, far past any useful value, so that a typo is a one-line error
# rather than a run that exhausts memory or never ends. T tokens per rank make [8 T, E] float32
# logits (E = 64: 2 KiB per T, 0.5 GiB at the maximum) and several tensors of that size per router.
MAX_TOKENS = 262144  # 4 times the full benchmark's largest T
MAX_REPEATS = 1000
MAX_THREADS = 1024  # torch.set_num_threads crashes the process far above this


class Workload(NamedTuple):
    """One benchmarked workload: logits of ``preset`` on ``domain``, LASER pools changed by
    ``laser`` (LaserParams fields for the laser routers and the reference)."""

    name: str
    preset: WorkloadPreset
    domain: str
    laser: tuple[tuple[str, object], ...] = ()


def preset_workloads(names: list[str], domain: str) -> list[Workload]:
    return [Workload(name, PRESETS[name], domain) for name in names]


def skewed_workloads(domains: list[str], path: Path = DEFAULT_COUNTS_PATH) -> tuple[list[Workload], str | None]:
    """The skewed workloads from the real OLMoE counts at ``path`` (module doc), or ([], why)
    when the file is absent."""
    if not domains:
        return [], None
    if not Path(path).is_file():
        return [], f"real routing counts not found at {path}: skewed workloads skipped"
    olmoe = PRESETS["olmoe"]
    out = []
    for domain in domains:
        counts = load_expert_counts(path, "olmoe-1b-7b-0924", domain)
        layers = tuple(sorted(counts))
        profiles = tuple(
            tuple((counts[layer].double() / counts[layer].double().mean()).tolist()) for layer in layers
        )
        common = dict(num_experts=olmoe.num_experts, score_function="softmax", pre_softmax=True,
                      layers=layers, relative_load=((domain, profiles),), mass_spread=olmoe.mass_spread,
                      source_model="olmoe-1b-7b-0924")
        top8 = WorkloadPreset(name=f"olmoe-{domain}", topk=olmoe.topk,
                              median_topk_mass=olmoe.median_topk_mass,
                              note=f"OLMoE {domain} counts (shared data), top-8", **common)
        out.append(Workload(top8.name, top8, domain))
        top2 = WorkloadPreset(name=f"olmoe-top2-{domain}", topk=2, median_topk_mass=TOP2_MEDIAN_MASS,
                              note=f"OLMoE {domain} counts (shared data) routed top-2", **common)
        out += [Workload(f"{top2.name} c={c}", top2, domain, (("pool_size", c),)) for c in TOP2_POOLS]
    return out, None


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


def _check_laser_params(params, workloads: list[Workload]) -> None:
    """The LASER parameters against every benchmarked gate, layer by layer (as ``route``
    checks them), before anything runs; per_layer keys must be profiled layers."""
    layers = sorted({layer for w in workloads for layer in w.preset.layers})
    unused = sorted(set(params.per_layer) - set(layers))
    if unused:
        fail(
            f"--laser-args: per_layer has layer(s) {unused} that no benchmarked preset profiles; "
            f"allowed layers: {layers}"
        )
    for w in workloads:
        preset = w.preset
        for layer in preset.layers:
            try:
                dataclasses.replace(params, **dict(w.laser)).for_layer(layer).validate(preset.gate())
            except ConfigError as err:
                where = f"workload {w.name}" + (f" layer {layer}" if layer in params.per_layer else "")
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
    parser.add_argument(
        "--skewed",
        default=",".join(SKEWED_DOMAINS),
        help="comma-separated OLMoE domains of the skewed workloads from the real counts in "
        "../shared/data (skipped when absent), or 'none' (default github,arxiv)",
    )
    parser.add_argument(
        "--no-optimum", action="store_true",
        help="skip the exact optimum (max-flow per rank and layer) and the gap columns",
    )
    parser.add_argument(
        "--compile-check", action="store_true",
        help="also try torch.compile(fullgraph=True) on every policy (CPU, a fresh process each)",
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
    args.workloads = preset_workloads(args.presets, args.domain)
    args.skew_note = None
    if args.skewed.strip() != "none":
        domains = _names("--skewed", args.skewed)
        try:
            skewed, args.skew_note = skewed_workloads(domains)
        except ConfigError as err:
            fail(f"--skewed: {err}")
        args.workloads += skewed
        if args.skew_note:
            print(f"[bench_routers] {args.skew_note}", file=sys.stderr)
    try:
        overrides = parse_key_values(args.laser_args, "--laser-args")
        args.laser_params = get_policy("laser").params(overrides)
    except ConfigError as err:
        fail(f"--laser-args: {err}")
    _check_laser_params(args.laser_params, args.workloads)
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


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (all, and the kernels: views left out)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def count_ops(fn, *args) -> tuple[int, int]:
    """(aten ops, of which not views) of one call ``fn(*args)`` under ``torch.no_grad``."""
    with torch.no_grad(), _OpCounter() as counter:
        fn(*args)
    return counter.ops, counter.kernels


def _ep_routing(fn, shards, gate, params, layer, router, preset) -> tuple[Routing, list[int]]:
    """Route every EP rank's shard with its own rank and stack the decisions (global loads);
    also each rank's peak expert load."""
    decisions, peaks = [], []
    for rank, shard in enumerate(shards):
        ctx = RoutingContext(ep_rank=rank, ep_size=EP_SIZE, layer=layer)
        routing = fn(shard, gate, params, ctx)
        check(routing, router, shard.shape[0], preset)
        decisions.append(routing)
        peaks.append(int(routing.expert_load().max()) if shard.shape[0] else 0)
    return Routing(
        torch.cat([d.probs for d in decisions]),
        torch.cat([d.routing_map for d in decisions]),
        num_dropped=sum(d.num_dropped for d in decisions),
    ), peaks


def _plan_key(params, layer: int) -> tuple:
    """The LaserParams fields that decide the assignment problem (pools, shape test)."""
    p = params.for_layer(layer)
    return (p.pool_size, p.top_m, p.eps_high, p.min_score_ratio)


def optimum_gaps(shards, gate, layer: int, params: dict, peaks: dict) -> dict[str, dict]:
    """{router: {"peak": [per rank], "optimum": [per rank]}} for the LASER routers: the least
    possible peak of each rank's call (``assignment_optimum``, max-flow), searched below the
    best peak any router reached on the same problem."""
    from moebalance.assignment_optimum import laser_problem, optimal_peak

    out, solved = {}, {}
    for router in LASER_ROUTERS:
        if router not in peaks:
            continue
        key = _plan_key(params[router], layer)
        if key not in solved:
            same = [r for r in peaks if r in LASER_ROUTERS and _plan_key(params[r], layer) == key]
            optima = []
            for rank, shard in enumerate(shards):
                ctx = RoutingContext(ep_rank=rank, ep_size=EP_SIZE, layer=layer)
                problem = laser_problem(shard, gate, params[router], ctx)
                best = min(peaks[r][rank] for r in same)
                optima.append(optimal_peak(problem, upper=best))
            solved[key] = optima
        out[router] = {"peak": peaks[router], "optimum": solved[key]}
    return out


def pool_share(shard, gate, params, layer: int) -> float:
    """The largest share of rank 0's tokens whose pool (flexible tokens) or vanilla choice
    (skewed tokens) holds one expert."""
    from moebalance.policies.laser_routing import laser_plan

    ctx = RoutingContext(ep_rank=EP_RANK, ep_size=EP_SIZE, layer=layer)
    plan = laser_plan(shard, gate, params.for_layer(layer), ctx)
    pooled = torch.zeros(shard.shape[0], gate.num_experts, dtype=torch.bool)
    pooled.scatter_(1, plan.pool_idx, plan.valid)
    chosen = torch.zeros_like(pooled).scatter_(1, plan.vanilla_idx, True)
    held = torch.where(plan.flexible.unsqueeze(1), pooled, chosen)
    return float(held.float().mean(0).max()) if shard.shape[0] else 0.0


def bench_layer(
    workload: Workload, num_tokens: int, layer: int, args: argparse.Namespace
) -> dict[str, dict]:
    """{router: figures and timings} for one layer: T = ``num_tokens`` per EP rank."""
    preset = workload.preset
    gate = preset.gate()
    all_logits = generate_logits(
        preset, num_tokens * EP_SIZE, layer, seed=args.seed, domain=workload.domain
    )
    shards = all_logits.chunk(EP_SIZE)
    logits, ctx = shards[0], RoutingContext(ep_rank=EP_RANK, ep_size=EP_SIZE, layer=layer)
    params = {name: get_policy(name).params() for name in POLICIES}
    params["laser"] = args.laser_params
    for name in ("laser", "laser_fast"):
        params[name] = dataclasses.replace(params[name], **dict(workload.laser))
    params[REFERENCE] = params["laser"]
    fns = {name: policy.fn for name, policy in POLICIES.items()}
    fns[INT_TOPK], params[INT_TOPK] = topk_int_keys, None
    controls = [INT_TOPK]
    if _have_megatron():
        fns[MEGATRON], params[MEGATRON] = megatron_topk, None
        controls.append(MEGATRON)
    out: dict[str, dict] = {}
    peaks: dict[str, list[int]] = {}
    with torch.no_grad():
        for name in POLICIES:  # validated calls: correctness, figures, and the warm-up
            validated = lambda x, g, p, c, n=name: route(n, x, g, p, c)  # noqa: E731
            routing, peaks[name] = _ep_routing(validated, shards, gate, params[name], layer, name, preset)
            out[name] = {**layer_figures(routing, preset.topk), "times": [], "cpu_times": []}
        vanilla, _ = _ep_routing(POLICIES["topk"].fn, shards, gate, None, layer, "topk", preset)
        for name in controls:  # the same routing as topk, bit for bit
            routing, _ = _ep_routing(fns[name], shards, gate, None, layer, name, preset)
            if not (torch.equal(routing.routing_map, vanilla.routing_map)
                    and torch.equal(routing.probs, vanilla.probs)):
                raise AssertionError(f"{name} routed differently from topk")
            out[name] = {**layer_figures(routing, preset.topk), "times": [], "cpu_times": []}
        for name, fn in fns.items():
            out[name]["ops"], out[name]["kernels"] = count_ops(fn, logits, gate, params[name], ctx)
        for _ in range(args.repeats):
            for name, fn in fns.items():
                wall, cpu = time.perf_counter(), time.process_time()
                fn(logits, gate, params[name], ctx)
                out[name]["times"].append(time.perf_counter() - wall)
                out[name]["cpu_times"].append(time.process_time() - cpu)
        if num_tokens <= REFERENCE_MAX_TOKENS:
            wall, cpu = time.perf_counter(), time.process_time()
            laser_reference(logits, gate, params[REFERENCE], ctx)
            times = [time.perf_counter() - wall], [time.process_time() - cpu]
            routing, peaks[REFERENCE] = _ep_routing(
                laser_reference, shards, gate, params[REFERENCE], layer, REFERENCE, preset
            )
            figures = layer_figures(routing, preset.topk)
            out[REFERENCE] = {**figures, "times": times[0], "cpu_times": times[1]}
        if not args.no_optimum:
            for name, gaps in optimum_gaps(shards, gate, layer, params, peaks).items():
                out[name]["optimum"] = gaps
        out["laser"]["pool_share"] = pool_share(logits, gate, params["laser"], layer)
    return out


def _gap_summary(rows: list[dict]) -> dict | None:
    """Worst gap to the optimum over layers and ranks: tokens and relative; per layer too."""
    if not all("optimum" in r for r in rows):
        return None
    per_layer_rel, per_layer_tok = [], []
    for r in rows:
        gaps = [(p - o, (p - o) / o if o else 0.0) for p, o in zip(r["optimum"]["peak"], r["optimum"]["optimum"])]
        per_layer_tok.append(max(g[0] for g in gaps))
        per_layer_rel.append(max(g[1] for g in gaps))
    return {
        "gap_tokens_per_layer": per_layer_tok,
        "gap_per_layer": per_layer_rel,
        "gap_tokens": max(per_layer_tok),
        "gap": max(per_layer_rel),
        "peaks": [r["optimum"]["peak"] for r in rows],
        "optima": [r["optimum"]["optimum"] for r in rows],
    }


def summarize(
    workload: Workload, num_tokens: int, per_layer: list[dict[str, dict]]
) -> list[dict]:
    """One record per router: per-layer figures and their aggregates over the preset's layers."""
    preset = workload.preset

    def median_ms(rows: list[dict], key: str) -> list[float]:  # per layer
        return [statistics.median(r[key]) * 1e3 for r in rows]

    topk_ms = sum(median_ms([layer["topk"] for layer in per_layer], "times"))
    topk_cpu_ms = sum(median_ms([layer["topk"] for layer in per_layer], "cpu_times"))
    records = []
    for router in per_layer[0]:
        rows = [layer[router] for layer in per_layer]
        time_ms, cpu_ms = median_ms(rows, "times"), median_ms(rows, "cpu_times")
        loads = torch.stack([r["load"] for r in rows])
        record = {
            "preset": workload.name,
            "model_preset": preset.name,
            "domain": workload.domain,
            "laser_overrides": dict(workload.laser),
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
            "ops_per_call": rows[0].get("ops"),
            "kernels_per_call": rows[0].get("kernels"),
            "expert_load": loads.tolist(),
        }
        if router in LASER_ROUTERS:
            record["optimum"] = _gap_summary(rows)
        if router == "laser":
            record["pool_share"] = [r["pool_share"] for r in rows]
        records.append(record)
    return records


def _per_layer(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def _gap(record: dict | None) -> str:
    summary = (record or {}).get("optimum")
    if not summary:
        return "n/a"
    return f"{100 * summary['gap']:+.2f}% / {summary['gap_tokens']:+d}"


def _gaps_per_layer(record: dict | None) -> str:
    summary = (record or {}).get("optimum")
    if not summary:
        return "n/a"
    return " / ".join(
        f"{100 * g:+.2f}% ({t:+d})"
        for g, t in zip(summary["gap_per_layer"], summary["gap_tokens_per_layer"])
    )


def markdown(records: list[dict], config: dict, env: dict, compiled: dict | None = None) -> str:
    """The results as markdown: one row per (workload, T, router), then LASER against its
    reference and the exact optimum, then the compile check."""
    head = [
        "# Router benchmark (CPU)",
        "",
        f"`{config.get('command', 'python scripts/bench_routers.py')}`. "
        f"Synthetic logits calibrated to real loads (`moebalance.workloads`, presets on domain "
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
        "deepseek's skew is assumed (OLMoE's profiles). "
        "Gap to opt = the worst, over layers and ranks, of the router's peak expert load above "
        "the least possible peak for the same pools (`moebalance.assignment_optimum`, "
        "max-flow), relative / in tokens. Ops = aten ops of one call (first layer, rank 0), "
        "kernels = the same without views.",
    ]
    if config.get("skew_note"):
        head += ["", f"Skewed workloads: {config['skew_note']}."]
    elif config.get("skewed"):
        head += [
            "",
            "Skewed workloads from the real OLMoE counts (`../shared/data`): olmoe-<domain> = "
            "that domain's per-expert counts, top-8, pools of 16; olmoe-top2-<domain> c=3 / c=4 = "
            "the same counts routed top-2, pools of 3 / 4; assumed median top-k mass per layer "
            f"{list(PRESETS['olmoe'].median_topk_mass)} (top-8) and {list(TOP2_MEDIAN_MASS)} (top-2).",
        ]
    head += [
        "",
        "| preset | T | router | MV per layer | I_agg | dropped | experts/token | time ms "
        "| × top-k | × top-k (CPU) | gap to opt | ops (kernels) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ops = "n/a" if r.get("ops_per_call") is None else f"{r['ops_per_call']} ({r['kernels_per_call']})"
        gap = _gap(r) if r["router"] in LASER_ROUTERS else ""
        head.append(
            f"| {r['preset']} | {r['num_tokens']} | {r['router']} | "
            f"{_per_layer(r['max_violation'])} | {r['i_agg']:.3f} | "
            f"{100 * r['dropped_fraction']:.2f}% | {r['experts_per_token']:.2f} | "
            f"{r['time_ms_total']:.1f} | {r['time_vs_topk']:.2f} | {r['cpu_time_vs_topk']:.2f} | "
            f"{gap} | {ops} |"
        )
    by_key = {(r["preset"], r["num_tokens"], r["router"]): r for r in records}
    cells = sorted({(r["preset"], r["num_tokens"]) for r in records},
                   key=lambda c: ([r["preset"] for r in records].index(c[0]), c[1]))
    if any(by_key.get((w, t, "laser"), {}).get("optimum") for w, t in cells):
        head += [
            "",
            "## LASER: gap to the exact optimum",
            "",
            "Per layer, the worst rank: peak expert load above the least possible peak for the "
            "same pools and starting loads (relative, tokens). greedy = the paper's sequential "
            f"assignment (`tests/laser_reference.py`, T <= {REFERENCE_MAX_TOKENS}). Max pool share "
            "= the largest share of rank 0's tokens whose pool (or vanilla choice, for skewed "
            "tokens) holds one expert, per layer.",
            "",
            "| preset | T | max pool share | optimum peak (rank 0) | greedy | laser | laser_fast |",
            "|---|---:|---|---|---|---|---|",
        ]
        for w, t in cells:
            vec = by_key.get((w, t, "laser"))
            if not vec or not vec.get("optimum"):
                continue
            optima = " / ".join(str(o[0]) for o in vec["optimum"]["optima"])
            share = " / ".join(f"{100 * x:.0f}%" for x in vec.get("pool_share", []))
            head.append(
                f"| {w} | {t} | {share} | {optima} | {_gaps_per_layer(by_key.get((w, t, REFERENCE)))} "
                f"| {_gaps_per_layer(vec)} | {_gaps_per_layer(by_key.get((w, t, 'laser_fast')))} |"
            )
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
    if compiled:
        head += [
            "",
            "## torch.compile(fullgraph=True) on CPU",
            "",
            f"Each policy function compiled in a fresh process on {COMPILE_TOKENS} tokens of the "
            f"first workload (before any eager call), then compared with the eager call; where "
            "the decisions differ, compiled again with inductor's buffer reuse off "
            "(`torch._inductor.config.allow_buffer_reuse = False`).",
            "",
            "| router | compiled | same decisions | tokens differing | peak eager / compiled "
            "| max weight difference | same without buffer reuse | seconds | reason |",
            "|---|---|---|---:|---:|---:|---|---:|---|",
        ]
        for name, c in compiled.items():
            same = "" if c.get("same_decisions") is None else ("yes" if c["same_decisions"] else "no")
            differing = "" if c.get("tokens_differing") is None else f"{100 * c['tokens_differing']:.1f}%"
            peaks = "" if c.get("peak_eager") is None else f"{c['peak_eager']} / {c['peak_compiled']}"
            diff = "" if c.get("max_weight_diff") is None else f"{c['max_weight_diff']:.2e}"
            reason = (c.get("reason") or "").replace("|", "/").replace("\n", " ")[:160]
            no_reuse = c.get("same_without_buffer_reuse")
            no_reuse = "" if no_reuse is None else ("yes" if no_reuse else "no")
            head.append(
                f"| {name} | {'yes' if c['compiled'] else 'no'} | {same} | {differing} | {peaks} | "
                f"{diff} | {no_reuse} | {c['seconds']:.1f} | {reason} |"
            )
    return "\n".join(head) + "\n"


def _compile_one(queue, name: str, workload: Workload, laser_params) -> None:
    """Child process: compile policy ``name`` with fullgraph=True and compare with eager."""
    result = {"compiled": False, "same_decisions": None, "max_weight_diff": None, "reason": None}
    started = time.perf_counter()
    try:
        gate = workload.preset.gate()
        logits = generate_logits(workload.preset, COMPILE_TOKENS, workload.preset.layers[0])
        policy = get_policy(name)
        params = laser_params if name == "laser" else policy.params()
        ctx = RoutingContext()
        with torch.no_grad():  # compiled first: tracing must not rely on an eager call's caches
            compiled = torch.compile(policy.fn, fullgraph=True)(logits, gate, params, ctx)
            eager = policy.fn(logits, gate, params, ctx)
        result["compiled"] = True
        result["same_decisions"] = bool(torch.equal(eager.routing_map, compiled.routing_map))
        result["tokens_differing"] = float((eager.routing_map != compiled.routing_map).any(1).float().mean())
        result["peak_eager"] = int(eager.expert_load().max())
        result["peak_compiled"] = int(compiled.expert_load().max())
        result["max_weight_diff"] = float((eager.probs.float() - compiled.probs.float()).abs().max())
        if not result["same_decisions"]:  # again without inductor's buffer reuse
            import torch._inductor.config as inductor_config

            torch._dynamo.reset()
            with torch.no_grad(), mock.patch.object(inductor_config, "allow_buffer_reuse", False):
                again = torch.compile(policy.fn, fullgraph=True)(logits, gate, params, ctx)
            result["same_without_buffer_reuse"] = bool(torch.equal(eager.routing_map, again.routing_map))
    except Exception as err:  # noqa: BLE001 - the failure is the finding
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        result["reason"] = f"{type(err).__name__}: {' '.join(lines[:3])}"
    result["seconds"] = time.perf_counter() - started
    queue.put(result)


def compile_check(workload: Workload, laser_params) -> dict[str, dict]:
    """{router: compile result} for every registered policy, each in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for name in POLICIES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_compile_one, args=(queue, name, workload, laser_params))
        proc.start()
        proc.join(timeout=600)
        if proc.is_alive():
            proc.terminate()
            results[name] = {"compiled": False, "reason": "timed out after 600 s", "seconds": 600.0}
        else:
            results[name] = queue.get() if not queue.empty() else {
                "compiled": False, "reason": f"process exited with {proc.exitcode}", "seconds": 0.0}
        print(f"[bench_routers] compile {name}: {results[name]}", file=sys.stderr, flush=True)
    return results


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
        "skewed": [w.name for w in args.workloads if w.preset.name not in PRESETS],
        "skew_note": args.skew_note,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "quick": args.quick,
        "threads": args.threads,
        "domain": args.domain,
        "seed": args.seed,
        "ep_rank": EP_RANK,
        "ep_size": EP_SIZE,
        "reference_max_tokens": REFERENCE_MAX_TOKENS,
        "optimum": not args.no_optimum,
        "routers": {
            name: dataclasses.asdict(args.laser_params if name == "laser" else get_policy(name).params())
            for name in POLICIES
        },
        "reference_params": dataclasses.asdict(args.laser_params),
        "workload_laser_overrides": {w.name: dict(w.laser) for w in args.workloads if w.laser},
        "timing": "median of repeats of policy.fn under torch.no_grad (no validation), "
        "interleaved across routers, summed over layers; laser_reference timed once",
        "metrics": "MV = max/mean - 1 per layer; I_agg = mean over layers of max/mean; "
        "dropped = removed top-k assignments / (T*k); experts/token = mean routed experts; "
        "gap = (peak - least possible peak) / least possible peak per rank's call, worst rank",
    }
    started = time.perf_counter()
    records = []
    for workload in args.workloads:
        preset = workload.preset
        preset_start = time.perf_counter()
        for num_tokens in args.tokens:
            per_layer = [bench_layer(workload, num_tokens, layer, args) for layer in preset.layers]
            records.extend(summarize(workload, num_tokens, per_layer))
        print(
            f"[bench_routers] {workload.name}: E={preset.num_experts} k={preset.topk} "
            f"layers={list(preset.layers)} T={args.tokens} "
            f"done in {time.perf_counter() - preset_start:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    compiled = compile_check(args.workloads[0], args.laser_params) if args.compile_check else None
    env["load_average_at_end"] = _load_average()
    env["wall_s"] = round(time.perf_counter() - started, 2)
    report = markdown(records, config, env, compiled)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "environment": env,
        "results": records,
        "compile_check": compiled,
    }
    write_text_atomic(args.out, json.dumps(document, indent=1) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), report)
    print(f"[bench_routers] wrote {args.out} and {args.out.with_suffix('.md')} "
          f"in {env['wall_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
