"""Energy counters: one small reader protocol, NVML, a faithful fake, and open fallbacks.

Shape (after Zeus' ``zeus/device/gpu``): :class:`EnergyReader` is the protocol every reader
follows; :class:`NvmlEnergyReader` is the only code that touches ``pynvml`` (imported lazily,
``nvmlInit`` only in its constructor); :class:`FakeNvml` is a stand-in for the ``pynvml`` module
with the real counter's behaviour, and :class:`FakeEnergyReader` runs the real NVML reader over
it; :class:`NullEnergyReader` says "no measurement" and :class:`CodecarbonCpuEstimateReader` is a
labelled CPU *estimate*. :func:`open_energy_reader` walks the fallback chain and logs which
path it took and why.

Counter semantics shared by all readers: ``energy_mj()`` returns one integer per watched
device, millijoules since an arbitrary origin, never decreasing. NVML's
``nvmlDeviceGetTotalEnergyConsumption`` (Volta and newer) moves in coarse steps: on H100/H200
it changes about every 100 ms (``update_period_s``), and reads between two updates return the
same value. Callers must therefore treat energy as known only per *window* between two reads
at which the value changed (see :mod:`llmco2_serve.runtime.attribution`).

Device indices and ``CUDA_VISIBLE_DEVICES``: ``device_indices`` are CUDA ordinals as the
serving process sees them (``cuda:0`` is index 0). When ``CUDA_VISIBLE_DEVICES`` is set, entry
``i`` of it names the physical GPU behind ordinal ``i``: an integer is taken as the NVML index,
a ``GPU-...`` string as a (prefix of a) device UUID, as CUDA does. As in CUDA, parsing stops at
the first entry that names no device (so ``-1`` or ``""`` hides every GPU). NVML numbers GPUs
in PCI bus order; integer entries agree with CUDA's numbering when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
(or all GPUs are the same model, the usual serving case); UUIDs are always unambiguous.
``MIG-...`` entries are refused: NVML has no energy counter per MIG instance.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

__all__ = [
    "EnergyReader",
    "EnergyReaderError",
    "NvmlNotAvailable",
    "NvmlPermissionDenied",
    "EnergyCounterNotSupported",
    "InvalidDevice",
    "GpuLost",
    "CounterWentBackwards",
    "EstimatorNotAvailable",
    "NvmlEnergyReader",
    "FakeNvml",
    "FakeEnergyReader",
    "ManualClock",
    "NullEnergyReader",
    "CodecarbonCpuEstimateReader",
    "WorkFakeReader",
    "nvml_available",
    "open_energy_reader",
    "NVML_UPDATE_PERIOD_S",
]

#: Typical update period of NVML's total-energy counter on H100/H200 (measured; see
#: ``shared/README.md``). Used as a hint by the attributor, never for correctness.
NVML_UPDATE_PERIOD_S = 0.1


# --------------------------------------------------------------------------------------------
# Protocol and errors
# --------------------------------------------------------------------------------------------
@runtime_checkable
class EnergyReader(Protocol):
    """What the attributor needs from an energy source.

    Attributes:
        source: which path produces the numbers: ``"nvml"``, ``"fake"``, ``"unavailable"``,
            ``"cpu-estimate-codecarbon"``. Goes on every output.
        update_period_s: how often the counter changes (0.0 if it changes at every read).
    """

    source: str
    update_period_s: float

    def device_names(self) -> list[str]:
        """One name per watched device, in the order of :meth:`energy_mj`."""
        ...

    def energy_mj(self) -> list[int]:
        """One monotonic counter per watched device, millijoules. Raises EnergyReaderError."""
        ...

    def close(self) -> None:
        """Release the library handle. Idempotent."""
        ...


class EnergyReaderError(RuntimeError):
    """A read or open failed. ``permanent`` says whether retrying can help."""

    permanent: bool = False


class NvmlNotAvailable(EnergyReaderError):
    """pynvml or the NVIDIA driver/library is missing, or NVML is not initialised."""

    permanent = True


class NvmlPermissionDenied(EnergyReaderError):
    permanent = True


class EnergyCounterNotSupported(EnergyReaderError):
    """The device has no total-energy counter (pre-Volta, MIG instance, some vGPUs)."""

    permanent = True


class InvalidDevice(EnergyReaderError, ValueError):
    """A device index or CUDA_VISIBLE_DEVICES entry names no device."""

    permanent = True


class GpuLost(EnergyReaderError):
    """The GPU fell off the bus or needs a reset."""

    permanent = True


class CounterWentBackwards(EnergyReaderError):
    """A counter decreased (driver reload / GPU reset): its history is no longer comparable."""

    permanent = True


class EstimatorNotAvailable(EnergyReaderError):
    """The optional CPU estimator (codecarbon) is not importable or could not start."""

    permanent = True


# NVML return codes (nvml.h; stable ABI, checked against pynvml in the tests) -> our exception.
# Codes not listed become a transient EnergyReaderError.
_NVML_ERROR_TABLE: dict[int, type[EnergyReaderError]] = {
    1: NvmlNotAvailable,  # NVML_ERROR_UNINITIALIZED
    2: InvalidDevice,  # NVML_ERROR_INVALID_ARGUMENT
    3: EnergyCounterNotSupported,  # NVML_ERROR_NOT_SUPPORTED
    4: NvmlPermissionDenied,  # NVML_ERROR_NO_PERMISSION
    6: InvalidDevice,  # NVML_ERROR_NOT_FOUND
    9: NvmlNotAvailable,  # NVML_ERROR_DRIVER_NOT_LOADED
    12: NvmlNotAvailable,  # NVML_ERROR_LIBRARY_NOT_FOUND
    13: NvmlNotAvailable,  # NVML_ERROR_FUNCTION_NOT_FOUND
    15: GpuLost,  # NVML_ERROR_GPU_IS_LOST
    16: GpuLost,  # NVML_ERROR_RESET_REQUIRED
}


def _translate_nvml_error(error: BaseException, what: str) -> EnergyReaderError:
    """Map an NVMLError (anything with an integer ``value``) to our exception type."""
    code = getattr(error, "value", None)
    cls = _NVML_ERROR_TABLE.get(code, EnergyReaderError)
    return cls(f"{what}: NVML error {code} ({error})")


# --------------------------------------------------------------------------------------------
# NVML
# --------------------------------------------------------------------------------------------
def _import_pynvml() -> Any:
    try:
        import pynvml  # the only import of pynvml in the project
    except ImportError as e:
        raise NvmlNotAvailable("pynvml (nvidia-ml-py) is not installed") from e
    return pynvml


@functools.lru_cache(maxsize=1)
def nvml_available() -> bool:
    """True when NVML initialises and reports at least one GPU. Cached; ``.cache_clear()`` resets.

    Does not check the energy counter (see :class:`NvmlEnergyReader`).
    """
    try:
        nvml = _import_pynvml()
    except NvmlNotAvailable:
        return False
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return False
    try:
        return int(nvml.nvmlDeviceGetCount()) > 0
    except nvml.NVMLError:
        return False
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass  # shutdown failure leaves nothing for us to clean up


_FROM_ENV = object()


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible_nvml_handles(nvml: Any, visible_devices: str | None) -> list[Any]:
    """NVML handles in CUDA ordinal order (see the module docstring for the rules)."""
    count = int(nvml.nvmlDeviceGetCount())
    all_handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
    if visible_devices is None:
        return all_handles
    uuids: list[str] | None = None
    handles: list[Any] = []
    for raw in visible_devices.split(","):
        entry = raw.strip()
        if entry.startswith("MIG-"):
            raise EnergyCounterNotSupported(
                f"CUDA_VISIBLE_DEVICES entry {entry!r} is a MIG instance; NVML has no energy "
                "counter per MIG instance"
            )
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if not 0 <= index < count:
                break  # CUDA stops at the first invalid entry
            handles.append(all_handles[index])
            continue
        if not entry.startswith("GPU-"):
            break
        if uuids is None:
            uuids = [_as_str(nvml.nvmlDeviceGetUUID(h)) for h in all_handles]
        matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
        if len(matches) != 1:
            break  # unknown or ambiguous prefix: CUDA stops here too
        handles.append(all_handles[matches[0]])
    return handles


class NvmlEnergyReader:
    """Total-energy counters of NVIDIA GPUs through NVML (Volta and newer).

    Args:
        device_indices: CUDA ordinals to watch (see module docstring); ``None`` = all visible.
        nvml: a ``pynvml``-like module; ``None`` imports ``pynvml``. Tests pass a :class:`FakeNvml`.
        visible_devices: the ``CUDA_VISIBLE_DEVICES`` string to honour; by default read from the
            environment when the reader is opened; ``None`` means "all devices".

    Raises:
        NvmlNotAvailable, EnergyCounterNotSupported, InvalidDevice, ...: on open.
    """

    source = "nvml"
    update_period_s = NVML_UPDATE_PERIOD_S

    def __init__(
        self,
        device_indices: Sequence[int] | None = None,
        *,
        nvml: Any = None,
        visible_devices: Any = _FROM_ENV,
    ) -> None:
        self._nvml = _import_pynvml() if nvml is None else nvml
        if visible_devices is _FROM_ENV:
            visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        nv = self._nvml
        try:
            nv.nvmlInit()
        except nv.NVMLError as e:
            raise _translate_nvml_error(e, "nvmlInit") from e
        self._open = True
        try:
            self._handles, self._names = self._select(device_indices, visible_devices)
            # Check support once per device: fails here rather than in the engine loop.
            self._last_mj = [self._read_one(i) for i in range(len(self._handles))]
        except EnergyReaderError:
            self.close()
            raise

    def _select(self, device_indices: Sequence[int] | None, visible_devices: str | None):
        nv = self._nvml
        try:
            visible = _visible_nvml_handles(nv, visible_devices)
        except nv.NVMLError as e:
            raise _translate_nvml_error(e, "enumerating devices") from e
        if not visible:
            raise InvalidDevice(f"no GPU is visible (CUDA_VISIBLE_DEVICES={visible_devices!r})")
        indices = list(range(len(visible))) if device_indices is None else list(device_indices)
        if not indices:
            raise InvalidDevice("device_indices is empty")
        for i in indices:
            if not isinstance(i, int) or not 0 <= i < len(visible):
                raise InvalidDevice(
                    f"device_indices contains {i!r}; visible CUDA ordinals are "
                    f"0..{len(visible) - 1}"
                )
        handles = [visible[i] for i in indices]
        try:
            names = [
                f"cuda:{i} {_as_str(nv.nvmlDeviceGetName(h))}" for i, h in zip(indices, handles)
            ]
        except nv.NVMLError as e:
            raise _translate_nvml_error(e, "nvmlDeviceGetName") from e
        return handles, names

    def _read_one(self, k: int) -> int:
        nv = self._nvml
        try:
            return int(nv.nvmlDeviceGetTotalEnergyConsumption(self._handles[k]))
        except nv.NVMLError as e:
            raise _translate_nvml_error(
                e, f"nvmlDeviceGetTotalEnergyConsumption on {self._names[k]}"
            ) from e

    def device_names(self) -> list[str]:
        return list(self._names)

    def sharing_note(self) -> str | None:
        """Why a counter may include energy that is not this server's, or None.

        A GPU in MIG mode, or one with compute processes outside this process tree, has one
        board-wide counter: the plugin cannot separate the other tenants' energy, so it labels
        its values ``nvml-shared`` instead of silently charging them to its requests.
        """
        notes = []
        own = _process_tree_pids()
        for k, h in enumerate(self._handles):
            try:
                current = self._nvml.nvmlDeviceGetMigMode(h)
                if isinstance(current, (tuple, list)):
                    current = current[0]
                if int(current) == 1:
                    notes.append(f"{self._names[k]} is in MIG mode (one counter for the whole board)")
                    continue
            except Exception:  # noqa: BLE001 - not supported on this GPU/driver: not MIG
                pass
            try:
                procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception:  # noqa: BLE001 - unknown: say nothing rather than guess
                continue
            others = [p.pid for p in procs if os.path.exists(f"/proc/{p.pid}") and p.pid not in own]
            if others:
                notes.append(f"{self._names[k]} also runs processes {others[:4]} outside this server")
        return "; ".join(notes) or None

    def energy_mj(self) -> list[int]:
        if not self._open:
            raise NvmlNotAvailable("energy_mj() called on a closed NvmlEnergyReader")
        values = [self._read_one(k) for k in range(len(self._handles))]
        for k, (new, old) in enumerate(zip(values, self._last_mj)):
            if new < old:
                raise CounterWentBackwards(
                    f"{self._names[k]}: energy counter went from {old} mJ to {new} mJ"
                )
        self._last_mj = values
        return values

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as e:
                logger.debug("nvmlShutdown failed: %s", e)

    def __enter__(self) -> NvmlEnergyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, devices={self._names!r})"


# --------------------------------------------------------------------------------------------
# Fake NVML with the real counter's behaviour
# --------------------------------------------------------------------------------------------
class ManualClock:
    """A clock tests move by hand: ``clock()`` returns seconds; ``advance(dt)``/``set(t)``."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, dt_s: float) -> float:
        if dt_s < 0:
            raise ValueError(f"dt_s must be >= 0, got {dt_s}")
        self.t += dt_s
        return self.t

    def set(self, t_s: float) -> float:
        if t_s < self.t:
            raise ValueError(f"t_s={t_s} is before the current time {self.t}")
        self.t = float(t_s)
        return self.t


class _FakeNVMLError(Exception):
    """Same shape as pynvml.NVMLError: an integer ``value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"fake NVML error {self.value}"


class _FakeDevice:
    __slots__ = (
        "index", "name", "uuid", "power_w", "phase_s", "supports_energy", "lost",
        "grid_j", "grid_energy_j", "ticks_done", "counter_j", "reads", "scheduled_errors",
    )

    def __init__(self, index, name, uuid, power_w, phase_s, supports_energy):
        self.index = index
        self.name = name
        self.uuid = uuid
        self.power_w = power_w
        self.phase_s = phase_s
        self.supports_energy = supports_energy
        self.lost = False
        self.grid_j = 0  # integration grid cells done
        self.grid_energy_j = 0.0  # energy over those cells
        self.ticks_done = 0  # update ticks folded into counter_j
        self.counter_j = 0.0  # what the counter reports, before rounding to mJ
        self.reads = 0
        self.scheduled_errors: dict[int, int] = {}  # read number -> NVML error code


class FakeNvml:
    """A ``pynvml`` stand-in whose energy counter behaves like the real one.

    Per device the counter changes only at update ticks (every ``update_period_s``, the first
    at creation + the device's ``phase_s``); reads between two ticks return the same integer
    number of millijoules (floored). At each tick it adds the tick interval times the mean
    power over the last ``sampled_fraction`` of that interval: with 1.0 (default) the counter
    is the exact energy at the tick; with 0.25 it reproduces A100/H100, whose sensor samples
    power during only ~25% of the time (Yang, Adamek, Armour, "Accurate and Convenient Energy
    Measurements for GPUs", SC'24), so short bursts can be missed or over-counted.
    ``power_w`` entries are watts, either a constant or a function of the clock's time;
    functions are integrated with the midpoint rule on a fixed grid of ``integration_step_s``
    (exact for power that is constant on grid cells). :meth:`true_energy_j` is the ground truth.

    Error injection: :meth:`schedule_error` (raise an NVML code on a later read),
    :meth:`lose_device` (every later call on it raises GPU_IS_LOST), ``supports_energy`` per
    device (NOT_SUPPORTED) and ``init_error`` (nvmlInit fails with that code).
    """

    NVML_ERROR_UNINITIALIZED = 1
    NVML_ERROR_INVALID_ARGUMENT = 2
    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NO_PERMISSION = 4
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_TIMEOUT = 10
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_ERROR_UNKNOWN = 999
    NVMLError = _FakeNVMLError

    def __init__(
        self,
        power_w: Sequence[float | Callable[[float], float]],
        *,
        clock: Callable[[], float],
        update_period_s: float = NVML_UPDATE_PERIOD_S,
        phase_s: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        uuids: Sequence[str] | None = None,
        supports_energy: Sequence[bool] | None = None,
        integration_step_s: float = 1e-3,
        sampled_fraction: float = 1.0,
        init_error: int | None = None,
    ) -> None:
        n = len(power_w)
        if n == 0:
            raise ValueError("power_w must name at least one device")
        if not update_period_s > 0:
            raise ValueError(f"update_period_s must be > 0, got {update_period_s}")
        if not integration_step_s > 0:
            raise ValueError(f"integration_step_s must be > 0, got {integration_step_s}")
        if not 0 < sampled_fraction <= 1:
            raise ValueError(f"sampled_fraction must be in (0, 1], got {sampled_fraction}")
        for name, seq in (("phase_s", phase_s), ("names", names), ("uuids", uuids),
                          ("supports_energy", supports_energy)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries, power_w has {n}")
        self._clock = clock
        self.t0_s = float(clock())
        self.update_period_s = float(update_period_s)
        self.integration_step_s = float(integration_step_s)
        self.sampled_fraction = float(sampled_fraction)
        self.init_error = init_error
        self.init_count = 0
        self.devices = [
            _FakeDevice(
                i,
                names[i] if names else "Fake H100",
                uuids[i] if uuids else f"GPU-fake-{i:04d}",
                power_w[i],
                float(phase_s[i]) if phase_s else 0.0,
                bool(supports_energy[i]) if supports_energy else True,
            )
            for i in range(n)
        ]

    # -- fault injection ---------------------------------------------------------------------
    def schedule_error(self, device: int, after_reads: int, code: int = NVML_ERROR_UNKNOWN) -> None:
        """The energy read of ``device`` numbered ``after_reads + 1`` from now raises ``code``."""
        d = self.devices[device]
        d.scheduled_errors[d.reads + after_reads + 1] = code

    def lose_device(self, device: int) -> None:
        self.devices[device].lost = True

    # -- physics -----------------------------------------------------------------------------
    def _power(self, d: _FakeDevice, t: float) -> float:
        p = d.power_w
        return float(p(t)) if callable(p) else float(p)

    def true_energy_j(self, device: int, t_s: float) -> float:
        """Exact energy (up to the integration grid) from creation to ``t_s`` - no ticks."""
        d = self.devices[device]
        if t_s <= self.t0_s:
            return 0.0
        if not callable(d.power_w):
            return float(d.power_w) * (t_s - self.t0_s)
        h = self.integration_step_s
        cells = int((t_s - self.t0_s) / h)
        while d.grid_j < cells:  # extend the cached cumulative integral
            mid = self.t0_s + (d.grid_j + 0.5) * h
            d.grid_energy_j += self._power(d, mid) * h
            d.grid_j += 1
        if d.grid_j > cells:  # an earlier time than cached: integrate from scratch
            e = sum(self._power(d, self.t0_s + (j + 0.5) * h) * h for j in range(cells))
        else:
            e = d.grid_energy_j
        t_cell = self.t0_s + cells * h
        if t_s > t_cell:
            e += self._power(d, 0.5 * (t_cell + t_s)) * (t_s - t_cell)
        return e

    def last_tick_s(self, device: int, t_s: float) -> float:
        """Time of the counter update in effect at ``t_s`` (creation time before the first)."""
        d = self.devices[device]
        first = self.t0_s + d.phase_s
        if t_s < first:
            return self.t0_s
        k = math.floor((t_s - first) / self.update_period_s + 1e-9)
        return first + k * self.update_period_s

    def _tick_s(self, d: _FakeDevice, k: int) -> float:
        return self.t0_s + d.phase_s + k * self.update_period_s

    def counter_mj(self, device: int, t_s: float) -> int:
        """What the counter reads at time ``t_s`` (times must not go backwards per device)."""
        d = self.devices[device]
        first = self.t0_s + d.phase_s
        if t_s >= first:
            k_last = math.floor((t_s - first) / self.update_period_s + 1e-9)
            while d.ticks_done <= k_last:
                k = d.ticks_done
                t_tick = self._tick_s(d, k)
                t_prev = self._tick_s(d, k - 1) if k > 0 else self.t0_s
                if self.sampled_fraction >= 1.0:
                    d.counter_j = self.true_energy_j(device, t_tick)
                elif t_tick > t_prev:
                    t_sample = max(t_prev, t_tick - self.sampled_fraction * self.update_period_s)
                    sampled_j = self.true_energy_j(device, t_tick) - self.true_energy_j(
                        device, t_sample
                    )
                    d.counter_j += sampled_j * (t_tick - t_prev) / (t_tick - t_sample)
                d.ticks_done += 1
        return int(math.floor(1000.0 * d.counter_j + 1e-6))  # 1e-6: float noise at exact mJ

    # -- the pynvml surface used by NvmlEnergyReader ----------------------------------------
    def _check_init(self) -> None:
        if self.init_count <= 0:
            raise _FakeNVMLError(self.NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: _FakeDevice) -> _FakeDevice:
        self._check_init()
        if handle.lost:
            raise _FakeNVMLError(self.NVML_ERROR_GPU_IS_LOST)
        return handle

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        if self.init_error is not None:
            raise _FakeNVMLError(self.init_error)
        self.init_count += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        self._check_init()
        self.init_count -= 1

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._check_init()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _FakeDevice:  # noqa: N802
        self._check_init()
        if not 0 <= index < len(self.devices):
            raise _FakeNVMLError(self.NVML_ERROR_INVALID_ARGUMENT)
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: _FakeDevice) -> str:  # noqa: N802
        return self._device(handle).name

    def nvmlDeviceGetUUID(self, handle: _FakeDevice) -> str:  # noqa: N802
        return self._device(handle).uuid

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _FakeDevice) -> int:  # noqa: N802
        d = self._device(handle)
        if not d.supports_energy:
            raise _FakeNVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        d.reads += 1
        code = d.scheduled_errors.pop(d.reads, None)
        if code is not None:
            if code == self.NVML_ERROR_GPU_IS_LOST:
                d.lost = True
            raise _FakeNVMLError(code)
        return self.counter_mj(d.index, float(self._clock()))


class FakeEnergyReader(NvmlEnergyReader):
    """:class:`NvmlEnergyReader` over a :class:`FakeNvml` (source ``"fake"``).

    ``power_w`` is a list with one entry per device (watts, constant or ``f(t)``) or a single
    entry for one device. Remaining keyword arguments go to :class:`FakeNvml`; ``self.nvml`` is
    the fake for fault injection and ground truth.
    """

    source = "fake"

    def __init__(
        self,
        power_w: float | Callable[[float], float] | Sequence[float | Callable[[float], float]],
        *,
        clock: Callable[[], float],
        update_period_s: float = NVML_UPDATE_PERIOD_S,
        device_indices: Sequence[int] | None = None,
        visible_devices: str | None = None,
        **fake_kwargs: Any,
    ) -> None:
        powers = list(power_w) if isinstance(power_w, Sequence) else [power_w]
        self.nvml = FakeNvml(powers, clock=clock, update_period_s=update_period_s, **fake_kwargs)
        self.update_period_s = float(update_period_s)
        super().__init__(device_indices, nvml=self.nvml, visible_devices=visible_devices)

    def fail_on_read(self, n: int, code: int = FakeNvml.NVML_ERROR_UNKNOWN) -> None:
        """The ``n``-th ``energy_mj()`` call from now raises (NVML ``code``, translated)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.nvml.schedule_error(self._handles[0].index, n - 1, code)


# --------------------------------------------------------------------------------------------
# Fallbacks
# --------------------------------------------------------------------------------------------
class NullEnergyReader:
    """No measurement: zero devices. The attributor reports NaN energies, source "unavailable"."""

    source = "unavailable"
    update_period_s = 0.0

    def __init__(self, reason: str = "") -> None:
        self.reason = reason

    def device_names(self) -> list[str]:
        return []

    def energy_mj(self) -> list[int]:
        return []

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"NullEnergyReader(reason={self.reason!r})"


class CodecarbonCpuEstimateReader:
    """Machine-wide CPU power *estimate* from codecarbon, integrated into a counter.

    Not a measurement and not GPU energy. What it is, exactly: codecarbon's ``cpu_load`` mode
    (``codecarbon.external.hardware.CPU``, machine tracking), the one codecarbon path that needs
    no RAPL files, output directory or scheduler thread. At each read, power is
    ``P = TDP * (0.1 + 0.9 * load**3)`` with ``load`` the machine-wide CPU utilisation since the
    previous read (psutil), and ``TDP`` = codecarbon's ``cpu_power.csv`` entry for the detected
    CPU model times the socket count (codecarbon's fallbacks when the model is unknown: 4 W per
    thread, else 85 W). Energy accumulates as ``P * (t_now - t_prev)`` (left-open rectangle:
    each read's load covers the interval it closes).

    Importing codecarbon runs its own module-level ``nvmlInit`` (inside codecarbon's try/except);
    that is why this reader imports codecarbon only when constructed. Construction takes ~1 s
    (CPU detection).
    """

    source = "cpu-estimate-codecarbon"
    update_period_s = 0.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        try:
            from codecarbon.core.cpu import TDP
            from codecarbon.core.util import count_physical_cpus
            from codecarbon.external.hardware import CPU, MODE_CPU_LOAD, POWER_CONSTANT
        except ImportError as e:
            raise EstimatorNotAvailable(
                "codecarbon is not installed (pip install 'llmco2-serve[cpu-estimate]')"
            ) from e
        tdp = TDP()
        sockets = count_physical_cpus() or 1
        # As codecarbon's ResourceTracker: registry TDP x sockets, else its 85 W constant.
        self.tdp_w = float(tdp.tdp * sockets) if tdp.tdp is not None else float(POWER_CONSTANT)
        self._cpu = CPU.from_utils(
            output_dir="",
            mode=MODE_CPU_LOAD,
            model=tdp.model,
            tdp=self.tdp_w,
            tracking_mode="machine",
        )
        self._cpu.start()
        self.cpu_model = str(tdp.model)
        self._clock = clock
        self._t_last_s = float(clock())
        self._energy_j = 0.0

    def device_names(self) -> list[str]:
        return [f"cpu {self.cpu_model} (codecarbon cpu_load estimate, TDP {self.tdp_w:g} W)"]

    def power_w(self) -> float:
        """Estimated machine CPU power since the previous call, watts."""
        return float(self._cpu.total_power().kW) * 1000.0

    def energy_mj(self) -> list[int]:
        now = float(self._clock())
        dt_s = max(0.0, now - self._t_last_s)
        self._t_last_s = now
        self._energy_j += self.power_w() * dt_s
        return [int(self._energy_j * 1000.0)]

    def close(self) -> None:
        pass


def measure_update_period_s(reader: EnergyReader, *, clock: Callable[[], float] = time.monotonic,
                            sleep: Callable[[float], None] = time.sleep, max_s: float = 1.5,
                            poll_s: float = 0.002, changes: int = 4) -> float | None:
    """The counters' update period, measured: read them every ``poll_s`` for up to ``max_s`` and
    take the median spacing of the instants at which a counter changed (each device's own
    spacings; the median over all). None when no device changed ``changes`` times (an idle GPU
    whose counter moves by less than 1 mJ per update, a stalled counter).

    Real periods vary by GPU and driver (~100 ms on H100/H200, 20-50 ms on others), and the
    attribution's boundary uncertainty and stall detection both scale with it.
    """
    names = reader.device_names()
    if not names:
        return None
    last = list(reader.energy_mj())
    seen: list[list[float]] = [[] for _ in names]
    t_end = clock() + max_s
    while clock() < t_end:
        sleep(poll_s)
        try:
            values = reader.energy_mj()
        except EnergyReaderError:
            continue
        t = clock()
        for d, v in enumerate(values):
            if v != last[d]:
                seen[d].append(t)
                last[d] = v
        if all(len(x) >= changes for x in seen):
            break
    gaps = sorted(b - a for x in seen if len(x) >= changes for a, b in zip(x, x[1:]))
    if not gaps:
        return None
    return gaps[len(gaps) // 2]


def _process_tree_pids() -> set[int]:
    """This process, its ancestors and its descendants (vLLM's workers are children)."""
    me = os.getpid()
    parent: dict[int, int] = {}
    try:
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat", "rb") as f:
                        stat = f.read().decode(errors="replace")
                    parent[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
    except OSError:
        return {me}
    own = {me}
    changed = True
    while changed:  # descendants first (not the ancestors' other children)
        changed = False
        for pid, pp in parent.items():
            if pp in own and pid not in own:
                own.add(pid)
                changed = True
    p = parent.get(me)
    while p and p not in own:
        own.add(p)
        p = parent.get(p)
    return own


class _UpdateInstantCounter:
    """What the TEST-ONLY counters share with NVML's: source ``"fake"``, one device, an integer mJ
    counter that moves only at update instants ``update_period_s`` apart (+-20 % jitter). A
    subclass says what energy has accumulated up to an update instant (:meth:`_energy_mj_at`)."""

    source = "fake"

    def __init__(self, idle_w: float, busy_w: float, update_period_s: float, clock: Callable[[], float],
                 seed: int) -> None:
        import random

        self.idle_w = float(idle_w)
        self.busy_w = float(busy_w)
        self.update_period_s = float(update_period_s)
        self._clock = clock
        self._rng = random.Random(seed)
        self._t0 = float(clock())
        self._mj = 0
        self._next = self._t0 + self._period()

    def _period(self) -> float:
        return self.update_period_s * self._rng.uniform(0.8, 1.2)

    def _energy_mj_at(self, last_update_s: float) -> None:
        raise NotImplementedError

    def energy_mj(self) -> list[int]:
        t = float(self._clock())
        if t >= self._next:
            while self._next <= t:  # the latest update instant at or before t
                last = self._next
                self._next += self._period()
            self._energy_mj_at(last)
        return [self._mj]

    def close(self) -> None:
        pass


class ProcessCpuFakeReader(_UpdateInstantCounter):
    """TEST-ONLY counter for end-to-end runs without a GPU (``LLMCO2_ENERGY_READER=fake``).

    Source ``"fake"``, never ``"nvml"``. Its power model is a ground truth of its own, unrelated
    to the predictor: ``idle_w`` plus ``busy_w`` per CPU-second the serving process (and its
    children) consumed. Like NVML it is an integer mJ counter that only moves at update instants
    (``update_period_s`` with +-20% jitter, so reads between two updates see the same value).
    """

    def __init__(self, idle_w: float = 60.0, busy_w: float = 240.0, update_period_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, seed: int = 0) -> None:
        super().__init__(idle_w, busy_w, update_period_s, clock, seed)
        self._t_update = self._t0
        self._cpu_s = self._process_cpu_s()

    @staticmethod
    def _process_cpu_s() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def device_names(self) -> list[str]:
        return ["fake:0 cpu-power-model"]

    def _energy_mj_at(self, last_update_s: float) -> None:
        cpu = self._process_cpu_s()
        energy_j = self.idle_w * (last_update_s - self._t_update) + self.busy_w * max(0.0, cpu - self._cpu_s)
        self._mj += int(round(energy_j * 1000.0))
        self._t_update, self._cpu_s = last_update_s, cpu

    def __repr__(self) -> str:
        return f"ProcessCpuFakeReader(idle {self.idle_w} W, {self.busy_w} W per CPU, {self.update_period_s} s)"


class WorkFakeReader(_UpdateInstantCounter):
    """TEST-ONLY counter whose energy follows the work the engine scheduled
    (``LLMCO2_ENERGY_READER=fake-work``), not the host's CPU time or wall-clock time.

    Why: :class:`ProcessCpuFakeReader` prices the engine process's CPU time, and vLLM's engine core
    busy-waits (``sched_yield``) on the shared-memory queue while its worker process computes a step:
    that CPU time is about the step's wall time times the share of a core the process gets, so the
    same requests measure differently when other processes load the machine. A GPU's counter
    depends on the kernels it runs, not on the host's load; so does this one. Source ``"fake"``.

    Power model (its own, deliberately not the predictor's): ``idle_w`` while no step runs; a step
    costs ``busy_w`` x (2 ms + 40 us per prefill token + 0.8 ms x decode rows ** 0.6) joules whatever
    its wall time (a fixed step cost, linear prefill, decode rows with a batch exponent the GNN does
    not have). The engine meter hands it each step's rows and interval when it records the step
    (:meth:`observe_step`, before the read that closes the step's window); the step's time is then
    charged its modelled energy instead of idle power (overlapping intervals of async steps count
    once). Like NVML the counter is the floor of the cumulative energy in mJ, moving only at update
    instants (``update_period_s`` with +-20 % jitter), never backwards.
    """

    STEP_S = 2e-3
    PREFILL_TOKEN_S = 40e-6
    DECODE_ROWS_S = 0.8e-3
    DECODE_ROWS_EXPONENT = 0.6

    def __init__(self, idle_w: float = 60.0, busy_w: float = 240.0, update_period_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, seed: int = 0) -> None:
        super().__init__(idle_w, busy_w, update_period_s, clock, seed)
        self._steps_j = 0.0  # modelled energy of the observed steps minus idle power over their time
        self._busy_until = -math.inf
        self.work_energy_j = 0.0  # ground truth: modelled energy of every observed step
        self.busy_s = 0.0  # their time (union of intervals)

    def step_energy_j(self, rows: Sequence[tuple[Any, str, int, int]]) -> float:
        """Modelled energy of one step: rows are (request id, "prefill"|"decode", tokens, context)."""
        prefill = sum(r[2] for r in rows if r[1] == "prefill")
        decode = sum(1 for r in rows if r[1] != "prefill")
        return self.busy_w * (self.STEP_S + self.PREFILL_TOKEN_S * prefill
                              + self.DECODE_ROWS_S * decode ** self.DECODE_ROWS_EXPONENT)

    def observe_step(self, rows: Sequence[tuple[Any, str, int, int]], start_s: float, end_s: float) -> None:
        if not rows:
            return
        e = self.step_energy_j(rows)
        covered = end_s - max(start_s, self._busy_until)
        if covered < 0.0:
            covered = 0.0
        if end_s > self._busy_until:
            self._busy_until = end_s
        self.work_energy_j += e
        self.busy_s += covered
        self._steps_j += e - self.idle_w * covered

    def device_names(self) -> list[str]:
        return ["fake:0 work-power-model"]

    def _energy_mj_at(self, last_update_s: float) -> None:
        mj = int((self.idle_w * (last_update_s - self._t0) + self._steps_j) * 1000.0)
        if mj > self._mj:  # never backwards (a step charged after its interval)
            self._mj = mj

    def __repr__(self) -> str:
        return f"WorkFakeReader(idle {self.idle_w} W, busy {self.busy_w} W x modelled step seconds)"


# --------------------------------------------------------------------------------------------
# Opening with an open fallback chain
# --------------------------------------------------------------------------------------------
_MODES = ("auto", "nvml", "cpu-estimate", "fake", "fake-work", "none")


def open_energy_reader(
    mode: str = "auto",
    device_indices: Sequence[int] | None = None,
    *,
    cpu_estimate: bool = False,
    nvml: Any = None,
    fake_power_w: tuple[float, float] = (60.0, 240.0),
) -> EnergyReader:
    """Open the best available reader and log one line saying which and why.

    Modes: ``"auto"``: NVML, else the codecarbon CPU estimate if ``cpu_estimate`` is true, else
    :class:`NullEnergyReader`; ``"nvml"``: NVML or raise; ``"cpu-estimate"``: the estimate or
    raise; ``"none"``: :class:`NullEnergyReader`. ``nvml`` injects a pynvml-like module (tests).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode == "none":
        logger.info("llmco2 energy: measurement disabled (mode='none'); energies are unavailable")
        return NullEnergyReader("mode='none'")
    if mode == "fake":
        logger.warning("llmco2 energy: TEST-ONLY fake counter (CPU-time power model), source 'fake'")
        return ProcessCpuFakeReader(idle_w=fake_power_w[0], busy_w=fake_power_w[1])
    if mode == "fake-work":
        logger.warning("llmco2 energy: TEST-ONLY fake counter (work power model), source 'fake'")
        return WorkFakeReader(idle_w=fake_power_w[0], busy_w=fake_power_w[1])
    reasons: list[str] = []
    if mode in ("auto", "nvml"):
        try:
            reader: EnergyReader = NvmlEnergyReader(device_indices, nvml=nvml)
        except EnergyReaderError as e:
            if mode == "nvml":
                raise
            reasons.append(f"NVML: {e}")
        else:
            logger.info(
                "llmco2 energy: NVML energy counters on %s", ", ".join(reader.device_names())
            )
            return reader
    if mode == "cpu-estimate" or cpu_estimate:
        try:
            reader = CodecarbonCpuEstimateReader()
        except EnergyReaderError as e:
            if mode == "cpu-estimate":
                raise
            reasons.append(f"cpu-estimate: {e}")
        else:
            logger.warning(
                "llmco2 energy: using codecarbon CPU power ESTIMATE (not GPU, not measured)%s",
                f" because {'; '.join(reasons)}" if reasons else "",
            )
            return reader
    else:
        reasons.append("cpu-estimate: disabled")
    why = "; ".join(reasons)
    logger.warning("llmco2 energy: no energy source, energies are unavailable (%s)", why)
    return NullEnergyReader(why)
