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
    # os.register_at_fork: a forked child rebuilds its state on first use (see state()).
    global _CURRENT
    _CURRENT = None


_CURRENT: ProcessState | None = None  # this process's state, once checked; None after a fork
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def state() -> ProcessState:
    # Called several times per request: after the first call in a process it is two global reads
    # (a fork clears _CURRENT, so the pid check runs again in the child; tests that reset _STATE
    # to simulate a fresh process get one too).
    current = _CURRENT
    if current is not None and current is _STATE:
        return current
    return _state_checked()


def _state_checked() -> ProcessState:
    global _STATE, _CURRENT
    pid = os.getpid()
    if _STATE is None or _STATE.pid != pid:
        inherited = _STATE
        _STATE = ProcessState(pid)
        if inherited is not None:  # forked: settings and the on/off decision carry over
            _STATE.settings, _STATE.settings_error = inherited.settings, inherited.settings_error
            _STATE.active, _STATE.inactive_reason = inherited.active, inherited.inactive_reason
    if hasattr(os, "register_at_fork"):  # without the fork hook every call checks the pid
        _CURRENT = _STATE
    return _STATE


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
