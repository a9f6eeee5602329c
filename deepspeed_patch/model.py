"""A GPT-MoE built from DeepSpeed ``MoE`` layers, the same model as ``megatron_patch.model``'s.

``build_model(cfg, ep_size=...)`` builds, from the same ``moebalance.model_config.ModelConfig``,
a decoder-only transformer whose MoE layers are ``deepspeed.moe.layer.MoE`` with a
``BalancedGate`` (DeepSpeed's eval randomness off) and whose expert parallelism is set up for
inference (``setup_expert_parallel``; EP = world size by default). Everything else mirrors
Megatron-Core's GPTModel built from the local layer specs, module names included:

    embedding.word_embeddings                [V, H]
    decoder.layers.<i>.input_layernorm       LayerNorm / RMSNorm, eps 1e-5
    decoder.layers.<i>.self_attention.linear_qkv   [(np + 2 ng) hn, H], Megatron's layout:
        per query group g, its np/ng query heads, then its key head, then its value head
    decoder.layers.<i>.self_attention.linear_proj  [H, np hn]
    decoder.layers.<i>.pre_mlp_layernorm
    decoder.layers.<i>.mlp  (MoE layers)     .moe = DeepSpeed MoE: gate.wg [E, H] (Megatron's
        router.weight), experts.deepspeed_experts.<local>.linear_fc1 / linear_fc2;
        .shared_experts.linear_fc1 / linear_fc2 (optional)
    decoder.layers.<i>.mlp  (dense layers)   .linear_fc1 / .linear_fc2
    decoder.final_layernorm, output_layer    [V, H] (absent with tied embeddings)

Attention: RoPE (non-interleaved, rotate-half, positions = KV-cache offset + 0..S-1, as
Megatron's static inference; the ``position_ids`` argument is accepted and unused, as in
Megatron's RoPE path), scores scaled by 1/sqrt(hn), masked positions filled with -10000 before
an fp32 softmax (Megatron's ``attention_mask_func``), GQA by repeating key/value heads.
Activations: GELU (exact) or SwiGLU (``linear_fc1`` holds [gate; up]). Hidden states are
sequence-first [S, B, H] internally, as in Megatron, so the MoE layer sees tokens in the same
order in both frameworks (LASER's decisions depend on token order).

Weights: ``canonical_names`` maps this model's keys onto the canonical names of
``moebalance.weights`` (Megatron GPT keys, experts under their global index; expert e on EP rank
e // (E / EP) in both frameworks): ``mlp.moe.deepspeed_moe.gate.wg.weight`` is
``mlp.router.weight`` and ``mlp.moe.deepspeed_moe.experts.deepspeed_experts.<local>.X`` is
``mlp.experts.local_experts.<global>.X``; every other key is the same in both models. So
without a checkpoint ``build_model`` initialises exactly the weights the Megatron path does
(``moebalance.weights.init_weights``: same names, same seeds) and skews the gates of this model
itself (``moebalance.skew.apply_skew``, calibrated on this model's forward, which differs from
Megatron's in the last bits, and so may the skewed gates). ``load_checkpoint`` /
``save_checkpoint`` read and write the canonical safetensors file, ``load_megatron_state`` a
canonical state dict in memory (e.g. a Megatron model's, for weight-for-weight comparisons).
No Megatron import anywhere.

The forward signature matches Megatron's GPTModel as the harness calls it:
``model(input_ids [B, S], position_ids, attention_mask [B, 1, Sq, Sk] bool (True = masked),
inference_context=None, padding_mask=None [B, S] bool (True = pad))`` -> logits [B, S, V].
``InferenceContext`` is the KV cache (``sequence_len_offset`` and ``enable_decode_mode`` as
Megatron's ``StaticInferenceContext``). Padding tokens are routed to no expert (DeepSpeed's
``used_token``), as Megatron's ``padding_mask`` does.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moebalance import parallel, skew, weights
from moebalance.config import ConfigError
from moebalance.model_config import ModelConfig
from moebalance.placement import check_plans_fit
from moebalance.parallel import ParallelSetup
from moebalance.weights import TORCH_DTYPES

from .install import install_gate, make_moe, moe_modules, setup_expert_parallel

__all__ = [
    "InferenceContext",
    "DeepSpeedGPT",
    "build_model",
    "init_distributed",
    "destroy_distributed",
    "canonical_names",
    "canonical_state",
    "megatron_to_deepspeed",
    "load_megatron_state",
    "load_checkpoint",
    "save_checkpoint",
    "init_weights",
    "skew_layers",
    "apply_skew",
    "swap_gates",
]

LAYERNORM_EPS = 1e-5  # Megatron's layernorm_epsilon default
MASK_FILL = -10000.0  # Megatron's attention_mask_func


# ---------------------------------------------------------------------- modules


class InferenceContext:
    """KV cache for ``max_batch`` sequences of up to ``max_sequence_length`` tokens. The caller
    advances ``sequence_len_offset`` (tokens already cached), as with Megatron's
    ``StaticInferenceContext``."""

    def __init__(self, max_batch: int, max_sequence_length: int) -> None:
        self.max_batch = max_batch
        self.max_sequence_length = max_sequence_length
        self.sequence_len_offset = 0
        self.decode_mode = False
        self.key_value_memory_dict: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def enable_decode_mode(self) -> None:
        self.decode_mode = True

    def is_decode_only(self) -> bool:
        return self.decode_mode


def _norm(cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    if cfg.normalization == "RMSNorm":
        return nn.RMSNorm(cfg.hidden_size, eps=LAYERNORM_EPS, dtype=dtype)
    return nn.LayerNorm(cfg.hidden_size, eps=LAYERNORM_EPS, dtype=dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MLP(nn.Module):
    """``linear_fc2(act(linear_fc1(x)))``; SwiGLU: fc1 = [gate; up], silu(gate) * up. Works on
    any leading shape (DeepSpeed hands experts [EP, 1, C, H] blocks)."""

    def __init__(self, cfg: ModelConfig, ffn_hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.glu = cfg.activation == "swiglu"
        width = 2 * ffn_hidden_size if self.glu else ffn_hidden_size
        self.linear_fc1 = nn.Linear(cfg.hidden_size, width, bias=False, dtype=dtype)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, cfg.hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.linear_fc2(h)


class SelfAttention(nn.Module):
    """Causal self-attention with Megatron's fused-QKV layout, RoPE and an optional KV cache."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.heads = cfg.num_attention_heads
        self.groups = cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        self.rotary_base = cfg.rotary_base
        qkv = (self.heads + 2 * self.groups) * self.head_dim
        self.linear_qkv = nn.Linear(cfg.hidden_size, qkv, bias=False, dtype=dtype)
        self.linear_proj = nn.Linear(
            self.heads * self.head_dim, cfg.hidden_size, bias=False, dtype=dtype
        )

    def _rope(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        """x [S, B, n, hn] rotated for positions offset .. offset + S - 1 (fp32 angles)."""
        S, hn = x.shape[0], self.head_dim
        inv_freq = 1.0 / (
            self.rotary_base
            ** (torch.arange(0, hn, 2, dtype=torch.float32, device=x.device) / hn)
        )
        pos = torch.arange(offset, offset + S, dtype=torch.float32, device=x.device)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # [S, 1, 1, hn]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor],
        context: Optional[InferenceContext] = None,
    ) -> torch.Tensor:
        """x [S, B, H]; mask [B or 1, 1, S, Sk] bool, True = masked -> [S, B, H]."""
        S, B, _ = x.shape
        per_group = self.heads // self.groups
        hn = self.head_dim
        mixed = self.linear_qkv(x).view(S, B, self.groups, (per_group + 2) * hn)
        q, k, v = torch.split(mixed, [per_group * hn, hn, hn], dim=3)
        q = q.reshape(S, B, self.heads, hn)
        offset = context.sequence_len_offset if context is not None else 0
        q, k = self._rope(q, offset), self._rope(k, offset)
        if context is not None:
            cache = context.key_value_memory_dict.get(self.layer)
            if cache is None:
                shape = (context.max_sequence_length, context.max_batch, self.groups, hn)
                cache = (x.new_zeros(shape), x.new_zeros(shape))
                context.key_value_memory_dict[self.layer] = cache
            cache[0][offset : offset + S, :B] = k
            cache[1][offset : offset + S, :B] = v
            k, v = cache[0][: offset + S, :B], cache[1][: offset + S, :B]
        if per_group > 1:
            k = k.repeat_interleave(per_group, dim=2)
            v = v.repeat_interleave(per_group, dim=2)
        # [B, n, Sq, hn] x [B, n, hn, Sk] -> [B, n, Sq, Sk]
        qb, kb, vb = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)
        scores = torch.matmul(qb, kb.transpose(-1, -2)) / math.sqrt(hn)
        if mask is not None:
            scores = scores.masked_fill(mask, MASK_FILL)
        probs = torch.softmax(scores.float(), dim=-1).to(vb.dtype)
        out = torch.matmul(probs, vb)  # [B, n, Sq, hn]
        out = out.permute(2, 0, 1, 3).reshape(S, B, self.heads * hn)
        return self.linear_proj(out)


class MoEBlock(nn.Module):
    """DeepSpeed ``MoE`` (``.moe``) plus optional shared experts (``.shared_experts``, applied to
    every token and added, as Megatron's ``MoELayer``). ``layer``: 0-based decoder index."""

    def __init__(
        self, cfg: ModelConfig, layer: int, ep_size: int, router: str, params: Any,
        load_scope: str, dtype: torch.dtype, placement: Any = None, replicas: Any = None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.placement = placement  # this layer's Placement, or None
        slots = cfg.num_experts if placement is None else int(placement.num_slots)
        with torch.random.fork_rng(devices=[]):  # DeepSpeed's Linear inits draw numbers
            self.moe = make_moe(
                cfg.hidden_size,
                MLP(cfg, cfg.expert_ffn_hidden_size, dtype),
                slots,
                ep_size=ep_size,
                k=cfg.topk,
                router=router,
                params=params,
                load_scope=load_scope,
                gate_config=cfg.gate_config(),
                placement=placement,
                replicas=replicas,
            )
        self.moe.deepspeed_moe.gate.layer = layer
        self.moe.deepspeed_moe.gate.wg.to(dtype)
        self.shared_experts = (
            MLP(cfg, cfg.shared_expert_ffn_hidden_size, dtype)
            if cfg.shared_expert_ffn_hidden_size
            else None
        )

    def forward(self, x: torch.Tensor, used_token: Optional[torch.Tensor]) -> torch.Tensor:
        out, _, _ = self.moe(x, used_token)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, moe: Optional[MoEBlock], dtype) -> None:
        super().__init__()
        self.input_layernorm = _norm(cfg, dtype)
        self.self_attention = SelfAttention(cfg, layer, dtype)
        self.pre_mlp_layernorm = _norm(cfg, dtype)
        self.mlp = moe if moe is not None else MLP(cfg, cfg.ffn_hidden_size, dtype)

    def forward(self, x, mask, context, used_token):
        x = x + self.self_attention(self.input_layernorm(x), mask, context)
        h = self.pre_mlp_layernorm(x)
        if isinstance(self.mlp, MoEBlock):
            return x + self.mlp(h, used_token)
        return x + self.mlp(h)


class _Decoder(nn.Module):
    def __init__(self, layers: list[nn.Module], final_layernorm: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = final_layernorm


class _Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, dtype=dtype)


class DeepSpeedGPT(nn.Module):
    """The GPT-MoE of the module docstring. ``ep_size``: EP size of the MoE layers."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        ep_size: int = 1,
        router: str = "topk",
        router_params: Any = None,
        load_scope: str = "local",
        placement: Optional[Mapping[int, Any]] = None,
        replicas: Any = None,
    ) -> None:
        super().__init__()
        if cfg.qk_layernorm:
            raise ConfigError("the DeepSpeed model does not implement qk_layernorm yet")
        slots = cfg.num_experts
        if placement:
            slots = check_plans_fit(
                placement, num_experts=cfg.num_experts, moe_layers=cfg.moe_layer_indices,
                ep_size=ep_size,
            )
        if slots % ep_size:
            raise ConfigError(f"ep={ep_size} must divide the expert slots per layer ({slots})")
        dtype = TORCH_DTYPES[cfg.dtype]
        self.cfg, self.ep_size, self.num_slots = cfg, ep_size, slots
        self.placement = dict(placement) if placement else None
        self.embedding = _Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        layers = []
        for i in range(cfg.num_layers):
            moe = (
                MoEBlock(
                    cfg, i, ep_size, router, router_params, load_scope, dtype,
                    placement=(placement or {}).get(i), replicas=replicas,
                )
                if i in cfg.moe_layer_indices
                else None
            )
            layers.append(TransformerLayer(cfg, i, moe, dtype))
        self.decoder = _Decoder(layers, _norm(cfg, dtype))
        self.output_layer = (
            None
            if cfg.tie_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inference_context: Optional[InferenceContext] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids [B, S]; attention_mask [B, 1, S, Sk] bool (True = masked; None = causal);
        padding_mask [B, S] bool (True = pad: routed to no expert) -> logits [B, S, V]."""
        B, S = input_ids.shape
        x = self.embedding.word_embeddings(input_ids).transpose(0, 1)  # [S, B, H]
        if attention_mask is None:
            offset = inference_context.sequence_len_offset if inference_context else 0
            attention_mask = torch.ones(S, offset + S, dtype=torch.bool, device=x.device).triu(
                offset + 1
            )[None, None]
        used_token = None
        if padding_mask is not None:  # DeepSpeed's used_token: [S * B], s-major like x
            used_token = (~padding_mask).transpose(0, 1).reshape(-1).to(x.dtype)
        for layer in self.decoder.layers:
            x = layer(x, attention_mask, inference_context, used_token)
        x = self.decoder.final_layernorm(x)
        weight = (
            self.embedding.word_embeddings.weight
            if self.output_layer is None
            else self.output_layer.weight
        )
        return F.linear(x, weight).transpose(0, 1).contiguous()


# ---------------------------------------------------------------------- weights

_MG_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.)experts\.local_experts\.(\d+)\.(.+)$")
_MG_ROUTER = re.compile(r"^(decoder\.layers\.\d+\.mlp\.)router\.weight$")
_DS_EXPERT = re.compile(
    r"^(decoder\.layers\.\d+\.mlp\.)moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.+)$"
)
_DS_GATE = re.compile(r"^(decoder\.layers\.\d+\.mlp\.)moe\.deepspeed_moe\.gate\.wg\.weight$")


def megatron_to_deepspeed(
    canonical: dict[str, torch.Tensor], *, num_experts: int, ep_size: int, ep_rank: int
) -> dict[str, torch.Tensor]:
    """Rename a canonical state dict (``moebalance.weights``: Megatron GPT keys, experts under
    global indices) to ``DeepSpeedGPT`` keys for EP rank ``ep_rank``: ``mlp.router.weight`` ->
    ``mlp.moe.deepspeed_moe.gate.wg.weight``; ``mlp.experts.local_experts.<g>.X`` ->
    ``mlp.moe.deepspeed_moe.experts.deepspeed_experts.<g - ep_rank * E/EP>.X`` for this rank's
    experts (others left out); every other key (embedding, attention, norms, shared and dense
    MLPs, output layer) is the same in both models. Tensors are not copied."""
    local = num_experts // ep_size
    out = {}
    for key, value in canonical.items():
        if key.endswith("_extra_state"):
            continue
        if m := _MG_EXPERT.match(key):
            g = int(m.group(2))
            if g // local == ep_rank:
                experts = f"{m.group(1)}moe.deepspeed_moe.experts.deepspeed_experts"
                out[f"{experts}.{g - ep_rank * local}.{m.group(3)}"] = value
        elif m := _MG_ROUTER.match(key):
            out[f"{m.group(1)}moe.deepspeed_moe.gate.wg.weight"] = value
        else:
            out[key] = value
    return out


def _ep_rank(model: "DeepSpeedGPT") -> int:
    for layer in moe_modules(model):
        group = layer.deepspeed_moe.ep_group
        return dist.get_rank(group) if group is not None else 0
    return 0


def canonical_names(model: "DeepSpeedGPT") -> dict[str, str]:
    """{state-dict key: canonical key} (``moebalance.weights``) for this rank's tensors: the
    inverse of ``megatron_to_deepspeed`` (local expert j of EP rank r becomes expert
    r * E/EP + j; with a placement, the logical expert its slot r * P/EP + j holds, so
    replicas share their expert's key). Call after ``setup_expert_parallel`` (the EP rank picks
    the indices)."""
    offset = _ep_rank(model) * (model.num_slots // model.ep_size)
    placement = model.placement or {}
    out = {}
    for key in model.state_dict():
        if m := _DS_EXPERT.match(key):
            slot = offset + int(m.group(2))
            layer = int(re.match(r"decoder\.layers\.(\d+)\.", key).group(1))
            if layer in placement:
                slot = int(placement[layer].phy2log[slot])
            out[key] = f"{m.group(1)}experts.local_experts.{slot}.{m.group(3)}"
        elif m := _DS_GATE.match(key):
            out[key] = f"{m.group(1)}router.weight"
        else:
            out[key] = key
    return out


def canonical_state(model: "DeepSpeedGPT") -> dict[str, torch.Tensor]:
    """{canonical key: tensor} of this rank's weights (not copied)."""
    state = model.state_dict()
    return {c: state[k] for k, c in canonical_names(model).items()}


def load_megatron_state(model: "DeepSpeedGPT", canonical: dict[str, torch.Tensor]) -> None:
    """Load a canonical state dict (``moebalance.weights`` keys, e.g. a Megatron model's
    ``canonical_names`` state) into ``model``, this rank's experts only. Strict: raises
    ConfigError on missing or unexpected keys (other ranks' experts aside) or a shape
    mismatch. Call after ``setup_expert_parallel`` (the EP rank picks the experts)."""
    weights.load_state(
        model.state_dict(),
        canonical_names(model),
        canonical,
        model.cfg.num_experts,
        "the canonical (Megatron) state dict",
    )


def load_checkpoint(model: "DeepSpeedGPT", path: str | Path) -> None:
    """Load a canonical safetensors checkpoint (``moebalance.weights.save_checkpoint``, written
    by either framework); each rank reads only its own experts."""
    weights.load_checkpoint(path, model.state_dict(), canonical_names(model), model.cfg.num_experts)


def save_checkpoint(model: "DeepSpeedGPT", path: str | Path, cfg: Optional[ModelConfig] = None):
    """Write the canonical state dict (all experts, gathered to rank 0) to a safetensors file
    that either framework loads. Collective: every rank calls it; rank 0 writes."""
    weights.save_checkpoint(canonical_state(model), path, cfg)


def init_weights(model: "DeepSpeedGPT", cfg: ModelConfig) -> None:
    """``moebalance.weights.init_weights`` under the canonical names: the same values as the
    Megatron model's, tensor for tensor."""
    weights.init_named(dict(model.named_parameters()), canonical_names(model), cfg)


def skew_layers(model: "DeepSpeedGPT") -> list[skew.SkewLayer]:
    """Every MoE layer as ``moebalance.skew`` sees it: 0-based decoder index, pre-MLP
    LayerNorm, gate weight ``wg.weight``."""
    out = []
    for index, layer in enumerate(model.decoder.layers):
        if isinstance(layer.mlp, MoEBlock):
            gate = layer.mlp.moe.deepspeed_moe.gate
            out.append(skew.SkewLayer(index, layer.pre_mlp_layernorm, gate.wg.weight))
    return out


def apply_skew(
    model: "DeepSpeedGPT", cfg: ModelConfig, calibration_tokens: int = 8192
) -> dict[int, float]:
    """``moebalance.skew.apply_skew`` on this model's MoE layers: vanilla routing then follows
    ``cfg.skew``'s load profile. Collective. Returns {layer: max / mean of the target profile}."""
    return skew.apply_skew(model, skew_layers(model), cfg, calibration_tokens)


# ---------------------------------------------------------------------- building


def init_distributed(ep_size: Optional[int] = None, timeout_s: float = 120.0) -> ParallelSetup:
    """DeepSpeed's process group from the torchrun environment (a plain ``python`` run is world
    1, ``moebalance.parallel``): NCCL with one GPU per local rank, gloo on CPU (without the
    shared-memory op), collectives timing out after ``timeout_s`` seconds. The EP fields
    describe the EP groups ``setup_expert_parallel`` creates (consecutive ranks, as
    Megatron's)."""
    from .install import init_distributed_cpu

    rank, world, local_rank = parallel.torchrun_environment()
    ep_size = parallel.check_ep_size(ep_size, world)
    device, _ = parallel.select_device(local_rank)
    init_distributed_cpu(timeout_s)
    return ParallelSetup(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        ep_group=rank - rank % ep_size,
        device=device,
        backend=dist.get_backend(),
    )


def destroy_distributed() -> None:
    """Barrier, then tear down the default process group."""
    parallel.destroy_process_group()


def build_model(
    cfg: ModelConfig,
    *,
    ep_size: int,
    router: str = "topk",
    router_params: Any = None,
    load_scope: str = "local",
    checkpoint: Optional[str | Path] = None,
    megatron_state: Optional[dict[str, torch.Tensor]] = None,
    device: Optional[torch.device] = None,
    placement: Optional[Mapping[int, Any]] = None,
    replicas: Any = None,
    int8_slots: Optional[Mapping[int, torch.Tensor]] = None,
) -> DeepSpeedGPT:
    """A ``DeepSpeedGPT`` (eval mode, on ``device``) with router ``router`` in every MoE layer,
    EP groups set up. Weights: ``checkpoint`` (canonical safetensors), else ``megatron_state``
    (a canonical state dict of this rank), else ``init_weights`` followed by ``apply_skew``
    when ``cfg.skew`` is set. ``placement`` ({0-based MoE layer: Placement}) and ``replicas``:
    as ``megatron_patch.model.build_model``. ``int8_slots`` ({0-based MoE layer: [P] bool}):
    once the weights are loaded, this rank's slots marked True keep their expert linear
    weights int8 weight-only (``moebalance.quantize``), as ``megatron_patch.model.build_model``.
    Collective: every rank calls it."""
    if checkpoint is not None and cfg.skew != "none":
        raise ConfigError("skew applies to randomly initialised models only; set skew: none")
    model = DeepSpeedGPT(
        cfg, ep_size=ep_size, router=router, router_params=router_params, load_scope=load_scope,
        placement=placement, replicas=replicas,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints each group it makes
        setup_expert_parallel(model)
    if device is not None:
        model.to(device)
    model.eval()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    elif megatron_state is not None:
        load_megatron_state(model, megatron_state)
    else:
        init_weights(model, cfg)
        if cfg.skew != "none":
            apply_skew(model, cfg)
    weights.require_finite(model.named_parameters(), "the built model")
    if int8_slots is not None:
        quantize_slots(model, int8_slots)
    return model


def swap_gates(model: nn.Module, router: str, params: Any = None, load_scope: str = "local") -> int:
    """Put a new BalancedGate running ``router`` into every MoE layer (same ``wg``, EP group,
    layer index). Returns the number of layers."""
    count = 0
    for block in model.modules():
        if isinstance(block, MoEBlock):
            old = block.moe.deepspeed_moe.gate
            gate = install_gate(
                block.moe, router, params, load_scope=load_scope, gate_config=old.gate_config,
                placement=block.placement, replicas=old.runner.replicas,
            )
            gate.layer = block.layer
            count += 1
    return count


# ---------------------------------------------------------------------- int8 experts


def expert_modules(model: "DeepSpeedGPT") -> dict[int, dict[int, nn.Module]]:
    """This rank's expert MLPs, {0-based MoE layer: {global slot: module}}: local expert j of EP
    rank r is slot r * P/EP + j (P = the slots per layer, E without a placement)."""
    offset = _ep_rank(model) * (model.num_slots // model.ep_size)
    out = {}
    for block in model.modules():
        if isinstance(block, MoEBlock):
            local = block.moe.deepspeed_moe.experts.deepspeed_experts
            out[block.layer] = {offset + j: expert for j, expert in enumerate(local)}
    return out


def quantize_slots(model: "DeepSpeedGPT", int8_slots: Mapping[int, torch.Tensor]) -> int:
    """Store this rank's slots marked True in ``int8_slots`` ({MoE layer: [P] bool}) int8
    (``moebalance.quantize.quantize_expert_slots``). Returns the expert modules quantized."""
    from moebalance.quantize import quantize_expert_slots

    return quantize_expert_slots(expert_modules(model), int8_slots, model.num_slots)


def expert_bytes(model: "DeepSpeedGPT") -> int:
    """Bytes of expert weights this rank holds at rest, from the real tensors (int8 + scales
    for int8 slots), over all MoE layers."""
    from moebalance.quantize import expert_bytes as count

    return count(expert_modules(model))


def set_placement(model: "DeepSpeedGPT", layer: int, placement: Any) -> None:
    """Serve MoE layer ``layer`` with ``placement`` from now on (the slots' weights must already
    hold their new experts: ``moebalance.rebalance``): the gate's layout and the model's maps."""
    for block in model.modules():
        if isinstance(block, MoEBlock) and block.layer == layer:
            block.placement = placement
            block.moe.deepspeed_moe.gate.runner.set_layout(placement)
    model.placement[layer] = placement
