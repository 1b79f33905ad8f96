"""Online calibration: a small per-deployment correction of the predictor, learned from the
deployment's own energy measurements while it serves (issue 7, part 2). Imports without vLLM.

Why a correction at all
-----------------------
The GNN is trained on one engine profile. On another deployment (continuous batching, CUDA graphs,
another GPU, another vLLM version) its predictions are off by a smooth, deployment-wide bias far
more than by anything request-specific: the same model on the same GPU moves by up to 1.7x between
two vLLM versions. The plugin sees that deployment's NVML counters, so it can learn the bias.

The model (what is fitted, and why this one)
--------------------------------------------
For a request (or a counter window) with predicted prefill energy ``P`` and decode energy ``D``
(J) at batch context ``b`` (mean rows per step)::

    calibrated prefill = P * exp(a_p + s_p * (log b - xbar_p))
    calibrated decode  = D * exp(a_d + s_d * (log b - xbar_d))

Four parameters: a multiplicative factor per phase (``exp(a)``, at the deployment's typical batch
``xbar``, the weighted mean log batch of its observations) and a power-law batch slope per phase
(``s``). Why this and nothing richer:

* *Small*: prefill and decode are different machines (compute- vs memory-bound), so they get
  separate factors; continuous batching moves the per-row cost with the batch (shared weight reads
  amortised, padding, CUDA graphs), so each phase gets a slope in log batch. More parameters
  (prompt length, output length) would need many more observations per deployment before they are
  identified, and the GNN already carries those shapes.
* *Identifiable*: the slope is centred at the observed mean batch, so with observations at a single
  batch the factor is still exact and the slope stays at its prior (0, no change) instead of
  trading off against the factor. A Gaussian prior (ridge) on the centred parameters keeps the
  solution unique with any number of observations and makes a phase without data keep factor 1.
  Its widths come from what a new deployment looks like (issue 7: the GNN off by a mean 55 % on
  vLLM deployments, 1.7x between two vLLM versions, i.e. |log factor| ~ 0.5; a per-request cost
  moving with batch^s, s between -1 and 0): sd 0.5 on the log factors and on the slopes. The power
  law is extrapolated up to ``extrapolation_ratio`` (2x) beyond the batch range seen so far and held
  at its value there further out: a slope measured between batches 8 and 32 is the local slope of
  the predictor's error where the step is weight-read-bound, and carried on to batch 3,000
  (compute-bound) it compounds into errors that grow with the distance (issue 7's score: held-out
  vllm GNN predictions calibrated on each deployment's first three records, batches 8-32, were
  21.2 % off with the power law extrapolated without bound, 18.3 % with 2x, 19.0 % held at the
  range's edge; the random forest's 32.0 / 26.2 / 25.7 %; ``benchmarks/accuracy.py --profile vllm
  --calibrate 3 --calibration-extrapolation-ratio R``). That choice was made on the weights before
  the kernel-latency term; on the shipped weights the same score is 15.2 % without bound, 17.4 %
  with 2x, 19.3 % at the edge, and with three records drawn at random 11.1 / 10.7 / 10.9 %: the
  evidence is now mixed, and 2x stays, the bounded risk for a live server whose load moves far
  beyond what it has measured. Every applied
  factor is clamped to [1/100, 100] (a misidentified GPU or a CPU test counter can be off by more
  than 20x in one phase) and slopes to [-1, 1].
* *Log space*: errors of energy predictions are multiplicative (a 2x error at 1 J and at 1 kJ is the
  same error), so residuals are ``log(measured / calibrated)``; a request pair gives one linear row
  per phase. A counter window measures only ``P + D`` together; it is linearised at the current
  estimate (one Gauss-Newton row: the Jacobian of ``log(calibrated P + calibrated D)``, i.e. the
  calibrated prefill and decode *fractions* of the window, times ``[1, log b]``). For a pure-phase
  window this row is exact.

The fit: robust, uncertainty-weighted, exponentially forgetting least squares
-----------------------------------------------------------------------------
Each row has a residual ``r`` against the current estimate and a variance
``v = tau^2 + sigma^2``: ``sigma = uncertainty_j / measured_j`` is the measurement's own error in
log space (delta method) and ``tau`` the running robust scale of the residuals (what is left of
the predictor's error after calibration; an exponential mean of ``|r|`` clipped at ``3 tau``, times
``sqrt(pi/2)``, floored at 0.02; a row's step is scaled by ``tau^2 / v``, so rows dominated by
their measurement noise do not inflate it). The row's weight is ``h / v`` with the Huber weight
``h = min(1, k / |r / sqrt(v)|)`` (``k = 1.5``): a gross outlier (a counter glitch, a request that
shared its GPUs with something else) has bounded influence instead of a squared one, and a noisy
measurement counts less than a precise one. Rows accumulate into the normal equations
(a 4x4 symmetric matrix and a 4-vector: 14 numbers, the *sufficient statistics*), so memory does
not grow with the number of observations. Old rows are forgotten exponentially with a half-life in
rows (``half_life_rows``, default 20,000: minutes of counter windows on a busy server, hours of
finished requests), so the correction follows slow drift (temperature, load mix); forgetting costs
one multiplication per row (the statistics are kept scaled by ``rho^-n`` and renormalised rarely).
The 4x4 system (with the prior added) is solved by Cholesky in pure Python after every row for the
first 64 rows, then every 16 rows; :meth:`Calibrator.calibrated` uses the last solution. So an
update costs a few microseconds and a correction under one (``benchmarks/calibration_overhead.py``).

What it learns from
-------------------
In the plugin, two kinds of observations: finished requests (the API server's own prediction vs
the engine's final measured value) and counter windows (``runtime/windows.py``: the engine core
merges its closed NVML windows into one observation per >= 0.5 s, with the busy energy they gave to
requests and the GNN's energy of the steps inside them, priced on the request predictions' scale by
``prediction/step_energy.py``; they reach the API server with the engine's books). Only real measurements: the measured ``source`` must be ``nvml`` (or ``fake``, the test-only
counter). Everything else -- ``cpu-estimate-codecarbon`` (an estimate, not a measurement),
``unavailable``, ``pending`` (no final value yet), any ``-partial`` (some GPUs not read) or
``-shared`` (the GPUs run other work) source -- is rejected and counted in :attr:`Calibrator.rejected`
under ``source:<name>``. Values that cannot be a log-space reference are rejected per phase with a
counted reason too (``<phase>:measured_nonpositive``, ``<phase>:predicted_nonpositive``,
``<phase>:too_uncertain`` when the uncertainty is larger than the value, ``not_finite``,
``bad_batch``). Nothing is dropped silently.

Error estimate
--------------
For every accepted observation the calibrator records, *before* learning from it,
``|predicted / measured - 1|`` for the uncalibrated total and for the total as it would have been
served (calibrated when active): :meth:`Calibrator.error` gives the medians over the last
``error_window`` observations (a fixed-size ring, bounded memory). Because each is scored before the
update, it is an honest out-of-sample error.

Persistence and deployment changes
----------------------------------
A deployment is a :class:`DeploymentKey` (model, GPU type, GPU count, TP, PP, dtype, engine
version, and the predictor's label: a correction learned on top of one set of weights means
nothing on top of another, so new weights start a new calibration). The state is one small JSON
file per deployment next to the pairs file (:meth:`Calibrator.path_for`), written atomically (a
temporary file in the same folder, then ``os.replace``): a crash leaves the old file or the new one,
never a mix. :meth:`Calibrator.load` restores it; a file of another deployment, or one that cannot
be read, gives a fresh calibrator whose :attr:`~Calibrator.reset_reason` says why.

Use (the plugin and ``llmco2 eval --calibrate``)::

    key = DeploymentKey(model="llama3.1-8b", gpu="NVIDIA H100 80GB HBM3", n_gpu=1, tensor_parallel=1,
                        pipeline_parallel=1, dtype="bfloat16", engine="vllm-0.32.0", predictor="llmco2-gnn 1")
    cal = Calibrator.load(Calibrator.path_for(pairs_path, key), key)
    cal.observe_window(measured_j=..., predicted_prefill_j=..., predicted_decode_j=..., batch=..., source="nvml",
                       uncertainty_j=...)
    cal.observe_request(predicted_prefill_j=..., predicted_decode_j=..., measured_prefill_j=...,
                        measured_decode_j=..., uncertainty_j=..., batch=..., source="nvml")
    prefill_j, decode_j = cal.calibrated(pred_prefill_j, pred_decode_j, batch=b)   # identity until active
    cal.observations, cal.is_active, cal.error(), cal.state()
    cal.save()                                                                       # off the hot path

Thread-safety: ``observe_*``, ``save`` and ``reset`` take one lock; :meth:`Calibrator.calibrated`
reads one immutable tuple and takes none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

logger = logging.getLogger(__name__)

__all__ = ["DeploymentKey", "Calibrator", "MEASURED_SOURCES", "FORMAT", "FORMAT_VERSION"]

#: Sources the calibrator learns from: NVML counters, and the test-only fake counter.
MEASURED_SOURCES = ("nvml", "fake")
FORMAT = "llmco2-calibration"
FORMAT_VERSION = 1

_LOG_FACTOR_LIMIT = math.log(100.0)  # factors are clamped to [1/100, 100]
_SLOPE_LIMIT = 1.0
_MAD_TO_SD = math.sqrt(math.pi / 2.0)  # E|r| = sd * sqrt(2/pi) for a normal residual
_SOLVE_EVERY_ROW_UNTIL = 64
_SOLVE_EVERY = 16
_RENORMALISE_ABOVE = 1e100


@dataclass(frozen=True)
class DeploymentKey:
    """What a calibration belongs to. Any field changing means a new deployment (a reset).

    ``engine`` is the serving engine and its version (e.g. ``vllm-0.32.0``); ``predictor`` the
    predictor's label with its weights (a correction is relative to the predictions it corrects).
    """

    model: str
    gpu: str
    n_gpu: int
    tensor_parallel: int
    pipeline_parallel: int
    dtype: str
    engine: str
    predictor: str = ""

    def __post_init__(self) -> None:
        for name in ("n_gpu", "tensor_parallel", "pipeline_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DeploymentKey.{name} must be an integer >= 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DeploymentKey":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"DeploymentKey: unknown field(s) {sorted(unknown)}")
        return cls(**{k: d[k] for k in names if k in d})

    @property
    def id(self) -> str:
        """Stable across processes and machines (a hash of the fields, not Python's ``hash``),
        safe in a file name: ``<model slug>-<12 hex digits>``."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.rsplit("/", 1)[-1]).strip("._-")[:48] or "model"
        return f"{slug}-{digest}"


def _finite(x: Any) -> bool:
    if type(x) is float:  # the usual case, nine times per finished request: no isinstance
        return x - x == 0.0  # False for NaN and infinities
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _median(values) -> float | None:
    s = sorted(values)
    n = len(s)
    if n == 0:
        return None
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _solve_spd4(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve a 4x4 symmetric positive-definite system by Cholesky (pure Python: a few µs, no numpy
    call overhead). The ridge prior makes the matrix positive definite."""
    n = 4
    L = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1):
            s = a[i][j]
            for k in range(j):
                s -= L[i][k] * L[j][k]
            if i == j:
                L[i][i] = math.sqrt(s if s > 1e-300 else 1e-300)
            else:
                L[i][j] = s / L[j][j]
    y = [0.0] * n
    for i in range(n):
        s = b[i]
        for k in range(i):
            s -= L[i][k] * y[k]
        y[i] = s / L[i][i]
    x = [0.0] * n
    for i in reversed(range(n)):
        s = y[i]
        for k in range(i + 1, n):
            s -= L[k][i] * x[k]
        x[i] = s / L[i][i]
    return x


# Index of each upper-triangle entry of the 4x4 normal matrix in the flat statistics list.
_IDX = {(0, 0): 0, (0, 1): 1, (0, 2): 2, (0, 3): 3, (1, 1): 4, (1, 2): 5, (1, 3): 6, (2, 2): 7, (2, 3): 8,
        (3, 3): 9}


class Calibrator:
    """Per-deployment correction of predicted prefill/decode energy (module docstring).

    Args:
        key: the deployment.
        path: where :meth:`save` writes (default: none; :meth:`load` sets it).
        min_observations: accepted observations before :attr:`is_active` (and :meth:`calibrated`
            applies the correction).
        half_life_rows: forgetting half-life in fitted rows (a request pair gives up to two rows,
            one per phase; a window one).
        huber_k: Huber threshold in standardised residuals.
        initial_scale: the residual scale ``tau`` before any data (log space; 0.3 ~ the 30 % an
            uncalibrated prediction is typically off by on a new deployment).
        prior_sd_log_factor, prior_sd_slope: sd of the Gaussian prior (ridge) on the centred log
            factors and the batch slopes.
        error_window: observations in the running error medians.
        accept_sources: measured sources learnt from (default ``nvml`` and the test-only ``fake``).
        extrapolation_ratio: how far (a batch ratio) beyond the batches observed the fitted power law
            still extends; further out the correction holds its value there (``math.inf``: no limit).
    """

    def __init__(self, key: DeploymentKey, *, path: str | os.PathLike | None = None, min_observations: int = 3,
                 half_life_rows: float = 20000.0, huber_k: float = 1.5, initial_scale: float = 0.3,
                 min_scale: float = 0.02, scale_rate: float = 0.02, prior_sd_log_factor: float = 0.5,
                 prior_sd_slope: float = 0.5, error_window: int = 256,
                 accept_sources: tuple[str, ...] = MEASURED_SOURCES, extrapolation_ratio: float = 2.0) -> None:
        if not isinstance(key, DeploymentKey):
            raise TypeError(f"key must be a DeploymentKey, got {type(key).__name__}")
        if min_observations < 1:
            raise ValueError(f"min_observations must be >= 1, got {min_observations!r}")
        for name, value in (("half_life_rows", half_life_rows), ("huber_k", huber_k),
                            ("initial_scale", initial_scale), ("min_scale", min_scale),
                            ("prior_sd_log_factor", prior_sd_log_factor), ("prior_sd_slope", prior_sd_slope)):
            if not _finite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0 < scale_rate <= 1:
            raise ValueError(f"scale_rate must be in (0, 1], got {scale_rate!r}")
        if error_window < 1:
            raise ValueError(f"error_window must be >= 1, got {error_window!r}")
        if not isinstance(extrapolation_ratio, (int, float)) or isinstance(extrapolation_ratio, bool) or \
                math.isnan(extrapolation_ratio) or extrapolation_ratio < 1:
            raise ValueError(f"extrapolation_ratio must be a number >= 1 (inf: no limit), got {extrapolation_ratio!r}")
        bad = [s for s in accept_sources if s not in MEASURED_SOURCES]
        if bad:  # never let a configuration make an estimate count as a measurement
            raise ValueError(f"accept_sources may only hold real measurements {MEASURED_SOURCES}, got {bad}")
        self.key = key
        self.path: str | None = os.fspath(path) if path is not None else None
        self.min_observations = int(min_observations)
        self.half_life_rows = float(half_life_rows)
        self.huber_k = float(huber_k)
        self.initial_scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.scale_rate = float(scale_rate)
        self.prior_sd_log_factor = float(prior_sd_log_factor)
        self.prior_sd_slope = float(prior_sd_slope)
        self.error_window = int(error_window)
        self.accept_sources = frozenset(accept_sources)
        self.extrapolation_ratio = float(extrapolation_ratio)
        self._extrapolate = math.log(self.extrapolation_ratio)  # log-batch margin beyond the seen range
        self._inv_rho = 2.0 ** (1.0 / self.half_life_rows)  # 1 / forgetting factor per row
        self._lock = threading.Lock()
        self.reset_reason: str | None = None
        self._clear()

    # ------------------------------------------------------------------ state
    def _clear(self) -> None:
        self._stats = [0.0] * 14  # 10 upper-triangle normal-matrix entries, then 4 right-hand side
        self._g = 1.0  # stored statistics = true statistics * _g (forgetting without touching them)
        self._rows = 0
        self._since_solve = 0
        self._x_lo = math.inf  # observed log-batch range (the correction is not extrapolated)
        self._x_hi = -math.inf
        self._tau = self.initial_scale
        self.observations = 0  # accepted observations (requests + windows), lifetime
        self.by_kind = {"request": 0, "window": 0}
        self.rejected: dict[str, int] = {}
        self._err_raw: deque[float] = deque(maxlen=self.error_window)
        self._err_cal: deque[float] = deque(maxlen=self.error_window)
        self._dirty = False
        # (a_p, s_p, xbar_p, a_d, s_d, xbar_d, x_lo, x_hi): one immutable tuple, swapped whole
        self._params: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def reset(self, reason: str = "reset") -> None:
        """Forget everything learnt (the counters of rejected observations too)."""
        with self._lock:
            self._clear()
            self.reset_reason = reason
            self._dirty = True

    @property
    def is_active(self) -> bool:
        """Enough accepted observations for :meth:`calibrated` to apply the correction."""
        return self.observations >= self.min_observations

    @property
    def dirty(self) -> bool:
        """Something changed since the last :meth:`save` / :meth:`load`."""
        return self._dirty

    # ------------------------------------------------------------------ prediction side
    def _log_factors(self, x: float | None, params: tuple[float, ...]) -> tuple[float, float]:
        ap, sp, xp, ad, sd, xd, lo, hi = params
        if x is None:
            return ap, ad  # the factors at the typical batch
        m = self._extrapolate  # the power law reaches this far beyond the batches seen, then holds
        if x < lo - m:
            x = lo - m
        elif x > hi + m:
            x = hi + m
        lim = _LOG_FACTOR_LIMIT
        lp, ld = ap + sp * (x - xp), ad + sd * (x - xd)
        return (-lim if lp < -lim else lim if lp > lim else lp), (-lim if ld < -lim else lim if ld > lim else ld)

    def factors(self, batch: float | None = None) -> tuple[float, float]:
        """(prefill factor, decode factor) applied at ``batch`` (None: the typical batch); 1 while
        not active."""
        if not self.is_active:
            return 1.0, 1.0
        lp, ld = self._log_factors(_log_batch(batch), self._params)
        return math.exp(lp), math.exp(ld)

    def calibrated(self, prefill_j: float, decode_j: float, batch: float | None = None) -> tuple[float, float]:
        """Calibrated (prefill, decode) energy (J) for a prediction at batch context ``batch``
        (rows per step; None: the deployment's typical batch). Unchanged while not :attr:`is_active`."""
        if self.observations < self.min_observations:
            return prefill_j, decode_j
        lp, ld = self._log_factors(_log_batch(batch), self._params)
        return prefill_j * math.exp(lp), decode_j * math.exp(ld)

    # ------------------------------------------------------------------ observation side
    def _source_ok(self, source: Any) -> bool:
        if source in self.accept_sources:
            return True
        self._count(f"source:{source}")
        return False

    def _admit(self, source: Any, values: tuple[float, ...], batch: Any) -> float | None:
        """log(batch) of an observation worth learning from, else None with the reason counted."""
        if not self._source_ok(source):
            return None
        if not all(_finite(v) for v in values):
            self._count("not_finite")
            return None
        x = _log_batch(batch)
        if x is None:
            self._count("bad_batch")
        return x

    def _count(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self._dirty = True

    def count_rejected(self, reason: str) -> None:
        """Count an observation refused before it reached ``observe_*`` (e.g. a malformed counter
        window from the engine) under ``reason`` in :attr:`rejected`."""
        with self._lock:
            self._count(str(reason))

    def observe_request(self, *, predicted_prefill_j: float, predicted_decode_j: float, measured_prefill_j: float,
                        measured_decode_j: float, batch: float, source: str, uncertainty_j: float | None = None,
                        prefill_uncertainty_j: float | None = None, decode_uncertainty_j: float | None = None,
                        prompt_tokens: int | None = None, gen_tokens: int | None = None) -> bool:
        """One finished request: its predicted and measured prefill/decode energy (J) at batch
        context ``batch``. ``uncertainty_j`` is the measured value's error scale (J), used for each
        phase unless a per-phase one is given. A request with ``gen_tokens <= 1`` has no decode
        phase, so only its prefill is learnt from. Returns whether anything was learnt (else the
        reason is counted in :attr:`rejected`)."""
        with self._lock:
            x = self._admit(source, (predicted_prefill_j, predicted_decode_j, measured_prefill_j,
                                     measured_decode_j), batch)
            if x is None:
                return False
            u = uncertainty_j if _finite(uncertainty_j) and uncertainty_j > 0 else 0.0
            up = prefill_uncertainty_j if _finite(prefill_uncertainty_j) and prefill_uncertainty_j >= 0 else u
            ud = decode_uncertainty_j if _finite(decode_uncertainty_j) and decode_uncertainty_j >= 0 else u
            lp, ld = self._log_factors(x, self._params)
            rows = []
            row = self._phase_row("prefill", predicted_prefill_j, measured_prefill_j, up)
            if row is not None:
                rows.append((row[0], row[1], 0, x))
            if gen_tokens is not None and gen_tokens <= 1:
                pass  # no decode steps: its decode energy is 0 J by definition, nothing to learn
            else:
                row = self._phase_row("decode", predicted_decode_j, measured_decode_j, ud)
                if row is not None:
                    rows.append((row[0], row[1], 2, x))
            if not rows:
                return False
            pred_total = predicted_prefill_j + predicted_decode_j
            served = (predicted_prefill_j * math.exp(lp) + predicted_decode_j * math.exp(ld)
                      if self.observations >= self.min_observations else pred_total)
            for z, sigma, col, xx in rows:
                # pure-phase row: phi = [1, x] in that phase's columns, target log(measured / predicted)
                self._fit_row(col, 1.0, xx, z - (lp if col == 0 else ld), z, sigma)
            self._after_observation("request", pred_total, served, measured_prefill_j + measured_decode_j, x)
            return True

    def _phase_row(self, phase: str, predicted_j: float, measured_j: float, uncertainty_j: float):
        if predicted_j <= 0:
            self._count(f"{phase}:predicted_nonpositive")
            return None
        if measured_j <= 0:
            self._count(f"{phase}:measured_nonpositive")
            return None
        sigma = uncertainty_j / measured_j
        if sigma > 1.0:  # the log of a value smaller than its own error says nothing
            self._count(f"{phase}:too_uncertain")
            return None
        return math.log(measured_j / predicted_j), sigma

    def observe_window(self, *, measured_j: float, predicted_prefill_j: float, predicted_decode_j: float,
                       batch: float, source: str, uncertainty_j: float | None = None) -> bool:
        """One closed counter window: its measured energy (J, the GPUs' counters over the window,
        less nothing: the predictions must cover the same energy) and the predicted energy of the
        steps inside it split into prefill-like and decode-like parts (J), at the window's mean batch
        (rows per step). Returns whether it was learnt from (else the reason is counted)."""
        with self._lock:
            x = self._admit(source, (measured_j, predicted_prefill_j, predicted_decode_j), batch)
            if x is None:
                return False
            if predicted_prefill_j < 0 or predicted_decode_j < 0 or predicted_prefill_j + predicted_decode_j <= 0:
                self._count("window:predicted_nonpositive")
                return False
            if measured_j <= 0:
                self._count("window:measured_nonpositive")
                return False
            u = uncertainty_j if _finite(uncertainty_j) and uncertainty_j > 0 else 0.0
            sigma = u / measured_j
            if sigma > 1.0:
                self._count("window:too_uncertain")
                return False
            lp, ld = self._log_factors(x, self._params)
            cp = predicted_prefill_j * math.exp(lp)  # calibrated parts at the current estimate
            cd = predicted_decode_j * math.exp(ld)
            total = cp + cd
            fp = cp / total
            r = math.log(measured_j / total)
            # Gauss-Newton row: d log(cp + cd) / d theta = [fp, fp x, fd, fd x]
            self._fit_window_row(fp, 1.0 - fp, x, r, sigma, lp, ld)
            served = total if self.is_active else predicted_prefill_j + predicted_decode_j
            self._after_observation("window", predicted_prefill_j + predicted_decode_j, served, measured_j, x)
            return True

    # ------------------------------------------------------------------ the fit
    def _weight(self, r: float, sigma: float) -> float:
        """Huber x inverse-variance weight of a row with residual r (log) and measurement sd sigma;
        updates the robust residual scale tau."""
        tau = self._tau
        v = tau * tau + sigma * sigma
        ar = abs(r)
        u = ar / math.sqrt(v)
        h = 1.0 if u <= self.huber_k else self.huber_k / u
        clip = 3.0 * tau
        # A row dominated by its measurement noise says little about tau: its step is scaled by
        # tau^2 / v (else noisy rows inflate tau and the precise rows lose their extra weight).
        tau += self.scale_rate * (tau * tau / v) * ((ar if ar < clip else clip) * _MAD_TO_SD - tau)
        self._tau = tau if tau > self.min_scale else self.min_scale
        return h / v

    def _fit_row(self, col: int, f: float, x: float, r: float, z: float, sigma: float) -> None:
        """A pure-phase row (phi = f * [1, x] in columns col, col+1; target z, residual r)."""
        self._g *= self._inv_rho
        w = self._weight(r, sigma) * self._g
        s = self._stats
        fw = f * w
        if col == 0:
            s[0] += fw * f
            s[1] += fw * f * x
            s[4] += fw * f * x * x
            s[10] += fw * z
            s[11] += fw * x * z
        else:
            s[7] += fw * f
            s[8] += fw * f * x
            s[9] += fw * f * x * x
            s[12] += fw * z
            s[13] += fw * x * z
        self._rows += 1
        self._since_solve += 1

    def _fit_window_row(self, fp: float, fd: float, x: float, r: float, sigma: float, lp: float, ld: float) -> None:
        """A window row: phi = [fp, fp x, fd, fd x], pseudo-target z = r + phi . theta."""
        self._g *= self._inv_rho
        w = self._weight(r, sigma) * self._g
        z = r + fp * lp + fd * ld  # phi . theta = fp (a_p + s_p x) + fd (a_d + s_d x)
        p0, p1, p2, p3 = fp, fp * x, fd, fd * x
        s = self._stats
        s[0] += w * p0 * p0
        s[1] += w * p0 * p1
        s[2] += w * p0 * p2
        s[3] += w * p0 * p3
        s[4] += w * p1 * p1
        s[5] += w * p1 * p2
        s[6] += w * p1 * p3
        s[7] += w * p2 * p2
        s[8] += w * p2 * p3
        s[9] += w * p3 * p3
        wz = w * z
        s[10] += wz * p0
        s[11] += wz * p1
        s[12] += wz * p2
        s[13] += wz * p3
        self._rows += 1
        self._since_solve += 1

    def _after_observation(self, kind: str, predicted_total_j: float, served_total_j: float, measured_total_j: float,
                           x: float) -> None:
        if predicted_total_j > 0 and measured_total_j > 0:
            self._err_raw.append(abs(predicted_total_j / measured_total_j - 1.0))
            self._err_cal.append(abs(served_total_j / measured_total_j - 1.0))
        if x < self._x_lo:
            self._x_lo = x
        if x > self._x_hi:
            self._x_hi = x
        self.observations += 1
        self.by_kind[kind] += 1
        self._dirty = True
        if self._g > _RENORMALISE_ABOVE:
            inv = 1.0 / self._g
            self._stats = [v * inv for v in self._stats]
            self._g = 1.0
        if self._rows <= _SOLVE_EVERY_ROW_UNTIL or self._since_solve >= _SOLVE_EVERY:
            self._solve()

    def _solve(self) -> None:
        """Ridge-regularised weighted least squares in the centred parameters -> self._params."""
        inv = 1.0 / self._g
        s = [v * inv for v in self._stats]
        A = [[0.0] * 4 for _ in range(4)]
        for (i, j), k in _IDX.items():
            A[i][j] = A[j][i] = s[k]
        c = s[10:14]
        # Centre each phase's batch at its weighted mean log batch: phi' = M phi with
        # phi'_1 = phi_1 - xbar_p phi_0, phi'_3 = phi_3 - xbar_d phi_2 (the factor becomes the one
        # at the typical batch, and the slope no longer trades off against it).
        lo, hi = (self._x_lo, self._x_hi) if self._x_lo <= self._x_hi else (0.0, 0.0)
        xp = min(max(A[0][1] / A[0][0], lo), hi) if A[0][0] > 0 else lo
        xd = min(max(A[2][3] / A[2][2], lo), hi) if A[2][2] > 0 else lo
        rows = (((0, 1.0),), ((1, 1.0), (0, -xp)), ((2, 1.0),), ((3, 1.0), (2, -xd)))  # M, sparse
        Ac = [[0.0] * 4 for _ in range(4)]
        for i in range(4):
            for j in range(i + 1):
                v = 0.0
                for k, mk in rows[i]:
                    for m, mm in rows[j]:
                        v += mk * A[k][m] * mm
                Ac[i][j] = Ac[j][i] = v
        cc = [sum(mk * c[k] for k, mk in rows[i]) for i in range(4)]
        prior = (1.0 / self.prior_sd_log_factor ** 2, 1.0 / self.prior_sd_slope ** 2)
        for i in range(4):
            Ac[i][i] += prior[i % 2]
        ap, sp, ad, sd = _solve_spd4(Ac, cc)
        clamp = lambda v, lim: -lim if v < -lim else lim if v > lim else v  # noqa: E731
        self._params = (clamp(ap, _LOG_FACTOR_LIMIT), clamp(sp, _SLOPE_LIMIT), xp,
                        clamp(ad, _LOG_FACTOR_LIMIT), clamp(sd, _SLOPE_LIMIT), xd, lo, hi)
        self._since_solve = 0

    # ------------------------------------------------------------------ reporting
    def error(self) -> dict[str, Any]:
        """Running medians of |predicted / measured - 1| over the last ``error_window``
        observations, uncalibrated and as served (each scored before it was learnt from)."""
        raw, cal = list(self._err_raw), list(self._err_cal)
        return {"n": len(raw), "uncalibrated_median_abs_rel_error": _median(raw),
                "calibrated_median_abs_rel_error": _median(cal)}

    def state(self) -> dict[str, Any]:
        """What a start-up line, a metric or a JSON report shows (plain JSON types)."""
        ap, sp, xp, ad, sd, xd, lo, hi = self._params
        have = self._x_lo <= self._x_hi
        return {
            "deployment": self.key.id, "active": self.is_active, "observations": self.observations,
            "by_kind": dict(self.by_kind), "rejected": dict(sorted(self.rejected.items())),
            "prefill_factor": math.exp(ap), "prefill_batch_slope": sp,
            "decode_factor": math.exp(ad), "decode_batch_slope": sd,
            "typical_batch": {"prefill": math.exp(xp), "decode": math.exp(xd)} if have else None,
            "batch_range": [math.exp(lo), math.exp(hi)] if have else None,
            "residual_scale": self._tau, "error": self.error(), "reset_reason": self.reset_reason,
        }

    def __repr__(self) -> str:
        st = self.state()
        return (f"Calibrator({self.key.id}, observations={st['observations']}, active={st['active']}, "
                f"prefill x{st['prefill_factor']:.3f} slope {st['prefill_batch_slope']:+.3f}, "
                f"decode x{st['decode_factor']:.3f} slope {st['decode_batch_slope']:+.3f})")

    # ------------------------------------------------------------------ persistence
    @staticmethod
    def path_for(pairs_path: str | os.PathLike, key: DeploymentKey) -> str:
        """The calibration file of ``key`` next to the pairs file:
        ``<pairs folder>/llmco2-calibration-<key.id>.json``."""
        folder = os.path.dirname(os.path.abspath(os.path.expanduser(os.fspath(pairs_path))))
        return os.path.join(folder, f"llmco2-calibration-{key.id}.json")

    def to_dict(self) -> dict[str, Any]:
        inv = 1.0 / self._g
        have = self._x_lo <= self._x_hi
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "key": self.key.to_dict(), "key_id": self.key.id,
            "stats": [v * inv for v in self._stats], "rows": self._rows, "rows_since_solve": self._since_solve,
            "batch_log_range": [self._x_lo, self._x_hi] if have else None,
            "residual_scale": self._tau, "observations": self.observations, "by_kind": dict(self.by_kind),
            "rejected": dict(self.rejected), "params": list(self._params),
            "errors": {"uncalibrated": list(self._err_raw), "calibrated": list(self._err_cal)},
            "saved_at": time.time(),
        }

    def _restore(self, d: Mapping[str, Any]) -> None:
        stats = [float(v) for v in d["stats"]]
        if len(stats) != 14 or not all(math.isfinite(v) for v in stats):
            raise ValueError("stats must be 14 finite numbers")
        params = [float(v) for v in d["params"]]
        if len(params) != 8 or not all(math.isfinite(v) for v in params):
            raise ValueError("params must be 8 finite numbers")
        rng = d.get("batch_log_range")
        self._stats, self._g = stats, 1.0
        self._rows = int(d["rows"])
        self._x_lo, self._x_hi = (float(rng[0]), float(rng[1])) if rng else (math.inf, -math.inf)
        self._tau = max(float(d["residual_scale"]), self.min_scale)
        self.observations = int(d["observations"])
        self.by_kind = {"request": int(d["by_kind"].get("request", 0)), "window": int(d["by_kind"].get("window", 0))}
        self.rejected = {str(k): int(v) for k, v in d.get("rejected", {}).items()}
        errors = d.get("errors") or {}
        self._err_raw = deque((float(v) for v in errors.get("uncalibrated", [])), maxlen=self.error_window)
        self._err_cal = deque((float(v) for v in errors.get("calibrated", [])), maxlen=self.error_window)
        self._params = tuple(params)
        self._since_solve = int(d.get("rows_since_solve", 0))  # the same solve schedule after a restart

    @classmethod
    def load(cls, path: str | os.PathLike, key: DeploymentKey, **config: Any) -> "Calibrator":
        """The calibrator of ``key`` saved at ``path``; a fresh one when there is no file, when the
        file belongs to another deployment (``reset_reason`` says ``deployment changed``) or when
        it cannot be read (``reset_reason`` says why; one warning). Never raises for a bad file."""
        cal = cls(key, path=path, **config)
        p = os.fspath(path)
        try:
            with open(p, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            return cal
        except (OSError, ValueError) as e:
            cal.reset_reason = f"unreadable calibration file {p}: {e}"
            logger.warning("llmco2 calibration: %s; starting afresh", cal.reset_reason)
            return cal
        try:
            if not isinstance(d, dict) or d.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            if d.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {d.get('version')!r}, this code reads {FORMAT_VERSION}")
            saved_key = DeploymentKey.from_dict(d["key"])
        except (KeyError, TypeError, ValueError) as e:
            cal.reset_reason = f"unreadable calibration file {p}: {e}"
            logger.warning("llmco2 calibration: %s; starting afresh", cal.reset_reason)
            return cal
        if saved_key != key:
            changed = sorted(k for k, v in key.to_dict().items() if saved_key.to_dict().get(k) != v)
            cal.reset_reason = f"deployment changed ({', '.join(changed)}): {saved_key.id} -> {key.id}"
            cal._dirty = True
            logger.info("llmco2 calibration: %s; starting afresh", cal.reset_reason)
            return cal
        try:
            cal._restore(d)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            cal._clear()
            cal.reset_reason = f"unreadable calibration file {p}: {e}"
            logger.warning("llmco2 calibration: %s; starting afresh", cal.reset_reason)
        return cal

    def save(self, path: str | os.PathLike | None = None) -> str:
        """Write the state atomically (temporary file in the same folder, fsync, ``os.replace``) to
        ``path`` or :attr:`path`. Returns the path. Raises ``OSError`` (the old file is untouched)."""
        target = os.fspath(path) if path is not None else self.path
        if not target:
            raise ValueError("Calibrator.save: no path (give one, or construct with path=)")
        with self._lock:
            data = json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)
            self._dirty = False
        folder = os.path.dirname(os.path.abspath(target))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".llmco2-calibration-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            self._dirty = True
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return target


def _log_batch(batch: Any) -> float | None:
    """log of a batch context (rows per step, may be fractional); None when not usable."""
    if batch is None or not _finite(batch) or batch <= 0:
        return None
    return math.log(batch)
