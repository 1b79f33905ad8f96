"""``vllm.stat_logger_plugins`` entry point: builds the API server's :class:`EnergyService` from
the ``VllmConfig`` vLLM hands to stat loggers (the clean way to get the model config in the API
server), logs the one start-up line, and reports patch failures with the periodic stats.

vLLM requires a ``StatLoggerBase`` subclass here (anything else aborts start-up), so this
module imports vLLM at import time; it is only imported by vLLM's plugin loader.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from llmco2_serve.runtime.service import EnergyService

from . import _patches, _state

logger = logging.getLogger("vllm.llmco2")


def ensure_service(vllm_config: Any) -> EnergyService | None:
    """The process's service, built once from ``vllm_config`` (None when the plugin is off)."""
    st = _state.state()
    if not st.active:
        return None
    if st.service is None:
        from ._vllm_config import model_info

        settings = st.settings
        metrics = None
        from llmco2_serve.runtime.telemetry import standard_metrics_endpoint

        # The standard OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT wins; LLMCO2_OTLP_METRICS_ENDPOINT is an alias.
        standard = standard_metrics_endpoint()
        if standard is not None or settings.otlp_metrics_endpoint:
            # After vLLM's own tracer set-up: configure_otel uses a host provider where there is one
            # and otherwise exports the plugin's metrics itself (never made global).
            from llmco2_serve.runtime.telemetry import EnergyMetrics, configure_otel

            st.otel = configure_otel(None if standard is not None else settings.otlp_metrics_endpoint,
                                     metrics_endpoint=standard)
            metrics = EnergyMetrics(st.otel.meter)
        # The prediction table is built now, before vLLM accepts requests (1.5 s for Llama-3.1-8B
        # on 2 CPUs): built in the background it competed for the GIL with the first minute of
        # traffic, which was meanwhile predicted by the GNN itself (0.3 ms each): a server 10-25 %
        # slower until it was done (benchmarks/serving_overhead.py, fresh servers).
        svc = EnergyService(settings, model_info(vllm_config), metrics=metrics, prediction_table="now")
        if svc.error is not None and not settings.fail_open:
            raise RuntimeError(f"llmco2 (LLMCO2_FAIL_OPEN=0): {svc.error}")
        st.service = svc
        if svc.prometheus is not None:  # gauges on /metrics from the start, before the first request
            svc.prometheus.observe_service(svc, force=True)
            svc.prometheus.record_failures({**dict.fromkeys(_patches.LEDGER, 0), **_patches.failures})
        quant = getattr(vllm_config.model_config, "quantization", None)
        logger.info("%s; vLLM quantization=%s; patches: %s", svc.describe(), quant or "none",
                    ", ".join(_patches.applied()) or "none")
    return st.service


class LLMCO2StatLogger(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.engine_index = engine_index
        self._reported_failures = 0
        self._reported_predictions: tuple[int, float] | None = None
        self._reported_reloads = (0, 0)
        self.service = None
        st = _state.state()
        # vLLM builds one logger per data-parallel engine; the plugin's line is the API server's
        # (one service per process), so only the first logger of the process says it.
        self._says_periodic_line = st.extra.setdefault("periodic_stat_logger", self) is self
        strict = st.settings is not None and not st.settings.fail_open
        try:
            self.service = ensure_service(vllm_config)
        except Exception as e:  # noqa: BLE001 - fail-open boundary (re-raised when fail_open is off)
            if strict:
                raise
            _patches.failed("stat_logger", e)
        if not st.active:
            _patches.log_once("inactive", logging.INFO, "llmco2: plugin inactive in the API server (%s)",
                              st.inactive_reason or "not registered")

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        pass  # predictions and measurements are recorded per request by the patches

    def log(self) -> None:
        if not self._says_periodic_line:
            return
        total = sum(_patches.failures.values())
        if total > self._reported_failures:
            self._reported_failures = total
            logger.warning("llmco2: patch failures so far: %s", dict(_patches.failures))
        svc = self.service
        if svc is None:
            return
        if getattr(svc, "prometheus", None) is not None:
            svc.prometheus.record_failures({**dict.fromkeys(_patches.LEDGER, 0), **_patches.failures})
            svc.prometheus.observe_service(svc)
        svc.flush_metrics()  # predicted-energy counters are added in sums (service.py); none left behind idle
        reloads = (getattr(svc, "weights_reloads", 0), getattr(svc, "weights_reload_failures", 0))
        if reloads != self._reported_reloads:  # hot reloads of LLMCO2_WEIGHTS (service.py reload_weights)
            self._reported_reloads = reloads
            logger.info("llmco2: GNN weights reloaded %d time(s), %d file(s) refused%s; predicting with %s",
                        reloads[0], reloads[1], f" (last: {svc.weights_reload_error})" if svc.weights_reload_error
                        else "", svc.predictor_label)
        count, total_s, max_s = svc.prediction_count, svc.prediction_time_s, svc.prediction_time_max_s
        # vLLM calls log() every ~10 s: say it only when there is something new (not while idle).
        if count and (count, total_s) != self._reported_predictions:
            self._reported_predictions = (count, total_s)
            logger.info("llmco2: %d predictions, mean %.3f ms, max %.3f ms%s", count, 1e3 * total_s / count,
                        1e3 * max_s, _calibration_summary(svc))

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
        pass


# --------------------------------------------------------------- --disable-log-stats (issue 10)
# True while AsyncLLM.__init__ runs with log_stats=False: the plugin's logger is then left out of
# vLLM's stat logger factories, so vLLM keeps its statistics off (it forces them on for any
# custom logger), and the plugin starts its service and periodic line itself.
_without_stats = False


def _log_stats_argument(orig: Any, args: tuple, kwargs: dict) -> bool:
    if "log_stats" in kwargs:
        return bool(kwargs["log_stats"])
    import inspect

    try:
        bound = inspect.signature(orig).bind_partial(None, *args, **kwargs)
    except TypeError:
        return True  # unknown call shape: vLLM's default behaviour (logger installed)
    value = bound.arguments.get("log_stats")
    return True if value is None else bool(value)


def _wrap_async_llm_init(orig):
    def __init__(self, *args, **kwargs):
        global _without_stats
        try:
            quiet = not _log_stats_argument(orig, args, kwargs) and _state.state().active
        except Exception as e:  # noqa: BLE001 - fail-open boundary: vLLM's own behaviour
            _patches.failed("async_llm.__init__", e)
            quiet = False
        _without_stats = quiet
        try:
            orig(self, *args, **kwargs)
        finally:
            _without_stats = False
        if quiet:
            _start_without_stats(self.vllm_config)
    return __init__


def _wrap_load_factories(orig):
    def load_stat_logger_plugin_factories(*args, **kwargs):
        factories = orig(*args, **kwargs)
        if _without_stats:
            factories = [f for f in factories if f is not LLMCO2StatLogger]
        return factories
    return load_stat_logger_plugin_factories


def _start_without_stats(vllm_config: Any) -> None:
    """The service and the periodic line, without vLLM's stat loggers (log_stats off)."""
    st = _state.state()
    try:
        stat_logger = LLMCO2StatLogger(vllm_config)  # builds the service (raises when fail-closed)
    except Exception as e:  # noqa: BLE001 - fail-open boundary (re-raised when fail_open is off)
        if st.settings is not None and not st.settings.fail_open:
            raise
        _patches.failed("async_llm.__init__", e)
        return
    try:
        import asyncio

        from vllm import envs

        interval_s = max(0.1, float(envs.VLLM_LOG_STATS_INTERVAL))
        loop = asyncio.get_running_loop()  # AsyncLLM is built inside vLLM's running loop
    except Exception as e:  # noqa: BLE001 - no loop: predictions work, the periodic line is off
        _patches.log_once("no-periodic-log", logging.INFO,
                          "llmco2: no event loop at start-up (%s); the periodic llmco2 line is off", e)
        return

    def tick() -> None:
        try:
            stat_logger.log()
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            _patches.failed("async_llm.__init__", e)
        loop.call_later(interval_s, tick)

    loop.call_later(interval_s, tick)
    logger.info("llmco2: vLLM statistics are off (--disable-log-stats) and stay off; the plugin logs "
                "on its own every %.0f s", interval_s)


def install() -> list[str]:
    return [name for name, make in (("async_llm.__init__", _wrap_async_llm_init),
                                    ("async_llm.stat_logger_plugins", _wrap_load_factories))
            if _patches.apply(name, make)]


def _calibration_summary(svc: Any) -> str:
    """'; calibration ...' for the periodic line: observations, factors, error before/after."""
    cal = getattr(svc, "calibrator", None)
    if cal is None:
        return ""
    st = cal.state()
    err = st["error"]
    rejected = sum(st["rejected"].values())
    kinds = st["by_kind"]
    text = (f"; calibration {st['observations']} observations ({kinds.get('window', 0)} counter windows, "
            f"{kinds.get('request', 0)} requests; {rejected} rejected), "
            f"{'active' if st['active'] else 'inactive'}, prefill x{st['prefill_factor']:.3g} "
            f"slope {st['prefill_batch_slope']:+.2f}, decode x{st['decode_factor']:.3g} "
            f"slope {st['decode_batch_slope']:+.2f}")
    if err["n"]:
        text += (f", median error {err['uncalibrated_median_abs_rel_error']:.0%} uncalibrated -> "
                 f"{err['calibrated_median_abs_rel_error']:.0%} served")
    return text
