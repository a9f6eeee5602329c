"""DeepSpeed gate that runs the moebalance policies.

``BalancedGate`` is a ``deepspeed.moe.sharded_moe.TopKGate`` whose ``forward`` computes the gate
logits exactly as ``TopKGate`` does (``wg`` in fp32), hands them to a
``moebalance.runner.RouterRunner`` (the policy, its parameters, the load scope, the decode
flag, the used-token scatter; shared with Megatron's ``BalancedRouter``) and encodes the
``Routing`` as DeepSpeed's gate output (``deepspeed_patch.encoding``: the sparse 7-tuple or the
dense 4-tuple, capacity agreed over the EP group). ``self.wg`` is kept, so the checkpoint key
``...deepspeed_moe.gate.wg.weight`` is unchanged. No policy is implemented here.

Decisions, in DeepSpeed's terms:

- ``used_token`` ([S], nonzero = real token; ``MOELayer`` passes ``MoE.forward``'s second
  argument): the policy sees only the used tokens, so unused ones never count in loads or
  capacities; they are routed nowhere. Selecting them costs one host sync, only when given.
- The policy alone drops (``drop_tokens`` is False here); C is the buffer size the routing
  needs (``encoding.agree_capacity``). Every EP rank must call the gate the same number of
  times (lockstep).
- LASER loads (``load_scope``): "local" starts from zero on each rank; "global" all-reduces the
  vanilla top-k counts of this rank's tokens over the EP group and passes the other ranks'
  counts as ``RoutingContext.expert_load`` (as ``megatron_patch.routers``).
- ``decode``: set True during single-token decode steps; prefill-only policies route vanilla.
- DeepSpeed's eval randomness (``use_rts``, ``top2_2nd_expert_sampling``, the noisy gate) is
  off: the attributes are False/None and this forward never samples.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from deepspeed.moe.sharded_moe import TOPK_GATE_TIMER, TopKGate

from moebalance.config import ConfigError, GateConfig, RoutingContext
from moebalance.replicas import ReplicaParams
from moebalance.routing import Routing
from moebalance.runner import LOAD_SCOPES, RouterRunner, RunnerState

from .encoding import gate_output

__all__ = ["LOAD_SCOPES", "BalancedGate"]


class BalancedGate(RunnerState, TopKGate):
    """A TopKGate that routes with a moebalance policy (see the module docstring).

    Args:
        model_dim, num_experts, k: as ``TopKGate`` (the gate is ``wg = Linear(model_dim, E)``).
        router: a policy name registered in ``moebalance.policies.POLICIES``.
        params: the policy's params dataclass or a dict (None = its defaults).
        load_scope: "local" or "global" (EP-global loads; LASER only).
        gate_config: how logits become weights (default: softmax over the k chosen logits,
            Megatron's default; ``ModelConfig.gate_config()`` for a model config); its
            ``num_experts`` and ``topk`` must equal E and k.
        ep_group: the expert-parallel group (normally set later by
            ``MoE.set_deepspeed_parallelism``).
        expected_ep_size: the EP size of the layer the gate sits in; forward refuses to run
            without an EP group when it is > 1 (instead of agreeing C with nobody).
        capacity_factor, eval_capacity_factor, min_capacity: stored for TopKGate compatibility;
            unused (the policy decides drops, C is what the routing needs).

    ``runner`` (a ``moebalance.runner.RouterRunner``) routes. Attributes the harness may set:
    ``decode`` (bool) and ``seed`` (random drop policy), forwarded to the runner, and ``layer``
    (0-based decoder index, for per-layer policy parameters). ``last_routing`` holds the
    policy's ``Routing`` of the used tokens of the latest forward (its ``num_dropped`` feeds
    the dropped fraction).
    """

    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        k: int = 1,
        router: str = "topk",
        params: Any = None,
        *,
        load_scope: str = "local",
        gate_config: Optional[GateConfig] = None,
        ep_group: Any = None,
        expected_ep_size: Optional[int] = None,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 0,
        placement: Any = None,
        replicas: Optional[ReplicaParams] = None,
    ) -> None:
        super().__init__(
            model_dim,
            num_experts,
            k,
            capacity_factor,
            eval_capacity_factor,
            min_capacity,
            noisy_gate_policy=None,
            drop_tokens=False,
            use_rts=False,
            ep_group=ep_group,
            top2_2nd_expert_sampling=False,
        )
        # with a placement the layer's num_experts are its P physical slots and the gate scores
        # the E logical experts (wg [E, H]); a replica choice picks one slot per pair
        logical = num_experts if placement is None else int(placement.num_experts)
        if placement is not None:
            if int(placement.num_slots) != num_experts:
                raise ConfigError(
                    f"placement has {int(placement.num_slots)} slots, the MoE layer "
                    f"{num_experts} experts"
                )
            self.wg = torch.nn.Linear(model_dim, logical, bias=False).float()
        gate_config = gate_config or GateConfig(num_experts=logical, topk=k)
        if (gate_config.num_experts, gate_config.topk) != (logical, k):
            raise ConfigError(
                f"gate_config (num_experts={gate_config.num_experts}, "
                f"topk={gate_config.topk}) must match the gate "
                f"(num_experts={logical}, k={k})"
            )
        self.runner = RouterRunner(
            router, params, gate_config, load_scope=load_scope, replicas=replicas
        )
        self.runner.set_layout(placement)
        self.expected_ep_size = expected_ep_size
        if expected_ep_size is not None:
            RoutingContext(ep_size=expected_ep_size).validate(gate_config)
        self.layer: Optional[int] = None

    @classmethod
    def from_gate(
        cls, old: TopKGate, router: str = "topk", params: Any = None, **kwargs: Any
    ) -> "BalancedGate":
        """A BalancedGate replacing ``old``: shares its ``wg`` module (weights, device, dtype)
        when it scores the same experts, its EP group, train/eval mode and timer settings.
        Leaves the global RNG state as it was."""
        placement = kwargs.get("placement")
        num_experts = old.wg.out_features if placement is None else int(placement.num_slots)
        with torch.random.fork_rng(devices=[]):  # the throwaway Linear's init draws numbers
            new = cls(
                old.wg.in_features,
                num_experts,
                old.k,
                router,
                params,
                capacity_factor=old.capacity_factor,
                eval_capacity_factor=old.eval_capacity_factor,
                min_capacity=old.min_capacity,
                **kwargs,
            )
        if old.wg.out_features == new.wg.out_features:  # (a fresh P-slot layer's TopKGate
            new.wg = old.wg  # scores P rows; with a placement the new gate keeps its E rows)
        new.ep_group = old.ep_group
        new.wall_clock_breakdown = old.wall_clock_breakdown
        new.train(old.training)
        return new

    @property
    def gate_config(self) -> GateConfig:
        return self.runner.gate

    @property
    def load_scope(self) -> str:
        return self.runner.load_scope

    # -- EP geometry -----------------------------------------------------------------------

    def _set_ep_group(self, ep_group):
        super()._set_ep_group(ep_group)
        self._context()  # validates E divisible by the EP size now, not at the first forward

    def _ep(self) -> tuple[int, int]:
        if self.ep_group is None:
            if (self.expected_ep_size or 1) > 1:
                raise RuntimeError(
                    f"BalancedGate of an MoE layer with ep_size={self.expected_ep_size} has no EP "
                    "group: call deepspeed_patch.setup_expert_parallel(model) (or "
                    "MoE.set_deepspeed_parallelism()) before the forward pass"
                )
            return 0, 1
        return dist.get_rank(self.ep_group), dist.get_world_size(self.ep_group)

    def _context(self) -> RoutingContext:
        ep_rank, ep_size = self._ep()
        ctx = self.runner.context(ep_rank, ep_size, layer=self.layer)
        ctx.validate(self.runner.gate)
        return ctx

    # -- routing ---------------------------------------------------------------------------

    def route_tokens(self, logits: torch.Tensor) -> Routing:
        """Run the policy on ``logits`` [T, E] (fp32). Collective when ``load_scope`` is
        "global" at EP > 1."""
        return self.runner.route_tokens(logits, self._context(), self.ep_group)

    def routing(self, logits: torch.Tensor, used_token: Optional[torch.Tensor] = None) -> Routing:
        """The decision for all S tokens ``logits`` [S, E]: the policy on the used ones
        (``used_token`` [S], nonzero = used; None = all), unused rows routed nowhere."""
        valid = None if used_token is None else used_token.reshape(-1) != 0
        return self.runner.route(logits, self._context(), self.ep_group, valid)

    def forward(
        self,
        input: torch.Tensor,
        used_token: Optional[torch.Tensor] = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ) -> tuple:
        """input [S, model_dim] -> DeepSpeed's 7-tuple (``sparse_routes``) or 4-tuple.

        ``use_tutel`` needs nothing different: Tutel's dispatcher reads the same rows."""
        if self.wall_clock_breakdown:
            self.timers(TOPK_GATE_TIMER).start()
        # as TopKGate: logits in fp32 whatever the model dtype
        logits = torch.nn.functional.linear(input.float(), weight=self.wg.weight.float(), bias=None)
        decision = self.routing(logits, used_token)
        out = gate_output(
            decision,
            self.k,
            ep_group=self.ep_group,
            sparse=sparse_routes,
            variable_experts_per_token=self.runner.policy.variable_experts_per_token,
        )
        if self.wall_clock_breakdown:
            self.timers(TOPK_GATE_TIMER).stop()
            self.gate_time = self.timers(TOPK_GATE_TIMER).elapsed(reset=False)
        return out

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, router={self.policy.name!r}, load_scope={self.load_scope!r}, "
            f"params={self.params!r}, gate_config={self.gate_config!r}"
        )
