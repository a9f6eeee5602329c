"""A cost model of one MoE layer under expert parallelism: time from where the tokens go.

Per MoE layer, with R EP ranks, S expert slots per rank and ``tokens [R, S]`` the tokens each
local slot receives (one row per routed (token, expert) pair), ``rows [R, R]`` the rows rank r
sends to rank q in the dispatch (``rows[r, r]``: kept local, never on a link):

    expert_ms[r] = sum_s (gemm_ms(tokens[r, s]) + expert_overhead_ms) + permute_ms_per_row * sum_s tokens[r, s]
    dispatch_ms  = all_to_all_ms(rows, dispatch_row_bytes)
    combine_ms   = all_to_all_ms(rows.T, combine_row_bytes)      (every row comes back)
    rank_ms[r]   = router_ms + dispatch_ms + expert_ms[r] + combine_ms
    layer_ms     = router_ms + dispatch_ms + max_r expert_ms[r] + combine_ms
    straggler_ms = max_r expert_ms[r] - mean_r expert_ms[r]  = layer_ms - mean_r rank_ms[r]

The combine cannot finish before the slowest rank's experts, so the layer takes the slowest
rank's time; the straggler is the mean over ranks of the wait for it, the same definition as the
measured one (``moebalance.telemetry_stats.straggler_ms``, which this module calls). Router time
is one figure for every rank (every rank routes its own T tokens). Each all-to-all is a
synchronising collective: every rank spends the collective's time in it, the time of the rank
with the most bytes on a link (``dispatch_rank_ms`` / ``combine_rank_ms``: each rank's own link
time). The part of the collectives spent waiting for that rank is reported apart,
``alltoall_wait_ms = sum over the two collectives of (max_r - mean_r) of the per-rank link
time``: the straggler effect on the links (a rank hosting hot experts receives more rows), which
the measured straggler, defined on expert time, does not include.

Expert GEMM time (``GemmTable``): the expert MLP's time (ms) measured against the tokens it
receives for one expert shape (hidden, ffn hidden, SwiGLU or not), piecewise linear between the
measured token counts, the last segment's slope beyond the last one, the first point's time
below it, and 0 for an expert that receives no token (its call is ``expert_overhead_ms``).
``scripts/bench_gemm.py`` measures tables (``results/gemm_*.json``, read by
``load_gemm_tables``); ``roofline_table`` models one from an accelerator's peak compute and
memory bandwidth where no measurement exists.

All-to-all time (``Network``): each rank's bytes to / from the ranks of its own node go over
the intra-node link, the rest over the inter-node link (``ranks_per_node`` ranks per node,
contiguous); on each link a rank takes ``latency + max(sent, received) / bandwidth`` (both
directions run at once), the two links run at once, and the collective ends when the slowest
rank is done: ``all_to_all_ms = max_r max_link(...)``. A link with no peer of the rank costs
nothing; at EP 1 there is no collective. Presets (``LINKS``) name their sources; every field
is overridable (``dataclasses.replace``). Bytes of a row: hidden x bytes per element of the
activations.

What the model leaves out: overlap of communication with compute, contention between ranks of
one node for its NICs beyond the per-rank bandwidth, the router's own cost differences between
policies (``router_ms`` is one number), attention and every non-MoE part of a step.

Dataclasses validate on construction and raise ``moebalance.config.ConfigError`` in one line
naming the parameter. Torch only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import ConfigError
from .telemetry_stats import straggler_ms as _straggler_ms

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_TOKEN_GRID",
    "ExpertShape",
    "GemmTable",
    "Accelerator",
    "ACCELERATORS",
    "roofline_table",
    "load_gemm_tables",
    "Link",
    "LINKS",
    "Network",
    "ExpertOverheads",
    "OVERHEADS",
    "CostModel",
    "LayerTime",
    "all_to_all_ms",
    "fit_link",
    "send_rows_from_received",
]

ACTIVATIONS = ("gelu", "swiglu")

#: Token counts of a table: 1 .. 8192 in powers of two (14 points); expert loads at EP sizes
#: and batch sizes of interest fall inside, beyond them the slope of the last segment applies.
DEFAULT_TOKEN_GRID = tuple(2**i for i in range(14))


def _fail(message: str) -> None:
    raise ConfigError(" ".join(str(message).split()))


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _require_number(name: str, value: Any, *, low: float = 0.0, strict: bool = False) -> None:
    ok = _finite(value) and (value > low if strict else value >= low)
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        _fail(f"{name} must be a finite number {bound}, got {value!r}")


def _require_int(name: str, value: Any, low: int = 1) -> None:
    if type(value) is not int or value < low:
        _fail(f"{name} must be an integer >= {low}, got {value!r}")


# ---------------------------------------------------------------------------------- experts


@dataclass(frozen=True)
class ExpertShape:
    """One expert MLP: ``hidden`` -> ``ffn_hidden`` (twice that with SwiGLU's gate) -> ``hidden``.

    Attributes:
        hidden: model hidden size H.
        ffn_hidden: expert intermediate size F.
        activation: "gelu" (two matrices, H x F and F x H) or "swiglu" (three: gate, up, down).
        dtype_bytes: bytes per weight / activation element (4 float32, 2 bf16, 1 fp8).
    """

    hidden: int
    ffn_hidden: int
    activation: str = "swiglu"
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        _require_int("hidden", self.hidden)
        _require_int("ffn_hidden", self.ffn_hidden)
        if self.activation not in ACTIVATIONS:
            _fail(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.dtype_bytes not in (1, 2, 4):
            _fail(f"dtype_bytes must be 1, 2 or 4, got {self.dtype_bytes!r}")

    @property
    def matrices(self) -> int:
        """H x F weight matrices: 3 with SwiGLU, 2 otherwise."""
        return 3 if self.activation == "swiglu" else 2

    @property
    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of one token through the MLP."""
        return 2 * self.matrices * self.hidden * self.ffn_hidden

    @property
    def weight_bytes(self) -> int:
        return self.matrices * self.hidden * self.ffn_hidden * self.dtype_bytes

    def activation_bytes_per_token(self) -> int:
        """Bytes one token moves through the MLP's memory: its input and output rows, the first
        matmul's output written and read, the activation's output written and read."""
        fc1 = self.ffn_hidden * (2 if self.activation == "swiglu" else 1)
        return (2 * self.hidden + 2 * fc1 + 2 * self.ffn_hidden) * self.dtype_bytes

    @property
    def key(self) -> str:
        return f"h{self.hidden}_f{self.ffn_hidden}_{self.activation}_{8 * self.dtype_bytes}bit"


@dataclass(frozen=True)
class GemmTable:
    """Expert MLP time (ms) against tokens received, for one shape on one device.

    Attributes:
        shape: the expert's shape.
        tokens: strictly increasing token counts (integers >= 1).
        ms: time (ms) of one expert MLP call at each count; finite and >= 0.
        device: the device name the times come from (e.g. "AMD EPYC", "NVIDIA H100 80GB HBM3").
        source: where the times come from: a results file and its command, or a model.
        name: a label (e.g. the model the shape belongs to).
    """

    shape: ExpertShape
    tokens: tuple[int, ...]
    ms: tuple[float, ...]
    device: str = ""
    source: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.shape, ExpertShape):
            _fail(f"shape must be an ExpertShape, got {type(self.shape).__name__}")
        tokens, ms = tuple(self.tokens), tuple(self.ms)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "ms", ms)
        if not tokens:
            _fail("tokens must list at least one token count")
        if len(tokens) != len(ms):
            _fail(f"ms must give one time per token count: {len(ms)} times, {len(tokens)} counts")
        if any(type(n) is not int or n < 1 for n in tokens):
            _fail(f"tokens must be integers >= 1, got {list(tokens)}")
        if any(b <= a for a, b in zip(tokens, tokens[1:])):
            _fail(f"tokens must be strictly increasing, got {list(tokens)}")
        if any(not _finite(t) or t < 0 for t in ms):
            _fail(f"ms must be finite numbers >= 0, got {list(ms)}")

    def time_ms(self, tokens: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """[...] tokens received per expert -> [...] float64 ms of its MLP call.

        Piecewise linear between the table's points; the first point's time between 1 token
        and the first count; the last segment's slope (>= 0) beyond the last count; 0 for no
        token. Token counts must be >= 0."""
        n = torch.as_tensor(tokens, dtype=torch.float64)
        if bool((n < 0).any()) or not bool(torch.isfinite(n).all()):
            _fail("tokens per expert must be finite and >= 0")
        x = torch.tensor(self.tokens, dtype=torch.float64)
        y = torch.tensor(self.ms, dtype=torch.float64)
        if x.numel() == 1:
            slope = y[0] / x[0]
            inside = y[0] + 0 * n
            beyond = y[0] + slope * (n - x[0])
            out = torch.where(n > x[0], beyond, inside)
        else:
            i = torch.searchsorted(x, n.clamp(x[0], x[-1]), right=True).clamp(1, x.numel() - 1)
            x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
            out = y0 + (y1 - y0) * (n.clamp(x[0], x[-1]) - x0) / (x1 - x0)
            last_slope = ((y[-1] - y[-2]) / (x[-1] - x[-2])).clamp(min=0)
            out = torch.where(n > x[-1], y[-1] + last_slope * (n - x[-1]), out)
        return torch.where(n > 0, out, torch.zeros_like(out))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hidden": self.shape.hidden,
            "ffn_hidden": self.shape.ffn_hidden,
            "activation": self.shape.activation,
            "dtype_bytes": self.shape.dtype_bytes,
            "tokens": list(self.tokens),
            "ms": list(self.ms),
            "device": self.device,
            "source": self.source,
        }


def load_gemm_tables(path: str | Path) -> dict[str, GemmTable]:
    """The tables of a ``scripts/bench_gemm.py`` results file, by name: {name: GemmTable}.

    The file: {"device_name": str, "command": str, "tables": [{"name", "hidden", "ffn_hidden",
    "activation", "dtype_bytes", "tokens": [...], "ms": [...]}, ...]}. ConfigError (one line)
    for a missing or malformed file."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        _fail(f"gemm table file {path} not found (write one with scripts/bench_gemm.py)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        _fail(f"gemm table file {path}: not readable JSON ({err})")
    if not isinstance(document, dict) or not isinstance(document.get("tables"), list):
        _fail(f"gemm table file {path}: expected a mapping with a list 'tables'")
    device = str(document.get("device_name", ""))
    source = f"{path.name}: {document.get('command', '')}".strip()
    tables = {}
    for i, entry in enumerate(document["tables"]):
        try:
            shape = ExpertShape(
                entry["hidden"], entry["ffn_hidden"], entry["activation"], entry["dtype_bytes"]
            )
            table = GemmTable(
                shape, tuple(entry["tokens"]), tuple(entry["ms"]), device=device, source=source,
                name=str(entry.get("name") or shape.key),
            )
        except (KeyError, TypeError) as err:
            _fail(f"gemm table file {path}: table {i} lacks or mistypes a field ({err})")
        except ConfigError as err:
            _fail(f"gemm table file {path}: table {i}: {err}")
        tables[table.name] = table
    if not tables:
        _fail(f"gemm table file {path} holds no table")
    return tables


@dataclass(frozen=True)
class Accelerator:
    """Peak figures of an accelerator for ``roofline_table``.

    Attributes:
        name: a label.
        peak_tflops: dense matrix throughput at the expert's dtype (TFLOP/s, 1e12 FLOP/s).
        memory_tbps: memory bandwidth (TB/s, 1e12 bytes/s).
        compute_efficiency: share of the peak an expert GEMM reaches, in (0, 1].
        memory_efficiency: share of the memory bandwidth reached, in (0, 1].
        launch_us: fixed time per expert MLP call (its kernels' launches and tails), µs.
        source: where the peak figures come from.
    """

    name: str
    peak_tflops: float
    memory_tbps: float
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    launch_us: float = 10.0
    source: str = ""

    def __post_init__(self) -> None:
        _require_number("peak_tflops", self.peak_tflops, strict=True)
        _require_number("memory_tbps", self.memory_tbps, strict=True)
        for name in ("compute_efficiency", "memory_efficiency"):
            value = getattr(self, name)
            if not (_finite(value) and 0 < value <= 1):
                _fail(f"{name} must be a number in (0, 1], got {value!r}")
        _require_number("launch_us", self.launch_us)


#: Peak figures (vendor figures, dense, no sparsity). The efficiencies and launch time are
#: assumptions of this model, not measurements: refit with a measured table
#: (scripts/bench_gemm.py on the GPU, docs/projection.md).
ACCELERATORS: dict[str, Accelerator] = {
    a.name: a
    for a in (
        Accelerator(
            "h100-sxm", 989.4, 3.35,
            source="NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989.4 TFLOPS dense BF16, "
            "3.35 TB/s HBM3",
        ),
        Accelerator(
            "h20", 148.0, 4.0,
            source="NVIDIA H20 as reported by vendors and press (no public datasheet): "
            "148 TFLOPS dense BF16, 4.0 TB/s HBM3",
        ),
    )
}


def roofline_table(
    shape: ExpertShape,
    accelerator: Accelerator,
    tokens: Sequence[int] = DEFAULT_TOKEN_GRID,
    name: str = "",
) -> GemmTable:
    """A modelled ``GemmTable``: per call, ``launch_us`` plus the larger of the compute time
    (tokens x flops per token / (peak x compute efficiency)) and the memory time ((weights +
    tokens x activation bytes) / (bandwidth x memory efficiency)). A model, not a measurement:
    its ``source`` says so."""
    rows = []
    for n in tokens:
        compute_s = n * shape.flops_per_token / (accelerator.peak_tflops * 1e12 * accelerator.compute_efficiency)
        memory_s = (shape.weight_bytes + n * shape.activation_bytes_per_token()) / (
            accelerator.memory_tbps * 1e12 * accelerator.memory_efficiency
        )
        rows.append(accelerator.launch_us * 1e-3 + max(compute_s, memory_s) * 1e3)
    source = (
        f"roofline model (not measured): {accelerator.name}, compute efficiency "
        f"{accelerator.compute_efficiency:g}, memory efficiency {accelerator.memory_efficiency:g}, "
        f"{accelerator.launch_us:g} us per call; {accelerator.source}"
    )
    return GemmTable(shape, tuple(tokens), tuple(rows), device=f"{accelerator.name} (modelled)",
                     source=source, name=name or shape.key)


# ---------------------------------------------------------------------------------- links


@dataclass(frozen=True)
class Link:
    """One kind of link as a rank sees it in an all-to-all.

    Attributes:
        name: a label.
        latency_us: fixed time of one all-to-all over this link (µs), >= 0.
        bandwidth_gbps: bytes per second one rank moves in each direction at once (GB/s, 1e9
            bytes/s), > 0.
        source: where the figures come from.
    """

    name: str
    latency_us: float
    bandwidth_gbps: float
    source: str = ""

    def __post_init__(self) -> None:
        _require_number(f"{self.name or 'link'}.latency_us", self.latency_us)
        _require_number(f"{self.name or 'link'}.bandwidth_gbps", self.bandwidth_gbps, strict=True)

    def time_ms(self, sent: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
        """[R] bytes sent and received per rank -> [R] ms: latency + max(sent, received) / bandwidth."""
        return self.latency_us * 1e-3 + torch.maximum(sent, received) / (self.bandwidth_gbps * 1e6)


#: Link presets. Bandwidths are per rank and direction; latencies per all-to-all call.
LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        Link(
            "nvlink4", 15.0, 360.0,
            source="NVLink 4 (H100 / H800 / H20 SXM): 900 GB/s per GPU both directions, i.e. "
            "450 GB/s each way (NVIDIA H100 datasheet); 80% of it assumed reachable by an "
            "all-to-all (DeepEP's intranode kernels reach 153-158 GB/s of H800's ~160 GB/s, "
            "deepseek-ai/DeepEP docs/legacy.md); latency assumed",
        ),
        Link(
            "ib-ndr400", 30.0, 45.0,
            source="InfiniBand NDR 400 Gb/s (ConnectX-7), one NIC per GPU: 50 GB/s each way; "
            "DeepEP's internode kernels measure 43-58 GB/s bottleneck bandwidth at EP 16-64 "
            "(deepseek-ai/DeepEP docs/legacy.md), 45 GB/s taken; latency assumed",
        ),
        Link(
            # fitted on this machine's EP 2 runs by python scripts/project.py --check (an
            # earlier run; results/projection_check_cpu.json: the latest fit and this preset's error)
            "gloo-cpu", 2150.0, 0.49,
            source="gloo on one 2-core CPU VM (shared memory / loopback), fitted from measured "
            "infer.py dispatch and combine times: results/projection_check_cpu.json",
        ),
    )
}


def all_to_all_ms(
    rows: torch.Tensor, row_bytes: float, intra: Link, inter: Link | None = None,
    ranks_per_node: int | None = None,
) -> tuple[float, torch.Tensor]:
    """One all-to-all of ``rows [R, R]`` (rows[r, q]: rows rank r sends to rank q; the
    diagonal stays local) of ``row_bytes`` bytes each: (collective ms, [R] per-rank ms).

    Ranks r // ranks_per_node share a node (None: all ranks in one node); a rank's traffic to
    its node goes over ``intra``, the rest over ``inter`` (needed when there is more than one
    node). Per rank and link: latency + max(sent, received) / bandwidth, when the rank has a peer
    on that link; the rank's time is the larger of the two links'; the collective's the
    largest over ranks. 0 at R = 1."""
    rows = _check_rows(rows)
    R = rows.shape[0]
    _require_number("row_bytes", row_bytes, strict=True)
    per_node = R if ranks_per_node is None else ranks_per_node
    _require_int("ranks_per_node", per_node)
    if R == 1:
        return 0.0, torch.zeros(1, dtype=torch.float64)
    node = torch.arange(R) // per_node
    same = node.unsqueeze(0) == node.unsqueeze(1)
    off_diagonal = ~torch.eye(R, dtype=torch.bool)
    per_rank = torch.zeros(R, dtype=torch.float64)
    for link, mask in ((intra, same & off_diagonal), (inter, ~same)):
        has_peer = mask.any(dim=1)
        if not bool(has_peer.any()):
            continue
        if link is None:
            _fail(f"ranks span {int(node.max()) + 1} nodes of {per_node}: an inter-node link is needed")
        traffic = rows * mask * float(row_bytes)
        t = link.time_ms(traffic.sum(dim=1), traffic.sum(dim=0))
        per_rank = torch.maximum(per_rank, torch.where(has_peer, t, torch.zeros_like(t)))
    return float(per_rank.max()), per_rank


def _check_rows(rows: Any) -> torch.Tensor:
    rows = torch.as_tensor(rows, dtype=torch.float64)
    if rows.dim() != 2 or rows.shape[0] != rows.shape[1] or rows.shape[0] < 1:
        _fail(f"rows must be a square [ranks, ranks] matrix, got shape {list(rows.shape)}")
    if not bool(torch.isfinite(rows).all()) or bool((rows < 0).any()):
        _fail("rows must be finite and >= 0")
    return rows


@dataclass(frozen=True)
class Network:
    """The links of an expert-parallel group: ``intra`` within a node of ``ranks_per_node``
    ranks, ``inter`` between nodes (None: a single node; then any EP size runs on one node)."""

    intra: Link
    inter: Link | None = None
    ranks_per_node: int | None = 8

    def __post_init__(self) -> None:
        if not isinstance(self.intra, Link):
            _fail(f"intra must be a Link, got {type(self.intra).__name__}")
        if self.inter is not None and not isinstance(self.inter, Link):
            _fail(f"inter must be a Link or None, got {type(self.inter).__name__}")
        if self.ranks_per_node is not None:
            _require_int("ranks_per_node", self.ranks_per_node)
        if self.inter is None:
            object.__setattr__(self, "ranks_per_node", None)

    def all_to_all_ms(self, rows: torch.Tensor, row_bytes: float) -> tuple[float, torch.Tensor]:
        return all_to_all_ms(rows, row_bytes, self.intra, self.inter, self.ranks_per_node)

    def to_dict(self) -> dict[str, Any]:
        def link(x: Link | None) -> dict | None:
            return None if x is None else {
                "name": x.name, "latency_us": x.latency_us, "bandwidth_gbps": x.bandwidth_gbps,
                "source": x.source,
            }
        return {"intra": link(self.intra), "inter": link(self.inter),
                "ranks_per_node": self.ranks_per_node}


def fit_link(num_bytes: Sequence[float], ms: Sequence[float], name: str = "fitted",
             source: str = "") -> Link:
    """The ``Link`` whose latency + bytes / bandwidth best fits measured (bytes, ms) pairs in
    least squares, latency >= 0 (refitted through the origin when the free fit's is negative).
    ConfigError when there are fewer than two distinct byte counts or the fitted slope is not
    positive (no bandwidth can be read from the data)."""
    x = torch.as_tensor(num_bytes, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(ms, dtype=torch.float64).reshape(-1)
    if x.numel() != y.numel() or x.numel() < 2 or int(torch.unique(x).numel()) < 2:
        _fail("fit_link needs at least two samples with different byte counts")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        _fail("fit_link: bytes and ms must be finite")
    xm, ym = x.mean(), y.mean()
    slope = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    intercept = ym - slope * xm
    if intercept < 0:
        slope, intercept = (x * y).sum() / (x * x).sum(), torch.zeros((), dtype=torch.float64)
    if slope <= 0:
        _fail("fit_link: time does not grow with bytes in these samples; no bandwidth to fit")
    return Link(name, float(intercept) * 1e3, 1.0 / (float(slope) * 1e6), source=source)


def send_rows_from_received(received: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[R] rows each rank received and [R] tokens each rank routed -> [R, R] estimated rows
    rank r sent to rank q: ``received[q] * tokens[r] / sum(tokens)`` (each rank's tokens pick
    every rank's experts alike; a run's telemetry records what each rank received, not from
    whom)."""
    received = torch.as_tensor(received, dtype=torch.float64).reshape(-1)
    tokens = torch.as_tensor(tokens, dtype=torch.float64).reshape(-1)
    if received.numel() != tokens.numel():
        _fail(f"received ({received.numel()} ranks) and tokens ({tokens.numel()}) differ in ranks")
    total = float(tokens.sum())
    if total <= 0:
        return torch.zeros(tokens.numel(), tokens.numel(), dtype=torch.float64)
    return tokens.unsqueeze(1) * received.unsqueeze(0) / total


# ---------------------------------------------------------------------------------- overheads


@dataclass(frozen=True)
class ExpertOverheads:
    """The expert phase's time beyond the MLP calls.

    Attributes:
        name: a label.
        expert_overhead_ms: per hosted expert slot and layer call (its module call, made even
            with no token), ms, >= 0.
        permute_ms_per_row: per received row (sorting rows by local expert and back, the
            framework's bookkeeping per row), ms, >= 0.
        source: where the figures come from.
    """

    name: str
    expert_overhead_ms: float = 0.0
    permute_ms_per_row: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        _require_number("expert_overhead_ms", self.expert_overhead_ms)
        _require_number("permute_ms_per_row", self.permute_ms_per_row)


#: "none": the MLP calls alone (a GPU's grouped GEMM, where per-expert calls are one launch).
#: "megatron-cpu": Megatron-Core's SequentialMLP experts and alltoall dispatcher on this CPU,
#: one thread per rank, fitted by ``python scripts/project.py --check`` on EP 2 runs of the
#: trained models (an earlier run of it; results/projection_check_cpu.json holds the latest
#: run's own fit, "fit", and this preset's error, "errors_preset").
OVERHEADS: dict[str, ExpertOverheads] = {
    o.name: o
    for o in (
        ExpertOverheads("none", source="MLP calls only"),
        ExpertOverheads(
            "megatron-cpu", 0.112, 0.00077,
            source="fitted on measured EP 2 infer.py runs (tiny-moe, fine-moe): "
            "results/projection_check_cpu.json",
        ),
    )
}


# ---------------------------------------------------------------------------------- layer


@dataclass(frozen=True)
class LayerTime:
    """The modelled time of one MoE layer (ms). ``expert_ms`` and ``rank_ms`` are [R] float64
    (per EP rank); the rest are floats."""

    router_ms: float
    dispatch_ms: float
    combine_ms: float
    expert_ms: torch.Tensor
    rank_ms: torch.Tensor
    layer_ms: float
    straggler_ms: float
    dispatch_rank_ms: torch.Tensor
    combine_rank_ms: torch.Tensor

    @property
    def straggler_share(self) -> float:
        """straggler_ms / layer_ms (0 for an empty layer)."""
        return self.straggler_ms / self.layer_ms if self.layer_ms > 0 else 0.0

    @property
    def alltoall_wait_ms(self) -> float:
        """(max - mean) over ranks of each rank's own link time, summed over dispatch and
        combine: the collectives' wait for the rank with the most bytes."""
        return sum(float(t.max() - t.mean()) for t in (self.dispatch_rank_ms, self.combine_rank_ms))

    @property
    def wait_share(self) -> float:
        """(straggler_ms + alltoall_wait_ms) / layer_ms: the share of the layer spent waiting
        for the slowest rank, on the experts and on the links."""
        return (self.straggler_ms + self.alltoall_wait_ms) / self.layer_ms if self.layer_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_ms": self.layer_ms,
            "straggler_ms": self.straggler_ms,
            "straggler_share": self.straggler_share,
            "alltoall_wait_ms": self.alltoall_wait_ms,
            "wait_share": self.wait_share,
            "router_ms": self.router_ms,
            "dispatch_ms": self.dispatch_ms,
            "combine_ms": self.combine_ms,
            "expert_ms_max": float(self.expert_ms.max()),
            "expert_ms_mean": float(self.expert_ms.mean()),
        }


@dataclass(frozen=True)
class CostModel:
    """The cost model of one MoE layer (module docstring).

    Attributes:
        gemm: expert MLP time against tokens.
        network: the links.
        dispatch_row_bytes: bytes of one dispatched row (hidden x bytes per element).
        combine_row_bytes: bytes of one returned row.
        router_ms: router time per rank (the same on every rank), ms.
        expert_overhead_ms: per hosted expert slot and layer call, ms (its call even with no
            token: Megatron's SequentialMLP calls every local expert).
        permute_ms_per_row: per received row, ms (sorting rows by local expert and back).
    """

    gemm: GemmTable
    network: Network
    dispatch_row_bytes: float
    combine_row_bytes: float
    router_ms: float = 0.0
    expert_overhead_ms: float = 0.0
    permute_ms_per_row: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.gemm, GemmTable):
            _fail(f"gemm must be a GemmTable, got {type(self.gemm).__name__}")
        if not isinstance(self.network, Network):
            _fail(f"network must be a Network, got {type(self.network).__name__}")
        _require_number("dispatch_row_bytes", self.dispatch_row_bytes, strict=True)
        _require_number("combine_row_bytes", self.combine_row_bytes, strict=True)
        _require_number("router_ms", self.router_ms)
        _require_number("expert_overhead_ms", self.expert_overhead_ms)
        _require_number("permute_ms_per_row", self.permute_ms_per_row)

    @classmethod
    def for_gemm(cls, gemm: GemmTable, network: Network,
                 overheads: ExpertOverheads | None = None, **fields_: Any) -> "CostModel":
        """A model whose rows are the expert's hidden size in its table's dtype both ways, with
        ``overheads`` (default none) unless ``fields_`` set them."""
        row = gemm.shape.hidden * gemm.shape.dtype_bytes
        if overheads is not None:
            if not isinstance(overheads, ExpertOverheads):
                _fail(f"overheads must be ExpertOverheads, got {type(overheads).__name__}")
            fields_.setdefault("expert_overhead_ms", overheads.expert_overhead_ms)
            fields_.setdefault("permute_ms_per_row", overheads.permute_ms_per_row)
        return cls(gemm, network, fields_.pop("dispatch_row_bytes", row),
                   fields_.pop("combine_row_bytes", row), **fields_)

    def expert_ms(self, tokens: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """tokens [R, S] per local slot -> [R] float64 expert time per rank (ms)."""
        t = torch.as_tensor(tokens, dtype=torch.float64)
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            _fail(f"tokens must be [ranks, slots per rank], got shape {list(t.shape)}")
        per_slot = self.gemm.time_ms(t) + self.expert_overhead_ms
        return per_slot.sum(dim=1) + self.permute_ms_per_row * t.sum(dim=1)

    def layer(self, tokens: torch.Tensor | Sequence[Sequence[int]],
              rows: torch.Tensor | Sequence[Sequence[float]]) -> LayerTime:
        """tokens [R, S] received per local slot, rows [R, R] dispatched (rows[r, q] from r to
        q) -> the layer's modelled time."""
        expert = self.expert_ms(tokens)
        rows_t = _check_rows(rows)
        if rows_t.shape[0] != expert.shape[0]:
            _fail(f"rows is for {rows_t.shape[0]} ranks, tokens for {expert.shape[0]}")
        dispatch, dispatch_rank = self.network.all_to_all_ms(rows_t, self.dispatch_row_bytes)
        combine, combine_rank = self.network.all_to_all_ms(rows_t.t(), self.combine_row_bytes)
        fixed = self.router_ms + dispatch + combine
        rank = fixed + expert
        return LayerTime(
            router_ms=self.router_ms,
            dispatch_ms=dispatch,
            combine_ms=combine,
            expert_ms=expert,
            rank_ms=rank,
            layer_ms=fixed + float(expert.max()),
            straggler_ms=float(_straggler_ms(expert)),
            dispatch_rank_ms=dispatch_rank,
            combine_rank_ms=combine_rank,
        )

