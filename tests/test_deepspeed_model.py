"""deepspeed_patch.model, deepspeed_patch.instrument and ``infer.py --framework deepspeed``.

- The DeepSpeed GPT-MoE loads the Megatron GPT-MoE's weights (``megatron_state=``, canonical
  names) and then computes the same logits (float32 tolerance) at world 1 and world 2 (EP 2,
  gloo): full causal forward, a left-padded prefill with padding routed nowhere, and greedy
  generation with the KV cache through the harness's shared loop. Variants at world 1 cover GQA,
  RMSNorm, SwiGLU, a dense first layer, shared experts, tied embeddings and a sigmoid gate.
- Without given weights ``build_model`` initialises and skews the DeepSpeed model itself, with
  no Megatron: an unskewed random init equals the Megatron model's tensor for tensor (same
  canonical names, same seeds); the skewed model's vanilla loads follow the preset profile as
  closely as the Megatron model's do. Canonical safetensors checkpoints move both ways: saved
  from the Megatron model at EP 2, loaded by DeepSpeed (``--checkpoint``), and back.
- End to end under torchrun (2 ranks): LASER vs vanilla on the skewed tiny model writes the
  same JSON schema as the Megatron path (every layer, rank and step; physical bounds) with LASER
  lower in per-rank imbalance and MV, with ``--uneven`` prompts (one launch); on the same
  weights (the unskewed random init) both frameworks route and generate identically.
"""

from __future__ import annotations

import json

import pytest

from mp_utils import run_workers

pytestmark = pytest.mark.slow

SMALL = dict(
    vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
    num_experts=8, topk=2, max_sequence_length=64,
)
VARIANT = dict(
    SMALL, num_layers=3, num_query_groups=2, activation="swiglu", normalization="RMSNorm",
    first_dense_layers=1, shared_expert_ffn_hidden_size=48, tie_embeddings=True,
    score_function="sigmoid",
)
TOLERANCE = 1e-5  # float32; logits are O(1)


def _megatron_groups(ep_size):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    from megatron_patch.cpu_shims import apply_cpu_shims

    apply_cpu_shims()
    parallel_state.initialize_model_parallel(
        expert_model_parallel_size=ep_size, create_gloo_process_groups=False
    )
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def _compare(mg, ds, cfg, rank):
    """max |logits difference| for a causal forward and a padded prefill, and whether greedy
    generation with the KV cache (the harness's loop) gives the same tokens."""
    import torch

    from moebalance.harness import get_framework
    from moebalance.harness.generate import generate
    from moebalance.telemetry import MoERecorder

    B, S = 3, 12
    gen = torch.Generator().manual_seed(5 + rank)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None].expand(B, 1, S, S)
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, :4] = True  # left padding, as the harness does
    pad[2, :7] = True
    padded_mask = mask | pad[:, None, None, :]
    out = {}
    with torch.no_grad():
        out["causal"] = float((mg(ids, pos, mask) - ds(ids, pos, mask)).abs().max())
        a = mg(ids, pos, padded_mask, padding_mask=pad)
        b = ds(ids, pos, padded_mask, padding_mask=pad)
        out["padded"] = float((a - b)[~pad].abs().max())  # padding rows: anything goes
    tokens = {}
    for name, model in (("megatron", mg), ("deepspeed", ds)):
        recorder = MoERecorder("cpu")
        result = generate(get_framework(name), model, ids, pad, 6, recorder, warmup=False)
        tokens[name] = result["tokens"].tolist()
    out["same_tokens"] = tokens["megatron"] == tokens["deepspeed"]
    return out


def _logits_worker(rank, world, cases):
    from deepspeed_patch.model import build_model, init_distributed
    from megatron_patch.model import build_model as build_megatron, canonical_names
    from moebalance.model_config import ModelConfig

    setup = init_distributed()
    _megatron_groups(setup.ep_size)
    out = {}
    for name, fields in cases.items():
        cfg = ModelConfig(**fields)
        mg = build_megatron(cfg, ep_size=setup.ep_size)
        state = mg.state_dict()
        canonical = {c: state[k] for k, c in canonical_names(mg).items()}
        ds = build_model(cfg, ep_size=setup.ep_size, megatron_state=canonical)
        out[name] = _compare(mg, ds, cfg, rank)
        out[name]["instrument"] = _instrument_case(ds, cfg)
    return out


def _instrument_case(model, cfg):
    """One recorded forward: a record per MoE layer with every range timed and the loads
    adding up; ``remove()`` leaves no wrapper behind."""
    import torch

    from deepspeed_patch.instrument import instrument
    from moebalance.telemetry import RANGES, MoERecorder

    recorder = MoERecorder("cpu")
    handle = instrument(model, recorder)
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    recorder.begin_step("prefill")
    with torch.no_grad():
        model(ids)
    recorder.end_step()
    records = recorder.records()
    handle.remove()
    wrapped = [
        m for m in model.modules() if "forward" in vars(m)  # instance-level forward = a wrapper
    ]
    return {
        "layers": [r["layer"] for r in records],
        "timed": all(r[f"{n}_ms"] > 0 for r in records for n in RANGES),
        "loads_add_up": all(
            sum(r["tokens_per_expert"]) == r["assignments"] == 20 * cfg.topk for r in records
        ),
        # one rank: the padded buffer's C is the busiest expert's count
        "capacity": all(r["capacity"] == max(r["tokens_per_expert"]) for r in records),
        "restored": not wrapped,
    }


def _vanilla_imbalance(model, framework, ids):
    """Per MoE layer: (max / mean of the EP-global vanilla top-k loads, the [E] loads) for
    ``ids`` [B, S] run through ``model`` (a causal forward)."""
    import torch
    import torch.distributed as dist

    if framework == "megatron":
        from megatron_patch import moe_layers

        routers = [layer.router for layer in moe_layers(model)]
    else:
        from deepspeed_patch import moe_gates

        routers = list(moe_gates(model))
    loads = []
    handles = [
        r.register_forward_hook(lambda m, args, out: loads.append(m.last_routing.expert_load()))
        for r in routers
    ]
    B, S = ids.shape
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None].expand(B, 1, S, S)
    with torch.no_grad():
        model(ids, torch.arange(S).unsqueeze(0).expand(B, S), mask)
    for handle in handles:
        handle.remove()
    load = torch.stack(loads).double()  # [layers, E]
    dist.all_reduce(load)
    return (load.max(dim=1)[0] / load.mean(dim=1)).tolist(), load.tolist()


def _skew_worker(rank, world, checkpoints):
    """At EP 2: the DeepSpeed model's own initialisation against the Megatron model's (unskewed:
    identical; skewed: loads as close to the profile), the Megatron model's weights handed over
    (identical weights and logits), and canonical checkpoints in both directions."""
    import torch
    import torch.distributed as dist

    from deepspeed_patch.model import (
        build_model, canonical_state, init_distributed, megatron_to_deepspeed, save_checkpoint,
    )
    from megatron_patch.model import build_model as build_megatron, canonical_names
    from megatron_patch.model import save_checkpoint as save_megatron
    from moebalance.model_config import ModelConfig
    from moebalance.skew import skew_profile

    setup = init_distributed()
    _megatron_groups(world)
    out = {}

    def megatron_canonical(model):
        state = model.state_dict()
        return {c: state[k] for k, c in canonical_names(model).items()}

    # Unskewed random init: the same tensors, built without any Megatron help.
    cfg = ModelConfig(**SMALL)
    mine = canonical_state(build_model(cfg, ep_size=world))
    theirs = megatron_canonical(build_megatron(cfg, ep_size=world))
    out["same_init"] = set(mine) == set(theirs) and all(
        torch.equal(mine[k], theirs[k]) for k in mine
    )

    # Skewed: each framework skews its own model.
    cfg = ModelConfig(**SMALL, skew="olmoe")
    mg = build_megatron(cfg, ep_size=world)
    ds_own = build_model(cfg, ep_size=world)
    ids = torch.randint(
        0, cfg.vocab_size, (64, 32), generator=torch.Generator().manual_seed(10 + rank)
    )  # 2048 tokens per rank
    out["imbalance"] = {
        "megatron": _vanilla_imbalance(mg, "megatron", ids),
        "deepspeed": _vanilla_imbalance(ds_own, "deepspeed", ids),
        "target": [float(skew_profile("olmoe", p, 8, 2).max()) for p in (0, 2)],
    }
    own = canonical_state(ds_own)
    canonical = megatron_canonical(mg)
    out["gate_difference"] = max(
        float((own[k] - canonical[k]).abs().max() / canonical[k].abs().max())
        for k in canonical if k.endswith("router.weight")
    )

    # The Megatron model's weights handed over: the same model, weight for weight.
    ds = build_model(cfg, ep_size=world, megatron_state=canonical)
    mine = ds.state_dict()
    want = megatron_to_deepspeed(canonical, num_experts=8, ep_size=world, ep_rank=setup.ep_rank)
    same_weights = set(want) == set(mine) and all(torch.equal(want[k], mine[k]) for k in want)
    out.update(same_weights=same_weights, **_compare(mg, ds, cfg, rank))

    # Checkpoints: Megatron -> DeepSpeed, and DeepSpeed -> Megatron.
    plain = cfg.replace(skew="none", init_seed=cfg.init_seed + 1)  # other weights before loading
    save_megatron(mg, checkpoints[0], cfg)
    dist.barrier()  # rank 0 wrote it
    loaded = build_model(plain, ep_size=world, checkpoint=checkpoints[0])
    out["checkpoint"] = _compare(mg, loaded, cfg, rank)
    save_checkpoint(ds_own, checkpoints[1], cfg)
    dist.barrier()
    loaded = build_megatron(plain, ep_size=world, checkpoint=checkpoints[1])
    out["checkpoint_back"] = _compare(loaded, ds_own, cfg, rank)
    return out


def test_logits_match_megatron_at_world_1_with_model_variants():
    (out,) = run_workers(_logits_worker, 1, {"small": SMALL, "variant": VARIANT}, timeout_s=240)
    for name, figures in out.items():
        assert figures["causal"] < TOLERANCE, (name, figures)
        assert figures["padded"] < TOLERANCE, (name, figures)
        assert figures["same_tokens"], name
        moe_layers = list(range(VARIANT.get("first_dense_layers", 0), VARIANT["num_layers"]))
        want = moe_layers if name == "variant" else list(range(SMALL["num_layers"]))
        assert figures["instrument"] == {
            "layers": want, "timed": True, "loads_add_up": True, "capacity": True, "restored": True
        }, name


@pytest.fixture(scope="module")
def world_2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("skew")
    checkpoints = (str(tmp / "megatron.safetensors"), str(tmp / "deepspeed.safetensors"))
    return run_workers(_skew_worker, 2, checkpoints, timeout_s=300)


def test_random_init_is_megatron_s_tensor_for_tensor(world_2):
    assert all(figures["same_init"] for figures in world_2)


def test_skewed_model_and_checkpoint_match_megatron_at_world_2(world_2):
    """Given the Megatron model's weights (in memory or as a canonical checkpoint), DeepSpeed
    serves the same model; a checkpoint of the DeepSpeed-skewed model serves the same in
    Megatron."""
    for rank, figures in enumerate(world_2):
        assert figures["same_weights"], rank
        for case in (figures, figures["checkpoint"], figures["checkpoint_back"]):
            assert case["causal"] < TOLERANCE and case["padded"] < TOLERANCE, (rank, figures)
            assert case["same_tokens"], rank


def test_deepspeed_skew_follows_the_profile_as_megatron_s_does(world_2):
    """Each framework calibrates the skew on its own forward, whose float32 arithmetic differs
    in the last bits, so the gates differ by float32 rounding carried through the calibration
    (measured: 6e-8 of the largest gate weight; 1e-5 leaves a wide margin yet catches any real
    difference in the construction) and a few near-tied top-2 choices may flip (none flipped
    when measured). The loads must then agree far more closely than either follows the profile
    (the Megatron skew test allows 10% on max / mean): max / mean within 1%, and every expert's
    load within 1% of the tokens routed per layer (2 ranks x 2048 tokens x top-2)."""
    got = world_2[0]
    assert got["gate_difference"] < 1e-5, got["gate_difference"]
    (mg_imbalance, mg_loads), (ds_imbalance, ds_loads) = (
        got["imbalance"]["megatron"], got["imbalance"]["deepspeed"],
    )
    routed = 2 * 2048 * 2
    for layer, target in enumerate(got["imbalance"]["target"]):
        assert abs(ds_imbalance[layer] - mg_imbalance[layer]) < 0.01 * mg_imbalance[layer]
        assert abs(ds_imbalance[layer] - target) < 0.1 * target  # as test_megatron_model's
        assert max(abs(a - b) for a, b in zip(ds_loads[layer], mg_loads[layer])) < 0.01 * routed


# ----------------------------------------------------------------------------- end to end

# One launch (about 35 s on 2 cores): LASER vs vanilla on the skewed tiny model, prompt lengths
# differing per prompt and per rank.
DS_LASER = dict(router="laser", batch=8, prompt_len=32, gen_len=4)


def _launch(tmp_path_factory, framework, skew="olmoe"):
    from test_infer import _options, _torchrun

    out = tmp_path_factory.mktemp(f"infer_{framework}") / "laser.json"
    _torchrun(
        *_options(DS_LASER), "--framework", framework, "--compare", "--uneven",
        "--config", "tiny", "--skew", skew, "--warmup", "0", "--eval-seqs", "0",
        "--out", str(out),
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def deepspeed_laser(tmp_path_factory):
    return _launch(tmp_path_factory, "deepspeed")


def test_infer_deepspeed_json_has_every_layer_rank_and_step(deepspeed_laser):
    from test_infer import _check_records, _check_summary

    report = deepspeed_laser
    assert report["config"]["framework"] == "deepspeed" and report["config"]["run"]["uneven"]
    env = report["environment"]
    assert env["backend"] == "gloo" and env["ep_size"] == 2 and env["deepspeed"]
    prompt_tokens = [pr["prompt_tokens"] for pr in report["runs"][0]["per_rank"]]
    assert prompt_tokens[0] != prompt_tokens[1]  # really uneven, and it completed
    assert [run["router"] for run in report["runs"]] == ["topk", "laser"]
    for run in report["runs"]:
        _check_records(report, run, DS_LASER)
        _check_summary(run)
        for phase in ("router", "dispatch", "experts", "combine"):  # every range was timed
            assert run["summary"]["all"][f"{phase}_ms"]["mean"] > 0, phase


def test_infer_deepspeed_laser_balances_better_than_vanilla(deepspeed_laser):
    runs = {run["router"]: run["summary"] for run in deepspeed_laser["runs"]}
    vanilla, balanced = runs["topk"], runs["laser"]
    assert vanilla["prefill"]["max_violation"]["p50"] > 0.5  # the skew is there
    for figure in ("rank_imbalance", "max_violation"):
        assert balanced["prefill"][figure]["p50"] < vanilla["prefill"][figure]["p50"], figure
        assert balanced["all"][figure]["mean"] < vanilla["all"][figure]["mean"], figure


def test_infer_same_routing_and_tokens_as_megatron(tmp_path_factory):
    """The same weights (the unskewed random init, which both frameworks draw identically) and
    the same command with --framework megatron and deepspeed: identical generated tokens and
    identical per-layer, per-rank, per-step loads (only the timings differ). The skewed models
    are not compared here: each framework calibrates its own skew (see above)."""
    mine = _launch(tmp_path_factory, "deepspeed", skew="none")
    megatron = _launch(tmp_path_factory, "megatron", skew="none")
    assert mine["config"]["framework"] == "deepspeed"
    assert megatron["config"]["framework"] == "megatron"
    fields = ("local_experts", "tokens_per_expert", "tokens", "assignments", "dropped")
    for ours, theirs in zip(mine["runs"], megatron["runs"], strict=True):
        assert ours["router"] == theirs["router"]
        assert [r["tokens"] for r in ours["per_rank"]] == [r["tokens"] for r in theirs["per_rank"]]

        def rows(run):
            return {
                (r["rank"], r["step"], r["layer"]): tuple(r[f] for f in fields)
                for r in run["records"]
            }

        assert rows(ours) == rows(theirs), ours["router"]
