"""Accuracy of energy predictors: MAPE and EBA (paper section 5.1) and leave-one-architecture-out.

:func:`evaluate` scores request energy overall and per model, and each phase where the predictor
gives one. A measured value that is zero or negative cannot be a reference for a relative error
(NVML counter noise, ``shared/README.md``), so such rows are left out of *that* metric and counted
under ``excluded`` with the reason -- never dropped silently. All accuracies are fractions.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from llmco2_serve.reporting.metrics import eba, mape

from .baselines import EnergyPredictor, make_predictor
from .dataset import GraphSample

__all__ = ["PHASES", "EBA_BOUNDS", "EXCLUSION_REASONS", "evaluate", "leave_one_architecture_out",
           "evaluate_calibrated", "deployment_key_of"]

PHASES = ("prefill", "decode", "request")
EBA_BOUNDS = {"eba_5": 0.05, "eba_10": 0.10, "eba_30": 0.30}
EXCLUSION_REASONS = {
    "no_decode_steps": "gen_tokens == 1: the decode phase is empty, 0 J by definition",
    "measured_zero": "the NVML energy counter did not advance inside the measurement window",
    "measured_negative": "decode = request - prefill came out below zero (counter noise)",
    "missing": "the record has no value for this phase",
}


def _measured(samples: Sequence[GraphSample], phase: str) -> np.ndarray:
    return np.array([getattr(s, f"{phase}_energy_j") for s in samples], np.float64)


def _exclusion_reasons(samples: Sequence[GraphSample], phase: str) -> list[str | None]:
    """Why each row cannot be scored for ``phase`` (None: it can)."""
    out: list[str | None] = []
    for s, m in zip(samples, _measured(samples, phase)):
        if not math.isfinite(m):
            out.append("missing")
        elif phase == "decode" and s.decode_steps <= 0 and m == 0:
            out.append("no_decode_steps")
        elif m == 0:
            out.append("measured_zero")
        elif m < 0:
            out.append("measured_negative")
        else:
            out.append(None)
    return out


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _scores(predicted: np.ndarray, measured: np.ndarray, reasons: Sequence[str | None]) -> dict:
    keep = np.array([r is None for r in reasons], bool)
    counts: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            counts[r] = counts.get(r, 0) + 1
    p, m = predicted[keep], measured[keep]
    out = {"n": int(keep.sum()), "mape": _finite_or_none(mape(p, m)) if keep.any() else None}
    for key, bound in EBA_BOUNDS.items():
        out[key] = _finite_or_none(eba(p, m, bound)) if keep.any() else None
    out["excluded"] = {"count": int((~keep).sum()), "reasons": dict(sorted(counts.items()))}
    return out


def _check_predictions(values, samples: Sequence[GraphSample], phase: str) -> np.ndarray:
    arr = np.asarray(values, np.float64)
    if arr.shape != (len(samples),):
        raise ValueError(f"predicted[{phase!r}] has shape {arr.shape}, expected ({len(samples)},) -- one per sample")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        s = samples[bad[0]]
        raise ValueError(f"predicted[{phase!r}][{bad[0]}] is {arr[bad[0]]} (model {s.model!r}); "
                         f"{bad.size} non-finite prediction(s)")
    return arr


def _phase_block(predicted: np.ndarray, samples: Sequence[GraphSample], phase: str) -> dict:
    measured = _measured(samples, phase)
    reasons = _exclusion_reasons(samples, phase)
    block = _scores(predicted, measured, reasons)
    models = list(dict.fromkeys(s.model for s in samples))
    block["per_model"] = {}
    for model in models:
        rows = [i for i, s in enumerate(samples) if s.model == model]
        block["per_model"][model] = _scores(predicted[rows], measured[rows], [reasons[i] for i in rows])
    return block


def evaluate(predicted: Mapping[str, np.ndarray | None], samples: Sequence[GraphSample]) -> dict:
    """MAPE and EBA(5/10/30%) of ``predicted`` (``{"prefill", "decode", "request"}``, J) against samples.

    Returns (JSON-ready, fractions, ``None`` where nothing could be scored)::

        {"n", "mape", "eba_5", "eba_10", "eba_30",         # request energy, all rows
         "excluded": {"count", "reasons": {reason: count}},
         "per_model": {model: {same keys}},
         "prefill": {same keys + per_model} | None,         # None: the predictor has no phases
         "decode":  {same keys + per_model} | None}

    Raises ValueError when a prediction array does not have one finite value per sample.
    """
    if len(samples) == 0:
        raise ValueError("evaluate: no samples")
    if predicted.get("request") is None:
        raise ValueError("evaluate: predicted has no 'request' energies")
    request = _phase_block(_check_predictions(predicted["request"], samples, "request"), samples, "request")
    out = {k: v for k, v in request.items()}
    for phase in ("prefill", "decode"):
        values = predicted.get(phase)
        out[phase] = None if values is None else _phase_block(_check_predictions(values, samples, phase),
                                                               samples, phase)
    return out


PredictorFactory = Callable[[str, int], EnergyPredictor]


def leave_one_architecture_out(samples: Sequence[GraphSample], predictor_name: str, seed: int = 0, *,
                               make: PredictorFactory = make_predictor, group: str = "model"):
    """Train on all models but one, predict the held-out one; once per ``model`` label.

    ``group="family"`` holds out a whole family at a time (``EnergyRecord.group``: the record's
    ``family``, its model label when it has none), so sizes of one family never train its test.

    Returns ``(predictions, folds)``: predictions ``{"prefill", "decode", "request"}`` aligned to
    ``samples`` (phases None when the predictor has none) and one dict per fold: ``held_out``,
    ``train_models``, ``n_train``, ``n_test``, ``fit_time_s``, ``predict_time_s``. ``make(name, seed)``
    builds a fresh predictor per fold (``make_predictor`` by default).
    """
    if group not in ("model", "family"):
        raise ValueError(f"group must be 'model' or 'family', got {group!r}")
    key = (lambda s: s.model) if group == "model" else (lambda s: s.record.group)
    models = list(dict.fromkeys(key(s) for s in samples))
    if len(models) < 2:
        raise ValueError(f"leave_one_architecture_out needs samples of at least 2 {group}s, got {models}")
    n = len(samples)
    preds: dict[str, np.ndarray | None] = {p: np.full(n, np.nan) for p in PHASES}
    folds = []
    for held_out in models:
        test_idx = [i for i, s in enumerate(samples) if key(s) == held_out]
        train = [s for s in samples if key(s) != held_out]
        train_models = sorted({key(s) for s in train})
        if held_out in train_models:  # the whole point of the split; never let it regress
            raise RuntimeError(f"fold {held_out!r}: the held-out model is in the training set")
        predictor = make(predictor_name, seed)
        t0 = time.perf_counter()
        predictor.fit(train)
        t1 = time.perf_counter()
        out = predictor.predict([samples[i] for i in test_idx])
        t2 = time.perf_counter()
        for phase in PHASES:
            values = out.get(phase)
            if values is None:
                if phase == "request":
                    raise ValueError(f"predictor {predictor_name!r} returned no request energies")
                preds[phase] = None
            elif preds[phase] is not None:
                preds[phase][test_idx] = np.asarray(values, np.float64)
        folds.append({"held_out": held_out, "train_models": train_models, "n_train": len(train),
                      "n_test": len(test_idx), "fit_time_s": t1 - t0, "predict_time_s": t2 - t1})
    return preds, folds


def deployment_key_of(rec) -> "DeploymentKey":
    """The calibration deployment of a record: model, GPU, GPU count, parallelism (records are
    tensor-parallel over ``n_gpu`` unless they say otherwise), dtype and engine."""
    from llmco2_serve.prediction.calibration import DeploymentKey

    tp = getattr(rec, "tensor_parallel", None) or rec.n_gpu
    pp = getattr(rec, "pipeline_parallel", None) or 1
    return DeploymentKey(model=rec.model, gpu=rec.gpu, n_gpu=rec.n_gpu, tensor_parallel=int(tp),
                         pipeline_parallel=int(pp), dtype=rec.dtype, engine=rec.engine)


def evaluate_calibrated(predicted: Mapping[str, np.ndarray | None], samples: Sequence[GraphSample], k: int, *,
                        make_calibrator: Callable | None = None) -> dict:
    """``llmco2 eval --calibrate K``: online calibration as a deployment would see it.

    Rows are grouped by deployment (:func:`deployment_key_of`); in each group, in file order, the
    first ``k`` rows are fed to a fresh :class:`~llmco2_serve.prediction.calibration.Calibrator` as measured
    observations (a finished-request pair where the row has a phase split, else its request energy
    as a window over its predicted prefill and decode parts), and the remaining rows are predicted,
    calibrated and scored. A group with ``k`` or fewer rows is reported and not scored. Records are
    measurements (records format), so they are fed with source ``nvml``. A predictor without a
    phase split is calibrated as one part (its request energy as the decode-like part).

    Returns :func:`evaluate` of the scored rows plus ``calibration``::

        {"k", "observations",                       # observations fed, all groups
         "groups": [{"deployment", "key", "rows", "observed", "scored", "status"
                     ("scored" | "too_few_records"), "observations", "rejected",
                     "prefill_factor", "prefill_batch_slope", "decode_factor", "decode_batch_slope"}],
         "uncalibrated": {"n", "mape", "eba_5", "eba_10", "eba_30"}}   # the same scored rows, uncalibrated

    Raises ValueError when ``k < 0`` or no group has more than ``k`` rows.
    """
    from llmco2_serve.prediction.calibration import Calibrator

    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"--calibrate must be an integer >= 0, got {k!r}")
    if len(samples) == 0:
        raise ValueError("evaluate: no samples")
    request = _check_predictions(predicted.get("request"), samples, "request")
    phased = predicted.get("prefill") is not None and predicted.get("decode") is not None
    if phased:
        pre = _check_predictions(predicted["prefill"], samples, "prefill")
        dec = _check_predictions(predicted["decode"], samples, "decode")
    else:  # one part: the whole request is corrected by one factor (the decode-like one)
        pre, dec = np.zeros(len(samples)), request
    make = make_calibrator or (lambda key: Calibrator(key, min_observations=1))
    groups: dict = {}
    for i, s in enumerate(samples):
        groups.setdefault(deployment_key_of(s.record), []).append(i)
    scored: list[int] = []
    cal_pre = np.array(pre, np.float64)
    cal_dec = np.array(dec, np.float64)
    reports, total_obs = [], 0
    for key, rows in groups.items():
        cal = make(key)
        for i in rows[:k]:
            rec = samples[i].record
            unc = getattr(rec, "uncertainty_j", None)
            if phased and rec.prefill_energy_j is not None and rec.decode_energy_j is not None:
                cal.observe_request(predicted_prefill_j=float(pre[i]), predicted_decode_j=float(dec[i]),
                                    measured_prefill_j=rec.prefill_energy_j, measured_decode_j=rec.decode_energy_j,
                                    uncertainty_j=unc, batch=rec.batch, source="nvml", prompt_tokens=rec.prompt_len,
                                    gen_tokens=rec.gen_tokens)
            else:
                cal.observe_window(measured_j=rec.request_energy_j, predicted_prefill_j=float(pre[i]),
                                   predicted_decode_j=float(dec[i]), batch=rec.batch, source="nvml",
                                   uncertainty_j=unc)
        status = "scored" if len(rows) > k else "too_few_records"
        if status == "scored":
            for i in rows[k:]:
                cal_pre[i], cal_dec[i] = cal.calibrated(float(pre[i]), float(dec[i]), batch=samples[i].record.batch)
            scored.extend(rows[k:])
        st = cal.state()
        total_obs += cal.observations
        reports.append({"deployment": key.id, "key": key.to_dict(), "rows": len(rows), "observed": min(k, len(rows)),
                        "scored": max(0, len(rows) - k), "status": status, "observations": cal.observations,
                        "rejected": st["rejected"], **{name: st[name] for name in (
                            "prefill_factor", "prefill_batch_slope", "decode_factor", "decode_batch_slope")}})
    if not scored:
        sizes = ", ".join(f"{r['deployment']} ({r['rows']})" for r in reports)
        raise ValueError(f"--calibrate {k}: no deployment group has more than {k} records, nothing to score "
                         f"(groups: {sizes})")
    scored.sort()  # file order
    subset = [samples[i] for i in scored]
    calibrated = {"request": (cal_pre + cal_dec)[scored],
                  "prefill": cal_pre[scored] if phased else None, "decode": cal_dec[scored] if phased else None}
    out = evaluate(calibrated, subset)
    base = evaluate({"request": request[scored]}, subset)
    out["calibration"] = {"k": k, "observations": total_obs, "groups": reports,
                          "uncalibrated": {key: base[key] for key in ("n", "mape", "eba_5", "eba_10", "eba_30")}}
    return out
