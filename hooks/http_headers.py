"""``x-llmco2-predicted-*`` HTTP response headers (ledger entry ``app.init_entrypoints_middleware``).

A pure-ASGI middleware gives each HTTP request a holder in a contextvar; the patched
``OutputProcessor.add_request`` (same task, or a task that copied the context) adds its
prediction to it (summed: a multi-prompt completion calls add_request once per prompt). The
middleware holds ``http.response.start`` until the first body message, when the prediction is
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


class PredictionHolder:
    """Sum of the predictions made for one HTTP request."""

    __slots__ = ("n", "energy_j", "co2_g", "energy_j_upper", "gen_tokens")

    def __init__(self) -> None:
        self.n = 0
        self.energy_j = self.co2_g = self.energy_j_upper = 0.0
        self.gen_tokens = 0

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
                (HEADER_GEN_TOKENS.encode(), str(self.gen_tokens).encode())]


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


def install() -> list[str]:
    return ["app.init_entrypoints_middleware"] if apply("app.init_entrypoints_middleware",
                                                        _wrap_init_middleware) else []
