"""Build a Megatron-Core GPT-MoE for expert-parallel inference from a YAML model config.

``moebalance.model_config.ModelConfig`` maps one-to-one onto the YAML files in
``configs/models/``. ``init_distributed`` starts the process groups (NCCL with CUDA, gloo
otherwise; EP = world size by default, tensor/pipeline parallel 1) with a collective timeout and
applies the CPU shims on CPU; ``build_model`` builds ``GPTModel`` from the local (Megatron-Core
only) layer specs with the chosen balancing router injected into every MoE layer
(``megatron_patch.with_router``), then either loads a checkpoint or initialises the weights
deterministically and, optionally, skews the routers.

Design points:

- Dynamic dispatch buffers, always: ``moe_expert_capacity_factor`` is set to E for every router
  (what ``prepare_config`` does for policies that change the number of experts per token). So
  ``--compare`` can swap any router into the same model, padding tokens are routed nowhere
  (they cost no expert work and count in no load), and vanilla and balancing routers pay the
  same dispatcher costs. BalancedRouter never drops by this factor; it drops nothing anyway
  (capacity = T * k).
- Deterministic, EP-invariant weights: every parameter is drawn from its own generator seeded
  by (``init_seed``, its canonical name), where an expert's canonical name carries its global
  index (``...local_experts.<global>.``). The same config gives the same model at any EP size,
  CPU or GPU, and the dense parameters are identical on every rank, as they must be.
- Checkpoints: one safetensors file holding the canonical state dict (all experts, global
  indices), read by every rank for its own experts (``load_checkpoint`` / ``save_checkpoint``).
  Converting Hugging Face checkpoints (Mixtral, OLMoE, DeepSeek-MoE) to these keys is not
  implemented yet.
- Skew (``skew: none | mixtral | olmoe | deepseek``): random gates route with a mild, arbitrary
  skew of their own (max/mean ~1.3 in the tiny model), unlike any real model, which gives a
  balancing router little to do. ``apply_skew`` replaces each MoE layer's gate
  deterministically so that vanilla top-k routing follows a real per-expert load profile from
  ``moebalance.workloads`` (see ``apply_skew``). Random-initialised models only.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from moebalance.config import ConfigError
from moebalance.model_config import DISPATCHERS, ModelConfig, load_model_config
from moebalance.telemetry import gather_to_rank0
from moebalance.workloads import PRESETS, fit_inverse_temperature, fit_popularity_bias

__all__ = [
    "TORCH_DTYPES",
    "ModelConfig",
    "load_model_config",
    "ParallelSetup",
    "init_distributed",
    "destroy_distributed",
    "transformer_config",
    "build_model",
    "init_weights",
    "canonical_names",
    "load_checkpoint",
    "save_checkpoint",
    "skew_profile",
    "apply_skew",
]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GUMBEL_STD = math.pi / math.sqrt(6)  # standard deviation of standard Gumbel noise


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# ---------------------------------------------------------------------- process groups


@dataclass(frozen=True)
class ParallelSetup:
    """Where this process sits. ep_group: first global rank of its EP group (an id)."""

    rank: int
    world_size: int
    local_rank: int
    ep_size: int
    ep_rank: int
    ep_group: int
    device: torch.device
    backend: str


def init_distributed(ep_size: Optional[int] = None, timeout_s: float = 120.0) -> ParallelSetup:
    """Start torch.distributed from the torchrun environment (a plain ``python`` run is world 1)
    and Megatron's process groups with EP = ``ep_size`` (default: world size), tensor and
    pipeline parallel 1. Backend NCCL with CUDA (one GPU per local rank), gloo otherwise, where
    the CPU shims are applied. Every collective times out after ``timeout_s`` seconds, so a
    dead rank makes the others fail instead of hang. Also selects Megatron's inference RNG
    tracker (no CUDA RNG state is needed for inference)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    from .cpu_shims import apply_cpu_shims

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    world = int(os.environ["WORLD_SIZE"])
    ep_size = world if ep_size is None else ep_size
    if ep_size < 1 or world % ep_size:
        raise ConfigError(f"ep={ep_size} must be >= 1 and divide the world size {world}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=timeout)
    apply_cpu_shims()  # no-op with CUDA
    parallel_state.initialize_model_parallel(
        expert_model_parallel_size=ep_size,
        distributed_timeout_minutes=timeout_s / 60,  # used as timedelta(minutes=...)
        create_gloo_process_groups=False,
    )
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    ep_group = parallel_state.get_expert_model_parallel_group()
    return ParallelSetup(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=local_rank,
        ep_size=ep_size,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        ep_group=min(dist.get_process_group_ranks(ep_group)),
        device=device,
        backend=backend,
    )


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group (after a barrier)."""
    from megatron.core import parallel_state

    if dist.is_initialized():
        dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


# ---------------------------------------------------------------------- building


def transformer_config(cfg: ModelConfig, *, ep_size: int, dispatcher: str = "alltoall"):
    """Megatron's TransformerConfig for ``cfg`` at EP = ``ep_size`` (inference settings: no
    dropout, no aux loss, SequentialMLP experts, no fused kernels, dynamic dispatch buffers)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    _require(
        dispatcher in DISPATCHERS, f"dispatcher must be one of {DISPATCHERS}, got {dispatcher!r}"
    )
    _require(
        cfg.num_experts % ep_size == 0,
        f"ep={ep_size} must divide num_experts={cfg.num_experts}",
    )
    dtype = TORCH_DTYPES[cfg.dtype]
    cuda = torch.cuda.is_available()
    num_moe_layers = cfg.num_layers - cfg.first_dense_layers
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        moe_ffn_hidden_size=cfg.expert_ffn_hidden_size,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.topk,
        moe_router_score_function=cfg.score_function,
        moe_router_pre_softmax=cfg.pre_softmax,
        moe_router_load_balancing_type="none",
        moe_router_dtype="fp32",
        moe_aux_loss_coeff=0.0,
        moe_shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size,
        moe_layer_freq=[0] * cfg.first_dense_layers + [1] * num_moe_layers,
        moe_token_dispatcher_type=dispatcher,
        # Dynamic dispatch buffers for every router (see the module docstring).
        moe_expert_capacity_factor=float(cfg.num_experts),
        expert_model_parallel_size=ep_size,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        normalization=cfg.normalization,
        qk_layernorm=cfg.qk_layernorm,
        gated_linear_unit=cfg.activation == "swiglu",
        activation_func=F.silu if cfg.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not cuda,
        # Weights are set by init_weights or load_checkpoint; Megatron's init would be redone.
        perform_initialization=False,
    )


def build_model(
    cfg: ModelConfig,
    *,
    ep_size: int,
    router: str = "topk",
    router_params: Any = None,
    load_scope: str = "local",
    dispatcher: str = "alltoall",
    checkpoint: Optional[str | Path] = None,
):
    """A GPTModel (eval mode, on this rank's device) with router ``router`` (a name in
    ``moebalance.policies.POLICIES``, parameters ``router_params``) in every MoE layer.

    Weights come from ``checkpoint`` (a safetensors file, see ``load_checkpoint``) or, without
    one, from ``init_weights`` followed by ``apply_skew`` when ``cfg.skew`` is set.
    Call ``init_distributed`` first. Returns the model."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from .inject import with_router
    from .routers import make_router_class, prepare_config

    _require(
        checkpoint is None or cfg.skew == "none",
        "skew applies to randomly initialised models only; set skew: none with a checkpoint",
    )
    router_cls = make_router_class(router, router_params, load_scope=load_scope)
    config = transformer_config(cfg, ep_size=ep_size, dispatcher=dispatcher)
    config = prepare_config(config, router_cls)
    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=cfg.normalization
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=with_router(spec, router_cls),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_sequence_length,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
    )
    if cfg.dtype != "float32":
        model.to(TORCH_DTYPES[cfg.dtype])  # as Megatron's Float16Module does
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())  # norms and the router weight start on the CPU
    model.eval()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    else:
        init_weights(model, cfg)
        if cfg.skew != "none":
            apply_skew(model, cfg)
    return model


# ---------------------------------------------------------------------- weights

_EXPERT_KEY = re.compile(r"^(decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """{state-dict key: canonical key} for this rank's tensors: local expert j of a layer
    becomes its global index (``...local_experts.<global>.``); other keys are unchanged.
    ``_extra_state`` entries are left out."""
    from .inject import moe_layers

    layers = {}
    for layer in moe_layers(model):
        # MoELayer.layer_number is 1-based over the decoder layers.
        layers[layer.layer_number - 1] = layer.local_expert_indices
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("_extra_state") or not torch.is_tensor(value):
            continue
        m = _EXPERT_KEY.match(key)
        if m:
            global_index = layers[int(m.group(2))][int(m.group(3))]
            out[key] = f"{m.group(1)}{global_index}{m.group(4)}"
        else:
            out[key] = key
    return out


def _seed_for(seed: int, name: str) -> int:
    return (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % (1 << 63)


@torch.no_grad()
def init_weights(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """Deterministic, EP-invariant initialisation: each matrix ~ N(0, std^2) from a generator
    seeded by (cfg.init_seed, its canonical name), drawn on the CPU in float32 and copied;
    std = init_method_std, divided by sqrt(2 num_layers) for output projections
    (``linear_proj``, ``linear_fc2``) as Megatron does. Norm weights 1, biases 0."""
    names = canonical_names(model)
    params = dict(model.named_parameters())
    scaled_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
    for key, canonical in names.items():
        param = params.get(key)
        if param is None:  # a buffer (e.g. rotary frequencies): keep Megatron's
            continue
        if param.dim() >= 2:
            output_projection = ".linear_proj." in key or ".linear_fc2." in key
            std = scaled_std if output_projection else cfg.init_method_std
            gen = torch.Generator().manual_seed(_seed_for(cfg.init_seed, canonical))
            value = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
        elif key.endswith(".bias"):
            value = torch.zeros(param.shape)
        else:  # norm weights
            value = torch.ones(param.shape)
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def _check_checkpoint_keys(
    names: dict[str, str], file_keys: set[str], num_experts: int, path: Path
) -> None:
    """ConfigError unless the file holds every key this rank needs and nothing else, experts
    of the other EP ranks (global index < num_experts) aside."""
    expected = set(names.values())
    missing = sorted(expected - file_keys)
    expert_slots = {(m.group(1), m.group(4)) for k in expected if (m := _EXPERT_KEY.match(k))}

    def other_rank_expert(key: str) -> bool:
        m = _EXPERT_KEY.match(key)
        if m is None:
            return False
        return (m.group(1), m.group(4)) in expert_slots and int(m.group(3)) < num_experts

    unexpected = sorted(k for k in file_keys - expected if not other_rank_expert(k))
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path} does not fit the model config: {len(missing)} missing "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )


@torch.no_grad()
def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load a safetensors file with the canonical state dict (``save_checkpoint``'s format:
    Megatron-Core GPTModel keys, experts under their global index) into ``model``; each rank
    reads only its own experts. Raises ConfigError on missing or unexpected keys or shapes."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found")
    if path.suffix != ".safetensors":
        raise ConfigError(
            f"checkpoint {path}: only safetensors files in the canonical Megatron-key format "
            "(megatron_patch.model.save_checkpoint) are supported; converting other formats "
            "(Hugging Face, Megatron distributed checkpoints) is not implemented yet"
        )
    names = canonical_names(model)
    state = model.state_dict()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        _check_checkpoint_keys(names, set(f.keys()), model.config.num_moe_experts, path)
        for key, canonical in names.items():
            value = f.get_tensor(canonical)
            target = state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ConfigError(
                    f"checkpoint {path}: {canonical} has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(target.shape)}"
                )
            target.copy_(value.to(dtype=target.dtype, device=target.device))


@torch.no_grad()
def save_checkpoint(
    model: torch.nn.Module, path: str | Path, cfg: Optional[ModelConfig] = None
) -> None:
    """Write the canonical state dict (all experts, gathered to rank 0) to a safetensors file.
    Collective: every rank calls it; rank 0 writes. The model config goes in the metadata."""
    from safetensors.torch import save_file

    names = canonical_names(model)
    state = model.state_dict()
    local = {canonical: state[key].detach().cpu().contiguous() for key, canonical in names.items()}
    parts = gather_to_rank0(local)
    if parts is None:
        return
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    metadata = {"format": "moebalance/megatron-gpt-canonical"}
    if cfg is not None:
        metadata["model_config"] = json.dumps(dataclasses.asdict(cfg))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(path), metadata=metadata)


# ---------------------------------------------------------------------- skew


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
    model: torch.nn.Module, cfg: ModelConfig, calibration_tokens: int = 8192
) -> dict[int, float]:
    """Make vanilla routing of a randomly initialised model follow ``cfg.skew``'s load profile.

    For MoE layer l with profile L_e (``skew_profile``), the preset's fitted popularity bias b_e
    (top-k of b + Gumbel noise selects expert e in proportion to L_e) and inverse temperature
    beta (``moebalance.workloads``), the gate logits are made ``beta * (b_e + noise[t, e])``
    with noise of the Gumbel's standard deviation:

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
    from .inject import moe_layers

    _require(cfg.skew in PRESETS, f"skew must be one of {tuple(PRESETS)}, got {cfg.skew!r}")
    preset = PRESETS[cfg.skew]
    moe = {layer.layer_number - 1: layer for layer in moe_layers(model)}
    H = cfg.hidden_size
    c = math.sqrt(H)
    seq = min(64, cfg.max_sequence_length)
    gen = torch.Generator().manual_seed(_seed_for(cfg.init_seed, "skew/calibration"))
    ids = torch.randint(0, cfg.vocab_size, (max(1, calibration_tokens // seq), seq), generator=gen)
    ids = ids.to(next(model.parameters()).device)
    targets = {}
    for index, layer in sorted(moe.items()):
        norm = model.decoder.layers[index].pre_mlp_layernorm
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
        gen = torch.Generator().manual_seed(_seed_for(cfg.init_seed, f"skew/{index}"))
        u = torch.randn(H, generator=gen, dtype=torch.float64)
        u = u / u.norm()
        bias.zero_()
        x = _capture_moe_input(model, norm, ids)  # [T, H]
        weight = _decorrelated_gate(x, u, cfg.num_experts, beta * GUMBEL_STD, gen)  # [E, H]
        weight = weight + torch.outer(beta * popularity / c, u)
        layer.router.weight.copy_(weight.to(layer.router.weight))
        bias.copy_((c * u).to(bias))
        if dist.is_initialized():  # identical gates on every rank, whatever the arithmetic
            dist.broadcast(layer.router.weight.data, src=0)
            dist.broadcast(bias.data, src=0)
        targets[index] = float(load.max())
    return targets
