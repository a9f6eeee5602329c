#!/usr/bin/env python
"""Expert-parallel MoE inference with Megatron-Core: what a balancing router does to per-rank load,
straggler time and latency.

    torchrun --nproc-per-node 2 scripts/infer.py --router laser --compare
    torchrun --nproc-per-node 4 scripts/infer.py --router token_drop --uneven --dispatcher allgather
    torchrun --nproc-per-node 2 scripts/infer.py --framework deepspeed --router laser --compare

``--framework deepspeed`` serves the same model (same config, same weights: the Megatron
model's initialisation and skew, or the same checkpoint, converted by ``deepspeed_patch.model``)
with DeepSpeed ``MoE`` layers and DeepSpeed's accelerator backend, through the same loop,
telemetry, table and JSON (``config.framework``); DeepSpeed has one dispatcher (an all-to-all of
the padded [E, C, M] buffer, C agreed across the EP group).

Each rank serves its own batch of prompts (as under data-parallel serving) while the experts of
every MoE layer are spread over the EP group (EP = world size by default; expert e on EP rank
e // (E / EP)). One generation = a prefill of the left-padded prompts, then ``--gen-len - 1``
greedy decode steps with Megatron's static KV cache. All ranks stay in lockstep whatever the
prompt lengths: they agree on the padded prompt length (all-reduce MAX) and run the same number
of steps, so every rank runs every MoE layer the same number of times. Padding tokens are masked
out of attention and routed to no expert. Prefill-only policies see decode steps through the
routers' decode flag.

Measured per MoE layer, step and rank (``megatron_patch.instrument``, ``moebalance.telemetry``):
tokens per local expert; router, dispatch, expert and combine time (ms; CUDA events on GPU).
From these: straggler time = max - mean over ranks of expert time, per-rank load imbalance =
max / mean tokens per rank, MV = max / mean - 1 of the EP-global expert loads, dropped fraction.
End to end: prefill latency, decode time per step (each step emits one token per sequence),
tokens per second over all ranks, peak memory (RSS on CPU, CUDA allocator peak on GPU).
``--warmup`` generations run first and are left out of every figure.

``--compare`` runs vanilla top-k and then ``--router`` on the same prompts in the same process
(routers swapped into the same model, state copied). Rank 0 prints a table and writes a JSON file
(default ``results/infer_<router>_ep<N>.json``): ``config`` (model and run options),
``environment`` (versions, device, world size, EP size, backend), and per router in ``runs``:
``summary`` (``moebalance.telemetry.summarize``: p50/p95/mean/max per phase and per layer),
``end_to_end``, ``per_rank`` (latencies, peak memory, generated tokens) and ``records`` (one
``LayerStep`` per rank, step and MoE layer). With ``--ep`` below the world size there are
several EP groups; each (group, step, layer) is one sample of the statistics.

Model: by default the small MoE trained by ``scripts/train_tiny.py`` (``checkpoints/tiny-moe``,
real learned routing), served prompts cut from the held-out text of its corpus
(``moebalance.corpus``). ``--checkpoint PATH`` serves your own safetensors checkpoint (config from
``--config``, or a ``config.yaml`` beside it); ``--skew`` or ``--config`` alone give a randomly
initialised model with random prompt ids. Quality (with a byte-level checkpoint): after
each router's generation, every rank runs its own ``--eval-seqs`` held-out sequences per domain
teacher-forced through the EP model (same number of forward calls on every rank) with that
router active; perplexity and next-token accuracy per domain, summed over ranks, go into the
table and into ``quality`` of each run in the JSON.

Bad options exit with a one-line error and code 2 before any process group starts. A rank that
fails prints its traceback and exits 1; torchrun then stops the others, and any rank still
waiting in a collective gives up after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`

from moebalance.config import ConfigError, GateConfig, parse_key_values  # noqa: E402
from moebalance.distributed import LOAD_SCOPES, check_load_scope  # noqa: E402
from moebalance.model_config import (  # noqa: E402
    DISPATCHERS,
    SKEWS,
    ModelConfig,
    check_checkpoint_file,
    load_model_config,
    model_config_presets,
    trained_checkpoint,
)
from moebalance.policies import POLICIES, make_params  # noqa: E402
from moebalance.telemetry import PHASES, MoERecorder, gather_to_rank0, summarize  # noqa: E402

# Megatron (several seconds to import) is imported in main(), after the options are validated.

PROG = "infer.py"
FRAMEWORKS = ("megatron", "deepspeed")
VANILLA = "topk"


# ---------------------------------------------------------------------------- options


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message: str) -> None:  # noqa: D102
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def _parse_router_args(items: list[str], parser: _Parser) -> dict:
    """["key=value", ...] -> {key: YAML-typed value} (``moebalance.config.parse_key_values``)."""
    try:
        return parse_key_values(items, "--router-args")
    except ConfigError as err:
        parser.error(str(err))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate every option; exits 2 with a one-line error on bad input. Adds
    ``model`` (the ModelConfig), ``params`` (the router's parameter dataclass), ``world_size``,
    ``routers`` (the routers to run, in order) and the resolved ``ep`` and ``out``."""
    presets = model_config_presets()
    routers = "\n".join(f"  {name:<14} {p.summary}" for name, p in POLICIES.items())
    parser = _Parser(
        prog=PROG,
        description="Expert-parallel MoE inference with Megatron-Core under a balancing router. "
        "Launch with torchrun --nproc-per-node N.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"routers:\n{routers}\n\nmodel presets (configs/models): {', '.join(presets)}\n"
        f"skews: {', '.join(SKEWS)}",
    )
    add = parser.add_argument
    add("--router", default="expanded_drop", help="routing policy (default: %(default)s)")
    add(
        "--router-args", nargs="*", default=[], metavar="KEY=VALUE",
        help="policy parameters, e.g. capacity_factor=1.2 (see moebalance.config)",
    )
    add(
        "--load-scope", default="local", choices=LOAD_SCOPES,
        help="LASER loads: per rank, or EP-global counts via an all-reduce (default: %(default)s)",
    )
    add(
        "--config", default=None,
        help="model preset or YAML path (default: the trained tiny-moe checkpoint's config, or "
        "with --skew the randomly initialised preset 'tiny'; with --checkpoint, a config.yaml "
        "beside it if there is one)",
    )
    add("--skew", default=None, help="override the config's skew: " + ", ".join(SKEWS))
    add(
        "--checkpoint", default=None,
        help="safetensors checkpoint with canonical Megatron keys (the config's skew is ignored; "
        "default: checkpoints/tiny-moe when neither --config nor --skew is given)",
    )
    add(
        "--eval-seqs", type=int, default=8,
        help="held-out sequences per domain and rank for perplexity / accuracy (0 = none; "
        "default: %(default)s)",
    )
    add("--eval-len", type=int, default=128, help="tokens per held-out sequence (%(default)s)")
    add("--ep", type=int, default=None, help="expert-parallel size (default: world size)")
    add("--dispatcher", default="alltoall", help="token dispatcher: " + ", ".join(DISPATCHERS))
    add(
        "--framework", default="megatron", choices=FRAMEWORKS,
        help="Megatron-Core GPTModel, or the same model with DeepSpeed MoE layers "
        "(deepspeed_patch.model; alltoall only) (default: %(default)s)",
    )
    add("--batch", type=int, default=8, help="prompts per rank (default: %(default)s)")
    add("--prompt-len", type=int, default=64, help="prompt tokens (default: %(default)s)")
    add(
        "--gen-len", type=int, default=16, help="tokens generated per prompt (default: %(default)s)"
    )
    add(
        "--uneven", action="store_true",
        help="prompt lengths differ per prompt and per rank, in (prompt-len/2, prompt-len]",
    )
    add("--warmup", type=int, default=1, help="unmeasured generations first (default: %(default)s)")
    add("--compare", action="store_true", help="also run vanilla top-k on the same prompts")
    add("--seed", type=int, default=0, help="prompt seed (default: %(default)s)")
    add("--timeout", type=float, default=120.0, help="collective timeout, s (default: %(default)s)")
    add("--out", default=None, help="JSON path (default: results/infer_<router>_ep<N>.json)")
    add("--no-nvtx", action="store_true", help="do not emit NVTX ranges")
    args = parser.parse_args(argv)

    if args.router not in POLICIES:
        parser.error(f"unknown router {args.router!r}; choose one of {sorted(POLICIES)}")
    if args.compare and args.router == VANILLA:
        parser.error(f"--compare runs {VANILLA} beside another router; pick one with --router")
    if args.dispatcher not in DISPATCHERS:
        parser.error(f"--dispatcher must be one of {DISPATCHERS}, got {args.dispatcher!r}")
    if args.framework == "deepspeed" and args.dispatcher != "alltoall":
        parser.error("--framework deepspeed has one dispatcher: alltoall (padded [E, C, M] buffer)")
    if args.skew is not None and args.skew not in SKEWS:
        parser.error(f"--skew must be one of {SKEWS}, got {args.skew!r}")
    for name in ("batch", "prompt_len", "gen_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    for name in ("eval_seqs", "eval_len"):
        if getattr(args, name) < 0 or (name == "eval_len" and args.eval_len < 1):
            parser.error(f"--{name.replace('_', '-')} must be >= {int(name == 'eval_len')}")
    try:
        if args.config is None and args.checkpoint is None and args.skew is None:
            # The default model: trained by scripts/train_tiny.py, real learned routing.
            checkpoint, config = trained_checkpoint()
            args.checkpoint, args.config = str(checkpoint), str(config)
        elif args.config is None:
            beside = Path(args.checkpoint).parent / "config.yaml" if args.checkpoint else None
            args.config = str(beside) if beside is not None and beside.is_file() else "tiny"
        model = load_model_config(args.config)
        if args.skew is not None:
            model = model.replace(skew=args.skew)
        if args.checkpoint is not None:
            if model.skew != "none":
                model = model.replace(skew="none")  # a trained model routes as it was trained
            check_checkpoint_file(args.checkpoint, model)
        args.params = make_params(args.router, _parse_router_args(args.router_args, parser))
        check_load_scope(args.load_scope, args.router)
    except ConfigError as err:
        parser.error(str(err).replace("\n", " "))
    if args.eval_seqs and args.eval_len > model.max_sequence_length:
        parser.error(f"--eval-len exceeds the model's max_sequence_length {model.max_sequence_length}")
    if args.prompt_len + args.gen_len > model.max_sequence_length:
        parser.error(
            f"--prompt-len + --gen-len = {args.prompt_len + args.gen_len} exceeds the model's "
            f"max_sequence_length {model.max_sequence_length}"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ep = world if args.ep is None else args.ep
    if ep < 1 or world % ep:
        parser.error(f"--ep {ep} must be >= 1 and divide the world size {world}")
    if model.num_experts % ep:
        parser.error(f"--ep {ep} must divide the model's num_experts {model.num_experts}")
    try:  # the router's parameters against this model's gate (e.g. pool_size within [k, E])
        gate = GateConfig(
            num_experts=model.num_experts,
            topk=model.topk,
            score_function=model.score_function,
            pre_softmax=model.pre_softmax,
        )
        layers = getattr(args.params, "per_layer", {}) or {}
        for layer in (None, *layers):
            params = args.params.for_layer(layer) if layer is not None else args.params
            params.validate(gate)
    except ConfigError as err:
        parser.error(f"--router-args: {err}")
    if torch.cuda.is_available():
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > torch.cuda.device_count():
            parser.error(
                f"{local_world} ranks per node but {torch.cuda.device_count()} GPU(s): NCCL needs "
                "one GPU per rank"
            )
    prefix = "infer_" if args.framework == "megatron" else f"infer_{args.framework}_"
    out = Path(args.out) if args.out else ROOT / "results" / f"{prefix}{args.router}_ep{ep}.json"
    if out.is_dir():
        parser.error(f"--out {out} is a directory; give a file path")
    args.model, args.world_size, args.ep, args.out = model, world, ep, out
    args.routers = [VANILLA, args.router] if args.compare else [args.router]
    return args


# ---------------------------------------------------------------------------- prompts


def make_prompts(args: argparse.Namespace, rank: int) -> list[torch.Tensor]:
    """This rank's ``--batch`` prompts, seeded by (--seed, global rank), so every rank serves
    different data. A checkpoint (a trained byte-level model) gets real text: windows of the
    held-out corpus (``moebalance.corpus``), domains taking turns, so routing is the model's
    real routing; a randomly initialised model gets random token ids. With ``--uneven``
    lengths vary per prompt and per rank in (prompt_len / 2, prompt_len]."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)
    spread = max(1, args.prompt_len // 2)
    corpus = heldout_corpus(args)
    prompts = []
    for b in range(args.batch):
        length = args.prompt_len - ((7 * rank + 3 * b) % spread if args.uneven else 0)
        if corpus is None:
            prompts.append(torch.randint(0, args.model.vocab_size, (length,), generator=gen))
            continue
        text = corpus.heldout[corpus.domains[(rank + b) % len(corpus.domains)]]
        start = int(torch.randint(0, text.numel() - length, (1,), generator=gen))
        prompts.append(text[start : start + length].long())
    return prompts


def heldout_corpus(args: argparse.Namespace):
    """The default corpus (``moebalance.corpus``) when the model is a trained byte-level
    checkpoint, else None."""
    from moebalance.corpus import VOCAB_SIZE, default_corpus

    if args.checkpoint is None or args.model.vocab_size != VOCAB_SIZE:
        return None
    if "default" not in _CORPUS:
        _CORPUS["default"] = default_corpus()
    return _CORPUS["default"]


_CORPUS: dict = {}  # read once per process


def quality_sequences(args: argparse.Namespace, rank: int, world: int) -> dict[str, torch.Tensor]:
    """{domain: [--eval-seqs, --eval-len + 1]} held-out sequences for this rank: the domain's
    ``eval_seqs * world`` evenly spaced windows, rank r taking every world-th from r (same count
    on every rank: lockstep). Empty without a trained byte-level model or with --eval-seqs 0."""
    from moebalance.corpus import heldout_sequences

    corpus = heldout_corpus(args)
    if corpus is None or args.eval_seqs == 0:
        return {}
    return {
        d: heldout_sequences(corpus, d, args.eval_seqs * world, args.eval_len)[rank::world]
        for d in corpus.domains
    }


def quality(model, sequences: dict[str, torch.Tensor], device: torch.device) -> dict:
    """Held-out perplexity and next-token accuracy per domain and overall, summed over all ranks
    (collective: every rank calls it with the same number of sequences)."""
    import torch.distributed as dist

    from megatron_patch.quality import evaluate, quality_from_sums

    out = {}
    total = {"nll": 0.0, "correct": 0, "tokens": 0}
    for domain, seqs in sorted(sequences.items()):
        sums = evaluate(model, seqs)
        vec = torch.tensor([sums["nll"], sums["correct"], sums["tokens"]], dtype=torch.float64)
        vec = vec.to(device)
        dist.all_reduce(vec)
        sums = {"nll": float(vec[0]), "correct": int(vec[1]), "tokens": int(vec[2])}
        out[domain] = quality_from_sums(sums)
        total = {k: total[k] + sums[k] for k in total}
    if out:
        out["all"] = quality_from_sums(total)
    return out


def lockstep_batch(
    prompts: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad the prompts to the longest prompt on ANY rank (all-reduce MAX): every rank then
    runs identical shapes and step counts (both dispatchers need it; all-gather needs equal
    token counts). Returns (ids [B, S] int64, padding mask [B, S] bool, True = padding)."""
    import torch.distributed as dist

    longest = torch.tensor([max(len(p) for p in prompts)], dtype=torch.int64, device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    S = int(longest.item())
    ids = torch.zeros(len(prompts), S, dtype=torch.int64)
    pad = torch.ones(len(prompts), S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = p
        pad[b, S - len(p):] = False
    return ids.to(device), pad.to(device)


# ---------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or the process's peak RSS (Linux clear_refs),
    after handing freed heap back to the OS (glibc malloc_trim) so that memory freed earlier
    (model building, the other router's pass) does not count."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux / not allowed: the peak then covers the whole process


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory`` (MiB): CUDA allocator peak on GPU, peak RSS
    (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def framework_api(name: str):
    """The framework's harness module (``megatron_patch.harness`` or ``deepspeed_patch.harness``):
    ``init_distributed``, ``build_model``, ``instrument``, ``swap_router``, ``set_decode``,
    ``InferenceContext``, ``destroy_distributed``, the same names and contracts in both."""
    if name == "deepspeed":
        from deepspeed_patch import harness
    else:
        from megatron_patch import harness
    return harness


def generate(
    model, ids, pad, gen_len: int, recorder: MoERecorder, *, warmup: bool, framework="megatron"
) -> dict:
    """One greedy generation: a prefill of ``ids`` [B, S] (``pad`` True = padding), then
    ``gen_len - 1`` single-token decode steps on the static KV cache. Every step is one
    recorder step. Returns the generated tokens [B, gen_len] and wall times (ms)."""
    api = framework_api(framework)
    StaticInferenceContext, set_decode = api.InferenceContext, api.set_decode

    device = ids.device
    B, S = ids.shape
    total = S + gen_len
    key_pad = torch.cat([pad, torch.zeros(B, gen_len, dtype=torch.bool, device=device)], dim=1)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).triu(1)
    mask = causal[None, None] | key_pad[:, None, None, :]  # [B, 1, total, total], True = masked
    positions = ((~key_pad).cumsum(dim=1) - 1).clamp_min(0)  # RoPE itself is shift-invariant
    context = StaticInferenceContext(B, total)

    _sync(device)
    start = time.perf_counter()
    set_decode(model, False)
    recorder.begin_step("prefill", warmup=warmup)
    logits = model(
        ids, positions[:, :S], mask[:, :, :S, :S], inference_context=context, padding_mask=pad
    )
    recorder.end_step()
    tokens = [logits[:, -1].argmax(dim=-1)]
    _sync(device)
    prefill_ms = (time.perf_counter() - start) * 1e3

    context.sequence_len_offset = S
    context.enable_decode_mode()
    set_decode(model, True)
    start = time.perf_counter()
    for step in range(gen_len - 1):
        at = S + step
        recorder.begin_step("decode", warmup=warmup)
        logits = model(
            tokens[-1][:, None],
            positions[:, at : at + 1],
            mask[:, :, at : at + 1, : at + 1],
            inference_context=context,
        )
        recorder.end_step()
        tokens.append(logits[:, -1].argmax(dim=-1))
        context.sequence_len_offset += 1
    _sync(device)
    decode_ms = (time.perf_counter() - start) * 1e3
    set_decode(model, False)
    return {"tokens": torch.stack(tokens, dim=1), "prefill_ms": prefill_ms, "decode_ms": decode_ms}


def run_router(model, ids, pad, args, recorder: MoERecorder, device: torch.device) -> dict:
    """``--warmup`` unmeasured generations, then one measured one. Returns this rank's end-to-end
    figures, generated tokens and telemetry records (warm-up left out)."""
    for _ in range(args.warmup):
        generate(model, ids, pad, args.gen_len, recorder, warmup=True, framework=args.framework)
    recorder.clear()  # the measured generation's steps are numbered from 0
    reset_peak_memory(device)
    result = generate(
        model, ids, pad, args.gen_len, recorder, warmup=False, framework=args.framework
    )
    B = ids.shape[0]
    decode_steps = args.gen_len - 1
    return {
        "prefill_ms": result["prefill_ms"],
        "decode_ms": result["decode_ms"],
        "decode_ms_per_step": result["decode_ms"] / decode_steps if decode_steps else None,
        "generated_tokens": B * args.gen_len,
        "prompt_tokens": int((~pad).sum()),
        "peak_memory_mib": peak_memory_mib(device),
        "tokens": result["tokens"].cpu().tolist(),
        "records": recorder.records(),
    }


def end_to_end(per_rank: list[dict]) -> dict:
    """Across ranks: the slowest rank's prefill (ms) and decode step (ms per generated token per
    sequence), tokens/s = all tokens generated / slowest rank's total time, peak memory (MiB)."""
    total_s = max(r["prefill_ms"] + r["decode_ms"] for r in per_rank) / 1e3
    steps = [r["decode_ms_per_step"] for r in per_rank if r["decode_ms_per_step"] is not None]
    return {
        "prefill_ms": max(r["prefill_ms"] for r in per_rank),
        "decode_ms_per_token": max(steps) if steps else None,
        "tokens_per_s": sum(r["generated_tokens"] for r in per_rank) / total_s,
        "peak_memory_mib": max(r["peak_memory_mib"] for r in per_rank),
        "generated_tokens": sum(r["generated_tokens"] for r in per_rank),
        "prompt_tokens": sum(r["prompt_tokens"] for r in per_rank),
    }


# ---------------------------------------------------------------------------- report


def environment(setup) -> dict:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    if setup.device.type == "cuda":
        device_name = torch.cuda.get_device_name(setup.device)
    else:
        device_name = platform.processor() or "cpu"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    device_name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "deepspeed": version("deepspeed"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": setup.device.type,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": setup.world_size,
        "ep_size": setup.ep_size,
        "backend": setup.backend,
        "git_commit": commit,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def table(runs: list[dict]) -> str:
    """Rows per router and phase: straggler ms, per-rank imbalance and MV (p50 / p95 over the
    (step, layer) samples), dropped fraction; with a padded dispatch buffer (DeepSpeed) the
    share of its slots holding a token (p50); prefill latency on the prefill row, decode ms per
    token on the decode row; tokens/s and peak memory per router."""
    padded = any("buffer_fill" in run["summary"][phase] for run in runs for phase in PHASES)
    head = (
        f"{'router':<14}{'phase':<9}{'straggler ms':>16}{'rank imbalance':>17}{'MV':>15}"
        f"{'dropped':>9}" + (f"{'fill':>8}" if padded else "")
        + f"{'latency':>16}{'tok/s':>10}{'peak MiB':>10}"
    )
    sub = f"{'':<23}{'p50':>8}{'p95':>8}{'p50':>9}{'p95':>8}{'p50':>8}{'p95':>7}"
    lines = [head, sub]
    for run in runs:
        e2e = run["end_to_end"]
        for phase in ("prefill", "decode"):
            s = run["summary"][phase]
            if not s["samples"]:
                continue
            latency = (
                f"{_fmt(e2e['prefill_ms'], '.1f')} ms"
                if phase == "prefill"
                else f"{_fmt(e2e['decode_ms_per_token'], '.2f')} ms/tok"
            )
            last = phase == "decode" or not run["summary"]["decode"]["samples"]
            straggler, imbalance, mv = s["straggler_ms"], s["rank_imbalance"], s["max_violation"]
            lines.append(
                f"{run['router'] if phase == 'prefill' else '':<14}{phase:<9}"
                f"{_fmt(straggler['p50'], '8.3f')}{_fmt(straggler['p95'], '8.3f')}"
                f"{_fmt(imbalance['p50'], '9.3f')}{_fmt(imbalance['p95'], '8.3f')}"
                f"{_fmt(mv['p50'], '8.3f')}{_fmt(mv['p95'], '7.3f')}"
                f"{_fmt(100 * s['dropped_fraction'], '8.2f')}%"
                + (f"{_fmt(100 * s['buffer_fill']['p50'], '7.1f')}%" if "buffer_fill" in s else "")
                + (f"{'n/a':>8}" if padded and "buffer_fill" not in s else "")
                + f"{latency:>16}"
                + (f"{e2e['tokens_per_s']:10.1f}{e2e['peak_memory_mib']:10.0f}" if last else "")
            )
    return "\n".join(lines)


def quality_table(runs: list[dict]) -> str:
    """Held-out perplexity and next-token accuracy per router and domain (teacher-forced, every
    rank's sequences), with the perplexity change against the first run (vanilla under
    --compare)."""
    domains = [d for d in runs[0]["quality"] if d != "all"] + ["all"]
    lines = [f"{'router':<14}{'domain':<10}{'perplexity':>11}{'vs first':>10}{'accuracy':>10}"]
    base = runs[0]["quality"]
    for run in runs:
        for i, domain in enumerate(domains):
            q = run["quality"][domain]
            change = 100 * (q["perplexity"] / base[domain]["perplexity"] - 1)
            lines.append(
                f"{run['router'] if i == 0 else '':<14}{domain:<10}{q['perplexity']:11.3f}"
                f"{change:+9.2f}%{100 * q['accuracy']:9.2f}%"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


# Import-time notices that say nothing on a CPU box (no Transformer Engine / Apex there).
QUIET_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"absl\.logging is not installed",
    r"full scope is deprecated",
    r"`torch\.distributed\.\w+` is deprecated",
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # exits 2 on bad input, before any process group exists
    cfg: ModelConfig = args.model
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)

    api = framework_api(args.framework)
    setup = api.init_distributed(args.ep, args.timeout)
    rank0 = setup.rank == 0
    if rank0:
        print(
            f"{PROG}: {cfg.name} ({cfg.num_experts} experts, top-{cfg.topk}, "
            f"{len(cfg.moe_layer_indices)} MoE layers, skew {cfg.skew}), {args.framework}, "
            f"world {setup.world_size}, "
            f"EP {setup.ep_size}, {setup.backend} on {setup.device.type}, {args.dispatcher}, "
            f"routers {' then '.join(args.routers)}",
            file=sys.stderr,
            flush=True,
        )

    params_of = {VANILLA: None, args.router: args.params}
    model = api.build_model(
        cfg,
        setup,
        router=args.routers[0],
        router_params=params_of[args.routers[0]],
        load_scope=args.load_scope if args.routers[0] == args.router else "local",
        dispatcher=args.dispatcher,
        checkpoint=args.checkpoint,
    )
    recorder = MoERecorder(
        setup.device,
        rank=setup.rank,
        ep_rank=setup.ep_rank,
        ep_group=setup.ep_group,
        nvtx_ranges=not args.no_nvtx,
    )
    api.instrument(model, recorder)
    ids, pad = lockstep_batch(make_prompts(args, setup.rank), setup.device)
    eval_sequences = quality_sequences(args, setup.rank, setup.world_size)

    runs = []
    for i, router in enumerate(args.routers):
        if i > 0:  # same model, same prompts: only the routing decision changes
            api.swap_router(model, router, params_of[router], args.load_scope)
        local = run_router(model, ids, pad, args, recorder, setup.device)
        # Teacher-forced held-out quality with this router active (not recorded: no step open).
        held_out = quality(model, eval_sequences, setup.device)
        per_rank = gather_to_rank0(local)
        if rank0:
            records = [rec for r in per_rank for rec in r["records"]]
            params = params_of[router]
            runs.append(
                {
                    "router": router,
                    "router_params": dataclasses.asdict(params) if params is not None else {},
                    "load_scope": args.load_scope if router == args.router else "local",
                    "summary": summarize(records, cfg.topk),
                    "end_to_end": end_to_end(per_rank),
                    "quality": held_out,
                    "per_rank": [{k: v for k, v in r.items() if k != "records"} for r in per_rank],
                    "records": records,
                }
            )

    if rank0:
        text = table(runs)
        if any(run["quality"] for run in runs):
            text += "\n\n" + quality_table(runs)
        print(text, flush=True)
        report = {
            "command": [PROG, *(sys.argv[1:] if argv is None else argv)],
            "config": {
                "framework": args.framework,
                "model": dataclasses.asdict(cfg),
                "run": {
                    k: (str(v) if isinstance(v, Path) else v)
                    for k, v in vars(args).items()
                    if k not in ("model", "params")
                },
                "padded_prompt_len": int(ids.shape[1]),
            },
            "environment": environment(setup),
            "table": text,
            "runs": runs,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"{PROG}: wrote {args.out}", file=sys.stderr, flush=True)
    api.destroy_distributed()
    return 0


def entry() -> int:
    """Run ``main``; an exception on any rank is printed with the rank and exits 1 at once
    (no collective teardown that would wait for the others), so torchrun stops the job."""
    try:
        return main()
    except SystemExit:
        raise
    except BaseException:
        rank = os.environ.get("RANK", "0")
        print(f"{PROG}: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(entry())
