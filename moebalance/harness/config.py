"""The run configuration of ``scripts/infer.py``: one dataclass, ``RunConfig``, whose fields map
one-to-one onto the keys of a run file (``moebalance/configs/runs/*.yaml``) and onto the command-line flags.

Precedence, lowest first: the dataclass defaults, the run file (``--run-config NAME|FILE``), the flags
given on the command line, then ``--set field=value`` overrides (``--set router_args.pool_size=3``
reaches a router parameter). ``resolve`` validates the whole run at once, before any process
group starts, and returns a ``Run``: the config plus what it resolves to (model config, router
parameters, EP size, the routers to run, the output path). Errors are ``ConfigError`` with one
line naming the option and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch


from ..config import ConfigError, parse_key_values, read_yaml_mapping
from ..corpus import DEFAULT_DOMAINS
from ..model_config import (
    SKEWS,
    ModelConfig,
    load_model_config,
    trained_checkpoint,
    trained_checkpoints,
)
from ..placement import check_plans_fit, load_plan
from ..policies import POLICIES, get_policy, make_params
from ..replicas import ReplicaParams
from ..runner import check_load_scope
from ..weights import check_checkpoint_file

__all__ = [
    "FRAMEWORKS",
    "VANILLA",
    "RUN_CONFIG_DIR",
    "RunConfig",
    "Run",
    "run_config_presets",
    "load_run_config",
    "apply_overrides",
    "resolve",
    "PAPER_ARGS",
    "CALIBRATED_ARGS",
    "calibrated_laser_file",
    "laser_args_source",
]

FRAMEWORKS = ("megatron", "deepspeed")
VANILLA = "topk"
RUN_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "runs"


@dataclass
class RunConfig:
    """One expert-parallel inference run (``scripts/infer.py``).

    Attributes:
        model: a shipped trained model's name (``tiny-moe``, ``fine-moe``: its checkpoint and
            config), a model preset name or a YAML path (random initialisation). None: the
            default trained tiny-moe; with ``skew`` alone the random-init preset "tiny"; with
            ``checkpoint``, a config.yaml beside it when there is one.
        checkpoint: canonical safetensors checkpoint (None: the trained default model unless
            ``model`` or ``skew`` is given).
        skew: override the model config's skew ("none" or a workload preset).
        framework: "megatron" (Megatron-Core GPTModel) or "deepspeed" (DeepSpeed MoE layers,
            same weights).
        router: routing policy name; router_args: its parameters ({field: value}, per_layer
            included); router_args_file: a YAML mapping of parameters, applied before
            router_args, or a name (``laser_args_source``): "paper" for the router's own
            defaults (LASER's are the paper's), "calibrated" for the LASER parameters shipped
            with a trained model. ``laser`` on a shipped trained model without router_args
            or router_args_file runs that model's calibrated file.
        load_scope: "local" or "global" (EP-global loads for LASER).
        placement: a replica placement file (``moebalance.placement.save_plan``, e.g. written
            by ``scripts/plan_placement.py``) for this model and EP size: every MoE layer then
            holds the plan's physical slots and each (token, expert) pair goes to one replica.
        replicate: "auto": plan the placement on this run's own calibration pass first
            (``moebalance.harness.calibrate``: vanilla top-k over held-out text of
            ``calibration_domain``, ``redundant`` extra slots per rank), instead of a
            ``placement`` file; the plan is saved beside ``out``.
        redundant: extra expert slots per rank with ``replicate`` (>= 1).
        calibration_domain: the text domain ``replicate`` calibrates on (None: "prose").
        rebalance_every: with replicas, re-plan and move the changed slots' weights every this
            many model steps (``moebalance.harness.rebalance``; 0 = a static placement);
            rebalance_window: the steps of loads each re-plan sums.
        replica_policy: how a pair picks its replica: "round_robin", "least_loaded" or
            "local_first" (``moebalance.replicas``).
        memory_budget: with a placement, "same": store the least important experts (Wanda-style
            weight importance) int8 so that each rank's expert bytes do not exceed the
            unreplicated model's (None: every slot in the model's dtype).
        compare: also run vanilla top-k first, on the same prompts.
        ep: expert-parallel size (None: the world size).
        dispatcher: the framework's token dispatcher ("alltoall", "allgather" for Megatron).
        batch: prompts per rank; prompt_len: prompt tokens; gen_len: tokens generated per
            prompt; uneven: prompt lengths differ in (prompt_len / 2, prompt_len].
        warmup: unmeasured generations before the measured one.
        seed: prompt seed.
        prompt_domain: serve prompts of this text domain only ("code" or "prose" of the
            default corpus; None: domains take turns). Quality is still measured on all.
        eval_seqs: held-out sequences per domain and rank for quality (0 = none); eval_len:
            tokens per held-out sequence.
        timeout: collective timeout (s).
        out: JSON path (None: results/infer[_<framework>]_<router>_ep<N>.json).
        overwrite: replace an existing ``out`` (otherwise a run refuses to start over another
            run's file, and claims its own path at start so that a second job aiming at it
            fails at once).
        nvtx: emit NVTX ranges.
        pin_cores: pin each rank to its own CPU core at start-up (the LOCAL_RANK-th of the
            cores the process may use), when the node's ranks do not outnumber those cores
            (``moebalance.harness.startup.pin_to_core``); false leaves scheduling to the OS.
        profile: a directory for torch.profiler traces of the measured generations, one per
            rank and router (``<profile>/<router>/rank<r>.pt.trace.json``, Chrome / Perfetto
            JSON; ``scripts/trace_report.py`` reads them). None: no profiler.
        record_routing: a file to save each MoE layer's per-token expert choices to
            (safetensors, ``moebalance.routing_record``): the measured generation's prefill
            and decode tokens and the held-out evaluation, every rank's sequences, with the
            model, router, prompts and domains in its header. With ``compare`` one file per
            router, ``<stem>.<router>.safetensors`` (``record_path``). For
            ``scripts/locality.py``.
        cache_experts: simulate an LRU expert cache of this many experts per MoE layer
            (offloaded serving; ``moebalance.expert_cache``) and report each router's hit rate
            (0: none). cache_aware: the served router (LASER) prefers resident experts: the
            cache state as its load signal.
    """

    model: Optional[str] = None
    checkpoint: Optional[str] = None
    skew: Optional[str] = None
    framework: str = "megatron"
    router: str = "expanded_drop"
    router_args: dict[str, Any] = field(default_factory=dict)
    router_args_file: Optional[str] = None
    load_scope: str = "local"
    placement: Optional[str] = None
    replicate: Optional[str] = None
    redundant: int = 1
    calibration_domain: Optional[str] = None
    rebalance_every: int = 0
    rebalance_window: int = 16
    replica_policy: str = "round_robin"
    memory_budget: Optional[str] = None
    compare: bool = False
    ep: Optional[int] = None
    dispatcher: str = "alltoall"
    batch: int = 8
    prompt_len: int = 64
    gen_len: int = 16
    uneven: bool = False
    warmup: int = 1
    seed: int = 0
    prompt_domain: Optional[str] = None
    eval_seqs: int = 8
    eval_len: int = 128
    timeout: float = 120.0
    out: Optional[str] = None
    overwrite: bool = False
    nvtx: bool = True
    pin_cores: bool = True
    profile: Optional[str] = None
    record_routing: Optional[str] = None
    cache_experts: int = 0
    cache_aware: bool = False


_INT_FIELDS = (
    "batch", "prompt_len", "gen_len", "warmup", "seed", "eval_seqs", "eval_len", "redundant",
    "rebalance_every", "rebalance_window", "cache_experts",
)
_BOOL_FIELDS = ("compare", "uneven", "overwrite", "nvtx", "pin_cores", "cache_aware")
_STR_FIELDS = ("framework", "router", "load_scope", "dispatcher", "replica_policy")
_OPTIONAL_STR_FIELDS = (
    "model", "checkpoint", "skew", "router_args_file", "placement", "memory_budget",
    "prompt_domain", "replicate", "calibration_domain", "out", "profile", "record_routing",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_types(cfg: RunConfig) -> None:
    """ConfigError unless every field has its type (booleans are not numbers)."""
    for name in _INT_FIELDS:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{_flag(name)} must be an integer, got {value!r}")
    if cfg.ep is not None and (not isinstance(cfg.ep, int) or isinstance(cfg.ep, bool)):
        raise ConfigError(f"--ep must be an integer, got {cfg.ep!r}")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    for name in _STR_FIELDS:
        if not isinstance(getattr(cfg, name), str):
            raise ConfigError(f"{_flag(name)} must be a string, got {getattr(cfg, name)!r}")
    for name in _OPTIONAL_STR_FIELDS:
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{_flag(name)} must be a string or null, got {value!r}")
    if not isinstance(cfg.timeout, (int, float)) or isinstance(cfg.timeout, bool):
        raise ConfigError(f"--timeout must be a number of seconds > 0, got {cfg.timeout!r}")
    if not isinstance(cfg.router_args, dict):
        raise ConfigError(f"router_args must be a mapping of parameters, got {cfg.router_args!r}")


def run_config_presets() -> dict[str, Path]:
    """{name: path} of the run files shipped in ``moebalance/configs/runs``."""
    return {p.stem: p for p in sorted(RUN_CONFIG_DIR.glob("*.yaml"))}


def load_run_config(name_or_path: str | Path) -> RunConfig:
    """A RunConfig from a run file: a preset name in ``moebalance/configs/runs`` or a YAML path."""
    presets = run_config_presets()
    path = presets.get(str(name_or_path), Path(name_or_path))
    if not path.is_file():
        raise ConfigError(
            f"--run-config {str(name_or_path)!r} not found (a YAML file, or one of the presets "
            f"{sorted(presets)})"
        )
    data = read_yaml_mapping(path, "run file")
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"run file {path}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    return RunConfig(**data)


def apply_overrides(cfg: RunConfig, items: list[str]) -> RunConfig:
    """``cfg`` with ``--set`` overrides ["field=value", "router_args.name=value", ...] applied
    (values read as YAML scalars, ``moebalance.config.parse_key_values``)."""
    known = {f.name for f in fields(RunConfig)}
    changes: dict[str, Any] = {}
    router_args = dict(cfg.router_args)
    for key, value in parse_key_values(items, "--set").items():
        head, _, rest = key.partition(".")
        if head == "router_args" and rest:
            router_args[rest] = value
        elif head in known and not rest:
            changes[head] = value
        else:
            raise ConfigError(
                f"--set: unknown field {key!r}; allowed: {sorted(known)} or router_args.<name>"
            )
    if "router_args" in changes and not isinstance(changes["router_args"], dict):
        raise ConfigError(f"--set router_args must be a mapping, got {changes['router_args']!r}")
    merged = {**router_args, **changes.pop("router_args", {})}
    return dataclasses.replace(cfg, router_args=merged, **changes)


@dataclass(frozen=True)
class Run:
    """A validated run: the config and what it resolves to.

    Attributes:
        config: the RunConfig (with ``model``/``checkpoint`` filled in for the default model,
            and ``router_args_file`` with the calibrated LASER file a run uses by default or
            by name: ``laser_args_source``).
        model: the ModelConfig served.
        params: the router's parameter dataclass.
        routers: the routers to run, in order (vanilla first under ``compare``).
        world_size, ep: processes and the EP size.
        out: the JSON path.
        plans: {0-based MoE layer: Placement} from ``placement`` (None without replicas);
        replicas: the ``ReplicaParams`` of ``replica_policy``.
        importance: {0-based MoE layer: [E] float64} Wanda-style importance of each logical
            expert from calibration activations (``moebalance.harness.calibrate``; stored in
            the plan's provenance), or None: ``--memory-budget`` then ranks experts by their
            weights alone.
    """

    config: RunConfig
    model: ModelConfig
    params: Any
    routers: tuple[str, ...]
    world_size: int
    ep: int
    out: Path
    plans: Optional[dict] = None
    replicas: Any = None
    importance: Optional[dict] = None

    @property
    def num_slots(self) -> int:
        """Physical expert slots per MoE layer (the model's experts without replicas)."""
        if self.plans:
            return next(iter(self.plans.values())).num_slots
        if self.config.replicate:
            return self.model.num_experts + self.config.redundant * self.ep
        return self.model.num_experts

    def params_of(self, router: str) -> Any:
        """The parameters of ``router`` in this run (None for vanilla under ``compare``)."""
        return self.params if router == self.config.router else None

    def load_scope_of(self, router: str) -> str:
        return self.config.load_scope if router == self.config.router else "local"


def _model(cfg: RunConfig) -> tuple[RunConfig, ModelConfig]:
    """The model config and the checkpoint it is served from (see ``RunConfig.model``)."""
    model_name, checkpoint = cfg.model, cfg.checkpoint
    if checkpoint is None and cfg.skew is None and (
        model_name is None or model_name in trained_checkpoints()
    ):  # a shipped trained model: its weights and the config beside them
        default_checkpoint, default_config = trained_checkpoint(model_name)
        checkpoint, model_name = str(default_checkpoint), str(default_config)
    elif model_name is None:
        beside = Path(checkpoint).parent / "config.yaml" if checkpoint else None
        model_name = str(beside) if beside is not None and beside.is_file() else "tiny"
    model = load_model_config(model_name)
    if cfg.skew is not None:
        if cfg.skew not in SKEWS:
            raise ConfigError(f"--skew must be one of {SKEWS}, got {cfg.skew!r}")
        model = model.replace(skew=cfg.skew)
    if checkpoint is not None:
        if model.skew != "none":
            model = model.replace(skew="none")  # a trained model routes as it was trained
        check_checkpoint_file(checkpoint, model)
    return dataclasses.replace(cfg, model=model_name, checkpoint=checkpoint), model


# ----------------------------------------------------------------------------- LASER's defaults
# Where ``laser``'s parameters come from when the run names none. A shipped trained model carries
# per-layer LASER parameters calibrated to a quality budget (``moebalance/checkpoints/<model>/
# laser.yaml``, written by scripts/calibrate_laser.py); the paper's defaults move too many tokens
# for models this small. ``router_args_file`` also takes two names instead of a path.

#: ``--router-args-file paper``: no file, the router's own defaults (the paper's for LASER)
PAPER_ARGS = "paper"
#: ``--router-args-file calibrated``: the served trained model's calibrated LASER file
CALIBRATED_ARGS = "calibrated"
#: the calibrated file's name beside a shipped model's checkpoint
CALIBRATED_LASER_FILE = "laser.yaml"
#: routers that run the calibrated file when the run gives no parameters
CALIBRATED_BY_DEFAULT = ("laser",)
#: routers ``calibrated`` may be named for (LASER's pools and thresholds)
CALIBRATED_ROUTERS = ("laser", "laser_fast")


def calibrated_laser_file(checkpoint: Optional[str]) -> Optional[Path]:
    """The calibrated LASER parameters of a shipped trained model served from ``checkpoint``
    (its ``laser.yaml``), or None for another checkpoint or a model without one."""
    if checkpoint is None:
        return None
    served = Path(checkpoint).resolve()
    for name in trained_checkpoints():
        weights, _ = trained_checkpoint(name)
        if weights.resolve() == served:
            path = weights.parent / CALIBRATED_LASER_FILE
            return path if path.is_file() else None
    return None


def laser_args_source(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the router parameters' source settled in ``router_args_file`` (so that the
    report's ``config.run`` names it): the calibrated file's path for ``calibrated``, and for
    ``laser`` on a shipped trained model when neither router_args nor router_args_file is given;
    "paper" stays (no file is read); anything else is unchanged. Any router_args or a file of
    one's own thus replaces the calibrated defaults; ``calibrated`` plus router_args builds on
    them (their per_layer entries win over top-level fields, as in any file). ConfigError for
    ``calibrated`` with another router or a model without a calibrated file."""
    source = cfg.router_args_file
    if source == CALIBRATED_ARGS:
        if cfg.router not in CALIBRATED_ROUTERS:
            raise ConfigError(
                f"--router-args-file {CALIBRATED_ARGS} holds LASER parameters, for routers "
                f"{CALIBRATED_ROUTERS}; got --router {cfg.router}"
            )
        path = calibrated_laser_file(cfg.checkpoint)
        if path is None:
            shipped = [n for n in trained_checkpoints()
                       if calibrated_laser_file(str(trained_checkpoint(n)[0])) is not None]
            raise ConfigError(
                f"--router-args-file {CALIBRATED_ARGS}: no calibrated LASER parameters for this "
                f"model (shipped for the trained models {shipped}; scripts/calibrate_laser.py "
                "writes one for yours)"
            )
        return dataclasses.replace(cfg, router_args_file=str(path))
    if source is None and not cfg.router_args and cfg.router in CALIBRATED_BY_DEFAULT:
        path = calibrated_laser_file(cfg.checkpoint)
        if path is not None:
            return dataclasses.replace(cfg, router_args_file=str(path))
    return cfg


def _router_params(cfg: RunConfig, model: ModelConfig) -> Any:
    args = {}
    if cfg.router_args_file is not None and cfg.router_args_file != PAPER_ARGS:
        args = read_yaml_mapping(Path(cfg.router_args_file), "--router-args-file")
    params = make_params(cfg.router, {**args, **cfg.router_args})
    gate = model.gate_config()
    try:  # the router's parameters against this model's gate (e.g. pool_size within [k, E])
        layers = getattr(params, "per_layer", {}) or {}
        for layer in (None, *layers):
            (params.for_layer(layer) if layer is not None else params).validate(gate)
    except ConfigError as err:
        raise ConfigError(f"--router-args: {err}") from None
    return params


def resolve(
    cfg: RunConfig,
    *,
    world_size: int,
    dispatchers: Optional[tuple[str, ...]] = None,
    local_world_size: int = 1,
    cuda_devices: int = 0,
) -> Run:
    """Validate ``cfg`` for a job of ``world_size`` processes (``local_world_size`` per node,
    ``cuda_devices`` GPUs per node, 0 on CPU) whose framework offers ``dispatchers`` (None:
    ask the framework's adapter, ``get_framework``, which imports no framework). Raises
    ConfigError with one line naming the option; starts nothing."""
    _check_types(cfg)
    if cfg.router not in POLICIES:
        raise ConfigError(f"unknown router {cfg.router!r}; choose one of {sorted(POLICIES)}")
    if cfg.framework not in FRAMEWORKS:
        raise ConfigError(f"--framework must be one of {FRAMEWORKS}, got {cfg.framework!r}")
    if cfg.compare and cfg.router == VANILLA:
        raise ConfigError(f"--compare runs {VANILLA} beside another router; pick one with --router")
    if dispatchers is None:
        from .framework import get_framework

        dispatchers = get_framework(cfg.framework).dispatchers
    if cfg.dispatcher not in dispatchers:
        raise ConfigError(
            f"--dispatcher must be one of {dispatchers} for --framework {cfg.framework}, "
            f"got {cfg.dispatcher!r}"
        )
    for name in ("batch", "prompt_len", "gen_len", "eval_len"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{_flag(name)} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup", "eval_seqs"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{_flag(name)} must be >= 0, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.timeout) and cfg.timeout > 0):
        raise ConfigError(f"--timeout must be a number of seconds > 0, got {cfg.timeout}")
    cfg, model = _model(cfg)
    if cfg.prompt_domain is not None and (
        cfg.checkpoint is None or cfg.prompt_domain not in DEFAULT_DOMAINS
    ):
        raise ConfigError(
            f"--prompt-domain must be one of {DEFAULT_DOMAINS} with a trained model, got "
            f"{cfg.prompt_domain!r}" + ("" if cfg.checkpoint else " for a random-init model")
        )
    cfg = laser_args_source(cfg)  # "paper", "calibrated", or laser's calibrated default
    params = _router_params(cfg, model)
    check_load_scope(cfg.load_scope, cfg.router)
    if cfg.eval_seqs and cfg.eval_len > model.max_sequence_length:
        raise ConfigError(
            f"--eval-len exceeds the model's max_sequence_length {model.max_sequence_length}"
        )
    if cfg.prompt_len + cfg.gen_len > model.max_sequence_length:
        raise ConfigError(
            f"--prompt-len + --gen-len = {cfg.prompt_len + cfg.gen_len} exceeds the model's "
            f"max_sequence_length {model.max_sequence_length}"
        )
    ep = world_size if cfg.ep is None else cfg.ep
    if ep < 1 or world_size % ep:
        raise ConfigError(f"--ep {ep} must be >= 1 and divide the world size {world_size}")
    if model.num_experts % ep and cfg.placement is None:
        raise ConfigError(f"--ep {ep} must divide the model's num_experts {model.num_experts}")
    if cfg.rebalance_every and ep != world_size:
        raise ConfigError(f"--rebalance-every needs --ep equal to the world size {world_size}")
    if cuda_devices and local_world_size > cuda_devices:
        raise ConfigError(
            f"{local_world_size} ranks per node but {cuda_devices} GPU(s): NCCL needs one GPU "
            "per rank"
        )
    if cfg.out is not None:
        out = Path(cfg.out)
    else:
        prefix = "infer_" if cfg.framework == "megatron" else f"infer_{cfg.framework}_"
        out = Path("results") / f"{prefix}{cfg.router}_ep{ep}.json"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file path")
    if cfg.profile is not None and (not cfg.profile.strip() or Path(cfg.profile).exists()
                                    and not Path(cfg.profile).is_dir()):
        raise ConfigError(
            f"--profile {cfg.profile!r} must name a directory (not a file, not empty)"
        )
    if cfg.record_routing is not None and (
        not cfg.record_routing.strip() or Path(cfg.record_routing).is_dir()
    ):
        raise ConfigError(
            f"--record-routing {cfg.record_routing!r} must name a file (not a directory, not "
            "empty)"
        )
    routers = (VANILLA, cfg.router) if cfg.compare else (cfg.router,)
    replicas = ReplicaParams(policy=cfg.replica_policy)
    replicated = cfg.placement is not None or cfg.replicate is not None
    if cfg.replicate is not None and (cfg.replicate != "auto" or cfg.placement is not None):
        raise ConfigError(
            f"--replicate must be 'auto' (instead of --placement), got {cfg.replicate!r}"
            + (" with --placement" if cfg.placement is not None else "")
        )
    if cfg.redundant < 1:
        raise ConfigError(f"--redundant must be >= 1 extra slot per rank, got {cfg.redundant}")
    if cfg.calibration_domain is not None and (
        cfg.replicate is None or cfg.calibration_domain not in DEFAULT_DOMAINS
    ):
        raise ConfigError(
            f"--calibration-domain must be one of {DEFAULT_DOMAINS} with --replicate auto, got "
            f"{cfg.calibration_domain!r}"
        )
    if cfg.rebalance_every < 0 or cfg.rebalance_window < 1:
        raise ConfigError(
            f"--rebalance-every must be >= 0 and --rebalance-window >= 1, got "
            f"{cfg.rebalance_every} and {cfg.rebalance_window}"
        )
    if cfg.rebalance_every and (not replicated or cfg.memory_budget is not None):
        raise ConfigError(
            "--rebalance-every needs replicas (--placement or --replicate) and full-precision "
            "experts (not with --memory-budget)"
        )
    if cfg.memory_budget is not None and (cfg.memory_budget != "same" or not replicated):
        raise ConfigError(
            f"--memory-budget must be 'same' (with --placement or --replicate), got "
            f"{cfg.memory_budget!r}" + ("" if replicated else " without replicas")
        )
    if cfg.cache_experts and not model.topk <= cfg.cache_experts <= model.num_experts:
        raise ConfigError(
            f"--cache-experts must be 0 (no cache) or in [{model.topk}, {model.num_experts}] "
            f"(top-k to all experts), got {cfg.cache_experts}"
        )
    if cfg.cache_aware and (
        not cfg.cache_experts or not get_policy(cfg.router).uses_expert_load
        or cfg.load_scope != "local"
    ):
        raise ConfigError(
            "--cache-aware needs --cache-experts N, a router that reads expert loads (laser, "
            f"laser_fast) and --load-scope local; got --cache-experts {cfg.cache_experts}, "
            f"--router {cfg.router}, --load-scope {cfg.load_scope}"
        )
    plans = importance = None
    if cfg.placement is not None:
        plans, provenance = load_plan(cfg.placement, num_experts=model.num_experts, num_ranks=ep)
        check_plans_fit(
            plans, num_experts=model.num_experts, moe_layers=model.moe_layer_indices, ep_size=ep
        )
        importance = importance_from_provenance(
            provenance, plans, f"--placement {cfg.placement}"
        )
    return Run(cfg, model, params, routers, world_size, ep, out.resolve(), plans, replicas,
               importance)


def importance_from_provenance(provenance: dict, plans: dict, where: str) -> Optional[dict]:
    """The plan's stored expert importance ({layer: [E] float64}), None when it has none;
    ConfigError (one line) when it does not cover every planned layer with E finite values
    >= 0."""
    stored = provenance.get("importance")
    if stored is None:
        return None
    E = next(iter(plans.values())).num_experts
    ok = isinstance(stored, dict) and {str(layer) for layer in plans} == set(stored)
    out = {}
    for layer in plans if ok else ():
        values = stored[str(layer)]
        if not (isinstance(values, list) and len(values) == E and all(
                type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in values)):
            ok = False
            break
        out[layer] = torch.tensor(values, dtype=torch.float64)
    if not ok:
        raise ConfigError(
            f"{where}: provenance 'importance' must map every planned layer to {E} finite "
            f"values >= 0"
        )
    return out
