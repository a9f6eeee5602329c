#!/usr/bin/env python
"""Train the small GPT-MoE (``moebalance/configs/models/tiny.yaml``) with Megatron-Core on CPU
and write the checkpoint the harness serves by default (``moebalance/checkpoints/tiny-moe/``).

    python scripts/train_tiny.py                        # default corpus, ~5 min on 2 cores
    python scripts/train_tiny.py --corpus ../shared/data/corpus --out /tmp/my-moe

The model is the very GPTModel that ``scripts/infer.py`` builds (``megatron_patch.model``), at
world size 1 and EP 1 on gloo, with Megatron's stock ``TopKRouter`` and its auxiliary
load-balancing loss (``moe_router_load_balancing_type="aux_loss"``, ``moe_aux_loss_coeff``),
small as in real models, so that the learned routing stays imbalanced. Optimiser: torch AdamW on
``model.parameters()`` (float32 master weights), cosine schedule with warm-up, gradient clipping.
Byte-level tokens (vocabulary 256); corpus from ``moebalance.corpus`` (default: Python's
documentation topics as prose and the standard library sources as code; ``--corpus DIR``: one
domain per text file). Deterministic for a given ``--seed`` (single process, fixed thread count).

Writes to ``--out``: ``model.safetensors`` (bf16, canonical Megatron keys, see
``megatron_patch.model.save_checkpoint``), ``config.yaml`` (the model config, dtype float32 at
load) and ``MODEL_CARD.md`` with the command, corpus, steps, final train loss, held-out
perplexity / accuracy per domain, per-layer routing imbalance (max / mean expert load) per
domain, and wall time; also ``metrics.json`` with the same figures (the tests read it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from moebalance.config import ConfigError  # noqa: E402
from moebalance.corpus import (  # noqa: E402
    VOCAB_SIZE,
    Corpus,
    default_corpus,
    heldout_sequences,
    load_corpus_dir,
    sample_batch,
)
from moebalance.harness import cli  # noqa: E402
from moebalance.harness.memory import weight_count  # noqa: E402
from moebalance.harness.report import check_writable, write_text_atomic  # noqa: E402
from moebalance.model_config import TRAINED_CHECKPOINT_DIR, load_model_config  # noqa: E402

PROG = "train_tiny.py"
DEFAULT_OUT = TRAINED_CHECKPOINT_DIR
EVAL_SEQS = 48  # held-out sequences per domain
EVAL_LEN = 128  # tokens per held-out sequence
OUTPUT_FILES = ("model.safetensors", "config.yaml", "MODEL_CARD.md", "metrics.json")

# Upper bounds on the options, far past any useful value (the defaults: 400 steps of 16 x 128
# tokens on 2 threads, ~5 min), so that a typo is a one-line error rather than a run that
# exhausts memory or never ends.
MAX_STEPS = 1_000_000  # ~9 days at the default step time
MAX_BATCH = 1024
MAX_TOKENS_PER_STEP = 32768  # --batch x --seq-len: 16 times the default step's activations
MAX_THREADS = 1024  # torch.set_num_threads crashes the process far above this
MAX_EVAL_SEQS = 4096  # per domain
MAX_LR = 1.0  # AdamW diverges long before
MAX_AUX_LOSS_COEFF = 100.0  # real models use 1e-3 to 1e-2
SEED_LIMIT = 2**63  # the model's init_seed + --seed must stay below it
MAX_PARAMETERS = 10**9  # ~16 GB of float32 weights, gradients and AdamW moments on the CPU


def fail(message: str) -> None:
    """Exit 2 with one line on stderr (``moebalance.harness.cli.fail``)."""
    cli.fail(PROG, message)


def _check_output_dir(out: Path) -> None:
    """Exit 2 unless ``out`` is (or can be created as) a folder where every output file can
    be written: checked before any training."""
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a directory (the checkpoint folder)")
    blocked = next((d for d in out.parents if d.exists() and not d.is_dir()), None)
    if blocked is not None:
        fail(f"--out {out}: {blocked} is a file, not a directory")
    try:
        check_writable(out / OUTPUT_FILES[0])  # creates the folder if missing
    except OSError as err:
        fail(f"--out {out}: cannot write there ({err.strerror or err})")
    for name in OUTPUT_FILES:
        target = out / name
        if target.is_dir():
            fail(f"--out {out}: {name} there is a directory; it must be a writable file")
        if target.exists() and not os.access(target, os.W_OK):
            fail(f"--out {out}: {name} there is not writable")


def _load_corpus(path: str, seq_len: int) -> Corpus:
    """The ``--corpus`` folder, loaded and checked (exit 2 naming the option when it is
    missing, unreadable, not a folder, or too small for the split, --seq-len or evaluation)."""
    if not path:
        fail("--corpus must be a folder of text files (one domain per file), got ''")
    root = Path(path)
    if not root.exists():
        fail(f"--corpus {root}: not found (a folder of text files, one domain per file)")
    if not root.is_dir():
        fail(f"--corpus {root}: not a directory (a folder of text files, one domain per file)")
    try:
        corpus = load_corpus_dir(root)
    except (ValueError, OSError, RuntimeError) as err:
        message = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        for prefix in (f"corpus {root.name}: ", f"corpus {root}: ", f"corpus {root} "):
            message = message.removeprefix(prefix)  # the core's own prefix
        where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
        fail(f"--corpus {root}: {message}{where}")
    for domain in corpus.domains:
        if corpus.train[domain].numel() < seq_len + 2:
            fail(
                f"--corpus {root}: domain {domain!r} has {corpus.train[domain].numel()} bytes of "
                f"training text; --seq-len {seq_len} needs at least {seq_len + 2}"
            )
        if corpus.heldout[domain].numel() < EVAL_LEN + 1:
            fail(
                f"--corpus {root}: domain {domain!r} has {corpus.heldout[domain].numel()} bytes "
                f"of held-out text; evaluation needs at least {EVAL_LEN + 1}"
            )
    return corpus


def parse_args(argv=None) -> argparse.Namespace:
    """Options, validated before any work (exit 2 with one line on stderr on bad input)."""
    p = cli.OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="model preset or YAML (default: %(default)s)")
    p.add_argument(
        "--corpus", default=None,
        help="folder of text files, one domain per file (default: Python's docs and stdlib)",
    )
    p.add_argument(
        "--out", default=str(DEFAULT_OUT),
        help="output folder, created if missing and checked writable before training "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--steps", type=int, default=400,
        help=f"optimiser steps, 1 to {MAX_STEPS} (default: %(default)s)",
    )
    p.add_argument(
        "--batch", type=int, default=16,
        help=f"sequences per step, 1 to {MAX_BATCH} (default: %(default)s)",
    )
    p.add_argument(
        "--seq-len", type=int, default=128,
        help="tokens per sequence, at most the model's max_sequence_length; "
        f"--batch x --seq-len <= {MAX_TOKENS_PER_STEP} (default: %(default)s)",
    )
    p.add_argument(
        "--lr", type=float, default=3e-3,
        help=f"peak learning rate, in (0, {MAX_LR}] (default: %(default)s)",
    )
    p.add_argument(
        "--warmup", type=int, default=30, help="warm-up steps, >= 0 (default: %(default)s)"
    )
    p.add_argument(
        "--aux-loss-coeff", type=float, default=1e-2,
        help=f"Megatron moe_aux_loss_coeff, in [0, {MAX_AUX_LOSS_COEFF}] (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0,
        help="data and init seed, >= 0 (added to the model's init_seed) (default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=2,
        help=f"torch threads, 1 to {MAX_THREADS} (default: %(default)s)",
    )
    p.add_argument(
        "--eval-seqs", type=int, default=EVAL_SEQS,
        help=f"held-out sequences per domain, 1 to {MAX_EVAL_SEQS} (default: %(default)s)",
    )
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines (%(default)s)")
    args = p.parse_args(argv)
    bounds = {
        "steps": (1, MAX_STEPS), "batch": (1, MAX_BATCH), "seq_len": (1, MAX_TOKENS_PER_STEP),
        "threads": (1, MAX_THREADS), "eval_seqs": (1, MAX_EVAL_SEQS), "warmup": (0, MAX_STEPS),
        "log_every": (1, MAX_STEPS),
    }
    for name, (low, high) in bounds.items():
        value = getattr(args, name)
        if not low <= value <= high:
            fail(f"--{name.replace('_', '-')} must be an integer in [{low}, {high}], got {value}")
    if not (math.isfinite(args.lr) and 0 < args.lr <= MAX_LR):
        fail(f"--lr must be a finite number > 0 and <= {MAX_LR}, got {args.lr}")
    if not (math.isfinite(args.aux_loss_coeff) and 0 <= args.aux_loss_coeff <= MAX_AUX_LOSS_COEFF):
        fail(
            f"--aux-loss-coeff must be a finite number >= 0 and <= {MAX_AUX_LOSS_COEFF}, "
            f"got {args.aux_loss_coeff}"
        )
    if args.batch * args.seq_len > MAX_TOKENS_PER_STEP:
        fail(
            f"--batch x --seq-len must be <= {MAX_TOKENS_PER_STEP} tokens per step, got "
            f"{args.batch} x {args.seq_len} = {args.batch * args.seq_len}"
        )
    try:
        cfg = load_model_config(args.config)
    except ConfigError as err:
        fail(f"--config: {err}")
    if cfg.vocab_size != VOCAB_SIZE:
        fail(f"--config: the model's vocab_size must be {VOCAB_SIZE} (byte level), got {cfg.vocab_size}")
    params = weight_count(cfg)
    if params > MAX_PARAMETERS:
        fail(
            f"--config {args.config}: about {params / 1e9:.1f} B parameters; this CPU trainer "
            f"takes models of at most {MAX_PARAMETERS / 1e9:.0f} B"
        )
    if args.seq_len > cfg.max_sequence_length:
        fail(
            f"--seq-len must be <= the model's max_sequence_length {cfg.max_sequence_length} "
            f"(--config {args.config}), got {args.seq_len}"
        )
    if not 0 <= args.seed < SEED_LIMIT - cfg.init_seed:
        fail(
            f"--seed must be an integer in [0, {SEED_LIMIT - 1 - cfg.init_seed}] (the model's "
            f"init_seed {cfg.init_seed} + --seed < 2**63), got {args.seed}"
        )
    args.model = cfg.replace(skew="none", dtype="float32", init_seed=cfg.init_seed + args.seed)
    args.corpus_data = _load_corpus(args.corpus, args.seq_len) if args.corpus is not None else None
    _check_output_dir(Path(args.out))
    return args


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_report(model, corpus, cfg, eval_seqs: int) -> dict:
    """Per domain: perplexity, accuracy, and per MoE layer the expert loads and max / mean."""
    from megatron_patch.quality import record_expert_loads
    from moebalance.harness.quality import evaluate, quality_from_sums

    out = {}
    for domain in corpus.domains:
        seqs = heldout_sequences(corpus, domain, eval_seqs, EVAL_LEN)
        with record_expert_loads(model) as loads:
            sums = evaluate(model, seqs)
        q = quality_from_sums(sums)
        q["expert_load"] = {str(k): (v / v.sum()).tolist() for k, v in sorted(loads.items())}
        q["imbalance"] = {
            str(k): float(v.max() / v.mean()) for k, v in sorted(loads.items())
        }
        out[domain] = q
    return out


def model_card(args, cfg, corpus, history, report, wall_s, params, size_bytes, command) -> str:
    domains = corpus.domains
    layers = sorted(report[domains[0]]["imbalance"], key=int)
    lines = [
        f"# {cfg.name}: a small GPT-MoE trained by this project",
        "",
        "Generated by `scripts/train_tiny.py` (do not edit by hand; rerun the command).",
        "",
        "## Command",
        "",
        f"```\n{command}\n```",
        "",
        "## Model",
        "",
        f"- Megatron-Core GPTModel, {cfg.num_layers} layers, all MoE, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads, {cfg.num_experts} experts of width "
        f"{cfg.expert_ffn_hidden_size}, top-{cfg.topk} ({cfg.score_function}), "
        f"{cfg.normalization}, {cfg.activation}, RoPE; byte-level vocabulary {cfg.vocab_size}.",
        f"- {params:,} parameters; `model.safetensors` in bf16, {size_bytes / 2**20:.2f} MiB.",
        f"- Router: Megatron's TopKRouter with aux load-balancing loss, "
        f"moe_aux_loss_coeff = {args.aux_loss_coeff}.",
        "",
        "## Training",
        "",
        f"- Corpus: `{corpus.name}` "
        + (
            "(Python's `pydoc_data.topics` as prose, the `.py` files directly under the standard "
            "library directory as code; "
            if corpus.name == "default"
            else "(one domain per file; "
        )
        + "document i held out when i % 10 == 9).",
        "- Documents (train / held out): "
        + ", ".join(
            f"{d} {corpus.documents[d][0]} / {corpus.documents[d][1]} "
            f"({corpus.train[d].numel() / 1e6:.2f} MB / {corpus.heldout[d].numel() / 1e6:.2f} MB)"
            for d in domains
        ),
        f"- {args.steps} steps x {args.batch} sequences x {args.seq_len} tokens "
        f"({args.steps * args.batch * args.seq_len / 1e6:.2f} M tokens), AdamW (lr {args.lr}, "
        f"cosine, warm-up {args.warmup}, weight decay 0.01, clip 1.0), seed {args.seed}, "
        f"{args.threads} threads.",
        f"- Final train loss (mean of the last 20 steps, nats/byte, LM loss only): "
        f"{history['final_train_loss']:.4f} (first step {history['loss'][0]:.4f}).",
        f"- Wall time: {wall_s:.0f} s on {os.cpu_count()} CPU cores "
        f"(training {history['train_s']:.0f} s).",
        "",
        f"## Held-out quality ({args.eval_seqs} sequences x {EVAL_LEN} tokens per domain, "
        "bf16 weights, vanilla top-k)",
        "",
        "| domain | perplexity | next-token accuracy | tokens |",
        "|---|---|---|---|",
    ]
    for d in domains:
        r = report[d]
        lines.append(f"| {d} | {r['perplexity']:.3f} | {r['accuracy']:.4f} | {r['tokens']} |")
    lines += [
        "",
        "## Routing imbalance on held-out text (max / mean expert load, vanilla top-k)",
        "",
        "Real models: about 1.1-1.3 (Mixtral), 2.5-7.8 (OLMoE).",
        "",
        "| layer | " + " | ".join(domains) + " |",
        "|---|" + "---|" * len(domains),
    ]
    for layer in layers:
        lines.append(
            f"| {layer} | " + " | ".join(f"{report[d]['imbalance'][layer]:.2f}" for d in domains) + " |"
        )
    lines += [
        "",
        "Expert load shares per layer and domain are in `metrics.json`.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = " ".join(
        ["python scripts/train_tiny.py"]
        + [shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)]
    )
    for pattern in (r"Transformer Engine and Apex", r"Apex is not installed", r"absl",
                    r"full scope is deprecated", r"`torch\.distributed"):
        warnings.filterwarnings("ignore", message=pattern)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    corpus = args.corpus_data if args.corpus_data is not None else default_corpus()
    cfg = args.model

    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_patch.inject import moe_layers, swap_routers
    from megatron_patch.model import (
        build_model,
        destroy_distributed,
        init_distributed,
        load_checkpoint,
        save_checkpoint,
    )

    init_distributed(1)
    model = build_model(cfg, ep_size=1, router="topk")
    config = next(iter(moe_layers(model))).router.config
    # Train with Megatron's own router and aux loss (the balancing routers are inference-only).
    config.moe_router_load_balancing_type = "aux_loss"
    config.moe_aux_loss_coeff = args.aux_loss_coeff
    swap_routers(model, TopKRouter)
    model.train()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    S = args.seq_len
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]
    positions = torch.arange(S).unsqueeze(0).expand(args.batch, S)
    mask = mask.expand(args.batch, 1, S, S)
    losses = []
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = sample_batch(corpus, args.batch, S, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        logits = model(batch[:, :-1], positions, mask)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # the routers' aux loss rides on their activations' gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.log_every == 0 or step == args.steps - 1:
            print(
                f"{PROG}: step {step:5d} loss {losses[-1]:.4f} lr {lr_at(step, args):.2e} "
                f"{time.perf_counter() - t0:6.1f} s",
                file=sys.stderr, flush=True,
            )
    train_s = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_cfg = dataclasses.replace(cfg, name=out.name)  # the checkpoint folder names the model
    # bf16 weights on disk (about half the size); served in the config's float32.
    model.to(torch.bfloat16)
    save_checkpoint(model, out / "model.safetensors", save_cfg)
    write_text_atomic(out / "config.yaml", 
        "# Model config of the checkpoint beside it (written by scripts/train_tiny.py).\n"
        + yaml.safe_dump(dataclasses.asdict(save_cfg), sort_keys=False)
    )

    # Evaluate exactly what infer.py serves: the saved file loaded into a fresh float32 model
    # with the harness's vanilla router.
    eval_model = build_model(save_cfg, ep_size=1, router="topk")
    load_checkpoint(eval_model, out / "model.safetensors")
    report = heldout_report(eval_model, corpus, save_cfg, args.eval_seqs)
    wall_s = time.perf_counter() - started
    history = {
        "loss": losses,
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_s": train_s,
    }
    params = sum(p.numel() for p in eval_model.parameters())
    size = (out / "model.safetensors").stat().st_size
    write_text_atomic(
        out / "MODEL_CARD.md",
        model_card(args, save_cfg, corpus, history, report, wall_s, params, size, command),
    )
    metrics = {
        "command": command,
        "corpus": corpus.name,
        "steps": args.steps,
        "final_train_loss": history["final_train_loss"],
        "loss_curve": losses[:: max(1, len(losses) // 100)],
        "heldout": report,
        "eval_seqs": args.eval_seqs,
        "eval_len": EVAL_LEN,
        "wall_s": wall_s,
        "train_s": train_s,
        "parameters": params,
        "checkpoint_bytes": size,
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    for d, r in report.items():
        imb = ", ".join(f"{v:.2f}" for v in r["imbalance"].values())
        print(
            f"{PROG}: {d}: perplexity {r['perplexity']:.3f} accuracy {r['accuracy']:.4f} "
            f"imbalance per layer [{imb}]",
            file=sys.stderr, flush=True,
        )
    print(f"{PROG}: wrote {out} in {wall_s:.0f} s", file=sys.stderr, flush=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
