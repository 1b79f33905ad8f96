"""Attribute measured GPU energy to requests under continuous batching.

The engine calls :meth:`EnergyAttributor.on_step` after every step with the step's interval and
the work it scheduled (:class:`ScheduledWork`: one prefill chunk or decode token(s) per request,
with a ``weight`` = predicted relative cost). The attributor reads the energy counters once per
call, at the call (``clock()``), and keeps a ledger per request. Joules and seconds throughout.

Windows
    Counters move in coarse steps (NVML: ~100 ms), so energy is known only per *window*: per
    device, the time between two reads at which that device's counter changed. Each device has
    its own windows (TP ranks tick at different instants). A window closes at the read that
    sees the change; until then it is *open*.

Splitting a closed window (device ``d``, energy ``dE``, duration ``D``)
    Steps are clipped to ``[max(start_s, previous read), min(end_s, this read)]`` so they never
    overlap; ``B`` = summed step time inside the window, ``I = D - B`` = time with no work.

    1. Idle share, the *idle floor* rule: ``E_idle = min(p_idle * I, dE * I / D)``. ``p_idle``
       is ``idle_power_w`` from the constructor, else the lowest average power among the
       device's last 16 closed windows: every window's average is an upper bound on idle power
       (work draws at least idle power), and windows read while idle (:meth:`poll`) make it
       tight. The ``min`` caps it at the time-proportional share. Why not purely
       time-proportional: a 20 ms step in an otherwise idle 100 ms window would get 20% of the
       window although it drew ~3x idle power.
    2. Steps: ``E_busy = dE - E_idle`` goes to the window's steps in proportion to their *mass*:
       with ``step_split="duration"`` (default) a step's mass is its duration (the counter says
       nothing about power differences between steps of one window); with
       ``step_split="weight"`` it is the sum of its work's weights, which is better when weights
       are predicted joules (prefill-heavy steps draw ~2.8x the power of decode-only ones: H200
       data in ``shared/data/energy``, median 533 W vs 187 W).
    2b. Static + work model (``record_step(..., work_s=True)``, the plugin's default once its
       predictor is loaded): weights are absolute work, seconds at the GPU's peak rates, split
       into a compute part and a memory part (``compute_s``). With a measured idle power
       ``p_static`` the window's busy energy is ``p_static * T + a * C + b * M`` (``T`` its step
       time, ``C``/``M`` its compute/memory work); ``a : b`` is learned per device from the
       deployment's own windows (:meth:`EnergyAttributor._work_prices`: weighted least squares,
       ridge towards ``a = b``, 20 windows before use), and the window's dynamic energy is scaled
       to be conserved exactly. Compute-bound prefill chunks thus get the higher power they draw.
       Without a measured idle power, or with token-count weights, the duration split applies.
    3. Requests: within a step, energy goes to its work items in proportion to ``weight``, into
       the item's phase (``prefill``/``decode``; recompute after preemption counts as prefill).
       An item's mass is ``dur * weight / sum(weights)`` (duration split) or ``weight``.

    Energy is conserved exactly (up to float rounding): every closed window's ``dE`` goes to
    ``idle_energy_j`` or to requests (``attributed_energy_j``), whether or not the request was
    already reported, so ``attributed + idle == total`` (the counters' delta since start).

Open windows and ``on_finished``
    ``on_finished`` returns at once. Energy of the request's work in a still-open window of
    device ``d`` is estimated as ``k_d * m_open`` with ``k_d = E_busy / M`` (energy per unit
    mass; watts for the duration split) of that device's latest closed window that had work,
    and ``m_open`` the request's mass in the open window. Such a value has ``final=False`` (NaN
    while the device has not yet closed a window with work). When every window holding its
    steps has closed, the exact ledger value is delivered once, ``final=True``, through
    :meth:`pop_finalized` and the optional ``on_final`` callback; every finished request is
    delivered exactly once, also when its first answer was already final.

Uncertainty (``uncertainty_j``: an error scale, not a strict bound)
    Per device ``d``, two kinds of terms, added in quadrature; devices add linearly (they run
    the same steps, so their errors are correlated); estimated parts add 100%::

        u_r = sum_d sqrt( sum_b (eps_b * (q_rb- - q_rb+))**2 + sum_w x_rw**2 )
              + e_open + e_lost

    - Boundaries (quantisation). At each window boundary ``b`` (a read that saw the counter
      change) the update instant is only known to lie within the read gap before that read and
      within one update period, so ``eps_b = min(read gap, update_period_s) * (mean power of
      the window closed at b)`` joules may belong to the other side. It moves request ``r``'s
      energy by ``eps_b * (q_rb- - q_rb+)``, where ``q`` is r's fraction of the energy of the
      window before/after ``b`` (0 if it has no work there). Interior boundaries of a request
      that dominates both neighbours cancel; its first and last boundaries count fully. The
      baseline read's boundary uses the update period (the counter may have ticked up to one
      period before it).
    - Windows (split rules), ``x_rw = e_rw * f * E_idle / E_busy + max(S_rw, R_rw)``.
      Busy/idle split: uncertain by ``f = 0.25`` of the idle share when ``p_idle`` is known
      (constructor or a fully idle window; about the counter's window-to-window
      repeatability), ``f = 1`` when it is only an upper bound. Step split: if the steps'
      power differs from the window's mean by up to ``g = 0.5`` (prefill ~2.8x decode power
      is +-50% around a mix), r's energy moves by up to ``g * k * sum_s |m_rs - F_rw * M_s|``,
      bounded by ``S_rw = g * k * sqrt(N_w * sum_s (m_rs - F_rw * M_s)**2)`` (Cauchy-Schwarz;
      it needs only running sums), where the sum runs over the window's ``N_w`` steps,
      ``m_rs`` is r's mass in step ``s`` (0 if absent), ``M_s`` the step's mass and
      ``F_rw = m_rw / M_w`` r's mean share of the window: zero when r holds the same share of
      every step. Resolution: ``R_rw = e_rw * max(0, 1 - tau_rw / min(update_period_s, D))``
      with ``tau_rw`` the duration of the window's steps that r was in: the counter cannot
      place energy in time below its update period (A100/H100 even sample power during only
      ~25% of it: Yang, Adamek, Armour, SC'24), so work covering a fraction of that period is
      uncertain by the uncovered fraction.
    - ``e_open`` (open-window estimate) and ``e_lost`` (work a failed reader never measured)
      count 100%.

    So a request whose life is shorter than the update period has ``u`` of the order of its
    estimate (``R_rw``, or it is all ``e_open``), and a long request mostly keeps its two end
    boundaries. Check: reads 0.5 s
    apart with 0.1 s update period give a relative ``sqrt(2) * 0.1 / 0.5 = 0.28`` for a lone
    request, the scale of the 17-20% median difference between back-to-back 0.5 s NVML
    windows (``shared/README.md``).

Failures
    The attributor never raises into the engine for reader problems. A transient
    ``EnergyReaderError`` skips that read (the window stays open); a permanent one,
    ``max_consecutive_errors`` transient ones in a row, a counter going backwards, a change in
    the number of counters, or a counter that does not move for ``max_open_window_s`` while being
    read mark the reader failed (logged once). Work from then on, and work in windows that can
    no longer close, is *lost*: estimated with the latest ``k_d`` and counted 100% in
    ``uncertainty_j``. Requests with some measured and some lost work get
    ``source = "<reader source>-partial"``; requests with nothing measured (every request under
    :class:`~llmco2_serve.hardware.gpu_energy.NullEnergyReader`) get ``source = "unavailable"`` and NaN
    energies and uncertainty (NaN rather than None so that the fields stay ``float``).

Hot path
    ``on_step`` is O(work items); closing a window is O(live requests) per device, from running
    sums (no per-step records are kept); no logging, no per-item containers. Not thread-safe:
    call every method from the engine's step thread. ``benchmarks/attribution_overhead.py``
    measures it.
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from llmco2_serve.hardware.gpu_energy import EnergyReader, EnergyReaderError
from llmco2_serve.runtime.windows import WindowAggregator

logger = logging.getLogger(__name__)

__all__ = ["ScheduledWork", "MeasuredEnergy", "EnergyAttributor"]

_NAN = float("nan")
_PREFILL, _DECODE = 0, 1
_IDLE_HISTORY = 16  # closed windows remembered per device for the idle floor
# f in the module docstring when idle power is known: about the counter's window-to-window
# repeatability (shared/README.md: median 17-20%).
_KNOWN_IDLE_REL_ERROR = 0.25
# g in the module docstring: step power spread within a window (prefill ~2.8x decode on H200).
_STEP_POWER_REL_SPREAD = 0.5
# Relative error of the per-row weights inside one step (shared weight reads split evenly,
# own compute and KV reads from the Roofline model): the predictor's per-kernel Roofline times
# are within ~30% of measured kernel times for the dense kernels (README accuracy section).
_ROW_SPLIT_REL_ERROR = 0.3
_PRICE_DECAY = 0.99  # work-price fit: weight of a window falls by 1% per later window
_PRICE_MIN_WINDOWS = 20
_PRICE_RIDGE = 0.05  # pull towards equal compute/memory prices, relative to the data's scale
_IDLE_WINDOWS_KEPT = 32  # fully idle windows remembered per device for the measured idle power
_RECENT_DONE = 8192  # ids of delivered requests remembered, so late work is never a new entry
_MAX_FINALIZED = 65536  # final values kept for pop_finalized when nobody pops (oldest dropped)
UNREPORTED_ID = "\x00llmco2-unreported"  # ledger entry for work of requests already delivered


@dataclass(frozen=True, slots=True)
class ScheduledWork:
    """One request's work in one engine step.

    Attributes:
        request_id: the engine's request id.
        phase: ``"prefill"`` (a prompt chunk, or recompute) or ``"decode"``.
        n_tokens: tokens processed for this request in this step (>= 1).
        context_len: tokens already in its KV cache before this step (>= 0).
        weight: predicted relative cost of this work in this step (e.g. predicted joules);
            finite and > 0. With ``step_split="duration"`` only ratios within a step matter;
            with ``"weight"`` weights must be comparable across steps (predicted joules).
    """

    request_id: str
    phase: Literal["prefill", "decode"]
    n_tokens: int
    context_len: int
    weight: float

    def __post_init__(self) -> None:
        if self.phase != "prefill" and self.phase != "decode":
            raise ValueError(f"phase must be 'prefill' or 'decode', got {self.phase!r}")
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {self.n_tokens}")
        if self.context_len < 0:
            raise ValueError(f"context_len must be >= 0, got {self.context_len}")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"weight must be finite and > 0, got {self.weight}")


@dataclass(frozen=True)
class MeasuredEnergy:
    """Measured energy of one request (sum over watched devices).

    Attributes:
        prefill_energy_j, decode_energy_j, energy_j: joules; ``energy_j`` is their sum. NaN when
            ``source == "unavailable"``.
        uncertainty_j: error scale of ``energy_j`` (module docstring), joules.
        estimated_energy_j: the part of ``energy_j`` that was estimated rather than read from a
            closed window (open window or lost steps), joules.
        source: the reader's source (``"nvml"``, ``"fake"``, ...), ``"<source>-partial"`` or
            ``"unavailable"``.
        n_steps: engine steps the request took part in.
        n_preemptions: times :meth:`EnergyAttributor.on_preempted` was called for it.
        aborted: as passed to :meth:`EnergyAttributor.on_finished`.
        final: False if part of the value is an open-window estimate that will still change.
        mean_batch: mean number of rows of the steps it was in (its real batch context).
    """

    request_id: str
    prefill_energy_j: float
    decode_energy_j: float
    energy_j: float
    uncertainty_j: float
    estimated_energy_j: float
    source: str
    n_steps: int
    n_preemptions: int
    aborted: bool
    final: bool
    mean_batch: float = 0.0


# Per-request accumulators, one row each in EnergyAttributor._acc (columns are ledger slots);
# each device keeps a snapshot of the first _N_SNAP rows at its latest close.
_MP, _MD, _WP, _WD, _CP, _CD, _SQ, _XS, _SH, _BUSY, _STEPS, _ROWS = range(12)
_N_SNAP = 10  # rows snapshotted per device at its closes (_STEPS, _ROWS are counts only)
_N_ACC = 12
_SLOT = operator.attrgetter("slot")


class _Req:
    """Handle of one ledger entry; its numbers live in the attributor's slot arrays (one column
    per request), so that closing a window is a handful of vector operations over the requests
    that had work in it, not a Python loop (TP=8 closes ~80 windows a second)."""

    __slots__ = ("rid", "slot", "aborted")

    def __init__(self, rid: str, slot: int) -> None:
        self.rid = rid
        self.slot = slot
        self.aborted = False


class EnergyAttributor:
    """Per-request ledger of measured energy (see the module docstring for the rules).

    Args:
        reader: an energy reader; read once here (baseline) and once per on_step/poll.
        clock: the time source; ``start_s``/``end_s`` given to on_step must come from it.
        max_open_window_s: a counter that does not change for this long while being read is
            declared stalled (the reader is marked failed).
        idle_power_w: known idle power per watched device (a float: the same for each), watts;
            ``None`` learns an upper bound from the counters.
        step_split: ``"duration"`` or ``"weight"``: how a window's busy energy is split among
            its steps (module docstring).
        on_final: called once per finished request with its final value (from on_step, poll
            or on_finished); must be cheap and must not raise.
        max_consecutive_errors: transient read errors in a row before the reader is failed.
    """

    def __init__(
        self,
        reader: EnergyReader,
        clock: Callable[[], float] = time.monotonic,
        max_open_window_s: float = 2.0,
        *,
        idle_power_w: float | Sequence[float] | None = None,
        step_split: Literal["duration", "weight"] = "duration",
        on_final: Callable[[MeasuredEnergy], None] | None = None,
        max_consecutive_errors: int = 3,
    ) -> None:
        if not max_open_window_s > 0:
            raise ValueError(f"max_open_window_s must be > 0, got {max_open_window_s}")
        if max_consecutive_errors < 1:
            raise ValueError(f"max_consecutive_errors must be >= 1, got {max_consecutive_errors}")
        if step_split not in ("duration", "weight"):
            raise ValueError(f"step_split must be 'duration' or 'weight', got {step_split!r}")
        self._reader = reader
        self._clock = clock
        self._max_open_s = float(max_open_window_s)
        self._max_errors = int(max_consecutive_errors)
        self._split_by_weight = step_split == "weight"
        self._on_final = on_final
        self._update_period_s = max(0.0, float(getattr(reader, "update_period_s", 0.0)))
        self._reader_source = str(reader.source)

        self._reqs: dict[str, _Req] = {}  # requests that had work and are not finished
        self._pending: dict[str, _Req] = {}  # finished, waiting for their windows to close
        self._finalized: deque[MeasuredEnergy] = deque(maxlen=_MAX_FINALIZED)
        self.finalized_dropped = 0  # final values dropped because nobody popped them
        self._recent_done: deque[str] = deque()
        self._recent_done_set: set[str] = set()
        self.late_rows_unreported = 0  # rows of already-delivered requests (unreported entry)
        # Cumulative sums over recorded steps (with work and time).
        self._n_steps = 0
        self._cum_busy_s = 0.0
        self._cum_mass = 0.0
        self._cum_work = 0.0
        self._cum_work_c = 0.0
        self._cum_mass_sq = 0.0
        # Predicted energy of the recorded steps (J, the GNN's scale; record_step's predicted_j),
        # their rows, and the steps recorded without a prediction: a window whose steps all have
        # one becomes a calibration observation (collect_windows, runtime/windows.py).
        self._cum_pred_p = 0.0
        self._cum_pred_d = 0.0
        self._cum_rows = 0.0
        self._cum_unpredicted = 0
        self.windows: WindowAggregator | None = None
        self._total_j = 0.0
        self._idle_j = 0.0
        self._attributed_j = 0.0
        self.read_errors = 0
        self._consecutive_errors = 0
        self.failure_reason: str | None = None
        self._failed = False
        self._lost_k = _NAN  # after a failure: sum over devices of the latest k_d

        t = float(clock())
        self._boundary_t = t  # latest on_step/poll time: clips the next step's start
        self._last_ok_read_t = t
        self.device_names = list(reader.device_names())
        n = len(self.device_names)
        self._n_devices = n
        self.device_total_energy_j = [0.0] * n  # per device: counters' delta (closed windows)
        self.device_idle_energy_j = [0.0] * n
        self._v_mj = [0] * n
        self._open_t = [t] * n
        self._open_delta_s = [self._update_period_s] * n  # baseline: update up to a period ago
        self._eps_open_j = [_NAN] * n  # boundary energy scale at the open window's start
        self._win_no = [0] * n  # closed windows so far
        self._k = [_NAN] * n  # energy per unit mass of the latest closed window with work
        # Snapshots of the cumulative sums at each device's last close.
        self._snap_steps = [0] * n
        self._snap_busy_s = [0.0] * n
        self._snap_mass = [0.0] * n
        self._snap_work = [0.0] * n
        self._snap_work_c = [0.0] * n
        self._snap_mass_sq = [0.0] * n
        self._snap_pred = [(0.0, 0.0, 0.0, 0)] * n  # (prefill J, decode J, rows, unpredicted steps)
        # Per device, exponentially weighted least-squares sums of the work-price fit:
        # [S_cc, S_cm, S_mm, S_cy, S_my, windows] (see _work_prices).
        self._price_sums = [[0.0] * 6 for _ in range(n)]
        self._window_avg_w: list[deque[tuple[float, bool]]] = [
            deque(maxlen=_IDLE_HISTORY) for _ in range(n)
        ]
        self._idle_w_hist: list[deque[float]] = [deque(maxlen=_IDLE_WINDOWS_KEPT) for _ in range(n)]
        if idle_power_w is None:
            self._idle_fixed_w: list[float | None] = [None] * n
        elif isinstance(idle_power_w, (int, float)):
            self._idle_fixed_w = [float(idle_power_w)] * n
        else:
            if len(idle_power_w) != n:
                raise ValueError(f"idle_power_w has {len(idle_power_w)} entries for {n} devices")
            self._idle_fixed_w = [float(p) for p in idle_power_w]
        self._alloc_slots(64)
        if n == 0:
            self._failed = True
            self.failure_reason = f"no energy counters (reader source {reader.source!r})"
            return
        try:
            values = reader.energy_mj()
        except EnergyReaderError as e:
            self._fail(f"baseline read failed: {type(e).__name__}: {e}")
            return
        if len(values) != n:
            self._fail(f"reader returned {len(values)} counters for {n} devices")
            return
        self._v_mj = list(values)

    # ---------------------------------------------------------------- slot storage
    def _alloc_slots(self, cap: int) -> None:
        """(Re)size the slot arrays to ``cap`` columns, keeping existing columns."""
        n = self._n_devices
        old = getattr(self, "_cap", 0)

        def grow(a: np.ndarray | None, shape: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
            new = np.full(shape, fill, dtype=a.dtype if a is not None else np.float64)
            if a is not None:
                new[..., :old] = a
            return new

        g = getattr
        self._acc = grow(g(self, "_acc", None), (_N_ACC, cap))
        self._snap = grow(g(self, "_snap", None), (n, _N_SNAP, cap))
        self._energy = grow(g(self, "_energy", None), (2, cap))  # closed windows, per phase
        self._lost = grow(g(self, "_lost", None), (3, cap))  # lost estimate per phase, lost mass
        self._var = grow(g(self, "_var", None), (n, cap))  # squared error terms per device
        self._q_prev = grow(g(self, "_q_prev", None), (n, cap))  # share of d's latest window
        win_prev = g(self, "_win_prev", None)
        self._win_prev = np.full((n, cap), -1, dtype=np.int64)  # d's latest window it was in
        last = g(self, "_last_step", None)
        self._last_step = np.full(cap, -1, dtype=np.int64)  # its latest recorded step
        counts = g(self, "_counts", None)
        self._counts = np.zeros((1, cap), dtype=np.int64)  # preemptions
        in_use = g(self, "_in_use", None)
        self._in_use = np.zeros(cap, dtype=bool)
        if old:
            self._win_prev[:, :old] = win_prev
            self._last_step[:old] = last
            self._counts[:, :old] = counts
            self._in_use[:old] = in_use
        self._free = list(range(cap - 1, old - 1, -1)) + getattr(self, "_free", [])
        if not old:
            self._dirty: list[int] = []  # released slots not yet zeroed (_new_slot)
        self._cap = cap

    def _new_slot(self) -> int:
        free = self._free
        if not free:
            if self._dirty:  # released slots, zeroed together: a few vector ops per batch, not per request
                self._zero_slots(self._dirty)
                free.extend(self._dirty)
                self._dirty = []
            else:
                self._alloc_slots(2 * self._cap)
                free = self._free
        s = free.pop()
        self._in_use[s] = True
        return s

    def _zero_slots(self, slots: list[int]) -> None:
        """Reset released slots' columns (as _alloc_slots makes them); nothing reads a slot that
        is not in use, so this waits until the free slots run out."""
        idx = np.array(slots, dtype=np.intp)
        self._acc[:, idx] = 0.0
        self._snap[:, :, idx] = 0.0
        self._energy[:, idx] = 0.0
        self._lost[:, idx] = 0.0
        self._var[:, idx] = 0.0
        self._q_prev[:, idx] = 0.0
        self._win_prev[:, idx] = -1
        self._last_step[idx] = -1
        self._counts[:, idx] = 0

    def _release(self, req: _Req) -> None:
        s = req.slot
        if s >= 0:
            self._in_use[s] = False
            self._dirty.append(s)
            req.slot = -1

    # ---------------------------------------------------------------- public properties
    @property
    def source(self) -> str:
        """The reader's source, or ``"unavailable"`` once it failed / had no counters."""
        return "unavailable" if self._failed else self._reader_source

    @property
    def n_devices(self) -> int:
        return self._n_devices

    @property
    def total_energy_j(self) -> float:
        """Counters' total change since the baseline read (closed windows), joules."""
        return self._total_j

    @property
    def idle_energy_j(self) -> float:
        """Closed-window energy given to no request, joules."""
        return self._idle_j

    @property
    def attributed_energy_j(self) -> float:
        """Closed-window energy given to requests (finished or not), joules."""
        return self._attributed_j

    # ---------------------------------------------------------------- engine hooks
    def on_step(self, start_s: float, end_s: float, work: Sequence[ScheduledWork]) -> None:
        """Record one finished engine step and read the counters (see :meth:`record_step`)."""
        self.record_step(start_s, end_s, [w.request_id for w in work],
                         [w.phase == "prefill" for w in work], [w.weight for w in work])

    def record_step(self, start_s: float, end_s: float, request_ids: Sequence[str],
                    is_prefill: Sequence[bool], weights: Sequence[float], read: bool = True,
                    work_s: bool = False, compute_s: Sequence[float] | None = None,
                    now_s: float | None = None, predicted_j: tuple[float, float] | None = None) -> None:
        """Record one finished engine step (parallel sequences, one item per row) and read the
        counters once (unless ``read`` is False: the caller rate-limits reads).

        The hot path: no per-row objects, a few vector operations per step. A row of a request
        that already finished but is still waiting for its final value is *late work* (async
        scheduling: a request finishing in step N is already in step N+1) and stays with that
        request; a row of a request whose final value was already delivered goes to the explicit
        unreported entry (:attr:`unreported_energy_j`), never to a new ledger entry. Empty rows
        count as idle time.

        ``work_s``: the weights are absolute work, seconds at the GPU's peak rates (own compute
        and memory traffic plus a share of the step's weight reads). Windows then split their busy
        energy with a static + work power model (module docstring) instead of by duration alone.
        ``compute_s``: the compute part of each row's work (the rest is memory traffic); the price
        of a second of compute vs a second of memory traffic is then learned per device.
        ``now_s``: when the step is recorded (default: the clock now); a step recorded later than
        it finished (queued for a background thread) passes its end time, so the steps after it
        keep their own time.
        ``predicted_j``: (prefill J, decode J) the GNN predicts for this step (all devices), for the
        counter-window observations of :meth:`collect_windows`; None: the step has none.
        """
        t = float(self._clock()) if now_s is None else float(now_s)
        dur = self._step_duration(start_s, end_s, t, self._boundary_t)
        self._boundary_t = t
        n_rows = len(request_ids)
        if n_rows:
            handles = list(map(self._reqs.get, request_ids))
            if None in handles:  # new requests, late work: fix those rows only
                i = handles.index(None)
                while True:
                    rid = request_ids[i]  # (a new request with two rows gets one entry)
                    handles[i] = self._reqs.get(rid) or self._entry_for(rid)
                    try:
                        i = handles.index(None, i + 1)
                    except ValueError:
                        break
            slots_list = list(map(_SLOT, handles))
            slots = np.array(slots_list, dtype=np.intp)
            # a request can have two rows in a step (a chunk crossing its prompt's end is split by
            # phase), and late rows share the unreported entry
            unique = len(set(slots_list)) == n_rows
            if dur <= 0.0 or self._failed:  # otherwise counted with the step's other sums below
                np.add.at(self._acc[_STEPS], slots, 1.0)
                np.add.at(self._acc[_ROWS], slots, float(n_rows))
        if n_rows and dur > 0.0:  # a step with no time on the device gets no energy
            w = np.asarray(weights, dtype=np.float64)
            wsum = float(w.sum())
            if not wsum > 0.0:
                raise ValueError("weights must be > 0")
            scale, step_m = self._mass_scale(dur, wsum)
            m = w * scale
            pre = np.asarray(is_prefill, dtype=bool)
            if self._failed:
                lost = np.zeros((3, n_rows))
                lost[0] = np.where(pre, m, 0.0) * self._lost_k
                lost[1] = np.where(pre, 0.0, m) * self._lost_k
                lost[2] = m
                np.add.at(self._lost, (slice(None), slots), lost)
            else:
                v = np.empty((_N_ACC, n_rows))
                # rows MP/MD, WP/WD, CP/CD: the prefill and decode parts of mass, work, compute
                if work_s:  # whole values in the decode rows, then the prefill parts moved out
                    v[_MD] = m
                    v[_WD] = w
                    if compute_s is not None:
                        v[_CD] = compute_s
                        self._cum_work_c += float(v[_CD].sum())
                    else:
                        v[_CD] = 0.0
                    self._cum_work += wsum
                    v[0:6:2] = v[1:6:2] * pre
                    v[1:6:2] -= v[0:6:2]
                else:
                    v[_MP] = m * pre
                    v[_MD] = m - v[_MP]
                    v[_WP:_CD + 1] = 0.0
                msq = m * m
                v[_SQ] = msq
                v[_XS] = m * step_m
                v[_SH] = msq * (1.0 / step_m)
                v[_BUSY] = dur
                v[_STEPS] = 1.0
                v[_ROWS] = n_rows
                if unique:
                    self._acc[:, slots] += v
                else:
                    np.add.at(self._acc, (slice(None), slots), v)
                self._last_step[slots] = self._n_steps
                self._n_steps += 1
                self._cum_busy_s += dur
                self._cum_mass += step_m
                self._cum_mass_sq += step_m * step_m
                self._cum_rows += n_rows
                if predicted_j is None:
                    self._cum_unpredicted += 1
                else:
                    self._cum_pred_p += predicted_j[0]
                    self._cum_pred_d += predicted_j[1]
        if read and not self._failed:
            self._read(t)

    @staticmethod
    def _step_duration(start_s: float, end_s: float, now_s: float, boundary_s: float) -> float:
        """Device time of a step recorded at ``now_s`` after the boundary ``boundary_s``."""
        t0 = start_s if start_s > boundary_s else boundary_s
        t1 = end_s if end_s < now_s else now_s
        return t1 - t0 if t1 > t0 else 0.0

    def _mass_scale(self, dur: float, wsum: float) -> tuple[float, float]:
        """(weight -> mass factor, the step's mass) of a step of ``dur`` s and weights summing to ``wsum``."""
        return (1.0, wsum) if self._split_by_weight else (dur / wsum, dur)

    def lookahead(self, request_id: str, steps: Sequence[tuple[float, float, Sequence[int], int, Sequence[bool], Any, float]]
                  ) -> tuple[float, float, int, int] | None:
        """What recording ``steps`` (in order, each ``(start_s, end_s, hits, n_rows, is_prefill,
        weights, weight_sum)``: ``hits`` the indices of ``request_id``'s rows among the step's
        ``n_rows``, recorded at its end time, without a read) would add to ``request_id``'s entry:
        (prefill mass, decode mass, steps, rows), exactly as :meth:`record_step` adds it, without
        recording them. None when it cannot say (the counters failed, or the rows would go to the
        unreported entry): record them instead. A request with no entry yet gets its entry now, as
        its first recorded row would give it."""
        if self._failed:
            return None
        if request_id not in self._reqs and request_id not in self._pending:
            if request_id in self._recent_done_set:
                return None
            self._entry_for(request_id)
        boundary = self._boundary_t
        mass_p = mass_d = 0.0
        n_steps = n_rows = 0
        for start_s, end_s, hits, rows, is_prefill, weights, wsum in steps:
            dur = self._step_duration(start_s, end_s, end_s, boundary)
            boundary = end_s
            if not hits:
                continue
            n_steps += len(hits)  # (a request with two rows in a step counts both, as record_step does)
            n_rows += len(hits) * rows
            if dur > 0.0:
                scale, _ = self._mass_scale(dur, wsum)
                for i in hits:
                    if is_prefill[i]:
                        mass_p += float(weights[i]) * scale
                    else:
                        mass_d += float(weights[i]) * scale
        return mass_p, mass_d, n_steps, n_rows

    def _entry_for(self, rid: str) -> _Req:
        """Ledger entry for a row whose request is not live: late work of a finished request
        (pending, or already delivered -> unreported), else a new request."""
        req = self._pending.get(rid)
        if req is not None:
            return req
        if rid in self._recent_done_set:
            unrep = self._reqs.get(UNREPORTED_ID)
            if unrep is None:
                unrep = self._reqs[UNREPORTED_ID] = _Req(UNREPORTED_ID, self._new_slot())
            self.late_rows_unreported += 1
            return unrep
        req = self._reqs[rid] = _Req(rid, self._new_slot())
        return req

    def collect_windows(self, min_span_s: float | None = None, max_kept: int | None = None) -> WindowAggregator:
        """From now on, every closed window with work whose steps all carried ``predicted_j``
        becomes part of a calibration observation (runtime/windows.py); returns the aggregator
        (pop its observations with ``.pop()``)."""
        kwargs: dict[str, Any] = {}
        if min_span_s is not None:
            kwargs["min_span_s"] = min_span_s
        if max_kept is not None:
            kwargs["max_kept"] = max_kept
        self.windows = WindowAggregator(**kwargs)
        return self.windows

    def set_update_period(self, period_s: float) -> None:
        """Use a measured counter update period (seconds) from now on: for the boundary and
        resolution uncertainty, and for stall detection (at least 20 periods without a change)."""
        if not (period_s > 0 and math.isfinite(period_s)):
            raise ValueError(f"update period must be finite and > 0, got {period_s}")
        self._update_period_s = float(period_s)
        self._max_open_s = max(self._max_open_s, 20.0 * float(period_s))

    @property
    def update_period_s(self) -> float:
        return self._update_period_s

    def poll(self) -> None:
        """Read the counters with no work. Call it while the engine idles (an idle poller at a
        bounded rate): it closes windows, delivers final values and measures idle power."""
        t = float(self._clock())
        self._boundary_t = t
        if not self._failed:
            self._read(t)

    def read_now(self) -> None:
        """Read the counters without recording a step (after record_step(read=False))."""
        if not self._failed:
            self._read(float(self._clock()))

    def on_preempted(self, request_id: str) -> None:
        """The request lost its KV cache. Counted only: the recompute's phase is decided by the
        token positions of the rows (prompt positions are prefill, later ones decode), so a
        resumed request that hits the prefix cache is charged for what it really recomputes."""
        req = self._reqs.get(request_id)
        if req is None:
            if request_id in self._pending or request_id in self._recent_done_set:
                return  # finished: nothing left to preempt
            # its rows are not recorded yet (queued for the engine's poller): its entry now, as the
            # first of them would make it, so that the preemption is counted
            req = self._entry_for(request_id)
        self._counts[0, req.slot] += 1

    def peek(self, request_id: str, aborted: bool | None = None,
             ahead: tuple[float, float, int, int] | None = None) -> MeasuredEnergy:
        """The current (non-final) value of a live request, without finishing it (``aborted``:
        say so in the value, for a finish that is deferred; ``ahead``: what steps not yet
        recorded add to it, from :meth:`lookahead`)."""
        req = self._reqs.get(request_id) or self._pending.get(request_id)
        if req is None:
            return self._never_scheduled(request_id, bool(aborted), final=False)
        return self._result(req, final=False, aborted=aborted, ahead=ahead)

    def on_finished(self, request_id: str, aborted: bool = False, answer: bool = True) -> MeasuredEnergy | None:
        """The request left the engine (finished or aborted). Returns at once: the open-window
        part is estimated (``final=False``); the final value comes via pop_finalized/on_final.
        ``answer=False``: return None instead of the value so far (a deferred finish, whose first
        answer went out already)."""
        req = self._reqs.pop(request_id, None)
        if req is None:
            req = self._pending.get(request_id)
            if req is not None:  # finished twice: keep the first
                return self._result(req, final=False) if answer else None
            result = self._never_scheduled(request_id, aborted, final=True)  # 0 J
            self._deliver(result)
            return result
        req.aborted = aborted
        if self._failed or self._last_step[req.slot] < self._min_snap_steps():
            result = self._result(req, final=True)
            self._release(req)
            self._deliver(result)
            return result
        self._pending[request_id] = req
        return self._result(req, final=False) if answer else None

    def pop_finalized(self) -> list[MeasuredEnergy]:
        """Final values of finished requests delivered since the last call (each once)."""
        out = list(self._finalized)
        self._finalized.clear()
        return out

    @property
    def unreported_energy_j(self) -> float:
        """Closed-window energy of work whose request had already been delivered, joules."""
        unrep = self._reqs.get(UNREPORTED_ID)
        return float(self._energy[0, unrep.slot] + self._energy[1, unrep.slot]) if unrep is not None else 0.0

    @property
    def live_requests(self) -> int:
        """Ledger entries of unfinished requests (the unreported entry excluded)."""
        return len(self._reqs) - (UNREPORTED_ID in self._reqs)

    @property
    def pending_requests(self) -> int:
        """Finished requests waiting for their windows to close."""
        return len(self._pending)

    def idle_power_w(self) -> list[float | None]:
        """Idle power per device measured from fully idle windows (median), None until seen."""
        out: list[float | None] = []
        for d in range(self._n_devices):
            p, known = self._idle_floor_w(d)
            out.append(p if known else None)
        return out

    # ---------------------------------------------------------------- internals
    def _min_snap_steps(self) -> int:
        """Steps numbered below this are in closed windows of every device."""
        return min(self._snap_steps) if self._snap_steps else self._n_steps

    def _read(self, t: float) -> None:
        try:
            values = self._reader.energy_mj()
        except EnergyReaderError as e:
            self.read_errors += 1
            self._consecutive_errors += 1
            if e.permanent or self._consecutive_errors >= self._max_errors:
                self._fail(f"{type(e).__name__}: {e}")
            elif self.read_errors == 1:
                logger.warning("llmco2 energy: transient read error, read skipped: %s", e)
            return
        self._consecutive_errors = 0
        if len(values) != self._n_devices:
            self._fail(f"reader returned {len(values)} counters for {self._n_devices} devices")
            return
        period = self._update_period_s
        # The update that changed a counter happened within the last read gap and within one
        # update period; a reader with period 0 computes its value at the read (no lag).
        gap = t - self._last_ok_read_t
        delta_close = min(gap, period) if period > 0.0 else 0.0
        closed = False
        v_last = self._v_mj
        for d in range(self._n_devices):
            dv = values[d] - v_last[d]
            if dv > 0:
                self._close(d, t, dv * 1e-3, delta_close)
                v_last[d] = values[d]
                closed = True
            elif dv < 0:
                self._fail(f"device {d} counter went backwards ({v_last[d]} -> {values[d]} mJ)")
                return
            elif t - self._open_t[d] > self._max_open_s:
                self._fail(
                    f"device {d} counter did not change for {t - self._open_t[d]:.3f} s "
                    f"(max_open_window_s={self._max_open_s})"
                )
                return
        self._last_ok_read_t = t
        if closed and self._pending:
            min_snap = self._min_snap_steps()
            last = self._last_step
            done = [r for r in self._pending.values() if last[r.slot] < min_snap]
            for req in done:
                del self._pending[req.rid]
                result = self._result(req, final=True)
                self._release(req)
                self._deliver(result)

    def _idle_floor_w(self, d: int) -> tuple[float | None, bool]:
        """(idle power estimate in W or None, whether it is known rather than an upper bound)."""
        fixed = self._idle_fixed_w[d]
        if fixed is not None:
            return fixed, True
        idle = self._idle_w_hist[d]
        if len(idle) >= 2:  # measured: median of fully idle windows (robust to one odd window)
            ordered = sorted(idle)
            return ordered[len(ordered) // 2], True
        hist = self._window_avg_w[d]
        if not hist:
            return None, False
        return min(hist)  # (lowest window average, whether that window was fully idle)

    def _close(self, d: int, t: float, de_j: float, delta_close: float) -> None:
        """Close device d's window at read time t with energy de_j."""
        first_step = self._snap_steps[d]
        n_win_steps = self._n_steps - first_step
        busy_s = self._cum_busy_s - self._snap_busy_s[d]
        mass = self._cum_mass - self._snap_mass[d]
        mass_sq = self._cum_mass_sq - self._snap_mass_sq[d]
        dur_win = t - self._open_t[d]
        idle_s = dur_win - busy_s
        if idle_s < 0.0:
            idle_s = 0.0
        p_avg_w = de_j / dur_win if dur_win > 0.0 else 0.0
        eps_open = self._eps_open_j[d]
        if eps_open != eps_open:  # NaN: baseline boundary, update up to one period before it
            eps_open = self._open_delta_s[d] * p_avg_w
        eps_close = delta_close * p_avg_w
        win_no = self._win_no[d] + 1
        self._win_no[d] = win_no
        self._total_j += de_j
        self.device_total_energy_j[d] += de_j
        if n_win_steps <= 0 or busy_s <= 0.0 or mass <= 0.0:
            self._idle_j += de_j
            self.device_idle_energy_j[d] += de_j
            if dur_win > 0.0:
                self._window_avg_w[d].append((p_avg_w, True))
                if n_win_steps <= 0:  # no step at all: a clean idle-power sample
                    self._idle_w_hist[d].append(p_avg_w)
        else:
            e_idle = 0.0
            f_split = 0.0
            if idle_s > 0.0:
                uniform = de_j * idle_s / dur_win
                p_idle, known = self._idle_floor_w(d)
                if p_idle is None:
                    e_idle, f_split = uniform, 1.0
                else:
                    e_idle = min(p_idle * idle_s, uniform)
                    f_split = _KNOWN_IDLE_REL_ERROR if known else 1.0
            e_busy = de_j - e_idle
            k = e_busy / mass
            # Static + work model (duration split only): a step draws the static power for its
            # duration plus energy per unit of work; compute-bound prefill steps draw more power
            # than memory-bound decode steps of the same length (H200: ~2.8x). Static power is the
            # measured idle power; the work prices are learned from the windows (_work_prices).
            k_time, k_work, k_compute = k, 0.0, 0.0
            work = self._cum_work - self._snap_work[d]
            if work > 0.0 and not self._split_by_weight:
                p_static, static_known = self._idle_floor_w(d)
                if static_known and p_static is not None and e_busy > p_static * mass:
                    dyn_j = e_busy - p_static * mass
                    work_c = self._cum_work_c - self._snap_work_c[d]
                    price_c, price_m = self._work_prices(d, work_c, work - work_c, dyn_j)
                    denom = price_c * work_c + price_m * (work - work_c)
                    if denom > 0.0:  # scaled so that the window's energy is conserved exactly
                        k_work = price_m * dyn_j / denom
                        k_compute = (price_c - price_m) * dyn_j / denom
                    else:
                        k_work = dyn_j / work
                    k_time = p_static
            split_rel = f_split * e_idle / e_busy if e_busy > 0.0 else 0.0
            period = self._update_period_s
            # Below one update period the counter cannot resolve when energy was drawn.
            resolution_s = min(period, dur_win) if period > 0.0 else 0.0
            idx = np.flatnonzero(self._in_use & (self._last_step >= first_step))
            if idx.size:
                snap = self._snap[d]
                cur = self._acc[:_N_SNAP, idx]
                dlt = cur - snap[:, idx]
                snap[:, idx] = cur
                e_p = k_time * dlt[_MP] + k_work * dlt[_WP] + k_compute * dlt[_CP]
                e_d = k_time * dlt[_MD] + k_work * dlt[_WD] + k_compute * dlt[_CD]
                self._energy[0, idx] += e_p
                self._energy[1, idx] += e_d
                m_rw = dlt[_MP] + dlt[_MD]
                e_rw = e_p + e_d
                # sum over the window's steps of (m_rs - F M_s)^2, F = m_rw / mass
                f_share = m_rw / mass
                dev_sq = dlt[_SQ] - 2.0 * f_share * dlt[_XS] + f_share * f_share * mass_sq
                spread_j = (_STEP_POWER_REL_SPREAD * k) * np.sqrt(n_win_steps * np.maximum(dev_sq, 0.0))
                if resolution_s > 0.0:
                    spread_j = np.maximum(spread_j, (1.0 - dlt[_BUSY] / resolution_s) * e_rw)
                # Row split inside its steps: sum_s m_rs (1 - m_rs / M_s) is the mass it shared
                # with other rows; the weights that split it are uncertain.
                row_split_j = (_ROW_SPLIT_REL_ERROR * k) * np.maximum(m_rw - dlt[_SH], 0.0)
                q = e_rw / de_j
                v = self._var[d, idx]
                qp = self._q_prev[d, idx]
                adjacent = self._win_prev[d, idx] == win_no - 1
                # replace the provisional closing term of the previous window where it was there
                v = v + np.where(adjacent, (eps_open * (qp - q)) ** 2 - (eps_open * qp) ** 2, (eps_open * q) ** 2)
                x = e_rw * split_rel + spread_j
                v += (eps_close * q) ** 2 + x * x + row_split_j * row_split_j  # closing term provisional
                self._var[d, idx] = np.maximum(v, 0.0)
                self._win_prev[d, idx] = win_no
                self._q_prev[d, idx] = q
            self._idle_j += e_idle
            self.device_idle_energy_j[d] += e_idle
            self._attributed_j += e_busy
            self._k[d] = k
            self._window_avg_w[d].append((p_avg_w, False))
            agg = self.windows
            if agg is not None:
                snap_p, snap_d, snap_rows, snap_unpred = self._snap_pred[d]
                if self._cum_unpredicted == snap_unpred:
                    q = e_busy / de_j  # the busy share of energy that moves across a boundary
                    share = 1.0 / self._n_devices
                    agg.add(d, win_no, self._open_t[d], t, e_busy, eps_open * q, eps_close * q,
                            split_rel * e_busy, (self._cum_pred_p - snap_p) * share,
                            (self._cum_pred_d - snap_d) * share, n_win_steps, self._cum_rows - snap_rows)
                else:
                    agg.skip(d)
        self._open_t[d] = t
        self._open_delta_s[d] = delta_close
        self._eps_open_j[d] = eps_close
        self._snap_steps[d] = self._n_steps
        self._snap_busy_s[d] = self._cum_busy_s
        self._snap_mass[d] = self._cum_mass
        self._snap_work[d] = self._cum_work
        self._snap_work_c[d] = self._cum_work_c
        self._snap_mass_sq[d] = self._cum_mass_sq
        self._snap_pred[d] = (self._cum_pred_p, self._cum_pred_d, self._cum_rows, self._cum_unpredicted)

    def _work_prices(self, d: int, work_c: float, work_m: float, dyn_j: float) -> tuple[float, float]:
        """Relative price of a second of compute and of memory traffic on device ``d``.

        Each closed window is one observation ``dyn_j = a * work_c + b * work_m`` (its busy energy
        above static power). Windows differ in their mix (prefill-heavy vs decode-only), so the
        deployment's own counters tell compute and memory work apart: an exponentially weighted
        (0.99 per window) least-squares fit with a ridge pulling ``a`` towards ``b`` (equal
        prices: the Roofline's assumption) until the data say otherwise. Returns (1, 1) until 20
        windows were seen or when the fit is not positive.
        """
        sums = self._price_sums[d]
        decay = _PRICE_DECAY
        for i in range(5):
            sums[i] *= decay
        sums[0] += work_c * work_c
        sums[1] += work_c * work_m
        sums[2] += work_m * work_m
        sums[3] += work_c * dyn_j
        sums[4] += work_m * dyn_j
        sums[5] += 1
        return self._solve_prices(sums)

    @staticmethod
    def _solve_prices(sums: list[float]) -> tuple[float, float]:
        if sums[5] < _PRICE_MIN_WINDOWS:
            return 1.0, 1.0
        s_cc, s_cm, s_mm, s_cy, s_my = sums[:5]
        mu = _PRICE_RIDGE * (s_cc + s_mm) * 0.5
        a11, a12, a22 = s_cc + mu, s_cm - mu, s_mm + mu
        det = a11 * a22 - a12 * a12
        if not det > 0.0:
            return 1.0, 1.0
        a = (s_cy * a22 - a12 * s_my) / det
        b = (a11 * s_my - a12 * s_cy) / det
        if not (a > 0.0 and b > 0.0):
            return 1.0, 1.0
        return a, b

    def work_price_ratios(self) -> list[float | None]:
        """Per device: fitted price of a second of compute / a second of memory traffic, or None
        while the fit is not in use (fewer than 20 windows, or not positive)."""
        out: list[float | None] = []
        for sums in self._price_sums:
            a, b = self._solve_prices(sums)
            out.append(None if (a, b) == (1.0, 1.0) else a / b)
        return out

    def _fail(self, reason: str) -> None:
        """Stop reading; turn the work in every open window into lost (estimated) energy."""
        if self._failed:
            return
        self._failed = True
        self.failure_reason = reason
        logger.warning(
            "llmco2 energy: %s reader failed (%s); later requests are estimated or unavailable",
            self._reader_source, reason,
        )
        ks = list(self._k)
        known = [k for k in ks if k == k]  # k == k: not NaN
        if known:  # a device that never closed a window with work: use the others' mean
            mean_k = sum(known) / len(known)
            ks = [k if k == k else mean_k for k in ks]
        idx = np.flatnonzero(self._in_use)
        if idx.size:
            for d, k in enumerate(ks):
                snap = self._snap[d]
                for ph, row in ((0, _MP), (1, _MD)):
                    m = np.maximum(self._acc[row, idx] - snap[row, idx], 0.0)
                    self._lost[ph, idx] += k * m
                    self._lost[2, idx] += m
                    snap[row, idx] = np.maximum(snap[row, idx], self._acc[row, idx])
        self._lost_k = sum(ks) if ks else _NAN
        pending, self._pending = self._pending, {}
        for req in pending.values():
            result = self._result(req, final=True)
            self._release(req)
            self._deliver(result)

    def _deliver(self, result: MeasuredEnergy) -> None:
        rid = result.request_id
        if rid not in self._recent_done_set:
            self._recent_done.append(rid)
            self._recent_done_set.add(rid)
            if len(self._recent_done) > _RECENT_DONE:
                self._recent_done_set.discard(self._recent_done.popleft())
        if len(self._finalized) == self._finalized.maxlen:
            self.finalized_dropped += 1
        self._finalized.append(result)
        if self._on_final is not None:
            self._on_final(result)

    def _result(self, req: _Req, final: bool, aborted: bool | None = None,
                ahead: tuple[float, float, int, int] | None = None) -> MeasuredEnergy:
        s = req.slot
        if aborted is None:
            aborted = req.aborted
        ahead_p, ahead_d, ahead_steps, ahead_rows = ahead if ahead is not None else (0.0, 0.0, 0, 0)
        acc = self._acc[:, s].tolist()  # one gather per array: called for every request, twice
        n_steps = int(acc[_STEPS]) + ahead_steps
        n_pre = int(self._counts[0, s])
        n = self._n_devices
        if n == 0:
            return self._unavailable(req.rid, n_steps, n_pre, aborted, final)
        energy_p, energy_d = self._energy[:, s].tolist()
        est_p, est_d, lost_mass = self._lost[:, s].tolist()
        if lost_mass > 0.0:
            if energy_p == 0.0 and energy_d == 0.0:
                return self._unavailable(req.rid, n_steps, n_pre, aborted, final)
            source = f"{self._reader_source}-partial"
        else:
            source = self._reader_source
        if not final:
            # open-window estimate, per device: k_d x its mass since d's last close (one gather)
            acc_p, acc_d = acc[_MP] + ahead_p, acc[_MD] + ahead_d
            ks = self._k
            for d, (snap_p, snap_d) in enumerate(self._snap[:, _MP:_MD + 1, s].tolist()):
                open_p = acc_p - snap_p
                open_d = acc_d - snap_d
                if open_p > 0.0:
                    est_p += ks[d] * open_p
                if open_d > 0.0:
                    est_d += ks[d] * open_d
        prefill = energy_p + est_p
        decode = energy_d + est_d
        estimated = est_p + est_d
        return MeasuredEnergy(
            request_id=req.rid,
            prefill_energy_j=prefill,
            decode_energy_j=decode,
            energy_j=prefill + decode,
            uncertainty_j=sum(map(math.sqrt, self._var[:, s].tolist())) + estimated,
            estimated_energy_j=estimated,
            source=source,
            n_steps=n_steps,
            n_preemptions=n_pre,
            aborted=aborted,
            final=final,
            mean_batch=(acc[_ROWS] + ahead_rows) / n_steps if n_steps else 0.0,
        )

    def _never_scheduled(self, rid: str, aborted: bool, final: bool) -> MeasuredEnergy:
        """A request that had no work in the engine: 0 J (or unavailable without counters)."""
        if self._n_devices == 0:
            return self._unavailable(rid, 0, 0, aborted, final)
        return MeasuredEnergy(request_id=rid, prefill_energy_j=0.0, decode_energy_j=0.0, energy_j=0.0,
                              uncertainty_j=0.0, estimated_energy_j=0.0,
                              source=self._reader_source,
                              n_steps=0, n_preemptions=0, aborted=aborted, final=final)

    @staticmethod
    def _unavailable(rid: str, n_steps: int, n_preemptions: int, aborted: bool, final: bool) -> MeasuredEnergy:
        return MeasuredEnergy(
            request_id=rid,
            prefill_energy_j=_NAN,
            decode_energy_j=_NAN,
            energy_j=_NAN,
            uncertainty_j=_NAN,
            estimated_energy_j=_NAN,
            source="unavailable",
            n_steps=n_steps,
            n_preemptions=n_preemptions,
            aborted=aborted,
            final=final,
        )
