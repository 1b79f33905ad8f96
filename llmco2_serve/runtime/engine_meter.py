"""Engine-core side of the plugin: per-step rows in, per-request measured energy out.

:class:`EngineMeter` feeds an :class:`~llmco2_serve.runtime.attribution.EnergyAttributor` from the
scheduler's step boundaries (``hooks/engine_core.py``); it is independent of vLLM.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmco2_serve.prediction.calibration import MEASURED_SOURCES
from llmco2_serve.runtime.attribution import EnergyAttributor, MeasuredEnergy
from llmco2_serve.hardware.gpu_energy import EnergyReader, measure_update_period_s
from llmco2_serve.runtime.windows import MAX_PER_MESSAGE, MIN_SPAN_S, WindowObservation
from llmco2_serve.workload.step_costs import StepCostModel

__all__ = ["EngineMeter", "StepRow"]

logger = logging.getLogger(__name__)

StepRow = tuple[str, str, int, int]  # (request_id, "prefill"|"decode", n_tokens, context_len before)
_PREFILL = "prefill"
_MAX_QUEUED_STEPS = 64  # steps waiting for the poller before the step thread records them itself


class EngineMeter:
    """Engine-core side: per-step rows in, per-request measured energy out.

    Call :meth:`step_started` when a step was scheduled (its rows) and :meth:`step_finished`
    with the same key when its compute is done; the step's interval and its work go to the
    attributor. Row weights: each row's own cost plus an even share of the step's shared weight
    reads (:class:`~llmco2_serve.workload.step_costs.StepCostModel`), or the token count while no
    predictor is set.

    Async scheduling: vLLM schedules step N+1 before step N's output is processed, so a request
    that finishes in step N (or is aborted) may still be in a step that is in flight. Its finish
    is then *deferred* until the last in-flight step holding it has finished; :meth:`finished`
    returns the value so far (``final=False``) at once. Final values of every finished request
    come out exactly once through :meth:`pop_final`.

    Thread-safe: one lock around the attributor, so an idle poller thread may call
    :meth:`idle_tick` while the engine thread steps (uncontended on the step path).

    Counter windows as calibration observations (``runtime/windows.py``): once the predictor is
    set, each recorded step also carries its predicted energy in the GNN's joules
    (:class:`~llmco2_serve.prediction.step_energy.StepEnergyScale`, computed where the step is
    recorded: on the poller thread with background reads), and closed windows are merged into
    observations that :meth:`pop_windows` hands out (``window_min_span_s``; None: off).
    """

    def __init__(self, reader: EnergyReader, predictor: Any = None, *,
                 clock: Callable[[], float] = time.monotonic, min_read_interval_s: float | None = None,
                 background_reads: bool = False, window_min_span_s: float | None = None,
                 **attributor_kwargs: Any) -> None:
        self.reader = reader
        self.predictor: Any = None
        self._clock = clock
        self._lock = threading.Lock()
        self.attributor = EnergyAttributor(reader, clock, **attributor_kwargs)
        # Window observations: on unless switched off (window_min_span_s < 0). Default span: 0.5 s,
        # at least 5 counter periods (boundary error sqrt(2) / 5 = 28 %, windows.py).
        self._windows = None
        self._default_span = window_min_span_s is None
        # Only a real measurement teaches the calibrator (it refuses estimates such as cpu-estimate):
        # with any other source no window is collected, priced or sent.
        measures = getattr(reader, "source", None) in MEASURED_SOURCES
        if measures and (self._default_span or window_min_span_s >= 0):
            self._windows = self.attributor.collect_windows(
                min_span_s=self._span_for(float(getattr(reader, "update_period_s", 0.0) or 0.0))
                if self._default_span else window_min_span_s)
        self._scale: Any = None  # StepEnergyScale once a predictor is set
        # TEST-ONLY counters whose energy follows the scheduled work (gpu_energy.WorkFakeReader) are
        # told each step's rows when it is recorded, before the read that closes its window.
        self._work_feed: Callable[[Sequence[StepRow], float, float], None] | None = getattr(
            reader, "observe_step", None)
        # Reads closer together than this add no information (the counter moves once per
        # update period) but cost one NVML call per GPU: rate-limit them on the step path.
        period = float(getattr(reader, "update_period_s", 0.0) or 0.0)
        self.min_read_interval_s = (period / 10.0 if min_read_interval_s is None else float(min_read_interval_s))
        self._last_read_t = -math.inf
        # Background reads: the step thread only records steps and flags a read as due; another
        # thread (the engine's poller) reads the counters and closes windows (NVML calls release
        # the GIL, and on a GPU the step thread mostly waits for the device), keeping both off
        # the step path. Without it (tests, simulations) reads happen inline, deterministically.
        self.background_reads = bool(background_reads)
        self._read_due = threading.Event()
        self._read_flagged = False  # a counter read is due (the event also wakes the poller to record steps)
        self._open: dict[Any, tuple[float, list[StepRow], frozenset[str]]] = {}
        # Background reads also move the recording of finished steps (row weights, the ledger's
        # vector updates) off the step thread: steps queue here, in order, and the poller records
        # them. A finishing request's value so far adds what its queued steps would add (the same
        # sums, attribution.lookahead), so its first answer is exact without recording them; the
        # queue is bounded (recorded inline when full: a stalled poller costs speed, never data).
        self._queue: list[list] = []  # [start, end, rows, request ids, columns, lookahead index] (None: not yet)
        self._deferred: dict[str, bool] = {}  # finished while in a step in flight -> aborted flag
        self._costs: StepCostModel | None = None
        self.steps = 0
        self.last_activity_t = float(clock())
        if predictor is not None:
            self.set_predictor(predictor)

    @staticmethod
    def _span_for(period_s: float) -> float:
        return max(MIN_SPAN_S, 5.0 * period_s)

    @property
    def predictor_label(self) -> str | None:
        """Label of the predictor's weights (what the step predictions are priced with), or None."""
        weights = getattr(self.predictor, "weights", None)
        return getattr(weights, "label", None)

    @property
    def source(self) -> str:
        return self.attributor.source

    def set_predictor(self, predictor: Any) -> None:
        try:
            costs: StepCostModel | None = StepCostModel.from_predictor(predictor)
        except Exception as e:  # noqa: BLE001 - weights fall back to token counts, never break the engine
            logger.warning("llmco2: no step costs from the predictor (%s: %s); rows weighted by tokens",
                           type(e).__name__, e)
            costs = None
        ok = costs is not None and all(math.isfinite(x) and x >= 0 for x in (
            *costs.own_coef_s, costs.head_row_s, costs.shared_s)) and costs.decode_row_s(0) > 0
        scale = None
        if ok and self._windows is not None:
            try:  # the GNN on a small grid (~10-50 ms): called off the step loop (engine_core.py)
                from llmco2_serve.prediction.step_energy import StepEnergyScale

                scale = StepEnergyScale.from_predictor(predictor, costs)
            except Exception as e:  # noqa: BLE001 - no window observations, never break the engine
                logger.warning("llmco2: no predicted step energy (%s: %s); counter windows are not "
                               "calibration observations", type(e).__name__, e)
        self._costs = costs if ok else None
        self._scale = scale
        self.predictor = predictor  # one reference swap: safe from another thread

    def weights(self, rows: Sequence[StepRow]) -> list[float]:
        """Relative cost of each row (finite, > 0): own cost + shared cost / rows."""
        return [float(x) for x in self.weights_and_compute(rows)[0]]

    def weights_and_compute(self, rows: Sequence[StepRow]) -> tuple[Any, Any]:
        """(row weights, the compute part of each) in seconds at peak rates, as arrays; the
        compute parts are None while rows are weighted by token counts (no predictor)."""
        if not rows:
            return [], None
        return self._row_columns(rows)[2:4]

    def _row_columns(self, rows: Sequence[StepRow]) -> tuple:
        """(request ids, is-prefill flags, row weights, their compute parts, new tokens, contexts)
        of a step's rows."""
        rid_col, phase_col, n_col, ctx_col = zip(*rows)
        n, ctx = np.array(n_col, dtype=np.float64), np.array(ctx_col, dtype=np.float64)
        w, comp = self._weights_cols(n, ctx)
        return rid_col, list(map(_PREFILL.__eq__, phase_col)), w, comp, n, ctx

    def _weights_cols(self, n: np.ndarray, ctx: np.ndarray) -> tuple[Any, Any]:
        costs = self._costs
        if costs is None:
            return np.maximum(n, 1.0), None
        out, comp = costs.decode_row_parts_s(ctx)  # every row priced as a decode token first
        multi = np.flatnonzero(n != 1.0)
        if multi.size:  # prefill chunks and speculative rows: few per step, priced one by one
            chunk = costs.chunk_parts_s
            for i in multi.tolist():
                out[i], comp[i] = chunk(int(n[i]), int(ctx[i]))
        out += costs.shared_step_s(float(n.sum())) / n.size
        total = float(out.sum()) + float(comp.sum())
        if math.isfinite(total) and float(out.min()) > 0.0:
            return out, comp
        return np.maximum(n, 1.0), None

    def step_started(self, key: Any, rows: Sequence[StepRow]) -> None:
        """A step was scheduled (``rows``: its work); its compute starts now."""
        if rows:
            rows = list(rows)
            self._open[key] = (self._clock(), rows, frozenset(r[0] for r in rows))

    def step_finished(self, key: Any) -> None:
        """The step ``key`` finished computing: attribute the energy read now (with background
        reads: queue the step for the poller, which records it)."""
        item = self._open.pop(key, None)
        now = self._clock()
        with self._lock:
            self.last_activity_t = now
            if item is None:  # a step with no rows: an idle read, rate-limited like the others
                if now - self._last_read_t >= self.min_read_interval_s:
                    self._last_read_t = now
                    self._record_queued()
                    self.attributor.poll()
                return
            self.steps += 1
            read = now - self._last_read_t >= self.min_read_interval_s
            if read:
                self._last_read_t = now
            step = [item[0], now, item[1], item[2], None, None]
            if not self.background_reads:
                self._record(step, read=read)
                return
            queue = self._queue
            queue.append(step)
            if len(queue) > _MAX_QUEUED_STEPS:
                self._record_queued()
            if read:
                self._flag_read()
            elif not self._read_due.is_set():
                self._read_due.set()  # wake the poller to record the step (no counter read)

    def _flag_read(self) -> None:
        self._read_flagged = True
        self._read_due.set()

    def _columns(self, item: list) -> tuple:
        """(request ids, is-prefill flags, row weights, their compute parts) of a queued or
        finishing step; computed once per step (cached in a queued item)."""
        cols = item[4]
        if cols is None:
            cols = item[4] = self._row_columns(item[2])
        return cols

    def _ahead_step(self, item: list, request_id: str) -> tuple:
        """A queued step as :meth:`EnergyAttributor.lookahead` takes it, for ``request_id``. Its row
        index and weight sum are made once per step (cached in the item): with one-token requests
        every request of a step finishes while the step is still queued, each asking for it."""
        cols = self._columns(item)
        rids = cols[0]
        look = item[5]
        if look is None:
            look = item[5] = (dict(zip(rids, range(len(rids)))), float(cols[2].sum()))
        index, wsum = look
        if len(index) == len(rids):
            i = index.get(request_id)
            hits: Sequence[int] = () if i is None else (i,)
        else:  # a request with two rows in the step (a recompute crossing its prompt's end)
            hits = [i for i, r in enumerate(rids) if r == request_id]
        return item[0], item[1], hits, len(rids), cols[1], cols[2], wsum

    def _record(self, item: list, read: bool) -> None:
        """Record one finished step (``[start, end, rows, rids, columns]``) in the attributor (under the lock)."""
        if self._work_feed is not None:
            self._work_feed(item[2], item[0], item[1])
        rid_col, is_prefill, w, comp, n, ctx = self._columns(item)
        scale = self._scale
        predicted = None
        if scale is not None and comp is not None:  # weights in seconds: priced in GNN joules
            predicted = scale.step_j(is_prefill, w, n, ctx)
        self.attributor.record_step(item[0], item[1], rid_col, is_prefill, w, read=read,
                                    work_s=comp is not None, compute_s=comp, now_s=item[1],
                                    predicted_j=predicted)
        if self._deferred:
            for rid in [r for r in self._deferred if r in item[3]]:
                if not self._holds(rid):
                    self.attributor.on_finished(rid, aborted=self._deferred.pop(rid), answer=False)

    def _holds(self, rid: str) -> bool:
        """Whether a step in flight or not yet recorded still holds ``rid``."""
        return any(rid in o[2] for o in self._open.values()) or any(rid in q[3] for q in self._queue)

    def _record_queued(self, upto: int | None = None) -> None:
        """Record the queued steps (the first ``upto`` of them), in order (under the lock)."""
        queue = self._queue
        n = len(queue) if upto is None else upto
        for _ in range(n):
            self._record(queue.pop(0), read=False)

    def preempted(self, request_id: str) -> None:
        with self._lock:
            self.attributor.on_preempted(request_id)

    def finished(self, request_id: str, aborted: bool = False) -> MeasuredEnergy:
        """The request left the scheduler. Returns its value so far; deferred while a step in
        flight still holds it (async scheduling, aborts before the step's output)."""
        with self._lock:
            queue = self._queue
            if queue:  # steps holding it not yet recorded (the poller records them)
                last = max((i for i, q in enumerate(queue) if request_id in q[3]), default=-1)
                if last >= 0:
                    # Its value so far as if they were recorded (the same sums, without the ledger's
                    # vector updates); its finish waits for them like for a step in flight.
                    ahead = self.attributor.lookahead(request_id, [
                        self._ahead_step(q, request_id) for q in queue[:last + 1]])
                    if ahead is None:  # no entry yet, or the counters failed: record them now
                        self._record_queued(last + 1)
                    else:
                        self._deferred[request_id] = aborted
                        return self.attributor.peek(request_id, aborted=aborted, ahead=ahead)
            for o in self._open.values():
                if request_id in o[2]:
                    self._deferred[request_id] = aborted
                    return self.attributor.peek(request_id, aborted=aborted)
            return self.attributor.on_finished(request_id, aborted=aborted)

    def in_flight(self) -> bool:
        return bool(self._open)

    def service_reads(self, timeout_s: float) -> bool:
        """Background reads: wait up to ``timeout_s`` for a read flagged by the step thread and do
        it (counters read, windows closed, final values made). Returns whether it read."""
        if not self._read_due.wait(timeout_s):
            return False
        self._read_due.clear()
        with self._lock:
            self._record_queued()
            if self._read_flagged:
                self._read_flagged = False
                self.attributor.read_now()
        return True

    def idle_tick(self, idle_after_s: float = 0.05) -> bool:
        """Read the counters if no step is in flight and none finished for ``idle_after_s``
        (called by an idle poller at a bounded rate). Returns whether it read."""
        now = self._clock()
        if self._open or now - self.last_activity_t < idle_after_s:
            return False
        with self._lock:
            if self._open:
                return False
            self._record_queued()
            self._last_read_t = now
            self.attributor.poll()
        return True

    def measure_update_period(self, **kwargs: Any) -> float | None:
        """Measure the counters' update period (:func:`measure_update_period_s`, ~0.3-1.5 s of
        reads; call it while idle, e.g. at engine start-up) and use it from then on."""
        # Not under the lock: a request arriving meanwhile must not wait for it (the reader is
        # only read from the thread that calls this, or inline in tests).
        period = measure_update_period_s(self.reader, **kwargs)
        if period is not None:
            with self._lock:
                self.attributor.set_update_period(period)
                self.min_read_interval_s = period / 10.0
                if self._windows is not None and self._default_span:
                    self._windows.min_span_s = self._span_for(period)
        return period

    def pop_windows(self, max_n: int = MAX_PER_MESSAGE) -> list[WindowObservation]:
        """Up to ``max_n`` merged counter-window observations, oldest first (runtime/windows.py)."""
        agg = self._windows
        if agg is None or not agg.out:
            return []
        with self._lock:
            return agg.pop(max_n)

    def pop_final(self) -> list[MeasuredEnergy]:
        """Final values of finished requests since the last call (each request exactly once)."""
        with self._lock:
            return self.attributor.pop_finalized()

    def totals(self) -> dict[str, Any]:
        """Cumulative energy books of this engine's devices (closed windows), joules."""
        with self._lock:
            a = self.attributor
            return {"total_j": a.total_energy_j, "idle_j": a.idle_energy_j, "attributed_j": a.attributed_energy_j,
                    "unreported_j": a.unreported_energy_j, "per_device_total_j": list(a.device_total_energy_j),
                    "per_device_idle_j": list(a.device_idle_energy_j), "devices": a.device_names,
                    "live": a.live_requests, "pending": a.pending_requests}

    def close(self) -> None:
        self.reader.close()
