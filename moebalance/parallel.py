"""Where a process sits in an expert-parallel job, and the framework-free part of starting and
stopping its process group (torch.distributed only).

Each adapter's ``init_distributed(ep_size, timeout_s) -> ParallelSetup`` is these steps plus
its framework's own groups: ``torchrun_environment`` (a plain ``python`` run is a world of one
with a free port), ``check_ep_size``, ``select_device`` (one GPU per local rank with NCCL, else
the CPU with gloo), the framework's process-group start, ``ParallelSetup``; and
``destroy_distributed`` is ``destroy_process_group`` with the framework's teardown.

``default_group_timeout`` makes every process group created later without an explicit timeout
(DeepSpeed's expert-parallel groups: ``torch.distributed.new_group(ranks)``) time out like the
default group; otherwise such groups keep torch's 30-minute default and a frozen rank hangs
the job for half an hour whatever ``--timeout`` says.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from .config import ConfigError

__all__ = [
    "ParallelSetup",
    "RendezvousError",
    "rendezvous",
    "torchrun_environment",
    "free_port",
    "check_ep_size",
    "select_device",
    "default_group_timeout",
    "destroy_process_group",
]

DEFAULT_MASTER_PORT = "29500"  # torchrun's default, for a multi-process world without one


@dataclass(frozen=True)
class ParallelSetup:
    """Where this process sits.

    Attributes:
        rank, world_size: global rank and number of processes.
        local_rank: rank on this node (picks the GPU).
        ep_size, ep_rank: size of this rank's expert-parallel group and its rank in it; EP
            groups are consecutive global ranks, expert e on EP rank e // (E / ep_size).
        ep_group: first global rank of the EP group (an id, the same on every member).
        device: where this rank's model lives.
        backend: the process group's backend ("nccl", "gloo").
    """

    rank: int
    world_size: int
    local_rank: int
    ep_size: int
    ep_rank: int
    ep_group: int
    device: torch.device
    backend: str


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment, filling in what a plain
    ``python`` run lacks: RANK=0 and WORLD_SIZE=1 (both or neither must be set), LOCAL_RANK =
    RANK, MASTER_ADDR=127.0.0.1, and MASTER_PORT a free port for a world of one (so parallel
    single-process runs do not collide) or 29500 otherwise. Frameworks that discover their
    world otherwise (DeepSpeed's MPI discovery) then see a complete environment."""
    env = os.environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        env.update(RANK="0", WORLD_SIZE="1")
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in env]
    if missing:
        raise RuntimeError(f"set {' and '.join(missing)} (both or neither) before starting")
    env.setdefault("LOCAL_RANK", env["RANK"])
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(free_port()) if env["WORLD_SIZE"] == "1" else DEFAULT_MASTER_PORT
    return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


def check_ep_size(ep_size: Optional[int], world_size: int) -> int:
    """The EP size to use (None: the world size); ConfigError unless it divides the world."""
    ep_size = world_size if ep_size is None else ep_size
    if ep_size < 1 or world_size % ep_size:
        raise ConfigError(f"ep={ep_size} must be >= 1 and divide the world size {world_size}")
    return ep_size


def select_device(local_rank: int) -> tuple[torch.device, str]:
    """(device, backend): CUDA device ``local_rank`` (made current) with NCCL when CUDA is
    available, else the CPU with gloo. Call before the process group starts."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    return torch.device("cpu"), "gloo"


def default_group_timeout(timeout_s: float) -> datetime.timedelta:
    """Make ``timeout_s`` the timeout of every process group created from now on without one
    (``torch.distributed.new_group(ranks)``, as DeepSpeed's EP groups are), for every backend;
    returns it as a timedelta. torch reads these module defaults when a group is created, so
    call it before the framework creates its groups."""
    from torch.distributed import distributed_c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


class RendezvousError(RuntimeError):
    """The process group did not start: a rank never joined (or this one could not reach the
    master) within the timeout. The message is one line."""


@contextlib.contextmanager
def rendezvous(timeout_s: float) -> Iterator[None]:
    """Around a process-group start: torch's rendezvous failures (a rank that never started,
    an unreachable or mismatched MASTER_ADDR / MASTER_PORT) become one ``RendezvousError`` line
    naming the world, the address and the timeout."""
    try:
        yield
    except dist.DistError as err:
        env = os.environ
        detail = " ".join(str(err).split())
        raise RendezvousError(
            f"the process group of {env.get('WORLD_SIZE')} ranks at "
            f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} did not start within "
            f"--timeout {timeout_s:g} s ({detail[:200]}); start every rank, with the same "
            "MASTER_ADDR, MASTER_PORT and WORLD_SIZE"
        ) from err


def destroy_process_group(teardown: Optional[Callable[[], None]] = None) -> None:
    """Barrier, the framework's ``teardown`` (its own groups), then destroy the default process
    group. Does nothing when no process group is up."""
    if dist.is_initialized():
        dist.barrier()
        if teardown is not None:
            teardown()
        dist.destroy_process_group()
