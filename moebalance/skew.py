"""Skewed gates for randomly initialised models: vanilla top-k routing that follows a real model's
per-expert load profile, without a framework.

Random gates route with a mild, arbitrary skew of their own (max/mean about 1.3 in the tiny
model), unlike any real model, which gives a balancing router little to do. ``apply_skew``
replaces each MoE layer's gate deterministically so that vanilla routing follows a profile of
``moebalance.workloads.PRESETS`` (``ModelConfig.skew``: "mixtral", "olmoe", "deepseek").

It needs from the framework only the model's forward, ``model(ids [B, S], positions [B, S],
mask [B, 1, S, S] bool (True = masked))`` (Megatron's GPTModel and ``deepspeed_patch``'s model
share it), and per MoE layer a ``SkewLayer``: the 0-based decoder index, the pre-MLP LayerNorm
module (its output is the MoE input; its bias carries the skew direction) and the router's
[E, H] weight. The gates follow from the model's own activations, so two frameworks whose
forwards differ in the last bits get gates that differ in the last bits too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from .config import ConfigError
from .model_config import ModelConfig
from .weights import seed_for
from .workloads import PRESETS, fit_inverse_temperature, fit_popularity_bias

__all__ = ["GUMBEL_STD", "SkewLayer", "skew_profile", "apply_skew"]

GUMBEL_STD = math.pi / math.sqrt(6)  # standard deviation of standard Gumbel noise


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class SkewLayer:
    """One MoE layer as ``apply_skew`` sees it.

    Attributes:
        index: 0-based decoder layer index (picks the profiled layer and the seeds).
        norm: the pre-MLP LayerNorm (with a bias) whose output the router reads.
        router_weight: the gate's [E, H] weight (logits = x @ weight.T).
    """

    index: int
    norm: torch.nn.Module
    router_weight: torch.Tensor


def skew_profile(
    preset: str, position: int, num_experts: int, topk: int, domain: str = "c4"
) -> torch.Tensor:
    """[E] float64 relative load (mean 1) that vanilla routing should follow in a skewed layer.

    ``position`` indexes the preset's profiled layers (``PRESETS[preset].layers``). With the
    preset's own E the real profile is used in expert order. Otherwise E evenly spaced quantiles
    of the real profile (hottest and coldest included) are assigned to the experts in a fixed
    pseudo-random order (seeded by ``position``, so hot experts sit on different EP ranks in
    different layers). Loads are capped at 0.95 E / k, the most top-k can give one expert.
    """
    p = PRESETS[preset]
    real = p.profile(p.layers[position], domain)
    if real.numel() == num_experts:
        load = real.clone()
    else:
        ordered = torch.sort(real, descending=True)[0]
        pos = torch.linspace(0, ordered.numel() - 1, num_experts, dtype=torch.float64)
        lo = pos.floor().long()
        hi = torch.clamp(lo + 1, max=ordered.numel() - 1)
        quantiles = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
        perm = torch.randperm(num_experts, generator=torch.Generator().manual_seed(1000 + position))
        load = quantiles[perm]
    load = load.clamp_min(1e-3)
    cap = 0.95 * num_experts / topk
    for _ in range(20):  # capping and renormalising converge in a few rounds
        load = load / load.mean()
        if float(load.max()) <= cap + 1e-9:
            break
        load = load.clamp(max=cap)
    return load / load.mean()


def _profile_position(layer: int, num_layers: int, num_profiles: int) -> int:
    """Which of the preset's profiled layers (first, middle, last) a model layer follows."""
    if num_layers <= 1:
        return 0
    return round(layer * (num_profiles - 1) / (num_layers - 1))


def _capture_moe_input(
    model: torch.nn.Module, norm: torch.nn.Module, ids: torch.Tensor, chunk: int = 16
) -> torch.Tensor:
    """[tokens, H] float64: what ``norm`` (a pre-MLP norm) outputs when ``model`` runs ``ids``
    [B, S] (full causal attention, no cache), ``chunk`` sequences at a time to bound memory.
    Collective at EP > 1: every rank runs it."""
    _, S = ids.shape
    mask = torch.ones(S, S, dtype=torch.bool, device=ids.device).triu(1)[None, None]
    positions = torch.arange(S, device=ids.device).unsqueeze(0)
    seen = []

    def keep(module, args, output):
        seen.append(output.reshape(-1, output.shape[-1]).double().cpu())

    handle = norm.register_forward_hook(keep)
    try:
        for part in ids.split(chunk):
            B = part.shape[0]
            model(part, positions.expand(B, S), mask.expand(B, 1, S, S))
    finally:
        handle.remove()
    return torch.cat(seen)


def _decorrelated_gate(
    x: torch.Tensor, u: torch.Tensor, num_experts: int, noise_std: float, gen: torch.Generator
) -> torch.Tensor:
    """[E, H] float64 gate rows W with W u = 0, W mean(x) = 0 and, over the calibration inputs
    x [T, H], W x_t of covariance noise_std^2 I: every expert gets independent noise of equal
    size and no offset. W = noise_std Q^T S^(-1/2) B^T, B an orthonormal basis of the inputs'
    space without u and the mean, S the (slightly regularised) covariance of B^T x, Q a seeded
    random orthonormal [H - 2, E] matrix."""
    H = x.shape[1]
    _require(
        num_experts <= H - 2,
        f"skew needs num_experts ({num_experts}) <= hidden_size - 2 ({H - 2})",
    )
    mean = x.mean(dim=0)
    frame = torch.stack([u, mean], dim=1)  # [H, 2]
    q_full = torch.linalg.qr(
        torch.cat([frame, torch.randn(H, H, generator=gen, dtype=torch.float64)], dim=1)
    )[0]
    basis = q_full[:, 2:H]  # [H, H - 2], orthogonal to u and the mean
    z = (x - mean) @ basis  # [T, H - 2]
    cov = z.T @ z / max(1, z.shape[0] - 1)
    cov = cov + 1e-3 * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    eigval, eigvec = torch.linalg.eigh(cov)
    inv_sqrt = eigvec @ torch.diag(eigval.rsqrt()) @ eigvec.T
    q = torch.linalg.qr(torch.randn(H - 2, num_experts, generator=gen, dtype=torch.float64))[0]
    return noise_std * q.T @ inv_sqrt @ basis.T


@torch.no_grad()
def apply_skew(
    model: torch.nn.Module,
    layers: Sequence[SkewLayer],
    cfg: ModelConfig,
    calibration_tokens: int = 8192,
) -> dict[int, float]:
    """Make vanilla routing of a randomly initialised ``model`` follow ``cfg.skew``'s profile.

    For MoE layer l (one of ``layers``) with profile L_e (``skew_profile``), the preset's fitted
    popularity bias b_e (top-k of b + Gumbel noise selects expert e in proportion to L_e) and
    inverse temperature beta (``moebalance.workloads``), the gate logits are made
    ``beta * (b_e + noise[t, e])`` with noise of the Gumbel's standard deviation:

    1. Calibrate: run ``calibration_tokens`` random tokens (seeded by init_seed, the same on
       every rank) through the model and collect the layer's MoE inputs x_t (the pre-MLP
       LayerNorm output), mean m. A random model's x_t share a large common component, which
       alone gives random gates an arbitrary skew of their own.
    2. Each router row w_e loses its components along m and along a fixed unit direction u
       (seeded by init_seed and l), then is rescaled so that w_e . x_t has standard deviation
       beta * pi / sqrt(6) over the calibration tokens, and gets beta * b_e / c * u added.
    3. The LayerNorm bias becomes c * u with c = sqrt(H) (the norm of the normalised part), so
       every token's MoE input carries c u and w_e . x_t = beta * b_e + noise (plus a leak
       (beta b_e / c) (u . x_t) of relative size ~1 / sqrt(H)).
    Layers are calibrated in order (a layer's skew changes the inputs of the next). The noise is
    the model's own (Gaussian-like, token-dependent), so loads follow the profile approximately;
    the harness measures what it gets. The results are broadcast from rank 0, so every rank holds
    identical gates. Collective (forward passes): call on every rank. Returns {layer: max / mean
    of the target profile}.
    """
    _require(cfg.skew in PRESETS, f"skew must be one of {tuple(PRESETS)}, got {cfg.skew!r}")
    preset = PRESETS[cfg.skew]
    H = cfg.hidden_size
    c = math.sqrt(H)
    seq = min(64, cfg.max_sequence_length)
    gen = torch.Generator().manual_seed(seed_for(cfg.init_seed, "skew/calibration"))
    ids = torch.randint(0, cfg.vocab_size, (max(1, calibration_tokens // seq), seq), generator=gen)
    ids = ids.to(next(model.parameters()).device)
    targets = {}
    for layer in sorted(layers, key=lambda item: item.index):
        index, norm, router_weight = layer.index, layer.norm, layer.router_weight
        bias = getattr(norm, "bias", None)
        _require(
            bias is not None, f"layer {index}: the pre-MLP norm has no bias (skew needs LayerNorm)"
        )
        position = _profile_position(index, cfg.num_layers, len(preset.layers))
        load = skew_profile(cfg.skew, position, cfg.num_experts, cfg.topk, cfg.skew_domain)
        popularity = fit_popularity_bias(load, cfg.topk).double()  # [E]
        beta = fit_inverse_temperature(
            load, cfg.topk, preset.median_topk_mass[position], preset.mass_spread
        )
        gen = torch.Generator().manual_seed(seed_for(cfg.init_seed, f"skew/{index}"))
        u = torch.randn(H, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        bias.zero_()
        x = _capture_moe_input(model, norm, ids)  # [T, H]
        weight = _decorrelated_gate(x, u, cfg.num_experts, beta * GUMBEL_STD, gen)  # [E, H]
        weight = weight + torch.outer(beta * popularity / c, u)
        router_weight.copy_(weight.to(router_weight))
        bias.copy_((c * u).to(bias))
        if dist.is_initialized():  # identical gates on every rank, whatever the arithmetic
            dist.broadcast(router_weight.data, src=0)
            dist.broadcast(bias.data, src=0)
        targets[index] = float(load.max())
    return targets
