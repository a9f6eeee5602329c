#!/usr/bin/env python
"""Measure one expert MLP's time against the tokens it receives: the GEMM table of the cost
model (``moebalance.costmodel.GemmTable``).

For each expert shape (hidden H, expert ffn hidden F, GELU or SwiGLU, read from the model
configs) and each token count n (1, 2, 3, 4, 6, 8, 12, ... ``--max-tokens``: powers of two and the
log-midpoints between them), one expert's forward
as Megatron-Core's expert MLP computes it (no bias): ``fc1 = x @ W1.T`` ([n, F], or [n, 2F]
with SwiGLU's gate), the activation (GELU; SwiGLU: silu(gate) * up), the per-token routing
weight multiplied in, ``fc2 = h @ W2.T`` ([n, H]). Per point: a warm-up call, then ``--rounds`` interleaved
passes over all counts, each timing calls for a share of ``--min-time`` seconds; the median
over the calls is kept (with the quartiles).

- CPU: one intra-op thread (``--threads``, what each torchrun rank gets), float32 (the CPU
  models' dtype), time = the calling thread's CPU time (``time.thread_time``, the clock the
  telemetry uses for compute on CPU), wall time recorded beside it. Counts above the first one
  whose warm-up call exceeds ``--max-call-s`` are not measured (the cost model extends the last segment).
- CUDA (``--device cuda``, or ``auto`` when CUDA is available): bfloat16, CUDA events.

Writes ``--out`` (default ``results/gemm_<device>.json``): the device name, threads, torch
version, command, date, commit and per shape its token counts and median times (ms), which
``moebalance.costmodel.load_gemm_tables`` reads.

    python scripts/bench_gemm.py                      # CPU, the default shapes, a few minutes
    python scripts/bench_gemm.py --device cuda        # on a GPU node: results/gemm_cuda.json
    python scripts/bench_gemm.py --shapes olmoe-1b-7b --max-tokens 4096
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance.config import ConfigError  # noqa: E402
from moebalance.files import write_text_atomic  # noqa: E402
from moebalance.harness import cli  # noqa: E402
from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.report import check_writable, cpu_name, git_commit  # noqa: E402
from moebalance.model_config import (  # noqa: E402
    load_model_config,
    model_config_presets,
    trained_checkpoint,
    trained_checkpoints,
)

PROG = "bench_gemm.py"
#: the trained CPU models, a wider tiny variant, and two real models' expert shapes
DEFAULT_SHAPES = ("tiny-moe", "fine-moe", "tiny-wide", "olmoe-1b-7b", "mixtral-8x7b")
MAX_TOKENS = 1 << 16
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def fail(message: str) -> None:
    """Exit 2 with one line on stderr (``moebalance.harness.cli.fail``)."""
    cli.fail(PROG, message)


def model_shape(name: str) -> dict:
    """{name, hidden, ffn_hidden, activation} of a shipped trained model or a model preset."""
    if name in trained_checkpoints():
        cfg = load_model_config(trained_checkpoint(name)[1])
    elif name in model_config_presets():
        cfg = load_model_config(name)
    else:
        raise ConfigError(
            f"unknown model {name!r}; choose from the trained models {trained_checkpoints()} "
            f"or the presets {sorted(model_config_presets())}"
        )
    return {
        "name": name,
        "hidden": cfg.hidden_size,
        "ffn_hidden": cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        "activation": cfg.activation,
    }


def parse_args(argv=None):
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="cpu (default), cuda, or auto (cuda when available)")
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help="comma-separated models whose expert shape to time (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=8192,
                   help=f"largest token count, a power of two up to {MAX_TOKENS} (default 8192)")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default 1)")
    p.add_argument("--min-time", type=float, default=0.3,
                   help="seconds of timed calls per point, over all rounds (default 0.3)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved passes over the token counts (default 3)")
    p.add_argument("--max-call-s", type=float, default=2.5,
                   help="CPU: skip counts whose one call would exceed this many seconds "
                   "(default 2.5)")
    p.add_argument("--out", default=None, help="JSON output (default results/gemm_<device>.json)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: CUDA is not available here")
    if not (1 <= args.max_tokens <= MAX_TOKENS and args.max_tokens & (args.max_tokens - 1) == 0):
        fail(f"--max-tokens must be a power of two in [1, {MAX_TOKENS}], got {args.max_tokens}")
    if not 1 <= args.rounds <= 100:
        fail(f"--rounds must be in [1, 100], got {args.rounds}")
    if not 1 <= args.threads <= 1024:
        fail(f"--threads must be in [1, 1024], got {args.threads}")
    for name in ("min_time", "max_call_s"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 < value <= 600):
            fail(f"--{name.replace('_', '-')} must be in (0, 600] seconds, got {value}")
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not names or len(set(names)) != len(names):
        fail(f"--shapes needs distinct comma-separated model names, got {args.shapes!r}")
    try:
        args.shape_list = [model_shape(n) for n in names]
    except ConfigError as err:
        fail(f"--shapes: {err}")
    args.out = Path(args.out) if args.out else ROOT / "results" / f"gemm_{args.device}.json"
    if args.out.is_dir():
        fail(f"--out {args.out} is a directory")
    try:
        check_writable(args.out)
    except OSError as err:
        fail(f"--out {args.out}: cannot write there ({err.strerror or err})")
    return args


def expert_mlp(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """(forward(x [n, H], probs [n]) -> [n, H], weight bytes) of one expert, weights random."""
    gen = torch.Generator().manual_seed(seed)
    H, Fh = shape["hidden"], shape["ffn_hidden"]
    fc1_rows = 2 * Fh if shape["activation"] == "swiglu" else Fh
    w1 = (torch.randn(fc1_rows, H, generator=gen) * 0.02).to(device, dtype)
    w2 = (torch.randn(H, Fh, generator=gen) * 0.02).to(device, dtype)

    def forward(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, w1)
        if shape["activation"] == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return F.linear(h * probs.unsqueeze(-1).to(h.dtype), w2)

    return forward, (w1.numel() + w2.numel()) * w1.element_size()


def token_grid(max_tokens: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... up to ``max_tokens``: powers of two and the points halfway
    between them on a log scale (within 6%), so that piecewise-linear interpolation follows
    the cache steps of a CPU's GEMM."""
    grid = {1}
    n = 2
    while n <= max_tokens:
        grid.update((n, 3 * n // 4) if n >= 4 else (n,))
        n *= 2
    return sorted(g for g in grid if g <= max_tokens)


def _call_cpu(forward, x, probs) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.thread_time()
    forward(x, probs)
    c1, w1 = time.thread_time(), time.perf_counter()
    return (c1 - c0) * 1e3, (w1 - w0) * 1e3


def _call_cuda(forward, x, probs) -> tuple[float, float]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    forward(x, probs)
    end.record()
    end.synchronize()
    ms = start.elapsed_time(end)
    return ms, ms


def measure_shape(shape: dict, args) -> dict:
    """One shape's table. The counts are timed in ``--rounds`` interleaved rounds (each round
    visits every count, each visit times calls for min_time / rounds seconds, at least one):
    a slow spell of a shared machine then lands on every count alike instead of on a few. The
    median over all calls of a count is kept."""
    device, dtype = args.device, DTYPES[args.device]
    forward, weight_bytes = expert_mlp(shape, device, dtype)
    call = _call_cpu if device == "cpu" else _call_cuda
    started = time.perf_counter()
    inputs, skipped = [], None
    with torch.inference_mode():
        for n in token_grid(args.max_tokens):
            gen = torch.Generator().manual_seed(n)
            x = torch.randn(n, shape["hidden"], generator=gen).to(device, dtype)
            probs = torch.rand(n, generator=gen).to(device)
            for _ in range(1 if device == "cpu" else 3):  # warm-up
                first = call(forward, x, probs)
            if device == "cuda":
                torch.cuda.synchronize()
            inputs.append((n, x, probs))
            if device == "cpu" and first[1] > args.max_call_s * 1e3:
                skipped = (f"counts above {n} not measured: one call took {first[1] / 1e3:.2f} s, "
                           f"more than {args.max_call_s:g} s (--max-call-s)")
                break
        cpu = {n: [] for n, _, _ in inputs}
        wall = {n: [] for n, _, _ in inputs}
        for _ in range(args.rounds):
            for n, x, probs in inputs:
                spent = 0.0
                while spent < args.min_time / args.rounds * 1e3 or not cpu[n]:
                    c, w = call(forward, x, probs)
                    cpu[n].append(c)
                    wall[n].append(w)
                    spent += w
                    if len(cpu[n]) >= 200:
                        break
    tokens = [n for n, _, _ in inputs]
    ms = [round(statistics.median(cpu[n]), 5) for n in tokens]
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    print(f"[{PROG}] {shape['name']}: H={shape['hidden']} F={shape['ffn_hidden']} "
          f"{shape['activation']}: {len(tokens)} counts up to {tokens[-1]} in "
          f"{time.perf_counter() - started:.1f} s ({ms[-1]:.3f} ms at {tokens[-1]} tokens)",
          file=sys.stderr, flush=True)
    return {
        **shape,
        "dtype": str(dtype).replace("torch.", ""),
        "dtype_bytes": dtype_bytes,
        "weight_bytes": weight_bytes,
        "tokens": tokens,
        "ms": ms,
        "wall_ms": [round(statistics.median(wall[n]), 5) for n in tokens],
        "ms_p25_p75": [
            [round(statistics.quantiles(cpu[n], n=4)[0], 5), round(statistics.quantiles(cpu[n], n=4)[2], 5)]
            if len(cpu[n]) >= 2 else [ms[i], ms[i]] for i, n in enumerate(tokens)
        ],
        "calls": [len(cpu[n]) for n in tokens],
        "not_measured": skipped,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    try:
        tables = [measure_shape(shape, args) for shape in args.shape_list]
    finally:
        torch.set_num_threads(threads)
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
        timing = "CUDA events around one expert forward, median"
    else:
        device_name = cpu_name()
        timing = "thread CPU time (time.thread_time) of one expert forward, median; wall beside"
    commit = git_commit()
    load_end = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    document = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python scripts/bench_gemm.py", *(sys.argv[1:] if argv is None else argv)]),
        "git_commit": commit,
        "device": args.device,
        "device_name": device_name,
        "threads": args.threads if args.device == "cpu" else None,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_start,  # other jobs on the machine skew timings
        "torch": torch.__version__,
        "python": platform.python_version(),
        "timing": timing,
        "min_time_s": args.min_time,
        "rounds": args.rounds,
        "load_average_at_end": load_end,
        "wall_s": round(time.perf_counter() - started, 1),
        "tables": tables,
    }
    write_text_atomic(args.out, json.dumps(document, indent=1) + "\n")
    print(f"[{PROG}] wrote {args.out} in {document['wall_s']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
