"""``llmco2 report``: predicted vs measured energy and carbon, from what a deployment wrote.

Input, one of:

* a **spans file**: JSON lines of spans as the demo's receiver writes them
  (``llmco2_serve/devtools/otlp_receiver.py``: ``{"signal": "span", "name": ..., "attributes": {...}}``;
  metric lines are skipped), or OTLP/JSON (``{"resourceSpans": [...]}``, one document or one per
  line, as the OpenTelemetry Collector's file exporter writes). vLLM's ``llm_request`` spans carry
  the prediction and the engine's first answer; a span whose measured source is ``pending`` (stop
  string) takes the final value from its ``llmco2.measurement`` span in the same trace.
* a **pairs file** (``LLMCO2_PAIRS_PATH``, ``llmco2_serve/runtime/pairs.py``): final values of
  completed requests. Older rows have no time or carbon settings: their CO2 uses ``--intensity``
  and ``--pue`` (the report says so), and "over time" is file order.

Output: a self-contained HTML page (plots as base64 PNG, no external file or script) and/or one
PNG with the four plots and the summary table: predicted vs measured with the EBA 10 %/30 % bands,
relative error over time, energy per output token by batch size, carbon per hour; the summary
(MAPE, EBA, totals) and the settings found in the file.

Bad input (missing, empty, not JSON, no llmco2 data) raises :class:`ReportError` naming the file
and line; nothing is written then. matplotlib is an optional extra (``llmco2-serve[report]``).
"""

from __future__ import annotations

import argparse
import base64
import collections
import datetime as _dt
import hashlib
import html
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmco2_serve.carbon.footprint import operational_co2_g
from llmco2_serve.reporting import metrics

__all__ = ["ReportError", "ReportData", "load", "summarize", "write_report", "main", "add_parser"]

SPAN_NAME = "llm_request"
LATE_SPAN_NAME = "llmco2.measurement"
EXTRA_HINT = "pip install 'llmco2-serve[report]' (or: pip install 'matplotlib>=3.7')"
# What pairs rows written before they carried carbon settings are reported with (settings.py defaults).
DEFAULT_INTENSITY_G_PER_KWH = 481.0
DEFAULT_PUE = 1.2


class ReportError(ValueError):
    """The input cannot make a report (message names the file and what is wrong)."""


@dataclass
class Row:
    """One request (one sequence): what was predicted and what was measured."""

    time_s: float | None = None  # unix seconds when its energy was spent (finish)
    predicted_energy_j: float | None = None
    predicted_prefill_j: float | None = None
    predicted_decode_j: float | None = None
    predicted_co2_g: float | None = None  # operational + embodied share (spans)
    predicted_embodied_co2_g: float | None = None
    measured_energy_j: float | None = None
    measured_prefill_j: float | None = None
    measured_decode_j: float | None = None
    measured_co2_g: float | None = None  # operational only
    source: str | None = None
    final: bool | None = None
    gen_tokens: int | None = None
    prompt_tokens: int | None = None
    batch: float | None = None
    request_id: str | None = None

    @property
    def predicted_operational_co2_g(self) -> float | None:
        if self.predicted_co2_g is None:
            return None
        return self.predicted_co2_g - (self.predicted_embodied_co2_g or 0.0)


@dataclass
class ReportData:
    path: str
    kind: str  # "spans" | "pairs"
    rows: list[Row]
    settings: dict[str, str] = field(default_factory=dict)  # name -> value(s) found in the file
    notes: list[str] = field(default_factory=list)
    sha256: str = ""


# ---------------------------------------------------------------------------------------------- input


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, str):
        try:
            v = float(x)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None


def _int(x: Any) -> int | None:
    v = _num(x)
    return int(v) if v is not None else None


def _otlp_value(v: Mapping[str, Any]) -> Any:
    """An OTLP/JSON AnyValue (``{"doubleValue": 1.5}``) as a Python value."""
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])  # int64 is a string in OTLP/JSON
    if "arrayValue" in v:
        return [_otlp_value(x) for x in v["arrayValue"].get("values", [])]
    return None


def _otlp_json_spans(doc: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    for rs in doc.get("resourceSpans") or ():
        for ss in rs.get("scopeSpans") or rs.get("instrumentationLibrarySpans") or ():
            for s in ss.get("spans") or ():
                yield {
                    "name": s.get("name"), "trace_id": str(s.get("traceId", "")).lower(),
                    "span_id": str(s.get("spanId", "")).lower(),
                    "parent_span_id": (str(s["parentSpanId"]).lower() if s.get("parentSpanId") else None),
                    "start_time_unix_nano": _int(s.get("startTimeUnixNano")),
                    "end_time_unix_nano": _int(s.get("endTimeUnixNano")),
                    "attributes": {a["key"]: _otlp_value(a.get("value") or {}) for a in s.get("attributes") or ()
                                   if isinstance(a, Mapping) and "key" in a},
                }


def _records(path: Path) -> tuple[list[Any], list[str]]:
    """JSON documents of the file (JSON lines, or one document), and notes."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read it ({e})") from None
    if not text.strip():
        raise ReportError(f"{path}: the file is empty (expected a spans file or a pairs file, JSON lines)")
    lines = text.splitlines()
    docs: list[Any] = []
    notes: list[str] = []
    last = max(i for i, line in enumerate(lines) if line.strip())
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == 0:  # maybe one pretty-printed document (OTLP/JSON)
                try:
                    return [json.loads(text)], notes
                except json.JSONDecodeError:
                    pass
            if i == last and not text.endswith("\n"):  # a writer cut off mid-line (crash): skip it
                notes.append(f"line {i + 1} is cut off (no newline at the end of the file); skipped")
                continue
            raise ReportError(f"{path}:{i + 1}: not JSON ({e.msg}); expected a spans file or a pairs file") from None
    return docs, notes


def load(path: str | os.PathLike, *, intensity_g_per_kwh: float | None = None, pue: float | None = None) -> ReportData:
    """Read a spans or pairs file. ``intensity_g_per_kwh``/``pue``: for pairs rows that do not carry
    their own (defaults: the settings' defaults)."""
    p = Path(path)
    docs, notes = _records(p)
    spans: list[dict[str, Any]] = []
    pairs: list[tuple[int, dict[str, Any]]] = []
    other = 0
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            other += 1
        elif "resourceSpans" in d:
            spans.extend(_otlp_json_spans(d))
        elif d.get("signal") == "span" or ("span_id" in d and "name" in d):
            spans.append(d)
        elif d.get("signal") == "metric" or "resourceMetrics" in d:
            continue
        elif "predicted_energy_j" in d or "request_energy_j" in d:
            pairs.append((i, d))
        else:
            other += 1
    if spans and pairs:
        raise ReportError(f"{p}: mixes spans ({len(spans)}) and pairs ({len(pairs)}); give one kind per report")
    if spans:
        data = _from_spans(p, spans, notes)
    elif pairs:
        data = _from_pairs(p, [d for _, d in pairs], notes, intensity_g_per_kwh, pue)
    else:
        raise ReportError(f"{p}: no spans and no pairs in {len(docs)} JSON record(s) (expected the demo's "
                          "spans.jsonl, OTLP/JSON traces, or the plugin's pairs file)")
    if other:
        data.notes.append(f"{other} record(s) that are neither spans nor pairs were skipped")
    data.sha256 = hashlib.sha256(p.read_bytes()).hexdigest()
    return data


def _settings_text(values: Iterable[Any]) -> str:
    c = collections.Counter(str(v) for v in values if v is not None and v != "")
    if not c:
        return "-"
    if len(c) == 1:
        return next(iter(c))
    return ", ".join(f"{v} (x{n})" for v, n in c.most_common())


def _from_spans(path: Path, spans: list[dict[str, Any]], notes: list[str]) -> ReportData:
    requests = [s for s in spans if s.get("name") == SPAN_NAME
                and any(str(k).startswith("llmco2.") for k in (s.get("attributes") or {}))]
    if not requests:
        names = collections.Counter(str(s.get("name")) for s in spans)
        raise ReportError(f"{path}: {len(spans)} span(s) ({', '.join(f'{n} x{c}' for n, c in names.most_common(5))}) "
                          f"but no {SPAN_NAME} span with llmco2.* attributes (was the plugin on?)")
    # Final values of spans that said "pending": llmco2.measurement spans, same trace and parent.
    late: dict[tuple[str, str | None], list[dict[str, Any]]] = collections.defaultdict(list)
    for s in spans:
        if s.get("name") == LATE_SPAN_NAME:
            late[(s.get("trace_id"), s.get("parent_span_id"))].append(s)
    for group in late.values():
        group.sort(key=lambda s: s.get("end_time_unix_nano") or 0)
    rows = []
    unmatched_pending = 0
    for s in sorted(requests, key=lambda s: s.get("end_time_unix_nano") or s.get("start_time_unix_nano") or 0):
        a = s.get("attributes") or {}
        t_ns = s.get("end_time_unix_nano") or s.get("start_time_unix_nano")
        row = Row(
            time_s=t_ns / 1e9 if t_ns else None,
            predicted_energy_j=_num(a.get("llmco2.predicted.energy_j")),
            predicted_prefill_j=_num(a.get("llmco2.predicted.prefill_energy_j")),
            predicted_decode_j=_num(a.get("llmco2.predicted.decode_energy_j")),
            predicted_co2_g=_num(a.get("llmco2.predicted.co2_g")),
            predicted_embodied_co2_g=_num(a.get("llmco2.predicted.embodied_co2_g")),
            source=str(a["llmco2.measured.source"]) if a.get("llmco2.measured.source") is not None else None,
            gen_tokens=_int(a.get("gen_ai.usage.completion_tokens")),
            prompt_tokens=_int(a.get("gen_ai.usage.prompt_tokens")),
            batch=_num(a.get("llmco2.predicted.batch")),
            request_id=str(a.get("gen_ai.request.id")) if a.get("gen_ai.request.id") is not None else None,
        )
        m = a
        if row.source == "pending":
            group = late.get((s.get("trace_id"), s.get("parent_span_id")))
            if group:
                m = group.pop(0).get("attributes") or {}
                row.source = str(m.get("llmco2.measured.source", "pending"))
            else:
                unmatched_pending += 1
        row.measured_energy_j = _num(m.get("llmco2.measured.energy_j"))
        row.measured_prefill_j = _num(m.get("llmco2.measured.prefill_energy_j"))
        row.measured_decode_j = _num(m.get("llmco2.measured.decode_energy_j"))
        row.measured_co2_g = _num(m.get("llmco2.measured.co2_g"))
        f = m.get("llmco2.measured.final")
        row.final = f if isinstance(f, bool) else None
        rows.append(row)
    if unmatched_pending:
        notes.append(f"{unmatched_pending} request(s) said 'pending' and their {LATE_SPAN_NAME} span is not in the file")
    attrs = [s.get("attributes") or {} for s in requests]
    settings = {
        "model": _settings_text(a.get("llmco2.model") for a in attrs),
        "GPU": _settings_text(a.get("llmco2.gpu") for a in attrs),
        "GPUs per replica": _settings_text(a.get("llmco2.n_gpu") for a in attrs),
        "GPU source": _settings_text(a.get("llmco2.gpu.source") for a in attrs),
        "predictor": _settings_text(a.get("llmco2.predictor") for a in attrs),
        "calibrated predictions": _settings_text(a.get("llmco2.predicted.calibrated") for a in attrs),
        "carbon intensity (g CO2e/kWh)": _settings_text(a.get("llmco2.carbon_intensity_g_per_kwh") for a in attrs),
        "carbon intensity source": _settings_text(a.get("llmco2.carbon_intensity.source") for a in attrs),
        "PUE": _settings_text(a.get("llmco2.pue") for a in attrs),
        "measured source": _settings_text(r.source for r in rows),
    }
    settings = {k: v for k, v in settings.items() if v != "-" or k in ("model", "GPU", "PUE")}
    notes.append(f"measured = the {SPAN_NAME} span's value (the engine's first answer: "
                 f"{sum(r.final is True for r in rows)} of {len(rows)} final); a 'pending' span's comes from its "
                 f"{LATE_SPAN_NAME} span")
    return ReportData(str(path), "spans", rows, settings, notes)


def _from_pairs(path: Path, docs: list[dict[str, Any]], notes: list[str], intensity: float | None,
                pue: float | None) -> ReportData:
    rows = []
    assumed = 0
    for d in docs:
        pre, dec = _num(d.get("prefill_energy_j")), _num(d.get("decode_energy_j"))
        energy = _num(d.get("request_energy_j"))
        if energy is None and pre is not None and dec is not None:
            energy = pre + dec
        ci, pu = _num(d.get("carbon_intensity_g_per_kwh")), _num(d.get("pue"))
        if ci is None or pu is None:
            assumed += 1
            ci = ci if ci is not None else (intensity if intensity is not None else DEFAULT_INTENSITY_G_PER_KWH)
            pu = pu if pu is not None else (pue if pue is not None else DEFAULT_PUE)
        pred = _num(d.get("predicted_energy_j"))
        rows.append(Row(
            time_s=_num(d.get("finished_unix_s")),
            predicted_energy_j=pred, predicted_prefill_j=_num(d.get("predicted_prefill_energy_j")),
            predicted_decode_j=_num(d.get("predicted_decode_energy_j")),
            predicted_co2_g=operational_co2_g(max(0.0, pred), pu, ci) if pred is not None else None,
            measured_energy_j=energy, measured_prefill_j=pre, measured_decode_j=dec,
            measured_co2_g=operational_co2_g(max(0.0, energy), pu, ci) if energy is not None else None,
            source=str(d.get("measured_source") or "nvml"), final=bool(d.get("final", True)),
            gen_tokens=_int(d.get("gen_tokens")), prompt_tokens=_int(d.get("prompt_len")),
            batch=_num(d.get("mean_batch")) or _num(d.get("batch")),
            request_id=str(d["request_id"]) if d.get("request_id") is not None else None))
    if any(r.time_s is None for r in rows):
        notes.append("some pairs have no finish time (written before finished_unix_s existed): "
                     "'over time' is file order and they are left out of carbon per hour")
    if assumed:
        notes.append(f"{assumed} pair(s) carry no carbon settings: their CO2 uses intensity "
                     f"{intensity if intensity is not None else DEFAULT_INTENSITY_G_PER_KWH:g} g/kWh and PUE "
                     f"{pue if pue is not None else DEFAULT_PUE:g} (--intensity/--pue)")
    notes.append("pairs are final values of completed requests; predicted CO2 here is operational only")
    settings = {
        "model": _settings_text(d.get("model") for d in docs),
        "GPU": _settings_text(d.get("gpu") for d in docs),
        "GPUs per replica": _settings_text(d.get("n_gpu") for d in docs),
        "dtype": _settings_text(d.get("dtype") for d in docs),
        "predictor": _settings_text(d.get("predictor") for d in docs),
        "carbon intensity (g CO2e/kWh)": _settings_text(
            d.get("carbon_intensity_g_per_kwh", intensity if intensity is not None else DEFAULT_INTENSITY_G_PER_KWH)
            for d in docs),
        "PUE": _settings_text(d.get("pue", pue if pue is not None else DEFAULT_PUE) for d in docs),
        "measured source": _settings_text(r.source for r in rows),
    }
    return ReportData(str(path), "pairs", rows, settings, notes)


# -------------------------------------------------------------------------------------------- summary


def _matched(rows: Sequence[Row]) -> list[Row]:
    """Rows with a prediction and a measured energy (> 0: relative errors need it)."""
    return [r for r in rows if r.predicted_energy_j is not None and r.measured_energy_j is not None
            and r.measured_energy_j > 0]


def summarize(data: ReportData) -> dict[str, Any]:
    """The summary table's numbers (fractions, J, g)."""
    rows = data.rows
    both = _matched(rows)
    p = np.array([r.predicted_energy_j for r in both], dtype=float)
    m = np.array([r.measured_energy_j for r in both], dtype=float)
    out: dict[str, Any] = {
        "requests": len(rows),
        "with_prediction": sum(r.predicted_energy_j is not None for r in rows),
        "with_measurement": sum(r.measured_energy_j is not None for r in rows),
        "compared": len(both),
        "mape": metrics.mape(p, m), "eba_5": metrics.eba(p, m, 0.05),
        "eba_10": metrics.eba(p, m, 0.10), "eba_30": metrics.eba(p, m, 0.30),
        "predicted_energy_j": float(sum(r.predicted_energy_j or 0.0 for r in rows)),
        "measured_energy_j": float(sum(r.measured_energy_j or 0.0 for r in rows)),
        "predicted_over_measured_compared": float(p.sum() / m.sum()) if len(both) else math.nan,
        "predicted_co2_g": float(sum(r.predicted_co2_g or 0.0 for r in rows)),
        # embodied carbon is on spans only (pairs carry energies): NaN says "not in the file"
        "predicted_embodied_co2_g": (float(sum(r.predicted_embodied_co2_g or 0.0 for r in rows))
                                     if any(r.predicted_embodied_co2_g is not None for r in rows) else math.nan),
        "measured_co2_g": float(sum(r.measured_co2_g or 0.0 for r in rows)),
        "output_tokens": int(sum(r.gen_tokens or 0 for r in rows)),
        "sources": dict(collections.Counter(r.source or "none" for r in rows).most_common()),
    }
    for phase in ("prefill", "decode"):
        ph = [(getattr(r, f"predicted_{phase}_j"), getattr(r, f"measured_{phase}_j")) for r in both]
        ph = [(a, b) for a, b in ph if a is not None and b is not None and b > 0]
        out[f"mape_{phase}"] = metrics.mape([a for a, _ in ph], [b for _, b in ph]) if ph else math.nan
    times = [r.time_s for r in rows if r.time_s is not None]
    out["first_unix_s"] = min(times) if times else None
    out["last_unix_s"] = max(times) if times else None
    return out


# ---------------------------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ReportError(f"llmco2 report needs matplotlib, which is not installed: {EXTRA_HINT}") from None
    matplotlib.use("Agg", force=True)  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


_SOURCE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def plot_scatter(ax: Any, rows: Sequence[Row]) -> None:
    both = _matched(rows)
    ax.set_title("Predicted vs measured energy per request")
    if not both:
        _empty(ax, "no request with both a prediction and a measurement")
        return
    m = np.array([r.measured_energy_j for r in both])
    p = np.array([r.predicted_energy_j for r in both])
    positive = p > 0
    lo = float(min(m.min(), p[positive].min() if positive.any() else m.min())) / 1.5
    hi = float(max(m.max(), p.max())) * 1.5
    x = np.geomspace(lo, hi, 100)
    ax.fill_between(x, x * 0.7, x * 1.3, color="#ffcc80", alpha=0.45, lw=0, label="within 30 % (EBA 30%)")
    ax.fill_between(x, x * 0.9, x * 1.1, color="#81c784", alpha=0.6, lw=0, label="within 10 % (EBA 10%)")
    ax.plot(x, x, color="k", lw=0.8, label="predicted = measured")
    sources = list(dict.fromkeys(r.source or "none" for r in both))
    for i, src in enumerate(sources):
        sel = np.array([(r.source or "none") == src for r in both])
        final = np.array([r.final is not False for r in both])
        c = _SOURCE_COLOURS[i % len(_SOURCE_COLOURS)]
        ax.scatter(m[sel & final], p[sel & final], s=16, color=c, alpha=0.8, label=f"measured by {src}")
        if (sel & ~final).any():
            ax.scatter(m[sel & ~final], p[sel & ~final], s=16, facecolors="none", edgecolors=c, alpha=0.8,
                       label=f"{src}, first answer not final")
    if hi / lo > 20:  # log axes only when the energies span orders of magnitude
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        # plain numbers, not 2x10^-1; minor ticks labelled only when there are few decades
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        minor = plain if hi / lo < 100 else FuncFormatter(lambda v, _: "")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(minor)
        ax.tick_params(axis="both", which="minor", labelsize=7)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured energy (J)")
    ax.set_ylabel("predicted energy (J)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.25)


def _time_axis(times: np.ndarray) -> tuple[np.ndarray, str]:
    span = float(times.max() - times.min()) if times.size else 0.0
    t = times - (times.min() if times.size else 0.0)
    if span >= 3 * 3600:
        return t / 3600, "hours since the first request"
    if span >= 180:
        return t / 60, "minutes since the first request"
    return t, "seconds since the first request"


def plot_error_over_time(ax: Any, rows: Sequence[Row]) -> None:
    both = _matched(rows)
    ax.set_title("Prediction error over time")
    if not both:
        _empty(ax, "no request with both a prediction and a measurement")
        return
    timed = all(r.time_s is not None for r in both)
    if timed:
        both = sorted(both, key=lambda r: r.time_s)
        x, xlabel = _time_axis(np.array([r.time_s for r in both]))
    else:
        x, xlabel = np.arange(len(both), dtype=float), "request (file order)"
    err = np.array([(r.predicted_energy_j - r.measured_energy_j) / r.measured_energy_j * 100 for r in both])
    ax.axhspan(-30, 30, color="#ffcc80", alpha=0.45, lw=0, label="±30 %")
    ax.axhspan(-10, 10, color="#81c784", alpha=0.6, lw=0, label="±10 %")
    ax.axhline(0, color="k", lw=0.8)
    # outliers would flatten the bands: clip the view, mark clipped points at the edge
    top = max(40.0, float(np.percentile(err, 98)) * 1.1)
    bottom = min(-40.0, float(np.percentile(err, 2)) * 1.1)
    bottom = max(bottom, -100.0)
    shown = np.clip(err, bottom, top)
    clipped = shown != err
    ax.scatter(x[~clipped], shown[~clipped], s=14, color="#1f77b4", alpha=0.8, label="request")
    if clipped.any():
        ax.scatter(x[clipped], shown[clipped], s=22, marker="^", color="#d62728", clip_on=False,
                   label=f"off scale ({int(clipped.sum())})")
    k = max(1, min(25, len(err) // 5))
    if len(err) >= 5:
        med = np.array([np.median(err[max(0, i - k + 1): i + 1]) for i in range(len(err))])
        ax.plot(x, med, color="#0d47a1", lw=1.5, label=f"running median ({k} requests)")
    ax.set_ylim(bottom, top)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("(predicted − measured) / measured (%)")
    ax.legend(fontsize=7, loc="best", framealpha=0.9)
    ax.grid(True, alpha=0.25)


def _batch_bins(batches: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Batch sizes binned by powers of two (1, 2, 3-4, 5-8, ...) when there are many distinct ones."""
    b = np.maximum(1, np.round(batches)).astype(int)
    distinct = np.unique(b)
    if distinct.size <= 12:
        return b, [str(v) for v in distinct]
    edges = [0, 1] + [2 ** k for k in range(1, 20)]
    idx = np.searchsorted(edges, b, side="left")
    labels = {}
    for i in np.unique(idx):
        lo, hi = edges[i - 1] + 1, edges[i]
        labels[i] = str(hi) if lo == hi else f"{lo}-{hi}"
    return idx, [labels[i] for i in np.unique(idx)]


def plot_energy_per_token(ax: Any, rows: Sequence[Row]) -> None:
    ax.set_title("Energy per output token by batch size")
    use = [r for r in rows if r.gen_tokens and r.gen_tokens > 0 and r.batch is not None
           and (r.measured_energy_j is not None or r.predicted_energy_j is not None)]
    if not use:
        _empty(ax, "no request with output tokens and a batch size")
        return
    keys, labels = _batch_bins(np.array([r.batch for r in use], dtype=float))
    order = np.unique(keys)
    pos = {k: i for i, k in enumerate(order)}
    rng = np.random.default_rng(0)  # jitter only, for overlapping points
    for kind, colour, dx in (("measured", "#1f77b4", -0.12), ("predicted", "#ff7f0e", 0.12)):
        xs, ys, med_x, med_y = [], [], [], []
        for k in order:
            vals = [getattr(r, f"{kind}_energy_j") / r.gen_tokens for r, kk in zip(use, keys)
                    if kk == k and getattr(r, f"{kind}_energy_j") is not None]
            if not vals:
                continue
            xs += list(pos[k] + dx + rng.uniform(-0.06, 0.06, len(vals)))
            ys += vals
            med_x.append(pos[k] + dx)
            med_y.append(float(np.median(vals)))
        if ys:
            ax.scatter(xs, ys, s=10, color=colour, alpha=0.35)
            ax.plot(med_x, med_y, marker="D", color=colour, lw=1.5, label=f"{kind} (median)")
    ax.set_xticks(range(len(order)), labels)
    ax.set_xlabel("batch size (requests in the batch; spans: at admission, pairs: mean over its steps)")
    ax.set_ylabel("J per output token")
    vals = [v for v in (r.measured_energy_j for r in use) if v]
    if vals and max(vals) / max(min(vals), 1e-12) > 30:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.25)


_BUCKETS_S = (1, 5, 10, 30, 60, 300, 600, 900, 1800, 3600)


def carbon_buckets(rows: Sequence[Row]) -> tuple[float, np.ndarray, np.ndarray, np.ndarray] | None:
    """(bucket seconds, bucket start unix s, measured g, predicted operational g) per bucket:
    clock hours when the file covers 3 hours or more, else at most about 12 shorter buckets (grams
    in the bucket, never extrapolated to an hourly rate from a short run)."""
    timed = [r for r in rows if r.time_s is not None]
    if not timed:
        return None
    t = np.array([r.time_s for r in timed])
    span = float(t.max() - t.min())
    width = 3600.0 if span >= 3 * 3600 else float(next((b for b in _BUCKETS_S if span / b <= 12), 3600))
    start = math.floor(t.min() / width) * width
    idx = ((t - start) // width).astype(int)
    n = int(idx.max()) + 1
    meas = np.zeros(n)
    pred = np.zeros(n)
    for r, i in zip(timed, idx):
        meas[i] += r.measured_co2_g or 0.0
        pred[i] += r.predicted_operational_co2_g or 0.0
    return width, start + width * np.arange(n), meas, pred


def plot_carbon_per_hour(ax: Any, rows: Sequence[Row]) -> None:
    b = carbon_buckets(rows)
    if b is None:
        ax.set_title("Carbon per hour (operational)")
        _empty(ax, "no timestamps in this file")
        return
    width, starts, meas, pred = b
    if width == 3600:
        ax.set_title("Carbon per hour (operational)")
    else:
        times = [r.time_s for r in rows if r.time_s is not None]
        ax.set_title(f"Carbon per {_duration(width)} (operational; the file covers "
                     f"{_duration(max(times) - min(times))}, under 3 h)")
    x = np.arange(len(starts))
    ax.bar(x - 0.2, meas, width=0.4, color="#1f77b4", label="measured")
    ax.bar(x + 0.2, pred, width=0.4, color="#ff7f0e", label="predicted")
    fmt = "%H:%M" if width >= 60 else "%H:%M:%S"
    labels = [_dt.datetime.fromtimestamp(s, _dt.timezone.utc).strftime(fmt) for s in starts]
    step = max(1, len(labels) // 12)
    ax.set_xticks(x[::step], labels[::step], rotation=30, fontsize=8)
    day = _dt.datetime.fromtimestamp(starts[0], _dt.timezone.utc).strftime("%Y-%m-%d")
    ax.set_xlabel(f"bucket start, UTC, {day} ({_duration(width)} buckets)")
    ax.set_ylabel("g CO2e" + (" per hour" if width == 3600 else f" per {_duration(width)}"))
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.25)


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


PLOTS = (("scatter", "Predicted vs measured energy, with the EBA 10 % and 30 % bands", plot_scatter),
         ("error_over_time", "Relative error of each request's prediction over time", plot_error_over_time),
         ("energy_per_token", "Energy per output token by batch size", plot_energy_per_token),
         ("carbon_per_hour", "Operational carbon per hour, measured and predicted", plot_carbon_per_hour))


# -------------------------------------------------------------------------------------------- output


def _duration(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 60:
        return f"{s / 60:.3g} min"
    return f"{s:.3g} s"


def _pct(x: float) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f} %"


def _g(x: float, unit: str) -> str:
    return "-" if x is None or x != x else f"{x:.6g} {unit}"


def summary_table(s: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(id, label, text) rows of the summary table."""
    when = "-"
    if s["first_unix_s"] is not None:
        a = _dt.datetime.fromtimestamp(s["first_unix_s"], _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        when = f"{a} UTC, {_duration(round(s['last_unix_s'] - s['first_unix_s'], 1))}"
    return [
        ("requests", "requests in the file", str(s["requests"])),
        ("with_prediction", "with a prediction", str(s["with_prediction"])),
        ("with_measurement", "with a measured energy", str(s["with_measurement"])),
        ("sources", "measured sources", ", ".join(f"{k} x{v}" for k, v in s["sources"].items())),
        ("compared", "compared (both, measured > 0)", str(s["compared"])),
        ("mape", "MAPE, energy per request", _pct(s["mape"])),
        ("mape_prefill", "MAPE, prefill energy", _pct(s["mape_prefill"])),
        ("mape_decode", "MAPE, decode energy", _pct(s["mape_decode"])),
        ("eba_5", "EBA 5 % (share within 5 %)", _pct(s["eba_5"])),
        ("eba_10", "EBA 10 %", _pct(s["eba_10"])),
        ("eba_30", "EBA 30 %", _pct(s["eba_30"])),
        ("predicted_energy_j", "total predicted energy", _g(s["predicted_energy_j"], "J")),
        ("measured_energy_j", "total measured energy", _g(s["measured_energy_j"], "J")),
        ("predicted_over_measured_compared", "predicted / measured, compared requests",
         "-" if s["predicted_over_measured_compared"] != s["predicted_over_measured_compared"]
         else f"{s['predicted_over_measured_compared']:.3f}"),
        ("predicted_co2_g", "total predicted CO2e" + (" (operational)" if s["predicted_embodied_co2_g"] != s[
            "predicted_embodied_co2_g"] else " (oper. + embodied)"), _g(s["predicted_co2_g"], "g")),
        ("predicted_embodied_co2_g", "of which embodied", _g(s["predicted_embodied_co2_g"], "g")),
        ("measured_co2_g", "total measured CO2e (operational)", _g(s["measured_co2_g"], "g")),
        ("output_tokens", "output tokens", str(s["output_tokens"])),
        ("time", "first request, duration", when),
    ]


def _figure_png(plt: Any, plot: Any, rows: Sequence[Row]) -> bytes:
    fig, ax = plt.subplots(figsize=(7.5, 5.2), dpi=110)
    try:
        plot(ax, rows)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1280px;color:#222}
h1{font-size:1.5em;margin-bottom:4px}.meta{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:8px 0 18px}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left;font-size:.92em}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}.grid figure{margin:0}.grid img{width:100%;border:1px solid #ddd}
figcaption{font-size:.85em;color:#555}ul.notes{font-size:.9em;color:#444}"""


def render_html(data: ReportData, s: Mapping[str, Any], pngs: Mapping[str, bytes], title: str) -> str:
    e = html.escape
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>",
             f"<p class='meta'>From the {e(data.kind)} file <code>{e(data.path)}</code> "
             f"(sha256 {e(data.sha256[:16])}…), generated {e(now)} by <code>llmco2 report</code>.</p>",
             "<div style='display:flex;gap:32px;flex-wrap:wrap'><div><h2>Summary</h2>"
             "<table id='summary'><tr><th>quantity</th><th>value</th></tr>"]
    for key, label, text in summary_table(s):
        parts.append(f"<tr><td>{e(label)}</td><td class='num' id='{e(key)}'>{e(text)}</td></tr>")
    parts.append("</table></div><div><h2>Settings used</h2><table id='settings'><tr><th>setting</th><th>value</th></tr>")
    for k, v in data.settings.items():
        parts.append(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>")
    parts.append("</table></div></div>")
    if data.notes:
        parts.append("<h2>Notes</h2><ul class='notes'>" + "".join(f"<li>{e(n)}</li>" for n in data.notes) + "</ul>")
    parts.append("<h2>Plots</h2><div class='grid'>")
    for key, caption, _ in PLOTS:
        b64 = base64.b64encode(pngs[key]).decode("ascii")
        parts.append(f"<figure id='plot-{key}'><img alt='{e(caption)}' src='data:image/png;base64,{b64}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append("</div><p class='meta'>MAPE: mean |predicted − measured| / measured over the compared requests; "
                 "EBA δ: share of them within δ relative error (LLMCO2 paper, §5.1). Measured CO2e is "
                 "operational (energy × PUE × intensity); embodied carbon is predicted only.</p></body></html>")
    return "".join(parts)


def render_png(plt: Any, data: ReportData, s: Mapping[str, Any], title: str) -> bytes:
    """One image: the four plots, the summary table and the settings."""
    fig = plt.figure(figsize=(16, 17), dpi=90)
    gs = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.85], hspace=0.35, wspace=0.2, top=0.94)
    try:
        for i, (_, _, plot) in enumerate(PLOTS):
            plot(fig.add_subplot(gs[i // 2, i % 2]), data.rows)
        for col, (heading, cells) in enumerate((
                ("Summary", [(label, text) for _, label, text in summary_table(s)]),
                ("Settings used", list(data.settings.items())))):
            ax = fig.add_subplot(gs[2, col])
            ax.axis("off")
            ax.set_title(heading, loc="left", fontsize=12)
            tab = ax.table(cellText=[[a, _short(b, 48)] for a, b in cells],
                           colWidths=[0.55, 0.45] if col == 0 else [0.38, 0.62],
                           loc="upper left", cellLoc="left")
            tab.auto_set_font_size(False)
            tab.set_fontsize(9)
            tab.scale(1, 1.25)
        fig.suptitle(f"{title}\n{data.kind} file {data.path}", fontsize=13)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _write_atomic(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(source: str | os.PathLike, html_path: str | os.PathLike | None = None,
                 png_path: str | os.PathLike | None = None, *, title: str | None = None,
                 intensity_g_per_kwh: float | None = None, pue: float | None = None) -> dict[str, Any]:
    """Read ``source`` and write the HTML and/or PNG report. Returns the summary (plus ``html``
    and ``png``: the paths written). Raises :class:`ReportError` before writing anything when the
    input or matplotlib is missing."""
    if html_path is None and png_path is None:
        raise ReportError("nothing to write: give an HTML path, a PNG path or both")
    plt = _pyplot()
    data = load(source, intensity_g_per_kwh=intensity_g_per_kwh, pue=pue)
    s = summarize(data)
    title = title or f"llmco2 report: {data.settings.get('model', '-')} on {data.settings.get('GPU', '-')}"
    out: dict[str, Any] = dict(s)
    if html_path is not None:
        pngs = {key: _figure_png(plt, plot, data.rows) for key, _, plot in PLOTS}
        _write_atomic(Path(html_path), render_html(data, s, pngs, title).encode("utf-8"))
        out["html"] = str(Path(html_path).resolve())
    if png_path is not None:
        _write_atomic(Path(png_path), render_png(plt, data, s, title))
        out["png"] = str(Path(png_path).resolve())
    return out


# ------------------------------------------------------------------------------------------------ CLI


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="HTML/PNG report of predicted vs measured energy and carbon "
                                      "from a spans file or a pairs file (needs the 'report' extra)")
    r.add_argument("input", help="spans file (the demo's spans.jsonl, OTLP/JSON) or pairs file (LLMCO2_PAIRS_PATH)")
    r.add_argument("--out", help="HTML report to write (default: report.html next to the input unless --png is given)")
    r.add_argument("--png", help="also (or only) write the report as one PNG image")
    r.add_argument("--title")
    r.add_argument("--intensity", type=float, help="g CO2e/kWh for pairs rows without their own "
                                                   f"(default {DEFAULT_INTENSITY_G_PER_KWH:g})")
    r.add_argument("--pue", type=float, help=f"PUE for pairs rows without their own (default {DEFAULT_PUE:g})")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(func=cmd_report)


def cmd_report(args: Any) -> int:
    html_path = args.out
    if html_path is None and args.png is None:
        html_path = str(Path(args.input).with_name("report.html"))
    s = write_report(args.input, html_path, args.png, title=args.title, intensity_g_per_kwh=args.intensity,
                     pue=args.pue)
    if args.json:
        print(json.dumps(s, indent=2, default=str, allow_nan=True))
    else:
        print(f"{s['compared']} of {s['requests']} requests compared: MAPE {_pct(s['mape'])}, "
              f"EBA 10% {_pct(s['eba_10'])}, EBA 30% {_pct(s['eba_30'])}")
        for key in ("html", "png"):
            if key in s:
                print(f"report ({key}): {s[key]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmco2_serve.reporting.report")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["report", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ReportError as e:
        print(f"llmco2 report: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
