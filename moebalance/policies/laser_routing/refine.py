"""Augmenting rounds toward the least possible peak: LASER's assignment after its pricing.

An assignment is a flow (token -> expert); it can lower its peak to a cap M exactly when every
expert above M reaches an expert below M in the residual graph, whose edges e -> f are the
tokens holding e that could take f instead (an untaken valid candidate): moving the excess
along such paths is max-flow's augmentation. ``refine_assignment`` does it in a fixed number
of relabels (``refine_schedule``), each on a strided sample of the tokens, without a host
synchronisation:

1. Relabel: the [E, E] graph of the sample's moves (one bincount over its (taken, untaken)
   pairs). When the sample is the whole batch the graph is exact, and the experts that cannot
   reach room (below M) form a closed set: no token holding one of them can leave the set, so
   its load cannot fall, and the cap is raised to that set's water level (a lower bound on
   the peak of any assignment, like M itself).
2. Push (``REFINE_STEPS`` steps): the distance of every expert to room, by breadth-first
   search on the graph; every sampled token proposes one move, from its most loaded taken
   expert above M to an untaken candidate nearer to room, the nearest drawn with weight =
   its room (Gumbel-max with fixed draws). Proposals are accepted in token order within each
   destination's room (an expert at M or above: within what keeps it at or below the current
   peak), then within each source's excess. So no move raises the peak, and excess reaching
   an intermediate expert moves on at the next step.

When no expert is left above M, the peak is M: a lower bound, hence the least possible.
"""

from __future__ import annotations

import functools

import torch

from .indexing import pick
from .noise import REPAIR_SEED, fixed_noise
from .water_level import capped_water_level

__all__ = ["refine_assignment", "refine_schedule"]

REFINE_STEPS = 3  # push steps per relabel
SPARSE_STEPS = 5  # relabels per REFINE_PAIRS / (k (c - k)) when tokens have few moves
REFINE_PAIRS = 8  # a round examines about this many possible moves per token of the batch ...
REFINE_MIN_TOKENS = 1024  # ... on at least this many tokens
MAX_DISTANCE = 6  # breadth-first levels searched (longer paths wait for the next round)
_FAR = float(1 << 20)  # distance of an expert with no path to room within MAX_DISTANCE


def refine_schedule(
    num_tokens: int, k: int, c: int, rounds: int, num_experts: int | None = None
) -> tuple[int, int, int]:
    """(relabels, push steps per relabel, tokens per relabel) for ``rounds`` rounds.

    Each token has k (c - k) possible moves (taken, untaken); the rounds examine about
    ``rounds`` x REFINE_PAIRS of them per token of the batch. Tokens with few possible moves
    make a sparse move graph and long augmenting paths: all of them take part, in
    SPARSE_STEPS x ceil(rounds x REFINE_PAIRS / (k (c - k))) steps, each with its own relabel
    (a move changes the graph, and on a sparse graph the stale edges soon lead nowhere), but
    at most max(2 rounds, E / 2) of them: an augmenting path visits each expert at most once,
    so few experts make short paths that few relabels drain (the gap per benchmark cell is in
    results/routers_cpu_1thread.md). Tokens with many moves make short paths: a strided sample of about
    T x REFINE_PAIRS / (k (c - k)) tokens (at least REFINE_MIN_TOKENS) per relabel,
    REFINE_STEPS steps each, and fewer relabels; but at least ``rounds`` when the sample is the
    whole batch (small batches, where one token is a larger share of the peak).
    ``num_experts``: E (None: no cap)."""
    pairs = max(1, k * (c - k))
    sample = min(num_tokens, max(REFINE_MIN_TOKENS, -(-num_tokens * REFINE_PAIRS // pairs)))
    relabels = -(-rounds * REFINE_PAIRS // pairs)
    if pairs <= REFINE_PAIRS:
        sparse = SPARSE_STEPS * relabels
        if num_experts is not None:
            sparse = min(sparse, max(2 * rounds, num_experts // 2))
        return sparse, 1, sample
    if sample == num_tokens:
        relabels = max(relabels, rounds)
    return relabels, REFINE_STEPS, sample


@functools.lru_cache(maxsize=16)
def _identity(num_experts: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # cached: a normal tensor whoever asks first
        return torch.eye(num_experts, dtype=torch.bool, device=device)


def _ranks(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[n] int64: 1 + the entries of the same group before each (``group`` [n] int64 in
    [0, num_groups]; the last group collects entries that do not count). One stable sort."""
    n = group.shape[0]
    sorted_group, order = torch.sort(group, stable=True)
    counts = torch.bincount(group, minlength=num_groups + 1)
    first = counts.cumsum(0) - counts  # where each group starts in the order
    position = torch.arange(1, n + 1, device=group.device) - pick(first, sorted_group)
    return torch.empty_like(order).scatter_(0, order, position)


def refine_assignment(
    sel: torch.Tensor,
    num_valid: torch.Tensor | None,
    flexible: torch.Tensor,
    base: torch.Tensor,
    load: torch.Tensor,
    bound: torch.Tensor,
    demand: torch.Tensor,
    k: int,
    rounds: int,
) -> None:
    """Moves tokens of ``sel`` [T, c] (in place: per row the first k are taken, then the
    untaken candidates; the valid ones are the first ``num_valid`` [T, 1] of the row, None:
    all) toward the least possible peak (module doc). Only ``flexible`` [T] rows move.
    ``load`` [E]: the loads of ``sel`` including ``base`` [E]; ``bound``: a lower bound on the
    peak (0-dim); ``demand`` [E]: flexible tokens listing each expert as a valid candidate.
    ``rounds``: the ``repair_rounds`` parameter (``refine_schedule`` turns it into relabels and
    a sample size). About 70 tensor ops per push step and 10 (sampled) or 50 (whole batch) per
    relabel, on [n, c] and [E, E] tensors."""
    T, c = sel.shape
    E = base.numel()
    dev = sel.device
    if rounds <= 0 or c <= k or T == 0:
        return
    rounds, steps, n = refine_schedule(T, k, c, rounds, E)
    stride = max(1, T // n)
    exact = n == T  # the move graph of the whole batch: the closure raise is valid
    first_invalid = None if num_valid is None else num_valid - k  # [T, 1] untaken valid count
    untaken_cols = torch.arange(c - k, device=dev)
    noise = fixed_noise(rounds * steps * n, c - k, dev, REPAIR_SEED)
    noise = noise.view(rounds * steps, n, c - k)
    cap = bound.reshape(()).clone()
    far = torch.full((), _FAR, device=dev)

    for r in range(rounds):
        rows = slice(r % stride, None, stride)
        S = sel[rows][:n]  # the sample, written back after the round
        taken, untaken = S[:, :k].contiguous(), S[:, k:].contiguous()
        stuck = ~flexible[rows][:n].unsqueeze(1)  # [n, 1] or [n, c - k]: may not take
        if first_invalid is not None:
            stuck = stuck | (untaken_cols >= first_invalid[rows][:n])
        # the move graph: e -> f when a sampled token holds e and could take f (others count
        # in a dropped bin)
        pairs = (taken.unsqueeze(2) * E + untaken.unsqueeze(1)).masked_fill_(stuck.unsqueeze(1), E * E)
        graph = torch.bincount(pairs.view(-1), minlength=E * E + 1)[: E * E].view(E, E) > 0
        if exact:  # experts that cannot reach room: a closed set; raise the cap to its level
            reach = (graph | _identity(E, dev)).float()
            for _ in range(max(1, (E - 1).bit_length())):
                reach = (reach @ reach).clamp_(max=1)
            closed = (reach @ (load < cap).float()) == 0
            need = ((load - base) * closed).sum()
            level = capped_water_level(torch.where(closed, base, 1e9), need, demand * closed)
            cap = torch.maximum(cap, torch.where(closed.any(), level, cap))
        edge = torch.where(graph, 1.0, far)
        for s in range(steps):
            # breadth-first distances to room: dist_e = min(dist_e, 1 + min over edges e -> f)
            dist = torch.where(load < cap, 0.0, far)
            for _ in range(min(MAX_DISTANCE, E - 1)):
                dist = torch.minimum(dist, (edge + dist).amin(1))
            peak = load.max()
            over = load - cap
            room = (-over).clamp_(min=0)
            # destination: the nearest untaken candidate, drawn with weight = its room (1
            # without room: an expert that passes the excess on), Gumbel-max
            pull = room.clamp(min=1).log_().sub_(dist * 64)  # a step outweighs room and noise
            dst_key = pick(pull, untaken).masked_fill_(stuck, -_FAR).sub_(noise[r * steps + s])
            dst_key, dst_col = dst_key.max(1, keepdim=True)
            b = untaken.gather(1, dst_col).squeeze(1)
            # source: the most loaded taken expert above the cap that is farther from room
            push = torch.where(over > 0, load, -1.0)
            src_key = pick(push, taken).masked_fill_(pick(dist, taken) <= pick(dist, b).unsqueeze(1), -1.0)
            src_key, src_col = src_key.max(1, keepdim=True)
            a = taken.gather(1, src_col).squeeze(1)
            ok = (src_key.squeeze(1) >= 0) & (dst_key.squeeze(1) > -_FAR)
            # accepted in token order within each destination's room (or up to the peak),
            # then within each source's excess
            quota = torch.where(over < 0, room, peak - load)
            ok &= _ranks(torch.where(ok, b, E), E) <= pick(quota, b)
            ok &= _ranks(torch.where(ok, a, E), E) <= pick(over, a)
            taken.scatter_(1, src_col, torch.where(ok, b, a).unsqueeze(1))
            untaken.scatter_(1, dst_col, torch.where(ok, a, b).unsqueeze(1))
            moved = ok.float()
            load = load.index_add(0, b, moved).index_add_(0, a, moved, alpha=-1)
        S[:, :k] = taken
        S[:, k:] = untaken
