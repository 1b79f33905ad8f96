"""Per-process state of the plugin, created lazily and keyed on ``os.getpid()``.

On GPU the engine core is *forked* from the API server after the plugin ran there: it inherits
this module's globals (and the patches) but must not inherit the API server's objects (NVML
handles, open files, the service). Every accessor therefore checks the pid first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from llmco2_serve.runtime.settings import Settings, SettingsError, fail_open_from_env, load_settings, unknown_variables

from ._patches import log_once

logger = logging.getLogger("vllm.llmco2")


@dataclass
class ProcessState:
    pid: int
    settings: Settings | None = None
    settings_error: str | None = None
    active: bool = False  # patches applied and the plugin is on in this process
    inactive_reason: str = ""
    service: Any = None  # EnergyService (API server)
    otel: Any = None  # OtelHandles when the plugin exports its own metrics (LLMCO2_OTLP_METRICS_ENDPOINT)
    extra: dict[str, Any] = field(default_factory=dict)


_STATE: ProcessState | None = None


def _forked() -> None:
    # os.register_at_fork, in the child: a fresh state that keeps only the settings and the on/off
    # decision (not the parent's service, NVML handles or open files).
    global _STATE
    inherited = _STATE
    if inherited is not None:
        _STATE = ProcessState(os.getpid(), settings=inherited.settings, settings_error=inherited.settings_error,
                              active=inherited.active, inactive_reason=inherited.inactive_reason)


os.register_at_fork(after_in_child=_forked)


def state() -> ProcessState:
    # Called several times per request: one global read once the state exists (a fork replaces
    # it in the child through _forked; tests reset _STATE to simulate a fresh process).
    global _STATE
    st = _STATE
    if st is None:
        st = _STATE = ProcessState(os.getpid())
    return st


def settings() -> Settings | None:
    """This process's settings; ``None`` when they are invalid and fail_open is on (logged once).
    Raises :class:`SettingsError` when they are invalid and ``LLMCO2_FAIL_OPEN=0``."""
    st = state()
    if st.settings is None and st.settings_error is None:
        try:
            st.settings = load_settings()
        except SettingsError as e:
            if not fail_open_from_env():
                raise
            st.settings_error = str(e)
            log_once("settings", logging.ERROR, "llmco2: invalid settings, plugin OFF: %s", e)
            return None
        unknown = unknown_variables()
        if unknown:
            log_once("unknown-vars", logging.WARNING, "llmco2: unknown variables ignored: %s", ", ".join(unknown))
    return st.settings
