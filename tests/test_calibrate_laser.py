"""LASER's calibrated parameters: ``scripts/calibrate_laser.py`` picks, per layer, the setting of
least MV within the quality budget (an exact allocation over the layers' fronts; on the real
tiny-moe the same choice as an independent evaluation through the harness), its YAML reads back
into ``LaserParams`` per layer, the shipped files are ``laser``'s default for the shipped models
(``--router-args-file paper`` for the paper's, explicit router args override) and reach both
adapters' routers, and bad options are one-line errors."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mp_utils import run_workers
from moebalance.config import ConfigError, LaserParams, read_yaml_mapping
from moebalance.harness import RunConfig, resolve
from moebalance.harness.cli import build_parser, run_from_args
from moebalance.harness.config import calibrated_laser_file, laser_args_source
from moebalance.model_config import load_model_config, trained_checkpoint
from moebalance.policies import make_params

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("tiny-moe", "fine-moe")


def _script(name: str):
    """A script of scripts/ as a module (registered: its dataclasses need sys.modules)."""
    key = f"_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def _env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    return env


# ----------------------------------------------------------------------------- the choice


def _trial(cal, layer, cost, mv, tag):
    setting = cal.Setting(3, eps_high=tag, min_score_ratio=0.0)  # a distinct setting per tag
    return cal.Trial(layer, setting, cal.Measure(cost=cost, perplexity=1.0, kl=0.0, mv={layer: mv}))


def test_allocation_is_the_least_summed_mv_within_the_limit():
    """Against brute force over every combination: the sum of MV is the least among the
    combinations whose summed NLL costs fit, for limits from 0 to past everything."""
    cal = _script("calibrate_laser")
    table = {  # (relative perplexity cost, MV) per layer; the first of each is vanilla
        0: [(0.0, 0.43), (-0.001, 0.41), (0.004, 0.38), (0.012, 0.30)],
        1: [(0.0, 0.34), (0.002, 0.15), (0.004, 0.06), (0.010, 0.01), (0.003, 0.20)],
        2: [(0.0, 0.28), (0.001, 0.24), (0.0015, 0.17), (0.006, 0.12), (0.009, 0.07)],
    }
    trials = {layer: [_trial(cal, layer, c, m, 0.1 * (i + 1)) for i, (c, m) in enumerate(rows)]
              for layer, rows in table.items()}
    fronts = {layer: cal.frontier(t, layer, "ppl") for layer, t in trials.items()}
    # the dominated entry (cost 0.003, MV 0.20: 0.002 buys 0.15) is off layer 1's front
    assert [t.measure.mv[1] for t in fronts[1]] == [0.34, 0.15, 0.06, 0.01]
    for limit in (0.0, 0.001, 0.003, 0.005, 0.008, 0.012, 0.02, 1.0):
        best = min(
            sum(t.measure.mv[t.layer] for t in combo)
            for combo in itertools.product(*trials.values())
            if sum(math.log1p(t.measure.cost) for t in combo) <= limit + 1e-12
        )
        chosen = cal.allocate(fronts, limit, "ppl")
        assert sorted(chosen) == [0, 1, 2]
        assert sum(math.log1p(t.measure.cost) for t in chosen.values()) <= limit + 1e-12
        assert sum(t.measure.mv[t.layer] for t in chosen.values()) == pytest.approx(best)
    # at limit 0.005: layer 0 takes the free MV cut, layer 1 its 0.004 step, layer 2 0.001
    chosen = cal.allocate(fronts, 0.005, "ppl")
    assert [chosen[layer].measure.mv[layer] for layer in (0, 1, 2)] == [0.41, 0.06, 0.17]


def test_the_check_backs_off_when_the_layers_cost_more_together():
    """The combination's measured cost, not the sum of the layers' own, decides: here layers
    together cost 1.6 x their sum, so the choice must end at the least-MV combination whose
    1.6 x sum fits (brute force), and at vanilla when nothing but vanilla does."""
    cal = _script("calibrate_laser")
    table = {
        0: [(0.0, 0.40), (0.001, 0.30), (0.003, 0.20), (0.006, 0.10)],
        1: [(0.0, 0.35), (0.0015, 0.25), (0.0025, 0.12), (0.005, 0.05)],
    }
    vanilla = cal.Setting(2)
    base = cal.Measure(cost=0.0, perplexity=1.0, kl=0.0, mv={0: 0.40, 1: 0.35})
    trials = {layer: [cal.Trial(layer, vanilla, base)]
              + [_trial(cal, layer, c, m, 0.1 * i) for i, (c, m) in enumerate(rows) if i]
              for layer, rows in table.items()}
    own = {(t.layer, t.setting): t.measure for ts in trials.values() for t in ts}

    def evaluate(settings):
        nll = 1.6 * sum(math.log1p(own[(layer, s)].cost) for layer, s in settings.items())
        return cal.Measure(cost=math.expm1(nll), perplexity=1.0, kl=0.0,
                           mv={layer: own[(layer, s)].mv[layer] for layer, s in settings.items()})

    overshot = 0  # budgets whose first allocation (the layers' own costs within B) was too dear
    for budget in (0.002, 0.004, 0.006, 0.01):
        best = min(
            sum(t.measure.mv[t.layer] for t in combo)
            for combo in itertools.product(*trials.values())
            if 1.6 * sum(math.log1p(t.measure.cost) for t in combo) <= math.log1p(budget) + 1e-12
        )
        choice = cal.choose(evaluate, base, trials, "ppl", budget)
        assert choice.final.cost <= budget + 1e-12
        assert sum(choice.final.mv.values()) == pytest.approx(best), budget
        overshot += any(m.cost > budget for _, _, m in choice.attempts)
    assert overshot >= 2
    choice = cal.choose(evaluate, base, trials, "ppl", 0.0005)  # below every step
    assert choice.final.cost == 0 and all(t.setting == vanilla for t in choice.chosen.values())


def _independent_sweep(rank, world, settings, seqs, seq_len, chunk):
    """tiny-moe at world 1, each setting in layer 1 alone, measured through the harness's own
    quality evaluation and telemetry statistics (not the calibrator's code)."""
    from moebalance.corpus import default_corpus, heldout_sequences
    from moebalance.harness import get_framework
    from moebalance.harness.quality import evaluate, quality_from_sums
    from moebalance.telemetry import MoERecorder
    from moebalance.telemetry_stats import summarize

    framework = get_framework("megatron")
    setup = framework.init_distributed(1, 120.0)
    checkpoint, config = trained_checkpoint("tiny-moe")
    cfg = load_model_config(config)
    model = framework.build_model(cfg, setup, router="topk", router_params=None,
                                  load_scope="local", dispatcher="alltoall",
                                  checkpoint=str(checkpoint))
    recorder = MoERecorder(setup.device, nvtx_ranges=False)
    framework.instrument(model, recorder)
    data = heldout_sequences(default_corpus(), "prose", seqs, seq_len)
    out = []
    for setting in [None, *settings]:
        if setting is None:
            framework.swap_router(model, "topk", None, "local")
        else:
            per_layer = {layer: {"pool_size": 2} for layer in cfg.moe_layer_indices}
            per_layer[1] = setting
            framework.swap_router(model, "laser", LaserParams(per_layer=per_layer), "local")
        recorder.clear()
        quality = quality_from_sums(evaluate(model, data, chunk, recorder))
        mv = summarize(recorder.records(), cfg.topk)["per_layer"][1]["max_violation"]["mean"]
        out.append((setting, quality["perplexity"], mv))
    framework.destroy_distributed()
    return out


GRID = {"pool_size": [3], "eps_high": [0.5, 0.7, 1.01], "min_score_ratio": [0.0, 0.5]}
CAL_ARGS = ["--model", "tiny-moe", "--domain", "prose", "--seqs", "8", "--seq-len", "64",
            "--chunk", "4", "--layers", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """The independent sweep of layer 1, a budget that rules out the least-MV setting, and the
    calibrator's run with that budget: (expected setting, YAML path, trace, sweep)."""
    settings = [{"pool_size": c, "eps_high": e, "min_score_ratio": r}
                for c in GRID["pool_size"] for e in GRID["eps_high"] for r in GRID["min_score_ratio"]]
    (sweep,) = run_workers(_independent_sweep, 1, settings, 8, 64, 4, timeout_s=240)
    (_, vanilla_ppl, _), rows = sweep[0], sweep[1:]
    costs = [ppl / vanilla_ppl - 1 for _, ppl, _ in rows]
    least = min(range(len(rows)), key=lambda i: rows[i][2])
    # a budget between the least-MV setting's cost and the next cheaper one: it must be left out
    below = [c for c in costs if c < costs[least]]
    assert costs[least] > 0 and below, (costs, least)
    budget = (costs[least] + max(below)) / 2
    fits = [i for i, c in enumerate(costs) if c <= budget]
    expected = rows[min(fits, key=lambda i: rows[i][2])][0]
    assert expected != rows[least][0]
    tmp = tmp_path_factory.mktemp("calibrate")
    out, trace = tmp / "laser.yaml", tmp / "trace.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "calibrate_laser.py"), *CAL_ARGS,
         "--pool-sizes", ",".join(map(str, GRID["pool_size"])),
         "--eps-high", ",".join(map(str, GRID["eps_high"])),
         "--min-score-ratio", ",".join(map(str, GRID["min_score_ratio"])),
         "--ppl-budget", repr(budget), "--out", str(out), "--trace", str(trace)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return expected, out, json.loads(trace.read_text()), sweep, budget


def test_search_picks_the_least_mv_setting_within_the_budget(calibrated):
    expected, out, trace, sweep, budget = calibrated
    per_layer = read_yaml_mapping(out, "calibrated")["per_layer"]
    assert per_layer[1] == expected
    assert all(per_layer[layer] == {"pool_size": 2} for layer in (0, 2, 3))  # left vanilla
    # the calibrator measured what the harness measures: same perplexity and MV per setting
    vanilla_ppl = sweep[0][1]
    assert trace["vanilla"]["perplexity"] == pytest.approx(vanilla_ppl, rel=1e-5)
    measured = {json.dumps(t["setting"], sort_keys=True): t for t in trace["sweep"]}
    for setting, ppl, mv in sweep[1:]:
        t = measured[json.dumps(setting, sort_keys=True)]
        assert t["perplexity"] == pytest.approx(ppl, rel=1e-5)  # float sums differ
        assert t["mv"]["1"] == pytest.approx(mv, abs=1e-9)
    (choice,) = trace["choices"]
    assert choice["final"]["cost"] <= budget
    text = out.read_text()
    for needle in ("tiny-moe", "'prose'", "+", "command: python scripts/calibrate_laser.py",
                   "date: ", "--ppl-budget"):
        assert needle in text, needle


def test_yaml_round_trips_into_laser_params_per_layer(calibrated):
    _, out, _, _, _ = calibrated
    files = [out] + [calibrated_laser_file(str(trained_checkpoint(n)[0])) for n in SHIPPED]
    for path in files:
        data = yaml.safe_load(path.read_text())
        params = make_params("laser", read_yaml_mapping(path, "calibrated"))
        assert set(params.per_layer) == set(data["per_layer"])
        for layer, entry in data["per_layer"].items():
            resolved = params.for_layer(layer)
            for name, value in entry.items():
                assert getattr(resolved, name) == value, (path, layer, name)
        # what --router-args-file gives infer.py
        model = "fine-moe" if "fine-moe" in str(path) else "tiny-moe"
        run = resolve(RunConfig(model=model, router="laser", router_args_file=str(path)),
                      world_size=1)
        assert run.params == params


# ----------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("model", SHIPPED)
def test_shipped_models_default_to_their_calibrated_file(model, monkeypatch):
    path = calibrated_laser_file(str(trained_checkpoint(model)[0]))
    assert path == trained_checkpoint(model)[0].parent / "laser.yaml" and path.is_file()
    text = path.read_text()
    assert f"for {model} " in text and "command: python scripts/calibrate_laser.py" in text
    calibrated = make_params("laser", read_yaml_mapping(path, "calibrated"))
    gate = load_model_config(trained_checkpoint(model)[1]).gate_config()
    assert set(calibrated.per_layer) == set(load_model_config(trained_checkpoint(model)[1]).moe_layer_indices)
    assert any(calibrated.for_layer(layer).resolved_pool_size(gate) > gate.topk
               for layer in calibrated.per_layer)  # it does balance somewhere
    monkeypatch.setenv("WORLD_SIZE", "1")
    parser = build_parser("infer.py", "")
    # no parameters given: the calibrated file, named in the run's config (the report's source)
    run = run_from_args(parser, ["--config", model, "--router", "laser"])
    assert run.params == calibrated and run.config.router_args_file == str(path)
    # the paper's defaults by name
    run = run_from_args(parser, ["--config", model, "--router", "laser", "--router-args-file", "paper"])
    assert run.params == LaserParams() and run.config.router_args_file == "paper"
    # explicit router args replace the calibrated defaults ...
    run = run_from_args(parser, ["--config", model, "--router", "laser", "--router-args", "eps_high=0.5"])
    assert run.params == LaserParams(eps_high=0.5) and run.config.router_args_file is None
    run = run_from_args(parser, ["--config", model, "--router", "laser", "--set", "router_args.pool_size=5"])
    assert run.params == LaserParams(pool_size=5)
    # ... or build on them when named: per_layer from the file, the rest from the args
    run = run_from_args(parser, ["--config", model, "--router", "laser", "--router-args-file",
                                 "calibrated", "--router-args", "repair_rounds=8"])
    assert run.params.per_layer == calibrated.per_layer and run.params.repair_rounds == 8
    # laser_fast keeps the paper's unless asked
    run = run_from_args(parser, ["--config", model, "--router", "laser_fast"])
    assert run.params == LaserParams(assignment="price")
    run = run_from_args(parser, ["--config", model, "--router", "laser_fast", "--router-args-file", "calibrated"])
    assert run.params.per_layer == calibrated.per_layer and run.params.assignment == "price"
    # vanilla under --compare is untouched
    run = run_from_args(parser, ["--config", model, "--router", "laser", "--compare"])
    assert run.params_of("topk") is None and run.params_of("laser") == calibrated


def test_other_models_keep_the_paper_defaults(tmp_path):
    run = resolve(RunConfig(model="tiny", router="laser"), world_size=1)  # random init
    assert run.params == LaserParams() and run.config.router_args_file is None
    own = tmp_path / "own"  # a checkpoint of one's own, even a copy of a shipped one
    own.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        shutil.copy(trained_checkpoint("tiny-moe")[0].parent / name, own / name)
    run = resolve(RunConfig(checkpoint=str(own / "model.safetensors"), router="laser"), world_size=1)
    assert run.params == LaserParams()
    assert laser_args_source(RunConfig(router="token_drop")).router_args_file is None


@pytest.mark.parametrize(
    "cfg, message",
    [
        (RunConfig(model="tiny", router="laser", router_args_file="calibrated"),
         "--router-args-file calibrated: no calibrated LASER parameters for this model"),
        (RunConfig(router="token_drop", router_args_file="calibrated"),
         "--router-args-file calibrated holds LASER parameters"),
        (RunConfig(router="laser", router_args_file="/nonexistent/laser.yaml"),
         "--router-args-file '/nonexistent/laser.yaml' not found"),
    ],
)
def test_bad_parameter_sources_are_one_line_errors(cfg, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as err:
        resolve(cfg, world_size=1)
    assert "\n" not in str(err.value)


def _adapter_worker(rank, world, framework_name, model_name):
    """Resolve ``--router laser`` for a shipped model as infer.py does, build the model through
    the adapter with the run's parameters, run one forward, and report per router the layer it
    routed and the parameters it resolved for that layer."""
    import torch

    from moebalance.harness import get_framework

    run = resolve(RunConfig(model=model_name, router="laser", framework=framework_name), world_size=1)
    framework = get_framework(framework_name)
    setup = framework.init_distributed(1, 120.0)
    model = framework.build_model(
        run.model, setup, router="laser", router_params=run.params, load_scope="local",
        dispatcher=framework.dispatchers[0], checkpoint=run.config.checkpoint,
    )
    S = 16
    ids = torch.randint(0, run.model.vocab_size, (2, S), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None].expand(2, 1, S, S)
    with torch.inference_mode():
        model(ids, torch.arange(S).unsqueeze(0).expand(2, S), mask)
    seen = {}
    for module in model.modules():
        runner = getattr(module, "runner", None)
        if runner is not None:
            resolved = runner.params.for_layer(runner.layer)
            seen[runner.layer] = {f: getattr(resolved, f) for f in
                                  ("pool_size", "eps_high", "min_score_ratio", "top_m")}
    framework.destroy_distributed()
    return seen, {layer: dict(v) for layer, v in run.params.per_layer.items()}


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["megatron", "deepspeed"])
def test_calibrated_defaults_reach_both_adapters(framework):
    (out,) = run_workers(_adapter_worker, 1, framework, "tiny-moe", timeout_s=240)
    seen, per_layer = out
    assert sorted(seen) == sorted(per_layer) == [0, 1, 2, 3]
    for layer, entry in per_layer.items():
        for name, value in entry.items():
            assert seen[layer][name] == value, (framework, layer, name)


# ----------------------------------------------------------------------------- bad input


def _error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


BAD = [
    (["--ppl-budget", "-1"], "--ppl-budget", ">= 0"),
    (["--ppl-budget", "nan"], "--ppl-budget", "finite"),
    (["--kl-budget", "abc"], "--kl-budget", "numbers"),
    (["--ppl-budget", "0.1", "--kl-budget", "0.1"], "--kl-budget", "not allowed"),
    (["--ppl-budget", "0.01,0.02"], "--out", "{budget}"),
    (["--domain", "wiki"], "--domain", "('code', 'prose')"),
    (["--model", "nope"], "--model", "trained models"),
    (["--model", "tiny-moe", "--checkpoint", "x"], "--checkpoint", "not both"),
    (["--pool-sizes", "1"], "--pool-sizes", "[topk=2, num_experts=8]"),
    (["--pool-sizes", "2"], "--pool-sizes", "only vanilla"),
    (["--min-score-ratio", "1.5"], "--min-score-ratio", "[0, 1]"),
    (["--eps-high", "0"], "--eps-high", "> 0"),
    (["--layers", "7"], "--layers", "[0, 1, 2, 3]"),
    (["--seqs", "0"], "--seqs", ">= 1"),
    (["--seq-len", "600"], "--seq-len", "max_sequence_length"),
]


@pytest.mark.parametrize("argv, option, allowed", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_options_are_one_line_errors(argv, option, allowed, capsys, tmp_path):
    cal = _script("calibrate_laser")
    with pytest.raises(SystemExit) as exc:
        cal.parse_args([*argv, "--out", str(tmp_path / "x.yaml")])
    assert exc.value.code == 2
    line = _error_line(capsys, "calibrate_laser.py")
    assert option in line and allowed in line, line


def test_existing_output_and_missing_out_are_refused(capsys, tmp_path):
    cal = _script("calibrate_laser")
    existing = tmp_path / "laser.yaml"
    existing.write_text("per_layer: {}\n")
    for argv, needle in (([], "--out"), (["--out", str(existing)], "exists")):
        with pytest.raises(SystemExit) as exc:
            cal.parse_args(argv)
        assert exc.value.code == 2 and needle in _error_line(capsys, "calibrate_laser.py")
    assert existing.read_text() == "per_layer: {}\n"
    assert cal.parse_args(["--out", str(existing), "--overwrite"]).budgets == [0.005]


# ----------------------------------------------------------------------------- the benchmark grid


def test_quality_grid_sources_match_infer(tmp_path):
    bench = _script("bench_quality")
    checkpoint = str(trained_checkpoint("tiny-moe")[0])
    rows, left_out = bench.load_rows(bench.DEFAULT_GRID, checkpoint=checkpoint,
                                     model_name="tiny-moe", work=tmp_path)
    by = {r.label: r for r in rows}
    infer = resolve(RunConfig(model="tiny-moe", router="laser"), world_size=1)
    assert by["laser"].params == infer.params and by["laser"].source.startswith("calibrated: ")
    assert by["laser paper"].params == LaserParams() and by["laser paper"].source == "paper"
    assert by["laser_fast calibrated"].params.per_layer == infer.params.per_layer
    assert by["laser calibrated ppl+1%"].params is None  # calibrated by the run itself
    assert by["laser calibrated ppl+1%"].calibrate == ("ppl", 0.01)
    assert "laser c=5" in left_out and "laser c=5" not in by  # a fine-moe row
    (tmp_path / "laser_ppl0.01.yaml").write_text("per_layer: {1: {pool_size: 3}}\n")
    rows, _ = bench.load_rows(bench.DEFAULT_GRID, checkpoint=checkpoint, model_name="tiny-moe",
                              work=tmp_path)
    assert {r.label: r for r in rows}["laser calibrated ppl+1%"].params == LaserParams(
        per_layer={1: {"pool_size": 3}})
    fine, left_out = bench.load_rows(bench.DEFAULT_GRID, checkpoint=str(trained_checkpoint("fine-moe")[0]),
                                     model_name="fine-moe", work=tmp_path)
    assert "laser c=3" in left_out and all(r.label != "laser c=3" for r in fine)


@pytest.mark.parametrize(
    "row, message",
    [
        ("{router: token_drop, calibrate: {ppl_budget: 0.01}}", "args_file and calibrate are for"),
        ("{router: laser, calibrate: {budget: 0.01}}", "calibrate must be {ppl_budget: B}"),
        ("{router: laser, calibrate: {ppl_budget: -1}}", "calibrate ppl_budget must be a finite number >= 0"),
        ("{router: laser, args_file: paper, calibrate: {ppl_budget: 0.1}}", "not both"),
        ("{router: laser, models: tiny-moe}", "models must be a list"),
        ("{router: laser, args_file: missing.yaml}", "not found"),
        ("{router: laser, colour: red}", "row 0 must be a mapping"),
    ],
)
def test_bad_quality_grid_rows_are_config_errors(row, message, tmp_path):
    bench = _script("bench_quality")
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"routers:\n  - {row}\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        bench.load_rows(grid)
    assert "\n" not in str(err.value)
