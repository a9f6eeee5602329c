"""Model weights without a framework: the dtype table, name-seeded deterministic initialisation,
and the canonical checkpoint format both adapters read and write.

Canonical names: Megatron-Core GPTModel state-dict keys (local layer specs), with each routed
expert under its global index: ``decoder.layers.<i>.mlp.experts.local_experts.<global>.<rest>``
(``EXPERT_KEY``) and the gate under ``decoder.layers.<i>.mlp.router.weight``. Each adapter maps
its own parameter names onto these (``megatron_patch.model.canonical_names``: local -> global
expert index; ``deepspeed_patch.model.canonical_names``: DeepSpeed's gate and expert names), so
one name identifies one tensor whatever the framework and the EP size.

- ``init_weights``: every parameter is drawn from its own generator seeded by (``init_seed``,
  its canonical name), so the same config gives the same model at any EP size, in either
  framework, on CPU or GPU, and the dense parameters are identical on every rank.
- Checkpoints: one safetensors file holding the canonical state dict (all experts), written by
  rank 0 from every rank's tensors (``save_checkpoint``), read by every rank for its own experts
  (``load_checkpoint``). ``check_checkpoint_file`` checks a file against a model config from its
  header alone, before any process group starts. Converting Hugging Face checkpoints (Mixtral,
  OLMoE, DeepSeek-MoE) to these keys is not implemented yet.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional

import torch

from .config import ConfigError
from .telemetry import gather_to_rank0

if TYPE_CHECKING:  # type hints only: moebalance.workloads may import seed_for from here
    from .model_config import ModelConfig

__all__ = [
    "TORCH_DTYPES",
    "EXPERT_KEY",
    "CHECKPOINT_FORMAT",
    "seed_for",
    "init_weights",
    "init_named",
    "check_checkpoint_file",
    "check_checkpoint_keys",
    "load_checkpoint",
    "load_state",
    "save_checkpoint",
    "require_finite",
]

#: ModelConfig.dtype -> torch dtype
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: A canonical routed-expert key: (prefix up to the index, layer, global expert index, rest).
EXPERT_KEY = re.compile(r"^(decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")

#: ``format`` in a canonical checkpoint's safetensors metadata.
CHECKPOINT_FORMAT = "moebalance/megatron-gpt-canonical"

# Output projections get a std scaled by 1 / sqrt(2 num_layers), as Megatron's
# ``scaled_init_method_normal`` does.
_OUTPUT_PROJECTIONS = (".linear_proj.", ".linear_fc2.")


def seed_for(seed: int, name: str) -> int:
    """A 63-bit generator seed for stream ``name`` under ``seed`` (a CRC of the name mixed with
    the seed by a golden-ratio multiply): independent, reproducible streams per parameter."""
    return (int(seed) * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % (1 << 63)


@torch.no_grad()
def init_weights(params: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Deterministic, EP-invariant initialisation of ``params`` ({canonical name: parameter},
    this rank's parameters): each matrix ~ N(0, std^2) from a generator seeded by
    (cfg.init_seed, its canonical name), drawn on the CPU in float32 and copied to the
    parameter's device and dtype; std = init_method_std, divided by sqrt(2 num_layers) for
    output projections (``linear_proj``, ``linear_fc2``). Norm weights 1, biases 0."""
    scaled_std = cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers)
    for name, param in params.items():
        if param.dim() >= 2:
            output_projection = any(p in name for p in _OUTPUT_PROJECTIONS)
            std = scaled_std if output_projection else cfg.init_method_std
            gen = torch.Generator().manual_seed(seed_for(cfg.init_seed, name))
            value = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
        elif name.endswith(".bias"):
            value = torch.zeros(param.shape)
        else:  # norm weights
            value = torch.ones(param.shape)
        param.copy_(value.to(dtype=param.dtype, device=param.device))


# ---------------------------------------------------------------------- checkpoints


@torch.no_grad()
def init_named(
    params: Mapping[str, torch.Tensor], names: Mapping[str, str], cfg: ModelConfig
) -> None:
    """``init_weights`` over a model's parameters ``params`` ({key: parameter}) under their
    canonical ``names`` ({key: canonical key}; keys without a parameter, e.g. buffers, are
    skipped). Keys sharing a canonical name (an expert's replicas) get the same values."""
    first: dict[str, torch.Tensor] = {}
    copies = []
    for key, canonical in names.items():
        if key in params:
            if canonical in first:
                copies.append((params[key], first[canonical]))
            else:
                first[canonical] = params[key]
    init_weights(first, cfg)
    for copy, original in copies:
        copy.copy_(original)


def check_checkpoint_keys(
    expected: Iterable[str], available: Iterable[str], num_experts: int, source: str
) -> None:
    """ConfigError unless ``available`` (canonical keys of a file or state dict) holds every
    ``expected`` key (this rank's) and nothing else, experts of the other EP ranks (the same
    expert tensors under another global index < ``num_experts``) aside."""
    expected, available = set(expected), set(available)
    missing = sorted(expected - available)
    expert_slots = {(m.group(1), m.group(4)) for k in expected if (m := EXPERT_KEY.match(k))}

    def other_rank_expert(key: str) -> bool:
        m = EXPERT_KEY.match(key)
        if m is None:
            return False
        return (m.group(1), m.group(4)) in expert_slots and int(m.group(3)) < num_experts

    unexpected = sorted(k for k in available - expected if not other_rank_expert(k))
    if missing or unexpected:
        raise ConfigError(
            f"{source} does not fit the model config: {len(missing)} missing "
            f"{missing[:3]}{' ...' if len(missing) > 3 else ''}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )


def require_finite(named: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """ConfigError naming the first floating tensor of ``named`` ((name, tensor) pairs, e.g.
    ``model.named_parameters()``) that holds NaN or Inf. One pass over the weights, at build."""
    for name, value in named:
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(f"{source}: {name} holds NaN or Inf values")


def _copy_state(
    state: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    get: Callable[[str], torch.Tensor],
    source: str,
) -> None:
    for key, canonical in names.items():
        value, target = get(canonical), state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ConfigError(
                f"{source}: {canonical} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(f"{source}: {canonical} holds NaN or Inf values")
        target.copy_(value.to(dtype=target.dtype, device=target.device))


@torch.no_grad()
def load_state(
    state: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    canonical: Mapping[str, torch.Tensor],
    num_experts: int,
    source: str = "the canonical state dict",
) -> None:
    """Copy ``canonical`` ({canonical key: tensor}, e.g. another model's weights) into ``state``
    (a model's state dict) through ``names`` ({state key: canonical key}). Raises ConfigError
    on missing or unexpected keys (other ranks' experts aside) or shapes."""
    check_checkpoint_keys(names.values(), canonical.keys(), num_experts, source)
    _copy_state(state, names, canonical.__getitem__, source)


@torch.no_grad()
def load_checkpoint(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    num_experts: int,
) -> None:
    """Load a canonical safetensors file (``save_checkpoint``'s format) into ``state`` (a
    model's state dict) through ``names`` ({state key: canonical key}); reads only the tensors
    ``names`` asks for (this rank's experts). Raises ConfigError on a missing file, another
    format, missing or unexpected keys, or shapes."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found")
    if path.suffix != ".safetensors":
        raise ConfigError(
            f"checkpoint {path}: only safetensors files in the canonical Megatron-key format "
            "(moebalance.weights.save_checkpoint) are supported; converting other formats "
            "(Hugging Face, Megatron distributed checkpoints) is not implemented yet"
        )
    source = f"checkpoint {path}"
    with safe_open(str(path), framework="pt", device="cpu") as f:
        check_checkpoint_keys(names.values(), f.keys(), num_experts, source)
        _copy_state(state, names, f.get_tensor, source)


def save_checkpoint(
    local: Mapping[str, torch.Tensor], path: str | Path, cfg: Optional[ModelConfig] = None
) -> None:
    """Write the canonical state dict to a safetensors file: ``local`` ({canonical key: tensor},
    this rank's tensors) of every rank gathered to rank 0, which writes. Collective: every rank
    calls it. The model config goes in the metadata."""
    from safetensors.torch import save_file

    local = {key: value.detach().cpu().contiguous() for key, value in local.items()}
    parts = gather_to_rank0(local)
    if parts is None:
        return
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    metadata = {"format": CHECKPOINT_FORMAT}
    if cfg is not None:
        metadata["model_config"] = json.dumps(dataclasses.asdict(cfg))
    # written beside the target, then renamed over it: a failed write keeps the old file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(merged, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_checkpoint_file(path: str | Path, cfg: ModelConfig) -> None:
    """Fast check (header only, no framework) that ``path`` is a canonical safetensors checkpoint
    whose shapes fit ``cfg``: embedding, output layer, number of layers, per MoE layer the router
    and the number and shapes of the experts. Raises ConfigError with a one-line message.
    ``load_checkpoint`` checks every key when loading."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found")
    if path.suffix != ".safetensors":
        raise ConfigError(f"checkpoint {path}: expected a .safetensors file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ConfigError(f"checkpoint {path}: not a readable safetensors file ({err})") from None
    H, V, E = cfg.hidden_size, cfg.vocab_size, cfg.num_experts
    F = cfg.expert_ffn_hidden_size * (2 if cfg.activation == "swiglu" else 1)
    want = {"embedding.word_embeddings.weight": (V, H)}
    if not cfg.tie_embeddings:
        want["output_layer.weight"] = (V, H)
    for layer in cfg.moe_layer_indices:
        prefix = f"decoder.layers.{layer}.mlp."
        want[prefix + "router.weight"] = (E, H)
        for e in range(E):
            experts = f"{prefix}experts.local_experts.{e}"
            want[f"{experts}.linear_fc1.weight"] = (F, H)
            want[f"{experts}.linear_fc2.weight"] = (H, cfg.expert_ffn_hidden_size)
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    if layers and max(layers) + 1 != cfg.num_layers:
        raise ConfigError(
            f"checkpoint {path} has {max(layers) + 1} layers, the model config "
            f"{cfg.name!r} has num_layers={cfg.num_layers}"
        )
    experts = {int(m.group(3)) for k in shapes if (m := EXPERT_KEY.match(k))}
    if experts and max(experts) + 1 != E:
        raise ConfigError(
            f"checkpoint {path} has {max(experts) + 1} experts per layer, the model config "
            f"{cfg.name!r} has num_experts={E}"
        )
    for key, shape in want.items():
        if key not in shapes:
            raise ConfigError(f"checkpoint {path} lacks {key} (model config {cfg.name!r})")
        if shapes[key] != shape:
            raise ConfigError(
                f"checkpoint {path}: {key} has shape {shapes[key]}, the model config "
                f"{cfg.name!r} expects {shape}"
            )
