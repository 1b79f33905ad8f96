"""One frozen :class:`Settings` for the plugin, from ``LLMCO2_*`` variables and/or one config file.

Sources, later wins: defaults < the file named by ``LLMCO2_CONFIG`` (JSON, or TOML read with
``tomllib``; keys are the variable names without the ``LLMCO2_`` prefix, lower case, e.g.
``{"carbon_intensity_g_per_kwh": 300}``) < the environment. Validated once by
:func:`load_settings`; every error names the variable (or file key) that caused it.

========================================  =========================================================
variable                                  meaning (default)
========================================  =========================================================
``LLMCO2_ENABLED``                        ``0`` switches the plugin off completely (1)
``LLMCO2_FAIL_OPEN``                      ``0``: raise at start-up on misconfiguration (1: log, off)
``LLMCO2_GPU``                            GPU used for predictions when NVML detects none (H100)
``LLMCO2_GPU_SPEC_FILE``                  JSON spec of a GPU that is not in the table (none)
``LLMCO2_CARBON_INTENSITY_G_PER_KWH``     grid carbon intensity, gCO2e/kWh (481, world 2023); also the
                                          static fallback of the sources below
``LLMCO2_CARBON_INTENSITY``               intensity by place and time (carbon/intensity.py): a number |
                                          zone:FR | file:PATH.csv | electricitymaps:ZONE | watttime:REGION
                                          (empty: the value above)
``LLMCO2_PUE``                            data-centre PUE, >= 1 (1.2)
``LLMCO2_LIFETIME_YEARS``                 hardware lifetime for embodied carbon, years (5)
``LLMCO2_ENERGY_READER``                  auto | nvml | cpu-estimate | off | fake, fake-work (test only) (auto)
``LLMCO2_RESPONSE_HEADERS``               add ``x-llmco2-predicted-*`` HTTP headers (1)
``LLMCO2_PAIRS_PATH``                     JSONL of (prediction, NVML measurement) pairs for
                                          retraining; empty disables (~/.cache/llmco2/pairs.jsonl)
``LLMCO2_MAX_TOKENS_CAP``                 max_tokens above this are predicted at this value (131072)
``LLMCO2_PROFILE``                        engine profile of the packaged GNN weights: vllm | hf-eager (vllm)
``LLMCO2_WEIGHTS``                        a GNN weights file (.npz from ``llmco2 train``) instead (none)
``LLMCO2_RELOAD_INTERVAL_S``              with ``LLMCO2_WEIGHTS``: check that file this often and hot-reload
                                          it when it changes (s; 0 disables) (30)
``LLMCO2_RETRAIN_INTERVAL_S``             run ``llmco2 retrain`` on the pairs this often in a low-priority
                                          subprocess, publishing into LLMCO2_WEIGHTS's folder (s; 0: off) (0)
``LLMCO2_PAIRS_INCLUDE_FAKE``             TEST ONLY: also write pairs measured by the fake counter (0)
``LLMCO2_CALIBRATION``                    learn this deployment's correction from its own NVML
                                          measurements and apply it to predictions (1)
``LLMCO2_OTLP_METRICS_ENDPOINT``          OTLP/HTTP collector base URL for the plugin's metrics when the
                                          host has no meter provider (none: metrics go to the host's)
``LLMCO2_PROMETHEUS``                     the plugin's series on vLLM's own ``/metrics`` (1)
``LLMCO2_ADMISSION_CONFIG``               admission-control policy file, TOML or JSON (admission/config.py;
                                          validated at start-up, re-read when it changes) (none: off)
``LLMCO2_ADMISSION_MAX_REQUEST_CO2_G``    no-file admission: refuse (429) a request whose predicted upper
                                          bound is above this many g CO2e (none)
``LLMCO2_CONFIG``                         the config file (none)
========================================  =========================================================
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmco2_serve.carbon.footprint import DEFAULT_INTENSITY_G_PER_KWH, DEFAULT_LIFETIME_YEARS, DEFAULT_PUE, CarbonSettings

__all__ = ["Settings", "SettingsError", "load_settings", "ENERGY_READER_MODES", "PREFIX"]

PREFIX = "LLMCO2_"
# "fake": TEST-ONLY counter with a CPU-time power model (gpu_energy.ProcessCpuFakeReader), source "fake"
# "fake-work": TEST-ONLY counter with a power model of the scheduled work (gpu_energy.WorkFakeReader), source "fake"
ENERGY_READER_MODES = ("auto", "nvml", "cpu-estimate", "fake", "fake-work", "off")
DEFAULT_PAIRS_PATH = os.path.join("~", ".cache", "llmco2", "pairs.jsonl")
DEFAULT_MAX_TOKENS_CAP = 131072

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A setting is invalid. ``variable`` names it (``LLMCO2_...`` or ``file:key``)."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


@dataclass(frozen=True)
class Settings:
    """Validated plugin settings (see the module docstring for the variables)."""

    enabled: bool = True
    fail_open: bool = True
    gpu: str = "H100"
    gpu_spec_file: str | None = None
    intensity_g_per_kwh: float = DEFAULT_INTENSITY_G_PER_KWH
    carbon_intensity: str = ""  # LLMCO2_CARBON_INTENSITY source spec (empty: intensity_g_per_kwh, fixed)
    pue: float = DEFAULT_PUE
    lifetime_years: float = DEFAULT_LIFETIME_YEARS
    energy_reader: str = "auto"
    response_headers: bool = True
    pairs_path: str | None = DEFAULT_PAIRS_PATH
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP
    calibration: bool = True
    # TEST-ONLY fake counters' power model (LLMCO2_ENERGY_READER=fake): idle W, W per CPU-second
    # (fake-work: W per modelled step second, gpu_energy.WorkFakeReader)
    fake_idle_w: float = 60.0
    fake_busy_w: float = 240.0
    profile: str = "vllm"
    weights_path: str | None = None
    reload_interval_s: float = 30.0
    retrain_interval_s: float = 0.0
    pairs_include_fake: bool = False  # TEST ONLY (fake counter pairs in LLMCO2_PAIRS_PATH)
    otlp_metrics_endpoint: str | None = None
    prometheus: bool = True  # series on vLLM's /metrics (reporting/prometheus.py)
    admission_config: str | None = None  # LLMCO2_ADMISSION_CONFIG (admission/config.py)
    admission_max_request_co2_g: float | None = None
    config_file: str | None = None

    @property
    def carbon(self) -> CarbonSettings:
        return CarbonSettings(self.intensity_g_per_kwh, self.pue, self.lifetime_years)

    @property
    def energy_reader_mode(self) -> str:
        """The mode name :func:`llmco2_serve.hardware.gpu_energy.open_energy_reader` takes."""
        return "none" if self.energy_reader == "off" else self.energy_reader

    def describe(self) -> str:
        """One line for the start-up log."""
        if not self.enabled:
            return "llmco2 disabled (LLMCO2_ENABLED=0)"
        return (
            f"carbon {self.carbon_intensity or f'{self.intensity_g_per_kwh:g} gCO2e/kWh'}, PUE {self.pue:g}, lifetime {self.lifetime_years:g} y; "
            f"fallback GPU {self.gpu_spec_file or self.gpu}; energy reader {self.energy_reader}; "
            f"headers {'on' if self.response_headers else 'off'}; pairs {self.pairs_path or 'off'}; "
            f"max_tokens cap {self.max_tokens_cap}; calibration {'on' if self.calibration else 'off'}; "
            f"weights {self.weights_path or 'profile ' + self.profile}"
            + (f" (reload check every {self.reload_interval_s:g} s)" if self.weights_path and self.reload_interval_s
               else "") + (f"; retrain every {self.retrain_interval_s:g} s" if self.retrain_interval_s else "")
            + ("; TEST-ONLY fake pairs" if self.pairs_include_fake else "") + "; "
            f"fail_open {self.fail_open}; "
            f"metrics {self.otlp_metrics_endpoint or 'host meter provider'}"
            + (f"; config {self.config_file}" if self.config_file else "")
        )


# field name -> (variable suffix, parser)
def _bool(var: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingsError(var, f"expected one of {_TRUE + _FALSE}, got {raw!r}")


def _float(var: str, raw: Any, minimum: float, strict_min: bool = False) -> float:
    try:
        value = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        raise SettingsError(var, f"expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum or (strict_min and value == minimum):
        bound = ">" if strict_min else ">="
        raise SettingsError(var, f"expected a finite number {bound} {minimum:g}, got {raw!r}")
    return value


def _int(var: str, raw: Any, minimum: int) -> int:
    try:
        value = int(str(raw).strip()) if not isinstance(raw, bool) else None
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise SettingsError(var, f"expected an integer >= {minimum}, got {raw!r}")
    return value


def _str(var: str, raw: Any) -> str:
    text = str(raw).strip()
    if not text:
        raise SettingsError(var, "must not be empty")
    return text


def _optional_path(var: str, raw: Any) -> str | None:
    text = str(raw).strip()
    return text or None


def _profile(var: str, raw: Any) -> str:
    text = str(raw).strip().lower()
    if not text or not all(c.isalnum() or c in "-_." for c in text):
        raise SettingsError(var, f"expected an engine profile name (e.g. vllm, hf-eager), got {raw!r}")
    return text


def _mode(var: str, raw: Any) -> str:
    text = str(raw).strip().lower()
    if text == "none":
        text = "off"
    if text not in ENERGY_READER_MODES:
        raise SettingsError(var, f"expected one of {ENERGY_READER_MODES}, got {raw!r}")
    return text


def _intensity_spec(var: str, raw: Any) -> str:
    # Syntax only (no file, network or codecarbon here: settings load in every process); the
    # API server builds the source and says what is wrong with it (fail-open or refuse).
    from llmco2_serve.carbon.intensity import IntensityError, check_spec

    text = str(raw).strip()
    try:
        check_spec(text)
    except IntensityError as e:
        raise SettingsError(var, str(e)) from None
    return text


def _optional_url(var: str, raw: Any) -> str | None:
    text = str(raw).strip()
    if not text:
        return None
    if not text.startswith(("http://", "https://")):
        raise SettingsError(var, f"expected an http(s) URL of an OTLP/HTTP collector, got {raw!r}")
    if text.rstrip("/").endswith(("/v1/metrics", "/v1/traces")):
        raise SettingsError(var, "give the collector's base URL; /v1/metrics is appended")
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        port = parts.port  # raises for a port that is not a number in 0..65535
    except ValueError as e:
        raise SettingsError(var, f"cannot parse {raw!r} as a URL: {e}") from None
    if not parts.hostname or any(c.isspace() for c in text):
        raise SettingsError(var, f"cannot parse {raw!r} as a URL: no host name")
    if port == 0:
        raise SettingsError(var, f"cannot parse {raw!r} as a URL: port 0")
    return text.rstrip("/")


_PARSERS = {
    "enabled": ("ENABLED", _bool),
    "fail_open": ("FAIL_OPEN", _bool),
    "gpu": ("GPU", _str),
    "gpu_spec_file": ("GPU_SPEC_FILE", _optional_path),
    "intensity_g_per_kwh": ("CARBON_INTENSITY_G_PER_KWH", lambda v, r: _float(v, r, 0.0)),
    "carbon_intensity": ("CARBON_INTENSITY", lambda v, r: _intensity_spec(v, r)),
    "pue": ("PUE", lambda v, r: _float(v, r, 1.0)),
    "lifetime_years": ("LIFETIME_YEARS", lambda v, r: _float(v, r, 0.0, strict_min=True)),
    "energy_reader": ("ENERGY_READER", _mode),
    "response_headers": ("RESPONSE_HEADERS", _bool),
    "pairs_path": ("PAIRS_PATH", _optional_path),
    "max_tokens_cap": ("MAX_TOKENS_CAP", lambda v, r: _int(v, r, 1)),
    "calibration": ("CALIBRATION", _bool),
    "fake_idle_w": ("FAKE_IDLE_W", lambda v, r: _float(v, r, 0.0)),
    "fake_busy_w": ("FAKE_BUSY_W", lambda v, r: _float(v, r, 0.0)),
    "profile": ("PROFILE", _profile),
    "weights_path": ("WEIGHTS", _optional_path),
    "reload_interval_s": ("RELOAD_INTERVAL_S", lambda v, r: _float(v, r, 0.0)),
    "retrain_interval_s": ("RETRAIN_INTERVAL_S", lambda v, r: _float(v, r, 0.0)),
    "pairs_include_fake": ("PAIRS_INCLUDE_FAKE", _bool),
    "otlp_metrics_endpoint": ("OTLP_METRICS_ENDPOINT", _optional_url),
    "admission_config": ("ADMISSION_CONFIG", _optional_path),
    "admission_max_request_co2_g": ("ADMISSION_MAX_REQUEST_CO2_G",
                                    lambda v, r: _float(v, r, 0.0, strict_min=True) if str(r).strip() else None),
    "prometheus": ("PROMETHEUS", _bool),
}


def _read_config_file(path: str) -> dict[str, Any]:
    var = PREFIX + "CONFIG"
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read()
    except OSError as e:
        raise SettingsError(var, f"cannot read {path}: {e.strerror or e}") from e
    try:
        if path.endswith(".toml"):
            doc = tomllib.loads(data.decode("utf-8"))
        elif path.endswith(".json"):
            doc = json.loads(data)
        else:
            raise SettingsError(var, f"{path}: expected a .json or .toml file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(var, f"{path} is not valid: {e}") from e
    if isinstance(doc, dict) and isinstance(doc.get("llmco2"), dict):  # [llmco2] table
        doc = doc["llmco2"]
    if not isinstance(doc, dict):
        raise SettingsError(var, f"{path}: expected an object/table of settings")
    known = {suffix.lower(): name for name, (suffix, _) in _PARSERS.items()}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise SettingsError(var, f"{path}: unknown key(s) {unknown}; known: {sorted(known)}")
    return {known[k]: v for k, v in doc.items()}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings from ``environ`` (default ``os.environ``).

    Raises :class:`SettingsError` naming the variable. Unknown ``LLMCO2_*`` variables (typos)
    do not raise (other llmco2 tools have their own); see :func:`unknown_variables`.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = env.get(PREFIX + "CONFIG", "").strip() or None
    if config_file:
        for field_name, raw in _read_config_file(config_file).items():
            suffix, parse = _PARSERS[field_name]
            values[field_name] = parse(f"{config_file}:{suffix.lower()}", raw)
    for field_name, (suffix, parse) in _PARSERS.items():
        var = PREFIX + suffix
        if var in env:
            values[field_name] = parse(var, env[var])
    if values.get("pairs_path"):
        values["pairs_path"] = os.path.expanduser(values["pairs_path"])
    elif "pairs_path" not in values:
        values["pairs_path"] = os.path.expanduser(DEFAULT_PAIRS_PATH)
    settings = Settings(**values, config_file=config_file)
    if settings.enabled:
        _check_gpu(settings)
    return settings


def _check_gpu(settings: Settings) -> None:
    from llmco2_serve.hardware.gpus import GPUSpecError, UnknownGPUError, resolve_gpu

    try:
        resolve_gpu(settings.gpu, settings.gpu_spec_file)
    except (UnknownGPUError, GPUSpecError, OSError) as e:
        var = PREFIX + ("GPU_SPEC_FILE" if settings.gpu_spec_file else "GPU")
        raise SettingsError(var, str(e)) from e


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """``LLMCO2_*`` variables the plugin does not know (worth a warning: likely typos)."""
    env = os.environ if environ is None else environ
    known = {PREFIX + suffix for suffix, _ in _PARSERS.values()} | {PREFIX + "CONFIG"}
    return sorted(n for n in env if n.startswith(PREFIX) and n not in known)


def fail_open_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``LLMCO2_FAIL_OPEN`` alone, for deciding what to do when :func:`load_settings` fails
    (an unreadable value counts as the default, fail open)."""
    env = os.environ if environ is None else environ
    raw = env.get(PREFIX + "FAIL_OPEN", "1").strip().lower()
    return raw not in _FALSE

