"""What a run reports: the environment it ran in, the tables printed at the end, and the JSON
file, written atomically and after every router so that nothing finished is lost.

JSON layout: ``command``, ``config`` (``framework``, ``model``: the ModelConfig, ``run``: the
RunConfig, ``padded_prompt_len``), ``environment`` (versions, device, world and EP size,
backend, git commit, time), ``table``, ``partial`` (True until every router has finished) and
``runs``: per router ``router``, ``router_params``, ``load_scope``, ``summary``
(``moebalance.telemetry_stats.summarize``), ``end_to_end``, ``quality`` (per domain), ``per_rank``
(each rank's ``measure`` figures, with ``pinning``: the CPU core it was pinned to or why not,
``compute_clock``: what timed its compute phases, and ``profile``: its trace file under
``--profile``) and ``records`` (one ``LayerStep`` per rank, step and MoE layer).

Traces (``--profile DIR``): ``trace_path`` names each rank's file, ``claim_profile_dir`` checks
the directory before any work.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..files import write_text_atomic
from ..parallel import ParallelSetup
from ..telemetry import PHASES

__all__ = [
    "cpu_name", "git_commit", "utc_now", "environment", "table", "quality_table", "write_json",
    "check_writable", "claim_output", "write_text_atomic", "Report", "TRACE_SUFFIX", "trace_path",
    "claim_profile_dir", "claim_run_outputs",
]

#: A torch.profiler trace file's suffix (Chrome trace JSON, as TensorBoard and Perfetto name it).
TRACE_SUFFIX = ".pt.trace.json"

PACKAGE_DIR = Path(__file__).resolve().parents[2]


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str | None:
    """The commit of the source tree the package runs from (None outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def environment(setup: ParallelSetup) -> dict[str, Any]:
    """Versions, device, world and EP size, backend, git commit and time of this run."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    device_name = (
        torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else cpu_name()
    )
    return {
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "deepspeed": version("deepspeed"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": setup.device.type,
        "device_name": device_name,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "world_size": setup.world_size,
        "ep_size": setup.ep_size,
        "backend": setup.backend,
        "git_commit": git_commit(),
        "time": utc_now(),
    }


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def table(runs: list[dict]) -> str:
    """Rows per router and phase: straggler ms, per-rank imbalance and MV (p50 / p95 over the
    (step, layer) samples), LIS (p50), dropped fraction; with a padded dispatch buffer (DeepSpeed) the
    share of its slots holding a token (p50); prefill latency on the prefill row, decode ms per
    token on the decode row; tokens/s and peak memory per router."""
    padded = any("buffer_fill" in run["summary"][phase] for run in runs for phase in PHASES)
    head = (
        f"{'router':<14}{'phase':<9}{'straggler ms':>16}{'rank imbalance':>17}{'MV':>15}"
        f"{'LIS':>7}{'dropped':>9}" + (f"{'fill':>8}" if padded else "")
        + f"{'latency':>16}{'tok/s':>10}{'peak MiB':>10}"
    )
    sub = f"{'':<23}{'p50':>8}{'p95':>8}{'p50':>9}{'p95':>8}{'p50':>8}{'p95':>7}{'p50':>7}"
    lines = [head, sub]
    for run in runs:
        e2e = run["end_to_end"]
        for phase in PHASES:
            s = run["summary"][phase]
            if not s["samples"]:
                continue
            latency = (
                f"{_fmt(e2e['prefill_ms'], '.1f')} ms"
                if phase == "prefill"
                else f"{_fmt(e2e['decode_ms_per_token'], '.2f')} ms/tok"
            )
            last = phase == "decode" or not run["summary"]["decode"]["samples"]
            straggler, imbalance, mv = s["straggler_ms"], s["rank_imbalance"], s["max_violation"]
            lines.append(
                f"{run['router'] if phase == 'prefill' else '':<14}{phase:<9}"
                f"{_fmt(straggler['p50'], '8.3f')}{_fmt(straggler['p95'], '8.3f')}"
                f"{_fmt(imbalance['p50'], '9.3f')}{_fmt(imbalance['p95'], '8.3f')}"
                f"{_fmt(mv['p50'], '8.3f')}{_fmt(mv['p95'], '7.3f')}"
                f"{_fmt(s['lis']['p50'], '7.3f')}"
                f"{_fmt(100 * s['dropped_fraction'], '8.2f')}%"
                + (f"{_fmt(100 * s['buffer_fill']['p50'], '7.1f')}%" if "buffer_fill" in s else "")
                + (f"{'n/a':>8}" if padded and "buffer_fill" not in s else "")
                + f"{latency:>16}"
                + (f"{e2e['tokens_per_s']:10.1f}{e2e['peak_memory_mib']:10.0f}" if last else "")
            )
    return "\n".join(lines)


def quality_table(runs: list[dict]) -> str:
    """Held-out perplexity and next-token accuracy per router and domain (teacher-forced, every
    rank's sequences), with the perplexity change against the first run (vanilla under
    ``compare``). Empty when no run measured quality."""
    if not any(run["quality"] for run in runs):
        return ""
    domains = [d for d in runs[0]["quality"] if d != "all"] + ["all"]
    lines = [f"{'router':<14}{'domain':<10}{'perplexity':>11}{'vs first':>10}{'accuracy':>10}"]
    base = runs[0]["quality"]
    for run in runs:
        for i, domain in enumerate(domains):
            q = run["quality"][domain]
            change = 100 * (q["perplexity"] / base[domain]["perplexity"] - 1)
            lines.append(
                f"{run['router'] if i == 0 else '':<14}{domain:<10}{q['perplexity']:11.3f}"
                f"{change:+9.2f}%{100 * q['accuracy']:9.2f}%"
            )
    return "\n".join(lines)


def check_writable(path: Path) -> None:
    """OSError unless a file can be created in ``path``'s folder (created if missing): checked
    before any work, so that a run never fails only at its end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
        pass


def claim_output(path: Path, *, overwrite: bool, command: list[str]) -> None:
    """Make sure this run may write ``path``, before any work. Without ``overwrite`` an
    existing file is another run's results: ConfigError; otherwise the path is claimed at once
    by creating it exclusively with a placeholder report (``partial``, no runs), so that a
    second job aiming at the same path fails at its start instead of silently replacing this
    one's results. With ``overwrite`` the folder is only checked: an existing file is replaced
    when the first router finishes (atomically), never before. OSError when the folder is not
    writable."""
    check_writable(path)
    if overwrite:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise ConfigError(
            f"--out {path} exists (another run's results); pass --overwrite to replace it, or "
            "choose another --out"
        ) from None
    with os.fdopen(fd, "w") as f:
        json.dump({"command": command, "partial": True, "runs": []}, f)
        f.write("\n")


def trace_path(directory: str | Path, router: str, rank: int) -> Path:
    """Where ``--profile`` writes rank ``rank``'s trace of ``router``'s measured generation."""
    return Path(directory) / router / f"rank{rank}{TRACE_SUFFIX}"


def claim_profile_dir(directory: Path, *, overwrite: bool) -> list[Path]:
    """Check, before any work, that the ranks may write their traces under ``directory``
    (created if missing). ConfigError when it is a file, or holds traces already (another
    run's) without ``overwrite``; OSError when it cannot be written. Returns the traces already
    there (with ``overwrite``), which the caller removes once the run is sure to start, so that
    the directory never mixes two runs."""
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--profile {directory} is a file; give a directory")
    check_writable(directory / "probe")
    old = sorted(directory.glob(f"*/rank*{TRACE_SUFFIX}"))
    if old and not overwrite:
        raise ConfigError(
            f"--profile {directory} holds traces already ({old[0].relative_to(directory)}, ...); "
            "pass --overwrite to replace them, or choose another --profile"
        )
    return old


def claim_run_outputs(run: Any, command: list[str]) -> None:
    """Everything a run writes, claimed before any work (rank 0, the one that writes): the
    ``--profile`` directory (``claim_profile_dir``), ``--out`` (``claim_output``) and the
    ``--record-routing`` files (refused when one exists, without ``overwrite``); an earlier
    run's traces are removed only once both claims hold. ConfigError or OSError, naming the
    option, otherwise."""
    cfg = run.config
    stale: list[Path] = []
    if cfg.profile is not None:
        profile = Path(cfg.profile).resolve()
        try:
            stale = claim_profile_dir(profile, overwrite=cfg.overwrite)
        except OSError as err:
            raise OSError(f"--profile {profile}: cannot write there ({err.strerror or err})") from None
    try:
        claim_output(run.out, overwrite=cfg.overwrite, command=command)
    except OSError as err:
        raise OSError(f"--out {run.out}: cannot write there ({err.strerror or err})") from None
    if cfg.record_routing is not None:
        from ..routing_record import record_path

        for router in run.routers:
            path = record_path(cfg.record_routing, router, run.routers)
            if path.exists() and not cfg.overwrite:
                raise ConfigError(f"--record-routing {path} exists (pass --overwrite to replace it)")
            try:
                check_writable(path)
            except OSError as err:
                raise OSError(
                    f"--record-routing {path}: cannot write there ({err.strerror or err})"
                ) from None
    for path in stale:
        path.unlink(missing_ok=True)


def write_json(path: Path, report: dict) -> None:
    """``report`` as indented JSON, written atomically (``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(report, indent=1, default=str) + "\n")


def run_config_dict(config: Any) -> dict[str, Any]:
    """The RunConfig as plain JSON values."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}


class Report:
    """The JSON report of one run, built on rank 0 router by router and written after each
    (``partial`` stays True until the last router has finished)."""

    def __init__(
        self, run: Any, setup: ParallelSetup, command: list[str], padded_prompt_len: int,
        memory: dict | None = None,
    ):
        self.run = run
        self.data: dict[str, Any] = {
            "command": command,
            "config": {
                "framework": run.config.framework,
                "model": dataclasses.asdict(run.model),
                "run": {
                    **run_config_dict(run.config),
                    "routers": list(run.routers),
                    "world_size": run.world_size,
                    "ep": run.ep,
                    "out": str(run.out),
                },
                "padded_prompt_len": padded_prompt_len,
            },
            "environment": environment(setup),
            "memory": memory,  # --memory-budget: expert bytes per rank before / after int8
            "table": "",
            "partial": True,
            "runs": [],
        }

    @property
    def runs(self) -> list[dict]:
        return self.data["runs"]

    def add(self, router: str, per_rank: list[dict], quality: dict) -> None:
        """Add ``router``'s run from every rank's ``measure`` result and the held-out quality."""
        from ..telemetry_stats import summarize
        from .generate import end_to_end

        params = self.run.params_of(router)
        records = [rec for r in per_rank for rec in r["records"]]
        self.runs.append(
            {
                "router": router,
                "router_params": dataclasses.asdict(params) if params is not None else {},
                "load_scope": self.run.load_scope_of(router),
                "summary": summarize(records, self.run.model.topk, self.run.model.num_experts),
                "end_to_end": end_to_end(per_rank),
                "quality": quality,
                "per_rank": [{k: v for k, v in r.items() if k != "records"} for r in per_rank],
                "records": records,
            }
        )
        self.data["table"] = self.text()

    def text(self) -> str:
        """The load/latency table and, when measured, the quality table."""
        quality = quality_table(self.runs)
        return table(self.runs) + (f"\n\n{quality}" if quality else "")

    def write(self, *, final: bool) -> None:
        self.data["partial"] = not final
        write_json(self.run.out, self.data)
