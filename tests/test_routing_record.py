"""moebalance.routing_record: the record file (round trip, header and column validation), the
collector's token order (hand-built steps with left padding and decode continuation), and the
collector attached to the trained tiny-moe in Megatron-Core and DeepSpeed (world 1): held-out
evaluation and a generation with a warm-up, checked against each router's own
``last_routing`` reassembled independently."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from mp_utils import run_workers
from moebalance.config import ConfigError
from moebalance.routing_record import (
    FORMAT,
    HEADER_FIELDS,
    VERSION,
    RoutingCollector,
    RoutingRecord,
    check_header,
    find_domains,
    record_path,
)


def _header(**changes) -> dict:
    h = {
        "format": FORMAT, "version": VERSION, "model": "tiny-moe", "num_experts": 8, "topk": 2,
        "layers": [0, 1], "router": "topk", "router_params": {}, "framework": "megatron",
        "ep": 1, "world_size": 1, "prompts": {"seed": 0}, "phases": ["prefill", "decode"],
        "domains": ["code", "prose"], "expert_bytes": 1024,
    }
    h.update(changes)
    return h


def _record(**changes) -> RoutingRecord:
    rng = np.random.default_rng(0)
    N = 7
    layers = {l: np.stack([rng.permutation(8)[:2] for _ in range(N)]) for l in (0, 1)}
    layers[1][3, 1] = -1  # a dropped route
    fields = dict(
        header=_header(), layers=layers, offsets=np.array([0, 3, 7]),
        phase=np.array([0, 0, 1, 0, 0, 1, 1], dtype=np.int8),
        seq_domain=np.array([1, -1], dtype=np.int16), seq_rank=np.array([0, 1], dtype=np.int16),
    )
    fields.update(changes)
    return RoutingRecord(**fields)


# ----------------------------------------------------------------------------- file


def test_round_trip_keeps_every_column_and_the_header(tmp_path):
    rec = _record()
    path = rec.save(tmp_path / "run.safetensors")
    back = RoutingRecord.load(path)
    assert back.header == rec.header
    assert sorted(back.layers) == [0, 1]
    for l in (0, 1):
        assert back.layers[l].dtype == np.int16
        assert np.array_equal(back.layers[l], rec.layers[l])
    for name in ("offsets", "phase", "seq_domain", "seq_rank"):
        assert np.array_equal(getattr(back, name), getattr(rec, name)), name
    assert back.sequence_domains() == ["prose", None]
    # the file is plain safetensors: the header is JSON metadata
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert json.loads(f.metadata()["moebalance"])["router"] == "topk"
    with pytest.raises(ConfigError, match="exists"):
        rec.save(path)
    rec.save(path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["run.safetensors"]  # no temporary left


def test_select_by_phase_and_domain():
    rec = _record()
    layers, offsets = rec.select(phases=["decode"])
    assert offsets.tolist() == [0, 1, 3]  # one decode token of sequence 0, two of sequence 1
    assert np.array_equal(layers[0], rec.layers[0][[2, 5, 6]])
    layers, offsets = rec.select(domain="prose")
    assert offsets.tolist() == [0, 3]
    layers, offsets = rec.select(phases=["eval"])
    assert offsets.tolist() == [0] and layers[0].shape[0] == 0
    with pytest.raises(ConfigError, match="^phases must be among"):
        rec.select(phases=["train"])
    with pytest.raises(ConfigError, match="^domain must be one of"):
        rec.select(domain="legal")


@pytest.mark.parametrize("field", [f for f, (required, _) in HEADER_FIELDS.items() if required])
def test_missing_header_field_is_named(field):
    h = _header()
    del h[field]
    with pytest.raises(ConfigError, match=f"header field '{field}' missing") as err:
        check_header(h)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("format", "other"), ("version", 2), ("model", ""), ("num_experts", 0),
        ("num_experts", True), ("topk", 9), ("layers", [0, 0]), ("layers", []),
        ("router", 3), ("router_params", [1]), ("ep", 0), ("world_size", 1.5),
        ("phases", ["train"]), ("domains", ["a", "a"]), ("expert_bytes", 0),
        ("framework", 7), ("prompts", "x"),
    ],
)
def test_bad_header_values_are_named(field, value):
    with pytest.raises(ConfigError, match=f"header field '{field}' must be") as err:
        check_header(_header(**{field: value}))
    assert "\n" not in str(err.value)


def test_unknown_header_field_is_refused():
    with pytest.raises(ConfigError, match=re.escape("unknown header field(s) ['colour']")):
        check_header(_header(colour="red"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"offsets": np.array([0, 3, 6])}, "'layer.0' must be an integer [6, W]"),
        ({"offsets": np.array([1, 7])}, "'offsets' must be"),
        ({"phase": np.zeros(7, dtype=np.int8)}, "header field 'phases'"),
        ({"phase": np.full(7, 5, dtype=np.int8)}, "'phase' must be"),
        ({"seq_domain": np.array([2, 0], dtype=np.int16)}, "'seq_domain' must be"),
        ({"seq_rank": np.array([0], dtype=np.int16)}, "'seq_rank' must be"),
        ({"layers": {0: np.zeros((7, 2), dtype=np.int64)}}, "header field 'layers'"),
        ({"layers": {0: np.full((7, 2), 8), 1: np.zeros((7, 2), dtype=np.int64)}},
         "'layer.0' holds ids outside -1..7"),
    ],
)
def test_inconsistent_columns_are_named(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        _record(**change)
    assert "\n" not in str(err.value)


def test_bad_files_give_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        RoutingRecord.load(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ConfigError, match="not a safetensors file") as err:
        RoutingRecord.load(junk)
    assert "\n" not in str(err.value)
    from safetensors.numpy import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"offsets": np.array([0, 1])}, str(plain))
    with pytest.raises(ConfigError, match="no 'moebalance' header"):
        RoutingRecord.load(plain)
    bad = tmp_path / "bad.safetensors"
    save_file({"offsets": np.array([0, 1])}, str(bad), metadata={"moebalance": "{nope"})
    with pytest.raises(ConfigError, match="header is not JSON"):
        RoutingRecord.load(bad)
    extra = tmp_path / "extra.safetensors"
    rec = _record()
    rec.save(extra)
    from safetensors.numpy import load_file

    tensors = load_file(str(extra))
    tensors["mystery"] = np.zeros(3)
    save_file(tensors, str(extra), metadata={"moebalance": json.dumps(rec.header)})
    with pytest.raises(ConfigError, match="unknown tensor 'mystery'"):
        RoutingRecord.load(extra)


def test_record_path_and_find_domains(tmp_path):
    assert record_path(tmp_path / "r.safetensors", "topk", ["topk"]) == tmp_path / "r.safetensors"
    assert record_path(tmp_path / "r.safetensors", "laser", ["topk", "laser"]) == (
        tmp_path / "r.laser.safetensors"
    )
    texts = {"code": torch.tensor([1, 2, 3, 4, 5]), "prose": torch.tensor([9, 8, 7, 2, 3])}
    rows = [torch.tensor([2, 3, 4]), torch.tensor([8, 7]), torch.tensor([2, 3]), [6]]
    assert find_domains(rows, texts) == ["code", "prose", "code", None]
    # a match across int64 boundaries is not a match (1 << 8 spans two bytes of 1's value)
    assert find_domains([[256]], {"x": torch.tensor([1, 1])}) == [None]


# ----------------------------------------------------------------------------- collector


def test_collector_puts_left_padded_and_decoded_tokens_in_sequence_order():
    c = RoutingCollector(rank=3)
    c.label("code", [torch.tensor([5, 6])])
    c.label("prose", torch.tensor([[1, 2, 3, 4]]))  # a held-out row: the model reads [1, 2, 3]
    valid = np.array([[False, True, True], [True, True, True]])
    c.begin_step(valid, phase="prefill", inputs=np.array([[0, 5, 6], [1, 2, 3]]))
    # the frameworks' [S, B] order of the valid tokens: (s0,b1) (s1,b0) (s1,b1) (s2,b0) (s2,b1)
    c.add(0, np.array([[2, 5], [4, 0], [3, 6], [5, 1], [4, 7]]), order="sb")
    c.add(1, np.array([[2], [4], [3], [5], [4]]), order="sb", slot_to_expert=[7, 6, 5, 4, 3, 2])
    c.end_step()
    c.begin_step((2, 1), phase="decode", continues=True)
    c.add(0, np.array([[3, -1], [4, 0]]), order="sb")
    c.add(1, np.array([[0], [1]]), order="bs", slot_to_expert=[7, 6, 5, 4, 3, 2])
    c.end_step()
    c.router, c.router_params, c.num_experts, c.topk = "topk", {}, 8, 2
    rec = c.to_record({"model": "hand"})
    assert rec.offsets.tolist() == [0, 3, 7]
    assert rec.layers[0].tolist() == [[4, 0], [5, 1], [3, -1], [2, 5], [3, 6], [4, 7], [4, 0]]
    assert rec.layers[1][:, 0].tolist() == [3, 2, 7, 5, 4, 3, 6]  # through the slot map
    assert rec.phase.tolist() == [0, 0, 1, 0, 0, 0, 1]
    assert rec.sequence_domains() == ["code", "prose"] and rec.seq_rank.tolist() == [3, 3]
    assert rec.header["phases"] == ["prefill", "decode"]
    assert rec.header["domains"] == ["code", "prose"]
    with pytest.raises(ConfigError, match="continues=True needs the previous step's 4"):
        c.begin_step((4, 1), phase="decode", continues=True)
    with pytest.raises(ConfigError, match="^phase must be one of"):
        c.begin_step((2, 1), phase="train")


def test_collector_refuses_inconsistent_steps():
    c = RoutingCollector()
    c.begin_step((1, 2), phase="eval")
    c.add(0, np.array([[1], [2]]))
    with pytest.raises(RuntimeError, match="routed twice"):
        c.add(0, np.array([[1], [2]]))
    c.end_step()
    c.begin_step((1, 2), phase="eval")
    c.add(1, np.array([[1], [2]]))
    with pytest.raises(RuntimeError, match=r"routed MoE layers \[1\], earlier steps \[0\]"):
        c.end_step()
    c.begin_step((1, 2), phase="eval")
    c.add(0, np.array([[1]]))
    with pytest.raises(RuntimeError, match="routed 1 tokens, the step has 2 valid"):
        c.end_step()
    with pytest.raises(ConfigError, match="nothing was recorded"):
        RoutingCollector().to_record({"model": "x"})


# ----------------------------------------------------------------------------- with a model


def _expected_from_snapshots(snaps: list[dict]) -> dict:
    """Reassemble sequences from each call's own ``last_routing`` snapshots, written
    independently of the collector: explicit loops over the [S, B] rows."""
    seqs: list[dict] = []  # {"layers": {l: [ids...]}, "phase": [...]}
    open_rows: list[int] = []
    for snap in snaps:
        valid = snap["valid"]
        B, S = valid.shape
        if not snap["continues"]:
            open_rows = []
            for b in range(B):
                seqs.append({"layers": {}, "phase": []})
                open_rows.append(len(seqs) - 1)
        row_of = {}  # (s, b) -> row of the valid-rows decision
        i = 0
        for s in range(S):
            for b in range(B):
                if valid[b, s]:
                    row_of[(s, b)] = i
                    i += 1
        for b in range(B):
            seq = seqs[open_rows[b]]
            for s in range(S):
                if not valid[b, s]:
                    continue
                seq["phase"].append(snap["phase"])
                for layer, rows in snap["layers"].items():
                    seq["layers"].setdefault(layer, []).append(rows[row_of[(s, b)]])
    return seqs


def _collector_worker(rank, world, framework_name):
    from moebalance.corpus import default_corpus, heldout_sequences
    from moebalance.harness import get_framework
    from moebalance.harness.generate import measure
    from moebalance.harness.quality import heldout_quality
    from moebalance.model_config import load_model_config, trained_checkpoint
    from moebalance.runner import RouterRunner
    from moebalance.routing_record import PHASES, RoutingCollector, expert_bytes_of
    from moebalance.telemetry import MoERecorder

    framework = get_framework(framework_name)
    setup = framework.init_distributed(1, 60.0)
    checkpoint, config = trained_checkpoint("tiny-moe")
    cfg = load_model_config(config)
    model = framework.build_model(
        cfg, setup, router="topk", router_params=None, load_scope="local",
        dispatcher=framework.dispatchers[0], checkpoint=str(checkpoint),
    )
    recorder = MoERecorder(setup.device, nvtx_ranges=False)
    framework.instrument(model, recorder)
    collector = RoutingCollector(rank=setup.rank)
    collector.attach(model, recorder)

    # the reference: after every call, each runner's own last decision (valid rows, [S, B])
    snaps: list[dict] = []
    state = {"warmup": False}
    original_begin = recorder.begin_step

    def begin_step(phase, *, warmup=False):
        state["warmup"] = warmup
        return original_begin(phase, warmup=warmup)

    recorder.begin_step = begin_step

    def snapshot(module, args, kwargs, output):
        context = kwargs.get("inference_context")
        pad = kwargs.get("padding_mask")
        ids = args[0]
        cont = context is not None and context.sequence_len_offset > 0
        runners = [m.runner for m in model.modules()
                   if isinstance(getattr(m, "runner", None), RouterRunner)]
        layers = {}
        for r in runners:
            rm = r.last_routing.routing_map.bool().cpu()
            layers[r.layer] = [sorted(torch.nonzero(row).ravel().tolist()) for row in rm]
        snaps.append({
            "valid": np.ones(tuple(ids.shape), bool) if pad is None else (~pad).cpu().numpy(),
            "continues": cont, "warmup": state["warmup"] and recorder.active,
            "phase": "decode" if cont else ("prefill" if context is not None else "eval"),
            "layers": layers,
        })

    model.register_forward_hook(snapshot, with_kwargs=True)  # after the collector's hooks

    corpus = default_corpus()
    eval_seqs = {d: heldout_sequences(corpus, d, 3, 24) for d in corpus.domains}
    for domain, rows in eval_seqs.items():
        collector.label(domain, rows)
    out = {"expert_bytes": expert_bytes_of(framework, model)}

    # 1. held-out evaluation, vanilla top-k
    heldout_quality(model, eval_seqs, setup.device, chunk=2)
    out["eval_topk"] = (collector.payload(), [s for s in snaps if not s["warmup"]])
    collector.clear()
    snaps.clear()

    # 2. a generation with a warm-up: left-padded prompts of different lengths
    prompts = [corpus.heldout["prose"][100:112].long(), corpus.heldout["code"][50:57].long()]
    S = max(len(p) for p in prompts)
    ids = torch.zeros(2, S, dtype=torch.long)
    pad = torch.ones(2, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = p
        pad[b, S - len(p):] = False
    collector.label("prose", [prompts[0]])
    collector.label("code", [prompts[1]])
    measure(framework, model, ids, pad, gen_len=4, warmup=1, recorder=recorder)
    out["generate"] = (collector.payload(), [s for s in snaps if not s["warmup"]])
    out["warmup_calls"] = sum(s["warmup"] for s in snaps)
    collector.clear()
    snaps.clear()

    # 3. a router swapped in (new runners), whose tokens take a varying number of experts
    framework.swap_router(model, "expanded_drop", {"capacity_factor": 1.0}, "local")
    heldout_quality(model, eval_seqs, setup.device, chunk=3)
    out["eval_expanded"] = (collector.payload(), [s for s in snaps if not s["warmup"]])
    record = collector.to_record({"model": cfg.name, "framework": framework_name, "ep": 1})
    out["header"] = record.header
    out["phases"] = [PHASES[p] for p in np.unique(record.phase).tolist()]
    framework.destroy_distributed()
    return out


def _check(payload: dict, snaps: list[dict]) -> None:
    expected = _expected_from_snapshots(snaps)
    lengths = payload["lengths"].tolist()
    assert lengths == [len(s["phase"]) for s in expected]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    assert sorted(payload["layers"]) == sorted(expected[0]["layers"])
    for layer, ids in payload["layers"].items():
        for i, seq in enumerate(expected):
            got = ids[starts[i] : starts[i + 1]]
            want = seq["layers"][layer]
            assert [sorted(int(e) for e in row if e >= 0) for row in got] == want, (layer, i)
    from moebalance.routing_record import PHASES

    want_phase = [PHASES.index(p) for s in expected for p in s["phase"]]
    assert payload["phase"].tolist() == want_phase


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["megatron", "deepspeed"])
def test_collector_matches_each_routers_own_decisions(framework):
    (out,) = run_workers(_collector_worker, 1, framework, timeout_s=300)
    # held-out evaluation: 2 domains x 3 rows of 25 tokens, the model reads 24 of each
    payload, snaps = out["eval_topk"]
    assert payload["lengths"].tolist() == [24] * 6
    assert payload["domains"] == ["code"] * 3 + ["prose"] * 3
    assert payload["router"] == "topk" and payload["topk"] == 2 and payload["num_experts"] == 8
    assert all(v.shape[1] == 2 and (v >= 0).all() for v in payload["layers"].values())
    _check(payload, snaps)
    # generation: prefill of 12 and 7 real tokens, then 3 decode steps; warm-up left out
    payload, snaps = out["generate"]
    assert out["warmup_calls"] == 4  # the warm-up generation's 4 calls were seen, not kept
    assert payload["lengths"].tolist() == [12 + 3, 7 + 3]
    assert payload["domains"] == ["prose", "code"]
    assert payload["phase"].tolist() == [0] * 12 + [1] * 3 + [0] * 7 + [1] * 3
    _check(payload, snaps)
    # a swapped-in router with a varying number of experts per token
    payload, snaps = out["eval_expanded"]
    assert payload["router"] == "expanded_drop"
    counts = [int((row >= 0).sum()) for v in payload["layers"].values() for row in v]
    assert len(set(counts)) > 1  # expert choice with capacity: not k per token
    _check(payload, snaps)
    assert out["header"]["router"] == "expanded_drop" and out["header"]["framework"] == framework
    assert out["header"]["router_params"]["capacity_factor"] == 1.0
    assert out["phases"] == ["eval"]
    assert out["expert_bytes"] > 0
