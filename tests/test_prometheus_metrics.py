"""Prometheus exposition (reporting/prometheus.py) without a vLLM server: multiprocess mode (what
vLLM uses with --api-server-count > 1), the core without prometheus_client, the dashboard's check
and CLI, and OTel metrics to the standard OTEL_EXPORTER_OTLP_METRICS_ENDPOINT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import resources

import pytest

from llmco2_serve.reporting import dashboard as dash
from llmco2_serve.reporting.prometheus import SPECS, exported_series

PROMTOOL = shutil.which("promtool")


def _py(code: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


_WRITER = """
    import sys
    from llmco2_serve.reporting.prometheus import process_metrics
    m = process_metrics()
    pre, dec, err, g = (float(x) for x in sys.argv[1:5])
    m.record_predicted(model="m", requests=1, prefill_energy_j=pre, decode_energy_j=dec,
                       operational_co2_g=0.5, embodied_co2_g=0.25)
    m.record_measured(model="m", prefill_energy_j=pre, decode_energy_j=dec, operational_co2_g=0.5,
                      relative_errors={"total": err})
    m.record_gpu_energy(model="m", gpu="0:cuda:0", kind="total", energy_j=100.0)
    m.set_carbon_intensity(model="m", g_per_kwh=g, source="static")
    m.record_failures({"scheduler.schedule": 2})
"""


def test_multiprocess_mode_adds_up_over_api_servers(tmp_path):
    """Two API-server processes record into PROMETHEUS_MULTIPROC_DIR; the registry vLLM serves then
    (vllm/v1/metrics/prometheus.py get_prometheus_registry: a CollectorRegistry over a
    MultiProcessCollector) shows the sums, and the gauge the most recent value."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for args in (("10", "20", "0.05", "300"), ("1", "2", "0.2", "400")):  # the second one writes last
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_WRITER), *args], capture_output=True,
                              text=True, timeout=120, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-3000:]
    text = _py("""
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        print(generate_latest(registry).decode())
    """, env)
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    assert samples['llmco2_energy_joules_total{kind="predicted",model_name="m",phase="prefill"}'] == 11
    assert samples['llmco2_energy_joules_total{kind="measured",model_name="m",phase="decode"}'] == 22
    assert samples['llmco2_gpu_energy_joules_total{gpu="0:cuda:0",model_name="m"}'] == 200
    assert samples['llmco2_plugin_failures_total{patch="scheduler.schedule"}'] == 4
    hist = 'llmco2_prediction_relative_error_bucket{direction="over",le="%s",model_name="m",phase="total"}'
    assert samples[hist % "0.1"] == 1 and samples[hist % "0.3"] == 2 and samples[hist % "+Inf"] == 2
    assert samples['llmco2_carbon_intensity_grams_per_kwh{model_name="m",source="static"}'] == 400
    if PROMTOOL:
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), check.stdout + check.stderr


def test_core_imports_and_serves_without_prometheus_client():
    out = _py("""
        import sys
        sys.modules["prometheus_client"] = None  # not installed
        from llmco2_serve.reporting import prometheus, dashboard
        import llmco2_serve.runtime.service
        print(prometheus.available(), prometheus.process_metrics(), dashboard.check(dashboard.build_dashboard()))
    """)
    assert out.split() == ["False", "None", "[]"]


def test_names_follow_prometheus_conventions():
    for spec in SPECS:
        assert spec.name.startswith("llmco2_") and not spec.name.endswith("_total")
        if spec.kind == "counter":
            assert any(u in spec.name for u in ("_joules", "_grams", "_requests", "_failures")), spec.name
    relative = next(s for s in SPECS if s.kind == "histogram")
    assert 0.1 in relative.buckets and 0.3 in relative.buckets  # EBA(10 %), EBA(30 %) from buckets


def test_dashboard_check_names_a_series_or_label_the_plugin_does_not_export(tmp_path):
    board = dash.build_dashboard()
    assert dash.check(board) == []
    queried = {m.group(1) for _, e in dash.panel_queries(board) for m in dash._SELECTOR.finditer(e)}
    assert queried <= exported_series()
    assert {"llmco2_energy_joules_total", "llmco2_prediction_relative_error_bucket",
            "llmco2_admission_decisions_total", "llmco2_carbon_intensity_grams_per_kwh"} <= queried
    assert any("vllm:generation_tokens_total" in e for _, e in dash.panel_queries(board))
    bad = json.loads(json.dumps(board).replace("llmco2_idle_energy_joules_total", "llmco2_idle_energy_total")
                     .replace('kind=\\"measured\\"', 'scope=\\"measured\\"', 1))
    problems = dash.check(bad)
    assert any("llmco2_idle_energy_total" in p and "does not export" in p for p in problems), problems
    assert any("label 'scope'" in p for p in problems), problems
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    cli = [sys.executable, "-m", "llmco2_serve.cli", "dashboard"]
    r = subprocess.run(cli + ["--check", str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "llmco2_idle_energy_total" in r.stderr
    out = tmp_path / "board.json"
    r = subprocess.run(cli + ["--out", str(out), "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text()) == board


def test_shipped_dashboard_is_the_generated_one():
    shipped = resources.files("llmco2_serve.data") / "llmco2_grafana_dashboard.json"
    assert json.loads(shipped.read_text()) == dash.build_dashboard(), \
        "regenerate: llmco2 dashboard --out llmco2_serve/data/llmco2_grafana_dashboard.json"


def test_otel_metrics_go_to_the_standard_endpoint_variable():
    from llmco2_serve.devtools.otlp_receiver import OtlpReceiver
    from llmco2_serve.runtime.telemetry import EnergyMetrics, configure_otel, standard_metrics_endpoint

    assert standard_metrics_endpoint({}) is None
    assert standard_metrics_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == \
        ("http://c:4318/v1/metrics", "http/protobuf")
    with pytest.raises(ValueError, match="protocol"):
        standard_metrics_endpoint({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics",
                                   "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "thrift"})
    with OtlpReceiver() as rx:
        target = standard_metrics_endpoint({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": rx.metrics_endpoint})
        handles = configure_otel(None, metrics_endpoint=target, metric_export_interval_s=60)
        try:
            assert handles.metrics_owner in ("llmco2", "host")
            if handles.metrics_owner == "host":
                pytest.skip("this process already has a global meter provider")
            EnergyMetrics(handles.meter).record_predicted(model="m", predictor="p", prefill_energy_j=1.5,
                                                          decode_energy_j=2.5, co2_g=0.1)
            assert handles.force_flush()
            rows = rx.metrics("llmco2.energy")
        finally:
            handles.shutdown()
    assert sorted(r["value"] for r in rows) == [1.5, 2.5]
