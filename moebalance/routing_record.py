"""Routing records: each MoE layer's per-token expert choices of a run, saved for offline analysis
(``moebalance.locality``, ``scripts/locality.py``).

File format (safetensors):

- ``layer.<l>``: [N, W] int16 (int32 beyond 32767 experts) logical expert ids of the N tokens
  at MoE layer l (0-based decoder layer index, as the telemetry's), in sequence order, -1 =
  no expert in that slot (a dropped route; W >= the most experts any token chose, = top-k
  unless a router changed the count). Every layer holds the same N tokens.
- ``offsets``: [S + 1] int64 sequence boundaries into the N tokens.
- ``phase``: [N] int8, 0 = prefill, 1 = decode, 2 = eval (teacher-forced held-out text):
  a generated sequence is its prompt's prefill tokens followed by its decode tokens.
- ``seq_domain``: [S] int16 index into the header's ``domains`` (-1: unknown);
  ``seq_rank``: [S] int16, the global rank that routed the sequence.
- metadata ``moebalance``: a JSON header (``HEADER_FIELDS``): the model, its experts and
  top-k, the MoE layers, the router and its parameters, framework, EP and world size, the
  prompts' settings, the phases and domains present, the bytes of one expert.

``RoutingCollector`` fills a record while a model runs: ``attach(model, recorder)`` hooks the
model's forward (each call is one step: its input ids, padding mask and KV-cache offset say
which tokens are new sequences and which continue one) and every ``RouterRunner`` (each
layer's decision, valid tokens only, in the framework's [S, B] order), so the generation loop
and the held-out evaluation need no change. Warm-up steps of the followed ``MoERecorder`` are
left out. ``gather`` collects every rank's sequences on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from .config import ConfigError

__all__ = [
    "FORMAT",
    "VERSION",
    "PHASES",
    "HEADER_FIELDS",
    "RoutingRecord",
    "RoutingCollector",
    "check_header",
    "record_path",
    "expert_bytes_of",
    "find_domains",
    "params_dict",
]

FORMAT = "moebalance.routing_record"
VERSION = 1
PHASES = ("prefill", "decode", "eval")
HEADER_KEY = "moebalance"
MAX_INT16 = 2**15 - 1

#: header field -> (required, what it holds)
HEADER_FIELDS = {
    "format": (True, f"the string {FORMAT!r}"),
    "version": (True, f"the format version ({VERSION})"),
    "model": (True, "the model's name (a string)"),
    "num_experts": (True, "logical experts per MoE layer (an integer >= 1)"),
    "topk": (True, "the model's experts per token (an integer >= 1)"),
    "layers": (True, "the recorded MoE layers (0-based decoder indices)"),
    "router": (True, "the routing policy's name (a string)"),
    "router_params": (False, "the policy's parameters (a mapping)"),
    "framework": (False, "megatron or deepspeed (a string or null)"),
    "ep": (False, "the expert-parallel size (an integer >= 1 or null)"),
    "world_size": (False, "the processes that routed (an integer >= 1 or null)"),
    "prompts": (False, "how the prompts and held-out text were chosen (a mapping)"),
    "phases": (True, f"the phases present (a list within {PHASES})"),
    "domains": (True, "the text domains the seq_domain column indexes (a list of strings)"),
    "expert_bytes": (False, "bytes of one expert's weights (an integer >= 1 or null)"),
}


def _fail(message: str) -> None:
    raise ConfigError(message.replace("\n", " "))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_header(header: Any, where: str = "routing record") -> dict:
    """ConfigError (one line, naming the field) unless ``header`` is a valid record header."""
    if not isinstance(header, dict):
        _fail(f"{where}: header must be a JSON object, got {type(header).__name__}")
    unknown = sorted(set(header) - set(HEADER_FIELDS))
    if unknown:
        _fail(f"{where}: unknown header field(s) {unknown}; allowed: {sorted(HEADER_FIELDS)}")
    for name, (required, what) in HEADER_FIELDS.items():
        if required and name not in header:
            _fail(f"{where}: header field {name!r} missing ({what})")
    h = header
    checks = {
        "format": h["format"] == FORMAT,
        "version": h["version"] == VERSION,
        "model": isinstance(h["model"], str) and bool(h["model"]),
        "num_experts": _is_int(h["num_experts"]) and 1 <= h["num_experts"] <= 2**31 - 1,
        "topk": _is_int(h["topk"]) and 1 <= h["topk"] <= (
            h["num_experts"] if _is_int(h["num_experts"]) else 1
        ),
        "layers": isinstance(h["layers"], list) and bool(h["layers"])
        and all(_is_int(l) and l >= 0 for l in h["layers"])
        and len(set(h["layers"])) == len(h["layers"]),
        "router": isinstance(h["router"], str) and bool(h["router"]),
        "router_params": isinstance(h.get("router_params", {}), dict),
        "framework": h.get("framework") is None or isinstance(h.get("framework"), str),
        "ep": h.get("ep") is None or (_is_int(h["ep"]) and h["ep"] >= 1),
        "world_size": h.get("world_size") is None or (
            _is_int(h["world_size"]) and h["world_size"] >= 1
        ),
        "prompts": isinstance(h.get("prompts", {}), dict),
        "phases": isinstance(h["phases"], list) and all(p in PHASES for p in h["phases"]),
        "domains": isinstance(h["domains"], list)
        and all(isinstance(d, str) for d in h["domains"])
        and len(set(h["domains"])) == len(h["domains"]),
        "expert_bytes": h.get("expert_bytes") is None or (
            _is_int(h["expert_bytes"]) and h["expert_bytes"] >= 1
        ),
    }
    for name, ok in checks.items():
        if not ok:
            value = json.dumps(h.get(name))
            value = value if len(value) <= 60 else value[:57] + "..."
            _fail(f"{where}: header field {name!r} must be {HEADER_FIELDS[name][1]}, got {value}")
    return header


def params_dict(params: Any) -> dict:
    """A policy's parameters as a JSON-ready dict (dataclass, mapping or None)."""
    if params is None:
        return {}
    if dataclasses.is_dataclass(params):
        params = dataclasses.asdict(params)
    return json.loads(json.dumps(params, default=str))


# -------------------------------------------------------------------------------------- record


@dataclasses.dataclass
class RoutingRecord:
    """A run's routing (see the module docstring for the columns).

    Attributes:
        header: the validated JSON header.
        layers: {layer: [N, W] int16/int32 ids}.
        offsets: [S + 1] int64; phase: [N] int8; seq_domain, seq_rank: [S] int16.
    """

    header: dict
    layers: dict
    offsets: np.ndarray
    phase: np.ndarray
    seq_domain: np.ndarray
    seq_rank: np.ndarray

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_sequences(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def num_experts(self) -> int:
        return int(self.header["num_experts"])

    @property
    def topk(self) -> int:
        return int(self.header["topk"])

    @property
    def domains(self) -> list[str]:
        return list(self.header["domains"])

    def sequence_domains(self) -> list[Optional[str]]:
        """The domain of each sequence (None where unknown)."""
        return [self.domains[d] if d >= 0 else None for d in self.seq_domain.tolist()]

    # ------------------------------------------------------------------ checks
    def validate(self, where: str = "routing record") -> None:
        """ConfigError naming the column or field that is inconsistent."""
        check_header(self.header, where)
        h = self.header
        off = np.asarray(self.offsets)
        if off.ndim != 1 or off.size < 1 or off[0] != 0 or (np.diff(off) < 0).any():
            _fail(f"{where}: 'offsets' must be non-decreasing sequence boundaries from 0")
        n, s = int(off[-1]), off.size - 1
        if sorted(self.layers) != sorted(h["layers"]):
            _fail(
                f"{where}: header field 'layers' {sorted(h['layers'])} does not match the layer "
                f"tensors {sorted(self.layers)}"
            )
        for layer, ids in self.layers.items():
            name = f"layer.{layer}"
            if ids.ndim != 2 or ids.shape[0] != n or not np.issubdtype(ids.dtype, np.integer):
                _fail(f"{where}: {name!r} must be an integer [{n}, W] tensor, got "
                      f"{tuple(ids.shape)} {ids.dtype}")
            if ids.size and (ids.min() < -1 or ids.max() >= h["num_experts"]):
                _fail(f"{where}: {name!r} holds ids outside -1..{h['num_experts'] - 1}")
        if self.phase.shape != (n,) or (self.phase.size and (
                self.phase.min() < 0 or self.phase.max() >= len(PHASES))):
            _fail(f"{where}: 'phase' must be [{n}] codes 0..{len(PHASES) - 1}")
        present = sorted({PHASES[p] for p in np.unique(self.phase).tolist()}, key=PHASES.index)
        if present != sorted(h["phases"], key=PHASES.index):
            _fail(f"{where}: header field 'phases' {h['phases']} does not match the tokens' "
                  f"phases {present}")
        if self.seq_domain.shape != (s,) or (s and (
                self.seq_domain.min() < -1 or self.seq_domain.max() >= len(h["domains"]))):
            _fail(f"{where}: 'seq_domain' must be [{s}] indices into the header's domains")
        if self.seq_rank.shape != (s,) or (s and self.seq_rank.min() < 0):
            _fail(f"{where}: 'seq_rank' must be [{s}] ranks >= 0")

    # ------------------------------------------------------------------ selection
    def token_index(
        self, phases: Optional[Iterable[str]] = None, domain: Optional[str] = None
    ) -> np.ndarray:
        """[n] indices of the tokens in ``phases`` (None: all) of the sequences of ``domain``
        (None: all), in order."""
        keep = np.ones(self.num_tokens, dtype=bool)
        if phases is not None:
            phases = list(phases)
            bad = [p for p in phases if p not in PHASES]
            if bad:
                _fail(f"phases must be among {PHASES}, got {bad}")
            keep &= np.isin(self.phase, [PHASES.index(p) for p in phases])
        if domain is not None:
            if domain not in self.domains:
                _fail(f"domain must be one of {self.domains}, got {domain!r}")
            seq_of = np.repeat(np.arange(self.num_sequences), np.diff(self.offsets))
            keep &= (self.seq_domain == self.domains.index(domain))[seq_of]
        return np.nonzero(keep)[0]

    def select(
        self, phases: Optional[Iterable[str]] = None, domain: Optional[str] = None
    ) -> tuple[dict, np.ndarray]:
        """({layer: [n, W] ids}, [s + 1] offsets) of the tokens ``token_index(phases,
        domain)``. A sequence's selected tokens that are not contiguous (never the case for
        phases: prefill, then decode) become separate sequences, so no window spans a gap."""
        idx = self.token_index(phases, domain)
        if idx.size == 0:
            return {l: v[:0] for l, v in self.layers.items()}, np.zeros(1, dtype=np.int64)
        seq_of = np.repeat(np.arange(self.num_sequences), np.diff(self.offsets))
        # a new sequence starts where the sequence changes or a token was skipped
        start = np.ones(idx.size, dtype=bool)
        start[1:] = (seq_of[idx[1:]] != seq_of[idx[:-1]]) | (idx[1:] != idx[:-1] + 1)
        offsets = np.append(np.nonzero(start)[0], idx.size).astype(np.int64)
        return {l: v[idx] for l, v in self.layers.items()}, offsets

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the record to ``path`` atomically (a temporary file, then renamed); an
        existing file needs ``overwrite``."""
        from safetensors.numpy import save_file

        self.validate()
        path = Path(path)
        if path.exists() and not overwrite:
            _fail(f"record file {path} exists (overwrite it explicitly)")
        wide = self.num_experts > MAX_INT16
        tensors = {
            f"layer.{l}": np.ascontiguousarray(v, dtype=np.int32 if wide else np.int16)
            for l, v in self.layers.items()
        }
        tensors.update(
            offsets=np.ascontiguousarray(self.offsets, dtype=np.int64),
            phase=np.ascontiguousarray(self.phase, dtype=np.int8),
            seq_domain=np.ascontiguousarray(self.seq_domain, dtype=np.int16),
            seq_rank=np.ascontiguousarray(self.seq_rank, dtype=np.int16),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            save_file(tensors, str(partial), metadata={HEADER_KEY: json.dumps(self.header)})
            with open(partial, "rb") as f:
                os.fsync(f.fileno())
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(partial, 0o666 & ~mask)  # the mode a plain open() would give
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "RoutingRecord":
        """Read and validate a record; ConfigError (one line) naming what is wrong."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        from safetensors import safe_open

        path = Path(path)
        where = f"routing record {path}"
        if not path.is_file():
            _fail(f"{where}: no such file")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            _fail(f"{where}: not a safetensors file ({str(err).splitlines()[0]})")
        if HEADER_KEY not in meta:
            _fail(f"{where}: no {HEADER_KEY!r} header in the file's metadata")
        try:
            header = json.loads(meta[HEADER_KEY])
        except json.JSONDecodeError as err:
            _fail(f"{where}: header is not JSON ({err.msg})")
        check_header(header, where)
        for name in ("offsets", "phase", "seq_domain", "seq_rank"):
            if name not in tensors:
                _fail(f"{where}: tensor {name!r} missing")
        layers = {}
        for name, value in tensors.items():
            if name.startswith("layer."):
                try:
                    layers[int(name.split(".", 1)[1])] = value
                except ValueError:
                    _fail(f"{where}: tensor {name!r} is not layer.<int>")
            elif name not in ("offsets", "phase", "seq_domain", "seq_rank"):
                _fail(f"{where}: unknown tensor {name!r}")
        record = cls.__new__(cls)
        record.header, record.layers = header, layers
        record.offsets, record.phase = tensors["offsets"], tensors["phase"]
        record.seq_domain, record.seq_rank = tensors["seq_domain"], tensors["seq_rank"]
        record.validate(where)
        return record


def record_path(path: str | Path, router: str, routers: Iterable[str]) -> Path:
    """The file of ``router``'s record: ``path`` itself when the run has one router, else
    ``<stem>.<router><suffix>`` beside it (``--compare`` records each router)."""
    path, routers = Path(path), list(routers)
    if len(routers) <= 1:
        return path
    suffix = path.suffix or ".safetensors"
    return path.with_name(f"{path.stem if path.suffix else path.name}.{router}{suffix}")


def expert_bytes_of(framework: Any, model: torch.nn.Module) -> Optional[int]:
    """Bytes of one expert's weights at rest (the first local expert of the first MoE layer;
    ``moebalance.quantize.module_weight_bytes``), None when the model has none."""
    from .quantize import module_weight_bytes

    for slots in framework.expert_modules(model).values():
        for module in slots.values():
            return int(module_weight_bytes(module))
    return None


def find_domains(rows: Iterable[Any], texts: Mapping[str, Any]) -> list[Optional[str]]:
    """The domain whose text contains each row of token ids (``texts``: {domain: 1-D ids};
    the first domain in sorted order that holds it), None where none does."""
    hay = {d: np.ascontiguousarray(np.asarray(_np(t), dtype=np.int64)).tobytes()
           for d, t in sorted(texts.items())}
    out = []
    for row in rows:
        needle = np.ascontiguousarray(np.asarray(_np(row), dtype=np.int64).ravel()).tobytes()
        found = None
        for domain, text in hay.items():
            at = text.find(needle)
            while at != -1 and at % 8:  # only whole int64 positions
                at = text.find(needle, at + 1)
            if at != -1:
                found = domain
                break
        out.append(found)
    return out


def _np(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# ------------------------------------------------------------------------------------ collector


def _ids_from_map(routing_map: torch.Tensor) -> torch.Tensor:
    """[T, W] int64 ids of the True columns of ``routing_map`` [T, P], ascending, -1 padded (W
    = the most columns any row has, at least 1)."""
    rm = routing_map.bool()
    T = rm.shape[0]
    if T == 0:
        return torch.full((0, 1), -1, dtype=torch.int64, device=rm.device)
    counts = rm.sum(dim=1)
    W = max(1, int(counts.max()))
    order = torch.argsort((~rm).to(torch.int8), dim=1, stable=True)[:, :W]
    keep = torch.arange(W, device=rm.device)[None, :] < counts[:, None]
    return torch.where(keep, order, torch.full_like(order, -1))


class _Step:
    """One model call being collected."""

    def __init__(self, valid: np.ndarray, phase: str, seqs: np.ndarray, start: np.ndarray):
        self.valid = valid  # [B, S] bool
        self.phase = phase
        self.seqs = seqs  # [B] sequence id of each row
        self.start = start  # [B] tokens the row's sequence already holds
        self.layers: dict[int, tuple[Any, str, Any]] = {}  # layer -> (ids, order, slot map)


class RoutingCollector:
    """Collects each MoE layer's per-token expert choices of the steps it sees.

    Low-level use (any loop)::

        collector.begin_step(valid, phase="eval")      # valid [B, S] bool, True = real token
        collector.add(layer, ids, order="sb")          # per layer: [T, W] ids of the T valid
        collector.end_step()                           # tokens ([S, B] or [B, S] order)

    With a model: ``attach(model, recorder)`` does all three for every forward call and every
    ``RouterRunner`` in the model (routers swapped in later included); ``label(domain, rows)``
    names the domain of sequences by their token ids. ``to_record(...)`` / ``gather(...)``
    build the ``RoutingRecord``; ``clear()`` starts over (e.g. for the next router).

    Sequences: a step with ``continues=False`` opens one new sequence per batch row; a step
    with ``continues=True`` (a decode step) appends each row's tokens to the row's open
    sequence. ``rank``: the global rank, stored per sequence.
    """

    def __init__(self, *, rank: int = 0) -> None:
        self.rank = int(rank)
        self._labels: dict[bytes, str] = {}
        self.clear()

    # ------------------------------------------------------------------ state
    def clear(self) -> None:
        """Forget every collected step (labels and attachments are kept)."""
        self._ids: dict[int, list[np.ndarray]] = {}
        self._tok_seq: list[np.ndarray] = []
        self._tok_pos: list[np.ndarray] = []
        self._tok_phase: list[np.ndarray] = []
        self._seq_domain: list[Optional[str]] = []
        self._seq_len: list[int] = []
        self._open: Optional[np.ndarray] = None  # sequence id of each row of the last batch
        self._step: Optional[_Step] = None
        self._layers: Optional[set] = None
        self.router: Optional[str] = None
        self.router_params: Optional[dict] = None
        self.num_experts: Optional[int] = None
        self.topk: Optional[int] = None

    @property
    def num_tokens(self) -> int:
        return int(sum(len(s) for s in self._tok_seq))

    @property
    def num_sequences(self) -> int:
        return len(self._seq_len)

    @property
    def active(self) -> bool:
        return self._step is not None

    def label(self, domain: str, rows: Any) -> None:
        """Sequences whose tokens are one of ``rows`` (an [N, L] tensor or a list of 1-D
        ones) belong to ``domain``. A held-out row of L tokens is matched as the L - 1 the
        model reads too (teacher forcing drops the last)."""
        if not isinstance(domain, str) or not domain:
            _fail(f"domain must be a non-empty string, got {domain!r}")
        if (torch.is_tensor(rows) or isinstance(rows, np.ndarray)) and rows.ndim == 2:
            rows = list(rows)
        for row in rows:
            ids = np.asarray(_np(row), dtype=np.int64).ravel()
            self._labels[ids.tobytes()] = domain
            if ids.size > 1:
                self._labels.setdefault(ids[:-1].tobytes(), domain)

    # ------------------------------------------------------------------ steps
    def begin_step(
        self,
        valid: Any,
        *,
        phase: str,
        continues: bool = False,
        inputs: Any = None,
    ) -> None:
        """Start a step of ``valid`` [B, S] bool tokens (True = a real token; an int B, S pair
        is all valid). ``phase``: one of ``PHASES``; ``continues``: the rows extend the
        previous step's sequences (decode); ``inputs``: [B, S] token ids, to find each new
        sequence's domain among the ``label``-ed rows."""
        if phase not in PHASES:
            _fail(f"phase must be one of {PHASES}, got {phase!r}")
        if isinstance(valid, tuple):
            valid = np.ones(valid, dtype=bool)
        valid = np.asarray(_np(valid), dtype=bool)
        if valid.ndim != 2:
            _fail(f"valid must be a [batch, tokens] bool mask, got shape {valid.shape}")
        B = valid.shape[0]
        if continues:
            if self._open is None or self._open.size != B:
                _fail(
                    f"continues=True needs the previous step's {B} sequences; "
                    f"{'none are open' if self._open is None else f'{self._open.size} are'}"
                )
            seqs = self._open
            start = np.array([self._seq_len[s] for s in seqs.tolist()], dtype=np.int64)
        else:
            first = len(self._seq_len)
            seqs = np.arange(first, first + B, dtype=np.int64)
            start = np.zeros(B, dtype=np.int64)
            ids = None if inputs is None else np.asarray(_np(inputs), dtype=np.int64)
            for b in range(B):
                domain = None
                if ids is not None and self._labels:
                    domain = self._labels.get(ids[b][valid[b]].tobytes())
                self._seq_domain.append(domain)
                self._seq_len.append(0)
        self._step = _Step(valid, phase, seqs, start)

    def add(self, layer: int, ids: Any, *, order: str = "bs", slot_to_expert: Any = None) -> None:
        """Layer ``layer``'s expert ids [T, W] (-1 = none) of the step's T valid tokens, in
        ``order``: "bs" (sequence by sequence) or "sb" (position by position, the frameworks'
        [S, B] layout). ``slot_to_expert`` [P]: map physical slots to logical experts (a
        replica placement's ``phy2log``)."""
        step = self._step
        if step is None:
            return
        if order not in ("bs", "sb"):
            _fail(f"order must be 'bs' or 'sb', got {order!r}")
        layer = int(layer)
        if layer in step.layers:
            raise RuntimeError(f"MoE layer {layer} routed twice in one step")
        step.layers[layer] = (ids, order, slot_to_expert)

    def end_step(self) -> None:
        """Finish the step: put every layer's rows in sequence order and store them."""
        step, self._step = self._step, None
        if step is None:
            return
        if not step.layers:
            return
        layers = set(step.layers)
        if self._layers is None:
            self._layers = layers
        elif layers != self._layers:
            raise RuntimeError(
                f"this step routed MoE layers {sorted(layers)}, earlier steps "
                f"{sorted(self._layers)}"
            )
        valid = step.valid
        B, S = valid.shape
        s_idx, b_idx = np.nonzero(valid.T)  # the valid tokens in [S, B] order
        to_bs = np.lexsort((s_idx, b_idx))  # [S, B] order -> [B, S] order
        b_bs = b_idx[to_bs]
        T = b_bs.size
        within = (np.cumsum(valid, axis=1) - 1)[b_bs, s_idx[to_bs]]
        for layer, (ids, order, slot_to_expert) in step.layers.items():
            ids = np.asarray(_np(ids), dtype=np.int64)
            if ids.ndim == 1:
                ids = ids[:, None]
            if ids.shape[0] != T:
                raise RuntimeError(
                    f"MoE layer {layer} routed {ids.shape[0]} tokens, the step has {T} valid"
                )
            if slot_to_expert is not None:
                table = np.append(np.asarray(_np(slot_to_expert), dtype=np.int64), -1)
                ids = table[ids]  # -1 indexes the appended -1
            if order == "sb":
                ids = ids[to_bs]
            self._ids.setdefault(layer, []).append(ids)
        self._tok_seq.append(step.seqs[b_bs])
        self._tok_pos.append(step.start[b_bs] + within)
        self._tok_phase.append(np.full(T, PHASES.index(step.phase), dtype=np.int8))
        added = np.bincount(b_bs, minlength=B)
        for b, s in enumerate(step.seqs.tolist()):
            self._seq_len[s] += int(added[b])
        self._open = step.seqs

    # ------------------------------------------------------------------ model hooks
    def attach(self, model: torch.nn.Module, recorder: Any = None) -> "_Attachment":
        """Collect every forward call of ``model`` (a GPT-MoE called as the harness calls
        both adapters' models: ``model(ids [B, S], positions, mask, inference_context=None,
        padding_mask=None)``) from the decisions of its ``RouterRunner``s. A call with an
        inference context whose ``sequence_len_offset`` is > 0 continues the open sequences
        (phase "decode"), one with an inference context at offset 0 opens new ones
        ("prefill"), one without is "eval". With a ``recorder`` (``MoERecorder``), calls
        inside its warm-up steps are skipped. Returns a handle; ``remove()`` detaches."""
        from .runner import RouterRunner
        from .telemetry import shadow_method

        handle = _Attachment(self)
        state = {"warmup": False, "skip": False}

        def wrap_runners() -> None:
            for module in model.modules():
                runner = getattr(module, "runner", None)
                if isinstance(runner, RouterRunner) and id(runner) not in handle.runners:
                    handle.runners[id(runner)] = runner
                    shadow_method(runner, "route_tokens", route_factory(runner), handle.undo)

        def route_factory(runner: Any):
            def factory(original):
                def route_tokens(logits, ctx, group):
                    decision = original(logits, ctx, group)
                    if self._step is not None and not state["skip"]:
                        layer = ctx.layer if ctx.layer is not None else runner.layer
                        if layer is None:
                            raise RuntimeError("a router ran without its layer index")
                        layout = runner.layout
                        self._note_router(runner)
                        self.add(
                            layer, _ids_from_map(decision.routing_map), order="sb",
                            slot_to_expert=None if layout is None else layout.phy2log,
                        )
                    return decision

                return route_tokens

            return factory

        def pre_hook(module, args, kwargs):
            self._step = None  # a call that raised left its step open: drop it
            state["skip"] = bool(state["warmup"])
            if state["skip"]:
                return
            ids = args[0] if args else kwargs.get("input_ids")
            pad = kwargs.get("padding_mask")
            context = kwargs.get("inference_context")
            offset = getattr(context, "sequence_len_offset", 0) if context is not None else 0
            continues = context is not None and int(offset) > 0
            phase = "decode" if continues else ("prefill" if context is not None else "eval")
            valid = np.ones(tuple(ids.shape), dtype=bool) if pad is None else ~_np(pad).astype(bool)
            wrap_runners()
            self.begin_step(valid, phase=phase, continues=continues, inputs=ids)

        def post_hook(module, args, kwargs, output):
            if not state["skip"]:
                self.end_step()

        handle.hooks.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handle.hooks.append(model.register_forward_hook(post_hook, with_kwargs=True))
        if recorder is not None:
            def begin_factory(original):
                def begin_step(phase, *, warmup=False):
                    state["warmup"] = bool(warmup)
                    return original(phase, warmup=warmup)

                return begin_step

            def end_factory(original):
                def end_step():
                    try:
                        return original()
                    finally:
                        state["warmup"] = False

                return end_step

            shadow_method(recorder, "begin_step", begin_factory, handle.undo)
            shadow_method(recorder, "end_step", end_factory, handle.undo)
        wrap_runners()
        if not handle.runners:
            handle.remove()
            _fail(f"{type(model).__name__} has no moebalance router (RouterRunner) to record")
        return handle

    def _note_router(self, runner: Any) -> None:
        gate = runner.gate
        params = params_dict(runner.params)
        if self.router is None:
            self.router, self.router_params = runner.name, params
            self.num_experts, self.topk = int(gate.num_experts), int(gate.topk)
        elif (self.router, self.router_params) != (runner.name, params):
            raise RuntimeError(
                f"collected routing of router {self.router!r} and now {runner.name!r}: "
                "call clear() (after saving) between routers"
            )

    # ------------------------------------------------------------------ results
    def payload(self) -> dict:
        """This rank's sequences in sequence order, as plain arrays (picklable)."""
        if self._step is not None:
            raise RuntimeError("payload() inside a step")
        if not self._tok_seq:
            layers = sorted(self._layers or [])
            return {
                "layers": {l: np.zeros((0, 1), dtype=np.int64) for l in layers},
                "lengths": np.zeros(0, dtype=np.int64), "phase": np.zeros(0, dtype=np.int8),
                "domains": [], "rank": self.rank, "router": self.router,
                "router_params": self.router_params, "num_experts": self.num_experts,
                "topk": self.topk,
            }
        seq = np.concatenate(self._tok_seq)
        pos = np.concatenate(self._tok_pos)
        order = np.lexsort((pos, seq))
        lengths = np.bincount(seq, minlength=len(self._seq_len))
        keep = lengths > 0
        layers = {}
        for layer, parts in self._ids.items():
            width = max(p.shape[1] for p in parts)
            parts = [np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-1)
                     for p in parts]
            layers[layer] = np.concatenate(parts)[order]
        return {
            "layers": layers,
            "lengths": lengths[keep],
            "phase": np.concatenate(self._tok_phase)[order],
            "domains": [d for d, k in zip(self._seq_domain, keep) if k],
            "rank": self.rank,
            "router": self.router,
            "router_params": self.router_params,
            "num_experts": self.num_experts,
            "topk": self.topk,
        }

    def to_record(self, header: Optional[dict] = None, payloads: Optional[list] = None
                  ) -> RoutingRecord:
        """The record of this rank's sequences (or of ``payloads``, e.g. every rank's, in
        order). ``header``: the fields the collector cannot know (``model``, ``framework``,
        ``ep``, ``world_size``, ``prompts``, ``expert_bytes``; any may override the rest).
        Router, parameters, experts and top-k come from the routers seen."""
        payloads = [self.payload()] if payloads is None else payloads
        first = next((p for p in payloads if p["router"] is not None), None)
        if first is None:
            _fail("nothing was recorded: no step ran with the collector attached")
        for p in payloads:
            if p["router"] is not None and (p["router"], p["router_params"]) != (
                    first["router"], first["router_params"]):
                _fail("the ranks recorded different routers")
        layer_ids = sorted(first["layers"])
        domains = sorted({d for p in payloads for d in p["domains"] if d is not None})
        layers, lengths, phase, seq_domain, seq_rank = {}, [], [], [], []
        for l in layer_ids:
            parts = [p["layers"][l] for p in payloads if p["lengths"].size]
            width = max(v.shape[1] for v in parts)
            layers[l] = np.concatenate(
                [np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=-1) for v in parts]
            )
        for p in payloads:
            lengths.append(p["lengths"])
            phase.append(p["phase"])
            seq_domain += [domains.index(d) if d is not None else -1 for d in p["domains"]]
            seq_rank += [p["rank"]] * int(p["lengths"].size)
        lengths = np.concatenate(lengths)
        phase = np.concatenate(phase)
        fields = {
            "format": FORMAT,
            "version": VERSION,
            "model": "unknown",
            "num_experts": first["num_experts"],
            "topk": first["topk"],
            "layers": layer_ids,
            "router": first["router"],
            "router_params": first["router_params"] or {},
            "phases": sorted({PHASES[c] for c in np.unique(phase).tolist()}, key=PHASES.index),
            "domains": domains,
        }
        fields.update(header or {})  # validate() checks the caller's fields against the columns
        return RoutingRecord(
            header=fields,
            layers=layers,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            phase=phase.astype(np.int8),
            seq_domain=np.asarray(seq_domain, dtype=np.int16),
            seq_rank=np.asarray(seq_rank, dtype=np.int16),
        )

    def gather(self, header: Optional[dict] = None, group: Any = None) -> Optional[RoutingRecord]:
        """Every rank's sequences (rank order) as one record on the group's first rank, None
        on the others. Collective over ``group`` (default: the world)."""
        from .telemetry import gather_to_rank0

        payloads = gather_to_rank0(self.payload(), group)
        return None if payloads is None else self.to_record(header, payloads)


class _Attachment:
    """What ``RoutingCollector.attach`` returns: ``remove()`` undoes every hook."""

    def __init__(self, collector: RoutingCollector) -> None:
        self.collector = collector
        self.hooks: list = []
        self.undo: list = []
        self.runners: dict[int, Any] = {}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        while self.undo:
            self.undo.pop()()
        self.runners.clear()
