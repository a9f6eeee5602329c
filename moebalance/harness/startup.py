"""What a run does at start-up, before any model work: pin each rank's model thread to its own
CPU core (``pin_to_core``, before the process group starts) and, once the process groups and
the model exist, let their helper threads use every core again (``release_helper_threads``);
right after the process group starts, check that every rank was started with the same options
(``agree_across_ranks``).

``agree_across_ranks`` all-gathers each rank's resolved options (one small collective): ranks
started with different arguments (a different ``--gen-len`` would deadlock at the first missing
collective; a different ``--batch`` with the allgather dispatcher aborts inside gloo) fail at
once, with the differing option named, instead of at the collective timeout.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Optional

import torch.distributed as dist

from ..config import ConfigError
from .config import Run

__all__ = ["pin_to_core", "release_helper_threads", "run_fingerprint", "agree_across_ranks"]


def pin_to_core(
    enabled: bool = True,
    *,
    local_rank: Optional[int] = None,
    local_world_size: Optional[int] = None,
) -> dict[str, Any]:
    """Pin the calling thread (the one that will run the model) to one CPU core: the
    ``local_rank``-th of the cores the process may use (``os.sched_getaffinity``), when the
    node's ``local_world_size`` ranks do not outnumber those cores. Each rank of a node then
    computes on a core of its own, so that its expert time is not another rank's. Threads the
    calling thread starts afterwards inherit the core; ``release_helper_threads`` lets the
    communication threads use every allowed core again. Defaults: LOCAL_RANK and
    LOCAL_WORLD_SIZE from torchrun's environment (0 and 1 without).

    Returns {"core": the core pinned to, or None, "allowed": the cores the process could use
    before (None where the platform cannot tell), "reason": why not pinned (None when
    pinned)}. Never raises for a core it cannot take: it reports why instead."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not (hasattr(os, "sched_getaffinity") and hasattr(os, "sched_setaffinity")):
        return {"core": None, "allowed": None,
                "reason": "CPU affinity is not available on this platform"}
    allowed = sorted(os.sched_getaffinity(0))
    if not enabled:
        return {"core": None, "allowed": allowed, "reason": "disabled (--no-pin)"}
    if local_world_size > len(allowed) or not 0 <= local_rank < local_world_size:
        return {"core": None, "allowed": allowed,
                "reason": f"{local_world_size} ranks on this node but {len(allowed)} core(s) "
                f"available"}
    core = allowed[local_rank]
    try:
        os.sched_setaffinity(0, {core})
    except OSError as err:
        return {"core": None, "allowed": allowed,
                "reason": f"sched_setaffinity failed: {err.strerror or err}"}
    return {"core": core, "allowed": allowed, "reason": None}


def release_helper_threads(pinning: dict[str, Any]) -> int:
    """After ``pin_to_core`` and the start-up that creates threads (process groups, the model
    build): give every other thread of the process (gloo's workers and transport, for
    instance) back all the cores it was allowed, so that it never queues behind the model's
    compute on the pinned core. Returns how many threads were released (0 when not pinned or
    not on Linux)."""
    if pinning.get("core") is None or not pinning.get("allowed"):
        return 0
    me = threading.get_native_id()
    try:
        tasks = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: threads cannot be listed
        return 0
    released = 0
    for tid in tasks:
        if tid == me:
            continue
        try:
            os.sched_setaffinity(tid, set(pinning["allowed"]))
            released += 1
        except OSError:  # the thread ended meanwhile
            pass
    return released


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
