#!/usr/bin/env python
"""Expert-parallel MoE inference under a balancing router: per-rank load, straggler time,
latency and held-out quality, with Megatron-Core or DeepSpeed.

    torchrun --nproc-per-node 2 scripts/infer.py --router laser --compare
    torchrun --nproc-per-node 2 scripts/infer.py --run-config demo --set router_args.capacity_factor=1.25
    torchrun --nproc-per-node 2 scripts/infer.py --framework deepspeed --replicate auto --redundant 2

Each rank serves its own batch of prompts while the experts of every MoE layer are spread over
the EP group; all ranks stay in lockstep (same padded shapes, same step count). One generation
is a prefill and ``gen_len - 1`` greedy decode steps on a static KV cache; ``warmup``
generations run first and are left out of every figure. ``--compare`` runs vanilla top-k and
then ``--router`` in the same model (routers swapped, weights unchanged). After each router,
every rank evaluates its share of the held-out text teacher-forced with that router active.

Rank 0 prints the tables and writes the JSON report (``moebalance.harness.report``) after every
router, atomically. Bad options exit 2 with one line before any process group starts (see
``entry`` for failures after it). The run's fields: ``moebalance.harness.config.RunConfig``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout too

from moebalance.config import ConfigError  # noqa: E402
from moebalance.expert_cache import attach_caches, cache_stats  # noqa: E402
from moebalance.harness import Run, get_framework  # noqa: E402
from moebalance.harness.framework import quiet_import_warnings  # noqa: E402
from moebalance.harness.budget import apply_memory_budget  # noqa: E402
from moebalance.harness.calibrate import calibrate_placement  # noqa: E402
from moebalance.harness.cli import build_parser, run_from_args  # noqa: E402
from moebalance.harness.cli import fail as cli_fail  # noqa: E402
from moebalance.harness.data import lockstep_batch, make_prompts, quality_sequences  # noqa: E402
from moebalance.harness.generate import measure  # noqa: E402
from moebalance.harness.quality import heldout_quality  # noqa: E402
from moebalance.harness.rebalance import Rebalancer  # noqa: E402
from moebalance.harness.record import RoutingRecording  # noqa: E402
from moebalance.harness.report import Report, claim_run_outputs, trace_path  # noqa: E402
from moebalance.harness.startup import agree_across_ranks, pin_to_core  # noqa: E402
from moebalance.harness.startup import release_helper_threads  # noqa: E402
from moebalance.parallel import RendezvousError  # noqa: E402
from moebalance.runner import NonFiniteLogitsError  # noqa: E402
from moebalance.telemetry import MoERecorder, gather_to_rank0  # noqa: E402

PROG = "infer.py"

def fail(message: str) -> None:
    """Exit 2 with one line on stderr, printed once (``moebalance.harness.cli.fail``)."""
    cli_fail(PROG, f"{message} (see --help)")


def parse_args(argv: Optional[list[str]] = None) -> Run:
    """The validated run; exits 2 with a one-line error on bad input."""
    parser = build_parser(PROG, __doc__.split("\n\n")[0])
    parser.error = fail  # argparse's own errors: the same line, with the --help hint
    try:
        run = run_from_args(parser, argv)
    except ConfigError as err:
        fail(str(err).replace("\n", " "))
    return run


def claim(run: Run, command: list[str]) -> None:
    """Rank 0, the one that writes, claims ``--out`` and ``--profile`` before any work starts."""
    if os.environ.get("RANK", "0") == "0":
        try:
            claim_run_outputs(run, command)
        except (ConfigError, OSError) as err:
            fail(str(err))


def main(argv: Optional[list[str]] = None) -> int:
    run = parse_args(argv)
    command = [PROG, *(sys.argv[1:] if argv is None else argv)]
    claim(run, command)
    cfg, model_cfg = run.config, run.model
    pinning = pin_to_core(cfg.pin_cores)  # the model thread's own core, before any work
    framework = get_framework(cfg.framework)
    quiet_import_warnings()

    setup = framework.init_distributed(run.ep, cfg.timeout)
    agree_across_ranks(run)  # every rank started with the same options, or a one-line error
    rank0 = setup.rank == 0
    if rank0:
        print(
            f"{PROG}: {model_cfg.name} ({model_cfg.num_experts} experts, top-{model_cfg.topk}, "
            f"{len(model_cfg.moe_layer_indices)} MoE layers, skew {model_cfg.skew}), "
            f"{framework.name}, world {setup.world_size}, EP {setup.ep_size}, {setup.backend} on "
            f"{setup.device.type}, {cfg.dispatcher}, {run.num_slots} expert slots per layer, "
            f"routers {' then '.join(run.routers)}",
            file=sys.stderr, flush=True,
        )
    if cfg.replicate:  # plan replicas on a calibration pass of the unreplicated model first
        run = calibrate_placement(framework, setup, run, command)
    first = run.routers[0]
    model = framework.build_model(
        model_cfg, setup, router=first, router_params=run.params_of(first),
        load_scope=run.load_scope_of(first), dispatcher=cfg.dispatcher, checkpoint=cfg.checkpoint,
        placement=run.plans, replicas=run.replicas,
    )
    memory = apply_memory_budget(framework, model, run) if cfg.memory_budget else None
    release_helper_threads(pinning)  # gloo's threads may use every core again
    recorder = MoERecorder(
        setup.device, rank=setup.rank, ep_rank=setup.ep_rank, ep_group=setup.ep_group,
        nvtx_ranges=cfg.nvtx,
    )
    framework.instrument(model, recorder)
    rebalancer = Rebalancer(framework, model, run, setup, recorder) if cfg.rebalance_every else None
    prompts = make_prompts(run, setup.rank)
    ids, pad = lockstep_batch(prompts, setup.device)
    eval_sequences = quality_sequences(run, setup.rank, setup.world_size)
    recording = (RoutingRecording(run, setup, framework, model, recorder, prompts, eval_sequences)
                 if cfg.record_routing else None)
    report = Report(run, setup, command, int(ids.shape[1]), memory) if rank0 else None

    for i, router in enumerate(run.routers):
        if i > 0:  # same model, same prompts: only the routing decision changes
            framework.swap_router(model, router, run.params_of(router), run.load_scope_of(router))
        if cfg.cache_experts:  # a fresh simulated cache per router; aware: the served router
            attach_caches(model, cfg.cache_experts, aware=cfg.cache_aware and router == cfg.router)
        local = measure(
            framework, model, ids, pad, gen_len=cfg.gen_len, warmup=cfg.warmup, recorder=recorder,
            on_step=rebalancer.after_step if rebalancer else None, label=router,
            profile=trace_path(cfg.profile, router, setup.rank) if cfg.profile else None,
        )
        local["rebalancing"] = rebalancer.events if rebalancer else None
        local["pinning"] = pinning
        local["expert_cache"] = cache_stats(model) if cfg.cache_experts else None
        held_out = heldout_quality(model, eval_sequences, setup.device)  # this router active
        if recording:
            recording.save(router, PROG)  # collective
        per_rank = gather_to_rank0(local)
        if rank0:
            report.add(router, per_rank, held_out)
            report.write(final=i == len(run.routers) - 1)

    if rank0:
        print(report.text(), flush=True)
        print(f"{PROG}: wrote {run.out}", file=sys.stderr, flush=True)
    framework.destroy_distributed()
    return 0


def entry() -> int:
    """Run ``main``; a failure on any rank exits at once (no collective teardown that would wait
    for the others), so torchrun stops the job: options the ranks disagree on exit 2 with one
    line, non-finite router logits and a process group that never starts (a rank missing at
    rendezvous) exit 1 with one line per rank, anything else prints its traceback and exits 1."""
    try:
        return main()
    except SystemExit:
        raise
    except ConfigError as err:  # found after start-up: the ranks' options differ
        if os.environ.get("RANK", "0") == "0":
            print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        os._exit(2)
    except (NonFiniteLogitsError, RendezvousError) as err:
        print(f"{PROG}: rank {os.environ.get('RANK', '0')}: error: {err}", file=sys.stderr, flush=True)
        os._exit(1)
    except BaseException:
        rank = os.environ.get("RANK", "0")
        print(f"{PROG}: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(entry())
