"""Build a Megatron-Core GPT-MoE for expert-parallel inference from a YAML model config.

``moebalance.model_config.ModelConfig`` maps one-to-one onto the YAML files in
``moebalance/configs/models/``. ``init_distributed`` starts the process groups (NCCL with CUDA, gloo
otherwise; EP = world size by default, tensor/pipeline parallel 1; ``moebalance.parallel``)
with a collective timeout and applies the CPU shims on CPU; ``build_model`` builds
``GPTModel`` from the local (Megatron-Core only) layer specs with the chosen balancing router
injected into every MoE layer (``megatron_patch.with_router``), then either loads a checkpoint
or initialises the weights deterministically and, optionally, skews the routers.

Design points:

- Dynamic dispatch buffers, always: ``moe_expert_capacity_factor`` is set to E for every router
  (what ``prepare_config`` does for policies that change the number of experts per token). So
  ``--compare`` can swap any router into the same model, padding tokens are routed nowhere
  (they cost no expert work and count in no load), and vanilla and balancing routers pay the
  same dispatcher costs. BalancedRouter never drops by this factor; it drops nothing anyway
  (capacity = T * k).
- Weights, checkpoints and skew are the framework-free ones of ``moebalance.weights`` and
  ``moebalance.skew``; this module maps Megatron's parameter names onto the canonical names
  (``canonical_names``: local expert j of a layer under its global index) and hands the
  pre-MLP LayerNorms and router weights to the skew. The same config therefore gives the same
  model at any EP size, CPU or GPU, and in DeepSpeed (``deepspeed_patch.model``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from moebalance import parallel, skew, weights
from moebalance.config import ConfigError
from moebalance.model_config import ModelConfig, load_model_config
from moebalance.parallel import ParallelSetup
from moebalance.placement import check_plans_fit
from moebalance.skew import skew_profile
from moebalance.weights import TORCH_DTYPES

__all__ = [
    "DISPATCHERS",
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
    "skew_layers",
    "skew_profile",
    "apply_skew",
]

#: Megatron-Core token dispatchers the harness runs (``moe_token_dispatcher_type``).
DISPATCHERS = ("alltoall", "allgather")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# ---------------------------------------------------------------------- process groups


def init_distributed(ep_size: Optional[int] = None, timeout_s: float = 120.0) -> ParallelSetup:
    """Start torch.distributed from the torchrun environment (a plain ``python`` run is world 1)
    and Megatron's process groups with EP = ``ep_size`` (default: world size), tensor and
    pipeline parallel 1. Backend NCCL with CUDA (one GPU per local rank), gloo otherwise, where
    the CPU shims are applied. Every collective times out after ``timeout_s`` seconds, so a
    dead rank makes the others fail instead of hang. Also selects Megatron's inference RNG
    tracker (no CUDA RNG state is needed for inference). A rank that never joins within
    ``timeout_s``: ``moebalance.parallel.RendezvousError``."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    from .cpu_shims import apply_cpu_shims

    _, world, local_rank = parallel.torchrun_environment()
    ep_size = parallel.check_ep_size(ep_size, world)
    device, backend = parallel.select_device(local_rank)
    # every group created later without a timeout (Megatron's are given one) times out alike
    with parallel.rendezvous(timeout_s):  # a rank that never joins: one line, not a traceback
        dist.init_process_group(backend, timeout=parallel.default_group_timeout(timeout_s))
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

    def teardown() -> None:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()

    parallel.destroy_process_group(teardown)


# ---------------------------------------------------------------------- building


def transformer_config(
    cfg: ModelConfig, *, ep_size: int, dispatcher: str = "alltoall", num_slots: Optional[int] = None
):
    """Megatron's TransformerConfig for ``cfg`` at EP = ``ep_size`` (inference settings: no
    dropout, no aux loss, SequentialMLP experts, no fused kernels, dynamic dispatch buffers).
    ``num_slots``: physical expert slots per MoE layer when replicas are placed (default: the
    model's experts)."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    _require(
        dispatcher in DISPATCHERS, f"dispatcher must be one of {DISPATCHERS}, got {dispatcher!r}"
    )
    slots = cfg.num_experts if num_slots is None else num_slots
    _require(
        slots % ep_size == 0,
        f"ep={ep_size} must divide the expert slots per layer ({slots})",
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
        num_moe_experts=slots,
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
        moe_expert_capacity_factor=float(slots),
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
    placement: Optional[Mapping[int, Any]] = None,
    replicas: Optional[Any] = None,
    int8_slots: Optional[Mapping[int, torch.Tensor]] = None,
):
    """A GPTModel (eval mode, on this rank's device) with router ``router`` (a name in
    ``moebalance.policies.POLICIES``, parameters ``router_params``) in every MoE layer.

    Weights come from ``checkpoint`` (a safetensors file, see ``load_checkpoint``) or, without
    one, from ``init_weights`` followed by ``apply_skew`` when ``cfg.skew`` is set.
    ``placement`` ({0-based MoE layer: ``moebalance.placement.Placement``}, all with the same
    P): every MoE layer holds P physical expert slots, slot s a copy of logical expert
    ``phy2log[s]`` (weights, initialisation and checkpoint keys are the logical expert's), and
    the routers pick one replica per (token, expert) (``replicas``: a
    ``moebalance.replicas.ReplicaParams``, round-robin by default).
    ``int8_slots`` ({0-based MoE layer: [P] bool}, P = the slots per layer, E without a
    placement): once the weights are loaded, this rank's slots marked True keep their expert
    linear weights (fc1, fc2) int8 weight-only, dequantized around each forward
    (``moebalance.quantize``); ``expert_bytes`` counts what the rank then holds.
    Call ``init_distributed`` first. Returns the model."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    from .inject import with_router
    from .routers import make_router_class, prepare_config

    _require(
        checkpoint is None or cfg.skew == "none",
        "skew applies to randomly initialised models only; set skew: none with a checkpoint",
    )
    num_slots = None
    if placement:
        num_slots = check_plans_fit(
            placement, num_experts=cfg.num_experts, moe_layers=cfg.moe_layer_indices,
            ep_size=ep_size,
        )
    router_cls = make_router_class(
        router, router_params, load_scope=load_scope, placement=placement, replicas=replicas
    )
    config = transformer_config(cfg, ep_size=ep_size, dispatcher=dispatcher, num_slots=num_slots)
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
    model.placement = dict(placement) if placement else None  # canonical_names reads it
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    else:
        init_weights(model, cfg)
        if cfg.skew != "none":
            apply_skew(model, cfg)
    weights.require_finite(model.named_parameters(), "the built model")
    if int8_slots is not None:
        quantize_slots(model, int8_slots)
    return model


# ---------------------------------------------------------------------- weights


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """{state-dict key: canonical key} (``moebalance.weights``) for this rank's tensors: local
    expert j of a layer becomes its global index (``...local_experts.<global>.``), or with a
    placement (``build_model``) the logical expert its slot holds, so replicas share their
    expert's key; other keys are unchanged. ``_extra_state`` entries are left out."""
    from .inject import moe_layers

    placement = getattr(model, "placement", None) or {}
    layers = {}
    for layer in moe_layers(model):
        # MoELayer.layer_number is 1-based over the decoder layers.
        index = layer.layer_number - 1
        slots = list(layer.local_expert_indices)
        if index in placement:
            slots = [int(placement[index].phy2log[s]) for s in slots]
        layers[index] = slots
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("_extra_state") or not torch.is_tensor(value):
            continue
        m = weights.EXPERT_KEY.match(key)
        if m:
            global_index = layers[int(m.group(2))][int(m.group(3))]
            out[key] = f"{m.group(1)}{global_index}{m.group(4)}"
        else:
            out[key] = key
    return out


def init_weights(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """``moebalance.weights.init_weights`` on the model's parameters under their canonical
    names (buffers, e.g. rotary frequencies, keep Megatron's values); replicas of an expert get
    its values."""
    weights.init_named(dict(model.named_parameters()), canonical_names(model), cfg)


def _logical_experts(model: torch.nn.Module) -> int:
    placement = getattr(model, "placement", None)
    if placement:
        return next(iter(placement.values())).num_experts
    return model.config.num_moe_experts


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load a canonical safetensors file (``moebalance.weights``: Megatron-Core GPTModel keys,
    experts under their global index) into ``model``; each rank reads only its own experts.
    Raises ConfigError on missing or unexpected keys or shapes."""
    weights.load_checkpoint(
        path, model.state_dict(), canonical_names(model), _logical_experts(model)
    )


def save_checkpoint(
    model: torch.nn.Module, path: str | Path, cfg: Optional[ModelConfig] = None
) -> None:
    """Write the canonical state dict (all experts, gathered to rank 0) to a safetensors file.
    Collective: every rank calls it; rank 0 writes. The model config goes in the metadata."""
    state = model.state_dict()
    weights.save_checkpoint(
        {c: state[k] for k, c in canonical_names(model).items()}, path, cfg
    )


# ---------------------------------------------------------------------- skew


def skew_layers(model: torch.nn.Module) -> list[skew.SkewLayer]:
    """Every MoE layer of a GPTModel as ``moebalance.skew`` sees it: 0-based decoder index,
    pre-MLP LayerNorm, router weight."""
    from .inject import moe_layers

    out = []
    for layer in moe_layers(model):
        index = layer.layer_number - 1
        norm = model.decoder.layers[index].pre_mlp_layernorm
        out.append(skew.SkewLayer(index, norm, layer.router.weight))
    return out


def apply_skew(
    model: torch.nn.Module, cfg: ModelConfig, calibration_tokens: int = 8192
) -> dict[int, float]:
    """``moebalance.skew.apply_skew`` on the GPTModel's MoE layers: vanilla routing then follows
    ``cfg.skew``'s load profile. Collective. Returns {layer: max / mean of the target profile}."""
    return skew.apply_skew(model, skew_layers(model), cfg, calibration_tokens)


# ---------------------------------------------------------------------- int8 experts


def expert_modules(model: torch.nn.Module) -> dict[int, dict[int, torch.nn.Module]]:
    """This rank's expert MLPs, {0-based MoE layer: {global slot: module}} (slot = the
    physical slot with a placement, the expert index without)."""
    from .inject import moe_layers

    return {
        layer.layer_number - 1: dict(zip(layer.local_expert_indices, layer.experts.local_experts))
        for layer in moe_layers(model)
    }


def quantize_slots(model: torch.nn.Module, int8_slots: Mapping[int, torch.Tensor]) -> int:
    """Store this rank's slots marked True in ``int8_slots`` ({MoE layer: [P] bool}) int8
    (``moebalance.quantize.quantize_expert_slots``). Returns the expert modules quantized."""
    from moebalance.quantize import quantize_expert_slots

    return quantize_expert_slots(expert_modules(model), int8_slots, model.config.num_moe_experts)


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of expert weights this rank holds at rest, from the real tensors (int8 + scales
    for int8 slots), over all MoE layers."""
    from moebalance.quantize import expert_bytes as count

    return count(expert_modules(model))


def set_placement(model: torch.nn.Module, layer: int, placement: Any) -> None:
    """Serve MoE layer ``layer`` (0-based) with ``placement`` from now on (same slots per rank;
    the slots' weights must already hold their new experts: ``moebalance.rebalance``): the
    router's layout and the model's map for checkpoint names."""
    from .inject import moe_layers

    for moe in moe_layers(model):
        if moe.layer_number - 1 == layer:
            moe.router.runner.set_layout(placement)
    model.placement[layer] = placement
