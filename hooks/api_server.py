"""API-server patches: predict in ``OutputProcessor.add_request``, read the engine's measurement
in ``process_outputs``, put both on vLLM's own ``llm_request`` span (ledger entries
``output_processor.*`` in ``_patches.py``)."""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from llmco2_serve.service import (
    ERROR_ATTRIBUTE, FINALS_HEADER, FINALS_REQUEST_ID, MEASURED_HEADER, decode_measured,
)

from . import _state
from ._patches import apply, failed
from .http_headers import current_holder

logger = logging.getLogger("vllm.llmco2")

# llmco2 attributes of the request whose llm_request span vLLM is building right now.
_SPAN_ATTRS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("llmco2_span_attrs", default=None)
# request id -> attributes, between process_outputs and do_tracing (same call).
_stash: dict[str, dict] = {}


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
                pred = svc.on_request(request.request_id, _prompt_len(request), sp.max_tokens, running, siblings)
                if holder is not None and pred is not None:
                    holder.add(pred)
        except Exception as e:  # noqa: BLE001 - fail-open boundary: a request must never fail for us
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
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("output_processor.abort_requests", e)
        return aborted
    return abort_requests


def _finished_attributes(svc: Any, request_id: str, gen_tokens: int | None, measured: dict | None) -> dict:
    return svc.on_finished(request_id, gen_tokens, measured)


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
                    _stash[o.request_id] = _finished_attributes(svc, o.request_id, gen, measured)
                    stashed.append(o.request_id)
            if finals is not None and svc is not None and finals.trace_headers:
                svc.on_engine_finals(finals.trace_headers[FINALS_HEADER])
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("output_processor.process_outputs", e)
        try:
            return orig(self, engine_core_outputs, *args, **kwargs)
        finally:
            for rid in stashed:  # tracing off: nobody consumed them
                _stash.pop(rid, None)
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
        try:
            return orig(self, engine_core_output, req_state, iteration_stats, *args, **kwargs)
        finally:
            _SPAN_ATTRS.reset(token)
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
