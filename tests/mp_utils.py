"""Multi-process test helpers: run a function on N spawned ranks with a deadline.

``run_workers(fn, world_size, *args)`` starts ``world_size`` processes (spawn), each calling
``fn(rank, world_size, *args)`` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
set (a free port), and returns the list of per-rank return values. If any rank raises or dies,
the others are terminated and the error (with that rank's traceback) is raised in the caller;
if the deadline passes, all ranks are killed and TimeoutError is raised. Nothing hangs.

``fn`` must be importable by the children (a module-level function of an importable module)
and return something picklable; plain Python values (floats, lists, dicts) are safest.
Inside ``fn``, ``init_gloo()`` starts the default process group with a collective timeout.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["free_port", "run_workers", "init_gloo", "WorkerError"]

COLLECTIVE_TIMEOUT_S = 90


class WorkerError(RuntimeError):
    """A spawned rank raised or exited abnormally; the message holds its traceback."""


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    """Initialise the default gloo process group from the environment run_workers sets."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        value = fn(rank, world_size, *args)
    except BaseException:  # report everything, including SystemExit/KeyboardInterrupt
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    results.put((rank, True, value))


def run_workers(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes.

    Returns the per-rank results in rank order. Raises WorkerError (first failing rank's
    traceback) or TimeoutError (after ``timeout_s`` seconds); survivors are terminated.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(rank, world_size, port, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [
                    (r, p.exitcode)
                    for r, p in enumerate(procs)
                    if r not in values and p.exitcode is not None
                ]
                if dead:
                    # give a just-failed rank's report a moment to arrive through the queue
                    try:
                        rank, ok, value = results.get(timeout=2.0)
                    except queue.Empty:
                        r, code = dead[0]
                        raise WorkerError(f"rank {r} of {world_size} exited with code {code}")
                elif time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{fn.__name__} on {world_size} ranks did not finish in {timeout_s:.0f} s; "
                        f"ranks still running: {sorted(set(range(world_size)) - set(values))}"
                    )
                else:
                    continue
            if not ok:
                raise WorkerError(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10.0 if len(values) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        results.close()
    return [values[r] for r in range(world_size)]
