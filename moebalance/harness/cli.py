"""The command line of ``scripts/infer.py``: flags onto ``RunConfig`` fields.

Every flag is optional and names one field (``--prompt-len`` -> ``prompt_len``; ``--config`` and
``--model`` -> ``model``; ``--no-nvtx`` -> ``nvtx: false``; ``--no-pin`` -> ``pin_cores: false``);
``--run-config NAME|FILE`` starts from a run file, ``--set field=value`` overrides any field
last, ``--router-args key=value ...`` adds router parameters. No option is a prefix of a
torchrun option: torchrun's parser would take it (``--run`` would match its ``--run-path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Optional

from ..config import parse_key_values
from ..model_config import SKEWS, model_config_presets, trained_checkpoints
from ..policies import POLICIES
from .memory import available_bytes, check_memory
from .config import (
    FRAMEWORKS,
    Run,
    RunConfig,
    apply_overrides,
    load_run_config,
    resolve,
    run_config_presets,
)

__all__ = ["OneLineParser", "fail", "build_parser", "run_from_args", "run_step"]


def run_step(prog: str, command: list[str], what: str, cwd: Any = None) -> None:
    """Run one step of a benchmark script (an ``infer.py`` job under torchrun, an analysis) as
    a subprocess: one intra-op thread per process, warnings off, no WORLD_SIZE inherited from
    a surrounding job. On failure exit naming ``what`` with the end of its stderr."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{prog}: {what} failed:\n{done.stderr[-3000:]}")


def fail(prog: str, message: str) -> None:
    """Exit 2 with ``<prog>: error: <message>`` as one line on stderr, printed once: by rank 0
    of a torchrun job (RANK unset or 0), so that N ranks do not print N copies."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {message}".replace("\n", " "), file=sys.stderr, flush=True)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse for the project's scripts: errors are one line and exit 2 (``fail``: no usage
    block, no traceback), and only the documented option names are accepted (no
    abbreviations: torchrun's parser takes abbreviations of its own options)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # noqa: D102
        fail(self.prog, message)


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser: every option defaults to "not given" (``argparse.SUPPRESS``), so that only
    the flags on the command line override the run file."""
    routers = "\n".join(f"  {name:<14} {p.summary}" for name, p in POLICIES.items())
    parser = OneLineParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        epilog=f"routers:\n{routers}\n\ntrained models (--config): {', '.join(trained_checkpoints())}\n"
        f"model presets (random init): {', '.join(model_config_presets())}\n"
        f"run presets (--run-config): {', '.join(run_config_presets())}\nskews: {', '.join(SKEWS)}",
    )
    add = parser.add_argument
    add("--run-config", help="run file: a preset name or a YAML path (fields as RunConfig)")
    add("--set", nargs="+", action="extend", metavar="FIELD=VALUE",
        help="override any run field last, e.g. --set batch=4 router_args.pool_size=3")
    add("--router", help="routing policy (default: expanded_drop)")
    add("--router-args", nargs="*", action="extend", metavar="KEY=VALUE",
        help="router parameters, e.g. capacity_factor=1.2 (see moebalance.config)")
    add("--router-args-file", help="YAML mapping of router parameters (per_layer included)")
    add("--load-scope", help="LASER loads: local or global (EP all-reduce) (default: local)")
    add("--placement", help="replica placement file (scripts/plan_placement.py) for this model and EP")
    add("--replicate", help="'auto': plan replicas on a calibration pass first (no --placement)")
    add("--redundant", type=int, help="with --replicate: extra expert slots per rank (default: 1)")
    add("--calibration-domain", help="with --replicate: code or prose (default: prose)")
    add("--rebalance-every", type=int, help="with replicas: re-plan and move weights every N steps")
    add("--rebalance-window", type=int, help="steps of loads each re-plan sums (default: 16)")
    add("--replica-policy", help="round_robin, least_loaded or local_first (default: round_robin)")
    add("--cache-experts", type=int, help="simulate an LRU expert cache of N experts per MoE "
        "layer (offloaded serving) and report hit rates (default: 0, none)")
    add("--cache-aware", action="store_true", help="with --cache-experts: LASER prefers "
        "resident experts (the cache state as its load signal)")
    add("--memory-budget", help="'same': int8 experts keep each rank's expert bytes within the "
        "unreplicated model's (with --placement)")
    add("--config", "--model", dest="model",
        help="a trained model (tiny-moe, fine-moe), or a model preset or YAML path for a "
        "randomly initialised model (default: tiny-moe; with --skew the preset 'tiny')")
    add("--skew", help="override the model config's skew: " + ", ".join(SKEWS))
    add("--checkpoint", help="canonical safetensors checkpoint (default: the trained tiny-moe)")
    add("--framework", help=f"one of {FRAMEWORKS} (default: megatron)")
    add("--dispatcher", help="token dispatcher (megatron: alltoall, allgather; deepspeed: alltoall)")
    add("--ep", type=int, help="expert-parallel size (default: world size)")
    add("--batch", type=int, help="prompts per rank (default: 8)")
    add("--prompt-len", type=int, help="prompt tokens (default: 64)")
    add("--gen-len", type=int, help="tokens generated per prompt (default: 16)")
    add("--uneven", action="store_true", help="prompt lengths differ per prompt and per rank")
    add("--warmup", type=int, help="unmeasured generations first (default: 1)")
    add("--compare", action="store_true", help="also run vanilla top-k on the same prompts")
    add("--seed", type=int, help="prompt seed (default: 0)")
    add("--prompt-domain", help="prompts from this text domain only (code, prose; default: both)")
    add("--eval-seqs", type=int, help="held-out sequences per domain and rank (default: 8)")
    add("--eval-len", type=int, help="tokens per held-out sequence (default: 128)")
    add("--timeout", type=float, help="collective timeout, s (default: 120)")
    add("--out", help="JSON path (default: results/infer_<router>_ep<N>.json)")
    add("--overwrite", action="store_true", help="replace an existing --out file")
    add("--no-nvtx", dest="nvtx", action="store_false", help="do not emit NVTX ranges")
    add("--no-pin", dest="pin_cores", action="store_false",
        help="do not pin each rank to its own CPU core (default: pin when the node's ranks do "
        "not outnumber the cores this process may use)")
    add("--profile", metavar="DIR",
        help="write a torch.profiler trace of each measured generation per rank and router to "
        "DIR/<router>/rank<r>.pt.trace.json (Perfetto; scripts/trace_report.py DIR)")
    add("--record-routing", metavar="FILE",
        help="save each MoE layer's per-token expert choices (safetensors; with --compare "
        "FILE.<router>.safetensors per router) for scripts/locality.py")
    return parser


def _config_from(namespace: argparse.Namespace) -> RunConfig:
    given: dict[str, Any] = vars(namespace)
    cfg = load_run_config(given.pop("run_config")) if "run_config" in given else RunConfig()
    overrides = given.pop("set", [])
    router_args = parse_key_values(given.pop("router_args", []), "--router-args")
    cfg = dataclasses.replace(cfg, router_args={**cfg.router_args, **router_args}, **given)
    return apply_overrides(cfg, overrides)


def run_from_args(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> Run:
    """Parse ``argv`` and resolve the run for the torchrun environment (``WORLD_SIZE``,
    ``LOCAL_WORLD_SIZE``). ConfigError on any bad value; argparse's own errors exit 2."""
    import torch

    cfg = _config_from(parser.parse_args(argv))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    run = resolve(
        cfg,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_world_size=local_world,
        cuda_devices=cuda,
    )
    gpu = int(os.environ.get("LOCAL_RANK", "0")) if cuda else None
    check_memory(run, available_bytes(local_world, gpu), on_gpu=bool(cuda))
    return run
