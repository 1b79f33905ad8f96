"""Counter windows as calibration observations (issue 7 §2): built in the engine core, learnt from
in the API server. Imports without vLLM.

Engine core (:class:`WindowAggregator`, fed by :class:`~llmco2_serve.runtime.attribution.EnergyAttributor`
when it closes a device's counter window, on the engine's poller thread):

* what a window says: its *busy* energy (the window's counter delta less the idle share the
  attributor gives to nobody: exactly what it hands to the requests of the window, so windows and
  finished-request pairs measure the same thing), its uncertainty, and the predicted energy of the
  steps inside it (:class:`~llmco2_serve.prediction.step_energy.StepEnergyScale`: GNN joules, the
  scale of the API server's request predictions), split into prefill and decode, with the steps and
  their rows. Each device window gets ``1/n_devices`` of its steps' prediction (the GNN predicts
  the energy of all the engine's GPUs; TP ranks share the work).
* windows are *merged*: windows with work (every device) add up into one observation until they
  cover ``min_span_s`` of counter time per device (0.5 s by default, at least 5 counter periods;
  idle windows between them do not count: an observation of a few steps in a mostly idle second is
  as uncertain as its busy/idle split). Why: a single 100 ms NVML
  window is uncertain by about its own energy (the counter's update instant is unknown within one
  period at each end), so the calibrator would refuse it as ``too_uncertain``; merged, the interior
  boundaries cancel (energy that moved across one is still inside) and only the two ends remain,
  ``sqrt(2) x period / span`` relative (28 % at 0.5 s with 100 ms updates, 14 % at 1 s). It also
  bounds the traffic: with TP=8 (80 windows a second) about 2 observations a second go out instead
  of 80. A window with a step recorded before the predictor was loaded is not used.
* bounded: at most ``max_kept`` observations wait for the next message (oldest dropped and counted
  in :attr:`WindowAggregator.dropped`); each message carries at most ``MAX_PER_MESSAGE``.

Wire format (inside the engine's finals/books message, ``hooks/engine_core.py``)::

    "windows": {"source": "nvml", "predictor": "<label of the engine's weights>",
                "rows": [[measured_j, uncertainty_j, predicted_prefill_j, predicted_decode_j, batch,
                          span_s, windows], ...]}

API server: :func:`observe_windows` feeds each row to the service's
:class:`~llmco2_serve.prediction.calibration.Calibrator` (``observe_window``, which refuses
every source but ``nvml`` and the test-only ``fake``); malformed rows are counted, never raised.
Windows priced by other weights than the ones the calibrator corrects (the engine core keeps the
weights it started with; the API server hot-reloads, README "Retraining and hot reload") are not
learnt from: counted as ``window:other_predictor``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["WindowObservation", "WindowAggregator", "observe_windows", "MAX_PER_MESSAGE", "MIN_SPAN_S"]

MIN_SPAN_S = 0.5  # merged observation span: ~5 NVML periods (boundary error sqrt(2)/5 = 28 %)
MAX_PER_MESSAGE = 16  # observations per finals/books message (~1 message a second: >> 2 produced)
MAX_KEPT = 256  # observations waiting for a message (a stalled API side costs these, never memory)


@dataclass(frozen=True, slots=True)
class WindowObservation:
    """Merged counter windows: measured busy energy and what the GNN predicted for the same steps.

    Attributes:
        measured_j: the windows' busy energy (counters' delta less the idle share), J, all devices.
        uncertainty_j: its error scale (J): end boundaries in quadrature per device, the busy/idle
            split linearly, devices linearly (they run the same steps).
        predicted_prefill_j, predicted_decode_j: the GNN's energy of the steps inside (J).
        batch: mean rows per step of those steps.
        span_s: counter time the merged windows cover, per device (s).
        windows: device windows merged.
    """

    measured_j: float
    uncertainty_j: float
    predicted_prefill_j: float
    predicted_decode_j: float
    batch: float
    span_s: float
    windows: int

    def to_row(self) -> list[float | int]:
        return [_round(self.measured_j), _round(self.uncertainty_j), _round(self.predicted_prefill_j),
                _round(self.predicted_decode_j), round(self.batch, 3), round(self.span_s, 4), self.windows]


def _round(x: float) -> float:
    """9 significant digits: the message stays short, the value exact to far below the counter's mJ."""
    return float(f"{x:.9g}")


class WindowAggregator:
    """Merges closed device windows into :class:`WindowObservation` s (module docstring).

    Not thread-safe on its own: the attributor calls :meth:`add` under the meter's lock, and the
    meter pops under the same lock.
    """

    def __init__(self, min_span_s: float = MIN_SPAN_S, max_kept: int = MAX_KEPT) -> None:
        if not (min_span_s >= 0 and math.isfinite(min_span_s)):
            raise ValueError(f"min_span_s must be finite and >= 0, got {min_span_s!r}")
        if max_kept < 1:
            raise ValueError(f"max_kept must be >= 1, got {max_kept!r}")
        self.min_span_s = float(min_span_s)
        self.out: deque[WindowObservation] = deque(maxlen=int(max_kept))
        self.dropped = 0  # observations dropped because nobody popped them
        self.emitted = 0
        self.skipped = 0  # device windows with steps not all predicted
        self._last: dict[int, tuple[int, float]] = {}  # device -> (window number, closing term) in the open aggregate
        self._clear()

    def _clear(self) -> None:
        self._covered_s = 0.0  # summed window durations, all devices
        self._measured = 0.0
        self._pred_p = 0.0
        self._pred_d = 0.0
        self._steps = 0
        self._rows = 0.0
        self._n = 0
        self._split_j = 0.0
        self._var: dict[int, float] = {}
        self._last = {}

    def add(self, device: int, window_no: int, t_open: float, t_close: float, busy_j: float,
            eps_open_j: float, eps_close_j: float, split_j: float, predicted_prefill_j: float,
            predicted_decode_j: float, steps: int, rows: float) -> None:
        """One closed window of ``device`` (its ``window_no``-th) with work: its busy energy, the
        boundary error scales of its busy energy at its opening and closing reads, its busy/idle
        split error, its steps' predicted energy (this device's share) and their rows."""
        v = self._var.get(device, 0.0)
        last = self._last.get(device)
        if last is not None and last[0] == window_no - 1:
            v -= last[1] * last[1]  # an interior boundary: energy moved across it is still inside
        elif eps_open_j == eps_open_j:  # not NaN
            v += eps_open_j * eps_open_j
        v += eps_close_j * eps_close_j  # provisional: removed if the next window joins
        self._var[device] = v if v > 0.0 else 0.0
        self._last[device] = (window_no, eps_close_j)
        self._covered_s += t_close - t_open
        self._measured += busy_j
        self._pred_p += predicted_prefill_j
        self._pred_d += predicted_decode_j
        self._steps += steps
        self._rows += rows
        self._split_j += split_j
        self._n += 1
        if self._covered_s >= self.min_span_s * len(self._var):
            self._emit()

    def skip(self, device: int) -> None:
        """A window of ``device`` that cannot be used (unpredicted steps): the next one's opening
        boundary is not interior."""
        self.skipped += 1
        self._last.pop(device, None)

    def _emit(self) -> None:
        u = sum(math.sqrt(v) for v in self._var.values()) + self._split_j
        obs = WindowObservation(
            measured_j=self._measured, uncertainty_j=u, predicted_prefill_j=self._pred_p,
            predicted_decode_j=self._pred_d, batch=self._rows / self._steps if self._steps else 0.0,
            span_s=self._covered_s / len(self._var), windows=self._n)
        if len(self.out) == self.out.maxlen:
            self.dropped += 1
        self.out.append(obs)
        self.emitted += 1
        self._clear()

    def pop(self, max_n: int = MAX_PER_MESSAGE) -> list[WindowObservation]:
        """Up to ``max_n`` observations, oldest first (the rest wait for the next call)."""
        out = self.out
        n = min(max_n, len(out))
        return [out.popleft() for _ in range(n)]

    @property
    def waiting(self) -> int:
        return len(self.out)


def observe_windows(calibrator: Any, payload: Any) -> tuple[int, int]:
    """Feed the ``windows`` object of an engine message to ``calibrator.observe_window``.

    Returns (learnt from, not learnt from). The calibrator counts its own refusals (source,
    uncertainty, non-positive values); a row that is not 7 numbers is counted here as
    ``window:malformed``, and rows priced by another predictor than the calibrator's
    (``payload["predictor"]`` != ``calibrator.key.predictor``) as ``window:other_predictor``, in
    ``calibrator.rejected``. Never raises for bad input.
    """
    if not isinstance(payload, dict):
        return 0, 0
    source = payload.get("source")
    rows = payload.get("rows")
    if not isinstance(rows, list):
        return 0, 0
    if payload.get("predictor") != calibrator.key.predictor:
        for _ in rows:
            calibrator.count_rejected("window:other_predictor")
        return 0, len(rows)
    ok = bad = 0
    observe = calibrator.observe_window
    for row in rows:
        try:
            measured, unc, pre, dec, batch = (float(x) for x in row[:5])
            if len(row) != 7:
                raise ValueError(len(row))
        except (TypeError, ValueError, IndexError):
            calibrator.count_rejected("window:malformed")
            bad += 1
            continue
        if observe(measured_j=measured, predicted_prefill_j=pre, predicted_decode_j=dec, batch=batch,
                   source=str(source), uncertainty_j=unc):
            ok += 1
        else:
            bad += 1
    return ok, bad
