"""DeepSpeed adapter: a ``TopKGate`` subclass that runs the moebalance policies, helpers to put
it into ``deepspeed.moe.layer.MoE`` layers and set up expert parallelism for inference, and the
distributed start-up for CPU (gloo) and GPU. Framework code only translates; the policies live
in moebalance. Nothing here imports Megatron-Core.

Typical use::

    from deepspeed_patch import init_distributed_cpu, install_gate, setup_expert_parallel

    init_distributed_cpu()                           # gloo on CPU, nccl on GPU
    moe = deepspeed.moe.layer.MoE(hidden, expert, num_experts=8, ep_size=2, k=2)
    install_gate(moe, "laser", load_scope="global")  # before or after loading the checkpoint
    setup_expert_parallel(model)                     # init_inference does not

``deepspeed_patch.gate`` holds ``BalancedGate``; ``deepspeed_patch.encoding`` turns a routing
into DeepSpeed's gate output; ``deepspeed_patch.checker`` checks a gate output against
DeepSpeed's contract (debugging). ``deepspeed_patch.model`` builds the GPT-MoE of a
``moebalance.model_config.ModelConfig`` with DeepSpeed ``MoE`` layers (the same model, weight
for weight, as ``megatron_patch.model``'s); ``deepspeed_patch.instrument`` records its MoE
layers into ``moebalance.telemetry``; ``deepspeed_patch.harness`` is the harness's DeepSpeed
framework.

The names below are imported on first use, so importing this package does not import
DeepSpeed.
"""

from __future__ import annotations

from moebalance.lazy import lazy_exports

# public name -> the module that defines it (relative to this package, or absolute)
_EXPORTS = {
    "LOAD_SCOPES": "moebalance.runner",
    "BalancedGate": ".gate",
    "GateOutputError": ".checker",
    "check_gate_output": ".checker",
    "disable_gate_randomness": ".install",
    "gate_output": ".encoding",
    "gate_output_routing": ".encoding",
    "init_distributed_cpu": ".install",
    "install_gate": ".install",
    "make_moe": ".install",
    "moe_gates": ".install",
    "moe_modules": ".install",
    "set_decode": ".install",
    "setup_expert_parallel": ".install",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
