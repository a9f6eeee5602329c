"""DeepSpeed gate that runs the moebalance policies, and the checker for DeepSpeed's gate contract.

``BalancedGate`` is a ``deepspeed.moe.sharded_moe.TopKGate`` whose ``forward`` computes the gate
logits exactly as ``TopKGate`` does (``wg`` in fp32), calls ``moebalance.policies.route`` and
translates the ``Routing`` into what DeepSpeed's ``MOELayer`` consumes. ``self.wg`` is kept, so
the checkpoint key ``...deepspeed_moe.gate.wg.weight`` is unchanged. No policy is implemented
here.

Output formats (deepspeed 0.19.8, ``sharded_moe.py``), S local tokens, E experts, C capacity:

- sparse 7-tuple (``sparse_routes=True``, what ``MOELayer.forward`` asks for since 0.19.4):
  ``(l_aux, C, E, indices [R, S] int32, locations [R, S] int32, gates [R, S] fp32,
  exp_counts [E])``. Row r holds every token's r-th route: its expert (-1 = no route),
  its position in that expert's capacity buffer, and its combine weight (0 when dropped).
- dense 4-tuple (``sparse_routes=False``: DeepSpeed <= 0.19.3 and ``DeepSpeedMoEInference``):
  ``(l_aux, combine_weights [S, E, C] fp32, dispatch_mask [S, E, C] bool, exp_counts [E])``.

Decisions, in DeepSpeed's terms:

- Rows R of the sparse format: R = k for policies that never give a token more than k experts
  (top-k, LASER, token drop: rows with fewer routes are padded with -1). For policies that may
  give more (``Policy.variable_experts_per_token``, e.g. expanded drop), R = max(k, the largest
  number of experts any local token got), one host sync. ``MOELayer`` reads R from the tensor
  (``slots.size(0)``), never from ``gate.k``, and the rows never leave the rank (only the
  [E, C, M] buffer is exchanged), so R need not agree across EP ranks. Nothing is cut: to bound
  R, bound the policy (``ExpandedDropParams.max_experts_per_token``).
- Row order: each token's routes by decreasing combine weight (ties: lower expert first), so row
  0 is the top-1 choice. Locations are assigned row-major (all row-0 routes of an expert, in
  token order, then row 1, ...), exactly as DeepSpeed's ``top2gating``; vanilla top-2 therefore
  reproduces ``TopKGate(k=2, drop_tokens=False, use_rts=False)`` tuple for tuple.
- Capacity C = the largest number of tokens this rank sends to one expert, all-reduced with MAX
  over the EP group on every call (a mismatch aborts gloo's all-to-all and hangs NCCL's), at
  least 1, rounded up to the tensor-parallel size when DeepSpeed has an ``mpu`` (``MOELayer``
  splits the capacity dimension over TP ranks). It is the buffer size the routing needs, not a
  drop threshold: the policy alone drops (``drop_tokens`` is False here). Collective: every EP
  rank must call the gate the same number of times (lockstep).
- ``exp_counts`` = tokens this rank sends to each expert after the policy (the built-in gates
  count before their capacity drop); int64 [E]. ``l_aux`` = 0 (inference only).
- ``used_token`` ([S], nonzero = real token; ``MOELayer`` passes ``MoE.forward``'s second
  argument): the policy sees only the used tokens, so unused ones never count in loads or
  capacities; they are routed nowhere. Selecting them costs one host sync, only when given.
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
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

from moebalance.config import ConfigError, GateConfig, RoutingContext
from moebalance.distributed import LOAD_SCOPES, check_load_scope, resolve_params, route_in_group
from moebalance.policies import get_policy, route
from moebalance.routing import Routing, RoutingInvariantError

__all__ = [
    "LOAD_SCOPES",
    "BalancedGate",
    "GateOutputError",
    "agree_capacity",
    "check_gate_output",
    "dense_gate_tensors",
    "gate_output",
    "gate_output_routing",
    "route_locations",
    "sparse_routes",
]



class GateOutputError(RoutingInvariantError):
    """A gate output broke DeepSpeed's contract; the message names the broken invariant."""


# ----------------------------------------------------------------------------- Routing -> tuple


def sparse_routes(routing: Routing, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routes of ``routing`` as DeepSpeed rows: ([R, S] int64 experts, -1 = none;
    [R, S] fp32 weights, 0 where none), each token's routes by decreasing weight.

    routing: S tokens x E experts with at most ``rows`` experts per token (R = ``rows``).
    """
    idx, probs = routing.topk_indices(rows)  # [S, R], slot order, -1 padding last
    key = torch.where(idx >= 0, probs.float(), torch.full_like(probs, -1.0, dtype=torch.float32))
    order = torch.argsort(key, dim=1, descending=True, stable=True)
    idx = torch.gather(idx, 1, order)
    probs = torch.gather(probs, 1, order).float()
    return idx.t().contiguous(), probs.t().contiguous()


def route_locations(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Capacity-buffer positions of routes ([R, S] experts, -1 = none), row-major.

    Returns (locations [R, S] int64: how many earlier routes in row-major order go to the same
    expert, 0 where there is no route; counts [E] int64: routes per expert). Sort-based, so
    O(R S log(R S)) with no [R S, E] one-hot.
    """
    flat = indices.reshape(-1).long()
    key = torch.where(flat >= 0, flat, torch.full_like(flat, num_experts))  # no route -> bin E
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(flat.numel(), device=flat.device) - starts[key[order]]
    locations = torch.empty_like(flat).scatter_(0, order, position)
    locations = torch.where(flat >= 0, locations, torch.zeros_like(locations))
    return locations.view_as(indices), counts[:num_experts]


def agree_capacity(need: torch.Tensor, ep_group: Any = None) -> torch.Tensor:
    """0-dim int64 capacity C shared by the EP group: MAX over ranks of ``need`` (0-dim), at
    least 1, rounded up to DeepSpeed's tensor-parallel size. Collective when the group has more
    than one rank."""
    capacity = need.reshape(()).to(torch.int64).clone()
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=ep_group)
    capacity = capacity.clamp(min=1)
    tp = bwc_tensor_model_parallel_world_size(groups.mpu)
    if tp > 1:  # MOELayer splits the capacity dimension over the TP ranks
        capacity = (capacity + tp - 1) // tp * tp
    return capacity


def dense_gate_tensors(
    indices: torch.Tensor,
    locations: torch.Tensor,
    gates: torch.Tensor,
    num_experts: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense pair (combine_weights [S, E, C] fp32, dispatch_mask [S, E, C] bool) of routes
    given as [R, S] experts (-1 = none), locations and fp32 weights. Any R works."""
    R, S = indices.shape
    kept = indices >= 0
    token = torch.arange(S, device=indices.device).expand(R, S)[kept]
    expert, slot = indices[kept].long(), locations[kept].long()
    combine = torch.zeros(S, num_experts, capacity, dtype=torch.float32, device=gates.device)
    combine.index_put_((token, expert, slot), gates[kept].float())
    dispatch = torch.zeros(S, num_experts, capacity, dtype=torch.bool, device=gates.device)
    dispatch.index_put_((token, expert, slot), torch.ones_like(token, dtype=torch.bool))
    return combine, dispatch


def gate_output(
    routing: Routing,
    topk: int,
    *,
    ep_group: Any = None,
    sparse: bool = True,
    variable_experts_per_token: bool = True,
) -> tuple:
    """DeepSpeed's gate output for ``routing`` (S tokens x E experts): the sparse 7-tuple when
    ``sparse`` else the dense 4-tuple (see the module docstring). Collective over ``ep_group``
    (the capacity). ``variable_experts_per_token=False`` promises at most ``topk`` experts per
    token, which saves the host sync that sizes the rows."""
    S, E = routing.routing_map.shape
    rows = topk
    if variable_experts_per_token and S:
        rows = max(topk, int(routing.routing_map.sum(dim=1).max()))
    indices, gates = sparse_routes(routing, rows)
    locations, exp_counts = route_locations(indices, E)
    capacity = agree_capacity(exp_counts.max(), ep_group)
    l_aux = torch.zeros((), dtype=torch.float32, device=gates.device)
    if sparse:
        return (
            l_aux,
            capacity,
            E,
            indices.to(torch.int32),
            locations.to(torch.int32),
            gates,
            exp_counts,
        )
    combine, dispatch = dense_gate_tensors(indices, locations, gates, E, int(capacity))
    return l_aux, combine, dispatch, exp_counts


def gate_output_routing(output: tuple, num_experts: int) -> Routing:
    """The routing a DeepSpeed gate output (7- or 4-tuple) encodes: probs [S, E] fp32 (combine
    weights summed per token and expert), routing_map [S, E] bool (dispatched pairs)."""
    if len(output) == 7:
        indices, gates = output[3].long(), output[5].float()
        R, S = indices.shape
        kept = indices >= 0
        token = torch.arange(S, device=indices.device).expand(R, S)[kept]
        probs = torch.zeros(S, num_experts, dtype=torch.float32, device=gates.device)
        probs.index_put_((token, indices[kept]), gates[kept], accumulate=True)
        routing_map = torch.zeros(S, num_experts, dtype=torch.bool, device=gates.device)
        routing_map[token, indices[kept]] = True
        return Routing(probs, routing_map)
    if len(output) == 4:
        combine, dispatch = output[1].float(), output[2]
        return Routing(combine.sum(dim=2), dispatch.any(dim=2))
    raise GateOutputError(
        f"a gate output is a 7-tuple (sparse) or a 4-tuple (dense), got {len(output)} items"
    )


# ----------------------------------------------------------------------------- the gate


class BalancedGate(TopKGate):
    """A TopKGate that routes with a moebalance policy (see the module docstring).

    Args:
        model_dim, num_experts, k: as ``TopKGate`` (the gate is ``wg = Linear(model_dim, E)``).
        router: a policy name registered in ``moebalance.policies.POLICIES``.
        params: the policy's params dataclass or a dict (None = its defaults).
        load_scope: "local" or "global" (EP-global loads; LASER only).
        gate_config: how logits become weights (default: softmax over the k chosen logits,
            Megatron's default); its ``num_experts`` and ``topk`` must equal E and k.
        ep_group: the expert-parallel group (normally set later by
            ``MoE.set_deepspeed_parallelism``).
        expected_ep_size: the EP size of the layer the gate sits in; forward refuses to run
            without an EP group when it is > 1 (instead of agreeing C with nobody).
        capacity_factor, eval_capacity_factor, min_capacity: stored for TopKGate compatibility;
            unused (the policy decides drops, C is what the routing needs).

    Attributes the harness may set: ``decode`` (bool), ``seed`` (random drop policy),
    ``layer`` (index for per-layer policy parameters). ``last_routing`` holds the ``Routing``
    of the latest forward (S tokens x E; its ``num_dropped`` feeds the dropped fraction).
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
        self.policy = get_policy(router)
        self.params = resolve_params(self.policy, params)
        self.gate_config = gate_config or GateConfig(num_experts=num_experts, topk=k)
        if (self.gate_config.num_experts, self.gate_config.topk) != (num_experts, k):
            raise ConfigError(
                f"gate_config (num_experts={self.gate_config.num_experts}, "
                f"topk={self.gate_config.topk}) must match the gate "
                f"(num_experts={num_experts}, k={k})"
            )
        self.params.validate(self.gate_config)
        check_load_scope(load_scope, self.policy.name)
        self.load_scope = load_scope
        self.expected_ep_size = expected_ep_size
        if expected_ep_size is not None:
            RoutingContext(ep_size=expected_ep_size).validate(self.gate_config)
        self.decode = False
        self.seed = 0
        self.layer: Optional[int] = None
        self.last_routing: Optional[Routing] = None

    @classmethod
    def from_gate(
        cls, old: TopKGate, router: str = "topk", params: Any = None, **kwargs: Any
    ) -> "BalancedGate":
        """A BalancedGate replacing ``old``: shares its ``wg`` module (weights, device, dtype),
        EP group, train/eval mode and timer settings. Leaves the global RNG state as it was."""
        with torch.random.fork_rng(devices=[]):  # the throwaway Linear's init draws numbers
            new = cls(
                old.wg.in_features,
                old.wg.out_features,
                old.k,
                router,
                params,
                capacity_factor=old.capacity_factor,
                eval_capacity_factor=old.eval_capacity_factor,
                min_capacity=old.min_capacity,
                **kwargs,
            )
        new.wg = old.wg
        new.ep_group = old.ep_group
        new.wall_clock_breakdown = old.wall_clock_breakdown
        new.train(old.training)
        return new

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
        ctx = RoutingContext(
            ep_rank=ep_rank,
            ep_size=ep_size,
            decode=bool(self.decode),
            layer=self.layer,
            seed=self.seed,
        )
        ctx.validate(self.gate_config)
        return ctx

    # -- routing ---------------------------------------------------------------------------

    def route_tokens(self, logits: torch.Tensor) -> Routing:
        """Run the policy on ``logits`` [T, E] (fp32). Collective when ``load_scope`` is
        "global" at EP > 1."""
        return route_in_group(
            self.policy.name,
            logits,
            self.gate_config,
            self.params,
            self._context(),
            load_scope=self.load_scope,
            group=self.ep_group,
        )

    def routing(self, logits: torch.Tensor, used_token: Optional[torch.Tensor] = None) -> Routing:
        """The decision for all S tokens: ``route_tokens`` on the used ones, unused rows empty."""
        if used_token is None:
            return self.route_tokens(logits)
        used = torch.nonzero(used_token.reshape(-1) != 0, as_tuple=True)[0]
        decision = self.route_tokens(logits.index_select(0, used))
        probs = torch.zeros_like(logits).index_copy(0, used, decision.probs.to(logits.dtype))
        routing_map = torch.zeros_like(logits, dtype=torch.bool).index_copy(
            0, used, decision.routing_map
        )
        return Routing(
            probs, routing_map, capacity=decision.capacity, num_dropped=decision.num_dropped
        )

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
            variable_experts_per_token=self.policy.variable_experts_per_token,
        )
        self.last_routing = decision
        if self.wall_clock_breakdown:
            self.timers(TOPK_GATE_TIMER).stop()
            self.gate_time = self.timers(TOPK_GATE_TIMER).elapsed(reset=False)
        return out

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, router={self.policy.name!r}, load_scope={self.load_scope!r}, "
            f"params={self.params!r}, gate_config={self.gate_config!r}"
        )


# ----------------------------------------------------------------------------- the checker


def _fail(message: str) -> None:
    raise GateOutputError(message)


def _capacity_of(output: tuple) -> int:
    try:
        return int(output[1]) if len(output) == 7 else int(output[1].shape[2])
    except Exception:  # malformed: reported by the local checks after the collective
        return -1


def check_gate_output(
    output: tuple,
    *,
    num_tokens: int,
    num_experts: int,
    ep_group: Any = None,
    max_routes_per_token: Optional[int] = None,
) -> int:
    """Raise GateOutputError unless ``output`` keeps DeepSpeed's gate contract; returns C.

    Works for the sparse 7-tuple and the dense 4-tuple, from this gate or DeepSpeed's own.
    Checks: tuple layout, shapes ([R, S] / [S, E, C]), dtypes (int32 routes, fp32 gates, bool
    mask); C identical on every rank of ``ep_group`` (a collective, run before any local check
    can raise, so a failing rank never leaves the others waiting); expert indices in [-1, E);
    0 <= location < C for kept routes; every (expert, location) slot used at most once; no
    token routed twice to one expert; gates finite, >= 0, and 0 on dropped routes;
    ``exp_counts`` [E] at least the routes kept per expert (the built-in gates count before
    their drops); at most ``max_routes_per_token`` kept routes per token when given.
    A test/debug helper: it synchronises with the device.
    """
    C = _capacity_of(output)
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        device = output[-1].device if isinstance(output[-1], torch.Tensor) else "cpu"
        mine = torch.tensor([C], dtype=torch.int64, device=device)  # NCCL needs device tensors
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(ep_group))]
        dist.all_gather(every, mine, group=ep_group)
        capacities = [int(c) for c in every]
        if len(set(capacities)) != 1:
            _fail(f"capacity C differs across EP ranks: {capacities} (rank order of the EP group)")
    if len(output) == 7:
        _check_sparse(output, num_tokens, num_experts, C, max_routes_per_token)
    elif len(output) == 4:
        _check_dense(output, num_tokens, num_experts, C, max_routes_per_token)
    else:
        _fail(f"a gate output is a 7-tuple (sparse) or a 4-tuple (dense), got {len(output)} items")
    return C


def _check_counts(exp_counts: Any, kept_per_expert: torch.Tensor, num_experts: int) -> None:
    if not isinstance(exp_counts, torch.Tensor) or tuple(exp_counts.shape) != (num_experts,):
        _fail(f"exp_counts must be a tensor of shape [E={num_experts}], got {exp_counts!r}")
    if exp_counts.is_floating_point():
        _fail(f"exp_counts must be integer counts, got {exp_counts.dtype}")
    short = exp_counts.long().cpu() < kept_per_expert.cpu()
    if short.any():
        e = int(torch.nonzero(short)[0, 0])
        _fail(
            f"exp_counts[{e}] = {int(exp_counts[e])} is below the {int(kept_per_expert[e])} "
            "routes kept"
        )


def _check_per_token(per_token: torch.Tensor, limit: Optional[int]) -> None:
    if limit is not None and per_token.numel() and int(per_token.max()) > limit:
        t = int(torch.argmax(per_token))
        _fail(f"token {t} has {int(per_token[t])} routes, more than {limit}")


def _check_sparse(output, S, E, C, max_routes) -> None:
    _, capacity, num_experts, indices, locations, gates, exp_counts = output
    if not isinstance(capacity, (int, torch.Tensor)) or C < 1:
        _fail(f"capacity C must be an int or 0-dim integer tensor >= 1, got {capacity!r}")
    if int(num_experts) != E:
        _fail(f"E = {num_experts} in the output, expected {E}")
    for name, t, dtype in (
        ("indices", indices, torch.int32),
        ("locations", locations, torch.int32),
        ("gates", gates, torch.float32),
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != S or t.shape[0] < 1:
            _fail(f"{name} must be [R >= 1, S={S}], got {getattr(t, 'shape', t)!r}")
        if t.dtype != dtype:
            _fail(f"{name} must be {dtype}, got {t.dtype}")
    if indices.shape != locations.shape or indices.shape != gates.shape:
        _fail(f"indices {tuple(indices.shape)}, locations {tuple(locations.shape)}, gates "
              f"{tuple(gates.shape)} differ in shape")
    idx, loc, g = indices.long().cpu(), locations.long().cpu(), gates.cpu()
    if ((idx < -1) | (idx >= E)).any():
        _fail(f"expert indices must be in [-1, {E}); got values {idx.unique().tolist()}")
    kept = idx >= 0
    bad_loc = kept & ((loc < 0) | (loc >= C))
    if bad_loc.any():
        r, s = (int(v) for v in torch.nonzero(bad_loc)[0])
        _fail(f"route {r} of token {s} (expert {int(idx[r, s])}) has location {int(loc[r, s])} "
              f"outside [0, C={C})")
    slots = (idx * C + loc)[kept]
    if slots.unique().numel() != slots.numel():
        _fail(
            "two kept routes share an (expert, location) slot: one token would get another's "
            "output"
        )
    token = torch.arange(S).expand_as(idx)
    pairs = (token * E + idx)[kept]
    if pairs.unique().numel() != pairs.numel():
        _fail("a token is routed twice to the same expert")
    if not torch.isfinite(g).all() or (g < 0).any():
        _fail("gates must be finite and >= 0")
    if (g[~kept] != 0).any():
        _fail("dropped routes (index -1) must carry gate 0")
    _check_counts(exp_counts, torch.bincount(idx[kept], minlength=E)[:E], E)
    _check_per_token(kept.sum(dim=0), max_routes)


def _check_dense(output, S, E, C, max_routes) -> None:
    _, combine, dispatch, exp_counts = output
    for name, t, dtype in (
        ("combine_weights", combine, torch.float32),
        ("dispatch_mask", dispatch, torch.bool),
    ):
        if not isinstance(t, torch.Tensor) or tuple(t.shape[:2]) != (S, E) or t.dim() != 3:
            _fail(f"{name} must be [S={S}, E={E}, C], got {getattr(t, 'shape', t)!r}")
        if t.dtype != dtype:
            _fail(f"{name} must be {dtype}, got {t.dtype}")
    if combine.shape != dispatch.shape or C < 1:
        _fail(f"combine_weights {tuple(combine.shape)} and dispatch_mask {tuple(dispatch.shape)} "
              "must agree, with C >= 1")
    w, d = combine.cpu(), dispatch.cpu()
    if not torch.isfinite(w).all() or (w < 0).any():
        _fail("combine_weights must be finite and >= 0")
    if (w[~d] != 0).any():
        _fail("combine_weights must be 0 where dispatch_mask is False")
    if (d.sum(dim=0) > 1).any():
        _fail("an (expert, location) slot holds more than one token")
    if (d.sum(dim=2) > 1).any():
        _fail("a token is routed twice to the same expert")
    _check_counts(exp_counts, d.sum(dim=(0, 2)), E)
    _check_per_token(d.any(dim=2).sum(dim=1), max_routes)
