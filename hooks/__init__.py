"""vLLM integration. Everything that touches vLLM internals lives here.

``register_general_plugin`` is the ``vllm.general_plugins`` entry point. vLLM calls it once in
each of its processes (API server, engine core, workers; under ``fork`` the engine core
inherits the API server's patches instead). It validates the settings, runs the start-up checks
of ``llmco2_serve.runtime.preflight`` (energy reader, pairs path: with ``LLMCO2_FAIL_OPEN=0`` a problem
stops vLLM here, before the model loads; otherwise each is logged once and only that feature is
off), checks the vLLM version and applies the patches of the ledger in ``_patches.py``, each on
its own and fail-open.
Nothing happens at import.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm.llmco2")

__all__ = ["register_general_plugin"]


def register_general_plugin() -> None:
    """Idempotent per process. Raises only with ``LLMCO2_FAIL_OPEN=0``; otherwise a plugin that
    cannot start (bad settings, a broken install) logs one line and leaves vLLM untouched."""
    try:
        _register()
    except Exception as e:  # noqa: BLE001 - the one guard between a broken plugin and vLLM's start-up
        if os.environ.get("LLMCO2_FAIL_OPEN", "1").strip().lower() in ("0", "false", "no", "off"):
            logger.error("llmco2: refusing to start (LLMCO2_FAIL_OPEN=0): %s", e)
            raise
        logger.exception("llmco2: plugin failed to register; vLLM continues without it")


# Set in the environment by the first process that reports the start-up problems; the processes
# vLLM starts from it (engine core, workers) inherit it and check quietly instead of repeating them.
_REPORTED_ENV = "_LLMCO2_PREFLIGHT_REPORTED_BY"


def _first_to_report() -> bool:
    owner = os.environ.get(_REPORTED_ENV)
    if owner and owner != str(os.getpid()):
        return False
    os.environ[_REPORTED_ENV] = str(os.getpid())
    return True


def _check_admission(settings) -> None:
    """The admission policy file is validated in every process at start-up (errors name the key):
    LLMCO2_FAIL_OPEN=0 refuses to start; otherwise admission control is off (hooks/admission.py)."""
    from llmco2_serve.admission import AdmissionConfigError

    from . import _patches, admission

    try:
        admission.check_config(settings)
    except AdmissionConfigError as e:
        if not settings.fail_open:
            raise
        _patches.log_once("admission-config", logging.ERROR, "llmco2: admission control OFF: %s", e)


class _ToVllmLogger(logging.Handler):
    """Hands each record of the core's loggers to vLLM's ``vllm`` logger, looked up at emit time:
    vLLM configures (and may reconfigure, replacing its handler objects) its logging after the
    plugins load, so its handlers cannot be copied at registration."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger("vllm")
        if target.handlers:  # none with VLLM_CONFIGURE_LOGGING=0: the root logger's config has them
            target.handle(record)


def route_core_logs() -> bool:
    """Send the core's log records (loggers under ``llmco2_serve``: the prediction table, the carbon
    intensity source, weight reloads, scheduled retrains, budget ledgers) through vLLM's handlers,
    with vLLM's format, level and process prefix. Without this they had no handler inside a
    server: INFO lines were dropped and warnings reached stderr bare, through Python's last-resort
    handler. Records still propagate to the root logger (vLLM configures no root handler, so
    nothing prints twice unless the operator added one). Idempotent; True when it added the route."""
    core = logging.getLogger("llmco2_serve")
    if any(isinstance(h, _ToVllmLogger) for h in core.handlers):
        return False
    core.addHandler(_ToVllmLogger())
    if core.level == logging.NOTSET:  # else the root's WARNING would drop INFO before the handler
        level = logging.getLevelName(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").strip().upper())
        core.setLevel(level if isinstance(level, int) else logging.INFO)
    return True


def _register() -> None:
    from . import _hook_times, _patches, _state

    if _hook_times.enabled():  # DEV-ONLY: every process's GC and CPU time, the plugin on or off
        _hook_times.time_gc()
    st = _state.state()
    if st.active or st.inactive_reason:
        return
    route_core_logs()
    settings = _state.settings()  # SettingsError propagates only when fail_open is off
    if settings is None:
        st.inactive_reason = f"invalid settings: {st.settings_error}"
        return
    if not settings.enabled:
        st.inactive_reason = "LLMCO2_ENABLED=0"
        _patches.log_once("disabled", logging.INFO, "llmco2: disabled by LLMCO2_ENABLED=0")
        return
    # Every setting that can fail at run time is checked now, during vLLM's argument parsing (no
    # model loaded yet), so fail-closed refuses here and the engine core never discovers it later.
    from llmco2_serve.runtime import preflight

    problems = preflight.check_settings(settings)
    if problems:
        if not settings.fail_open:
            raise preflight.PreflightError(problems)
        level = logging.WARNING if _first_to_report() else logging.DEBUG
        for p in problems:
            _patches.log_once(f"preflight:{p.setting}", level, "llmco2: %s; %s", p, p.disabled)
        st.settings = preflight.effective_settings(settings, problems)
    _check_admission(st.settings or settings)
    try:
        import vllm
        version = str(vllm.__version__)
    except (ImportError, AttributeError) as e:
        st.inactive_reason = f"vLLM not importable: {e}"
        return
    if not _patches.vllm_version_supported(version):
        st.inactive_reason = f"vLLM {version} is outside the tested range {_patches.SUPPORTED_VLLM}"
        _patches.log_once("version", logging.WARNING, "llmco2: %s; plugin inactive", st.inactive_reason)
        return
    from . import api_server, engine_core, http_headers, stat_logger

    applied = engine_core.install() + api_server.install() + http_headers.install() + stat_logger.install()
    st.active = True
    logger.debug("llmco2: patched %s", ", ".join(applied))
