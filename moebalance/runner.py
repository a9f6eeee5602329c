"""How a framework adapter runs a routing policy inside one MoE layer (torch.distributed only).

``RouterRunner`` is what Megatron-Core's ``megatron_patch.BalancedRouter`` and DeepSpeed's
``deepspeed_patch.BalancedGate`` both hold: the policy and its parameters, the gate config, the
load scope, the decode flag and seed, the ``RoutingContext`` of each call, the EP-global loads,
the scatter of a decision over the valid rows back to all rows, and the last decision. The
adapters only compute the gate logits and translate the ``Routing`` into what their dispatcher
consumes.

A policy never talks to the network; what is EP-global (the other ranks' loads) is computed
here, by an all-reduce over the EP group the adapter passes in, and handed to the policy through
``RoutingContext.expert_load``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import ConfigError, GateConfig, RoutingContext
from .expert_cache import ExpertCache
from .policies import get_policy, resolve_params, route
from .replicas import ReplicaParams, check_layout, choose_replicas, layout_for_rank
from .routing import Routing

__all__ = [
    "LOAD_SCOPES",
    "NonFiniteLogitsError",
    "RouterRunner",
    "RunnerState",
    "check_router_logits",
    "check_load_scope",
    "other_ranks_load",
    "resolve_params",
    "route_in_group",
]

#: "local": LASER balances each rank's tokens on their own (the paper's per-batch reset);
#: "global": against the loads the other EP ranks would put on each expert (one all-reduce of
#: E floats per layer call).
LOAD_SCOPES = ("local", "global")


def check_load_scope(load_scope: str, name: str) -> None:
    """ConfigError unless ``load_scope`` is known and fits policy ``name``."""
    if load_scope not in LOAD_SCOPES:
        raise ConfigError(f"load_scope must be one of {LOAD_SCOPES}, got {load_scope!r}")
    if load_scope == "global" and not get_policy(name).uses_expert_load:
        raise ConfigError(
            f"load_scope='global' needs a policy that reads expert loads (laser, load_only); "
            f"router {name!r} does not"
        )


def other_ranks_load(
    logits: torch.Tensor, gate: GateConfig, ctx: RoutingContext, group: Any
) -> torch.Tensor | None:
    """[E] float32: vanilla top-k counts (tokens) of the other EP ranks' tokens; None at EP 1.

    Collective over ``group``: every EP rank must call it in every layer call (lockstep), also
    with zero local tokens.
    """
    if ctx.ep_size == 1:
        return None
    vanilla = route("topk", logits, gate, None, ctx, check_finite=False)
    local = vanilla.routing_map.sum(dim=0).to(torch.float32)
    total = local.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total - local


def route_in_group(
    name: str,
    logits: torch.Tensor,
    gate: GateConfig,
    params: Any,
    ctx: RoutingContext,
    *,
    load_scope: str,
    group: Any,
) -> Routing:
    """Run policy ``name`` on this rank's ``logits`` [T, E], adding EP-global loads first when
    ``load_scope == "global"`` (collective at EP > 1)."""
    if load_scope == "global":
        ctx = dataclasses.replace(ctx, expert_load=other_ranks_load(logits, gate, ctx, group))
    return route(name, logits, gate, params, ctx, check_finite=False)


class RouterRunner:
    """One MoE layer's routing: policy ``name`` with ``params`` on gate ``gate``.

    Args:
        name: a policy registered in ``moebalance.policies.POLICIES``.
        params: its params dataclass or a dict (None = its defaults); validated against
            ``gate`` here.
        gate: how logits become weights (E experts, top-k, score function).
        load_scope: "local" or "global" (EP-global loads, for policies that read
            ``RoutingContext.expert_load``).

    Attributes the harness sets through the adapter: ``decode`` (True during single-token
    decode steps: prefill-only policies route vanilla top-k), ``seed`` (the "random" drop
    policy). ``last_routing`` holds the policy's decision for the valid tokens of the latest
    call (with ``num_dropped`` and ``capacity``, which the frameworks' outputs cannot carry).
    """

    def __init__(
        self,
        name: str,
        params: Any,
        gate: GateConfig,
        *,
        load_scope: str = "local",
        replicas: Optional[ReplicaParams] = None,
    ) -> None:
        self.policy = get_policy(name)
        self.params = resolve_params(self.policy, params)
        self.gate = gate
        self.params.validate(gate)
        check_load_scope(load_scope, self.policy.name)
        self.load_scope = load_scope
        self.decode = False
        self.seed = 0
        self.last_routing: Optional[Routing] = None
        self.layer: Optional[int] = None  # the layer of the latest call (error messages)
        # replicas: this layer's placement (``set_layout``) and how a pair picks a slot
        self.replicas = replicas if replicas is not None else ReplicaParams()
        self.layout: Any = None
        self._local: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._turn = 0  # round-robin replica turns taken so far
        # 0-dim bool on the logits' device: a non-finite logit since the last check
        # (``check_router_logits`` reads it once per model step: no sync per layer)
        self.nonfinite: Optional[torch.Tensor] = None
        # a simulated expert cache (``attach_cache``): counts hits; ``cache_aware``: its state is
        # the policy's load signal
        self.cache: Optional[ExpertCache] = None
        self.cache_aware = False

    def attach_cache(self, capacity: Optional[int], *, aware: bool = False) -> None:
        """Give this layer an empty LRU ``ExpertCache`` of ``capacity`` experts (None: none),
        updated by every decision. ``aware``: cache-aware routing, the cache state as the
        policy's load signal (``moebalance.expert_cache``); policies that read expert loads
        only, with load_scope "local"."""
        if capacity is None:
            self.cache, self.cache_aware = None, False
            return
        if aware and not self.policy.uses_expert_load:
            raise ConfigError(
                f"cache-aware routing needs a policy that reads expert loads (laser, laser_fast); "
                f"router {self.policy.name!r} does not"
            )
        if aware and self.load_scope != "local":
            raise ConfigError(
                f"cache-aware routing replaces the load signal: load_scope must be 'local', got "
                f"{self.load_scope!r}"
            )
        if capacity < self.gate.topk:
            raise ConfigError(
                f"cache capacity must be at least topk = {self.gate.topk} experts, got {capacity}"
            )
        self.cache = ExpertCache(self.gate.num_experts, capacity)
        self.cache_aware = bool(aware)

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def num_slots(self) -> int:
        """Columns of the decision: physical slots P with a placement, else the E experts."""
        return self.gate.num_experts if self.layout is None else int(self.layout.num_slots)

    def set_layout(self, layout: Any) -> None:
        """This layer's replica placement (a ``moebalance.placement.Placement``: ``log2phy``
        [E, R], ``logcnt`` [E], ``slot_rank`` [P], ``num_slots``; None: no replicas, expert e
        on rank e // (E / EP)). The policy then decides over the E logical experts, with the
        layout's local experts and rank groups in its context, and ``choose_replicas`` sends
        each (token, expert) pair to one of the expert's slots."""
        if layout is not None:
            if int(layout.num_experts) != self.gate.num_experts:
                raise ConfigError(
                    f"placement has {int(layout.num_experts)} logical experts, the gate scores "
                    f"{self.gate.num_experts}"
                )
            check_layout(
                layout.log2phy, layout.logcnt, layout.slot_rank, int(layout.num_ranks),
                check_values=True,
            )
        self.layout, self._local, self._turn = layout, {}, 0

    def context(
        self,
        ep_rank: int,
        ep_size: int,
        *,
        layer: Optional[int] = None,
        expert_bias: Optional[torch.Tensor] = None,
    ) -> RoutingContext:
        """The ``RoutingContext`` of one call: where the layer runs (EP rank and size, 0-based
        decoder layer index, the gate's [E] expert bias, with a placement the experts this rank
        hosts) and the runner's decode flag and seed."""
        local = {}
        if self.layout is not None:
            if ep_rank not in self._local:
                L = self.layout
                self._local[ep_rank] = layout_for_rank(L.log2phy, L.logcnt, L.slot_rank, ep_rank)
            local["local_experts"], local["expert_group"] = self._local[ep_rank]
        return RoutingContext(
            ep_rank=ep_rank,
            ep_size=ep_size,
            expert_bias=expert_bias,
            decode=bool(self.decode),
            layer=layer,
            seed=self.seed,
            **local,
        )

    def route_tokens(self, logits: torch.Tensor, ctx: RoutingContext, group: Any) -> Routing:
        """The policy's decision for ``logits`` [T, E] (valid tokens only), over the E experts,
        or with a placement over its P physical slots (``choose_replicas``; round-robin turns
        go on from call to call), kept in ``last_routing``. Collective over the EP
        ``group`` when ``load_scope`` is "global" at EP > 1."""
        bad = ~torch.isfinite(logits).all()
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        self.layer = ctx.layer
        if self.cache_aware:
            cost = self.cache.miss_cost(logits.shape[0], self.gate.topk).to(logits.device)
            ctx = dataclasses.replace(ctx, expert_load=cost)
        decision = route_in_group(
            self.policy.name,
            logits,
            self.gate,
            self.params,
            ctx,
            load_scope=self.load_scope,
            group=group,
        )
        if self.cache is not None:
            self.cache.record(decision.routing_map)
        if self.layout is not None:
            # round-robin turns start where this rank's previous call left off (so that a
            # decode step's one token per sequence does not always take the first replica),
            # shifted per EP rank
            L, T = self.layout, logits.shape[0]
            decision = choose_replicas(
                decision, L.log2phy, L.logcnt, L.slot_rank, self.replicas, ctx,
                token_offset=self._turn + ctx.ep_rank * T,
            )
            self._turn += T
        self.last_routing = decision
        return decision

    def route(
        self,
        logits: torch.Tensor,
        ctx: RoutingContext,
        group: Any,
        valid: Optional[torch.Tensor] = None,
        *,
        invalid_rows_topk: bool = False,
    ) -> Routing:
        """The decision for all T rows of ``logits`` [T, E].

        ``valid``: [T] bool, True = a real token (None: all are). The policy sees only the
        valid rows, so padding never counts in loads, capacities or EP-global counts; the
        decision is scattered back (probs in the logits' dtype). Invalid rows are routed
        nowhere, or, with ``invalid_rows_topk``, keep their vanilla top-k choice (for a
        dispatcher that assumes exactly k routes per row). Selecting the valid rows costs one
        host sync, only when ``valid`` is given. ``capacity`` and ``num_dropped`` are the
        policy's.
        """
        if valid is None:
            return self.route_tokens(logits, ctx, group)
        rows = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
        decision = self.route_tokens(logits.index_select(0, rows), ctx, group)
        if invalid_rows_topk:
            base = route("topk", logits, self.gate, None, ctx, check_finite=False)
            probs, routing_map = base.probs, base.routing_map
        else:
            probs = logits.new_zeros(logits.shape[0], self.num_slots)
            routing_map = torch.zeros_like(probs, dtype=torch.bool)
        probs = probs.index_copy(0, rows, decision.probs.to(logits.dtype))
        routing_map = routing_map.index_copy(0, rows, decision.routing_map.bool())
        return Routing(
            probs, routing_map, capacity=decision.capacity, num_dropped=decision.num_dropped
        )

    def __repr__(self) -> str:
        return (
            f"RouterRunner(policy={self.policy.name!r}, load_scope={self.load_scope!r}, "
            f"params={self.params!r})"
        )


class RunnerState:
    """Mixin for a framework's router module that holds a ``RouterRunner`` as ``self.runner``:
    the runner's policy, parameters, decode flag, seed and last decision as attributes of the
    module, which is where the harness and users look for them."""

    runner: RouterRunner

    @property
    def policy(self):
        return self.runner.policy

    @property
    def params(self) -> Any:
        return self.runner.params

    @property
    def decode(self) -> bool:
        return self.runner.decode

    @decode.setter
    def decode(self, value: bool) -> None:
        self.runner.decode = bool(value)

    @property
    def seed(self) -> int:
        return self.runner.seed

    @seed.setter
    def seed(self, value: int) -> None:
        self.runner.seed = value

    @property
    def last_routing(self) -> Optional[Routing]:
        return self.runner.last_routing

    @last_routing.setter
    def last_routing(self, value: Optional[Routing]) -> None:
        self.runner.last_routing = value


class NonFiniteLogitsError(RuntimeError):
    """Router logits held NaN or Inf: the model's weights or inputs are broken (policies would
    route such rows to 0, 2 or all experts with NaN weights)."""


def check_router_logits(model: torch.nn.Module, when: str = "") -> None:
    """Raise NonFiniteLogitsError naming the first MoE layer whose router saw a NaN or Inf
    logit since the last check, and clear the flags. One host read for all layers: call it
    once per model step, not per layer. ``when`` (e.g. "prefill") goes into the message."""
    runners = [
        m.runner for m in model.modules() if isinstance(getattr(m, "runner", None), RouterRunner)
    ]
    flagged = [r for r in runners if r.nonfinite is not None]
    if not flagged:
        return
    bad = torch.stack([r.nonfinite for r in flagged]).cpu()
    for r in flagged:
        r.nonfinite = None
    if bool(bad.any()):
        layers = [r.layer for r, b in zip(flagged, bad.tolist()) if b]
        raise NonFiniteLogitsError(
            f"router logits of MoE layer {layers[0]} contain NaN or Inf"
            + (f" ({when})" if when else "")
            + (f"; also layers {layers[1:]}" if len(layers) > 1 else "")
            + ": the model's weights or inputs are not finite"
        )
