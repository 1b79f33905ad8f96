"""A Grafana dashboard for the plugin's series on vLLM's ``/metrics``, generated from code.

Plain Python dicts in Grafana's dashboard JSON model (schema 39), one :func:`_panel` per chart, as
vLLM ships its own dashboards (``examples/online_serving/dashboards/grafana``). Every query joins on
``model_name``, the label vLLM puts on its ``vllm:*`` series, and is filtered by the dashboard's
``model_name`` variable. ``llmco2 dashboard --out FILE.json`` writes it; :func:`check` reports every
``llmco2_*`` series a panel queries that :mod:`llmco2_serve.reporting.prometheus` does not export
(names and label names, read from its :data:`~llmco2_serve.reporting.prometheus.SPECS`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from llmco2_serve.reporting import prometheus as prom

__all__ = ["build_dashboard", "panel_queries", "check", "write_dashboard", "RATE_WINDOW", "MODEL_VAR"]

DATASOURCE: Final = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RATE_WINDOW: Final = "$__rate_interval"
MODEL_VAR: Final = "$model_name"
_M: Final = f'model_name=~"{MODEL_VAR}"'  # every llmco2 and vllm selector carries it
_W: Final = f"[{RATE_WINDOW}]"
_GRID_W: Final = 12  # two panels per row of Grafana's 24 columns
_GRID_H: Final = 8


def _rate(selector: str, by: str = "model_name") -> str:
    return f"sum by ({by}) (rate({selector}{_W}))"


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def _panel(title: str, description: str, unit: str, targets: Iterable[tuple[str, str]],
           kind: str = "timeseries", decimals: int | None = None) -> dict[str, Any]:
    """One panel; ``targets``: (PromQL, legend) pairs. Positions are set by :func:`build_dashboard`."""
    defaults: dict[str, Any] = {"unit": unit}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [_target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(targets)],
    }


def _eba(bound: str) -> str:
    """Share of finished requests whose |predicted/measured - 1| <= bound (a histogram bucket)."""
    bucket = f'llmco2_prediction_relative_error_bucket{{{_M},phase="total",le="{bound}"}}'
    count = f'llmco2_prediction_relative_error_count{{{_M},phase="total"}}'
    return f"{_rate(bucket)} / {_rate(count)}"


def _panels() -> list[dict[str, Any]]:
    measured = f'llmco2_energy_joules_total{{{_M},kind="measured"}}'
    predicted = f'llmco2_energy_joules_total{{{_M},kind="predicted"}}'
    tokens = f"vllm:generation_tokens_total{{{_M}}}"
    success = f"vllm:request_success_total{{{_M}}}"
    co2 = "llmco2_co2_grams_total{%s,kind=\"%s\"}"
    err_sum = f'llmco2_prediction_relative_error_sum{{{_M},phase="total"}}'
    err_count = f'llmco2_prediction_relative_error_count{{{_M},phase="total"}}'
    return [
        _panel("Energy per output token", "GPU energy per generated token: the plugin's energy rate over "
               "vLLM's generation-token rate, joined on model_name.", "J", [
                   (f"{_rate(measured)} / {_rate(tokens)}", "measured {{model_name}}"),
                   (f"{_rate(predicted)} / {_rate(tokens)}", "predicted {{model_name}}")]),
        _panel("Energy per request", "GPU energy per finished request (vllm:request_success_total, every "
               "finish reason).", "J", [
                   (f"{_rate(measured)} / {_rate(success)}", "measured {{model_name}}"),
                   (f"{_rate(predicted)} / {_rate(success)}", "predicted {{model_name}}")]),
        _panel("Carbon per request", "gCO2e per finished request: measured is operational (energy x PUE x "
               "intensity); predicted adds the embodied share of the GPUs' manufacturing carbon.", "g", [
                   (f"{_rate(co2 % (_M, 'measured'))} / {_rate(success)}", "measured {{model_name}}"),
                   (f"{_rate(co2 % (_M, 'predicted'))} / {_rate(success)}", "predicted {{model_name}}")]),
        _panel("Carbon per hour", "gCO2e emitted per hour at the current rate, by kind and scope.", "g", [
                   (f"3600 * {_rate(co2 % (_M, 'measured'), 'model_name, scope')}",
                    "measured {{scope}} {{model_name}}"),
                   (f"3600 * {_rate(co2 % (_M, 'predicted'), 'model_name, scope')}",
                    "predicted {{scope}} {{model_name}}")]),
        _panel("Energy rate, predicted vs measured", "Power drawn by requests (J/s) per phase, predicted at "
               "arrival and measured by the energy counters (final values).", "watt", [
                   (_rate(f"llmco2_energy_joules_total{{{_M}}}", "model_name, kind, phase"),
                    "{{kind}} {{phase}} {{model_name}}")]),
        _panel("Prediction accuracy (EBA)", "Error-bound accuracy: share of finished requests predicted within "
               "10 % and 30 % of the measured energy, from the error histogram's buckets; MAPE from its sum "
               "and count.", "percentunit", [
                   (_eba("0.1"), "EBA(10%) {{model_name}}"),
                   (_eba("0.3"), "EBA(30%) {{model_name}}"),
                   (f"{_rate(err_sum)} / {_rate(err_count)}", "MAPE {{model_name}}")]),
        _panel("Idle share", "Share of the GPUs' counted energy spent while no request ran.", "percentunit", [
                   (f"{_rate(f'llmco2_idle_energy_joules_total{{{_M}}}')} / "
                    f"{_rate(f'llmco2_gpu_energy_joules_total{{{_M}}}')}", "idle {{model_name}}")]),
        _panel("Counters' total vs attributed", "Energy counters' total power and where it went: to requests "
               "(measured), idle, or work of requests already reported (unreported). measured + idle + "
               "unreported = total.", "watt", [
                   (_rate(f"llmco2_gpu_energy_joules_total{{{_M}}}"), "total {{model_name}}"),
                   (_rate(measured), "attributed to requests {{model_name}}"),
                   (_rate(f"llmco2_idle_energy_joules_total{{{_M}}}"), "idle {{model_name}}"),
                   (_rate(f"llmco2_unreported_energy_joules_total{{{_M}}}"), "unreported {{model_name}}")]),
        _panel("Carbon intensity", "Grid carbon intensity the plugin uses now, and its source.",
               "none", [(f"max by (model_name, source) (llmco2_carbon_intensity_grams_per_kwh{{{_M}}})",
                         "gCO2e/kWh {{source}}")]),
        _panel("Admission decisions", "Admission control's decisions per second, by decision and reason.",
               "reqps", [(_rate("llmco2_admission_decisions_total", "decision, reason"),
                          "{{decision}} ({{reason}})")]),
        _panel("Calibration", "This deployment's learnt correction of the GNN per phase, and how many final "
               "measurements it has learnt from.", "none", [
                   (f"max by (model_name, phase) (llmco2_calibration_factor_ratio{{{_M}}})",
                    "factor {{phase}} {{model_name}}"),
                   (f"max by (model_name) (llmco2_calibration_observations{{{_M}}})",
                    "observations {{model_name}}")]),
        _panel("Plugin failures", "Failures of the plugin's vLLM patches (vLLM carried on without it for "
               "that call).", "short", [(f"sum by (patch) (increase(llmco2_plugin_failures_total{_W}))",
                                          "{{patch}}")]),
    ]


def build_dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (import it, pick the Prometheus data source)."""
    panels = _panels()
    for i, p in enumerate(panels):
        p["id"] = i + 1
        p["gridPos"] = {"h": _GRID_H, "w": _GRID_W, "x": (i % 2) * _GRID_W, "y": (i // 2) * _GRID_H}
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "title": "llmco2: energy and carbon of vLLM requests",
        "uid": "llmco2-serve",
        "description": "Predicted and measured energy and carbon per request from the llmco2-serve vLLM "
                       "plugin, on vLLM's own /metrics (generated by `llmco2 dashboard`).",
        "tags": ["vllm", "llmco2", "energy", "carbon"],
        "editable": True, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "DS_PROMETHEUS", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0},
            {"name": "model_name", "label": "Model", "type": "query", "datasource": DATASOURCE,
             "query": {"query": "label_values(llmco2_energy_joules_total, model_name)", "refId": "model"},
             "definition": "label_values(llmco2_energy_joules_total, model_name)",
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "hide": 0},
        ]},
        "panels": panels,
    }


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target."""
    return [(p.get("title", "?"), t["expr"]) for p in dashboard.get("panels", ()) for t in p.get("targets", ())
            if t.get("expr")]


# A selector: metric name, optionally followed by {matchers}.
_SELECTOR = re.compile(r"(?<![\w:])(llmco2_[A-Za-z0-9_]+)(\{[^}]*\})?")
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def check(dashboard: Mapping[str, Any]) -> list[str]:
    """Problems with the dashboard's llmco2 queries: a series the plugin does not export, or a label
    its instrument does not have. Empty when every query can be answered."""
    specs = {series: spec for spec in prom.SPECS + prom.FOREIGN_SPECS for series in spec.series()}
    problems = []
    for title, expr in panel_queries(dashboard):
        for m in _SELECTOR.finditer(expr):
            name, matchers = m.group(1), m.group(2) or ""
            spec = specs.get(name)
            if spec is None:
                problems.append(f"panel {title!r} queries {name}, which the plugin does not export "
                                f"(exported: {', '.join(sorted(specs))})")
                continue
            allowed = set(spec.labels) | ({"le"} if name.endswith("_bucket") else set())
            for label in _MATCHER_LABEL.findall(matchers):
                if label not in allowed:
                    problems.append(f"panel {title!r} filters {name} on label {label!r}, which it does not "
                                    f"have (labels: {', '.join(sorted(allowed))})")
    return problems


def write_dashboard(path: str) -> dict[str, Any]:
    dashboard = build_dashboard()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dashboard, f, indent=2, sort_keys=False)
        f.write("\n")
    return dashboard
