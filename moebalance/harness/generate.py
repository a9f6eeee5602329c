"""The lockstep generation loop and its end-to-end figures.

One generation = a prefill of the left-padded prompts, then ``gen_len - 1`` greedy decode steps
on the framework's static KV cache, under ``torch.inference_mode`` (no autograd bookkeeping in
any figure). Every rank runs the same shapes and the same number of steps, so every rank runs
every MoE layer the same number of times (the collectives need it). Each model call is one
recorder step ("prefill" or "decode"); the framework's decode flag tells prefill-only policies
which is which. With a profile directory ``measure`` records its measured generation (not the
warm-up) with ``torch.profiler`` (CPU activity, and CUDA activity when CUDA is available) and
writes one Chrome / Perfetto trace per rank (``moebalance.harness.report.trace_path``); the
recorder's ranges (``moe/step ...``, ``moe/<phase> layer=<l>``) appear in it by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from ..runner import check_router_logits
from ..telemetry import MoERecorder
from .framework import Framework

__all__ = [
    "generate", "measure", "profiled", "end_to_end", "reset_peak_memory", "peak_memory_mib",
]


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
    """Peak memory since ``reset_peak_memory`` (MiB): the CUDA allocator's peak on GPU, peak RSS
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


@torch.inference_mode()
def generate(
    framework: Framework,
    model: torch.nn.Module,
    ids: torch.Tensor,
    pad: torch.Tensor,
    gen_len: int,
    recorder: MoERecorder,
    *,
    warmup: bool,
    on_step: Optional[Callable[[], None]] = None,
) -> dict[str, Any]:
    """One greedy generation of ``gen_len`` tokens from ``ids`` [B, S] (``pad`` [B, S] bool,
    True = padding, routed to no expert). ``on_step`` runs after every model step (online
    rebalancing). Returns {"tokens": [B, gen_len] int64, "prefill_ms", "decode_ms"} (wall
    time, ms)."""
    device = ids.device
    B, S = ids.shape
    total = S + gen_len
    key_pad = torch.cat([pad, torch.zeros(B, gen_len, dtype=torch.bool, device=device)], dim=1)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).triu(1)
    mask = causal[None, None] | key_pad[:, None, None, :]  # [B, 1, total, total], True = masked
    positions = ((~key_pad).cumsum(dim=1) - 1).clamp_min(0)  # RoPE itself is shift-invariant
    context = framework.inference_context(B, total)

    _sync(device)
    start = time.perf_counter()
    framework.set_decode(model, False)
    recorder.begin_step("prefill", warmup=warmup)
    logits = model(
        ids, positions[:, :S], mask[:, :, :S, :S], inference_context=context, padding_mask=pad
    )
    recorder.end_step()
    check_router_logits(model, "prefill")
    if on_step is not None:
        on_step()
    tokens = [logits[:, -1].argmax(dim=-1)]
    _sync(device)
    prefill_ms = (time.perf_counter() - start) * 1e3

    context.sequence_len_offset = S
    context.enable_decode_mode()
    framework.set_decode(model, True)
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
        check_router_logits(model, f"decode step {step + 1}")
        if on_step is not None:
            on_step()
        tokens.append(logits[:, -1].argmax(dim=-1))
        context.sequence_len_offset += 1
    _sync(device)
    decode_ms = (time.perf_counter() - start) * 1e3
    framework.set_decode(model, False)
    return {"tokens": torch.stack(tokens, dim=1), "prefill_ms": prefill_ms, "decode_ms": decode_ms}


@contextlib.contextmanager
def profiled(path: Optional[Path], device: torch.device) -> Iterator[None]:
    """Record the enclosed code with ``torch.profiler`` (CPU activity, plus CUDA activity on a
    CUDA device) and write the trace to ``path`` (Chrome trace JSON, atomically: a temporary
    file beside it, then renamed). A no-op when ``path`` is None."""
    if path is None:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        prof.export_chrome_trace(str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def measure(
    framework: Framework,
    model: torch.nn.Module,
    ids: torch.Tensor,
    pad: torch.Tensor,
    *,
    gen_len: int,
    warmup: int,
    recorder: MoERecorder,
    on_step: Optional[Callable[[], None]] = None,
    label: Optional[str] = None,
    profile: Optional[Path] = None,
) -> dict[str, Any]:
    """``warmup`` unmeasured generations, then one measured one. ``label`` (e.g. the router)
    names the recorder's step ranges; ``profile``: write a torch.profiler trace of the measured
    generation to this file (``profiled``). Returns this rank's figures: prefill and decode
    wall time (ms), generated and prompt tokens, peak memory (MiB), the generated tokens, the
    compute phases' clock, the trace file (or None) and the telemetry records (warm-up left
    out)."""
    if label is not None:
        recorder.label = label
    for _ in range(warmup):
        generate(framework, model, ids, pad, gen_len, recorder, warmup=True, on_step=on_step)
    recorder.clear()  # the measured generation's steps are numbered from 0
    reset_peak_memory(ids.device)
    with profiled(profile, ids.device):
        result = generate(
            framework, model, ids, pad, gen_len, recorder, warmup=False, on_step=on_step
        )
    decode_steps = gen_len - 1
    return {
        "prefill_ms": result["prefill_ms"],
        "decode_ms": result["decode_ms"],
        "decode_ms_per_step": result["decode_ms"] / decode_steps if decode_steps else None,
        "generated_tokens": ids.shape[0] * gen_len,
        "prompt_tokens": int((~pad).sum()),
        "peak_memory_mib": peak_memory_mib(ids.device),
        "tokens": result["tokens"].cpu().tolist(),
        "compute_clock": recorder.compute_clock,
        "profile": str(profile) if profile is not None else None,
        "records": recorder.records(),
    }


def end_to_end(per_rank: list[dict]) -> dict[str, Any]:
    """Across ranks: the slowest rank's prefill (ms) and decode step (ms per generated token per
    sequence), tokens/s = all tokens generated / the slowest rank's total time, peak memory
    (MiB), generated and prompt tokens."""
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
