"""scripts/infer.py with an injected failure, for tests/test_faults.py (not a test module).

Runs ``infer.entry()`` with the command-line options given. Every rank prints timestamped
markers on stderr, which the tests wait for and time from (``time.time()``, seconds)::

    infer_fault: rank R group up at T        process group started, before the option check
    infer_fault: rank R generation N at T    generation N (1-based, warm-ups included) begins

On the rank named by FAIL_RANK (none when unset), FAIL_MODE chooses the failure:

- ``raise`` (the default): the second generation raises RuntimeError("injected failure");
- ``hang``: the second generation sleeps an hour (a frozen rank), after printing
  ``infer_fault: rank R frozen at T``, while the other ranks wait inside a collective.

FAIL_AT=N moves the failure to generation N (default 2: the measured one after one warm-up).
Launched as plain processes (RANK, WORLD_SIZE, ... set by the test) so that no torchrun agent
tears the survivors down: they must exit on their own, through the collective timeout or the
closed connection; or under torchrun, which must end the job.
"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import infer  # noqa: E402
from moebalance.harness import generate as harness_generate  # noqa: E402

RANK = os.environ.get("RANK", "0")


def mark(what: str) -> None:
    print(f"infer_fault: rank {RANK} {what} at {time.time():.3f}", file=sys.stderr, flush=True)


calls = []
real_generate = harness_generate.generate
failing = RANK == os.environ.get("FAIL_RANK")
fail_at = int(os.environ.get("FAIL_AT", "2"))


def generate(*args, **kwargs):
    calls.append(1)
    mark(f"generation {len(calls)}")
    if failing and len(calls) == fail_at:
        if os.environ.get("FAIL_MODE", "raise") == "hang":
            mark("frozen")
            time.sleep(3600)
        raise RuntimeError("injected failure")
    return real_generate(*args, **kwargs)


harness_generate.generate = generate  # what harness.generate.measure calls

real_agree = infer.agree_across_ranks


def agree_across_ranks(run):
    mark("group up")
    return real_agree(run)


infer.agree_across_ranks = agree_across_ranks  # called right after the process group starts

sys.argv = ["infer.py", *sys.argv[1:]]
sys.exit(infer.entry())
