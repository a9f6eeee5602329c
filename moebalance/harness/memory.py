"""How much memory a run needs per rank, estimated from its shapes before anything starts, and
the refusal of a run that cannot fit.

The estimate (bytes per rank) adds:

- the process's own footprint (torch and the framework imported: ``BASE_MIB``, measured on
  the harness's CPU runs; on GPU it lives in host memory and does not count);
- the weights this rank holds: embeddings and output layer, attention, norms, router, dense
  and shared MLPs, and its ``E / EP`` experts, at the model's dtype;
- the KV cache: 2 x layers x batch x (prompt + generated) x key/value heads x head size;
- the largest prefill activations, one layer at a time: attention scores, their mask and
  softmax ([batch, heads, S, S] fp32, three live copies), the hidden states around the layer,
  the tokens the MoE layer receives (``RECEIVED_SKEW`` x the balanced T x k, since routing is
  skewed) through the expert MLPs, and the output logits [batch, S, V] fp32 (two copies).

It is an estimate, meant to refuse runs that cannot fit (a batch of 10^8 prompts, or a prompt
length whose attention scores alone exceed the machine) with a clear message and the largest
batch that fits, not to predict the peak exactly: ``tests/test_harness_memory.py`` checks that
it covers the peak measured by shipped runs without exceeding it by more than a small factor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..config import ConfigError
from ..model_config import ModelConfig
from ..weights import TORCH_DTYPES
from .config import Run

__all__ = ["BASE_MIB", "weight_count", "estimate_peak_bytes", "available_bytes", "largest_batch", "check_memory"]

BASE_MIB = 1200  # a CPU rank's peak RSS around a tiny model: torch, Megatron-Core, buffers
RECEIVED_SKEW = 2.0  # tokens a rank's experts receive, as a multiple of the balanced share
FP32 = 4


def weight_count(cfg: ModelConfig, ep: int = 1, num_slots: Optional[int] = None) -> int:
    """Parameters this rank holds (its E / EP experts, or P / EP slots with replicas; every
    dense parameter)."""
    H, V = cfg.hidden_size, cfg.vocab_size
    head = H // cfg.num_attention_heads
    groups = cfg.num_query_groups or cfg.num_attention_heads
    glu = 2 if cfg.activation == "swiglu" else 1
    attention = H * (cfg.num_attention_heads + 2 * groups) * head + H * H + 4 * H
    expert = H * cfg.expert_ffn_hidden_size * (glu + 1)
    moe = cfg.num_experts * H + (num_slots or cfg.num_experts) // ep * expert
    if cfg.shared_expert_ffn_hidden_size:
        moe += H * cfg.shared_expert_ffn_hidden_size * (glu + 1)
    dense = H * cfg.ffn_hidden_size * (glu + 1)
    layers = cfg.first_dense_layers * (attention + dense) + len(cfg.moe_layer_indices) * (
        attention + moe
    )
    return V * H * (1 if cfg.tie_embeddings else 2) + layers + 2 * H


def estimate_peak_bytes(cfg: ModelConfig, *, batch: int, seq: int, gen: int, ep: int,
                        base: bool = True, num_slots: Optional[int] = None) -> int:
    """Estimated peak memory of one rank (bytes) serving ``batch`` sequences of ``seq`` prompt
    and ``gen`` generated tokens at EP ``ep`` (see the module docstring)."""
    dtype = TORCH_DTYPES[cfg.dtype].itemsize
    H, V = cfg.hidden_size, cfg.vocab_size
    head = H // cfg.num_attention_heads
    groups = cfg.num_query_groups or cfg.num_attention_heads
    total = seq + gen
    tokens = batch * seq
    weights = weight_count(cfg, ep, num_slots) * dtype
    kv_cache = 2 * cfg.num_layers * batch * total * groups * head * dtype
    scores = 3 * batch * cfg.num_attention_heads * seq * seq * FP32 + batch * total * total
    hidden = 8 * tokens * H * FP32
    glu = 2 if cfg.activation == "swiglu" else 1
    received = int(RECEIVED_SKEW * tokens * cfg.topk)
    experts = received * (3 * H + 2 * glu * cfg.expert_ffn_hidden_size) * FP32
    logits = 2 * tokens * V * FP32
    return (BASE_MIB << 20 if base else 0) + weights + kv_cache + scores + hidden + experts + logits


def available_bytes(local_world_size: int, cuda_device: Optional[int] = None) -> Optional[int]:
    """Memory one rank may use: the GPU's total memory, or on CPU the host's available memory
    (``MemAvailable``) shared by the ranks of this node. None when it cannot be read."""
    if cuda_device is not None:
        import torch

        return torch.cuda.get_device_properties(cuda_device).total_memory
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // max(1, local_world_size)
    except OSError:
        pass
    return None


def largest_batch(cfg: ModelConfig, *, seq: int, gen: int, ep: int, budget: int,
                  base: bool = True, num_slots: Optional[int] = None) -> int:
    """The largest batch whose estimate fits ``budget`` bytes (0 when not even one does)."""
    def fits(b: int) -> bool:
        shape = dict(seq=seq, gen=gen, ep=ep, base=base, num_slots=num_slots)
        return estimate_peak_bytes(cfg, batch=b, **shape) <= budget
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def check_memory(run: Run, budget: Optional[int], *, on_gpu: bool = False) -> int:
    """ConfigError when ``run``'s estimated peak per rank exceeds ``budget`` bytes (None: not
    known, nothing checked), naming the estimate and the largest batch that fits. Returns the
    estimate (bytes)."""
    cfg = run.config
    shape = dict(seq=cfg.prompt_len, gen=cfg.gen_len, ep=run.ep, base=not on_gpu,
                 num_slots=run.num_slots)
    need = estimate_peak_bytes(run.model, batch=cfg.batch, **shape)
    if budget is not None and need > budget:
        fits = largest_batch(run.model, budget=budget, **shape)
        hint = (
            f"the largest --batch that fits is {fits}" if fits else
            "not even --batch 1 fits: lower --prompt-len or --gen-len"
        )
        raise ConfigError(
            f"--batch {cfg.batch} x --prompt-len {cfg.prompt_len} needs about "
            f"{need / 2**30:.1f} GiB per rank, more than the {budget / 2**30:.1f} GiB this "
            f"machine has for each of its ranks; {hint}"
        )
    return need
