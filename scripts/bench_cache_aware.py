#!/usr/bin/env python
"""Cache-aware LASER for offloaded serving: expert-cache hit rate gained against quality lost.

Each trained model serves held-out text of each domain one token per model step (batch 1,
teacher-forced through the framework's KV cache: a prefill of the first token, then decode
steps) with an LRU expert cache of ``capacity_of(rho, k)`` experts per MoE layer
(``moebalance.expert_cache``), for every router row:

- ``topk``: vanilla top-k; its hit rate is the plain LRU baseline.
- ``laser cache-aware``: LASER with the model's calibrated parameters, the cache state as the
  load signal: flexible tokens take resident candidates first. (Cache-unaware LASER has nothing
  to balance in a batch of one token: its choice within the pool is a tie broken by fixed
  noise, so it has no row here; ``results/locality_cpu.md`` has what balance costs in
  locality where batches are balanced.)
- ``laser cache-aware (c=2k, 0.5/0.5)``: wider pools (c = 2k, eps_high 0.5, min_score_ratio
  0.5), one setting for every layer.
- ``laser cache-aware (paper)``: the paper's pools (c = 2k, eps_high 0.9, no score floor): the
  most freedom, the most hits, the most quality lost.

Per row: perplexity and its change against ``topk`` on the same text, the hit rate (resident
experts over experts used, all MoE layers), expert loads per token and the simulated time a
token waits for them over a host-to-device link (``moebalance.locality.offload_seconds_per_token``,
the expert's real size in bytes). The cache persists across the sequences of a domain, as in
a server; each row starts empty. One process, world size 1 (Megatron-Core, gloo).

    python scripts/bench_cache_aware.py --out results/cache_aware_cpu.json
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance.config import ConfigError  # noqa: E402
from moebalance.corpus import DEFAULT_DOMAINS  # noqa: E402
from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.report import check_writable, cpu_name, git_commit, utc_now  # noqa: E402
from moebalance.model_config import trained_checkpoints  # noqa: E402

PROG = "bench_cache_aware.py"
DEFAULT_RHOS = (1.0, 2.0)
#: (label, router, parameter source: "calibrated" / "paper" / None, cache-aware)
ROWS = (
    ("topk", "topk", None, False),
    ("laser cache-aware", "laser", "calibrated", True),
    ("laser cache-aware (c=2k, 0.5/0.5)", "laser", "wide", True),
    ("laser cache-aware (paper)", "laser", "paper", True),
)


def _fail(message: str) -> None:
    raise ConfigError(message)


def _names(option: str, text: str, allowed) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if not names or bad:
        _fail(f"{option} must be a comma-separated subset of {list(allowed)}, got {text!r}")
    return names


def parse_args(argv=None):
    from moebalance.locality import LINKS

    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny-moe,fine-moe", help="trained models, comma-separated")
    p.add_argument("--domains", default=",".join(DEFAULT_DOMAINS), help="held-out text domains")
    p.add_argument("--seqs", type=int, default=2, help="sequences per domain, 1 to 256 (default 2)")
    p.add_argument("--seq-len", type=int, default=96, help="tokens per sequence, 2 to the model's maximum")
    p.add_argument("--rhos", default=",".join(f"{r:g}" for r in DEFAULT_RHOS),
                   help="cache sizes in multiples of k (capacity ceil(rho k), at most E)")
    p.add_argument("--link", default="pcie4", help=f"host-to-device link: {sorted(LINKS)}")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, 1 to 256")
    p.add_argument("--quick", action="store_true", help="tiny-moe, 1 sequence of 32 tokens, rho 1 and 2")
    p.add_argument("--out", default="results/cache_aware_cpu.json",
                   help="JSON output; the markdown table goes next to it (.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        args.models = _names("--models", args.models, trained_checkpoints())
        args.domains = _names("--domains", args.domains, DEFAULT_DOMAINS)
        if args.link not in LINKS:
            _fail(f"--link must be one of {sorted(LINKS)}, got {args.link!r}")
        try:
            args.rhos = [float(r) for r in args.rhos.split(",")]
        except ValueError:
            _fail(f"--rhos must be comma-separated numbers >= 1, got {args.rhos!r}")
        if not args.rhos or not all(math.isfinite(r) and r >= 1 for r in args.rhos):
            _fail(f"--rhos must be comma-separated numbers >= 1, got {args.rhos}")
        if not 1 <= args.seqs <= 256:
            _fail(f"--seqs must be in [1, 256], got {args.seqs}")
        if not 2 <= args.seq_len <= 4096:
            _fail(f"--seq-len must be in [2, 4096], got {args.seq_len}")
        if not 1 <= args.threads <= 256:
            _fail(f"--threads must be in [1, 256], got {args.threads}")
        if args.quick:
            args.models, args.seqs, args.seq_len, args.rhos = ["tiny-moe"], 1, 32, [1.0, 2.0]
        args.out = Path(args.out)
        if args.out.suffix != ".json":
            _fail(f"--out must end in .json, got {str(args.out)!r}")
        for path in (args.out, args.out.with_suffix(".md")):
            if path.exists() and not args.overwrite:
                _fail(f"--out: {path} exists (pass --overwrite to replace it)")
            check_writable(path)
    except ConfigError as err:
        p.error(str(err))
    return args


def teacher_forced(framework, model, seqs):
    """(summed NLL in nats, tokens scored): every sequence [L + 1] of ``seqs`` served one token
    per model step (a prefill of its first token, then decode steps on the KV cache), scored
    on its next token."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.inference_mode():
        for seq in seqs:
            ids, target = seq[:-1].unsqueeze(0), seq[1:]
            L = ids.shape[1]
            mask = torch.ones(L, L, dtype=torch.bool).triu(1)[None, None]
            positions = torch.arange(L).unsqueeze(0)
            context = framework.inference_context(1, L)
            framework.set_decode(model, False)
            logits = model(ids[:, :1], positions[:, :1], mask[:, :, :1, :1], inference_context=context,
                           padding_mask=torch.zeros(1, 1, dtype=torch.bool))
            scores = [logits[0, -1]]
            context.sequence_len_offset = 1
            context.enable_decode_mode()
            framework.set_decode(model, True)
            for at in range(1, L):
                logits = model(ids[:, at:at + 1], positions[:, at:at + 1], mask[:, :, at:at + 1, :at + 1],
                               inference_context=context)
                scores.append(logits[0, -1])
                context.sequence_len_offset += 1
            framework.set_decode(model, False)
            nll += float(F.cross_entropy(torch.stack(scores).float(), target, reduction="sum"))
            count += L
    return nll, count


def bench_model(name: str, args, framework, setup, log) -> tuple[list[dict], dict]:
    """The rows of one trained model (every domain, cache size and router row) and what the
    report says of the model (experts, top-k, expert bytes, its calibrated file)."""
    from moebalance.corpus import default_corpus, heldout_sequences
    from moebalance.expert_cache import attach_caches, cache_stats
    from moebalance.harness.config import calibrated_laser_file
    from moebalance.locality import LINKS, capacity_of, offload_seconds_per_token
    from moebalance.model_config import load_model_config, trained_checkpoint
    from moebalance.policies import make_params
    from moebalance.routing_record import expert_bytes_of
    from moebalance.config import read_yaml_mapping

    checkpoint, config = trained_checkpoint(name)
    cfg = load_model_config(config)
    if args.seq_len > cfg.max_sequence_length:
        raise ConfigError(f"--seq-len must be at most {cfg.max_sequence_length} for {name}, got {args.seq_len}")
    k, E = cfg.topk, cfg.num_experts
    calibrated = calibrated_laser_file(str(checkpoint))
    params = {"calibrated": make_params("laser", read_yaml_mapping(calibrated, "laser.yaml")) if calibrated else None,
              "paper": make_params("laser", {}), None: None,
              "wide": make_params("laser", {"eps_high": 0.5, "min_score_ratio": 0.5})}
    model = framework.build_model(cfg, setup, router="topk", router_params=None, load_scope="local",
                                  dispatcher=framework.dispatchers[0], checkpoint=str(checkpoint))
    expert_bytes = expert_bytes_of(framework, model)
    link = LINKS[args.link]
    corpus = default_corpus()
    rows = []
    for domain in args.domains:
        seqs = heldout_sequences(corpus, domain, args.seqs, args.seq_len)
        base_ppl = None
        for rho in args.rhos:
            capacity = min(E, capacity_of(rho, k))
            for label, router, source, aware in ROWS:
                if source == "calibrated" and params["calibrated"] is None:
                    continue
                framework.swap_router(model, router, params[source], "local")
                attach_caches(model, capacity, aware=aware)
                started = time.perf_counter()
                nll, tokens = teacher_forced(framework, model, seqs)
                stats = cache_stats(model)
                uses = sum(s["uses"] for s in stats.values())
                misses = sum(s["misses"] for s in stats.values())
                ppl = math.exp(nll / tokens)
                if router == "topk":
                    base_ppl = ppl
                per_token = misses / tokens
                rows.append({
                    "model": name, "domain": domain, "rho": rho, "capacity": capacity,
                    "label": label, "router": router, "params": source, "cache_aware": aware,
                    "ppl": ppl, "dppl": ppl / base_ppl - 1 if base_ppl else None,
                    "hit_rate": 100.0 * (1 - misses / uses) if uses else None,
                    "hit_rate_per_layer": {str(l): s["hit_rate"] for l, s in sorted(stats.items())},
                    "loads_per_token": per_token,
                    "offload_ms_per_token": 1e3 * offload_seconds_per_token(per_token, expert_bytes, link.bytes_per_s),
                    "tokens": tokens, "seconds": time.perf_counter() - started,
                })
                log(f"{name} {domain} rho={rho:g} {label}: ppl {ppl:.4f}, hit {rows[-1]['hit_rate']:.1f}%")
        attach_caches(model, None)
    del model
    return rows, {"num_experts": E, "topk": k, "expert_bytes": expert_bytes,
                  "calibrated_file": str(calibrated.relative_to(ROOT)) if calibrated else None}


def markdown(report: dict) -> str:
    cfg = report["config"]
    out = [
        "# Cache-aware LASER: expert-cache hits against quality (offloaded serving, CPU)", "",
        f"`{report['command']}`; {cfg['seqs']} held-out sequences x {cfg['seq_len']} tokens per domain, "
        "served one token per model step (batch 1, teacher-forced on the KV cache), an LRU cache "
        "of ceil(rho k) experts per MoE layer that persists across a domain's sequences. Hit rate = "
        "resident experts / experts used, all layers; loads/token = expert loads per token, summed "
        f"over layers; offload = the time a token waits for them over {cfg['link']} "
        "(the expert's bytes / link rate). Δ against topk on the same text and cache size. "
        f"Commit {report['environment']['git_commit']}, {report['environment']['cpu']}.", "",
    ]
    for name, info in report["models"].items():
        out += [f"## {name} ({info['num_experts']} experts, top-{info['topk']}, "
                f"{info['expert_bytes'] / 1e6:.2f} MB per expert; calibrated: {info['calibrated_file']})", "",
                "| domain | rho (slots) | router | ppl | Δppl | hit rate | Δ hit (points) | loads/token | offload µs/token |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        rows = [r for r in report["rows"] if r["model"] == name]
        base = {(r["domain"], r["rho"]): r for r in rows if r["router"] == "topk"}
        for r in rows:
            b = base[(r["domain"], r["rho"])]
            out.append(
                f"| {r['domain']} | {r['rho']:g} ({r['capacity']}) | {r['label']} | {r['ppl']:.4f} | "
                f"{100 * r['dppl']:+.2f}% | {r['hit_rate']:.1f}% | {r['hit_rate'] - b['hit_rate']:+.1f} | "
                f"{r['loads_per_token']:.2f} | {1e3 * r['offload_ms_per_token']:.1f} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import torch

    from moebalance.files import write_text_atomic
    from moebalance.harness.framework import elapsed_logger, one_process
    from moebalance.harness.report import write_json

    started = time.perf_counter()
    log = elapsed_logger(f"[{PROG}]")
    rows, models = [], {}
    try:
        with one_process("megatron", args.threads) as (framework, setup):
            for name in args.models:
                got, models[name] = bench_model(name, args, framework, setup, log)
                rows += got
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    report = {
        "command": ("python scripts/bench_cache_aware.py " + " ".join(argv)).strip(),
        "environment": {"git_commit": git_commit(), "cpu": cpu_name(), "torch": torch.__version__,
                        "threads": args.threads, "time": utc_now()},
        "config": {"seqs": args.seqs, "seq_len": args.seq_len, "rhos": args.rhos,
                   "domains": args.domains, "link": args.link, "framework": "megatron"},
        "models": models,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_json(args.out, report)
    write_text_atomic(args.out.with_suffix(".md"), markdown(report))
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
