"""GPT-MoE model configs: one YAML file in ``configs/models`` maps one-to-one onto ``ModelConfig``.

Framework-agnostic (no Megatron import), so a launcher can validate a config in milliseconds
before any process group starts; ``megatron_patch.model`` builds the model from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import SCORE_FUNCTIONS, ConfigError
from .workloads import PRESETS

__all__ = [
    "MODEL_CONFIG_DIR",
    "DTYPES",
    "SKEWS",
    "NORMALIZATIONS",
    "ACTIVATIONS",
    "DISPATCHERS",
    "ModelConfig",
    "model_config_presets",
    "load_model_config",
    "TRAINED_CHECKPOINT_DIR",
    "trained_checkpoint",
    "check_checkpoint_file",
]

# The checkpoint trained by scripts/train_tiny.py: the harness's default model.
TRAINED_CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-moe"

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
DTYPES = ("float32", "bfloat16", "float16")
SKEWS = ("none",) + tuple(PRESETS)
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")
DISPATCHERS = ("alltoall", "allgather")  # Megatron token dispatchers the harness runs


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-MoE's shape, gate and initialisation (one YAML file in ``configs/models``).

    The defaults are a minimal model for unit tests; ``configs/models/tiny.yaml`` is the
    harness's default model.

    Attributes:
        name: label for reports.
        vocab_size: tokens in the vocabulary (256 = byte level).
        hidden_size: model width H.
        num_layers: decoder layers (dense and MoE).
        num_attention_heads: query heads; num_query_groups: key/value heads (None = MHA).
        ffn_hidden_size: hidden width of the dense MLP layers (``first_dense_layers``).
        moe_ffn_hidden_size: hidden width of one routed expert (None = ffn_hidden_size).
        num_experts: E routed experts per MoE layer; topk: k experts per token.
        score_function: "softmax", "sigmoid" or "sqrtsoftplus"; pre_softmax: softmax over all
            E before top-k (weights not renormalised), as OLMoE / DeepSeek-MoE.
        shared_expert_ffn_hidden_size: total hidden width of the shared experts (None = none).
        first_dense_layers: this many leading layers are dense (DeepSeek-MoE: 1).
        max_sequence_length: longest prompt + generation the model serves (tokens).
        normalization: "LayerNorm" or "RMSNorm"; qk_layernorm: normalise queries and keys.
        activation: "gelu" (MLP) or "swiglu" (gated SiLU, as Mixtral / OLMoE / DeepSeek).
        rotary_base: RoPE base (theta).
        tie_embeddings: share input embedding and output layer weights.
        init_method_std: std of the random initialisation (output projections are scaled by
            1 / sqrt(2 num_layers)).
        init_seed: seeds the deterministic initialisation (and the skew directions).
        dtype: "float32", "bfloat16" or "float16" (router logits stay float32).
        skew: "none" or a workload preset ("mixtral", "olmoe", "deepseek") whose per-expert
            load profile vanilla routing should follow (random initialisation only).
        skew_domain: the preset's text domain ("c4", "github", "arxiv").
    """

    name: str = "tiny"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: int = 128
    moe_ffn_hidden_size: Optional[int] = None
    num_experts: int = 8
    topk: int = 2
    score_function: str = "softmax"
    pre_softmax: bool = False
    shared_expert_ffn_hidden_size: Optional[int] = None
    first_dense_layers: int = 0
    max_sequence_length: int = 512
    normalization: str = "LayerNorm"
    qk_layernorm: bool = False
    activation: str = "gelu"
    rotary_base: int = 10000
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    init_seed: int = 1234
    dtype: str = "float32"
    skew: str = "none"
    skew_domain: str = "c4"

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
            "num_experts", "topk", "max_sequence_length", "rotary_base",
        )
        for name in positive:
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}",
            )
        for name in ("pre_softmax", "qk_layernorm", "tie_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        _require(
            isinstance(self.first_dense_layers, int) and isinstance(self.init_seed, int),
            f"first_dense_layers and init_seed must be integers, got {self.first_dense_layers!r} "
            f"and {self.init_seed!r}",
        )
        for name in ("num_query_groups", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size"):
            value = getattr(self, name)
            _require(
                value is None or (isinstance(value, int) and value >= 1),
                f"{name} must be an integer >= 1 or null, got {value!r}",
            )
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size={self.hidden_size} must be divisible by "
            f"num_attention_heads={self.num_attention_heads}",
        )
        if self.num_query_groups is not None:
            _require(
                self.num_attention_heads % self.num_query_groups == 0,
                f"num_query_groups={self.num_query_groups} must divide "
                f"num_attention_heads={self.num_attention_heads}",
            )
        _require(
            self.topk <= self.num_experts,
            f"topk must be in [1, num_experts={self.num_experts}], got {self.topk}",
        )
        _require(
            self.score_function in SCORE_FUNCTIONS,
            f"score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}",
        )
        _require(
            isinstance(self.first_dense_layers, int)
            and 0 <= self.first_dense_layers < self.num_layers,
            f"first_dense_layers must be an integer in [0, num_layers={self.num_layers}), "
            f"got {self.first_dense_layers!r}",
        )
        _require(
            self.normalization in NORMALIZATIONS,
            f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}",
        )
        _require(
            self.activation in ACTIVATIONS,
            f"activation must be one of {ACTIVATIONS}, got {self.activation!r}",
        )
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(
            isinstance(self.init_method_std, (int, float)) and self.init_method_std > 0,
            f"init_method_std must be a number > 0, got {self.init_method_std!r}",
        )
        _require(self.skew in SKEWS, f"skew must be one of {SKEWS}, got {self.skew!r}")
        if self.skew != "none":
            preset = PRESETS[self.skew]
            _require(
                self.skew_domain in preset.domains,
                f"skew_domain must be one of {preset.domains} for skew {self.skew!r}, "
                f"got {self.skew_domain!r}",
            )
            _require(
                self.num_experts <= self.hidden_size - 2,
                f"skew needs num_experts ({self.num_experts}) <= hidden_size - 2 "
                f"({self.hidden_size - 2}): each expert gets its own noise direction",
            )
            _require(
                self.normalization == "LayerNorm",
                "skew needs normalization: LayerNorm (the pre-MLP LayerNorm bias carries the "
                f"skew direction), got {self.normalization!r}",
            )

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def moe_layer_indices(self) -> list[int]:
        """0-based decoder layer indices of the MoE layers."""
        return list(range(self.first_dense_layers, self.num_layers))

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


def model_config_presets() -> dict[str, Path]:
    """{name: path} of the YAML model configs shipped in ``configs/models``."""
    return {p.stem: p for p in sorted(MODEL_CONFIG_DIR.glob("*.yaml"))}


def load_model_config(path_or_name: str | Path) -> ModelConfig:
    """A ModelConfig from a YAML file, or from a preset name in ``configs/models``.

    Raises ConfigError for a missing file, bad YAML, unknown keys or invalid values."""
    presets = model_config_presets()
    path = presets.get(str(path_or_name), Path(path_or_name))
    if not path.is_file():
        raise ConfigError(
            f"model config {str(path_or_name)!r} not found (a YAML file, or one of the presets "
            f"{sorted(presets)})"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"model config {path}: invalid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"model config {path}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"model config {path}: unknown field(s) {unknown}; allowed: {sorted(known)}"
        )
    try:
        return ModelConfig(**data)
    except ConfigError as err:
        raise ConfigError(f"model config {path}: {err}") from None


def trained_checkpoint() -> tuple[Path, Path]:
    """(safetensors file, config YAML) of the shipped trained model (``checkpoints/tiny-moe``)."""
    return TRAINED_CHECKPOINT_DIR / "model.safetensors", TRAINED_CHECKPOINT_DIR / "config.yaml"


def check_checkpoint_file(path: str | Path, cfg: ModelConfig) -> None:
    """Fast check (header only, no Megatron) that ``path`` is a canonical safetensors checkpoint
    whose shapes fit ``cfg``: embedding, output layer, number of layers, per MoE layer the router
    and the number and shapes of the experts. Raises ConfigError with a one-line message.
    ``megatron_patch.model.load_checkpoint`` checks every key when loading."""
    import re

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
            want[f"{prefix}experts.local_experts.{e}.linear_fc1.weight"] = (F, H)
            want[f"{prefix}experts.local_experts.{e}.linear_fc2.weight"] = (H, cfg.expert_ffn_hidden_size)
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    if layers and max(layers) + 1 != cfg.num_layers:
        raise ConfigError(
            f"checkpoint {path} has {max(layers) + 1} layers, the model config "
            f"{cfg.name!r} has num_layers={cfg.num_layers}"
        )
    experts = {
        int(m.group(1)) for k in shapes if (m := re.search(r"local_experts\.(\d+)\.", k))
    }
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
