"""Carbon-aware admission control in vLLM's API server (policy core: ``llmco2_serve/admission``).

Where each part hooks in (ledger entries in ``_patches.py``):

* **Decision point**: the patched ``OutputProcessor.add_request`` (``api_server.py``) calls
  :func:`on_request` instead of ``EnergyService.on_request``. It runs in ``AsyncLLM.add_request``
  after tokenisation and *before* the request is registered in the output processor or sent to the
  engine core, for every sequence (``n`` > 1 children, each prompt of a multi-prompt completion).
  A refusal raises :class:`AdmissionRefused`, a ``vllm.exceptions.GracefulHTTPError`` (vLLM's own
  admission-rejection type, the one its queue limits raise): vLLM aborts any sibling already added
  and answers with the error's HTTP status. A lowered ``max_tokens`` is written into the request's
  ``SamplingParams`` and the priority into ``EngineCoreRequest.priority`` before the engine sees them.
* **Response** (``app.init_entrypoints_middleware``, via ``http_headers.py``): a pure-ASGI middleware
  gives each HTTP request a context (its headers: tenant, API key, deferrable flag) and holds the
  response start until the first body message. For a refused request it replaces vLLM's answer
  (a 429 JSON for a plain request, but a 200 event stream carrying an error for a streaming one)
  with the 429 and the OpenAI-style JSON error of the decision, and a ``Retry-After`` header.
  Admitted responses get ``x-llmco2-admission`` (and ``x-llmco2-admission-max-tokens`` when lowered).
* **Several API servers** (``--api-server-count N > 1``, :func:`api_server_processes`): each process
  builds its own controller, and the budgets go through one ``SharedBudgetLedger`` (SQLite
  transactions on the same file) so that they stay exact across the processes.
* **Request end**: ``api_server.py`` calls :func:`on_finished` (span attributes and the budget's
  settlement) and :func:`on_aborted`; the service's ``final_value_hook`` brings measured final values.

Everything here is fail-open: an exception in admission admits the request and is counted.
"""

from __future__ import annotations

import collections
import contextvars
import json
import logging
import math
import threading
import time
from typing import Any

from . import _state
from ._patches import failed, log_once

logger = logging.getLogger("vllm.llmco2")

HEADER_DECISION = "x-llmco2-admission"
HEADER_REASON = "x-llmco2-admission-reason"
HEADER_MAX_TOKENS = "x-llmco2-admission-max-tokens"
HEADER_TENANT = "x-llmco2-admission-tenant"
HEADER_RESERVED = "x-llmco2-admission-reserved-co2-g"  # what the request reserved of its tenant's budget
_MAX_KEPT = 65536  # decisions kept per request id until the request ends (bounded)


def _refused_error_class():
    from vllm.exceptions import GracefulHTTPError

    class AdmissionRefused(GracefulHTTPError):
        """A request refused by llmco2's admission control (carries the decision)."""

        llmco2_admission = True

        def __init__(self, decision: Any) -> None:
            import http

            super().__init__(decision.message, http.HTTPStatus(decision.status))
            self.decision = decision

    return AdmissionRefused


_REFUSED_CLS: Any = None


def refused_error(decision: Any) -> Exception:
    global _REFUSED_CLS
    if _REFUSED_CLS is None:
        _REFUSED_CLS = _refused_error_class()
    return _REFUSED_CLS(decision)


# ------------------------------------------------------------------ per-HTTP-request context
class _Ctx:
    __slots__ = ("headers", "tenant", "refused", "decision", "reserved_g")

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.tenant: str | None = None
        self.refused: Any = None
        self.decision: Any = None
        self.reserved_g = 0.0  # budget reserved by this HTTP request's sequences (g CO2e)


_CTX: contextvars.ContextVar[_Ctx | None] = contextvars.ContextVar("llmco2_admission", default=None)


class AdmissionMiddleware:
    """Pure ASGI (the app runs in this task; the engine's add_request sees the contextvar)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or _admission() is None:
            await self.app(scope, receive, send)
            return
        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or ()}
        except Exception:  # noqa: BLE001 - odd headers: no tenant from them
            headers = {}
        ctx = _Ctx(headers)
        token = _CTX.set(ctx)
        held: list[dict] = []
        replaced = [False]

        async def send_wrapped(message: dict) -> None:
            if replaced[0]:
                return  # vLLM's own answer to a refused request: dropped, ours went out
            if message["type"] == "http.response.start":
                held[:] = [message]
                return
            if held:
                start = held.pop()
                d = ctx.refused
                if d is not None:
                    try:
                        body = json.dumps(d.error_body()).encode()
                        hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *_decision_headers(d)]
                        if d.retry_after_s is not None:
                            hdrs.append((b"retry-after", str(max(1, math.ceil(d.retry_after_s))).encode()))
                        replaced[0] = True
                        await send({"type": "http.response.start", "status": d.status, "headers": hdrs})
                        await send({"type": "http.response.body", "body": body, "more_body": False})
                        return
                    except Exception as e:  # noqa: BLE001 - fail-open: vLLM's own answer goes out
                        replaced[0] = False
                        failed("app.init_entrypoints_middleware", e)
                elif ctx.decision is not None:
                    try:
                        start = {**start, "headers": list(start.get("headers", []))
                                 + _decision_headers(ctx.decision, ctx.reserved_g)}
                    except Exception as e:  # noqa: BLE001
                        failed("app.init_entrypoints_middleware", e)
                await send(start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        finally:
            _CTX.reset(token)


def _decision_headers(d: Any, reserved_g: float = 0.0) -> list[tuple[bytes, bytes]]:
    h = [(HEADER_DECISION.encode(), d.decision.encode()), (HEADER_REASON.encode(), d.reason.encode()),
         (HEADER_TENANT.encode(), d.tenant.encode("latin-1", "replace"))]
    if d.max_tokens is not None:
        h.append((HEADER_MAX_TOKENS.encode(), str(d.max_tokens).encode()))
    if reserved_g > 0:
        h.append((HEADER_RESERVED.encode(), f"{reserved_g:.6g}".encode()))
    return h


# ------------------------------------------------------------------ the controller of this process
class _Admission:
    """The process's controller, its config watcher, metrics and per-request bookkeeping."""

    def __init__(self, settings: Any, processes: int = 1) -> None:
        from llmco2_serve.admission import AdmissionController, ConfigWatcher, config_from_settings

        self.watcher = (ConfigWatcher(settings.admission_config, settings.admission_max_request_co2_g)
                        if settings.admission_config else None)
        config = (self.watcher.config if self.watcher is not None
                  else config_from_settings(None, settings.admission_max_request_co2_g))
        self.settings = settings
        self.counter = _prometheus_counter()
        self.controller = AdmissionController(config, on_decision=self._count, processes=processes)
        self.intensity_bound = False
        self._lock = threading.Lock()
        self._embodied: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._attrs: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmco2-admission", daemon=True)
        self._thread.start()
        led = self.controller.ledger
        logger.info("llmco2: %s%s", config.describe(),
                    f"; budgets shared by {processes} API server processes through {led.path}"
                    if led is not None and type(led).__name__ == "SharedBudgetLedger" else "")

    def _count(self, d: Any) -> None:
        c = self.counter
        if c is not None:
            c.labels(decision=d.decision, reason=d.reason).inc()
        if d.decision != "admit":
            logger.debug("llmco2: admission %s (%s, %s, tenant %s): %s", d.decision, d.reason, d.policy,
                         d.tenant, d.message)

    def bind_service(self, svc: Any) -> None:
        """Deferral reads the service's grid-intensity source; final values settle reservations."""
        if self.intensity_bound:
            return
        self.intensity_bound = True
        self.controller.intensity = _ServiceIntensity(svc)
        svc.final_value_hook = self._on_final

    def _on_final(self, request_id: str, energy_j: float, co2_g: float, source: str) -> None:
        with self._lock:
            emb = self._embodied.pop(request_id, 0.0)
        # Measured CO2 is operational only; the reservation included the embodied share (not measurable).
        self.controller.measured(request_id, co2_g + emb)

    def keep(self, request_id: str, embodied_g: float, attrs: dict) -> None:
        with self._lock:
            self._embodied[request_id] = embodied_g
            self._attrs[request_id] = attrs
            while len(self._attrs) > _MAX_KEPT:
                self._attrs.popitem(last=False)
            while len(self._embodied) > _MAX_KEPT:
                self._embodied.popitem(last=False)

    def pop_attrs(self, request_id: str) -> dict | None:
        with self._lock:
            return self._attrs.pop(request_id, None)

    def _loop(self) -> None:
        last_poll = 0.0
        while not self._stop.wait(0.5):
            try:
                self.controller.maintain()
                w = self.watcher
                cfg = self.controller.config
                now = time.monotonic()
                if w is not None and cfg.reload_interval_s > 0 and now - last_poll >= cfg.reload_interval_s:
                    last_poll = now
                    fails = w.reload_failures
                    if w.poll():
                        self.controller.reconfigure(w.config)
                        logger.info("llmco2: admission config reloaded: %s", w.config.describe())
                    elif w.reload_failures != fails:
                        logger.error("llmco2: admission config change refused, the previous one keeps serving: %s",
                                     w.last_error)
            except Exception as e:  # noqa: BLE001 - the loop must survive
                failed("admission.maintain", e)

    def close(self) -> None:
        self._stop.set()
        self.controller.close()


class _ServiceIntensity:
    """The controller's IntensitySource over the service's grid-intensity source
    (``llmco2_serve.carbon.intensity``: ``at(t)`` and ``next_hour_below``), else the static setting."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc

    def now_g_per_kwh(self, now_s: float) -> float:
        src = getattr(self.svc, "carbon_intensity", None)
        if src is not None and hasattr(src, "at"):
            return float(src.at(now_s).g_per_kwh)
        return float(self.svc.settings.intensity_g_per_kwh)

    def next_below(self, threshold: float, now_s: float, horizon_s: float) -> float | None:
        src = getattr(self.svc, "carbon_intensity", None)
        if src is not None and hasattr(src, "next_hour_below"):
            return src.next_hour_below(threshold, now_s, horizon_s)
        return now_s if self.svc.settings.intensity_g_per_kwh <= threshold else None


def _prometheus_counter() -> Any:
    """``llmco2_admission_decisions_total{decision,reason}`` in prometheus_client's default registry
    (what vLLM serves on /metrics); None without prometheus_client."""
    try:
        import prometheus_client as pc
    except ImportError:
        return None
    name = "llmco2_admission_decisions"
    existing = getattr(pc.REGISTRY, "_names_to_collectors", {}).get(name + "_total")
    if existing is not None:  # a second controller in this process (tests): the same series
        return existing
    return pc.Counter(name, "llmco2 admission-control decisions (decision: admit, lower, refuse, defer, "
                            "would_*; reason: within_limits, request_cap, tenant_budget, grid_intensity, "
                            "no_prediction, store_error, error)", ["decision", "reason"])


def check_config(settings: Any) -> None:
    """Start-up validation in every process (errors name the key). Raises AdmissionConfigError."""
    from llmco2_serve.admission import config_from_settings

    if settings.admission_config or settings.admission_max_request_co2_g is not None:
        config_from_settings(settings.admission_config, settings.admission_max_request_co2_g)


def setup(settings: Any, args: Any = None) -> _Admission | None:
    """Build this (API-server) process's admission controller; None when admission is off or
    its config is invalid and fail_open is on (logged). ``args``: vLLM's CLI arguments."""
    st = _state.state()
    if "admission" in st.extra:
        return st.extra["admission"]
    adm = None
    if settings.admission_config or settings.admission_max_request_co2_g is not None:
        try:
            adm = _Admission(settings, api_server_processes(args))
        except Exception as e:
            if not settings.fail_open:
                raise
            log_once("admission-config", logging.ERROR, "llmco2: admission control OFF: %s", e)
            adm = None
    if adm is not None:
        _quiet_vllm_stream_errors()
    if adm is not None and args is not None:
        cfg = adm.controller.config
        policy = str(getattr(args, "scheduling_policy", "fcfs"))
        if cfg.priority is not None and policy != "priority":
            logger.warning("llmco2: admission [priority] is set but vLLM runs --scheduling-policy %s: the "
                           "priorities are set and ignored by its scheduler (use --scheduling-policy priority)",
                           policy)
        if cfg.budgets is not None and cfg.budgets.shared is False and api_server_processes(args) > 1:
            logger.warning("llmco2: admission budgets with --api-server-count > 1 and budgets.shared = false: "
                           "each API server process keeps its own ledger, so each can spend a tenant's whole budget")
    st.extra["admission"] = adm
    return adm


def api_server_processes(args: Any) -> int:
    """How many API-server processes of this ``vllm serve`` decide on the same budgets.

    vLLM 0.32 (``entrypoints/cli/serve.py``): ``args.api_server_count`` stays N in every API-server
    process it spawns for N > 1 (``run_multi_api_server`` passes the same args to each), and is set
    to None on the single-server path; with N > 1 it also sets ``PROMETHEUS_MULTIPROC_DIR`` before
    spawning. Without args (another launcher) that variable is the sign of several processes."""
    n = getattr(args, "api_server_count", None) if args is not None else None
    if n is None:
        import os

        return 2 if args is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR") else 1
    try:
        return max(1, int(n))
    except (TypeError, ValueError):
        return 1


class _DropRefusals(logging.Filter):
    """vLLM's stream generators log every exception they turn into an error event with a traceback;
    a refusal is an answer, not an error (it is counted and on a span): drop those records only."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not getattr(exc, "llmco2_admission", False)


_STREAM_LOGGERS = ("vllm.entrypoints.openai.completion.serving", "vllm.entrypoints.openai.chat_completion.serving")


def _quiet_vllm_stream_errors() -> None:
    for name in _STREAM_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropRefusals) for f in lg.filters):
            lg.addFilter(_DropRefusals())


def _admission() -> _Admission | None:
    st = _state.state()
    return st.extra.get("admission") if st.active else None


# ------------------------------------------------------------------ the hooks api_server.py calls
def _predicted(p: Any) -> Any:
    from llmco2_serve.admission import Predicted

    if p is None:
        return None
    return Predicted(p.co2_g, p.co2_g_upper, p.energy_j, p.energy_j_upper, p.max_tokens)


def on_request(svc: Any, request: Any, prompt_len: int, running: int, siblings: int) -> Any:
    """Predict, decide, and keep the prediction of an admitted request (instead of
    ``svc.on_request``). Raises :class:`AdmissionRefused` for a refused one."""
    adm = _admission()
    sp = request.sampling_params
    rid = request.request_id
    if adm is None:
        return svc.on_request(rid, prompt_len, sp.max_tokens, running, siblings)
    ctx = _CTX.get()
    if ctx is not None and ctx.refused is not None:  # a sibling of this HTTP request was refused
        raise refused_error(ctx.refused)
    try:
        from llmco2_serve.admission import AdmissionRequest, tenant_from_headers

        adm.bind_service(svc)
        ctl = adm.controller
        cfg = ctl.config
        try:
            pred = svc.predict(rid, prompt_len, sp.max_tokens, running, siblings)
        except Exception as e:  # noqa: BLE001 - no prediction: the controller fails open (or not)
            failed("admission.predict", e)
            pred = None
        cache: dict[int, Any] = {}

        def what_if(m: int) -> Any:
            if m not in cache:
                cache[m] = svc.predict(rid, prompt_len, m, running, siblings)
            return _predicted(cache[m])

        tenant = "default"
        deferrable = False
        if ctx is not None:
            if ctx.tenant is None:
                hdr = cfg.budgets.tenant_header if cfg.budgets is not None else "x-llmco2-tenant"
                ctx.tenant = tenant_from_headers(ctx.headers, hdr)
            tenant = ctx.tenant
            if cfg.deferral is not None:
                deferrable = ctx.headers.get(cfg.deferral.header, "").strip().lower() in ("1", "true", "yes", "on")
        d = ctl.decide(AdmissionRequest(rid, tenant, _predicted(pred), deferrable,
                                        int(getattr(request, "priority", 0) or 0), what_if, max(1, int(siblings))))
    except Exception as e:  # noqa: BLE001 - fail-open boundary: admit
        failed("admission.decide", e)
        pred = svc.on_request(rid, prompt_len, sp.max_tokens, running, siblings)
        return pred
    attrs = d.span_attributes()
    if not d.admitted:
        if ctx is not None:
            ctx.refused = d
        _emit_refusal_span(ctx, rid, attrs)
        raise refused_error(d)
    if d.max_tokens is not None:
        sp.max_tokens = d.max_tokens
        pred = cache.get(d.max_tokens) or svc.predict(rid, prompt_len, d.max_tokens, running, siblings)
    if d.priority is not None:
        request.priority = d.priority
    if ctx is not None:
        if ctx.decision is None or d.decision != "admit":
            ctx.decision = d
        ctx.reserved_g += d.reserved_g
    adm.keep(rid, pred.embodied_co2_g if pred is not None else 0.0, attrs)
    if pred is not None:
        svc.record(pred)
    return pred


def _emit_refusal_span(ctx: _Ctx | None, request_id: str, attrs: dict) -> None:
    """A refused request never reaches vLLM's llm_request span: its decision goes on a span of its
    own, ``llmco2.admission``, in the trace of the incoming ``traceparent``."""
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(ctx.headers) if ctx is not None else None
        span = trace.get_tracer("llmco2_serve").start_span("llmco2.admission", context=parent)
        span.set_attributes({**attrs, "llmco2.request_id": request_id})
        span.end()
    except Exception as e:  # noqa: BLE001
        failed("admission.span", e)


def span_attributes(request_id: str) -> dict:
    adm = _admission()
    return (adm.pop_attrs(request_id) or {}) if adm is not None else {}


def on_finished(svc: Any, request_id: str) -> dict:
    """The request finished (API side): its decision's span attributes; its reservation waits for
    the measured final value (engine measuring) or settles at the predicted value."""
    adm = _admission()
    if adm is None:
        return {}
    _end(adm, svc, request_id)
    return adm.pop_attrs(request_id) or {}


def _end(adm: _Admission, svc: Any, request_id: str) -> None:
    # With a measuring engine the final value follows within about one counter period: wait for it
    # (settle_wait_s); without one the prediction is all there is: settle now at the expected value.
    measuring = bool(svc is not None and getattr(svc, "_engine_measuring", lambda: False)())
    ledger, b = adm.controller.ledger, adm.controller.config.budgets
    if ledger is not None and b is not None:
        try:
            ledger.end(request_id, None, b.settle_wait_s if measuring else 0.0)
        except Exception as e:  # noqa: BLE001 - a shared store failing: counted, the reservation expires later
            adm.controller._store_failed(e)


def on_aborted(svc: Any, request_ids: Any) -> None:
    adm = _admission()
    if adm is None:
        return
    measuring = bool(svc is not None and getattr(svc, "_engine_measuring", lambda: False)())
    for rid in request_ids:
        adm.pop_attrs(rid)
        # A final value comes for an aborted request the engine ran; none came -> it cost nothing
        # measurable (measuring engine) or its expected value (no measurement at all).
        adm.controller.finished(rid, 0.0 if measuring else None)
