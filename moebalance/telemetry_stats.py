"""Cross-rank statistics of MoE-layer telemetry (``moebalance.telemetry.LayerStep`` records of
every rank), per (EP group, step, layer) sample over the ranks of one EP group:

- straggler time (ms) = max over ranks of expert time - mean over ranks of expert time: the
  mean over ranks of how long each rank waits for the slowest one's experts;
- combine wait (ms) = mean over ranks of combine time - min over ranks of combine time: the
  same wait seen where it is spent, at the combine. The ranks leave the combine together, so a
  rank's combine time in excess of the shortest one (the transfer itself) is the time it
  waited there, for every difference before it (router and dispatch included); when the ranks
  differ only in expert time the two figures agree;
- per-rank load imbalance = max / mean over ranks of tokens received (1 = balanced);
- MV (max violation) = max / mean - 1 over the EP-global expert loads (``moebalance.metrics``);
- dropped fraction = dropped top-k assignments / (routed tokens x k), summed over everything.
p50 / p95 are taken over all (step, layer) samples (linear interpolation between order
statistics, as numpy's default). Timing figures (straggler, combine wait, phase times) also
carry p5, p25 and p75, the spread over the repeated steps, and per EP rank (``ep_rank_ms``:
each rank's own phase times over the samples).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from . import metrics
from .telemetry import PHASES, RANGES

__all__ = [
    "TIMING_FIGURES", "percentile", "straggler_ms", "combine_wait_ms", "rank_imbalance",
    "join_ranks", "timing_stats", "summarize",
]

#: The timing figures of a summary (each with the spread of ``timing_stats``).
TIMING_FIGURES = ("straggler_ms", "combine_wait_ms") + tuple(f"{n}_ms" for n in RANGES)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) of ``values``, NaNs ignored, linear interpolation
    between order statistics (numpy's default). NaN when nothing is left."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q!r}")
    data = sorted(float(v) for v in values if not math.isnan(float(v)))
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def straggler_ms(expert_ms: torch.Tensor) -> torch.Tensor:
    """[..., R] expert time per rank (ms) -> [...] straggler time (ms) = max - mean over ranks."""
    t = expert_ms.double()
    return t.max(dim=-1)[0] - t.mean(dim=-1)


def combine_wait_ms(combine_ms: torch.Tensor) -> torch.Tensor:
    """[..., R] combine time per rank (ms) -> [...] combine wait (ms) = mean - min over ranks:
    the mean over ranks of the time spent at the combine beyond the fastest rank's (which is
    the transfer itself)."""
    t = combine_ms.double()
    return t.mean(dim=-1) - t.min(dim=-1)[0]


def rank_imbalance(tokens_per_rank: torch.Tensor) -> torch.Tensor:
    """[..., R] tokens received per rank -> [...] max / mean over ranks (1 = balanced; NaN when
    no rank received a token)."""
    return metrics.imbalance_ratio(tokens_per_rank)


def join_ranks(records: Sequence[dict]) -> list[dict]:
    """Join per-rank ``LayerStep`` dicts (from all ranks) into one sample per (EP group, step,
    layer), ranks in EP order. Each sample: ep_group, step, phase, layer, and per-rank lists
    ``experts_ms``, ``dispatch_ms``, ``combine_ms``, ``router_ms`` (ms), ``tokens_per_rank``
    (tokens received), ``expert_load`` (EP-global [E] tokens per expert), plus summed
    ``tokens``, ``assignments``, ``dropped``. Raises ValueError when a sample misses a rank."""
    groups: dict[tuple[int, int, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["ep_group"], r["step"], r["layer"]), []).append(r)
    ep_sizes = {}
    for (g, _, _), rows in groups.items():
        ep_sizes[g] = max(ep_sizes.get(g, 0), len(rows))
    samples = []
    for (g, step, layer), rows in sorted(groups.items()):
        rows = sorted(rows, key=lambda r: r["ep_rank"])
        if [r["ep_rank"] for r in rows] != list(range(ep_sizes[g])):
            raise ValueError(
                f"EP group {g}, step {step}, layer {layer}: records from EP ranks "
                f"{[r['ep_rank'] for r in rows]}, expected 0..{ep_sizes[g] - 1}"
            )
        samples.append(
            {
                "ep_group": g,
                "step": step,
                "phase": rows[0]["phase"],
                "layer": layer,
                **{f"{n}_ms": [r[f"{n}_ms"] for r in rows] for n in RANGES},
                "tokens_per_rank": [sum(r["tokens_per_expert"]) for r in rows],
                "expert_load": [c for r in rows for c in r["tokens_per_expert"]],
                "tokens": sum(r["tokens"] for r in rows),
                "assignments": sum(r["assignments"] for r in rows),
                "dropped": sum(r["dropped"] for r in rows),
                # padded dispatch (DeepSpeed): C agreed over the group; None when dropless
                "capacity": max((r.get("capacity") or 0 for r in rows), default=0) or None,
            }
        )
    return samples


def _stats(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if not math.isnan(v)]
    return {
        "p50": percentile(finite, 50),
        "p95": percentile(finite, 95),
        "mean": sum(finite) / len(finite) if finite else math.nan,
        "max": max(finite) if finite else math.nan,
        "n": len(finite),
    }


def timing_stats(values: Sequence[float]) -> dict[str, float]:
    """``_stats`` plus the spread of a timing figure over the samples: p5, p25, p75 (the
    interquartile range is p75 - p25)."""
    finite = [v for v in values if not math.isnan(v)]
    base = _stats(finite)
    return {
        "p5": percentile(finite, 5),
        "p25": percentile(finite, 25),
        "p50": base["p50"],
        "p75": percentile(finite, 75),
        "p95": base["p95"],
        "mean": base["mean"],
        "max": base["max"],
        "n": base["n"],
    }


def _sample_figures(sample: dict, topk: int, num_experts: int | None) -> dict[str, float]:
    """Straggler (ms), per-rank imbalance, MV, LIS and mean per-rank phase times of one
    sample. ``num_experts``: logical experts E (None: one per slot, no replicas)."""
    load = torch.tensor(sample["expert_load"], dtype=torch.float64)
    per_rank = torch.tensor(sample["tokens_per_rank"], dtype=torch.float64)
    E = num_experts or len(sample["expert_load"])
    routed = sample["tokens"] * topk
    return {
        "straggler_ms": float(straggler_ms(torch.tensor(sample["experts_ms"]))),
        "combine_wait_ms": float(combine_wait_ms(torch.tensor(sample["combine_ms"]))),
        "rank_imbalance": float(rank_imbalance(per_rank)) if per_rank.sum() > 0 else math.nan,
        "max_violation": float(metrics.max_violation(load)) if load.sum() > 0 else math.nan,
        # LIS (R&Q): the busiest slot's tokens over the mean logical expert's intended T k / E
        "lis": float(E * load.max() / routed) if routed else math.nan,
        **{f"{n}_ms": sum(sample[f"{n}_ms"]) / len(sample[f"{n}_ms"]) for n in RANGES},
    }


def _summary_of(samples: Sequence[dict], topk: int, num_experts: int | None = None) -> dict[str, Any]:
    figures = [_sample_figures(s, topk, num_experts) for s in samples]
    keys = ("straggler_ms", "rank_imbalance", "max_violation", "lis") + tuple(
        f"{n}_ms" for n in RANGES
    )
    routed = sum(s["tokens"] for s in samples) * topk
    ranks = max((len(s["experts_ms"]) for s in samples), default=0)
    out = {
        "samples": len(samples),
        **{
            k: (timing_stats if k in TIMING_FIGURES else _stats)([f[k] for f in figures])
            for k in keys
        },
        "combine_wait_ms": timing_stats([f["combine_wait_ms"] for f in figures]),
        # each EP rank's own phase times over the samples (EP groups pooled by EP rank)
        "ep_rank_ms": {
            f"{n}_ms": [
                timing_stats([s[f"{n}_ms"][r] for s in samples if r < len(s[f"{n}_ms"])])
                for r in range(ranks)
            ]
            for n in RANGES
        },
        "dropped_fraction": sum(s["dropped"] for s in samples) / routed if routed else 0.0,
        "tokens": sum(s["tokens"] for s in samples),
        "assignments": sum(s["assignments"] for s in samples),
    }
    padded = [s for s in samples if s.get("capacity")]
    if padded:  # every expert computes C rows per sending rank: the share holding a token
        out["capacity"] = _stats([float(s["capacity"]) for s in padded])
        out["buffer_fill"] = _stats([
            sum(s["expert_load"]) / (len(s["expert_load"]) * len(s["tokens_per_rank"]) * s["capacity"])
            for s in padded
        ])
    return out


def summarize(records: Sequence[dict], topk: int, num_experts: int | None = None) -> dict[str, Any]:
    """Statistics over the (step, layer) samples of ``records`` (``LayerStep`` dicts of all
    ranks, e.g. the concatenated result of ``gather_to_rank0``), overall and per phase.

    Returns {"all": S, "prefill": S, "decode": S, "per_layer": {layer: S}} where S has
    ``straggler_ms``, ``rank_imbalance``, ``max_violation`` (over the slots), ``lis`` (E x the
    busiest slot's tokens / (T k), E = ``num_experts`` logical experts, default one per slot),
    ``router_ms``, ``dispatch_ms``,
    ``experts_ms``, ``combine_ms`` (each {"p50", "p95", "mean", "max", "n"}; phase times are the
    mean over ranks of each sample), ``combine_wait_ms``; the timing figures (straggler, combine
    wait, phase times) also have "p5", "p25", "p75"; ``ep_rank_ms``: {"<phase>_ms": [per EP
    rank {"p5", ..., "p95", "mean", "max", "n"}]}, each rank's own phase times over the
    samples; ``dropped_fraction``, ``samples``, ``tokens``,
    ``assignments``; with a padded dispatch buffer (DeepSpeed) also ``capacity`` (C) and
    ``buffer_fill`` (tokens received / (E x EP x C): the share of the computed slots holding a
    token; each expert computes C slots per sending rank). Warm-up records should be left out
    before (``records()`` does).
    """
    samples = join_ranks(records)
    out: dict[str, Any] = {"all": _summary_of(samples, topk, num_experts)}
    for phase in PHASES:
        out[phase] = _summary_of([s for s in samples if s["phase"] == phase], topk, num_experts)
    layers = sorted({s["layer"] for s in samples})
    out["per_layer"] = {
        layer: _summary_of([s for s in samples if s["layer"] == layer], topk, num_experts)
        for layer in layers
    }
    return out
