"""Energy readers: the fake's counter physics, the NVML reader over it, fallbacks."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from llmco2_serve.hardware import gpu_energy as ge
from llmco2_serve.hardware.gpu_energy import (
    CounterWentBackwards,
    EnergyCounterNotSupported,
    EnergyReader,
    EnergyReaderError,
    FakeEnergyReader,
    FakeNvml,
    GpuLost,
    InvalidDevice,
    ManualClock,
    NullEnergyReader,
    NvmlEnergyReader,
    NvmlNotAvailable,
    open_energy_reader,
)


# ------------------------------------------------------------------ fake counter physics
def test_fake_counter_moves_only_at_update_ticks_in_integer_mj():
    clock = ManualClock(0.0)
    nvml = FakeNvml([200.0], clock=clock, update_period_s=0.1)
    nvml.nvmlInit()
    h = nvml.nvmlDeviceGetHandleByIndex(0)
    reads = []
    for t in (0.05, 0.0999, 0.1, 0.15, 0.1999, 0.2, 0.35):
        clock.set(t)
        reads.append(nvml.nvmlDeviceGetTotalEnergyConsumption(h))
    # 200 W: 20 J per 100 ms tick; reads between ticks repeat the last tick's value.
    assert reads == [0, 0, 20_000, 20_000, 20_000, 40_000, 60_000]
    assert all(isinstance(v, int) for v in reads)


def test_fake_counter_integrates_a_power_function_and_device_phase():
    clock = ManualClock(0.0)
    nvml = FakeNvml(
        [lambda t: 100.0 if t < 0.25 else 300.0, 50.0],
        clock=clock,
        update_period_s=0.1,
        phase_s=[0.0, 0.05],
    )
    # device 0 at its tick 0.3: 100 W * 0.25 s + 300 W * 0.05 s = 40 J
    assert nvml.counter_mj(0, 0.34) == 40_000
    # device 1 ticks at 0.05, 0.15, ...: at t = 0.12 its last tick is 0.05 -> 2.5 J
    assert nvml.counter_mj(1, 0.12) == 2_500
    assert nvml.true_energy_j(0, 0.26) == pytest.approx(25.0 + 3.0)


def test_fake_part_time_sampling_misses_bursts_but_not_steady_power():
    clock = ManualClock(0.0)
    burst = FakeNvml([lambda t: 400.0 if 0.02 <= t < 0.05 else 100.0], clock=clock,
                     update_period_s=0.1, sampled_fraction=0.25)
    # the tick at 0.1 only sees [0.075, 0.1] at 100 W: 10 J although 19 J were drawn
    assert burst.counter_mj(0, 0.1) == 10_000
    assert burst.true_energy_j(0, 0.1) == pytest.approx(19.0)
    # a burst inside the sampled quarter is over-counted: [0.18, 0.2] at 400 W -> 0.1 s x
    # (0.005 s x 100 W + 0.02 s x 400 W) / 0.025 s = 34 J on top
    late = FakeNvml([lambda t: 400.0 if 0.18 <= t < 0.2 else 100.0], clock=clock,
                    update_period_s=0.1, sampled_fraction=0.25)
    assert late.counter_mj(0, 0.2) == 10_000 + 34_000
    steady = FakeNvml([250.0], clock=clock, update_period_s=0.1, sampled_fraction=0.25)
    assert steady.counter_mj(0, 0.3) == 75_000


def test_fake_counter_floors_to_whole_millijoules():
    clock = ManualClock(0.0)
    nvml = FakeNvml([0.01234], clock=clock, update_period_s=0.1)  # 1.234 mJ per tick
    assert [nvml.counter_mj(0, t) for t in (0.1, 0.2, 0.3)] == [1, 2, 3]


def test_fake_requires_matching_lengths():
    with pytest.raises(ValueError, match="phase_s"):
        FakeNvml([1.0, 2.0], clock=ManualClock(), phase_s=[0.0])


# ------------------------------------------------------------------ NVML reader over the fake
def test_error_table_codes_match_pynvml():
    pynvml = pytest.importorskip("pynvml")
    expected = {
        "NVML_ERROR_UNINITIALIZED": NvmlNotAvailable,
        "NVML_ERROR_INVALID_ARGUMENT": InvalidDevice,
        "NVML_ERROR_NOT_SUPPORTED": EnergyCounterNotSupported,
        "NVML_ERROR_NO_PERMISSION": ge.NvmlPermissionDenied,
        "NVML_ERROR_NOT_FOUND": InvalidDevice,
        "NVML_ERROR_DRIVER_NOT_LOADED": NvmlNotAvailable,
        "NVML_ERROR_LIBRARY_NOT_FOUND": NvmlNotAvailable,
        "NVML_ERROR_FUNCTION_NOT_FOUND": NvmlNotAvailable,
        "NVML_ERROR_GPU_IS_LOST": GpuLost,
        "NVML_ERROR_RESET_REQUIRED": GpuLost,
    }
    for name, cls in expected.items():
        assert ge._NVML_ERROR_TABLE[getattr(pynvml, name)] is cls, name
    # a real pynvml error object translates through the same table
    err = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    assert type(ge._translate_nvml_error(err, "read")) is GpuLost
    timeout = pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
    assert type(ge._translate_nvml_error(timeout, "x")) is EnergyReaderError


def test_import_has_no_side_effects():
    code = (
        "import sys; import llmco2_serve.hardware.gpu_energy, llmco2_serve.runtime.attribution; "
        "print('pynvml' in sys.modules, 'codecarbon' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_nvml_reader_reads_selected_devices_and_names_them():
    clock = ManualClock(0.0)
    reader = FakeEnergyReader([100.0, 200.0, 300.0], clock=clock, device_indices=[2, 0])
    assert isinstance(reader, EnergyReader)
    assert reader.source == "fake"
    assert reader.device_names() == ["cuda:2 Fake H100", "cuda:0 Fake H100"]
    clock.set(0.25)
    assert reader.energy_mj() == [60_000, 20_000]
    reader.close()
    reader.close()  # idempotent
    assert reader.nvml.init_count == 0
    with pytest.raises(NvmlNotAvailable, match="closed"):
        reader.energy_mj()


def test_invalid_device_index_names_the_field():
    with pytest.raises(InvalidDevice, match="device_indices contains 3"):
        FakeEnergyReader([1.0, 1.0], clock=ManualClock(), device_indices=[3])
    with pytest.raises(ValueError):  # InvalidDevice is also a ValueError
        FakeEnergyReader([1.0], clock=ManualClock(), device_indices=[])


@pytest.mark.parametrize(
    ("visible", "expected_watts"),
    [
        ("2,0", [300, 100]),
        (" 3 ", [400]),
        ("GPU-fake-0001,GPU-fake-0003", [200, 400]),  # full UUIDs
        ("GPU-fake-0002", [300]),
        ("1,-1,2", [200]),  # CUDA stops at the first invalid entry
        ("1,7,2", [200]),
        ("1,GPU-fake-000,2", [200]),  # ambiguous UUID prefix stops too
    ],
)
def test_cuda_visible_devices_maps_ordinals_to_nvml_devices(monkeypatch, visible, expected_watts):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    clock = ManualClock(0.0)
    nvml = FakeNvml([100.0, 200.0, 300.0, 400.0], clock=clock, update_period_s=0.1)
    reader = NvmlEnergyReader(nvml=nvml)  # default: honour the environment
    clock.set(0.1)
    assert reader.energy_mj() == [w * 100 for w in expected_watts]


@pytest.mark.parametrize(("visible", "exc"), [("", InvalidDevice), ("-1", InvalidDevice),
                                              ("MIG-1234", EnergyCounterNotSupported)])
def test_cuda_visible_devices_hiding_everything_or_mig_is_refused(monkeypatch, visible, exc):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    nvml = FakeNvml([100.0], clock=ManualClock())
    with pytest.raises(exc):
        NvmlEnergyReader(nvml=nvml)
    assert nvml.init_count == 0  # shut NVML down again on a failed open


def test_unsupported_counter_is_detected_once_at_open():
    nvml = FakeNvml([100.0, 100.0], clock=ManualClock(), supports_energy=[True, False])
    with pytest.raises(EnergyCounterNotSupported, match="cuda:1") as info:
        NvmlEnergyReader(nvml=nvml, visible_devices=None)
    assert isinstance(info.value.__cause__, FakeNvml.NVMLError)
    assert nvml.init_count == 0
    # the supported device alone opens fine
    assert NvmlEnergyReader([0], nvml=nvml, visible_devices=None).energy_mj() == [0]


def test_init_failure_translates_with_cause():
    nvml = FakeNvml([1.0], clock=ManualClock(), init_error=FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(NvmlNotAvailable, match="nvmlInit") as info:
        NvmlEnergyReader(nvml=nvml)
    assert info.value.__cause__.value == FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED


def test_injected_errors_transient_then_recover_and_gpu_lost_is_permanent():
    clock = ManualClock(0.0)
    reader = FakeEnergyReader([100.0, 100.0], clock=clock)
    reader.fail_on_read(2)
    clock.set(0.1)
    assert reader.energy_mj() == [10_000, 10_000]
    with pytest.raises(EnergyReaderError) as info:
        reader.energy_mj()
    assert type(info.value) is EnergyReaderError and not info.value.permanent
    assert reader.energy_mj() == [10_000, 10_000]
    reader.nvml.lose_device(1)
    with pytest.raises(GpuLost) as lost:
        reader.energy_mj()
    assert lost.value.permanent and "cuda:1" in str(lost.value)


def test_counter_going_backwards_is_an_error():
    clock = ManualClock(0.0)
    reader = FakeEnergyReader(lambda t: 100.0 if t < 0.1 else -100.0, clock=clock)
    clock.set(0.1)
    reader.energy_mj()
    clock.set(0.2)
    with pytest.raises(CounterWentBackwards, match="10000 mJ to 0 mJ"):
        reader.energy_mj()


def test_nvml_available_is_cached_and_false_without_nvml(monkeypatch):
    broken = FakeNvml([1.0], clock=ManualClock(), init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    working = FakeNvml([1.0], clock=ManualClock())
    ge.nvml_available.cache_clear()
    try:
        monkeypatch.setattr(ge, "_import_pynvml", lambda: broken)
        assert ge.nvml_available() is False
        monkeypatch.setattr(ge, "_import_pynvml", lambda: working)
        assert ge.nvml_available() is False  # cached
        ge.nvml_available.cache_clear()
        assert ge.nvml_available() is True
        assert working.init_count == 0  # probe shut NVML down again
    finally:
        ge.nvml_available.cache_clear()


# ------------------------------------------------------------------ fallbacks
def test_open_energy_reader_prefers_nvml_and_logs(caplog):
    nvml = FakeNvml([100.0], clock=ManualClock())
    with caplog.at_level(logging.INFO, logger="llmco2_serve.hardware.gpu_energy"):
        reader = open_energy_reader(nvml=nvml)
    assert type(reader) is NvmlEnergyReader and reader.source == "nvml"
    assert "NVML energy counters on cuda:0 Fake H100" in caplog.text


def test_open_energy_reader_falls_back_to_unavailable_with_reason(caplog, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNvml([100.0], clock=ManualClock(), init_error=FakeNvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with caplog.at_level(logging.WARNING, logger="llmco2_serve.hardware.gpu_energy"):
        reader = open_energy_reader("auto", nvml=nvml)
    assert isinstance(reader, NullEnergyReader) and reader.source == "unavailable"
    assert "NVML error 9" in reader.reason and "cpu-estimate: disabled" in reader.reason
    assert "no energy source" in caplog.text
    with pytest.raises(NvmlNotAvailable):
        open_energy_reader("nvml", nvml=nvml)
    assert isinstance(open_energy_reader("none"), NullEnergyReader)
    with pytest.raises(ValueError, match="mode must be one of"):
        open_energy_reader("gpu")


def test_null_reader_has_no_counters():
    reader = NullEnergyReader("test")
    assert (reader.source, reader.device_names(), reader.energy_mj()) == ("unavailable", [], [])


def test_codecarbon_cpu_estimate_is_labelled_and_bounded_by_tdp(caplog):
    pytest.importorskip("codecarbon")
    nvml = FakeNvml([100.0], clock=ManualClock(), init_error=FakeNvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    with caplog.at_level(logging.WARNING, logger="llmco2_serve.hardware.gpu_energy"):
        fallback = open_energy_reader("auto", nvml=nvml, cpu_estimate=True)
    assert fallback.source == "cpu-estimate-codecarbon"
    assert "ESTIMATE" in caplog.text and "NVML error 12" in caplog.text

    clock = ManualClock(10.0)
    reader = ge.CodecarbonCpuEstimateReader(clock=clock)
    assert "estimate" in reader.device_names()[0]
    first = reader.energy_mj()[0]
    clock.advance(2.0)
    second = reader.energy_mj()[0]
    # codecarbon cpu_load model: TDP * (0.1 + 0.9 load^3), load in [0, 1]
    assert 0.1 * reader.tdp_w * 2.0 * 1000 - 1 <= second - first <= reader.tdp_w * 2.0 * 1000 + 1


def test_shared_gpu_is_detected_mig_and_foreign_processes():
    """Issue 6.8: a MIG board or another tenant's process makes the board-wide counter shared."""
    import subprocess
    import time
    import types

    from llmco2_serve.hardware.gpu_energy import FakeEnergyReader, ManualClock

    r = FakeEnergyReader(100.0, clock=ManualClock())
    assert r.sharing_note() is None  # the fake NVML has neither
    base = r._nvml

    class Nvml:
        mig = 0
        pids: list[int] = []

        def __getattr__(self, k):
            return getattr(base, k)

        def nvmlDeviceGetMigMode(self, h):  # noqa: N802 - pynvml's name
            return (self.mig, self.mig)

        def nvmlDeviceGetComputeRunningProcesses(self, h):  # noqa: N802
            return [types.SimpleNamespace(pid=p) for p in self.pids]

    nv = r._nvml = Nvml()
    child = subprocess.Popen(["sleep", "30"])  # our own worker-like child: not foreign
    # an orphan (its parent exits at once): re-parented outside this process tree, a real foreign pid
    out = subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    orphan = int(out.stdout.strip())
    try:
        time.sleep(0.2)
        nv.pids = [child.pid]
        assert r.sharing_note() is None
        nv.pids = [child.pid, orphan]
        assert str(orphan) in r.sharing_note()
        nv.pids, nv.mig = [], 1
        assert "MIG" in r.sharing_note()
    finally:
        child.kill()
        subprocess.run(["kill", str(orphan)])


def test_update_period_is_measured_not_assumed():
    """Issue 6.9: the counter's period varies by GPU and driver; measure it when the reader opens."""
    from llmco2_serve.runtime.engine_meter import EngineMeter
    from llmco2_serve.hardware.gpu_energy import FakeEnergyReader, ManualClock, measure_update_period_s

    for true_period in (0.02, 0.1, 0.25):
        clock = ManualClock(0.0)
        reader = FakeEnergyReader([200.0, 300.0], clock=clock, update_period_s=true_period, phase_s=[0.0, 0.013])
        reader.update_period_s = 0.1  # what the reader would assume
        got = measure_update_period_s(reader, clock=clock, sleep=clock.advance, max_s=2.0, poll_s=0.001)
        assert got == pytest.approx(true_period, abs=0.0011)
        meter = EngineMeter(reader, clock=clock)
        assert meter.measure_update_period(clock=clock, sleep=clock.advance, max_s=2.0, poll_s=0.001) == \
            pytest.approx(true_period, abs=0.0011)
        assert meter.attributor.update_period_s == pytest.approx(true_period, abs=0.0011)
    idle = FakeEnergyReader(0.0, clock=(c := ManualClock(0.0)))  # a counter that never moves
    assert measure_update_period_s(idle, clock=c, sleep=c.advance, max_s=0.5) is None
