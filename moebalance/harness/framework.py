"""The one interface a framework adapter gives the harness.

``megatron_patch.harness.FRAMEWORK`` and ``deepspeed_patch.harness.FRAMEWORK`` implement
``Framework``; ``get_framework(name)`` imports the adapter's harness module, which must not
import the framework itself at module level, so that options are validated (``dispatchers``)
in milliseconds, before the framework's import and before any process group.

The model an adapter builds is called as ``model(ids [B, S], positions [B, S], mask [B, 1, Sq,
Sk] bool (True = masked), inference_context=None, padding_mask=None [B, S] bool (True = pad))
-> logits [B, S, V]``; padding tokens are routed to no expert.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time
import warnings
from typing import Any, Callable, Iterator, Optional, Protocol, runtime_checkable

import torch

from ..config import ConfigError
from ..model_config import ModelConfig
from ..parallel import ParallelSetup
from ..telemetry import Instrumentation, MoERecorder

__all__ = [
    "Framework", "AdapterFramework", "ADAPTERS", "QUIET_WARNINGS", "get_framework",
    "quiet_import_warnings", "one_process", "elapsed_logger",
]

#: framework name -> the adapter module that holds its ``FRAMEWORK`` object
ADAPTERS = {"megatron": "megatron_patch.harness", "deepspeed": "deepspeed_patch.harness"}


@runtime_checkable
class Framework(Protocol):
    """What the harness needs from a framework."""

    name: str
    dispatchers: tuple[str, ...]  # token dispatchers the framework offers, default first

    def init_distributed(self, ep_size: int, timeout_s: float) -> ParallelSetup:
        """Start the process groups from the torchrun environment (a plain ``python`` run is
        world 1) with every collective timing out after ``timeout_s``."""

    def build_model(
        self,
        cfg: ModelConfig,
        setup: ParallelSetup,
        *,
        router: str,
        router_params: Any,
        load_scope: str,
        dispatcher: str,
        checkpoint: Optional[str],
        placement: Optional[dict] = None,
        replicas: Any = None,
    ) -> torch.nn.Module:
        """The GPT-MoE of ``cfg`` in eval mode on ``setup.device``, ``router`` in every MoE
        layer; weights from ``checkpoint`` or the deterministic initialisation; with a
        ``placement`` ({MoE layer: Placement}) P physical slots per layer, a replica chosen per
        pair by ``replicas`` (ReplicaParams). Collective."""

    def swap_router(self, model: torch.nn.Module, router: str, params: Any, load_scope: str) -> int:
        """Put ``router`` into every MoE layer of the built model (gate weights, placement and
        replica choice unchanged)."""

    def set_decode(self, model: torch.nn.Module, decode: bool) -> int:
        """Tell every router whether the next calls are single-token decode steps."""

    def inference_context(self, max_batch: int, max_sequence_length: int) -> Any:
        """A static KV cache with ``sequence_len_offset`` and ``enable_decode_mode()``."""

    def expert_modules(self, model: torch.nn.Module) -> dict[int, dict[int, torch.nn.Module]]:
        """This rank's expert MLPs: {0-based MoE layer: {global slot: module}}."""

    def quantize_slots(self, model: torch.nn.Module, int8_slots: dict) -> int:
        """Store this rank's slots marked True ({MoE layer: [P] bool}) int8."""

    def expert_bytes(self, model: torch.nn.Module) -> int:
        """Bytes of expert weights this rank holds at rest (from the real tensors)."""

    def set_placement(self, model: torch.nn.Module, layer: int, placement: Any) -> None:
        """Serve MoE layer ``layer`` with ``placement`` (its slots' weights already moved)."""

    def instrument(self, model: torch.nn.Module, recorder: MoERecorder) -> Instrumentation:
        """Record every MoE layer's phases and loads into ``recorder``."""

    def destroy_distributed(self) -> None:
        """Tear down the process groups (after a barrier)."""


class AdapterFramework:
    """Base of the adapters' ``Framework`` objects: the methods that only hand a call to the
    adapter package's own module (``<package>.model``: ``init_distributed``,
    ``destroy_distributed``, ``expert_modules``, ``quantize_slots``, ``expert_bytes``;
    ``<package>.instrument``: ``instrument``), imported when called so that the framework is
    imported only then. Subclasses set ``package`` and add what differs."""

    package: str

    def _call(self, module: str, function: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"{self.package}.{module}"), function)(*args, **kwargs)

    def init_distributed(self, ep_size: int, timeout_s: float) -> ParallelSetup:
        return self._call("model", "init_distributed", ep_size, timeout_s)

    def destroy_distributed(self) -> None:
        self._call("model", "destroy_distributed")

    def expert_modules(self, model: torch.nn.Module) -> dict[int, dict[int, torch.nn.Module]]:
        return self._call("model", "expert_modules", model)

    def quantize_slots(self, model: torch.nn.Module, int8_slots: dict) -> int:
        return self._call("model", "quantize_slots", model, int8_slots)

    def expert_bytes(self, model: torch.nn.Module) -> int:
        return self._call("model", "expert_bytes", model)

    def set_placement(self, model: torch.nn.Module, layer: int, placement: Any) -> None:
        self._call("model", "set_placement", model, layer, placement)

    def instrument(self, model: torch.nn.Module, recorder: MoERecorder) -> Instrumentation:
        return self._call("instrument", "instrument", model, recorder)


# Import-time notices of the frameworks that say nothing on a CPU box (no Transformer Engine
# or Apex there) and deprecations of torch.distributed names the frameworks still use.
QUIET_WARNINGS = (
    r"Transformer Engine and Apex are not installed", r"Apex is not installed",
    r"absl\.logging is not installed", r"full scope is deprecated",
    r"`torch\.distributed\.\w+` is deprecated",
)


def quiet_import_warnings() -> None:
    """Ignore ``QUIET_WARNINGS`` in this process."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def get_framework(name: str) -> Framework:
    """The adapter of framework ``name`` ("megatron" or "deepspeed")."""
    if name not in ADAPTERS:
        raise ConfigError(f"--framework must be one of {tuple(ADAPTERS)}, got {name!r}")
    try:
        module = importlib.import_module(ADAPTERS[name])
    except ImportError as err:
        raise ConfigError(
            f"--framework {name} needs its adapter's dependencies ({err}); install "
            f"moebalance[{name}]"
        ) from None
    return module.FRAMEWORK


@contextlib.contextmanager
def one_process(
    name: str, threads: Optional[int] = None, timeout_s: float = 300.0
) -> Iterator[tuple[Framework, ParallelSetup]]:
    """(framework, setup) of a one-process run (world size 1: every expert local), for scripts
    that evaluate a model in-process (calibration, the cache benchmark): ``threads`` intra-op
    threads (None: torch's), the frameworks' import warnings quiet, the process group torn down
    on the way out, also after an error."""
    if threads is not None:
        torch.set_num_threads(threads)
    quiet_import_warnings()
    framework = get_framework(name)
    setup = framework.init_distributed(1, timeout_s)
    try:
        yield framework, setup
    finally:
        framework.destroy_distributed()


def elapsed_logger(prefix: str) -> Callable[[str], None]:
    """A progress logger: ``<prefix> <line> (<seconds since this call> s)`` on stderr."""
    started = time.perf_counter()

    def log(line: str) -> None:
        print(f"{prefix} {line} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    return log
