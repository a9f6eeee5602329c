"""DeepSpeed adapter: a ``TopKGate`` subclass that runs the moebalance policies, helpers to put
it into ``deepspeed.moe.layer.MoE`` layers and set up expert parallelism for inference, and the
distributed start-up for CPU (gloo) and GPU. Framework code only translates; the policies live
in moebalance.

Typical use::

    from deepspeed_patch import init_distributed_cpu, install_gate, setup_expert_parallel

    init_distributed_cpu()                           # gloo on CPU, nccl on GPU
    moe = deepspeed.moe.layer.MoE(hidden, expert, num_experts=8, ep_size=2, k=2)
    install_gate(moe, "laser", load_scope="global")  # before or after loading the checkpoint
    setup_expert_parallel(model)                     # init_inference does not

``deepspeed_patch.model`` builds the Megatron GPT-MoE of ``megatron_patch.model`` with DeepSpeed
``MoE`` layers and loads its weights; ``deepspeed_patch.instrument`` records its MoE layers into
``moebalance.telemetry``; ``deepspeed_patch.harness`` is what ``scripts/infer.py --framework
deepspeed`` calls.
"""

from .gate import (
    LOAD_SCOPES,
    BalancedGate,
    GateOutputError,
    check_gate_output,
    gate_output,
    gate_output_routing,
)
from .install import (
    disable_gate_randomness,
    init_distributed_cpu,
    install_gate,
    make_moe,
    moe_gates,
    moe_modules,
    set_decode,
    setup_expert_parallel,
)

__all__ = [
    "LOAD_SCOPES",
    "BalancedGate",
    "GateOutputError",
    "check_gate_output",
    "disable_gate_randomness",
    "gate_output",
    "gate_output_routing",
    "init_distributed_cpu",
    "install_gate",
    "make_moe",
    "moe_gates",
    "moe_modules",
    "set_decode",
    "setup_expert_parallel",
]
