"""Config dataclasses for gates and routing policies, validated on construction.

Every field maps one-to-one onto a YAML key (see ``configs/``). Invalid values raise
``ConfigError`` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import yaml

__all__ = [
    "ConfigError",
    "MAX_CAPACITY_FACTOR",
    "MAX_ROUNDS",
    "GateConfig",
    "TopKParams",
    "LaserParams",
    "TokenDropParams",
    "ExpandedDropParams",
    "RoutingContext",
    "check_logits",
    "from_dict",
    "parse_key_values",
    "read_yaml_mapping",
]

SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")
DROP_POLICIES = ("score", "order", "reverse", "random")
CAPACITY_SCOPES = ("expert", "device")


class ConfigError(ValueError):
    """Bad configuration or input; the message names the parameter and the allowed values."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# Upper bounds that keep every derived size finite and every loop short. gamma >= E / k already
# means "never drop" (C >= T), so 1e6 is far past any useful value, yet C = ceil(gamma T k / E)
# stays a finite int64-sized integer (gamma = 1e300 is an OverflowError in ``math.ceil`` on every
# rank). Repair rounds allocate [rounds, n, c] noise up front (1e9 rounds: 128 GB), and each
# round of either kind costs time; the tuned values are 1-8, so 64 leaves ample room.
MAX_CAPACITY_FACTOR = 1e6
MAX_ROUNDS = 64


def _is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    if type(value) is int:  # the common case, without the slower ABC check (hot path)
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite real number (int or float, Python or NumPy), not a bool and not NaN or inf."""
    if type(value) is float:  # the common cases first, without the slower ABC check
        return math.isfinite(value)
    if type(value) is int:
        return True
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or math.isfinite(value)


def _require_bool(name: str, value: Any) -> None:
    _require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _require(
        isinstance(value, str) and value in choices,
        f"{name} must be one of {choices}, got {value!r}",
    )


def _check_capacity_factor(value: Any) -> None:
    _require(
        _is_number(value) and 0 < value <= MAX_CAPACITY_FACTOR,
        f"capacity_factor (gamma) must be a finite number > 0 and <= {int(MAX_CAPACITY_FACTOR)}, "
        f"got {value!r}",
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
            _is_int(self.num_experts) and self.num_experts >= 1,
            f"num_experts must be an integer >= 1, got {self.num_experts!r}",
        )
        _require(
            _is_int(self.topk) and 1 <= self.topk <= self.num_experts,
            f"topk must be an integer in [1, num_experts={self.num_experts}], got {self.topk!r}",
        )
        _require_choice("score_function", self.score_function, SCORE_FUNCTIONS)
        _require_bool("pre_softmax", self.pre_softmax)
        _require(
            (self.num_groups is None) == (self.group_topk is None),
            "num_groups and group_topk must be given together (group-limited top-k) or both None",
        )
        if self.num_groups is not None:
            _require(
                _is_int(self.num_groups) and self.num_groups >= 1
                and self.num_experts % self.num_groups == 0,
                f"num_groups must be an integer >= 1 dividing num_experts={self.num_experts}, "
                f"got {self.num_groups!r}",
            )
            _require(
                _is_int(self.group_topk) and 1 <= self.group_topk <= self.num_groups,
                f"group_topk must be an integer in [1, num_groups={self.num_groups}], "
                f"got {self.group_topk!r}",
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
                _is_number(self.scaling_factor) and self.scaling_factor > 0,
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
            Fixed by the router: True for ``load_only``, False for ``laser`` and ``laser_fast``.
        assignment: how flexible tokens get their k experts. "blocked" (default): Hall
            levels, tokens priced in shrinking blocks, then augmenting rounds toward the least
            possible peak for the pools (``policies.laser_routing``); results/routers_cpu*.md
            give its gap to the exact optimum per benchmark cell. "price" (fixed by the
            ``laser_fast`` router): one price pass over all tokens, far fewer ops, a larger gap.
        block_ratio, min_block: the "blocked" assignment prices ``block_ratio`` of the tokens
            left at a time (at least ``min_block``); smaller blocks balance tighter and cost
            about 15 tensor ops each (``policies.laser_routing.block_bounds``).
        repair_rounds: augmenting rounds of the "blocked" assignment after its pricing (0
            disables; ``policies.laser_routing.refine_schedule`` turns them into relabels and
            push steps): more move more excess along longer paths, at more ops.
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
            self.pool_size is None or (_is_int(self.pool_size) and self.pool_size >= 1),
            f"pool_size must be an integer >= topk or None, got {self.pool_size!r}",
        )
        _require(
            self.top_m is None or (_is_int(self.top_m) and self.top_m >= 1),
            f"top_m must be an integer >= 1 or None, got {self.top_m!r}",
        )
        _require(
            _is_number(self.eps_high) and self.eps_high > 0,
            f"eps_high must be a finite number > 0 (top-M mass threshold), got {self.eps_high!r}",
        )
        _require(
            _is_number(self.min_score_ratio) and 0.0 <= self.min_score_ratio <= 1.0,
            f"min_score_ratio must be a number in [0, 1], got {self.min_score_ratio!r}",
        )
        _require_bool("load_only", self.load_only)
        _require(
            isinstance(self.assignment, str) and self.assignment in ("blocked", "price"),
            f"assignment must be 'blocked' or 'price', got {self.assignment!r}",
        )
        _require(
            _is_number(self.block_ratio) and 0 < self.block_ratio <= 1,
            f"block_ratio must be in (0, 1], got {self.block_ratio!r}",
        )
        _require(
            _is_int(self.min_block) and self.min_block >= 1,
            f"min_block must be an integer >= 1, got {self.min_block!r}",
        )
        _require(
            _is_int(self.repair_rounds) and 0 <= self.repair_rounds <= MAX_ROUNDS,
            f"repair_rounds must be an integer >= 0 and <= {MAX_ROUNDS}, got {self.repair_rounds!r}",
        )
        _require(
            _is_int(self.price_rounds) and 1 <= self.price_rounds <= MAX_ROUNDS,
            f"price_rounds must be an integer >= 1 and <= {MAX_ROUNDS}, got {self.price_rounds!r}",
        )
        _require(
            isinstance(self.per_layer, Mapping),
            "per_layer must be a mapping {layer_index: {field: value}}, "
            f"got {type(self.per_layer).__name__}",
        )
        names = {f.name for f in fields(self)} - {"per_layer"}
        for layer, over in self.per_layer.items():
            _require(
                _is_int(layer) and layer >= 0,
                f"per_layer keys must be layer indices (integers >= 0), got {layer!r}",
            )
            _require(
                isinstance(over, Mapping),
                f"per_layer[{layer}] must be a mapping {{field: value}}, got {type(over).__name__}",
            )
            bad = set(over) - names
            _require(
                not bad,
                f"per_layer[{layer}] has unknown LASER fields {sorted(bad, key=str)}; "
                f"allowed: {sorted(names)}",
            )
            try:  # each layer's resolved parameters are checked now, not when that layer routes
                self.for_layer(layer)
            except ConfigError as err:
                raise ConfigError(f"per_layer[{layer}]: {err}") from None

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
        capacity_factor: gamma in (0, 1e6]; capacity C = ceil(gamma * T * k / E) (gamma >= E / k
            never drops; the bound keeps C a finite integer).
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
        _require_choice("drop_policy", self.drop_policy, DROP_POLICIES)
        _require_choice("scope", self.scope, CAPACITY_SCOPES)
        _require_bool("prefill_only", self.prefill_only)
        _require_bool("renormalize", self.renormalize)

    def validate(self, gate: GateConfig) -> None:
        return None


@dataclass(frozen=True)
class ExpandedDropParams:
    """Capacity-aware expanded drop (arXiv 2503.05066).

    Candidates of a token = its top-k plus every expert on its own EP rank; each expert keeps its
    C highest-scoring candidates (C = ceil(gamma * T * k / E)).

    Attributes:
        capacity_factor: gamma in (0, 1e6].
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
            or (_is_int(self.max_experts_per_token) and self.max_experts_per_token >= 1),
            f"max_experts_per_token must be an integer >= 1 or None, got {self.max_experts_per_token!r}",
        )
        _require_bool("prefill_only", self.prefill_only)
        _require_bool("renormalize", self.renormalize)

    def validate(self, gate: GateConfig) -> None:
        return None


@dataclass(frozen=True)
class RoutingContext:
    """What a policy may know about where it runs. Policies never talk to the network: anything
    EP-global is computed by the adapter and passed in here.

    Attributes:
        ep_rank, ep_size: this rank in the expert-parallel group. Without a layout (below)
            experts live contiguously, expert e on rank e // (E / ep_size).
        local_experts: optional [E] bool, the expert layout as this rank sees it: the logical
            experts with at least one replica (physical slot) on this rank. Expanded drop offers
            these to every token. None = the contiguous layout: [r * E/EP, (r + 1) * E/EP).
        expert_group: optional [E] int64 in [0, ep_size): the EP rank each logical expert counts
            against, one per expert even when its replicas span several ranks (the rank of its
            first replica; ``replicas.layout_for_rank``): token drop's ``scope="device"`` caps
            each group, load-only deals its ties from this rank's group onwards. None = e // (E/EP).
            ``local_experts`` and ``expert_group`` come together (a layout) or not at all; with a
            layout E need not be divisible by ep_size.
        expert_load: optional [E] load already on each expert (e.g. EP-global counts from other
            ranks) that LASER's least-loaded choice starts from; finite and >= 0 (checked by
            ``validate``, for CUDA tensors only on request: see there).
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
    local_experts: torch.Tensor | None = None
    expert_group: torch.Tensor | None = None

    def __post_init__(self) -> None:
        _require(
            _is_int(self.ep_size) and self.ep_size >= 1,
            f"ep_size must be an integer >= 1, got {self.ep_size!r}",
        )
        _require(
            _is_int(self.ep_rank) and 0 <= self.ep_rank < self.ep_size,
            f"ep_rank must be an integer in [0, ep_size={self.ep_size}), got {self.ep_rank!r}",
        )
        for name, vec in (("expert_load", self.expert_load), ("expert_bias", self.expert_bias)):
            _require(
                vec is None or isinstance(vec, torch.Tensor),
                f"{name} must be a torch.Tensor of shape [num_experts] or None, "
                f"got {type(vec).__name__}",
            )
        if self.expert_load is not None:
            _require(
                self.expert_load.dtype != torch.bool and not self.expert_load.is_complex(),
                "expert_load must be a real tensor (a float or integer dtype), "
                f"got {self.expert_load.dtype}",
            )
        if self.expert_bias is not None:
            _require(
                self.expert_bias.is_floating_point(),
                f"expert_bias must be a floating-point tensor, got {self.expert_bias.dtype}",
            )
        _require(
            (self.local_experts is None) == (self.expert_group is None),
            "local_experts and expert_group must be given together (an expert layout) or both None",
        )
        for name, vec, dtype in (
            ("local_experts", self.local_experts, torch.bool),
            ("expert_group", self.expert_group, torch.int64),
        ):
            _require(
                vec is None or (isinstance(vec, torch.Tensor) and vec.dtype == dtype),
                f"{name} must be a {dtype} tensor of shape [num_experts] or None, got "
                f"{vec.dtype if isinstance(vec, torch.Tensor) else type(vec).__name__}",
            )
        _require_bool("decode", self.decode)
        _require(
            self.layer is None or (_is_int(self.layer) and self.layer >= 0),
            f"layer must be a layer index (an integer >= 0) or None, got {self.layer!r}",
        )
        _require(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")

    def validate(self, gate: GateConfig, *, check_values: bool | None = None) -> None:
        """Check this context against ``gate``: EP size, vector shapes, and the values of
        ``expert_load`` (finite, >= 0) and ``expert_bias`` (finite).

        ``check_values``: None (the default; ``policies.route`` calls this on every routing
        call) checks the values only of tensors on the CPU, which costs microseconds and no
        stream synchronisation; a CUDA tensor's values are then not read (they come from the
        adapter's own all-reduce of routing counts). True checks them wherever they live (one
        host synchronisation per CUDA tensor: for debugging). False never reads them. The
        layout (``local_experts``, ``expert_group``) is checked the same way: shapes always,
        values (groups in [0, ep_size), every expert of this rank's group local) per this rule.
        """
        E = gate.num_experts
        _require(
            E % self.ep_size == 0 or self.expert_group is not None,
            f"num_experts={E} must be divisible by the EP size (ep_size={self.ep_size})",
        )
        if self.expert_group is not None:
            self._validate_layout(E, check_values)
        for name, vec in (("expert_load", self.expert_load), ("expert_bias", self.expert_bias)):
            if vec is not None:
                _require(
                    vec.dim() == 1 and vec.shape[0] == E,
                    f"{name} must have shape [num_experts={E}], got {tuple(vec.shape)}",
                )
                if check_values or (check_values is None and vec.device.type == "cpu"):
                    lo, hi = (x.item() for x in vec.detach().aminmax())  # NaN gives NaN: refused
                    if name == "expert_load":
                        ok, allowed = 0 <= lo and hi < math.inf, "finite values >= 0 (tokens)"
                    else:
                        ok, allowed = -math.inf < lo and hi < math.inf, "finite values"
                    _require(ok, f"{name} must hold {allowed}, got min {lo} and max {hi}")
        if self.expert_bias is not None:
            _require(
                gate.score_function != "softmax",
                "expert_bias is only supported with score_function 'sigmoid' or 'sqrtsoftplus'",
            )

    def _validate_layout(self, E: int, check_values: bool | None) -> None:
        """Shapes of ``local_experts`` and ``expert_group``, and their values per ``validate``."""
        local, group = self.local_experts, self.expert_group
        for name, vec in (("local_experts", local), ("expert_group", group)):
            _require(
                vec.dim() == 1 and vec.shape[0] == E,
                f"{name} must have shape [num_experts={E}], got {tuple(vec.shape)}",
            )
        _require(
            local.device == group.device,
            f"local_experts and expert_group must be on one device, got {local.device} and "
            f"{group.device}",
        )
        if check_values or (check_values is None and group.device.type == "cpu"):
            lo, hi = (x.item() for x in group.aminmax())
            _require(
                0 <= lo and hi < self.ep_size,
                f"expert_group must hold EP ranks in [0, ep_size={self.ep_size}), got min {lo} "
                f"and max {hi}",
            )
            stray = (group == self.ep_rank) & ~local
            _require(
                not stray.any().item(),
                "local_experts must hold every expert of this rank's group "
                f"(ep_rank={self.ep_rank}); missing {stray.nonzero().flatten().tolist()}",
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


def read_yaml_mapping(path: Any, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is {}). ConfigError naming ``what`` (e.g.
    "model config", "--grid") for a missing, unreadable or invalid file or a non-mapping."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path}: invalid YAML ({err})".replace("\n", " ")) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {path}: unreadable ({err})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping, got {type(data).__name__}")
    return data


def parse_key_values(items: list[str], option: str) -> dict[str, Any]:
    """Command-line overrides ["key=value", ...] -> {key: value}: each value read as a YAML
    scalar ("8" -> 8, "0.5" -> 0.5, "true" -> True; "none" / "null" / "~" -> None; anything
    that is not YAML stays a string, for the parameter's own validation to judge). ConfigError
    naming ``option`` for an item without "="."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise ConfigError(f"{option} expects a list of key=value strings, got {items!r}")
    out: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{option} expects key=value, got {item!r}")
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
    """Build config dataclass ``cls`` from a dict (a YAML mapping), rejecting unknown keys.

    ``per_layer`` keys may be integers or decimal strings ("3", as JSON writes them); anything
    else, like the values, is left to ``cls`` to judge."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{cls.__name__} parameters must be a mapping {{field: value}}, got {type(data).__name__}"
        )
    data = dict(data)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(known)}"
        )
    per_layer = data.get("per_layer")
    if "per_layer" in data and per_layer is None:  # an empty YAML key: no overrides
        del data["per_layer"]
    elif isinstance(per_layer, Mapping):
        data["per_layer"] = {
            _layer_key(k): dict(v) if isinstance(v, Mapping) else v for k, v in per_layer.items()
        }
    return cls(**data)


def _layer_key(key: Any) -> Any:
    """A per_layer key as an int: "3" -> 3; any other non-integer stays as is, for the
    parameters' own check to refuse by name."""
    if isinstance(key, str) and key.strip().isascii() and key.strip().isdigit():
        return int(key)
    return key
