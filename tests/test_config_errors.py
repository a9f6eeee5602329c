"""Bad values in the Python API (``moebalance.config``, ``moebalance.model_config``): each is a
one-line ``ConfigError`` raised by our own validation, naming the parameter and what is allowed,
before any routing or model building starts. Good values and the defaults stay accepted."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from moebalance.config import (
    MAX_CAPACITY_FACTOR,
    MAX_ROUNDS,
    ConfigError,
    ExpandedDropParams,
    GateConfig,
    LaserParams,
    RoutingContext,
    TokenDropParams,
    TopKParams,
    from_dict,
    parse_key_values,
)
from moebalance.model_config import ModelConfig, load_model_config, model_config_presets
from moebalance.policies import expert_capacity, make_params, route

MOEBALANCE_DIR = Path(__file__).resolve().parents[1] / "moebalance"
NAN, INF = float("nan"), float("inf")
GATE = GateConfig(num_experts=8, topk=2)
SIGMOID_GATE = GateConfig(num_experts=8, topk=2, score_function="sigmoid")


def _validated(ctx: RoutingContext, gate: GateConfig = GATE) -> None:
    ctx.validate(gate)


def _from_cli(router: str, *items: str):
    """What ``--router-args`` does: parse, then build the router's parameters."""
    return make_params(router, parse_key_values(list(items), "--router-args"))


def _yaml(tmp_path: Path, text: str) -> ModelConfig:
    path = tmp_path / "model.yaml"
    path.write_text(text)
    return load_model_config(path)


def case(param: str, call, id: str):
    return pytest.param(call, param, id=id)


BAD_INPUTS = [
    # GateConfig
    case("topk", lambda _: GateConfig(8, True), "gate-topk-bool"),
    case("num_experts", lambda _: GateConfig(True, 1), "gate-num_experts-bool"),
    case("topk", lambda _: GateConfig(8, 2.0), "gate-topk-float"),
    case("score_function", lambda _: GateConfig(8, 2, score_function=1), "gate-score_function-int"),
    case("pre_softmax", lambda _: GateConfig(8, 2, pre_softmax="yes"), "gate-pre_softmax-str"),
    case("num_groups", lambda _: GateConfig(8, 2, num_groups="4", group_topk=2), "gate-num_groups-str"),
    case("group_topk", lambda _: GateConfig(8, 2, num_groups=4, group_topk="2"), "gate-group_topk-str"),
    case("group_topk", lambda _: GateConfig(8, 2, num_groups=4), "gate-num_groups-alone"),
    case("scaling_factor", lambda _: GateConfig(8, 2, scaling_factor="2"), "gate-scaling_factor-str"),
    case("scaling_factor", lambda _: GateConfig(8, 2, scaling_factor=NAN), "gate-scaling_factor-nan"),
    case("scaling_factor", lambda _: GateConfig(8, 2, scaling_factor=True), "gate-scaling_factor-bool"),
    # LaserParams, constructor
    case("eps_high", lambda _: LaserParams(eps_high=True), "laser-eps_high-bool"),
    case("top_m", lambda _: LaserParams(top_m=True), "laser-top_m-bool"),
    case("price_rounds", lambda _: LaserParams(price_rounds=True), "laser-price_rounds-bool"),
    case("pool_size", lambda _: LaserParams(pool_size=True), "laser-pool_size-bool"),
    case("load_only", lambda _: LaserParams(load_only="yes"), "laser-load_only-str"),
    case("min_score_ratio", lambda _: LaserParams(min_score_ratio="abc"), "laser-min_score_ratio-str"),
    case("min_score_ratio", lambda _: LaserParams(min_score_ratio=NAN), "laser-min_score_ratio-nan"),
    case("eps_high", lambda _: LaserParams(eps_high=NAN), "laser-eps_high-nan"),
    case("eps_high", lambda _: LaserParams(eps_high=INF), "laser-eps_high-inf"),
    case("eps_high", lambda _: LaserParams(eps_high="inf"), "laser-eps_high-inf-str"),
    case("assignment", lambda _: LaserParams(assignment=1), "laser-assignment-int"),
    case("block_ratio", lambda _: LaserParams(block_ratio=NAN), "laser-block_ratio-nan"),
    case("min_block", lambda _: LaserParams(min_block=2.0), "laser-min_block-float"),
    case("repair_rounds", lambda _: LaserParams(repair_rounds=1_000_000_000), "laser-repair_rounds-huge"),
    case("price_rounds", lambda _: LaserParams(price_rounds=10**12), "laser-price_rounds-huge"),
    case("per_layer", lambda _: LaserParams(per_layer=5), "laser-per_layer-int"),
    case("per_layer", lambda _: LaserParams(per_layer=[{"pool_size": 4}]), "laser-per_layer-list"),
    case("per_layer", lambda _: LaserParams(per_layer={"a": {"pool_size": 4}}), "laser-per_layer-str-key"),
    case("per_layer", lambda _: LaserParams(per_layer={True: {"pool_size": 4}}), "laser-per_layer-bool-key"),
    case("per_layer", lambda _: LaserParams(per_layer={-1: {"pool_size": 4}}), "laser-per_layer-negative-key"),
    case("per_layer", lambda _: LaserParams(per_layer={1: 5}), "laser-per_layer-value-int"),
    case("per_layer", lambda _: LaserParams(per_layer={1: {"gamma": 1}}), "laser-per_layer-unknown-field"),
    case("eps_high", lambda _: LaserParams(per_layer={1: {"eps_high": -1}}), "laser-per_layer-bad-eps_high"),
    case("per_layer", lambda _: LaserParams(per_layer={1: {"per_layer": {}}}), "laser-per_layer-nested"),
    # LaserParams, through make_params (YAML / dict)
    case("per_layer", lambda _: make_params("laser", {"per_layer": 5}), "make-laser-per_layer-int"),
    case("per_layer", lambda _: make_params("laser", {"per_layer": {"x": {}}}), "make-laser-per_layer-str-key"),
    case("per_layer", lambda _: make_params("laser", {"per_layer": {"1.5": {}}}), "make-laser-per_layer-decimal-key"),
    case("per_layer", lambda _: make_params("laser", {"per_layer": {2.5: {}}}), "make-laser-per_layer-float-key"),
    case("per_layer", lambda _: make_params("laser", {"per_layer": {"1": [1]}}), "make-laser-per_layer-list-value"),
    case(
        "repair_rounds",
        lambda _: make_params("laser", {"per_layer": {"1": {"repair_rounds": 10**9}}}),
        "make-laser-per_layer-repair_rounds-huge",
    ),
    case("price_rounds", lambda _: make_params("laser_fast", {"price_rounds": 65}), "make-laser_fast-price_rounds-65"),
    case("parameters", lambda _: make_params("laser", [("pool_size", 3)]), "make-laser-list"),
    case("parameters", lambda _: make_params("token_drop", "capacity_factor=2"), "make-token_drop-str"),
    case("top_m", lambda _: make_params("load_only", {"top_m": "2"}), "make-load_only-top_m-str"),
    case("LaserParams", lambda _: from_dict(LaserParams, [("pool_size", 4)]), "from_dict-laser-list"),
    case("TokenDropParams", lambda _: from_dict(TokenDropParams, "capacity_factor=2"), "from_dict-token_drop-str"),
    case("TopKParams", lambda _: make_params("topk", {"pool_size": 4}), "make-topk-unknown"),
    # TokenDropParams / ExpandedDropParams
    case("renormalize", lambda _: TokenDropParams(renormalize="maybe"), "token_drop-renormalize-str"),
    case("prefill_only", lambda _: TokenDropParams(prefill_only="no"), "token_drop-prefill_only-str"),
    case("capacity_factor", lambda _: TokenDropParams(capacity_factor=1e300), "token_drop-capacity_factor-huge"),
    case("capacity_factor", lambda _: TokenDropParams(capacity_factor="1.5"), "token_drop-capacity_factor-str"),
    case("capacity_factor", lambda _: TokenDropParams(capacity_factor=True), "token_drop-capacity_factor-bool"),
    case("drop_policy", lambda _: TokenDropParams(drop_policy=["score"]), "token_drop-drop_policy-list"),
    case("scope", lambda _: TokenDropParams(scope=None), "token_drop-scope-none"),
    case("capacity_factor", lambda _: make_params("token_drop", {"capacity_factor": INF}), "make-token_drop-capacity_factor-inf"),
    case("max_experts_per_token", lambda _: ExpandedDropParams(max_experts_per_token=True), "expanded_drop-max_experts_per_token-bool"),
    case("prefill_only", lambda _: ExpandedDropParams(prefill_only="no"), "expanded_drop-prefill_only-str"),
    case("renormalize", lambda _: ExpandedDropParams(renormalize=1), "expanded_drop-renormalize-int"),
    case("capacity_factor", lambda _: make_params("expanded_drop", {"capacity_factor": 1e300}), "make-expanded_drop-capacity_factor-huge"),
    # RoutingContext
    case("ep_size", lambda _: RoutingContext(ep_size=True), "ctx-ep_size-bool"),
    case("ep_rank", lambda _: RoutingContext(ep_rank=True, ep_size=2), "ctx-ep_rank-bool"),
    case("ep_rank", lambda _: RoutingContext(ep_rank=-1, ep_size=2), "ctx-ep_rank-negative"),
    case("decode", lambda _: RoutingContext(decode="no"), "ctx-decode-str"),
    case("layer", lambda _: RoutingContext(layer="3"), "ctx-layer-str"),
    case("seed", lambda _: RoutingContext(seed=1.5), "ctx-seed-float"),
    case("expert_load", lambda _: RoutingContext(expert_load=[0] * 8), "ctx-expert_load-list"),
    case("expert_load", lambda _: RoutingContext(expert_load=torch.ones(8, dtype=torch.bool)), "ctx-expert_load-bool-dtype"),
    case("expert_bias", lambda _: RoutingContext(expert_bias=torch.zeros(8, dtype=torch.int64)), "ctx-expert_bias-int-dtype"),
    case("expert_load", lambda _: _validated(RoutingContext(expert_load=torch.zeros(7))), "ctx-expert_load-shape"),
    case("expert_load", lambda _: _validated(RoutingContext(expert_load=torch.full((8,), NAN))), "ctx-expert_load-nan"),
    case("expert_load", lambda _: _validated(RoutingContext(expert_load=torch.full((8,), INF))), "ctx-expert_load-inf"),
    case("expert_load", lambda _: _validated(RoutingContext(expert_load=-torch.ones(8))), "ctx-expert_load-negative"),
    case(
        "expert_bias",
        lambda _: _validated(RoutingContext(expert_bias=torch.full((8,), NAN)), SIGMOID_GATE),
        "ctx-expert_bias-nan",
    ),
    case(
        "expert_load",
        lambda _: route("laser", torch.zeros(4, 8), GATE, ctx=RoutingContext(expert_load=torch.full((8,), NAN))),
        "route-laser-expert_load-nan",
    ),
    # ModelConfig, constructor
    case("init_method_std", lambda _: ModelConfig(init_method_std=INF), "model-init_method_std-inf"),
    case("init_method_std", lambda _: ModelConfig(init_method_std=NAN), "model-init_method_std-nan"),
    case("init_method_std", lambda _: ModelConfig(init_method_std=True), "model-init_method_std-bool"),
    case("hidden_size", lambda _: ModelConfig(hidden_size=True), "model-hidden_size-bool"),
    case("rotary_base", lambda _: ModelConfig(rotary_base=True), "model-rotary_base-bool"),
    case("rotary_base", lambda _: ModelConfig(rotary_base="10000"), "model-rotary_base-str"),
    case("name", lambda _: ModelConfig(name=5), "model-name-int"),
    case("skew_domain", lambda _: ModelConfig(skew_domain=3), "model-skew_domain-int"),
    case("first_dense_layers", lambda _: ModelConfig(first_dense_layers=True), "model-first_dense_layers-bool"),
    case("init_seed", lambda _: ModelConfig(init_seed=True), "model-init_seed-bool"),
    case("init_seed", lambda _: ModelConfig(init_seed=-1), "model-init_seed-negative"),
    case("num_query_groups", lambda _: ModelConfig(num_query_groups=True), "model-num_query_groups-bool"),
    case("dtype", lambda _: ModelConfig(dtype=None), "model-dtype-none"),
    case("pre_softmax", lambda _: ModelConfig(pre_softmax=1), "model-pre_softmax-int"),
    # ModelConfig, through load_model_config on a YAML file
    case("init_method_std", lambda tmp: _yaml(tmp, "init_method_std: .inf\n"), "yaml-init_method_std-inf"),
    case("init_method_std", lambda tmp: _yaml(tmp, "init_method_std: .nan\n"), "yaml-init_method_std-nan"),
    case("hidden_size", lambda tmp: _yaml(tmp, "hidden_size: true\n"), "yaml-hidden_size-bool"),
    case("skew_domain", lambda tmp: _yaml(tmp, "skew_domain: 3\n"), "yaml-skew_domain-int"),
    case("name", lambda tmp: _yaml(tmp, "name: 5\n"), "yaml-name-int"),
    case("num_experts", lambda tmp: _yaml(tmp, "num_experts: 8.5\n"), "yaml-num_experts-float"),
    case("model config", lambda _: load_model_config(None), "yaml-path-none"),
    # parse_key_values + make_params: the values reach validation that refuses them
    case("renormalize", lambda _: _from_cli("token_drop", "renormalize=maybe"), "cli-token_drop-renormalize-maybe"),
    case("min_score_ratio", lambda _: _from_cli("laser", "min_score_ratio=abc"), "cli-laser-min_score_ratio-abc"),
    case("eps_high", lambda _: _from_cli("laser", "eps_high=inf"), "cli-laser-eps_high-inf"),
    case("eps_high", lambda _: _from_cli("laser", "eps_high=.nan"), "cli-laser-eps_high-nan"),
    case("capacity_factor", lambda _: _from_cli("token_drop", "capacity_factor=1.0e+300"), "cli-token_drop-capacity_factor-huge"),
    case("max_experts_per_token", lambda _: _from_cli("expanded_drop", "max_experts_per_token=true"), "cli-expanded_drop-max_experts_per_token-true"),
    case("per_layer", lambda _: _from_cli("laser", "per_layer=5"), "cli-laser-per_layer-5"),
    case("repair_rounds", lambda _: _from_cli("laser", "repair_rounds=1000000000"), "cli-laser-repair_rounds-huge"),
    case("--router-args", lambda _: parse_key_values(["pool_size"], "--router-args"), "cli-no-equals"),
    case("--router-args", lambda _: parse_key_values("pool_size=4", "--router-args"), "cli-not-a-list"),
]


@pytest.mark.parametrize("call, param", BAD_INPUTS)
def test_bad_input_is_a_one_line_config_error_naming_the_parameter(call, param, tmp_path):
    with pytest.raises(ConfigError) as info:
        call(tmp_path)
    assert type(info.value) is ConfigError
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert param in message
    # states what is allowed
    assert any(word in message for word in ("must", "allowed", "expects")), message
    # raised by our own validation, not by Python or torch deep inside
    raised_in = Path(str(info.traceback[-1].path)).resolve()
    assert MOEBALANCE_DIR in raised_in.parents, raised_in


def test_there_are_at_least_forty_bad_inputs():
    assert len(BAD_INPUTS) >= 40


# -- good inputs stay accepted ----------------------------------------------------------------


def test_good_gate_configs_are_accepted():
    GateConfig(8, 2, num_groups=4, group_topk=2, scaling_factor=2.5, pre_softmax=True)
    GateConfig(np.int64(8), np.int64(2), scaling_factor=np.float32(1.5))  # NumPy scalars
    GateConfig(8, 8, score_function="sqrtsoftplus", scaling_factor=1)


def test_good_laser_params_are_accepted():
    params = LaserParams(
        pool_size=6, top_m=3, eps_high=2.0, min_score_ratio=1, block_ratio=1,
        min_block=10**12, repair_rounds=MAX_ROUNDS, price_rounds=MAX_ROUNDS,
        per_layer={3: {"pool_size": 8, "eps_high": 0.5}},
    )
    assert params.for_layer(3).pool_size == 8 and params.for_layer(2) is params
    params = make_params("laser", {"per_layer": {"3": {"eps_high": 0.5}, 4: {"repair_rounds": 0}}})
    assert params.per_layer == {3: {"eps_high": 0.5}, 4: {"repair_rounds": 0}}
    assert make_params("laser", {"per_layer": None}).per_layer == {}  # an empty YAML key
    assert make_params("laser", None) == LaserParams()
    assert make_params("load_only").load_only is True


def test_good_capacity_params_are_accepted():
    params = TokenDropParams(capacity_factor=MAX_CAPACITY_FACTOR, renormalize=True)
    assert expert_capacity(1_000_000, GATE, params.capacity_factor) == 250_000_000_000
    TokenDropParams(capacity_factor=1)  # an int gamma
    ExpandedDropParams(max_experts_per_token=np.int64(3), renormalize=False)
    # YAML 1.1 reads "no" as false: a valid boolean from the command line
    params = _from_cli("token_drop", "prefill_only=no", "renormalize=true", "capacity_factor=2")
    assert (params.prefill_only, params.renormalize, params.capacity_factor) == (False, True, 2)


def test_good_routing_contexts_are_accepted():
    RoutingContext(ep_rank=3, ep_size=4, layer=0, seed=7, decode=True)
    counts = torch.arange(8, dtype=torch.int64)
    RoutingContext(expert_load=counts).validate(GATE)
    RoutingContext(expert_bias=torch.linspace(-1, 1, 8)).validate(SIGMOID_GATE)
    r = route("laser", torch.randn(16, 8), GATE, ctx=RoutingContext(expert_load=counts.float()))
    assert r.routing_map.sum(dim=1).eq(2).all()


def test_expert_load_values_are_not_read_off_the_cpu():
    """``route`` validates the context on every call: a tensor on an accelerator is not read
    (no host sync) unless asked for with ``check_values=True``. A meta tensor has no values, so
    reading one would raise."""
    ctx = RoutingContext(expert_load=torch.empty(8, device="meta"))
    ctx.validate(GATE)
    RoutingContext(expert_load=torch.full((8,), NAN)).validate(GATE, check_values=False)
    with pytest.raises(ConfigError, match=re.escape("expert_load must hold finite values >= 0 (tokens), got min nan")):
        RoutingContext(expert_load=torch.full((8,), NAN)).validate(GATE, check_values=True)


def test_good_model_configs_are_accepted(tmp_path):
    for name in model_config_presets():
        load_model_config(name)
    ModelConfig(init_method_std=1, init_seed=0, skew_domain="github")
    cfg = _yaml(tmp_path, "name: small\nhidden_size: 32\ninit_method_std: 0.01\n")
    assert (cfg.name, cfg.hidden_size, cfg.init_method_std) == ("small", 32, 0.01)


def test_defaults_are_unchanged():
    assert dataclasses.asdict(LaserParams()) == dict(
        pool_size=None, top_m=None, eps_high=0.9, min_score_ratio=0.0, load_only=False,
        assignment="blocked", block_ratio=0.4, min_block=32, repair_rounds=2, price_rounds=1,
        per_layer={},
    )
    assert dataclasses.asdict(TokenDropParams()) == dict(
        capacity_factor=1.5, drop_policy="score", scope="expert", prefill_only=True, renormalize=False,
    )
    assert dataclasses.asdict(ExpandedDropParams()) == dict(
        capacity_factor=1.5, max_experts_per_token=None, prefill_only=True, renormalize=True,
    )
    assert TopKParams() == make_params("topk")
    assert make_params("laser_fast") == LaserParams(assignment="price")
    ctx = RoutingContext()
    assert (ctx.ep_rank, ctx.ep_size, ctx.expert_load, ctx.expert_bias, ctx.decode, ctx.layer, ctx.seed) == (
        0, 1, None, None, False, None, 0,
    )
    gate = GateConfig(8, 2)
    assert (gate.score_function, gate.pre_softmax, gate.num_groups, gate.scaling_factor) == (
        "softmax", False, None, None,
    )
    model = ModelConfig()
    assert (model.init_method_std, model.rotary_base, model.init_seed, model.skew_domain) == (
        0.02, 10000, 1234, "c4",
    )
    assert math.isclose(MAX_CAPACITY_FACTOR, 1e6) and MAX_ROUNDS == 64
