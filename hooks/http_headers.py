"""``x-llmco2-predicted-*`` HTTP response headers (ledger entries ``app.init_entrypoints_middleware``
and ``completion.merge_async_iterators``).

A pure-ASGI middleware gives each HTTP request a holder in a contextvar; the patched
``OutputProcessor.add_request`` (same task, or a task that copied the context) adds its
prediction to it. The headers describe the whole response: the sum over every sequence vLLM runs
for it (the ``n`` children of ``"n": 3``, each prompt of a multi-prompt completion), and
``x-llmco2-predicted-sequences`` says how many that is. The holder also keeps those sequences one
batch: it records how many prompts the completion has (patched ``merge_async_iterators``, called
before any of them reaches ``add_request``) and the requests in flight when the first one arrived.

The middleware holds ``http.response.start`` until the first body message, when the prediction is
known also for streaming responses (whose start is sent before the engine runs).

The measurement goes back too (issue 8 §4): every sequence added under a holder is registered by its
request id, and the API-side patches (api_server.py) hand each one's span attributes (the engine's
*first answer*, or ``pending`` for a stop string) to :func:`deliver_measured` before vLLM queues its
final output. A non-streaming response starts only after all its sequences finished, so its start
carries ``x-llmco2-measured-*``; a streaming one started long before, so the measurement rides on
the final usage chunk instead (``stream_options.include_usage``: an ``llmco2`` object next to
``usage``, ledger entries ``completion.stream_usage_chunk`` and ``chat.stream_usage_chunk``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
from typing import Any

from . import _state
from ._patches import apply, failed

logger = logging.getLogger("vllm.llmco2")

HEADER_ENERGY_J = "x-llmco2-predicted-energy-j"
HEADER_CO2_G = "x-llmco2-predicted-co2-g"
HEADER_ENERGY_J_UPPER = "x-llmco2-predicted-energy-j-upper"
HEADER_GEN_TOKENS = "x-llmco2-predicted-gen-tokens"
HEADER_SEQUENCES = "x-llmco2-predicted-sequences"
HEADER_MEASURED_ENERGY_J = "x-llmco2-measured-energy-j"
HEADER_MEASURED_CO2_G = "x-llmco2-measured-co2-g"
HEADER_MEASURED_SOURCE = "x-llmco2-measured-source"
HEADER_MEASURED_FINAL = "x-llmco2-measured-final"
HEADER_MEASURED_ESTIMATED_J = "x-llmco2-measured-estimated-energy-j"
HEADER_MEASURED_UNCERTAINTY_J = "x-llmco2-measured-uncertainty-j"
HEADER_MEASURED_SEQUENCES = "x-llmco2-measured-sequences"
# The same names as ASGI header bytes, encoded once (they go on every response).
(_B_ENERGY_J, _B_CO2_G, _B_ENERGY_J_UPPER, _B_GEN_TOKENS, _B_SEQUENCES, _B_MEASURED_ENERGY_J, _B_MEASURED_CO2_G,
 _B_MEASURED_SOURCE, _B_MEASURED_FINAL, _B_MEASURED_ESTIMATED_J, _B_MEASURED_UNCERTAINTY_J,
 _B_MEASURED_SEQUENCES) = (h.encode() for h in (
    HEADER_ENERGY_J, HEADER_CO2_G, HEADER_ENERGY_J_UPPER, HEADER_GEN_TOKENS, HEADER_SEQUENCES,
    HEADER_MEASURED_ENERGY_J, HEADER_MEASURED_CO2_G, HEADER_MEASURED_SOURCE, HEADER_MEASURED_FINAL,
    HEADER_MEASURED_ESTIMATED_J, HEADER_MEASURED_UNCERTAINTY_J, HEADER_MEASURED_SEQUENCES))
# Span attribute names (telemetry.py) read from the first answer.
_A_SOURCE, _A_ENERGY, _A_CO2 = "llmco2.measured.source", "llmco2.measured.energy_j", "llmco2.measured.co2_g"
_A_FINAL, _A_EST, _A_UNC = ("llmco2.measured.final", "llmco2.measured.estimated_energy_j",
                            "llmco2.measured.uncertainty_j")


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


class PredictionHolder:
    """Sum of the predictions made for one HTTP request, what makes its sequences one batch, and
    the sum of their measured first answers."""

    __slots__ = ("n", "energy_j", "co2_g", "energy_j_upper", "gen_tokens", "prompts", "_running",
                 "m_n", "m_energy_j", "m_co2_g", "m_estimated_j", "m_uncertainty_j",
                 "m_missing", "m_final", "m_sources", "request_ids")

    def __init__(self) -> None:
        self.n = 0
        self.energy_j = self.co2_g = self.energy_j_upper = 0.0
        self.gen_tokens = 0
        self.prompts = 1  # prompts of a multi-prompt completion (merge_async_iterators patch)
        self._running: int | None = None
        self.request_ids: list[str] = []  # sequences registered for a measurement (track(); untrack())
        self.m_n = 0  # ... of which a first answer arrived
        self.m_energy_j = self.m_co2_g = self.m_estimated_j = self.m_uncertainty_j = 0.0
        self.m_missing = 0  # first answers without an energy (pending, unavailable)
        self.m_final = True
        self.m_sources: list[str] = []

    @property
    def sequences(self) -> int:
        return len(self.request_ids)

    def add_measured(self, attrs: dict) -> None:
        """One sequence's span attributes (its first answer)."""
        self.m_n += 1
        source = str(attrs.get(_A_SOURCE) or "unavailable")
        if source not in self.m_sources:
            self.m_sources.append(source)
        energy, co2 = _number(attrs.get(_A_ENERGY)), _number(attrs.get(_A_CO2))
        if energy is None:
            self.m_missing += 1
            self.m_final = False
            return
        self.m_energy_j += energy
        self.m_co2_g += co2 or 0.0
        self.m_estimated_j += _number(attrs.get(_A_EST)) or 0.0
        self.m_uncertainty_j += _number(attrs.get(_A_UNC)) or 0.0
        if attrs.get(_A_FINAL) is not True:
            self.m_final = False

    def measured(self) -> dict[str, Any] | None:
        """The whole response's measurement as known now, or None when nothing was registered.
        Energies only when every sequence has one (a sum missing a pending sequence would
        understate it); ``source`` lists the distinct sources, e.g. ``fake`` or ``nvml,pending``;
        sequences registered but not answered count as ``unavailable``."""
        if not self.sequences:
            return None
        sources = list(self.m_sources)
        if self.m_n < self.sequences and "unavailable" not in sources:
            sources.append("unavailable")
        out: dict[str, Any] = {"source": ",".join(sources), "sequences": self.sequences,
                               "final": bool(self.m_final and self.m_n == self.sequences)}
        if self.m_n == self.sequences and not self.m_missing:
            out.update(energy_j=self.m_energy_j, co2_g=self.m_co2_g, estimated_energy_j=self.m_estimated_j,
                       uncertainty_j=self.m_uncertainty_j)
        return out

    def measured_headers(self) -> list[tuple[bytes, bytes]]:
        m = self.measured()
        if m is None:
            return []
        out = [(_B_MEASURED_SOURCE, m["source"].encode()),
               (_B_MEASURED_FINAL, b"true" if m["final"] else b"false"),
               (_B_MEASURED_SEQUENCES, b"%d" % m["sequences"])]
        if "energy_j" in m:
            out += [(_B_MEASURED_ENERGY_J, b"%.9g" % m["energy_j"]),
                    (_B_MEASURED_CO2_G, b"%.9g" % m["co2_g"]),
                    (_B_MEASURED_ESTIMATED_J, b"%.9g" % m["estimated_energy_j"]),
                    (_B_MEASURED_UNCERTAINTY_J, b"%.9g" % m["uncertainty_j"])]
        return out

    def usage_object(self) -> dict[str, Any]:
        """The ``llmco2`` object of a streaming response's final usage chunk."""
        obj: dict[str, Any] = {}
        if self.n:
            obj.update(predicted_energy_j=self.energy_j, predicted_co2_g=self.co2_g,
                       predicted_energy_j_upper=self.energy_j_upper, predicted_gen_tokens=self.gen_tokens,
                       predicted_sequences=self.n)
        m = self.measured()
        if m is not None:
            obj.update({f"measured_{k}": v for k, v in m.items()})
        return obj

    def group_running(self, running: int) -> int:
        """Requests in flight (not this HTTP request's) when its first sequence arrived: the first
        call's ``running``; later sequences of the same response reuse it."""
        if self._running is None:
            self._running = running
        return self._running

    def add(self, pred: Any) -> None:
        self.n += 1
        self.energy_j += pred.energy_j
        self.co2_g += pred.co2_g
        self.energy_j_upper += pred.energy_j_upper
        self.gen_tokens += pred.gen_tokens

    def headers(self) -> list[tuple[bytes, bytes]]:
        if not self.n:
            return []
        return [(_B_ENERGY_J, b"%.6g" % self.energy_j),
                (_B_CO2_G, b"%.6g" % self.co2_g),
                (_B_ENERGY_J_UPPER, b"%.6g" % self.energy_j_upper),
                (_B_GEN_TOKENS, b"%d" % self.gen_tokens),
                (_B_SEQUENCES, b"%d" % self.n)]


_HOLDER: contextvars.ContextVar[PredictionHolder | None] = contextvars.ContextVar("llmco2_holder", default=None)


def current_holder() -> PredictionHolder | None:
    return _HOLDER.get()


# Request id (vLLM's internal one, a sequence) -> the holder of its HTTP request. An entry goes
# when its first answer is delivered, or when its response is done (the middleware drops what is
# left: aborts, failures). A plain dict: a weak one costs a weakref and a callback per request.
_BY_REQUEST: dict[str, PredictionHolder] = {}


def track(request_id: str, holder: PredictionHolder) -> None:
    """Register one sequence of ``holder``'s response for its measurement."""
    if request_id not in _BY_REQUEST:
        holder.request_ids.append(request_id)
        _BY_REQUEST[request_id] = holder


def untrack(holder: PredictionHolder) -> None:
    """The response is done: forget its sequences that never got a first answer."""
    for rid in holder.request_ids:
        if _BY_REQUEST.get(rid) is holder:
            del _BY_REQUEST[rid]


def deliver_measured(request_id: str, attrs: dict) -> None:
    """A sequence's span attributes (first answer) to its response, once."""
    holder = _BY_REQUEST.pop(request_id, None)
    if holder is not None:
        holder.add_measured(attrs)


class LLMCO2HeadersMiddleware:
    """Pure ASGI middleware (not BaseHTTPMiddleware: that would run the app in another task)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        holder = PredictionHolder()
        token = _HOLDER.set(holder)
        held: list[dict] = []

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                held[:] = [message]
                return
            if held:
                start = held.pop()
                try:
                    extra = holder.headers()
                    if not _is_event_stream(start):  # all sequences done: their first answers are in
                        extra += holder.measured_headers()
                    if extra:
                        start = {**start, "headers": list(start.get("headers", [])) + extra}
                except Exception as e:  # noqa: BLE001 - fail-open boundary: never lose a response
                    failed("app.init_entrypoints_middleware", e)
                await send(start)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _HOLDER.reset(token)
            if holder.request_ids:
                untrack(holder)


def _is_event_stream(start: dict) -> bool:
    for k, v in start.get("headers", ()):
        if bytes(k).lower() == b"content-type":
            return bytes(v).lower().startswith(b"text/event-stream")
    return False


def _with_llmco2_usage(chunk: Any, holder: PredictionHolder) -> Any:
    """The final usage chunk (``data: {...}`` whose ``choices`` is empty and that has ``usage``)
    with an ``llmco2`` object next to ``usage``; any other chunk unchanged."""
    if not isinstance(chunk, str) or not chunk.startswith("data: {") or '"usage"' not in chunk:
        return chunk
    body = chunk[len("data: "):].rstrip("\n")
    obj = json.loads(body)
    if not isinstance(obj, dict) or obj.get("choices") != [] or not isinstance(obj.get("usage"), dict):
        return chunk
    extra = holder.usage_object()
    if not extra:
        return chunk
    obj["llmco2"] = extra
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


def _make_stream_wrapper(name: str):
    # The serving classes' stream generators yield SSE strings; the last data chunk before [DONE]
    # is the usage chunk, built after every sequence's final output was processed (and so after
    # their first answers reached the holder). The holder is taken from the HTTP request's context
    # when vLLM creates the generator.
    def make(orig):
        def stream_generator(self, *args, **kwargs):
            gen = orig(self, *args, **kwargs)
            try:
                holder = _HOLDER.get()
            except Exception as e:  # noqa: BLE001 - fail-open boundary
                failed(name, e)
                holder = None
            if holder is None:
                return gen
            return _stream_with_usage(gen, holder, name)
        return stream_generator
    return make


async def _stream_with_usage(gen: Any, holder: PredictionHolder, name: str):
    try:
        async for chunk in gen:
            try:
                chunk = _with_llmco2_usage(chunk, holder)
            except Exception as e:  # noqa: BLE001 - fail-open boundary: the chunk goes out as vLLM made it
                failed(name, e)
            yield chunk
    finally:
        await gen.aclose()


def _wrap_init_middleware(orig):
    def init_entrypoints_middleware(args, app, *a, **k):
        result = orig(args, app, *a, **k)
        try:
            st = _state.state()
            if st.active and st.settings is not None and st.settings.response_headers:
                app.add_middleware(LLMCO2HeadersMiddleware)
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("app.init_entrypoints_middleware", e)
        _install_admission(args, app)
        return result
    return init_entrypoints_middleware


def _install_admission(args: Any, app: Any) -> None:
    """Admission control (admission.py): built here, in the API server only, at start-up."""
    st = _state.state()
    try:
        if st.active and st.settings is not None:
            from . import admission

            if admission.setup(st.settings, args) is not None:
                app.add_middleware(admission.AdmissionMiddleware)
    except Exception as e:  # noqa: BLE001 - fail-open boundary (re-raised when LLMCO2_FAIL_OPEN=0)
        if st.settings is not None and not st.settings.fail_open:
            raise
        failed("app.init_entrypoints_middleware", e)


def _wrap_merge_async_iterators(orig):
    # Called by the completions endpoint with one generator per prompt, before any of them runs
    # (their add_request happens inside the merged iteration): the prompt count is known here.
    def merge_async_iterators(*iterators, **kwargs):
        try:
            holder = _HOLDER.get()
            if holder is not None and len(iterators) > 1:
                holder.prompts = len(iterators)
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("completion.merge_async_iterators", e)
        return orig(*iterators, **kwargs)
    return merge_async_iterators


def install() -> list[str]:
    return [name for name, make in (("app.init_entrypoints_middleware", _wrap_init_middleware),
                                    ("completion.merge_async_iterators", _wrap_merge_async_iterators),
                                    ("completion.stream_usage_chunk", _make_stream_wrapper("completion.stream_usage_chunk")),
                                    ("chat.stream_usage_chunk", _make_stream_wrapper("chat.stream_usage_chunk")))
            if apply(name, make)]
