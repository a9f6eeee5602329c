"""Faults in an expert-parallel scripts/infer.py job end it non-zero, in bounded time, with no
process left behind.

Each test launches ``tests/infer_fault.py`` (``infer.entry()`` with injected failures and
timestamped stderr markers) on the tiny trained model at the smallest shapes, either as plain
processes (RANK / WORLD_SIZE set here: the survivors must exit on their own, no launcher tears
them down) or under ``torchrun --standalone``. Every test asserts a non-zero exit within a
stated bound and that no process survives: no child of the launcher, and no process whose
command line holds the test's own output path (unique per test, under ``tmp_path``).

Bounds are measured from a marker the processes print (``time.time()``), so the import time
of 2-4 ranks on 2 shared cores (5-30 s, depending on what else runs) does not count; each has a
few seconds of slack for that contention and says what it would catch.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FAULT = ROOT / "tests" / "infer_fault.py"
SMALL = ["--batch", "2", "--prompt-len", "8", "--eval-seqs", "0", "--warmup", "0"]
START_S = 120  # the most any launch may take to reach its first marker (imports, rendezvous)
# non-greedy, and every match of a line: ranks writing at once can share one stderr line
MARK = re.compile(r"infer_fault: rank (\d+) (.+?) at (\d+\.\d+)")


class Launched:
    """One process (a rank, or torchrun) with its stderr read line by line in the background."""

    def __init__(self, command: list[str], env: dict, **popen):
        self.proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, **popen,
        )
        self.lines: list[str] = []
        self.ended: Optional[float] = None  # time.time() when its exit was seen
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def err(self) -> str:
        return "\n".join(self.lines)

    def marker(self, rank: int, what: str) -> Optional[float]:
        """When rank ``rank`` printed ``what`` (None: not yet)."""
        for line in list(self.lines):
            for m in MARK.finditer(line):
                if int(m[1]) == rank and m[2] == what:
                    return float(m[3])
        return None

    def wait_marker(self, rank: int, what: str, timeout: float = START_S) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at = self.marker(rank, what)
            if at is not None:
                return at
            if self.proc.poll() is not None:
                self._reader.join(5)
                at = self.marker(rank, what)
                if at is not None:
                    return at
                pytest.fail(f"exited {self.proc.returncode} before '{what}':\n{self.err[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"no '{what}' from rank {rank} within {timeout} s:\n{self.err[-3000:]}")

    def wait(self, timeout: float) -> int:
        """The exit status; fails the test if the process is still running after ``timeout``."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout:.0f} s:\n{self.err[-3000:]}")
        self.ended = time.time()
        self._reader.join(10)
        return self.proc.returncode


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT",
                 "FAIL_RANK", "FAIL_MODE", "FAIL_AT"):
        if name not in extra:
            env.pop(name, None)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(
    world: int, args_of_rank, *, ranks=None, preexec_fn=None, **extra: str
) -> list[Launched]:
    """Ranks ``ranks`` (default: all) of a ``world``-rank job as plain processes; rank r runs
    ``infer_fault.py`` with ``args_of_rank(r)``."""
    port = str(_port())
    return [
        Launched(
            [sys.executable, str(FAULT), *args_of_rank(rank)],
            _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                 LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra),
            preexec_fn=preexec_fn,
        )
        for rank in (range(world) if ranks is None else ranks)
    ]


def _torchrun(nproc: int, args: list[str], **extra: str) -> Launched:
    return Launched(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(nproc), str(FAULT), *args],
        _env(**extra),
    )


def _descendants(launched: list[Launched]) -> list[psutil.Process]:
    found = []
    for item in launched:
        try:
            found += psutil.Process(item.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _holding(path: Path) -> list[psutil.Process]:
    """Live processes whose command line mentions ``path``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(path) in part for part in proc.info["cmdline"] or ()) and _alive(proc):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_no_orphans(out: Path, children: list[psutil.Process], grace_s: float = 10) -> None:
    """Within ``grace_s``: every process recorded as a launcher's child has ended, and no live
    process's command line holds ``out``."""
    deadline = time.monotonic() + grace_s
    while True:
        left = [p for p in children if _alive(p)] + _holding(out)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"orphans left: {[(p.pid, p.cmdline()) for p in left if _alive(p)]}"


@pytest.fixture
def reap():
    """Registers launches; kills whatever is still running at the end of the test (so that a
    failing test leaves nothing behind either)."""
    launched: list[Launched] = []
    yield launched
    for proc in _descendants(launched):
        if _alive(proc):
            proc.kill()
    for item in launched:
        if item.proc.poll() is None:
            item.proc.kill()
            item.proc.wait()


def _one_error_line(err: str) -> str:
    """The one line of ``err`` that reports an error (a traceback fails)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------- a frozen rank

FROZEN_TIMEOUT_S = 8
# The survivor waits in a collective from about the moment rank 1 freezes; it must exit within
# --timeout, plus 6 s for the forward pass it may still be running then and CPU contention
# (under twice the timeout, which a doubled wait would take).
# Before the fix DeepSpeed's EP groups kept torch's 30-minute default (a hang).
FROZEN_BOUND_S = FROZEN_TIMEOUT_S + 6


@pytest.mark.parametrize("framework", ["megatron", "deepspeed"])
def test_frozen_rank_ends_the_job_within_the_timeout(tmp_path, reap, framework):
    """Rank 1 freezes in its generation while rank 0 waits in a collective: rank 0 exits 1 with
    gloo's timeout message within --timeout of the freeze (not twice it, not a hang)."""
    out = tmp_path / "frozen.json"
    ranks = _plain(
        2,
        lambda rank: ["--framework", framework, "--router", "laser", *SMALL, "--gen-len", "3",
                      "--timeout", str(FROZEN_TIMEOUT_S), "--out", str(out)],
        FAIL_RANK="1", FAIL_MODE="hang", FAIL_AT="1",
    )
    reap += ranks
    frozen = ranks[1].wait_marker(1, "frozen")
    code = ranks[0].wait(FROZEN_BOUND_S + 30)
    waited = ranks[0].ended - frozen
    print(f"{framework}: rank 0 exited {waited:.1f} s after rank 1 froze")
    assert code == 1 and "rank 0 failed" in ranks[0].err, ranks[0].err[-3000:]
    assert "timed out" in ranks[0].err.lower(), ranks[0].err[-3000:]
    assert waited < FROZEN_BOUND_S, f"rank 0 exited {waited:.1f} s after rank 1 froze"
    # rank 1 is frozen for an hour: nobody but a launcher would end it (torchrun does)
    ranks[1].proc.kill()
    ranks[1].wait(10)
    assert_no_orphans(out, [])
    # rank 0 claimed its output at start; no router finished, so it holds no run
    claimed = json.loads(out.read_text())
    assert claimed["partial"] is True and claimed["runs"] == []


# ---------------------------------------------------------------------------- a rank raising

# With --timeout 60 a survivor that only stopped at the timeout would take 60 s: it must exit
# within 15 s of the failing rank's failure (the closed connection), slack for contention.
RAISE_BOUND_S = 15


@pytest.mark.parametrize("fail_rank", [1, 0])
def test_failing_rank_does_not_leave_the_others_hanging(tmp_path, reap, fail_rank):
    """Rank ``fail_rank`` (1, or rank 0: the one that writes) raises in its generation while
    the other is inside a collective: both exit 1, the survivor at once, not at --timeout."""
    out = tmp_path / "raise.json"
    ranks = _plain(
        2,
        lambda rank: ["--router", "laser", *SMALL, "--gen-len", "3", "--timeout", "60",
                      "--out", str(out)],
        FAIL_RANK=str(fail_rank), FAIL_MODE="raise", FAIL_AT="1",
    )
    reap += ranks
    failed_at = ranks[fail_rank].wait_marker(fail_rank, "generation 1")
    survivor = ranks[1 - fail_rank]
    assert survivor.wait(RAISE_BOUND_S + 30) == 1, survivor.err[-3000:]
    print(f"rank {1 - fail_rank} exited {survivor.ended - failed_at:.1f} s after the failure")
    assert survivor.ended - failed_at < RAISE_BOUND_S
    assert ranks[fail_rank].wait(30) == 1
    assert "injected failure" in ranks[fail_rank].err
    assert f"rank {1 - fail_rank} failed" in survivor.err, survivor.err[-3000:]
    assert_no_orphans(out, [])
    claimed = json.loads(out.read_text())
    assert claimed["partial"] is True and claimed["runs"] == []


# --------------------------------------------------------------------- SIGKILL under torchrun

# torchrun notices a dead worker within its monitor interval (0.1 s), sends the others SIGTERM
# and exits 1: 20 s after the kill leaves slack for 4 ranks on 2 busy cores.
KILL_BOUND_S = 20


@pytest.mark.parametrize("nproc", [2, 4])
def test_sigkill_of_a_worker_ends_the_torchrun_job(tmp_path, reap, nproc):
    """SIGKILL of the last rank mid-generation (a long generation, killed once it began):
    torchrun ends the job non-zero within KILL_BOUND_S, and none of its workers survives."""
    out = tmp_path / f"killed{nproc}.json"
    victim = nproc - 1
    job = _torchrun(
        nproc, ["--router", "laser", *SMALL, "--gen-len", "400", "--timeout", "60",
                "--out", str(out)],
    )
    reap.append(job)
    job.wait_marker(victim, "generation 1")
    workers = _descendants([job])
    targets = [p for p in workers if p.environ().get("RANK") == str(victim)]
    assert len(targets) == 1, [(p.pid, p.cmdline()) for p in workers]
    targets[0].send_signal(signal.SIGKILL)
    killed = time.time()
    code = job.wait(KILL_BOUND_S + 30)
    print(f"EP {nproc}: torchrun exited {code} {job.ended - killed:.1f} s after the SIGKILL")
    assert code != 0, job.err[-3000:]
    assert job.ended - killed < KILL_BOUND_S, f"torchrun took {job.ended - killed:.1f} s"
    # torchrun reports the job failed; which rank it names first depends on who it saw first:
    # the killed one (SIGKILL) or a survivor whose collective broke with the dead connection
    assert "ChildFailedError" in job.err, job.err[-3000:]
    assert_no_orphans(out, workers)


# ---------------------------------------------------------------------------- rendezvous

RENDEZVOUS_TIMEOUT_S = 5
# from rank 0's start: imports (START_S covers the worst) plus the rendezvous timeout
RENDEZVOUS_BOUND_S = START_S + RENDEZVOUS_TIMEOUT_S


def test_a_rank_that_never_starts_fails_rendezvous_with_one_line(tmp_path, reap):
    """A world of 2 where rank 1 never starts: rank 0 exits 1 after --timeout with one line
    naming the world, the address and the timeout (no traceback), not a hang."""
    out = tmp_path / "alone.json"
    ranks = _plain(
        2, lambda rank: [*SMALL, "--gen-len", "3", "--timeout", str(RENDEZVOUS_TIMEOUT_S),
                         "--out", str(out)],
        ranks=[0],
    )
    reap += ranks
    started = time.monotonic()
    assert ranks[0].wait(RENDEZVOUS_BOUND_S) == 1, ranks[0].err[-3000:]
    assert time.monotonic() - started > RENDEZVOUS_TIMEOUT_S  # it did wait for rank 1
    line = _one_error_line(ranks[0].err)
    assert "process group of 2 ranks" in line and "did not start within --timeout 5 s" in line
    assert ranks[0].marker(0, "group up") is None
    assert_no_orphans(out, [])


# ---------------------------------------------------------------------------- the result write

# Results past this size cannot be written (RLIMIT_FSIZE, as `ulimit -f 16`): any report is
# larger, the earlier file (not rewritten) and the output claim's probe are not.
FSIZE_LIMIT = 16 * 1024


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def test_a_failed_result_write_keeps_the_earlier_file(tmp_path, reap):
    """The disk fills during the write (file-size limit, EFBIG) with an earlier results file at
    --out and --overwrite: rank 0 exits 1 (rank 1 too, at its teardown barrier), the earlier
    file is byte for byte what it was, and no temporary file is left beside it."""
    out = tmp_path / "results.json"
    earlier = json.dumps({"command": ["earlier run"], "partial": False, "runs": [{"router": "x"}]})
    out.write_text(earlier)
    ranks = _plain(
        2, lambda rank: ["--router", "laser", *SMALL, "--gen-len", "3", "--timeout", "60",
                         "--out", str(out), "--overwrite"],
        preexec_fn=_limit_file_size,
    )
    reap += ranks
    up = ranks[0].wait_marker(0, "group up")
    codes = [r.wait(60) for r in ranks]
    assert codes == [1, 1], [r.err[-2000:] for r in ranks]
    assert max(r.ended for r in ranks) - up < 60  # the model work, then a failure at once
    assert "File too large" in ranks[0].err, ranks[0].err[-3000:]
    assert out.read_text() == earlier
    assert json.loads(out.read_text())["runs"] == [{"router": "x"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    assert_no_orphans(out, [])


# ---------------------------------------------------------------------------- mismatched options

# the option check is the first collective after the process group starts: both ranks exit 2
# within 10 s of it (--timeout 60 would be the alternative)
MISMATCH_BOUND_S = 10


@pytest.mark.parametrize(
    "option, values, extra",
    [("--gen-len", ("3", "4"), []), ("--batch", ("2", "3"), ["--dispatcher", "allgather"])],
)
def test_ranks_started_with_different_options_exit_2_naming_it(
    tmp_path, reap, option, values, extra
):
    out = tmp_path / "mismatch.json"
    base = {"--batch": "2", "--gen-len": "3"}
    ranks = _plain(
        2,
        lambda rank: [
            "--router", "laser", "--prompt-len", "8", "--eval-seqs", "0", "--warmup", "0",
            *[x for k, v in {**base, option: values[rank]}.items() for x in (k, v)],
            *extra, "--timeout", "60", "--out", str(out),
        ],
    )
    reap += ranks
    up = min(ranks[r].wait_marker(r, "group up") for r in range(2))
    assert [r.wait(MISMATCH_BOUND_S + 30) for r in ranks] == [2, 2]
    print(f"{option}: both exited {max(r.ended for r in ranks) - up:.1f} s after the group start")
    assert max(r.ended for r in ranks) - up < MISMATCH_BOUND_S
    line = _one_error_line(ranks[0].err)
    assert line.startswith("infer.py: error: ranks were started with different options: ")
    assert f"{option} is {values[0]} on rank 0 but {values[1]} on rank 1" in line, line
    assert "infer.py: error" not in ranks[1].err and "Traceback" not in ranks[1].err  # once
    assert_no_orphans(out, [])
