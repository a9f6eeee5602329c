"""Synthetic gate logits calibrated to real MoE routing statistics.

Model. For one MoE layer with E experts and top-k routing, token t's gate logits are

    logits[t, e] = beta_t * (b_e + g[t, e])        (then centred per token)

- ``g[t, e]`` i.i.d. standard Gumbel noise: the token-to-token variation of the router.
- ``b_e`` the expert's popularity bias, fitted numerically so that vanilla top-k on these logits
  selects expert e with the real frequency: the whole per-expert load profile is reproduced, not
  only its max/mean (so the real max/mean follows, near-dead experts included).
- ``beta_t = beta * exp(mass_spread * z_t)``, z_t ~ N(0, 1): a per-token inverse temperature.
  Top-k *selection* is invariant to a positive per-token scale, so ``beta_t`` leaves the load
  profile untouched and only shapes the score distribution: some tokens peaked (their top-k
  softmax mass near 1, LASER routes them vanilla), many flat. ``beta`` is fitted so that the
  median top-k mass of the full softmax equals the preset's ``median_topk_mass``.

Both fits run once per (profile, k, concentration) on a fixed calibration sample (Latin-hypercube
Gumbel noise, so no expert's noise column is luckier than another's) and are cached; the logits
for a given seed are then deterministic on every device (drawn on the CPU, then moved).

Real data. The per-expert load profiles (``workload_profiles.json``, beside this module) are the
relative selection counts (count_e / mean_e count, in expert order, 4 significant digits)
measured by allenai/OLMoE, ``scripts/routing_output`` (Apache-2.0), file
``routing-stats/expert_counts.json`` of the shared data: OLMoE-1B-7B-0924 (64 experts, top-8,
~209K tokens per domain) and Mixtral-8x7B-v0.1 (8 experts, top-2), layers 0, 7 and 15, domains
c4, github and arxiv. The score concentration
(``median_topk_mass``, ``mass_spread``) is *assumed*: that file has counts only, no scores. The
values follow LASER's observation (arXiv 2510.03293) that middle layers are flatter and final
layers more peaked. Tokens are i.i.d.: no local routing consistency between neighbouring tokens.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, GateConfig
from .weights import seed_for

__all__ = [
    "DEFAULT_COUNTS_PATH",
    "WorkloadPreset",
    "PRESETS",
    "get_preset",
    "generate_logits",
    "workload_from_counts",
    "load_expert_counts",
    "fit_popularity_bias",
    "fit_inverse_temperature",
    "topk_mass",
]

#: Where the shared real routing counts live when present (``../shared/data`` from the project
#: root). Nothing may require it: the project must run and pass its tests without it.
DEFAULT_COUNTS_PATH = (
    Path(__file__).resolve().parents[1].parent
    / "shared" / "data" / "routing-stats" / "expert_counts.json"
)

_CALIBRATION_TOKENS = 16384  # tokens in the load-fit sample: the fit is then exact to ~0.5%
_CONCENTRATION_TOKENS = 4096  # tokens in the temperature-fit sample (a median needs fewer)
_CALIBRATION_SEED = 20251003
_FIT_ITERATIONS = 15  # the fit reaches its sampling floor (~0.5% on big experts) in 3-5

#: The measured load profiles (see the module docstring), beside this module as package data.
PROFILES_FILE = "workload_profiles.json"


@functools.cache
def _measured_profiles() -> dict:
    """``workload_profiles.json``, read once: {"layers": [0, 7, 15], "models": {model key of
    expert_counts.json: {domain: [[E floats] per layer]}}}, each profile count_e / mean_e
    count in expert order, 4 significant digits (allenai/OLMoE ``scripts/routing_output``,
    Apache-2.0, ``routing-stats/expert_counts.json``; models "olmoe-1b-7b-0924" and
    "mixtral-8x7b-v0.1")."""
    text = importlib.resources.files(__package__).joinpath(PROFILES_FILE).read_text()
    return json.loads(text)


def _profiles(model: str) -> tuple[tuple[str, tuple[tuple[float, ...], ...]], ...]:
    """((domain, (profile per layer, ...)), ...) of ``model`` in the file's domain order."""
    table = _measured_profiles()["models"][model]
    return tuple(
        (domain, tuple(tuple(profile) for profile in profiles))
        for domain, profiles in table.items()
    )


def _measured_layers() -> tuple[int, ...]:
    """The layer indices the measured profiles describe, in profile order."""
    return tuple(_measured_profiles()["layers"])


@dataclass(frozen=True)
class WorkloadPreset:
    """One model's routing shape: gate settings, per-layer load profiles per domain, and how
    concentrated its score distributions are.

    Attributes:
        name: the key in ``PRESETS``.
        num_experts: E, routed experts.
        topk: k, experts per token.
        score_function: the gate's score function (``GateConfig.score_function``).
        pre_softmax: softmax over all E experts before top-k, weights not renormalised (OLMoE,
            DeepSeek-V2), or softmax over the k chosen logits (Mixtral).
        layers: the real layer indices the profiles describe; I_agg averages over them.
        relative_load: ((domain, (profile [E] per entry of ``layers``)), ...): per-expert
            top-k load divided by the mean load (mean 1, max = the real max/mean).
        median_topk_mass: per entry of ``layers``, the median over tokens of the top-k mass of
            the full softmax (k/E = flat ... 1 = one expert takes all). Assumed, see module doc.
        mass_spread: standard deviation of log beta_t, the per-token inverse temperature.
        source_model: the model key in ``expert_counts.json`` the profiles were measured on, or
            None when they are borrowed (assumed).
        note: provenance, one line.
    """

    name: str
    num_experts: int
    topk: int
    score_function: str
    pre_softmax: bool
    layers: tuple[int, ...]
    relative_load: tuple[tuple[str, tuple[tuple[float, ...], ...]], ...]
    median_topk_mass: tuple[float, ...]
    mass_spread: float
    source_model: str | None
    note: str

    def __post_init__(self) -> None:
        # gate settings are validated by GateConfig itself
        self.gate()
        n = len(self.layers)
        if len(self.median_topk_mass) != n:
            raise ConfigError(
                f"preset {self.name!r}: median_topk_mass needs one value per layer {self.layers}"
            )
        for domain, profiles in self.relative_load:
            if len(profiles) != n or any(len(p) != self.num_experts for p in profiles):
                raise ConfigError(
                    f"preset {self.name!r}, domain {domain!r}: need one [{self.num_experts}] "
                    f"profile per layer {self.layers}"
                )

    @property
    def domains(self) -> tuple[str, ...]:
        """The text domains with a load profile (the first is the default)."""
        return tuple(domain for domain, _ in self.relative_load)

    def gate(self) -> GateConfig:
        """The ``GateConfig`` of this model's router."""
        return GateConfig(
            num_experts=self.num_experts,
            topk=self.topk,
            score_function=self.score_function,
            pre_softmax=self.pre_softmax,
        )

    def layer_position(self, layer: int | None) -> int:
        """Index into ``layers`` of ``layer`` (None = the first); ConfigError if not profiled."""
        if layer is None:
            return 0
        if layer not in self.layers:
            raise ConfigError(
                f"preset {self.name!r} has profiles for layers {self.layers}, got layer={layer!r}"
            )
        return self.layers.index(layer)

    def profile(self, layer: int | None = None, domain: str = "c4") -> torch.Tensor:
        """[E] float64: load / mean load of each expert at ``layer`` on ``domain``."""
        pos = self.layer_position(layer)
        for name, profiles in self.relative_load:
            if name == domain:
                return torch.tensor(profiles[pos], dtype=torch.float64)
        raise ConfigError(f"preset {self.name!r} has domains {self.domains}, got domain={domain!r}")

    def real_imbalance(self, layer: int | None = None, domain: str = "c4") -> float:
        """max / mean expert load of the real (or assumed) profile: what vanilla top-k on the
        synthetic logits reproduces."""
        return float(self.profile(layer, domain).max())


PRESETS: dict[str, WorkloadPreset] = {
    p.name: p
    for p in (
        WorkloadPreset(
            name="mixtral",
            num_experts=8,
            topk=2,
            score_function="softmax",
            pre_softmax=False,
            layers=_measured_layers(),
            relative_load=_profiles("mixtral-8x7b-v0.1"),
            median_topk_mass=(0.75, 0.65, 0.80),
            mass_spread=0.6,
            source_model="mixtral-8x7b-v0.1",
            note="Mixtral-8x7B-v0.1 loads measured by allenai/OLMoE (mild skew, max/mean <= 1.33)",
        ),
        WorkloadPreset(
            name="olmoe",
            num_experts=64,
            topk=8,
            score_function="softmax",
            pre_softmax=True,
            layers=_measured_layers(),
            relative_load=_profiles("olmoe-1b-7b-0924"),
            median_topk_mass=(0.55, 0.50, 0.65),
            mass_spread=0.6,
            source_model="olmoe-1b-7b-0924",
            note="OLMoE-1B-7B-0924 loads measured by allenai/OLMoE (strong skew, dead-ish experts)",
        ),
        WorkloadPreset(
            name="deepseek",
            num_experts=64,
            topk=6,
            score_function="softmax",
            pre_softmax=True,
            layers=_measured_layers(),
            # No DeepSeek routing data here: its skew is ASSUMED, borrowing OLMoE's profile of the
            # same layer index and domain (both are fine-grained 64-expert models).
            relative_load=_profiles("olmoe-1b-7b-0924"),
            median_topk_mass=(0.50, 0.45, 0.60),
            mass_spread=0.6,
            source_model=None,
            note="DeepSeek-V2-Lite-like gate (64 routed experts, top-6); skew assumed = OLMoE's",
        ),
    )
}


def get_preset(name: str | WorkloadPreset) -> WorkloadPreset:
    """The preset registered as ``name`` (a preset passes through); ConfigError lists the names."""
    if isinstance(name, WorkloadPreset):
        return name
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown workload preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None


def topk_mass(scores: torch.Tensor, m: int) -> torch.Tensor:
    """[T, E] scores -> [T]: the sum of each token's m largest scores (LASER's shape measure)."""
    return torch.topk(scores, m, dim=-1, sorted=False)[0].sum(dim=-1)


def _gumbel(num_tokens: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """[T, E] float32 i.i.d. standard Gumbel noise."""
    u = torch.rand(num_tokens, num_experts, generator=generator, dtype=torch.float64)
    return (-torch.log(-torch.log(u.clamp_min(1e-300)))).float()


def _stratified_gumbel(
    num_tokens: int, num_experts: int, generator: torch.Generator
) -> torch.Tensor:
    """[T, E] float32 Gumbel noise whose every column holds the same T quantiles, each column
    shuffled independently (Latin hypercube): the fit cannot favour an expert whose sampled
    noise happens to run high, which otherwise biases the fitted profile by several percent."""
    u = (torch.arange(num_tokens, dtype=torch.float64) + 0.5) / num_tokens
    quantiles = -torch.log(-torch.log(u))
    order = torch.argsort(torch.rand(num_tokens, num_experts, generator=generator), dim=0)
    return quantiles[order].float()


def _cloglog(p: torch.Tensor) -> torch.Tensor:
    # With Gumbel noise and a fixed selection threshold, P(selected) = 1 - exp(-exp(b - threshold)):
    # cloglog makes the fit's bias update near linear, also for experts most tokens pick.
    return torch.log(-torch.log1p(-p))


def _check_relative_load(relative_load: torch.Tensor, topk: int) -> torch.Tensor:
    """[E] relative load -> [E] float64 selection frequency per token (k * load / sum load)."""
    load = relative_load.double()
    E = load.numel()
    if load.dim() != 1 or E < 1:
        raise ConfigError(
            f"counts must be a 1-D [num_experts] tensor, got shape {tuple(load.shape)}"
        )
    if not 1 <= topk <= E:
        raise ConfigError(f"topk must be in [1, num_experts={E}], got {topk!r}")
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()) or float(load.sum()) <= 0:
        raise ConfigError("counts must be finite, non-negative and not all zero")
    freq = load * topk / load.sum()
    if float(freq.max()) > 1 + 1e-6:
        e = int(freq.argmax())
        raise ConfigError(
            f"expert {e} would be picked by {float(freq[e]):.3f} of the tokens: with top-{topk} "
            f"no expert can exceed 1/{topk} of all selections (max/mean <= E/k = {E / topk:g})"
        )
    return freq


@functools.lru_cache(maxsize=64)
def _fit_bias_cached(relative_load: tuple[float, ...], topk: int) -> torch.Tensor:
    target = _check_relative_load(torch.tensor(relative_load, dtype=torch.float64), topk)
    target = target.clamp(1e-9, 1 - 1e-6)
    N, E = _CALIBRATION_TOKENS, target.numel()
    noise = _stratified_gumbel(N, E, torch.Generator().manual_seed(_CALIBRATION_SEED))
    bias = _cloglog(target)
    judged = target * N >= 1000  # experts with enough calibration hits to judge to ~0.5%
    for _ in range(_FIT_ITERATIONS):
        chosen = torch.topk(bias.float() + noise, topk, dim=1, sorted=False)[1]
        hits = torch.bincount(chosen.reshape(-1), minlength=E).double()
        freq = ((hits + 0.5) / (N + 1)).clamp(1e-9, 1 - 1e-6)  # +0.5: near-dead experts stay finite
        error = ((freq - target).abs() / target)[judged]
        if error.numel() == 0 or float(error.max()) < 0.005:
            break
        bias = bias + _cloglog(target) - _cloglog(freq)
    return bias.float()


def fit_popularity_bias(relative_load: torch.Tensor, topk: int) -> torch.Tensor:
    """[E] popularity bias b such that top-k of (b + Gumbel noise) selects each expert with
    frequency proportional to ``relative_load`` [E] (any non-negative counts; normalised here).

    Fitted by fixed-point iteration on a fixed calibration sample, cached. Returns [E] float32.
    """
    load = relative_load.detach().double().cpu()
    return _fit_bias_cached(tuple(load.tolist()), int(topk)).clone()


@functools.lru_cache(maxsize=64)
def _fit_beta_cached(
    relative_load: tuple[float, ...], topk: int, median_topk_mass: float, mass_spread: float
) -> float:
    bias = _fit_bias_cached(relative_load, topk)
    E = bias.numel()
    gen = torch.Generator().manual_seed(_CALIBRATION_SEED + 1)
    x = bias + _gumbel(_CONCENTRATION_TOKENS, E, gen)
    x = x - x.mean(dim=1, keepdim=True)
    spread = torch.exp(mass_spread * torch.randn(_CONCENTRATION_TOKENS, 1, generator=gen))

    def median_mass(beta: float) -> float:
        return float(topk_mass(torch.softmax(beta * spread * x, dim=1), topk).median())

    # the top-k mass of softmax(beta * x) grows monotonically with beta: bisect in log space
    lo, hi = 1e-3, 1e3
    for _ in range(20):  # pins log(beta) to 13.8 / 2**20, far below the sampling error
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if median_mass(mid) < median_topk_mass else (lo, mid)
    return math.sqrt(lo * hi)


def fit_inverse_temperature(
    relative_load: torch.Tensor, topk: int, median_topk_mass: float, mass_spread: float
) -> float:
    """The scale beta of the logits at which the median token's top-k softmax mass equals
    ``median_topk_mass`` (given the fitted popularity bias and a log-normal per-token spread)."""
    E = relative_load.numel()
    _check_concentration(median_topk_mass, mass_spread, topk, E)
    load = tuple(relative_load.detach().double().cpu().tolist())
    return _fit_beta_cached(load, int(topk), float(median_topk_mass), float(mass_spread))


def _check_concentration(
    median_topk_mass: float, mass_spread: float, topk: int, num_experts: int
) -> None:
    floor = topk / num_experts
    if not floor < median_topk_mass < 1:
        raise ConfigError(
            f"median_topk_mass must be in ({floor:g}, 1) for top-{topk} of {num_experts} experts "
            f"(k/E is a flat distribution), got {median_topk_mass!r}"
        )
    if not (math.isfinite(mass_spread) and mass_spread >= 0):
        raise ConfigError(f"mass_spread must be a finite number >= 0, got {mass_spread!r}")


def _check_tokens(num_tokens: int) -> None:
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ConfigError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")


def _synthesize(
    relative_load: torch.Tensor,
    topk: int,
    median_topk_mass: float,
    mass_spread: float,
    num_tokens: int,
    generator: torch.Generator,
    device: str | torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[T, E] logits = beta_t * (b + Gumbel), centred per token, drawn on the CPU."""
    bias = fit_popularity_bias(relative_load, topk)
    beta = fit_inverse_temperature(relative_load, topk, median_topk_mass, mass_spread)
    x = bias + _gumbel(num_tokens, bias.numel(), generator)
    beta_t = beta * torch.exp(mass_spread * torch.randn(num_tokens, 1, generator=generator))
    logits = beta_t * (x - x.mean(dim=1, keepdim=True))
    return logits.to(device=device, dtype=dtype)


def _stream_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for one (seed, preset, domain, layer) stream: layers get independent noise."""
    return seed_for(seed, "/".join(map(str, names)))


def generate_logits(
    preset: str | WorkloadPreset,
    num_tokens: int,
    layer: int | None = None,
    seed: int = 0,
    *,
    domain: str = "c4",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Synthetic gate logits [num_tokens, E] for one layer of a preset model.

    Vanilla top-k on the result reproduces the real per-expert load profile of ``layer`` (one of
    ``preset.layers``; None = the first) on ``domain`` (one of ``preset.domains``, e.g. "c4",
    "github", "arxiv": plan on one domain, evaluate on another). Deterministic for a given
    (seed, preset, domain, layer) on every device; different layers get independent noise.

    Returns: [num_tokens, num_experts] tensor of ``dtype`` on ``device``.
    """
    p = get_preset(preset)
    _check_tokens(num_tokens)
    pos = p.layer_position(layer)
    gen = torch.Generator().manual_seed(_stream_seed(seed, p.name, domain, p.layers[pos]))
    return _synthesize(
        p.profile(layer, domain),
        p.topk,
        p.median_topk_mass[pos],
        p.mass_spread,
        num_tokens,
        gen,
        device,
        dtype,
    )


def workload_from_counts(
    counts: torch.Tensor,
    topk: int,
    num_tokens: int,
    seed: int = 0,
    *,
    median_topk_mass: float | None = None,
    mass_spread: float = 0.6,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Synthetic gate logits [num_tokens, E] whose vanilla top-k load follows ``counts``.

    Args:
        counts: [E] non-negative per-expert selection counts (any scale, e.g. real counts from
            ``load_expert_counts``); no expert may exceed 1/topk of the total.
        topk: k experts per token.
        num_tokens: T.
        seed: seeds the noise (deterministic).
        median_topk_mass: median top-k softmax mass in (k/E, 1); None = halfway, (1 + k/E) / 2.
        mass_spread: standard deviation of the log per-token inverse temperature.

    Returns: [num_tokens, E] tensor of ``dtype`` on ``device``.
    """
    _check_tokens(num_tokens)
    load = torch.as_tensor(counts).detach().double().cpu()
    _check_relative_load(load, topk)
    E = load.numel()
    relative = load / load.mean()
    if median_topk_mass is None:
        median_topk_mass = (1 + topk / E) / 2
    _check_concentration(median_topk_mass, mass_spread, topk, E)
    gen = torch.Generator().manual_seed(_stream_seed(seed, "counts"))
    return _synthesize(
        relative, topk, median_topk_mass, mass_spread, num_tokens, gen, device, dtype
    )


def load_expert_counts(
    path: str | Path = DEFAULT_COUNTS_PATH,
    model: str = "olmoe-1b-7b-0924",
    domain: str = "c4",
    *,
    top1: bool = False,
) -> dict[int, torch.Tensor]:
    """Real per-expert selection counts from allenai/OLMoE's ``expert_counts.json``.

    Args:
        path: the JSON file (default: ``../shared/data/routing-stats/expert_counts.json``).
        model: "olmoe-1b-7b-0924" or "mixtral-8x7b-v0.1" (see ``WorkloadPreset.source_model``).
        domain: text domain, e.g. "c4", "github", "arxiv".
        top1: counts of the first choice only instead of all top-k choices.

    Returns: {layer index: [E] int64 counts}.

    Raises FileNotFoundError when the file is absent (it is not part of the project; the
    presets carry the statistics derived from it), ConfigError for an unknown model or domain.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"real routing counts not found at {path}: they come with the shared data "
            "(../shared/data/routing-stats/expert_counts.json), which a fresh checkout lacks; "
            "use the built-in presets (generate_logits) instead"
        )
    data = json.loads(path.read_text())
    models = data["models"]
    if model not in models:
        raise ConfigError(f"unknown model {model!r} in {path.name}; choose one of {sorted(models)}")
    table = models[model]["domains_top1" if top1 else "domains"]
    if domain not in table:
        raise ConfigError(f"unknown domain {domain!r} for {model}; choose one of {sorted(table)}")
    return {
        int(layer): torch.tensor(counts, dtype=torch.int64)
        for layer, counts in zip(data["layers"], table[domain])
    }
