"""Test and demo helpers that need no GPU and no vLLM (a real local OTLP/HTTP receiver)."""

from __future__ import annotations

from typing import Any

__all__ = ["OtlpReceiver", "ReceivedRequest"]


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m llmco2_serve.testing.otlp_receiver` does not import the module twice.
    if name in __all__:
        from llmco2_serve.testing import otlp_receiver

        return getattr(otlp_receiver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
