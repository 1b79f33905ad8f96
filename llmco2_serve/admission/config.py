"""The admission policy file (TOML or JSON), validated into a frozen :class:`AdmissionConfig`.

Every error names the key that caused it (``FILE:budgets.tenants.team-a.per_hour_co2_g``), so a
typo is found at start-up, not at the first request. A file that changes while the server runs
is re-read by :class:`ConfigWatcher` (mtime/size/inode poll); a bad new version is refused
(logged, counted) and the previous one keeps serving.

Layout (every table optional; see README "Admission control")::

    mode = "enforce"            # or "dry-run": decide, log and count, admit everything
    fail_open = true            # admit (and count) when the predictor or the store fails
    reload_interval_s = 2       # how often the file is checked for changes (0: never)

    [request_cap]               # one request's predicted carbon and/or energy
    co2_g = 0.5
    energy_j = 3600
    on = "upper"                # "upper" (at max_tokens) or "expected"
    action = "refuse"           # or "lower_max_tokens"

    [budgets]                   # per-tenant carbon budgets over rolling windows
    store = "/var/lib/llmco2/admission.sqlite"
    shared = "auto"             # one budget over several processes (auto: --api-server-count > 1)
    tenant_header = "x-llmco2-tenant"   # else the API key (hashed), else "default"
    default = { per_hour_co2_g = 50 }   # tenants not listed below ("" or absent: unlimited)
    [budgets.tenants.team-a]
    per_minute_co2_g = 1
    per_day_co2_g = 200
    windows = [{ seconds = 5, co2_g = 0.01 }]   # any other window length
    class = "interactive"       # for priority by tenant class

    [priority]                  # vLLM request priority (--scheduling-policy priority); lower runs first
    by = "carbon"               # or "tenant_class"
    co2_g_thresholds = [0.01, 0.1, 1.0]   # predicted co2 below the i-th threshold -> priority i
    classes = { interactive = -10, batch = 10 }
    override_client = false     # keep a priority the client set

    [deferral]                  # grid-aware deferral of requests that say they can wait
    header = "x-llmco2-deferrable"
    max_intensity_g_per_kwh = 300
    horizon_s = 86400           # only defer when a cleaner hour comes within this time
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AdmissionConfig", "AdmissionConfigError", "BudgetConfig", "DeferralConfig", "PriorityConfig",
    "RequestCapConfig", "TenantBudget", "Window", "load_config_file", "parse_config", "config_from_settings",
]

MODES = ("enforce", "dry-run")
CAP_ON = ("upper", "expected")
CAP_ACTIONS = ("refuse", "lower_max_tokens")
PRIORITY_BY = ("carbon", "tenant_class")
# The shorthand window keys of a tenant's budget and their lengths.
NAMED_WINDOWS_S = {"per_minute_co2_g": 60.0, "per_hour_co2_g": 3600.0, "per_day_co2_g": 86400.0}
DEFAULT_TENANT_HEADER = "x-llmco2-tenant"
DEFAULT_DEFERRAL_HEADER = "x-llmco2-deferrable"


class AdmissionConfigError(ValueError):
    """The admission config is invalid; ``key`` names where (``FILE:table.key`` or a variable)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Window:
    """A rolling window: at most ``co2_g`` grams in any ``seconds`` ending now."""

    seconds: float
    co2_g: float


@dataclass(frozen=True)
class TenantBudget:
    windows: tuple[Window, ...] = ()
    tenant_class: str | None = None

    @property
    def limited(self) -> bool:
        return bool(self.windows)


@dataclass(frozen=True)
class RequestCapConfig:
    co2_g: float | None = None
    energy_j: float | None = None
    on: str = "upper"
    action: str = "refuse"


@dataclass(frozen=True)
class BudgetConfig:
    store: str | None = None  # SQLite file; None: in memory only (nothing survives a restart)
    tenant_header: str = DEFAULT_TENANT_HEADER
    default: TenantBudget = TenantBudget()
    tenants: Mapping[str, TenantBudget] = field(default_factory=dict)
    # A request's reservation that never hears back (engine lost, bug) is released after this.
    reservation_ttl_s: float = 3600.0
    # After a request ends, how long to wait for its measured final value before settling with
    # the prediction (the final follows within about one counter period, < 1 s on NVML).
    settle_wait_s: float = 5.0
    # Several processes on one node spend the same budgets (SharedBudgetLedger): None = when vLLM
    # runs more than one API server (--api-server-count > 1); True/False force it.
    shared: bool | None = None

    def budget_for(self, tenant: str) -> TenantBudget:
        return self.tenants.get(tenant, self.default)

    @property
    def max_window_s(self) -> float:
        ws = [w.seconds for b in (self.default, *self.tenants.values()) for w in b.windows]
        return max(ws) if ws else 0.0


@dataclass(frozen=True)
class PriorityConfig:
    by: str = "carbon"
    co2_g_thresholds: tuple[float, ...] = ()
    classes: Mapping[str, int] = field(default_factory=dict)
    override_client: bool = False


@dataclass(frozen=True)
class DeferralConfig:
    header: str = DEFAULT_DEFERRAL_HEADER
    max_intensity_g_per_kwh: float = math.inf
    horizon_s: float = 86400.0


@dataclass(frozen=True)
class AdmissionConfig:
    mode: str = "enforce"
    fail_open: bool = True
    reload_interval_s: float = 2.0
    request_cap: RequestCapConfig | None = None
    budgets: BudgetConfig | None = None
    priority: PriorityConfig | None = None
    deferral: DeferralConfig | None = None
    source: str = ""  # the file, or the variable it came from

    @property
    def dry_run(self) -> bool:
        return self.mode == "dry-run"

    def describe(self) -> str:
        parts = [f"admission {self.mode} ({self.source or 'no file'})"]
        c = self.request_cap
        if c is not None:
            lim = " and ".join(x for x in (f"{c.co2_g:g} g" if c.co2_g is not None else "",
                                           f"{c.energy_j:g} J" if c.energy_j is not None else "") if x)
            parts.append(f"request cap {lim} on the {c.on} value ({c.action})")
        b = self.budgets
        if b is not None:
            parts.append(f"budgets for {len(b.tenants)} tenant(s)"
                         f"{' + default' if b.default.limited else ''}, store {b.store or 'memory'}"
                         f"{'' if b.shared is None else ', shared' if b.shared else ', not shared'}")
        if self.priority is not None:
            parts.append(f"priority by {self.priority.by}")
        if self.deferral is not None:
            parts.append(f"deferral above {self.deferral.max_intensity_g_per_kwh:g} g/kWh")
        parts.append(f"fail_open {self.fail_open}")
        return "; ".join(parts)


# ---------------------------------------------------------------- validation helpers
def _table(key: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise AdmissionConfigError(key, f"expected a table/object, got {type(raw).__name__}")
    return raw


def _no_unknown(key: str, d: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise AdmissionConfigError(f"{key}{'' if key.endswith(':') else '.'}{unknown[0]}" if key else unknown[0],
                                   f"unknown key; known: {sorted(known)}")


def _number(key: str, raw: Any, *, positive: bool = True, allow_zero: bool = False) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise AdmissionConfigError(key, f"expected a number, got {raw!r}")
    x = float(raw)
    if not math.isfinite(x) or (positive and (x < 0 or (x == 0 and not allow_zero))):
        raise AdmissionConfigError(key, f"expected a finite number {'>= 0' if allow_zero else '> 0'}, got {raw!r}")
    return x


def _choice(key: str, raw: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(raw, str) or raw.strip().lower() not in choices:
        raise AdmissionConfigError(key, f"expected one of {list(choices)}, got {raw!r}")
    return raw.strip().lower()


def _bool(key: str, raw: Any) -> bool:
    if not isinstance(raw, bool):
        raise AdmissionConfigError(key, f"expected true or false, got {raw!r}")
    return raw


def _header(key: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip() or not all(c.isalnum() or c in "-_" for c in raw.strip()):
        raise AdmissionConfigError(key, f"expected an HTTP header name, got {raw!r}")
    return raw.strip().lower()


def _budget(key: str, raw: Any) -> TenantBudget:
    d = _table(key, raw)
    _no_unknown(key, d, {*NAMED_WINDOWS_S, "windows", "class"})
    windows = [Window(NAMED_WINDOWS_S[k], _number(f"{key}.{k}", d[k], allow_zero=True))
               for k in NAMED_WINDOWS_S if k in d]
    extra = d.get("windows", [])
    if not isinstance(extra, list):
        raise AdmissionConfigError(f"{key}.windows", "expected a list of {seconds, co2_g} tables")
    for i, w in enumerate(extra):
        wk = f"{key}.windows[{i}]"
        w = _table(wk, w)
        _no_unknown(wk, w, {"seconds", "co2_g"})
        for need in ("seconds", "co2_g"):
            if need not in w:
                raise AdmissionConfigError(f"{wk}.{need}", "missing")
        windows.append(Window(_number(f"{wk}.seconds", w["seconds"]),
                              _number(f"{wk}.co2_g", w["co2_g"], allow_zero=True)))
    seen: set[float] = set()
    for w in windows:
        if w.seconds in seen:
            raise AdmissionConfigError(key, f"two budgets for the same {w.seconds:g} s window")
        seen.add(w.seconds)
    cls = d.get("class")
    if cls is not None and (not isinstance(cls, str) or not cls.strip()):
        raise AdmissionConfigError(f"{key}.class", f"expected a class name, got {cls!r}")
    return TenantBudget(tuple(sorted(windows, key=lambda w: w.seconds)), cls.strip() if cls else None)


def parse_config(doc: Mapping[str, Any], source: str = "") -> AdmissionConfig:
    """Validate a parsed document. Raises :class:`AdmissionConfigError` naming the key."""
    p = f"{source}:" if source else ""
    d = _table(source or "admission", doc)
    if isinstance(d.get("admission"), dict) and len(d) == 1:  # [admission] table
        d, p = d["admission"], p + "admission."
    _no_unknown(p.rstrip("."), d, {"mode", "fail_open", "reload_interval_s", "request_cap", "budgets",
                                   "priority", "deferral"})
    mode = _choice(p + "mode", d.get("mode", "enforce"), MODES)
    fail_open = _bool(p + "fail_open", d.get("fail_open", True))
    reload_s = _number(p + "reload_interval_s", d.get("reload_interval_s", 2.0), allow_zero=True)

    cap = None
    if "request_cap" in d:
        k = p + "request_cap"
        c = _table(k, d["request_cap"])
        _no_unknown(k, c, {"co2_g", "energy_j", "on", "action"})
        co2 = _number(f"{k}.co2_g", c["co2_g"]) if "co2_g" in c else None
        energy = _number(f"{k}.energy_j", c["energy_j"]) if "energy_j" in c else None
        if co2 is None and energy is None:
            raise AdmissionConfigError(k, "needs co2_g and/or energy_j")
        cap = RequestCapConfig(co2, energy, _choice(f"{k}.on", c.get("on", "upper"), CAP_ON),
                               _choice(f"{k}.action", c.get("action", "refuse"), CAP_ACTIONS))

    budgets = None
    if "budgets" in d:
        k = p + "budgets"
        b = _table(k, d["budgets"])
        _no_unknown(k, b, {"store", "tenant_header", "default", "tenants", "reservation_ttl_s", "settle_wait_s",
                           "shared"})
        shared_raw = b.get("shared", "auto")
        if shared_raw != "auto" and not isinstance(shared_raw, bool):
            raise AdmissionConfigError(f"{k}.shared", f"expected true, false or \"auto\", got {shared_raw!r}")
        store = b.get("store")
        if store is not None and (not isinstance(store, str) or not store.strip()):
            raise AdmissionConfigError(f"{k}.store", f"expected a file path, got {store!r}")
        tenants_raw = _table(f"{k}.tenants", b.get("tenants", {}))
        tenants = {}
        for name, tb in tenants_raw.items():
            if not name or len(name) > 128:
                raise AdmissionConfigError(f"{k}.tenants", f"bad tenant name {name!r}")
            tenants[name] = _budget(f"{k}.tenants.{name}", tb)
        budgets = BudgetConfig(
            store=os.path.expanduser(store.strip()) if store else None,
            tenant_header=_header(f"{k}.tenant_header", b.get("tenant_header", DEFAULT_TENANT_HEADER)),
            default=_budget(f"{k}.default", b.get("default", {})),
            tenants=tenants,
            reservation_ttl_s=_number(f"{k}.reservation_ttl_s", b.get("reservation_ttl_s", 3600.0)),
            settle_wait_s=_number(f"{k}.settle_wait_s", b.get("settle_wait_s", 5.0), allow_zero=True),
            shared=None if shared_raw == "auto" else shared_raw)

    priority = None
    if "priority" in d:
        k = p + "priority"
        r = _table(k, d["priority"])
        _no_unknown(k, r, {"by", "co2_g_thresholds", "classes", "override_client"})
        by = _choice(f"{k}.by", r.get("by", "carbon"), PRIORITY_BY)
        th_raw = r.get("co2_g_thresholds", [])
        if not isinstance(th_raw, list):
            raise AdmissionConfigError(f"{k}.co2_g_thresholds", "expected a list of numbers")
        th = tuple(_number(f"{k}.co2_g_thresholds[{i}]", x) for i, x in enumerate(th_raw))
        if list(th) != sorted(th):
            raise AdmissionConfigError(f"{k}.co2_g_thresholds", "must be increasing")
        classes_raw = _table(f"{k}.classes", r.get("classes", {}))
        classes = {}
        for name, v in classes_raw.items():
            if isinstance(v, bool) or not isinstance(v, int):
                raise AdmissionConfigError(f"{k}.classes.{name}", f"expected an integer priority, got {v!r}")
            classes[name] = v
        if by == "carbon" and not th:
            raise AdmissionConfigError(f"{k}.co2_g_thresholds", "needed with by = \"carbon\"")
        if by == "tenant_class" and not classes:
            raise AdmissionConfigError(f"{k}.classes", "needed with by = \"tenant_class\"")
        priority = PriorityConfig(by, th, classes, _bool(f"{k}.override_client", r.get("override_client", False)))
        if budgets is not None and by == "tenant_class":
            for name, tb in budgets.tenants.items():
                if tb.tenant_class is not None and tb.tenant_class not in classes:
                    raise AdmissionConfigError(f"{p}budgets.tenants.{name}.class",
                                               f"class {tb.tenant_class!r} is not in priority.classes")

    deferral = None
    if "deferral" in d:
        k = p + "deferral"
        f = _table(k, d["deferral"])
        _no_unknown(k, f, {"header", "max_intensity_g_per_kwh", "horizon_s"})
        if "max_intensity_g_per_kwh" not in f:
            raise AdmissionConfigError(f"{k}.max_intensity_g_per_kwh", "missing")
        deferral = DeferralConfig(_header(f"{k}.header", f.get("header", DEFAULT_DEFERRAL_HEADER)),
                                  _number(f"{k}.max_intensity_g_per_kwh", f["max_intensity_g_per_kwh"],
                                          allow_zero=True),
                                  _number(f"{k}.horizon_s", f.get("horizon_s", 86400.0)))
    return AdmissionConfig(mode, fail_open, reload_s, cap, budgets, priority, deferral, source)


def load_config_file(path: str) -> AdmissionConfig:
    """Read and validate ``path`` (``.toml`` or ``.json``)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AdmissionConfigError(path, f"cannot read: {e.strerror or e}") from e
    try:
        if path.endswith(".toml"):
            doc = tomllib.loads(data.decode("utf-8"))
        elif path.endswith(".json"):
            doc = json.loads(data)
        else:
            raise AdmissionConfigError(path, "expected a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdmissionConfigError(path, f"not valid: {e}") from e
    return parse_config(doc, path)


def config_from_settings(config_path: str | None, max_request_co2_g: float | None) -> AdmissionConfig | None:
    """The admission config the plugin's settings ask for: the file, or the no-file form
    (``LLMCO2_ADMISSION_MAX_REQUEST_CO2_G``: refuse a request whose upper bound is above it),
    or None (admission off). The variable, when both are given, overrides the file's cap."""
    cfg = load_config_file(config_path) if config_path else None
    if max_request_co2_g is None:
        return cfg
    cap = RequestCapConfig(co2_g=max_request_co2_g, on="upper", action="refuse")
    if cfg is None:
        return AdmissionConfig(request_cap=cap, source="LLMCO2_ADMISSION_MAX_REQUEST_CO2_G", reload_interval_s=0.0)
    old = cfg.request_cap
    if old is not None:
        cap = RequestCapConfig(co2_g=max_request_co2_g, energy_j=old.energy_j, on=old.on, action=old.action)
    return AdmissionConfig(cfg.mode, cfg.fail_open, cfg.reload_interval_s, cap, cfg.budgets, cfg.priority,
                           cfg.deferral, cfg.source)


class ConfigWatcher:
    """Keeps the current config of a file; :meth:`poll` re-reads it when its (mtime, size, inode)
    changed. A new version that does not validate is refused: the old one keeps serving, the
    error is kept in ``last_error`` and counted in ``reload_failures``."""

    def __init__(self, path: str, max_request_co2_g: float | None = None) -> None:
        self.path = path
        self.max_request_co2_g = max_request_co2_g
        self._sig = self._signature()
        self.config = config_from_settings(path, max_request_co2_g)  # raises at start-up
        self.reloads = 0
        self.reload_failures = 0
        self.last_error: str | None = None

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self) -> bool:
        """True when a new config was taken."""
        sig = self._signature()
        if sig == self._sig:
            return False
        self._sig = sig
        try:
            cfg = config_from_settings(self.path, self.max_request_co2_g)
        except AdmissionConfigError as e:
            self.reload_failures += 1
            self.last_error = str(e)
            return False
        self.config = cfg
        self.reloads += 1
        self.last_error = None
        return True
