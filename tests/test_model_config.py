"""moebalance.model_config: YAML model configs map one-to-one onto ModelConfig and are checked."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from moebalance import ConfigError
from moebalance.model_config import ModelConfig, load_model_config, model_config_presets

SHIPPED = ("tiny", "mixtral-8x7b", "olmoe-1b-7b", "deepseek-moe-16b", "tiny-wide")


def test_shipped_presets_load_and_name_every_field():
    presets = model_config_presets()
    assert set(SHIPPED) <= set(presets)
    for name in SHIPPED:
        cfg = load_model_config(name)
        assert cfg.name == name
        # one-to-one: every dataclass field is spelled out in the file
        keys = set(yaml.safe_load(presets[name].read_text()))
        assert keys == {f.name for f in dataclasses.fields(ModelConfig)}
    assert load_model_config(presets["tiny"]) == load_model_config("tiny")
    # tiny-wide is tiny with 4x wider experts, nothing else
    tiny, wide = load_model_config("tiny"), load_model_config("tiny-wide")
    assert (wide.ffn_hidden_size, wide.moe_ffn_hidden_size) == (2048, 2048)
    assert wide == tiny.replace(name="tiny-wide", ffn_hidden_size=2048, moe_ffn_hidden_size=2048)


def test_real_shapes():
    mixtral, olmoe, deepseek = (load_model_config(n) for n in SHIPPED[1:4])
    assert (mixtral.num_experts, mixtral.topk, mixtral.num_query_groups) == (8, 2, 8)
    assert not mixtral.pre_softmax  # softmax over the top-2 logits
    assert (olmoe.num_experts, olmoe.topk, olmoe.pre_softmax) == (64, 8, True)
    assert olmoe.qk_layernorm
    assert (deepseek.num_experts, deepseek.topk, deepseek.first_dense_layers) == (64, 6, 1)
    assert deepseek.shared_expert_ffn_hidden_size == 2 * deepseek.expert_ffn_hidden_size
    assert deepseek.moe_layer_indices == list(range(1, 28))


def test_yaml_roundtrip(tmp_path):
    cfg = load_model_config("tiny").replace(skew="mixtral", num_layers=3)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    assert load_model_config(path) == cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1"),
        ({"hidden_size": 30}, "must be divisible by num_attention_heads"),
        ({"num_query_groups": 3}, "num_query_groups=3 must divide"),
        ({"topk": 9}, "topk must be in [1, num_experts=8]"),
        ({"score_function": "relu"}, "score_function must be one of"),
        ({"first_dense_layers": 2}, "first_dense_layers must be an integer in [0, num_layers=2)"),
        ({"normalization": "BatchNorm"}, "normalization must be one of"),
        ({"activation": "relu"}, "activation must be one of"),
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"pre_softmax": "yes"}, "pre_softmax must be true or false"),
        ({"skew": "zipf"}, "skew must be one of"),
        ({"skew": "olmoe", "skew_domain": "wiki"}, "skew_domain must be one of"),
        ({"skew": "olmoe", "normalization": "RMSNorm"}, "skew needs normalization: LayerNorm"),
        (
            {"skew": "olmoe", "hidden_size": 8, "num_attention_heads": 2},
            "skew needs num_experts (8) <= hidden_size - 2",
        ),
    ],
)
def test_invalid_values_name_the_field(changes, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**changes)
    assert message in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_model_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 64\nwidth: 3\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['width'\]"):
        load_model_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_model_config(bad)
    bad.write_text("hidden_size: [64\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_model_config(bad)
    bad.write_text("topk: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: topk must be"):
        load_model_config(bad)


def test_gate_config_follows_the_model():
    from moebalance import GateConfig

    olmoe = load_model_config("olmoe-1b-7b")
    assert olmoe.gate_config() == GateConfig(
        num_experts=64, topk=8, score_function="softmax", pre_softmax=True
    )
    sigmoid = ModelConfig(score_function="sigmoid")
    assert sigmoid.gate_config().score_function == "sigmoid"
    assert sigmoid.gate_config().num_groups is None and sigmoid.gate_config().scaling_factor is None
