"""``--replicate auto``: plan a replica placement on the run's own calibration pass.

The unreplicated model (vanilla top-k) runs teacher-forced over calibration text: held-out
windows of ``calibration_domain`` for a trained byte-level model (4 sequences per rank of
``prompt_len`` tokens; the domain the measured prompts come from may differ, which is where a
static placement is tested), random token ids for a randomly initialised one. Every rank's
recorder counts the tokens each of its experts received; one all-gather gives every rank the
same per-layer loads [E], from which each computes the same plan
(``moebalance.placement.plan_placement``, ``redundant`` extra slots per rank), saved beside the
run's output with its provenance.

The same pass measures each expert's Wanda-style importance for ``--memory-budget``:
sum_ij |W_ij| * ||X_j|| over its first-layer weight W [out, in], with ||X_j|| the L2 norm of
input feature j over the calibration tokens the expert received (a forward pre-hook on its
``linear_fc1``); an expert that received no token scores 0. The importances go into the plan's
provenance, so a saved plan carries them to later ``--placement`` runs. The calibration model is then dropped and the measured one is
built with the plan.
"""

from __future__ import annotations

import dataclasses
import gc

import torch
import torch.distributed as dist

from ..corpus import heldout_sequences
from ..placement import plan_placement, save_plan
from ..quantize import expert_importance
from ..telemetry import MoERecorder
from .config import Run
from .data import heldout_corpus
from .framework import Framework
from .quality import evaluate

__all__ = ["CALIBRATION_SEQS", "calibration_sequences", "calibrate_placement"]

CALIBRATION_SEQS = 4  # sequences per rank


def calibration_sequences(run: Run, rank: int, world: int) -> torch.Tensor:
    """[CALIBRATION_SEQS, prompt_len + 1] int64 calibration text of this rank (see the module
    docstring)."""
    cfg = run.config
    corpus = heldout_corpus(run)
    if corpus is None:
        gen = torch.Generator().manual_seed(0xCA1 + rank)
        return torch.randint(0, run.model.vocab_size, (CALIBRATION_SEQS, cfg.prompt_len + 1),
                             generator=gen)
    domain = cfg.calibration_domain or "prose"
    count = CALIBRATION_SEQS * world
    return heldout_sequences(corpus, domain, count, cfg.prompt_len)[rank::world]


def calibrate_placement(framework: Framework, setup, run: Run, command: list[str]) -> Run:
    """``run`` with ``plans`` from a calibration pass (collective: every rank calls it)."""
    cfg = run.config
    model = framework.build_model(
        run.model, setup, router="topk", router_params=None, load_scope="local",
        dispatcher=cfg.dispatcher, checkpoint=cfg.checkpoint,
    )
    recorder = MoERecorder(setup.device, rank=setup.rank, ep_rank=setup.ep_rank,
                           ep_group=setup.ep_group, nvtx_ranges=False)
    framework.instrument(model, recorder)
    experts = framework.expert_modules(model)  # unreplicated: slot == logical expert
    squares, hooks = _input_square_sums(experts)
    try:
        evaluate(model, calibration_sequences(run, setup.rank, setup.world_size), recorder=recorder)
    finally:
        for hook in hooks:
            hook.remove()
    E = run.model.num_experts
    scores = {
        (layer, expert): expert_importance([module.linear_fc1.weight],
                                           squares[(layer, expert)].sqrt())
        if (layer, expert) in squares else 0.0
        for layer, slots in experts.items() for expert, module in slots.items()
    }
    local: dict[int, torch.Tensor] = {}
    for record in recorder.records():
        row = local.setdefault(record["layer"], torch.zeros(E, dtype=torch.float64))
        for expert, tokens in zip(record["local_experts"], record["tokens_per_expert"]):
            row[expert] += tokens
    parts = [(local, scores)]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (local, scores))
    loads = {layer: sum(p[layer] for p, _ in parts) for layer in sorted(parts[0][0])}
    gathered = {key: value for _, part in parts for key, value in part.items()}
    importance = {
        layer: torch.tensor([gathered[(layer, e)] for e in range(E)], dtype=torch.float64)
        for layer in loads
    }
    del model, recorder, experts
    gc.collect()
    slots = E + cfg.redundant * run.ep
    plans = {layer: plan_placement(load, slots, run.ep) for layer, load in loads.items()}
    if setup.rank == 0:
        domain = (cfg.calibration_domain or "prose") if cfg.checkpoint else "random token ids"
        save_plan(run.out.with_suffix(".plan.json"), plans, {
            "model": run.model.name,
            "data": f"{CALIBRATION_SEQS * setup.world_size} x {cfg.prompt_len} tokens of {domain}",
            "command": " ".join(command),
            "loads": {str(layer): load.tolist() for layer, load in loads.items()},
            "importance": {str(layer): v.tolist() for layer, v in importance.items()},
        })
    return dataclasses.replace(run, plans=plans, importance=importance)


def _input_square_sums(experts: dict) -> tuple[dict, list]:
    """Forward pre-hooks on every expert's ``linear_fc1`` accumulating the per-feature sum of
    squares of its inputs ([in] float64, keyed (layer, slot)); (sums, hook handles)."""
    sums: dict = {}
    hooks = []
    for layer, slots in experts.items():
        for slot, module in slots.items():
            def hook(_module, args, key=(layer, slot)):
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).to(torch.float64)
                sums[key] = sums.get(key, 0.0) + (x * x).sum(dim=0).cpu()
            hooks.append(module.linear_fc1.register_forward_pre_hook(hook))
    return sums, hooks
