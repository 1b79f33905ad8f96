"""The plugin's metrics on the ``/metrics`` endpoint vLLM already serves (Prometheus).

vLLM sets up no OpenTelemetry meter provider, but it serves ``/metrics`` from prometheus_client:
the default registry with one API server, and with ``--api-server-count`` > 1 a fresh registry
over a :class:`prometheus_client.multiprocess.MultiProcessCollector` that reads
``PROMETHEUS_MULTIPROC_DIR`` (vLLM's ``v1/metrics/prometheus.py``: ``setup_multiprocess_prometheus``
sets the variable before the API servers start, ``get_prometheus_registry`` picks the registry).
Instruments made here with prometheus_client therefore land on that endpoint in both modes:
prometheus_client picks its file-backed values when the variable is set at import, counters and
histograms add up over the processes, and gauges say how to combine (``multiprocess_mode``).

Everything is recorded in the API-server process (:class:`~llmco2_serve.runtime.service.EnergyService`:
predictions when a request arrives, measured final values and the engines' books when the engine's
finals arrive). One job here: the instruments (:data:`SPECS`, whose names the dashboard's check
reads) and the functions that record into them. prometheus_client is imported lazily: without it
:func:`process_metrics` returns None and the core still imports.

Names follow Prometheus conventions: base units in the name (joules, grams), ``_total`` on
counters (prometheus_client appends it), and vLLM's ``model_name`` label so that dashboards can
join with the ``vllm:*`` series.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from llmco2_serve.runtime.telemetry import RELATIVE_ERROR_BUCKETS

logger = logging.getLogger(__name__)

__all__ = ["MetricSpec", "SPECS", "FOREIGN_SPECS", "PrometheusMetrics", "available", "process_metrics",
           "exported_series", "exported_metric_names"]


@dataclass(frozen=True)
class MetricSpec:
    """One instrument: ``name`` as given to prometheus_client (counters get ``_total`` appended),
    ``kind`` counter | gauge | histogram, its help text and label names."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    # Gauges only: how the multiprocess collector combines the API servers' values.
    multiprocess_mode: str = "mostrecent"

    def series(self) -> tuple[str, ...]:
        """The sample names this instrument exposes (what PromQL selects)."""
        if self.kind == "counter":
            return (self.name + "_total",)
        if self.kind == "histogram":
            return tuple(self.name + s for s in ("_bucket", "_sum", "_count"))
        return (self.name,)


ENERGY: Final = MetricSpec(
    "llmco2_energy_joules", "counter",
    "GPU energy of LLM requests in joules, per phase: kind=predicted when the request arrives, "
    "kind=measured from the energy counters' final value per request",
    ("model_name", "kind", "phase"))
CO2: Final = MetricSpec(
    "llmco2_co2_grams", "counter",
    "Carbon of LLM requests in grams CO2e: scope=operational (energy x PUE x intensity), "
    "scope=embodied (share of the GPUs' manufacturing carbon, predicted only)",
    ("model_name", "kind", "scope"))
REQUESTS: Final = MetricSpec(
    "llmco2_requests", "counter",
    "Requests counted into llmco2_energy_joules_total: kind=predicted (predictions made), "
    "kind=measured (final measured values, aborted requests too)",
    ("model_name", "kind"))
GPU_ENERGY: Final = MetricSpec(
    "llmco2_gpu_energy_joules", "counter",
    "Energy counters' total per GPU in joules (engine:device); measured + idle + unreported = this",
    ("model_name", "gpu"))
IDLE_ENERGY: Final = MetricSpec(
    "llmco2_idle_energy_joules", "counter",
    "Energy in joules counted while no request ran, per GPU (engine:device)",
    ("model_name", "gpu"))
UNREPORTED_ENERGY: Final = MetricSpec(
    "llmco2_unreported_energy_joules", "counter",
    "Energy in joules of work done for requests whose value was already reported (async scheduling)",
    ("model_name",))
RELATIVE_ERROR: Final = MetricSpec(
    "llmco2_prediction_relative_error", "histogram",
    "|predicted - measured| / measured energy per finished request (phase prefill, decode, total); "
    "direction over|under is the sign. Buckets 0.1 and 0.3 give EBA(10%) and EBA(30%)",
    ("model_name", "phase", "direction"), buckets=tuple(RELATIVE_ERROR_BUCKETS))
INTENSITY: Final = MetricSpec(
    "llmco2_carbon_intensity_grams_per_kwh", "gauge",
    "Grid carbon intensity in use, gCO2e per kWh, and where it comes from (source)",
    ("model_name", "source"))
PUE: Final = MetricSpec(
    "llmco2_pue_ratio", "gauge", "Data-centre power usage effectiveness applied to measured energy",
    ("model_name",))
CALIBRATION_FACTOR: Final = MetricSpec(
    "llmco2_calibration_factor_ratio", "gauge",
    "This deployment's learnt correction of the GNN's prediction per phase (1 = none)",
    ("model_name", "phase"))
CALIBRATION_OBSERVATIONS: Final = MetricSpec(
    "llmco2_calibration_observations", "gauge",
    "Final measured values the calibration has learnt from (restarts at a deployment change)",
    ("model_name",))
CALIBRATION_OBSERVATIONS_BY_KIND: Final = MetricSpec(
    "llmco2_calibration_observations_by_kind", "gauge",
    "Of those: merged NVML counter windows (kind=window) and finished requests (kind=request)",
    ("model_name", "kind"))
CALIBRATION_ACTIVE: Final = MetricSpec(
    "llmco2_calibration_active", "gauge", "1 when the calibration is applied to predictions", ("model_name",))
FAILURES: Final = MetricSpec(
    "llmco2_plugin_failures", "counter",
    "Failures of the plugin's vLLM patches (fail-open: vLLM carried on without the plugin for that call)",
    ("patch",))

SPECS: Final = (ENERGY, CO2, REQUESTS, GPU_ENERGY, IDLE_ENERGY, UNREPORTED_ENERGY, RELATIVE_ERROR,
                INTENSITY, PUE, CALIBRATION_FACTOR, CALIBRATION_OBSERVATIONS,
                CALIBRATION_OBSERVATIONS_BY_KIND, CALIBRATION_ACTIVE, FAILURES)

# Made by another part of the plugin in the same process (admission control creates it with
# prometheus_client itself); listed so the dashboard may query it. Not instantiated here.
FOREIGN_SPECS: Final = (
    MetricSpec("llmco2_admission_decisions", "counter", "Admission control's decisions per request",
               ("decision", "reason")),
)

# Gauges of the service's state are re-read at most this often (calibrator.state() sorts its errors).
_STATE_INTERVAL_S: Final = 1.0


def exported_series(include_foreign: bool = True) -> frozenset[str]:
    """Every sample name the plugin puts on ``/metrics`` (from :data:`SPECS`)."""
    specs = SPECS + (FOREIGN_SPECS if include_foreign else ())
    return frozenset(s for spec in specs for s in spec.series())


def exported_metric_names() -> frozenset[str]:
    """Metric family names (without ``_total`` / ``_bucket`` ...)."""
    return frozenset(s.name for s in SPECS + FOREIGN_SPECS)


def available() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _finite_non_negative(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) and x >= 0 else None


class PrometheusMetrics:
    """The instruments of :data:`SPECS` on ``registry`` (default: prometheus_client's global one,
    which is what vLLM serves with one API server; in multiprocess mode the values go to
    ``PROMETHEUS_MULTIPROC_DIR`` whatever the registry). Recording never raises for a bad value:
    it is skipped (telemetry must not break accounting)."""

    def __init__(self, registry: Any = None) -> None:
        import prometheus_client as pc

        kw = {} if registry is None else {"registry": registry}
        self._m: dict[str, Any] = {}
        for spec in SPECS:
            if spec.kind == "counter":
                self._m[spec.name] = pc.Counter(spec.name, spec.help, spec.labels, **kw)
            elif spec.kind == "histogram":
                self._m[spec.name] = pc.Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, **kw)
            else:
                self._m[spec.name] = pc.Gauge(spec.name, spec.help, spec.labels,
                                              multiprocess_mode=spec.multiprocess_mode, **kw)
        self._lock = threading.Lock()
        self._failures_seen: dict[str, int] = {}
        self._intensity_labels: tuple[str, str] | None = None
        self._state_at = -math.inf
        self._touched: set[str] = set()
        self._children: dict[tuple[str, ...], Any] = {}  # (series, *label values) -> child (_child)

    def _child(self, name: str, labels: dict[str, str]) -> Any:
        # A series' child object, cached by its label values (every call site passes its labels in
        # one fixed order): prometheus_client's labels() takes a lock and validates each time,
        # several microseconds per call, and a finished request updates half a dozen series.
        key = (name, *labels.values())
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._m[name].labels(**labels)
        return child

    def _add(self, spec: MetricSpec, value: Any, **labels: str) -> None:
        v = _finite_non_negative(value)
        if v is not None:
            self._child(spec.name, labels).inc(v)

    # ------------------------------------------------------------------ per request (sums)
    def record_predicted(self, *, model: str, requests: int, prefill_energy_j: float, decode_energy_j: float,
                         operational_co2_g: float, embodied_co2_g: float) -> None:
        """Predictions of ``requests`` requests (summed by the caller)."""
        self._add(ENERGY, prefill_energy_j, model_name=model, kind="predicted", phase="prefill")
        self._add(ENERGY, decode_energy_j, model_name=model, kind="predicted", phase="decode")
        self._add(CO2, operational_co2_g, model_name=model, kind="predicted", scope="operational")
        self._add(CO2, embodied_co2_g, model_name=model, kind="predicted", scope="embodied")
        self._add(REQUESTS, requests, model_name=model, kind="predicted")

    def record_measured(self, *, model: str, prefill_energy_j: float, decode_energy_j: float,
                        operational_co2_g: float, relative_errors: Mapping[str, float] | None = None,
                        requests: int = 1) -> None:
        """Final measured values: the energy and CO2 of ``requests`` requests (their sums), and
        one request's ``relative_errors`` (:meth:`record_relative_errors`), if given."""
        self._add(ENERGY, prefill_energy_j, model_name=model, kind="measured", phase="prefill")
        self._add(ENERGY, decode_energy_j, model_name=model, kind="measured", phase="decode")
        self._add(CO2, operational_co2_g, model_name=model, kind="measured", scope="operational")
        self._add(REQUESTS, requests, model_name=model, kind="measured")
        if relative_errors:
            self.record_relative_errors(model=model, relative_errors=relative_errors)

    def record_relative_errors(self, *, model: str, relative_errors: Mapping[str, float]) -> None:
        """One request's signed (predicted - measured) / measured per phase (prefill, decode,
        total), as the OTel instruments computed them."""
        for phase, err in relative_errors.items():
            if isinstance(err, (int, float)) and math.isfinite(err):
                direction = "over" if err > 0 else "under" if err < 0 else "exact"
                self._child(RELATIVE_ERROR.name,
                            {"model_name": model, "phase": phase, "direction": direction}).observe(abs(err))

    def record_gpu_energy(self, *, model: str, gpu: str, kind: str, energy_j: float) -> None:
        """A delta of the engines' books: ``kind`` total | idle | unreported (``gpu`` ignored for
        unreported, which the engine keeps for all its GPUs together)."""
        if kind == "total":
            self._add(GPU_ENERGY, energy_j, model_name=model, gpu=gpu)
        elif kind == "idle":
            self._add(IDLE_ENERGY, energy_j, model_name=model, gpu=gpu)
        elif kind == "unreported":
            self._add(UNREPORTED_ENERGY, energy_j, model_name=model)

    # ------------------------------------------------------------------ state gauges
    def set_carbon_intensity(self, *, model: str, g_per_kwh: float, source: str, pue: float | None = None) -> None:
        gauge = self._m[INTENSITY.name]
        labels = (model, source)
        with self._lock:
            if self._intensity_labels is not None and self._intensity_labels != labels:
                try:  # one series: the source in use now (a stale one would sum or mislead)
                    gauge.remove(*self._intensity_labels)
                except KeyError:
                    pass
            self._intensity_labels = labels
        v = _finite_non_negative(g_per_kwh)
        if v is not None:
            gauge.labels(model_name=model, source=source).set(v)
        p = _finite_non_negative(pue)
        if p is not None:
            self._m[PUE.name].labels(model_name=model).set(p)

    def set_calibration(self, *, model: str, state: Mapping[str, Any]) -> None:
        """From :meth:`Calibrator.state`."""
        for phase in ("prefill", "decode"):
            f = _finite_non_negative(state.get(f"{phase}_factor"))
            if f is not None:
                self._m[CALIBRATION_FACTOR.name].labels(model_name=model, phase=phase).set(f)
        obs = _finite_non_negative(state.get("observations"))
        if obs is not None:
            self._m[CALIBRATION_OBSERVATIONS.name].labels(model_name=model).set(obs)
        for kind, n in (state.get("by_kind") or {}).items():
            n = _finite_non_negative(n)
            if n is not None:
                self._m[CALIBRATION_OBSERVATIONS_BY_KIND.name].labels(model_name=model, kind=str(kind)).set(n)
        self._m[CALIBRATION_ACTIVE.name].labels(model_name=model).set(1.0 if state.get("active") else 0.0)

    def observe_service(self, svc: Any, *, force: bool = False) -> None:
        """Carbon intensity and calibration gauges from an EnergyService (at most once a second
        unless ``force``). The intensity is ``svc.carbon_intensity_now()`` -> (g/kWh, source)
        where the service has time-varying sources, else its static setting."""
        now = time.monotonic()
        with self._lock:
            if not force and now - self._state_at < _STATE_INTERVAL_S:
                return
            self._state_at = now
        model = str(svc.model.model_name or "unknown")
        self._touch(model)
        now_fn = getattr(svc, "carbon_intensity_now", None)
        if callable(now_fn):
            g, source = now_fn()
        else:
            g, source = svc.settings.intensity_g_per_kwh, "static"
        self.set_carbon_intensity(model=model, g_per_kwh=g, source=str(source), pue=svc.settings.pue)
        cal = getattr(svc, "calibrator", None)
        if cal is not None:
            self.set_calibration(model=model, state=cal.state())

    def _touch(self, model: str) -> None:
        """Make each counter's series for ``model`` exist at 0 (once), so that a dashboard shows 0
        and ``rate()`` counts from the start instead of a gap until the first increment."""
        with self._lock:
            if model in self._touched:
                return
            self._touched.add(model)
        for kind in ("predicted", "measured"):
            for phase in ("prefill", "decode"):
                self._m[ENERGY.name].labels(model_name=model, kind=kind, phase=phase)
            self._m[REQUESTS.name].labels(model_name=model, kind=kind)
        for kind, scope in (("predicted", "operational"), ("predicted", "embodied"), ("measured", "operational")):
            self._m[CO2.name].labels(model_name=model, kind=kind, scope=scope)
        self._m[UNREPORTED_ENERGY.name].labels(model_name=model)

    def record_failures(self, failures: Mapping[str, int]) -> None:
        """Bring ``llmco2_plugin_failures_total{patch}`` up to the ledger's cumulative counts (a
        patch given with 0 gets its series at 0, so that ``increase()`` sees its first failure)."""
        counter = self._m[FAILURES.name]
        with self._lock:
            for patch, n in failures.items():
                child = counter.labels(patch=str(patch))
                delta = int(n) - self._failures_seen.get(patch, 0)
                if delta > 0:
                    child.inc(delta)
                    self._failures_seen[patch] = int(n)


_PROCESS: tuple[int, PrometheusMetrics | None] | None = None
_PROCESS_LOCK = threading.Lock()


def process_metrics() -> PrometheusMetrics | None:
    """This process's instruments on the default registry, made once per process (a registry
    refuses a name twice; a forked child makes its own). None without prometheus_client or when
    they cannot be made (logged once; the plugin carries on without them)."""
    global _PROCESS
    pid = os.getpid()
    with _PROCESS_LOCK:
        if _PROCESS is None or _PROCESS[0] != pid:
            made: PrometheusMetrics | None = None
            if available():
                try:
                    made = PrometheusMetrics()
                except Exception as e:  # noqa: BLE001 - fail-open: metrics never stop serving
                    logger.warning("llmco2: no Prometheus metrics on /metrics: %s: %s", type(e).__name__, e)
            else:
                logger.info("llmco2: prometheus_client is not installed; no llmco2 series on /metrics")
            _PROCESS = (pid, made)
        return _PROCESS[1]
