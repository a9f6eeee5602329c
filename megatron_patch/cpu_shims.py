"""Shims that let Megatron-Core's MoELayer run on CPU with gloo (tests, laptops, CI).

Megatron-Core 0.19.2 assumes CUDA in a few places on the MoE path. ``apply_cpu_shims()`` patches
exactly those, and only when ``torch.cuda.is_available()`` is False: on a GPU machine it returns
without touching anything, so the same code runs with NCCL unchanged. Checked on
megatron-core 0.19.2.

Call it once per process, after importing torch and before building Megatron modules. It is
idempotent. Patches (each small, each undoing a CUDA assumption, not changing any arithmetic):

- ``torch.cuda.current_device`` returns the CPU device. Megatron allocates with
  ``device=torch.cuda.current_device()`` in ``Router.gating`` (moves the gate weight), the
  ``TopKRouter.__init__`` buffers (expert bias), the ``tensor_parallel.mappings`` helpers
  ``_gather_along_last_dim``, ``_gather_along_first_dim``, ``_reduce_scatter_along_first_dim``
  and ``_AllToAll.forward`` (all-gather, reduce-scatter, all-to-all outputs at EP > 1) and
  ``GlobalMemoryBuffer.get_tensor`` (the allgather dispatcher's buffer).
- ``MoEAlltoAllTokenDispatcher.cuda_dtoh_stream`` is set to a null stream so the constructor
  skips its class-level ``torch.cuda.Stream()``.
- ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` is replaced by a CPU version: the
  split metadata already lives on the host, so it only turns the splits into Python lists and
  ``num_out_tokens`` into an int, with no streams or events.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["apply_cpu_shims", "cpu_shims_applied"]

_APPLIED: tuple[str, ...] = ()


class _NullStream:
    """Stands in for the dispatcher's class-level ``torch.cuda.Stream()`` on CPU.

    Never used for work: the CPU ``_maybe_dtoh_and_synchronize`` below does not touch streams.
    """

    def __repr__(self) -> str:
        return "_NullStream()"


def _cpu_current_device() -> torch.device:
    # Megatron passes this as ``device=`` (Router.gating, tensor_parallel.mappings, buffers).
    return torch.device("cpu")


def _to_host_list(value):
    """Split sizes as a Python list (what ``all_to_all_single`` wants); None stays None."""
    if torch.is_tensor(value):
        return value.tolist()
    return value


def _cpu_maybe_dtoh_and_synchronize(
    self, point: str, tokens_per_expert: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """CPU version of ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize``.

    On CPU the metadata is already on the host and nothing runs asynchronously, so the "DtoH
    copy" at ``cuda_dtoh_point`` reduces to converting splits to lists and ``num_out_tokens``
    to an int (the CUDA version yields numpy arrays and a host tensor), and there is no sync.
    """
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        self.input_splits = _to_host_list(self.input_splits)
        self.output_splits = _to_host_list(self.output_splits)
        self.output_splits_tp = _to_host_list(self.output_splits_tp)
        if torch.is_tensor(self.num_out_tokens):
            self.num_out_tokens = int(self.num_out_tokens)
    return tokens_per_expert


def cpu_shims_applied() -> tuple[str, ...]:
    """Names of the patches in force in this process (empty when none were applied)."""
    return _APPLIED


def apply_cpu_shims() -> tuple[str, ...]:
    """Patch Megatron-Core's CUDA assumptions for a CPU (gloo) run; no-op when CUDA is available.

    Idempotent. Returns the names of the patches in force (empty on a CUDA machine).
    """
    global _APPLIED
    if torch.cuda.is_available() or _APPLIED:
        return _APPLIED

    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    torch.cuda.current_device = _cpu_current_device
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NullStream()
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _cpu_maybe_dtoh_and_synchronize
    _APPLIED = (
        "torch.cuda.current_device",
        "MoEAlltoAllTokenDispatcher.cuda_dtoh_stream",
        "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
    )
    return _APPLIED
