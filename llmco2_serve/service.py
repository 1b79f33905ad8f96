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
    A request arriving while ``R`` others are in flight runs in a batch of about
    ``b = min(R + 1, max_num_seqs)`` sequences. We predict a batch of ``b`` sequences that
    look like this request (its prompt length and its expected output length) and charge it
    ``1/b`` of that batch's energy (and time, and CO2). Decode is memory-bound: the weights
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
from typing import Any

import numpy as np

from .attribution import EnergyAttributor, MeasuredEnergy, ScheduledWork
from .carbon import operational_co2_g
from .gpu_energy import EnergyReader, EnergyReaderError, NvmlEnergyReader
from .output_length import OutputLengthModel
from .settings import Settings
from . import telemetry as tm

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
MEASURED_HEADER = "x-llmco2-measured"
# Predictions kept for requests that never report back (client aborts): oldest dropped first.
_MAX_PENDING = 65536


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
    max_num_seqs: int | None = None

    @property
    def n_gpu(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def architecture(self) -> str:
        archs = self.hf_config.get("architectures") or [self.hf_config.get("model_type", "?")]
        return ",".join(str(a) for a in archs)


@dataclass(frozen=True)
class RequestPrediction:
    """A request's predicted share of energy (J) and CO2 (g), made before it was scheduled.

    ``*_upper`` values assume generation runs to ``max_tokens`` (the cap actually used).
    ``batch`` is the batch size of the share (see the module docstring).
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
    from .arch import ArchitectureError
    from .hardware import GPUSpecError, UnknownGPUError, resolve_gpu
    from .precision import PrecisionError
    from .predictor import Predictor, WeightsError

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
        predictor = make(dict(model.hf_config), gpu=gpu, tensor_parallel=model.tensor_parallel,
                         pipeline_parallel=model.pipeline_parallel, dtype=dtype, kv_cache_dtype=kv,
                         carbon=s.carbon)
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


def encode_measured(m: MeasuredEnergy, gen_tokens: int) -> str:
    """The engine core's measurement of one request, for the final output's trace_headers."""
    def num(x: float) -> float | None:
        return None if x != x else round(float(x), 9)  # NaN -> null (JSON has no NaN)

    return json.dumps({
        "prefill_energy_j": num(m.prefill_energy_j), "decode_energy_j": num(m.decode_energy_j),
        "energy_j": num(m.energy_j), "uncertainty_j": num(m.uncertainty_j), "source": m.source,
        "final": m.final, "n_steps": m.n_steps, "n_preemptions": m.n_preemptions,
        "gen_tokens": int(gen_tokens),
    }, separators=(",", ":"))


def decode_measured(text: str) -> dict[str, Any]:
    """Inverse of :func:`encode_measured` (missing energies come back as NaN)."""
    d = json.loads(text)
    if not isinstance(d, dict) or not isinstance(d.get("source"), str):
        raise ValueError(f"not an llmco2 measurement: {text[:80]!r}")
    for k in ("prefill_energy_j", "decode_energy_j", "energy_j", "uncertainty_j"):
        v = d.get(k)
        d[k] = math.nan if v is None else float(v)
    return d


def _finite(x: Any) -> bool:
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
    ) -> None:
        self.settings = settings
        self.model = model
        self.gpu_names = list(detect_gpu_names() if gpu_names is None else gpu_names)
        self.metrics = metrics if metrics is not None else tm.EnergyMetrics()
        self.output_lengths = output_lengths if output_lengths is not None else OutputLengthModel()
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: collections.OrderedDict[str, RequestPrediction] = collections.OrderedDict()
        self._pairs_file: Any = None
        self._pairs_failed = False
        self.prediction_count = 0
        self.prediction_time_s = 0.0
        self.prediction_time_max_s = 0.0
        self.error: str | None = None
        self.predictor: Any = None
        self.gpu_source = "detected" if self.gpu_names else "configured"
        self.gpu_label = self.gpu_names[0] if self.gpu_names else (settings.gpu_spec_file or settings.gpu)
        self._build_predictor(predictor_factory)

    # ------------------------------------------------------------------ set-up
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
        return (f"llmco2: model {m.model_name} arch {m.architecture} recognised={self.predictor is not None}; "
                f"dtype {m.dtype} quantization {m.quantization or 'none'} kv {m.kv_cache_dtype or 'auto'}; "
                f"TP {m.tensor_parallel} PP {m.pipeline_parallel}; GPUs: {gpus}; {pred}; {self.settings.describe()}")

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

    def on_request(self, request_id: str, prompt_len: int, max_tokens: int | None,
                   running_requests: int) -> RequestPrediction | None:
        """Predict a new request's share (module docstring). ``None`` when there is no predictor
        or the prompt is empty; raises nothing for odd ``max_tokens``."""
        if self.predictor is None or prompt_len < 1:
            return None
        t0 = self._clock()
        cap = self.capped_max_tokens(prompt_len, max_tokens)
        est = self.output_lengths.estimate(self.model.model_name, cap)
        b = max(1, int(running_requests) + 1)
        if self.model.max_num_seqs:
            b = min(b, self.model.max_num_seqs)
        pb = self.predictor.predict_many(np.array([prompt_len, prompt_len]),
                                         np.array([est.expected_tokens, est.upper_tokens]), batch=b)
        pre, dec = float(pb.prefill_energy_j[0]) / b, float(pb.decode_energy_j[0]) / b
        energy = pre + dec
        co2 = float(pb.co2_g[0]) / b
        oper = operational_co2_g(energy, self.settings.pue, self.settings.intensity_g_per_kwh)
        latency = self._clock() - t0
        pred = RequestPrediction(
            request_id=request_id, prompt_len=int(prompt_len), max_tokens=cap, gen_tokens=est.expected_tokens,
            batch=b, prefill_energy_j=pre, decode_energy_j=dec, energy_j=energy, co2_g=co2,
            time_s=float(pb.time_s[0]) / b, energy_j_upper=max(energy, float(pb.energy_j[1]) / b),
            co2_g_upper=max(co2, float(pb.co2_g[1]) / b), embodied_co2_g=max(0.0, co2 - oper),
            latency_s=latency)
        with self._lock:
            self._pending[request_id] = pred
            while len(self._pending) > _MAX_PENDING:
                self._pending.popitem(last=False)
            self.prediction_count += 1
            self.prediction_time_s += latency
            self.prediction_time_max_s = max(self.prediction_time_max_s, latency)
        self.metrics.record_predicted(model=self.model.model_name, predictor=self.predictor_label,
                                      prefill_energy_j=pre, decode_energy_j=dec, co2_g=co2)
        return pred

    def prediction(self, request_id: str) -> RequestPrediction | None:
        return self._pending.get(request_id)

    def forget(self, request_id: str) -> None:
        """Drop a request that will not finish normally (aborted on the API side)."""
        with self._lock:
            self._pending.pop(request_id, None)

    def on_finished(self, request_id: str, gen_tokens: int | None,
                    measured: Mapping[str, Any] | None) -> dict[str, tm.AttributeValue]:
        """Span attributes for a finished request; learns its output length; keeps the pair.

        ``measured``: :func:`decode_measured` output (or None: nothing measured, source
        "unavailable").
        """
        with self._lock:
            pred = self._pending.pop(request_id, None)
        attrs: dict[str, tm.AttributeValue] = tm.context_attributes(
            gpu=self.gpu_label, n_gpu=self.model.n_gpu, gpu_source=self.gpu_source,
            intensity_g_per_kwh=self.settings.intensity_g_per_kwh, pue=self.settings.pue,
            model=self.model.model_name or "unknown", predictor=self.predictor_label)
        if self.error is not None:
            attrs[ERROR_ATTRIBUTE] = self.error
        if pred is not None:
            attrs.update(tm.predicted_attributes(
                prefill_energy_j=pred.prefill_energy_j, decode_energy_j=pred.decode_energy_j,
                energy_j=pred.energy_j, co2_g=pred.co2_g, gen_tokens=pred.gen_tokens,
                energy_j_upper=pred.energy_j_upper, time_s=pred.time_s))
            attrs["llmco2.predicted.co2_g_upper"] = pred.co2_g_upper
            attrs["llmco2.predicted.batch"] = pred.batch
            if gen_tokens is not None and gen_tokens >= 0:
                self.output_lengths.observe(self.model.model_name, int(gen_tokens), pred.max_tokens)
        elif self.error is None and self.predictor is not None:
            attrs[ERROR_ATTRIBUTE] = "no prediction recorded for this request"
        m = dict(measured) if measured else {"source": tm.MEASURED_SOURCE_UNAVAILABLE}
        energy = m.get("energy_j", math.nan)
        co2 = math.nan
        if _finite(energy):
            # Embodied carbon cannot be measured: the measured CO2 adds the predicted embodied share.
            co2 = operational_co2_g(max(0.0, energy), self.settings.pue, self.settings.intensity_g_per_kwh) + (
                pred.embodied_co2_g if pred is not None else 0.0)
        pre_m, dec_m = m.get("prefill_energy_j", math.nan), m.get("decode_energy_j", math.nan)
        if _finite(pre_m) and _finite(dec_m):
            energy = pre_m + dec_m  # the sum identity holds exactly on the span
        attrs.update(tm.measured_attributes(
            prefill_energy_j=_clip0(pre_m), decode_energy_j=_clip0(dec_m), energy_j=_clip0(energy),
            co2_g=_clip0(co2), source=str(m.get("source") or tm.MEASURED_SOURCE_UNAVAILABLE),
            uncertainty_j=_clip0(m.get("uncertainty_j", math.nan))))
        if _finite(energy):
            self.metrics.record_measured(
                model=self.model.model_name, source=str(m["source"]), prefill_energy_j=_clip0(pre_m),
                decode_energy_j=_clip0(dec_m), co2_g=_clip0(co2),
                predicted_prefill_energy_j=pred.prefill_energy_j if pred else None,
                predicted_decode_energy_j=pred.decode_energy_j if pred else None)
            if m["source"] == "nvml" and pred is not None and gen_tokens:
                self._keep_pair(pred, int(gen_tokens), m)
        return attrs

    # ------------------------------------------------------------------ pairs for retraining
    def _keep_pair(self, pred: RequestPrediction, gen_tokens: int, m: Mapping[str, Any]) -> None:
        """Append one row in the records format of shared/README.md (+ predicted values)."""
        path = self.settings.pairs_path
        if not path or self._pairs_failed:
            return
        md = self.model
        row = {
            "model": md.model_name, "arch": dict(md.hf_config), "dtype": md.quantization or md.dtype,
            "gpu": self.gpu_label, "n_gpu": md.n_gpu, "batch": 1, "prompt_len": pred.prompt_len,
            "gen_tokens": gen_tokens, "prefill_energy_j": m["prefill_energy_j"],
            "decode_energy_j": m["decode_energy_j"], "request_energy_j": m["energy_j"],
            "uncertainty_j": m.get("uncertainty_j"), "n_preemptions": m.get("n_preemptions"),
            "engine": "vllm-continuous-batching", "source": "llmco2-serve-plugin",
            "batch_context": pred.batch, "predicted_prefill_energy_j": pred.prefill_energy_j,
            "predicted_decode_energy_j": pred.decode_energy_j, "predicted_energy_j": pred.energy_j,
            "predicted_gen_tokens": pred.gen_tokens, "predictor": self.predictor_label,
        }
        try:
            with self._lock:
                if self._pairs_file is None:
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                    self._pairs_file = open(path, "a", encoding="utf-8")
                self._pairs_file.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                self._pairs_file.flush()
        except OSError as e:
            self._pairs_failed = True
            logger.warning("llmco2: cannot write pairs to %s (%s); pairs switched off", path, e)

    def close(self) -> None:
        with self._lock:
            if self._pairs_file is not None:
                self._pairs_file.close()
                self._pairs_file = None


def _clip0(x: Any) -> float | None:
    """Measured values can dip below 0 by rounding; telemetry wants >= 0 or missing."""
    if not _finite(x):
        return None
    return max(0.0, float(x))


# EngineMeter lives in engine_meter.py (engine-core side); re-exported here for old imports.
from .engine_meter import EngineMeter, StepRow  # noqa: E402,F401
