"""The least possible peak expert load of a LASER assignment, exactly: for tests and benchmarks.

LASER (``moebalance.policies.laser_routing``) gives every flexible token a candidate pool and
assigns it k distinct experts of that pool; skewed tokens keep their vanilla experts and, with
the EP-global or previous loads of ``RoutingContext.expert_load``, make up each expert's
starting load ``base``. The least possible maximum of ``base + assigned`` over all such
assignments is a min-max b-matching, solved here exactly:

- feasibility of a cap M is a maximum flow: source -> token (capacity k) -> each valid
  candidate (capacity 1) -> sink (capacity M - base_e); M is feasible iff the flow saturates
  every token (flows in integer networks are integral, so the fractional and the integer
  problems have the same feasible integer caps);
- the least feasible M is found by binary search between a lower bound (the capped water
  level) and an upper bound (every expert taking all tokens that list it, or a peak the caller
  knows is achievable).

Tokens with the same valid candidate set are merged into one node (capacity k times their
count), which shrinks the graph a lot when pools are small. scipy
(``scipy.sparse.csgraph.maximum_flow``, Dinic's algorithm) is imported when a solve runs: it
is a test and benchmark dependency, never one of the routing path.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "AssignmentProblem",
    "problem_from_plan",
    "laser_problem",
    "water_level_bound",
    "hall_bound",
    "is_feasible",
    "optimal_peak",
    "optimal_assignment",
    "peak_load",
]


class AssignmentProblem(NamedTuple):
    """One LASER assignment problem, on the host.

    classes: [n, c] int64, each row a distinct set of valid candidates of flexible tokens,
        ascending, padded with -1 (at least k entries per row).
    counts: [n] int64, flexible tokens with that candidate set.
    token_class: [T] int64, each token's row of ``classes`` (-1 for a token that is not
        flexible).
    base: [E] int64, the starting load of each expert (tokens it holds before the assignment).
    k: experts per token.
    """

    classes: np.ndarray
    counts: np.ndarray
    token_class: np.ndarray
    base: np.ndarray
    k: int

    @property
    def num_experts(self) -> int:
        return int(self.base.shape[0])

    @property
    def num_flexible(self) -> int:
        return int(self.counts.sum())


def _host(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def problem_from_plan(pool_idx, valid, flexible, base, k: int) -> AssignmentProblem:
    """The problem of one LASER call from its plan (``laser_plan``): ``pool_idx`` [T, c]
    candidates, ``valid`` [T, c] bool (None: all valid), ``flexible`` [T] bool, ``base`` [E]
    starting loads (integer-valued), ``k`` experts per token. Tensors or arrays."""
    pool = _host(pool_idx).astype(np.int64)
    T, c = pool.shape
    ok = np.ones((T, c), dtype=bool) if valid is None else _host(valid).astype(bool)
    flex = _host(flexible).astype(bool)
    base_np = np.rint(_host(base).astype(np.float64)).astype(np.int64)
    if c and np.any((ok & flex[:, None]).sum(axis=1)[flex] < k):
        raise ValueError(f"every flexible token needs at least k={k} valid candidates")
    rows = np.where(ok, pool, np.iinfo(np.int64).max)[flex]
    rows.sort(axis=1)
    rows[rows == np.iinfo(np.int64).max] = -1
    # -1 padding sorts last in each row after the sort above; unique rows = candidate sets
    if rows.shape[0]:
        classes, inverse, counts = np.unique(rows, axis=0, return_inverse=True, return_counts=True)
    else:
        classes = np.zeros((0, c), dtype=np.int64)
        inverse = np.zeros(0, dtype=np.int64)
        counts = np.zeros(0, dtype=np.int64)
    token_class = np.full(T, -1, dtype=np.int64)
    token_class[flex] = inverse.reshape(-1)
    return AssignmentProblem(classes, counts.astype(np.int64), token_class, base_np, int(k))


def laser_problem(logits: torch.Tensor, gate, params=None, ctx=None) -> AssignmentProblem:
    """The assignment problem a LASER call (``laser``: ``gate``, ``params``, ``ctx``) solves on
    ``logits`` [T, E]: its pools, shape test and starting loads (``laser_plan``)."""
    from .config import LaserParams, RoutingContext
    from .policies.laser_routing import laser_plan

    ctx = ctx or RoutingContext()
    params = (params or LaserParams()).for_layer(ctx.layer)
    plan = laser_plan(logits, gate, params, ctx)
    return problem_from_plan(plan.pool_idx, plan.valid, plan.flexible, plan.base, gate.topk)


def _demand(problem: AssignmentProblem) -> np.ndarray:
    """[E] int64: flexible tokens listing each expert as a valid candidate."""
    demand = np.zeros(problem.num_experts, dtype=np.int64)
    cls = problem.classes
    if cls.size:
        weights = np.broadcast_to(problem.counts[:, None], cls.shape)
        keep = cls >= 0
        np.add.at(demand, cls[keep], weights[keep])
    return demand


def hall_bound(problem: AssignmentProblem, order: np.ndarray | None = None) -> int:
    """A lower bound on the peak from Hall's condition on nested expert sets: the first j
    experts of ``order`` (default: by base + demand, descending) X_j must hold every
    assignment a token cannot place outside them, F(X_j) = sum_t max(0, k - |valid_t - X_j|),
    so some M with sum_{e in X_j} max(0, M - base_e) >= F(X_j) is needed for every j."""
    E, k = problem.num_experts, problem.k
    base = problem.base.astype(np.float64)
    if E == 0:
        return 0
    if order is None:
        order = np.argsort(-(base + _demand(problem)), kind="stable")
    rank = np.empty(E, dtype=np.int64)
    rank[order] = np.arange(E)
    cls = problem.classes
    forced = np.zeros(E, dtype=np.float64)
    if cls.size:
        r = np.where(cls >= 0, rank[np.maximum(cls, 0)], E)
        r.sort(axis=1)
        nvalid = (cls >= 0).sum(axis=1)
        pos = np.arange(cls.shape[1])[None, :]
        take = (pos >= (nvalid - k)[:, None]) & (pos < nvalid[:, None])
        np.add.at(forced, r[take], np.broadcast_to(problem.counts[:, None], cls.shape)[take])
    F = np.cumsum(forced)  # F[j]: forced into the first j + 1 experts of the order
    b = base[order]
    best = int(base.max())
    for j in range(E):  # least M with sum over the prefix of max(0, M - b_i) >= F[j]
        s = np.sort(b[: j + 1])
        levels = (F[j] + np.cumsum(s)) / np.arange(1, j + 2)
        best = max(best, int(np.ceil(levels.min() - 1e-9)))
    return best


def water_level_bound(problem: AssignmentProblem) -> int:
    """A lower bound on the peak: the smallest integer L >= max(base) with
    sum_e min(max(L - base_e, 0), demand_e) >= k * flexible tokens (every expert takes at most
    the tokens that list it). LASER's ``capped_water_level`` without the max(base) term."""
    base, demand = problem.base, _demand(problem)
    need = problem.k * problem.num_flexible
    lo = int(base.max()) if base.size else 0
    hi = int((base + demand).max()) if base.size else 0

    def fill(level: int) -> int:
        return int(np.minimum(np.maximum(level - base, 0), demand).sum())

    while lo < hi:
        mid = (lo + hi) // 2
        if fill(mid) >= need:
            hi = mid
        else:
            lo = mid + 1
    return lo


class _Network:
    """The flow network of a problem; ``flow(cap)`` solves it for a cap on every expert."""

    def __init__(self, problem: AssignmentProblem):
        from scipy.sparse import csr_array

        self.problem = problem
        n, E = problem.classes.shape[0], problem.num_experts
        self.source, self.sink = 0, 1 + n + E
        cls = problem.classes
        keep = cls >= 0
        cls_rows = np.broadcast_to(np.arange(n)[:, None], cls.shape)[keep]
        rows = np.concatenate([np.zeros(n, np.int64), 1 + cls_rows, 1 + n + np.arange(E)])
        cols = np.concatenate([1 + np.arange(n), 1 + n + cls[keep], np.full(E, self.sink)])
        caps = np.concatenate([
            problem.k * problem.counts,
            np.broadcast_to(problem.counts[:, None], cls.shape)[keep],
            np.ones(E, np.int64),  # placeholders: set per cap (kept non-zero so they stay stored)
        ])
        size = self.sink + 1
        graph = csr_array((caps.astype(np.int32), (rows, cols)), shape=(size, size))
        graph.sort_indices()
        self.graph = graph
        # each expert row holds exactly one entry, its edge to the sink
        starts = graph.indptr[1 + n: 1 + n + E]
        assert np.all(graph.indices[starts] == self.sink)
        self.sink_edges = starts
        self.need = problem.k * problem.num_flexible

    def flow(self, cap: int):
        from scipy.sparse.csgraph import maximum_flow

        room = np.maximum(cap - self.problem.base, 0).astype(np.int32)
        self.graph.data[self.sink_edges] = room
        return maximum_flow(self.graph, self.source, self.sink)

    def feasible(self, cap: int) -> bool:
        if self.problem.base.size and cap < int(self.problem.base.max()):
            return False
        if self.need == 0:
            return True
        return int(self.flow(cap).flow_value) == self.need


def is_feasible(problem: AssignmentProblem, cap: int) -> bool:
    """Whether some assignment keeps every expert's load (base included) at most ``cap``."""
    return _Network(problem).feasible(int(cap))


def optimal_peak(problem: AssignmentProblem, upper: int | None = None) -> int:
    """The least possible maximum load (base included) over all assignments of ``problem``.

    ``upper``: a peak known to be achievable (e.g. one a router reached) to narrow the search;
    ValueError if it is not achievable. Search between the larger of ``water_level_bound`` and
    ``hall_bound`` and the upper bound, one maximum flow per probe: lo, lo + 1, lo + 3, ...
    until one is feasible, then bisection."""
    lo = max(water_level_bound(problem), hall_bound(problem))
    trivial = int((problem.base + _demand(problem)).max()) if problem.base.size else 0
    hi = trivial if upper is None else min(int(upper), trivial)
    if hi < lo:
        raise ValueError(f"upper={upper} is below the lower bound {lo}: not achievable")
    net = _Network(problem)
    if upper is not None and hi < trivial and not net.feasible(hi):
        raise ValueError(f"upper={upper} is not achievable")
    step = 1  # the lower bound is usually tight: probe lo, lo + 1, lo + 3, ..., then bisect
    while lo < hi:
        probe = min(lo + step - 1, hi)
        if probe == hi or net.feasible(probe):
            hi = probe
            break
        lo, step = probe + 1, 2 * step
    while lo < hi:
        mid = (lo + hi) // 2
        if net.feasible(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def optimal_assignment(problem: AssignmentProblem, upper: int | None = None) -> tuple[int, np.ndarray]:
    """(least possible peak, [T, k] int64 experts of an assignment reaching it). Rows of tokens
    that are not flexible are -1. Each class's flow to its candidates is dealt to its tokens by
    wrap-around (slot j of the class's i-th token at position j * count + i of the candidates
    laid out expert by expert), so no token gets an expert twice (each takes at most count)."""
    peak = optimal_peak(problem, upper)
    k, T = problem.k, problem.token_class.shape[0]
    out = np.full((T, k), -1, dtype=np.int64)
    if problem.num_flexible == 0:
        return peak, out
    n, E = problem.classes.shape[0], problem.num_experts
    flow = _Network(problem).flow(peak).flow.tocoo()
    pick = (flow.row >= 1) & (flow.row <= n) & (flow.col > n) & (flow.col <= n + E) & (flow.data > 0)
    cls, expert, amount = flow.row[pick] - 1, flow.col[pick] - 1 - n, flow.data[pick]
    order = np.lexsort((expert, cls))  # class by class, experts ascending
    slots = np.repeat(expert[order], amount[order])  # class j's k * count_j slots in a row
    counts = problem.counts
    start = np.concatenate([[0], np.cumsum(k * counts)[:-1]])
    flex = np.flatnonzero(problem.token_class >= 0)
    tc = problem.token_class[flex]
    by_class = np.argsort(tc, kind="stable")
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(tc)
    rank[by_class] = np.arange(tc.shape[0]) - first[tc[by_class]]  # i-th token of its class
    pos = start[tc][:, None] + np.arange(k)[None, :] * counts[tc][:, None] + rank[:, None]
    out[flex] = slots[pos]
    return peak, out


def peak_load(problem: AssignmentProblem, chosen: torch.Tensor | np.ndarray) -> int:
    """The maximum load (base included) of ``chosen`` [T, k], the experts of every token (rows
    of tokens that are not flexible are ignored: their load is in ``base``)."""
    idx = _host(chosen).astype(np.int64)
    flex = problem.token_class >= 0
    load = problem.base.copy()
    np.add.at(load, idx[flex].reshape(-1), 1)
    return int(load.max()) if load.size else 0
