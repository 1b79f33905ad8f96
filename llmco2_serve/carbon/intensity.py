"""Carbon intensity of the grid by place and time: one interface, several sources, one setting.

Every source answers :meth:`CarbonIntensitySource.at` (the intensity at a moment, gCO2e/kWh, with
a label saying where it came from) and, where it knows the future, :meth:`forecast` and
:meth:`next_hour_below` (the admission controller's "next cleaner hour"). The plugin asks at the
moment the energy is spent: a request's prediction at admission, its measurement at finish.

Sources (``LLMCO2_CARBON_INTENSITY``, parsed by :func:`source_from_spec`):

``481`` (a number) / empty
    :class:`StaticIntensity`: one fixed value (empty: ``LLMCO2_CARBON_INTENSITY_G_PER_KWH``, 481 by
    default, Ember world 2023). Label ``static``.
``zone:FR``, ``zone:DEU``, ``zone:US-CA``, ``zone:CA-QC``, ``zone:CN-BJ``, ``zone:SE-SE3``
    :class:`ZoneIntensity`: one yearly value per country or region from the data that ships with
    **codecarbon** (MIT licence, (c) Mila, BCG GAMMA, Comet.ml, Haverford College, Code Carbon NGO;
    https://github.com/mlco2/codecarbon), resolved by codecarbon's own
    ``Emissions.get_private_infra_emissions``, so the value is exactly what codecarbon reports for
    that place. Its data and their sources (as the files say): countries,
    ``data/private_infra/global_energy_mix.json`` (``carbon_intensity`` per ISO-3 country, lifecycle
    gCO2e/kWh, Our World in Data's compilation of Ember and Energy Institute data, mostly 2022/2023);
    US states, ``2023/usa_emissions.json`` (EPA eGRID2023, state CO2e output emission rate, lb/MWh);
    Canadian provinces, ``2023/canada_energy_mix.json`` (generation mix, converted by codecarbon's
    per-fuel factors); Chinese provinces, ``2023/china_provincial_emissions.json`` (MEE/NBS 2023
    provincial factors, CO2 only); Nordic bidding zones, ``nordic_emissions.json`` (ENTSO-E
    generation mix). An unknown code is an error naming the closest known codes. Label
    ``codecarbon``.
``file:/path/series.csv[?column=lca|direct&outside=static|nearest|wrap&area=DEU]``
    :class:`FileIntensity`: an hourly (or any regular) time series; the value at t is the one of the
    period containing t. Layouts (detected from the header, see :func:`load_series`): the
    Electricity Maps data-portal export (``Datetime (UTC)``, ``Carbon Intensity gCO₂eq/kWh (LCA)``
    or ``(direct)``; the 2024+ header ``Carbon intensity gCO₂eq/kWh (Life cycle)``), Ember's
    monthly/yearly exports (long format ``Date``/``Variable``= ``CO2 intensity``/``Value``, and the
    2026 format ``Electricity source`` = ``Total generation`` / ``Emissions intensity
    (gCO2e/kWh)``), or a plain two-column CSV (``timestamp``, ``g_per_kwh``; ISO-8601 times, naive =
    UTC, or Unix seconds). Outside the file's range: the static value labelled ``static-fallback``
    (default), the nearest row (``file-nearest``) or the same position in the file's span
    (``file-wrapped``, for replaying a past year today). A gap inside the range carries the last
    row forward (``file-gap``). The file's future rows serve as a perfect forecast (it is a
    recording, say so when comparing with real forecasts).
``electricitymaps:DE`` / ``watttime:CAISO_NORTH``
    Live providers (:mod:`llmco2_serve.carbon.live_intensity`): Electricity Maps (average,
    lifecycle, token in ``ELECTRICITYMAPS_API_TOKEN``) and WattTime (marginal MOER, account in
    ``WATTTIME_USERNAME`` / ``WATTTIME_PASSWORD``), refreshed by a background thread; the request
    path reads only the cached value.

A packaged real series: :data:`PACKAGED_SERIES` (``file:packaged:DE_2022_hourly.csv``), Electricity
Maps hourly Germany 2022, ODbL (``data/DE_2022_HOURLY.md``).
"""

from __future__ import annotations

import bisect
import calendar
import csv
import difflib
import io
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Sequence
from urllib.parse import parse_qs

__all__ = [
    "Intensity",
    "IntensityError",
    "CarbonIntensitySource",
    "StaticIntensity",
    "ZoneIntensity",
    "FileIntensity",
    "Series",
    "load_series",
    "resolve_zone",
    "source_from_spec",
    "check_spec",
    "packaged_series_path",
    "PACKAGED_SERIES",
    "SOURCE_STATIC",
    "SOURCE_STATIC_FALLBACK",
]

SOURCE_STATIC = "static"
SOURCE_STATIC_FALLBACK = "static-fallback"
HOUR_S = 3600.0
PACKAGED_SERIES = ("DE_2022_hourly.csv",)


class IntensityError(ValueError):
    """A carbon-intensity source cannot be built or read (bad spec, file, zone or response)."""


@dataclass(frozen=True)
class Intensity:
    """The grid's carbon intensity at a moment.

    Attributes:
        g_per_kwh: gCO2e per kWh of electricity, >= 0.
        source: where it came from, for ``llmco2.carbon_intensity.source`` (``static``,
            ``codecarbon``, ``file``, ``electricitymaps``, ``electricitymaps-cached``,
            ``static-fallback``, ...).
        period_start_s: start of the period the value is for (Unix s), None for static values.
        period_s: length of that period (s), None when unknown or unbounded.
        detail: free text (zone, column, why a fallback).
    """

    g_per_kwh: float
    source: str
    period_start_s: float | None = None
    period_s: float | None = None
    detail: str = ""


class CarbonIntensitySource:
    """Interface. Subclasses implement :meth:`at`; those that know the future, :meth:`forecast`."""

    name = "abstract"

    def at(self, timestamp_s: float) -> Intensity:  # pragma: no cover - interface
        """Intensity at ``timestamp_s`` (Unix seconds). Never raises, never blocks on I/O."""
        raise NotImplementedError

    def now(self) -> Intensity:
        return self.at(time.time())

    def forecast(self, start_s: float, horizon_s: float) -> list[Intensity] | None:
        """Periods overlapping ``[start_s, start_s + horizon_s)``, in time order, or None when this
        source has no forecast (static sources: the value never changes, see next_hour_below)."""
        return None

    def next_hour_below(self, threshold_g_per_kwh: float, now_s: float, horizon_s: float) -> float | None:
        """The earliest time in ``[now_s, now_s + horizon_s]`` at which the intensity is below
        ``threshold_g_per_kwh``: ``now_s`` when it already is, else the start of the first forecast
        period below it; None when none is (or nothing is known about the future)."""
        cur = self.at(now_s)
        if cur.g_per_kwh < threshold_g_per_kwh:
            return now_s
        periods = self.forecast(now_s, horizon_s)
        for p in periods or ():
            start = p.period_start_s if p.period_start_s is not None else now_s
            if start > now_s + horizon_s:
                break
            if p.g_per_kwh < threshold_g_per_kwh:
                return max(now_s, start)
        return None

    def start(self) -> None:
        """Start background work (live providers); no-op for the others."""

    def close(self) -> None:
        """Stop background work."""

    def describe(self) -> str:
        return self.name


class StaticIntensity(CarbonIntensitySource):
    """One value for every moment (the plugin's behaviour before time-varying sources)."""

    name = SOURCE_STATIC

    def __init__(self, g_per_kwh: float, source: str = SOURCE_STATIC, detail: str = "") -> None:
        self.value = Intensity(_check_value(g_per_kwh, "intensity"), source, detail=detail)

    def at(self, timestamp_s: float) -> Intensity:
        return self.value

    def describe(self) -> str:
        return f"{self.value.source} {self.value.g_per_kwh:g} gCO2e/kWh" + (
            f" ({self.value.detail})" if self.value.detail else "")


def _check_value(v: object, what: str) -> float:
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise IntensityError(f"{what}: expected a number of gCO2e/kWh, got {v!r}") from None
    if isinstance(v, bool) or not math.isfinite(x) or x < 0:
        raise IntensityError(f"{what}: expected a finite number >= 0 gCO2e/kWh, got {v!r}")
    return x


# ---------------------------------------------------------------- country / region (codecarbon)

_NORDIC = {"SWE": ("SE1", "SE2", "SE3", "SE4"), "NOR": ("NO1", "NO2", "NO3", "NO4", "NO5"), "FIN": ("FI",)}


def _codecarbon():
    try:
        from codecarbon.core.emissions import Emissions
        from codecarbon.core.units import Energy
        from codecarbon.external.geography import GeoMetadata
        from codecarbon.input import DataSource
    except ImportError as e:
        raise IntensityError(
            "zone:...: needs codecarbon (its per-country data); pip install 'llmco2-serve[cpu-estimate]' "
            f"or pip install codecarbon ({e})") from e
    return Emissions, Energy, GeoMetadata, DataSource


def _known_zone_codes(ds) -> dict[str, tuple[str, str | None, str]]:
    """code -> (ISO-3 country, codecarbon region name or None, label) for every place codecarbon knows."""
    import pycountry  # a codecarbon dependency

    codes: dict[str, tuple[str, str | None, str]] = {}
    mix = ds.get_global_energy_mix_data()
    for iso3, row in mix.items():
        name = str(row.get("country_name") or iso3)
        codes[iso3.upper()] = (iso3, None, name)
        c = pycountry.countries.get(alpha_3=iso3)
        if c is not None:
            codes[c.alpha_2.upper()] = (iso3, None, name)
    for iso2, iso3, getter in (("US", "USA", "usa"), ("CA", "CAN", "can")):
        try:
            data = (ds.get_country_emissions_data(getter) if iso3 == "USA" else ds.get_country_energy_mix_data(getter))
        except Exception:  # noqa: BLE001 - a codecarbon without this file: fewer regions
            continue
        by_name = {str(k).lower(): k for k in data if not str(k).startswith("_")}
        for sub in pycountry.subdivisions.get(country_code=iso2) or ():
            key = sub.name.lower()
            if key in by_name:
                codes[sub.code.upper()] = (iso3, by_name[key], f"{sub.name}, {iso2}")
    try:
        china = ds.get_china_provincial_emissions_data()["data"]
        for code, row in china.items():
            names = row.get("names") or []
            if names:
                codes[code.upper()] = ("CHN", names[0], f"{row.get('description', code)}, CN")
    except Exception:  # noqa: BLE001
        pass
    try:
        nordic = ds.get_nordic_country_energy_mix_data()["data"]
        for iso3, zones in _NORDIC.items():
            iso2 = {"SWE": "SE", "NOR": "NO", "FIN": "FI"}[iso3]
            for z in zones:
                if z in nordic and z != iso2:
                    codes[f"{iso2}-{z}"] = (iso3, z, f"{nordic[z].get('description', z)}")
    except Exception:  # noqa: BLE001
        pass
    return codes


@dataclass(frozen=True)
class ZoneValue:
    code: str
    g_per_kwh: float
    label: str


def resolve_zone(code: str) -> ZoneValue:
    """gCO2e/kWh of a country (ISO-2/ISO-3) or region (``US-CA``, ``CA-QC``, ``CN-BJ``, ``SE-SE3``)
    as codecarbon computes it from its packaged data. Raises :class:`IntensityError` naming close
    matches for an unknown code."""
    Emissions, Energy, GeoMetadata, DataSource = _codecarbon()
    ds = DataSource()
    wanted = code.strip().upper()
    known = _known_zone_codes(ds)
    if wanted not in known:
        close = difflib.get_close_matches(wanted, list(known), n=5, cutoff=0.5)
        by_name = [c for c, (_, _, label) in known.items()
                   if wanted.lower() in label.lower() and (len(c) == 2 or "-" in c)][:5]
        hint = sorted(set(close + by_name))
        raise IntensityError(
            f"zone:{code}: not a country or region in codecarbon's data "
            f"({len(known)} codes: ISO-2/ISO-3 countries, US-xx states, CA-xx provinces, CN-xx, SE-SE1..4, "
            f"NO-NO1..5)" + (f"; did you mean {', '.join(hint)}?" if hint else ""))
    iso3, region, label = known[wanted]
    geo = GeoMetadata(country_iso_code=iso3, country_name=label, region=region)
    emissions = Emissions(ds)
    kg_per_kwh = (emissions.get_region_emissions(Energy.from_energy(kWh=1.0), geo) if region is not None
                  else emissions.get_country_emissions(Energy.from_energy(kWh=1.0), geo))
    return ZoneValue(wanted, _check_value(kg_per_kwh * 1000.0, f"zone:{code}"), label)


class ZoneIntensity(StaticIntensity):
    """A country's or region's yearly intensity from codecarbon's data (module docstring)."""

    name = "codecarbon"

    def __init__(self, code: str) -> None:
        z = resolve_zone(code)
        super().__init__(z.g_per_kwh, source="codecarbon", detail=f"zone {z.code} ({z.label})")
        self.zone = z


# ---------------------------------------------------------------- time-series files


@dataclass
class Series:
    """A regular time series: period starts (Unix s, sorted), values (gCO2e/kWh), one period."""

    starts_s: list[float]
    values: list[float]
    period_s: float
    layout: str
    column: str
    ends_s: list[float] = field(default_factory=list)  # per row (months differ); filled by load

    @property
    def first_s(self) -> float:
        return self.starts_s[0]

    @property
    def end_s(self) -> float:
        return self.ends_s[-1]


def _norm(h: str) -> str:
    return " ".join(h.replace("₂", "2").replace("\ufeff", "").strip().lower().split())


def _parse_time(text: str, where: str) -> float:
    t = text.strip()
    if not t:
        raise IntensityError(f"{where}: empty timestamp")
    try:
        return float(t)  # Unix seconds
    except ValueError:
        pass
    try:
        d = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        if len(t) == 4 and t.isdigit():  # Ember yearly
            d = datetime(int(t), 1, 1)
        else:
            raise IntensityError(f"{where}: cannot read timestamp {text!r} (expected ISO 8601 "
                                 "like 2022-01-01 00:00:00, naive = UTC, or Unix seconds)") from None
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    return d.timestamp()


def _month_end(start_s: float) -> float:
    d = datetime.fromtimestamp(start_s, timezone.utc)
    y, m = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    return calendar.timegm((y, m, 1, 0, 0, 0))


def _year_end(start_s: float) -> float:
    d = datetime.fromtimestamp(start_s, timezone.utc)
    return calendar.timegm((d.year + 1, 1, 1, 0, 0, 0))


def load_series(path_or_text: str, *, column: str | None = None, area: str | None = None,
                text: bool = False) -> Series:
    """Read a carbon-intensity CSV (layouts in the module docstring).

    Args:
        path_or_text: a file path, or the CSV itself with ``text=True``.
        column: Electricity Maps exports: ``lca`` (life cycle, default) or ``direct``.
        area: Ember exports with several areas: the ``ISO 3 code`` or ``Area`` to keep.
    """
    where = "<text>" if text else path_or_text
    if text:
        raw = path_or_text
    else:
        try:
            with open(path_or_text, encoding="utf-8-sig", newline="") as f:
                raw = f.read()
        except OSError as e:
            raise IntensityError(f"file:{path_or_text}: cannot read: {e.strerror or e}") from e
    rows = csv.reader(io.StringIO(raw))
    try:
        header = next(rows)
    except StopIteration:
        raise IntensityError(f"{where}: empty file") from None
    cols = [_norm(h) for h in header]
    idx = {c: i for i, c in enumerate(cols)}
    period: str | float | None = None  # "month", "year" or seconds (None: inferred)
    filt: tuple[int, set[str]] | None = None
    area_col: int | None = None

    def find(*preds) -> int | None:
        for i, c in enumerate(cols):
            if all(p in c for p in preds):
                return i
        return None

    if "variable" in idx and "value" in idx and ("date" in idx or "year" in idx):  # Ember long format
        layout = "ember-long"
        t_i = idx.get("date", idx.get("year"))
        v_i = idx["value"]
        filt = (idx["variable"], {"co2 intensity"})
        period = "month" if "date" in idx else "year"
        col_name = "Value (Variable = CO2 intensity)"
        area_col = idx.get("iso 3 code", idx.get("area"))
    elif "electricity source" in idx and find("emissions intensity") is not None:  # Ember 2026 format
        layout = "ember"
        t_i = idx.get("date", idx.get("year"))
        if t_i is None:
            raise IntensityError(f"{where}: Ember export without a Date or Year column")
        v_i = find("emissions intensity")
        filt = (idx["electricity source"], {"total generation"})
        period = "month" if "date" in idx else "year"
        col_name = header[v_i] + " (Electricity source = Total generation)"
        area_col = idx.get("iso 3 code", idx.get("area"))
    elif find("carbon intensity", "gco2") is not None and find("datetime") is not None:  # Electricity Maps
        layout = "electricitymaps"
        t_i = find("datetime", "utc")
        if t_i is None:
            t_i = find("datetime")
        want = (column or "lca").lower()
        if want not in ("lca", "direct"):
            raise IntensityError(f"{where}: column must be lca or direct, got {column!r}")
        if want == "direct":
            v_i = find("carbon intensity", "direct")
        else:
            v_i = find("carbon intensity", "lca")
            if v_i is None:
                v_i = find("carbon intensity", "life cycle")
        if v_i is None:
            raise IntensityError(f"{where}: Electricity Maps export without a {want} carbon-intensity column; "
                                 f"columns: {header}")
        col_name = header[v_i]
        area_col = find("zone id")
    else:  # plain: a time column and a value column
        layout = "plain"
        t_i = next((idx[k] for k in ("timestamp", "datetime", "time", "date", "timestamp_s") if k in idx), None)
        v_i = next((i for i, c in enumerate(cols) if c in ("g_per_kwh", "gco2e/kwh", "gco2/kwh", "intensity",
                                                            "carbon_intensity", "carbon_intensity_g_per_kwh",
                                                            "carbon intensity", "value")), None)
        if v_i is None:
            v_i = find("intensity")
        if t_i is None or v_i is None:
            raise IntensityError(
                f"{where}: unknown layout; expected an Electricity Maps data-portal export (Datetime (UTC), "
                "Carbon Intensity gCO2eq/kWh (LCA)), an Ember export (Date, Variable=CO2 intensity, Value; or "
                f"Electricity source, Emissions intensity (gCO2e/kWh)) or columns timestamp,g_per_kwh; got {header}")
        col_name = header[v_i]
    areas: set[str] = set()
    points: list[tuple[float, float]] = []
    for n, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if max(t_i, v_i) >= len(row):
            raise IntensityError(f"{where}:{n}: {len(row)} fields, expected {len(header)}")
        if filt is not None and _norm(row[filt[0]]) not in filt[1]:
            continue
        if area_col is not None and area_col < len(row):
            a = row[area_col].strip()
            if area is not None and a.upper() != area.upper() and (
                    layout == "electricitymaps" or _norm(row[idx.get("area", area_col)]) != _norm(area)):
                continue
            areas.add(a)
        v = row[v_i].strip()
        if not v:
            continue  # a missing hour: treated as a gap
        try:
            value = _check_value(float(v), f"{where}:{n}")
        except ValueError:
            raise IntensityError(f"{where}:{n}: {header[v_i]!r} is not a number: {v!r}") from None
        points.append((_parse_time(row[t_i], f"{where}:{n}"), value))
    if len(areas) > 1:
        raise IntensityError(f"{where}: rows for {len(areas)} areas ({', '.join(sorted(areas)[:8])}...); "
                             "choose one with ?area=ISO3")
    if not points:
        raise IntensityError(f"{where}: no carbon-intensity rows" + (f" for area {area}" if area else ""))
    points.sort()
    starts = [p[0] for p in points]
    for a, b in zip(starts, starts[1:]):
        if a == b:
            raise IntensityError(f"{where}: two rows for {datetime.fromtimestamp(a, timezone.utc).isoformat()}")
    values = [p[1] for p in points]
    if period == "month":
        ends = [_month_end(s) for s in starts]
        period_s = 31 * 86400.0
    elif period == "year":
        ends = [_year_end(s) for s in starts]
        period_s = 366 * 86400.0
    else:
        # The spacing of the rows (hourly for the Electricity Maps exports); one row alone: an hour.
        period_s = statistics.median_low([b - a for a, b in zip(starts, starts[1:])]) if len(starts) > 1 else HOUR_S
        ends = [s + period_s for s in starts]
    return Series(starts, values, period_s, layout, col_name, ends)


_OUTSIDE = ("static", "nearest", "wrap")


class FileIntensity(CarbonIntensitySource):
    """A recorded series (module docstring); lookups are a bisection (~1 us)."""

    name = "file"

    def __init__(self, path: str, *, static_g_per_kwh: float, column: str | None = None,
                 outside: str = "static", area: str | None = None) -> None:
        if outside not in _OUTSIDE:
            raise IntensityError(f"file:{path}: outside must be one of {_OUTSIDE}, got {outside!r}")
        self.path = path
        self.series = load_series(path, column=column, area=area)
        self.outside = outside
        self.static = Intensity(_check_value(static_g_per_kwh, "static fallback"), SOURCE_STATIC_FALLBACK,
                                detail=f"outside {os.path.basename(path)}")

    def _row(self, t: float) -> int:
        return bisect.bisect_right(self.series.starts_s, t) - 1

    def at(self, timestamp_s: float) -> Intensity:
        s = self.series
        t = float(timestamp_s)
        label = "file"
        if t < s.first_s or t >= s.end_s:
            if self.outside == "static":
                return self.static
            if self.outside == "nearest":
                i = 0 if t < s.first_s else len(s.starts_s) - 1
                return Intensity(s.values[i], "file-nearest", s.starts_s[i], s.ends_s[i] - s.starts_s[i])
            span = s.end_s - s.first_s
            t = s.first_s + (t - s.first_s) % span
            label = "file-wrapped"
        i = self._row(t)
        start, end = s.starts_s[i], s.ends_s[i]
        if t >= end:  # a gap in the file: the last row carried forward
            return Intensity(s.values[i], "file-gap", start, end - start)
        if label == "file-wrapped":  # report the period in the caller's time, not the file's
            start = timestamp_s - (t - start)
        return Intensity(s.values[i], label, start, end - s.starts_s[i])

    def forecast(self, start_s: float, horizon_s: float) -> list[Intensity] | None:
        out: list[Intensity] = []
        t, stop = float(start_s), float(start_s) + float(horizon_s)
        while t < stop and len(out) < 100000:
            v = self.at(t)
            out.append(v)
            if v.period_start_s is None or not v.period_s:
                break  # static fallback: the same from here on
            t = v.period_start_s + v.period_s
        return out

    def describe(self) -> str:
        s = self.series
        fmt = lambda x: datetime.fromtimestamp(x, timezone.utc).strftime("%Y-%m-%d %H:%M")  # noqa: E731
        return (f"file {self.path} ({s.layout}, {s.column}, {len(s.values)} rows {fmt(s.first_s)}.."
                f"{fmt(s.end_s)} UTC; outside: {self.outside})")


def packaged_series_path(name: str = PACKAGED_SERIES[0]) -> str:
    """Path of a series shipped in ``llmco2_serve/data`` (e.g. ``DE_2022_hourly.csv``)."""
    from importlib import resources

    if name not in PACKAGED_SERIES:
        raise IntensityError(f"packaged series {name!r}: known {PACKAGED_SERIES}")
    return str(resources.files("llmco2_serve.data").joinpath(name))


# ---------------------------------------------------------------- the setting


def _split_options(rest: str, what: str, allowed: Sequence[str]) -> tuple[str, dict[str, str]]:
    base, _, query = rest.partition("?")
    opts: dict[str, str] = {}
    for k, v in parse_qs(query, keep_blank_values=True).items():
        if k not in allowed:
            raise IntensityError(f"{what}: unknown option {k!r}; known: {', '.join(allowed)}")
        opts[k] = v[-1]
    return base, opts


def check_spec(spec: str | None) -> str:
    """Syntax check of ``LLMCO2_CARBON_INTENSITY`` without I/O (settings validation): returns the
    kind (``static``, ``zone``, ``file``, ``electricitymaps``, ``watttime``)."""
    text = (spec or "").strip()
    if not text:
        return "static"
    try:
        _check_value(float(text), "LLMCO2_CARBON_INTENSITY")
        return "static"
    except ValueError:
        pass
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if kind in ("electricitymaps", "watttime") and not sep:
        raise IntensityError(f"{kind} needs a zone/region: {kind}:ZONE (e.g. electricitymaps:DE, "
                             "watttime:CAISO_NORTH)")
    if kind not in ("zone", "file", "electricitymaps", "watttime") or not rest.strip():
        raise IntensityError(
            f"expected a number (gCO2e/kWh), zone:CODE, file:PATH.csv, electricitymaps:ZONE or "
            f"watttime:REGION, got {spec!r}")
    return kind


def source_from_spec(spec: str | None, *, static_g_per_kwh: float,
                     environ: dict[str, str] | None = None) -> CarbonIntensitySource:
    """Build the source named by ``LLMCO2_CARBON_INTENSITY`` (module docstring). Raises
    :class:`IntensityError` with the reason. Live sources are returned unstarted (call start())."""
    kind = check_spec(spec)
    text = (spec or "").strip()
    if kind == "static":
        return StaticIntensity(float(text) if text else static_g_per_kwh)
    rest = text.partition(":")[2].strip()
    if kind == "zone":
        return ZoneIntensity(rest)
    if kind == "file":
        path, opts = _split_options(rest, text, ("column", "outside", "area"))
        if path.startswith("packaged:"):
            path = packaged_series_path(path[len("packaged:"):])
        return FileIntensity(os.path.expanduser(path), static_g_per_kwh=static_g_per_kwh,
                             column=opts.get("column"), outside=opts.get("outside", "static"),
                             area=opts.get("area"))
    from llmco2_serve.carbon import live_intensity as live

    env = dict(os.environ if environ is None else environ)
    return live.from_spec(kind, rest, static_g_per_kwh=static_g_per_kwh, environ=env)
