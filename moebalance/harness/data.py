"""What each rank serves: its prompts, padded to one shape shared by every rank, and its share
of the held-out text that quality is measured on.

A trained byte-level checkpoint gets real text (``moebalance.corpus``: windows of the held-out
documents, domains taking turns), so routing is the model's real routing; a randomly
initialised model gets random token ids.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from ..corpus import VOCAB_SIZE, Corpus, default_corpus, heldout_sequences
from .config import Run

__all__ = ["heldout_corpus", "make_prompts", "lockstep_batch", "quality_sequences"]


@functools.lru_cache(maxsize=1)
def _default_corpus() -> Corpus:
    return default_corpus()


def heldout_corpus(run: Run) -> Optional[Corpus]:
    """The default corpus when the model is a trained byte-level checkpoint, else None."""
    if run.config.checkpoint is None or run.model.vocab_size != VOCAB_SIZE:
        return None
    return _default_corpus()


def make_prompts(run: Run, rank: int) -> list[torch.Tensor]:
    """This rank's ``batch`` prompts (1-D int64 each), seeded by (seed, global rank), so every
    rank serves different data; with ``prompt_domain`` all from that domain. With ``uneven``
    lengths vary per prompt and per rank in (prompt_len / 2, prompt_len]."""
    cfg = run.config
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    spread = max(1, cfg.prompt_len // 2)
    corpus = heldout_corpus(run)
    prompts = []
    for b in range(cfg.batch):
        length = cfg.prompt_len - ((7 * rank + 3 * b) % spread if cfg.uneven else 0)
        if corpus is None:
            prompts.append(torch.randint(0, run.model.vocab_size, (length,), generator=gen))
            continue
        domain = cfg.prompt_domain or corpus.domains[(rank + b) % len(corpus.domains)]
        text = corpus.heldout[domain]
        start = int(torch.randint(0, text.numel() - length, (1,), generator=gen))
        prompts.append(text[start : start + length].long())
    return prompts


def lockstep_batch(
    prompts: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad the prompts to the longest prompt on ANY rank (all-reduce MAX): every rank then
    runs identical shapes and step counts (the dispatchers need it; all-gather needs equal
    token counts). Returns (ids [B, S] int64, padding mask [B, S] bool, True = padding)."""
    longest = torch.tensor([max(len(p) for p in prompts)], dtype=torch.int64, device=device)
    if dist.is_initialized():
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    S = int(longest.item())
    ids = torch.zeros(len(prompts), S, dtype=torch.int64)
    pad = torch.ones(len(prompts), S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = p
        pad[b, S - len(p):] = False
    return ids.to(device), pad.to(device)


def quality_sequences(run: Run, rank: int, world: int) -> dict[str, torch.Tensor]:
    """{domain: [eval_seqs, eval_len + 1] int64} held-out sequences for this rank: the
    domain's ``eval_seqs * world`` evenly spaced windows, rank r taking every world-th from r
    (the same count on every rank: lockstep). Empty without a trained byte-level model or with
    ``eval_seqs`` 0."""
    corpus = heldout_corpus(run)
    if corpus is None or run.config.eval_seqs == 0:
        return {}
    count, length = run.config.eval_seqs * world, run.config.eval_len
    return {
        d: heldout_sequences(corpus, d, count, length)[rank::world] for d in corpus.domains
    }
