"""PNG plots of a sweep's summary rows (``moebalance.harness.sweep.summary_rows``), matplotlib
with the Agg backend (no display needed). One set of plots per group of rows that share
framework, model and batch shape:

- ``<group>_load_per_layer.png``: prefill max/mean expert load (EP-global, p50 over steps) per
  MoE layer, one line per router, one panel per EP size;
- ``<group>_straggler_per_layer.png``: prefill straggler time (ms, p50) per layer, the same way;
- ``<group>_latency_vs_ep.png``: prefill latency (ms) and decode latency (ms per token) against
  the number of processes, one line per router;
- ``<group>_quality_vs_imbalance.png``: held-out perplexity change against vanilla top-k
  (%) over prefill rank imbalance (max/mean tokens per rank), one marker per run: each
  router's trade-off across its parameters and EP sizes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

__all__ = ["write_plots"]


def _group_name(row: dict) -> str:
    name = f"{row['framework']}_{row['model']}_b{row['batch']}x{row['prompt_len']}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _series_name(row: dict) -> str:
    """The router as the grid labels it (router and parameters)."""
    return row.get("router_label") or row["router"]


def write_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Write the plots of ``rows`` under ``out_dir``; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group_name(row), []).append(row)
    written = []
    for group, members in sorted(groups.items()):
        eps = sorted({r["nproc"] for r in members})
        series = sorted({_series_name(r) for r in members})
        for key, ylabel, stem in (
            ("max_mean_load_p50", "max / mean expert load (prefill, p50)", "load_per_layer"),
            ("straggler_ms_p50", "straggler (ms, prefill, p50)", "straggler_per_layer"),
        ):
            fig, axes = plt.subplots(1, len(eps), figsize=(4.2 * len(eps), 3.4), squeeze=False,
                                     sharey=True)
            for ax, ep in zip(axes[0], eps):
                for name in series:
                    for r in (r for r in members if r["nproc"] == ep and _series_name(r) == name):
                        layers = sorted(r["per_layer"])
                        ax.plot(layers, [r["per_layer"][l][key] for l in layers], marker="o",
                                label=name)
                ax.set_title(f"{ep} process{'es' if ep > 1 else ''}")
                ax.set_xlabel("MoE layer")
                ax.grid(alpha=0.3)
            axes[0][0].set_ylabel(ylabel)
            _legend(fig, axes[0][0])
            fig.suptitle(group, fontsize=9)
            written.append(_save(fig, out_dir / f"{group}_{stem}.png", plt))

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for name in series:
            points = sorted((r["nproc"], r["prefill_ms"], r["decode_ms_per_token"])
                            for r in members if _series_name(r) == name)
            axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            axes[1].plot([p[0] for p in points], [p[2] for p in points], marker="o", label=name)
        for ax, title in zip(axes, ("prefill latency (ms)", "decode latency (ms / token)")):
            ax.set_xlabel("processes (EP size)")
            ax.set_xticks(eps)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        _legend(fig, axes[0])
        fig.suptitle(group, fontsize=9)
        written.append(_save(fig, out_dir / f"{group}_latency_vs_ep.png", plt))

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for router in sorted({r["router"] for r in members}):
            points = [(r["rank_imbalance_p50"], 100 * r["perplexity_change"], r) for r in members
                      if r["router"] == router and not math.isnan(r["perplexity_change"])]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], label=router)
                for x, y, r in points:
                    ax.annotate(f"{r['nproc']}p", (x, y), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xlabel("rank imbalance (max / mean tokens per rank, prefill p50)")
        ax.set_ylabel("perplexity change vs top-k (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
        ax.set_title(group, fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out_dir / f"{group}_quality_vs_imbalance.png", plt))
    return written


def _legend(fig, ax) -> None:
    """One legend for the figure, below the panels."""
    handles, labels = ax.get_legend_handles_labels()
    if not labels:
        fig.tight_layout()
        return
    fig.tight_layout(rect=(0, 0.08 + 0.035 * ((len(labels) + 2) // 3), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=7,
               frameon=False)


def _save(fig, path: Path, plt) -> Path:
    """Write atomically: a temporary file beside ``path``, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
