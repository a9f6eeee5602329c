"""Routing locality: how consistently consecutive tokens pick the same experts, and what an expert
cache of a given size would hit (numpy, and numba where installed; offline analysis of recorded
routing).

Definitions follow Liang et al., "Not All Models Suit Expert Offloading: On Local Routing
Consistency of Mixture-of-Experts Models" (arXiv 2505.16056), as summarised in the project's
``algorithms.md``; ``docs/locality.md`` states them with every interpretation made here.

Input: one MoE layer's routing as expert ids ``[N, W]`` per token (``W`` >= the experts any token
chose, ``-1`` = no expert in that slot: a dropped route, or a token with fewer experts), in
sequence order, with sequence boundaries. Nothing crosses a sequence: sequences are cut into
*samples* of at most ``sample_len`` tokens (default 512, the paper's sample length; the last
piece of a sequence may be shorter); every window and every cache lives inside one sample, and
a sample is the bootstrap's resampling unit.

Segment routing best performance, SRP(m)
    ``f(e, p, m)`` = activations of expert ``e`` in the ``m`` consecutive tokens starting at
    ``p`` (stride 1, full windows inside a sample only). A *segment router* with threshold
    ``alpha`` serves the whole window with every expert whose ``f >= alpha``. Over all windows
    and experts of a layer (one ``alpha`` for the layer)::

        matches(a) = sum f * 1(f >= a)        predicted(a) = sum m * 1(f >= a)
        activated  = sum f
        SRP(m)     = 100 * max over a in 1..m of 2 * matches(a) / (predicted(a) + activated)

    (the F1 of the segment router's (token, expert) pairs against the original router's).
    ``alpha`` is the smallest best threshold; ``rho_hat = predicted(alpha) / activated``: the
    experts the segment router loads per expert the model activates. ``alpha = 0`` (predict
    every expert) is not searched: it never scores above ``alpha = 1``. A layer without any
    activation in full windows has no SRP (NaN).

Segment cache best hit rate, SCH(m, rho), and the baselines
    A cache of ``C = floor(rho * k)`` experts (``k`` = the model's experts per token; ``rho >=
    1`` so that one token's experts fit), empty at the start of every sample. Token ``t`` hits
    each of its experts that is resident when it arrives; it then loads its missing experts,
    evicting as many resident experts as needed, never one that token ``t`` itself uses. The
    victim is the resident expert of lowest priority, where priority is, by policy:

    - ``sch`` (the paper's rule, window ``m``): uses in the next ``m`` tokens ``t+1 .. t+m`` of
      the sample; ties: least recently used first;
    - ``lru``: time of last use;
    - ``lfu``: uses since the start of the sample (counts survive eviction: "perfect" LFU);
      ties: least recently used first;
    - ``belady``: next use (the one used farthest in the future, or never again, is evicted);
      ties: least recently used first. Belady's rule is optimal for this demand-loading cache
      (no prefetch): no policy, online or not, hits more on the same trace.

    Remaining ties (experts last used by the same token) evict the higher expert id first. The
    hit rate is hits / (token, expert) activations, in percent. By default the first use of an
    expert in a sample is a miss (a cold cache: the load costs time); ``compulsory_misses=
    False`` counts it as a hit while the cache still has a free slot, as the paper's code does
    (ljcleo/moe-lrc ``src/41_sch_calc.py``). When a token uses more than ``C`` experts (an
    expanded-drop router can), its hits are still those resident on arrival, and the cache then
    keeps ``C`` of its experts.

    Every policy above evicts by a priority that does not depend on the cache size, so each is a
    *stack algorithm* (Mattson, Gecsei, Slutz, Traiger, "Evaluation techniques for storage
    hierarchies", IBM Systems Journal 9(2), 1970): the cache of size C always holds a subset of
    the cache of size C + 1, and the hit rate never falls as the cache grows. One pass of the
    priority-stack update therefore gives the hits of every cache size at once
    (``stack_hits``); the tests check it against a direct simulation of each size.

Confidence intervals
    The paper's procedure: 1000 resamples of the samples with replacement, the statistic
    recomputed on each (SRP re-maximised over alpha), and the *basic* bootstrap interval
    ``[2 * est - q(1 - a/2), 2 * est - q(a/2)]`` at 95%, clipped to [0, 100]. Layers of one
    record share their samples, so the mean over layers is resampled jointly.

Offloading time (``offload_seconds_per_token``)
    Loading one expert from host memory costs ``expert_bytes / bandwidth`` seconds (plus an
    optional fixed ``per_load_s``); a decoded token costs the sum over MoE layers of its
    misses. Loads are not overlapped with compute here: the figure is the transfer time a
    token would wait for, an upper bound on what prefetching could hide. Bandwidth defaults are
    the PCIe x16 link rates (``LINKS``).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from .config import ConfigError

__all__ = [
    "POLICIES",
    "DEFAULT_WINDOWS",
    "DEFAULT_RHOS",
    "SAMPLE_LEN",
    "RESAMPLES",
    "CONFIDENCE",
    "Link",
    "LINKS",
    "Samples",
    "make_samples",
    "capacity_of",
    "window_histogram",
    "srp_from_histogram",
    "stack_hits",
    "bootstrap_weights",
    "basic_interval",
    "analyse",
    "offload_seconds_per_token",
    "cache_aware_choice",
]

#: cache policies: the paper's segment cache (needs a window m), and the baselines
POLICIES = ("sch", "lru", "lfu", "belady")
#: the paper's window lengths m and cache sizes rho (in multiples of k)
DEFAULT_WINDOWS = (4, 16, 64, 256)
DEFAULT_RHOS = (1.0, 1.5, 2.0, 3.0, 4.0)
#: tokens per sample, bootstrap resamples and confidence (the paper's settings)
SAMPLE_LEN = 512
RESAMPLES = 1000
CONFIDENCE = 0.95
#: stack-pass implementations (``stack_hits``): compiled (numba, optional) or numpy
BACKENDS = ("auto", "numba", "numpy")
#: numba installed: ``moebalance.locality_jit`` (imported on the first pass) serves "auto"
HAVE_NUMBA = importlib.util.find_spec("numba") is not None
MAX_EXPERTS = 1 << 15  # ids are stored int16 in routing records


@dataclass(frozen=True)
class Link:
    """A host-to-device link: ``bytes_per_s`` per direction, and where the figure comes from."""

    name: str
    bytes_per_s: float
    source: str


#: PCIe x16 per-direction link rates: 16 (4.0) and 32 (5.0) GT/s per lane, 128b/130b encoding,
#: 16 lanes, 8 bits a byte. Measured pinned host-to-device copies reach somewhat less; pass a
#: measured figure as ``bandwidth`` where one is known.
LINKS = {
    "pcie4": Link(
        "PCIe 4.0 x16", 16e9 * 128 / 130 * 16 / 8,
        "PCI-SIG, PCI Express Base Specification 4.0 (16 GT/s per lane, 128b/130b)",
    ),
    "pcie5": Link(
        "PCIe 5.0 x16", 32e9 * 128 / 130 * 16 / 8,
        "PCI-SIG, PCI Express Base Specification 5.0 (32 GT/s per lane, 128b/130b)",
    ),
}


def _fail(message: str) -> None:
    raise ConfigError(message.replace("\n", " "))


def _check_backend(backend: Any) -> None:
    if backend not in BACKENDS:
        _fail(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "numba" and not HAVE_NUMBA:
        _fail("backend 'numba' needs numba installed (pip install 'moebalance[locality]')")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        _fail(f"{name} must be an integer >= {low}{upper}, got {value!r}")
    return int(value)


def _check_number(name: str, value: Any, low: float, *, strict: bool = False) -> float:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        _fail(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Samples:
    """One or more layers' routing cut into samples.

    Attributes:
        layers: {layer: [N, W] int64 expert ids, -1 = none}; every layer has the same N tokens.
        starts, lengths: [S] first token and tokens of each sample (a sample never crosses a
            sequence and holds at most ``sample_len`` tokens).
        num_experts, k: experts of the layer and experts per token of the model.
        count: [N] bool, the tokens whose activations count towards hit rates (all by
            default; e.g. decode tokens only: the cache still sees every token).
    """

    layers: dict
    starts: np.ndarray
    lengths: np.ndarray
    num_experts: int
    k: int
    count: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_samples(self) -> int:
        return int(self.lengths.size)


def _as_ids(name: str, value: Any, num_experts: int) -> np.ndarray:
    """[N, W] int64 expert ids from an array-like (torch tensors included), checked."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    try:
        ids = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything numpy cannot read is bad input
        _fail(f"{name} must be an integer array [tokens, experts per token]")
    if ids.ndim == 1:
        ids = ids[:, None]
    if ids.ndim != 2 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        _fail(
            f"{name} must be an integer array [tokens, experts per token], got shape "
            f"{tuple(ids.shape)} dtype {ids.dtype}"
        )
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < -1 or ids.max() >= num_experts):
        _fail(f"{name} holds expert ids outside -1..{num_experts - 1} (num_experts={num_experts})")
    if ids.shape[1] > 1 and ids.size:
        s = np.sort(ids, axis=1)
        dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
        if dup.any():
            t = int(np.nonzero(dup.any(axis=1))[0][0])
            _fail(f"{name}: token {t} lists an expert twice ({ids[t].tolist()})")
    return ids


def _offsets(name: str, value: Any, n: int) -> np.ndarray:
    if value is None:
        return np.array([0, n], dtype=np.int64)
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    off = np.asarray(value)
    if (
        off.ndim != 1 or off.size < 2 or not np.issubdtype(off.dtype, np.integer)
        or off[0] != 0 or off[-1] != n or (np.diff(off) < 0).any()
    ):
        _fail(
            f"{name} must be non-decreasing integer sequence boundaries from 0 to the "
            f"{n} tokens, got {off.tolist()[:8]}{'...' if off.size > 8 else ''}"
        )
    return off.astype(np.int64)


def make_samples(
    routing: Any,
    offsets: Any = None,
    *,
    num_experts: int,
    k: Optional[int] = None,
    sample_len: Optional[int] = SAMPLE_LEN,
    count: Any = None,
) -> Samples:
    """Check and cut routing into samples.

    Args:
        routing: one layer's ids [N, W] (array or tensor; [N] for k = 1), a list of such
            arrays (one per sequence; ``offsets`` must then be None), or {layer: [N, W]}
            (every layer over the same tokens).
        offsets: [S + 1] sequence boundaries into the N tokens (None: one sequence).
        num_experts: E (ids are 0..E-1, -1 = none).
        k: the model's experts per token (None: the widest row of the routing).
        sample_len: tokens per sample (None: whole sequences).
        count: [N] bool, tokens whose activations count in hit rates (None: all).
    """
    num_experts = _check_int("num_experts", num_experts, 1, MAX_EXPERTS)
    if isinstance(routing, Mapping):
        if not routing:
            _fail("routing holds no layer")
        layers = {int(l): _as_ids(f"routing[{l}]", v, num_experts) for l, v in routing.items()}
    elif isinstance(routing, (list, tuple)):
        if offsets is not None:
            _fail("offsets must be None when routing is a list of sequences")
        seqs = [_as_ids(f"routing[{i}]", v, num_experts) for i, v in enumerate(routing)]
        if not seqs:
            _fail("routing holds no sequence")
        width = max(s.shape[1] for s in seqs)
        seqs = [np.pad(s, ((0, 0), (0, width - s.shape[1])), constant_values=-1) for s in seqs]
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
        layers = {0: np.concatenate(seqs)}
    else:
        layers = {0: _as_ids("routing", routing, num_experts)}
    n = {ids.shape[0] for ids in layers.values()}
    if len(n) != 1:
        _fail(f"routing layers hold different token counts {sorted(n)}")
    n = n.pop()
    if n == 0:
        _fail("routing holds no token")
    off = _offsets("offsets", offsets, n)
    width = max(ids.shape[1] for ids in layers.values())
    if k is None:
        k = width
    k = _check_int("k", k, 1, num_experts)
    if sample_len is not None:
        sample_len = _check_int("sample_len", sample_len, 1)
    lengths = np.diff(off)
    lengths = lengths[lengths > 0]
    seq_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if sample_len is None:
        starts, lens = seq_starts, lengths.astype(np.int64)
    else:
        pieces = -(-lengths // sample_len)  # samples per sequence
        seq_of = np.repeat(np.arange(lengths.size), pieces)
        within = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        starts = seq_starts[seq_of] + within * sample_len
        lens = np.minimum(sample_len, lengths[seq_of] - within * sample_len)
    if count is None:
        mask = np.ones(n, dtype=bool)
    else:
        if hasattr(count, "detach"):
            count = count.detach().cpu().numpy()
        mask = np.asarray(count)
        if mask.shape != (n,) or mask.dtype != bool:
            _fail(f"count must be a [{n}] bool mask of the tokens, got {mask.shape} {mask.dtype}")
    return Samples(layers, starts.astype(np.int64), lens.astype(np.int64), num_experts, k, mask)


def capacity_of(rho: float, k: int) -> int:
    """Cache slots for ``rho`` in multiples of ``k``: floor(rho * k) (>= k: rho >= 1)."""
    rho = _check_number("rho", rho, 1.0)
    return int(math.floor(rho * k + 1e-9))


# ----------------------------------------------------------------------------------------- SRP


def _onehot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    hot = np.zeros((ids.shape[0], num_experts), dtype=np.int32)
    rows, cols = np.nonzero(ids >= 0)
    hot[rows, ids[rows, cols]] = 1
    return hot


def _cumulative(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[N + 1, E] int32: activations of each expert in tokens 0 .. n-1 (row n)."""
    cs = np.zeros((ids.shape[0] + 1, num_experts), dtype=np.int32)
    np.cumsum(_onehot(ids, num_experts), axis=0, out=cs[1:])
    return cs


def window_histogram(
    ids: np.ndarray, samples: Samples, m: int, cumulative: Optional[np.ndarray] = None
) -> np.ndarray:
    """[S, m + 1] int64: for each sample, how many (window, expert) pairs have f = 0 .. m
    (windows of ``m`` tokens, stride 1, inside the sample; summed over experts).
    ``cumulative``: ``_cumulative(ids, E)`` when already computed (shared by every m)."""
    m = _check_int("m", m, 1)
    cs = _cumulative(ids, samples.num_experts) if cumulative is None else cumulative
    nwin = np.maximum(samples.lengths - m + 1, 0)
    out = np.zeros((samples.num_samples, m + 1), dtype=np.int64)
    if nwin.sum() == 0:
        return out
    sample_of = np.repeat(np.arange(samples.num_samples), nwin)
    p = np.repeat(samples.starts, nwin) + (
        np.arange(nwin.sum()) - np.repeat(np.cumsum(nwin) - nwin, nwin)
    )
    f = cs[p + m] - cs[p]  # [windows, E]
    flat = (sample_of[:, None] * (m + 1) + f).ravel()
    out += np.bincount(flat, minlength=samples.num_samples * (m + 1)).reshape(-1, m + 1)
    return out


def srp_from_histogram(hist: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SRP (percent), best alpha and rho_hat from window histograms ``hist [..., m + 1]``
    (leading dims are independent: e.g. bootstrap resamples). NaN where nothing activated."""
    hist = np.asarray(hist, dtype=np.float64)
    v = np.arange(m + 1, dtype=np.float64)
    # tail sums over f >= a, for a = 1..m
    matches = np.flip(np.cumsum(np.flip(hist * v, -1), -1), -1)[..., 1:]
    predicted = m * np.flip(np.cumsum(np.flip(hist, -1), -1), -1)[..., 1:]
    activated = (hist * v).sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * matches / (predicted + activated)
        best = np.nanargmax(np.where(np.isnan(f1), -1.0, f1), axis=-1)
        srp = 100 * np.take_along_axis(f1, best[..., None], -1)[..., 0]
        rho_hat = (
            np.take_along_axis(predicted, best[..., None], -1)[..., 0] / activated[..., 0]
        )
    empty = activated[..., 0] <= 0
    srp = np.where(empty, np.nan, srp)
    rho_hat = np.where(empty, np.nan, rho_hat)
    alpha = np.where(empty, -1, best + 1)
    return srp, alpha, rho_hat


# ------------------------------------------------------------------------------- cache stacks


def _sample_block(samples: Samples, layer_ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[B, T, W] ids (rows = layer-major (layer, sample) pairs, -1 padded) and [B, T] count."""
    S, T = samples.num_samples, int(samples.lengths.max())
    W = max(ids.shape[1] for ids in layer_ids)
    t = np.arange(T)
    inside = t[None, :] < samples.lengths[:, None]  # [S, T]
    src = np.where(inside, samples.starts[:, None] + t[None, :], 0)
    block = np.full((len(layer_ids) * S, T, W), -1, dtype=np.int64)
    for i, ids in enumerate(layer_ids):
        part = ids[src]  # [S, T, w]
        part = np.where(inside[..., None], part, -1)
        block[i * S : (i + 1) * S, :, : ids.shape[1]] = part
    count = np.tile(np.where(inside, samples.count[src], False), (len(layer_ids), 1))
    return block, count


class _Events:
    """The activations of a block [B, T, W] as flat arrays in step order (step, row, slot;
    within a token, descending expert id), computed once and shared by every policy's pass.

    ``block``: the block with each token's ids sorted descending (-1 last); ``r``, ``j``,
    ``x``: row, slot and expert of each activation; ``at[t] : at[t + 1]``: those of step t;
    ``counted``: whether each activation counts."""

    def __init__(self, block: np.ndarray, count: np.ndarray) -> None:
        # processed in descending id order, the lowest id of a token ends on top of the
        # stack: experts of one token rank by id, as every other tie does
        self.block = -np.sort(-block, axis=2)
        self.count = count
        self.shape = self.block.shape
        self._flat: Optional[tuple] = None
        self._next: Optional[np.ndarray] = None

    def _flatten(self) -> tuple:
        """(r, j, x, at, counted), computed on first use (the numpy pass only)."""
        if self._flat is None:
            T = self.shape[1]
            t, r, j = np.nonzero(self.block.transpose(1, 0, 2) >= 0)
            at = np.searchsorted(t, np.arange(T + 1))
            self._flat = (r, j, self.block[r, t, j], at, self.count[r, t])
        return self._flat

    r = property(lambda self: self._flatten()[0])
    j = property(lambda self: self._flatten()[1])
    x = property(lambda self: self._flatten()[2])
    at = property(lambda self: self._flatten()[3])
    counted = property(lambda self: self._flatten()[4])

    def next_use(self, never: int) -> np.ndarray:
        """For each activation, the next step its expert is used again in its row (``never``
        if not)."""
        if self._next is None:
            B, T, _ = self.shape
            t = np.repeat(np.arange(T), np.diff(self.at))
            order = np.lexsort((t, self.x, self.r))
            same = (self.r[order][1:] == self.r[order][:-1]) & (
                self.x[order][1:] == self.x[order][:-1]
            )
            nxt = np.full(t.size, never, dtype=np.int64)
            nxt[order[:-1][same]] = t[order][1:][same]
            self._next = nxt
        return self._next


def stack_hits(
    block: np.ndarray,
    count: np.ndarray,
    num_experts: int,
    policy: str,
    m: Optional[int] = None,
    max_capacity: Optional[int] = None,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Hits of every cache size at once, by the priority-stack update.

    Args:
        block: [B, T, W] expert ids of B independent rows (each row a sample with an empty
            cache at its start), -1 = none; a row's tokens in order.
        count: [B, T] bool, the tokens whose activations are counted.
        policy: one of ``POLICIES``; ``m``: the window of ``sch``.
        max_capacity: the largest cache size wanted (None: E). Only the top of the stack is
            kept: the cache of C slots depends only on the order of its own C experts.

    Returns (warm [B, E], cold [B, E]): ``warm[b, d]`` = counted activations of an expert
    already used in the row found at stack depth d on arrival: a hit of every cache of more
    than d slots; ``cold[b, u]`` = counted first uses with u experts of the row seen before
    them (earlier first uses of the same token included): a hit of a cache of more than u
    slots only when compulsory misses are not counted. Hits of a cache of C slots:
    ``warm[:, :C].sum(1)`` (+ ``cold[:, :C].sum(1)``), for C >= W (the depths of one token's
    experts among themselves are not meaningful below W); depths from ``max_capacity`` on
    are not recorded.

    ``backend``: ``"numba"`` (the compiled pass of ``moebalance.locality_jit``, row by row),
    ``"numpy"`` (one step of every row at a time) or ``"auto"`` (numba when installed). Both
    give the same figures.
    """
    return _stack_hits(
        _Events(np.asarray(block), np.asarray(count)), num_experts, policy, m, max_capacity,
        backend,
    )


def _stack_hits(
    ev: _Events, num_experts: int, policy: str, m: Optional[int] = None,
    max_capacity: Optional[int] = None, backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    if policy not in POLICIES:
        _fail(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "sch":
        m = _check_int("m", m, 1)
    _check_backend(backend)
    B, T, W = ev.shape
    E = num_experts
    # the kept top of the stack: below it an expert is outside every cache asked about, and
    # the order there never reaches the caches (their contents depend on their own depths)
    D = E if max_capacity is None else _check_int("max_capacity", max_capacity, 1, E)
    if backend != "numpy" and HAVE_NUMBA:
        from .locality_jit import stack_hits_rows

        return stack_hits_rows(ev.block, ev.count, E, policy, m, D)
    block = ev.block
    # state is expert-major ([E, B]: one contiguous row per expert or depth); (e, b) is the
    # flat index e * B + b
    bidx = np.arange(B)
    col = np.arange(E)
    bits = max(1, (E - 1).bit_length())
    low = (1 << bits) - 1
    tie = (E - 1 - col)[:, None]  # the lower id ranks higher (is kept) on equal priority
    span = T + 2
    top = span * span  # above every ordinary priority
    # key = priority << bits | tie. Priority 0: never used in this row, below every used
    # expert (an unused slot of a cold cache); top: used by the current token (never evicted)
    kt = np.int32 if ((top + 1) << bits) < 2**31 else np.int64  # half the memory traffic
    stack = np.repeat(col[:D, None].astype(kt), B, axis=1)  # stack[i, b]: expert at depth i
    seen = np.zeros((E, B), dtype=bool)
    nseen = np.zeros(B, dtype=np.int64)
    last = np.full((E, B), -1, dtype=np.int64)
    primary = np.zeros((E, B), dtype=np.int64)  # lfu: uses; sch: uses ahead; belady: soonness
    warm = np.zeros(B * E, dtype=np.int64)  # flat b * E + depth
    cold = np.zeros(B * E, dtype=np.int64)
    never = T + 1
    nxt = ev.next_use(never) if policy == "belady" else None
    flat_all = ev.x * B + ev.r
    inner = col[1:D, None]
    # buffers of the hot loop (a fresh array per operation costs more than the operation)
    key = np.empty((E, B), dtype=kt)
    ks = np.empty((D, B), dtype=kt)
    pm = np.empty((D, B), dtype=kt)
    tmp = np.empty((E, B), dtype=np.int64)
    hit = np.empty((D, B), dtype=bool)
    above = np.empty((E, B), dtype=bool)
    unseen = np.empty((E, B), dtype=bool)
    fresh_rank = np.zeros(B, dtype=np.int64)
    if policy == "sch":  # uses in steps 1 .. m: the window ahead of step 0
        np.add.at(primary.ravel(), flat_all[ev.at[1] : ev.at[min(m, T - 1) + 1]], 1)
    for t in range(T):
        if policy == "sch" and t > 0:  # slide the window ahead to steps t+1 .. t+m
            # (one step's (expert, row) pairs are distinct: plain fancy updates suffice)
            primary.ravel()[flat_all[ev.at[t] : ev.at[t + 1]]] -= 1
            if t + m < T:
                primary.ravel()[flat_all[ev.at[t + m] : ev.at[t + m + 1]]] += 1
        a, b = ev.at[t], ev.at[t + 1]
        if a == b:
            continue
        r, j, xr, fx = ev.r[a:b], ev.j[a:b], ev.x[a:b], flat_all[a:b]
        x = block[:, t, :]
        valid = x >= 0
        xs = np.where(valid, x, 0)
        known = seen.ravel()[fx]
        # this step's keys (higher = kept)
        if policy == "lru":
            np.add(last, 1, out=key, casting="unsafe")
        else:
            np.multiply(primary, span, out=tmp)
            np.add(tmp, last, out=tmp)
            np.add(tmp, 1, out=key, casting="unsafe")
        np.left_shift(key, bits, out=key)
        np.logical_not(seen, out=unseen)
        np.copyto(key, 0, where=unseen)
        np.bitwise_or(key, tie, out=key)
        # depth of each activation on arrival
        depth = np.empty((B, W), dtype=np.int64)
        for w in range(int(j.max()) + 1):
            if policy == "lru":  # the LRU stack is sorted by key: depth = experts keyed higher
                np.greater(key, key[xs[:, w], bidx], out=above)
                depth[:, w] = above.sum(axis=0)
            else:
                np.equal(stack, xs[:, w], out=hit)
                dw = hit.argmax(axis=0)
                depth[:, w] = np.where(stack[dw, bidx] == xs[:, w], dw, D)  # D: below the top
        counted = ev.counted[a:b]
        sel = known & counted & (depth[r, j] < D)
        if sel.any():
            warm += np.bincount(r[sel] * E + depth[r[sel], j[sel]], minlength=B * E)
        new = ~known
        if new.any():  # first uses: rank among the row's experts seen so far
            rn, cn = r[new], counted[new]
            rank = np.zeros(rn.size, dtype=np.int64)
            fresh_rank[rn] = 0
            for w in range(W):  # a token's first uses, in slot order
                at_w = j[new] == w
                rank[at_w] = fresh_rank[rn[at_w]]
                fresh_rank[rn[at_w]] += 1
            u = nseen[rn] + rank
            if cn.any():
                cold += np.bincount(rn[cn] * E + u[cn], minlength=B * E)
        if policy != "lru":
            key.ravel()[fx] = (top << bits) | (E - 1 - xr)  # the current token's experts
            np.multiply(stack, B, out=tmp[:D])
            np.add(tmp[:D], bidx, out=tmp[:D])
            np.take(key, tmp[:D], out=ks)  # keys in stack order [depth, B]
            for slot in range(int(j.max()) + 1):
                kx = key[xs[:, slot], bidx]
                np.equal(ks, kx, out=hit)
                d = hit.argmax(axis=0)
                d = np.where(ks[d, bidx] == kx, d, D)  # D: below the kept top
                d = np.where(valid[:, slot], d, 0)
                moved = np.nonzero(d)[0]
                if not moved.size:
                    continue
                dm = int(d.max())
                pm[0] = ks[0]  # pm[i] = lowest key at depth <= i
                for i in range(1, dm):
                    np.minimum(pm[i - 1], ks[i], out=pm[i])
                # Mattson's update: the expert goes on top; above its old depth d the lower of
                # the key carried down and the one met moves on, the other stays; the key
                # carried to depth d takes the expert's place (from below the kept top it
                # leaves it); below d nothing moves
                dd = d[moved]
                carried = pm[dd - 1, moved]
                up = min(dm, D - 1)
                np.maximum(pm[:up], ks[1 : up + 1], out=pm[:up])
                np.less(inner[:up], d, out=hit[:up])
                np.copyto(ks[1 : up + 1], pm[:up], where=hit[:up])
                inside = dd < D
                ks[dd[inside], moved[inside]] = carried[inside]
                ks[0, moved] = kx[moved]
            np.bitwise_and(ks, low, out=stack)
            np.subtract(E - 1, stack, out=stack)
        # state after step t
        last.ravel()[fx] = t
        seen.ravel()[fx] = True
        nseen += np.bincount(r[new], minlength=B)
        if policy == "lfu":
            primary.ravel()[fx] += 1
        elif policy == "belady":
            primary.ravel()[fx] = never - nxt[a:b]  # 0 when never used again
    return warm.reshape(B, E), cold.reshape(B, E)


# ----------------------------------------------------------------------------------- bootstrap


def bootstrap_weights(num_samples: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, S] float64: how often each sample is drawn in each resample (S draws with
    replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_samples, size=(resamples, num_samples))
    weights = np.zeros((resamples, num_samples), dtype=np.float64)
    np.add.at(weights, (np.repeat(np.arange(resamples), num_samples), draws.ravel()), 1.0)
    return weights


def basic_interval(
    estimate: Any, replicates: np.ndarray, confidence: float, low: float = 0.0,
    high: float = 100.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The basic bootstrap interval (2 est - q_hi, 2 est - q_lo), q the quantiles of
    ``replicates`` over axis 0, clipped to [low, high]; NaN where the estimate is NaN or there
    are no replicates."""
    estimate = np.asarray(estimate, dtype=np.float64)
    if replicates.shape[0] == 0:
        nan = np.full(estimate.shape, np.nan)
        return nan, nan
    a = (1 - confidence) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        q_lo = np.nanquantile(replicates, a, axis=0)
        q_hi = np.nanquantile(replicates, 1 - a, axis=0)
    lo = np.clip(2 * estimate - q_hi, low, high)
    hi = np.clip(2 * estimate - q_lo, low, high)
    return lo, hi


def _nanmean(values: np.ndarray, axis: Optional[int] = None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


# ------------------------------------------------------------------------------------ analysis


def _policy_labels(
    policies: Sequence[str], windows: Sequence[int]
) -> list[tuple[str, str, Optional[int]]]:
    """(label, policy, m): one "sch_m<m>" per window for sch, the others once."""
    out = []
    for p in policies:
        if p == "sch":
            out += [(f"sch_m{m}", "sch", m) for m in windows]
        else:
            out.append((p, p, None))
    return out


def _round(value: Any, digits: int = 4) -> Optional[float]:
    """A JSON number (None for NaN)."""
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def _ci_dict(estimate: Any, lo: Any, hi: Any) -> dict:
    return {"value": _round(estimate), "ci": [_round(lo), _round(hi)]}


def analyse(
    routing: Any,
    offsets: Any = None,
    *,
    num_experts: int,
    k: Optional[int] = None,
    windows: Iterable[int] = DEFAULT_WINDOWS,
    rhos: Iterable[float] = DEFAULT_RHOS,
    policies: Iterable[str] = POLICIES,
    sample_len: Optional[int] = SAMPLE_LEN,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
    compulsory_misses: bool = True,
    count: Any = None,
    srp: bool = True,
    backend: str = "auto",
) -> dict:
    """SRP(m) and the cache hit rates of every policy and cache size, per layer and averaged
    over layers, with bootstrap intervals (a JSON-ready dict).

    ``routing``, ``offsets``, ``num_experts``, ``k``, ``sample_len``, ``count``: as
    ``make_samples``. ``windows``: the m of SRP and of SCH; ``rhos``: cache sizes in multiples
    of k; ``policies``: a subset of ``POLICIES``; ``resamples`` (0 = no intervals),
    ``confidence``, ``seed``: the bootstrap; ``compulsory_misses``: see the module docstring;
    ``srp``: False leaves SRP out (hit rates only); ``backend``: the stack pass's
    implementation (``stack_hits``).

    Returns {"tokens", "samples", "num_experts", "k", "sample_len", "resamples",
    "confidence", "ci_method", "compulsory_misses", "capacities": {rho: C},
    "layers": {layer: {"srp": {m: {"value", "ci", "alpha", "rho_hat", "windows"}},
    "hit_rate": {policy: {rho: {"value", "ci", "hits", "activations", "misses_per_token"}}}}},
    "mean": the same averaged over layers (SRP and hit rates; hits summed)}. Values in
    percent; "misses_per_token" = misses / counted tokens: the expert loads a token waits for
    in that layer, and in "mean" summed over the layers (a whole forward pass)."""
    _check_backend(backend)
    samples = make_samples(
        routing, offsets, num_experts=num_experts, k=k, sample_len=sample_len, count=count
    )
    E, k = samples.num_experts, samples.k
    windows = [_check_int("windows", m, 1) for m in windows]
    if not windows and "sch" in policies:
        _fail("windows must name at least one m for the sch policy")
    policies = list(policies)
    for p in policies:
        if p not in POLICIES:
            _fail(f"policies must be among {POLICIES}, got {p!r}")
    rhos = [_check_number("rhos", r, 1.0) for r in rhos]
    caps = {r: capacity_of(r, k) for r in rhos}
    for r, c in caps.items():
        if c > E:
            _fail(f"rhos: {r} * k = {c} slots exceeds the {E} experts")
    resamples = _check_int("resamples", resamples, 0)
    confidence = _check_number("confidence", confidence, 0.0, strict=True)
    if confidence >= 1:
        _fail(f"confidence must be in (0, 1), got {confidence}")
    if not isinstance(compulsory_misses, bool):
        _fail(f"compulsory_misses must be true or false, got {compulsory_misses!r}")
    layers = sorted(samples.layers)
    L, S = len(layers), samples.num_samples
    weights = bootstrap_weights(S, resamples, seed) if resamples else np.zeros((0, S))

    out_layers: dict = {str(l): {"srp": {}, "hit_rate": {}} for l in layers}
    mean: dict = {"srp": {}, "hit_rate": {}}

    # SRP: per sample histograms, summed (and resampled) per layer
    hists_of: dict[int, list] = {m: [] for m in windows} if srp else {}
    for l in layers:  # one cumulative count per layer, shared by every window
        cs = _cumulative(samples.layers[l], E) if hists_of else None
        for m in hists_of:
            hists_of[m].append(window_histogram(samples.layers[l], samples, m, cs))
        del cs
    for m, per_layer in hists_of.items():
        hists = np.stack(per_layer)
        est, alpha, rho_hat = srp_from_histogram(hists.sum(1), m)  # [L]
        # float32 products: exact to 2**24, ample for a resampled histogram's shape
        resampled = np.matmul(weights.astype(np.float32)[None], hists.astype(np.float32))
        reps = srp_from_histogram(resampled, m)[0].T  # [R, L]
        lo, hi = basic_interval(est, reps, confidence)
        nwin = int(np.maximum(samples.lengths - m + 1, 0).sum())
        for i, l in enumerate(layers):
            entry = _ci_dict(est[i], lo[i], hi[i])
            entry.update(
                alpha=int(alpha[i]) if alpha[i] > 0 else None,
                rho_hat=_round(rho_hat[i]),
                windows=nwin,
            )
            out_layers[str(l)]["srp"][str(m)] = entry
        m_est = _nanmean(est)
        m_lo, m_hi = basic_interval(m_est, _nanmean(reps, axis=1), confidence)
        entry = _ci_dict(m_est, m_lo, m_hi)
        entry.update(rho_hat=_round(_nanmean(rho_hat)), windows=nwin)
        mean["srp"][str(m)] = entry

    # caches: every layer's samples as rows of one block, every size per pass
    block, cnt = _sample_block(samples, [samples.layers[l] for l in layers])
    counted_tokens = int(cnt[:S].sum())
    refs = ((block >= 0) & cnt[..., None]).sum(axis=(1, 2)).reshape(L, S).astype(np.float64)
    events = _Events(block, cnt)
    del block
    for label, policy, m in _policy_labels(policies, windows):
        warm, cold = _stack_hits(
            events, E, policy, m, max(caps.values()) if caps else None, backend
        )
        cum = np.cumsum(warm, axis=1)
        if not compulsory_misses:
            cum = cum + np.cumsum(cold, axis=1)
        out_p = {str(l): {} for l in layers}
        mean_p = {}
        for r, c in caps.items():
            hits = cum[:, c - 1].reshape(L, S).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                est = 100 * hits.sum(1) / refs.sum(1)  # [L]
                reps = 100 * (weights @ hits.T) / (weights @ refs.T)  # [R, L]
            lo, hi = basic_interval(est, reps, confidence)
            for i, l in enumerate(layers):
                entry = _ci_dict(est[i], lo[i], hi[i])
                miss = refs[i].sum() - hits[i].sum()
                entry.update(
                    capacity=c, hits=int(hits[i].sum()), activations=int(refs[i].sum()),
                    misses_per_token=_per_token(miss, counted_tokens),
                )
                out_p[str(l)][_rho_key(r)] = entry
            m_est = _nanmean(est)
            m_lo, m_hi = basic_interval(m_est, _nanmean(reps, axis=1), confidence)
            entry = _ci_dict(m_est, m_lo, m_hi)
            miss = refs.sum() - hits.sum()
            entry.update(
                capacity=c, hits=int(hits.sum()), activations=int(refs.sum()),
                misses_per_token=_per_token(miss, counted_tokens),
            )
            mean_p[_rho_key(r)] = entry
        for l in layers:
            out_layers[str(l)]["hit_rate"][label] = out_p[str(l)]
        mean["hit_rate"][label] = mean_p

    return {
        "tokens": samples.num_tokens,
        "counted_tokens": counted_tokens,
        "samples": S,
        "num_experts": E,
        "k": k,
        "sample_len": sample_len,
        "resamples": resamples,
        "confidence": confidence,
        "seed": seed,
        "ci_method": "basic bootstrap over samples (drawn with replacement), clipped to [0, 100]",
        "compulsory_misses": compulsory_misses,
        "capacities": {_rho_key(r): c for r, c in caps.items()},
        "layers": out_layers,
        "mean": mean,
    }


def _per_token(misses: float, tokens: int) -> Optional[float]:
    return round(float(misses / tokens), 6) if tokens else None


def _np_of(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def _rho_key(rho: float) -> str:
    return f"{rho:g}"


# ---------------------------------------------------------------------------------- offloading


def offload_seconds_per_token(
    misses_per_token: float | Sequence[float],
    expert_bytes: int,
    bandwidth: float,
    per_load_s: float = 0.0,
) -> float:
    """Seconds a token waits for expert loads: ``sum(misses_per_token)`` (per MoE layer, or
    already summed) x (``expert_bytes`` / ``bandwidth`` bytes/s + ``per_load_s``)."""
    if isinstance(misses_per_token, (int, float, np.integer, np.floating)):
        total = _check_number("misses_per_token", misses_per_token, 0.0)
    else:
        total = sum(_check_number("misses_per_token", v, 0.0) for v in misses_per_token)
    expert_bytes = _check_int("expert_bytes", expert_bytes, 1)
    bandwidth = _check_number("bandwidth", bandwidth, 0.0, strict=True)
    per_load_s = _check_number("per_load_s", per_load_s, 0.0)
    return total * (expert_bytes / bandwidth + per_load_s)


# ------------------------------------------------------------------------- cache-aware choices


def cache_aware_choice(
    pools: Any,
    k: int,
    capacity: int,
    *,
    flexible: Any = None,
    scores: Any = None,
    num_experts: Optional[int] = None,
) -> dict:
    """Simulate a router that, for a *flexible* token (LASER's flat-score tokens), takes the
    candidates already resident in an LRU expert cache first: the cache state as the load
    signal, for offloaded single-GPU serving.

    Args:
        pools: [T, c] candidate expert ids of one sequence's tokens, best score first (c >= k;
            LASER's top-c pool).
        k: experts per token; capacity: cache slots (>= k).
        flexible: [T] bool, tokens allowed to leave their top-k (None: all); the others take
            ``pools[:, :k]``.
        scores: optional [T, E] gate scores, to report the score mass kept.
        num_experts: E (None: from ``scores`` or the largest id + 1).

    A flexible token keeps its resident candidates in pool order (up to k) and fills the rest
    with its best non-resident candidates; the cache then loads the misses (LRU eviction, never
    a current expert). The same cache runs the plain top-k choice for comparison. Returns
    {"chosen": [T, k] ids, "hit_rate", "topk_hit_rate" (percent), "score_kept" (chosen score
    mass / top-k score mass, None without scores), "changed_tokens"}.
    """
    if hasattr(pools, "detach"):
        pools = pools.detach().cpu().numpy()
    pools = np.asarray(pools)
    if pools.ndim != 2 or not np.issubdtype(pools.dtype, np.integer) or pools.shape[0] == 0:
        _fail(f"pools must be an integer array [tokens, candidates], got shape {pools.shape}")
    T, c = pools.shape
    k = _check_int("k", k, 1, c)
    if num_experts is None:
        if scores is not None:
            num_experts = int(np.asarray(_np_of(scores)).shape[1])
        else:
            num_experts = int(pools.max()) + 1
    E = _check_int("num_experts", num_experts, 1)
    pools = _as_ids("pools", pools, E)
    if (pools < 0).any():
        _fail("pools must hold expert ids 0..E-1 (no -1)")
    capacity = _check_int("capacity", capacity, k, E)
    if flexible is None:
        flex = np.ones(T, dtype=bool)
    else:
        if hasattr(flexible, "detach"):
            flexible = flexible.detach().cpu().numpy()
        flex = np.asarray(flexible)
        if flex.shape != (T,) or flex.dtype != bool:
            _fail(f"flexible must be a [{T}] bool mask, got {flex.shape} {flex.dtype}")

    def run(aware: bool) -> tuple[np.ndarray, int]:
        last = np.full(E, -1, dtype=np.int64)  # last use; resident <=> in ``cache``
        cache: set[int] = set()
        chosen = np.empty((T, k), dtype=np.int64)
        hits = 0
        for t in range(T):
            pool = pools[t]
            if aware and flex[t]:
                resident = [int(e) for e in pool if int(e) in cache][:k]
                rest = [int(e) for e in pool if int(e) not in cache][: k - len(resident)]
                pick = resident + rest
            else:
                pick = [int(e) for e in pool[:k]]
            chosen[t] = pick
            hits += sum(e in cache for e in pick)
            for e in pick:
                if e not in cache:
                    if len(cache) >= capacity:
                        victims = [v for v in cache if v not in pick]
                        cache.remove(min(victims, key=lambda v: (last[v], -v)))
                    cache.add(e)
            last[pick] = t
        return chosen, hits

    chosen, hits = run(True)
    base, base_hits = run(False)
    score_kept = None
    if scores is not None:
        if hasattr(scores, "detach"):
            scores = scores.detach().cpu().numpy()
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (T, E):
            _fail(f"scores must be [{T}, {E}], got {s.shape}")
        got = np.take_along_axis(s, chosen, 1).sum()
        ref = np.take_along_axis(s, base, 1).sum()
        score_kept = float(got / ref) if ref > 0 else None
    changed = int((np.sort(chosen, 1) != np.sort(base, 1)).any(axis=1).sum())
    return {
        "chosen": chosen,
        "hit_rate": 100.0 * hits / (T * k),
        "topk_hit_rate": 100.0 * base_hits / (T * k),
        "score_kept": score_kept,
        "changed_tokens": changed,
    }
