"""The fixed tie noise of LASER's assignments: the same Gumbel draws on every call and device."""

from __future__ import annotations

import threading

import torch

__all__ = ["TIE_SEED", "REPAIR_SEED", "fixed_noise"]

TIE_SEED = 0x1A5E  # the pricing passes' tie noise
REPAIR_SEED = 0x5EED  # the repair rounds' choices
_NOISE: dict[tuple, torch.Tensor] = {}
_NOISE_LOCK = threading.Lock()


def fixed_noise(rows: int, cols: int, device: torch.device, seed: int) -> torch.Tensor:
    """[rows, cols] fixed negated Gumbel draws shifted to be positive (in [0.3, 31.4]).

    Drawn on the CPU from ``seed`` in row-major order and moved to ``device``: the same values
    on every device, and row t is the same whatever ``rows`` a call asks for (a table grown on
    demand and sliced), so batches of different sizes share one table per (cols, device).
    Under ``torch.compile`` the lookup is an opaque op (``moebalance::fixed_noise``, a copy of
    the rows): tracing never meets the table's lock or generator, whether or not an eager
    call drew the table first.
    """
    if torch.compiler.is_compiling():
        return _noise_op(rows, cols, seed, device)
    return _table(rows, cols, device, seed)[:rows]


def _table(rows: int, cols: int, device: torch.device, seed: int) -> torch.Tensor:
    """The cached table of at least ``rows`` rows for (seed, cols, device)."""
    key = (seed, cols, str(device))
    table = _NOISE.get(key)
    if table is None or table.shape[0] < rows:
        with _NOISE_LOCK:
            table = _NOISE.get(key)
            if table is None or table.shape[0] < rows:
                n = max(rows, 1024, 2 * (0 if table is None else table.shape[0]))
                gen = torch.Generator().manual_seed(seed)
                # a normal tensor even when first drawn inside inference mode (the policies
                # run their assignment there), so later callers outside it can use it
                with torch.inference_mode(False):
                    u = torch.rand((n, cols), generator=gen, dtype=torch.float64)
                    u = u.clamp(1e-12, 1 - 1e-12)
                    # log(-log u) lies in [-27.7, 3.4]: shifted to be positive, so that keys
                    # (non-negative prices + noise) can use the int32 view of the floats
                    table = (torch.log(-torch.log(u)) + 28.0).float().to(device)
                _NOISE[key] = table
    return table


@torch.library.custom_op("moebalance::fixed_noise", mutates_args=())
def _noise_op(rows: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    # a copy: a compiled graph owns its outputs (it may reuse their buffers)
    return _table(rows, cols, device, seed)[:rows].clone()


@_noise_op.register_fake
def _(rows, cols, seed, device):
    return torch.empty((rows, cols), dtype=torch.float32, device=device)
