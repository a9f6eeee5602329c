#!/usr/bin/env python
"""How long ``moebalance.locality.analyse`` takes on a large routing record, per stack pass.

Synthetic routing of ``--tokens`` tokens x ``--layers`` layers in ``--seq-len``-token sequences
(each layer its own skewed expert popularity, each token repeating the previous token's
experts with probability 1/2, so caches see reuse), analysed with the defaults of
``scripts/locality.py`` (SRP for m in {4, 16, 64, 256}; SCH for each m, LRU, LFU and Belady at
rho in {1, 1.5, 2, 3, 4}; 1000 bootstrap resamples) for each (E, k) of ``--shapes``, once with
the numpy stack pass and twice with the compiled one (numba: the first call loads, or on a new
install compiles, the kernel). Writes ``--out`` (JSON, and Markdown beside it): wall and CPU
seconds per call and the check that both passes give the same report.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance import locality as lc  # noqa: E402
from moebalance.config import ConfigError  # noqa: E402
from moebalance.files import write_text_atomic  # noqa: E402
from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.report import cpu_name, git_commit, utc_now, write_json  # noqa: E402

PROG = "bench_locality_speed.py"


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8x2,32x4,64x8", help="E x k pairs (%(default)s)")
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (%(default)s)")
    p.add_argument("--skip-numpy", action="store_true", help="time the compiled pass only")
    p.add_argument("--out", default=str(ROOT / "results" / "locality_speed_cpu.json"))
    args = p.parse_args(argv)
    try:
        shapes = []
        for item in args.shapes.split(","):
            parts = item.split("x")
            if len(parts) != 2 or not all(x.isdigit() for x in parts):
                raise ConfigError(f"--shapes must be E x k pairs such as 64x8, got {item!r}")
            E, k = map(int, parts)
            if not 1 <= 4 * k <= E:  # the largest default cache, rho = 4, holds 4k experts
                raise ConfigError(f"--shapes: k must be in [1, E / 4] (rho up to 4), got {item!r}")
            shapes.append((E, k))
        args.shapes = shapes
        for name in ("tokens", "layers", "seq_len"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if not lc.HAVE_NUMBA:
            raise ConfigError("numba is not installed (pip install 'moebalance[locality]')")
    except ConfigError as err:
        p.error(str(err))
    return args


def routing(E: int, k: int, tokens: int, layers: int, seed: int = 0) -> dict[int, np.ndarray]:
    """{layer: [tokens, k]} ids: a Dirichlet(0.3) popularity per layer, Gumbel top-k draws,
    and each token repeating the previous token's experts with probability 1/2."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        logp = np.log(rng.dirichlet(np.full(E, 0.3)) + 1e-9)
        draws = np.argsort(-(rng.gumbel(size=(tokens, E)) + logp), axis=1)[:, :k]
        fresh = rng.random(tokens) < 0.5
        fresh[0] = True
        src = np.maximum.accumulate(np.where(fresh, np.arange(tokens), 0))
        out[layer] = draws[src]
    return out


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    import numba  # installed: parse_args checked

    offsets = np.append(np.arange(0, args.tokens, args.seq_len), args.tokens)
    rows = []
    for E, k in args.shapes:
        ids = routing(E, k, args.tokens, args.layers)
        run = lambda backend: lc.analyse(ids, offsets, num_experts=E, k=k, backend=backend)  # noqa: E731
        first, wall1, cpu1 = timed(lambda: run("numba"))
        _, wall2, cpu2 = timed(lambda: run("numba"))
        row = {"num_experts": E, "k": k, "numba_first_wall_s": wall1, "numba_first_cpu_s": cpu1,
               "numba_wall_s": wall2, "numba_cpu_s": cpu2}
        if not args.skip_numpy:
            ref, wall, cpu = timed(lambda: run("numpy"))
            row.update(numpy_wall_s=wall, numpy_cpu_s=cpu, same_report=ref == first)
        rows.append(row)
        print(f"{PROG}: E={E} k={k}: " + ", ".join(
            f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
            for key, value in row.items() if key not in ("num_experts", "k")), file=sys.stderr)
    command = "python scripts/bench_locality_speed.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    doc = {"command": command.strip(), "created": utc_now(), "git_commit": git_commit(),
           "cpu": cpu_name(), "cpu_count": os.cpu_count(),
           "numba_threads": numba.get_num_threads(),
           "tokens": args.tokens, "layers": args.layers, "seq_len": args.seq_len,
           "analysis": "scripts/locality.py defaults: m in {4, 16, 64, 256}; sch (each m), lru, "
                       "lfu, belady at rho in {1, 1.5, 2, 3, 4}; 1000 resamples",
           "rows": rows}
    out = Path(args.out)
    write_json(out, doc)
    lines = [
        "# Locality analysis speed (CPU)",
        "",
        f"`{doc['command']}`; {doc['created']}, commit {doc['git_commit']}, {doc['cpu']} "
        f"({doc['cpu_count']} cores). `analyse` on {args.tokens:,} tokens x {args.layers} layers "
        f"in {args.seq_len}-token sequences; {doc['analysis']}. Seconds per call; the first "
        "compiled call includes importing numba and loading (or compiling) the kernel.",
        "",
        "| E | k | numpy wall s | numba first call wall s | numba wall s | numba CPU s "
        "| same report |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        numpy_wall = f"{r['numpy_wall_s']:.1f}" if "numpy_wall_s" in r else "-"
        lines.append(f"| {r['num_experts']} | {r['k']} | {numpy_wall} | "
                     f"{r['numba_first_wall_s']:.1f} | {r['numba_wall_s']:.1f} | "
                     f"{r['numba_cpu_s']:.1f} | {r.get('same_report', '-')} |")
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"{PROG}: wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
