"""scripts/infer.py with an injected failure, for tests/test_infer.py (not a test module).

Runs ``infer.entry()`` with the command-line options given; on the rank named by the
FAIL_RANK environment variable the second generation (the measured one after one warm-up)
raises (FAIL_MODE=raise, the default) or hangs (FAIL_MODE=hang), while the other ranks are
inside collectives. Launched as plain processes (RANK,
WORLD_SIZE, ... set by the test) so that no torchrun agent tears the survivors down: they must
exit on their own, through the collective timeout or the closed connection.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import infer  # noqa: E402
from moebalance.harness import generate as harness_generate  # noqa: E402

if os.environ["RANK"] == os.environ["FAIL_RANK"]:
    calls = []
    real_generate = harness_generate.generate

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if os.environ.get("FAIL_MODE", "raise") == "hang":
                time.sleep(3600)
            raise RuntimeError("injected failure")
        return real_generate(*args, **kwargs)

    harness_generate.generate = generate  # what harness.generate.measure calls

sys.argv = ["infer.py", *sys.argv[1:]]
sys.exit(infer.entry())
