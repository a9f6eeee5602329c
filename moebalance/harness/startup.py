"""Checks a run makes once its process group is up, before any model work: every rank was
started with the same options, and the run fits in memory.

``agree_across_ranks`` all-gathers each rank's resolved options (one small collective): ranks
started with different arguments (a different ``--gen-len`` would deadlock at the first missing
collective; a different ``--batch`` with the allgather dispatcher aborts inside gloo) fail at
once, with the differing option named, instead of at the collective timeout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist

from ..config import ConfigError
from .config import Run

__all__ = ["run_fingerprint", "agree_across_ranks"]


def run_fingerprint(run: Run) -> dict[str, Any]:
    """What every rank must agree on: the run's options (output path excluded: only rank 0
    writes), the model config, the routers and the EP size, as plain values."""
    options = dataclasses.asdict(run.config)
    options.pop("out", None)
    return {
        **{f"--{k.replace('_', '-')}": v for k, v in options.items()},
        **{f"model {k}": v for k, v in dataclasses.asdict(run.model).items()},
        "routers": list(run.routers),
        "EP size": run.ep,
    }


def agree_across_ranks(run: Run) -> None:
    """ConfigError naming the first option on which a rank differs from rank 0. Collective:
    every rank calls it once, right after the process group starts; a no-op without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = run_fingerprint(run)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    reference = every[0]
    for rank, other in enumerate(every[1:], start=1):
        for key in reference:
            if other.get(key) != reference.get(key):
                raise ConfigError(
                    f"ranks were started with different options: {key} is "
                    f"{_short(reference.get(key))} on rank 0 but {_short(other.get(key))} on rank "
                    f"{rank}; start every rank with the same arguments"
                )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
