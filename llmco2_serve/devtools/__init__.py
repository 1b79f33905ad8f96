"""Development tools: the demo, server control, tiny random-weight models, a real local OTLP/HTTP receiver and the
e2e test server. None of it needs a GPU; only the server parts need vLLM."""

from __future__ import annotations

from typing import Any

__all__ = ["OtlpReceiver", "ReceivedRequest"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m llmco2_serve.devtools.otlp_receiver` does not import the module twice.
    if name in __all__:
        from llmco2_serve.devtools import otlp_receiver

        return getattr(otlp_receiver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
