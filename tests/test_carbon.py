"""Carbon model: Eq. 1 (operational) and LLMCarbon embodied carbon, against hand-computed values."""

import dataclasses
import math

import pytest

from llmco2_serve.carbon.footprint import (
    CPA_KG_PER_CM2_BY_NODE_NM,
    DEFAULT_INTENSITY_G_PER_KWH,
    DEFAULT_LIFETIME_S,
    DEFAULT_PUE,
    SECONDS_PER_YEAR,
    CarbonFootprint,
    CarbonSettings,
    carbon_per_area_kg_per_cm2,
    die_embodied_co2_kg,
    embodied_co2_g,
    operational_co2_g,
    request_co2,
)
from llmco2_serve.hardware.gpus import GPUSpec, gpu_spec


# --- Eq. 1: operational ---------------------------------------------------------------------

def test_operational_one_kwh_at_pue_one():
    # 3.6e6 J = 1 kWh; 1 kWh * 1.0 * 100 g/kWh = 100 g
    assert operational_co2_g(3.6e6, 1.0, 100.0) == pytest.approx(100.0)


def test_operational_scales_with_pue_and_intensity():
    # 2 kWh * 1.5 * 200 g/kWh = 600 g
    assert operational_co2_g(7.2e6, 1.5, 200.0) == pytest.approx(600.0)
    # 1000 J * 1.2 * 481 g/kWh / 3.6e6 J/kWh = 0.160333 g
    assert operational_co2_g(1000.0, 1.2, 481.0) == pytest.approx(0.16033333333)


def test_operational_zero_energy_and_zero_intensity():
    assert operational_co2_g(0.0, 1.3, 500.0) == 0.0
    assert operational_co2_g(5e6, 1.3, 0.0) == 0.0


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((3.6e6, 0.99, 100.0), "pue"),
        ((3.6e6, 1.0, -1.0), "intensity_g_per_kwh"),
        ((-1.0, 1.0, 100.0), "energy_j"),
        ((math.nan, 1.0, 100.0), "energy_j"),
        ((3.6e6, math.inf, 100.0), "pue"),
        ((True, 1.0, 100.0), "energy_j"),
        (("3.6e6", 1.0, 100.0), "energy_j"),
    ],
)
def test_operational_rejects_bad_inputs_naming_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        operational_co2_g(*args)


# --- embodied share ---------------------------------------------------------------------------

def test_default_lifetime_is_five_365_day_years():
    assert SECONDS_PER_YEAR == 31_536_000
    assert DEFAULT_LIFETIME_S == 157_680_000


def test_embodied_whole_lifetime_is_whole_chip():
    # one GPU held for its whole lifetime carries all of its 10 kg = 10,000 g
    assert embodied_co2_g(1000.0, 1, 10.0, lifetime_s=1000.0) == pytest.approx(10_000.0)


def test_embodied_share_hand_computed():
    # 4 H100s (46.652 kg each) for 1 s over 5 years: 4 * 46652 g / 157,680,000 s
    assert embodied_co2_g(1.0, 4, 46.652) == pytest.approx(186_608 / 157_680_000)
    # 2 GPUs, 10 kg, 30 s of a 1e4 s life: 2 * 10,000 g * 30 / 1e4 = 60 g
    assert embodied_co2_g(30.0, 2, 10.0, lifetime_s=1e4) == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(duration_s=-1.0, n_gpu=1, embodied_co2_kg_per_gpu=1.0), "duration_s"),
        (dict(duration_s=1.0, n_gpu=0, embodied_co2_kg_per_gpu=1.0), "n_gpu"),
        (dict(duration_s=1.0, n_gpu=1.5, embodied_co2_kg_per_gpu=1.0), "n_gpu"),
        (dict(duration_s=1.0, n_gpu=True, embodied_co2_kg_per_gpu=1.0), "n_gpu"),
        (dict(duration_s=1.0, n_gpu=1, embodied_co2_kg_per_gpu=-2.0), "embodied_co2_kg_per_gpu"),
        (dict(duration_s=1.0, n_gpu=1, embodied_co2_kg_per_gpu=1.0, lifetime_s=0.0), "lifetime_s"),
    ],
)
def test_embodied_rejects_bad_inputs_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        embodied_co2_g(**kwargs)


# --- LLMCarbon chip model -------------------------------------------------------------------

def test_cpa_table_is_llmcarbons():
    assert dict(CPA_KG_PER_CM2_BY_NODE_NM) == {4.0: 1.8, 7.0: 1.6, 12.0: 1.2, 16.0: 1.0}


@pytest.mark.parametrize(
    ("node_nm", "cpa"),
    [
        (4, 1.8), (7, 1.6), (12, 1.2), (16, 1.0),
        (8, 1.52),               # 1.6 + (1.2 - 1.6) * 1/5
        (5, 1.8 - 0.2 / 3),      # 1.8 + (1.6 - 1.8) * 1/3
        (14, 1.1),               # halfway 12 -> 16
        (3, 1.8), (28, 1.0),     # clamped
    ],
)
def test_cpa_interpolation(node_nm, cpa):
    assert carbon_per_area_kg_per_cm2(node_nm) == pytest.approx(cpa)


def test_die_embodied_reproduces_llmcarbon_chips():
    # LLMCarbon's table: V100 815 mm^2 at 12 nm -> 9.78 kg; H100 814 mm^2 at 4 nm -> 14.652 kg
    assert die_embodied_co2_kg(815, 12, 0) == pytest.approx(9.78)
    assert die_embodied_co2_kg(814, 4, 0) == pytest.approx(14.652)


def test_die_embodied_adds_memory_per_gb():
    # H100 SXM: 14.652 + 80 GB * 0.4 = 46.652 kg;  T4: 5.45 * 1.2 + 16 * 0.4 = 12.94 kg
    assert die_embodied_co2_kg(814, 4, 80) == pytest.approx(46.652)
    assert die_embodied_co2_kg(545, 12, 16) == pytest.approx(12.94)


@pytest.mark.parametrize(
    ("args", "field"),
    [((0, 4, 80), "die_area_mm2"), ((814, 0, 80), "process_nm"), ((814, 4, -1), "memory_gb")],
)
def test_die_embodied_rejects_bad_inputs(args, field):
    with pytest.raises(ValueError, match=field):
        die_embodied_co2_kg(*args)


# --- settings -------------------------------------------------------------------------------

def test_settings_defaults():
    s = CarbonSettings()
    assert (s.intensity_g_per_kwh, s.pue, s.lifetime_years) == (481.0, 1.2, 5.0)
    assert (DEFAULT_INTENSITY_G_PER_KWH, DEFAULT_PUE) == (481.0, 1.2)
    assert s.lifetime_s == DEFAULT_LIFETIME_S


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(pue=0.95), "pue"),
        (dict(pue=math.nan), "pue"),
        (dict(intensity_g_per_kwh=-5.0), "intensity_g_per_kwh"),
        (dict(intensity_g_per_kwh=math.inf), "intensity_g_per_kwh"),
        (dict(intensity_g_per_kwh="400"), "intensity_g_per_kwh"),
        (dict(lifetime_years=0.0), "lifetime_years"),
        (dict(lifetime_years=-3.0), "lifetime_years"),
    ],
)
def test_settings_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CarbonSettings(**kwargs)


def test_settings_boundaries_allowed_and_frozen():
    s = CarbonSettings(intensity_g_per_kwh=0, pue=1.0, lifetime_years=1)
    assert s.intensity_g_per_kwh == 0.0 and isinstance(s.intensity_g_per_kwh, float)
    assert s.lifetime_s == 31_536_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.pue = 2.0  # type: ignore[misc]


# --- footprint and request ------------------------------------------------------------------

def test_footprint_total_is_derived():
    fp = CarbonFootprint(operational_co2_g=1.25, embodied_co2_g=0.5)
    assert fp.total_co2_g == 1.75
    with pytest.raises(TypeError):
        CarbonFootprint(  # type: ignore[call-arg]
            operational_co2_g=1.0, embodied_co2_g=1.0, total_co2_g=5.0
        )
    with pytest.raises(ValueError, match="embodied_co2_g"):
        CarbonFootprint(operational_co2_g=1.0, embodied_co2_g=-0.1)


def _gpu(embodied_co2_kg: float) -> GPUSpec:
    return GPUSpec(
        name="TEST", peak_tflops={"float16": 100.0}, memory_gb=10, memory_bandwidth_gb_s=100,
        nvlink_bandwidth_gb_s=0, pcie_bandwidth_gb_s=64, tdp_w=100, die_area_mm2=100,
        process_nm=7, embodied_co2_kg=embodied_co2_kg, source="test",
    )


def test_request_co2_hand_computed():
    # lifetime 1e4 s; 1 kWh at PUE 1.0 and 100 g/kWh = 100 g; 2 GPUs x 10 kg x 1 s / 1e4 s = 2 g
    settings = CarbonSettings(
        intensity_g_per_kwh=100.0, pue=1.0, lifetime_years=1e4 / SECONDS_PER_YEAR
    )
    fp = request_co2(energy_j=3.6e6, duration_s=1.0, n_gpu=2, gpu=_gpu(10.0), settings=settings)
    assert fp.operational_co2_g == pytest.approx(100.0)
    assert fp.embodied_co2_g == pytest.approx(2.0)
    assert fp.total_co2_g == pytest.approx(102.0)


def test_request_co2_with_table_gpu_and_defaults():
    # H100 SXM, 1000 J over 2 s on 1 GPU, default settings:
    # operational 1000/3.6e6 * 1.2 * 481 = 0.160333 g; embodied 2 * 46652 / 157,680,000 g
    fp = request_co2(1000.0, 2.0, 1, gpu_spec("h100"), CarbonSettings())
    assert fp.operational_co2_g == pytest.approx(0.16033333333)
    assert fp.embodied_co2_g == pytest.approx(2 * 46_652 / 157_680_000)
    assert fp.total_co2_g == pytest.approx(fp.operational_co2_g + fp.embodied_co2_g)
