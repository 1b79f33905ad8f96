"""Accuracy metrics of the paper (section 5.1): MAPE and error-bound accuracy EBA(delta)."""

from __future__ import annotations

import numpy as np


def relative_errors(predicted, measured) -> np.ndarray:
    """|predicted - measured| / |measured|, over rows whose measurement is non-zero."""
    p = np.asarray(predicted, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    keep = m != 0
    return np.abs(p[keep] - m[keep]) / np.abs(m[keep])


def mape(predicted, measured) -> float:
    """Mean absolute percentage error, as a fraction (0.155 = 15.5%)."""
    e = relative_errors(predicted, measured)
    return float(e.mean()) if e.size else float("nan")


def eba(predicted, measured, bound: float) -> float:
    """Error-bound accuracy: share of predictions within ``bound`` relative error (fraction)."""
    e = relative_errors(predicted, measured)
    return float((e <= bound).mean()) if e.size else float("nan")


def summary(predicted, measured) -> dict:
    m = np.asarray(measured, dtype=np.float64)
    return {
        "n": int((m != 0).sum()),
        "n_excluded_zero": int((m == 0).sum()),
        "mape": mape(predicted, measured),
        "eba_5": eba(predicted, measured, 0.05),
        "eba_10": eba(predicted, measured, 0.10),
        "eba_30": eba(predicted, measured, 0.30),
    }
