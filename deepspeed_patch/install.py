"""Put a BalancedGate into DeepSpeed ``MoE`` layers, set up expert parallelism for inference,
and start DeepSpeed's process group on CPU (gloo) or GPU.

DeepSpeed 0.19.8 facts this relies on (``deepspeed/moe/layer.py``): ``MoE.__init__`` hard-codes
``TopKGate``, so the gate is replaced after build (``moe.deepspeed_moe.gate``);
``MoE.set_deepspeed_parallelism()`` creates the EP group and hands it to the gate
(``TopKGate._set_ep_group`` asserts if called twice); ``deepspeed.init_inference`` never calls it
for native ``MoE`` modules, so inference code must (``setup_expert_parallel``).
"""

from __future__ import annotations

import datetime
from typing import Any, Iterator

import torch
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate

from moebalance.parallel import default_group_timeout, rendezvous, torchrun_environment

from .gate import BalancedGate

__all__ = [
    "disable_gate_randomness",
    "init_distributed_cpu",
    "install_gate",
    "make_moe",
    "moe_gates",
    "moe_modules",
    "set_decode",
    "setup_expert_parallel",
]


def moe_modules(model: torch.nn.Module) -> Iterator[MoE]:
    """Every DeepSpeed ``MoE`` layer in ``model`` (any wrapper depth; ``model`` itself too)."""
    for module in model.modules():
        if isinstance(module, MoE):
            yield module


def moe_gates(model: torch.nn.Module) -> Iterator[BalancedGate]:
    """Every BalancedGate in ``model``."""
    for module in model.modules():
        if isinstance(module, BalancedGate):
            yield module


def install_gate(
    moe_layer: MoE, router_name: str = "topk", params: Any = None, **kw: Any
) -> BalancedGate:
    """Replace the gate of a built ``MoE`` layer with a BalancedGate running ``router_name``.

    The new gate shares the old one's ``wg`` (so the state dict, checkpoint keys and outputs of
    the vanilla router are unchanged), EP group and mode. ``kw`` goes to ``BalancedGate``
    (``load_scope``, ``gate_config``). Call it before ``setup_expert_parallel`` (or
    ``set_deepspeed_parallelism``); after it also works, the EP group is carried over.
    Returns the new gate.
    """
    if not isinstance(moe_layer, MoE):
        raise TypeError(
            f"install_gate needs a deepspeed.moe.layer.MoE, got {type(moe_layer).__name__}"
        )
    kw.setdefault("expected_ep_size", moe_layer.ep_size)
    gate = BalancedGate.from_gate(moe_layer.deepspeed_moe.gate, router_name, params, **kw)
    moe_layer.deepspeed_moe.gate = gate
    return gate


def setup_expert_parallel(model: torch.nn.Module) -> int:
    """Create the EP groups of every ``MoE`` layer in ``model`` that has none yet
    (``set_deepspeed_parallelism``), as ``deepspeed.initialize`` does for training and
    ``init_inference`` does not. Collective (new process groups): every rank must call it.
    Idempotent. Returns the number of layers set up now."""
    count = 0
    for layer in moe_modules(model):
        if layer.deepspeed_moe.ep_group is None:
            layer.set_deepspeed_parallelism()
            count += 1
    return count


def disable_gate_randomness(model: torch.nn.Module) -> int:
    """Turn off the randomness DeepSpeed's gates apply even in eval: random token selection
    (``use_rts``), Gumbel sampling of the 2nd expert (``top2_2nd_expert_sampling``), and the noisy
    gate. Returns the number of gates changed."""
    count = 0
    for module in model.modules():
        if isinstance(module, TopKGate):
            module.use_rts = False
            module.top2_2nd_expert_sampling = False
            module.noisy_gate_policy = None
            count += 1
    return count


def set_decode(model: torch.nn.Module, decode: bool) -> int:
    """Set ``decode`` on every BalancedGate (prefill-only policies route vanilla in decode).
    Returns the number of gates."""
    count = 0
    for gate in moe_gates(model):
        gate.decode = bool(decode)
        count += 1
    return count


def make_moe(
    hidden_size: int,
    expert: torch.nn.Module,
    num_experts: int,
    *,
    ep_size: int = 1,
    k: int = 1,
    router: str = "topk",
    params: Any = None,
    **gate_kw: Any,
) -> MoE:
    """A DeepSpeed ``MoE`` layer with a BalancedGate and DeepSpeed's randomness off.

    ``expert`` is copied per local expert by DeepSpeed (so all local experts start identical).
    The EP group is not created here: call ``setup_expert_parallel`` on the finished model.
    """
    layer = MoE(
        hidden_size,
        expert,
        num_experts=num_experts,
        ep_size=ep_size,
        k=k,
        min_capacity=0,
        noisy_gate_policy=None,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    install_gate(layer, router, params, **gate_kw)
    return layer


def init_distributed_cpu(timeout_s: float = 300.0, *, verbose: bool = False) -> None:
    """Start DeepSpeed's distributed backend, ready for CPU (gloo) and GPU runs alike.

    - Disables DeepSpeed's shared-memory comm op, which DeepSpeed otherwise JIT-compiles with
      g++ on CPU (about 45 s, and concurrent builds by several ranks have crashed with SIGABRT).
    - Completes the torchrun environment (``moebalance.parallel.torchrun_environment``): without
      RANK / WORLD_SIZE a single-process world with a free MASTER_PORT (DeepSpeed otherwise
      tries MPI discovery).
    - The backend is the accelerator's (``gloo`` on CPU, ``nccl`` on CUDA); collectives time out
      after ``timeout_s`` seconds instead of hanging, on the default group and on every group
      created later (DeepSpeed's EP groups are ``new_group(ranks)`` without a timeout, which
      would otherwise get torch's 30 minutes: ``moebalance.parallel.default_group_timeout``).
      A rank that never joins within ``timeout_s``: ``moebalance.parallel.RendezvousError``.
    Does nothing if DeepSpeed's backend is already up.
    """
    torchrun_environment()
    default_group_timeout(timeout_s)

    import deepspeed
    import deepspeed.comm as ds_dist
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if ds_dist.is_initialized():
        return
    # Must be set on deepspeed.ops itself before TorchBackend is built (it reads this dict).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    with rendezvous(timeout_s):  # a rank that never joins: one RendezvousError line
        deepspeed.init_distributed(
            dist_backend=get_accelerator().communication_backend_name(),
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
            verbose=verbose,
        )
