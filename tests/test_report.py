"""``llmco2 report`` (issue 8 §5) from a spans file and from a pairs file.

The spans file is written the way the demo writes it: spans exported by the real OpenTelemetry SDK
over OTLP/HTTP to the real receiver (``OtlpReceiver(jsonl_path=...)``). The pairs file is written by
the plugin's own ``PairsWriter``. The summary table's numbers are checked against a computation of
the test's own from the values it put in the file (MAPE and EBA by their definitions, sums, J -> kWh).
"""

from __future__ import annotations

import base64
import json
import math
import random
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from llmco2_serve.reporting.report import ReportError, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0_NS = 1_764_640_000_000_000_000  # 2025-12-02 01:46:40 UTC


class _Cells(HTMLParser):
    """td id -> text, and the data: URIs of the images."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, str] = {}
        self.images: list[str] = []
        self.external: list[str] = []
        self._id: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and a.get("id"):
            self._id = a["id"]
            self.cells[self._id] = ""
        for key in ("src", "href"):
            v = a.get(key)
            if v and v.startswith("data:image/png;base64,"):
                self.images.append(v)
            elif v:
                self.external.append(v)

    def handle_endtag(self, tag):
        if tag == "td":
            self._id = None

    def handle_data(self, data):
        if self._id is not None:
            self.cells[self._id] += data


def _parse(path: Path) -> _Cells:
    p = _Cells()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _pct(text: str) -> float:
    assert text.endswith(" %"), text
    return float(text[:-2]) / 100


def _quantity(text: str, unit: str) -> float:
    assert text.endswith(" " + unit), text
    return float(text[: -len(unit) - 1])


def _expected(pred: list[float], meas: list[float]) -> dict[str, float]:
    """MAPE and EBA by their definitions (LLMCO2 §5.1), loop by loop."""
    errs = [abs(p - m) / m for p, m in zip(pred, meas)]
    return {"mape": sum(errs) / len(errs), **{f"eba_{b}": sum(e <= b / 100 for e in errs) / len(errs)
                                               for b in (5, 10, 30)}}


def _assert_plots(cells: _Cells, png_path: Path | None = None) -> None:
    import matplotlib.image

    assert len(cells.images) == 4
    assert not cells.external, cells.external  # self-contained: nothing fetched from elsewhere
    decoded = [base64.b64decode(uri.split(",", 1)[1]) for uri in cells.images]
    assert all(d.startswith(PNG_MAGIC) for d in decoded)
    assert len(set(decoded)) == 4
    for d in decoded:  # each image has something drawn on it, not one flat colour
        img = matplotlib.image.imread(__import__("io").BytesIO(d))
        assert img.shape[0] > 200 and img.shape[1] > 300 and float(img[..., :3].std()) > 0.05
    if png_path is not None:
        raw = png_path.read_bytes()
        assert raw.startswith(PNG_MAGIC)
        img = matplotlib.image.imread(png_path)
        assert img.shape[0] > 1000 and float(img[..., :3].std()) > 0.05


# ------------------------------------------------------------------------------------------- spans


def _export_spans(tmp: Path, requests: list[dict]) -> Path:
    """Export llm_request spans (and llmco2.measurement spans for pending ones) through the OTel
    SDK to the real receiver, which writes the JSON lines the demo writes."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from llmco2_serve.devtools.otlp_receiver import OtlpReceiver

    path = tmp / "spans.jsonl"
    with OtlpReceiver(jsonl_path=path) as rx:
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=rx.traces_endpoint, timeout=5)))
        tracer = provider.get_tracer("test")
        n_spans = 0
        for i, r in enumerate(requests):
            parent = SpanContext(trace_id=i + 1, span_id=0xABC0 + i, is_remote=True, trace_flags=TraceFlags(1))
            ctx = trace.set_span_in_context(NonRecordingSpan(parent))
            end = T0_NS + r["t_s"] * 1_000_000_000
            span = tracer.start_span("llm_request", context=ctx, start_time=end - 500_000_000,
                                     attributes=r["attrs"])
            span.end(end_time=end)
            n_spans += 1
            if r.get("late"):
                late = tracer.start_span("llmco2.measurement", context=ctx, start_time=end + 1000)
                late.set_attributes(r["late"])
                late.end(end_time=end + 2000)
                n_spans += 1
        # something that is not a request span: skipped
        tracer.start_span("other").end()
        provider.force_flush()
        rx.wait_for_spans(count=n_spans + 1, timeout_s=10)
        provider.shutdown()
    return path


def _span_requests(n: int = 24) -> list[dict]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        meas = rng.uniform(2.0, 60.0)
        pred = meas * rng.uniform(0.6, 1.5)
        gen = rng.randint(3, 90)
        attrs = {"llmco2.predicted.energy_j": pred, "llmco2.predicted.prefill_energy_j": pred * 0.3,
                 "llmco2.predicted.decode_energy_j": pred * 0.7, "llmco2.predicted.co2_g": pred * 2e-4,
                 "llmco2.predicted.embodied_co2_g": pred * 5e-5, "llmco2.predicted.batch": rng.choice([1, 2, 4, 8]),
                 "gen_ai.usage.completion_tokens": gen, "gen_ai.usage.prompt_tokens": 50,
                 "llmco2.model": "tiny-llama", "llmco2.gpu": "H100-SXM-80GB", "llmco2.pue": 1.2,
                 "llmco2.carbon_intensity_g_per_kwh": 481.0, "gen_ai.request.id": f"req-{i}"}
        r = {"t_s": 30 * i, "pred": pred, "meas": meas, "co2": meas * 1.6e-4, "gen": gen}
        if i % 6 == 5:  # stop string: the span says pending, the final value follows in its trace
            attrs["llmco2.measured.source"] = "pending"
            r["late"] = {"llmco2.measured.source": "nvml", "llmco2.measured.energy_j": meas,
                         "llmco2.measured.co2_g": r["co2"], "llmco2.measured.final": True}
        else:
            attrs.update({"llmco2.measured.source": "nvml", "llmco2.measured.energy_j": meas,
                          "llmco2.measured.prefill_energy_j": meas * 0.25,
                          "llmco2.measured.decode_energy_j": meas * 0.75, "llmco2.measured.co2_g": r["co2"],
                          "llmco2.measured.final": i % 4 != 0})
        r["attrs"] = attrs
        out.append(r)
    # a request the engine could not measure: counted, not compared
    out.append({"t_s": 30 * n, "pred": 5.0, "meas": None, "co2": 0.0, "gen": 4,
                "attrs": {"llmco2.predicted.energy_j": 5.0, "llmco2.measured.source": "unavailable",
                          "gen_ai.usage.completion_tokens": 4}})
    return out


@pytest.fixture(scope="module")
def spans_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report_spans")
    reqs = _span_requests()
    spans = _export_spans(tmp, reqs)
    summary = write_report(spans, tmp / "report.html", tmp / "report.png")
    return {"reqs": reqs, "spans": spans, "html": tmp / "report.html", "png": tmp / "report.png",
            "summary": summary}


def test_spans_report_summary_matches_the_input(spans_report):
    reqs = spans_report["reqs"]
    cells = _parse(spans_report["html"]).cells
    measured = [r for r in reqs if r["meas"] is not None]
    exp = _expected([r["pred"] for r in measured], [r["meas"] for r in measured])
    assert cells["requests"] == str(len(reqs))
    assert cells["compared"] == str(len(measured))
    assert cells["with_measurement"] == str(len(measured))
    for key in ("mape", "eba_5", "eba_10", "eba_30"):
        assert _pct(cells[key]) == pytest.approx(exp[key], abs=0.0006), key
    assert _quantity(cells["predicted_energy_j"], "J") == pytest.approx(sum(r["pred"] for r in reqs), rel=1e-5)
    assert _quantity(cells["measured_energy_j"], "J") == pytest.approx(sum(r["meas"] for r in measured), rel=1e-5)
    assert _quantity(cells["measured_co2_g"], "g") == pytest.approx(sum(r["co2"] for r in measured), rel=1e-5)
    assert cells["output_tokens"] == str(sum(r["gen"] for r in reqs))
    assert "nvml x24" in cells["sources"] and "unavailable x1" in cells["sources"]
    # prefill MAPE from the spans that carry phases (the pending ones' late spans do not)
    phased = [r for r in measured if "llmco2.measured.prefill_energy_j" in r["attrs"]]
    exp_pre = _expected([r["pred"] * 0.3 for r in phased], [r["meas"] * 0.25 for r in phased])["mape"]
    assert _pct(cells["mape_prefill"]) == pytest.approx(exp_pre, abs=0.0006)


def test_spans_report_has_plots_and_settings(spans_report):
    html_text = spans_report["html"].read_text()
    parsed = _parse(spans_report["html"])
    _assert_plots(parsed, spans_report["png"])
    for needle in ("tiny-llama", "H100-SXM-80GB", "481", "1.2"):
        assert needle in html_text
    assert "first answer" in html_text  # says which measured value it used


def test_otlp_json_document(tmp_path):
    """The OTel Collector file exporter's OTLP/JSON: int64 as strings, typed attribute values."""
    def kv(k, v):
        t = {bool: "boolValue", int: "intValue", float: "doubleValue", str: "stringValue"}[type(v)]
        return {"key": k, "value": {t: str(v) if t == "intValue" else v}}

    pm = [(10.0, 8.0), (3.0, 4.0), (7.5, 7.0)]
    spans = [{"traceId": f"{i + 1:032x}", "spanId": f"{i + 1:016x}", "name": "llm_request",
              "startTimeUnixNano": str(T0_NS + i * 10**9), "endTimeUnixNano": str(T0_NS + i * 10**9 + 5),
              "attributes": [kv("llmco2.predicted.energy_j", p), kv("llmco2.measured.energy_j", m),
                             kv("llmco2.measured.source", "nvml"), kv("llmco2.measured.final", True),
                             kv("gen_ai.usage.completion_tokens", 12), kv("llmco2.predicted.batch", 2)]}
             for i, (p, m) in enumerate(pm)]
    path = tmp_path / "otlp.json"
    path.write_text(json.dumps({"resourceSpans": [{"resource": {}, "scopeSpans": [{"spans": spans}]}]}, indent=1))
    s = write_report(path, tmp_path / "r.html")
    cells = _parse(tmp_path / "r.html").cells
    assert cells["compared"] == "3" and cells["output_tokens"] == "36"
    assert _pct(cells["mape"]) == pytest.approx(_expected(*zip(*pm))["mape"], abs=0.0006)
    assert s["compared"] == 3


# ------------------------------------------------------------------------------------------- pairs


def _write_pairs(path: Path, n: int = 30) -> list[dict]:
    from llmco2_serve.runtime.pairs import PairsWriter

    rng = random.Random(3)
    rows = []
    w = PairsWriter(path)
    for i in range(n):
        pre, dec = rng.uniform(0.5, 5.0), rng.uniform(1.0, 40.0)
        row = {"model": "tiny-llama", "gpu": "H100-SXM-80GB", "n_gpu": 1, "dtype": "float32",
               "batch": rng.choice([1, 3, 6]), "mean_batch": None, "prompt_len": 40, "gen_tokens": rng.randint(5, 60),
               "prefill_energy_j": pre, "decode_energy_j": dec, "request_energy_j": pre + dec,
               "predicted_prefill_energy_j": pre * rng.uniform(0.7, 1.3),
               "predicted_decode_energy_j": dec * rng.uniform(0.7, 1.3), "final": True,
               "measured_source": "nvml", "request_id": f"r{i}", "predictor": "llmco2-gnn 1"}
        row["predicted_energy_j"] = row["predicted_prefill_energy_j"] + row["predicted_decode_energy_j"]
        if i >= n // 2:  # newer rows carry time and their carbon settings
            row.update(finished_unix_s=T0_NS / 1e9 + 20 * i, carbon_intensity_g_per_kwh=300.0, pue=1.1)
        rows.append(row)
        w.write(row)
    assert w.close()
    return rows


def test_pairs_report_summary_matches_the_input(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = _write_pairs(path)
    with open(path, "a") as f:
        f.write('{"model": "tiny-llama", "request_ene')  # a crash cut the last row: skipped
    out = tmp_path / "pairs-report.html"
    png = tmp_path / "pairs-report.png"
    write_report(path, out, png, intensity_g_per_kwh=400.0, pue=1.5)
    parsed = _parse(out)
    cells = parsed.cells
    exp = _expected([r["predicted_energy_j"] for r in rows], [r["request_energy_j"] for r in rows])
    assert cells["requests"] == str(len(rows)) and cells["compared"] == str(len(rows))
    for key in ("mape", "eba_5", "eba_10", "eba_30"):
        assert _pct(cells[key]) == pytest.approx(exp[key], abs=0.0006), key
    exp_dec = np.mean([abs(r["predicted_decode_energy_j"] - r["decode_energy_j"]) / r["decode_energy_j"] for r in rows])
    assert _pct(cells["mape_decode"]) == pytest.approx(exp_dec, abs=0.0006)
    # CO2: each row's own settings, the command line's where a row has none; 1 kWh = 3.6e6 J
    co2 = sum(r["request_energy_j"] / 3.6e6 * r.get("carbon_intensity_g_per_kwh", 400.0) * r.get("pue", 1.5)
              for r in rows)
    assert _quantity(cells["measured_co2_g"], "g") == pytest.approx(co2, rel=1e-5)
    assert _quantity(cells["measured_energy_j"], "J") == pytest.approx(sum(r["request_energy_j"] for r in rows),
                                                                        rel=1e-5)
    _assert_plots(parsed, png)
    text = out.read_text()
    assert "cut off" in text and "400" in text  # says what it skipped and what it assumed


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("\n  \n", "empty"),
    ('{"a": 1}\nnot json at all\n{"b": 2}\n', ":2: not JSON"),
    ('{"a": 1}\n{"b": 2}\n', "no spans and no pairs"),
    ('{"signal": "span", "name": "llm_request", "span_id": "01", "trace_id": "02", "attributes": {"x": 1}}\n',
     "no llm_request span with llmco2"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, content, message):
    bad = tmp_path / "in.jsonl"
    bad.write_text(content)
    with pytest.raises(ReportError, match=message):
        write_report(bad, tmp_path / "r.html", tmp_path / "r.png")
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r.png").exists()
    r = subprocess.run([sys.executable, "-m", "llmco2_serve.cli", "report", str(bad), "--out", str(tmp_path / "c.html")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "llmco2 report: error:" in r.stderr and str(bad) in r.stderr, r.stderr
    assert not (tmp_path / "c.html").exists()


def test_missing_file(tmp_path):
    with pytest.raises(ReportError, match="no such file"):
        write_report(tmp_path / "nope.jsonl", tmp_path / "r.html")


def test_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "pairs.jsonl"
    _write_pairs(path, 3)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ReportError, match=r"llmco2-serve\[report\]"):
        write_report(path, tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_cli_writes_report_and_json_summary(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = _write_pairs(path, 12)
    r = subprocess.run([sys.executable, "-m", "llmco2_serve.cli", "report", str(path), "--json"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert Path(s["html"]) == (tmp_path / "report.html").resolve() and Path(s["html"]).is_file()
    exp = _expected([x["predicted_energy_j"] for x in rows], [x["request_energy_j"] for x in rows])
    assert s["mape"] == pytest.approx(exp["mape"], rel=1e-9) and s["compared"] == 12
    assert not math.isnan(s["eba_30"])
