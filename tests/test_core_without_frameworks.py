"""The framework-free core is tested without megatron-core or DeepSpeed.

Runs the policy test files in a fresh pytest process where any import of ``megatron`` or
``deepspeed`` raises ImportError (a ``-p`` plugin installs a ``sys.meta_path`` blocker before
collection), and checks they all pass with nothing skipped: a core test that needs a framework
fails here instead of being skipped where the framework is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_TEST_FILES = [
    "tests/test_policies.py", "tests/test_laser.py", "tests/test_capacity.py",
    "tests/test_metrics.py", "tests/test_runner.py", "tests/test_weights.py",
    "tests/test_parallel.py", "tests/test_skew.py", "tests/test_config_errors.py",
    "tests/test_model_config.py", "tests/test_telemetry_stats.py", "tests/test_quantize.py",
]
BLOCKED = ("megatron", "deepspeed")

BLOCKER = textwrap.dedent(
    f'''
    """pytest plugin: megatron and deepspeed cannot be imported in this process."""
    import sys

    BLOCKED = {BLOCKED!r}
    ATTEMPTS = []


    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                ATTEMPTS.append(name)
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None


    for _name in list(sys.modules):
        if _name.partition(".")[0] in BLOCKED:
            del sys.modules[_name]
    sys.meta_path.insert(0, _Blocker())


    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line(
            f"blocked: {{', '.join(BLOCKED)}}; import attempts: {{sorted(set(ATTEMPTS))}}"
        )
    '''
)


def _env(plugin_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_dir), env.get("PYTHONPATH")]))
    env["HYP_EXAMPLES"] = "3"  # the property tests' invariants, not their search, are the point
    return env


def test_core_tests_pass_with_megatron_and_deepspeed_blocked(tmp_path):
    (tmp_path / "block_frameworks.py").write_text(BLOCKER)
    env = _env(tmp_path)
    # the blocker works: importing either framework fails in such a process
    for name in ("megatron.core", "deepspeed"):
        probe = subprocess.run(
            [sys.executable, "-c", f"import block_frameworks, {name}"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        assert probe.returncode != 0 and "(blocked)" in probe.stderr, probe.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "-p", "block_frameworks", *CORE_TEST_FILES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "blocked: megatron, deepspeed; import attempts:" in out  # the plugin was loaded
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, out[-3000:]
