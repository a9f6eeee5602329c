"""The installed package carries what the harness needs without a source checkout: model, run
and grid presets, every shipped trained checkpoint with its calibrated LASER file and the
workload profiles (package data), and the wheel's packages import without the test tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the source (setuptools writes build/ beside it)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("moebalance", "megatron_patch", "deepspeed_patch"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (path,) = out.glob("moebalance-*.whl")
    return path


def test_wheel_ships_presets_checkpoint_and_profiles(wheel):
    from moebalance.harness.config import run_config_presets
    from moebalance.model_config import model_config_presets, trained_checkpoints

    assert {"tiny-moe", "fine-moe"} <= set(trained_checkpoints())

    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = [
        *(p.relative_to(ROOT) for p in model_config_presets().values()),
        *(p.relative_to(ROOT) for p in run_config_presets().values()),
        *(p.relative_to(ROOT) for p in (ROOT / "moebalance" / "checkpoints").rglob("*")
          if p.is_file() and "__pycache__" not in p.parts),
        Path("moebalance/configs/grids/quality.yaml"),
        Path("moebalance/workload_profiles.json"),
    ]
    assert len(wanted) > 8
    missing = [str(p) for p in wanted if str(p) not in names]
    assert not missing, missing
    for package in ("moebalance/harness/__init__.py", "megatron_patch/harness.py",
                    "deepspeed_patch/harness.py", "moebalance/policies/laser_routing/__init__.py"):
        assert package in names


def test_installed_wheel_finds_its_presets_outside_the_checkout(wheel, tmp_path):
    """Unpacked in a folder of its own (what an install puts on sys.path), run from elsewhere."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import moebalance, moebalance.model_config as m, moebalance.harness.config as h;"
        "from moebalance.workloads import get_preset;"
        f"assert moebalance.__file__.startswith({str(site)!r}), moebalance.__file__;"
        "assert {'tiny', 'tiny-wide'} <= set(m.model_config_presets());"
        "assert 'demo' in h.run_config_presets();"
        "ckpt, cfg = m.trained_checkpoint(); assert ckpt.is_file() and cfg.is_file();"
        "assert {'tiny-moe', 'fine-moe'} <= set(m.trained_checkpoints());"
        "assert all(h.calibrated_laser_file(str(m.trained_checkpoint(n)[0])) is not None"
        " for n in ('tiny-moe', 'fine-moe'));"
        "m.load_model_config('tiny'); get_preset('olmoe'); print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
