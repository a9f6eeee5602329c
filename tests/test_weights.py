"""moebalance.weights without a framework (world 1, no process group).

- ``seed_for`` gives reproducible, name-dependent seeds; ``init_weights`` draws each matrix
  from its canonical name only (order and other parameters do not matter), with the output
  projections' scaled std, norm weights 1 and biases 0;
- a canonical checkpoint round-trips through ``save_checkpoint`` / ``load_checkpoint`` (another
  rank's experts in the file are accepted), a file of another shape or with other keys is
  refused, and ``check_checkpoint_file`` checks the header against a model config.
"""

from __future__ import annotations

import math

import pytest
import torch

from moebalance import ConfigError
from moebalance.model_config import ModelConfig
from moebalance.weights import (
    TORCH_DTYPES,
    check_checkpoint_file,
    init_weights,
    load_checkpoint,
    load_state,
    save_checkpoint,
    seed_for,
)

CFG = ModelConfig(num_layers=2, hidden_size=64, num_experts=4)
EXPERT = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc1.weight"


def _params():
    return {
        "embedding.word_embeddings.weight": torch.nn.Parameter(torch.empty(256, 64)),
        "decoder.layers.0.self_attention.linear_proj.weight": torch.nn.Parameter(
            torch.empty(64, 64)
        ),
        "decoder.layers.0.input_layernorm.weight": torch.nn.Parameter(torch.empty(64)),
        "decoder.layers.0.input_layernorm.bias": torch.nn.Parameter(torch.empty(64)),
        EXPERT.format(3): torch.nn.Parameter(torch.empty(128, 64, dtype=torch.bfloat16)),
    }


def test_seed_for_is_reproducible_and_name_dependent():
    assert seed_for(1234, "a") == seed_for(1234, "a")
    assert len({seed_for(1234, "a"), seed_for(1234, "b"), seed_for(1235, "a")}) == 3
    assert 0 <= seed_for(2**62, "x") < 2**63
    assert TORCH_DTYPES["bfloat16"] is torch.bfloat16


def test_init_weights_depends_on_the_canonical_name_only():
    full, alone = _params(), _params()
    init_weights(full, CFG)
    key = EXPERT.format(3)
    init_weights({key: alone[key]}, CFG)  # another rank, holding only this expert
    assert torch.equal(full[key], alone[key]) and full[key].dtype == torch.bfloat16
    renamed = {EXPERT.format(2): torch.nn.Parameter(torch.empty(128, 64, dtype=torch.bfloat16))}
    init_weights(renamed, CFG)
    assert not torch.equal(renamed[EXPERT.format(2)], full[key])  # another expert, other draw
    emb = full["embedding.word_embeddings.weight"].detach()
    proj = full["decoder.layers.0.self_attention.linear_proj.weight"].detach()
    assert abs(float(emb.std()) - 0.02) < 0.002
    assert abs(float(proj.std()) - 0.02 / math.sqrt(4)) < 0.002  # 1 / sqrt(2 num_layers)
    assert torch.equal(full["decoder.layers.0.input_layernorm.weight"], torch.ones(64))
    assert torch.equal(full["decoder.layers.0.input_layernorm.bias"], torch.zeros(64))


def _checkpoint_state():
    H, F = CFG.hidden_size, CFG.expert_ffn_hidden_size
    state = {
        "embedding.word_embeddings.weight": torch.randn(CFG.vocab_size, H),
        "output_layer.weight": torch.randn(CFG.vocab_size, H),
    }
    for layer in CFG.moe_layer_indices:
        state[f"decoder.layers.{layer}.mlp.router.weight"] = torch.randn(CFG.num_experts, H)
        for e in range(CFG.num_experts):
            prefix = f"decoder.layers.{layer}.mlp.experts.local_experts.{e}"
            state[f"{prefix}.linear_fc1.weight"] = torch.randn(F, H)
            state[f"{prefix}.linear_fc2.weight"] = torch.randn(H, F)
    return state


def test_checkpoint_round_trip_and_refusals(tmp_path):
    path = tmp_path / "model.safetensors"
    full = _checkpoint_state()
    save_checkpoint(full, path, CFG)
    check_checkpoint_file(path, CFG)
    # EP rank 1 of 2: experts 2, 3 under local indices 0, 1 (model key -> canonical key).
    names = {k: k for k in full if ".local_experts." not in k}
    for layer in CFG.moe_layer_indices:
        for local, e in enumerate((2, 3)):
            for fc in ("linear_fc1", "linear_fc2"):
                local_key = f"decoder.layers.{layer}.mlp.experts.local_experts.{local}.{fc}.weight"
                names[local_key] = local_key.replace(f"experts.{local}.", f"experts.{e}.")
    target = {k: torch.zeros_like(full[c]) for k, c in names.items()}
    load_checkpoint(path, target, names, CFG.num_experts)
    assert all(torch.equal(target[k], full[c]) for k, c in names.items())
    load_state(target, names, full, CFG.num_experts)  # the same from memory

    with pytest.raises(ConfigError, match="1 missing"):
        load_state(target, {**names, "extra.weight": "extra.weight"}, full, CFG.num_experts)
    with pytest.raises(ConfigError, match="1 unexpected"):
        load_state(target, names, {**full, "stray.weight": torch.zeros(1)}, CFG.num_experts)
    wrong = dict(target, **{"output_layer.weight": torch.zeros(3, 3)})
    with pytest.raises(ConfigError, match="has shape"):
        load_checkpoint(path, wrong, names, CFG.num_experts)
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors", target, names, CFG.num_experts)
    with pytest.raises(ConfigError, match="num_experts=8"):
        check_checkpoint_file(path, CFG.replace(num_experts=8))
    with pytest.raises(ConfigError, match="num_layers=3"):
        check_checkpoint_file(path, CFG.replace(num_layers=3))
    with pytest.raises(ConfigError, match="expects"):
        check_checkpoint_file(path, CFG.replace(ffn_hidden_size=64))
