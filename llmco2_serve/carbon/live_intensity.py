"""Live carbon-intensity providers: Electricity Maps and WattTime, behind
:class:`~llmco2_serve.carbon.intensity.CarbonIntensitySource`.

The request path never waits for HTTP: a daemon thread refreshes the value every ``refresh_s``
and :meth:`LiveIntensity.at` reads what it left (one attribute read, no lock). What ``at`` answers:

* the last fetched value while the last refresh succeeded and it is younger than ``ttl_s``:
  source ``electricitymaps`` / ``watttime``; for a moment after the fetched hour that a forecast
  covers, the forecast's value (``electricitymaps-forecast``);
* after failures (HTTP errors, timeouts, malformed JSON) or when older than ``ttl_s``: the last
  good value while it is younger than ``max_stale_s``: ``electricitymaps-cached``;
* before the first success or after ``max_stale_s``: the static value, ``static-fallback``.

Failures back off exponentially (``backoff_s`` x 2^n up to ``max_backoff_s``); a 429's
``Retry-After`` (seconds or an HTTP date) is honoured when longer. 401/403 are logged once per
streak and retried at ``max_backoff_s`` (a token does not fix itself, but a plan may change).

APIs (checked against the providers' public documentation):

* Electricity Maps v3: ``GET {base}/v3/carbon-intensity/latest?zone=Z`` and
  ``GET {base}/v3/carbon-intensity/forecast?zone=Z`` with header ``auth-token: TOKEN``; answers
  ``{"zone", "carbonIntensity", "datetime", ...}`` and ``{"zone", "forecast": [{"carbonIntensity",
  "datetime"}, ...]}``. Average, lifecycle gCO2eq/kWh. Token: ``ELECTRICITYMAPS_API_TOKEN``.
  The forecast needs a paid plan: a 401/403/404 there switches the forecast off, not the source.
* WattTime v3: ``GET {base}/login`` with HTTP Basic auth -> ``{"token"}`` (valid 30 min; renewed
  after 25 min or on a 401), then ``GET {base}/v3/forecast?region=R&signal_type=co2_moer`` with
  ``Authorization: Bearer TOKEN`` -> ``{"data": [{"point_time", "value"}, ...], "meta": {"units":
  "lbs_co2_per_mwh", ...}}`` (5-minute points; the one containing now is the current value).
  This is the **marginal** emissions rate (MOER), not the average intensity Electricity Maps and
  the other sources give: the numbers are not comparable. 1 lb/MWh = 0.45359237 g/kWh.
  ``/v3/signal-index`` (free plan) is a 0-100 percentile with no unit, so it cannot price carbon
  and is not used. Account: ``WATTTIME_USERNAME`` / ``WATTTIME_PASSWORD``.

Options after the zone: ``?refresh_s=300&ttl_s=900&max_stale_s=21600&timeout_s=5&backoff_s=1&
max_backoff_s=600&forecast=1&url=http://127.0.0.1:8080`` (``url`` for a proxy or a test server).
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from llmco2_serve.carbon.intensity import (
    SOURCE_STATIC_FALLBACK, CarbonIntensitySource, Intensity, IntensityError, _check_value, _split_options,
)

logger = logging.getLogger(__name__)

__all__ = ["LiveIntensity", "ElectricityMapsIntensity", "WattTimeIntensity", "ProviderError", "from_spec",
           "LB_PER_MWH_TO_G_PER_KWH"]

# 1 lb = 0.45359237 kg exactly (international avoirdupois pound, 1959); per MWh -> per kWh: / 1000.
LB_PER_MWH_TO_G_PER_KWH = 0.45359237
_MAX_RETRY_AFTER_S = 3600.0


class ProviderError(Exception):
    """One failed refresh. ``status``: HTTP status (None for timeouts, connection errors and bad
    bodies); ``retry_after_s``: the server's Retry-After, when it sent one."""

    def __init__(self, message: str, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, min(_MAX_RETRY_AFTER_S, float(value)))
    except ValueError:
        pass
    try:
        d = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return max(0.0, min(_MAX_RETRY_AFTER_S, d.timestamp() - time.time()))


def _iso(text: Any, what: str) -> float:
    if not isinstance(text, str):
        raise ProviderError(f"{what}: expected an ISO 8601 time, got {text!r}")
    try:
        d = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ProviderError(f"{what}: cannot read time {text!r}") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.timestamp()


def _number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
        raise ProviderError(f"{what}: expected a finite number >= 0, got {x!r}")
    return float(x)


@dataclass(frozen=True)
class _Snapshot:
    """What the refresher leaves for the request path (replaced whole: readers take no lock)."""

    latest: Intensity | None
    fetched_at_s: float  # time.time() of the last success
    forecast: tuple[Intensity, ...]
    ok: bool  # the last refresh succeeded


class LiveIntensity(CarbonIntensitySource):
    """Shared machinery of the live providers (module docstring). Subclasses implement
    :meth:`fetch` (latest value and forecast, raising :class:`ProviderError`)."""

    name = "live"

    def __init__(self, zone: str, *, static_g_per_kwh: float, base_url: str, refresh_s: float = 300.0,
                 ttl_s: float | None = None, max_stale_s: float = 6 * 3600.0, timeout_s: float = 5.0,
                 backoff_s: float = 1.0, max_backoff_s: float = 600.0, forecast: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        if not zone:
            raise IntensityError(f"{self.name}: a zone/region is required")
        for k, v in (("refresh_s", refresh_s), ("timeout_s", timeout_s), ("backoff_s", backoff_s),
                     ("max_backoff_s", max_backoff_s), ("max_stale_s", max_stale_s)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise IntensityError(f"{self.name}: {k} must be > 0, got {v!r}")
        self.zone = zone
        self.base_url = base_url.rstrip("/")
        self.refresh_s = float(refresh_s)
        self.ttl_s = float(ttl_s) if ttl_s is not None else 3.0 * self.refresh_s
        self.max_stale_s = float(max_stale_s)
        self.timeout_s = float(timeout_s)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.want_forecast = bool(forecast)
        self._clock = clock
        self._static = Intensity(_check_value(static_g_per_kwh, "static fallback"), SOURCE_STATIC_FALLBACK,
                                 detail=f"{self.name}:{zone} has no value yet")
        self._snap = _Snapshot(None, 0.0, (), False)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()  # set after the first attempt, success or not
        # counters (read by tests and the stat line)
        self.successes = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.last_status: int | None = None
        self.next_delay_s = 0.0

    # ---------------------------------------------------------------- provider part
    def fetch(self) -> tuple[Intensity, list[Intensity] | None]:  # pragma: no cover - interface
        raise NotImplementedError

    def _get(self, path: str, params: Mapping[str, str], headers: Mapping[str, str]) -> Any:
        """GET ``base + path`` -> parsed JSON, or ProviderError (status, Retry-After)."""
        url = self.base_url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        req = urllib.request.Request(url, headers={"Accept": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - configured URL
                body = resp.read(1 << 20)
        except urllib.error.HTTPError as e:
            ra = _retry_after(e.headers.get("Retry-After") if e.headers else None)
            try:
                detail = e.read(300).decode("utf-8", "replace").strip()
            except Exception:  # noqa: BLE001
                detail = ""
            raise ProviderError(f"HTTP {e.code} from {path}" + (f": {detail}" if detail else ""), e.code, ra) from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ProviderError(f"{path}: {type(reason).__name__}: {reason}") from None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProviderError(f"{path}: malformed JSON ({e}): {body[:80]!r}") from None

    # ---------------------------------------------------------------- refresh loop
    def refresh_once(self) -> bool:
        """One refresh (the thread calls it; tests may too). Returns True on success."""
        try:
            latest, fc = self.fetch()
        except ProviderError as e:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_status = e.status
            first = self.last_error is None or self.consecutive_failures == 1
            self.last_error = str(e)
            (logger.warning if first else logger.debug)(
                "llmco2: %s:%s carbon intensity refresh failed (%d in a row): %s; using %s",
                self.name, self.zone, self.consecutive_failures, e, self._fallback_word())
            old = self._snap
            self._snap = _Snapshot(old.latest, old.fetched_at_s, old.forecast, False)
            self.next_delay_s = self._delay_after(e)
            return False
        except Exception as e:  # noqa: BLE001 - a bug in parsing must not kill the refresher
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = f"{type(e).__name__}: {e}"
            logger.warning("llmco2: %s:%s refresh failed: %s", self.name, self.zone, self.last_error)
            old = self._snap
            self._snap = _Snapshot(old.latest, old.fetched_at_s, old.forecast, False)
            self.next_delay_s = self._delay_after(ProviderError(self.last_error))
            return False
        if fc is None:  # no forecast this time: keep the last one (still valid for its future hours)
            fc_t = self._snap.forecast
        else:
            fc_t = tuple(sorted(fc, key=lambda x: x.period_start_s or 0.0))
        self._snap = _Snapshot(latest, self._clock(), fc_t, True)
        if self.consecutive_failures:
            logger.info("llmco2: %s:%s carbon intensity back after %d failure(s): %.1f g/kWh",
                        self.name, self.zone, self.consecutive_failures, latest.g_per_kwh)
        self.successes += 1
        self.consecutive_failures = 0
        self.last_status = 200
        self.next_delay_s = self.refresh_s
        return True

    def _fallback_word(self) -> str:
        s = self._snap
        return "the last good value" if s.latest is not None else "the static value"

    def _delay_after(self, e: ProviderError) -> float:
        if e.status in (401, 403):
            return self.max_backoff_s
        delay = min(self.max_backoff_s, self.backoff_s * (2.0 ** (self.consecutive_failures - 1)))
        if e.retry_after_s is not None:
            delay = max(delay, e.retry_after_s)
        return delay

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh_once()
            self._ready.set()
            if self._stop.wait(self.next_delay_s):
                break

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"llmco2-intensity-{self.name}", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until the first refresh attempt finished (start-up log, tests)."""
        return self._ready.wait(timeout_s)

    def close(self) -> None:
        self._stop.set()
        t = self._thread
        if t is not None:
            t.join(self.timeout_s + 1.0)

    # ---------------------------------------------------------------- request path
    def at(self, timestamp_s: float) -> Intensity:
        s = self._snap  # one read; the refresher replaces the whole snapshot
        if s.latest is None:
            return self._static
        age = self._clock() - s.fetched_at_s
        if age > self.max_stale_s:
            return self._static
        fresh = s.ok and age <= self.ttl_s
        latest = s.latest
        t = float(timestamp_s)
        if latest.period_start_s is not None and latest.period_s and t >= latest.period_start_s + latest.period_s:
            for p in s.forecast:  # a later moment that the forecast covers
                if p.period_start_s is not None and p.period_s and p.period_start_s <= t < p.period_start_s + p.period_s:
                    return Intensity(p.g_per_kwh, f"{self.name}-forecast" if fresh else f"{self.name}-cached",
                                     p.period_start_s, p.period_s, p.detail)
        if fresh:
            return latest
        return Intensity(latest.g_per_kwh, f"{self.name}-cached", latest.period_start_s, latest.period_s,
                         f"last good value {age:.0f} s old; {self.last_error or 'stale'}")

    def forecast(self, start_s: float, horizon_s: float) -> list[Intensity] | None:
        s = self._snap
        if not s.forecast:
            return None
        stop = start_s + horizon_s
        return [p for p in s.forecast if p.period_start_s is not None
                and p.period_start_s + (p.period_s or 0.0) > start_s and p.period_start_s < stop]

    def describe(self) -> str:
        s = self._snap
        state = (f"{s.latest.g_per_kwh:.1f} g/kWh" if s.latest else "no value yet")
        return (f"{self.name}:{self.zone} via {self.base_url} (refresh {self.refresh_s:g} s, TTL {self.ttl_s:g} s, "
                f"timeout {self.timeout_s:g} s; {state}; {self.successes} ok, {self.failures} failed)")


class ElectricityMapsIntensity(LiveIntensity):
    """Electricity Maps API v3 (module docstring)."""

    name = "electricitymaps"
    DEFAULT_URL = "https://api.electricitymap.org"

    def __init__(self, zone: str, token: str, **kw: Any) -> None:
        if not token:
            raise IntensityError("electricitymaps: no token; set ELECTRICITYMAPS_API_TOKEN")
        kw.setdefault("base_url", self.DEFAULT_URL)
        super().__init__(zone, **kw)
        self._headers = {"auth-token": token}
        self._forecast_ok = self.want_forecast

    def _point(self, d: Any, what: str) -> Intensity:
        if not isinstance(d, dict):
            raise ProviderError(f"{what}: expected an object, got {type(d).__name__}")
        v = _number(d.get("carbonIntensity"), f"{what}.carbonIntensity")
        start = _iso(d.get("datetime"), f"{what}.datetime")
        return Intensity(v, self.name, start, 3600.0, f"zone {d.get('zone', self.zone)}")

    def fetch(self) -> tuple[Intensity, list[Intensity] | None]:
        doc = self._get("/v3/carbon-intensity/latest", {"zone": self.zone}, self._headers)
        latest = self._point(doc, "latest")
        fc: list[Intensity] | None = None
        if self._forecast_ok:
            try:
                fdoc = self._get("/v3/carbon-intensity/forecast", {"zone": self.zone}, self._headers)
                rows = fdoc.get("forecast") if isinstance(fdoc, dict) else None
                if not isinstance(rows, list):
                    raise ProviderError("forecast: no 'forecast' list")
                fc = [self._point(r, f"forecast[{i}]") for i, r in enumerate(rows)]
            except ProviderError as e:
                if e.status in (401, 403, 404):  # not in this plan: keep serving the latest value
                    logger.warning("llmco2: electricitymaps forecast unavailable (%s); forecast off", e)
                    self._forecast_ok = False
                else:
                    logger.debug("llmco2: electricitymaps forecast failed: %s", e)
        return latest, fc


class WattTimeIntensity(LiveIntensity):
    """WattTime API v3, marginal CO2 (module docstring)."""

    name = "watttime"
    DEFAULT_URL = "https://api.watttime.org"
    TOKEN_LIFETIME_S = 25 * 60.0  # WattTime tokens last 30 minutes

    def __init__(self, region: str, username: str, password: str, **kw: Any) -> None:
        if not username or not password:
            raise IntensityError("watttime: no account; set WATTTIME_USERNAME and WATTTIME_PASSWORD")
        kw.setdefault("base_url", self.DEFAULT_URL)
        super().__init__(region, **kw)
        self._basic = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self._token: str | None = None
        self._token_at = 0.0
        self.logins = 0

    def _login(self) -> str:
        doc = self._get("/login", {}, {"Authorization": self._basic})
        tok = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(tok, str) or not tok:
            raise ProviderError("login: no token in the answer")
        self._token, self._token_at = tok, time.monotonic()
        self.logins += 1
        return tok

    def fetch(self) -> tuple[Intensity, list[Intensity] | None]:
        tok = self._token
        if tok is None or time.monotonic() - self._token_at > self.TOKEN_LIFETIME_S:
            tok = self._login()
        params = {"region": self.zone, "signal_type": "co2_moer"}
        if self.want_forecast:
            params["horizon_hours"] = "24"
        else:
            params["horizon_hours"] = "0"
        try:
            doc = self._get("/v3/forecast", params, {"Authorization": f"Bearer {tok}"})
        except ProviderError as e:
            if e.status != 401:
                raise
            tok = self._login()  # expired early: once more with a new token
            doc = self._get("/v3/forecast", params, {"Authorization": f"Bearer {tok}"})
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), list) or not doc["data"]:
            raise ProviderError("forecast: no 'data' points")
        meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
        units = str(meta.get("units", "lbs_co2_per_mwh")).lower()
        if units in ("lbs_co2_per_mwh", "lbs_co2e_per_mwh"):
            scale = LB_PER_MWH_TO_G_PER_KWH
        elif units in ("g_co2_per_kwh", "g_co2e_per_kwh", "kg_co2_per_mwh"):
            scale = 1.0
        else:
            raise ProviderError(f"forecast: unknown units {units!r}")
        pts = []
        for i, d in enumerate(doc["data"]):
            if not isinstance(d, dict):
                raise ProviderError(f"data[{i}]: expected an object")
            pts.append((_iso(d.get("point_time"), f"data[{i}].point_time"),
                        _number(d.get("value"), f"data[{i}].value") * scale))
        pts.sort()
        step = pts[1][0] - pts[0][0] if len(pts) > 1 else 300.0
        fc = [Intensity(v, self.name, t, step, f"region {self.zone}, marginal (MOER)") for t, v in pts]
        now = self._clock()
        cur = fc[0]
        for p in fc:  # the point whose interval contains now (the first one if now is before it)
            if p.period_start_s is not None and p.period_start_s <= now:
                cur = p
        return cur, fc


def _float_opt(opts: Mapping[str, str], key: str, default: float | None) -> float | None:
    if key not in opts:
        return default
    try:
        return float(opts[key])
    except ValueError:
        raise IntensityError(f"option {key}: expected a number, got {opts[key]!r}") from None


def from_spec(kind: str, rest: str, *, static_g_per_kwh: float, environ: Mapping[str, str]) -> LiveIntensity:
    """``electricitymaps:ZONE?opts`` / ``watttime:REGION?opts`` -> an unstarted provider."""
    keys = ("refresh_s", "ttl_s", "max_stale_s", "timeout_s", "backoff_s", "max_backoff_s", "forecast", "url")
    zone, opts = _split_options(rest, f"{kind}:{rest}", keys)
    kw: dict[str, Any] = {"static_g_per_kwh": static_g_per_kwh}
    for k in keys[:6]:
        v = _float_opt(opts, k, None)
        if v is not None:
            kw[k] = v
    if "forecast" in opts:
        kw["forecast"] = opts["forecast"].strip().lower() not in ("0", "false", "no", "off")
    if opts.get("url"):
        if not opts["url"].startswith(("http://", "https://")):
            raise IntensityError(f"{kind}: url must be http(s)://..., got {opts['url']!r}")
        kw["base_url"] = opts["url"]
    zone = zone.strip()
    if kind == "electricitymaps":
        return ElectricityMapsIntensity(zone, environ.get("ELECTRICITYMAPS_API_TOKEN", "").strip(), **kw)
    if kind == "watttime":
        return WattTimeIntensity(zone, environ.get("WATTTIME_USERNAME", "").strip(),
                                 environ.get("WATTTIME_PASSWORD", ""), **kw)
    raise IntensityError(f"unknown live provider {kind!r}")
