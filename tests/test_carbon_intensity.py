"""Carbon intensity by place and time (issue 8 §3): llmco2_serve/carbon/intensity.py and live_intensity.py.

Truths from outside the code: the packaged Electricity Maps export itself (read here with the csv
module) and Electricity Maps' published yearly figure for Germany 2022 (475 gCO2eq/kWh, lifecycle;
their yearly dataset as shipped in thegreenwebfoundation/co2.js data/output/electricity-maps/
yearly_2022.js); Ember/OWID's France 2023 (56 g/kWh) and Poland 2023 (662 g/kWh) figures; EPA eGRID2023
California STC2ERTA (394.769 lb/MWh); the definition of the pound (0.45359237 kg). The live
providers run against a real HTTP server on 127.0.0.1 that plays the APIs, errors included.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmco2_serve.carbon.intensity import (
    FileIntensity, IntensityError, StaticIntensity, load_series, packaged_series_path, resolve_zone,
    source_from_spec,
)
from llmco2_serve.carbon.live_intensity import ElectricityMapsIntensity, WattTimeIntensity
from llmco2_serve.runtime.settings import SettingsError, load_settings

LB_KG = 0.45359237  # the international pound, exact by definition


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


# ---------------------------------------------------------------- the setting


def test_default_is_todays_fixed_value_and_a_number_is_fixed():
    assert load_settings({}).carbon_intensity == ""
    src = source_from_spec("", static_g_per_kwh=481.0)
    assert (src.at(0).g_per_kwh, src.at(2e9).source) == (481.0, "static")
    assert source_from_spec("120.5", static_g_per_kwh=481.0).at(1e9).g_per_kwh == 120.5
    assert src.next_hour_below(500, 1000.0, 3600) == 1000.0
    assert src.next_hour_below(400, 1000.0, 86400) is None  # a fixed value never gets cleaner


@pytest.mark.parametrize("bad", ["-3", "nan", "zone:", "gas:FR", "electricitymaps", "file:"])
def test_a_bad_setting_is_an_error_naming_the_variable(bad):
    with pytest.raises(SettingsError) as e:
        load_settings({"LLMCO2_CARBON_INTENSITY": bad})
    assert e.value.variable == "LLMCO2_CARBON_INTENSITY"


# ---------------------------------------------------------------- zone (codecarbon)


def test_zones_resolve_to_published_values():
    fr, pl, ca = resolve_zone("FR"), resolve_zone("PL"), resolve_zone("US-CA")
    assert fr.g_per_kwh == pytest.approx(56.0, abs=1.0)  # Ember/OWID France 2023
    assert pl.g_per_kwh == pytest.approx(662.0, abs=2.0)  # Ember/OWID Poland 2023
    assert ca.g_per_kwh == pytest.approx(394.769 * LB_KG, rel=1e-6)  # eGRID2023 CA, lb/MWh -> g/kWh
    assert resolve_zone("fra").g_per_kwh == fr.g_per_kwh  # ISO-3, any case
    assert resolve_zone("CA-QC").g_per_kwh < 50 < resolve_zone("CA-AB").g_per_kwh  # hydro vs gas/coal
    src = source_from_spec("zone:US-CA", static_g_per_kwh=481.0)
    assert src.at(0).source == "codecarbon" and "California" in src.at(0).detail


def test_unknown_zone_names_close_matches():
    with pytest.raises(IntensityError, match="did you mean.*FR"):
        resolve_zone("FX")
    with pytest.raises(IntensityError, match="US-TX"):
        resolve_zone("US-TZ")


# ---------------------------------------------------------------- files


def raw_rows():
    with open(packaged_series_path(), encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_packaged_electricity_maps_export_hour_containing_t():
    rows = raw_rows()
    src = source_from_spec("file:packaged:DE_2022_hourly.csv", static_g_per_kwh=481.0)
    for i in (0, 1, 4000, len(rows) - 1):
        t0 = ts(rows[i]["Datetime (UTC)"])
        lca = float(rows[i]["Carbon Intensity gCO₂eq/kWh (LCA)"])
        for dt in (0.0, 1799.0, 3599.9):  # the hour containing t
            got = src.at(t0 + dt)
            assert (got.g_per_kwh, got.source, got.period_start_s) == (lca, "file", t0)
    direct = source_from_spec("file:packaged:DE_2022_hourly.csv?column=direct", static_g_per_kwh=481.0)
    assert direct.at(ts(rows[0]["Datetime (UTC)"])).g_per_kwh == float(rows[0]["Carbon Intensity gCO₂eq/kWh (direct)"])
    # Electricity Maps' published yearly figure for DE 2022 is 475 g/kWh (lifecycle)
    hourly = [src.at(ts("2022-01-01T00:00:00") + h * 3600 + 1).g_per_kwh for h in range(8760)]
    assert sum(hourly) / len(hourly) == pytest.approx(475.0, rel=0.01)


def test_outside_the_file_is_labelled():
    path = packaged_series_path()
    before, after = ts("2021-12-31T23:00:00"), ts("2023-01-01T00:00:00")
    static = FileIntensity(path, static_g_per_kwh=481.0)
    assert (static.at(before).g_per_kwh, static.at(after).source) == (481.0, "static-fallback")
    near = FileIntensity(path, static_g_per_kwh=481.0, outside="nearest")
    rows = raw_rows()
    assert near.at(after).g_per_kwh == float(rows[-1]["Carbon Intensity gCO₂eq/kWh (LCA)"])
    assert near.at(after).source == "file-nearest"
    wrap = FileIntensity(path, static_g_per_kwh=481.0, outside="wrap")
    same_hour_next_year = wrap.at(ts("2023-01-01T05:30:00"))  # 2022 has 365 days: wraps to 2022-01-01 05:00
    assert same_hour_next_year.g_per_kwh == float(rows[5]["Carbon Intensity gCO₂eq/kWh (LCA)"])
    assert same_hour_next_year.source == "file-wrapped"
    assert same_hour_next_year.period_start_s == ts("2023-01-01T05:00:00")


def test_next_hour_below_on_the_real_series_matches_a_scan_of_the_file():
    rows = raw_rows()
    src = source_from_spec("file:packaged:DE_2022_hourly.csv", static_g_per_kwh=481.0)
    now = ts("2022-01-04T08:20:00")  # a dirty morning (~555 g/kWh)
    for threshold in (400.0, 300.0, 200.0):
        expect = None
        for r in rows:
            t = ts(r["Datetime (UTC)"])
            if t + 3600 > now and t <= now + 48 * 3600 and float(r["Carbon Intensity gCO₂eq/kWh (LCA)"]) < threshold:
                expect = max(now, t)
                break
        assert src.next_hour_below(threshold, now, 48 * 3600) == expect
    assert src.next_hour_below(1.0, now, 48 * 3600) is None
    fc = src.forecast(now, 3 * 3600)
    assert [p.period_start_s for p in fc] == [ts("2022-01-04T08:00:00") + h * 3600 for h in range(4)]


EMBER_LONG = (
    "Area,ISO 3 code,Date,Area type,Continent,Ember region,EU,OECD,G20,G7,ASEAN,Category,Subcategory,Variable,"
    "Unit,Value,YoY absolute change,YoY % change\n"
    "Germany,DEU,2023-01-01,Country or economy,Europe,EU,1,1,1,1,0,Power sector emissions,CO2 intensity,"
    "CO2 intensity,gCO2/kWh,400.5,,\n"
    "Germany,DEU,2023-01-01,Country or economy,Europe,EU,1,1,1,1,0,Electricity generation,Fuel,Coal,TWh,9.1,,\n"
    "Germany,DEU,2023-02-01,Country or economy,Europe,EU,1,1,1,1,0,Power sector emissions,CO2 intensity,"
    "CO2 intensity,gCO2/kWh,350.25,,\n"
    "France,FRA,2023-01-01,Country or economy,Europe,EU,1,1,1,1,0,Power sector emissions,CO2 intensity,"
    "CO2 intensity,gCO2/kWh,60.0,,\n"
)
EMBER_2026 = (
    "Area,ISO 3 code,Date,Area type,Electricity source,Is aggregated source,Generation (TWh),"
    "Generation YoY change (TWh),Generation YoY change (%),Share of generation (%),"
    "Share of generation YoY change (% points),Emissions (MtCO2e),Emissions YoY change (MtCO2e),"
    "Emissions YoY change (%),Share of emissions (%),Emissions intensity (gCO2e/kWh),Continent,Ember region,"
    "EU member,OECD member,G20 member,G7 member,ASEAN member\n"
    "EU,,2026-07-01,Region,Coal,False,10,,,,,9,,,,900.0,,,False,False,False,False,False\n"
    "EU,,2026-07-01,Region,Total generation,True,220,,,,,47,,,,213.5,,,False,False,False,False,False\n"
    "EU,,2026-08-01,Region,Total generation,True,214.481,,,,,46,,,,215.991,,,False,False,False,False,False\n"
)


def test_ember_layouts_monthly_period_containing_t(tmp_path):
    p = tmp_path / "ember_long.csv"
    p.write_text(EMBER_LONG)
    with pytest.raises(IntensityError, match="2 areas"):
        FileIntensity(str(p), static_g_per_kwh=481.0)
    de = source_from_spec(f"file:{p}?area=DEU", static_g_per_kwh=481.0)
    assert de.at(ts("2023-01-31T23:59:00")).g_per_kwh == 400.5  # January's row, to the end of January
    assert de.at(ts("2023-02-28T12:00:00")).g_per_kwh == 350.25  # February has 28 days
    assert de.at(ts("2023-03-01T00:00:00")).source == "static-fallback"
    q = tmp_path / "ember_2026.csv"
    q.write_text(EMBER_2026)
    eu = source_from_spec(f"file:{q}", static_g_per_kwh=481.0)
    assert eu.at(ts("2026-07-15T00:00:00")).g_per_kwh == 213.5  # the Total generation row, not Coal
    assert eu.at(ts("2026-08-31T23:00:00")).g_per_kwh == 215.991


def test_plain_file_gaps_and_errors(tmp_path):
    p = tmp_path / "plain.csv"
    p.write_text("timestamp,g_per_kwh\n0,100\n3600,200\n10800,300\n")  # 7200 missing
    src = source_from_spec(f"file:{p}", static_g_per_kwh=481.0)
    assert [src.at(t).g_per_kwh for t in (0, 3599, 3600)] == [100, 100, 200]
    gap = src.at(7300)
    assert (gap.g_per_kwh, gap.source) == (200, "file-gap")
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,g_per_kwh\n0,100\n3600,lots\n")
    with pytest.raises(IntensityError, match=r"bad.csv:3.*lots"):
        load_series(str(bad))
    with pytest.raises(IntensityError, match="unknown layout"):
        load_series("when,what\n1,2\n", text=True)
    with pytest.raises(IntensityError, match="cannot read"):
        source_from_spec(f"file:{tmp_path}/missing.csv", static_g_per_kwh=481.0)


# ---------------------------------------------------------------- live providers, a local server


class Api:
    """A scripted HTTP server on 127.0.0.1: per path a queue of (status, body, headers, delay_s);
    the last entry repeats. Records every request (path, headers, time)."""

    def __init__(self):
        self.script: dict[str, list[tuple[int, str, dict, float]]] = {}
        self.requests: list[tuple[str, dict, float]] = []
        api = self

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                api.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, time.monotonic()))
                q = api.script.get(path) or [(404, '{"error":"no route"}', {}, 0.0)]
                status, body, headers, delay = q.pop(0) if len(q) > 1 else q[0]
                if delay:
                    time.sleep(delay)
                data = body.encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def on(self, path, *responses):
        self.script[path] = [(r[0], r[1], r[2] if len(r) > 2 else {}, r[3] if len(r) > 3 else 0.0) for r in responses]

    def paths(self, path):
        return [r for r in self.requests if r[0].split("?")[0] == path]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api():
    a = Api()
    yield a
    a.close()


def em_latest(value, when="2024-05-01T10:00:00.000Z"):
    return json.dumps({"zone": "DE", "carbonIntensity": value, "datetime": when, "updatedAt": when,
                       "emissionFactorType": "lifecycle", "isEstimated": False})


def em(api, **kw):
    kw.setdefault("static_g_per_kwh", 481.0)
    kw.setdefault("timeout_s", 0.5)
    kw.setdefault("backoff_s", 0.05)
    kw.setdefault("max_backoff_s", 0.4)
    kw.setdefault("forecast", False)
    return ElectricityMapsIntensity("DE", "tok-123", base_url=api.url, **kw)


def test_electricitymaps_latest_cached_fallback_and_recovery(api):
    api.on("/v3/carbon-intensity/latest", (200, em_latest(302)), (503, "upstream down"), (200, em_latest(250)))
    src = em(api)
    assert src.at(time.time()).source == "static-fallback"  # nothing fetched yet
    assert src.refresh_once()
    path, headers, _ = api.requests[-1]
    assert path == "/v3/carbon-intensity/latest?zone=DE" and headers.get("auth-token") == "tok-123"
    got = src.at(time.time())
    assert (got.g_per_kwh, got.source) == (302, "electricitymaps")
    assert not src.refresh_once()  # 5xx: the last good value, labelled
    got = src.at(time.time())
    assert (got.g_per_kwh, got.source) == (302, "electricitymaps-cached") and src.last_status == 503
    assert src.next_delay_s == pytest.approx(0.05)
    assert src.refresh_once() and src.at(time.time()).source == "electricitymaps"
    assert src.at(time.time()).g_per_kwh == 250


def test_electricitymaps_401_falls_back_to_static_and_retries_slowly(api):
    api.on("/v3/carbon-intensity/latest", (401, '{"message":"invalid token"}'))
    src = em(api)
    assert not src.refresh_once()
    got = src.at(time.time())
    assert (got.g_per_kwh, got.source) == (481.0, "static-fallback")
    assert src.last_status == 401 and "invalid token" in src.last_error
    assert src.next_delay_s == src.max_backoff_s  # a token does not fix itself: slow retries


def test_backoff_doubles_and_retry_after_is_honoured(api):
    api.on("/v3/carbon-intensity/latest", (500, "x"), (500, "x"), (500, "x"),
           (429, '{"error":"rate limited"}', {"Retry-After": "1"}), (200, em_latest(111)))
    src = em(api, max_backoff_s=5.0)
    delays = []
    for _ in range(4):
        src.refresh_once()
        delays.append(src.next_delay_s)
    assert delays == [pytest.approx(0.05), pytest.approx(0.1), pytest.approx(0.2), pytest.approx(1.0)]
    # the background thread: after the 429 the next request waits for Retry-After
    api.on("/v3/carbon-intensity/latest", (429, "slow down", {"Retry-After": "1"}), (200, em_latest(111)))
    api.requests.clear()
    live = em(api, refresh_s=60.0)
    live.start()
    try:
        deadline = time.monotonic() + 5.0
        while live.successes == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        times = [r[2] for r in api.paths("/v3/carbon-intensity/latest")]
        assert live.at(time.time()).g_per_kwh == 111
        assert len(times) == 2 and times[1] - times[0] >= 0.95
    finally:
        live.close()


def test_timeout_does_not_block_the_request_path(api):
    api.on("/v3/carbon-intensity/latest", (200, em_latest(200)), (200, em_latest(999), {}, 1.5))
    src = em(api, timeout_s=0.3, refresh_s=0.01, ttl_s=0.2)
    assert src.refresh_once()
    src.start()  # the thread's fetches now hang past the timeout
    try:
        worst = 0.0
        end = time.monotonic() + 0.8
        while time.monotonic() < end:
            t0 = time.perf_counter()
            v = src.at(time.time())
            worst = max(worst, time.perf_counter() - t0)
            assert v.g_per_kwh == 200
            time.sleep(0.005)
        assert worst < 0.01  # never waits for the hung request
        assert src.failures >= 1 and "timed out" in (src.last_error or "").lower()
        assert src.at(time.time()).source == "electricitymaps-cached"
    finally:
        src.close()


@pytest.mark.parametrize("body", ["{not json", '{"zone":"DE"}', '{"carbonIntensity":"high","datetime":"x"}',
                                  '{"carbonIntensity":-5,"datetime":"2024-05-01T10:00:00Z"}', "[]"])
def test_malformed_answers_are_failures_not_values(api, body):
    api.on("/v3/carbon-intensity/latest", (200, em_latest(321)), (200, body))
    src = em(api)
    assert src.refresh_once() and not src.refresh_once()
    got = src.at(time.time())
    assert (got.g_per_kwh, got.source) == (321, "electricitymaps-cached")


def test_electricitymaps_forecast_and_next_cleaner_hour(api):
    now = time.time()
    hour = math.floor(now / 3600) * 3600
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")  # noqa: E731
    api.on("/v3/carbon-intensity/latest", (200, em_latest(400, iso(hour))))
    api.on("/v3/carbon-intensity/forecast", (200, json.dumps(
        {"zone": "DE", "forecast": [{"carbonIntensity": v, "datetime": iso(hour + h * 3600)}
                                    for h, v in enumerate([400, 380, 290, 310, 150], start=1)]})))
    src = em(api, forecast=True)
    assert src.refresh_once()
    assert src.next_hour_below(300, now, 24 * 3600) == hour + 3 * 3600
    assert src.next_hour_below(100, now, 24 * 3600) is None
    assert src.next_hour_below(300, now, 3600) is None  # beyond the horizon
    later = src.at(hour + 3 * 3600 + 60)
    assert (later.g_per_kwh, later.source) == (290, "electricitymaps-forecast")
    # a plan without forecasts: the latest value still serves
    api.on("/v3/carbon-intensity/forecast", (403, '{"message":"not in plan"}'))
    src2 = em(api, forecast=True)
    assert src2.refresh_once() and src2.at(now).g_per_kwh == 400 and src2.forecast(now, 3600) is None


def test_watttime_login_bearer_units_and_relogin(api):
    now = time.time()
    t0 = math.floor(now / 300) * 300
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat()  # noqa: E731
    body = json.dumps({"data": [{"point_time": iso(t0 + 300 * i), "value": v, "version": "x"}
                                for i, v in enumerate([1000.0, 800.0, 500.0])],
                       "meta": {"region": "CAISO_NORTH", "signal_type": "co2_moer", "units": "lbs_co2_per_mwh"}})
    api.on("/login", (200, '{"token":"t1"}'), (200, '{"token":"t2"}'))
    api.on("/v3/forecast", (200, body), (401, "expired"), (200, body))
    src = WattTimeIntensity("CAISO_NORTH", "alice", "s3cret", base_url=api.url, static_g_per_kwh=481.0,
                            timeout_s=0.5, backoff_s=0.05)
    assert src.refresh_once()
    login = api.paths("/login")[0][1]
    assert login["authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    fc_path, fc_headers, _ = api.paths("/v3/forecast")[0]
    assert fc_headers["authorization"] == "Bearer t1" and "signal_type=co2_moer" in fc_path
    cur = src.at(now)
    assert cur.g_per_kwh == pytest.approx(1000 * LB_KG) and cur.source == "watttime"  # 453.59 g/kWh
    assert src.next_hour_below(300.0, now, 3600) == t0 + 600  # 500 lb/MWh = 226.8 g/kWh
    assert src.refresh_once()  # 401 on the forecast: one new login, then served
    assert src.logins == 2 and api.paths("/v3/forecast")[-1][1]["authorization"] == "Bearer t2"


def test_live_provider_needs_its_credentials():
    with pytest.raises(IntensityError, match="ELECTRICITYMAPS_API_TOKEN"):
        source_from_spec("electricitymaps:DE", static_g_per_kwh=481.0, environ={})
    with pytest.raises(IntensityError, match="WATTTIME_USERNAME"):
        source_from_spec("watttime:CAISO_NORTH", static_g_per_kwh=481.0, environ={})
    with pytest.raises(IntensityError, match="unknown option"):
        source_from_spec("electricitymaps:DE?refesh_s=3", static_g_per_kwh=481.0,
                         environ={"ELECTRICITYMAPS_API_TOKEN": "x"})


# ---------------------------------------------------------------- in the service


def test_service_prices_prediction_at_admission_and_measurement_at_finish(api, tmp_path, monkeypatch):
    from llmco2_serve.devtools.tinymodel import tiny_config
    from llmco2_serve.runtime.service import EnergyService, ModelInfo

    api.on("/v3/carbon-intensity/latest", (200, em_latest(100.0)))
    monkeypatch.setenv("ELECTRICITYMAPS_API_TOKEN", "tok-123")
    model = ModelInfo(hf_config={**tiny_config("llama"), "torch_dtype": "float32"}, model_name="tiny",
                      dtype="float32", max_model_len=512, max_num_seqs=8)
    base = {"LLMCO2_PAIRS_PATH": "", "LLMCO2_CALIBRATION": "0"}
    static = EnergyService(load_settings(base), model, gpu_names=[], prediction_table="off")
    live = EnergyService(load_settings({**base, "LLMCO2_CARBON_INTENSITY":
                                        f"electricitymaps:DE?url={api.url}&refresh_s=0.05&backoff_s=0.05"}),
                         model, gpu_names=[], prediction_table="off")
    try:
        assert live.carbon_intensity.wait_ready(5.0)
        assert live.carbon_intensity_now() == (100.0, "electricitymaps")
        assert static.carbon_intensity_now() == (481.0, "static")
        p_static = static.on_request("r", prompt_len=20, max_tokens=64, running_requests=0)
        p_live = live.on_request("r", prompt_len=20, max_tokens=64, running_requests=0)
        assert p_live.energy_j == p_static.energy_j and p_live.embodied_co2_g == pytest.approx(p_static.embodied_co2_g)
        oper_static, oper_live = p_static.co2_g - p_static.embodied_co2_g, p_live.co2_g - p_live.embodied_co2_g
        assert oper_live / oper_static == pytest.approx(100.0 / 481.0)
        assert (p_live.co2_g_upper - p_live.embodied_co2_g) < (p_static.co2_g_upper - p_static.embodied_co2_g)
        # the grid changes while the request runs: the measurement is priced at finish
        api.on("/v3/carbon-intensity/latest", (200, em_latest(300.0)))
        deadline = time.monotonic() + 5.0
        while live.carbon_intensity_now()[0] != 300.0 and time.monotonic() < deadline:
            time.sleep(0.02)
        measured = {"prefill_energy_j": 2.0, "decode_energy_j": 10.0, "energy_j": 12.0, "uncertainty_j": 1.0,
                    "source": "nvml", "final": True}
        a = live.on_finished("r", 40, measured)
        b = static.on_finished("r", 40, measured)
        assert a["llmco2.predicted.carbon_intensity_g_per_kwh"] == 100.0
        assert a["llmco2.measured.carbon_intensity_g_per_kwh"] == 300.0
        assert a["llmco2.carbon_intensity.source"] == "electricitymaps"
        assert a["llmco2.measured.co2_g"] / b["llmco2.measured.co2_g"] == pytest.approx(300.0 / 481.0)
        assert b["llmco2.carbon_intensity.source"] == "static"
    finally:
        live.close()
        static.close()


def test_service_fails_open_on_a_bad_source(tmp_path):
    from llmco2_serve.devtools.tinymodel import tiny_config
    from llmco2_serve.runtime.service import EnergyService, ModelInfo

    model = ModelInfo(hf_config={**tiny_config("llama"), "torch_dtype": "float32"}, model_name="tiny")
    env = {"LLMCO2_PAIRS_PATH": "", "LLMCO2_CARBON_INTENSITY": "zone:XX-NOWHERE"}
    svc = EnergyService(load_settings(env), model, gpu_names=[], prediction_table="off")
    assert svc.carbon_intensity_now() == (481.0, "static-fallback")
    assert "XX-NOWHERE" in svc.carbon_intensity_error
    assert svc.on_request("r", 10, 8, 0) is not None  # still serving
    svc.close()
    with pytest.raises(IntensityError):
        EnergyService(load_settings({**env, "LLMCO2_FAIL_OPEN": "0"}), model, gpu_names=[], prediction_table="off")


def test_static_source_rejects_bad_values():
    with pytest.raises(IntensityError):
        StaticIntensity(-1.0)
