"""The SLURM batch files (scripts/slurm/) against a real single-node cluster on this machine.

``scripts/slurm/local_cluster.sh start`` brings up slurmctld, slurmd and munged on localhost
(installing Debian's slurm-wlm first when it is missing and apt can), with all state in a
temporary directory; the module stops it at the end. Jobs are real: sbatch, srun, torchrun
with a c10d rendezvous, scripts/infer.py on 2 CPU ranks (gloo); then scripts/sweep.py on a
one-run grid as a job, and its resume. Where slurm cannot be installed
or started the cluster tests are skipped with the script's reason (MOEB_REQUIRE_SLURM=1 turns
that into a failure).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "scripts" / "slurm"
INFER = SLURM / "infer.sbatch"
SWEEP = SLURM / "sweep.sbatch"
# The smallest run that still exercises prefill, decode and the all-to-all on 2 ranks.
TINY = ["--config", "tiny-moe", "--router", "expanded_drop", "--batch", "2", "--prompt-len", "16",
        "--gen-len", "2", "--warmup", "0", "--eval-seqs", "0"]
JOB_S = 180  # the most one tiny job may take on 2 shared cores


def clean_env(**extra: str) -> dict:
    """This environment less any SLURM job's variables (pytest may itself run inside a job),
    with the test's Python environment first on PATH (its torchrun)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "MOEB_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def read_env_file(path: Path) -> dict:
    """job.env's values as the shell reads them."""
    out = subprocess.run(["bash", "-c", 'set -a; source "$1"; env -0', "_", str(path)],
                         env={"PATH": os.environ["PATH"]}, capture_output=True, check=True)
    pairs = (item.split(b"=", 1) for item in out.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs}


def digest(folder: Path) -> dict:
    """Name -> content hash of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Cluster:
    def __init__(self, state: Path, work: Path):
        self.state = state
        self.work = work  # submit-time log folder and MOEB_RUNS parent
        self.runs = work / "runs"
        self.env = clean_env(SLURM_CONF=str(state / "slurm.conf"), MOEB_RUNS=str(self.runs))

    def sbatch(self, script: Path, *args: str, options=(), wait=True, env=None):
        command = ["sbatch", "--parsable", "-o", str(self.work / "slurm-%x-%j.out"), *options]
        if wait:
            command.append("--wait")
        command += [str(script), *args]
        try:
            return subprocess.run(command, cwd=ROOT, env=env or self.env, capture_output=True,
                                  text=True, timeout=JOB_S)
        except subprocess.TimeoutExpired:
            subprocess.run(["scancel", "--name", "moeb-infer", "--name", "moeb-sweep"],
                           env=self.env, check=False)
            pytest.fail(f"{shlex.join(command)} did not finish within {JOB_S} s")

    def job(self, job_id: str) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env,
                             capture_output=True, text=True, check=True).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, timeout: float = JOB_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
                return info
            time.sleep(0.2)
        pytest.fail(f"job {job_id} did not end within {timeout} s")


def job_id_of(result: subprocess.CompletedProcess) -> str:
    m = re.match(r"(\d+)", result.stdout.strip())
    assert m, f"sbatch printed no job id: {result.stdout!r} {result.stderr!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Not under pytest's own temporary folder: munged wants every folder above its socket
    # searchable by all, and pytest's are private.
    state = Path(tempfile.mkdtemp(prefix="moeb-slurm-test-"))
    work = tmp_path_factory.mktemp("slurm-work")
    env = clean_env(MOEB_SLURM_DIR=str(state))
    script = str(SLURM / "local_cluster.sh")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                             timeout=600)
    if started.returncode != 0:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)
        lines = [ln for ln in started.stderr.splitlines() if ln.startswith("local_cluster.sh:")]
        reason = lines[-1] if lines else started.stderr.strip()[-300:]
        message = f"no local SLURM cluster (exit {started.returncode}): {reason}"
        if os.environ.get("MOEB_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    assert f"export SLURM_CONF={state}/slurm.conf" in started.stdout
    try:
        yield Cluster(state, work)
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        status = subprocess.run([script, "status"], env=env, capture_output=True, text=True)
        assert status.returncode == 4, status.stdout  # all daemons gone
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def first_run(cluster):
    """One tiny 2-rank run: sbatch --wait, CPU fallback (2 allocated cores -> 2 ranks)."""
    result = cluster.sbatch(INFER, *TINY, options=["-c", "2"])
    job_id = job_id_of(result)
    log = cluster.work / f"slurm-moeb-infer-{job_id}.out"
    folder = cluster.runs / f"moeb-infer-{job_id}"
    detail = (folder / "slurm.out").read_text() if (folder / "slurm.out").exists() else (
        log.read_text() if log.exists() else result.stderr)
    assert result.returncode == 0, detail
    return job_id, folder


def test_outside_a_job_it_says_to_use_sbatch():
    out = subprocess.run(["bash", str(INFER), *TINY], cwd=ROOT, env=clean_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "moeb-slurm: error: not inside a SLURM job (SLURM_JOB_ID is unset): submit this file with sbatch"]


def test_out_is_refused_before_anything_starts():
    out = subprocess.run(["bash", str(INFER), "--router", "topk", "--out=x.json"], cwd=ROOT,
                         env=clean_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "do not pass --out" in out.stderr


def test_infer_job_writes_its_run_folder(cluster, first_run):
    job_id, folder = first_run
    assert folder.is_dir(), sorted(p.name for p in cluster.runs.iterdir())
    assert {"infer.json", "job.env", "slurm.out"} <= {p.name for p in folder.iterdir()}

    report = json.loads((folder / "infer.json").read_text())
    assert report["partial"] is False
    assert report["environment"]["world_size"] == 2
    assert report["environment"]["ep_size"] == 2
    assert report["environment"]["backend"] == "gloo"
    (run,) = report["runs"]
    assert run["router"] == "expanded_drop"
    assert len(run["per_rank"]) == 2
    assert {r["rank"] for r in run["records"]} == {0, 1}
    assert all(r["generated_tokens"] > 0 for r in run["per_rank"])

    env = read_env_file(folder / "job.env")
    assert env["JOB_ID"] == job_id
    assert env["NODES"] == "1" and env["NPROC_PER_NODE"] == "2" and env["WORLD_SIZE"] == "2"
    assert env["GPUS_PER_NODE"] == "0" and env["DEVICE"] == "cpu"
    assert env["PARTITION"] == "debug"
    assert env["EXIT_CODE"] == "0"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|unknown", env["GIT_COMMIT"])
    command = shlex.split(env["COMMAND"])
    assert command[0] == "srun" and "--ntasks-per-node=1" in command
    torchrun = command[command.index("--kill-on-bad-exit=1") + 1:]
    assert Path(torchrun[0]).name == "torchrun"
    assert "--rdzv-backend=c10d" in torchrun and f"--rdzv-id={job_id}" in torchrun
    assert "--nnodes=1" in torchrun and "--nproc-per-node=2" in torchrun
    assert command[-len(TINY):] == TINY  # the arguments passed through, in order

    # The slurm log moved into the run folder, whole (it was linked before the job's output).
    log = (folder / "slurm.out").read_text()
    assert f"run folder: {folder.resolve()}" in log
    assert "infer.py: wrote" in log and "exit code 0" in log
    assert not (cluster.work / f"slurm-moeb-infer-{job_id}.out").exists()


def test_an_existing_run_folder_is_never_overwritten(cluster, first_run):
    first_id, first = first_run
    before = digest(first)
    held = cluster.sbatch(INFER, *TINY, options=["-c", "2", "--hold"], wait=False)
    assert held.returncode == 0, held.stderr
    job_id = job_id_of(held)
    taken = cluster.runs / f"moeb-infer-{job_id}"  # as if an earlier run had this name
    taken.mkdir()
    (taken / "infer.json").write_text('{"earlier": true}')
    subprocess.run(["scontrol", "release", job_id], env=cluster.env, check=True)
    info = cluster.wait(job_id)

    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert [p.name for p in taken.iterdir()] == ["infer.json"]
    assert (taken / "infer.json").read_text() == '{"earlier": true}'
    log = (cluster.work / f"slurm-moeb-infer-{job_id}.out").read_text()
    assert f"run folder {taken.resolve()} already exists" in log and "refusing to overwrite" in log
    assert digest(first) == before


def test_a_failing_launch_fails_the_job_in_its_own_folder(cluster, first_run):
    first_id, first = first_run
    before = digest(first)
    # A launcher that fails at once stands in for a failing run (no Python start-up to wait for).
    env = dict(cluster.env, MOEB_TORCHRUN="false")
    result = cluster.sbatch(INFER, *TINY, options=["-c", "2"], env=env)
    job_id = job_id_of(result)
    assert job_id != first_id
    assert result.returncode != 0
    folder = cluster.runs / f"moeb-infer-{job_id}"
    job_env = read_env_file(folder / "job.env")
    assert job_env["EXIT_CODE"] not in ("", "0")
    assert shlex.split(job_env["COMMAND"])[6] == "false"
    log = (folder / "slurm.out").read_text()
    assert f"exit code {job_env['EXIT_CODE']}" in log
    assert not (folder / "infer.json").exists()
    assert digest(first) == before


TINY_GRID = """\
base: {batch: 2, prompt_len: 16, gen_len: 2, warmup: 0, eval_seqs: 0, compare: false}
axes:
  nproc: [1]
  model: [tiny-moe]
  router: [{label: xdrop, router: expanded_drop}]
"""


@pytest.mark.skipif(not (ROOT / "scripts" / "sweep.py").exists(), reason="no scripts/sweep.py")
def test_sweep_job_runs_a_grid_and_resumes(cluster):
    grid = cluster.work / "tiny-grid.yaml"
    grid.write_text(TINY_GRID)
    result = cluster.sbatch(SWEEP, str(grid), "--no-plots", options=["-c", "2"])
    job_id = job_id_of(result)
    folder = cluster.runs / f"moeb-sweep-{job_id}"
    log = (folder / "slurm.out").read_text() if (folder / "slurm.out").exists() else result.stderr
    assert result.returncode == 0, log

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["partial"] is False and summary["failures"] == []
    assert summary["runs_planned"] == summary["runs_finished"] == 1
    assert {"summary.csv", "summary.md", "job.env", "slurm.out"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "plots").exists()  # --no-plots reached sweep.py
    (report_path,) = (folder / "runs").glob("*.json")
    report = json.loads(report_path.read_text())
    assert report["environment"]["world_size"] == 1  # the grid's nproc (2 ranks: the run above)
    assert len(report["runs"][0]["per_rank"]) == 1
    # The run was an srun step of this job's allocation, launched with its process count.
    launched = shlex.split((folder / "logs" / f"{report_path.stem}.log").read_text().splitlines()[0][2:])
    assert launched[0] == "srun" and "--standalone" in launched
    assert launched[launched.index("--nproc-per-node") + 1] == "1"
    job_env = read_env_file(folder / "job.env")
    assert job_env["JOB_ID"] == job_id and job_env["EXIT_CODE"] == "0"

    # Resume: a second job starting from the first one's folder skips the finished run and
    # leaves that folder as it was.
    before = digest(folder)
    env = dict(cluster.env, MOEB_SWEEP_FROM=str(folder))
    again = cluster.sbatch(SWEEP, str(grid), "--no-plots", options=["-c", "2"], env=env)
    second = cluster.runs / f"moeb-sweep-{job_id_of(again)}"
    assert again.returncode == 0, (second / "slurm.out").read_text()
    assert "1 of 1 runs already finished" in (second / "slurm.out").read_text()
    assert json.loads((second / "summary.json").read_text())["runs_finished"] == 1
    assert (second / "runs" / report_path.name).read_bytes() == report_path.read_bytes()
    assert digest(folder) == before


def test_sweep_refuses_a_missing_grid_and_its_own_options():
    for args, message in (([], "the grid (a preset or a YAML path) is missing"),
                          (["sweep-cpu", "--out", "x"], "do not pass --out"),
                          (["sweep-cpu", "--launcher=srun"], "set MOEB_LAUNCHER instead")):
        out = subprocess.run(["bash", str(SWEEP), *args], cwd=ROOT, env=clean_env(),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, args
        assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr
