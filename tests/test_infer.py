"""scripts/infer.py end to end: torchrun at 2 ranks on gloo, the JSON it writes, lockstep with
uneven prompts, a balancing router beating vanilla top-k in the same run, option errors.

Multi-process launches (about 15-25 s each on 2 cores, mostly imports):

- ``uneven``: expanded drop vs vanilla (``--compare``), prompt lengths differing per prompt and
  per rank, alltoall dispatcher; every record checked against physical bounds;
- ``laser``: LASER vs vanilla on the OLMoE-skewed tiny model, allgather dispatcher: LASER's
  per-rank imbalance, MV and the busiest rank's prefill tokens (figures from the JSON) come out
  lower.

Failing, frozen and killed ranks: tests/test_faults.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moebalance import telemetry, telemetry_stats
from moebalance.model_config import load_model_config, model_config_presets, trained_checkpoint
from moebalance.policies import POLICIES

ROOT = Path(__file__).resolve().parents[1]
INFER = ROOT / "scripts" / "infer.py"
NPROC = 2
LAUNCH_TIMEOUT_S = 240

UNEVEN = dict(router="expanded_drop", batch=4, prompt_len=24, gen_len=5)
LASER = dict(router="laser", batch=16, prompt_len=64, gen_len=3)


def _options(run: dict) -> list[str]:
    return [
        "--router", run["router"], "--batch", str(run["batch"]),
        "--prompt-len", str(run["prompt_len"]), "--gen-len", str(run["gen_len"]),
    ]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(NPROC), str(INFER), *args,
    ]
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout}\n{done.stderr[-6000:]}"
    return done


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "uneven.json"
    # the demo's run file through torchrun, flags and --set on top of it
    done = _torchrun(
        "--run-config", "demo", *_options(UNEVEN), "--uneven", "--set", "warmup=1",
        "--out", str(out),
    )
    return json.loads(out.read_text()), done.stdout


@pytest.fixture(scope="module")
def laser(tmp_path_factory):
    out = tmp_path_factory.mktemp("infer") / "laser.json"
    _torchrun(
        *_options(LASER), "--compare", "--config", "tiny", "--skew", "olmoe",
        "--dispatcher", "allgather", "--warmup", "1", "--out", str(out),
    )
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- JSON checks


def _check_records(report: dict, run: dict, spec: dict) -> None:
    """Every (step, layer) has every rank, and every figure is physically possible."""
    model = report["config"]["model"]
    E, k = model["num_experts"], model["topk"]
    ep = report["environment"]["ep_size"]
    moe_layers = set(range(model["first_dense_layers"], model["num_layers"]))
    records = run["records"]
    prompt_tokens = {r: pr["prompt_tokens"] for r, pr in enumerate(run["per_rank"])}

    by_key: dict = {}
    for r in records:
        by_key.setdefault((r["step"], r["layer"]), []).append(r)
    steps = sorted({step for step, _ in by_key})
    assert len(steps) == spec["gen_len"]  # one prefill + gen_len - 1 decode steps
    for step in steps:
        assert {layer for s, layer in by_key if s == step} == moe_layers
    for (step, layer), rows in by_key.items():
        assert sorted(r["rank"] for r in rows) == list(range(NPROC)), (step, layer)
        phase = "prefill" if step == steps[0] else "decode"
        received = sum(sum(r["tokens_per_expert"]) for r in rows)
        assert received == sum(r["assignments"] for r in rows)  # tokens arrive where sent
        for r in rows:
            assert r["phase"] == phase and not r["warmup"]
            assert all(r[f"{n}_ms"] >= 0 for n in telemetry.RANGES)
            n_local = E // ep
            first = r["ep_rank"] * n_local
            assert r["local_experts"] == list(range(first, first + n_local))
            assert len(r["tokens_per_expert"]) == n_local and min(r["tokens_per_expert"]) >= 0
            # padding is routed nowhere: prefill routes exactly the real prompt tokens
            want_tokens = prompt_tokens[r["rank"]] if phase == "prefill" else spec["batch"]
            assert r["tokens"] == want_tokens
            assert 0 <= r["dropped"] <= r["tokens"] * k
            if run["router"] == "expanded_drop":
                assert r["assignments"] >= r["tokens"] * k - r["dropped"]
            else:  # loads sum to tokens x k minus drops
                assert r["assignments"] == r["tokens"] * k - r["dropped"]
            if run["router"] == "topk" or phase == "decode" and run["router"] == "expanded_drop":
                # vanilla, and prefill-only policies in decode steps (the decode flag)
                assert r["dropped"] == 0 and r["assignments"] == r["tokens"] * k


def _check_summary(run: dict) -> None:
    for phase in ("all", "prefill", "decode"):
        s = run["summary"][phase]
        assert s["samples"] > 0
        assert 0 <= s["straggler_ms"]["p50"] <= s["straggler_ms"]["p95"] <= s["straggler_ms"]["max"]
        assert 1 <= s["rank_imbalance"]["p50"] <= s["rank_imbalance"]["p95"]
        assert 0 <= s["max_violation"]["p50"] <= s["max_violation"]["p95"]
        assert 0 <= s["dropped_fraction"] <= 1
    # the summary's straggler is max - mean of the records' expert times
    samples = telemetry_stats.join_ranks(run["records"])
    stragglers = [max(t) - sum(t) / len(t) for t in (s["experts_ms"] for s in samples)]
    want = telemetry_stats.percentile(stragglers, 50)
    assert run["summary"]["all"]["straggler_ms"]["p50"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    e2e = run["end_to_end"]
    assert e2e["prefill_ms"] > 0 and e2e["decode_ms_per_token"] > 0
    assert e2e["tokens_per_s"] > 0 and e2e["peak_memory_mib"] > 0


def test_uneven_prompts_complete_and_json_is_complete(uneven):
    report, stdout = uneven
    assert [run["router"] for run in report["runs"]] == ["topk", "expanded_drop"]
    env = report["environment"]
    assert env["world_size"] == NPROC and env["ep_size"] == NPROC and env["backend"] == "gloo"
    assert env["device"] == "cpu" and env["torch"] and env["megatron_core"] and "deepspeed" in env
    # the default model is the trained checkpoint (moebalance/checkpoints/tiny-moe), prompts real text
    assert report["config"]["model"]["name"] == "tiny-moe" and report["config"]["run"]["uneven"]
    assert report["config"]["run"]["checkpoint"] == str(trained_checkpoint()[0])
    assert report["partial"] is False  # every router finished
    for run in report["runs"]:  # held-out quality per domain, for both routers
        assert set(run["quality"]) == {"prose", "code", "all"}
        for q in run["quality"].values():
            assert 1 < q["perplexity"] < 256 and 0 < q["accuracy"] < 1 and q["tokens"] > 0
    prompt_tokens = [pr["prompt_tokens"] for pr in report["runs"][0]["per_rank"]]
    padded = report["config"]["padded_prompt_len"] * UNEVEN["batch"]
    assert prompt_tokens[0] != prompt_tokens[1] and max(prompt_tokens) < padded  # really uneven
    for run in report["runs"]:
        assert [pr["prompt_tokens"] for pr in run["per_rank"]] == prompt_tokens  # same prompts
        _check_records(report, run, UNEVEN)
        _check_summary(run)
    # expanded drop drops in prefill (trained, imbalanced routing, capacity 1.5), never in decode
    drop = report["runs"][1]["summary"]
    assert drop["prefill"]["dropped_fraction"] > 0 and drop["decode"]["dropped_fraction"] == 0
    assert "topk" in stdout and "expanded_drop" in stdout and "straggler ms" in stdout
    assert "perplexity" in stdout and "prose" in stdout


def test_laser_balances_ranks_and_experts_better_than_vanilla(laser):
    runs = {run["router"]: run for run in laser["runs"]}
    for run in runs.values():
        _check_records(laser, run, LASER)
        _check_summary(run)
    vanilla, balanced = runs["topk"]["summary"], runs["laser"]["summary"]
    for phase in ("all", "prefill"):
        for figure in ("rank_imbalance", "max_violation"):
            assert balanced[phase][figure]["mean"] < vanilla[phase][figure]["mean"], (phase, figure)
            assert balanced[phase][figure]["p50"] < vanilla[phase][figure]["p50"], (phase, figure)
    # the skew gives vanilla something to fix: its expert loads are far from uniform
    assert vanilla["prefill"]["max_violation"]["p50"] > 0.5
    # the straggler's work shrinks with it: per prefill layer, the most tokens any rank's experts
    # receive (summed from the per-rank records, not the summary). Its wall time is not compared
    # here: on 2 shared cores it is noise-dominated (README; results/infer_laser_wide_ep2.json)
    assert _prefill_max_rank_tokens(runs["laser"]) < _prefill_max_rank_tokens(runs["topk"])


def _prefill_max_rank_tokens(run: dict) -> int:
    """Sum over prefill MoE layers of the max over ranks of tokens received."""
    per_layer: dict = {}
    for r in run["records"]:
        if r["phase"] == "prefill":
            per_layer.setdefault(r["layer"], []).append(sum(r["tokens_per_expert"]))
    assert per_layer and all(len(v) == NPROC for v in per_layer.values())
    return sum(max(v) for v in per_layer.values())


# ----------------------------------------------------------------------------- options


def _load_infer():
    spec = importlib.util.spec_from_file_location("infer_script", INFER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def infer():
    return _load_infer()


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (["--router", "bogus"], 1, "unknown router 'bogus'"),
        (["--router", "topk", "--compare"], 1, "--compare runs topk beside another router"),
        (["--ep", "3"], 2, "--ep 3 must be >= 1 and divide the world size 2"),
        (["--ep", "16"], 16, "must divide the model's num_experts 8"),
        (["--config", "missing.yaml"], 1, "model config 'missing.yaml' not found"),
        (["--batch", "0"], 1, "--batch must be >= 1"),
        (["--gen-len", "0"], 1, "--gen-len must be >= 1"),
        (["--prompt-len", "500", "--gen-len", "100"], 1, "exceeds the model's max_sequence_length"),
        (["--dispatcher", "flex"], 1, "--dispatcher must be one of"),
        (["--skew", "flat"], 1, "--skew must be one of"),
        (["--router-args", "capacity_factor=0"], 1, "capacity_factor (gamma) must be"),
        (["--router-args", "pool=3"], 1, "unknown ExpandedDropParams field"),
        (["--router-args", "capacity_factor"], 1, "expects key=value"),
        (["--router", "laser", "--router-args", "pool_size=1"], 1, "pool_size (c) must be in [topk=2"),
        (
            ["--router", "laser", "--router-args", "per_layer={1: {pool_size: 9}}"],
            1,
            "pool_size (c) must be in [topk=2, num_experts=8], got 9",
        ),
        (["--router", "token_drop", "--load-scope", "global"], 1, "reads expert loads"),
        (["--checkpoint", "/nonexistent.safetensors"], 1, "not found"),
        (["--timeout", "0"], 1, "--timeout must be"),
        (["--warmup", "-1"], 1, "--warmup must be >= 0"),
        (["--bogus-flag"], 1, "unrecognized arguments"),
    ],
)
def test_bad_options_exit_2_with_one_line(infer, capsys, monkeypatch, argv, world, message):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(SystemExit) as exit_info:
        infer.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("infer.py: error: ") and message in err, err
    assert not dist.is_initialized()  # validation happens before any process group


def test_good_options_resolve_defaults(infer, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(ROOT)
    run = infer.parse_args(
        ["--router", "token_drop", "--router-args", "capacity_factor=1.2", "drop_policy=order"]
    )
    assert run.ep == 2 and run.routers == ("token_drop",)
    assert run.params.capacity_factor == 1.2 and run.params.drop_policy == "order"
    # default model: the trained checkpoint and the config beside it
    checkpoint, config = trained_checkpoint()
    assert run.model == load_model_config(config)
    assert run.config.checkpoint == str(checkpoint)
    assert run.out == ROOT / "results" / "infer_token_drop_ep2.json"  # under the working dir
    run = infer.parse_args(["--router", "laser", "--compare", "--skew", "none", "--ep", "1"])
    assert run.routers == ("topk", "laser") and run.model.skew == "none" and run.ep == 1


def test_help_lists_routers_and_presets(infer, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in [*POLICIES, *model_config_presets()]:
        assert name in out


def test_cli_bad_option_exits_2_fast():
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(INFER), "--router", "bogus"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "infer.py: error: unknown router 'bogus'; choose one of "
        f"{sorted(POLICIES)} (see --help)"
    ]
    assert time.monotonic() - start < 60  # no Megatron import, no process group
