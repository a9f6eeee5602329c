"""Config dataclasses for gates and routing policies, validated on construction.

Every field maps one-to-one onto a YAML key (see ``configs/``). Invalid values raise
``ConfigError`` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import yaml

__all__ = [
    "ConfigError",
    "GateConfig",
    "TopKParams",
    "LaserParams",
    "TokenDropParams",
    "ExpandedDropParams",
    "RoutingContext",
    "check_logits",
    "from_dict",
]

SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
DROP_POLICIES = ("score", "order", "reverse", "random")
CAPACITY_SCOPES = ("expert", "device")


class ConfigError(ValueError):
    """Bad configuration or input; the message names the parameter and the allowed values."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_capacity_factor(value: Any) -> None:
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
        f"capacity_factor (gamma) must be a finite number > 0, got {value!r}",
    )


@dataclass(frozen=True)
class GateConfig:
    """How gate logits become scores, choices and combine weights.

    Mirrors Megatron-Core's ``TransformerConfig.moe_router_*`` fields so the vanilla policy
    reproduces ``topk_routing_with_score_function`` exactly.

    Attributes:
        num_experts: E, logical experts (= routed expert slots without replicas).
        topk: k, experts per token.
        score_function: "softmax", "sigmoid" or "sqrtsoftplus" (``moe_router_score_function``).
        pre_softmax: softmax over all E before top-k, weights not renormalised
            (``moe_router_pre_softmax``); otherwise softmax over the k chosen logits.
        num_groups, group_topk: group-limited top-k (``moe_router_num_groups``,
            ``moe_router_group_topk``); both None or both set.
        scaling_factor: multiplies the weights (``moe_router_topk_scaling_factor``).
    """

    num_experts: int
    topk: int
    score_function: str = "softmax"
    pre_softmax: bool = False
    num_groups: int | None = None
    group_topk: int | None = None
    scaling_factor: float | None = None

    def __post_init__(self) -> None:
        _require(
            isinstance(self.num_experts, int) and self.num_experts >= 1,
            f"num_experts must be an integer >= 1, got {self.num_experts!r}",
        )
        _require(
            isinstance(self.topk, int) and 1 <= self.topk <= self.num_experts,
            f"topk must be an integer in [1, num_experts={self.num_experts}], got {self.topk!r}",
        )
        _require(
            self.score_function in SCORE_FUNCTIONS,
            f"score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}",
        )
        _require(
            (self.num_groups is None) == (self.group_topk is None),
            "num_groups and group_topk must be given together (group-limited top-k) or both None",
        )
        if self.num_groups is not None:
            _require(
                self.num_groups >= 1 and self.num_experts % self.num_groups == 0,
                f"num_groups must divide num_experts={self.num_experts}, got {self.num_groups}",
            )
            _require(
                1 <= self.group_topk <= self.num_groups,
                f"group_topk must be in [1, num_groups={self.num_groups}], got {self.group_topk}",
            )
            _require(
                self.topk % self.group_topk == 0,
                f"topk={self.topk} must be a multiple of group_topk={self.group_topk}",
            )
            _require(
                self.topk <= self.group_topk * (self.num_experts // self.num_groups),
                f"topk={self.topk} exceeds the experts in group_topk={self.group_topk} groups",
            )
        if self.scaling_factor is not None:
            _require(
                math.isfinite(self.scaling_factor) and self.scaling_factor > 0,
                f"scaling_factor must be a finite number > 0 or None, got {self.scaling_factor!r}",
            )


@dataclass(frozen=True)
class TopKParams:
    """Vanilla top-k has no parameters beyond the gate."""

    def validate(self, gate: GateConfig) -> None:
        return None


@dataclass(frozen=True)
class LaserParams:
    """LASER (arXiv 2510.03293): shape-adaptive candidate pool, least-loaded assignment.

    A token whose top-``top_m`` score mass is >= ``eps_high`` is "skewed" and routed vanilla top-k.
    Any other token gets a candidate pool of its ``pool_size`` (c) best experts, trimmed to those
    scoring at least ``min_score_ratio`` x its best score (never below k), and is assigned to the k
    least-loaded candidates.

    Attributes:
        pool_size: c >= k, candidates per flexible token (None = 2k). c = k is vanilla top-k.
        top_m: M, experts in the concentration measure (None = k).
        eps_high: top-M mass at or above which a token routes vanilla; > 1 expands every token.
        min_score_ratio: in [0, 1]; 0 disables trimming.
        load_only: pool = all experts, scores ignored: the accuracy-agnostic lower bound, solved
            exactly (the least possible maximum load); the assignment fields below do not apply.
        assignment: how flexible tokens get their k experts. "blocked" (default): tokens
            priced in shrinking blocks, then repair rounds toward the water level; balances at
            least as well as the paper's sequential greedy on the benchmark workload, 1.6-2.0x
            vanilla top-k's time on one CPU thread at 8K tokens (2.2-2.6x with two threads,
            which vanilla's top-k uses and the assignment cannot). "price": one price pass
            over all tokens, 1.2-1.7x vanilla's time, loads a few percent above the water
            level (results/routers_cpu.md, routers_cpu_1thread.md; ``policies.laser_routing``).
        block_ratio, min_block: the "blocked" assignment prices ``block_ratio`` of the tokens
            left at a time (at least ``min_block``); smaller blocks balance tighter and cost
            about 15 tensor ops each (``policies.laser_routing.block_bounds``).
        repair_rounds: rounds of moves from experts above the water level to candidates with
            room after the "blocked" pricing (0 disables); layers where many tokens are
            skewed balance closer to the greedy with more (8: on par or better in every layer
            of the github workload, results/routers_cpu_github_repair8.md).
        price_rounds: passes of the "price" assignment (>= 1): the first uses prices computed
            from the demand, each further one corrects them from the loads it measured
            (2: tighter balance for one more top-k over [T, c]).
        per_layer: optional {layer_index: {field: value}} overrides, resolved with ``for_layer``.
    """

    pool_size: int | None = None
    top_m: int | None = None
    eps_high: float = 0.9
    min_score_ratio: float = 0.0
    load_only: bool = False
    assignment: str = "blocked"
    block_ratio: float = 0.4
    min_block: int = 32
    repair_rounds: int = 2
    price_rounds: int = 1
    per_layer: dict[int, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(
            self.pool_size is None or (isinstance(self.pool_size, int) and self.pool_size >= 1),
            f"pool_size must be an integer >= topk or None, got {self.pool_size!r}",
        )
        _require(
            self.top_m is None or (isinstance(self.top_m, int) and self.top_m >= 1),
            f"top_m must be an integer >= 1 or None, got {self.top_m!r}",
        )
        _require(
            isinstance(self.eps_high, (int, float)) and self.eps_high > 0,
            f"eps_high must be a number > 0 (top-M mass threshold), got {self.eps_high!r}",
        )
        _require(
            0.0 <= self.min_score_ratio <= 1.0,
            f"min_score_ratio must be in [0, 1], got {self.min_score_ratio!r}",
        )
        _require(
            self.assignment in ("blocked", "price"),
            f"assignment must be 'blocked' or 'price', got {self.assignment!r}",
        )
        _require(
            isinstance(self.block_ratio, (int, float))
            and not isinstance(self.block_ratio, bool)
            and 0 < self.block_ratio <= 1,
            f"block_ratio must be in (0, 1], got {self.block_ratio!r}",
        )
        _require(
            isinstance(self.min_block, int) and not isinstance(self.min_block, bool) and self.min_block >= 1,
            f"min_block must be an integer >= 1, got {self.min_block!r}",
        )
        _require(
            isinstance(self.repair_rounds, int)
            and not isinstance(self.repair_rounds, bool)
            and self.repair_rounds >= 0,
            f"repair_rounds must be an integer >= 0, got {self.repair_rounds!r}",
        )
        _require(
            isinstance(self.price_rounds, int) and self.price_rounds >= 1,
            f"price_rounds must be an integer >= 1, got {self.price_rounds!r}",
        )
        for layer, over in self.per_layer.items():
            names = {f.name for f in fields(self)}
            bad = (set(over) - names) | (set(over) & {"per_layer"})
            _require(not bad, f"per_layer[{layer}] has unknown LASER fields {sorted(bad)}")

    def for_layer(self, layer: int | None) -> "LaserParams":
        """The parameters for one layer: the overrides in ``per_layer`` applied."""
        if layer is None or layer not in self.per_layer:
            return self
        return dataclasses.replace(self, per_layer={}, **self.per_layer[layer])

    def validate(self, gate: GateConfig) -> None:
        k, E = gate.topk, gate.num_experts
        c = self.resolved_pool_size(gate)
        _require(
            k <= c <= E,
            f"pool_size (c) must be in [topk={k}, num_experts={E}], got {c}",
        )
        m = self.top_m if self.top_m is not None else k
        _require(m <= E, f"top_m must be <= num_experts={E}, got {m}")

    def resolved_pool_size(self, gate: GateConfig) -> int:
        if self.load_only:
            return gate.num_experts
        return self.pool_size if self.pool_size is not None else min(2 * gate.topk, gate.num_experts)


@dataclass(frozen=True)
class TokenDropParams:
    """Capacity-aware token drop (arXiv 2503.05066).

    Attributes:
        capacity_factor: gamma > 0; capacity C = ceil(gamma * T * k / E).
        drop_policy: which overflow tokens go: "score" (keep the highest S[t, e]), "order" (keep the
            earliest), "reverse" (keep the latest), "random" (seeded by ``RoutingContext.seed``).
        scope: "expert" caps each expert at C; "device" caps each EP rank's experts together at
            n_local * gamma * T * k / E.
        prefill_only: no capacity in decode steps (``RoutingContext.decode``), as the paper's code.
        renormalize: rescale each token's kept weights to the sum its top-k weights had.
    """

    capacity_factor: float = 1.5
    drop_policy: str = "score"
    scope: str = "expert"
    prefill_only: bool = True
    renormalize: bool = False

    def __post_init__(self) -> None:
        _check_capacity_factor(self.capacity_factor)
        _require(
            self.drop_policy in DROP_POLICIES,
            f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}",
        )
        _require(
            self.scope in CAPACITY_SCOPES,
            f"scope must be one of {CAPACITY_SCOPES}, got {self.scope!r}",
        )

    def validate(self, gate: GateConfig) -> None:
        return None


@dataclass(frozen=True)
class ExpandedDropParams:
    """Capacity-aware expanded drop (arXiv 2503.05066).

    Candidates of a token = its top-k plus every expert on its own EP rank; each expert keeps its
    C highest-scoring candidates (C = ceil(gamma * T * k / E)).

    Attributes:
        capacity_factor: gamma > 0.
        max_experts_per_token: keep at most this many experts per token (best scores first);
            None = no cap (the paper's behaviour, a token may end with more than k experts).
        prefill_only: no capacity and no expansion in decode steps.
        renormalize: combine weights are the full-distribution scores S[t, e] of the kept experts,
            renormalised to sum to 1 per token when True.
    """

    capacity_factor: float = 1.5
    max_experts_per_token: int | None = None
    prefill_only: bool = True
    renormalize: bool = True

    def __post_init__(self) -> None:
        _check_capacity_factor(self.capacity_factor)
        _require(
            self.max_experts_per_token is None
            or (isinstance(self.max_experts_per_token, int) and self.max_experts_per_token >= 1),
            f"max_experts_per_token must be an integer >= 1 or None, got {self.max_experts_per_token!r}",
        )

    def validate(self, gate: GateConfig) -> None:
        return None


@dataclass(frozen=True)
class RoutingContext:
    """What a policy may know about where it runs. Policies never talk to the network: anything
    EP-global is computed by the adapter and passed in here.

    Attributes:
        ep_rank, ep_size: this rank in the expert-parallel group; experts live contiguously,
            expert e on rank e // (E / ep_size).
        expert_load: optional [E] load already on each expert (e.g. EP-global counts from other
            ranks) that LASER's least-loaded choice starts from.
        expert_bias: optional [E] float, sigmoid-gate bias (aux-loss-free balancing).
        decode: True for single-token decode steps (prefill-only policies then route vanilla).
        layer: index of the MoE layer (per-layer parameters).
        seed: seed for the "random" drop policy.
    """

    ep_rank: int = 0
    ep_size: int = 1
    expert_load: torch.Tensor | None = None
    expert_bias: torch.Tensor | None = None
    decode: bool = False
    layer: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _require(
            isinstance(self.ep_size, int) and self.ep_size >= 1,
            f"ep_size must be an integer >= 1, got {self.ep_size!r}",
        )
        _require(
            isinstance(self.ep_rank, int) and 0 <= self.ep_rank < self.ep_size,
            f"ep_rank must be an integer in [0, ep_size={self.ep_size}), got {self.ep_rank!r}",
        )

    def validate(self, gate: GateConfig) -> None:
        E = gate.num_experts
        _require(
            E % self.ep_size == 0,
            f"num_experts={E} must be divisible by the EP size (ep_size={self.ep_size})",
        )
        for name, vec in (("expert_load", self.expert_load), ("expert_bias", self.expert_bias)):
            if vec is not None:
                _require(
                    vec.dim() == 1 and vec.shape[0] == E,
                    f"{name} must have shape [num_experts={E}], got {tuple(vec.shape)}",
                )
        if self.expert_bias is not None:
            _require(
                gate.score_function != "softmax",
                "expert_bias is only supported with score_function 'sigmoid' or 'sqrtsoftplus'",
            )


def check_logits(logits: torch.Tensor, gate: GateConfig, *, check_finite: bool = True) -> None:
    """Validate gate logits against the gate config (shape, dtype, finiteness).

    ``check_finite`` synchronises with the device; adapters may turn it off on the hot path.
    """
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    _require(
        logits.dim() == 2 and logits.shape[1] == gate.num_experts,
        f"logits must have shape [num_tokens, num_experts={gate.num_experts}], "
        f"got {tuple(logits.shape)}",
    )
    _require(
        logits.is_floating_point(),
        f"logits must be a floating dtype (float32, bfloat16, float16, float64), got {logits.dtype}",
    )
    if check_finite and logits.numel():
        _require(bool(torch.isfinite(logits).all()), "logits contain NaN or Inf")


def parse_key_values(items: list[str], option: str) -> dict[str, Any]:
    """Command-line overrides ["key=value", ...] -> {key: value}: each value read as a YAML
    scalar ("8" -> 8, "0.5" -> 0.5, "true" -> True; "none" / "null" / "~" -> None; anything
    that is not YAML stays a string, for the parameter's own validation to judge). ConfigError
    naming ``option`` for an item without "="."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} expects key=value, got {item!r}")
        if raw.lower() in ("none", "null", "~"):
            out[key] = None
            continue
        try:
            out[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key] = raw
    return out


def from_dict(cls: type, data: dict[str, Any] | None) -> Any:
    """Build config dataclass ``cls`` from a dict (a YAML mapping), rejecting unknown keys."""
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(known)}"
        )
    if "per_layer" in data and data["per_layer"] is not None:
        data["per_layer"] = {int(k): dict(v) for k, v in data["per_layer"].items()}
    return cls(**data)
