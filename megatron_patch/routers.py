"""Megatron-Core routers that run the moebalance policies.

``BalancedRouter`` is a ``TopKRouter`` whose ``routing()`` hands the gate logits to a
``moebalance.runner.RouterRunner`` (the policy, its parameters, the load scope, the decode flag,
the valid-row scatter; shared with DeepSpeed's ``BalancedGate``). This module only translates
Megatron's config and process groups into moebalance's ``GateConfig`` and ``RoutingContext``.
The gate (``gating()``, weight, ``expert_bias``) and the state-dict keys are the stock ones, so
checkpoints load unchanged.

``make_router_class(name, params, load_scope=...)`` binds a policy and its parameters into a
``BalancedRouter`` subclass, which goes into a layer spec (``megatron_patch.inject.with_router``)
or replaces the routers of a built model (``megatron_patch.inject.swap_routers``).

Semantics, in Megatron's terms:

- Output: ``probs [T, E]`` in the logits' dtype (Megatron's ``probs.type_as(logits)``) and
  ``routing_map [T, E]`` bool, probs zero off the map. T = seq_length * batch (local tokens).
- Capacity: Megatron's own capacity dropping (``apply_router_token_dropping``, run by the stock
  ``TopKRouter.routing`` whenever ``moe_expert_capacity_factor`` is set) is never applied; the
  policy alone decides drops. ``moe_expert_capacity_factor`` only tells the alltoall dispatcher
  to size its buffers from the routing map instead of assuming T * k rows; policies that change
  the number of experts per token require it, and ``prepare_config`` sets it (to E: with the
  stock router that value drops nothing, capacity = T * k).
- Padding: Megatron's ``padding_mask`` is True for padding tokens (as ``GPTModel.forward``'s
  docstring and the code of ``moe_utils`` and ``TopKRouter.forward`` treat it; the
  ``TopKRouter.routing`` and ``MoELayer.forward`` docstrings say the opposite, the code does
  not). The policy sees only the valid tokens, so padding never counts in loads, capacities or
  the EP-global counts. Padded tokens are then routed nowhere when the dispatcher sizes buffers
  dynamically (capacity factor set); otherwise (fixed k per row) they keep their vanilla top-k
  choice, which keeps the T * k contract and makes the "topk" router identical to the stock
  router with or without a padding mask. Selecting the valid rows costs one host sync, only
  when a mask is given.
- Decode: set ``router.decode = True`` (``inject.set_decode(model, True)``) during single-token
  decode steps; prefill-only policies (token drop, expanded drop) then route vanilla top-k.
- LASER loads (``load_scope``): "local" starts LASER's least-loaded assignment from zero on each
  rank (the paper's per-batch reset); "global" first counts the vanilla top-k choices of this
  rank's valid tokens, all-reduces them over the EP group (``pg_collection.ep``, one
  ``torch.distributed.all_reduce`` of E floats per layer call) and passes the other ranks'
  counts (global - local) as ``RoutingContext.expert_load``: each rank balances its own tokens
  against what the other ranks would send. Every EP rank runs the all-reduce on every call
  (lockstep), decode steps included.
- Layer index: ``RoutingContext.layer`` = Megatron's 1-based ``layer_number`` - 1 (the 0-based
  index over all decoder layers, dense ones included), or None before ``set_layer_number``.
- Inference only: no aux losses, z-loss or expert-bias updates (the stock router adds them only
  when training with grad enabled). ``moe_router_fusion`` (TE fused top-k) is ignored: the
  policies run in plain torch. Unsupported, with a ConfigError at build: sinkhorn / quantile
  balancing, ``moe_pad_expert_input_to_capacity``, routing replay, and the
  ``inference_optimized`` transformer_impl (its dispatcher wants dense [T, k] router output).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional

import torch
from megatron.core import utils as mcore_utils
from megatron.core.transformer.moe.moe_utils import (
    ProcessGroupCollection,
    get_default_pg_collection,
)
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig

from moebalance.config import ConfigError, GateConfig, RoutingContext
from moebalance.policies import get_policy
from moebalance.routing import Routing
from moebalance.replicas import ReplicaParams
from moebalance.runner import LOAD_SCOPES, RouterRunner, RunnerState, check_load_scope, resolve_params

__all__ = [
    "LOAD_SCOPES",
    "BalancedRouter",
    "gate_config",
    "make_router_class",
    "prepare_config",
    "needs_dynamic_capacity",
]


def gate_config(config: TransformerConfig) -> GateConfig:
    """moebalance GateConfig from Megatron's ``moe_router_*`` fields (group limits, scaling
    factor), for routers built from a user's own ``TransformerConfig``."""
    group_topk = config.moe_router_group_topk or None
    return GateConfig(
        num_experts=config.num_moe_experts,
        topk=config.moe_router_topk,
        score_function=config.moe_router_score_function,
        pre_softmax=bool(config.moe_router_pre_softmax),
        # Megatron's group-limited top-k applies only when group_topk is truthy.
        num_groups=config.moe_router_num_groups if group_topk else None,
        group_topk=group_topk,
        scaling_factor=config.moe_router_topk_scaling_factor or None,
    )


def _policy_name(router: str | type) -> str:
    if isinstance(router, type) and issubclass(router, BalancedRouter):
        return router.policy_name
    if isinstance(router, str):
        return get_policy(router).name
    raise ConfigError(f"router must be a policy name or a BalancedRouter class, got {router!r}")


def needs_dynamic_capacity(router: str | type) -> bool:
    """True when the policy may change the number of experts per token, so the alltoall
    dispatcher must size its buffers from the routing map (``moe_expert_capacity_factor`` set)."""
    return get_policy(_policy_name(router)).variable_experts_per_token


def prepare_config(config: TransformerConfig, router: str | type) -> TransformerConfig:
    """The config to build MoE layers with for ``router`` (a policy name or router class).

    For policies that may change the number of experts per token, returns a copy with
    ``moe_expert_capacity_factor = float(num_moe_experts)`` when it was None: the alltoall
    dispatcher then sizes buffers dynamically (a fixed T * k otherwise fails with "Split sizes
    doesn't match"), and the value drops nothing should the stock router ever see it. A factor
    already set is kept (BalancedRouter never drops by it). Other policies get ``config`` back
    unchanged. The copy goes through ``dataclasses.replace`` so Megatron re-validates it.
    """
    if not needs_dynamic_capacity(router) or config.moe_expert_capacity_factor is not None:
        return config
    return dataclasses.replace(config, moe_expert_capacity_factor=float(config.num_moe_experts))


class BalancedRouter(RunnerState, TopKRouter):
    """A TopKRouter whose ``routing()`` runs a moebalance policy (see the module docstring).
    Build subclasses with ``make_router_class``.

    Class attributes (bound by ``make_router_class``):
        policy_name: a name registered in ``moebalance.policies.POLICIES`` ("topk" here).
        policy_params: the policy's params dataclass (None = its defaults).
        load_scope: "local" or "global" (EP-global loads for policies that take
            ``RoutingContext.expert_load``, i.e. LASER).

    ``runner`` (a ``moebalance.runner.RouterRunner``) routes. Attributes the harness may set,
    forwarded to it: ``decode`` (prefill-only policies route vanilla) and ``seed`` (the
    "random" drop policy). After each call, ``last_routing`` holds the policy's Routing for the
    valid tokens (with ``num_dropped`` and ``capacity``, which Megatron's (probs, routing_map)
    cannot carry).
    """

    policy_name: ClassVar[str] = "topk"
    policy_params: ClassVar[Any] = None
    load_scope: ClassVar[str] = "local"
    placement: ClassVar[Optional[Mapping[int, Any]]] = None  # {0-based layer: Placement}
    replicas: ClassVar[Optional[ReplicaParams]] = None

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: Optional[ProcessGroupCollection] = None,
        is_mtp_layer: bool = False,
    ) -> None:
        if pg_collection is None:
            pg_collection = get_default_pg_collection()  # as MoELayer does
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self._check_supported(config)
        gate = gate_config(config)
        if self.placement:
            # num_moe_experts counts the physical slots; the gate scores the logical experts
            # (the checkpoint's router.weight [E, H]), and a replica choice picks the slots
            logical = {int(p.num_experts) for p in self.placement.values()}
            if len(logical) != 1:
                raise ConfigError(f"placement layers plan different numbers of experts {logical}")
            E = logical.pop()
            gate = dataclasses.replace(gate, num_experts=E, num_groups=None, group_topk=None)
            if self.bias is not None:
                raise ConfigError("a placement needs a router without bias (add_bias_linear)")
            weight = torch.nn.Parameter(self.weight.new_empty(E, self.weight.shape[1]))
            weight.sequence_parallel = self.weight.sequence_parallel
            self.weight = weight
        self.runner = RouterRunner(
            self.policy_name, self.policy_params, gate, load_scope=self.load_scope,
            replicas=self.replicas,
        )
        # TopKRouter keeps tp/cp groups only; the EP group is what the policies need.
        self.ep_group = pg_collection.ep
        self.ep_size = mcore_utils.get_pg_size(self.ep_group)
        self.ep_rank = mcore_utils.get_pg_rank(self.ep_group)
        RoutingContext(ep_rank=self.ep_rank, ep_size=self.ep_size).validate(self.runner.gate)
        if self.runner.policy.variable_experts_per_token and (
            config.moe_expert_capacity_factor is None
        ):
            raise ConfigError(
                f"router {self.policy_name!r} may change the number of experts per token: set "
                "moe_expert_capacity_factor (megatron_patch.prepare_config(config, name) sets it "
                "to num_moe_experts) so the token dispatcher sizes buffers dynamically"
            )

    @staticmethod
    def _check_supported(config: TransformerConfig) -> None:
        unsupported = {
            "moe_router_load_balancing_type in ('sinkhorn', 'quantile_balancing')": (
                config.moe_router_load_balancing_type in ("sinkhorn", "quantile_balancing")
            ),
            "moe_pad_expert_input_to_capacity": config.moe_pad_expert_input_to_capacity,
            "moe_enable_routing_replay": config.moe_enable_routing_replay,
            "transformer_impl='inference_optimized' (dense [T, k] router output)": (
                config.transformer_impl == "inference_optimized"
            ),
        }
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ConfigError(f"BalancedRouter does not support {', '.join(bad)}")

    @property
    def gate(self) -> GateConfig:
        return self.runner.gate

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron tells the router its 1-based layer: with a placement, that layer's layout."""
        super().set_layer_number(layer_number)
        if self.placement:
            layer = layer_number - 1
            if layer not in self.placement:
                raise ConfigError(f"the placement has no plan for MoE layer {layer}")
            self.runner.set_layout(self.placement[layer])

    def _context(self) -> RoutingContext:
        # Megatron's score function ignores expert_bias for softmax gates; so do we.
        bias = self.expert_bias if self.runner.gate.score_function != "softmax" else None
        layer = self.layer_number - 1 if self.layer_number is not None else None
        return self.runner.context(self.ep_rank, self.ep_size, layer=layer, expert_bias=bias)

    def route_tokens(self, logits: torch.Tensor) -> Routing:
        """Run the policy on ``logits`` [T, E] (valid tokens only). Collective when
        ``load_scope == "global"`` at EP > 1."""
        return self.runner.route_tokens(logits, self._context(), self.ep_group)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Policy routing. logits [S, B, E] (or [T, E]); padding_mask [S, B] bool, True = pad.

        Returns (probs [T, E] in the logits' dtype, routing_map [T, E] bool).
        """
        logits = logits.view(-1, self.runner.gate.num_experts)
        valid = None if padding_mask is None else ~padding_mask.reshape(-1).bool()
        decision = self.runner.route(
            logits,
            self._context(),
            self.ep_group,
            valid,
            # Fixed k per row: padded rows keep vanilla top-k (never counted by the policy).
            invalid_rows_topk=self.config.moe_expert_capacity_factor is None,
        )
        return decision.probs.type_as(logits), decision.routing_map.bool()

    def extra_repr(self) -> str:
        return (
            f"policy={self.policy_name!r}, load_scope={self.load_scope!r}, params={self.params!r}"
        )


def make_router_class(
    name: str,
    params: Any = None,
    *,
    load_scope: str = "local",
    class_name: Optional[str] = None,
    placement: Optional[Mapping[int, Any]] = None,
    replicas: Optional[ReplicaParams] = None,
) -> type[BalancedRouter]:
    """A BalancedRouter subclass with policy ``name`` and its ``params`` (dataclass or dict)
    bound, ready for a layer spec; ``make_router_class("topk")`` is vanilla top-k, identical
    to the stock ``TopKRouter`` at inference. Parameters are validated here, against the gate
    at build. ``class_name`` defaults to the policy's name in CamelCase + "Router".

    ``placement`` ({0-based layer: ``moebalance.placement.Placement``}): the MoE layers hold
    ``num_moe_experts`` = P physical slots (replicas of the E logical experts); the router
    scores the E experts with a [E, H] weight, decides over them, and ``replicas`` (default
    round-robin) picks one slot per (token, expert)."""
    policy = get_policy(name)
    params = resolve_params(policy, params)
    check_load_scope(load_scope, name)
    if class_name is None:
        class_name = "".join(part.capitalize() for part in name.split("_")) + "Router"
    return type(
        class_name,
        (BalancedRouter,),
        {
            "policy_name": policy.name,
            "policy_params": params,
            "load_scope": load_scope,
            "placement": dict(placement) if placement else None,
            "replicas": replicas,
            "__module__": __name__,
            "__doc__": f"BalancedRouter running policy {name!r} with {params!r}.",
        },
    )
