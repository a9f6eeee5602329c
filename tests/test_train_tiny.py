"""scripts/train_tiny.py and the trained checkpoint it ships (moebalance/checkpoints/tiny-moe): training
lowers the loss, the shipped checkpoint reproduces its model card, its routing depends on the
domain, and infer.py refuses a missing or mismatched checkpoint with a one-line error (exit 2).

Three subprocess launches (Megatron needs its own process group): a short training run on a tiny
corpus and model (~20 s), a held-out evaluation of the shipped checkpoint (~15 s), and the
option errors (a few seconds each, no process group).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train_tiny.py"
INFER = ROOT / "scripts" / "infer.py"
SHIPPED = ROOT / "moebalance" / "checkpoints" / "tiny-moe"

TINY_MODEL = """name: test-moe
vocab_size: 256
hidden_size: 32
num_layers: 2
num_attention_heads: 2
ffn_hidden_size: 64
num_experts: 4
topk: 2
max_sequence_length: 64
"""


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(*command: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )


def _train_tiny(tmp_path: Path, out: Path, steps: int) -> dict:
    """Train the tiny test model on a two-domain folder corpus; returns metrics.json."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    words = "the router sends each token to two experts and the load is uneven".split()
    (corpus / "prose.txt").write_text(
        "\n\n".join(" ".join(words[i % 7 :] + words[: i % 7]) * 40 for i in range(30))
    )
    (corpus / "code.txt").write_text(
        "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 3}\n" * 60 for i in range(30))
    )
    config = tmp_path / "model.yaml"
    config.write_text(TINY_MODEL)
    done = _run(
        str(TRAIN), "--config", str(config), "--corpus", str(corpus), "--out", str(out),
        "--steps", str(steps), "--batch", "4", "--seq-len", "32", "--warmup", "2",
        "--eval-seqs", "2", "--threads", "1", "--log-every", "100",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def test_training_reduces_loss_deterministically(tmp_path):
    metrics = _train_tiny(tmp_path, tmp_path / "out", 12)
    losses = metrics["loss_curve"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert set(metrics["heldout"]) == {"prose", "code"}
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and (out / "MODEL_CARD.md").is_file()
    # same seed, same run: identical losses and held-out figures
    again = _train_tiny(tmp_path, tmp_path / "again", 12)
    assert again["loss_curve"] == losses
    assert again["heldout"]["code"]["perplexity"] == metrics["heldout"]["code"]["perplexity"]


EVAL_SHIPPED = """
import json, sys, torch
from megatron_patch.model import build_model, init_distributed, destroy_distributed
from megatron_patch.quality import record_expert_loads
from moebalance.harness.quality import evaluate, quality_from_sums
from moebalance.corpus import default_corpus, heldout_sequences
from moebalance.model_config import load_model_config, trained_checkpoint
torch.set_num_threads(2)
ckpt, config = trained_checkpoint()
metrics = json.loads((ckpt.parent / "metrics.json").read_text())
init_distributed(1)
model = build_model(load_model_config(config), ep_size=1, router="topk", checkpoint=ckpt)
corpus = default_corpus()
out = {}
for d in corpus.domains:
    seqs = heldout_sequences(corpus, d, metrics["eval_seqs"], metrics["eval_len"])
    with record_expert_loads(model) as loads:
        q = quality_from_sums(evaluate(model, seqs))
    q["loads"] = {k: (v / v.sum()).tolist() for k, v in loads.items()}
    out[d] = q
destroy_distributed()
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def shipped_eval():
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.fail(f"{SHIPPED}/model.safetensors missing: run scripts/train_tiny.py")
    done = _run("-c", EVAL_SHIPPED)
    assert done.returncode == 0, done.stderr[-4000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_shipped_checkpoint_reproduces_its_model_card(shipped_eval):
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    for domain, got in shipped_eval.items():
        m = re.search(rf"^\| {domain} \| ([0-9.]+) \| ([0-9.]+) \|", card, re.M)
        assert m, f"no {domain} row in the model card"
        assert f"{got['perplexity']:.3f}" == m.group(1), (domain, got["perplexity"], m.group(1))
        assert f"{got['accuracy']:.4f}" == m.group(2), (domain, got["accuracy"], m.group(2))


def test_routing_differs_between_domains(shipped_eval):
    prose, code = shipped_eval["prose"]["loads"], shipped_eval["code"]["loads"]
    distances = []
    for layer in prose:
        # total variation distance between the two domains' expert load shares
        distances.append(0.5 * sum(abs(a - b) for a, b in zip(prose[layer], code[layer])))
    assert max(distances) > 0.05, distances
    # and trained routing is imbalanced: some layer's hottest expert is well above the mean
    loads = [max(v) * len(v) for d in ("prose", "code") for v in shipped_eval[d]["loads"].values()]
    assert max(loads) > 1.3, loads


def _infer_error(*args: str) -> str:
    done = _run(str(INFER), *args, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    line = _infer_error("--checkpoint", str(tmp_path / "nope.safetensors"))
    assert "nope.safetensors not found" in line


def test_mismatched_checkpoint_is_a_one_line_error(tmp_path):
    config = tmp_path / "wide.yaml"
    text = (SHIPPED / "config.yaml").read_text()
    config.write_text(re.sub(r"num_experts: \d+", "num_experts: 16", text))
    line = _infer_error("--config", str(config), "--checkpoint", str(SHIPPED / "model.safetensors"))
    assert "experts per layer" in line and "num_experts=16" in line
    config.write_text(re.sub(r"hidden_size: \d+", "hidden_size: 96", text))
    line = _infer_error("--config", str(config), "--checkpoint", str(SHIPPED / "model.safetensors"))
    assert "has shape" in line and "expects" in line
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    line = _infer_error("--checkpoint", str(bad))
    assert "not a readable safetensors file" in line
