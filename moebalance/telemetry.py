"""Timing, NVTX ranges and cross-rank aggregation for MoE layers (framework-agnostic, torch only).

One ``MoERecorder`` per process records, for every model step (one forward call) and every MoE
layer on this rank:

- time in the four phases of an MoE layer, in ms: ``router`` (gate + routing decision),
  ``dispatch`` (dispatch metadata and the token all-to-all / all-gather), ``experts`` (local
  permutation, the local experts' MLPs, unpermutation: everything between the two collectives),
  ``combine`` (the return all-to-all / reduce-scatter). A rank with little expert work waits
  for the slowest rank inside ``combine``: that wait is the straggler effect.
- tokens received by each local expert (tokens, from the ``tokens_per_expert`` the experts get);
- tokens this rank routed, the (token, expert) assignments it made, and the top-k assignments
  its policy dropped.

Each timed phase is also an NVTX range ``moe/<phase> layer=<l>`` (``torch.cuda.nvtx`` with CUDA,
the ``nvtx`` package otherwise, a no-op without either) so an Nsight Systems capture shows the
straggler directly, and each step an enclosing range ``moe/step router=<label> step=<n>
phase=<phase> rank=<rank> ep_group=<g>`` (`` warmup`` appended for warm-up steps), which tells
a trace's readers (``scripts/trace_report.py``) which step, router and rank a phase belongs
to. While a ``torch.profiler`` session records, the same names are also opened as
``torch.profiler.record_function`` ranges, so a Perfetto / Chrome trace carries them too; the
check costs about 0.1 us when no profiler runs (opening a ``record_function`` unconditionally
would cost about 7 us a range).

Timing uses CUDA events on GPU (resolved once per step, in ``end_step``, so the hot path never
synchronises). On CPU, where ops and gloo collectives are synchronous, the communication phases
(``dispatch``, ``combine``) are wall time (``time.perf_counter``: they include the wait for
other ranks), and the compute phases (``router``, ``experts``) are the CPU time of the thread
that runs them (``time.thread_time``): the work done, unaffected by another process taking the
core on a shared machine and by the process's other threads (gloo's, the profiler's). This
holds while that thread does the compute itself, i.e. with one intra-op thread
(``torch.get_num_threads() == 1``, torchrun's default ``OMP_NUM_THREADS=1``); with more,
the intra-op pool's work would not be counted, so the recorder then falls back to the
process's CPU time (``time.process_time``, all threads). ``MoERecorder.compute_clock`` names
the clock used. On a dedicated core (``scripts/infer.py`` pins each rank's model thread to
a core of its own when there are enough) wall and CPU time of a compute phase agree.

Steps begun with ``warmup=True`` are recorded but left out of ``records()`` and of the
statistics unless asked for.

The cross-rank statistics over these records (straggler time, per-rank imbalance, MV, p50 /
p95) live in ``moebalance.telemetry_stats``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist


__all__ = [
    "PHASES",
    "RANGES",
    "CPU_CLOCKS",
    "step_range_name",
    "Instrumentation",
    "LayerStep",
    "MoERecorder",
    "gather_to_rank0",
    "shadow_method",
]

PHASES = ("prefill", "decode")
RANGES = ("router", "dispatch", "experts", "combine")
#: Phases timed in CPU time on CPU (compute); the others are wall time (they wait).
CPU_TIMED_RANGES = ("router", "experts")
#: ``cpu_clock`` choices: "auto" = "thread" with one intra-op thread, else "process".
CPU_CLOCKS = ("auto", "thread", "process")
_NVTX_PREFIX = "moe/"
_profiling = torch._C._autograd._profiler_enabled  # True while a torch.profiler records


def step_range_name(
    label: str | None, step: int, phase: str, rank: int, ep_group: int, warmup: bool
) -> str:
    """The name of a step's enclosing range (NVTX and profiler): ``moe/step router=<label>
    step=<n> phase=<phase> rank=<rank> ep_group=<g>``, `` warmup`` appended for warm-up steps
    (label "-" when None)."""
    name = (
        f"{_NVTX_PREFIX}step router={label or '-'} step={step} phase={phase} rank={rank} "
        f"ep_group={ep_group}"
    )
    return name + (" warmup" if warmup else "")


def _nvtx_backend(device: torch.device) -> tuple[Any, Any]:
    """(push(message), pop()) for NVTX ranges: torch.cuda.nvtx with CUDA, else the nvtx package
    (a cheap call when no profiler is attached), else no-ops."""
    if device.type == "cuda":
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    try:
        import nvtx
    except ImportError:  # optional on CPU-only installs
        return (lambda message: None), (lambda: None)
    return nvtx.push_range, nvtx.pop_range


@dataclass
class LayerStep:
    """What one rank recorded for one MoE layer in one step.

    Attributes:
        rank: global rank. ep_rank: rank in its EP group. ep_group: index of that EP group.
        step: step index (one model forward) since the recorder was created or cleared.
        phase: "prefill" or "decode". warmup: recorded during a warm-up step.
        layer: 0-based index of the layer in the decoder (dense layers count).
        router_ms, dispatch_ms, experts_ms, combine_ms: time in each phase (ms), summed over
            the calls of this layer in this step (one in a plain forward).
        local_experts: [n_local] global indices of this rank's experts.
        tokens_per_expert: [n_local] tokens received by each local expert (tokens).
        tokens: tokens this rank routed (padding excluded when the router saw a mask).
        assignments: (token, expert) pairs this rank's routing decision made.
        dropped: top-k assignments its policy removed (0 for top-k and LASER).
        capacity: slots per expert of a padded dispatch buffer, when the framework pads
            (DeepSpeed's C, agreed over the EP group: every expert computes C rows, filled or
            not, so expert time follows C rather than the tokens received); None for dropless
            dispatch (Megatron's alltoall without a capacity factor).
    """

    rank: int
    ep_rank: int
    ep_group: int
    step: int
    phase: str
    warmup: bool
    layer: int
    router_ms: float = 0.0
    dispatch_ms: float = 0.0
    experts_ms: float = 0.0
    combine_ms: float = 0.0
    local_experts: list[int] = field(default_factory=list)
    tokens_per_expert: list[int] = field(default_factory=list)
    tokens: int = 0
    assignments: int = 0
    dropped: int = 0
    capacity: int | None = None


class MoERecorder:
    """Per-rank recorder of MoE layer timings and loads, step by step.

    Usage (the framework adapter calls ``range`` / ``add_*``; the harness brackets steps)::

        recorder = MoERecorder(device, rank=r, ep_rank=er, ep_group=g)
        recorder.begin_step("prefill", warmup=False)
        with recorder.range("experts", layer=3):
            ...
        recorder.add_tokens_per_expert(3, tokens_per_expert, local_experts)
        recorder.end_step()
        rows = recorder.records()            # warm-up steps left out

    Outside ``begin_step`` / ``end_step`` nothing is recorded (ranges still emit NVTX).

    Args:
        device: where the model runs; CUDA selects CUDA-event timing and torch.cuda.nvtx.
        rank, ep_rank, ep_group: copied into every record.
        nvtx_ranges: emit NVTX ranges (default True).
        cpu_clock: the clock of the compute phases on CPU: "thread" (``time.thread_time``),
            "process" (``time.process_time``) or "auto" (default: "thread" when torch runs one
            intra-op thread, else "process"). Ignored on CUDA.

    ``label`` (settable, e.g. the router's name) goes into the step ranges' names.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        rank: int = 0,
        ep_rank: int = 0,
        ep_group: int = 0,
        nvtx_ranges: bool = True,
        cpu_clock: str = "auto",
        label: str | None = None,
    ) -> None:
        if cpu_clock not in CPU_CLOCKS:
            raise ValueError(f"cpu_clock must be one of {CPU_CLOCKS}, got {cpu_clock!r}")
        self.device = torch.device(device)
        self.use_cuda_events = self.device.type == "cuda"
        self.rank, self.ep_rank, self.ep_group = rank, ep_rank, ep_group
        self.label = label
        if cpu_clock == "auto":
            cpu_clock = "thread" if torch.get_num_threads() == 1 else "process"
        self._compute_clock = time.thread_time if cpu_clock == "thread" else time.process_time
        #: what times the compute phases: "cuda_events", "thread_time" or "process_time"
        self.compute_clock = "cuda_events" if self.use_cuda_events else f"{cpu_clock}_time"
        push, pop = _nvtx_backend(self.device)
        self._push = push if nvtx_ranges else (lambda message: None)
        self._pop = pop if nvtx_ranges else (lambda: None)
        self._rows: list[LayerStep] = []
        self.last_step: list[LayerStep] = []  # the rows of the latest finished step
        self._step = -1
        self._phase: str | None = None
        self._warmup = False
        self._current: dict[int, LayerStep] = {}
        self._pending_events: list[tuple[LayerStep, str, Any, Any]] = []
        self._pending_tensors: list[tuple[LayerStep, str, Any]] = []
        self._step_profile: Any = None  # the step's open record_function, while profiling

    # ------------------------------------------------------------------ steps
    @property
    def active(self) -> bool:
        """True between ``begin_step`` and ``end_step``."""
        return self._phase is not None

    def begin_step(self, phase: str, *, warmup: bool = False) -> int:
        """Start recording one model step; returns its index."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if self.active:
            raise RuntimeError("begin_step called twice without end_step")
        self._step += 1
        self._phase, self._warmup = phase, bool(warmup)
        self._current = {}
        name = step_range_name(
            self.label, self._step, phase, self.rank, self.ep_group, self._warmup
        )
        self._push(name)
        if _profiling():
            self._step_profile = torch.profiler.record_function(name)
            self._step_profile.__enter__()
        return self._step

    def end_step(self) -> None:
        """Finish the step: resolve CUDA events and device tensors (one synchronisation)."""
        if not self.active:
            raise RuntimeError("end_step called without begin_step")
        if self._step_profile is not None:
            self._step_profile.__exit__(None, None, None)
            self._step_profile = None
        self._pop()
        if self._pending_events:
            torch.cuda.synchronize(self.device)  # every recorded event has completed
        for row, name, start, end in self._pending_events:
            setattr(row, name, getattr(row, name) + float(start.elapsed_time(end)))
        for row, name, value in self._pending_tensors:
            if name == "tokens_per_expert":
                counts = [int(v) for v in torch.as_tensor(value).reshape(-1).tolist()]
                if row.tokens_per_expert:
                    counts = [a + b for a, b in zip(row.tokens_per_expert, counts)]
                row.tokens_per_expert = counts
            elif name == "capacity":
                row.capacity = max(int(value), row.capacity or 0)
            else:
                setattr(row, name, getattr(row, name) + int(value))
        self._pending_events.clear()
        self._pending_tensors.clear()
        self.last_step = [self._current[layer] for layer in sorted(self._current)]
        self._rows.extend(self.last_step)
        self._current = {}
        self._phase = None

    def clear(self) -> None:
        """Forget every record (the step counter restarts at 0)."""
        if self.active:
            raise RuntimeError("clear called inside a step")
        self._rows.clear()
        self._step = -1

    # ------------------------------------------------------------------ recording
    def _row(self, layer: int) -> LayerStep:
        row = self._current.get(layer)
        if row is None:
            row = LayerStep(
                rank=self.rank,
                ep_rank=self.ep_rank,
                ep_group=self.ep_group,
                step=self._step,
                phase=self._phase,
                warmup=self._warmup,
                layer=int(layer),
            )
            self._current[layer] = row
        return row

    @contextlib.contextmanager
    def range(self, name: str, layer: int) -> Iterator[None]:
        """Time the enclosed code as phase ``name`` (one of RANGES) of MoE layer ``layer`` and
        mark it as the NVTX range ``moe/<name> layer=<layer>`` (and, while a torch.profiler
        records, the profiler range of the same name). Adds to ``<name>_ms``."""
        if name not in RANGES:
            raise ValueError(f"range name must be one of {RANGES}, got {name!r}")
        label = f"{_NVTX_PREFIX}{name} layer={layer}"
        self._push(label)
        profiled = torch.profiler.record_function(label) if _profiling() else None
        if profiled is not None:
            profiled.__enter__()
        try:
            if not self.active:
                yield
                return
            row = self._row(layer)
            if self.use_cuda_events:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self._pending_events.append((row, f"{name}_ms", start, end))
            else:
                clock = self._compute_clock if name in CPU_TIMED_RANGES else time.perf_counter
                t0 = clock()
                yield
                elapsed_ms = (clock() - t0) * 1e3
                setattr(row, f"{name}_ms", getattr(row, f"{name}_ms") + elapsed_ms)
        finally:
            if profiled is not None:
                profiled.__exit__(None, None, None)
            self._pop()

    def add_tokens_per_expert(
        self, layer: int, tokens_per_expert: torch.Tensor, local_experts: Sequence[int]
    ) -> None:
        """Tokens received by each local expert ([n_local], any device; read at end_step)."""
        if not self.active:
            return
        row = self._row(layer)
        row.local_experts = [int(e) for e in local_experts]
        self._pending_tensors.append((row, "tokens_per_expert", tokens_per_expert.detach()))

    def add_routing(
        self,
        layer: int,
        tokens: int | torch.Tensor,
        assignments: int | torch.Tensor,
        dropped: int | torch.Tensor = 0,
    ) -> None:
        """This rank's routing decision: tokens routed, (token, expert) assignments made and
        top-k assignments dropped (ints or 0-dim tensors on any device; read at end_step)."""
        if not self.active:
            return
        row = self._row(layer)
        for name, value in (("tokens", tokens), ("assignments", assignments), ("dropped", dropped)):
            if torch.is_tensor(value):
                self._pending_tensors.append((row, name, value.detach()))
            else:
                setattr(row, name, getattr(row, name) + int(value))

    def add_capacity(self, layer: int, capacity: int | torch.Tensor) -> None:
        """Slots per expert of the padded dispatch buffer this call used (int or 0-dim tensor;
        read at end_step). With several calls per step the largest is kept."""
        if not self.active:
            return
        row = self._row(layer)
        if torch.is_tensor(capacity):
            self._pending_tensors.append((row, "capacity", capacity.detach()))
        else:
            row.capacity = max(int(capacity), row.capacity or 0)

    # ------------------------------------------------------------------ results
    def records(self, include_warmup: bool = False) -> list[dict]:
        """Every finished (step, layer) record of this rank as a plain dict (``LayerStep``)."""
        return [asdict(r) for r in self._rows if include_warmup or not r.warmup]


# ---------------------------------------------------------------------- cross-rank


def gather_to_rank0(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any] | None:
    """Gather a picklable ``obj`` from every rank of ``group`` (default: the world) to its
    first rank. Returns the list in group-rank order there, None on the other ranks; [obj]
    when torch.distributed is not initialised. Works on gloo and NCCL (NCCL moves the pickled
    bytes through the current CUDA device). Collective: every rank of the group must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    size = dist.get_world_size(group)
    first = dist.get_global_rank(group, 0) if group is not None else 0
    is_first = dist.get_rank() == first
    out = [None] * size if is_first else None
    dist.gather_object(obj, out, dst=first, group=group)
    return out


# ----------------------------------------------------------------------------- instrumentation
@dataclass
class Instrumentation:
    """Handle returned by the adapters' ``instrument``: ``remove()`` restores every wrapped
    method."""

    recorder: "MoERecorder"
    layers: list[int] = field(default_factory=list)
    _restore: list[Callable[[], None]] = field(default_factory=list)

    def remove(self) -> None:
        while self._restore:
            self._restore.pop()()


def shadow_method(
    obj: Any, name: str, wrapper_factory: Callable[[Callable], Callable], undo: list
) -> None:
    """Set ``obj.<name>`` (an instance attribute) to ``wrapper_factory(original bound method)``
    and append to ``undo`` a function that puts the original back (framework code unforked)."""
    original = getattr(obj, name)
    had_own = name in vars(obj)
    wrapped = functools.wraps(original)(wrapper_factory(original))
    object.__setattr__(obj, name, wrapped)

    def restore() -> None:
        if had_own:
            object.__setattr__(obj, name, original)
        else:
            delattr(obj, name)

    undo.append(restore)
