"""Admission control core (llmco2_serve/admission), without vLLM: config validation and reload,
rolling-window budgets (exact under 200 threads, persisted in SQLite), caps, lowering, priority,
deferral, fail-open when the store cannot be used."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time

import pytest

from llmco2_serve.admission import (
    AdmissionConfigError, AdmissionController, AdmissionRequest, BudgetLedger, ConfigWatcher, Predicted,
    load_config_file, parse_config, tenant_from_headers,
)
from llmco2_serve.admission.config import Window


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def pred(co2_upper: float, co2: float | None = None, max_tokens: int = 100) -> Predicted:
    co2 = co2_upper / 4 if co2 is None else co2
    return Predicted(co2_g=co2, co2_g_upper=co2_upper, energy_j=co2 * 1000, energy_j_upper=co2_upper * 1000,
                     max_tokens=max_tokens)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("doc, key", [
    ({"mode": "strict"}, "cfg.toml:mode"),
    ({"request_cap": {"co2_g": -1}}, "cfg.toml:request_cap.co2_g"),
    ({"request_cap": {"co2_g": 1, "on": "p99"}}, "cfg.toml:request_cap.on"),
    ({"request_cap": {}}, "cfg.toml:request_cap"),
    ({"budgets": {"tenants": {"team-a": {"per_hour_co2_g": "lots"}}}}, "cfg.toml:budgets.tenants.team-a.per_hour_co2_g"),
    ({"budgets": {"tenants": {"team-a": {"per_week_co2_g": 1}}}}, "cfg.toml:budgets.tenants.team-a.per_week_co2_g"),
    ({"budgets": {"default": {"windows": [{"seconds": 0, "co2_g": 1}]}}}, "cfg.toml:budgets.default.windows[0].seconds"),
    ({"budgets": {"tenant_header": "bad header!"}}, "cfg.toml:budgets.tenant_header"),
    ({"priority": {"by": "carbon"}}, "cfg.toml:priority.co2_g_thresholds"),
    ({"priority": {"by": "carbon", "co2_g_thresholds": [1, 0.5]}}, "cfg.toml:priority.co2_g_thresholds"),
    ({"deferral": {"header": "x-defer"}}, "cfg.toml:deferral.max_intensity_g_per_kwh"),
    ({"reqest_cap": {"co2_g": 1}}, "cfg.toml:reqest_cap"),
])
def test_config_errors_name_the_key(doc, key):
    with pytest.raises(AdmissionConfigError) as e:
        parse_config(doc, "cfg.toml")
    assert e.value.key == key, str(e.value)
    assert str(e.value).startswith(key)


def test_config_toml_and_json_files(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_text('mode = "dry-run"\n[request_cap]\nco2_g = 0.5\naction = "lower_max_tokens"\n'
                    '[budgets]\nstore = "%s"\n[budgets.default]\nper_hour_co2_g = 10\n'
                    '[budgets.tenants.team-a]\nper_minute_co2_g = 1\nwindows = [{seconds = 5, co2_g = 0.1}]\n'
                    % (tmp_path / "l.sqlite"))
    c = load_config_file(str(toml))
    assert c.dry_run and c.request_cap.co2_g == 0.5 and c.request_cap.action == "lower_max_tokens"
    assert c.budgets.budget_for("team-a").windows == (Window(5, 0.1), Window(60, 1))
    assert c.budgets.budget_for("someone-else").windows == (Window(3600, 10),)
    js = tmp_path / "a.json"
    js.write_text(json.dumps({"request_cap": {"energy_j": 100, "on": "expected"}}))
    assert load_config_file(str(js)).request_cap.energy_j == 100
    bad = tmp_path / "bad.toml"
    bad.write_text("mode = \n")
    with pytest.raises(AdmissionConfigError, match="bad.toml"):
        load_config_file(str(bad))


def test_config_reload_takes_good_versions_and_refuses_bad_ones(tmp_path):
    p = tmp_path / "adm.toml"
    p.write_text("[request_cap]\nco2_g = 1.0\n")
    w = ConfigWatcher(str(p))
    assert w.config.request_cap.co2_g == 1.0
    assert w.poll() is False  # unchanged
    p.write_text("[request_cap]\nco2_g = 2.0\n")
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert w.poll() is True and w.config.request_cap.co2_g == 2.0
    p.write_text("[request_cap]\nco2_g = -3\n")  # invalid: the old one stays
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert w.poll() is False and w.config.request_cap.co2_g == 2.0
    assert w.reload_failures == 1 and "request_cap.co2_g" in w.last_error


# ------------------------------------------------------------------ tenants
def test_tenant_from_header_or_hashed_api_key():
    assert tenant_from_headers({"x-llmco2-tenant": "team-a"}, "x-llmco2-tenant") == "team-a"
    key = "sk-secret-123"
    t = tenant_from_headers({"authorization": f"Bearer {key}"}, "x-llmco2-tenant")
    assert t.startswith("key:") and key not in t and "secret" not in t
    assert t == tenant_from_headers({"authorization": f"Bearer {key}"}, "x-other")  # stable
    assert t != tenant_from_headers({"authorization": "Bearer sk-other"}, "x-llmco2-tenant")
    assert tenant_from_headers({}, "x-llmco2-tenant") == "default"
    weird = tenant_from_headers({"x-llmco2-tenant": "a b\nc" * 30}, "x-llmco2-tenant")
    assert weird.startswith("h:") and "\n" not in weird


# ------------------------------------------------------------------ rolling windows
def test_window_spent_then_refilled_as_it_rolls():
    clock = Clock()
    led = BudgetLedger(None, lambda t: (Window(10.0, 1.0),), retention_s=10, clock=clock)
    t0 = clock.t
    assert led.try_reserve("a", "r1", 0.6, 0.2) is None
    clock.t = t0 + 3
    assert led.try_reserve("a", "r2", 0.3, 0.1) is None
    clock.t = t0 + 4
    ref = led.try_reserve("a", "r3", 0.3, 0.1)  # 0.6 + 0.3 + 0.3 > 1.0
    assert ref is not None and ref.window.seconds == 10 and abs(ref.spent_g - 0.9) < 1e-9
    assert abs(ref.retry_after_s - 6.0) < 1e-9  # r1 (t0) leaves the window at t0 + 10
    clock.t = t0 + 10.001
    assert led.try_reserve("a", "r3", 0.3, 0.1) is None  # r1 left; 0.3 + 0.3 fits
    assert abs(led.spent_g("a", 10) - 0.6) < 1e-9
    # another tenant has its own windows
    assert led.try_reserve("b", "x1", 1.0, 0.5) is None


def test_request_above_the_whole_budget_never_fits():
    led = BudgetLedger(None, lambda t: (Window(60.0, 1.0),), retention_s=60, clock=Clock())
    ref = led.try_reserve("a", "big", 2.0, 1.0)
    assert ref is not None and ref.retry_after_s is None


def test_settlement_replaces_the_reservation_in_the_windows():
    clock = Clock()
    led = BudgetLedger(None, lambda t: (Window(60.0, 1.0),), retention_s=60, clock=clock)
    assert led.try_reserve("a", "r1", 0.8, 0.3) is None
    assert led.try_reserve("a", "r2", 0.3, 0.1) is not None  # 0.8 reserved
    led.settle("a" and "r1", 0.25)  # measured
    assert abs(led.spent_g("a", 60) - 0.25) < 1e-9
    assert led.try_reserve("a", "r2", 0.3, 0.1) is None
    # an ended request with no measurement settles at its expected value after the wait
    assert led.end("r2", None, wait_s=5.0)
    clock.t += 4
    led.sweep()
    assert abs(led.spent_g("a", 60) - 0.55) < 1e-9  # still reserved (0.3)
    clock.t += 2
    led.sweep()
    assert abs(led.spent_g("a", 60) - 0.35) < 1e-9  # 0.25 + expected 0.1


def test_200_concurrent_reservations_never_overspend_and_settle_exactly(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    limit = 5.0
    led = BudgetLedger(path, lambda t: (Window(3600.0, limit),), retention_s=3600)
    rng = random.Random(7)
    amounts = [round(rng.uniform(0.01, 0.2), 6) for _ in range(200)]
    results: dict[int, object] = {}
    barrier = threading.Barrier(200)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = led.try_reserve("team", f"r{i}", amounts[i], amounts[i] / 3)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted = [i for i in range(200) if results[i] is None]
    refused = [i for i in range(200) if results[i] is not None]
    reserved = sum(amounts[i] for i in admitted)
    assert reserved <= limit + 1e-9  # no overspend at all at admission
    assert refused, "the budget must run out for this test to mean anything"
    # Room only shrank (nothing settled yet), so every refused request was bigger than what is left.
    assert limit - reserved < min(amounts[i] for i in refused)
    # Settle every admitted request from threads with its own "measured" value.
    measured = {i: round(rng.uniform(0.0, amounts[i]), 6) for i in admitted}
    ts = [threading.Thread(target=led.settle, args=(f"r{i}", measured[i])) for i in admitted]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    want = sum(measured.values())
    assert abs(led.spent_g("team", 3600) - want) < 1e-6
    led.close()
    db = sqlite3.connect(path)
    n, total_ng, open_ = db.execute("SELECT COUNT(*), SUM(amount_ng), SUM(state != 'settled') FROM ledger").fetchone()
    assert n == len(admitted) and open_ == 0
    assert abs(total_ng / 1e9 - want) < 1e-6
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_ledger_survives_restart_and_orphans_settle_at_expected(tmp_path):
    path = str(tmp_path / "l.sqlite")
    clock = Clock()
    led = BudgetLedger(path, lambda t: (Window(3600.0, 1.0),), retention_s=3600, clock=clock)
    assert led.try_reserve("a", "done", 0.5, 0.2) is None
    led.settle("done", 0.3)
    assert led.try_reserve("a", "inflight", 0.4, 0.1) is None  # never finishes: the process stops
    led.close()
    led2 = BudgetLedger(path, lambda t: (Window(3600.0, 1.0),), retention_s=3600, clock=clock)
    assert abs(led2.spent_g("a", 3600) - 0.4) < 1e-9  # 0.3 measured + 0.1 expected of the orphan
    assert led2.entry("inflight").source == "orphaned"
    assert led2.try_reserve("a", "next", 0.7, 0.1) is not None  # 0.4 + 0.7 > 1.0: still enforced
    clock.t += 3601
    assert led2.try_reserve("a", "next", 0.7, 0.1) is None
    led2.close()


# ------------------------------------------------------------------ controller
def cfg(**doc):
    return parse_config(doc, "test")


def test_request_cap_refuses_with_the_numbers_and_dry_run_admits():
    ctl = AdmissionController(cfg(request_cap={"co2_g": 0.5}))
    d = ctl.decide(AdmissionRequest("r1", "t", pred(0.8)))
    assert not d.admitted and d.status == 429 and d.reason == "request_cap"
    body = d.error_body()["error"]
    assert body["code"] == 429 and body["llmco2"]["predicted"] == 0.8 and body["llmco2"]["limit"] == 0.5
    assert "0.8" in body["message"] and "0.5" in body["message"] and "request_cap" in body["message"]
    assert ctl.decide(AdmissionRequest("r2", "t", pred(0.4))).decision == "admit"
    # on the expected value instead: 0.8 upper has expected 0.2 -> admitted
    ctl2 = AdmissionController(cfg(request_cap={"co2_g": 0.5, "on": "expected"}))
    assert ctl2.decide(AdmissionRequest("r1", "t", pred(0.8))).admitted
    dry = AdmissionController(cfg(mode="dry-run", request_cap={"co2_g": 0.5}))
    d = dry.decide(AdmissionRequest("r1", "t", pred(0.8)))
    assert d.admitted and d.decision == "would_refuse"
    assert dry.counts[("would_refuse", "request_cap")] == 1


def test_lower_max_tokens_to_fit_the_cap():
    # A stand-in predictor: 0.01 g per token plus 0.05 g of prefill, upper bound at max_tokens.
    def at(m: int) -> Predicted:
        return pred(0.05 + 0.01 * m, 0.05 + 0.005 * m, max_tokens=m)

    ctl = AdmissionController(cfg(request_cap={"co2_g": 0.5, "action": "lower_max_tokens"}))
    d = ctl.decide(AdmissionRequest("r1", "t", at(200), what_if=at))
    assert d.admitted and d.decision == "lower" and d.max_tokens == 45  # 0.05 + 0.45 = 0.5
    # even one token is over: refused
    d = AdmissionController(cfg(request_cap={"co2_g": 0.01, "action": "lower_max_tokens"})).decide(
        AdmissionRequest("r2", "t", at(200), what_if=at))
    assert not d.admitted and d.reason == "request_cap"


def test_budget_refusal_has_retry_after_and_no_prediction_fails_open(tmp_path):
    clock = Clock()
    c = cfg(budgets={"store": str(tmp_path / "b.sqlite"), "default": {"windows": [{"seconds": 30, "co2_g": 1.0}]}})
    ctl = AdmissionController(c, clock=clock)
    assert ctl.decide(AdmissionRequest("r1", "team", pred(0.7))).admitted
    clock.t += 10
    d = ctl.decide(AdmissionRequest("r2", "team", pred(0.7)))
    assert not d.admitted and d.reason == "tenant_budget" and abs(d.retry_after_s - 20) < 1e-6
    assert d.policy == "budget:team:30s"
    d = ctl.decide(AdmissionRequest("r3", "team", None))
    assert d.admitted and d.reason == "no_prediction"
    strict = AdmissionController(parse_config({"fail_open": False, "request_cap": {"co2_g": 1}}))
    assert strict.decide(AdmissionRequest("r4", "team", None)).status == 503
    ctl.close()


def test_store_that_cannot_be_written_fails_open(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    c = cfg(budgets={"store": str(blocker / "ledger.sqlite"), "default": {"per_hour_co2_g": 0.001}})
    ctl = AdmissionController(c)
    assert ctl.store_error and ctl.ledger is None
    d = ctl.decide(AdmissionRequest("r1", "t", pred(1.0)))
    assert d.admitted and d.reason == "store_error"
    assert ctl.counts[("admit", "store_error")] == 1
    strict = AdmissionController(cfg(fail_open=False, budgets=c.budgets and {
        "store": str(blocker / "ledger.sqlite"), "default": {"per_hour_co2_g": 0.001}}))
    assert strict.decide(AdmissionRequest("r1", "t", pred(1.0))).status == 503


def test_priority_by_carbon_and_by_class_keeps_client_priority():
    ctl = AdmissionController(cfg(priority={"by": "carbon", "co2_g_thresholds": [0.1, 1.0]}))
    assert ctl.decide(AdmissionRequest("a", "t", pred(0.2, 0.05))).priority == 0
    assert ctl.decide(AdmissionRequest("b", "t", pred(2.0, 0.5))).priority == 1
    assert ctl.decide(AdmissionRequest("c", "t", pred(8.0, 2.0))).priority == 2
    assert ctl.decide(AdmissionRequest("d", "t", pred(8.0, 2.0), client_priority=-5)).priority is None
    ovr = AdmissionController(cfg(priority={"by": "carbon", "co2_g_thresholds": [0.1], "override_client": True}))
    assert ovr.decide(AdmissionRequest("d", "t", pred(8.0, 2.0), client_priority=-5)).priority == 1
    cls = AdmissionController(cfg(priority={"by": "tenant_class", "classes": {"interactive": -10, "batch": 10}},
                                  budgets={"tenants": {"chat": {"class": "interactive"}, "etl": {"class": "batch"}}}))
    assert cls.decide(AdmissionRequest("e", "chat", pred(1.0))).priority == -10
    assert cls.decide(AdmissionRequest("f", "etl", pred(1.0))).priority == 10
    assert cls.decide(AdmissionRequest("g", "other", pred(1.0))).priority is None


class HourlySeries:
    """A stand-in grid: g/kWh per hour of the day (test data, not a real series)."""

    def __init__(self, by_hour: dict[int, float]) -> None:
        self.by_hour = by_hour

    def now_g_per_kwh(self, t: float) -> float:
        return self.by_hour[int(t // 3600) % 24]

    def next_below(self, threshold: float, now: float, horizon: float) -> float | None:
        h = int(now // 3600)
        for k in range(0, int(horizon // 3600) + 1):
            start = max(now, (h + k) * 3600)
            if start > now + horizon:
                return None
            if self.by_hour[(h + k) % 24] <= threshold:
                return start
        return None


def test_deferral_points_at_the_next_cleaner_hour():
    series = HourlySeries({h: (450.0 if 8 <= h < 20 else 200.0) for h in range(24)})
    day = 1_700_006_400.0 - (1_700_006_400.0 % 86400)  # a midnight
    ctl = AdmissionController(cfg(deferral={"max_intensity_g_per_kwh": 300, "horizon_s": 86400}),
                              intensity=series)
    now = day + 10 * 3600 + 600  # 10:10, dirty until 20:00
    d = ctl.decide(AdmissionRequest("r1", "t", pred(0.1), deferrable=True), now=now)
    assert not d.admitted and d.decision == "defer" and abs(d.retry_after_s - (9 * 3600 + 3000)) < 1e-6
    assert ctl.decide(AdmissionRequest("r2", "t", pred(0.1), deferrable=False), now=now).admitted
    assert ctl.decide(AdmissionRequest("r3", "t", pred(0.1), deferrable=True), now=day + 3 * 3600).admitted
    # no cleaner hour within the horizon: not deferred forever
    short = AdmissionController(cfg(deferral={"max_intensity_g_per_kwh": 300, "horizon_s": 3600}), intensity=series)
    assert short.decide(AdmissionRequest("r4", "t", pred(0.1), deferrable=True), now=now).admitted


def test_deferral_against_the_real_hourly_series_through_the_service_adapter():
    """hooks/admission.py reads the service's grid source (carbon/intensity.py FileIntensity over the
    packaged Electricity Maps DE 2022 series); Retry-After must point at the first cleaner hour of
    the CSV itself (read here with the csv module)."""
    import csv
    import datetime as dt
    from types import SimpleNamespace

    from llmco2_serve.carbon.intensity import FileIntensity, packaged_series_path
    from llmco2_serve.hooks.admission import _ServiceIntensity

    path = packaged_series_path("DE_2022_hourly.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(dt.datetime.fromisoformat(r["Datetime (UTC)"]).replace(tzinfo=dt.timezone.utc).timestamp(),
                 float(r["Carbon Intensity gCO₂eq/kWh (LCA)"])) for r in csv.DictReader(f)]
    threshold = 400.0
    # an hour above the threshold that has a cleaner hour within the next day
    i = next(k for k in range(100, len(rows) - 30) if rows[k][1] > threshold
             and any(v < threshold for _, v in rows[k + 1:k + 24]))
    want = next(t for t, v in rows[i + 1:] if v < threshold)
    svc = SimpleNamespace(carbon_intensity=FileIntensity(path, static_g_per_kwh=481.0),
                          settings=SimpleNamespace(intensity_g_per_kwh=481.0))
    ctl = AdmissionController(cfg(deferral={"max_intensity_g_per_kwh": threshold, "horizon_s": 86400}),
                              intensity=_ServiceIntensity(svc))
    now = rows[i][0] + 600
    d = ctl.decide(AdmissionRequest("r", "t", pred(0.1), deferrable=True), now=now)
    assert d.decision == "defer" and d.retry_after_s == pytest.approx(want - now)
    assert d.error_body()["error"]["llmco2"]["predicted"] == pytest.approx(rows[i][1])


def test_cap_applies_to_all_sequences_of_one_http_request():
    ctl = AdmissionController(cfg(request_cap={"co2_g": 0.5}))
    assert ctl.decide(AdmissionRequest("a", "t", pred(0.3))).admitted
    d = ctl.decide(AdmissionRequest("b", "t", pred(0.3), sequences=2))  # n = 2: 0.6 g in all
    assert not d.admitted and d.error_body()["error"]["llmco2"]["predicted"] == pytest.approx(0.6)


def test_no_file_form_and_settings(tmp_path):
    from llmco2_serve.admission import config_from_settings
    from llmco2_serve.runtime.settings import SettingsError, load_settings

    s = load_settings({"LLMCO2_ADMISSION_MAX_REQUEST_CO2_G": "0.25", "LLMCO2_PAIRS_PATH": ""})
    c = config_from_settings(s.admission_config, s.admission_max_request_co2_g)
    assert c.request_cap.co2_g == 0.25 and c.request_cap.on == "upper" and c.request_cap.action == "refuse"
    ctl = AdmissionController(c)
    assert not ctl.decide(AdmissionRequest("r", "t", pred(0.3))).admitted
    assert ctl.decide(AdmissionRequest("r2", "t", pred(0.2))).admitted
    with pytest.raises(SettingsError, match="LLMCO2_ADMISSION_MAX_REQUEST_CO2_G"):
        load_settings({"LLMCO2_ADMISSION_MAX_REQUEST_CO2_G": "lots"})
    assert config_from_settings(None, None) is None  # admission off


def test_invalid_policy_file_at_start_up_refuses_only_when_fail_open_is_off(tmp_path):
    from llmco2_serve.hooks import _check_admission
    from llmco2_serve.runtime.settings import load_settings

    bad = tmp_path / "adm.toml"
    bad.write_text('[budgets.tenants.team-a]\nper_hour_co2_g = "lots"\n')
    strict = load_settings({"LLMCO2_ADMISSION_CONFIG": str(bad), "LLMCO2_FAIL_OPEN": "0", "LLMCO2_PAIRS_PATH": ""})
    with pytest.raises(AdmissionConfigError, match="budgets.tenants.team-a.per_hour_co2_g"):
        _check_admission(strict)
    lenient = load_settings({"LLMCO2_ADMISSION_CONFIG": str(bad), "LLMCO2_PAIRS_PATH": ""})
    _check_admission(lenient)  # logged; admission stays off, vLLM starts


def test_reservations_that_never_hear_back_expire_and_old_entries_are_dropped():
    clock = Clock()
    led = BudgetLedger(None, lambda t: (Window(60.0, 1.0),), retention_s=60, clock=clock)
    assert led.try_reserve("a", "lost", 0.9, 0.2) is None
    assert led.try_reserve("a", "next", 0.5, 0.1) is not None
    clock.t += 30
    assert led.expire_stale(ttl_s=20) == 1  # settled at its expected value
    assert abs(led.spent_g("a", 60) - 0.2) < 1e-9 and led.open_reservations() == 0
    assert led.try_reserve("a", "next", 0.5, 0.1) is None
    clock.t += 61  # tenant "a" goes quiet: its entries leave with the next maintenance
    led.expire_stale(ttl_s=20)
    assert led.entries("a") == [] and led.entry("lost") is None
