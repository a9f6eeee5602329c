"""``--record-routing FILE``: each MoE layer's per-token expert choices of a run, saved per
router for ``scripts/locality.py`` (``moebalance.routing_record``).

A ``RoutingCollector`` is attached to the instrumented model (it follows the recorder to leave
warm-up steps out); the prompts and the held-out rows are labelled with their text domain.
After each router's measured generation and held-out evaluation, ``save`` gathers every
rank's sequences on rank 0 (collective), which writes ``record_path(FILE, router, routers)``
(claimed at start by ``report.claim_run_outputs``), and the collector starts afresh.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..routing_record import RoutingCollector, expert_bytes_of, find_domains, record_path
from .config import Run
from .data import heldout_corpus

__all__ = ["RoutingRecording"]


class RoutingRecording:
    """The routing record of one run (every rank builds one; ``save`` is collective)."""

    def __init__(self, run: Run, setup: Any, framework: Any, model: torch.nn.Module,
                 recorder: Any, prompts: list[torch.Tensor], eval_sequences: dict) -> None:
        cfg = run.config
        self.run, self.rank0 = run, setup.rank == 0
        self.collector = RoutingCollector(rank=setup.rank)
        self.collector.attach(model, recorder)  # after framework.instrument
        for domain, rows in eval_sequences.items():
            self.collector.label(domain, rows)
        corpus = heldout_corpus(run)
        if corpus is not None:  # each prompt is a window of one domain's held-out text
            for prompt, domain in zip(prompts, find_domains(prompts, corpus.heldout)):
                if domain is not None:
                    self.collector.label(domain, [prompt])
        self.header = {
            "model": run.model.name, "framework": cfg.framework, "ep": setup.ep_size,
            "world_size": setup.world_size, "expert_bytes": expert_bytes_of(framework, model),
            "prompts": {
                "seed": cfg.seed, "batch": cfg.batch, "prompt_len": cfg.prompt_len,
                "gen_len": cfg.gen_len, "uneven": cfg.uneven, "prompt_domain": cfg.prompt_domain,
                "eval_seqs": cfg.eval_seqs, "eval_len": cfg.eval_len, "warmup": cfg.warmup,
            },
        }

    def save(self, router: str, prog: str) -> None:
        """Gather this router's routing on rank 0 and write it there; then start afresh."""
        record = self.collector.gather(self.header)
        if self.rank0:
            path = record_path(self.run.config.record_routing, router, self.run.routers)
            record.save(path, overwrite=True)  # claimed at start
            print(f"{prog}: routing of {router} -> {path}", file=sys.stderr, flush=True)
        self.collector.clear()
