"""deepspeed_patch.model, deepspeed_patch.instrument and ``infer.py --framework deepspeed``.

- The DeepSpeed GPT-MoE loads the Megatron GPT-MoE's weights (``megatron_to_deepspeed``) and
  then computes the same logits (float32 tolerance) at world 1 and world 2 (EP 2, gloo): full
  causal forward, a left-padded prefill with padding routed nowhere, and greedy generation with
  the KV cache through infer.py's shared loop. Variants at world 1 cover GQA, RMSNorm, SwiGLU,
  a dense first layer, shared experts, tied embeddings and a sigmoid gate.
- Without given weights ``build_model`` takes the Megatron model's own initialisation and skew:
  the skewed synthetic model is identical in both frameworks; a canonical safetensors
  checkpoint saved from the Megatron model at EP 2 loads into the DeepSpeed model (``--checkpoint``).
- End to end under torchrun (2 ranks): LASER vs vanilla on the skewed tiny model writes the
  same JSON schema as the Megatron path (every layer, rank and step; physical bounds) with LASER
  lower in per-rank imbalance and MV, with ``--uneven`` prompts (one launch).
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
    generation with the KV cache (infer.py's loop) gives the same tokens."""
    import importlib.util
    from pathlib import Path

    import torch

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
    spec = importlib.util.spec_from_file_location(
        "infer", Path(__file__).resolve().parents[1] / "scripts" / "infer.py"
    )
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    tokens = {}
    for name, model in (("megatron", mg), ("deepspeed", ds)):
        recorder = MoERecorder("cpu")
        result = infer.generate(model, ids, pad, 6, recorder, warmup=False, framework=name)
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


def _skew_worker(rank, world, checkpoint):
    """DeepSpeed model built first, on its own (Megatron init + skew inside), then the Megatron
    model of the harness: the same weights and logits. Then the Megatron model saved as a
    canonical safetensors checkpoint loads into a DeepSpeed model with other weights."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from deepspeed_patch.model import build_model, init_distributed, megatron_to_deepspeed
    from megatron_patch.model import build_model as build_megatron, canonical_names
    from megatron_patch.model import save_checkpoint
    from moebalance.model_config import ModelConfig

    setup = init_distributed()
    cfg = ModelConfig(**SMALL, skew="olmoe")
    ds = build_model(cfg, ep_size=world)
    assert not parallel_state.model_parallel_is_initialized()  # torn down again
    _megatron_groups(world)
    mg = build_megatron(cfg, ep_size=world)
    state = mg.state_dict()
    canonical = {c: state[k] for k, c in canonical_names(mg).items()}
    mine = ds.state_dict()
    want = megatron_to_deepspeed(canonical, num_experts=8, ep_size=world, ep_rank=setup.ep_rank)
    same_weights = set(want) == set(mine) and all(torch.equal(want[k], mine[k]) for k in want)
    out = {"same_weights": same_weights, **_compare(mg, ds, cfg, rank)}
    save_checkpoint(mg, checkpoint, cfg)
    dist.barrier()  # rank 0 wrote it
    other = cfg.replace(skew="none", init_seed=cfg.init_seed + 1)
    loaded = build_model(other, ep_size=world, checkpoint=checkpoint)
    out["checkpoint"] = _compare(mg, loaded, cfg, rank)
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


def test_skewed_model_and_checkpoint_match_megatron_at_world_2(tmp_path):
    checkpoint = str(tmp_path / "skewed.safetensors")
    for rank, figures in enumerate(run_workers(_skew_worker, 2, checkpoint, timeout_s=240)):
        assert figures["same_weights"], rank
        for case in (figures, figures["checkpoint"]):
            assert case["causal"] < TOLERANCE and case["padded"] < TOLERANCE, (rank, figures)
            assert case["same_tokens"], rank


# ----------------------------------------------------------------------------- end to end

# One launch (about 35 s on 2 cores): LASER vs vanilla on the skewed tiny model, prompt lengths
# differing per prompt and per rank.
DS_LASER = dict(router="laser", batch=8, prompt_len=32, gen_len=4)


def _launch(tmp_path_factory, framework):
    from test_infer import _options, _torchrun

    out = tmp_path_factory.mktemp(f"infer_{framework}") / "laser.json"
    _torchrun(
        *_options(DS_LASER), "--framework", framework, "--compare", "--uneven",
        "--config", "tiny", "--skew", "olmoe", "--warmup", "0", "--eval-seqs", "0",
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


def test_infer_same_routing_and_tokens_as_megatron(deepspeed_laser, tmp_path_factory):
    """The same command with --framework megatron: identical generated tokens and identical
    per-layer, per-rank, per-step loads (only the timings differ)."""
    megatron = _launch(tmp_path_factory, "megatron")
    assert megatron["config"]["framework"] == "megatron"
    fields = ("local_experts", "tokens_per_expert", "tokens", "assignments", "dropped")
    for mine, theirs in zip(deepspeed_laser["runs"], megatron["runs"], strict=True):
        assert mine["router"] == theirs["router"]
        assert [r["tokens"] for r in mine["per_rank"]] == [r["tokens"] for r in theirs["per_rank"]]

        def rows(run):
            return {
                (r["rank"], r["step"], r["layer"]): tuple(r[f] for f in fields)
                for r in run["records"]
            }

        assert rows(mine) == rows(theirs), mine["router"]
