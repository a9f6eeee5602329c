"""moebalance.harness: run files and command-line overrides resolve to one validated run; the
generation loop and quality evaluation run under torch.inference_mode in both frameworks; the
JSON report is written atomically; the quality grid is a config file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from mp_utils import run_workers
from moebalance.config import ConfigError, LaserParams, TokenDropParams
from moebalance.harness import RunConfig, load_run_config, resolve
from moebalance.harness.cli import build_parser, run_from_args
from moebalance.harness.config import apply_overrides, run_config_presets
from moebalance.harness.report import write_json
from moebalance.model_config import load_model_config, trained_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, monkeypatch, world=1):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    return run_from_args(build_parser("infer.py", ""), argv)


# ----------------------------------------------------------------------------- config


def test_every_shipped_run_file_resolves():
    presets = run_config_presets()
    assert {"demo", "deepspeed", "laser-wide"} <= set(presets)
    for name in presets:
        run = resolve(load_run_config(name), world_size=2)
        assert run.ep == 2 and run.routers[-1] == run.config.router


def test_demo_run_file_is_the_demo_job(monkeypatch):
    run = _run(["--run-config", "demo"], monkeypatch, world=2)
    assert run.routers == ("topk", "expanded_drop") and run.config.batch == 8
    checkpoint, config = trained_checkpoint()
    assert run.config.checkpoint == str(checkpoint) and run.model == load_model_config(config)


def test_trained_models_are_served_by_name(monkeypatch):
    from moebalance.model_config import trained_checkpoints

    assert "tiny-moe" in trained_checkpoints()
    for name in trained_checkpoints():
        run = _run(["--config", name], monkeypatch)
        checkpoint, config = trained_checkpoint(name)
        assert run.config.checkpoint == str(checkpoint) and run.model == load_model_config(config)
        assert run.model.name == name and run.model.skew == "none"
    run = _run(["--config", "tiny"], monkeypatch)  # a preset: random initialisation
    assert run.config.checkpoint is None and run.model.skew == "olmoe"


def test_flags_override_the_run_file_and_set_overrides_flags(monkeypatch):
    run = _run(
        ["--run-config", "demo", "--batch", "3", "--router", "token_drop",
         "--router-args", "capacity_factor=1.2", "--set", "batch=5", "router_args.drop_policy=order"],
        monkeypatch,
    )
    assert run.config.batch == 5  # --set last
    assert run.params == TokenDropParams(capacity_factor=1.2, drop_policy="order")
    assert run.config.compare  # from the file


def test_router_args_file_with_per_layer_parameters(tmp_path, monkeypatch):
    path = tmp_path / "laser.yaml"
    path.write_text("pool_size: 3\nper_layer:\n  1: {pool_size: 4, eps_high: 0.5}\n")
    run = _run(
        ["--router", "laser", "--router-args-file", str(path), "--router-args", "eps_high=0.7"],
        monkeypatch,
    )
    assert run.params == LaserParams(pool_size=3, eps_high=0.7, per_layer={1: {"pool_size": 4, "eps_high": 0.5}})
    assert run.params.for_layer(1).pool_size == 4 and run.params.for_layer(0).pool_size == 3


@pytest.mark.parametrize(
    "change, message",
    [
        (["bogus=1"], "--set: unknown field 'bogus'"),
        (["batch"], "--set expects key=value"),
        (["batch=true"], "--batch must be an integer"),
        (["compare=maybe"], "compare must be true or false"),
        (["router_args=5"], "--set router_args must be a mapping"),
        (["timeout=nan"], "--timeout must be a number of seconds > 0"),
        (["framework=jax"], "--framework must be one of"),
    ],
)
def test_bad_overrides_are_config_errors(change, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as err:
        resolve(apply_overrides(RunConfig(), change), world_size=1)
    assert "\n" not in str(err.value)


def test_bad_run_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, message in [
        ("batch: [1\n", "invalid YAML"),
        ("- 1\n", "expected a mapping"),
        ("batchsize: 4\n", "unknown field(s) ['batchsize']"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_run_config(bad)
    with pytest.raises(ConfigError, match="--run-config 'nope' not found"):
        load_run_config("nope")


def test_no_option_is_taken_by_torchrun():
    """torchrun parses the script's arguments too and takes any option that is a prefix of
    one of its own (``--run`` matched its ``--run-path``): none of ours may be."""
    from torch.distributed.run import get_args_parser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings]
    ours = [o for a in build_parser("infer.py", "")._actions for o in a.option_strings]
    bench = _bench_quality()
    ours += ["--ep", "--seqs", "--seq-len", "--chunk", "--checkpoint", "--grid", "--framework",
             "--out"]
    assert {"--run-config", "--set", "--router"} <= set(ours)
    clashes = [(o, t) for o in ours for t in theirs if t.startswith(o) and o not in ("-h", "--help")]
    assert not clashes, clashes
    assert bench.parse_args(["--ep", "2"]).ep == 2


def test_adapters_implement_the_framework_interface_without_importing_their_framework():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from moebalance.harness.framework import Framework, get_framework\n"
        "for name in ('megatron', 'deepspeed'):\n"
        "    fw = get_framework(name)\n"
        "    assert isinstance(fw, Framework) and fw.name == name, name\n"
        "assert not {'megatron', 'deepspeed'} & set(sys.modules), sorted(sys.modules)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "ok", done.stderr[-3000:]


# ----------------------------------------------------------------------------- report


def test_write_json_is_atomic_and_keeps_the_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


# ----------------------------------------------------------------------------- inference mode


def _inference_mode_worker(rank, world, framework_name):
    """Build the random-init tiny model at EP 1 and record, inside every router call, whether
    autograd is on and whether inference mode is on, during generation and quality."""
    import torch

    from moebalance.harness import get_framework
    from moebalance.harness.generate import measure
    from moebalance.harness.quality import heldout_quality
    from moebalance.telemetry import MoERecorder

    framework = get_framework(framework_name)
    setup = framework.init_distributed(1, 60.0)
    cfg = load_model_config("tiny").replace(skew="none", num_layers=2, hidden_size=64)
    model = framework.build_model(
        cfg, setup, router="laser", router_params=None, load_scope="local",
        dispatcher=framework.dispatchers[0], checkpoint=None,
    )
    seen = []

    def probe(module, args):
        seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled()))

    routers = [m for m in model.modules() if type(m).__name__.endswith(("Router", "Gate"))]
    for router in routers:
        router.register_forward_pre_hook(probe)
    recorder = MoERecorder(setup.device)
    framework.instrument(model, recorder)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    pad = torch.zeros(2, 8, dtype=torch.bool)
    measure(framework, model, ids, pad, gen_len=3, warmup=0, recorder=recorder)
    generation = list(seen)
    seen.clear()
    heldout_quality(model, {"x": torch.randint(0, cfg.vocab_size, (2, 9))}, setup.device)
    framework.destroy_distributed()
    return {"routers": len(routers), "generation": generation, "quality": list(seen)}


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["megatron", "deepspeed"])
def test_generation_and_quality_run_in_inference_mode(framework):
    (out,) = run_workers(_inference_mode_worker, 1, framework, timeout_s=240)
    assert out["routers"] == 2
    assert len(out["generation"]) == 2 * 3 and len(out["quality"]) == 2  # every router call
    assert set(out["generation"]) == {(False, True)}
    assert set(out["quality"]) == {(False, True)}


def _nonfinite_worker(rank, world, framework_name, tmp):
    """NaN weights in a checkpoint fail the build naming the tensor; a NaN router weight slipped
    in after the build fails the first step naming the layer."""
    import torch
    from safetensors.torch import load_file, save_file

    from moebalance.config import ConfigError
    from moebalance.harness import get_framework
    from moebalance.harness.generate import measure
    from moebalance.runner import NonFiniteLogitsError
    from moebalance.telemetry import MoERecorder

    framework = get_framework(framework_name)
    setup = framework.init_distributed(1, 60.0)
    cfg = load_model_config("tiny").replace(skew="none", num_layers=2, hidden_size=64)
    build = dict(router="topk", router_params=None, load_scope="local",
                 dispatcher=framework.dispatchers[0])
    model = framework.build_model(cfg, setup, checkpoint=None, **build)
    if framework_name == "megatron":
        from megatron_patch.model import save_checkpoint
    else:
        from deepspeed_patch.model import save_checkpoint
    path = f"{tmp}/{framework_name}.safetensors"
    save_checkpoint(model, path, cfg)
    state = load_file(path)
    bad_key = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    state[bad_key][0, 0] = float("nan")
    save_file(state, path)
    out = {}
    try:
        framework.build_model(cfg, setup, checkpoint=path, **build)
    except ConfigError as err:
        out["checkpoint"] = str(err)
    router = next(m for m in model.modules() if hasattr(m, "runner"))
    weight = router.weight if hasattr(router, "weight") else router.wg.weight
    with torch.no_grad():
        weight[2, 5] = float("inf")
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    try:
        measure(framework, model, ids, torch.zeros(2, 8, dtype=torch.bool), gen_len=2,
                warmup=0, recorder=MoERecorder(setup.device))
    except NonFiniteLogitsError as err:
        out["logits"] = str(err)
    framework.destroy_distributed()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["megatron", "deepspeed"])
def test_non_finite_weights_and_logits_fail_naming_where(framework, tmp_path):
    (out,) = run_workers(_nonfinite_worker, 1, framework, str(tmp_path), timeout_s=240)
    assert out["checkpoint"].endswith(
        "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight holds NaN or Inf values"
    )
    assert out["logits"].startswith("router logits of MoE layer 0 contain NaN or Inf (prefill)")


# ----------------------------------------------------------------------------- quality grid


def _bench_quality():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "scripts" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_grid_is_a_config_file(tmp_path):
    bench = _bench_quality()
    grid = bench.load_grid(bench.DEFAULT_GRID)
    labels = [label for label, _, _ in grid]
    assert labels[0] == "topk" and len(labels) == len(set(labels))
    params = dict((label, p) for label, _, p in grid)
    assert params["laser c=4 eps_high=0.5 min_score_ratio=0.5"] == LaserParams(
        pool_size=4, eps_high=0.5, min_score_ratio=0.5
    )
    bad = tmp_path / "grid.yaml"
    bad.write_text("routers:\n  - {router: laser, args: {pool_size: 0}}\n")
    with pytest.raises(ConfigError, match="row 0: pool_size must be"):
        bench.load_grid(bad)
