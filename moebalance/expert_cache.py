"""A simulated expert cache per MoE layer, for offloaded serving, and the cache-aware LASER option.

Offloaded single-GPU serving keeps ``capacity`` of a layer's E experts in GPU memory and loads
the others from the host on a miss (Liang et al., "Not All Models Suit Expert Offloading",
arXiv 2505.16056). ``ExpertCache`` is that cache as tensor state, updated by the decisions of
the router that holds it: least recently used eviction, one model step per routing call (a
decode step's tokens share one load of each expert they use, as an offloading runtime fetches
each missing expert once per step).

Cache-aware routing (``RouterRunner.attach_cache(..., aware=True)``): before each call the
cache state becomes LASER's load signal, ``RoutingContext.expert_load`` = ``miss_cost`` on
every expert not resident, 0 on the resident ones. A flexible token (flat scores, LASER's shape
test) then takes its resident candidates before any that would have to be loaded; a skewed
token keeps its vanilla top-k, and the pools (``pool_size``, ``min_score_ratio``) bound what a
token may take, so the calibrated thresholds bound the quality cost. ``miss_cost`` = T x k of
the call (every assignment the call makes): one miss outweighs any load the call could put on
a resident expert, so no token takes a non-resident candidate while a resident one is in its
pool. Any router can hold a cache that only counts (``aware=False``): vanilla top-k's hit rate
is the LRU baseline of ``moebalance.locality``.

No host synchronisation: the state and the counters are tensors on the logits' device.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from .config import ConfigError

__all__ = ["ExpertCache", "attach_caches", "cache_runners", "cache_stats"]


class ExpertCache:
    """LRU cache of ``capacity`` of ``num_experts`` experts (one MoE layer), empty at start.

    Attributes:
        last_use: [E] float32, the step each expert was last used (-1: never).
        steps: model steps (routing calls) recorded.
        uses: 0-dim float64, distinct experts used, summed over the steps.
        misses: 0-dim float64, of those, experts not resident at the step's start (loads).
    """

    def __init__(self, num_experts: int, capacity: int, device: Any = "cpu") -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ConfigError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= num_experts:
            raise ConfigError(
                f"capacity must be an integer in [1, {num_experts}] (experts kept), got {capacity!r}"
            )
        self.num_experts = num_experts
        self.capacity = capacity
        self.reset(device)

    def reset(self, device: Any = None) -> None:
        """Empty the cache and zero the counters (on ``device``, default: where it is)."""
        device = torch.device(device) if device is not None else self.last_use.device
        self.last_use = torch.full((self.num_experts,), -1.0, device=device)
        self.steps = 0
        self.uses = torch.zeros((), dtype=torch.float64, device=device)
        self.misses = torch.zeros((), dtype=torch.float64, device=device)

    def resident(self) -> torch.Tensor:
        """[E] bool: the experts in the cache (the ``capacity`` most recently used)."""
        newest = torch.topk(self.last_use, self.capacity, sorted=False).indices
        held = torch.zeros(self.num_experts, dtype=torch.bool, device=self.last_use.device)
        return held.index_fill_(0, newest, True) & (self.last_use >= 0)

    def miss_cost(self, num_tokens: int, topk: int) -> torch.Tensor:
        """[E] float32 load signal for a call of ``num_tokens`` tokens choosing ``topk`` experts
        each: ``num_tokens * topk`` on experts not resident, 0 on resident ones (module doc)."""
        return (~self.resident()).float() * float(max(1, num_tokens * topk))

    def record(self, routing_map: torch.Tensor) -> None:
        """Count one step's hits and misses and update the cache: ``routing_map`` [T, E] bool,
        the call's decision (each expert used once per step, however many tokens take it).
        More than ``capacity`` experts in one step: the lowest ids among them stay."""
        if routing_map.shape[-1] != self.num_experts:
            raise ConfigError(
                f"routing_map has {routing_map.shape[-1]} experts, the cache {self.num_experts}"
            )
        if self.last_use.device != routing_map.device:
            self.last_use = self.last_use.to(routing_map.device)
            self.uses, self.misses = self.uses.to(routing_map.device), self.misses.to(routing_map.device)
        used = routing_map.reshape(-1, self.num_experts).any(0)
        self.uses += used.sum()
        self.misses += (used & ~self.resident()).sum()
        # newest step first, ties among this step's experts to the lowest id (a strict order,
        # so that ``resident`` keeps a deterministic set when the step overflows the cache)
        order = torch.arange(self.num_experts, 0, -1, device=used.device) / (self.num_experts + 1)
        self.last_use = torch.where(used, self.steps + order, self.last_use)
        self.steps += 1

    def hit_rate(self) -> Optional[float]:
        """Percent of used experts that were resident (host sync; None before any use)."""
        uses = float(self.uses)
        return None if uses == 0 else 100.0 * (1.0 - float(self.misses) / uses)

    def __repr__(self) -> str:
        return f"ExpertCache(num_experts={self.num_experts}, capacity={self.capacity}, steps={self.steps})"


def cache_runners(model: torch.nn.Module) -> Iterator[Any]:
    """Every ``RouterRunner`` of a built model (Megatron-Core's ``BalancedRouter`` or
    DeepSpeed's ``BalancedGate`` hold one as ``runner``), in module order."""
    from .runner import RouterRunner

    for module in model.modules():
        runner = getattr(module, "runner", None)
        if isinstance(runner, RouterRunner):
            yield runner


def attach_caches(model: torch.nn.Module, capacity: Optional[int], *, aware: bool = False) -> int:
    """Give every router of ``model`` its own empty ``ExpertCache`` of ``capacity`` experts
    (None: remove them); ``aware``: cache-aware routing (module doc; LASER routers only).
    Returns the number of routers."""
    count = 0
    for runner in cache_runners(model):
        runner.attach_cache(capacity, aware=aware)
        count += 1
    return count


def cache_stats(model: torch.nn.Module) -> dict[int, dict]:
    """{MoE layer: {"uses", "misses", "hit_rate", "steps"}} of every router's cache (host
    sync), keyed by the layer of its latest call (module order before any call)."""
    out = {}
    for i, runner in enumerate(cache_runners(model)):
        cache = runner.cache
        if cache is None:
            continue
        layer = runner.layer if runner.layer is not None else i
        out[int(layer)] = {
            "uses": int(cache.uses),
            "misses": int(cache.misses),
            "hit_rate": cache.hit_rate(),
            "steps": cache.steps,
        }
    return out
