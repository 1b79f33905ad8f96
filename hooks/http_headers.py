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
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from . import _state
from ._patches import apply, failed

logger = logging.getLogger("vllm.llmco2")

HEADER_ENERGY_J = "x-llmco2-predicted-energy-j"
HEADER_CO2_G = "x-llmco2-predicted-co2-g"
HEADER_ENERGY_J_UPPER = "x-llmco2-predicted-energy-j-upper"
HEADER_GEN_TOKENS = "x-llmco2-predicted-gen-tokens"
HEADER_SEQUENCES = "x-llmco2-predicted-sequences"


class PredictionHolder:
    """Sum of the predictions made for one HTTP request, and what makes its sequences one batch."""

    __slots__ = ("n", "energy_j", "co2_g", "energy_j_upper", "gen_tokens", "prompts", "_running")

    def __init__(self) -> None:
        self.n = 0
        self.energy_j = self.co2_g = self.energy_j_upper = 0.0
        self.gen_tokens = 0
        self.prompts = 1  # prompts of a multi-prompt completion (merge_async_iterators patch)
        self._running: int | None = None

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
        return [(HEADER_ENERGY_J.encode(), f"{self.energy_j:.6g}".encode()),
                (HEADER_CO2_G.encode(), f"{self.co2_g:.6g}".encode()),
                (HEADER_ENERGY_J_UPPER.encode(), f"{self.energy_j_upper:.6g}".encode()),
                (HEADER_GEN_TOKENS.encode(), str(self.gen_tokens).encode()),
                (HEADER_SEQUENCES.encode(), str(self.n).encode())]


_HOLDER: contextvars.ContextVar[PredictionHolder | None] = contextvars.ContextVar("llmco2_holder", default=None)


def current_holder() -> PredictionHolder | None:
    return _HOLDER.get()


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


def _wrap_init_middleware(orig):
    def init_entrypoints_middleware(args, app, *a, **k):
        result = orig(args, app, *a, **k)
        try:
            st = _state.state()
            if st.active and st.settings is not None and st.settings.response_headers:
                app.add_middleware(LLMCO2HeadersMiddleware)
        except Exception as e:  # noqa: BLE001 - fail-open boundary
            failed("app.init_entrypoints_middleware", e)
        return result
    return init_entrypoints_middleware


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
                                    ("completion.merge_async_iterators", _wrap_merge_async_iterators))
            if apply(name, make)]
