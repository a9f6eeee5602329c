"""``infer.py --record-routing`` end to end (2 ranks, gloo, --compare): one record per router
whose per-token expert choices reproduce the run's own per-expert token counts, then
``scripts/locality.py`` over both records; and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from moebalance.routing_record import PHASES, RoutingRecord

ROOT = Path(__file__).resolve().parents[1]


def test_record_routing_matches_the_runs_loads_and_feeds_locality(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    out, record = tmp_path / "run.json", tmp_path / "r.safetensors"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "scripts" / "infer.py"), "--router", "token_drop", "--compare",
         "--router-args", "capacity_factor=1.0", "--batch", "2", "--prompt-len", "32",
         "--gen-len", "4", "--eval-seqs", "1", "--eval-len", "64", "--record-routing",
         str(record), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    for run in report["runs"]:
        rec = RoutingRecord.load(tmp_path / f"r.{run['router']}.safetensors")
        assert rec.header["router"] == run["router"] and rec.header["ep"] == 2
        assert sorted(set(rec.seq_rank.tolist())) == [0, 1]
        assert set(rec.phase.tolist()) == {PHASES.index(p) for p in ("prefill", "decode", "eval")}
        lengths = np.diff(rec.offsets)
        generated = [n for n, first in zip(lengths, rec.offsets[:-1])
                     if rec.phase[first] == PHASES.index("prefill")]
        assert generated == [32 + 4 - 1] * 4  # 2 prompts per rank: prompt + decoded tokens
        for layer in range(4):  # the recorded choices are what the experts received
            ids = rec.layers[layer][rec.phase == PHASES.index("prefill")]
            ids = ids[ids >= 0]  # dropped assignments are padded with -1
            counts = np.bincount(ids.ravel(), minlength=8)
            expected = np.zeros(8, dtype=np.int64)
            for r in run["records"]:
                if r["phase"] == "prefill" and r["layer"] == layer:
                    expected[r["local_experts"]] += r["tokens_per_expert"]
            assert counts.tolist() == expected.tolist(), (run["router"], layer)
    loc = tmp_path / "loc.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "locality.py"), str(tmp_path / "r.topk.safetensors"),
         str(tmp_path / "r.token_drop.safetensors"), "--out", str(loc)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert loc.is_file() and loc.with_suffix(".md").is_file()
