"""Tests for moebalance.workloads: synthetic gate logits calibrated to real routing counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moebalance import workloads as wl
from moebalance.config import ConfigError, GateConfig, LaserParams
from moebalance.metrics import imbalance_ratio
from moebalance.policies import topk

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COUNTS_JSON = SHARED_DATA / "routing-stats" / "expert_counts.json"
skip_without_shared_data = pytest.mark.skipif(
    not COUNTS_JSON.is_file(), reason=f"shared routing data absent ({COUNTS_JSON})"
)

# every preset on c4; the measured models also on their skewed domains (deepseek borrows OLMoE's)
CALIBRATION_CASES = [
    (name, domain, layer)
    for name, p in wl.PRESETS.items()
    for domain in (p.domains if p.source_model else ("c4",))
    for layer in p.layers
]


def vanilla_load(logits: torch.Tensor, preset: wl.WorkloadPreset) -> torch.Tensor:
    """[E] tokens per expert under vanilla top-k."""
    return topk(logits, preset.gate()).expert_load()


@pytest.mark.parametrize("name,domain,layer", CALIBRATION_CASES)
def test_vanilla_topk_reproduces_real_imbalance(name, domain, layer):
    preset = wl.get_preset(name)
    logits = wl.generate_logits(preset, 8192, layer, seed=11, domain=domain)
    got = float(imbalance_ratio(vanilla_load(logits, preset)))
    # the fit is within ~1.5% on 262K tokens; the rest is sampling noise of 8K tokens
    assert got == pytest.approx(preset.real_imbalance(layer, domain), rel=0.10)


def test_vanilla_topk_reproduces_whole_load_profile():
    preset = wl.get_preset("olmoe")
    for domain in ("c4", "github"):
        real = preset.profile(7, domain)
        logits = wl.generate_logits(preset, 16384, 7, seed=3, domain=domain)
        load = vanilla_load(logits, preset).double()
        got = load / load.mean()
        assert int(got.argmax()) == int(real.argmax())
        # ~2% sampling noise per expert at this size; a wrong fit is off by far more
        assert float((got - real).abs().mean()) < 0.05
        near_dead = real < 0.05  # github layer 7 has two (0.013, 0.031); they stay near dead
        assert float((got * near_dead).max()) < 0.1


@pytest.mark.parametrize("name", sorted(wl.PRESETS))
def test_score_concentration_mixes_peaked_and_flat_tokens(name):
    preset = wl.get_preset(name)
    layer = preset.layers[1]
    logits = wl.generate_logits(preset, 8192, layer, seed=5)
    mass = wl.topk_mass(torch.softmax(logits, dim=1), preset.topk)
    target = preset.median_topk_mass[1]
    assert float(mass.median()) == pytest.approx(target, abs=0.03)
    eps_high = LaserParams().eps_high
    peaked = float((mass >= eps_high).float().mean())
    assert 0.05 < peaked < 0.5  # LASER routes these vanilla ...
    assert float(mass.quantile(0.25)) < target - 0.1  # ... and widens the pools of the flat ones


def test_same_seed_same_logits_other_seed_or_layer_differs():
    a = wl.generate_logits("mixtral", 512, 7, seed=1)
    assert torch.equal(a, wl.generate_logits("mixtral", 512, 7, seed=1))
    assert not torch.equal(a, wl.generate_logits("mixtral", 512, 7, seed=2))
    assert not torch.equal(a, wl.generate_logits("mixtral", 512, 15, seed=1))
    # a longer batch from the same seed is a different draw, but equally calibrated
    assert wl.generate_logits("mixtral", 1024, 7, seed=1).shape == (1024, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_shapes_dtypes_and_centring(dtype):
    preset = wl.get_preset("deepseek")
    logits = wl.generate_logits(preset, 300, 0, seed=0, dtype=dtype, device="cpu")
    assert logits.shape == (300, preset.num_experts)
    assert logits.dtype == dtype and logits.device.type == "cpu"
    assert torch.isfinite(logits).all()
    assert float(logits.double().mean(dim=1).abs().max()) < 0.05  # centred per token
    assert wl.generate_logits(preset, 0, 0).shape == (0, preset.num_experts)


def test_domain_profiles_differ():
    preset = wl.get_preset("olmoe")
    assert set(preset.domains) >= {"c4", "github", "arxiv"}
    for layer in preset.layers:
        c4, github = preset.profile(layer, "c4"), preset.profile(layer, "github")
        assert float((c4 - github).abs().mean()) > 0.2
    load_c4 = vanilla_load(wl.generate_logits(preset, 8192, 7, seed=0, domain="c4"), preset)
    load_gh = vanilla_load(wl.generate_logits(preset, 8192, 7, seed=0, domain="github"), preset)
    assert int(load_c4.argmax()) != int(load_gh.argmax())
    assert float(imbalance_ratio(load_gh)) > 2 * float(imbalance_ratio(load_c4))


def test_presets_have_documented_shapes():
    olmoe, mixtral, deepseek = (wl.get_preset(n) for n in ("olmoe", "mixtral", "deepseek"))
    assert (olmoe.num_experts, olmoe.topk) == (64, 8)
    assert (mixtral.num_experts, mixtral.topk) == (8, 2)
    assert (deepseek.num_experts, deepseek.topk) == (64, 6)
    assert deepseek.source_model is None  # its skew is assumed, not measured
    assert all(1.05 < mixtral.real_imbalance(layer) < 1.35 for layer in mixtral.layers)
    assert [round(olmoe.real_imbalance(layer), 1) for layer in olmoe.layers] == [3.0, 2.7, 2.5]
    for p in (olmoe, mixtral, deepseek):
        for domain in p.domains:
            for layer in p.layers:
                assert float(p.profile(layer, domain).mean()) == pytest.approx(1.0, abs=1e-3)


def test_presets_read_their_profiles_from_the_package_data_file():
    """The measured profiles come from ``workload_profiles.json`` beside the module (package
    data, found when installed), every float as written there."""
    import importlib.resources
    import json

    text = importlib.resources.files("moebalance").joinpath(wl.PROFILES_FILE).read_text()
    data = json.loads(text)
    assert "allenai/OLMoE" in data["about"]  # the source of the numbers is named in the file
    for preset in wl.PRESETS.values():
        model = preset.source_model or "olmoe-1b-7b-0924"  # deepseek borrows OLMoE's
        table = data["models"][model]
        assert preset.domains == tuple(table) and preset.layers == tuple(data["layers"])
        for domain, profiles in table.items():
            for layer, profile in zip(data["layers"], profiles):
                assert preset.profile(layer, domain).tolist() == profile


def test_unknown_names_raise_config_error_listing_choices():
    with pytest.raises(ConfigError, match="deepseek.*mixtral.*olmoe"):
        wl.get_preset("qwen")
    with pytest.raises(ConfigError, match="layers"):
        wl.generate_logits("olmoe", 16, layer=3)
    with pytest.raises(ConfigError, match="domains"):
        wl.generate_logits("olmoe", 16, layer=0, domain="poetry")
    with pytest.raises(ConfigError, match="num_tokens"):
        wl.generate_logits("olmoe", -1)


def test_workload_from_counts_follows_any_count_vector():
    counts = torch.arange(1, 17, dtype=torch.float64) * 1000  # a ramp over 16 experts
    logits = wl.workload_from_counts(counts, topk=4, num_tokens=16384, seed=7)
    assert logits.shape == (16384, 16)
    assert torch.equal(logits, wl.workload_from_counts(counts, topk=4, num_tokens=16384, seed=7))
    load = topk(logits, GateConfig(num_experts=16, topk=4)).expert_load()
    got, want = load.double() / load.sum(), counts / counts.sum()
    assert torch.allclose(got, want, rtol=0.1)


def test_workload_from_counts_rejects_impossible_counts():
    with pytest.raises(ConfigError, match="1/2"):  # one expert in every token's top-2 twice over
        wl.workload_from_counts(torch.tensor([10.0, 1.0, 1.0, 1.0]), topk=2, num_tokens=8)
    with pytest.raises(ConfigError, match="non-negative"):
        wl.workload_from_counts(torch.tensor([1.0, -1.0, 1.0, 1.0]), topk=2, num_tokens=8)
    with pytest.raises(ConfigError, match="median_topk_mass"):
        wl.workload_from_counts(torch.ones(8), topk=2, num_tokens=8, median_topk_mass=0.2)


def test_load_expert_counts_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shared data"):
        wl.load_expert_counts(tmp_path / "nope.json")


@pytest.mark.needs_shared_data
@skip_without_shared_data
def test_profile_file_matches_the_real_counts():
    for preset in wl.PRESETS.values():
        model = preset.source_model
        if model is None:
            continue
        for domain in preset.domains:
            counts = wl.load_expert_counts(COUNTS_JSON, model, domain)
            assert sorted(counts) == list(preset.layers)
            for layer in preset.layers:
                real = counts[layer].double()
                rounded = [float(f"{x:.4g}") for x in (real / real.mean()).tolist()]
                stored = preset.profile(layer, domain).tolist()
                assert rounded == stored, (preset.name, domain, layer)


@pytest.mark.needs_shared_data
@skip_without_shared_data
def test_real_counts_drive_workload_from_counts():
    counts = wl.load_expert_counts(COUNTS_JSON, "olmoe-1b-7b-0924", "wikipedia")[7]
    real = float(imbalance_ratio(counts))
    logits = wl.workload_from_counts(counts, topk=8, num_tokens=8192, seed=0)
    got = float(imbalance_ratio(topk(logits, wl.get_preset("olmoe").gate()).expert_load()))
    assert got == pytest.approx(real, rel=0.10)
    with pytest.raises(ConfigError, match="choose one of"):
        wl.load_expert_counts(COUNTS_JSON, "gpt-oss", "c4")
