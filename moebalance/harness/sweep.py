"""Sweeps: a grid of ``scripts/infer.py`` runs, their results collected into one summary.

A grid file (YAML; ``moebalance/configs/grids/sweep*.yaml``) names the runs::

    base: {gen_len: 4, warmup: 1, eval_seqs: 2}      # RunConfig fields every run shares
    axes:                                            # one run per combination, in this order
      nproc: [1, 2, 4]                               # processes per run (EP = world size)
      model: [tiny-moe]                              # a scalar sets the field the axis names
      shape: [{batch: 8, prompt_len: 64}]            # a mapping sets several fields together
      router:
        - {label: topk, router: topk}                # ``label`` names the entry in tables
        - {label: xdrop g=1.5, router: expanded_drop, router_args: {capacity_factor: 1.5}}

Every axis is a list; an entry is a scalar for the field the axis is named after, or a mapping
of ``moebalance.harness.config.RunConfig`` fields (plus an optional ``label``; null values
leave a field at its default). ``nproc`` is the number of processes of the run's torchrun (not a
RunConfig field; default 1). Each cell is validated with ``resolve`` before anything runs, and
written as a run file that ``infer.py --run-config`` reads, so a run can be repeated by hand.

Each cell's id is readable (its labels) plus a hash of its fields: a rerun with the same cell
finds its finished JSON and skips it (resume), whatever else changed in the grid.

``summary_rows`` turns the runs' JSON reports into one row per (run, router): prefill figures
(p50 over (step, layer) samples: rank imbalance, max/mean expert load, LIS, straggler and
expert time in ms), per-layer max/mean expert load and straggler, end-to-end latency and
throughput, held-out perplexity and its change against the vanilla top-k row of the same
cell (same axes, router topk) when the grid has one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import ConfigError, read_yaml_mapping
from ..telemetry_stats import summarize
from .config import VANILLA, RunConfig, load_run_config, resolve

__all__ = ["Cell", "load_grid", "summary_rows", "CSV_COLUMNS"]

NPROC = "nproc"
_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
_NOT_IN_GRID = ("out", "overwrite")  # the sweep owns where results go


@dataclass(frozen=True)
class Cell:
    """One run of the grid: ``fields`` (RunConfig fields set, router_args included), ``nproc``
    processes, ``labels`` (one per axis with more than one entry), the run's ``id`` and ``router_label`` (the label of
    the axis entry that set the router, for tables and plot legends)."""

    fields: dict
    nproc: int
    labels: tuple[str, ...]
    id: str
    router_label: str = ""
    router: str = ""

    @property
    def label(self) -> str:
        return " · ".join(self.labels)

    def config(self, base: RunConfig) -> RunConfig:
        return dataclasses.replace(base, **self.fields)


def _entry(axis: str, value: Any, where: str) -> tuple[dict, str]:
    """(fields, label) of one axis entry."""
    if isinstance(value, dict):
        fields = {k: v for k, v in value.items() if k != "label"}
        label = value.get("label")
        if label is None:
            label = ",".join(f"{k}={v}" for k, v in fields.items())
        return fields, str(label)
    if isinstance(value, list):
        raise ConfigError(f"{where}: axis {axis!r}: an entry must be a scalar or a mapping, got a list")
    if axis == "label":
        raise ConfigError(f"{where}: 'label' is not an axis")
    return {axis: value}, str(value) if isinstance(value, str) else f"{axis}={value}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")[:80]


def load_grid(path: str | Path) -> tuple[RunConfig, list[Cell]]:
    """(base RunConfig, cells) of a grid file, every cell validated (ConfigError, one line,
    naming the grid file and the field, before any run)."""
    where = f"grid {path}"
    data = read_yaml_mapping(path, "grid")
    unknown = sorted(set(data) - {"base", "run_config", "axes"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: base, run_config, axes")
    base = load_run_config(data["run_config"]) if data.get("run_config") else RunConfig()
    base_fields = data.get("base") or {}
    if not isinstance(base_fields, dict):
        raise ConfigError(f"{where}: 'base' must be a mapping of RunConfig fields")
    axes = data.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{where}: 'axes' must be a non-empty mapping {{axis: [entries]}}")
    entries = []
    for axis, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: axis {axis!r} must be a non-empty list")
        entries.append([_entry(str(axis), v, where) for v in values])
    cells, ids = [], set()
    for combo in itertools.product(*entries):
        fields = dict(base_fields)
        for part, _ in combo:
            fields.update(part)
        nproc = fields.pop(NPROC, 1)
        bad = sorted(set(fields) - _FIELDS) + [k for k in _NOT_IN_GRID if k in fields]
        if bad:
            raise ConfigError(
                f"{where}: unknown or reserved field(s) {bad}; allowed: {NPROC} and "
                f"{sorted(_FIELDS - set(_NOT_IN_GRID))}"
            )
        if type(nproc) is not int or nproc < 1:
            raise ConfigError(f"{where}: {NPROC} must be an integer >= 1, got {nproc!r}")
        fields = {k: v for k, v in fields.items() if v is not None}
        if not isinstance(fields.get("router_args", {}), dict):
            raise ConfigError(f"{where}: router_args must be a mapping")
        # axes with one entry are the same for every run: left out of the labels
        labels = tuple(label for (_, label), axis in zip(combo, entries) if len(axis) > 1)
        labels = labels or ("run",)
        router = str(fields.get("router", base.router))
        router_label = next((label for part, label in combo if "router" in part), router)
        digest = hashlib.sha1(
            json.dumps([fields, nproc], sort_keys=True, default=str).encode()
        ).hexdigest()[:8]
        cell = Cell(fields, nproc, labels, f"{_slug('_'.join(labels))}-{digest}", router_label,
                    router)
        try:
            resolve(cell.config(base), world_size=nproc, local_world_size=nproc)
        except ConfigError as err:
            raise ConfigError(f"{where}: run {cell.label!r}: {err}") from None
        except TypeError as err:  # a RunConfig field given the wrong shape
            raise ConfigError(f"{where}: run {cell.label!r}: {err}") from None
        if cell.id in ids:
            raise ConfigError(f"{where}: run {cell.label!r} appears twice")
        ids.add(cell.id)
        cells.append(cell)
    return base, cells


# ---------------------------------------------------------------------------------------------
# summary

CSV_COLUMNS = (
    "id", "label", "nproc", "ep", "framework", "model", "batch", "prompt_len", "router",
    "router_label", "router_args", "replicas", "rank_imbalance_p50", "max_mean_load_p50", "lis_p50",
    "straggler_ms_p50", "straggler_ms_p95", "experts_ms_p50", "dropped_fraction",
    "prefill_ms", "decode_ms_per_token", "tokens_per_s", "peak_memory_mib", "perplexity",
    "perplexity_change",
)


def _figure(stats: dict, key: str, q: str = "p50") -> float:
    value = stats.get(key, {}).get(q, math.nan)
    return math.nan if value is None else float(value)


def _row(cell: Cell, report: dict, run: dict) -> dict:
    config = report["config"]
    records = [r for r in run["records"] if r["phase"] == "prefill"]
    topk = config["model"]["topk"]
    num_experts = config["model"]["num_experts"]
    prefill = summarize(records, topk, num_experts) if records else {"all": {}, "per_layer": {}}
    stats = prefill["all"]
    end = run.get("end_to_end", {})
    quality = (run.get("quality") or {}).get("all") or {}
    env = report.get("environment", {})
    run_cfg = config.get("run", {})
    replicas = run_cfg.get("placement") or run_cfg.get("replicate")
    return {
        "id": cell.id,
        "label": cell.label,
        "nproc": cell.nproc,
        "ep": env.get("ep_size", cell.nproc),
        "framework": config.get("framework"),
        "model": config["model"]["name"],
        "batch": run_cfg.get("batch"),
        "prompt_len": run_cfg.get("prompt_len"),
        "router": run["router"],
        # a compare run's vanilla half is top-k whatever the cell's router label says
        "router_label": cell.router_label if run["router"] == cell.router else run["router"],
        "router_args": json.dumps(run.get("router_params") or {}, sort_keys=True),
        "replicas": bool(replicas),
        "rank_imbalance_p50": _figure(stats, "rank_imbalance"),
        "max_mean_load_p50": _figure(stats, "max_violation") + 1,
        "lis_p50": _figure(stats, "lis"),
        "straggler_ms_p50": _figure(stats, "straggler_ms"),
        "straggler_ms_p95": _figure(stats, "straggler_ms", "p95"),
        "experts_ms_p50": _figure(stats, "experts_ms"),
        "dropped_fraction": float(stats.get("dropped_fraction", math.nan)),
        "prefill_ms": float(end.get("prefill_ms", math.nan)),
        "decode_ms_per_token": float(end.get("decode_ms_per_token", math.nan)),
        "tokens_per_s": float(end.get("tokens_per_s", math.nan)),
        "peak_memory_mib": float(end.get("peak_memory_mib", math.nan)),
        "perplexity": float(quality.get("perplexity", math.nan)),
        "perplexity_change": math.nan,
        "per_layer": {
            int(layer): {
                "max_mean_load_p50": _figure(s, "max_violation") + 1,
                "straggler_ms_p50": _figure(s, "straggler_ms"),
            }
            for layer, s in prefill["per_layer"].items()
        },
    }


def _vanilla_key(cell: Cell) -> str:
    """The cell's fields without its router: rows sharing it differ only in the routing."""
    fields = {k: v for k, v in cell.fields.items() if k not in ("router", "router_args", "compare")}
    return json.dumps([fields, cell.nproc], sort_keys=True, default=str)


def summary_rows(results: list[tuple[Cell, dict]]) -> list[dict]:
    """One row per (cell, router run) of the finished cells' reports (a ``compare`` run gives
    two), with ``perplexity_change`` against vanilla top-k of the same cell or of the cell that
    differs only in its router."""
    rows, vanilla = [], {}
    for cell, report in results:
        for run in report["runs"]:
            row = _row(cell, report, run)
            rows.append((cell, row))
            if run["router"] == VANILLA:
                vanilla.setdefault(_vanilla_key(cell), row["perplexity"])
    for cell, row in rows:
        base: Optional[float] = vanilla.get(_vanilla_key(cell))
        if base and not math.isnan(base) and not math.isnan(row["perplexity"]):
            row["perplexity_change"] = row["perplexity"] / base - 1
    return [row for _, row in rows]
