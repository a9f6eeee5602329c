"""moebalance.skew on a framework-free toy model (world 1): the skew needs only the model's
forward and, per MoE layer, its pre-MLP LayerNorm and router weight.

- ``skew_profile`` has mean 1, respects the top-k cap and follows the preset's quantiles;
- ``apply_skew`` on a two-layer toy model makes vanilla top-k loads follow the profile (the
  same bounds as Megatron's skew test: correlation > 0.95, max / mean within 10% for OLMoE),
  deterministically, and refuses a norm without a bias.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moebalance import ConfigError, route
from moebalance.model_config import ModelConfig
from moebalance.skew import SkewLayer, apply_skew, skew_profile

CFG = ModelConfig(
    vocab_size=64, hidden_size=32, num_layers=2, num_experts=8, topk=2, max_sequence_length=64,
    skew="olmoe",
)


class Toy(nn.Module):
    """Embedding, then per layer: x + tanh(W x) and a pre-MLP LayerNorm feeding a router.
    Called as the frameworks' models are: model(ids [B, S], positions, mask)."""

    def __init__(self, norm=nn.LayerNorm):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embedding = nn.Embedding(CFG.vocab_size, CFG.hidden_size)
        self.mix = nn.ModuleList(nn.Linear(CFG.hidden_size, CFG.hidden_size) for _ in range(2))
        self.norms = nn.ModuleList(norm(CFG.hidden_size) for _ in range(2))
        self.routers = nn.ParameterList(
            nn.Parameter(torch.empty(CFG.num_experts, CFG.hidden_size)) for _ in range(2)
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        self.logits: list[torch.Tensor] = []

    def forward(self, ids, positions, mask):
        x = self.embedding(ids)
        self.logits = []
        for mix, norm, router in zip(self.mix, self.norms, self.routers):
            x = x + torch.tanh(mix(x))
            h = norm(x)
            self.logits.append(h.reshape(-1, h.shape[-1]) @ router.T)
        return x

    def layers(self):
        return [SkewLayer(i, self.norms[i], self.routers[i]) for i in range(2)]


def test_skew_profile_shape():
    for position in (0, 1, 2):
        load = skew_profile("olmoe", position, 8, 2)
        assert load.shape == (8,) and abs(float(load.mean()) - 1) < 1e-9
        assert float(load.max()) <= 0.95 * 8 / 2 + 1e-9
    assert not torch.equal(skew_profile("olmoe", 0, 8, 2), skew_profile("olmoe", 2, 8, 2))


def test_apply_skew_makes_vanilla_loads_follow_the_profile():
    model = Toy()
    targets = apply_skew(model, model.layers(), CFG)
    ids = torch.randint(0, CFG.vocab_size, (64, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids, None, None)
    for layer, logits in enumerate(model.logits):
        load = route("topk", logits, CFG.gate_config()).expert_load().double()
        profile = skew_profile("olmoe", 2 * layer, 8, 2)  # first and last profiled layer
        assert float(torch.corrcoef(torch.stack([load, profile]))[0, 1]) > 0.95
        assert abs(float(load.max() / load.mean()) - targets[layer]) < 0.1 * targets[layer]
    again = Toy()
    apply_skew(again, again.layers(), CFG)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_apply_skew_needs_a_layernorm_bias():
    model = Toy(norm=nn.RMSNorm)
    with pytest.raises(ConfigError, match="no bias"):
        apply_skew(model, model.layers(), CFG)
