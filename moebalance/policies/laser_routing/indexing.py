"""``pick``: elements of a 1-D tensor at integer indices, as the LASER assignments read them."""

from __future__ import annotations

import torch

__all__ = ["pick"]


def pick(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for 1-D ``values`` and an int64 ``index`` of any shape (the shape of
    the result). ``index_select`` on the flattened index: the same elements as
    ``values.take(index)``, cheaper on CPU, and traced by ``torch.compile`` (inductor cannot
    decompose ``take`` with data-dependent indices)."""
    return values.index_select(0, index.reshape(-1)).view(index.shape)
