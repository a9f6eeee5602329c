"""The DeepSpeed path needs no Megatron: ``deepspeed_patch`` imports neither ``megatron_patch``
nor megatron-core, and ``scripts/infer.py --framework deepspeed`` runs end to end with both
blocked from import.

The block: a temporary directory on PYTHONPATH holding a ``sitecustomize.py`` that puts a
``sys.meta_path`` finder first, raising ImportError for ``megatron`` and ``megatron_patch`` (and
their submodules), in every process torchrun starts. Two launches at 2 ranks (gloo): LASER vs
vanilla on the OLMoE-skewed random model (the skew calibrated on the DeepSpeed model itself),
and on the default trained checkpoint with held-out quality (``--eval-seqs 1``).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
INFER = ROOT / "scripts" / "infer.py"
BLOCKED = ("megatron", "megatron_patch")
LAUNCH_TIMEOUT_S = 300

SITECUSTOMIZE = f'''
import sys


class _BlockMegatron:
    """Refuses {BLOCKED} and their submodules, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: the DeepSpeed path must not import it")
        return None


sys.meta_path.insert(0, _BlockMegatron())
'''


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory):
    """The environment of a process in which Megatron cannot be imported."""
    block = tmp_path_factory.mktemp("block_megatron")
    (block / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(block), str(ROOT), env.get("PYTHONPATH")) if p
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(env, *args, timeout=LAUNCH_TIMEOUT_S):
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def test_no_megatron_import_statement_under_deepspeed_patch():
    for path in sorted((ROOT / "deepspeed_patch").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in BLOCKED, f"{path.name} imports {name}"


def test_the_block_works_and_every_deepspeed_patch_module_imports(blocked_env):
    modules = sorted(
        p.stem for p in (ROOT / "deepspeed_patch").glob("*.py") if p.stem != "__init__"
    )
    code = (
        "import importlib, sys\n"
        "for name in ('megatron', 'megatron.core', 'megatron_patch', 'megatron_patch.model'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    raise SystemExit(f'{name} imported despite the block')\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module('deepspeed_patch.' + name)\n"
        "import deepspeed_patch\n"
        "[getattr(deepspeed_patch, name) for name in deepspeed_patch.__all__]\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('megatron', 'megatron_patch')]\n"
    )
    _run(blocked_env, "-c", code, timeout=120)


def _infer(env, out, *args):
    _run(
        env, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(INFER),
        "--framework", "deepspeed", "--router", "laser", "--compare", *args, "--out", str(out),
    )
    report = json.loads(out.read_text())
    assert report["config"]["framework"] == "deepspeed"
    assert [run["router"] for run in report["runs"]] == ["topk", "laser"]
    for run in report["runs"]:
        assert run["records"], run["router"]
    return report


def test_infer_deepspeed_skewed_random_model_without_megatron(blocked_env, tmp_path):
    _infer(
        blocked_env, tmp_path / "skew.json",
        "--skew", "olmoe", "--batch", "2", "--prompt-len", "16", "--gen-len", "3",
        "--eval-seqs", "0",
    )


def test_infer_deepspeed_trained_checkpoint_with_quality_without_megatron(blocked_env, tmp_path):
    report = _infer(
        blocked_env, tmp_path / "trained.json",
        "--batch", "2", "--prompt-len", "16", "--gen-len", "3", "--eval-seqs", "1",
    )
    for run in report["runs"]:
        quality = run["quality"]["all"]
        assert quality["tokens"] > 0 and 1 < quality["perplexity"] < 256, run["router"]
