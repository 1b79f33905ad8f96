"""API-server patches: predict in ``OutputProcessor.add_request``, read the engine's measurement
in ``process_outputs``, put both on vLLM's own ``llm_request`` span (ledger entries
``output_processor.*`` in ``_patches.py``)."""

from __future__ import annotations

import collections
import contextvars
import logging
from typing import Any

from llmco2_serve.runtime.service import (
    ERROR_ATTRIBUTE, FINALS_HEADER, FINALS_REQUEST_ID, MEASURED_HEADER, MEASURED_SOURCE_PENDING, decode_measured,
)

from . import _state
from ._patches import apply, failed
from . import admission
from .http_headers import current_holder, deliver_measured, track

logger = logging.getLogger("vllm.llmco2")

# llmco2 attributes of the request whose llm_request span vLLM is building right now.
_SPAN_ATTRS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("llmco2_span_attrs", default=None)
# request id -> attributes, between process_outputs and do_tracing (same call).
_stash: dict[str, dict] = {}
# The request whose llm_request span is being built (do_tracing -> instrument_manual).
_SPAN_RID: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmco2_span_rid", default=None)
# Trace context of spans that went out with measured source "pending" (stop strings): their final
# value follows as an llmco2.measurement span in the same trace. Bounded: oldest dropped first.
_pending_ctx: collections.OrderedDict[str, Any] = collections.OrderedDict()
_MAX_PENDING_CTX = 16384


def _emit_late_measurement(request_id: str, attributes: dict) -> None:
    """EnergyService.late_measurement_hook: the final value of a request whose span said pending,
    as a span ``llmco2.measurement`` with the same parent (the request's trace)."""
    ctx = _pending_ctx.pop(request_id, None)
    if ctx is None:
        return
    from opentelemetry import trace

    span = trace.get_tracer("llmco2_serve").start_span("llmco2.measurement", context=ctx[0],
                                                       start_time=ctx[1])
    span.set_attributes({**attributes, "llmco2.request_id": request_id})
    span.end()


def service():
    st = _state.state()
    return st.service if st.active else None


def _prompt_len(request: Any) -> int:
    ids = request.prompt_token_ids
    if ids is not None:
        return len(ids)
    embeds = getattr(request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


def _wrap_add_request(orig):
    # OutputProcessor.add_request(request, prompt, parent_req=None, request_index=0, queue=None).
    # AsyncLLM adds the n children of a parallel-sampling request in one synchronous loop
    # (child idx sees idx siblings already in request_states), before any of them reaches the
    # engine; the prompts of one multi-prompt completion arrive from separate tasks, counted by the
    # HTTP request's holder (http_headers.py). All sequences of one HTTP request are predicted as
    # one batch with the others in flight when its first sequence arrived.
    def add_request(self, request, *args, **kwargs):
        try:
            svc = service()
            sp = request.sampling_params
            if svc is not None and sp is not None and request.request_id not in self.request_states:
                parent = args[1] if len(args) > 1 else kwargs.get("parent_req")
                running = len(self.request_states)
                n = 1
                if parent is not None:
                    n = max(1, int(getattr(parent, "n", 1) or 1))
                    index = args[2] if len(args) > 2 else kwargs.get("request_index", 0)
                    running = max(0, running - int(index or 0))
                holder = current_holder()
                siblings = n
                if holder is not None:
                    running = holder.group_running(running)
                    siblings = n * holder.prompts
                # Admission control (admission.py) decides here, before the request is registered or
                # reaches the engine; without it this is svc.on_request.
                pred = admission.on_request(svc, request, _prompt_len(request), running, siblings)
                if holder is not None:
                    track(request.request_id, holder)  # its first answer goes back to the client
                    if pred is not None:
                        holder.add(pred)
        except Exception as e:  # noqa: BLE001 - fail-open boundary: a request must never fail for us
            if getattr(e, "llmco2_admission", False):
                raise  # refused by admission control (a GracefulHTTPError: vLLM answers with its status)
            failed("output_processor.add_request", e)
        return orig(self, request, *args, **kwargs)
    return add_request


def _wrap_abort_requests(orig):
    # OutputProcessor.abort_requests(request_ids, internal) -> internal ids it removed: every API-side
    # abort (client disconnect, error while adding, pause/sleep "abort") passes here. Those requests
    # never reach on_finished, so their predictions are dropped now.
    def abort_requests(self, *args, **kwargs):
        aborted = orig(self, *args, **kwargs)
        try:
            svc = service()
            if svc is not None and aborted:
                svc.forget_many(aborted)
                admission.on_aborted(svc, aborted)
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("output_processor.abort_requests", e)
        return aborted
    return abort_requests


def _finished_attributes(svc: Any, request_id: str, gen_tokens: int | None, measured: dict | None,
                         span: bool = True) -> dict:
    # Every API-side finish passes here before vLLM queues the request's final output: the span's
    # measured value (first answer, or pending) also goes to the HTTP response (http_headers.py).
    # span=False: vLLM's tracing is off, no span is built; only what the response reads.
    attrs = svc.on_finished(request_id, gen_tokens, measured, span=span)
    try:
        attrs.update(admission.on_finished(svc, request_id))  # decision on the span; budget settles
    except Exception as e:  # noqa: BLE001 - fail-open boundary
        failed("admission.finished", e)
    try:
        deliver_measured(request_id, attrs)
    except Exception as e:  # noqa: BLE001 - fail-open boundary
        failed("app.init_entrypoints_middleware", e)
    return attrs


def _wrap_process_outputs(orig):
    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        stashed: list[str] = []
        finals = None
        try:
            # Final values and books ride on a synthetic output, always the last of its batch
            # (engine_core._attach_finals / the idle poller): take it out before vLLM sees it, and
            # take it in after this batch's finished requests (a request's final output and its
            # final value can arrive in the same batch).
            if engine_core_outputs and engine_core_outputs[-1].request_id == FINALS_REQUEST_ID:
                finals = engine_core_outputs[-1]
                engine_core_outputs = engine_core_outputs[:-1]
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("output_processor.process_outputs", e)
        try:
            svc = service()
            if svc is not None:
                tracing = getattr(self, "tracing_enabled", True)
                for o in engine_core_outputs:
                    if o.finish_reason is None:
                        continue
                    th = o.trace_headers
                    raw = th.get(MEASURED_HEADER) if th else None
                    measured = None
                    if raw is not None:
                        o.trace_headers = {k: v for k, v in th.items() if k != MEASURED_HEADER}
                        measured = decode_measured(raw)
                    if o.request_id not in self.request_states:
                        continue  # already finished on the API side (e.g. stop string)
                    gen = measured.get("gen_tokens") if measured else None
                    if tracing:
                        _stash[o.request_id] = _finished_attributes(svc, o.request_id, gen, measured)
                        stashed.append(o.request_id)
                    else:
                        _finished_attributes(svc, o.request_id, gen, measured, span=False)
            if finals is not None and svc is not None and finals.trace_headers:
                svc.on_engine_finals(finals.trace_headers[FINALS_HEADER])
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("output_processor.process_outputs", e)
        try:
            out = orig(self, engine_core_outputs, *args, **kwargs)
        finally:
            for rid in stashed:  # tracing off: nobody consumed them
                _stash.pop(rid, None)
        try:
            # Requests finished here on a stop string (vLLM aborts them in the engine): with tracing
            # off no span was built, so on_finished still has to release their prediction.
            to_abort = getattr(out, "reqs_to_abort", None)
            if to_abort:
                svc = service()
                if svc is not None:
                    for rid in to_abort:
                        if svc.prediction(rid) is not None:
                            _finished_attributes(svc, rid, None, None, span=False)
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("output_processor.process_outputs", e)
        return out
    return process_outputs


def _wrap_do_tracing(orig):
    def do_tracing(self, engine_core_output, req_state, iteration_stats, *args, **kwargs):
        attrs = None
        try:
            svc = service()
            if svc is not None:
                rid = req_state.request_id
                attrs = _stash.pop(rid, None)
                if attrs is None:  # finished here, not in the engine (stop string): nothing measured
                    gen = getattr(getattr(req_state, "stats", None), "num_generation_tokens", None)
                    attrs = _finished_attributes(svc, rid, gen, None)
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("output_processor.do_tracing", e)
            attrs = {ERROR_ATTRIBUTE: f"{type(e).__name__}: {e}"}
        token = _SPAN_ATTRS.set(attrs)
        token_rid = _SPAN_RID.set(getattr(req_state, "request_id", None))
        try:
            return orig(self, engine_core_output, req_state, iteration_stats, *args, **kwargs)
        finally:
            _SPAN_ATTRS.reset(token)
            _SPAN_RID.reset(token_rid)
    return do_tracing


def _wrap_instrument_manual(orig):
    def instrument_manual(span_name, start_time, *args, **kwargs):
        try:
            extra = _SPAN_ATTRS.get()
            if extra and span_name == "llm_request":
                attributes = kwargs.get("attributes")
                if attributes is None and len(args) >= 2:
                    attributes = args[1]
                if attributes is not None:
                    attributes.update(extra)
                if extra.get("llmco2.measured.source") == MEASURED_SOURCE_PENDING:
                    rid = _SPAN_RID.get()
                    svc = service()
                    if rid is not None and svc is not None:
                        ctx = kwargs.get("context") if "context" in kwargs else (args[2] if len(args) > 2 else None)
                        end = kwargs.get("end_time") if "end_time" in kwargs else (args[0] if args else None)
                        _pending_ctx[rid] = (ctx, end)
                        while len(_pending_ctx) > _MAX_PENDING_CTX:
                            _pending_ctx.popitem(last=False)
                        svc.late_measurement_hook = _emit_late_measurement
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("output_processor.instrument_manual", e)
        return orig(span_name, start_time, *args, **kwargs)
    return instrument_manual


def install() -> list[str]:
    done = []
    for name, make in (("output_processor.add_request", _wrap_add_request),
                       ("output_processor.process_outputs", _wrap_process_outputs),
                       ("output_processor.do_tracing", _wrap_do_tracing),
                       ("output_processor.instrument_manual", _wrap_instrument_manual),
                       ("output_processor.abort_requests", _wrap_abort_requests)):
        if apply(name, make):
            done.append(name)
    return done
