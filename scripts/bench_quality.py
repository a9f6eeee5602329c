#!/usr/bin/env python
"""Quality against balance on the trained tiny MoE at EP 4: what each balancing router costs in
held-out perplexity, and what it buys in MV, dropped fraction and straggler time.

    python scripts/bench_quality.py            # launches torchrun --nproc-per-node 4 itself

Every router runs on the same model (``checkpoints/tiny-moe``, swapped in, weights unchanged)
over the same held-out sequences of every domain of the default corpus (``moebalance.corpus``),
teacher-forced, EP = 4 on gloo: each rank evaluates its own ``--seqs`` sequences per domain
through the EP model in lockstep, ``--chunk`` sequences per forward call. Routers: each policy
with its default parameters; token drop (score- and order-based) and expanded drop at capacity
factor gamma in {1.0, 1.25, 1.5, 2.0}; LASER with candidate pool c in {k, k + 1, 2k}, and at
c = k + 1 with a lower skew threshold eps_high (0.5, 0.7).

Per router: perplexity and its change against vanilla top-k (overall and per domain),
next-token accuracy, dropped fraction (of token-expert assignments), MV (max / mean - 1 of the
EP-global expert loads) and straggler time (max - mean over ranks of expert compute time, ms)
as p50 / mean over the (forward call, layer) samples (``moebalance.telemetry.summarize``).
Rank 0 writes ``--out`` (JSON) and a markdown table beside it (.md). On a 2-core box 4 ranks
share 2 cores, so straggler times are indicative only; the routing figures are exact.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance.policies import POLICIES, make_params  # noqa: E402

PROG = "bench_quality.py"
GAMMAS = (1.0, 1.25, 1.5, 2.0)


def router_grid(topk: int) -> list[tuple[str, str, dict]]:
    """(label, policy, params) in report order."""
    grid = [(name, name, {}) for name in POLICIES]
    for g in GAMMAS:
        grid.append((f"token_drop score g={g}", "token_drop", {"capacity_factor": g}))
    for g in GAMMAS:
        grid.append(
            (f"token_drop order g={g}", "token_drop", {"capacity_factor": g, "drop_policy": "order"})
        )
    for g in GAMMAS:
        grid.append((f"expanded_drop g={g}", "expanded_drop", {"capacity_factor": g}))
    for c in sorted({topk, topk + 1, 2 * topk}):
        grid.append((f"laser c={c}", "laser", {"pool_size": c}))
    # LASER only reroutes tokens whose top-k score mass is below eps_high (default 0.9): a
    # lower threshold leaves more tokens on their vanilla experts
    for eps in (0.5, 0.7):
        grid.append((f"laser c={topk + 1} eps_high={eps}", "laser",
                     {"pool_size": topk + 1, "eps_high": eps}))
    # ... and a score floor keeps candidates close to the token's best expert
    for ratio in (0.25, 0.5):
        grid.append((f"laser c={2 * topk} min_score_ratio={ratio}", "laser",
                     {"pool_size": 2 * topk, "min_score_ratio": ratio}))
    grid.append((f"laser c={2 * topk} eps_high=0.5 min_score_ratio=0.5", "laser",
                 {"pool_size": 2 * topk, "eps_high": 0.5, "min_score_ratio": 0.5}))
    grid.append(("laser_fast eps_high=0.5 min_score_ratio=0.5", "laser_fast",
                 {"eps_high": 0.5, "min_score_ratio": 0.5}))
    return grid


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=4, help="ranks = EP size (default: %(default)s)")
    p.add_argument("--seqs", type=int, default=16, help="sequences per domain and rank (%(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (%(default)s)")
    p.add_argument("--chunk", type=int, default=8, help="sequences per forward (%(default)s)")
    p.add_argument("--checkpoint", default=None, help="default: checkpoints/tiny-moe")
    p.add_argument("--out", default=str(ROOT / "results" / "quality_cpu.json"))
    return p.parse_args(argv)


def launch(args: argparse.Namespace) -> int:
    """Re-run this script under torchrun with --nproc ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(args.nproc), __file__, *sys.argv[1:],
    ]
    return subprocess.run(command, cwd=ROOT, env=env).returncode


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from megatron_patch import make_router_class, swap_routers
    from megatron_patch.instrument import instrument
    from megatron_patch.model import build_model, destroy_distributed, init_distributed
    from megatron_patch.quality import evaluate, quality_from_sums
    from moebalance.corpus import default_corpus, heldout_sequences
    from moebalance.model_config import load_model_config, trained_checkpoint
    from moebalance.telemetry import MoERecorder, gather_to_rank0, summarize

    for pattern in (r"Transformer Engine", r"Apex", r"absl", r"full scope", r"`torch\.distributed"):
        warnings.filterwarnings("ignore", message=pattern)
    checkpoint, config = trained_checkpoint()
    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
        config = checkpoint.parent / "config.yaml"
    cfg = load_model_config(config)
    setup = init_distributed(None, 300.0)
    rank, world = setup.rank, setup.world_size
    model = build_model(cfg, ep_size=setup.ep_size, router="topk", checkpoint=checkpoint)
    recorder = MoERecorder(setup.device, rank=rank, ep_rank=setup.ep_rank, ep_group=setup.ep_group)
    instrument(model, recorder)
    corpus = default_corpus()
    sequences = {
        d: heldout_sequences(corpus, d, args.seqs * world, args.seq_len)[rank::world]
        for d in corpus.domains
    }

    results = []
    started = time.perf_counter()
    for label, policy, overrides in router_grid(cfg.topk):
        params = make_params(policy, overrides)
        swap_routers(model, make_router_class(policy, params, load_scope="local"))
        recorder.clear()
        per_domain = {}
        for domain, seqs in sequences.items():
            sums = {"nll": 0.0, "correct": 0, "tokens": 0}
            for part in seqs.split(args.chunk):
                recorder.begin_step("prefill")
                got = evaluate(model, part, chunk=args.chunk)
                recorder.end_step()
                sums = {k: sums[k] + got[k] for k in sums}
            vec = torch.tensor([sums["nll"], sums["correct"], sums["tokens"]], dtype=torch.float64)
            dist.all_reduce(vec)
            per_domain[domain] = {"nll": float(vec[0]), "correct": int(vec[1]), "tokens": int(vec[2])}
        parts = gather_to_rank0(recorder.records())
        if rank == 0:
            records = [r for part in parts for r in part]
            summary = summarize(records, cfg.topk)["prefill"]
            total = {k: sum(d[k] for d in per_domain.values()) for k in ("nll", "correct", "tokens")}
            results.append(
                {
                    "label": label,
                    "router": policy,
                    "router_params": dataclasses.asdict(params),
                    "quality": {
                        **{d: quality_from_sums(s) for d, s in per_domain.items()},
                        "all": quality_from_sums(total),
                    },
                    "dropped_fraction": summary["dropped_fraction"],
                    "max_violation": summary["max_violation"],
                    "rank_imbalance": summary["rank_imbalance"],
                    "straggler_ms": summary["straggler_ms"],
                }
            )
            print(f"{PROG}: {label:<26} done ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    if rank == 0:
        write_outputs(args, cfg, checkpoint, results, time.perf_counter() - started, world)
    destroy_distributed()
    return 0


def write_outputs(args, cfg, checkpoint, results, wall_s, world) -> None:
    base = results[0]["quality"]
    assert results[0]["router"] == "topk"
    for r in results:
        r["perplexity_change"] = {
            d: r["quality"][d]["perplexity"] / base[d]["perplexity"] - 1 for d in r["quality"]
        }
    domains = [d for d in base if d != "all"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])
    report = {
        "command": command.strip(),
        "checkpoint": str(Path(checkpoint).relative_to(ROOT)) if Path(checkpoint).is_relative_to(ROOT) else str(checkpoint),
        "model": dataclasses.asdict(cfg),
        "ep_size": world,
        "sequences_per_domain": args.seqs * world,
        "seq_len": args.seq_len,
        "wall_s": wall_s,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    out.write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        f"# Quality against balance, trained tiny MoE ({cfg.num_experts} experts, top-{cfg.topk}, "
        f"{cfg.num_layers} MoE layers), EP {world} on gloo, CPU",
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
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    print(f"{PROG}: wrote {out} and {out.with_suffix('.md')} in {wall_s:.0f} s", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        return launch(args)
    return worker(args)


if __name__ == "__main__":
    sys.exit(main())
