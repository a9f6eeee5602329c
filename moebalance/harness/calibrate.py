"""``--replicate auto``: plan a replica placement on the run's own calibration pass.

The unreplicated model (vanilla top-k) runs teacher-forced over calibration text: held-out
windows of ``calibration_domain`` for a trained byte-level model (4 sequences per rank of
``prompt_len`` tokens; the domain the measured prompts come from may differ, which is where a
static placement is tested), random token ids for a randomly initialised one. Every rank's
recorder counts the tokens each of its experts received; one all-gather gives every rank the
same per-layer loads [E], from which each computes the same plan
(``moebalance.placement.plan_placement``, ``redundant`` extra slots per rank), saved beside the
run's output with its provenance. The calibration model is then dropped and the measured one is
built with the plan.
"""

from __future__ import annotations

import dataclasses
import gc

import torch
import torch.distributed as dist

from ..corpus import heldout_sequences
from ..placement import plan_placement, save_plan
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
    evaluate(model, calibration_sequences(run, setup.rank, setup.world_size), recorder=recorder)
    E = run.model.num_experts
    local: dict[int, torch.Tensor] = {}
    for record in recorder.records():
        row = local.setdefault(record["layer"], torch.zeros(E, dtype=torch.float64))
        for expert, tokens in zip(record["local_experts"], record["tokens_per_expert"]):
            row[expert] += tokens
    parts = [local]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    loads = {layer: sum(p[layer] for p in parts) for layer in sorted(parts[0])}
    del model, recorder
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
        })
    return dataclasses.replace(run, plans=plans)
