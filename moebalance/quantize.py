"""Int8 weight-only experts for Replicate-and-Quantize: quantization, on-the-fly dequantization,
byte counts from the real tensors, Wanda-style expert importance and the memory-budget plan.

Quantization is symmetric per output channel (LLM.int8's weight format without its outlier
split): row i of a weight ``w [out, in]`` is stored as ``q [out, in]`` int8 in -127..127 and one
``scale [out]`` float32 = max_j |w[i, j]| / 127, and read back as ``q * scale``. Rounding to the
nearest step bounds the error elementwise: |w - q * scale| <= scale / 2 (up to float32 rounding
of the product, relative 2^-24 of the row's largest magnitude).

``Int8Weight`` puts that format under a module parameter: at rest the module holds the int8
tensor and the scales (non-persistent buffers ``<name>_int8`` / ``<name>_scale``, so ``.to()``
moves them) and the parameter is an empty tensor; a forward pre-hook sets the parameter's data
to the dequantized weight, a forward hook frees it again. Only device-side tensor ops: no host
synchronisation, the same code on CPU and CUDA. Inference only: the freed weight cannot serve
a backward pass, and ``state_dict`` holds the empty parameter (save the full-precision model).

Memory: ``module_weight_bytes`` counts the tensors a module holds at rest; ``int8_plan_for_budget``
picks, per MoE layer, the slots stored int8 (``moebalance.placement.choose_int8``) so that every
EP rank's expert bytes with replicas stay within the unreplicated model's.

Importance (which experts to quantize first): Wanda's |W| * ||X|| summed over the expert's
first-layer weights (``expert_importance``), ``||X||`` the per-input-feature L2 norm of the
calibration activations the expert receives (``input_norms``); without activations all norms are
1 (weight magnitude only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .config import ConfigError
from .placement import Placement, choose_int8

__all__ = [
    "INT8_MAX",
    "EXPERT_WEIGHTS",
    "quantize_int8",
    "dequantize_int8",
    "Int8Weight",
    "quantize_weights",
    "int8_weights",
    "module_weight_bytes",
    "int8_weight_bytes",
    "quantize_expert_slots",
    "expert_bytes",
    "input_norms",
    "expert_importance",
    "int8_plan_for_budget",
]

INT8_MAX = 127  # symmetric range -127..127 (-128 unused, as LLM.int8)
#: the expert MLP weights stored int8 (Megatron's and the DeepSpeed model's names alike)
EXPERT_WEIGHTS = ("linear_fc1.weight", "linear_fc2.weight")

_REGISTRY = "_int8_weights"  # module attribute: {parameter name: Int8Weight}


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w [out, in] float -> (q [out, in] int8, scale [out]
    float32), scale = max|row| / 127 (0 for an all-zero row, whose q is 0). Computed in float32
    on w's device. ValueError for a non-2-D or non-finite w."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int8: w must be a 2-D float tensor [out, in], got "
                         f"{w.dtype} {list(w.shape)}")
    w = w.detach().float()
    if not torch.isfinite(w).all():
        raise ValueError("quantize_int8: w has non-finite values")
    scale = w.abs().amax(dim=1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: 0 / 1 = 0
    q = torch.round(w / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """q [out, in] int8, scale [out] float32 -> q * scale [out, in] in ``dtype`` (the product in
    float32, then cast)."""
    return (q.float() * scale[:, None]).to(dtype)


class Int8Weight:
    """Stores ``module.<name>`` (a 2-D parameter) as int8 + scales and materialises it around
    the module's forward only.

    On attach: the weight is quantized (``quantize_int8``), kept as non-persistent buffers
    ``<name>_int8 [out, in]`` int8 and ``<name>_scale [out]`` float32, and the parameter's data
    becomes an empty tensor (same dtype and device). A forward pre-hook (run first) sets the
    parameter's data to ``dequantize_int8(...)`` in the parameter's dtype on the buffers'
    device; a forward hook (run last, also when the forward raises) frees it again. ``detach``
    removes the hooks and leaves the dequantized weight in the parameter, as a plain module.
    """

    def __init__(self, module: nn.Module, name: str = "weight") -> None:
        registry = module.__dict__.setdefault(_REGISTRY, {})
        if name in registry:
            raise ValueError(f"Int8Weight: {type(module).__name__}.{name} is already int8")
        param = getattr(module, name, None)
        if not isinstance(param, nn.Parameter) or param.dim() != 2:
            raise ValueError(f"Int8Weight: {type(module).__name__}.{name} must be a 2-D "
                             f"parameter, got {type(param).__name__} "
                             f"{list(getattr(param, 'shape', []))}")
        self.module, self.name = module, name
        self.dtype, self.shape = param.dtype, tuple(param.shape)
        with torch.no_grad():
            q, scale = quantize_int8(param)
        module.register_buffer(f"{name}_int8", q, persistent=False)
        module.register_buffer(f"{name}_scale", scale, persistent=False)
        self._free()
        self._handles = (
            module.register_forward_pre_hook(self._materialise, prepend=True),
            module.register_forward_hook(self._release, always_call=True),
        )
        registry[name] = self

    @property
    def q(self) -> torch.Tensor:
        return getattr(self.module, f"{self.name}_int8")

    @property
    def scale(self) -> torch.Tensor:
        return getattr(self.module, f"{self.name}_scale")

    def dequantized(self) -> torch.Tensor:
        """The weight the forward sees [out, in], in the parameter's dtype."""
        return dequantize_int8(self.q, self.scale, self.dtype)

    def _param(self) -> nn.Parameter:
        return getattr(self.module, self.name)

    def _free(self) -> None:
        param = self._param()
        param.data = torch.empty(0, dtype=self.dtype, device=self.q.device)

    def _materialise(self, module: nn.Module, args: Any) -> None:
        self._param().data = self.dequantized()

    def _release(self, module: nn.Module, args: Any, output: Any) -> None:
        self._free()

    def detach(self) -> None:
        """Remove the hooks and the int8 buffers; the parameter keeps the dequantized weight."""
        for handle in self._handles:
            handle.remove()
        self._param().data = self.dequantized()
        delattr(self.module, f"{self.name}_int8")
        delattr(self.module, f"{self.name}_scale")
        del self.module.__dict__[_REGISTRY][self.name]


def quantize_weights(module: nn.Module, names: Iterable[str] = EXPERT_WEIGHTS) -> list[Int8Weight]:
    """Attach ``Int8Weight`` to each dotted parameter name under ``module`` (default: an expert
    MLP's ``linear_fc1.weight`` and ``linear_fc2.weight``); the hooks go on the submodule that
    owns the parameter, so one weight at a time is materialised. Returns the attachments."""
    out = []
    for dotted in names:
        owner, _, name = dotted.rpartition(".")
        out.append(Int8Weight(module.get_submodule(owner) if owner else module, name))
    return out


def int8_weights(module: nn.Module) -> list[Int8Weight]:
    """Every ``Int8Weight`` attached under ``module`` (itself included)."""
    return [w for m in module.modules() for w in m.__dict__.get(_REGISTRY, {}).values()]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def module_weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights ``module`` holds at rest, from the real tensors: every parameter
    (a quantized one is empty at rest: 0) plus the int8 tensor and scales of every
    ``Int8Weight`` under it. Shared parameters count once."""
    total = sum(_bytes(p) for p in module.parameters())
    return total + sum(_bytes(w.q) + _bytes(w.scale) for w in int8_weights(module))


def int8_weight_bytes(module: nn.Module, names: Iterable[str] = EXPERT_WEIGHTS) -> int:
    """What ``module_weight_bytes`` will count once ``quantize_weights(module, names)`` is
    applied, from the parameters' shapes (nothing is quantized): each named [out, in] weight
    becomes out * in int8 bytes + out float32 scales (one already int8 is counted as it is);
    other parameters are unchanged."""
    named = {n: p for n, p in module.named_parameters()}
    total = module_weight_bytes(module)
    for dotted in names:
        owner, _, name = dotted.rpartition(".")
        if name in (module.get_submodule(owner) if owner else module).__dict__.get(_REGISTRY, {}):
            continue
        p = named[dotted]
        out = p.shape[0]
        total += p.numel() * 1 + out * 4 - _bytes(p)
    return total


def quantize_expert_slots(experts: Mapping[int, Mapping[int, nn.Module]],
                          int8_slots: Mapping[int, Any], num_slots: int,
                          names: Iterable[str] = EXPERT_WEIGHTS) -> int:
    """Store this rank's slots marked True int8 (``quantize_weights(module, names)``).

    experts: {0-based MoE layer: {global slot: expert module}} for this rank's local slots (the
    adapters' ``expert_modules``); int8_slots: {MoE layer: [P] bool} over all P = ``num_slots``
    slots of the layer (layers left out: none int8). ConfigError (one line) for a layer that is
    not a MoE layer or a mask of another shape. Returns the number of modules quantized here.
    """
    unknown = sorted(set(int8_slots) - set(experts))
    if unknown:
        raise ConfigError(f"int8_slots names layers {unknown} that are not MoE layers "
                          f"{sorted(experts)}")
    count = 0
    for layer, mask in sorted(int8_slots.items()):
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or list(mask.shape) != [num_slots]:
            raise ConfigError(f"int8_slots[{layer}] must be a bool tensor of shape "
                              f"[{num_slots}] (one flag per slot), got {mask.dtype} "
                              f"{list(mask.shape)}")
        flags = mask.tolist()
        for slot, module in sorted(experts[layer].items()):
            if flags[slot]:
                quantize_weights(module, names)
                count += 1
    return count


def expert_bytes(experts: Mapping[int, Mapping[int, nn.Module]]) -> int:
    """Bytes of expert weights at rest over {layer: {slot: expert module}} (this rank's), from
    the real tensors (``module_weight_bytes``)."""
    return sum(module_weight_bytes(m) for slots in experts.values() for m in slots.values())


# ---------------------------------------------------------------------------------------------
# importance


def input_norms(activations: torch.Tensor) -> torch.Tensor:
    """Per-input-feature L2 norm ``||X_j||`` [in] float32 of calibration activations
    [tokens, in] (or [..., in]) routed to one expert. To accumulate over batches, add the
    squares and take the square root at the end."""
    x = activations.detach().float().reshape(-1, activations.shape[-1])
    return x.pow(2).sum(dim=0).sqrt()


def expert_importance(weights: Sequence[torch.Tensor], input_norm: Optional[torch.Tensor] = None
                      ) -> float:
    """Wanda-style importance of one expert: sum over its first-layer weights W [out, in] (e.g.
    ``linear_fc1.weight``, gate and up together for SwiGLU) of sum_ij |W_ij| * ||X_j||, with
    ``input_norm [in]`` = ``input_norms`` of the calibration activations the expert received;
    None: all ones (weight magnitude only). Higher = more important (keep full precision)."""
    if not weights:
        raise ValueError("expert_importance: no weights")
    total = 0.0
    for w in weights:
        if w.dim() != 2:
            raise ValueError(f"expert_importance: weights must be [out, in], got {list(w.shape)}")
        norm = (torch.ones(w.shape[1], device=w.device) if input_norm is None
                else input_norm.to(w.device, torch.float32))
        if list(norm.shape) != [w.shape[1]]:
            raise ValueError(f"expert_importance: input_norm has shape {list(norm.shape)}, the "
                             f"weight takes {w.shape[1]} inputs")
        total += float((w.detach().float().abs() * norm[None, :]).sum(dtype=torch.float64))
    return total


# ---------------------------------------------------------------------------------------------
# memory budget


def int8_plan_for_budget(
    plans: Mapping[int, Placement],
    importance: Any,
    full_bytes: Any,
    int8_bytes: Any,
    budget: Optional[int] = None,
    *,
    replicas_first: bool = False,
) -> dict[int, torch.Tensor]:
    """The slots stored int8 per MoE layer, {layer: [P] bool}, so that in every layer each EP
    rank's expert bytes with replicas stay within ``budget`` (default: the unreplicated
    model's, expert e on rank e // (E / EP)); summed over layers, each rank's total then stays
    within the unreplicated total too.

    plans: {0-based MoE layer: Placement}; importance: ``importance[layer]`` [E] for each
    planned layer (a mapping or a list indexed by layer; higher = keep full precision);
    full_bytes [E] and int8_bytes [E]: one expert's bytes at rest in the model dtype and int8
    (``module_weight_bytes`` / ``int8_weight_bytes`` of a built model's expert modules).
    Per layer ``moebalance.placement.choose_int8``: whole experts (all replicas) least
    important first, or with ``replicas_first`` extra replicas first. ConfigError when even
    all-int8 does not fit.
    """
    out = {}
    for layer, placement in sorted(plans.items()):
        try:
            scores = importance[layer]
        except (KeyError, IndexError):
            raise ConfigError(f"int8 plan: no importance for MoE layer {layer}") from None
        try:
            out[layer] = choose_int8(placement, torch.as_tensor(scores), full_bytes, int8_bytes,
                                     budget, replicas_first=replicas_first)
        except ConfigError as err:
            raise ConfigError(f"int8 plan, layer {layer}: {err}") from None
    return out
