#!/usr/bin/env python
"""Calibrate LASER's parameters per MoE layer to a quality budget: the least expert-load
imbalance (MV) that costs at most a given perplexity increase (or next-token KL divergence per
layer) against vanilla top-k on held-out text of one domain.

    python scripts/calibrate_laser.py --model tiny-moe --domain prose --out laser.yaml
    python scripts/calibrate_laser.py --model fine-moe --kl-budget 0.002 --out laser-kl.yaml
    python scripts/calibrate_laser.py --ppl-budget 0.0025,0.005,0.01 --out 'laser-{budget}.yaml'
    torchrun --nproc-per-node 2 scripts/infer.py --router laser --router-args-file laser.yaml

Calibration set: ``--seqs`` held-out sequences of ``--domain``, teacher-forced in forward calls
of ``--chunk`` sequences (prefill-like: LASER balances the tokens of each call). MV of a layer:
the mean over the calls of max/mean - 1 of its expert loads.

Search. (1) Sweep: every setting of the grid (``--pool-sizes`` x ``--eps-high`` x
``--min-score-ratio`` x ``--top-m``) in every MoE layer with the other layers vanilla: the
layer's MV and the model's quality cost for each (L x G evaluations, the bulk of the time).
(2) Choice, per budget. ``--ppl-budget B`` (relative perplexity increase of the whole model,
default 0.005 = +0.5%): the combination of one setting per layer with the least sum of the
layers' MV whose summed costs (as NLL increases, log(1 + cost): additive for small changes)
stay within log(1 + B), found exactly over the layers' Pareto fronts; ``--kl-budget B`` (mean
KL(vanilla || calibrated) of the next-token distribution, nats per token, per layer): each
layer its lowest-MV setting whose KL, that layer alone changed, is at most B. (3) Check: the
combination runs on the calibration set and the limit is rescaled by budget / measured cost
(B, or L x B for KL: the layers' effects do not add exactly), bisecting between a limit that
fits and one that does not, for at most 8 limits; the fitting combination with the least summed
MV is kept (vanilla if none fits). Vanilla top-k (c = k) is always a candidate. Several
budgets (comma-separated) share one sweep and write one file each (``{budget}`` in ``--out``).

Expert parallelism: the search runs in this process at world size 1, where every expert is
local and LASER's loads (``load_scope`` local and global alike) are the loads of all the call's
tokens, which is also what MV counts. Serving at EP > 1 with ``load_scope`` local, each rank
balances its own tokens (with global, against the other ranks' loads too). Which tokens LASER
may move (shape test, pools, score floor) does not depend on the loads, so the quality cost
carries over; the MV reached depends on the tokens balanced per call: calibrate with
``--chunk`` x ``--seq-len`` near the tokens one rank routes per call when serving.

Output: a YAML mapping ``per_layer: {layer: {pool_size, eps_high, min_score_ratio}}`` (0-based
decoder layer indices, every MoE layer listed; a layer kept vanilla has pool_size = k) that
``--router-args-file`` and ``moebalance.config.LaserParams`` read, with provenance comments
(model, domain, budget, the measured figures, command, date, commit); ``--trace`` writes every
evaluation as JSON. Bad options exit 2 with one line before any work starts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moebalance.config import ConfigError, LaserParams  # noqa: E402
from moebalance.corpus import DEFAULT_DOMAINS  # noqa: E402
from moebalance.harness.cli import OneLineParser  # noqa: E402
from moebalance.harness.config import FRAMEWORKS  # noqa: E402
from moebalance.model_config import (  # noqa: E402
    ModelConfig,
    load_model_config,
    trained_checkpoint,
    trained_checkpoints,
)

PROG = "calibrate_laser.py"
#: the grid's defaults (``default_grid``): pools k+1 .. 2k (at most E), these thresholds
DEFAULT_EPS_HIGH = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)
DEFAULT_MIN_SCORE_RATIO = (0.0, 0.3, 0.5, 0.7)
DEFAULT_PPL_BUDGET = 0.005
#: MV and costs closer than this count as equal (float noise of one evaluation)
TIE = 1e-9


# ----------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class Setting:
    """One layer's LASER parameters. ``pool_size`` = k is vanilla top-k whatever the rest."""

    pool_size: int
    eps_high: float = 0.9
    min_score_ratio: float = 0.0
    top_m: Optional[int] = None

    def args(self, topk: int) -> dict:
        """The ``per_layer`` entry: {pool_size} for vanilla, else the fields that matter."""
        if self.pool_size == topk:
            return {"pool_size": self.pool_size}
        out = {"pool_size": self.pool_size, "eps_high": self.eps_high,
               "min_score_ratio": self.min_score_ratio}
        if self.top_m is not None:
            out["top_m"] = self.top_m
        return out


@dataclass(frozen=True)
class Measure:
    """One evaluation of a per-layer assignment: quality cost against vanilla (``cost``: the
    relative perplexity increase for a perplexity budget, the mean KL in nats per token for a
    KL budget), perplexity, mean KL(vanilla || this) per token, and each MoE layer's MV (mean
    over the forward calls of max/mean - 1 of its expert loads)."""

    cost: float
    perplexity: float
    kl: float
    mv: dict[int, float]


@dataclass(frozen=True)
class Trial:
    """One layer's setting and the Measure of the model with that layer alone changed."""

    layer: int
    setting: Setting
    measure: Measure


@dataclass
class Choice:
    """The outcome for one budget: chosen {layer: Trial} (the sweep trial of each layer's
    setting), the Measure of that combination run whole (``final``), and every combination
    evaluated on the way (``attempts``: [(limit, {layer: Setting}, Measure)])."""

    budget: float
    chosen: dict[int, Trial]
    final: Measure
    attempts: list = field(default_factory=list)


def units(cost: float, kind: str) -> float:
    """A cost in additive units: the increase of the mean next-token NLL (log(1 + relative
    perplexity increase)) for "ppl"; the KL itself for "kl"."""
    return math.log1p(cost) if kind == "ppl" else cost


def frontier(trials: Sequence[Trial], layer: int, kind: str) -> list[Trial]:
    """The trials no other trial beats on both cost and MV of ``layer``: cost ascending, MV
    strictly descending (equal MV: the cheaper; equal both: the earlier)."""
    ranked = sorted(range(len(trials)),
                    key=lambda i: (units(trials[i].measure.cost, kind), i))
    out: list[Trial] = []
    for i in ranked:
        t = trials[i]
        if not out or t.measure.mv[layer] < out[-1].measure.mv[layer] - TIE:
            out.append(t)
    return out


def allocate(fronts: dict[int, Sequence[Trial]], limit: float, kind: str) -> dict[int, Trial]:
    """One trial per layer minimising the sum of the layers' MV subject to the sum of their
    costs (``units``, each measured with that layer alone changed) being at most ``limit``;
    equal sums: the lower cost. Exact: the Pareto set of partial sums, merged layer by layer.
    Every front must hold a trial of cost <= 0 (vanilla) so that a limit >= 0 is feasible."""
    partial: list[tuple[float, float, dict]] = [(0.0, 0.0, {})]
    for layer, front in fronts.items():
        merged = sorted(
            ((c + units(t.measure.cost, kind), m + t.measure.mv[layer], {**a, layer: t})
             for c, m, a in partial for t in front),
            key=lambda x: (x[0], x[1]),
        )
        partial = []
        for entry in merged:  # keep the sums no cheaper one matches in MV
            if not partial or entry[1] < partial[-1][1] - TIE:
                partial.append(entry)
    fits = [p for p in partial if p[0] <= limit + TIE]
    if not fits:
        raise ValueError(f"no combination fits the limit {limit}")
    return min(fits, key=lambda p: (p[1], p[0]))[2]


def sweep(
    evaluate: Callable[[dict[int, Setting]], Measure],
    layers: Sequence[int],
    grid: Sequence[Setting],
    vanilla: Setting,
    *,
    log: Callable[[str], None] = lambda line: None,
) -> tuple[Measure, dict[int, list[Trial]]]:
    """(all-vanilla Measure, {layer: trials}): every setting of ``grid`` in each layer of
    ``layers`` with the other layers vanilla; each layer's list starts with vanilla."""
    base = evaluate({})
    trials: dict[int, list[Trial]] = {}
    for layer in layers:
        trials[layer] = [Trial(layer, vanilla, base)] + [
            Trial(layer, s, evaluate({layer: s})) for s in grid
        ]
        log(f"layer {layer}: {len(grid)} settings swept")
    return base, trials


def choose(
    evaluate: Callable[[dict[int, Setting]], Measure],
    base: Measure,
    trials: dict[int, list[Trial]],
    kind: str,
    budget: float,
    *,
    max_attempts: int = 8,
    log: Callable[[str], None] = lambda line: None,
) -> Choice:
    """The settings for one budget (see the module docstring), checked on the whole model.

    The choice depends on a limit: "ppl": the allocation (``allocate``) of at most the limit
    (NLL units) over the layers' fronts; "kl": each layer's lowest-MV setting whose KL, that
    layer alone changed, is at most the limit. The first limit is the budget itself (log(1 +
    B), or B per layer); each combination is then measured whole and the limit rescaled by
    budget / measured cost (down by at least 5% after an overshoot; the layers' effects do not
    add exactly), bisecting once a limit that fits and one that does not are known, for at
    most ``max_attempts`` limits. The fitting combination with the least summed MV is kept
    (vanilla when none fits)."""
    layers = list(trials)
    fronts = {layer: frontier(trials[layer], layer, kind) for layer in layers}
    target = units(budget, kind) * (1 if kind == "ppl" else len(layers))
    vanilla = {layer: trials[layer][0] for layer in layers}
    choice = Choice(budget, vanilla, base)
    best_mv = sum(base.mv[layer] for layer in layers)
    fits, fails = None, None  # the largest limit that fit, the smallest that did not
    seen: dict[tuple, Measure] = {}
    limit = units(budget, kind)
    for attempt in range(max_attempts):
        try:
            if kind == "ppl":
                chosen = allocate(fronts, limit, kind)
            else:
                chosen = {layer: allocate({layer: fronts[layer]}, limit, kind)[layer]
                          for layer in layers}
        except ValueError:  # nothing is cheap enough
            break
        settings = {layer: t.setting for layer, t in chosen.items()}
        key = tuple(sorted(settings.items()))
        fresh = key not in seen
        if fresh:
            seen[key] = evaluate(settings)
            choice.attempts.append((limit, settings, seen[key]))
        measure = seen[key]
        spent = units(measure.cost if kind == "ppl" else measure.kl, kind)
        ok = spent <= target + TIE
        if fresh:
            log(f"budget {budget:g}: combination {len(choice.attempts)} (limit {limit:.5f}): "
                f"cost {measure.cost:+.5f}, {'fits' if ok else 'over'}; MV " + ", ".join(
                    f"{layer}: {measure.mv[layer]:.3f}" for layer in layers))
        if ok:
            mv = sum(measure.mv[layer] for layer in layers)
            if mv < best_mv - TIE or choice.final is base:
                choice.chosen, choice.final, best_mv = chosen, measure, mv
            fits = limit if fits is None else max(fits, limit)
        else:
            fails = limit if fails is None else min(fails, limit)
        if fits is not None and fails is not None:
            if fails - fits <= 0.02 * target:
                break
            limit = (fits + fails) / 2
        elif not ok:  # scale down by the overshoot, at least 5%
            limit *= min(target / spent, 0.95)
        elif spent > 0 and fresh:  # room left: scale up
            limit *= target / spent
        else:  # free (or better than vanilla), or the same combination again
            break
    return choice


def default_grid(topk: int, num_experts: int) -> dict[str, tuple]:
    """The default sweep of a model: c in k+1 .. min(2k, E), the default thresholds."""
    pools = tuple(range(topk + 1, min(2 * topk, num_experts) + 1))
    return {"pool_size": pools, "eps_high": DEFAULT_EPS_HIGH,
            "min_score_ratio": DEFAULT_MIN_SCORE_RATIO, "top_m": (None,)}


def make_grid(axes: dict[str, tuple], topk: int) -> list[Setting]:
    """Every combination of ``axes``, each validated as LASER parameters; settings that route
    exactly like another are kept once (c = k is vanilla, left out: always a candidate)."""
    out, seen = [], set()
    for c in axes["pool_size"]:
        for eps in axes["eps_high"]:
            for ratio in axes["min_score_ratio"]:
                for m in axes["top_m"]:
                    s = Setting(int(c), float(eps), float(ratio), m)
                    if s.pool_size == topk or s in seen:
                        continue
                    seen.add(s)
                    out.append(s)
    return out


# ----------------------------------------------------------------------------- the model


class ModelEvaluator:
    """``evaluate(assignment) -> Measure`` on a built model (world size 1): swaps ``laser``
    with the assignment's per-layer parameters into every MoE layer (layers left out: c = k,
    vanilla top-k exactly), runs the calibration set teacher-forced, and reads the expert loads
    of every call from the recorder. The first call (empty assignment) runs ``topk`` itself and
    keeps its next-token log-probabilities as the reference of the KL divergence."""

    def __init__(self, framework, model, recorder, sequences, *, chunk: int, moe_layers,
                 topk: int, cost: str):
        import torch

        self.framework, self.model, self.recorder = framework, model, recorder
        self.sequences, self.chunk = sequences, chunk
        self.moe_layers, self.topk, self.cost_kind = list(moe_layers), topk, cost
        self.reference: Optional[list] = None
        self.base_nll: Optional[float] = None
        self.calls = 0
        S = sequences.shape[1] - 1
        self._mask = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]
        self._positions = torch.arange(S).unsqueeze(0)

    def params(self, assignment: dict[int, Setting]) -> LaserParams:
        vanilla = {"pool_size": self.topk}
        return LaserParams(per_layer={
            layer: assignment[layer].args(self.topk) if layer in assignment else vanilla
            for layer in self.moe_layers
        })

    def __call__(self, assignment: dict[int, Setting]) -> Measure:
        import torch

        from moebalance.metrics import max_violation
        from moebalance.runner import check_router_logits

        first = self.reference is None
        if first != (not assignment):
            raise ValueError("the first evaluation is all vanilla (the reference), and only it")
        if first:
            self.framework.swap_router(self.model, "topk", None, "local")
        else:
            self.framework.swap_router(self.model, "laser", self.params(assignment), "local")
        self.recorder.clear()
        nll, kl, tokens = 0.0, 0.0, 0
        reference = []
        with torch.inference_mode():
            for i, part in enumerate(self.sequences.split(self.chunk)):
                B, S = part.shape[0], part.shape[1] - 1
                self.recorder.begin_step("prefill")
                logits = self.model(
                    part[:, :-1], self._positions.expand(B, S), self._mask.expand(B, 1, S, S)
                ).float()
                self.recorder.end_step()
                check_router_logits(self.model, "calibration")
                logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
                target = part[:, 1:].reshape(-1)
                nll += float(-logp.gather(1, target[:, None]).sum())
                tokens += target.numel()
                if first:
                    reference.append(logp)
                else:
                    ref = self.reference[i]
                    kl += float((ref.exp() * (ref - logp)).sum())
        if first:
            self.reference, self.base_nll = reference, nll / tokens
        self.calls += 1
        per_layer: dict[int, list[float]] = {}
        for record in self.recorder.records():
            load = torch.tensor(record["tokens_per_expert"], dtype=torch.float64)
            per_layer.setdefault(record["layer"], []).append(float(max_violation(load)))
        mv = {layer: sum(v) / len(v) for layer, v in per_layer.items()}
        ppl = math.exp(nll / tokens)
        kl /= tokens
        cost = kl if self.cost_kind == "kl" else ppl / math.exp(self.base_nll) - 1
        return Measure(cost=cost, perplexity=ppl, kl=kl, mv=mv)


# ----------------------------------------------------------------------------- command line


def _float_list(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    """Options, validated before anything starts (exit 2 with one line on bad input)."""
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help=f"a shipped trained model ({', '.join(trained_checkpoints())}; default "
                   "tiny-moe)")
    p.add_argument("--checkpoint", default=None,
                   help="a canonical safetensors checkpoint instead (config.yaml beside it)")
    p.add_argument("--domain", default="prose",
                   help=f"calibration text: held-out text of one domain {DEFAULT_DOMAINS} "
                   "(default: %(default)s)")
    p.add_argument("--seqs", type=int, default=128, help="calibration sequences (%(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (%(default)s)")
    p.add_argument("--chunk", type=int, default=8,
                   help="sequences per forward call: LASER balances each call's tokens "
                   "(%(default)s)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--ppl-budget", type=_float_list, default=None,
                        help="relative perplexity increase allowed over vanilla top-k, whole "
                        f"model (default {DEFAULT_PPL_BUDGET} = +0.5%%); comma-separated for "
                        "several")
    budget.add_argument("--kl-budget", type=_float_list, default=None,
                        help="mean KL(vanilla || calibrated) of the next-token distribution, "
                        "nats per token, allowed per MoE layer; comma-separated for several")
    p.add_argument("--pool-sizes", type=_int_list, default=None,
                   help="candidate pool sizes c, comma-separated (default: k+1 .. 2k)")
    p.add_argument("--eps-high", type=_float_list, default=DEFAULT_EPS_HIGH,
                   help="skew thresholds (default: %(default)s; > 1 expands every token)")
    p.add_argument("--min-score-ratio", type=_float_list, default=DEFAULT_MIN_SCORE_RATIO,
                   help="score floors (default: %(default)s)")
    p.add_argument("--top-m", type=_int_list, default=None,
                   help="M of the top-M mass, comma-separated (default: k only)")
    p.add_argument("--layers", type=_int_list, default=None,
                   help="MoE layers to calibrate (0-based decoder indices; default: all; the "
                   "others stay vanilla)")
    p.add_argument("--framework", default="megatron", choices=FRAMEWORKS)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default %(default)s: the float sums, hence "
                   "near-tie choices, can differ with the thread count)")
    p.add_argument("--out", required=True,
                   help="the YAML file to write ('{budget}' in it: one file per budget)")
    p.add_argument("--trace", default=None, help="also write every evaluation to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    try:
        _validate(args)
    except ConfigError as err:
        p.error(str(err))
    return args


def out_path(template: str, budget: float) -> Path:
    """``--out`` for one budget: ``{budget}`` replaced by its value (e.g. 0.005)."""
    return Path(template.replace("{budget}", f"{budget:g}"))


def _check_output(path: Path, option: str, overwrite: bool) -> None:
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise ConfigError(f"{option} {path} exists; pass --overwrite to replace it")
    try:
        from moebalance.harness.report import check_writable

        check_writable(path)
    except OSError as err:
        raise ConfigError(f"{option} {path}: not writable ({err})".replace("\n", " ")) from None


def _validate(args: argparse.Namespace) -> None:
    """Resolve the model and check every option; ConfigError (one line) naming the option."""
    for name in ("seqs", "seq_len", "chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.domain not in DEFAULT_DOMAINS:
        raise ConfigError(f"--domain must be one of {DEFAULT_DOMAINS}, got {args.domain!r}")
    for name in ("ppl_budget", "kl_budget"):
        values = getattr(args, name)
        if values is None:
            continue
        option = f"--{name.replace('_', '-')}"
        if not values:
            raise ConfigError(f"{option} must list at least one number")
        for value in values:
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{option} must be finite numbers >= 0, got {value}")
    args.cost = "kl" if args.kl_budget is not None else "ppl"
    budgets = args.kl_budget if args.kl_budget is not None else (args.ppl_budget or (DEFAULT_PPL_BUDGET,))
    args.budgets = sorted(set(budgets))
    if len(args.budgets) > 1 and "{budget}" not in args.out:
        raise ConfigError("--out must contain '{budget}' when several budgets are given")
    if args.checkpoint is not None and args.model is not None:
        raise ConfigError("give --model or --checkpoint, not both")
    if args.checkpoint is not None:
        checkpoint = Path(args.checkpoint)
        config = checkpoint.parent / "config.yaml"
        if not checkpoint.is_file() or not config.is_file():
            raise ConfigError(
                f"--checkpoint {str(checkpoint)!r} must be a file with a config.yaml beside it"
            )
        args.model_name = None
    else:
        if args.model is not None and args.model not in trained_checkpoints():
            raise ConfigError(
                f"--model must be one of the trained models {trained_checkpoints()}, got "
                f"{args.model!r}"
            )
        checkpoint, config = trained_checkpoint(args.model)
        args.model_name = args.model or "tiny-moe"
    cfg: ModelConfig = load_model_config(config)
    args.checkpoint, args.model_cfg = str(checkpoint), cfg
    args.model_name = args.model_name or cfg.name
    k, E = cfg.topk, cfg.num_experts
    if args.seq_len + 1 > cfg.max_sequence_length:
        raise ConfigError(f"--seq-len must be < the model's max_sequence_length {cfg.max_sequence_length}")
    axes = default_grid(k, E)
    if args.pool_sizes is not None:
        axes["pool_size"] = args.pool_sizes
    axes["eps_high"], axes["min_score_ratio"] = args.eps_high, args.min_score_ratio
    if args.top_m is not None:
        axes["top_m"] = args.top_m
    for name, values in axes.items():
        if not values:
            raise ConfigError(f"--{name.replace('_', '-')} must list at least one value")
    for c in axes["pool_size"]:
        if not k <= c <= E:
            raise ConfigError(f"--pool-sizes: pool_size (c) must be in [topk={k}, num_experts={E}], got {c}")
    for m in axes["top_m"]:
        if m is not None and not 1 <= m <= E:
            raise ConfigError(f"--top-m must be in [1, num_experts={E}], got {m}")
    for eps in axes["eps_high"]:
        if not (math.isfinite(eps) and eps > 0):
            raise ConfigError(f"--eps-high must be finite numbers > 0, got {eps}")
    for ratio in axes["min_score_ratio"]:
        if not (math.isfinite(ratio) and 0 <= ratio <= 1):
            raise ConfigError(f"--min-score-ratio must be numbers in [0, 1], got {ratio}")
    args.grid, args.axes = make_grid(axes, k), axes
    if not args.grid:
        raise ConfigError(f"--pool-sizes: the grid holds only vanilla (c = k = {k}); give c > k")
    moe = list(cfg.moe_layer_indices)
    if args.layers is None:
        args.layers = moe
    else:
        bad = [layer for layer in args.layers if layer not in moe]
        if bad or not args.layers or len(set(args.layers)) != len(args.layers):
            raise ConfigError(
                f"--layers must be distinct MoE layers of the model {moe}, got {list(args.layers)}"
            )
        args.layers = sorted(args.layers)
    args.outs = {b: out_path(args.out, b) for b in args.budgets}
    for path in args.outs.values():
        _check_output(path, "--out", args.overwrite)
    if args.trace is not None:
        _check_output(Path(args.trace), "--trace", args.overwrite)
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConfigError("run with python (world size 1), not under torchrun")


def calibration_sequences(domain: str, count: int, seq_len: int):
    """[count, seq_len + 1] held-out windows of ``domain`` (``moebalance.corpus``)."""
    from moebalance.corpus import default_corpus, heldout_sequences

    return heldout_sequences(default_corpus(), domain, count, seq_len)


def describe_budget(kind: str, budget: float, layers: int) -> str:
    if kind == "ppl":
        return f"perplexity within +{100 * budget:.2f}% of vanilla top-k (whole model)"
    return (f"mean next-token KL(vanilla || calibrated) within {budget:g} nats/token per MoE "
            f"layer alone, {budget * layers:g} for the whole model")


def to_yaml(choice: Choice, base: Measure, args: argparse.Namespace, command: str,
            evaluations: int, wall_s: float) -> str:
    """The per-layer YAML with its provenance comments."""
    from moebalance.harness.report import git_commit, utc_now

    cfg = args.model_cfg
    k = cfg.topk
    checkpoint = Path(args.checkpoint).resolve()
    shown = checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT) else checkpoint
    fin, axes = choice.final, args.axes
    grid = (f"pool_size {list(axes['pool_size'])} x eps_high {list(axes['eps_high'])} x "
            f"min_score_ratio {list(axes['min_score_ratio'])}"
            + (f" x top_m {list(axes['top_m'])}" if axes["top_m"] != (None,) else ""))
    lines = [
        f"# LASER parameters per MoE layer for {args.model_name} ({cfg.num_experts} experts, "
        f"top-{k}), written by scripts/calibrate_laser.py.",
        f"# checkpoint: {shown}",
        f"# calibration set: {args.seqs} held-out sequences x {args.seq_len} tokens of "
        f"'{args.domain}', {args.chunk} sequences ({args.chunk * args.seq_len} tokens) per "
        f"forward call, world size 1 ({args.framework}): LASER balanced each call's tokens",
        f"# budget: {describe_budget(args.cost, choice.budget, len(args.layers))}",
        f"# search: per-layer sweep of {grid} ({len(args.grid)} settings x "
        f"{len(args.layers)} layers, the others vanilla), least summed MV within the budget, "
        f"checked on the whole model ({len(choice.attempts)} combination(s)); {evaluations} "
        f"evaluations, {wall_s:.0f} s",
        f"# on the calibration set: perplexity {base.perplexity:.4f} (vanilla) -> "
        f"{fin.perplexity:.4f} ({100 * (fin.perplexity / base.perplexity - 1):+.2f}%), "
        f"KL {fin.kl:.5f} nats/token; MV mean over layers "
        f"{sum(base.mv.values()) / len(base.mv):.3f} -> {sum(fin.mv.values()) / len(fin.mv):.3f}",
        f"# command: {command}",
        f"# date: {utc_now()}; commit: {git_commit() or 'unknown'}",
        f"# Per layer: MV vanilla -> calibrated (whole combination). pool_size {k} (= k) routes "
        "vanilla top-k.",
        "per_layer:",
    ]
    for layer in cfg.moe_layer_indices:
        trial = choice.chosen.get(layer)
        entry = trial.setting.args(k) if trial is not None else {"pool_size": k}
        body = ", ".join(f"{key}: {value}" for key, value in entry.items())
        lines.append(f"  {layer}: {{{body}}}  # MV {base.mv[layer]:.3f} -> {fin.mv[layer]:.3f}")
    return "\n".join(lines) + "\n"


def trace_json(base: Measure, trials: dict, choices: list, args: argparse.Namespace) -> dict:
    def measure(m: Measure) -> dict:
        return {"cost": m.cost, "perplexity": m.perplexity, "kl": m.kl,
                "mv": {str(layer): v for layer, v in m.mv.items()}}

    k = args.model_cfg.topk
    return {
        "model": args.model_name, "domain": args.domain, "cost": args.cost,
        "vanilla": measure(base),
        "sweep": [{"layer": t.layer, "setting": t.setting.args(k), **measure(t.measure)}
                  for layer_trials in trials.values() for t in layer_trials[1:]],
        "choices": [{
            "budget": c.budget,
            "out": str(args.outs[c.budget]),
            "attempts": [{"limit": limit, "per_layer": {str(l): s.args(k) for l, s in st.items()},
                          **measure(m)} for limit, st, m in c.attempts],
            "final": measure(c.final),
        } for c in choices],
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from moebalance.files import write_text_atomic
    from moebalance.harness.framework import elapsed_logger, one_process
    from moebalance.telemetry import MoERecorder

    started = time.perf_counter()
    log = elapsed_logger(f"{PROG}:")
    with one_process(args.framework, args.threads) as (framework, setup):
        cfg = args.model_cfg
        model = framework.build_model(
            cfg, setup, router="topk", router_params=None, load_scope="local",
            dispatcher=framework.dispatchers[0], checkpoint=args.checkpoint,
        )
        recorder = MoERecorder(setup.device, nvtx_ranges=False)
        framework.instrument(model, recorder)
        evaluate = ModelEvaluator(
            framework, model, recorder,
            calibration_sequences(args.domain, args.seqs, args.seq_len),
            chunk=args.chunk, moe_layers=cfg.moe_layer_indices, topk=cfg.topk, cost=args.cost,
        )
        log(f"{args.model_name}: {len(args.grid)} settings x {len(args.layers)} layers on "
            f"'{args.domain}', {args.cost} budget(s) {', '.join(f'{b:g}' for b in args.budgets)}")
        base, trials = sweep(evaluate, args.layers, args.grid, Setting(cfg.topk), log=log)
        choices = [choose(evaluate, base, trials, args.cost, b, log=log) for b in args.budgets]
    wall = time.perf_counter() - started
    command = ("python scripts/calibrate_laser.py " + " ".join(argv)).strip()
    for choice in choices:
        text = to_yaml(choice, base, args, command, evaluate.calls, wall)
        write_text_atomic(args.outs[choice.budget], text)
        print(text, end="", flush=True)
    if args.trace is not None:
        from moebalance.harness.report import write_json

        write_json(Path(args.trace), trace_json(base, trials, choices, args))
    print(f"{PROG}: wrote {', '.join(str(p) for p in args.outs.values())} in {wall:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
