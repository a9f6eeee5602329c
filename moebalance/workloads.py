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

Real data. The per-expert load profiles below are the relative selection counts
(count_e / mean_e count, in expert order, 4 significant digits) measured by allenai/OLMoE,
``scripts/routing_output`` (Apache-2.0), file ``routing-stats/expert_counts.json`` of the shared
data: OLMoE-1B-7B-0924 (64 experts, top-8, ~209K tokens per domain) and Mixtral-8x7B-v0.1
(8 experts, top-2), layers 0, 7 and 15, domains c4, github and arxiv. The score concentration
(``median_topk_mass``, ``mass_spread``) is *assumed*: that file has counts only, no scores. The
values follow LASER's observation (arXiv 2510.03293) that middle layers are flatter and final
layers more peaked. Tokens are i.i.d.: no local routing consistency between neighbouring tokens.
"""

from __future__ import annotations

import functools
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, GateConfig

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

# Relative per-expert load: count_e / mean_e count, expert order, 4 significant digits, layers
# (0, 7, 15). Source: allenai/OLMoE scripts/routing_output (Apache-2.0),
# routing-stats/expert_counts.json, models "olmoe-1b-7b-0924" and "mixtral-8x7b-v0.1".
_OLMOE_RELATIVE_LOAD: dict[str, tuple[tuple[float, ...], ...]] = {
    "c4": (
        # layer 0: max/mean 3.017
        (
            0.5879, 0.8338, 0.7979, 0.9349, 0.9049, 1.02, 1.118, 1.023, 0.7626, 1.516,
            1.015, 1.335, 1.026, 0.8001, 0.8844, 1.001, 1.018, 1.177, 0.8476, 1.229,
            1.013, 0.6716, 1.312, 0.2996, 1.145, 0.8978, 1.065, 0.8344, 0.7289, 1.006,
            1.035, 0.8406, 0.7855, 1.082, 0.8813, 0.9031, 1.039, 0.9435, 1.087, 0.995,
            0.8676, 3.017, 0.8388, 0.9661, 1.003, 0.8639, 1.169, 0.8676, 0.9937, 0.9416,
            0.9704, 1.268, 0.7151, 0.753, 0.7981, 0.968, 0.8111, 1.355, 1.502, 1.03,
            1.109, 1.094, 0.8567, 0.842,
        ),
        # layer 7: max/mean 2.658
        (
            1.287, 2.658, 0.2004, 0.6337, 0.7049, 1.513, 0.7955, 0.4183, 0.7348, 0.7647,
            0.7808, 0.759, 0.6324, 1.29, 0.8694, 1.285, 0.9222, 0.4209, 2.142, 1.144,
            1.061, 0.5767, 1.001, 1.288, 1.037, 1.673, 1.274, 0.6901, 0.5995, 1.071,
            1.129, 1.219, 0.9377, 1.196, 0.7809, 0.5415, 0.9754, 1.01, 1.226, 0.7831,
            0.8891, 1.189, 0.6207, 0.7961, 0.9951, 0.4965, 1.676, 1.313, 1.332, 0.7222,
            0.7889, 0.6198, 1.085, 1.497, 0.7586, 0.7806, 1.223, 1.041, 0.5305, 1.435,
            1.143, 1.132, 0.9486, 0.9583,
        ),
        # layer 15: max/mean 2.499
        (
            0.8259, 0.4106, 1.745, 1.29, 0.9571, 0.7473, 0.5229, 2.499, 0.6199, 0.2964,
            1.521, 0.5088, 0.454, 1.573, 0.8315, 1.488, 0.4911, 0.6822, 0.4457, 0.3527,
            1.048, 2.16, 0.7684, 1.321, 0.6383, 2.131, 1.89, 1.674, 1.179, 0.4166,
            0.6455, 0.8958, 0.2498, 0.1903, 0.5268, 0.5818, 0.771, 0.3601, 1.302, 1.278,
            0.8835, 0.9019, 1.312, 0.6801, 0.2283, 1.031, 1.384, 1.15, 1.295, 1.489,
            0.5614, 1.687, 1.146, 0.598, 1.34, 1.459, 1.625, 0.5577, 0.9245, 1.04,
            0.9222, 1.271, 1.185, 1.039,
        ),
    ),
    "github": (
        # layer 0: max/mean 5.006
        (
            1.24, 0.7584, 1.459, 1.013, 0.9047, 0.3728, 1.593, 0.6278, 1.364, 0.1669,
            0.6486, 1.414, 0.1782, 1.44, 0.6875, 0.9044, 0.4838, 1.575, 0.7604, 0.5228,
            0.7753, 5.006, 0.6739, 0.3831, 1.272, 0.7509, 0.7443, 1.0, 0.676, 1.191,
            0.8558, 1.019, 1.144, 0.7762, 0.2957, 0.5211, 0.8612, 0.7853, 0.503, 0.6489,
            2.421, 1.812, 0.9898, 0.824, 0.7832, 0.6183, 0.5111, 1.383, 0.5673, 1.12,
            0.8479, 1.023, 1.427, 2.013, 1.385, 1.027, 1.059, 0.2428, 0.8657, 0.7027,
            1.197, 1.109, 1.075, 1.0,
        ),
        # layer 7: max/mean 6.157
        (
            3.101, 0.8968, 6.045, 0.2075, 5.254, 0.5078, 0.1921, 0.9272, 0.1492, 0.2032,
            0.6487, 0.2217, 1.391, 0.6288, 0.6238, 0.3745, 0.3976, 6.157, 0.3864, 0.2148,
            0.1954, 1.794, 0.4354, 1.385, 0.4535, 0.2693, 1.348, 1.954, 0.1344, 0.6032,
            1.027, 1.222, 0.5716, 0.8598, 0.5296, 4.591, 0.3627, 0.5059, 0.4732, 1.055,
            0.2282, 0.3104, 1.556, 0.4137, 0.03091, 2.905, 1.33, 0.2519, 1.465, 1.145,
            0.06767, 0.01268, 0.4467, 0.05224, 0.2742, 0.1552, 1.088, 0.08847, 2.501, 0.3981,
            0.1197, 0.3987, 0.1669, 0.2955,
        ),
        # layer 15: max/mean 4.509
        (
            1.181, 3.196, 0.1968, 0.6352, 0.1864, 1.287, 1.419, 0.1651, 4.494, 1.206,
            0.1134, 1.05, 0.882, 0.1127, 0.007123, 0.1146, 1.186, 4.398, 1.071, 1.306,
            0.4184, 0.201, 0.6759, 0.1914, 1.342, 0.01674, 0.1246, 0.07495, 0.1056, 2.532,
            4.509, 1.081, 1.596, 1.634, 0.5332, 1.392, 3.68, 1.289, 0.08425, 0.04125,
            0.8611, 0.923, 0.5528, 1.368, 3.171, 0.01149, 0.1024, 0.1237, 0.072, 0.02593,
            0.4962, 0.1744, 0.8213, 1.196, 0.09015, 0.1571, 0.1235, 1.471, 3.776, 0.03071,
            2.405, 0.05189, 0.07456, 0.1901,
        ),
    ),
    "arxiv": (
        # layer 0: max/mean 7.813
        (
            7.813, 0.7384, 0.7428, 1.233, 1.486, 0.5841, 1.301, 0.8741, 0.6767, 0.3482,
            0.535, 1.049, 0.2097, 0.8165, 0.5859, 0.8365, 0.5219, 1.803, 0.7241, 1.053,
            0.275, 1.348, 0.5214, 0.3847, 0.6754, 0.65, 0.723, 0.8763, 0.2224, 1.417,
            0.6904, 0.7835, 0.9767, 0.6688, 0.9035, 0.6067, 1.372, 0.77, 0.9207, 0.4957,
            2.512, 1.598, 0.9167, 0.8785, 0.9816, 0.9946, 0.8706, 1.254, 0.6296, 0.8927,
            0.8707, 1.143, 0.6946, 1.32, 1.876, 1.394, 0.8271, 0.5016, 0.9421, 0.5481,
            0.9506, 0.9152, 0.8839, 0.3915,
        ),
        # layer 7: max/mean 6.283
        (
            0.6697, 0.1644, 4.428, 0.1001, 5.881, 0.8117, 0.2461, 0.7225, 0.124, 0.1766,
            0.8346, 0.4188, 0.9797, 0.2042, 0.3823, 1.132, 0.5288, 6.283, 0.08471, 0.589,
            0.294, 2.195, 0.4565, 1.041, 1.288, 0.05208, 1.614, 1.166, 0.09302, 0.8912,
            1.731, 0.6517, 0.8724, 0.9874, 0.5384, 4.128, 1.982, 0.3387, 1.551, 0.8099,
            0.313, 0.7711, 0.7443, 0.182, 0.05002, 1.122, 1.653, 0.1569, 1.164, 0.8766,
            0.2592, 0.0594, 1.031, 0.06296, 0.2831, 0.1718, 0.8707, 0.4494, 3.964, 0.8596,
            0.2768, 0.6598, 0.1439, 0.4339,
        ),
        # layer 15: max/mean 7.495
        (
            1.018, 2.552, 0.6463, 1.28, 0.2676, 0.5301, 0.6715, 0.9483, 1.658, 0.4894,
            0.5207, 0.7722, 0.4753, 0.5434, 0.0007276, 0.6581, 0.5692, 7.495, 0.2173, 0.7796,
            0.7911, 1.218, 0.2644, 0.1556, 0.3302, 0.07211, 1.439, 0.02271, 0.4685, 2.423,
            3.865, 0.5525, 0.8408, 1.09, 4.107, 1.917, 3.119, 0.7507, 0.2527, 0.0007276,
            0.1268, 0.3189, 0.04569, 1.579, 2.451, 0.05867, 0.4271, 0.3487, 0.1087, 0.008004,
            0.2853, 0.01153, 0.4146, 1.969, 0.6348, 0.9003, 0.6949, 1.385, 3.339, 0.005438,
            1.945, 0.519, 0.4456, 0.2029,
        ),
    ),
}
_MIXTRAL_RELATIVE_LOAD: dict[str, tuple[tuple[float, ...], ...]] = {
    "c4": (
        # layer 0: max/mean 1.121
        (1.09, 0.9523, 0.9656, 0.9469, 0.9981, 1.11, 0.8163, 1.121),
        # layer 7: max/mean 1.076
        (0.9709, 1.048, 0.9826, 0.9673, 1.076, 0.9483, 1.021, 0.9859),
        # layer 15: max/mean 1.124
        (0.9076, 1.124, 1.06, 0.6225, 1.054, 1.099, 1.095, 1.038),
    ),
    "github": (
        # layer 0: max/mean 1.297
        (1.05, 0.9945, 0.9479, 0.9324, 0.946, 1.297, 0.9151, 0.9172),
        # layer 7: max/mean 1.245
        (0.881, 1.069, 1.245, 0.842, 0.9484, 0.9645, 1.102, 0.9483),
        # layer 15: max/mean 1.328
        (1.15, 1.071, 0.822, 0.739, 0.8509, 1.328, 1.095, 0.9436),
    ),
    "arxiv": (
        # layer 0: max/mean 1.269
        (1.067, 0.9961, 1.008, 0.9674, 0.8502, 1.269, 0.8573, 0.9854),
        # layer 7: max/mean 1.131
        (0.9935, 0.959, 1.084, 0.8469, 0.9971, 1.045, 0.9429, 1.131),
        # layer 15: max/mean 1.172
        (1.172, 1.008, 0.7675, 0.4892, 1.15, 1.171, 1.167, 1.075),
    ),
}


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


def _profiles(table: dict[str, tuple[tuple[float, ...], ...]]) -> tuple:
    return tuple((domain, profiles) for domain, profiles in table.items())


PRESETS: dict[str, WorkloadPreset] = {
    p.name: p
    for p in (
        WorkloadPreset(
            name="mixtral",
            num_experts=8,
            topk=2,
            score_function="softmax",
            pre_softmax=False,
            layers=(0, 7, 15),
            relative_load=_profiles(_MIXTRAL_RELATIVE_LOAD),
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
            layers=(0, 7, 15),
            relative_load=_profiles(_OLMOE_RELATIVE_LOAD),
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
            layers=(0, 7, 15),
            # No DeepSeek routing data here: its skew is ASSUMED, borrowing OLMoE's profile of the
            # same layer index and domain (both are fine-grained 64-expert models).
            relative_load=_profiles(_OLMOE_RELATIVE_LOAD),
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
    salt = zlib.crc32("/".join(map(str, names)).encode())
    return (int(seed) * 0x9E3779B97F4A7C15 + salt) % (1 << 63)


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
