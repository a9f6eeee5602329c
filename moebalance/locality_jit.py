"""Compiled cache-stack passes for ``moebalance.locality`` (numba, optional).

The priority-stack update of ``locality.stack_hits`` is sequential within a row (each token's
hits depend on every earlier token's), so the numpy pass loops over the steps of a sample and
updates every (layer, sample) row at once, touching an [E, rows] state per step. Compiled, the
same update runs row by row over the kept top of the stack only: O(D) work per activation (D =
the largest cache asked about) instead of O(E) per row and step, and no temporary arrays.

The counts are the numpy pass's, element for element (``tests/test_locality.py`` checks both on the
same traces): the same keys (priority << bits | tie, the current token's experts on top), the
same order of a token's experts (descending id), the same Mattson carry. ``numba`` is an
optional dependency (the ``locality`` extra): ``locality`` imports this module on the first
pass only, and uses the numpy pass where numba is not installed.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["POLICY_CODES", "stack_hits_rows"]

#: policy name -> the kernel's code
POLICY_CODES = {"sch": 0, "lru": 1, "lfu": 2, "belady": 3}


@numba.njit(cache=True, nogil=True)
def row(ids, count, E, policy, m, D, bits, span, top, never, warm, cold):
    """One row (sample) of ``stack_hits_rows``: ``ids`` [T, W], ``count`` [T]; adds into
    ``warm`` and ``cold`` [E]. Compiled by numba."""
    T, W = ids.shape
    stack = np.arange(D)  # expert at each kept depth (unused experts in id order at first)
    keys = np.zeros(D, dtype=np.int64)
    seen = np.zeros(E, dtype=np.bool_)
    last = np.full(E, -1, dtype=np.int64)
    primary = np.zeros(E, dtype=np.int64)
    current = np.zeros(E, dtype=np.bool_)
    depth = np.zeros(W, dtype=np.int64)
    nxt = np.full((T, W), never, dtype=np.int64)
    nseen = 0
    if policy == 3:  # belady: the next step each activation's expert is used again
        ahead = np.full(E, never, dtype=np.int64)
        for t in range(T - 1, -1, -1):
            for w in range(W):
                x = ids[t, w]
                if x >= 0:
                    nxt[t, w] = ahead[x]
            for w in range(W):
                x = ids[t, w]
                if x >= 0:
                    ahead[x] = t
    if policy == 0:  # sch: uses in steps 1 .. m, the window ahead of step 0
        for s in range(1, min(m, T - 1) + 1):
            for w in range(W):
                if ids[s, w] >= 0:
                    primary[ids[s, w]] += 1
    for t in range(T):
        if policy == 0 and t > 0:  # slide the window ahead to steps t+1 .. t+m
            for w in range(W):
                if ids[t, w] >= 0:
                    primary[ids[t, w]] -= 1
            if t + m < T:
                for w in range(W):
                    if ids[t + m, w] >= 0:
                        primary[ids[t + m, w]] += 1
        if ids[t, 0] < 0:  # no expert (ids sorted descending: -1 last)
            continue
        # depth of each activation on arrival
        for w in range(W):
            x = ids[t, w]
            depth[w] = D
            if x < 0:
                continue
            for i in range(D):
                if stack[i] == x:
                    depth[w] = i
                    break
        fresh = 0
        for w in range(W):
            x = ids[t, w]
            if x < 0:
                continue
            if seen[x]:
                if count[t] and depth[w] < D:
                    warm[depth[w]] += 1
            else:  # first use: rank among the row's experts seen so far
                if count[t]:
                    cold[nseen + fresh] += 1
                fresh += 1
        # keys of the kept stack at this step (higher = kept); the token's experts on top
        for w in range(W):
            if ids[t, w] >= 0:
                current[ids[t, w]] = True
        for i in range(D):
            e = stack[i]
            tie = E - 1 - e
            if current[e]:
                keys[i] = (top << bits) | tie
            elif not seen[e]:
                keys[i] = tie
            elif policy == 1:
                keys[i] = ((last[e] + 1) << bits) | tie
            else:
                keys[i] = ((primary[e] * span + last[e] + 1) << bits) | tie
        # Mattson's update, one expert at a time: it goes on top; above its old depth the
        # lower of the key carried down and the one met moves on; the carried key takes the
        # expert's old place (from below the kept top, it leaves)
        for w in range(W):
            x = ids[t, w]
            if x < 0:
                continue
            d = D
            for i in range(D):
                if stack[i] == x:
                    d = i
                    break
            if d == 0:
                continue
            ck, ce = keys[0], stack[0]
            for i in range(1, min(d, D)):
                if keys[i] < ck:  # the lower key moves on
                    ck, keys[i] = keys[i], ck
                    ce, stack[i] = stack[i], ce
            if d < D:
                keys[d], stack[d] = ck, ce
            keys[0], stack[0] = (top << bits) | (E - 1 - x), x
        # state after step t
        for w in range(W):
            x = ids[t, w]
            if x < 0:
                continue
            current[x] = False
            if not seen[x]:
                seen[x] = True
                nseen += 1
            last[x] = t
            if policy == 2:
                primary[x] += 1
            elif policy == 3:
                primary[x] = never - nxt[t, w]  # 0 when never used again


@numba.njit(cache=True, parallel=True)
def rows(block, count, E, policy, m, D, bits, warm, cold):
    """``row`` over every row of ``block`` [B, T, W] (rows are independent)."""
    B, T, W = block.shape
    span = T + 2
    top = span * span
    never = T + 1
    for b in numba.prange(B):
        row(block[b], count[b], E, policy, m, D, bits, span, top, never, warm[b], cold[b])


def stack_hits_rows(
    block: np.ndarray, count: np.ndarray, num_experts: int, policy: str, m: int, depth_kept: int
) -> tuple[np.ndarray, np.ndarray]:
    """(warm [B, E], cold [B, E]) of ``locality.stack_hits`` for a block whose tokens' ids are
    sorted descending (-1 last). ``m`` is read for ``sch`` only; ``depth_kept`` = the kept top
    of the stack (the largest cache asked about)."""
    warm = np.zeros((block.shape[0], num_experts), dtype=np.int64)
    cold = np.zeros((block.shape[0], num_experts), dtype=np.int64)
    bits = max(1, (num_experts - 1).bit_length())  # as the numpy pass's keys
    rows(np.ascontiguousarray(block, dtype=np.int64), np.ascontiguousarray(count, dtype=np.bool_),
         num_experts, POLICY_CODES[policy], int(m or 1), int(depth_kept), bits, warm, cold)
    return warm, cold
