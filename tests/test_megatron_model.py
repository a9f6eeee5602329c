"""megatron_patch.model and megatron_patch.instrument on real gloo ranks (one spawn per world).

Each world (1, 2) builds models inside the ranks and returns plain numbers:

- the shipped presets (Mixtral, OLMoE, DeepSeek-MoE shapes) scaled down (width, depth, vocab)
  but keeping their structure (GQA, RMSNorm, SwiGLU, QK-norm, pre-softmax, shared experts, a
  dense first layer) build and run a forward (world 1);
- the deterministic initialisation is EP-invariant: the same tiny config gives the same logits
  at EP 1 and EP 2;
- a safetensors checkpoint saved at EP 2 and loaded into a model with other weights reproduces
  the logits; a checkpoint of another shape is refused;
- the skew makes vanilla routing imbalanced in the direction of the preset profile, and the
  unskewed random model routes almost uniformly;
- ``instrument`` records every MoE layer and ``remove`` restores the layers exactly.
"""

from __future__ import annotations

import pytest

from mp_utils import run_workers

pytestmark = pytest.mark.slow

TINY = dict(
    vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
    num_experts=8, topk=2, max_sequence_length=64,
)


def _tokens(batch=3, seq=12, vocab=64, seed=5):
    import torch

    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    import torch

    B, S = ids.shape
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None].expand(B, 1, S, S)
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    with torch.no_grad():
        return model(ids, pos, mask)


def _vanilla_load(model, ids):
    """[layers, E] tokens per expert of vanilla routing, summed over the EP group."""
    import torch
    import torch.distributed as dist

    from megatron_patch import moe_layers

    loads = []
    handles = []
    for layer in moe_layers(model):
        def hook(module, args, output, store=loads):
            store.append(output[1].sum(dim=0).double())

        handles.append(layer.router.register_forward_hook(hook))
    _logits(model, ids)
    for h in handles:
        h.remove()
    load = torch.stack(loads)
    dist.all_reduce(load)
    return load


def _presets_case():
    from megatron_patch.model import build_model
    from moebalance.model_config import load_model_config

    out = {}
    for name in ("mixtral-8x7b", "olmoe-1b-7b", "deepseek-moe-16b"):
        real = load_model_config(name)
        small = real.replace(
            vocab_size=128, hidden_size=64, num_attention_heads=4,
            num_query_groups=2 if real.num_query_groups else None,
            num_layers=2 + real.first_dense_layers, ffn_hidden_size=96, moe_ffn_hidden_size=32,
            num_experts=min(real.num_experts, 16), topk=min(real.topk, 4),
            shared_expert_ffn_hidden_size=64 if real.shared_expert_ffn_hidden_size else None,
            max_sequence_length=64, dtype="float32",
        )
        model = build_model(small, ep_size=1)
        logits = _logits(model, _tokens(vocab=128))
        names = [n for n, _ in model.named_parameters()]
        out[name] = {
            "shape": list(logits.shape),
            "finite": bool(logits.isfinite().all()),
            "shared_experts": any(".shared_experts." in n for n in names),
            "dense_layer_0": not any(n.startswith("decoder.layers.0.mlp.router") for n in names),
            "qk_norm": any("q_layernorm" in n for n in names),
            "rms_norm": getattr(model.decoder.layers[-1].pre_mlp_layernorm, "bias", None) is None,
        }
    return out


def _ep_invariance_case(world):
    from megatron_patch.model import ModelConfig, build_model

    model = build_model(ModelConfig(**TINY), ep_size=world)
    return _logits(model, _tokens()).tolist()


def _checkpoint_case(world, rank, path):
    import torch

    from megatron_patch.model import ModelConfig, build_model, load_checkpoint, save_checkpoint
    from moebalance import ConfigError

    cfg = ModelConfig(**TINY)
    source = build_model(cfg, ep_size=world)
    ids = _tokens(seed=rank)
    want = _logits(source, ids)
    save_checkpoint(source, path, cfg)
    torch.distributed.barrier()  # rank 0 wrote the file
    other = build_model(cfg.replace(init_seed=99), ep_size=world)
    changed = not torch.equal(_logits(other, ids), want)
    load_checkpoint(other, path)
    loaded = build_model(cfg, ep_size=world, checkpoint=path)
    wrong = build_model(cfg.replace(ffn_hidden_size=48), ep_size=world)
    try:
        load_checkpoint(wrong, path)
        refused = False
    except ConfigError:
        refused = True
    return {
        "changed_before_load": changed,
        "reloaded_equal": torch.equal(_logits(other, ids), want),
        "built_from_checkpoint_equal": torch.equal(_logits(loaded, ids), want),
        "wrong_shape_refused": refused,
    }


def _skew_case(world, rank):
    import torch

    from megatron_patch.model import ModelConfig, build_model, skew_profile

    ids = _tokens(batch=64, seq=32, seed=10 + rank)  # 2048 tokens per rank
    out = {}
    for skew in ("none", "olmoe", "mixtral"):
        cfg = ModelConfig(**TINY, skew=skew)
        load = _vanilla_load(build_model(cfg, ep_size=world), ids)
        profiles = [
            skew_profile(skew, p, 8, 2) if skew != "none" else torch.ones(8) for p in (0, 2)
        ]
        out[skew] = {
            "imbalance": (load.max(dim=1)[0] / load.mean(dim=1)).tolist(),
            "target": [float(p.max()) for p in profiles],  # first, last profiled layer
            "correlation": [
                float(torch.corrcoef(torch.stack([load[i], p.double()]))[0, 1])
                for i, p in enumerate(profiles)
            ] if skew != "none" else [],
        }
    return out


def _instrument_case(world, rank):
    import torch

    from megatron_patch import moe_layers
    from megatron_patch.instrument import instrument
    from megatron_patch.model import ModelConfig, build_model
    from moebalance.telemetry import RANGES, MoERecorder

    model = build_model(ModelConfig(**TINY, skew="olmoe"), ep_size=world, router="token_drop")
    ids = _tokens(seed=rank)
    want = _logits(model, ids)
    before = [dict(vars(layer)) for layer in moe_layers(model)]
    recorder = MoERecorder("cpu", rank=rank, ep_rank=rank, nvtx_ranges=False)
    handle = instrument(model, recorder)
    recorder.begin_step("prefill")
    got = _logits(model, ids)
    recorder.end_step()
    handle.remove()
    after = [dict(vars(layer)) for layer in moe_layers(model)]
    rows = recorder.records()
    return {
        "same_output": torch.equal(got, want),
        "layers": [r["layer"] for r in rows],
        "tokens": [r["tokens"] for r in rows],
        "assignments": [r["assignments"] for r in rows],
        "dropped": [r["dropped"] for r in rows],
        "received": [sum(r["tokens_per_expert"]) for r in rows],
        "local_experts": [r["local_experts"] for r in rows],
        "times_positive": all(r[f"{n}_ms"] > 0 for r in rows for n in RANGES),
        "restored": [set(b) == set(a) for b, a in zip(before, after)],
    }


def _rank_main(rank, world, tmp):
    import os
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from megatron_patch.model import destroy_distributed, init_distributed

    setup = init_distributed(world, timeout_s=90)
    try:
        results = {"setup": [setup.rank, setup.ep_size, setup.ep_rank, setup.backend]}
        if world == 1:
            results["presets"] = _presets_case()
        results["ep_invariance"] = _ep_invariance_case(world)
        if world == 2:
            path = os.path.join(tmp, "tiny.safetensors")
            results["checkpoint"] = _checkpoint_case(world, rank, path)
            results["instrument"] = _instrument_case(world, rank)
        results["skew"] = _skew_case(world, rank)
    finally:
        destroy_distributed()
    return results


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("model"))
    return {world: run_workers(_rank_main, world, tmp, timeout_s=300) for world in (1, 2)}


def test_setup_reports_ep_groups(worlds):
    assert worlds[1][0]["setup"] == [0, 1, 0, "gloo"]
    assert [r["setup"] for r in worlds[2]] == [[0, 2, 0, "gloo"], [1, 2, 1, "gloo"]]


@pytest.mark.parametrize("name", ["mixtral-8x7b", "olmoe-1b-7b", "deepseek-moe-16b"])
def test_preset_structures_build_and_run(worlds, name):
    got = worlds[1][0]["presets"][name]
    assert got["shape"] == [3, 12, 128] and got["finite"]
    assert got["rms_norm"]
    assert got["shared_experts"] == (name == "deepseek-moe-16b")
    assert got["dense_layer_0"] == (name == "deepseek-moe-16b")
    assert got["qk_norm"] == (name == "olmoe-1b-7b")


def test_initialisation_is_ep_invariant(worlds):
    import torch

    ep1 = torch.tensor(worlds[1][0]["ep_invariance"])
    for rank in (0, 1):
        assert torch.allclose(torch.tensor(worlds[2][rank]["ep_invariance"]), ep1, atol=1e-5)


def test_checkpoint_roundtrip(worlds):
    for rank in (0, 1):
        got = worlds[2][rank]["checkpoint"]
        assert got == {
            "changed_before_load": True,
            "reloaded_equal": True,
            "built_from_checkpoint_equal": True,
            "wrong_shape_refused": True,
        }


def test_skew_creates_the_preset_imbalance(worlds):
    for world in (1, 2):
        skew = worlds[world][0]["skew"]
        for preset, correlation, tolerance in (("olmoe", 0.95, 0.1), ("mixtral", 0.85, 0.15)):
            got = skew[preset]
            # vanilla loads follow the profile expert by expert ...
            assert min(got["correlation"]) > correlation, (preset, got)
            # ... and their max / mean is near the profile's (approximate by design)
            for measured, target in zip(got["imbalance"], got["target"]):
                assert abs(measured - target) / target < tolerance, (preset, measured, target)
        # random gates have some skew of their own, far below OLMoE's
        assert max(skew["none"]["imbalance"]) < 1.6
        assert min(skew["olmoe"]["imbalance"]) > 2.0


def test_instrument_records_every_layer_and_restores(worlds):
    for rank in (0, 1):
        got = worlds[2][rank]["instrument"]
        assert got["same_output"]
        assert got["layers"] == [0, 1]
        assert got["tokens"] == [36, 36]  # 3 x 12 tokens, no padding
        assert got["times_positive"]
        assert got["local_experts"] == [[4 * rank + i for i in range(4)]] * 2
        assert all(got["restored"])
        for a, d in zip(got["assignments"], got["dropped"]):
            assert a == 36 * 2 - d  # token drop: top-k minus drops
        assert sum(got["dropped"]) > 0  # the skewed layers overflow capacity 1.5
    # what the ranks received is what the ranks sent
    sent = [sum(worlds[2][r]["instrument"]["assignments"][i] for r in (0, 1)) for i in (0, 1)]
    received = [sum(worlds[2][r]["instrument"]["received"][i] for r in (0, 1)) for i in (0, 1)]
    assert sent == received
