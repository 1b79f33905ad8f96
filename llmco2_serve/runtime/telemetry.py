"""OpenTelemetry output of llmco2-serve: attribute names, pure attribute builders, metrics,
request spans, and provider set-up for processes that have none.

Inside someone else's server (vLLM) this module only *uses* the host's providers
(``trace.get_tracer`` / ``metrics.get_meter``); it never installs a global provider.
:func:`configure_otel` builds private providers for a signal only while the host has not
configured one, and returns them as :class:`OtelHandles` instead of making them global.

Units: energies in joules (``_j``), CO2 in grams (``_g``), times in seconds (``_s``) or
nanoseconds since the epoch (``_ns``), carbon intensity in gCO2/kWh.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmco2_serve import __version__

_logger = logging.getLogger(__name__)

AttributeValue = str | bool | int | float

# --- attribute names (exact strings are part of the public contract) --------------------

PREDICTED_PREFILL_ENERGY_J: Final = "llmco2.predicted.prefill_energy_j"
PREDICTED_DECODE_ENERGY_J: Final = "llmco2.predicted.decode_energy_j"
PREDICTED_ENERGY_J: Final = "llmco2.predicted.energy_j"
PREDICTED_CO2_G: Final = "llmco2.predicted.co2_g"
PREDICTED_GEN_TOKENS: Final = "llmco2.predicted.gen_tokens"
PREDICTED_ENERGY_J_UPPER: Final = "llmco2.predicted.energy_j_upper"  # at max_tokens
PREDICTED_TIME_S: Final = "llmco2.predicted.time_s"

MEASURED_PREFILL_ENERGY_J: Final = "llmco2.measured.prefill_energy_j"
MEASURED_DECODE_ENERGY_J: Final = "llmco2.measured.decode_energy_j"
MEASURED_ENERGY_J: Final = "llmco2.measured.energy_j"
MEASURED_CO2_G: Final = "llmco2.measured.co2_g"
MEASURED_SOURCE: Final = "llmco2.measured.source"
MEASURED_UNCERTAINTY_J: Final = "llmco2.measured.uncertainty_j"

CARBON_INTENSITY_G_PER_KWH: Final = "llmco2.carbon_intensity_g_per_kwh"
# Grid intensity at the time the energy was spent (carbon/intensity.py): the prediction's at
# admission, the measurement's at finish; the source of the latest one used (static, codecarbon,
# file, electricitymaps, electricitymaps-cached, static-fallback, ...).
PREDICTED_CARBON_INTENSITY_G_PER_KWH: Final = "llmco2.predicted.carbon_intensity_g_per_kwh"
PREDICTED_CARBON_INTENSITY_SOURCE: Final = "llmco2.predicted.carbon_intensity_source"
MEASURED_CARBON_INTENSITY_G_PER_KWH: Final = "llmco2.measured.carbon_intensity_g_per_kwh"
CARBON_INTENSITY_SOURCE: Final = "llmco2.carbon_intensity.source"
PUE: Final = "llmco2.pue"
GPU: Final = "llmco2.gpu"
N_GPU: Final = "llmco2.n_gpu"
GPU_SOURCE: Final = "llmco2.gpu.source"
MODEL: Final = "llmco2.model"
PREDICTOR: Final = "llmco2.predictor"
GEN_AI_REQUEST_ID: Final = "gen_ai.request.id"

MEASURED_SOURCE_UNAVAILABLE: Final = "unavailable"
GPU_SOURCES: Final = ("detected", "configured")

TRACER_NAME: Final = "llmco2_serve"
METER_NAME: Final = "llmco2_serve"
SPAN_NAME_REQUEST: Final = "llmco2.request"

METRIC_ENERGY: Final = "llmco2.energy"
METRIC_CO2: Final = "llmco2.co2"
METRIC_RELATIVE_ERROR: Final = "llmco2.prediction.relative_error"
METRIC_GPU_ENERGY: Final = "llmco2.gpu.energy"
# OTel histograms drop negative values, so the histogram holds |relative error| and the
# sign goes into a "direction" attribute. Bounds 0.05/0.1/0.3 give the paper's EBA(5 %,
# 10 %, 30 %) straight from the bucket counts, and sum/count gives its MAPE (Sec. 5).
RELATIVE_ERROR_BUCKETS: Final = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)

# Caller sums may come from float32 tensors; anything looser than this is a real mismatch.
_SUM_REL_TOL: Final = 1e-6
_SUM_ABS_TOL_J: Final = 1e-9


# --- validation helpers -------------------------------------------------------------------


# Called about ten times per finished request: a plain float (what the plugin passes) is checked
# without numbers.Real's isinstance, which goes through ABCMeta.__instancecheck__ (microseconds).
def _is_missing(value: object) -> bool:
    if type(value) is float:
        return value != value  # NaN
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def _non_negative(name: str, value: object) -> float:
    if type(value) is float and value >= 0.0 and value != math.inf:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {number!r}")
    return number


def _optional_non_negative(name: str, value: object) -> float | None:
    return None if _is_missing(value) else _non_negative(name, value)


def _non_empty_str(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _check_energy_sum(prefix: str, energy_j: float, prefill_energy_j: float, decode_energy_j: float) -> None:
    expected = prefill_energy_j + decode_energy_j
    if not math.isclose(energy_j, expected, rel_tol=_SUM_REL_TOL, abs_tol=_SUM_ABS_TOL_J):
        raise ValueError(
            f"{prefix}energy_j={energy_j!r} is not prefill_energy_j + decode_energy_j "
            f"= {prefill_energy_j!r} + {decode_energy_j!r} = {expected!r}"
        )


# --- pure attribute builders ---------------------------------------------------------------


def predicted_attributes(
    *,
    prefill_energy_j: float,
    decode_energy_j: float,
    energy_j: float,
    co2_g: float,
    gen_tokens: int,
    energy_j_upper: float | None = None,
    time_s: float | None = None,
) -> dict[str, AttributeValue]:
    """Span attributes for a prediction made before scheduling.

    ``energy_j`` must equal ``prefill_energy_j + decode_energy_j`` (the caller sums);
    ``energy_j_upper`` is the energy if generation runs to ``max_tokens`` and may not be
    below ``energy_j``. Optional values that are None are left out.
    """
    prefill = _non_negative("prefill_energy_j", prefill_energy_j)
    decode = _non_negative("decode_energy_j", decode_energy_j)
    total = _non_negative("energy_j", energy_j)
    _check_energy_sum("predicted ", total, prefill, decode)
    if isinstance(gen_tokens, bool) or not isinstance(gen_tokens, numbers.Integral) or gen_tokens < 0:
        raise ValueError(f"gen_tokens must be an int >= 0, got {gen_tokens!r}")
    attributes: dict[str, AttributeValue] = {
        PREDICTED_PREFILL_ENERGY_J: prefill,
        PREDICTED_DECODE_ENERGY_J: decode,
        PREDICTED_ENERGY_J: total,
        PREDICTED_CO2_G: _non_negative("co2_g", co2_g),
        PREDICTED_GEN_TOKENS: int(gen_tokens),
    }
    if energy_j_upper is not None:
        upper = _non_negative("energy_j_upper", energy_j_upper)
        if upper < total and not math.isclose(upper, total, rel_tol=_SUM_REL_TOL, abs_tol=_SUM_ABS_TOL_J):
            raise ValueError(f"energy_j_upper={upper!r} is below energy_j={total!r}")
        attributes[PREDICTED_ENERGY_J_UPPER] = upper
    if time_s is not None:
        attributes[PREDICTED_TIME_S] = _non_negative("time_s", time_s)
    return attributes


def measured_attributes(
    *,
    prefill_energy_j: float | None,
    decode_energy_j: float | None,
    energy_j: float | None,
    co2_g: float | None,
    source: str,
    uncertainty_j: float | None,
) -> dict[str, AttributeValue]:
    """Span attributes for what was measured while the request ran.

    None or NaN values (nothing measured) are left out; ``source`` is always present
    (e.g. "nvml", or ``MEASURED_SOURCE_UNAVAILABLE``). When all three energies are known,
    ``energy_j`` must equal ``prefill_energy_j + decode_energy_j``.
    """
    attributes: dict[str, AttributeValue] = {MEASURED_SOURCE: _non_empty_str("source", source)}
    known: dict[str, float] = {}
    for name, key, value in (
        ("prefill_energy_j", MEASURED_PREFILL_ENERGY_J, prefill_energy_j),
        ("decode_energy_j", MEASURED_DECODE_ENERGY_J, decode_energy_j),
        ("energy_j", MEASURED_ENERGY_J, energy_j),
        ("co2_g", MEASURED_CO2_G, co2_g),
        ("uncertainty_j", MEASURED_UNCERTAINTY_J, uncertainty_j),
    ):
        number = _optional_non_negative(name, value)
        if number is not None:
            known[name] = attributes[key] = number
    if {"prefill_energy_j", "decode_energy_j", "energy_j"} <= known.keys():
        _check_energy_sum("measured ", known["energy_j"], known["prefill_energy_j"], known["decode_energy_j"])
    return attributes


def context_attributes(
    *,
    gpu: str,
    n_gpu: int,
    gpu_source: str,
    intensity_g_per_kwh: float,
    pue: float,
    model: str,
    predictor: str | None = None,
) -> dict[str, AttributeValue]:
    """Span attributes that say under which assumptions the numbers were computed.

    ``gpu_source`` is "detected" (read from the device) or "configured" (set by the
    operator); ``pue`` (power usage effectiveness) is >= 1 by definition.
    """
    if isinstance(n_gpu, bool) or not isinstance(n_gpu, numbers.Integral) or n_gpu < 1:
        raise ValueError(f"n_gpu must be an int >= 1, got {n_gpu!r}")
    if gpu_source not in GPU_SOURCES:
        raise ValueError(f"gpu_source must be one of {GPU_SOURCES}, got {gpu_source!r}")
    pue_value = _non_negative("pue", pue)
    if pue_value < 1.0:
        raise ValueError(f"pue must be >= 1, got {pue_value!r}")
    attributes: dict[str, AttributeValue] = {
        GPU: _non_empty_str("gpu", gpu),
        N_GPU: int(n_gpu),
        GPU_SOURCE: gpu_source,
        CARBON_INTENSITY_G_PER_KWH: _non_negative("intensity_g_per_kwh", intensity_g_per_kwh),
        PUE: pue_value,
        MODEL: _non_empty_str("model", model),
    }
    if predictor is not None:
        attributes[PREDICTOR] = _non_empty_str("predictor", predictor)
    return attributes


def relative_error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured, dimensionless; ``measured`` must be > 0."""
    if not measured > 0:
        raise ValueError(f"measured must be > 0 for a relative error, got {measured!r}")
    return (predicted - measured) / measured


def error_direction(relative_error_value: float) -> str:
    """"over" when the prediction was above the measurement, "under" below, else "exact"."""
    if relative_error_value > 0:
        return "over"
    if relative_error_value < 0:
        return "under"
    return "exact"


# --- metrics ---------------------------------------------------------------------------------


class EnergyMetrics:
    """Counters of predicted and measured energy / CO2, and the prediction's relative error.

    Instruments (created on the given meter; by default the host's global meter provider):

    - ``llmco2.energy`` (counter, J), attributes ``model``, ``phase`` (prefill|decode),
      ``kind`` (predicted|measured), ``source`` (predictor name or measurement source);
    - ``llmco2.co2`` (counter, g), attributes ``model``, ``kind``, ``source``;
    - ``llmco2.prediction.relative_error`` (histogram, 1), attributes ``model``,
      ``phase`` (prefill|decode|total), ``direction`` (over|under|exact); value
      |predicted - measured| / measured (OTel histograms take no negative values; the
      sign of (predicted - measured) / measured is the direction).
    """

    def __init__(self, meter: metrics.Meter | None = None) -> None:
        meter = meter if meter is not None else metrics.get_meter(METER_NAME, __version__)
        self._energy_j = meter.create_counter(
            METRIC_ENERGY, unit="J", description="GPU energy of LLM requests per phase, predicted and measured"
        )
        self._co2_g = meter.create_counter(
            METRIC_CO2, unit="g", description="CO2 of LLM requests, predicted and measured"
        )
        self._gpu_energy_j = meter.create_counter(
            METRIC_GPU_ENERGY, unit="J",
            description="Energy counters' total per GPU, and the parts given to no request (idle, unreported)")
        self._relative_error = meter.create_histogram(
            METRIC_RELATIVE_ERROR,
            unit="1",
            description="|predicted - measured| / measured energy of LLM requests; sign in 'direction'",
            explicit_bucket_boundaries_advisory=RELATIVE_ERROR_BUCKETS,
        )

    def record_gpu_energy(self, *, gpu: str, kind: str, energy_j: float) -> None:
        """Add to the engines' energy books: ``kind`` total (the counters' delta), idle (given to
        no request) or unreported (work of requests already delivered). With the measured request
        energy they close: measured + idle + unreported == total."""
        self._gpu_energy_j.add(_non_negative("energy_j", energy_j), {"gpu": _non_empty_str("gpu", gpu),
                                                                      "kind": _non_empty_str("kind", kind)})

    def record_predicted(
        self,
        *,
        model: str,
        predictor: str,
        prefill_energy_j: float,
        decode_energy_j: float,
        co2_g: float,
    ) -> None:
        """Add one request's predicted energy (per phase) and CO2."""
        base = {
            "model": _non_empty_str("model", model),
            "kind": "predicted",
            "source": _non_empty_str("predictor", predictor),
        }
        prefill = _non_negative("prefill_energy_j", prefill_energy_j)
        decode = _non_negative("decode_energy_j", decode_energy_j)
        co2 = _non_negative("co2_g", co2_g)
        self._energy_j.add(prefill, {**base, "phase": "prefill"})
        self._energy_j.add(decode, {**base, "phase": "decode"})
        self._co2_g.add(co2, base)

    def record_measured(
        self,
        *,
        model: str,
        source: str,
        prefill_energy_j: float | None,
        decode_energy_j: float | None,
        co2_g: float | None,
        predicted_prefill_energy_j: float | None = None,
        predicted_decode_energy_j: float | None = None,
    ) -> dict[str, float]:
        """Add one request's measured energy and CO2 (None/NaN: not measured, skipped).

        Records the relative error for every phase whose prediction and measurement are
        both known with measured > 0, and for "total" when both phases are; returns those
        signed errors, (predicted - measured) / measured, keyed by phase. The API server adds
        the energy and CO2 of an engine message's final values in one call, as their sum (the
        counters are cumulative, so the exported totals are the same), and their relative errors
        one by one (:meth:`record_relative_errors`).
        """
        model = _non_empty_str("model", model)
        base = {"model": model, "kind": "measured", "source": _non_empty_str("source", source)}
        measured = {
            "prefill": _optional_non_negative("prefill_energy_j", prefill_energy_j),
            "decode": _optional_non_negative("decode_energy_j", decode_energy_j),
        }
        predicted = {
            "prefill": _optional_non_negative("predicted_prefill_energy_j", predicted_prefill_energy_j),
            "decode": _optional_non_negative("predicted_decode_energy_j", predicted_decode_energy_j),
        }
        co2 = _optional_non_negative("co2_g", co2_g)

        for phase, energy in measured.items():
            if energy is not None:
                self._energy_j.add(energy, {**base, "phase": phase})
        if co2 is not None:
            self._co2_g.add(co2, base)

        return self.record_relative_errors(
            model=model, predicted_prefill_energy_j=predicted["prefill"], predicted_decode_energy_j=predicted["decode"],
            prefill_energy_j=measured["prefill"], decode_energy_j=measured["decode"])

    def record_relative_errors(self, *, model: str, predicted_prefill_energy_j: float | None,
                               predicted_decode_energy_j: float | None, prefill_energy_j: float | None,
                               decode_energy_j: float | None) -> dict[str, float]:
        """The relative-error part of :meth:`record_measured`, without its checks: for values the
        caller knows are finite and >= 0 (None: unknown), as the API server's final values are
        (several microseconds less per finished request). Records the error of every phase whose
        prediction and measurement are both known with measured > 0, and of "total" when both
        phases are known; returns the signed errors by phase."""
        errors: dict[str, float] = {}
        record = self._relative_error.record
        p_pre, m_pre, p_dec, m_dec = predicted_prefill_energy_j, prefill_energy_j, predicted_decode_energy_j, decode_energy_j
        pre_known = p_pre is not None and m_pre is not None
        dec_known = p_dec is not None and m_dec is not None
        for phase, known, p, m in (("prefill", pre_known, p_pre, m_pre), ("decode", dec_known, p_dec, m_dec),
                                   ("total", pre_known and dec_known,
                                    (p_pre or 0.0) + (p_dec or 0.0), (m_pre or 0.0) + (m_dec or 0.0))):
            if known and m > 0:
                error = errors[phase] = (p - m) / m
                record(abs(error), {"model": model, "phase": phase, "direction": error_direction(error)})
        return errors


# --- request spans ---------------------------------------------------------------------------

_PROPAGATOR: Final = TraceContextTextMapPropagator()


def emit_request_span(
    tracer: trace.Tracer,
    *,
    name: str = SPAN_NAME_REQUEST,
    request_id: str,
    traceparent: str | None,
    start_time_ns: int,
    end_time_ns: int,
    attributes: Mapping[str, AttributeValue],
    tracestate: str | None = None,
) -> trace.Span:
    """Record a finished request as one span, in the caller's trace when it sent one.

    ``traceparent`` / ``tracestate`` are the W3C headers of the incoming HTTP request; the
    span becomes a child of that remote span (so a sibling of vLLM's own request span). With
    no or an invalid header the span starts a new trace; it never attaches to whatever span
    is current in the calling thread. Note: a traceparent with the sampled flag off (``-00``)
    makes the default ParentBased sampler drop the span. Returns the ended span.
    """
    _non_empty_str("request_id", request_id)
    if end_time_ns < start_time_ns:
        raise ValueError(f"end_time_ns={end_time_ns} is before start_time_ns={start_time_ns}")
    carrier: dict[str, str] = {}
    if traceparent:
        carrier["traceparent"] = traceparent
        if tracestate:
            carrier["tracestate"] = tracestate
    parent = _PROPAGATOR.extract(carrier, context=Context())
    span = tracer.start_span(
        name,
        context=parent,
        kind=SpanKind.INTERNAL,
        attributes={**attributes, GEN_AI_REQUEST_ID: request_id},
        start_time=start_time_ns,
    )
    span.end(end_time=end_time_ns)
    return span


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    """A finished SDK span as a plain dict, same keys as ``OtlpReceiver.spans()``."""
    context = span.get_span_context()
    attributes = {k: list(v) if isinstance(v, tuple) else v for k, v in (span.attributes or {}).items()}
    resource = {k: list(v) if isinstance(v, tuple) else v for k, v in span.resource.attributes.items()}
    return {
        "trace_id": format_trace_id(context.trace_id),
        "span_id": format_span_id(context.span_id),
        "parent_span_id": format_span_id(span.parent.span_id) if span.parent is not None else None,
        "name": span.name,
        "kind": span.kind.name.lower(),
        "start_time_unix_nano": span.start_time,
        "end_time_unix_nano": span.end_time,
        "attributes": attributes,
        "status_code": span.status.status_code.name.lower(),
        "status_message": span.status.description or "",
        "resource": resource,
        "scope": span.instrumentation_scope.name if span.instrumentation_scope is not None else "",
    }


class FileSpanExporter(SpanExporter):
    """Append each finished span to ``path`` as one JSON line (see :func:`span_to_dict`).

    Meant to sit behind a BatchSpanProcessor, so file I/O stays off the request path.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: Any = None
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_to_dict(s), sort_keys=True) + "\n" for s in spans]
        with self._lock:
            if self._closed:
                return SpanExportResult.FAILURE
            try:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = self.path.open("a", encoding="utf-8")
                self._file.writelines(lines)
                self._file.flush()
            except OSError as e:
                _logger.error("cannot write %d span(s) to %s: %s", len(lines), self.path, e)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


# --- providers for processes without a host OTel set-up ---------------------------------------

SignalOwner = Literal["host", "llmco2", "none"]


def host_tracer_provider_configured() -> bool:
    """True once someone has installed a global tracer provider (the API default is a proxy)."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def host_meter_provider_configured() -> bool:
    """True once someone has installed a global meter provider (the API default is a proxy)."""
    # The API exports no public name for its unset default meter provider.
    from opentelemetry.metrics._internal import _ProxyMeterProvider

    return not isinstance(metrics.get_meter_provider(), _ProxyMeterProvider)


class _ShutdownOnceSpanExporter(SpanExporter):
    """Lets OtelHandles abort a stuck exporter early; the processor's own later
    shutdown call then becomes a no-op instead of a warning."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._shut = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export(spans)

    def shutdown(self) -> None:
        with self._lock:
            if self._shut:
                return
            self._shut = True
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _run_bounded(name: str, fn: Callable[[], object], results: dict[str, bool]) -> threading.Thread:
    """Run ``fn`` in a daemon thread; ``results[name]`` says whether it returned truthy/None."""

    def target() -> None:
        try:
            outcome = fn()
        # Deliberate: MeterProvider.shutdown/force_flush raise a bare Exception when a
        # reader fails; a flush that failed must not kill the caller, only be reported.
        except Exception as e:  # noqa: BLE001
            _logger.warning("OpenTelemetry %s failed: %s", name, e)
            results[name] = False
        else:
            results[name] = outcome is None or bool(outcome)

    thread = threading.Thread(target=target, name=f"llmco2-otel-{name}", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class OtelHandles:
    """What :func:`configure_otel` set up. ``*_owner`` says who provides each signal:
    "host" (the process's global provider, left alone), "llmco2" (private providers held
    here) or "none" (the API's proxy: no-op until a host configures a provider)."""

    tracer: trace.Tracer
    meter: metrics.Meter
    traces_owner: SignalOwner
    metrics_owner: SignalOwner
    export_timeout_s: float
    tracer_provider: SdkTracerProvider | None = None
    meter_provider: SdkMeterProvider | None = None
    _span_exporters: tuple[_ShutdownOnceSpanExporter, ...] = field(default=(), repr=False)
    _closed: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)

    def force_flush(self, timeout_s: float | None = None) -> bool:
        """Export what is buffered now; returns False if that did not finish within
        ``timeout_s`` (default: ``export_timeout_s`` + 1 s). Never waits longer."""
        if self._closed.is_set():
            return False
        timeout_s = self.export_timeout_s + 1.0 if timeout_s is None else timeout_s
        jobs: list[tuple[str, Callable[[], object]]] = []
        if self.tracer_provider is not None:
            jobs.append(("traces-flush", self.tracer_provider.force_flush))
        if self.meter_provider is not None:
            meter_provider = self.meter_provider
            jobs.append(("metrics-flush", lambda: meter_provider.force_flush(timeout_millis=timeout_s * 1000)))
        return self._join(jobs, timeout_s)

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Flush and stop the providers this object owns (never the host's).

        Returns within ``timeout_s`` (default: ``export_timeout_s`` + 1 s) even if the
        collector is dead or slow; then returns False and abandons what was not sent.
        Idempotent.
        """
        if self._closed.is_set():
            return True
        self._closed.set()
        timeout_s = self.export_timeout_s + 1.0 if timeout_s is None else timeout_s
        jobs: list[tuple[str, Callable[[], object]]] = []
        if self.tracer_provider is not None:
            jobs.append(("traces-shutdown", self.tracer_provider.shutdown))
        if self.meter_provider is not None:
            meter_provider = self.meter_provider
            jobs.append(("metrics-shutdown", lambda: meter_provider.shutdown(timeout_millis=timeout_s * 1000)))
        done = self._join(jobs, timeout_s)
        if not done:
            # The span processor waits up to 30 s on its worker; shutting the exporters
            # down ends their retry waits, and later batches are refused at once.
            for exporter in self._span_exporters:
                exporter.shutdown()
        return done

    @staticmethod
    def _join(jobs: Sequence[tuple[str, Callable[[], object]]], timeout_s: float) -> bool:
        results: dict[str, bool] = {}
        threads = [_run_bounded(name, fn, results) for name, fn in jobs]
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return all(not t.is_alive() for t in threads) and all(results.get(name, False) for name, _ in jobs)


def _base_endpoint(endpoint: str) -> str:
    base = endpoint.strip().rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"endpoint must be an http(s) URL, got {endpoint!r}")
    if base.endswith(("/v1/traces", "/v1/metrics")):
        raise ValueError(
            f"endpoint must be the collector's base URL (e.g. http://127.0.0.1:4318), got {endpoint!r}; "
            "the /v1/traces and /v1/metrics paths are appended here"
        )
    return base


_SPAN_SCHEDULE_DELAY_MS: Final = 1000


def standard_metrics_endpoint(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(URL, protocol) for metrics from the standard OTLP exporter variables, or None.

    ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` is used as given (for http/protobuf the full URL,
    e.g. ``http://collector:4318/v1/metrics``); ``OTEL_EXPORTER_OTLP_ENDPOINT`` is a base URL to
    which ``/v1/metrics`` is appended for http/protobuf. Protocol from
    ``OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``
    (the specification's default) or ``grpc``.
    """
    env = os.environ if environ is None else environ
    protocol = (env.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(f"OTLP metrics protocol must be http/protobuf or grpc, got {protocol!r}")
    url = (env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or "").strip()
    if not url:
        base = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip().rstrip("/")
        if not base:
            return None
        url = base + "/v1/metrics" if protocol == "http/protobuf" else base
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"OTLP metrics endpoint must be an http(s) URL, got {url!r}")
    return url, protocol


def configure_otel(
    endpoint: str | None,
    *,
    service_name: str = "llmco2-serve",
    export_timeout_s: float = 2.0,
    spans_jsonl_path: str | os.PathLike[str] | None = None,
    metric_export_interval_s: float | None = None,
    resource_attributes: Mapping[str, str] | None = None,
    metrics_endpoint: tuple[str, str] | None = None,
) -> OtelHandles:
    """Tracer and meter for llmco2-serve, built only where the host has none.

    Per signal: if the process already has a global provider (e.g. vLLM started with
    ``--otlp-traces-endpoint``), use it and own nothing. Otherwise, if there is somewhere
    to send to, build a private provider that exports over OTLP/HTTP (protobuf) to
    ``endpoint`` (the collector's base URL; ``/v1/traces`` and ``/v1/metrics`` are
    appended) and, for spans, to the JSON-lines file ``spans_jsonl_path``. Otherwise use
    the API's proxy, which stays a no-op until a host configures a provider.
    ``metrics_endpoint`` (URL, protocol), e.g. from :func:`standard_metrics_endpoint`, sends the
    metrics there instead of ``endpoint``/v1/metrics.

    Exports run in background threads with a ``export_timeout_s`` HTTP timeout, so a dead
    or slow collector never blocks ``span.end()`` or a metric ``add``. Private providers
    are not made global and register no atexit or signal handler: call
    ``OtelHandles.shutdown()``.
    """
    export_timeout_s = _non_negative("export_timeout_s", export_timeout_s)
    if metric_export_interval_s is None:  # the standard variable (ms), else 15 s
        raw = os.environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
        try:
            metric_export_interval_s = float(raw) / 1000.0 if raw else 15.0
        except ValueError:
            metric_export_interval_s = 15.0
    interval_s = _non_negative("metric_export_interval_s", metric_export_interval_s)
    if export_timeout_s == 0 or interval_s == 0:
        raise ValueError("export_timeout_s and metric_export_interval_s must be > 0")
    base = _base_endpoint(endpoint) if endpoint is not None else None

    # Imported here: only processes that export themselves pay for requests/protobuf.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    service = _non_empty_str("service_name", service_name)
    resource = Resource.create({**(resource_attributes or {}), SERVICE_NAME: service})

    tracer_provider: SdkTracerProvider | None = None
    span_exporters: list[_ShutdownOnceSpanExporter] = []
    if host_tracer_provider_configured():
        traces_owner: SignalOwner = "host"
        tracer = trace.get_tracer(TRACER_NAME, __version__)
    elif base is None and spans_jsonl_path is None:
        traces_owner = "none"
        tracer = trace.get_tracer(TRACER_NAME, __version__)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        traces_owner = "llmco2"
        tracer_provider = SdkTracerProvider(resource=resource, shutdown_on_exit=False)
        if base is not None:
            span_exporters.append(
                _ShutdownOnceSpanExporter(OTLPSpanExporter(endpoint=f"{base}/v1/traces", timeout=export_timeout_s))
            )
        if spans_jsonl_path is not None:
            span_exporters.append(_ShutdownOnceSpanExporter(FileSpanExporter(spans_jsonl_path)))
        for exporter in span_exporters:
            tracer_provider.add_span_processor(
                BatchSpanProcessor(
                    exporter,
                    schedule_delay_millis=_SPAN_SCHEDULE_DELAY_MS,
                    export_timeout_millis=export_timeout_s * 1000,
                )
            )
        tracer = tracer_provider.get_tracer(TRACER_NAME, __version__)

    meter_provider: SdkMeterProvider | None = None
    if host_meter_provider_configured():
        metrics_owner: SignalOwner = "host"
        meter = metrics.get_meter(METER_NAME, __version__)
    elif base is None and metrics_endpoint is None:
        metrics_owner = "none"
        meter = metrics.get_meter(METER_NAME, __version__)
    else:
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        url, protocol = metrics_endpoint if metrics_endpoint is not None else (f"{base}/v1/metrics", "http/protobuf")
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        metrics_owner = "llmco2"
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=url, timeout=export_timeout_s),
            export_interval_millis=interval_s * 1000,
            export_timeout_millis=export_timeout_s * 1000,
        )
        meter_provider = SdkMeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
        meter = meter_provider.get_meter(METER_NAME, __version__)

    return OtelHandles(
        tracer=tracer,
        meter=meter,
        traces_owner=traces_owner,
        metrics_owner=metrics_owner,
        export_timeout_s=export_timeout_s,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        _span_exporters=tuple(span_exporters),
    )
