"""Carbon model: operational (paper Eq. 1) and embodied (LLMCarbon) CO2e of a request.

Pure functions with units in every name. The operational part is Eq. 1 of the LLMCO2 paper
(Fu et al.), itself taken from LLMCarbon (Faiz et al., ICLR 2024); the embodied part follows
LLMCarbon's hardware model: a chip's embodied carbon is its die area times the carbon emitted
per unit area (CPA) of its process node, plus a per-GB term for its memory, and a request is
charged the share ``duration / lifetime`` of it.

Sources of the constants are given next to each one and in ``data/GPUS.md``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # hardware imports this module; the type is only needed for annotations
    from llmco2_serve.hardware.gpus import GPUSpec

__all__ = [
    "J_PER_KWH",
    "SECONDS_PER_YEAR",
    "DEFAULT_LIFETIME_YEARS",
    "DEFAULT_LIFETIME_S",
    "DEFAULT_INTENSITY_G_PER_KWH",
    "DEFAULT_PUE",
    "CPA_KG_PER_CM2_BY_NODE_NM",
    "MEMORY_KG_PER_GB",
    "operational_co2_g",
    "embodied_co2_g",
    "carbon_per_area_kg_per_cm2",
    "die_embodied_co2_kg",
    "CarbonSettings",
    "CarbonFootprint",
    "request_co2",
]

J_PER_KWH = 3.6e6

# LLMCarbon (SotaroKaneda/MLCarbon, embodied.py) writes the lifetime as 5 * 365 days, so a
# year here is 365 days too; that keeps our embodied shares equal to theirs.
SECONDS_PER_YEAR = 365 * 24 * 3600
DEFAULT_LIFETIME_YEARS = 5.0
DEFAULT_LIFETIME_S = DEFAULT_LIFETIME_YEARS * SECONDS_PER_YEAR

# World-average lifecycle carbon intensity of electricity generation in 2023:
# 481 gCO2e/kWh (Ember, Yearly Electricity Data / Global Electricity Review 2024).
DEFAULT_INTENSITY_G_PER_KWH = 481.0

# Large cloud GPU data centres: hyperscalers report fleet PUEs of 1.10-1.15 (Google, AWS),
# new large facilities reach ~1.3 (Uptime Institute Global Data Center Survey 2024, whose
# all-facility average is 1.56). 1.2 sits between the two; override it per deployment.
DEFAULT_PUE = 1.2

# Carbon emitted per unit die area (CPA) by process node, kgCO2e/cm^2: LLMCarbon (Faiz et
# al., ICLR 2024), hardware embodied-carbon table, reproduced in SotaroKaneda/MLCarbon
# data/hardware.csv: TSMC 16nm 1.0 (CPU, TPUv3), 12nm 1.2 (V100), 7nm 1.6 (TPUv4), 4nm 1.8 (H100).
CPA_KG_PER_CM2_BY_NODE_NM: Mapping[float, float] = MappingProxyType(
    {4.0: 1.8, 7.0: 1.6, 12.0: 1.2, 16.0: 1.0}
)

# DRAM embodied carbon, kgCO2e per GB: LLMCarbon's DRAM row (Micron 18nm, 0.4 kgCO2e/GB);
# applied to HBM and GDDR alike, as LLMCarbon has no separate figure for them.
MEMORY_KG_PER_GB = 0.4

MM2_PER_CM2 = 100.0


def _require_finite(name: str, value: float) -> float:
    # Per request on the serving path: a plain float skips the ABC check (numbers.Real's
    # isinstance costs microseconds through ABCMeta.__instancecheck__).
    if type(value) is float:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return value
    # bool is an int subclass: True would silently mean 1.0
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _require_at_least(name: str, value: float, minimum: float) -> float:
    value = _require_finite(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _require_positive(name: str, value: float) -> float:
    value = _require_finite(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def operational_co2_g(energy_j: float, pue: float, intensity_g_per_kwh: float) -> float:
    """Operational carbon of an energy use, paper Eq. 1.

    ``CO2eq_oper = energy_oper * PUE * carb_inten`` (LLMCO2 Eq. 1, from Faiz et al. 2024).

    Args:
        energy_j: IT energy of the GPUs, J (all GPUs together), >= 0.
        pue: power usage effectiveness of the data centre, dimensionless, >= 1.
        intensity_g_per_kwh: carbon intensity of the electricity, gCO2e/kWh, >= 0.

    Returns:
        Operational carbon, gCO2e. Energy is converted J -> kWh (3.6e6 J/kWh) here.
    """
    energy_j = _require_at_least("energy_j", energy_j, 0.0)
    pue = _require_at_least("pue", pue, 1.0)
    intensity_g_per_kwh = _require_at_least("intensity_g_per_kwh", intensity_g_per_kwh, 0.0)
    return energy_j / J_PER_KWH * pue * intensity_g_per_kwh


def embodied_co2_g(
    duration_s: float,
    n_gpu: int,
    embodied_co2_kg_per_gpu: float,
    lifetime_s: float = DEFAULT_LIFETIME_S,
) -> float:
    """Embodied carbon charged to a use of ``n_gpu`` GPUs for ``duration_s``.

    LLMCarbon (Faiz et al. 2024): ``CO2eq_emb,i = t_i * CO2eq_chip,i / lifetime_i``, summed
    over the ``n_gpu`` identical units, i.e. the share ``duration / lifetime`` of each GPU's
    manufacturing carbon.

    Args:
        duration_s: wall time the GPUs were held, s, >= 0.
        n_gpu: number of GPUs held (tensor-parallel degree), >= 1.
        embodied_co2_kg_per_gpu: one GPU's embodied carbon, kgCO2e (see die_embodied_co2_kg).
        lifetime_s: hardware lifetime, s (default 5 years of 365 days, as LLMCarbon).

    Returns:
        Embodied carbon, gCO2e.
    """
    duration_s = _require_at_least("duration_s", duration_s, 0.0)
    if isinstance(n_gpu, bool) or not isinstance(n_gpu, numbers.Integral) or n_gpu < 1:
        raise ValueError(f"n_gpu must be an int >= 1, got {n_gpu!r}")
    n_gpu = int(n_gpu)
    embodied_co2_kg_per_gpu = _require_at_least(
        "embodied_co2_kg_per_gpu", embodied_co2_kg_per_gpu, 0.0
    )
    lifetime_s = _require_positive("lifetime_s", lifetime_s)
    return duration_s * n_gpu * embodied_co2_kg_per_gpu * 1000.0 / lifetime_s


def carbon_per_area_kg_per_cm2(process_nm: float) -> float:
    """Carbon per die area (CPA) of a process node, kgCO2e/cm^2.

    Exact LLMCarbon values at 4, 7, 12 and 16 nm (CPA_KG_PER_CM2_BY_NODE_NM); linear in
    nm between them (e.g. 8 nm -> 1.52); clamped outside 4-16 nm, so a node finer than 4 nm
    gets 1.8 (an underestimate: finer nodes emit more per area).
    """
    process_nm = _require_positive("process_nm", process_nm)
    nodes = sorted(CPA_KG_PER_CM2_BY_NODE_NM)
    if process_nm <= nodes[0]:
        return CPA_KG_PER_CM2_BY_NODE_NM[nodes[0]]
    if process_nm >= nodes[-1]:
        return CPA_KG_PER_CM2_BY_NODE_NM[nodes[-1]]
    for lo, hi in zip(nodes, nodes[1:]):
        if lo <= process_nm <= hi:
            cpa_lo = CPA_KG_PER_CM2_BY_NODE_NM[lo]
            cpa_hi = CPA_KG_PER_CM2_BY_NODE_NM[hi]
            return cpa_lo + (cpa_hi - cpa_lo) * (process_nm - lo) / (hi - lo)
    raise AssertionError("unreachable: process_nm lies between the table's nodes")


def die_embodied_co2_kg(die_area_mm2: float, process_nm: float, memory_gb: float) -> float:
    """Embodied carbon of one GPU, kgCO2e, LLMCarbon style.

    ``CO2eq_chip = area * CPA(node) + memory * CPM`` with the die area in cm^2, CPA from
    carbon_per_area_kg_per_cm2 and CPM = MEMORY_KG_PER_GB (0.4 kgCO2e/GB). Covers the GPU
    die(s) and its memory only: no package, board, host or cooling share.

    Args:
        die_area_mm2: total GPU die area, mm^2 (all dies of a multi-die package).
        process_nm: process node, nm.
        memory_gb: on-package/on-board GPU memory, GB.
    """
    die_area_mm2 = _require_positive("die_area_mm2", die_area_mm2)
    memory_gb = _require_at_least("memory_gb", memory_gb, 0.0)
    area_cm2 = die_area_mm2 / MM2_PER_CM2
    return area_cm2 * carbon_per_area_kg_per_cm2(process_nm) + memory_gb * MEMORY_KG_PER_GB


@dataclass(frozen=True)
class CarbonSettings:
    """Where and how long the hardware runs: grid intensity, PUE, hardware lifetime.

    Attributes:
        intensity_g_per_kwh: carbon intensity of the electricity, gCO2e/kWh, >= 0. Default
            481 (world 2023, Ember).
        pue: data-centre power usage effectiveness, >= 1.0. Default 1.2.
        lifetime_years: hardware lifetime over which embodied carbon is spread, years of
            365 days, > 0. Default 5 (LLMCarbon).
    """

    intensity_g_per_kwh: float = DEFAULT_INTENSITY_G_PER_KWH
    pue: float = DEFAULT_PUE
    lifetime_years: float = DEFAULT_LIFETIME_YEARS

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "intensity_g_per_kwh",
            _require_at_least("intensity_g_per_kwh", self.intensity_g_per_kwh, 0.0),
        )
        object.__setattr__(self, "pue", _require_at_least("pue", self.pue, 1.0))
        object.__setattr__(
            self, "lifetime_years", _require_positive("lifetime_years", self.lifetime_years)
        )

    @property
    def lifetime_s(self) -> float:
        return self.lifetime_years * SECONDS_PER_YEAR


@dataclass(frozen=True)
class CarbonFootprint:
    """Carbon of one request (or phase), gCO2e; ``total_co2_g`` is derived, never passed."""

    operational_co2_g: float
    embodied_co2_g: float
    total_co2_g: float = field(init=False)

    def __post_init__(self) -> None:
        op = _require_at_least("operational_co2_g", self.operational_co2_g, 0.0)
        emb = _require_at_least("embodied_co2_g", self.embodied_co2_g, 0.0)
        object.__setattr__(self, "operational_co2_g", op)
        object.__setattr__(self, "embodied_co2_g", emb)
        object.__setattr__(self, "total_co2_g", op + emb)


def request_co2(
    energy_j: float,
    duration_s: float,
    n_gpu: int,
    gpu: "GPUSpec",
    settings: CarbonSettings,
) -> CarbonFootprint:
    """Operational (Eq. 1) plus embodied (LLMCarbon) carbon of one request.

    Args:
        energy_j: GPU energy of the request, J, summed over all ``n_gpu`` GPUs.
        duration_s: wall time the ``n_gpu`` GPUs were occupied by it, s.
        n_gpu: number of GPUs (tensor-parallel degree).
        gpu: the GPU model; its ``embodied_co2_kg`` is used.
        settings: intensity, PUE and lifetime.
    """
    operational = operational_co2_g(energy_j, settings.pue, settings.intensity_g_per_kwh)
    embodied = embodied_co2_g(duration_s, n_gpu, gpu.embodied_co2_kg, settings.lifetime_s)
    return CarbonFootprint(operational_co2_g=operational, embodied_co2_g=embodied)
