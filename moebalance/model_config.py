"""GPT-MoE model configs: one YAML file in ``moebalance/configs/models`` maps one-to-one onto ``ModelConfig``.

Framework-agnostic (no framework import), so a launcher can validate a config in milliseconds
before any process group starts; each adapter's ``model`` module builds the model from it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional


from .config import (
    SCORE_FUNCTIONS,
    ConfigError,
    GateConfig,
    _is_int,
    _is_number,
    _require_choice,
    read_yaml_mapping,
)
from .workloads import PRESETS

__all__ = [
    "MODEL_CONFIG_DIR",
    "DTYPES",
    "SKEWS",
    "NORMALIZATIONS",
    "ACTIVATIONS",
    "ModelConfig",
    "model_config_presets",
    "load_model_config",
    "TRAINED_CHECKPOINT_DIR",
    "trained_checkpoints",
    "trained_checkpoint",
]

# The checkpoint trained by scripts/train_tiny.py: the harness's default model.
TRAINED_CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / "tiny-moe"

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "models"
DTYPES = ("float32", "bfloat16", "float16")
SKEWS = ("none",) + tuple(PRESETS)
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "swiglu")


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """A GPT-MoE's shape, gate and initialisation (one YAML file in ``moebalance/configs/models``).

    The defaults are a minimal model for unit tests; ``moebalance/configs/models/tiny.yaml`` is the
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
        _require(
            isinstance(self.name, str) and self.name != "",
            f"name must be a non-empty string, got {self.name!r}",
        )
        positive = (
            "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
            "num_experts", "topk", "max_sequence_length", "rotary_base",
        )
        for name in positive:
            value = getattr(self, name)
            _require(
                _is_int(value) and value >= 1,
                f"{name} must be an integer >= 1, got {value!r}",
            )
        for name in ("pre_softmax", "qk_layernorm", "tie_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        _require(
            _is_int(self.init_seed) and 0 <= self.init_seed < 2**63,
            f"init_seed must be an integer in [0, 2**63), got {self.init_seed!r}",
        )
        for name in ("num_query_groups", "moe_ffn_hidden_size", "shared_expert_ffn_hidden_size"):
            value = getattr(self, name)
            _require(
                value is None or (_is_int(value) and value >= 1),
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
        _require_choice("score_function", self.score_function, SCORE_FUNCTIONS)
        _require(
            _is_int(self.first_dense_layers) and 0 <= self.first_dense_layers < self.num_layers,
            f"first_dense_layers must be an integer in [0, num_layers={self.num_layers}), "
            f"got {self.first_dense_layers!r}",
        )
        _require_choice("normalization", self.normalization, NORMALIZATIONS)
        _require_choice("activation", self.activation, ACTIVATIONS)
        _require_choice("dtype", self.dtype, DTYPES)
        _require(
            _is_number(self.init_method_std) and self.init_method_std > 0,
            f"init_method_std must be a finite number > 0, got {self.init_method_std!r}",
        )
        _require_choice("skew", self.skew, SKEWS)
        _require_choice(
            "skew_domain",
            self.skew_domain,
            tuple(dict.fromkeys(d for preset in PRESETS.values() for d in preset.domains)),
        )
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

    def gate_config(self) -> GateConfig:
        """How this model's gate turns logits into weights, for the routing policies: E
        experts, top-k, score function, pre-softmax (no group limit, no scaling factor)."""
        return GateConfig(
            num_experts=self.num_experts,
            topk=self.topk,
            score_function=self.score_function,
            pre_softmax=self.pre_softmax,
        )


def model_config_presets() -> dict[str, Path]:
    """{name: path} of the YAML model configs shipped in ``moebalance/configs/models``."""
    return {p.stem: p for p in sorted(MODEL_CONFIG_DIR.glob("*.yaml"))}


def load_model_config(path_or_name: str | Path) -> ModelConfig:
    """A ModelConfig from a YAML file, or from a preset name in ``moebalance/configs/models``.

    Raises ConfigError for a missing file, bad YAML, unknown keys or invalid values."""
    if not isinstance(path_or_name, (str, os.PathLike)):
        raise ConfigError(
            f"model config must be a YAML file path or a preset name, got {path_or_name!r}"
        )
    presets = model_config_presets()
    path = presets.get(str(path_or_name), Path(path_or_name))
    if not path.is_file():
        raise ConfigError(
            f"model config {str(path_or_name)!r} not found (a YAML file, or one of the presets "
            f"{sorted(presets)})"
        )
    data = read_yaml_mapping(path, "model config")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(
            f"model config {path}: unknown field(s) {unknown}; allowed: {sorted(known)}"
        )
    try:
        return ModelConfig(**data)
    except ConfigError as err:
        raise ConfigError(f"model config {path}: {err}") from None


def trained_checkpoint(name: str | None = None) -> tuple[Path, Path]:
    """(safetensors file, config YAML) of a shipped trained model (package data): ``name`` one
    of ``trained_checkpoints()`` (None: the default, ``moebalance/checkpoints/tiny-moe``)."""
    folder = TRAINED_CHECKPOINT_DIR if name is None else TRAINED_CHECKPOINT_DIR.parent / name
    return folder / "model.safetensors", folder / "config.yaml"


def trained_checkpoints() -> list[str]:
    """Names of the shipped trained models (``moebalance/checkpoints/<name>/`` holding a
    model.safetensors and its config.yaml)."""
    return sorted(
        d.name for d in TRAINED_CHECKPOINT_DIR.parent.iterdir()
        if (d / "model.safetensors").is_file() and (d / "config.yaml").is_file()
    )
